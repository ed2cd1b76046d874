// tests/cuda_emu/nccl_emu.cpp: NCCL emulated over MPI for the CUDA emulator (semantics: nccl.h's top
// comment): communicators over a duplicate of MPI_COMM_WORLD, collectives on emulated device
// memory (host memory here) at once, every rank checking that the others call the same thing.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "nccl.h"

struct ncclComm {
    MPI_Comm mpi;
    int rank, size;
};

namespace {

std::string format(const char* format, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* format, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, format);
    std::vsnprintf(buf, sizeof buf, format, ap);
    va_end(ap);
    return buf;
}

const char* result_name(ncclResult_t r) {
    switch (r) {
        case ncclSuccess: return "no error";
        case ncclUnhandledCudaError: return "unhandled cuda error";
        case ncclSystemError: return "unhandled system error";
        case ncclInternalError: return "internal error";
        case ncclInvalidArgument: return "invalid argument";
        case ncclInvalidUsage: return "invalid usage";
        case ncclRemoteError: return "remote process exited or there was a network error";
        case ncclInProgress: return "NCCL operation in progress";
    }
    return "unknown result code";
}

std::map<int, std::string> g_messages;  // by code: the latest detailed message
ncclResult_t fail(ncclResult_t r, const std::string& message) {
    g_messages[int(r)] = std::string(result_name(r)) + " (cuda_emu nccl: " + message + ")";
    return r;
}

std::string mpi_message(int code) {
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(code, text, &len);
    return std::string(text, size_t(len));
}
#define MPI_TRY(call)                                                                                      \
    do {                                                                                                   \
        if (const int code_ = (call); code_ != MPI_SUCCESS)                                                \
            return fail(ncclSystemError, std::string(#call) + " failed: " + mpi_message(code_));          \
    } while (0)

bool mpi_running() {
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    return initialized && !finalized;
}

std::set<ncclComm*> g_live;  // communicators made and not yet destroyed

// An id's bytes: who made it (host, process) and a random nonce, so ids from two calls differ.
struct IdContents {
    char magic[16];
    char host[64];
    long long pid;
    unsigned long long nonce;
};
static_assert(sizeof(IdContents) <= NCCL_UNIQUE_ID_BYTES, "an id holds its contents");
constexpr char kMagic[16] = "cuda_emu nccl 1";

void this_host(char (&host)[64]) {
    std::memset(host, 0, sizeof host);
    if (gethostname(host, sizeof host - 1) != 0) std::snprintf(host, sizeof host, "(unknown host)");
}

// ncclCommInitRank's view of one rank, gathered from all.
struct Member {
    ncclUniqueId id;
    char host[64];
    long long pid;
    char bus[32];  // the PCI bus id of its current device ("" if CUDA could not say)
    int nranks, rank;
};

// Every rank's init arguments are checked by every rank alike, so all fail together or none does.
std::string init_error(const std::vector<Member>& all) {
    const int size = int(all.size());
    for (int r = 0; r < size; r++) {
        const Member& m = all[size_t(r)];
        if (m.nranks != size)
            return format("rank %d passes nranks %d; the emulated NCCL spans MPI_COMM_WORLD's %d ranks", r, m.nranks, size);
        if (m.rank != r)
            return format("MPI rank %d passes NCCL rank %d; the emulated NCCL needs them equal", r, m.rank);
        if (!m.bus[0]) return format("rank %d: cudaDeviceGetPCIBusId of its current device failed", r);
    }
    IdContents id;
    std::memcpy(&id, all[0].id.internal, sizeof id);
    bool from_a_rank = false;
    for (const Member& m : all)
        from_a_rank |= std::strncmp(id.host, m.host, sizeof id.host) == 0 && id.pid == m.pid;
    if (std::memcmp(id.magic, kMagic, sizeof kMagic) != 0 || !from_a_rank)
        return "rank 0's unique id was not made by ncclGetUniqueId in one of the ranks' processes (garbage, or an "
               "exchange that never happened)";
    for (int r = 1; r < size; r++)
        if (std::memcmp(all[size_t(r)].id.internal, all[0].id.internal, NCCL_UNIQUE_ID_BYTES) != 0)
            return format("rank %d's unique id differs from rank 0's: the id one rank made must reach every rank", r);
    for (int j = 0; j < size; j++)
        for (int i = 0; i < j; i++)
            if (std::strcmp(all[size_t(i)].host, all[size_t(j)].host) == 0 &&
                std::strcmp(all[size_t(i)].bus, all[size_t(j)].bus) == 0)
                return format("ranks %d and %d both use the device at PCI %s on %s (NCCL refuses a duplicate GPU)", i, j,
                              all[size_t(j)].bus, all[size_t(j)].host);
    return "";
}

// What a rank calls, compared across ranks before any data moves.
struct Call {
    int kind;  // 0 all-reduce, 1 broadcast
    int datatype, op, root;
    unsigned long long count;
    int ok;          // this rank's arguments are valid
    char why[400];   // else why not
};
const char* kind_name(int kind) { return kind == 0 ? "ncclAllReduce" : "ncclBroadcast"; }
std::string describe(const Call& c) {
    return c.kind == 0 ? format("ncclAllReduce of %llu elements, type %d, op %d", c.count, c.datatype, c.op)
                       : format("ncclBroadcast of %llu elements, type %d, from rank %d", c.count, c.datatype, c.root);
}

// The stream a collective runs on: a stream, not capturing.
std::string stream_error(cudaStream_t stream) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) return "the stream is not a CUDA stream";
    if (status != cudaStreamCaptureStatusNone) return "the stream is capturing a graph (NCCL in graphs is not emulated)";
    return "";
}

