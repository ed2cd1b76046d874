// tests/cuda_emu/emu_selftest.cu: suite "cuda emulator": the emulator itself (tests/cuda_emu),
// through kernels written as kernels.cu writes them (rewritten by scripts/cuda_emu_source.py like
// it): that each strictness check fires with a clear message and the launch after it works; that
// shuffles, barriers, thread numbering, wmma, cuBLAS and bf16/f16 conversions compute what CUDA
// defines (against values computed here); that graphs record and replay, and refuse host syncs;
// the emulated devices (count, visibility, PCI ids, one per process, pointer attributes).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <doctest/doctest.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "selftest_util.h"

namespace {

// ---- kernels

template <typename T, int kScale>
__global__ void __launch_bounds__(256) scale_kernel(T* out, const T* in, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = in[i] * T(kScale);
}

// Each thread's linear index within the block, its block's linear index, and its warp's xor-sum
// and inclusive prefix sum (shfl_up, width 32 and 8) of the linear indices.
__global__ void numbering_kernel(int* tid, int* bid, int* xsum, int* scan32, int* scan8) {
    const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const int g = b * blockDim.x * blockDim.y * blockDim.z + t;
    tid[g] = t;
    bid[g] = b;
    int s = t;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    xsum[g] = s;
    int a = t, c = t;
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, a, o);
        if (t % 32 >= o) a += y;
    }
    for (int o = 1; o < 8; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, c, o, 8);
        if (t % 8 >= o) c += y;
    }
    scan32[g] = a;
    scan8[g] = c;
}

// Block sum through static and dynamic shared memory; first[b] gets what a static __shared__ word
// held before anyone wrote it.
__global__ void block_sum_kernel(float* out, unsigned* first, const float* x, int n) {
    extern __shared__ float part[];
    __shared__ unsigned fresh;
    if (threadIdx.x == 0) first[blockIdx.x] = fresh;
    __syncthreads();
    float v = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) v += x[size_t(blockIdx.x) * n + i];
    part[threadIdx.x] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (unsigned i = 0; i < blockDim.x; i++) s += part[i];
        out[blockIdx.x] = s;
        fresh = 7;
    }
}

__global__ void different_barriers_kernel(int* out) {
    if (threadIdx.x < 32) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}
__global__ void exited_lane_kernel(int* out) {
    if (threadIdx.x == 5) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1);
}
__global__ void syncwarp_vs_barrier_kernel(int* out) {
    if (threadIdx.x % 32 == 3) __syncthreads();
    else __syncwarp();
    out[threadIdx.x] = 1;
}
__global__ void mixed_warp_ops_kernel(int* out) {
    if (threadIdx.x % 2) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
    else __syncwarp();
}
__global__ void outside_mask_kernel(int* out) {
    if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, int(threadIdx.x), 16);
}
__global__ void own_lane_kernel(int* out) { out[threadIdx.x] = __shfl_xor_sync(0xfffffffeu, 1, 1); }
__global__ void misaligned_load_kernel(float* out, const float* x) { out[0] = __ldg(reinterpret_cast<const float4*>(x + 1)).x; }
__global__ void partial_warp_kernel(float* out) { out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1); }
__global__ void misaligned_wmma_kernel(const __nv_bfloat16* a) {
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::row_major> f;
    nvcuda::wmma::load_matrix_sync(f, a + 1, 16);
}
__global__ void divergent_wmma_kernel(float* c) {
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> f;
    nvcuda::wmma::fill_fragment(f, 1.0f);
    f.x[0] = float(threadIdx.x);  // lanes change their fragments differently
    nvcuda::wmma::store_matrix_sync(c, f, 16, nvcuda::wmma::mem_row_major);
}

