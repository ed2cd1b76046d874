// tp.h: tensor parallelism: the communicator ranks use to combine partial results, over MPI for
// CPU ranks or NCCL for GPU ranks (which exchange NCCL's id through MPI).
#pragma once
#include <cstddef>
#include <memory>
#include <string>

class Comm {
  public:
    virtual ~Comm() = default;
    virtual int rank() const = 0;
    virtual int size() const = 0;
    // x[0..n) = the sum of every rank's x[0..n), on every rank.
    virtual void all_reduce_sum(float* x, size_t n) = 0;
    // bytes from `root` to every rank.
    virtual void broadcast(void* data, size_t bytes, int root) = 0;
};

// True when this process was started by mpirun (so MPI must be initialised).
bool launched_by_mpirun();
// MPI_COMM_WORLD; initialises MPI on first use and finalises it at exit. Errors from MPI calls
// throw Error naming the call.
Comm& mpi_world();
// Every rank passes its own text; throws Error on every rank if any rank's differs from rank 0's
// (what names the thing compared, e.g. "command-line flags").
void check_same_on_all_ranks(Comm& comm, const std::string& text, const char* what);
// Ends every rank with status `code` (a failed rank must not leave the others waiting forever).
[[noreturn]] void abort_all_ranks(int code);

// The smallest of every rank's v (MPI_COMM_WORLD): what all ranks can do, when each knows only
// its own share (the KV cache each rank's free GPU memory allows).
long long min_over_ranks(long long v);

// The GPU a rank drives: its rank on its node (Open MPI's OMPI_COMM_WORLD_LOCAL_RANK, else the
// world rank) modulo the `devices` it sees. Two ranks that land on one GPU are refused by
// nccl_comm, which compares the GPUs' PCI addresses (a rank may also see one GPU of its own
// through CUDA_VISIBLE_DEVICES).
int rank_device(int world_rank, int devices);

// NCCL over the ranks of `world`, one GPU each: this rank's is `device`, on which the CUDA backend
// (ops.h cuda_ops) runs or is made. The unique id goes from rank 0 to the others over `world`.
// all_reduce_sum and broadcast of device pointers run on the backend's stream (cuda_ops_stream):
// ordered after the ops that wrote the data and before those that read it, the host not waiting.
// A broadcast of host memory (the logits Model::forward hands to every rank) goes over `world`.
// Throws Error naming the ranks when two of them would share a GPU, or when this build has no
// CUDA.
std::unique_ptr<Comm> nccl_comm(Comm& world, int device);