// Checks the communicator, exchanges every rank's Call, and fails on every rank alike when any
// rank's arguments are bad or the calls differ; then `move` does the collective.
template <class Move>
ncclResult_t collective(ncclComm_t comm, Call mine, const std::string& local_error, Move move) {
    const char* name = kind_name(mine.kind);
    if (!g_live.count(comm)) return fail(ncclInvalidArgument, format("%s: not a live communicator", name));
    mine.ok = local_error.empty();
    std::snprintf(mine.why, sizeof mine.why, "%s", local_error.c_str());
    std::vector<Call> all(size_t(comm->size));
    MPI_TRY(MPI_Allgather(&mine, int(sizeof mine), MPI_BYTE, all.data(), int(sizeof mine), MPI_BYTE, comm->mpi));
    for (int r = 0; r < comm->size; r++) {
        const Call& c = all[size_t(r)];
        if (!c.ok)
            return fail(r == comm->rank ? ncclInvalidArgument : ncclInvalidUsage, format("%s on rank %d: %s", name, r, c.why));
        const Call& c0 = all[0];
        if (c.kind != c0.kind || c.datatype != c0.datatype || c.op != c0.op || c.root != c0.root || c.count != c0.count)
            return fail(ncclInvalidUsage, format("rank %d calls %s, rank 0 %s: every rank must call the same collective",
                                                 r, describe(c).c_str(), describe(c0).c_str()));
    }
    return move();
}

// MPI counts are int: large buffers go in chunks.
constexpr size_t kChunk = size_t(1) << 30;

}  // namespace

