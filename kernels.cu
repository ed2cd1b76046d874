// kernels.cu: the CUDA backend of the op table (ops.h). Weights bf16/f16/f32 (and int8 per row or
// per group, int4 groups with zero points or float minimums), activations f32, f32 accumulation
// everywhere, a bf16 paged KV cache.
//   decode matmuls (n <= 8 tokens): own matrix-vector kernels, 16-byte streaming weight loads,
//     several loads in flight per lane, one warp per output row, Q/K/V in one launch and the
//     SwiGLU gate/up pair fused with the SiLU-multiply;
//   prefill and larger batches: cuBLAS (bf16/f16 operands, f32 accumulation and output);
//   attention: flash-decoding over the paged cache for decode tokens (splits along the sequence,
//     then a combine), a FlashAttention-2-style tiled kernel on the tensor cores for runs of tokens
//     of one sequence (prefill chunks, verify runs), both feeding the same combine;
//   mixture of experts: routing and grouping by expert on the device, grouped matrix-vector
//     kernels over the chosen experts' rows (capturable: no host sync), cuBLAS per expert for
//     prefill-sized batches;
//   rmsnorm, RoPE fused with the cache write, residual adds, embedding, argmax and top-k/top-p
//   sampling on the device; CUDA graphs for the decode step (model.cpp decides when).
// Every kernel's CPU twin is the same op in kernels_cpu.cpp; tests/test_gpu.cpp compares them.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "ops.h"
#include "sampler.h"

// ---------------------------------------------------------------------------------------------
// checks: every CUDA and cuBLAS call, and every launch

namespace {

void cuda_check(cudaError_t e, const char* call, const char* file, int line) {
    if (e != cudaSuccess) throw Error(fmt("CUDA: %s failed at %s:%d: %s", call, file, line, cudaGetErrorString(e)));
}
void cublas_check(cublasStatus_t s, const char* call, const char* file, int line) {
    if (s != CUBLAS_STATUS_SUCCESS)
        throw Error(fmt("cuBLAS: %s failed at %s:%d: %s", call, file, line, cublasGetStatusString(s)));
}
#define CUDA_CHECK(call) cuda_check((call), #call, __FILE__, __LINE__)
#define CUBLAS_CHECK(call) cublas_check((call), #call, __FILE__, __LINE__)
#define LAUNCH_CHECK(name) cuda_check(cudaGetLastError(), "launch of " name, __FILE__, __LINE__)

constexpr int kWarp = 32;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// The sum over the block (blockDim.x a multiple of 32, at most 1024), returned to every thread.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    __syncthreads();  // part may still be read by a previous call
    v = warp_sum(v);
    const int w = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, nw = blockDim.x / kWarp;
    if (lane == 0) part[w] = v;
    __syncthreads();
    v = lane < nw ? part[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float bf16_bits_to_f32(uint32_t h) { return __uint_as_float(h << 16); }
__device__ __forceinline__ float f16_bits_to_f32(uint32_t h) { return __half2float(__ushort_as_half((unsigned short)h)); }

// ---------------------------------------------------------------------------------------------
// matrix-vector products (decode): out[t][r] = sum_k x[t][k] * W[r][k] for up to 8 tokens
//
// One warp per output row (4 rows per 128-thread block, so even a 1024-row K projection spreads
// over 256 blocks). Each lane streams 16-byte chunks of the row (__ldcs: weights are read once, so
// they should not evict x from the caches), U chunks loaded before any is used so each lane keeps
// U * 16 bytes in flight; x comes through L1, where every warp of the SM reuses it. Quantized
// weights are dequantized in registers. The warp's partial sums meet in a shuffle reduction.

// The weight formats of ops.h's Weight, as the kernels tell them apart:
//   kI8 int8 with a scale per row, kI8G int8 with a scale per group (GGUF Q8_0);
//   kI4 int4 with a scale and zero point per group, kI4M int4 with a scale and float minimum per
//   group (GGUF Q4_1).
enum Fmt { kF32, kBF16, kF16, kI8, kI8G, kI4, kI4M };

int fmt_of(const Weight& w) {
    switch (w.dtype) {
        case DType::F32: return kF32;
        case DType::BF16: return kBF16;
        case DType::F16: return kF16;
        case DType::I8: return w.group > 0 ? kI8G : kI8;
        case DType::U8: return w.mins ? kI4M : kI4;
        default: throw Error(fmt("CUDA matmul: weight dtype %s is not supported", dtype_name(w.dtype)));
    }
}
// Formats with scales (and zero points or minimums) per group of columns, [rows][cols / group].
__host__ __device__ constexpr bool grouped(int f) { return f == kI8G || f == kI4 || f == kI4M; }
// Elements in one 16-byte chunk. A group is a multiple of 32 columns, so a chunk never straddles two.
__host__ __device__ constexpr int chunk_elems(int f) {
    return f == kF32 ? 4 : f == kI8 || f == kI8G ? 16 : f == kI4 || f == kI4M ? 32 : 8;
}
// Bytes of one row of `cols` logical columns (stride for a strided view).
size_t row_bytes(const Weight& w, int cols) {
    return w.dtype == DType::U8 ? size_t(cols) / 2 : size_t(cols) * dtype_size(w.dtype);
}

// sum_j w_j * x[j] over one chunk, with the chunk's group scale s and zero point or minimum z:
//   kI8: sum q x (the row's scale multiplies the row's sum once, at the end); kI8G: s * sum q x;
//   kI4: (q - z) * s per weight, folded as s * (sum q x - z sum x); kI4M: q * s + z per weight,
//   folded as s * sum q x + z * sum x (the CPU kernel's per-group sums, per chunk here).
template <int F>
__device__ __forceinline__ float chunk_dot(const uint4& c, const float* x, float s, float z) {
    const float4* xv = reinterpret_cast<const float4*>(x);
    const uint32_t wd[4] = {c.x, c.y, c.z, c.w};
    float acc = 0.0f;
    if constexpr (F == kF32) {
        const float4 a = __ldg(xv);
        acc = a.x * __uint_as_float(wd[0]) + a.y * __uint_as_float(wd[1]) + a.z * __uint_as_float(wd[2]) +
              a.w * __uint_as_float(wd[3]);
    } else if constexpr (F == kBF16 || F == kF16) {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const float4 a = __ldg(xv + i);
            const uint32_t lo = wd[2 * i], hi = wd[2 * i + 1];
            if constexpr (F == kBF16) {
                acc += a.x * bf16_bits_to_f32(lo & 0xffff) + a.y * __uint_as_float(lo & 0xffff0000u) +
                       a.z * bf16_bits_to_f32(hi & 0xffff) + a.w * __uint_as_float(hi & 0xffff0000u);
            } else {
                acc += a.x * f16_bits_to_f32(lo & 0xffff) + a.y * f16_bits_to_f32(lo >> 16) +
                       a.z * f16_bits_to_f32(hi & 0xffff) + a.w * f16_bits_to_f32(hi >> 16);
            }
        }
    } else if constexpr (F == kI8 || F == kI8G) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const float4 a = __ldg(xv + i);
            const uint32_t v = wd[i];
            acc += a.x * float(int8_t(v & 0xff)) + a.y * float(int8_t((v >> 8) & 0xff)) +
                   a.z * float(int8_t((v >> 16) & 0xff)) + a.w * float(int8_t(v >> 24));
        }
        if constexpr (F == kI8G) acc *= s;
    } else {  // kI4, kI4M: byte b holds column 2b (low nibble) and 2b + 1 (high nibble)
        float qx = 0.0f, sx = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const float4 a = __ldg(xv + i);
            const uint32_t v = wd[i / 2] >> (16 * (i % 2));
            qx += a.x * float(v & 0xf) + a.y * float((v >> 4) & 0xf) + a.z * float((v >> 8) & 0xf) +
                  a.w * float((v >> 12) & 0xf);
            sx += (a.x + a.y) + (a.z + a.w);
        }
        if constexpr (F == kI4M) acc = s * qx + z * sx;
        else acc = s * (qx - z * sx);
    }
    return acc;
}

