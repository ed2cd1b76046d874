// tests/cuda_emu/nccl.h: the part of NCCL that tp.cpp uses, emulated over MPI for the CUDA
// emulator (cuda_runtime.h), so the tensor-parallel CUDA path runs under mpirun on the CPU, one
// emulated device per rank (FASTGEN_EMU_DEVICES). nccl_emu.cpp implements it. Tests only: never
// linked with libnccl.
//
// Semantics chosen:
// - Communicators span MPI_COMM_WORLD (its own duplicate), NCCL rank = MPI rank; ncclCommInitRank
//   is collective and fails (ncclInvalidUsage, on every rank) unless every rank passes the world's
//   size, its own world rank and the same unique id, made by ncclGetUniqueId in rank 0's process
//   (the id holds its maker's host, process and a random nonce), and no two ranks use one device
//   (host and PCI bus id of the current device, as NCCL refuses a duplicate GPU).
// - Collectives: ncclAllReduce of ncclFloat with ncclSum, ncclBroadcast of bytes (ncclInt8 /
//   ncclUint8); buffers must lie inside one cudaMalloc allocation (the root's send buffer too),
//   the stream must be a stream and not capturing (NCCL in CUDA graphs is not emulated). Before
//   each one the ranks compare what they call (operation, count, type, root) and whether their
//   arguments were valid, so a mismatch or a bad argument on any rank is an error on every rank
//   rather than the hang or garbage NCCL would give.
// - Each call runs at once and returns when the data is there (MPI, blocking): the emulator runs
//   all device work synchronously, so stream ordering is NOT checked: a collective queued on the
//   wrong stream, or a host read without a stream synchronisation, gives the right numbers here.
//   Neither are NCCL's own summation order, speed, or multi-node set-up.
// - ncclGetErrorString gives the code's meaning and the latest detailed message for it.
#pragma once
#include <cstddef>

#include "cuda_runtime.h"

#define NCCL_UNIQUE_ID_BYTES 128
typedef struct {
    char internal[NCCL_UNIQUE_ID_BYTES];
} ncclUniqueId;

typedef enum {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
    ncclInProgress = 7,
} ncclResult_t;

typedef enum {
    ncclInt8 = 0,
    ncclChar = 0,
    ncclUint8 = 1,
    ncclInt32 = 2,
    ncclInt = 2,
    ncclUint32 = 3,
    ncclInt64 = 4,
    ncclUint64 = 5,
    ncclFloat16 = 6,
    ncclHalf = 6,
    ncclFloat32 = 7,
    ncclFloat = 7,
    ncclFloat64 = 8,
    ncclDouble = 8,
    ncclBfloat16 = 9,
} ncclDataType_t;

typedef enum { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4 } ncclRedOp_t;

struct ncclComm;
typedef struct ncclComm* ncclComm_t;

const char* ncclGetErrorString(ncclResult_t result);
ncclResult_t ncclGetUniqueId(ncclUniqueId* id);
ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank);
ncclResult_t ncclCommDestroy(ncclComm_t comm);
ncclResult_t ncclCommAbort(ncclComm_t comm);
ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype, ncclRedOp_t op,
                           ncclComm_t comm, cudaStream_t stream);
ncclResult_t ncclBroadcast(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype, int root,
                           ncclComm_t comm, cudaStream_t stream);
