// tests/cuda_emu/cuda_runtime.h: the part of CUDA that kernels.cu uses, emulated on the CPU, so the
// real kernels.cu runs here (build/run_tests_emu; scripts/cuda_emu_source.py first rewrites its
// launches and __shared__ declarations into the calls below). With cuda_bf16.h, cuda_fp16.h, mma.h
// and cublas_v2.h beside it; cuda_emu.cpp implements them. Tests only: never linked with libcudart.
//
// Semantics chosen (strict where a GPU is strict, so a kernel bug is an error here too):
// - Execution: a launch runs at once, block after block (in descending block order, so a block
//   that relies on an earlier one having run is not helped); the threads of a block are fibers
//   switched only at synchronisation points: __syncthreads, __syncwarp, __shfl_*_sync and the
//   wmma operations. Between two of them a thread runs alone; successive rounds run the threads
//   in ascending, then descending order, so a missing barrier tends to show. A wmma load or store
//   moves each lane's own tile elements at that lane's time (mma.h), so reading what another lane
//   stored needs a __syncwarp, as on a GPU.
// - A launch error (cudaGetLastError, message in cudaGetErrorString): grid or block of 0, block
//   over 1024 threads or over the kernel's __launch_bounds__, grid.y/z over 65535, dynamic shared
//   memory over 48 KB or over the kernel's cudaFuncSetAttribute opt-in (at most 227 KB), a top-level
//   pointer argument outside every cudaMalloc allocation. A fault inside the kernel also ends the
//   launch with an error naming the kernel, block and thread: threads of a block waiting at
//   different __syncthreads (by source line), a deadlock between __syncthreads and warp operations,
//   a __syncwarp/__shfl whose mask names a lane that has exited, does not exist, or waits elsewhere,
//   lanes meeting at different warp operations or masks, a shuffle reading a lane outside the mask,
//   wmma: a warp not all present, operands that are not 32-byte aligned or a bad ldm; a misaligned
//   __ldg/__ldcs.
// - Memory: cudaMalloc memory is uninitialised on a GPU; here it is filled with 0xff bytes (NaN
//   floats, -1 ints), as is shared memory at the start of every block. Each allocation ends at an
//   inaccessible page (reads or writes past its end, after rounding to 256 bytes, crash at once with
//   the kernel named), and freed memory is unmapped. Copies and memsets check their direction and
//   that the bytes lie inside one allocation. Kernels can still read host memory through pointers
//   inside structs (not checked).
// - Streams run everything at once; events are no-ops. Between cudaStreamBeginCapture and
//   cudaStreamEndCapture every launch, copy, memset and cuBLAS call on that stream is recorded
//   (arguments by value) instead of run; cudaGraphLaunch replays the record. Inside a capture a
//   stream or event synchronisation, or a copy to or from pageable (not cudaMallocHost) memory, fails
//   with cudaErrorStreamCaptureUnsupported and invalidates the capture, as CUDA does.
// - Devices: FASTGEN_EMU_DEVICES of them (default 1; 0 to 64, anything else ends the process with
//   a message), each 132 SMs, 80 GB, 227 KB of shared memory per block by opt-in (48 KB by default),
//   with distinct PCI bus ids (cudaDeviceGetPCIBusId); CUDA_VISIBLE_DEVICES selects and orders them
//   as CUDA does (a list of indices, cut at the first bad or repeated one; none left: no device).
//   Both are read at each call. One process drives one device: the first call that makes a context
//   (cudaSetDevice, an allocation, a stream, event, launch, cuBLAS handle) binds it to the current
//   device, and cudaSetDevice to another one afterwards is an error here (CUDA would allow it; the
//   emulator's memory and streams are not per device, and a tensor-parallel rank must not touch a
//   device other than its own). cudaPointerGetAttributes tells device memory (cudaMalloc) from
//   pinned (cudaMallocHost) and other host memory. tests/cuda_emu/nccl.h emulates NCCL over MPI for
//   processes on different emulated devices (tensor parallel under mpirun).
// Not emulated: timing, races between blocks and the memory model, asynchrony, occupancy and
// registers, the real wmma fragment layouts (a fragment here is the whole 16x16 tile in every lane,
// x[e] row-major; see mma.h), device math precision (expf etc. are the host's), cuBLAS's own numerics.
// Only what kernels.cu uses is here: a kernel that starts using another CUDA call or intrinsic
// fails to compile in build/run_tests_emu until it is added (with a test in emu_selftest.cu).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

#if !defined(__x86_64__)
#error "the CUDA emulator (tests/cuda_emu) switches fibers with x86-64 code only"
#endif

// ---------------------------------------------------------------------------------------------
// qualifiers and built-in types

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------
// runtime API types

enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDevice = 101,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorIllegalState = 401,
    cudaErrorLaunchOutOfResources = 701,
    cudaErrorMisalignedAddress = 716,
    cudaErrorLaunchFailure = 719,
    cudaErrorStreamCaptureUnsupported = 900,
    cudaErrorStreamCaptureInvalidated = 901,
};
typedef enum cudaError cudaError_t;

struct CUstream_st;
struct CUevent_st;
struct CUgraph_st;
struct CUgraphExec_st;
typedef CUstream_st* cudaStream_t;
typedef CUevent_st* cudaEvent_t;
typedef CUgraph_st* cudaGraph_t;
typedef CUgraphExec_st* cudaGraphExec_t;

enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
};
enum cudaStreamCaptureMode {
    cudaStreamCaptureModeGlobal = 0,
    cudaStreamCaptureModeThreadLocal = 1,
    cudaStreamCaptureModeRelaxed = 2,
};
enum cudaStreamCaptureStatus {
    cudaStreamCaptureStatusNone = 0,
    cudaStreamCaptureStatusActive = 1,
    cudaStreamCaptureStatusInvalidated = 2,
};
enum cudaMemoryType {
    cudaMemoryTypeUnregistered = 0,
    cudaMemoryTypeHost = 1,
    cudaMemoryTypeDevice = 2,
    cudaMemoryTypeManaged = 3,
};
struct cudaPointerAttributes {
    cudaMemoryType type;
    int device;  // device memory: where it lives; pinned: the device current when it was allocated
    void* devicePointer;
    void* hostPointer;
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDataType_t { CUDA_R_32F = 0, CUDA_R_16F = 2, CUDA_R_16BF = 14 };
typedef cudaDataType_t cudaDataType;
constexpr unsigned cudaStreamNonBlocking = 1;
constexpr unsigned cudaEventDisableTiming = 2;

struct cudaDeviceProp {
    char name[256];
    size_t totalGlobalMem;
    size_t sharedMemPerBlock;
    size_t sharedMemPerBlockOptin;
    int maxThreadsPerBlock;
    int multiProcessorCount;
    int major, minor;
};

cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetPCIBusId(char* bus_id, int len, int device);
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attributes, const void* p);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device);
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaMalloc(void** p, size_t bytes);
cudaError_t cudaMallocHost(void** p, size_t bytes);
cudaError_t cudaFree(void* p);
cudaError_t cudaMemGetInfo(size_t* free, size_t* total);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s = nullptr);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s = nullptr);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus* status);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = nullptr);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* g);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t g, unsigned long long flags = 0);
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s);
cudaError_t cudaGraphDestroy(cudaGraph_t g);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec);
template <class T>
cudaError_t cudaMalloc(T** p, size_t bytes) {
    return cudaMalloc(reinterpret_cast<void**>(p), bytes);
}
template <class T>
cudaError_t cudaMallocHost(T** p, size_t bytes) {
    return cudaMallocHost(reinterpret_cast<void**>(p), bytes);
}

// ---------------------------------------------------------------------------------------------
// the emulator's internals that the macros and templates below reach