// One weight, as a float (kI8: q, scaled after the sum; kI8G: q * s; kI4: (q - z) * s; kI4M:
// q * s + m). scales, zeros and mins point at the row's first group (grouped formats only).
template <int F>
__device__ __forceinline__ float weight_at(const uint8_t* row, int k, const float* scales, const uint8_t* zeros,
                                           const float* mins, int group) {
    if constexpr (F == kF32) return reinterpret_cast<const float*>(row)[k];
    if constexpr (F == kBF16) return bf16_bits_to_f32(reinterpret_cast<const uint16_t*>(row)[k]);
    if constexpr (F == kF16) return f16_bits_to_f32(reinterpret_cast<const uint16_t*>(row)[k]);
    if constexpr (F == kI8) return float(reinterpret_cast<const int8_t*>(row)[k]);
    if constexpr (F == kI8G) return float(reinterpret_cast<const int8_t*>(row)[k]) * scales[k / group];
    const int q = k % 2 ? row[k / 2] >> 4 : row[k / 2] & 0xf;
    if constexpr (F == kI4M) return float(q) * scales[k / group] + mins[k / group];
    return float(q - int(zeros[k / group])) * scales[k / group];
}

struct Seg {
    const uint8_t* w;       // [rows] rows of row_bytes
    const float* scales;    // kI8: [rows]; grouped formats: [rows][cols / group]
    const uint8_t* zeros;   // kI4: [rows][cols / group]
    const float* mins;      // kI4M: [rows][cols / group]
    float* out;             // [n][rows]
    int rows;
};
struct GemvArgs {
    Seg seg[3];
    int nseg;         // segments (Q, K, V) stacked along the rows; gate_up: w1 and w3
    int cols, group;  // group: columns per scale of a grouped format
    size_t row_bytes;
    const float* x;   // [n][cols]
    int n;
    bool vec;         // 16-byte chunks: rows, x and cols are aligned for them
};

constexpr int kGemvWarps = 4;

// Row r of S (and the same row of S2 for the gate/up pair) against token rows xr[0..nt): acc[t]
// (acc2[t]) holds the warp's whole sum in every lane, before kI8's row scale (gemv_value).
template <int F, int NT, bool kGateUp>
__device__ __forceinline__ void gemv_row(float (&acc)[NT], float (&acc2)[NT], const Seg& S, const Seg& S2, int r,
                                         const float* const (&xr)[NT], int nt, int cols, int group, size_t rbytes,
                                         bool vec) {
    constexpr int E = chunk_elems(F), U = F == kI4 || F == kI4M ? 2 : 4;
    const int lane = threadIdx.x % kWarp;
    const uint8_t* row = S.w + size_t(r) * rbytes;
    const uint8_t* row2 = S2.w + size_t(r) * rbytes;
    const int ngroups = grouped(F) ? cols / group : 1;
#pragma unroll
    for (int t = 0; t < NT; t++) acc[t] = acc2[t] = 0.0f;

    if (vec) {
        const int nchunks = cols / E;
        const uint4* w1 = reinterpret_cast<const uint4*>(row);
        const uint4* w2 = reinterpret_cast<const uint4*>(row2);
        for (int c0 = lane; c0 < nchunks; c0 += kWarp * U) {
            uint4 v1[U], v2[U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int c = c0 + u * kWarp;
                if (c < nchunks) {
                    v1[u] = __ldcs(w1 + c);
                    if (kGateUp) v2[u] = __ldcs(w2 + c);
                }
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int c = c0 + u * kWarp;
                if (c >= nchunks) continue;
                float s1 = 0, z1 = 0, s2 = 0, z2 = 0;  // the chunk's group: scale, zero point or minimum
                if (grouped(F)) {
                    const size_t g = size_t(r) * ngroups + size_t(c) * E / group;
                    s1 = S.scales[g];
                    if (kGateUp) s2 = S2.scales[g];
                    if (F == kI4) z1 = float(S.zeros[g]), z2 = kGateUp ? float(S2.zeros[g]) : 0.0f;
                    if (F == kI4M) z1 = S.mins[g], z2 = kGateUp ? S2.mins[g] : 0.0f;
                }
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    if (t >= nt) break;
                    const float* xt = xr[t] + size_t(c) * E;
                    acc[t] += chunk_dot<F>(v1[u], xt, s1, z1);
                    if (kGateUp) acc2[t] += chunk_dot<F>(v2[u], xt, s2, z2);
                }
            }
        }
    } else {  // unaligned or odd sizes: one weight at a time
        const size_t g0 = size_t(r) * ngroups;  // the row's first group
        const float* sc1 = grouped(F) ? S.scales + g0 : nullptr;
        const float* sc2 = grouped(F) ? S2.scales + g0 : nullptr;
        const uint8_t* zp1 = F == kI4 ? S.zeros + g0 : nullptr;
        const uint8_t* zp2 = F == kI4 ? S2.zeros + g0 : nullptr;
        const float* mn1 = F == kI4M ? S.mins + g0 : nullptr;
        const float* mn2 = F == kI4M ? S2.mins + g0 : nullptr;
        for (int k = lane; k < cols; k += kWarp) {
            const float wv = weight_at<F>(row, k, sc1, zp1, mn1, group);
            const float wv2 = kGateUp ? weight_at<F>(row2, k, sc2, zp2, mn2, group) : 0.0f;
#pragma unroll
            for (int t = 0; t < NT; t++) {
                if (t >= nt) break;
                const float xv = xr[t][k];
                acc[t] += wv * xv;
                if (kGateUp) acc2[t] += wv2 * xv;
            }
        }
    }
#pragma unroll
    for (int t = 0; t < NT; t++) {
        acc[t] = warp_sum(acc[t]);
        if (kGateUp) acc2[t] = warp_sum(acc2[t]);
    }
}

// The output of row r for one token from gemv_row's sums: kI8's row scale applied, and for the
// gate/up pair silu(gate) * up.
template <int F, bool kGateUp>
__device__ __forceinline__ float gemv_value(float acc, float acc2, const Seg& S, const Seg& S2, int r) {
    const float g = F == kI8 ? acc * S.scales[r] : acc;
    if (!kGateUp) return g;
    return g / (1.0f + expf(-g)) * (F == kI8 ? acc2 * S2.scales[r] : acc2);
}

template <int F, int NT, bool kGateUp>
__global__ void __launch_bounds__(kGemvWarps * kWarp) gemv_kernel(const GemvArgs a) {
    int r = blockIdx.x * kGemvWarps + threadIdx.x / kWarp, s = 0;
    if (!kGateUp)
        while (s + 1 < a.nseg && r >= a.seg[s].rows) r -= a.seg[s].rows, s++;
    const Seg S = a.seg[s];
    if (r >= S.rows) return;
    const Seg S2 = a.seg[kGateUp ? 1 : s];
    const float* xr[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) xr[t] = a.x + size_t(t) * a.cols;
    float acc[NT], acc2[NT];
    gemv_row<F, NT, kGateUp>(acc, acc2, S, S2, r, xr, a.n, a.cols, a.group, a.row_bytes, a.vec);
    if (threadIdx.x % kWarp != 0) return;
#pragma unroll
    for (int t = 0; t < NT; t++) {
        if (t >= a.n) break;
        S.out[size_t(t) * S.rows + r] = gemv_value<F, kGateUp>(acc[t], acc2[t], S, S2, r);
    }
}

// ---------------------------------------------------------------------------------------------
// mixture of experts, routed on the device
//
// moe_route_kernel routes every token as moe_route (kernels_cpu.cpp) does and groups the
// (token, choice) pairs by expert: rows of an expert-sorted order, an expert's rows in token
// order. The grouped GEMV kernels then run each chosen expert's rows: block (row block, y) takes
// the y-th expert that has pairs, so the grid depends on n alone (a captured step replays with any
// routing) and unchosen experts are never read. Every expert's matrix pointers go by value in the
// launch's parameters (ExpertMats): no table to keep on the device.

constexpr int kMoeMaxExperts = 64;

struct MoeRouting {  // in the backend's MoE workspace, written by moe_route_kernel
    int* chosen;       // [pairs] pair p = t * k + j: token t's j-th expert, by descending weight
    float* weight;     // [pairs] its renormalised weight
    int* count;        // [E] pairs per expert
    int* first;        // [E] the expert's first row in the sorted order
    int* active;       // [E] the experts with pairs, ascending
    int* n_active;     // [1] how many
    int* pair_of_row;  // [pairs] sorted row -> pair
    int* row_of_pair;  // [pairs] pair -> sorted row
};

