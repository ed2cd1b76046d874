// ops.h: the op table both backends implement. The forward pass in model.cpp is written once
// over it; kernels_cpu.cpp implements it (and is the reference twin for kernels.cu).
#pragma once
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <string>
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

// Weight-only quantization (quantize_rows.cpp; the converter and the tests use the same code). The
// weights must be finite (the converter refuses NaN and infinity first): a NaN has no level.
// int8, one row: q[i] = round(w[i] / s), s = max|w| / 127 (1 when the row is all zeros).
float quantize_row_int8(const float* w, int n, int8_t* q);
// int4, one row of n columns (a multiple of group): per group s = (max - min) / 15,
// zero = round(-min / s) clamped to 0..15, q = clamp(round(w / s) + zero, 0, 15); packs two q per
// byte into packed[n/2] (low nibble = even column) and writes scales/zeros[n/group].
void quantize_row_int4(const float* w, int n, int group, uint8_t* packed, float* scales, uint8_t* zeros);
// int4 with float minimums (quantize --mode int4), one row: per group w ~ q * scales[g] + mins[g],
// q in 0..15, (scale, min) chosen by a search minimising the group's squared error (never worse than
// min-max, with or without zero points); packed as above, scales/mins[n/group]; group <= 256.
void quantize_row_int4_min(const float* w, int n, int group, uint8_t* packed, float* scales, float* mins);
// The CPU's int8/int4 matmuls multiply by x rounded to 15-bit integers per 32-column block
// (integer dot products): per block d = max|x| / 16256 and v = round(x * (16256 / max|x|)) in f32,
// ties to even (all zero for a zero block). v[round_up(cols, 32)] (zero-padded), d[blocks].
// scripts/reference.py --int16-activations rounds the same way.
void quantize_activations(const float* x, int cols, int16_t* v, float* d);
// Row r of any Weight as f32 (cols values): the dequantize reference for tests and embeddings.
void dequantize_row(const Weight& w, int r, float* out);

// One SwiGLU feed-forward network (a dense layer's, or one expert of a mixture):
// out = (silu(x . w1^T) * (x . w3^T)) . w2^T; w1, w3 [hidden][dim], w2 [dim][hidden].
struct FfnWeights {
    Weight w1, w2, w3;
};

// The Mixtral router for one token, as HF's MixtralSparseMoeBlock: softmax over all n expert
// logits (double), the top k (ties: the lower expert index wins), weights renormalised over those k.
// Writes chosen[k] (by descending weight) and weights[k]. (kernels_cpu.cpp; the CUDA router
// kernel does the same arithmetic.)
void moe_route(const float* logits, int n, int k, int* chosen, float* weights);

// What attention needs to find a token's keys and values in the paged cache. Every array is in
// the backend's memory (ops.h's Buffer): the CUDA kernels read them on the device, so a captured
// decode step replays with new positions without being captured again.
struct AttentionBatch {
    const int* positions;      // [n] position of each token (it attends to 0..pos)
    const int* block_tables;   // the batch's block tables, one after another
    const int* table_offsets;  // [n] where each token's table starts in block_tables
    int block_size;
    int n_heads, n_kv_heads, head_dim;
    int max_len;               // no token attends to more than this many positions (launch sizes)
    // What the batch holds, for the backend's choice of kernels (the host knows it; the arrays above
    // may be in device memory). A "run": adjacent entries with the same table offset (a prefill
    // chunk, a verify run). The defaults are always safe; has_singles = false only when exact.
    bool has_runs = false;     // some entry shares its table offset with a neighbouring entry
    bool has_singles = true;   // some entry shares it with neither neighbour (a decode token)
};

struct SamplingParams;

// The largest batch model.cpp captures as a CUDA graph (a decode step of up to this many entries):
// a backend with graphs() runs every op of such a batch without a host sync.
constexpr int kGraphMaxTokens = 64;

// The op table. Pointers to activations, the KV cache and weights are in the backend's memory:
// host memory on the CPU (weights are views into the mapped file), device memory on CUDA.
// Activations are f32 on both backends (at batch 1 they are a tiny share of the bytes moved);
// the KV cache is kv_dtype(): f32 on the CPU, bf16 on CUDA.
struct Ops {
    virtual ~Ops() = default;
    virtual const char* name() const = 0;  // "cpu", "cuda"