const char* ncclGetErrorString(ncclResult_t result) {
    auto it = g_messages.find(int(result));
    return it != g_messages.end() ? it->second.c_str() : result_name(result);
}

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    if (!id) return fail(ncclInvalidArgument, "ncclGetUniqueId: no id to write");
    IdContents c{};
    std::memcpy(c.magic, kMagic, sizeof kMagic);
    this_host(c.host);
    c.pid = getpid();
    std::random_device rd;
    c.nonce = (static_cast<unsigned long long>(rd()) << 32) ^ rd();
    std::memset(id->internal, 0, sizeof id->internal);
    std::memcpy(id->internal, &c, sizeof c);
    return ncclSuccess;
}

ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
    if (!comm) return fail(ncclInvalidArgument, "ncclCommInitRank: no communicator to write");
    *comm = nullptr;
    if (!mpi_running())
        return fail(ncclSystemError, "ncclCommInitRank: MPI is not running (the emulated NCCL runs over MPI_COMM_WORLD)");
    Member me{};
    me.id = id;
    this_host(me.host);
    me.pid = getpid();
    int device = -1;
    if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetPCIBusId(me.bus, sizeof me.bus, device) != cudaSuccess)
        me.bus[0] = '\0';
    me.nranks = nranks, me.rank = rank;

    MPI_Comm mpi;
    MPI_TRY(MPI_Comm_dup(MPI_COMM_WORLD, &mpi));  // NCCL's traffic apart from the program's own MPI calls
    MPI_TRY(MPI_Comm_set_errhandler(mpi, MPI_ERRORS_RETURN));
    int world_rank = 0, size = 0;
    MPI_TRY(MPI_Comm_rank(mpi, &world_rank));
    MPI_TRY(MPI_Comm_size(mpi, &size));
    std::vector<Member> all(static_cast<size_t>(size));
    MPI_TRY(MPI_Allgather(&me, int(sizeof me), MPI_BYTE, all.data(), int(sizeof me), MPI_BYTE, mpi));
    if (const std::string why = init_error(all); !why.empty()) {
        MPI_Comm_free(&mpi);
        return fail(ncclInvalidUsage, "ncclCommInitRank: " + why);
    }
    *comm = new ncclComm{mpi, world_rank, size};
    g_live.insert(*comm);
    return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    if (!g_live.count(comm)) return fail(ncclInvalidArgument, "ncclCommDestroy: not a live communicator");
    g_live.erase(comm);
    if (mpi_running()) MPI_Comm_free(&comm->mpi);
    delete comm;
    return ncclSuccess;
}
// Nothing is ever in flight here (every call finished before it returned): the same as destroy.
ncclResult_t ncclCommAbort(ncclComm_t comm) {
    if (!g_live.count(comm)) return fail(ncclInvalidArgument, "ncclCommAbort: not a live communicator");
    return ncclCommDestroy(comm);
}

ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype, ncclRedOp_t op,
                           ncclComm_t comm, cudaStream_t stream) {
    const size_t bytes = count * sizeof(float);
    std::string why = stream_error(stream);
    if (datatype != ncclFloat || op != ncclSum)
        why = format("type %d, op %d: only float sums (ncclFloat, ncclSum) are emulated", int(datatype), int(op));
    else if (count && !emu::detail::in_device_memory(sendbuff, bytes))
        why = format("the send buffer %p is not %zu bytes of device memory", sendbuff, bytes);
    else if (count && !emu::detail::in_device_memory(recvbuff, bytes))
        why = format("the receive buffer %p is not %zu bytes of device memory", recvbuff, bytes);
    const Call call{0, int(datatype), int(op), 0, count, 0, {}};
    return collective(comm, call, why, [&]() -> ncclResult_t {
        const float* in = static_cast<const float*>(sendbuff);
        float* out = static_cast<float*>(recvbuff);
        for (size_t done = 0; done < count; done += kChunk) {
            const int n = int(std::min(kChunk, count - done));
            MPI_TRY(MPI_Allreduce(in == out ? MPI_IN_PLACE : in + done, out + done, n, MPI_FLOAT, MPI_SUM, comm->mpi));
        }
        return ncclSuccess;
    });
}

ncclResult_t ncclBroadcast(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype, int root,
                           ncclComm_t comm, cudaStream_t stream) {
    std::string why = stream_error(stream);
    const bool is_root = g_live.count(comm) && comm->rank == root;
    if (datatype != ncclInt8 && datatype != ncclUint8)
        why = format("type %d: only bytes (ncclInt8, ncclUint8) are emulated", int(datatype));
    else if (g_live.count(comm) && (root < 0 || root >= comm->size))
        why = format("root %d of %d ranks", root, comm->size);
    else if (count && is_root && !emu::detail::in_device_memory(sendbuff, count))
        why = format("the root's send buffer %p is not %zu bytes of device memory", sendbuff, count);
    else if (count && !emu::detail::in_device_memory(recvbuff, count))
        why = format("the receive buffer %p is not %zu bytes of device memory", recvbuff, count);
    const Call call{1, int(datatype), 0, root, count, 0, {}};
    return collective(comm, call, why, [&]() -> ncclResult_t {
        char* data = static_cast<char*>(recvbuff);
        if (is_root && sendbuff != recvbuff) std::memmove(data, sendbuff, count);
        for (size_t done = 0; done < count; done += kChunk)
            MPI_TRY(MPI_Bcast(data + done, int(std::min(kChunk, count - done)), MPI_BYTE, root, comm->mpi));
        return ncclSuccess;
    });
}