// One block. Softmax over each token's expert logits in double, the top k by repeated maximum
// (the lower index wins a tie), weights renormalised over the k: moe_route's arithmetic. Then
// per expert (one thread each) its pairs in pair order.
__global__ void moe_route_kernel(const MoeRouting rt, const float* logits, int n, int E, int k) {
    for (int t = threadIdx.x; t < n; t += blockDim.x) {
        const float* lg = logits + size_t(t) * E;
        double mx = lg[0], sum = 0;
        for (int e = 1; e < E; e++) mx = fmax(mx, double(lg[e]));
        for (int e = 0; e < E; e++) sum += exp(double(lg[e]) - mx);
        unsigned long long taken = 0;
        double chosen_sum = 0;
        for (int j = 0; j < k; j++) {
            int best = -1;
            double pb = 0;
            for (int e = 0; e < E; e++) {
                if (taken >> e & 1) continue;
                const double p = exp(double(lg[e]) - mx) / sum;
                if (best < 0 || p > pb) best = e, pb = p;
            }
            taken |= 1ull << best;
            rt.chosen[t * k + j] = best;
            rt.weight[t * k + j] = float(pb);  // the probability for now; renormalised below
            chosen_sum += pb;
        }
        for (int j = 0; j < k; j++) {
            const double p = exp(double(lg[rt.chosen[t * k + j]]) - mx) / sum;
            rt.weight[t * k + j] = float(p / chosen_sum);
        }
    }
    __syncthreads();  // chosen[] is complete (global writes are visible within the block)
    const int pairs = n * k;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int c = 0;
        for (int p = 0; p < pairs; p++) c += rt.chosen[p] == e;
        rt.count[e] = c;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int row = 0, na = 0;
        for (int e = 0; e < E; e++) {
            rt.first[e] = row;
            row += rt.count[e];
            if (rt.count[e] > 0) rt.active[na++] = e;
        }
        *rt.n_active = na;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int row = rt.first[e];
        for (int p = 0; p < pairs; p++)
            if (rt.chosen[p] == e) rt.pair_of_row[row] = p, rt.row_of_pair[p] = row, row++;
    }
}

// One matrix of every expert (one layout): values, scales, and zero points (kI4) or minimums (kI4M).
struct ExpertMats {
    const uint8_t* w[kMoeMaxExperts];
    const float* scales[kMoeMaxExperts];
    const void* zm[kMoeMaxExperts];
};
struct MoeGemvArgs {
    ExpertMats m1, m2;  // gate/up: w1 and w3; down: w2 (m2 unused)
    int rows, cols, group;
    size_t row_bytes;
    bool vec;
    const float* x;     // gate/up: the tokens [n][cols], row of sorted row i = pair_of_row[i] / k;
                        // down: the inner activations in sorted order [pairs][cols]
    bool x_sorted;
    int k;
    float* out;         // [pairs][rows] in sorted order
    MoeRouting rt;
};
static_assert(sizeof(MoeGemvArgs) <= 4096, "kernel parameters stay within the 4 KB every toolkit takes");

template <int F>
__device__ __forceinline__ Seg expert_seg(const ExpertMats& m, int e, int rows) {
    return Seg{m.w[e], m.scales[e], F == kI4 ? static_cast<const uint8_t*>(m.zm[e]) : nullptr,
               F == kI4M ? static_cast<const float*>(m.zm[e]) : nullptr, nullptr, rows};
}

// Block (row block, y): warp row r of the y-th active expert over its rows, NT at a time (the
// weight row is read again for each further NT, from L2 at decode sizes).
template <int F, int NT, bool kGateUp>
__global__ void __launch_bounds__(kGemvWarps * kWarp) moe_gemv_kernel(const MoeGemvArgs a) {
    if (int(blockIdx.y) >= *a.rt.n_active) return;
    const int e = a.rt.active[blockIdx.y], m = a.rt.count[e], first = a.rt.first[e];
    const int r = blockIdx.x * kGemvWarps + threadIdx.x / kWarp;
    if (r >= a.rows) return;
    const Seg S = expert_seg<F>(a.m1, e, a.rows), S2 = kGateUp ? expert_seg<F>(a.m2, e, a.rows) : S;
    for (int i0 = 0; i0 < m; i0 += NT) {
        const int nt = min(NT, m - i0);
        const float* xr[NT];
#pragma unroll
        for (int t = 0; t < NT; t++) {
            const int row = first + i0 + min(t, nt - 1);
            xr[t] = a.x + size_t(a.x_sorted ? row : a.rt.pair_of_row[row] / a.k) * a.cols;
        }
        float acc[NT], acc2[NT];
        gemv_row<F, NT, kGateUp>(acc, acc2, S, S2, r, xr, nt, a.cols, a.group, a.row_bytes, a.vec);
        if (threadIdx.x % kWarp != 0) continue;
#pragma unroll
        for (int t = 0; t < NT; t++) {
            if (t >= nt) break;
            a.out[size_t(first + i0 + t) * a.rows + r] = gemv_value<F, kGateUp>(acc[t], acc2[t], S, S2, r);
        }
    }
}

// Sorted row i of xg = the token row of pair pair_of_row[i] (the cuBLAS path's gather).
__global__ void moe_gather_kernel(float* xg, const float* x, const MoeRouting rt, int k, int dim) {
    const float* src = x + size_t(rt.pair_of_row[blockIdx.x] / k) * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) xg[size_t(blockIdx.x) * dim + i] = src[i];
}

// out[t] = sum over j < k, in order, of weight[t k + j] * y[row_of_pair[t k + j]]: one block per token.
__global__ void moe_combine_kernel(float* out, const float* y, const MoeRouting rt, int k, int dim) {
    const int t = blockIdx.x;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < k; j++) {
            const int p = t * k + j;
            acc += rt.weight[p] * y[size_t(rt.row_of_pair[p]) * dim + i];
        }
        out[size_t(t) * dim + i] = acc;
    }
}

// ---------------------------------------------------------------------------------------------
// elementwise and row kernels

// out[t] = x[t] / rms(x[t]) * weight; one block per token (out may be x).
__global__ void rmsnorm_kernel(float* out, const float* x, const float* weight, int dim, float eps) {
    const float* xt = x + size_t(blockIdx.x) * dim;
    float* ot = out + size_t(blockIdx.x) * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xt[i] * xt[i];
    const float scale = rsqrtf(block_sum(ss) / float(dim) + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ot[i] = xt[i] * scale * weight[i];
}

// The cache is bf16 (kv_dtype()); the kernels are templates over its element type.
__device__ __forceinline__ void store_kv(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ float load_kv(const __nv_bfloat16* p) { return __bfloat162float(*p); }

// One block per token: rotate its q and k pairs, then write k and v into the cache slot (none for
// a negative slot: a padding token of a captured batch).
template <typename KV>
__global__ void rope_kv_write_kernel(float* q, float* k, const float* v, KV* k_cache, KV* v_cache,
                                     const float* cos_sin, const int* slots, int n_heads, int n_kv_heads, int head_dim) {
    const int t = blockIdx.x, half = head_dim / 2, kv_dim = n_kv_heads * head_dim;
    const float* cs = cos_sin + size_t(t) * head_dim;
    float* qt = q + size_t(t) * n_heads * head_dim;
    float* kt = k + size_t(t) * kv_dim;
    const float* vt = v + size_t(t) * kv_dim;
    const int slot = slots[t];
    KV* kc = k_cache + size_t(max(slot, 0)) * kv_dim;
    KV* vc = v_cache + size_t(max(slot, 0)) * kv_dim;
    for (int p = threadIdx.x; p < (n_heads + n_kv_heads) * half; p += blockDim.x) {
        const bool is_q = p < n_heads * half;
        const int pp = is_q ? p : p - n_heads * half, h = pp / half, i = pp % half;
        float* x = (is_q ? qt : kt) + h * head_dim + 2 * i;
        const float c = cs[2 * i], s = cs[2 * i + 1], a = x[0], b = x[1];
        const float r0 = a * c - b * s, r1 = a * s + b * c;
        x[0] = r0, x[1] = r1;
        if (!is_q && slot >= 0) store_kv(kc + h * head_dim + 2 * i, r0), store_kv(kc + h * head_dim + 2 * i + 1, r1);
    }
    if (slot < 0) return;
    for (int j = threadIdx.x; j < kv_dim; j += blockDim.x) store_kv(vc + j, vt[j]);
}

__global__ void silu_mul_kernel(float* gate, const float* up, size_t n) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
        const float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

__global__ void add_scaled_kernel(float* x, const float* y, float a, size_t n, bool plain) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
        x[i] = plain ? x[i] + y[i] : x[i] + a * y[i];
}

// One block per token: its embedding row as f32.
template <int F>
__global__ void embed_kernel(float* out, const uint8_t* table, const float* scales, const uint8_t* zeros,
                             const float* mins, int cols, size_t row_bytes, int group, const int* tokens) {
    const int row = tokens[blockIdx.x];
    const uint8_t* r = table + size_t(row) * row_bytes;
    const size_t g0 = grouped(F) ? size_t(row) * (cols / group) : 0;  // the row's first group
    const float* sc = grouped(F) ? scales + g0 : nullptr;
    const uint8_t* zp = F == kI4 ? zeros + g0 : nullptr;
    const float* mn = F == kI4M ? mins + g0 : nullptr;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        float v = weight_at<F>(r, i, sc, zp, mn, group);
        if (F == kI8) v *= scales[row];
        out[size_t(blockIdx.x) * cols + i] = v;
    }
}