// The warp stores a tile of 2s, then lane 0 reads element (15, 15) and lane 31 element (0, 0),
// each written by the other (an sm_80-like ownership), with or without a __syncwarp between.
__global__ void store_visibility_kernel(float* out, float* tile, bool sync) {
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> f;
    nvcuda::wmma::fill_fragment(f, 2.0f);
    nvcuda::wmma::store_matrix_sync(tile, f, 16, nvcuda::wmma::mem_row_major);
    if (sync) __syncwarp();
    if (threadIdx.x == 0) out[0] = tile[255];
    if (threadIdx.x == 31) out[1] = tile[0];
}
// Each lane writes 8 elements of a tile, then the warp loads it (with or without a __syncwarp) and
// stores the fragment elsewhere.
__global__ void load_visibility_kernel(float* out, float* tile, bool sync) {
    for (int i = threadIdx.x; i < 256; i += 32) tile[i] = float(i);
    if (sync) __syncwarp();
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> f;
    nvcuda::wmma::load_matrix_sync(f, tile, 16, nvcuda::wmma::mem_row_major);
    nvcuda::wmma::store_matrix_sync(out, f, 16, nvcuda::wmma::mem_row_major);
}

// D = A B + C for one 16x16x16 tile: A row-major, B column-major (read from its transpose), C
// loaded column-major, D stored row-major; rows[e] = the row of accumulator element e.
__global__ void mma_kernel(float* d, float* rows, const __nv_bfloat16* a, const __nv_bfloat16* bt, const float* c) {
    namespace wmma = nvcuda::wmma;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc, rowmap;
    __shared__ float staging[16 * 16];
    for (int i = threadIdx.x; i < 256; i += 32) staging[i] = float(i / 16);
    __syncwarp();
    wmma::load_matrix_sync(rowmap, staging, 16, wmma::mem_row_major);
    wmma::load_matrix_sync(fa, a, 16);
    wmma::load_matrix_sync(fb, bt, 16);
    wmma::load_matrix_sync(fc, c, 16, wmma::mem_col_major);
    wmma::mma_sync(fc, fa, fb, fc);
    wmma::store_matrix_sync(d, fc, 16, wmma::mem_row_major);
    if (threadIdx.x == 0)
        for (int e = 0; e < decltype(rowmap)::num_elements; e++) rows[e] = rowmap.x[e];
}

// ---- host helpers

// The launch error, with the emulator's message.
std::string last_error() {
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? "" : cudaGetErrorString(e);
}
bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// An environment variable set (or unset: null) until the end of the scope, then restored.
class ScopedEnv {
  public:
    ScopedEnv(const char* name, const char* value) : name_(name) {
        const char* old = std::getenv(name);
        had_ = old != nullptr;
        if (old) old_ = old;
        set(value);
    }
    ~ScopedEnv() { set(had_ ? old_.c_str() : nullptr); }
    void set(const char* value) {
        if (value) setenv(name_, value, 1);
        else unsetenv(name_);
    }

  private:
    const char* name_;
    bool had_ = false;
    std::string old_;
};

}  // namespace

