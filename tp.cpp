// tp.cpp: the MPI communicator (CPU ranks) and the NCCL one (GPU ranks: id exchanged over MPI,
// collectives on the CUDA backend's stream), and which GPU a rank drives.
#include "tp.h"

// The C API only: the deprecated MPI C++ bindings do not compile cleanly under -Werror.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <unistd.h>

#include <algorithm>
#include <cassert>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <vector>

#include "common.h"
#include "ops.h"

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

long long min_over_ranks(long long v) {
    mpi_world();  // MPI initialised
    long long least = v;
    MPI_CHECK(MPI_Allreduce(&v, &least, 1, MPI_LONG_LONG, MPI_MIN, MPI_COMM_WORLD));
    return least;
}

int rank_device(int world_rank, int devices) {
    assert(devices > 0);
    int local = world_rank;
    if (const char* env = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK")) {
        char* end = nullptr;
        const long v = std::strtol(env, &end, 10);
        if (end == env || *end != '\0' || v < 0 || v > INT_MAX)
            throw Error(fmt("OMPI_COMM_WORLD_LOCAL_RANK=%s is not a rank number", env));
        local = int(v);
    }
    return local % devices;
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

// NCCL refuses two ranks on one GPU (and a job that tries may hang in ncclCommInitRank), so every
// rank tells the others its host and its GPU's PCI address first, and all of them throw the same
// Error naming the pair that collides.
void check_one_gpu_per_rank(int device) {
    struct Where {
        char host[256];
        char bus[64];
        int devices;
    };
    Where me{};
    if (gethostname(me.host, sizeof me.host - 1) != 0) throw Error("gethostname failed (naming this rank's node)");
    CUDA_CHECK(cudaDeviceGetPCIBusId(me.bus, sizeof me.bus, device));
    CUDA_CHECK(cudaGetDeviceCount(&me.devices));
    int ranks = 0;
    MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &ranks));
    std::vector<Where> all(static_cast<size_t>(ranks));
    MPI_CHECK(MPI_Allgather(&me, int(sizeof me), MPI_BYTE, all.data(), int(sizeof me), MPI_BYTE, MPI_COMM_WORLD));
    for (int j = 0; j < ranks; j++)
        for (int i = 0; i < j; i++)
            if (std::strcmp(all[size_t(i)].host, all[size_t(j)].host) == 0 &&
                std::strcmp(all[size_t(i)].bus, all[size_t(j)].bus) == 0) {
                const Where& w = all[size_t(j)];
                throw Error(fmt("ranks %d and %d would share the GPU at PCI %s on %s (rank %d sees %d GPU%s): NCCL "
                                "needs one GPU per rank; start at most as many ranks on a node as it has GPUs",
                                i, j, w.bus, w.host, j, w.devices, w.devices == 1 ? "" : "s"));
            }
}

// Device pointers go to NCCL on the CUDA backend's stream; host pointers to `world` (MPI).
bool on_device(const void* p) {
    cudaPointerAttributes a;
    CUDA_CHECK(cudaPointerGetAttributes(&a, p));
    return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

class NcclComm final : public Comm {
  public:
    NcclComm(Comm& world, int device) : world_(world), rank_(world.rank()), size_(world.size()) {
        cuda_ops(device);  // made here if not yet; Error if this process's backend is on another GPU
        stream_ = cuda_ops_stream();
        CUDA_CHECK(cudaSetDevice(device));  // NCCL takes the current device
        check_one_gpu_per_rank(device);
        ncclUniqueId id;
        if (rank_ == 0) NCCL_CHECK(ncclGetUniqueId(&id));
        world.broadcast(&id, sizeof id, 0);
        NCCL_CHECK(ncclCommInitRank(&comm_, size_, id, rank_));
    }
    ~NcclComm() override {
        // Unwinding from an error, a collective may be waiting for a rank that never comes:
        // abort rather than finish it (destroy waits for what is in flight).
        if (std::uncaught_exceptions() > 0) ncclCommAbort(comm_);
        else ncclCommDestroy(comm_);
    }
    int rank() const override { return rank_; }
    int size() const override { return size_; }
    // No stream synchronisation: the ops that read x are queued behind the all-reduce on the same
    // stream, and Ops::download waits for the stream before the host reads anything.
    void all_reduce_sum(float* x, size_t n) override {
        if (!on_device(x)) return world_.all_reduce_sum(x, n);
        NCCL_CHECK(ncclAllReduce(x, x, n, ncclFloat, ncclSum, comm_, stream_));
    }
    void broadcast(void* data, size_t bytes, int root) override {
        if (!on_device(data)) return world_.broadcast(data, bytes, root);
        NCCL_CHECK(ncclBroadcast(data, data, bytes, ncclUint8, root, comm_, stream_));
    }

  private:
    Comm& world_;
    int rank_, size_;
    ncclComm_t comm_ = nullptr;
    cudaStream_t stream_ = nullptr;  // the CUDA backend's, not ours
};

}  // namespace

std::unique_ptr<Comm> nccl_comm(Comm& world, int device) { return std::make_unique<NcclComm>(world, device); }
#else
std::unique_ptr<Comm> nccl_comm(Comm&, int) {
    throw Error("tensor parallel on GPUs: this build has no CUDA backend (nvcc was not found when it was built); "
                "use --device cpu");
}
#endif