// f32 -> bf16 / f16 operands for cuBLAS, and a quantized matrix dequantized to bf16.
template <typename T>
__global__ void convert_kernel(T* out, const float* x, size_t n) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
        if constexpr (std::is_same<T, __half>::value) out[i] = __float2half_rn(x[i]);
        else out[i] = __float2bfloat16_rn(x[i]);
    }
}
template <int F>
__global__ void dequantize_kernel(__nv_bfloat16* out, const uint8_t* w, const float* scales, const uint8_t* zeros,
                                  const float* mins, int rows, int cols, size_t row_bytes, int group) {
    const size_t n = size_t(rows) * cols;
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
        const int r = int(i / cols), k = int(i % cols);
        const size_t g0 = grouped(F) ? size_t(r) * (cols / group) : 0;  // the row's first group
        float v = weight_at<F>(w + size_t(r) * row_bytes, k, grouped(F) ? scales + g0 : nullptr,
                               F == kI4 ? zeros + g0 : nullptr, F == kI4M ? mins + g0 : nullptr, group);
        if (F == kI8) v *= scales[r];
        out[i] = __float2bfloat16_rn(v);
    }
}

// ---------------------------------------------------------------------------------------------
// attention: flash-decoding for decode tokens, a tiled tensor-core kernel for runs of tokens

#include "kernels_attention.cuh"

// ---------------------------------------------------------------------------------------------
// sampling (one 1024-thread block per row; thread i owns ids [i * per, (i + 1) * per), so
// block-wide prefix sums follow id order, which the host's tie rules and draw walk use)

constexpr int kSampleThreads = 1024;

// Exclusive prefix sum over the block in thread order; *total gets the block's sum.
__device__ double block_scan(double v, double* total) {
    __shared__ double warp_sums[32];
    __shared__ double tot;
    const int lane = threadIdx.x % kWarp, w = threadIdx.x / kWarp, nw = blockDim.x / kWarp;
    __syncthreads();  // a previous call's readers are done
    double incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const double y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
    }
    if (lane == 31) warp_sums[w] = incl;
    __syncthreads();
    if (w == 0) {
        const double x = lane < nw ? warp_sums[lane] : 0.0;
        double xi = x;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const double y = __shfl_up_sync(0xffffffffu, xi, o);
            if (lane >= o) xi += y;
        }
        if (lane < nw) warp_sums[lane] = xi - x;
        if (lane == 31) tot = xi;
    }
    __syncthreads();
    *total = tot;
    return warp_sums[w] + incl - v;
}

__device__ double block_total(double v) {
    double t;
    block_scan(v, &t);
    return t;
}

// Which elements of e[0..n) pass a threshold: the largest bit pattern `cut` (non-negative floats
// order as their bits) such that weight(elements >= cut) >= need, by bisection on the bits.
// count_mode: weight 1 per element (top-k), else the element's value (top-p). Its 31 passes need
// no id order, so threads read with a stride of the block (coalesced) rather than their own ids.
__device__ uint32_t threshold_bits(const float* e, int n, double need, bool count_mode) {
    uint32_t prefix = 0;
    for (int bit = 30; bit >= 0; bit--) {  // bit 31 (sign) is 0 for every kept value
        const uint32_t cand = prefix | (1u << bit);
        double w = 0.0;
        for (int i = threadIdx.x; i < n; i += blockDim.x)
            if (e[i] >= 0.0f && __float_as_uint(e[i]) >= cand) w += count_mode ? 1.0 : double(e[i]);
        if (block_total(w) >= need) prefix = cand;
    }
    return prefix;
}

// Keeps (e >= 0) the elements above bits `cut`, and of those equal to it the first `ties` by id;
// the rest become -1.
__device__ void keep_ties(float* e, int lo, int hi, uint32_t cut, double ties) {
    double mine = 0.0, total;
    for (int i = lo; i < hi; i++)
        if (e[i] >= 0.0f && __float_as_uint(e[i]) == cut) mine += 1.0;
    double rank = block_scan(mine, &total);
    for (int i = lo; i < hi; i++) {
        if (e[i] < 0.0f) continue;
        const uint32_t bits = __float_as_uint(e[i]);
        if (bits > cut) continue;
        if (bits == cut && rank < ties) {
            rank += 1.0;
            continue;
        }
        e[i] = -1.0f;
    }
    __syncthreads();
}

// tokens[row]: Sampler::sample's token for logits[row] and uniform u[row] (see Ops::sample).
// work [m][vocab]: e = exp((logit - max) / T) of kept tokens, -1 for dropped ones.
__global__ void __launch_bounds__(kSampleThreads)
sample_kernel(int* tokens, const float* logits, float* work, const float* u, int vocab, float temperature, int top_k,
              float top_p) {
    const int row = blockIdx.x;
    const float* l = logits + size_t(row) * vocab;
    float* e = work + size_t(row) * vocab;
    const int per = (vocab + blockDim.x - 1) / blockDim.x;
    const int lo = min(vocab, int(threadIdx.x) * per), hi = min(vocab, lo + per);

    // the first maximum
    float best = -INFINITY;
    int best_i = INT_MAX;
    for (int i = lo; i < hi; i++)
        if (best_i == INT_MAX || l[i] > best) best = l[i], best_i = i;
    __shared__ float wb[32];
    __shared__ int wi[32];
    __shared__ int result;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
        if (ov > best || (ov == best && oi < best_i) || best_i == INT_MAX) best = ov, best_i = oi;
    }
    const int lane = threadIdx.x % kWarp, w = threadIdx.x / kWarp;
    if (lane == 0) wb[w] = best, wi[w] = best_i;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int j = 1; j < int(blockDim.x / kWarp); j++)
            if (wi[j] != INT_MAX && (wb[j] > wb[0] || (wb[j] == wb[0] && wi[j] < wi[0]) || wi[0] == INT_MAX))
                wb[0] = wb[j], wi[0] = wi[j];
        result = wi[0];
    }
    __syncthreads();
    if (temperature <= 0.0f) {
        if (threadIdx.x == 0) tokens[row] = result;
        return;
    }
    const float mx = wb[0];
    for (int i = lo; i < hi; i++) e[i] = expf((l[i] - mx) / temperature);
    __syncthreads();

    // top-k: the k largest (ties to the lower id)
    const int keep = top_k > 0 ? min(top_k, vocab) : vocab;
    if (keep < vocab) {
        const uint32_t cut = threshold_bits(e, vocab, double(keep), true);
        double above = 0.0;
        for (int i = lo; i < hi; i++) above += __float_as_uint(e[i]) > cut ? 1.0 : 0.0;
        keep_ties(e, lo, hi, cut, double(keep) - block_total(above));
    }
    // top-p: the smallest prefix (by probability, then id) whose mass reaches top_p of the kept mass
    if (top_p < 1.0f) {
        double mass = 0.0;
        for (int i = lo; i < hi; i++) mass += e[i] >= 0.0f ? double(e[i]) : 0.0;
        const double target = double(top_p) * block_total(mass);
        const uint32_t cut = threshold_bits(e, vocab, target, false);
        double above = 0.0, ties = 0.0;
        for (int i = lo; i < hi; i++) {
            if (e[i] < 0.0f) continue;
            if (__float_as_uint(e[i]) > cut) above += double(e[i]);
            else if (__float_as_uint(e[i]) == cut) ties += 1.0;
        }
        above = block_total(above);
        ties = block_total(ties);
        const double v = double(__uint_as_float(cut));
        double need = v > 0.0 ? ceil((target - above) / v) : ties;
        need = fmin(fmax(need, above > 0.0 ? 0.0 : 1.0), ties);
        keep_ties(e, lo, hi, cut, need);
    }
    // the draw: the first id, in id order, where the kept mass passes u * total
    double mine = 0.0, total;
    int last = -1;
    for (int i = lo; i < hi; i++)
        if (e[i] > 0.0f) mine += double(e[i]), last = i;
    const double before = block_scan(mine, &total);
    if (threadIdx.x == 0) result = -1;
    __syncthreads();
    if (last >= 0) atomicMax(&result, last);  // the fallback when u * total rounds past the end
    __syncthreads();
    const double r = double(u[row]) * total;
    if (mine > 0.0 && before <= r && r < before + mine) {
        double cdf = before;
        int pick = last;
        for (int i = lo; i < hi; i++) {
            if (e[i] <= 0.0f) continue;
            cdf += double(e[i]);
            if (r < cdf) {
                pick = i;
                break;
            }
        }
        result = pick;
    }
    __syncthreads();
    if (threadIdx.x == 0) tokens[row] = result;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// the backend