TEST_SUITE("cuda emulator") {

TEST_CASE("cuda emulator: launches run every thread with CUDA's numbering, shuffles and shared memory") {
    const dim3 grid(3, 2, 2), block(8, 4, 3);  // 96 threads: three warps, x fastest
    const int threads = 96, total = 12 * threads;
    int* d[5];
    for (int*& p : d) p = device(std::vector<int>(total, -7));
    numbering_kernel<<<grid, block>>>(d[0], d[1], d[2], d[3], d[4]);
    REQUIRE(last_error() == "");
    std::vector<int> tid = host(d[0], total), bid = host(d[1], total), xsum = host(d[2], total), s32 = host(d[3], total),
                     s8 = host(d[4], total);
    for (int g = 0; g < total; g++) {
        const int t = g % threads, w0 = t / 32 * 32;
        CHECK(tid[size_t(g)] == t);
        CHECK(bid[size_t(g)] == g / threads);
        CHECK(xsum[size_t(g)] == 32 * w0 + 31 * 32 / 2);  // the warp's indices summed
        CHECK(s32[size_t(g)] == (t - w0 + 1) * (w0 + t) / 2);
        const int s0 = t / 8 * 8;
        CHECK(s8[size_t(g)] == (t - s0 + 1) * (s0 + t) / 2);
    }

    // Templates with commas, a launch over several lines; static and dynamic shared memory.
    std::vector<float> x(5 * 1000);
    std::mt19937 rng(3);
    for (float& v : x) v = float(rng() % 100);
    float* dx = device(x);
    float* dy = device(std::vector<float>(x.size()));
    scale_kernel<float, 3>
        <<<(int(x.size()) + 255) / 256, 256>>>(dy, dx,
                                                int(x.size()));
    REQUIRE(last_error() == "");
    std::vector<float> y = host(dy, x.size());
    for (size_t i = 0; i < x.size(); i++) CHECK(y[i] == 3 * x[i]);
    float* sums = device(std::vector<float>(5));
    unsigned* first = device(std::vector<unsigned>(5));
    block_sum_kernel<<<5, 128, 128 * sizeof(float)>>>(sums, first, dx, 1000);
    REQUIRE(last_error() == "");
    std::vector<float> s = host(sums, 5);
    std::vector<unsigned> f = host(first, 5);
    for (int b = 0; b < 5; b++) {
        double want = 0;
        for (int i = 0; i < 1000; i++) want += x[size_t(b) * 1000 + size_t(i)];
        CHECK(s[size_t(b)] == float(want));  // integers: exact
        CHECK(f[size_t(b)] == 0xffffffffu);   // shared memory is poisoned at every block's start
    }
    for (void* p : {static_cast<void*>(dx), static_cast<void*>(dy), static_cast<void*>(sums), static_cast<void*>(first)})
        CHECK(cudaFree(p) == cudaSuccess);
    for (int* p : d) CHECK(cudaFree(p) == cudaSuccess);
}

TEST_CASE("cuda emulator: launch configurations CUDA refuses are launch errors") {
    float* p = device(std::vector<float>(2048));
    scale_kernel<float, 1><<<1, 257>>>(p, p, 1);  // over __launch_bounds__(256)
    CHECK(has(last_error(), "over its __launch_bounds__ of 256"));
    numbering_kernel<<<1, 1025>>>(nullptr, nullptr, nullptr, nullptr, nullptr);
    CHECK(has(last_error(), "1025 threads per block"));
    numbering_kernel<<<dim3(1, 65536), 32>>>(nullptr, nullptr, nullptr, nullptr, nullptr);
    CHECK(has(last_error(), "y and z at most 65535"));
    numbering_kernel<<<0, 32>>>(nullptr, nullptr, nullptr, nullptr, nullptr);
    CHECK(has(last_error(), "dimension of 0"));
    block_sum_kernel<<<1, 32, 49 * 1024>>>(p, nullptr, p, 1);
    CHECK(has(last_error(), "over the kernel's limit of 49152"));
    CHECK(cudaFuncSetAttribute(block_sum_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 228 * 1024) != cudaSuccess);
    CHECK(has(last_error(), "dynamic shared memory 233472 bytes"));
    CHECK(cudaFuncSetAttribute(block_sum_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024) == cudaSuccess);
    unsigned* first = device(std::vector<unsigned>(1));
    block_sum_kernel<<<1, 32, 99 * 1024>>>(p, first, p, 1);
    CHECK(last_error() == "");
    block_sum_kernel<<<1, 32, 101 * 1024>>>(p, first, p, 1);
    CHECK(has(last_error(), "over the kernel's limit of 102400"));
    std::vector<float> on_host(16);
    scale_kernel<float, 1><<<1, 16>>>(p, on_host.data(), 16);
    CHECK(has(last_error(), "argument 2 is"));
    CHECK(has(cudaGetErrorString(cudaErrorInvalidValue), "not device memory"));
    scale_kernel<float, 1><<<1, 16>>>(p, p + 2048, 0);  // the end of an allocation is a pointer into it
    CHECK(last_error() == "");
    CHECK(cudaFree(p) == cudaSuccess);
    CHECK(cudaFree(first) == cudaSuccess);
}

TEST_CASE("cuda emulator: deadlocks and misused warp operations end the launch with a message") {
    int* out = device(std::vector<int>(64));
    struct Case { const char* what; std::function<void()> launch; const char* message; };
    const std::vector<Case> cases = {
        {"different __syncthreads", [&] { different_barriers_kernel<<<1, 64>>>(out); }, "wait at different __syncthreads"},
        {"exited lane", [&] { exited_lane_kernel<<<1, 32>>>(out); }, "names lane 5 (thread (5,0,0)), which has exited"},
        {"__syncwarp vs __syncthreads", [&] { syncwarp_vs_barrier_kernel<<<1, 64>>>(out); }, "deadlock"},
        {"different warp operations", [&] { mixed_warp_ops_kernel<<<1, 32>>>(out); }, "must run the same operation"},
        {"a lane outside the mask", [&] { outside_mask_kernel<<<1, 32>>>(out); }, "which is not in the mask"},
        {"the caller not in the mask", [&] { own_lane_kernel<<<1, 32>>>(out); }, "does not name the calling lane 0"},
        {"a partial warp", [&] { partial_warp_kernel<<<1, 48>>>(reinterpret_cast<float*>(out)); }, "which does not exist"},
        {"a misaligned vector load", [&] { misaligned_load_kernel<<<1, 1>>>(reinterpret_cast<float*>(out), reinterpret_cast<float*>(out)); },
         "misaligned address"},
        {"misaligned wmma", [&] { misaligned_wmma_kernel<<<1, 32>>>(reinterpret_cast<__nv_bfloat16*>(out)); },
         "is not 32-byte aligned"},
        {"lanes with different fragments", [&] { divergent_wmma_kernel<<<1, 32>>>(reinterpret_cast<float*>(out)); },
         "differs from lane 0's"},
    };
    for (const Case& c : cases) {
        CAPTURE(c.what);
        c.launch();
        const std::string e = last_error();
        CAPTURE(e);
        CHECK(has(e, c.message));
        CHECK(has(e, "kernel "));
        // the next launch runs normally
        exited_lane_kernel<<<1, 64>>>(out);
        CHECK(has(last_error(), "has exited"));
        scale_kernel<int, 2><<<1, 64>>>(out, out, 64);
        CHECK(last_error() == "");
    }
    CHECK(cudaFree(out) == cudaSuccess);
}

TEST_CASE("cuda emulator: memory is poisoned, copies and memsets are checked") {
    void* p = nullptr;
    REQUIRE(cudaMalloc(&p, 1000) == cudaSuccess);
    CHECK(reinterpret_cast<uintptr_t>(p) % 256 == 0);
    std::vector<uint8_t> b = host(static_cast<uint8_t*>(p), 1000);
    CHECK(std::count(b.begin(), b.end(), 0xff) == 1000);  // uninitialised: NaN floats
    std::vector<uint8_t> src(1001, 1);
    CHECK(cudaMemcpyAsync(p, src.data(), 1001, cudaMemcpyHostToDevice) == cudaErrorInvalidValue);
    CHECK(has(last_error(), "offset 0 of a 1000-byte device allocation"));
    CHECK(cudaMemcpyAsync(src.data(), p, 10, cudaMemcpyHostToDevice) == cudaErrorInvalidValue);  // wrong direction
    CHECK(cudaMemsetAsync(static_cast<char*>(p) + 1, 0, 1000) == cudaErrorInvalidValue);
    CHECK(cudaMemsetAsync(static_cast<char*>(p) + 10, 0, 990) == cudaSuccess);
    b = host(static_cast<uint8_t*>(p), 1000);
    CHECK(std::count(b.begin(), b.end(), 0) == 990);
    size_t free0 = 0, free1 = 0, total = 0;
    CHECK(cudaMemGetInfo(&free0, &total) == cudaSuccess);
    CHECK(cudaFree(p) == cudaSuccess);
    CHECK(cudaMemGetInfo(&free1, &total) == cudaSuccess);
    CHECK(free1 == free0 + 1000);
    CHECK(cudaFree(p) == cudaErrorInvalidValue);  // twice
    cudaGetLastError();
}

TEST_CASE("cuda emulator: a capture records launches, copies and cuBLAS calls; a replay reads the memory of then") {
    cudaStream_t s;
    REQUIRE(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) == cudaSuccess);
    std::vector<float> x = {1, 2, 3, 4};
    float* dx = device(x);
    float* dy = device(std::vector<float>(4, 0.0f));
    void* pinned = nullptr;
    REQUIRE(cudaMallocHost(&pinned, 16) == cudaSuccess);
    std::memcpy(pinned, x.data(), 16);
    REQUIRE(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed) == cudaSuccess);
    CHECK(cudaMemcpyAsync(dx, pinned, 16, cudaMemcpyHostToDevice, s) == cudaSuccess);  // pinned: recorded
    scale_kernel<float, 5><<<1, 4, 0, s>>>(dy, dx, 4);
    CHECK(last_error() == "");
    cudaGraph_t g;
    REQUIRE(cudaStreamEndCapture(s, &g) == cudaSuccess);
    CHECK(host(dy, 4) == std::vector<float>(4, 0.0f));  // nothing ran yet
    cudaGraphExec_t exec;
    REQUIRE(cudaGraphInstantiate(&exec, g, 0) == cudaSuccess);
    CHECK(cudaGraphDestroy(g) == cudaSuccess);
    CHECK(cudaGraphLaunch(exec, s) == cudaSuccess);
    CHECK(host(dy, 4) == std::vector<float>{5, 10, 15, 20});
    const float later[4] = {-1, 0, 1, 2};
    std::memcpy(pinned, later, 16);
    CHECK(cudaGraphLaunch(exec, s) == cudaSuccess);
    CHECK(host(dy, 4) == std::vector<float>{-5, 0, 5, 10});
    CHECK(cudaGraphExecDestroy(exec) == cudaSuccess);

    // Host synchronisation inside a capture: refused, and the capture is invalidated.
    std::vector<float> back(4);
    for (int what = 0; what < 3; what++) {
        CAPTURE(what);
        REQUIRE(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed) == cudaSuccess);
        cudaError_t e = cudaSuccess;
        if (what == 0) e = cudaMemcpyAsync(back.data(), dy, 16, cudaMemcpyDeviceToHost, s);
        if (what == 1) e = cudaStreamSynchronize(s);
        if (what == 2) e = cudaMemcpyAsync(dx, back.data(), 16, cudaMemcpyHostToDevice, s);  // pageable
        CHECK(e == cudaErrorStreamCaptureUnsupported);
        CHECK(cudaStreamEndCapture(s, &g) == cudaErrorStreamCaptureInvalidated);
        CHECK(g == nullptr);
        cudaGetLastError();
    }
    CHECK(cudaStreamBeginCapture(nullptr, cudaStreamCaptureModeRelaxed) == cudaErrorStreamCaptureUnsupported);
    cudaGetLastError();
    CHECK(cudaFree(dx) == cudaSuccess);
    CHECK(cudaFree(dy) == cudaSuccess);
}

