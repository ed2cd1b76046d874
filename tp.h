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

#ifdef FASTGEN_CUDA
// NCCL over the ranks of `world` (one GPU each); all_reduce_sum and broadcast take device pointers.
std::unique_ptr<Comm> nccl_comm(Comm& world, int device);
#endif