    // ---- memory
    // True when the backend's pointers are host pointers (no uploads needed: the CPU).
    virtual bool host_memory() const { return true; }
    // Zero-filled; throws Error naming the size when memory runs out.
    virtual void* alloc(size_t bytes) = 0;
    virtual void free(void* p) = 0;  // never throws (it runs in destructors)
    virtual void upload(void* dst, const void* src, size_t bytes) = 0;    // host -> backend
    virtual void download(void* dst, const void* src, size_t bytes) = 0;  // backend -> host, after the ops before it
    virtual void copy(void* dst, const void* src, size_t bytes) = 0;      // backend -> backend
    virtual void zero(void* p, size_t bytes) = 0;
    virtual DType kv_dtype() const { return DType::F32; }
    // Bytes the backend could still allocate (for sizing the KV cache); 0 when there is no such limit.
    virtual size_t free_memory() const { return 0; }

    // ---- the decode step as a graph (CUDA graphs: launch gaps vanish); the CPU has none.
    // Ops issued between capture_begin and capture_end are recorded, not run; graph_launch runs them.
    virtual bool graphs() const { return false; }
    virtual void capture_begin() {}
    virtual void* capture_end() { return nullptr; }
    virtual void graph_launch(void*) {}
    virtual void graph_destroy(void*) {}

    // ---- compute
    // out[n][w.rows] = x[n][w.cols] . w^T
    virtual void matmul(float* out, const float* x, const Weight& w, int n) = 0;
    // The attention projections of one input: q = x . wq^T, k = x . wk^T, v = x . wv^T (CUDA: one
    // launch for all three at small n).
    virtual void matmul_qkv(float* q, float* k, float* v, const float* x, const Weight& wq, const Weight& wk,
                            const Weight& wv, int n) {
        matmul(q, x, wq, n);
        matmul(k, x, wk, n);
        matmul(v, x, wv, n);
    }
    // SwiGLU's first half: h[n][w1.rows] = silu(x . w1^T) * (x . w3^T); up [n][w3.rows] is scratch.
    virtual void ffn_gate_up(float* h, float* up, const float* x, const Weight& w1, const Weight& w3, int n) = 0;
    // out[n][dim] = x / rms(x) * weight
    virtual void rmsnorm(float* out, const float* x, const float* weight, int n, int dim,
                         float eps) = 0;
    // RoPE on q [n][n_heads][head_dim] and k [n][n_kv_heads][head_dim] in place, rotating adjacent
    // pairs (2i, 2i+1) of each head of token t by the angle whose cosine and sine are
    // cos_sin[t][i][0..1] (model.cpp builds the table once per forward: every layer and both q and
    // k use the same angles); then k and v rows [n][kv_dim] go to the cache slots of kv_dtype()
    // (slot = block * block_size + offset). Backends with graphs() write nothing for a slot < 0
    // (the padding of a captured batch, model.cpp); others are never given one.
    virtual void rope_kv_write(float* q, float* k, const float* v, void* k_cache, void* v_cache,
                               const float* cos_sin, const int* slots, int n, int n_heads, int n_kv_heads,
                               int head_dim) = 0;
    // out[n][n_heads*head_dim]: causal softmax attention of q over the cached keys/values.
    virtual void attention(float* out, const float* q, const void* k_cache, const void* v_cache,
                           const AttentionBatch& b, int n) = 0;
    // x[i] += y[i]
    virtual void add(float* x, const float* y, size_t n) = 0;
    // x[i] += a * y[i] (a mixture of experts' weighted sum)
    virtual void add_scaled(float* x, const float* y, float a, size_t n) = 0;
    // out[n][w.cols] = rows tokens[i] of the table
    virtual void embed(float* out, const Weight& table, const int* tokens, int n) = 0;
    // A mixture of experts: each token t of n goes where moe_route sends it by router_logits[t]
    // [n_experts], and out[t][dim] = sum over its k choices j, in moe_route's order, of
    // weight_j * FFN_{expert_j}(x[t]) (experts[n_experts], all in one layout). Experts no token chose
    // are never read (at batch 1, k experts' weights are). A backend with graphs() routes on the
    // device, so a captured step (n <= kGraphMaxTokens) holds its MoE layers too.
    virtual void moe_ffn(float* out, const float* x, const float* router_logits, const FfnWeights* experts,
                         int n_experts, int k, int n) = 0;
    // Sampling where the logits are (CUDA; the CPU samples on the host with Sampler, the twin):
    // tokens[r] (host) for each of m rows of logits [m][vocab], as Sampler::sample draws them with
    // uniform draws u[r] (host): argmax at temperature 0 (the first maximum), else softmax at
    // temperature, top-k (ties to the lower id), top-p, and the token where u[r] falls in the kept
    // mass in id order.
    virtual bool can_sample() const { return false; }
    virtual void sample(int* tokens, const float* logits, int m, int vocab, const SamplingParams& p, const float* u) {
        (void)tokens, (void)logits, (void)m, (void)vocab, (void)p, (void)u;
        assert(false && "Ops::sample: this backend samples on the host");
    }
};