namespace emu {

// A launch's <<<grid, block, smem, stream>>>.
struct LaunchConfig {
    dim3 grid, block;
    size_t smem;
    cudaStream_t stream;
    LaunchConfig(dim3 g, dim3 b, size_t bytes = 0, cudaStream_t s = nullptr) : grid(g), block(b), smem(bytes), stream(s) {}
};

namespace detail {
struct Thread {
    uint3 tid;
};
extern Thread* g_thread;  // the running fiber
extern uint3 g_block_idx;
extern dim3 g_block_dim, g_grid_dim;

// Checks the launch and runs (or records) body in every thread of every block; errors go to
// cudaGetLastError. fn identifies the kernel (cudaFuncSetAttribute).
void submit(const LaunchConfig& c, const char* name, int max_threads, const void* fn, std::function<void()> body);
// A kernel's pointer argument: null or inside an allocation; else records the launch error.
bool check_pointer_argument(const char* kernel, int index, const void* p);
cudaError_t set_func_attribute(const void* fn, cudaFuncAttribute attr, int value);
// Whether [p, p + bytes) lies inside one cudaMalloc allocation (nccl.h checks its buffers so).
bool in_device_memory(const void* p, size_t bytes);

void syncthreads(const char* file, int line);
enum ShflKind { kShflXor, kShflUp };
uint64_t shfl(ShflKind kind, unsigned mask, uint64_t bits, int arg, int width);
void syncwarp(unsigned mask);
// Ends the running launch with a fault (from inside a kernel); never returns.
[[noreturn]] void fault(const char* format, ...) __attribute__((format(printf, 1, 2)));

// A warp-collective operation over data every lane holds (the wmma fragments). Every lane of the
// warp must arrive, with equal operands and the same memory operand. A load: each lane reads its own
// elements of the tile when it arrives, and once all have, every lane's fragment gets the whole
// tile. A store: each lane writes its own elements when it leaves. So, as on a GPU, a lane sees the
// tile elements other lanes read or wrote only across a __syncwarp. mma: lane 0's run computes and
// every lane gets its result.
struct WarpCall {
    enum Kind { kLoad, kStore, kMma } kind;
    const char* what;
    void* out;  // this lane's result (out_bytes): the loaded or computed fragment
    size_t out_bytes;
    const void* in[3];  // this lane's operands, equal in every lane (a store's: in[0])
    size_t in_bytes[3];
    const void* ptr;  // load/store: the tile in memory, element (r, c) at r * ldm + c (col: c * ldm + r)
    unsigned ldm;
    bool col;
    size_t elem;  // bytes per element
    void (*run)(const WarpCall&);  // mma
};
void warp_call(const WarpCall& call);

void* dynamic_shared();
void register_shared(void* p, size_t bytes);

template <class T>
bool check_argument(const char* kernel, int index, const T& v) {
    if constexpr (std::is_pointer_v<T>) return check_pointer_argument(kernel, index, v);
    (void)kernel, (void)index, (void)v;
    return true;
}
}  // namespace detail

// kernel<<<cfg>>>(args), as scripts/cuda_emu_source.py writes it: the arguments converted to the
// parameter types and copied (as CUDA copies them into the launch), every thread calls the kernel.
// max_threads: the kernel's __launch_bounds__ (1024 when it has none).
template <class... P, class... A>
void launch(const LaunchConfig& c, const char* name, int max_threads, void (*kernel)(P...), A&&... args) {
    static_assert(sizeof...(P) == sizeof...(A), "a launch passes every kernel parameter");
    using Params = std::tuple<std::decay_t<P>...>;
    auto params = std::make_shared<const Params>(std::forward<A>(args)...);
    bool ok = true;
    int index = 0;
    std::apply([&](const auto&... p) { ((ok = detail::check_argument(name, index++, p) && ok), ...); }, *params);
    if (!ok) return;
    detail::submit(c, name, max_threads, reinterpret_cast<const void*>(kernel),
                   [kernel, params] { std::apply(kernel, *params); });
}

// extern __shared__ T name[]: the launch's dynamic shared memory.
template <class T>
T* dynamic_shared() {
    return static_cast<T*>(detail::dynamic_shared());
}

// __shared__ T name[...] in a kernel or device function: one static object (blocks run one at a
// time), poisoned at the start of every block like the rest of shared memory.
template <class T>
struct Shared {
    T v;
    Shared() { detail::register_shared(&v, sizeof v); }
};

}  // namespace emu

template <class T>
cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
    return emu::detail::set_func_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}

// ---------------------------------------------------------------------------------------------
// device built-ins

#define threadIdx (static_cast<const uint3&>(::emu::detail::g_thread->tid))
#define blockIdx (static_cast<const uint3&>(::emu::detail::g_block_idx))
#define blockDim (static_cast<const dim3&>(::emu::detail::g_block_dim))
#define gridDim (static_cast<const dim3&>(::emu::detail::g_grid_dim))
#define __syncthreads() ::emu::detail::syncthreads(__FILE__, __LINE__)

inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::detail::syncwarp(mask); }

template <class T>
T emu_shfl(emu::detail::ShflKind kind, unsigned mask, T v, int arg, int width) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "a shuffle moves a value of up to 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof v);
    bits = emu::detail::shfl(kind, mask, bits, arg, width);
    T r;
    std::memcpy(&r, &bits, sizeof r);
    return r;
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
    return emu_shfl(emu::detail::kShflXor, mask, v, lane_mask, width);
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
    return emu_shfl(emu::detail::kShflUp, mask, v, int(delta), width);
}

// A GPU load must be aligned to its size (16 bytes for float4/uint4), else the kernel faults.
template <class T>
T __ldg(const T* p) {
    if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0)
        emu::detail::fault("__ldg: misaligned address %p for a %zu-byte load", static_cast<const void*>(p), sizeof(T));
    return *p;
}
template <class T>
T __ldcs(const T* p) {
    if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0)
        emu::detail::fault("__ldcs: misaligned address %p for a %zu-byte load", static_cast<const void*>(p), sizeof(T));
    return *p;
}
// Blocks run one at a time on one host thread: plain read-modify-write is atomic here.
inline int atomicMax(int* p, int v) {
    const int old = *p;
    if (v > old) *p = v;
    return old;
}

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
