// tp.cpp: the MPI communicator (CPU ranks) and the NCCL one (GPU ranks, id exchanged over MPI).
#include "tp.h"

// The C API only: the deprecated MPI C++ bindings do not compile cleanly under -Werror.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <vector>

#include "common.h"

#ifdef FASTGEN_CUDA
#include <cuda_runtime.h>
#include <nccl.h>
#endif

namespace {

// MPI returns codes (we set MPI_ERRORS_RETURN); a failure names the call and MPI's message.
void mpi_check(int code, const char* call) {
    if (code == MPI_SUCCESS) return;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(code, msg, &len);
    throw Error(fmt("MPI: %s failed: %s", call, msg));
}
#define MPI_CHECK(call) mpi_check((call), #call)

class MpiComm final : public Comm {
  public:
    MpiComm() {
        int initialized = 0;
        MPI_CHECK(MPI_Initialized(&initialized));
        if (!initialized) {
            MPI_CHECK(MPI_Init(nullptr, nullptr));
            std::atexit([] {
                int finalized = 0;
                MPI_Finalized(&finalized);
                if (!finalized) MPI_Finalize();
            });
        }
        MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
        MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &rank_));
        MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &size_));
    }
    int rank() const override { return rank_; }
    int size() const override { return size_; }
    // MPI counts are int: large buffers go in chunks (a 32k-context perplexity window of logits is
    // over 2^31 bytes).
    void all_reduce_sum(float* x, size_t n) override {
        for (size_t done = 0; done < n; done += kChunk)
            MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, x + done, int(std::min(kChunk, n - done)), MPI_FLOAT, MPI_SUM,
                                    MPI_COMM_WORLD));
    }
    void broadcast(void* data, size_t bytes, int root) override {
        for (size_t done = 0; done < bytes; done += kChunk)
            MPI_CHECK(MPI_Bcast(static_cast<char*>(data) + done, int(std::min(kChunk, bytes - done)), MPI_BYTE, root,
                                MPI_COMM_WORLD));
    }

  private:
    static constexpr size_t kChunk = size_t(1) << 30;
    int rank_ = 0, size_ = 1;
};

}  // namespace

bool launched_by_mpirun() {
    return std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMI_SIZE") || std::getenv("PMIX_RANK");
}

Comm& mpi_world() {
    static MpiComm world;
    return world;
}

void check_same_on_all_ranks(Comm& comm, const std::string& text, const char* what) {
    // Compare a hash first (fixed size), then say which rank differs.
    unsigned long long mine = std::hash<std::string>{}(text), root = mine;
    comm.broadcast(&root, sizeof root, 0);
    int differs = mine != root, any = 0;
    MPI_CHECK(MPI_Allreduce(&differs, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD));
    if (any)
        throw Error(differs ? fmt("rank %d: its %s differ from rank 0's; every rank must run the same command",
                                  comm.rank(), what)
                            : fmt("rank %d: another rank's %s differ from rank 0's", comm.rank(), what));
}

void abort_all_ranks(int code) {
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (initialized && !finalized) MPI_Abort(MPI_COMM_WORLD, code);
    std::exit(code);
}

#ifdef FASTGEN_CUDA
namespace {

void nccl_check(ncclResult_t r, const char* call) {
    if (r != ncclSuccess) throw Error(fmt("NCCL: %s failed: %s", call, ncclGetErrorString(r)));
}
void cuda_check(cudaError_t e, const char* call) {
    if (e != cudaSuccess) throw Error(fmt("CUDA: %s failed: %s", call, cudaGetErrorString(e)));
}
#define NCCL_CHECK(call) nccl_check((call), #call)
#define CUDA_CHECK(call) cuda_check((call), #call)

class NcclComm final : public Comm {
  public:
    NcclComm(Comm& world, int device) : rank_(world.rank()), size_(world.size()) {
        CUDA_CHECK(cudaSetDevice(device));
        ncclUniqueId id;
        if (rank_ == 0) NCCL_CHECK(ncclGetUniqueId(&id));
        world.broadcast(&id, sizeof id, 0);
        NCCL_CHECK(ncclCommInitRank(&comm_, size_, id, rank_));
        CUDA_CHECK(cudaStreamCreate(&stream_));
    }
    ~NcclComm() override {
        cudaStreamDestroy(stream_);
        ncclCommDestroy(comm_);
    }
    int rank() const override { return rank_; }
    int size() const override { return size_; }
    void all_reduce_sum(float* x, size_t n) override {
        NCCL_CHECK(ncclAllReduce(x, x, n, ncclFloat, ncclSum, comm_, stream_));
        CUDA_CHECK(cudaStreamSynchronize(stream_));
    }
    void broadcast(void* data, size_t bytes, int root) override {
        NCCL_CHECK(ncclBroadcast(data, data, bytes, ncclUint8, root, comm_, stream_));
        CUDA_CHECK(cudaStreamSynchronize(stream_));
    }

  private:
    int rank_, size_;
    ncclComm_t comm_ = nullptr;
    cudaStream_t stream_ = nullptr;
};

}  // namespace

std::unique_ptr<Comm> nccl_comm(Comm& world, int device) { return std::make_unique<NcclComm>(world, device); }
#endif
