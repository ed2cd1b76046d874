// ops.h: the op table both backends implement. The forward pass in model.cpp is written once
// over it; kernels_cpu.cpp implements it (and is the reference twin for kernels.cu).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "safetensors.h"

// A 2-D weight matrix [rows][cols], row-major, in a float format or weight-only quantized. Row r
// starts stride elements (logical columns) after row r-1: stride > cols for a column slice of a
// wider matrix (a tensor parallel rank's share of wo and w2), viewed in place in the mapped file.
//   F32 / BF16 / F16: data holds the values.
//   I8  (int8): data holds int8 q [rows][stride]. group 0: w = q * scales[r] (one scale per row,
//        scales [rows]). group > 0 (GGUF Q8_0 is group 32): w = q * scales[r][c / group], scales
//        [rows][stride/group].
//   U8  (int4): data holds [rows][stride/2] bytes, two 4-bit q per byte (low nibble = even column);
//        per group of `group` columns a scale and either a zero point, w = (q - zeros[g]) * scales[g]
//        (zeros u8 0..15), or a float minimum, w = q * scales[g] + mins[g] (GGUF Q4_1); scales,
//        zeros and mins are [rows][stride/group].
// Grouped formats: the group is a multiple of 32 dividing cols; column slices start and end on
// group boundaries.
struct Weight {
    DType dtype = DType::F32;
    const void* data = nullptr;
    int rows = 0;
    int cols = 0;
    int stride = 0;
    const float* scales = nullptr;   // I8: [rows] or [rows][stride/group]; U8: [rows][stride/group]
                                     // (pointing at this view's first row and first group)
    const uint8_t* zeros = nullptr;  // U8 with zero points: [rows][stride/group]; else null
    const float* mins = nullptr;     // U8 with minimums: [rows][stride/group]; else null
    int group = 0;                   // I8: 0 (per row) or columns per group; U8: columns per group
    // bytes a matmul reads (values, scales, zero points or minimums)
    size_t bytes() const {
        const size_t n = size_t(rows) * cols;
        const size_t groups = group > 0 ? n / size_t(group) : size_t(rows);
        if (dtype == DType::I8) return n + groups * sizeof(float);
        if (dtype == DType::U8) return n / 2 + groups * (sizeof(float) + (mins ? sizeof(float) : 1));
        return n * dtype_size(dtype);
    }
};

// Weight-only quantization (kernels_cpu.cpp; the converter and the tests use the same code).
// int8, one row: q[i] = round(w[i] / s), s = max|w| / 127 (1 when the row is all zeros).
float quantize_row_int8(const float* w, int n, int8_t* q);
// int4, one row of n columns (a multiple of group): per group s = (max - min) / 15,
// zero = round(-min / s) clamped to 0..15, q = clamp(round(w / s) + zero, 0, 15); packs two q per
// byte into packed[n/2] (low nibble = even column) and writes scales/zeros[n/group].
void quantize_row_int4(const float* w, int n, int group, uint8_t* packed, float* scales, uint8_t* zeros);
// Row r of any Weight as f32 (cols values): the dequantize reference for tests and embeddings.
void dequantize_row(const Weight& w, int r, float* out);

// What attention needs to find a token's keys and values in the paged cache.
struct AttentionBatch {
    const int* positions;               // [n] position of each token (it attends to 0..pos)
    const int* const* block_tables;     // [n] block table of each token's sequence
    int block_size;
    int n_heads, n_kv_heads, head_dim;
};

struct Ops {
    virtual ~Ops() = default;
    // out[n][w.rows] = x[n][w.cols] . w^T
    virtual void matmul(float* out, const float* x, const Weight& w, int n) = 0;
    // out[n][dim] = x / rms(x) * weight
    virtual void rmsnorm(float* out, const float* x, const float* weight, int n, int dim,
                         float eps) = 0;
    // Rotate adjacent pairs (2i, 2i+1) of each head of token t, in place, by the angle whose cosine
    // and sine are cos_sin[t][i][0..1] (model.cpp builds the table once per forward: every layer
    // and both q and k use the same angles).
    virtual void rope(float* x, const float* cos_sin, int n, int n_heads, int head_dim) = 0;
    // Write k/v rows [n][kv_dim] to cache slots (slot = block * block_size + offset).
    virtual void kv_write(float* k_cache, float* v_cache, const float* k, const float* v,
                          const int* slots, int n, int kv_dim) = 0;
    // out[n][n_heads*head_dim]: causal softmax attention of q over the cached keys/values.
    virtual void attention(float* out, const float* q, const float* k_cache,
                           const float* v_cache, const AttentionBatch& b, int n) = 0;
    // gate[i] = silu(gate[i]) * up[i]
    virtual void silu_mul(float* gate, const float* up, size_t n) = 0;
    // x[i] += y[i]
    virtual void add(float* x, const float* y, size_t n) = 0;
    // out[n][w.cols] = rows tokens[i] of the table
    virtual void embed(float* out, const Weight& table, const int* tokens, int n) = 0;
};

// The CPU backend (kernels_cpu.cpp). threads <= 0: OpenMP's default.
Ops* cpu_ops(int threads);

#ifdef FASTGEN_CUDA
#include <string>
// Number of usable CUDA devices; 0 with the reason in *why when none (kernels.cu).
int cuda_device_count(std::string* why);
#endif
