// ops.h: the op table both backends implement. The forward pass in model.cpp is written once
// over it; kernels_cpu.cpp implements it (and is the reference twin for kernels.cu).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "safetensors.h"

// A 2-D weight matrix [rows][cols], row-major, in one of the float formats. Row r starts
// stride elements after row r-1: stride > cols for a column slice of a wider matrix (a tensor
// parallel rank's share of wo and w2), viewed in place in the mapped file.
struct Weight {
    DType dtype = DType::F32;
    const void* data = nullptr;
    int rows = 0;
    int cols = 0;
    int stride = 0;
    size_t bytes() const { return size_t(rows) * cols * dtype_size(dtype); }  // bytes a matmul reads
};

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
    // Rotate adjacent pairs (2i, 2i+1) of each head by pos * theta^(-2i/head_dim), in place.
    virtual void rope(float* x, const int* positions, int n, int n_heads, int head_dim,
                      float theta) = 0;
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