TEST_CASE("cuda emulator: bf16 and f16 conversions round to nearest even, bit for bit") {
    // bf16: nearest of the two neighbouring bf16 values, computed in double; ties to the even one.
    auto bf16_ref = [](float f) -> uint16_t {
        uint32_t u;
        std::memcpy(&u, &f, 4);
        if (std::isnan(f)) return 0x7fff;
        const uint32_t lo = u & 0xffff0000u, hi = lo + 0x10000u;
        float a, b;
        std::memcpy(&a, &lo, 4);
        std::memcpy(&b, &hi, 4);
        const double da = std::fabs(double(f) - a), db = std::isinf(b) ? std::fabs(double(f) - std::ldexp(std::copysign(1.0, f), 128)) : std::fabs(double(f) - b);
        if (da < db) return uint16_t(lo >> 16);
        if (db < da) return uint16_t(hi >> 16);
        return uint16_t(((lo >> 16) & 1) ? hi >> 16 : lo >> 16);
    };
    int bad = 0;
    for (uint64_t u = 0; u < (1ull << 32); u += 9973) {
        float f;
        const uint32_t w = uint32_t(u);
        std::memcpy(&f, &w, 4);
        bad += __float2bfloat16_rn(f).__x != bf16_ref(f);
#ifdef __FLT16_MAX__
        const _Float16 h = static_cast<_Float16>(f);  // the compiler's conversion: round to nearest even
        uint16_t hb;
        std::memcpy(&hb, &h, 2);
        if (std::isnan(f)) hb = 0x7fff;
        bad += __float2half_rn(f).__x != hb;
#endif
    }
    CHECK(bad == 0);
    for (uint32_t b = 0; b < 65536; b++) {  // every bf16 and f16 value survives the round trip
        const __nv_bfloat16 x{uint16_t(b)};
        const __half y{uint16_t(b)};
        const bool nan_bf = (b & 0x7fff) > 0x7f80, nan_h = (b & 0x7fff) > 0x7c00;
        if (!nan_bf) CHECK(__float2bfloat16_rn(__bfloat162float(x)).__x == b);
        if (!nan_h) CHECK(__float2half_rn(__half2float(y)).__x == b);
    }
    CHECK(__half2float(__half{0x0001}) == std::ldexp(1.0f, -24));  // the smallest subnormal
    CHECK(__float2half_rn(65519.0f).__x == 0x7bff);
    CHECK(__float2half_rn(65520.0f).__x == 0x7c00);
}