namespace {

int grid_for(size_t n, int threads) { return int(std::min<size_t>((n + threads - 1) / threads, 65536)); }

class CudaOps final : public Ops {
  public:
    // The device is set before any other CUDA call of this process that would create a context
    // (a tensor-parallel rank must not leave one on device 0).
    explicit CudaOps(int device) : device_(device) {
        CUDA_CHECK(cudaSetDevice(device));
        cudaDeviceProp prop;
        CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
        sms_ = prop.multiProcessorCount;
        CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
        CUBLAS_CHECK(cublasCreate(&blas_));
        CUBLAS_CHECK(cublasSetStream(blas_, stream_));
        // cuBLAS gets its workspace from us, so it never allocates inside a stream capture.
        CUDA_CHECK(cudaMalloc(&blas_ws_, kBlasWorkspace));
        CUBLAS_CHECK(cublasSetWorkspace(blas_, blas_ws_, kBlasWorkspace));
        for (int i = 0; i < 2; i++) {
            CUDA_CHECK(cudaMallocHost(&staging_[i], kStaging));
            CUDA_CHECK(cudaEventCreateWithFlags(&staged_[i], cudaEventDisableTiming));
        }
        CUDA_CHECK(cudaFuncSetAttribute(attention_split_kernel<__nv_bfloat16>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024));
        smem_optin_ = prop.sharedMemPerBlockOptin;
        if (const char* env = std::getenv("FASTGEN_CUDA_DEQUANT_SLAB")) dequant_slab_ = std::strtoull(env, nullptr, 10);
        const int optin = int(smem_optin_);
        CUDA_CHECK(cudaFuncSetAttribute(attention_tiled_kernel<4>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
        CUDA_CHECK(cudaFuncSetAttribute(attention_tiled_kernel<8>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
        CUDA_CHECK(cudaFuncSetAttribute(attention_tiled_kernel<16>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
        std::fprintf(stderr, "cuda: device %d, %s, %d SMs, %.1f GB, compute capability %d.%d\n", device, prop.name,
                     sms_, prop.totalGlobalMem / 1e9, prop.major, prop.minor);
    }
    // One per process, never destroyed (see cuda_ops()): the driver releases everything at exit.
    int device() const { return device_; }
    cudaStream_t stream() const { return stream_; }

    const char* name() const override { return "cuda"; }
    bool host_memory() const override { return false; }
    DType kv_dtype() const override { return DType::BF16; }
    bool graphs() const override { return true; }
    bool can_sample() const override { return true; }

    // ---- memory
    void* alloc(size_t bytes) override {
        void* p = device_malloc(bytes);
        CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream_));
        return p;
    }
    // Uninitialised (the workspaces; no memset that a capture would record).
    void* device_malloc(size_t bytes) {
        void* p = nullptr;
        cudaError_t e = cudaMalloc(&p, bytes);
        if (e != cudaSuccess) {
            cudaGetLastError();  // clear it
            throw Error(fmt("CUDA: out of device memory allocating %.2f GB (%.2f GB free); use a smaller --kv-capacity "
                            "or --max-batch-tokens, or a quantized model",
                            bytes / 1e9, free_memory() / 1e9));
        }
        return p;
    }
    void free(void* p) override {
        cudaError_t e = cudaFree(p);
        if (e != cudaSuccess) std::fprintf(stderr, "warning: cudaFree: %s\n", cudaGetErrorString(e));
    }
    // Small uploads (a step's metadata) go straight from pageable memory: the driver stages them
    // at once without waiting for the GPU. Large ones (weights) go through two pinned buffers, so
    // reading the next chunk from the mapped file overlaps the copy of the last.
    void upload(void* dst, const void* src, size_t bytes) override {
        if (bytes <= (1u << 20)) {
            CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
            return;
        }
        for (size_t off = 0, i = 0; off < bytes; off += kStaging, i++) {
            const size_t n = std::min(kStaging, bytes - off);
            const int b = int(i % 2);
            CUDA_CHECK(cudaEventSynchronize(staged_[b]));  // its previous copy is done
            std::memcpy(staging_[b], static_cast<const uint8_t*>(src) + off, n);
            CUDA_CHECK(cudaMemcpyAsync(static_cast<uint8_t*>(dst) + off, staging_[b], n, cudaMemcpyHostToDevice, stream_));
            CUDA_CHECK(cudaEventRecord(staged_[b], stream_));
        }
        CUDA_CHECK(cudaStreamSynchronize(stream_));
    }
    void download(void* dst, const void* src, size_t bytes) override {
        for (size_t off = 0; off < bytes; off += kStaging) {
            const size_t n = std::min(kStaging, bytes - off);
            CUDA_CHECK(cudaMemcpyAsync(staging_[0], static_cast<const uint8_t*>(src) + off, n, cudaMemcpyDeviceToHost, stream_));
            CUDA_CHECK(cudaStreamSynchronize(stream_));
            std::memcpy(static_cast<uint8_t*>(dst) + off, staging_[0], n);
        }
    }
    void copy(void* dst, const void* src, size_t bytes) override {
        CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_));
    }
    void zero(void* p, size_t bytes) override { CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream_)); }
    size_t free_memory() const override {
        size_t free = 0, total = 0;
        CUDA_CHECK(cudaMemGetInfo(&free, &total));
        return free;
    }