// Memory of a backend (device memory on CUDA, host memory on the CPU), owned: freed on
// destruction. Move-only.
class Buffer {
  public:
    Buffer() = default;
    Buffer(Ops* ops, size_t bytes) : ops_(ops), p_(bytes ? ops->alloc(bytes) : nullptr), bytes_(bytes) {}
    ~Buffer() { reset(); }
    Buffer(Buffer&& o) noexcept : ops_(o.ops_), p_(o.p_), bytes_(o.bytes_) { o.p_ = nullptr, o.bytes_ = 0; }
    Buffer& operator=(Buffer&& o) noexcept {
        if (this != &o) {
            reset();
            ops_ = o.ops_, p_ = o.p_, bytes_ = o.bytes_;
            o.p_ = nullptr, o.bytes_ = 0;
        }
        return *this;
    }
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    void reset() {
        if (p_) ops_->free(p_);
        p_ = nullptr, bytes_ = 0;
    }
    void* data() const { return p_; }
    float* f32() const { return static_cast<float*>(p_); }
    size_t bytes() const { return bytes_; }

  private:
    Ops* ops_ = nullptr;
    void* p_ = nullptr;
    size_t bytes_ = 0;
};

// The CPU backend (kernels_cpu.cpp). threads <= 0: OpenMP's default.
Ops* cpu_ops(int threads);

// The CPU backend's SIMD target (Highway's, lower case: "avx3_dl" = AVX-512 with VNNI, "avx3" =
// AVX-512, "avx2", "sse4", "neon"): the one its kernels run, chosen at start for this CPU.
std::string cpu_simd_target();
// The targets this build compiled that this CPU runs, best first.
std::vector<std::string> cpu_simd_targets();
// Runs the kernels on `name` from now on ("auto" or "": the best again); false with the reason in
// *why when this build or CPU cannot run it. (Kernels' results depend on the target: call it
// before work, not between the steps of one.)
bool cpu_set_simd_target(const std::string& name, std::string* why);

// The CUDA backend (kernels.cu), one per process, on `device` (a tensor-parallel rank's own GPU,
// tp.h rank_device); throws Error saying why when this build has no CUDA, the device does not
// exist, or the backend is already on another device.
Ops* cuda_ops(int device = 0);
#ifdef FASTGEN_CUDA
// The stream every op of the CUDA backend runs on (cuda_ops() first), so that other work on the
// GPU is ordered with the ops: tp.cpp's NCCL all-reduces run on it, after the kernels that wrote
// their input and before those that read the sum, with no host synchronisation. CUstream_st* is
// cudaStream_t, named without including cuda_runtime.h in every file that includes ops.h; CUDA
// builds only, so a CPU-only build cannot call it.
struct CUstream_st;
CUstream_st* cuda_ops_stream();
#endif
// Number of usable CUDA devices; 0 with the reason in *why when none (also in a CPU-only build).
int cuda_device_count(std::string* why);