TEST_CASE("cuda emulator: wmma computes a 16x16x16 tile; cublasGemmEx follows its column-major definition") {
    std::mt19937 rng(11);
    std::normal_distribution<float> nd;
    std::vector<__nv_bfloat16> a(256), bt(256);
    std::vector<float> c(256);
    for (auto& v : a) v = __float2bfloat16_rn(nd(rng));
    for (auto& v : bt) v = __float2bfloat16_rn(nd(rng));
    for (auto& v : c) v = nd(rng);
    __nv_bfloat16 *da = device(a), *dbt = device(bt);
    float *dc = device(c), *dd = device(std::vector<float>(256)), *drows = device(std::vector<float>(256));
    mma_kernel<<<1, 32>>>(dd, drows, da, dbt, dc);
    REQUIRE(last_error() == "");
    std::vector<float> d = host(dd, 256), rows = host(drows, 256);
    double worst = 0;
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) {
            double want = c[size_t(j) * 16 + i];  // C was read column-major
            for (int k = 0; k < 16; k++)
                want += double(__bfloat162float(a[size_t(i) * 16 + k])) * __bfloat162float(bt[size_t(j) * 16 + k]);
            worst = std::max(worst, std::fabs(d[size_t(i) * 16 + j] - want));
            CHECK(rows[size_t(i) * 16 + j] == float(i));
        }
    CHECK(worst < 1e-4);

    // Other lanes' elements in memory only across a __syncwarp (a GPU's rule; fresh memory is NaN).
    for (bool sync : {false, true}) {
        CAPTURE(sync);
        float *out = device(std::vector<float>(2, 0.0f)), *tile = nullptr;
        REQUIRE(cudaMalloc(&tile, 256 * sizeof(float)) == cudaSuccess);
        store_visibility_kernel<<<1, 32>>>(out, tile, sync);
        REQUIRE(last_error() == "");
        const std::vector<float> seen = host(out, 2);
        CHECK((seen[0] == 2.0f && seen[1] == 2.0f) == sync);
        float* loaded = device(std::vector<float>(256, 0.0f));
        load_visibility_kernel<<<1, 32>>>(loaded, tile, sync);
        REQUIRE(last_error() == "");
        const std::vector<float> l = host(loaded, 256);
        int right = 0;
        for (int i = 0; i < 256; i++) right += l[size_t(i)] == float(i);
        CHECK((right == 256) == sync);
        cudaFree(out), cudaFree(tile), cudaFree(loaded);
    }

    // C[m][n] (column-major, ldc 5) = 2 op(A) op(B) + 0.5 C for op = N/T, lda/ldb past the rows.
    cublasHandle_t h;
    REQUIRE(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS);
    const int m = 3, n = 4, k = 7, lda = 9, ldb = 8, ldc = 5;
    for (cudaDataType type : {CUDA_R_32F, CUDA_R_16BF, CUDA_R_16F})
        for (int ta = 0; ta < 2; ta++)
            for (int tb = 0; tb < 2; tb++) {
                CAPTURE(int(type));
                CAPTURE(ta);
                CAPTURE(tb);
                const int acols = ta ? m : k, bcols = tb ? k : n;
                std::vector<float> A(size_t(lda) * acols), B(size_t(ldb) * bcols), C(size_t(ldc) * n);
                for (auto& v : A) v = float(int(rng() % 9) - 4) / 4;  // exact in every type
                for (auto& v : B) v = float(int(rng() % 9) - 4) / 4;
                for (auto& v : C) v = float(int(rng() % 9) - 4);
                auto as_type = [&](const std::vector<float>& v) {
                    std::vector<uint16_t> r(v.size());
                    for (size_t i = 0; i < v.size(); i++)
                        r[i] = type == CUDA_R_16F ? __float2half_rn(v[i]).__x : __float2bfloat16_rn(v[i]).__x;
                    return r;
                };
                void *dA, *dB;
                if (type == CUDA_R_32F) dA = device(A), dB = device(B);
                else dA = device(as_type(A)), dB = device(as_type(B));
                float* dC = device(C);
                const float alpha = 2.0f, beta = 0.5f;
                REQUIRE(cublasGemmEx(h, ta ? CUBLAS_OP_T : CUBLAS_OP_N, tb ? CUBLAS_OP_T : CUBLAS_OP_N, m, n, k, &alpha, dA,
                                     type, lda, dB, type, ldb, &beta, dC, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F,
                                     CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
                std::vector<float> got = host(dC, C.size());
                for (int i = 0; i < m; i++)
                    for (int j = 0; j < n; j++) {
                        double want = 0.5 * C[size_t(j) * ldc + i];
                        for (int l = 0; l < k; l++)
                            want += 2.0 * A[ta ? size_t(i) * lda + l : size_t(l) * lda + i] *
                                    B[tb ? size_t(l) * ldb + j : size_t(j) * ldb + l];
                        CHECK(got[size_t(j) * ldc + i] == float(want));
                    }
                for (int i = m; i < ldc; i++) CHECK(got[size_t(i)] == C[size_t(i)]);  // rows past m untouched
                cudaFree(dA), cudaFree(dB), cudaFree(dC);
            }
    // beta 0 never reads C (NaN there stays out); refusals
    float* nan_c = device(std::vector<float>(4, NAN));
    float* ones = device(std::vector<float>(4, 1.0f));
    const float one = 1.0f, zero = 0.0f;
    CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &one, ones, CUDA_R_32F, 2, ones, CUDA_R_32F, 2, &zero, nan_c,
                       CUDA_R_32F, 2, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
    CHECK(host(nan_c, 4) == std::vector<float>(4, 2.0f));
    CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &one, ones, CUDA_R_32F, 1, ones, CUDA_R_32F, 2, &zero, nan_c,
                       CUDA_R_32F, 2, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_INVALID_VALUE);
    CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &one, ones, CUDA_R_16BF, 2, ones, CUDA_R_32F, 2, &zero, nan_c,
                       CUDA_R_32F, 2, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_NOT_SUPPORTED);
    CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 3, 2, 2, &one, ones, CUDA_R_32F, 3, ones, CUDA_R_32F, 2, &zero, nan_c,
                       CUDA_R_32F, 3, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_EXECUTION_FAILED);
    CHECK(has(cublasGetStatusString(CUBLAS_STATUS_EXECUTION_FAILED), "not inside one device allocation"));
    for (void* p : {static_cast<void*>(da), static_cast<void*>(dbt), static_cast<void*>(dc), static_cast<void*>(dd),
                    static_cast<void*>(drows), static_cast<void*>(nan_c), static_cast<void*>(ones)})
        cudaFree(p);
}

