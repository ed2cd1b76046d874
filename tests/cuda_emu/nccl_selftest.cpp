// tests/cuda_emu/nccl_selftest.cpp: suite "cuda emulator": the emulated NCCL (tests/cuda_emu/nccl.h)
// through `mpirun -np 2 build/run_tests_emu`, two ranks on two emulated devices and on one: sums
// and broadcasts against values computed here, and each misuse NCCL would hang on or garble (ids
// that were not exchanged, mismatched calls, host or short buffers, a capturing stream, a duplicate
// device) an error on every rank that names it, the ranks still in step after it.
#include <cuda_runtime.h>
#include <doctest/doctest.h>
#include <nccl.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../test_util.h"
#include "selftest_util.h"
#include "tp.h"

namespace {

std::string message(ncclResult_t r) { return ncclGetErrorString(r); }

}  // namespace

TEST_SUITE("cuda emulator") {

TEST_CASE("cuda emulator nccl worker: two ranks" * doctest::skip(!launched_by_mpirun())) {
    Comm& world = mpi_world();
    const int me = world.rank(), R = world.size();
    REQUIRE(R == 2);
    CAPTURE(me);
    int devices = 0;
    REQUIRE(cudaGetDeviceCount(&devices) == cudaSuccess);
    REQUIRE(cudaSetDevice(me % devices) == cudaSuccess);
    cudaStream_t s;
    REQUIRE(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) == cudaSuccess);

    // Set-up: the id rank 0 made must reach every rank, and every rank pass its own rank.
    ncclComm_t comm = nullptr;
    ncclUniqueId id;
    REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);  // each rank its own: they differ
    ncclResult_t r = ncclCommInitRank(&comm, R, id, me);
    CHECK(r == ncclInvalidUsage);
    CHECK_MESSAGE(has(message(r), "rank 1's unique id differs from rank 0's"), message(r));
    ncclUniqueId junk;
    std::memset(&junk, 0, sizeof junk);
    r = ncclCommInitRank(&comm, R, junk, me);
    CHECK(r == ncclInvalidUsage);
    CHECK_MESSAGE(has(message(r), "not made by ncclGetUniqueId"), message(r));
    world.broadcast(&id, sizeof id, 0);
    r = ncclCommInitRank(&comm, R + 1, id, me);
    CHECK_MESSAGE(has(message(r), "rank 0 passes nranks 3"), message(r));
    r = ncclCommInitRank(&comm, R, id, R - 1 - me);
    CHECK_MESSAGE(has(message(r), "MPI rank 0 passes NCCL rank 1"), message(r));
    CHECK(comm == nullptr);
    r = ncclCommInitRank(&comm, R, id, me);
    if (devices == 1) {  // both ranks on device 0
        CHECK(r == ncclInvalidUsage);
        CHECK_MESSAGE(has(message(r), "ranks 0 and 1 both use the device at PCI 0000:10:00.0"), message(r));
        return;
    }
    REQUIRE(r == ncclSuccess);

    // Sums, out of place (the input kept) and in place: small integers, exact.
    const size_t n = 1000;
    std::vector<float> x(n), sum(n);
    for (size_t i = 0; i < n; i++) x[i] = float((me + 1) * int(i % 7)), sum[i] = float(3 * int(i % 7));
    float* dx = device(x);
    float* dy = device(std::vector<float>(n, -1.0f));
    CHECK(ncclAllReduce(dx, dy, n, ncclFloat, ncclSum, comm, s) == ncclSuccess);
    CHECK(host(dy, n) == sum);
    CHECK(host(dx, n) == x);
    CHECK(ncclAllReduce(dx, dx, n, ncclFloat, ncclSum, comm, s) == ncclSuccess);
    CHECK(host(dx, n) == sum);

    // A broadcast of bytes from the last rank, its send buffer apart from its receive buffer.
    std::vector<unsigned char> mine(100), root(100);
    for (size_t i = 0; i < mine.size(); i++) mine[i] = (unsigned char)(i * 3 + me), root[i] = (unsigned char)(i * 3 + R - 1);
    unsigned char* send = device(mine);
    unsigned char* recv = device(std::vector<unsigned char>(100, 0));
    CHECK(ncclBroadcast(send, recv, 100, ncclUint8, R - 1, comm, s) == ncclSuccess);
    CHECK(host(recv, 100) == root);
    CHECK(host(send, 100) == mine);

    // Misuse: an error on every rank, naming what went wrong.
    r = ncclAllReduce(dx, dx, me == 0 ? 4 : 8, ncclFloat, ncclSum, comm, s);
    CHECK(r == ncclInvalidUsage);
    CHECK_MESSAGE(has(message(r), "every rank must call the same collective"), message(r));
    r = ncclBroadcast(send, send, 16, ncclUint8, me, comm, s);  // each rank a different root
    CHECK_MESSAGE(has(message(r), "every rank must call the same collective"), message(r));
    r = ncclAllReduce(me == 1 ? x.data() : dx, dy, n, ncclFloat, ncclSum, comm, s);  // host memory on rank 1
    CHECK(r == (me == 1 ? ncclInvalidArgument : ncclInvalidUsage));
    CHECK_MESSAGE(has(message(r), "on rank 1: the send buffer"), message(r));
    CHECK_MESSAGE(has(message(r), "is not 4000 bytes of device memory"), message(r));
    r = ncclAllReduce(dx, dy, n + 1, ncclFloat, ncclSum, comm, s);  // one past the allocations
    CHECK_MESSAGE(has(message(r), "is not 4004 bytes of device memory"), message(r));
    r = ncclAllReduce(dx, dy, n, ncclInt32, ncclSum, comm, s);
    CHECK_MESSAGE(has(message(r), "only float sums"), message(r));
    r = ncclBroadcast(dx, dx, n, ncclFloat, 0, comm, s);
    CHECK_MESSAGE(has(message(r), "only bytes"), message(r));
    r = ncclBroadcast(send, recv, 100, ncclUint8, R, comm, s);
    CHECK_MESSAGE(has(message(r), "root 2 of 2 ranks"), message(r));
    r = ncclAllReduce(dx, dy, n, ncclFloat, ncclSum, comm, reinterpret_cast<cudaStream_t>(&x));
    CHECK_MESSAGE(has(message(r), "not a CUDA stream"), message(r));
    cudaGetLastError();
    REQUIRE(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed) == cudaSuccess);
    r = ncclAllReduce(dx, dy, n, ncclFloat, ncclSum, comm, s);
    CHECK_MESSAGE(has(message(r), "the stream is capturing a graph"), message(r));
    cudaGraph_t g = nullptr;
    CHECK(cudaStreamEndCapture(s, &g) == cudaSuccess);
    cudaGraphDestroy(g);

    // Still in step after all that.
    CHECK(ncclAllReduce(dx, dy, n, ncclFloat, ncclSum, comm, s) == ncclSuccess);
    for (float& v : sum) v *= 2;
    CHECK(host(dy, n) == sum);
    CHECK(ncclCommDestroy(comm) == ncclSuccess);
    CHECK(ncclCommDestroy(comm) == ncclInvalidArgument);
    CHECK(ncclAllReduce(dx, dy, n, ncclFloat, ncclSum, comm, s) == ncclInvalidArgument);
    for (void* p : {static_cast<void*>(dx), static_cast<void*>(dy), static_cast<void*>(send), static_cast<void*>(recv)})
        cudaFree(p);
}

TEST_CASE("cuda emulator: NCCL over MPI, two ranks on two emulated devices and on one") {
    if (launched_by_mpirun()) return;  // the worker runs; this launcher does not recurse
    if (std::system("command -v mpirun >/dev/null 2>&1") != 0) {
        MESSAGE("skipped: mpirun not found (bash scripts/setup.sh installs Open MPI)");
        return;
    }
    char self[4096];
    const ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
    REQUIRE(len > 0);
    for (const char* devices : {"2", "1"}) {
        CAPTURE(std::string(devices));
        CommandResult w = run_command(std::string("env -u CUDA_VISIBLE_DEVICES FASTGEN_EMU_DEVICES=") + devices +
                                      " OMP_NUM_THREADS=1 timeout 120 mpirun --allow-run-as-root --oversubscribe -np 2 " +
                                      shell_quote(std::string(self, size_t(len))) +
                                      " -tc='cuda emulator nccl worker*' --no-skip --no-colors");
        const std::string out = w.out + w.err;
        CHECK_MESSAGE(w.rc == 0, out);
        CHECK_MESSAGE(has(out, "1 passed | 0 failed"), out);  // each rank's summary: the worker ran
    }
}

}  // TEST_SUITE
