// kernels_cpu.cpp: the CPU backend of the op table: OpenMP threads, AVX-512 where the build
// targets it (a portable scalar path otherwise). Also the reference twin for the CUDA kernels.
#include <omp.h>

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstring>
#include <vector>

#include "ops.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined_* placeholders
// (GCC bug 105593); the warning is about the header, not this code.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define FASTGEN_AVX512 1
#endif

namespace {

// ---------------------------------------------------------------------------------------------
// matmul: out[n][rows] = x[n][cols] . W[rows][cols]^T, W in f32/bf16/f16, f32 accumulation.
//
// Decode (n = 1) is a matrix-vector product bound by memory bandwidth: threads take contiguous
// row ranges, and each step streams 4 weight rows so enough loads are in flight. Prefill (n > 1)
// tiles 4 tokens x 4 rows in registers: each weight vector loaded (and converted) once feeds 4
// FMAs, and a block of rows is reused from cache across all token tiles, so weights come from
// memory once per matmul rather than once per token.

#ifdef FASTGEN_AVX512
constexpr int kLanes = 16;

// 16 weights from row `w` at column k, converted to f32. Masked loads are only for the column
// tail: in the main loop they cost far more than plain loads on this CPU (measured: 1.5-2x decode).
template <DType T, bool kMasked>
inline __m512 load_w(const void* w, size_t k, __mmask16 m) {
    if constexpr (T == DType::F32) {
        const float* p = static_cast<const float*>(w) + k;
        return kMasked ? _mm512_maskz_loadu_ps(m, p) : _mm512_loadu_ps(p);
    } else {
        const uint16_t* p = static_cast<const uint16_t*>(w) + k;
        __m256i h = kMasked ? _mm256_maskz_loadu_epi16(m, p) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        if constexpr (T == DType::BF16)
            return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        else
            return _mm512_cvtph_ps(h);
    }
}

// One 16-column step of an NT x NR tile: each weight vector feeds NT FMAs.
template <DType T, int NT, int NR, bool kMasked>
inline void tile_step(__m512 (&acc)[NT][NR], const float* x, size_t x_stride, const uint8_t* w, size_t w_stride,
                      int k, __mmask16 m) {
    __m512 wv[NR];
    for (int r = 0; r < NR; r++) wv[r] = load_w<T, kMasked>(w + r * w_stride, size_t(k), m);
    for (int t = 0; t < NT; t++) {
        const float* xp = x + t * x_stride + k;
        __m512 xv = kMasked ? _mm512_maskz_loadu_ps(m, xp) : _mm512_loadu_ps(xp);
        for (int r = 0; r < NR; r++) acc[t][r] = _mm512_fmadd_ps(xv, wv[r], acc[t][r]);
    }
}

// bf16 without shuffles: one 64-byte load holds 32 weights; within each 32-bit lane the low half
// is an even column and the high half the next odd one, so a shift gives the 16 even columns as
// f32 and a mask the 16 odd ones. x comes pre-split to match (split_pairs): per 32-column block,
// its 16 even columns, then its 16 odd ones. Widening with vpmovzxwd instead costs a shuffle per
// 16 weights, which made bf16 decode compute-bound (measured 36 vs 42 GB/s for f32).
template <int NT, int NR>
inline void tile_step_bf16_pairs(__m512 (&acc)[NT][NR], const float* x, size_t x_stride, const uint8_t* w,
                                 size_t w_stride, int k) {
    const __m512i high = _mm512_set1_epi32(int(0xffff0000u));
    __m512 even[NR], odd[NR];
    for (int r = 0; r < NR; r++) {
        __m512i v = _mm512_loadu_si512(w + r * w_stride + size_t(k) * 2);
        even[r] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        odd[r] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
    }
    for (int t = 0; t < NT; t++) {
        __m512 xe = _mm512_loadu_ps(x + t * x_stride + k), xo = _mm512_loadu_ps(x + t * x_stride + k + 16);
        for (int r = 0; r < NR; r++) acc[t][r] = _mm512_fmadd_ps(xo, odd[r], _mm512_fmadd_ps(xe, even[r], acc[t][r]));
    }
}

constexpr bool kSplitPairs = true;  // bf16 matmuls read x in split_pairs layout

// NT tokens x NR rows of dot products over all columns; results to out[t][row r].
template <DType T, int NT, int NR>
inline void tile(float* out, size_t out_stride, const float* x, size_t x_stride, const uint8_t* w,
                 size_t w_stride, int cols) {
    __m512 acc[NT][NR];
    for (int t = 0; t < NT; t++)
        for (int r = 0; r < NR; r++) acc[t][r] = _mm512_setzero_ps();
    int k = 0;
    if constexpr (T == DType::BF16)
        for (; k + 2 * kLanes <= cols; k += 2 * kLanes) tile_step_bf16_pairs<NT, NR>(acc, x, x_stride, w, w_stride, k);
    for (; k + kLanes <= cols; k += kLanes) tile_step<T, NT, NR, false>(acc, x, x_stride, w, w_stride, k, 0);
    if (k < cols) tile_step<T, NT, NR, true>(acc, x, x_stride, w, w_stride, k, __mmask16((1u << (cols - k)) - 1));
    for (int t = 0; t < NT; t++)
        for (int r = 0; r < NR; r++) out[t * out_stride + r] = _mm512_reduce_add_ps(acc[t][r]);
}
#else
// Portable path: same tiling, scalar conversion; the compiler vectorises what it can.
constexpr bool kSplitPairs = false;

template <DType T>
inline float load_w1(const void* w, size_t k) {
    if constexpr (T == DType::F32) return static_cast<const float*>(w)[k];
    else if constexpr (T == DType::BF16) return bf16_to_f32(static_cast<const uint16_t*>(w)[k]);
    else return f16_to_f32(static_cast<const uint16_t*>(w)[k]);
}

template <DType T, int NT, int NR>
inline void tile(float* out, size_t out_stride, const float* x, size_t x_stride, const uint8_t* w,
                 size_t w_stride, int cols) {
    float acc[NT][NR] = {};
    for (int k = 0; k < cols; k++) {
        for (int r = 0; r < NR; r++) {
            float wv = load_w1<T>(w + r * w_stride, size_t(k));
            for (int t = 0; t < NT; t++) acc[t][r] += x[t * x_stride + k] * wv;
        }
    }
    for (int t = 0; t < NT; t++)
        for (int r = 0; r < NR; r++) out[t * out_stride + r] = acc[t][r];
}
#endif

// x[n][cols] rearranged for tile_step_bf16_pairs: each full 32-column block becomes its even
// columns then its odd ones; the columns after the last full block stay in place.
void split_pairs(const float* x, int n, int cols, std::vector<float>& out) {
    out.resize(size_t(n) * cols);
    for (int t = 0; t < n; t++) {
        const float* xt = x + size_t(t) * cols;
        float* ot = out.data() + size_t(t) * cols;
        int k = 0;
        for (; k + 32 <= cols; k += 32)
            for (int i = 0; i < 16; i++) {
                ot[k + i] = xt[k + 2 * i];
                ot[k + 16 + i] = xt[k + 2 * i + 1];
            }
        for (; k < cols; k++) ot[k] = xt[k];
    }
}

// sum a[i] * b[i]; explicit lanes because the compiler may not reorder a float reduction.
inline float dot(const float* a, const float* b, int n) {
#ifdef FASTGEN_AVX512
    __m512 acc = _mm512_setzero_ps();
    int i = 0;
    for (; i + kLanes <= n; i += kLanes) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    if (i < n) {
        __mmask16 m = __mmask16((1u << (n - i)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
#else
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
#endif
}

// Rows [r0, r1) for tokens [t0, t1): full 4x4 tiles, then the token and row tails.
template <DType T, int NT>
inline void rows_for_tokens(float* out, const float* x, const Weight& W, int t0, int r0, int r1) {
    const size_t ws = size_t(W.stride) * dtype_size(T);
    const uint8_t* base = static_cast<const uint8_t*>(W.data);
    int r = r0;
    for (; r + 4 <= r1; r += 4)
        tile<T, NT, 4>(out + size_t(t0) * W.rows + r, W.rows, x + size_t(t0) * W.cols, W.cols, base + r * ws, ws, W.cols);
    for (; r < r1; r++)
        tile<T, NT, 1>(out + size_t(t0) * W.rows + r, W.rows, x + size_t(t0) * W.cols, W.cols, base + r * ws, ws, W.cols);
}

template <DType T>
void matmul_typed(float* out, const float* x, const Weight& W, int n) {
    // Row blocks small enough that a block of weights stays in L2 while every token tile uses it.
    const size_t row_bytes = size_t(W.cols) * dtype_size(T);
    const int block = n == 1 ? 64 : std::max<int>(4, int((256 * 1024) / row_bytes) / 4 * 4);
    const int n_blocks = (W.rows + block - 1) / block;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < n_blocks; b++) {
        int r0 = b * block, r1 = std::min(W.rows, r0 + block);
        int t = 0;
        for (; t + 4 <= n; t += 4) rows_for_tokens<T, 4>(out, x, W, t, r0, r1);
        switch (n - t) {
            case 3: rows_for_tokens<T, 3>(out, x, W, t, r0, r1); break;
            case 2: rows_for_tokens<T, 2>(out, x, W, t, r0, r1); break;
            case 1: rows_for_tokens<T, 1>(out, x, W, t, r0, r1); break;
            default: break;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// the op table

struct CpuOps final : Ops {
    void matmul(float* out, const float* x, const Weight& w, int n) override {
        switch (w.dtype) {
            case DType::F32: matmul_typed<DType::F32>(out, x, w, n); break;
            case DType::BF16:
                if (kSplitPairs) {
                    split_pairs(x, n, w.cols, x_split_);
                    x = x_split_.data();
                }
                matmul_typed<DType::BF16>(out, x, w, n);
                break;
            case DType::F16: matmul_typed<DType::F16>(out, x, w, n); break;
            default: assert(false && "matmul: unsupported weight dtype");
        }
    }

    void rmsnorm(float* out, const float* x, const float* weight, int n, int dim, float eps) override {
#pragma omp parallel for schedule(static) if (n > 1)
        for (int t = 0; t < n; t++) {
            const float* xt = x + size_t(t) * dim;
            float* ot = out + size_t(t) * dim;
            float ss = 0.0f;
            for (int i = 0; i < dim; i++) ss += xt[i] * xt[i];
            float scale = 1.0f / std::sqrt(ss / float(dim) + eps);
            for (int i = 0; i < dim; i++) ot[i] = xt[i] * scale * weight[i];
        }
    }

    void rope(float* x, const int* positions, int n, int n_heads, int head_dim, float theta) override {
#pragma omp parallel for schedule(static) if (n > 1)
        for (int t = 0; t < n; t++) {
            float* xt = x + size_t(t) * n_heads * head_dim;
            for (int i = 0; i < head_dim / 2; i++) {
                // angle in double: positions times small frequencies lose digits in f32
                double freq = std::pow(double(theta), -2.0 * i / head_dim);
                double angle = positions[t] * freq;
                float c = float(std::cos(angle)), s = float(std::sin(angle));
                for (int h = 0; h < n_heads; h++) {
                    float* p = xt + h * head_dim + 2 * i;
                    float a = p[0], b = p[1];
                    p[0] = a * c - b * s;
                    p[1] = a * s + b * c;
                }
            }
        }
    }

    void kv_write(float* k_cache, float* v_cache, const float* k, const float* v, const int* slots, int n,
                  int kv_dim) override {
        for (int t = 0; t < n; t++) {
            std::memcpy(k_cache + size_t(slots[t]) * kv_dim, k + size_t(t) * kv_dim, sizeof(float) * kv_dim);
            std::memcpy(v_cache + size_t(slots[t]) * kv_dim, v + size_t(t) * kv_dim, sizeof(float) * kv_dim);
        }
    }

    // One (token, query head) pair per iteration: scores over positions 0..pos read through the
    // block table, a max-subtracted softmax, then the weighted sum of values.
    void attention(float* out, const float* q, const float* k_cache, const float* v_cache, const AttentionBatch& b,
                   int n) override {
        const int hd = b.head_dim, kv_dim = b.n_kv_heads * hd, group = b.n_heads / b.n_kv_heads;
        const float scale = 1.0f / std::sqrt(float(hd));
#pragma omp parallel
        {
            std::vector<float> scores;
#pragma omp for schedule(dynamic) collapse(2)
            for (int t = 0; t < n; t++) {
                for (int h = 0; h < b.n_heads; h++) {
                    const int len = b.positions[t] + 1, kvh = h / group;
                    const int* table = b.block_tables[t];
                    const float* qh = q + (size_t(t) * b.n_heads + h) * hd;
                    if (scores.size() < size_t(len)) scores.resize(size_t(len));
                    float mx = -INFINITY;
                    for (int p = 0; p < len; p++) {
                        size_t slot = size_t(table[p / b.block_size]) * b.block_size + p % b.block_size;
                        const float* kp = k_cache + slot * kv_dim + kvh * hd;
                        scores[p] = dot(qh, kp, hd) * scale;
                        mx = std::max(mx, scores[p]);
                    }
                    float sum = 0.0f;
                    for (int p = 0; p < len; p++) {
                        scores[p] = std::exp(scores[p] - mx);
                        sum += scores[p];
                    }
                    float* oh = out + (size_t(t) * b.n_heads + h) * hd;
                    std::fill(oh, oh + hd, 0.0f);
                    for (int p = 0; p < len; p++) {
                        size_t slot = size_t(table[p / b.block_size]) * b.block_size + p % b.block_size;
                        const float* vp = v_cache + slot * kv_dim + kvh * hd;
                        float a = scores[p] / sum;
                        for (int i = 0; i < hd; i++) oh[i] += a * vp[i];
                    }
                }
            }
        }
    }

    void silu_mul(float* gate, const float* up, size_t n) override {
#pragma omp parallel for schedule(static) if (n > 65536)
        for (size_t i = 0; i < n; i++) {
            float g = gate[i];
            gate[i] = g / (1.0f + std::exp(-g)) * up[i];
        }
    }

    std::vector<float> x_split_;  // scratch: x in split_pairs layout for bf16 weights

    void add(float* x, const float* y, size_t n) override {
        for (size_t i = 0; i < n; i++) x[i] += y[i];
    }

    void embed(float* out, const Weight& table, const int* tokens, int n) override {
        const size_t row = size_t(table.stride) * dtype_size(table.dtype);
        for (int t = 0; t < n; t++)
            convert_floats(static_cast<const uint8_t*>(table.data) + size_t(tokens[t]) * row, table.dtype,
                           out + size_t(t) * table.cols, DType::F32, size_t(table.cols));
    }
};

}  // namespace

Ops* cpu_ops(int threads) {
    if (threads > 0) omp_set_num_threads(threads);
    static CpuOps ops;
    return &ops;
}