TEST_CASE("cuda emulator: devices: FASTGEN_EMU_DEVICES of them, CUDA_VISIBLE_DEVICES, PCI ids, one per process") {
    ScopedEnv all("FASTGEN_EMU_DEVICES", "3"), visible("CUDA_VISIBLE_DEVICES", nullptr);
    auto count = [](cudaError_t want) {
        int n = -1;
        CHECK(cudaGetDeviceCount(&n) == want);
        cudaGetLastError();
        return n;
    };
    auto bus = [](int device) {
        char id[32] = "";
        CHECK(cudaDeviceGetPCIBusId(id, sizeof id, device) == cudaSuccess);
        return std::string(id);
    };
    CHECK(count(cudaSuccess) == 3);
    const std::string b0 = bus(0), b1 = bus(1), b2 = bus(2);
    CHECK(b0 == "0000:10:00.0");
    CHECK(b1 == "0000:11:00.0");
    CHECK(b2 == "0000:12:00.0");
    char small[12];  // 13 bytes needed
    CHECK(cudaDeviceGetPCIBusId(small, sizeof small, 0) == cudaErrorInvalidValue);
    CHECK(cudaDeviceGetPCIBusId(small, sizeof small, 3) == cudaErrorInvalidDevice);
    CHECK(has(last_error(), "this process sees 3 emulated devices"));
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 2) == cudaSuccess);
    CHECK(cudaGetDeviceProperties(&prop, 3) == cudaErrorInvalidDevice);
    cudaGetLastError();

    // CUDA_VISIBLE_DEVICES picks and orders them; an address stays with its device.
    visible.set("2,0");
    CHECK(count(cudaSuccess) == 2);
    CHECK(bus(0) == b2);
    CHECK(bus(1) == b0);
    visible.set("1,7,0");  // cut at 7, which does not exist
    CHECK(count(cudaSuccess) == 1);
    CHECK(bus(0) == b1);
    visible.set("1,1");  // cut at the repeat
    CHECK(count(cudaSuccess) == 1);
    visible.set("");
    CHECK(count(cudaErrorNoDevice) == 0);
    visible.set(nullptr);

    // One device per process: this one's context is on its current device (made here if no test
    // made it before); another device is refused.
    void* p = nullptr;
    REQUIRE(cudaMalloc(&p, 64) == cudaSuccess);
    int d = -1;
    CHECK(cudaGetDevice(&d) == cudaSuccess);
    CHECK(cudaSetDevice(d) == cudaSuccess);
    CHECK(cudaSetDevice((d + 1) % 3) == cudaErrorInvalidDevice);
    CHECK(has(last_error(), "the emulator runs one device per process"));
    CHECK(cudaSetDevice(-1) == cudaErrorInvalidDevice);
    cudaGetLastError();

    // Device memory, pinned memory and the rest.
    cudaPointerAttributes a;
    CHECK(cudaPointerGetAttributes(&a, static_cast<char*>(p) + 63) == cudaSuccess);
    CHECK(a.type == cudaMemoryTypeDevice);
    CHECK(a.device == d);
    CHECK(a.devicePointer == static_cast<char*>(p) + 63);
    CHECK(cudaPointerGetAttributes(&a, static_cast<char*>(p) + 64) == cudaSuccess);  // past the end
    CHECK(a.type == cudaMemoryTypeUnregistered);
    void* pinned = nullptr;
    REQUIRE(cudaMallocHost(&pinned, 16) == cudaSuccess);
    CHECK(cudaPointerGetAttributes(&a, pinned) == cudaSuccess);
    CHECK(a.type == cudaMemoryTypeHost);
    int on_stack = 0;
    CHECK(cudaPointerGetAttributes(&a, &on_stack) == cudaSuccess);
    CHECK(a.type == cudaMemoryTypeUnregistered);
    CHECK(cudaFree(p) == cudaSuccess);
    CHECK(cudaPointerGetAttributes(&a, p) == cudaSuccess);  // freed
    CHECK(a.type == cudaMemoryTypeUnregistered);
}

}  // TEST_SUITE