    // ---- graphs
    void capture_begin() override {
        // Relaxed: a workspace that grows while capturing is allocated, not refused.
        CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed));
    }
    void* capture_end() override {
        cudaGraph_t g = nullptr;
        CUDA_CHECK(cudaStreamEndCapture(stream_, &g));
        cudaGraphExec_t exec = nullptr;
        cudaError_t e = cudaGraphInstantiate(&exec, g, 0);
        cudaGraphDestroy(g);
        CUDA_CHECK(e);
        return exec;
    }
    void graph_launch(void* g) override { CUDA_CHECK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(g), stream_)); }
    void graph_destroy(void* g) override {
        if (g) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(g));
    }

    // ---- compute
    void matmul(float* out, const float* x, const Weight& w, int n) override {
        if (n <= kGemvMaxTokens) {
            GemvArgs a = gemv_args(x, w, n);
            a.seg[0] = seg(w, out);
            a.nseg = 1;
            gemv(a, fmt_of(w), false, w.rows);
            return;
        }
        gemm(out, x, w, n);
    }

    void matmul_qkv(float* q, float* k, float* v, const float* x, const Weight& wq, const Weight& wk, const Weight& wv,
                    int n) override {
        if (n > kGemvMaxTokens || !same_layout(wq, wk) || !same_layout(wq, wv)) {
            Ops::matmul_qkv(q, k, v, x, wq, wk, wv, n);
            return;
        }
        GemvArgs a = gemv_args(x, wq, n);
        a.seg[0] = seg(wq, q), a.seg[1] = seg(wk, k), a.seg[2] = seg(wv, v);
        a.nseg = 3;
        gemv(a, fmt_of(wq), false, wq.rows + wk.rows + wv.rows);
    }

    void ffn_gate_up(float* h, float* up, const float* x, const Weight& w1, const Weight& w3, int n) override {
        if (n <= kGemvMaxTokens && same_layout(w1, w3) && w1.rows == w3.rows) {
            GemvArgs a = gemv_args(x, w1, n);
            a.seg[0] = seg(w1, h), a.seg[1] = seg(w3, up);
            a.nseg = 2;
            gemv(a, fmt_of(w1), true, w1.rows);
            return;
        }
        matmul(h, x, w1, n);
        matmul(up, x, w3, n);
        const size_t count = size_t(n) * w1.rows;
        silu_mul_kernel<<<grid_for(count, 256), 256, 0, stream_>>>(h, up, count);
        LAUNCH_CHECK("silu_mul_kernel");
    }

    void rmsnorm(float* out, const float* x, const float* weight, int n, int dim, float eps) override {
        if (n == 0) return;
        const int threads = dim >= 4096 ? 1024 : dim >= 1024 ? 512 : 128;
        rmsnorm_kernel<<<n, threads, 0, stream_>>>(out, x, weight, dim, eps);
        LAUNCH_CHECK("rmsnorm_kernel");
    }

    void rope_kv_write(float* q, float* k, const float* v, void* k_cache, void* v_cache, const float* cos_sin,
                       const int* slots, int n, int n_heads, int n_kv_heads, int head_dim) override {
        if (n == 0) return;
        rope_kv_write_kernel<__nv_bfloat16><<<n, 128, 0, stream_>>>(
            q, k, v, static_cast<__nv_bfloat16*>(k_cache), static_cast<__nv_bfloat16*>(v_cache), cos_sin, slots, n_heads,
            n_kv_heads, head_dim);
        LAUNCH_CHECK("rope_kv_write_kernel");
    }

    // Runs of tokens that share a block table (prefill chunks, verify runs) go to the tiled kernel
    // when the batch has any, tokens alone with their table (decode) to the flash-decoding kernel;
    // both write per-split partials that one combine finishes. Which kernels run depends on n, the
    // context length and the batch's has_runs / has_singles alone, never on the positions, so a
    // captured graph stays valid for any batch with the same ones.
    void attention(float* out, const float* q, const void* k_cache, const void* v_cache, const AttentionBatch& b,
                   int n) override {
        if (n == 0) return;
        if (n > 65535) throw Error(fmt("CUDA attention: %d tokens in one batch; at most 65535", n));
        const int group = b.n_heads / b.n_kv_heads;
        const int frags = tiled_frags(b.head_dim);
        const bool tiled = b.has_runs && frags > 0 && TileSmem(b.head_dim).bytes <= smem_optin_;
        const bool split_kernel = !tiled || b.has_singles;
        if (split_kernel && group * b.head_dim > kAttnThreads * kAttnMaxAcc)
            throw Error(fmt("CUDA attention: %d query heads per KV head x head_dim %d is more than %d", group, b.head_dim,
                            kAttnThreads * kAttnMaxAcc));
        // Splits: enough blocks for two per SM when one sequence is long, none past the context.
        // split_len is the tiled kernel's; the split kernel spreads each token's own length over
        // the splits (token_split_len), so a short context in a long-context model still fills them.
        const int row_tiles = (n * group + kTileRows - 1) / kTileRows;
        const int units = (tiled ? row_tiles : n) * b.n_kv_heads;
        const int max_splits = (b.max_len + 255) / 256;
        const int want = (2 * sms_ + units - 1) / units;
        const int splits = std::max(1, std::min(max_splits, want));
        const int split_len = ((b.max_len + splits - 1) / splits + kAttnChunk - 1) / kAttnChunk * kAttnChunk;
        const size_t heads = size_t(n) * b.n_heads;
        float* o_part = static_cast<float*>(workspace(attn_ws_, sizeof(float) * heads * splits * (b.head_dim + 2)));
        float* ml_part = o_part + heads * splits * b.head_dim;
        const auto* kc = static_cast<const __nv_bfloat16*>(k_cache);
        const auto* vc = static_cast<const __nv_bfloat16*>(v_cache);
        if (tiled) {
            const dim3 grid(row_tiles, b.n_kv_heads, splits);
            const size_t smem = TileSmem(b.head_dim).bytes;
            const int threads = kTileWarps * kWarp;
            if (frags == 4) attention_tiled_kernel<4><<<grid, threads, smem, stream_>>>(o_part, ml_part, q, kc, vc, b, n, splits, split_len);
            else if (frags == 8) attention_tiled_kernel<8><<<grid, threads, smem, stream_>>>(o_part, ml_part, q, kc, vc, b, n, splits, split_len);
            else attention_tiled_kernel<16><<<grid, threads, smem, stream_>>>(o_part, ml_part, q, kc, vc, b, n, splits, split_len);
            LAUNCH_CHECK("attention_tiled_kernel");
        }
        if (split_kernel) {
            const size_t smem = sizeof(float) * (size_t(group) * b.head_dim + size_t(group) * kAttnChunk + 3 * size_t(group)) +
                                sizeof(int) * kAttnChunk;
            if (smem > 64 * 1024) throw Error(fmt("CUDA attention: %zu bytes of shared memory needed", smem));
            attention_split_kernel<__nv_bfloat16><<<dim3(splits, b.n_kv_heads, n), kAttnThreads, smem, stream_>>>(
                o_part, ml_part, q, kc, vc, b, n, tiled, splits);
            LAUNCH_CHECK("attention_split_kernel");
        }
        attention_combine_kernel<<<dim3(b.n_heads, n), std::min(256, (b.head_dim + 31) / 32 * 32), 0, stream_>>>(
            out, o_part, ml_part, b, n, tiled, splits, split_len);
        LAUNCH_CHECK("attention_combine_kernel");
    }

    void add(float* x, const float* y, size_t n) override {
        if (n == 0) return;
        add_scaled_kernel<<<grid_for(n, 256), 256, 0, stream_>>>(x, y, 1.0f, n, true);
        LAUNCH_CHECK("add_scaled_kernel");
    }
    void add_scaled(float* x, const float* y, float a, size_t n) override {
        if (n == 0) return;
        add_scaled_kernel<<<grid_for(n, 256), 256, 0, stream_>>>(x, y, a, n, false);
        LAUNCH_CHECK("add_scaled_kernel");
    }

    void embed(float* out, const Weight& t, const int* tokens, int n) override {
        if (n == 0) return;
        const uint8_t* w = static_cast<const uint8_t*>(t.data);
        const size_t rb = row_bytes(t, t.stride);
        const int f = fmt_of(t);
        check_groups(t, f, "embed");
#define FASTGEN_EMBED(F) embed_kernel<F><<<n, 256, 0, stream_>>>(out, w, t.scales, t.zeros, t.mins, t.cols, rb, t.group, tokens)
        switch (f) {
            case kF32: FASTGEN_EMBED(kF32); break;
            case kBF16: FASTGEN_EMBED(kBF16); break;
            case kF16: FASTGEN_EMBED(kF16); break;
            case kI8: FASTGEN_EMBED(kI8); break;
            case kI8G: FASTGEN_EMBED(kI8G); break;
            case kI4: FASTGEN_EMBED(kI4); break;
            default: FASTGEN_EMBED(kI4M); break;
        }
#undef FASTGEN_EMBED
        LAUNCH_CHECK("embed_kernel");
    }

    // Routing and grouping on the device (moe_route_kernel); then up to kGraphTokens tokens
    // through the grouped GEMV kernels (no host sync: a captured step holds the whole layer), larger
    // batches (prefill) through cuBLAS per chosen expert over its gathered rows, which needs the
    // expert counts on the host. Both end in one weighted combine per token.
    void moe_ffn(float* out, const float* x, const float* router_logits, const FfnWeights* experts, int n_experts,
                 int k, int n) override {
        if (n == 0) return;
        if (n_experts > kMoeMaxExperts || k < 1 || k > n_experts)
            throw Error(fmt("CUDA mixture of experts: %d experts, %d per token; this backend takes 1 <= k <= experts <= %d",
                            n_experts, k, kMoeMaxExperts));
        const FfnWeights& X0 = experts[0];
        for (int e = 0; e < n_experts; e++) {
            const FfnWeights& X = experts[e];
            if (!same_layout(X.w1, X0.w1) || !same_layout(X.w3, X0.w1) || !same_layout(X.w2, X0.w2) ||
                X.w1.rows != X0.w1.rows || X.w3.rows != X0.w1.rows || X.w2.rows != X0.w2.rows)
                throw Error(fmt("CUDA mixture of experts: expert %d's weights differ in format or shape from expert 0's "
                                "(the grouped kernels take one layout)", e));
            check_groups(X.w1, fmt_of(X.w1), "mixture of experts");
            check_groups(X.w2, fmt_of(X.w2), "mixture of experts");
        }
        const int dim = X0.w2.rows, hidden = X0.w1.rows, pairs = n * k;
        // Workspace: the routing, then [pairs] rows of gathered x, gate, up and expert outputs.
        auto up256 = [](size_t b) { return (b + 255) / 256 * 256; };
        const size_t ints = up256(sizeof(int) * (3 * size_t(pairs) + 3 * size_t(n_experts) + 1)),
                     wts = up256(sizeof(float) * pairs), rows_d = up256(sizeof(float) * size_t(pairs) * dim),
                     rows_h = up256(sizeof(float) * size_t(pairs) * hidden);
        uint8_t* ws = static_cast<uint8_t*>(workspace(moe_ws_, ints + wts + 2 * rows_d + 2 * rows_h));
        MoeRouting rt;
        int* iw = reinterpret_cast<int*>(ws);
        rt.chosen = iw, rt.pair_of_row = iw + pairs, rt.row_of_pair = iw + 2 * pairs;
        rt.count = iw + 3 * pairs, rt.first = rt.count + n_experts, rt.active = rt.first + n_experts;
        rt.n_active = rt.active + n_experts;
        rt.weight = reinterpret_cast<float*>(ws + ints);
        float* xg = reinterpret_cast<float*>(ws + ints + wts);
        float* y = reinterpret_cast<float*>(ws + ints + wts + rows_d);
        float* h = reinterpret_cast<float*>(ws + ints + wts + 2 * rows_d);
        float* hu = reinterpret_cast<float*>(ws + ints + wts + 2 * rows_d + rows_h);
        moe_route_kernel<<<1, 256, 0, stream_>>>(rt, router_logits, n, n_experts, k);
        LAUNCH_CHECK("moe_route_kernel");

        if (n <= kGraphMaxTokens) {  // no host sync: it may be a captured step (ops.h)
            const int f = fmt_of(X0.w1), f2 = fmt_of(X0.w2);
            MoeGemvArgs a = moe_args(experts, n_experts, &FfnWeights::w1, &FfnWeights::w3, x, false, k, h, rt);
            moe_gemv(a, f, true, n, std::min(n_experts, pairs));
            MoeGemvArgs d = moe_args(experts, n_experts, &FfnWeights::w2, nullptr, h, true, k, y, rt);
            moe_gemv(d, f2, false, n, std::min(n_experts, pairs));
        } else {
            std::vector<int> count(static_cast<size_t>(n_experts)), first(static_cast<size_t>(n_experts));
            download(count.data(), rt.count, sizeof(int) * n_experts);
            download(first.data(), rt.first, sizeof(int) * n_experts);
            moe_gather_kernel<<<pairs, 256, 0, stream_>>>(xg, x, rt, k, dim);
            LAUNCH_CHECK("moe_gather_kernel");
            for (int e = 0; e < n_experts; e++) {
                const int m = count[size_t(e)];
                if (m == 0) continue;
                const size_t r0 = size_t(first[size_t(e)]);
                ffn_gate_up(h + r0 * hidden, hu + r0 * hidden, xg + r0 * dim, experts[e].w1, experts[e].w3, m);
                matmul(y + r0 * dim, h + r0 * hidden, experts[e].w2, m);
            }
        }
        moe_combine_kernel<<<n, 256, 0, stream_>>>(out, y, rt, k, dim);
        LAUNCH_CHECK("moe_combine_kernel");
    }

    void sample(int* tokens, const float* logits, int m, int vocab, const SamplingParams& p, const float* u) override {
        if (m == 0) return;
        float* work = static_cast<float*>(workspace(sample_ws_, sizeof(float) * (size_t(m) * vocab + m) + sizeof(int) * m));
        float* u_dev = work + size_t(m) * vocab;
        int* out = reinterpret_cast<int*>(u_dev + m);
        CUDA_CHECK(cudaMemcpyAsync(u_dev, u, sizeof(float) * m, cudaMemcpyHostToDevice, stream_));
        sample_kernel<<<m, kSampleThreads, 0, stream_>>>(out, logits, work, u_dev, vocab, p.temperature, p.top_k, p.top_p);
        LAUNCH_CHECK("sample_kernel");
        download(tokens, out, sizeof(int) * m);
    }

  private:
    static constexpr int kGemvMaxTokens = 8;
    static constexpr size_t kBlasWorkspace = 32u << 20, kStaging = 64u << 20;
    // Bytes of the dequantized bf16 slab of a quantized matrix in a batched product (gemm); the
    // emulated tests shrink it (FASTGEN_CUDA_DEQUANT_SLAB) so that their small matrices take several.
    size_t dequant_slab_ = size_t(64) << 20;
    int device_ = 0;
    int sms_ = 0;
    size_t smem_optin_ = 0;  // shared memory one block may use (cudaFuncAttributeMaxDynamicSharedMemorySize)
    // The tiled attention kernel's accumulator count for a head_dim (a multiple of 16, at most
    // 256); 0: the head_dim is not one it takes (the flash-decoding kernel does everything).
    static int tiled_frags(int head_dim) {
        if (head_dim % 16 != 0 || head_dim > 256) return 0;
        return head_dim <= 64 ? 4 : head_dim <= 128 ? 8 : 16;
    }
    cudaStream_t stream_ = nullptr;
    cublasHandle_t blas_ = nullptr;
    void* blas_ws_ = nullptr;
    void* staging_[2] = {nullptr, nullptr};
    cudaEvent_t staged_[2] = {nullptr, nullptr};

    // Workspaces grow and never shrink. A replaced one is kept, not freed: a captured graph may
    // still read it (the growth is bounded by doubling).
    struct Workspace {
        void* p = nullptr;
        size_t bytes = 0;
    };
    Workspace attn_ws_, conv_ws_, deq_ws_, sample_ws_, moe_ws_;
    std::vector<void*> retired_;
    void* workspace(Workspace& w, size_t bytes) {
        if (w.bytes >= bytes) return w.p;
        const size_t grown = std::max(bytes, 2 * w.bytes);
        void* p = device_malloc(grown);  // w stays as it was if this throws
        if (w.p) retired_.push_back(w.p);
        w.p = p, w.bytes = grown;
        return p;
    }

    static bool same_layout(const Weight& a, const Weight& b) {
        return fmt_of(a) == fmt_of(b) && a.cols == b.cols && a.stride == b.stride && a.group == b.group;
    }
    static Seg seg(const Weight& w, float* out) {
        return Seg{static_cast<const uint8_t*>(w.data), w.scales, w.zeros, w.mins, out, w.rows};
    }
    // The kernels index a grouped format's scales as [rows][cols / group] with a chunk inside one
    // group: a group of a multiple of 32 columns that divides cols, scales (and zero points or
    // minimums) present, the copy contiguous (upload_weights makes stride = cols).
    static void check_groups(const Weight& w, int f, const char* op) {
        if (!grouped(f)) return;
        if (w.group <= 0 || w.group % 32 != 0 || w.cols % w.group != 0 || w.stride != w.cols || !w.scales ||
            (f == kI4 && !w.zeros) || (f == kI4M && !w.mins))
            throw Error(fmt("CUDA %s: a grouped %s weight [%d x %d] with group %d, stride %d is not laid out as the "
                            "kernels need (group a multiple of 32 dividing the columns, contiguous, scales and zero "
                            "points or minimums present)",
                            op, dtype_name(w.dtype), w.rows, w.cols, w.group, w.stride));
    }
    GemvArgs gemv_args(const float* x, const Weight& w, int n) const {
        const int f = fmt_of(w);
        check_groups(w, f, "matmul");
        GemvArgs a{};
        a.cols = w.cols;
        a.group = w.group > 0 ? w.group : 1;
        a.row_bytes = row_bytes(w, w.stride);
        a.x = x;
        a.n = n;
        const int E = chunk_elems(f);
        a.vec = w.cols % E == 0 && a.row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 && w.cols % 4 == 0;
        return a;
    }
    template <int F>
    void gemv_typed(const GemvArgs& a, bool gate_up, int rows) {
        const int blocks = (rows + kGemvWarps - 1) / kGemvWarps;
        const int threads = kGemvWarps * kWarp;
        if (a.n == 1) {
            if (gate_up) gemv_kernel<F, 1, true><<<blocks, threads, 0, stream_>>>(a);
            else gemv_kernel<F, 1, false><<<blocks, threads, 0, stream_>>>(a);
        } else {
            if (gate_up) gemv_kernel<F, kGemvMaxTokens, true><<<blocks, threads, 0, stream_>>>(a);
            else gemv_kernel<F, kGemvMaxTokens, false><<<blocks, threads, 0, stream_>>>(a);
        }
        LAUNCH_CHECK("gemv_kernel");
    }
    void gemv(GemvArgs a, int f, bool gate_up, int rows) {
        if (a.n == 0 || rows == 0) return;
        for (int i = 0; i < a.nseg; i++) a.vec = a.vec && reinterpret_cast<uintptr_t>(a.seg[i].w) % 16 == 0;
        switch (f) {
            case kF32: gemv_typed<kF32>(a, gate_up, rows); break;
            case kBF16: gemv_typed<kBF16>(a, gate_up, rows); break;
            case kF16: gemv_typed<kF16>(a, gate_up, rows); break;
            case kI8: gemv_typed<kI8>(a, gate_up, rows); break;
            case kI8G: gemv_typed<kI8G>(a, gate_up, rows); break;
            case kI4: gemv_typed<kI4>(a, gate_up, rows); break;
            default: gemv_typed<kI4M>(a, gate_up, rows); break;
        }
    }

    // One matrix (mat, and mat2 for the gate/up pair) of every expert for the grouped kernels.
    MoeGemvArgs moe_args(const FfnWeights* experts, int n_experts, Weight FfnWeights::*mat, Weight FfnWeights::*mat2,
                         const float* x, bool x_sorted, int k, float* out, const MoeRouting& rt) const {
        MoeGemvArgs a{};
        bool aligned = true;  // every matrix starts on 16 bytes (upload_weights aligns each to 256)
        auto put = [&](ExpertMats& m, int e, const Weight& w) {
            m.w[e] = static_cast<const uint8_t*>(w.data), m.scales[e] = w.scales;
            m.zm[e] = w.zeros ? static_cast<const void*>(w.zeros) : static_cast<const void*>(w.mins);
            aligned = aligned && reinterpret_cast<uintptr_t>(w.data) % 16 == 0;
        };
        for (int e = 0; e < n_experts; e++) {
            put(a.m1, e, experts[e].*mat);
            if (mat2) put(a.m2, e, experts[e].*mat2);
        }
        const Weight& w0 = experts[0].*mat;
        const GemvArgs g = gemv_args(x, w0, 1);  // the shape and alignment checks of a plain GEMV
        a.rows = w0.rows, a.cols = g.cols, a.group = g.group, a.row_bytes = g.row_bytes;
        a.vec = aligned && g.vec;
        a.x = x, a.x_sorted = x_sorted, a.k = k, a.out = out, a.rt = rt;
        return a;
    }
    // Grid (row blocks, one per possibly active expert): depends on n alone. At n = 1 every expert
    // has one row (a token's k experts differ), so the one-token kernel.
    template <int F>
    void moe_gemv_typed(const MoeGemvArgs& a, bool gate_up, int n, int max_active) {
        const dim3 grid((a.rows + kGemvWarps - 1) / kGemvWarps, max_active);
        const int threads = kGemvWarps * kWarp;
        if (n == 1) {
            if (gate_up) moe_gemv_kernel<F, 1, true><<<grid, threads, 0, stream_>>>(a);
            else moe_gemv_kernel<F, 1, false><<<grid, threads, 0, stream_>>>(a);
        } else {
            if (gate_up) moe_gemv_kernel<F, kGemvMaxTokens, true><<<grid, threads, 0, stream_>>>(a);
            else moe_gemv_kernel<F, kGemvMaxTokens, false><<<grid, threads, 0, stream_>>>(a);
        }
        LAUNCH_CHECK("moe_gemv_kernel");
    }
    void moe_gemv(const MoeGemvArgs& a, int f, bool gate_up, int n, int max_active) {
        switch (f) {
            case kF32: moe_gemv_typed<kF32>(a, gate_up, n, max_active); break;
            case kBF16: moe_gemv_typed<kBF16>(a, gate_up, n, max_active); break;
            case kF16: moe_gemv_typed<kF16>(a, gate_up, n, max_active); break;
            case kI8: moe_gemv_typed<kI8>(a, gate_up, n, max_active); break;
            case kI8G: moe_gemv_typed<kI8G>(a, gate_up, n, max_active); break;
            case kI4: moe_gemv_typed<kI4>(a, gate_up, n, max_active); break;
            default: moe_gemv_typed<kI4M>(a, gate_up, n, max_active); break;
        }
    }

    // Prefill and large batches: out[n][rows] = x . W^T through cuBLAS, which sees W [rows][cols]
    // row-major as a column-major [cols][rows] matrix to transpose. x goes to bf16 (f16 for f16
    // weights); a quantized W is dequantized to bf16 first. f32 accumulation and output.
    void gemm(float* out, const float* x, const Weight& w, int n) {
        const float one = 1.0f, zero = 0.0f;
        const size_t nx = size_t(n) * w.cols;
        if (w.dtype == DType::F32) {
            CUBLAS_CHECK(cublasGemmEx(blas_, CUBLAS_OP_T, CUBLAS_OP_N, w.rows, n, w.cols, &one, w.data, CUDA_R_32F, w.stride,
                                      x, CUDA_R_32F, w.cols, &zero, out, CUDA_R_32F, w.rows, CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT));
            return;
        }
        const bool half = w.dtype == DType::F16;
        const cudaDataType type = half ? CUDA_R_16F : CUDA_R_16BF;
        void* xc = workspace(conv_ws_, 2 * nx);
        if (half) convert_kernel<__half><<<grid_for(nx, 256), 256, 0, stream_>>>(static_cast<__half*>(xc), x, nx);
        else convert_kernel<__nv_bfloat16><<<grid_for(nx, 256), 256, 0, stream_>>>(static_cast<__nv_bfloat16*>(xc), x, nx);
        LAUNCH_CHECK("convert_kernel");
        if (w.dtype != DType::I8 && w.dtype != DType::U8) {
            CUBLAS_CHECK(cublasGemmEx(blas_, CUBLAS_OP_T, CUBLAS_OP_N, w.rows, n, w.cols, &one, w.data, type, w.stride, xc,
                                      type, w.cols, &zero, out, CUDA_R_32F, w.rows, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
            return;
        }
        // Quantized: dequantized to bf16 a slab of rows at a time into one reused buffer of at most
        // dequant_slab_ bytes (a Llama 3 classifier at once would take 1 GB), each slab's rows of out
        // by cuBLAS.
        const int f = fmt_of(w);
        check_groups(w, f, "matmul");
        const size_t rb = row_bytes(w, w.stride);
        const int group = w.group > 0 ? w.group : 1;
        const size_t scales_per_row = grouped(f) ? size_t(w.cols / group) : 1;
        const int slab = int(std::max<size_t>(1, std::min<size_t>(w.rows, dequant_slab_ / (2 * size_t(w.cols)))));
        auto* d = static_cast<__nv_bfloat16*>(workspace(deq_ws_, 2 * size_t(slab) * w.cols));
        for (int r0 = 0; r0 < w.rows; r0 += slab) {
            const int m = std::min(slab, w.rows - r0);
            const size_t nw = size_t(m) * w.cols, s0 = size_t(r0) * scales_per_row;
            const uint8_t* q = static_cast<const uint8_t*>(w.data) + size_t(r0) * rb;
            const float* scales = w.scales + s0;
            const uint8_t* zeros = w.zeros ? w.zeros + s0 : nullptr;
            const float* mins = w.mins ? w.mins + s0 : nullptr;
#define FASTGEN_DEQUANTIZE(F) \
    dequantize_kernel<F><<<grid_for(nw, 256), 256, 0, stream_>>>(d, q, scales, zeros, mins, m, w.cols, rb, group)
            switch (f) {
                case kI8: FASTGEN_DEQUANTIZE(kI8); break;
                case kI8G: FASTGEN_DEQUANTIZE(kI8G); break;
                case kI4: FASTGEN_DEQUANTIZE(kI4); break;
                default: FASTGEN_DEQUANTIZE(kI4M); break;
            }
#undef FASTGEN_DEQUANTIZE
            LAUNCH_CHECK("dequantize_kernel");
            CUBLAS_CHECK(cublasGemmEx(blas_, CUBLAS_OP_T, CUBLAS_OP_N, m, n, w.cols, &one, d, type, w.cols, xc, type, w.cols,
                                      &zero, out + r0, CUDA_R_32F, w.rows, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        }
    }
};

}  // namespace

int cuda_device_count(std::string* why) {
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
        if (why) *why = cudaGetErrorString(err);
        return 0;
    }
    if (n == 0 && why) *why = "cudaGetDeviceCount found none";
    return n;
}

namespace {
// The process's CUDA backend once made. Never destroyed: Models and Buffers may outlive any
// static's destructor, and the driver frees the device's memory at exit anyway.
CudaOps*& the_cuda_ops() {
    static CudaOps* ops = nullptr;
    return ops;
}
}  // namespace

Ops* cuda_ops(int device) {
    CudaOps*& ops = the_cuda_ops();
    if (ops) {
        if (device != ops->device())
            throw Error(fmt("CUDA: the backend of this process is on device %d; it cannot also run on device %d "
                            "(one GPU per process)", ops->device(), device));
        return ops;
    }
    std::string why;
    const int n = cuda_device_count(&why);
    if (n == 0) throw Error(fmt("--device cuda: no CUDA device found (%s); use --device cpu", why.c_str()));
    if (device < 0 || device >= n)
        throw Error(fmt("CUDA device %d does not exist: this process sees %d device%s (0..%d; CUDA_VISIBLE_DEVICES "
                        "may hide others)", device, n, n == 1 ? "" : "s", n - 1));
    ops = new CudaOps(device);
    return ops;
}

CUstream_st* cuda_ops_stream() {
    CudaOps* ops = the_cuda_ops();
    if (!ops) throw Error("cuda_ops_stream: the CUDA backend is not made yet (call cuda_ops first)");
    return ops->stream();
}
