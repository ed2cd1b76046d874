// tests/test_gpu.cpp: suite "gpu": every CUDA op against its CPU twin (kernels_cpu.cpp) on fresh
// random inputs, odd sizes included, with per-format tolerances (f32, bf16, f16, int8 per row,
// grouped int8 = GGUF Q8_0, int4 with zero points, int4 with minimums = GGUF Q4_1); attention over
// batches mixing prefill runs (the tiled kernel) and decode tokens (flash-decoding); whole-model
// logits of tiny random models (f32, bf16, int8, int4, GGUF-shaped Q8_0 + Q4_1, GQA, tied, MoE)
// against the CPU backend, prefill and token by token (which replays captured CUDA graphs), and a
// serving-like series of mixed batches through the bucketed graphs (padding writes no K/V);
// stories260K's and SmolLM2-135M's (when models/ has it) greedy tokens on the GPU equal to the
// CPU's. Without a GPU (or in a CPU-only build) each case returns at once and the run prints one
// line, "gpu tests skipped: no GPU (<reason>)". Outside the suite (run everywhere): the weight
// upload's bookkeeping through a copying CPU backend, and model.cpp's bucketed graphs through a
// CPU backend that records and replays ops as a graph would.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <set>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <sys/stat.h>
#include <tuple>

#include "batch.h"
#include "common.h"
#include "convert.h"
#include "decode.h"
#include "test_util.h"

namespace {

// The CUDA backend, or null (having said why once).
Ops* gpu() {
    static Ops* ops = [] {
        std::string why;
        if (cuda_device_count(&why) == 0) {
            std::printf("gpu tests skipped: no GPU (%s)\n", why.c_str());
            return static_cast<Ops*>(nullptr);
        }
        return cuda_ops();
    }();
    return ops;
}

std::vector<float> randn(size_t n, std::mt19937& rng, float scale = 1.0f) {
    std::normal_distribution<float> d(0.0f, scale);
    std::vector<float> v(n);
    for (float& x : v) x = d(rng);
    return v;
}

// ||a - b|| / ||b||, and every a finite (outputs are poisoned with NaN before each run).
double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
    REQUIRE(a.size() == b.size());
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); i++) {
        if (!std::isfinite(a[i])) return INFINITY;
        num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
        den += double(b[i]) * b[i];
    }
    return std::sqrt(num / std::max(den, 1e-30));
}

// Host bytes copied into a fresh backend buffer.
Buffer put(Ops* g, const void* src, size_t bytes) {
    Buffer b(g, std::max<size_t>(bytes, 4));
    g->upload(b.data(), src, bytes);
    return b;
}
template <typename T>
Buffer put(Ops* g, const std::vector<T>& v) {
    return put(g, v.data(), v.size() * sizeof(T));
}
std::vector<float> get(Ops* g, const Buffer& b, size_t n) {
    std::vector<float> v(n);
    g->download(v.data(), b.data(), n * sizeof(float));
    return v;
}
Buffer poisoned(Ops* g, size_t n) {
    std::vector<float> nan(n, NAN);
    return put(g, nan);
}

// The weight formats of ops.h's Weight, each as the GPU kernels see it.
enum class Fmt { F32, BF16, F16, I8, I8Group, I4, I4Mins };
const Fmt kAllFormats[] = {Fmt::F32, Fmt::BF16, Fmt::F16, Fmt::I8, Fmt::I8Group, Fmt::I4, Fmt::I4Mins};
const char* fmt_name(Fmt f) {
    const char* names[] = {"f32", "bf16", "f16", "int8", "grouped int8 (Q8_0)", "int4 zeros", "int4 mins (Q4_1)"};
    return names[int(f)];
}
DType storage(Fmt f) {
    const DType t[] = {DType::F32, DType::BF16, DType::F16, DType::I8, DType::I8, DType::U8, DType::U8};
    return t[int(f)];
}
bool is_grouped(Fmt f) { return f == Fmt::I8Group || f == Fmt::I4 || f == Fmt::I4Mins; }

// GGUF-style grouped quantization of w [rows][cols], written here (not the library's): grouped
// int8, s = max|w| / 127, q = round(w / s) (Q8_0); int4 with minimums, m = min, s = (max - min) /
// 15, q = round((w - m) / s) (Q4_1), two q a byte, low nibble = even column. scales (and mins)
// [rows][cols / group].
void quantize_grouped(Fmt f, const float* w, int rows, int cols, int group, std::vector<uint8_t>& data,
                      std::vector<float>& scales, std::vector<float>& mins) {
    REQUIRE((f == Fmt::I8Group || f == Fmt::I4Mins));
    REQUIRE(cols % group == 0);
    const size_t n = size_t(rows) * cols, ng = n / size_t(group);
    data.assign(f == Fmt::I8Group ? n : n / 2, 0);
    scales.resize(ng);
    mins.assign(f == Fmt::I4Mins ? ng : 0, 0.0f);
    for (size_t gi = 0; gi < ng; gi++) {
        const float* p = w + gi * size_t(group);
        const float lo = *std::min_element(p, p + group), hi = *std::max_element(p, p + group);
        if (f == Fmt::I8Group) {
            const float amax = std::max(std::fabs(lo), std::fabs(hi)), s = amax > 0 ? amax / 127 : 1;
            scales[gi] = s;
            for (int i = 0; i < group; i++) data[gi * size_t(group) + size_t(i)] = uint8_t(int8_t(std::nearbyint(p[i] / s)));
            continue;
        }
        const float s = hi > lo ? (hi - lo) / 15 : 1;
        scales[gi] = s, mins[gi] = lo;
        for (int i = 0; i < group; i++) {
            const int q = int(std::clamp(std::nearbyint((p[i] - lo) / s), 0.0f, 15.0f));
            data[(gi * size_t(group) + size_t(i)) / 2] |= uint8_t(i % 2 ? q << 4 : q);
        }
    }
}

// A random matrix in one format, on the host (for the CPU) and on the device.
struct TestWeight {
    std::vector<uint8_t> data, zeros;
    std::vector<float> scales, mins;
    Weight host;
    Buffer d_data, d_scales, d_zeros, d_mins;
    Weight dev;
    TestWeight(Ops* g, Fmt f, int rows, int cols, std::mt19937& rng, int group = 32) {
        const DType t = storage(f);
        std::vector<float> w = randn(size_t(rows) * cols, rng, 0.5f);
        host = Weight{t, nullptr, rows, cols, cols};
        if (f == Fmt::I8Group || f == Fmt::I4Mins) {
            quantize_grouped(f, w.data(), rows, cols, group, data, scales, mins);
            host.group = group;
        } else if (t == DType::I8) {
            data.resize(size_t(rows) * cols);
            scales.resize(size_t(rows));
            for (int r = 0; r < rows; r++)
                scales[size_t(r)] = quantize_row_int8(&w[size_t(r) * cols], cols, reinterpret_cast<int8_t*>(&data[size_t(r) * cols]));
        } else if (t == DType::U8) {
            const int gs = cols / group;
            data.resize(size_t(rows) * cols / 2);
            scales.resize(size_t(rows) * gs);
            zeros.resize(size_t(rows) * gs);
            for (int r = 0; r < rows; r++)
                quantize_row_int4(&w[size_t(r) * cols], cols, group, &data[size_t(r) * cols / 2], &scales[size_t(r) * gs],
                                  &zeros[size_t(r) * gs]);
            host.group = group;
        } else {
            data.resize(size_t(rows) * cols * dtype_size(t));
            convert_floats(w.data(), DType::F32, data.data(), t, w.size());
        }
        host.data = data.data();
        host.scales = scales.empty() ? nullptr : scales.data();
        host.zeros = zeros.empty() ? nullptr : zeros.data();
        host.mins = mins.empty() ? nullptr : mins.data();
        d_data = put(g, data);
        if (!scales.empty()) d_scales = put(g, scales);
        if (!zeros.empty()) d_zeros = put(g, zeros);
        if (!mins.empty()) d_mins = put(g, mins);
        dev = host;
        dev.data = d_data.data();
        dev.scales = scales.empty() ? nullptr : d_scales.f32();
        dev.zeros = zeros.empty() ? nullptr : static_cast<const uint8_t*>(d_zeros.data());
        dev.mins = mins.empty() ? nullptr : d_mins.f32();
    }
};

// Decode (n <= 8) runs f32 arithmetic on the same weights: rounding-level differences. Larger n
// goes through cuBLAS with x rounded to bf16 (and quantized weights dequantized to bf16). int8 and
// int4 weights: the CPU twin multiplies them by x rounded to 15-bit integers per 32-column block
// (ops.h quantize_activations, for integer dot products), the GPU by the exact f32 x: ~1e-4
// relative at most, so 1e-3 at n <= 8 (a wrong scale, nibble or group is O(1)).
double matmul_tolerance(Fmt f, int n) {
    const bool ints = f == Fmt::I8 || f == Fmt::I8Group || f == Fmt::I4 || f == Fmt::I4Mins;
    if (n > 8 && f != Fmt::F32) return 1.5e-2;
    return ints ? 1e-3 : 2e-5;
}

// A model.bin as a GGUF Q4_1 import looks (SmolLM2's layout): a grouped int8 embedding (Q8_0,
// group 32), every other matrix int4 with minimums (Q4_1, group 32), except one grouped int8
// matrix of group 64 and one int4-with-minimums of group 64 (Q4_1 and Q8_0 meet every role).
void write_gguf_like_model(const TinyWeights& tw, const std::string& path) {
    static const std::string tok = read_file(models_dir() + "/tok512.model");
    SafetensorsWriter w;
    w.metadata = {{"format", kFormatName}, {"version", kFormatVersion}, {"config", tw.cfg.to_json()},
                  {"quantization", "gguf-Q4_1+Q8_0"}};
    std::vector<std::unique_ptr<std::vector<uint8_t>>> keep;  // alive until write()
    auto bytes = [&](const void* p, size_t n) {
        keep.push_back(std::make_unique<std::vector<uint8_t>>(static_cast<const uint8_t*>(p), static_cast<const uint8_t*>(p) + n));
        return keep.back()->data();
    };
    for (auto& [name, v] : tw.tensors) {
        const std::vector<int64_t> shape = tw.shape_of(name);
        if (shape.size() != 2) {  // norms stay f32
            w.add_bytes(name, DType::F32, shape, bytes(v.data(), v.size() * sizeof(float)));
            continue;
        }
        Fmt f = name == "tok_embeddings.weight" ? Fmt::I8Group : Fmt::I4Mins;
        int group = 32;
        if (name == layer_tensor(0, "attention.wo.weight")) f = Fmt::I8Group, group = 64;
        if (name == layer_tensor(tw.cfg.n_layers - 1, "feed_forward.w1.weight")) group = 64;
        const int rows = int(shape[0]), cols = int(shape[1]);
        std::vector<uint8_t> q;
        std::vector<float> scales, mins;
        quantize_grouped(f, v.data(), rows, cols, group, q, scales, mins);
        if (f == Fmt::I8Group) w.add_bytes(name, DType::I8, shape, bytes(q.data(), q.size()));
        else w.add_bytes(name, DType::U8, {rows, cols / 2}, bytes(q.data(), q.size()));
        w.add_bytes(name + ".scales", DType::F32, {rows, cols / group}, bytes(scales.data(), scales.size() * sizeof(float)));
        if (f == Fmt::I4Mins)
            w.add_bytes(name + ".mins", DType::F32, {rows, cols / group}, bytes(mins.data(), mins.size() * sizeof(float)));
    }
    w.add_bytes("tokenizer.model", DType::U8, {int64_t(tok.size())}, tok.data());
    w.write(path);
}

Model& stories260k_bin(Ops* ops, std::unique_ptr<Model>& slot) {
    static std::string path;
    if (path.empty()) {
        ConvertOptions o;
        o.input = models_dir() + "/stories260K.bin";
        o.tokenizer = models_dir() + "/tok512.model";
        o.output = temp_dir() + "/gpu-stories260K.model.bin";
        o.progress = false;
        convert_checkpoint(o);
        path = o.output;
    }
    slot = std::make_unique<Model>(path, ops);
    return *slot;
}

// The CPU kernels behind a backend that claims memory of its own (host_memory() false): the Model
// then copies every matrix piece (values, scales, zero points, minimums) as it does for CUDA
// (model.cpp's pieces_of, upload_weights), so the copy's bookkeeping is tested without a GPU.
struct CopyingCpuOps final : Ops {
    Ops* cpu = cpu_ops(0);
    const char* name() const override { return "cpu-copying"; }
    bool host_memory() const override { return false; }
    std::vector<std::pair<const uint8_t*, size_t>> allocations;
    void* alloc(size_t bytes) override {
        void* p = std::calloc(1, std::max<size_t>(bytes, 1));
        REQUIRE(p);
        allocations.push_back({static_cast<const uint8_t*>(p), bytes});
        return p;
    }
    void free(void* p) override {
        auto it = std::find_if(allocations.begin(), allocations.end(), [&](auto& a) { return a.first == p; });
        if (it != allocations.end()) allocations.erase(it);
        std::free(p);
    }
    // Whether p points into memory this backend allocated (not into the mapped file).
    bool owns(const void* p) const {
        const uint8_t* b = static_cast<const uint8_t*>(p);
        for (auto [a, n] : allocations)
            if (b >= a && b < a + n) return true;
        return false;
    }
    void upload(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
    void download(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
    void copy(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
    void zero(void* p, size_t bytes) override { std::memset(p, 0, bytes); }
    void matmul(float* out, const float* x, const Weight& w, int n) override { cpu->matmul(out, x, w, n); }
    void ffn_gate_up(float* h, float* up, const float* x, const Weight& w1, const Weight& w3, int n) override {
        cpu->ffn_gate_up(h, up, x, w1, w3, n);
    }
    void rmsnorm(float* out, const float* x, const float* weight, int n, int dim, float eps) override {
        cpu->rmsnorm(out, x, weight, n, dim, eps);
    }
    void rope_kv_write(float* q, float* k, const float* v, void* k_cache, void* v_cache, const float* cos_sin,
                       const int* slots, int n, int n_heads, int n_kv_heads, int head_dim) override {
        cpu->rope_kv_write(q, k, v, k_cache, v_cache, cos_sin, slots, n, n_heads, n_kv_heads, head_dim);
    }
    void attention(float* out, const float* q, const void* k_cache, const void* v_cache, const AttentionBatch& b,
                   int n) override {
        cpu->attention(out, q, k_cache, v_cache, b, n);
    }
    void add(float* x, const float* y, size_t n) override { cpu->add(x, y, n); }
    void add_scaled(float* x, const float* y, float a, size_t n) override { cpu->add_scaled(x, y, a, n); }
    void embed(float* out, const Weight& table, const int* tokens, int n) override { cpu->embed(out, table, tokens, n); }
    void moe_ffn(float* out, const float* x, const float* logits, const FfnWeights* experts, int n_experts, int k,
                 int n) override {
        cpu->moe_ffn(out, x, logits, experts, n_experts, k, n);
    }
};


// The CPU kernels behind a backend with graphs(): a capture records each op with its arguments, as
// a CUDA graph records launches, and a launch replays the record, reading whatever the pointers
// hold then. model.cpp's bucketed graphs (padding, keys, replays over new metadata, gathered logit
// rows) thereby run without a GPU. Memory as CopyingCpuOps (host_memory() false); a negative
// cache slot is not written, as ops.h asks of backends with graphs.
struct RecordingCpuOps final : Ops {
    using Tape = std::vector<std::function<void()>>;
    CopyingCpuOps mem;
    Ops* cpu = cpu_ops(0);
    bool recording = false;
    Tape tape;
    int launches = 0;
    void run(std::function<void()> f) {
        if (recording) tape.push_back(std::move(f));
        else f();
    }
    const char* name() const override { return "cpu-recording"; }
    bool host_memory() const override { return false; }
    void* alloc(size_t bytes) override { return mem.alloc(bytes); }
    void free(void* p) override { mem.free(p); }
    void upload(void* dst, const void* src, size_t bytes) override {
        REQUIRE(!recording);
        std::memcpy(dst, src, bytes);
    }
    void download(void* dst, const void* src, size_t bytes) override {
        REQUIRE(!recording);
        std::memcpy(dst, src, bytes);
    }
    void copy(void* dst, const void* src, size_t bytes) override { run([=] { std::memcpy(dst, src, bytes); }); }
    void zero(void* p, size_t bytes) override { run([=] { std::memset(p, 0, bytes); }); }
    bool graphs() const override { return true; }
    void capture_begin() override {
        REQUIRE(!recording);
        recording = true;
        tape.clear();
    }
    void* capture_end() override {
        recording = false;
        return new Tape(std::move(tape));
    }
    void graph_launch(void* g) override {
        launches++;
        for (auto& f : *static_cast<Tape*>(g)) f();
    }
    void graph_destroy(void* g) override { delete static_cast<Tape*>(g); }
    void matmul(float* out, const float* x, const Weight& w, int n) override {
        run([=, this] { cpu->matmul(out, x, w, n); });
    }
    void ffn_gate_up(float* h, float* up, const float* x, const Weight& w1, const Weight& w3, int n) override {
        run([=, this] { cpu->ffn_gate_up(h, up, x, w1, w3, n); });
    }
    void rmsnorm(float* out, const float* x, const float* weight, int n, int dim, float eps) override {
        run([=, this] { cpu->rmsnorm(out, x, weight, n, dim, eps); });
    }
    void rope_kv_write(float* q, float* k, const float* v, void* k_cache, void* v_cache, const float* cos_sin,
                       const int* slots, int n, int n_heads, int n_kv_heads, int head_dim) override {
        run([=, this] {
            const size_t kv_dim = size_t(n_kv_heads) * head_dim;
            std::vector<float> spare_k(kv_dim), spare_v(kv_dim);  // where a padding entry's K/V go instead
            for (int t = 0; t < n; t++) {
                const int zero = 0;
                const bool pad = slots[t] < 0;
                cpu->rope_kv_write(q + size_t(t) * n_heads * head_dim, k + size_t(t) * kv_dim, v + size_t(t) * kv_dim,
                                   pad ? spare_k.data() : k_cache, pad ? spare_v.data() : v_cache,
                                   cos_sin + size_t(t) * head_dim, pad ? &zero : slots + t, 1, n_heads, n_kv_heads,
                                   head_dim);
            }
        });
    }
    void attention(float* out, const float* q, const void* k_cache, const void* v_cache, const AttentionBatch& b,
                   int n) override {
        run([=, this] { cpu->attention(out, q, k_cache, v_cache, b, n); });
    }
    void add(float* x, const float* y, size_t n) override { run([=, this] { cpu->add(x, y, n); }); }
    void add_scaled(float* x, const float* y, float a, size_t n) override {
        run([=, this] { cpu->add_scaled(x, y, a, n); });
    }
    void embed(float* out, const Weight& table, const int* tokens, int n) override {
        run([=, this] { cpu->embed(out, table, tokens, n); });
    }
    void moe_ffn(float* out, const float* x, const float* logits, const FfnWeights* experts, int n_experts, int k,
                 int n) override {
        run([=, this] { cpu->moe_ffn(out, x, logits, experts, n_experts, k, n); });
    }
};

// A tiny bf16 model whose runs take the GPU's tiled attention (head_dim 64, GQA 2), context 512;
// with experts > 0, its FFNs are a mixture of that many experts, top-2.
std::string bucket_model(int experts = 0) {
    static std::map<int, std::string> paths;
    std::string& path = paths[experts];
    if (path.empty()) {
        Config c = tiny_config(256, 344, 2, 4, 2, false);
        c.max_seq_len = 512;
        c.n_experts = experts;
        c.n_experts_per_tok = experts > 0 ? 2 : 0;
        path = temp_dir() + "/buckets" + std::to_string(experts) + ".bin";
        write_model_bin(random_weights(c, 21), path, DType::BF16);
    }
    return path;
}

// A serving-like series of forwards that takes every path of model.cpp's run_batch: prompts
// together (op by op), decode steps of 2, 3 and 11 sequences (buckets 2, 4 and 16: run, captured,
// replayed, with 0, 1 and 5 padding entries), a prompt chunk among decode tokens, verify runs of 5
// (bucket 8: a run beside padding), logit rows 2 and 0 of a decode step (gathered), prompts of 6
// without logits (bucket 8 without the classifier).
struct BucketStep {
    std::vector<BatchToken> batch;
    std::vector<int> rows;
    std::string what;
};
std::vector<BucketStep> bucket_scenario(int vocab) {
    std::mt19937 rng(8);
    std::vector<int> next(16, 0);  // per sequence: its next position
    std::vector<BucketStep> steps;
    auto step = [&](const std::string& what) -> BucketStep& {
        steps.push_back({{}, {}, what});
        return steps.back();
    };
    auto add = [&](BucketStep& s, int seq, int count, bool logits) {
        for (int i = 0; i < count; i++) s.batch.push_back({seq, next[size_t(seq)]++, int(rng() % unsigned(vocab))});
        if (logits) s.rows.push_back(int(s.batch.size()) - 1);
    };
    BucketStep& two = step("two prompts (32 entries, 2 logit rows: op by op)");
    add(two, 0, 25, true);
    add(two, 1, 7, true);
    for (int i = 0; i < 4; i++) {
        BucketStep& s = step("decode x2 (bucket 2)");
        for (int q : {0, 1}) add(s, q, 1, true);
    }
    BucketStep& mixed = step("decodes and a prompt (12 entries, 3 logit rows: op by op)");
    for (int q : {0, 1}) add(mixed, q, 1, true);
    add(mixed, 2, 10, true);
    for (int i = 0; i < 4; i++) {
        BucketStep& s = step("decode x3 (bucket 4, one padding entry)");
        for (int q : {0, 1, 2}) add(s, q, 1, true);
    }
    for (int i = 0; i < 3; i++) {
        BucketStep& s = step("verify run of 5 (bucket 8)");
        add(s, 1, 5, false);
        s.rows = {0, 1, 2, 3, 4};
    }
    for (int i = 0; i < 3; i++) {
        BucketStep& s = step("decode x3, logit rows 2 and 0 (gathered)");
        for (int q : {2, 0, 1}) add(s, q, 1, false);
        s.rows = {2, 0};
    }
    for (int q = 11; q < 14; q++) {  // as decode() prefills a prompt: no logit rows
        BucketStep& s = step("a prompt of 6 without logits (bucket 8, no classifier)");
        add(s, q, 6, false);
    }
    BucketStep& eight = step("eight prompts of 3 (24 entries: op by op)");
    for (int q = 3; q < 11; q++) add(eight, q, 3, true);
    for (int i = 0; i < 3; i++) {
        BucketStep& s = step("decode x11 (bucket 16, five padding entries)");
        for (int q = 0; q < 11; q++) add(s, q, 1, true);
    }
    return steps;
}
}  // namespace

// Not in the gpu suite: it runs everywhere.
TEST_CASE("weights copied to a backend's own memory (as for CUDA): every format's pieces, logits unchanged") {
    CopyingCpuOps copying;
    Config c = tiny_config(192, 320, 2, 6, 3, false);
    const TinyWeights tw = random_weights(c, 77);
    const std::string dir = temp_dir();
    struct File { const char* name; std::string path; };
    std::vector<File> files = {{"GGUF Q8_0 + Q4_1", dir + "/copy-gguf.bin"}, {"int8", dir + "/copy-f32.bin.q8"},
                               {"int4", dir + "/copy-f32.bin.q4"}, {"bf16", dir + "/copy-bf16.bin"}};
    write_gguf_like_model(tw, files[0].path);
    write_model_bin(tw, dir + "/copy-f32.bin", DType::F32);
    write_model_bin(tw, files[3].path, DType::BF16);
    for (auto [mode, out] : {std::pair<const char*, std::string>{"int8", files[1].path}, {"int4", files[2].path}}) {
        ConvertOptions o;
        o.input = dir + "/copy-f32.bin";
        o.output = out;
        o.mode = mode;
        o.progress = false;
        convert_checkpoint(o);
    }
    const std::vector<int> tokens = random_tokens(19, c.vocab_size, 3);
    for (const File& f : files) {
        CAPTURE(std::string(f.name));
        Model host(f.path, cpu_ops(0)), copied(f.path, &copying);
        // Every pointer moved to the copy (not left viewing the mapped file), which the logits
        // alone would not show.
        std::vector<std::pair<const Weight*, const Weight*>> pairs = {{&host.w.tok_embeddings, &copied.w.tok_embeddings},
                                                                      {&host.w.output, &copied.w.output}};
        for (size_t l = 0; l < host.w.layers.size(); l++) {
            const LayerWeights &a = host.w.layers[l], &b = copied.w.layers[l];
            for (auto [x, y] : {std::pair{&a.wq, &b.wq}, {&a.wk, &b.wk}, {&a.wv, &b.wv}, {&a.wo, &b.wo}, {&a.w1, &b.w1},
                                {&a.w2, &b.w2}, {&a.w3, &b.w3}})
                pairs.push_back({x, y});
        }
        for (auto [a, b] : pairs) {
            CHECK(a->dtype == b->dtype);
            CHECK(copying.owns(b->data));
            CHECK((b->scales == nullptr) == (a->scales == nullptr));
            CHECK((b->zeros == nullptr) == (a->zeros == nullptr));
            CHECK((b->mins == nullptr) == (a->mins == nullptr));
            if (b->scales) CHECK(copying.owns(b->scales));
            if (b->zeros) CHECK(copying.owns(b->zeros));
            if (b->mins) CHECK(copying.owns(b->mins));
        }
        if (std::string(f.name) != "bf16") CHECK(copied.w.layers[0].wq.scales != nullptr);
        if (f.name == files[0].name) CHECK(copied.w.layers[1].w1.mins != nullptr);
        // Same kernels, same values: the logits agree exactly, prefill and token by token.
        CHECK(prefill_logits(copied, tokens) == prefill_logits(host, tokens));
        CHECK(decode_logits(copied, tokens) == decode_logits(host, tokens));
    }
}

// Not in the gpu suite: it runs everywhere.
TEST_CASE("bucketed graphs (model.cpp) over a recording CPU backend: logits and KV cache equal the plain CPU's") {
    RecordingCpuOps rec;
    std::string path;
    SUBCASE("dense") { path = bucket_model(); }
    SUBCASE("mixture of 4 experts, top-2 (routed inside the graph)") { path = bucket_model(4); }
    Model plain(path, cpu_ops(0)), graphed(path, &rec);
    graphed.reserve_scratch(64, 64);
    KVCache ka(plain.cfg, 1024, 16), kb(graphed.cfg, 1024, 16);
    const int V = plain.cfg.vocab_size;
    for (const BucketStep& st : bucket_scenario(V)) {
        CAPTURE(st.what);
        for (const BatchToken& t : st.batch) {
            REQUIRE(ka.reserve(t.seq, t.pos + 1));
            REQUIRE(kb.reserve(t.seq, t.pos + 1));
        }
        std::vector<float> want(st.rows.size() * size_t(V)), got(want.size(), NAN);
        plain.forward(ka, st.batch, st.rows, want.data());
        graphed.forward(kb, st.batch, st.rows, got.data());
        // The CPU kernels compute each row on its own: padding and replays change no bit.
        CHECK(got == want);
        REQUIRE(ka.bytes() == kb.bytes());
        CHECK(std::memcmp(ka.k.data(), kb.k.data(), ka.bytes() / 2) == 0);
        CHECK(std::memcmp(ka.v.data(), kb.v.data(), ka.bytes() / 2) == 0);
    }
    // buckets 2, 4 (also the gathered rows' steps), 8 (verify), 8 without the classifier, 16
    CHECK(graphed.graphs_captured() == 5);
    // launches from each key's second step on: bucket 2: 3; 4: 3 + 3 (gathered); 8: 2; 8 without: 2; 16: 2
    CHECK(rec.launches == 15);
}

TEST_SUITE("gpu") {

TEST_CASE("gpu: matmul kernels (decode GEMV and cuBLAS) match the CPU twin in every weight format") {
    Ops* g = gpu();
    if (!g) return;
    Ops* cpu = cpu_ops(0);
    std::mt19937 rng(1234);
    struct Shape { int rows, cols, group; };
    for (Fmt f : kAllFormats) {
        // odd rows everywhere; cols odd / unaligned (the scalar path) where the format allows it;
        // grouped formats: 576 columns (SmolLM2's dim: 18 groups of 32, 9 of 64) too
        std::vector<Shape> shapes = is_grouped(f) ? std::vector<Shape>{{37, 64, 32}, {129, 320, 32}, {513, 1024, 32},
                                                                      {75, 576, 32}, {33, 576, 64}}
                                                  : std::vector<Shape>{{1, 7, 0}, {37, 100, 0}, {129, 328, 0}, {513, 1024, 0}};
        for (Shape s : shapes)
            for (int n : {1, 3, 8, 9, 33}) {
                CAPTURE(fmt_name(f));
                CAPTURE(s.rows);
                CAPTURE(s.cols);
                CAPTURE(s.group);
                CAPTURE(n);
                TestWeight W(g, f, s.rows, s.cols, rng, s.group > 0 ? s.group : 32);
                std::vector<float> x = randn(size_t(n) * s.cols, rng), want(size_t(n) * s.rows);
                cpu->matmul(want.data(), x.data(), W.host, n);
                Buffer dx = put(g, x), out = poisoned(g, want.size());
                g->matmul(out.f32(), dx.f32(), W.dev, n);
                CHECK(rel_l2(get(g, out, want.size()), want) < matmul_tolerance(f, n));
                if (!is_grouped(f) || n > 8) continue;
                // x one float past a 16-byte boundary: the GEMV's one-weight-at-a-time path, which
                // grouped formats (whole groups of 32) reach no other way.
                std::vector<float> shifted(x.size() + 1);
                std::copy(x.begin(), x.end(), shifted.begin() + 1);
                Buffer dxs = put(g, shifted), out2 = poisoned(g, want.size());
                g->matmul(out2.f32(), dxs.f32() + 1, W.dev, n);
                CHECK(rel_l2(get(g, out2, want.size()), want) < matmul_tolerance(f, n));
            }
    }
}

TEST_CASE("gpu: fused Q/K/V and SwiGLU gate/up match the CPU twin") {
    Ops* g = gpu();
    if (!g) return;
    Ops* cpu = cpu_ops(0);
    std::mt19937 rng(99);
    for (Fmt t : kAllFormats)
        for (int n : {1, 5, 12}) {
            CAPTURE(fmt_name(t));
            CAPTURE(n);
            const int dim = 256, q_rows = 256, kv_rows = 64, hidden = 352;
            TestWeight wq(g, t, q_rows, dim, rng), wk(g, t, kv_rows, dim, rng), wv(g, t, kv_rows, dim, rng);
            TestWeight w1(g, t, hidden, dim, rng), w3(g, t, hidden, dim, rng);
            std::vector<float> x = randn(size_t(n) * dim, rng);
            std::vector<float> q(size_t(n) * q_rows), k(size_t(n) * kv_rows), v(size_t(n) * kv_rows), h(size_t(n) * hidden),
                up(size_t(n) * hidden);
            cpu->matmul_qkv(q.data(), k.data(), v.data(), x.data(), wq.host, wk.host, wv.host, n);
            cpu->ffn_gate_up(h.data(), up.data(), x.data(), w1.host, w3.host, n);
            Buffer dx = put(g, x), dq = poisoned(g, q.size()), dk = poisoned(g, k.size()), dv = poisoned(g, v.size());
            Buffer dh = poisoned(g, h.size()), dup = poisoned(g, up.size());
            g->matmul_qkv(dq.f32(), dk.f32(), dv.f32(), dx.f32(), wq.dev, wk.dev, wv.dev, n);
            g->ffn_gate_up(dh.f32(), dup.f32(), dx.f32(), w1.dev, w3.dev, n);
            const double tol = matmul_tolerance(t, n) * 2;
            CHECK(rel_l2(get(g, dq, q.size()), q) < tol);
            CHECK(rel_l2(get(g, dk, k.size()), k) < tol);
            CHECK(rel_l2(get(g, dv, v.size()), v) < tol);
            CHECK(rel_l2(get(g, dh, h.size()), h) < tol);
        }
}

TEST_CASE("gpu: mixture of experts (device routing, grouped GEMV, cuBLAS per expert) matches the CPU twin") {
    Ops* g = gpu();
    if (!g) return;
    Ops* cpu = cpu_ops(0);
    std::mt19937 rng(123);
    const int dim = 256, hidden = 160;
    struct Case { int experts, k, n; };
    // n <= 64: the grouped kernels (one expert row per token at n = 1, NT-token chunks above);
    // n = 70: cuBLAS per expert over gathered rows; k = 3 of 5 checks the weighted sum's order.
    const Case cases[] = {{8, 2, 1}, {8, 2, 3}, {8, 2, 13}, {8, 2, 64}, {8, 2, 70}, {5, 3, 9}};
    for (Fmt t : kAllFormats)
        for (const Case& c : cases) {
            CAPTURE(fmt_name(t));
            CAPTURE(c.experts);
            CAPTURE(c.k);
            CAPTURE(c.n);
            std::vector<std::unique_ptr<TestWeight>> keep;
            std::vector<FfnWeights> host(size_t(c.experts)), dev(size_t(c.experts));
            for (int e = 0; e < c.experts; e++) {
                for (auto [mat, rows, cols] : {std::tuple{&FfnWeights::w1, hidden, dim}, std::tuple{&FfnWeights::w2, dim, hidden},
                                               std::tuple{&FfnWeights::w3, hidden, dim}}) {
                    keep.push_back(std::make_unique<TestWeight>(g, t, rows, cols, rng));
                    host[size_t(e)].*mat = keep.back()->host;
                    dev[size_t(e)].*mat = keep.back()->dev;
                }
            }
            std::vector<float> x = randn(size_t(c.n) * dim, rng), logits = randn(size_t(c.n) * c.experts, rng, 2.0f);
            // Ties decided by index: token 0's logits all equal, token 1's two largest equal.
            std::fill(logits.begin(), logits.begin() + c.experts, 0.5f);
            if (c.n > 1) logits[size_t(c.experts) + 3] = logits[size_t(c.experts) + 1] = 9.0f;
            std::vector<float> want(size_t(c.n) * dim);
            cpu->moe_ffn(want.data(), x.data(), logits.data(), host.data(), c.experts, c.k, c.n);
            Buffer dx = put(g, x), dl = put(g, logits), dout = poisoned(g, want.size());
            g->moe_ffn(dout.f32(), dx.f32(), dl.f32(), dev.data(), c.experts, c.k, c.n);
            // Two products in a row (and SiLU between): twice a product's tolerance, at the size
            // of the largest expert group (cuBLAS with bf16 operands above 8).
            const double tol = 2 * matmul_tolerance(t, c.n > 64 ? 9 : 1);
            CHECK(rel_l2(get(g, dout, want.size()), want) < tol);
        }
}

TEST_CASE("gpu: rmsnorm, add, add_scaled and embed match the CPU twin") {
    Ops* g = gpu();
    if (!g) return;
    Ops* cpu = cpu_ops(0);
    std::mt19937 rng(7);
    for (int dim : {1, 31, 768, 4097})
        for (int n : {1, 3, 17}) {
            CAPTURE(dim);
            CAPTURE(n);
            std::vector<float> x = randn(size_t(n) * dim, rng, 3.0f), w = randn(size_t(dim), rng), y = randn(size_t(n) * dim, rng);
            std::vector<float> want(x.size());
            cpu->rmsnorm(want.data(), x.data(), w.data(), n, dim, 1e-5f);
            Buffer dx = put(g, x), dw = put(g, w), out = poisoned(g, x.size());
            g->rmsnorm(out.f32(), dx.f32(), dw.f32(), n, dim, 1e-5f);
            CHECK(rel_l2(get(g, out, x.size()), want) < 1e-5);
            g->rmsnorm(dx.f32(), dx.f32(), dw.f32(), n, dim, 1e-5f);  // in place, as the final norm runs
            CHECK(rel_l2(get(g, dx, x.size()), want) < 1e-5);

            std::vector<float> sum = x, scaled = x;
            cpu->add(sum.data(), y.data(), sum.size());
            cpu->add_scaled(scaled.data(), y.data(), 0.37f, scaled.size());
            Buffer a = put(g, x), b = put(g, x), dy = put(g, y);
            g->add(a.f32(), dy.f32(), x.size());
            g->add_scaled(b.f32(), dy.f32(), 0.37f, x.size());
            CHECK(rel_l2(get(g, a, x.size()), sum) < 1e-6);
            CHECK(rel_l2(get(g, b, x.size()), scaled) < 1e-6);
        }
    for (Fmt t : kAllFormats) {
        CAPTURE(fmt_name(t));
        TestWeight table(g, t, 301, 96, rng);
        std::vector<int> tokens{0, 300, 17, 17, 150};
        std::vector<float> want(tokens.size() * 96);
        cpu->embed(want.data(), table.host, tokens.data(), int(tokens.size()));
        Buffer dt = put(g, tokens), out = poisoned(g, want.size());
        g->embed(out.f32(), table.dev, static_cast<const int*>(dt.data()), int(tokens.size()));
        CHECK(rel_l2(get(g, out, want.size()), want) < 1e-6);
    }
}

TEST_CASE("gpu: RoPE with the KV-cache write, and paged attention, match the CPU twin") {
    Ops* g = gpu();
    if (!g) return;
    Ops* cpu = cpu_ops(0);
    REQUIRE(g->kv_dtype() == DType::BF16);
    std::mt19937 rng(2024);
    struct Case { int n_heads, n_kv_heads, head_dim, n, max_len; };
    // MHA, GQA 4 and 8, head_dim 64 / 128 / 96; decode (n = 1), a verify-sized batch, a prefill;
    // decode tokens far shorter than the context (each spread over the splits by its own length)
    for (Case cs : std::vector<Case>{{4, 4, 64, 1, 300}, {8, 2, 128, 1, 2500}, {8, 1, 96, 5, 700}, {16, 2, 64, 40, 160},
                                     {4, 4, 128, 9, 4096}, {8, 2, 64, 4, 16384}}) {
        CAPTURE(cs.n_heads);
        CAPTURE(cs.n_kv_heads);
        CAPTURE(cs.head_dim);
        CAPTURE(cs.n);
        const int hd = cs.head_dim, kv_dim = cs.n_kv_heads * hd, bs = 16;
        const int blocks = (cs.max_len + bs - 1) / bs * 2;  // two sequences' worth, shuffled
        std::vector<int> ids(static_cast<size_t>(blocks));
        for (int i = 0; i < blocks; i++) ids[size_t(i)] = i;
        std::shuffle(ids.begin(), ids.end(), rng);
        // Token t: sequence t % 2 at a random position (long ones exercise the splits).
        std::vector<int> positions(size_t(cs.n)), offsets(size_t(cs.n)), slots(size_t(cs.n));
        std::vector<int> tables(ids.begin(), ids.end());  // sequence 0's table, then sequence 1's
        const int per_seq = blocks / 2;
        std::set<int> used[2];  // distinct positions per sequence: no two tokens write one slot
        for (int t = 0; t < cs.n; t++) {
            int p = t == 0 ? cs.max_len - 1 : int(rng() % unsigned(cs.max_len));
            while (used[t % 2].count(p)) p = (p + 1) % cs.max_len;
            used[t % 2].insert(p);
            positions[size_t(t)] = p;
            offsets[size_t(t)] = (t % 2) * per_seq;
            slots[size_t(t)] = tables[size_t(offsets[size_t(t)] + p / bs)] * bs + p % bs;
        }
        // Cache contents: random, rounded to bf16 for the CPU's f32 copy.
        const size_t cache = size_t(blocks) * bs * kv_dim;
        std::vector<float> kc = randn(cache, rng), vc = randn(cache, rng);
        std::vector<uint16_t> kb(cache), vb(cache);
        convert_floats(kc.data(), DType::F32, kb.data(), DType::BF16, cache);
        convert_floats(vc.data(), DType::F32, vb.data(), DType::BF16, cache);
        convert_floats(kb.data(), DType::BF16, kc.data(), DType::F32, cache);
        convert_floats(vb.data(), DType::BF16, vc.data(), DType::F32, cache);
        Buffer dkc = put(g, kb), dvc = put(g, vb);

        // RoPE + cache write: angles for the positions, as model.cpp builds them
        std::vector<float> rope(size_t(cs.n) * hd);
        for (int t = 0; t < cs.n; t++)
            for (int i = 0; i < hd / 2; i++) {
                const double a = positions[size_t(t)] * std::pow(10000.0, -2.0 * i / hd);
                rope[size_t(t) * hd + 2 * i] = float(std::cos(a)), rope[size_t(t) * hd + 2 * i + 1] = float(std::sin(a));
            }
        std::vector<float> q = randn(size_t(cs.n) * cs.n_heads * hd, rng), k = randn(size_t(cs.n) * kv_dim, rng),
                           v = randn(size_t(cs.n) * kv_dim, rng);
        Buffer dq = put(g, q), dk = put(g, k), dv = put(g, v), drope = put(g, rope), dslots = put(g, slots);
        cpu->rope_kv_write(q.data(), k.data(), v.data(), kc.data(), vc.data(), rope.data(), slots.data(), cs.n, cs.n_heads,
                           cs.n_kv_heads, hd);
        g->rope_kv_write(dq.f32(), dk.f32(), dv.f32(), dkc.data(), dvc.data(), drope.f32(),
                         static_cast<const int*>(dslots.data()), cs.n, cs.n_heads, cs.n_kv_heads, hd);
        CHECK(rel_l2(get(g, dq, q.size()), q) < 1e-6);
        CHECK(rel_l2(get(g, dk, k.size()), k) < 1e-6);
        // The written rows, read back as bf16 (a token written twice to one slot: the later wins on both)
        std::vector<uint16_t> kb2(cache), vb2(cache);
        g->download(kb2.data(), dkc.data(), cache * 2);
        g->download(vb2.data(), dvc.data(), cache * 2);
        std::vector<float> kg(cache), vg(cache);
        convert_floats(kb2.data(), DType::BF16, kg.data(), DType::F32, cache);
        convert_floats(vb2.data(), DType::BF16, vg.data(), DType::F32, cache);
        for (int t = 0; t < cs.n; t++) {
            const size_t at = size_t(slots[size_t(t)]) * kv_dim;
            std::vector<float> a(kg.begin() + at, kg.begin() + at + kv_dim), b(kc.begin() + at, kc.begin() + at + kv_dim);
            CHECK(rel_l2(a, b) < 5e-3);  // bf16 rounding of the CPU's f32 row
            std::vector<float> c(vg.begin() + at, vg.begin() + at + kv_dim), d(vc.begin() + at, vc.begin() + at + kv_dim);
            CHECK(rel_l2(c, d) < 5e-3);
        }
        // Attention over the cache as the GPU holds it (the CPU reads the same bf16 values).
        kc = kg, vc = vg;
        std::vector<float> want(size_t(cs.n) * cs.n_heads * hd);
        AttentionBatch hb{positions.data(), tables.data(), offsets.data(), bs, cs.n_heads, cs.n_kv_heads, hd, cs.max_len};
        cpu->attention(want.data(), q.data(), kc.data(), vc.data(), hb, cs.n);
        Buffer dpos = put(g, positions), dtab = put(g, tables), doff = put(g, offsets), out = poisoned(g, want.size());
        AttentionBatch db{static_cast<const int*>(dpos.data()), static_cast<const int*>(dtab.data()),
                          static_cast<const int*>(doff.data()), bs, cs.n_heads, cs.n_kv_heads, hd, cs.max_len};
        g->attention(out.f32(), dq.f32(), dkc.data(), dvc.data(), db, cs.n);
        CHECK(rel_l2(get(g, out, want.size()), want) < 1e-4);
    }
}

// Whether entry t of a batch shares its table offset with a neighbour: a run (ops.h AttentionBatch).
bool shares_table(const std::vector<int>& offsets, size_t t) {
    return (t > 0 && offsets[t - 1] == offsets[t]) || (t + 1 < offsets.size() && offsets[t + 1] == offsets[t]);
}

// The worst ||a - b|| / ||b|| over rows of `len` values (one token's heads): a wrong token stands
// out even in a batch of a thousand.
double worst_row_rel_l2(const std::vector<float>& a, const std::vector<float>& b, size_t len) {
    REQUIRE(a.size() == b.size());
    double worst = 0;
    for (size_t r = 0; r < b.size() / len; r++) {
        const std::vector<float> x(a.begin() + r * len, a.begin() + (r + 1) * len), y(b.begin() + r * len, b.begin() + (r + 1) * len);
        worst = std::max(worst, rel_l2(x, y));
    }
    return worst;
}

// A piece is one sequence whose positions [start, start + count) are adjacent batch entries, as
// batch.cpp lays a step out: count 1 is a decode token, more a prefill chunk (start > 0: it
// continues a cached prefix) or a verify run. Lengths are no multiples of the tiles (64 query
// rows, 32 keys); max_len sets the splits.
struct Piece { int start, count; };
struct AttentionCase { const char* name; int n_heads, n_kv_heads, head_dim, block_size, max_len; std::vector<Piece> pieces; };

// One batch of pieces through the GPU's attention, with the batch's own hints (runs to the tiled
// kernel, decode tokens to flash-decoding), with the defaults (flash-decoding for every token), and
// with "decode tokens may be present" over a batch with none (flash-decoding skips every run
// token), each against the CPU twin over the same bf16 cache.
void check_attention_case(Ops* g, const AttentionCase& cs, std::mt19937& rng) {
    Ops* cpu = cpu_ops(0);
    CAPTURE(std::string(cs.name));
    const int hd = cs.head_dim, kv_dim = cs.n_kv_heads * hd, bs = cs.block_size;
    int blocks = 0;
    for (Piece p : cs.pieces) blocks += (p.start + p.count + bs - 1) / bs;
    std::vector<int> ids(static_cast<size_t>(blocks));
    for (int i = 0; i < blocks; i++) ids[size_t(i)] = i;
    std::shuffle(ids.begin(), ids.end(), rng);
    std::vector<int> tables, positions, offsets;
    for (Piece p : cs.pieces) {
        const int offset = int(tables.size()), nb = (p.start + p.count + bs - 1) / bs;
        tables.insert(tables.end(), ids.begin() + offset, ids.begin() + offset + nb);
        for (int i = 0; i < p.count; i++) positions.push_back(p.start + i), offsets.push_back(offset);
    }
    const int n = int(positions.size());
    bool runs = false, singles = false;
    for (size_t t = 0; t < offsets.size(); t++) (shares_table(offsets, t) ? runs : singles) = true;
    // Cache contents and queries: random, the cache rounded to bf16 (the CPU reads the same values).
    const size_t cache = size_t(blocks) * bs * kv_dim;
    std::vector<float> kc = randn(cache, rng), vc = randn(cache, rng), q = randn(size_t(n) * cs.n_heads * hd, rng);
    std::vector<uint16_t> kb(cache), vb(cache);
    convert_floats(kc.data(), DType::F32, kb.data(), DType::BF16, cache);
    convert_floats(vc.data(), DType::F32, vb.data(), DType::BF16, cache);
    convert_floats(kb.data(), DType::BF16, kc.data(), DType::F32, cache);
    convert_floats(vb.data(), DType::BF16, vc.data(), DType::F32, cache);
    std::vector<float> want(size_t(n) * cs.n_heads * hd);
    AttentionBatch hb{positions.data(), tables.data(), offsets.data(), bs, cs.n_heads, cs.n_kv_heads, hd, cs.max_len};
    cpu->attention(want.data(), q.data(), kc.data(), vc.data(), hb, n);

    Buffer dkc = put(g, kb), dvc = put(g, vb), dq = put(g, q), dpos = put(g, positions), dtab = put(g, tables),
           doff = put(g, offsets);
    struct Hints { const char* what; bool runs, singles; };
    for (Hints h : {Hints{"exact hints", runs, singles}, Hints{"defaults", false, true}, Hints{"runs and singles", runs, true}}) {
        CAPTURE(std::string(h.what));
        AttentionBatch db{static_cast<const int*>(dpos.data()), static_cast<const int*>(dtab.data()),
                          static_cast<const int*>(doff.data()), bs, cs.n_heads, cs.n_kv_heads, hd, cs.max_len};
        db.has_runs = h.runs;
        db.has_singles = h.singles;
        Buffer out = poisoned(g, want.size());
        g->attention(out.f32(), dq.f32(), dkc.data(), dvc.data(), db, n);
        const double err = worst_row_rel_l2(get(g, out, want.size()), want, size_t(cs.n_heads) * hd);
        MESSAGE(std::string(cs.name) << ", " << std::string(h.what) << ": worst token relative L2 error " << err);
        // f32-level on both kernels: the tiled one's bf16 hi + lo operands carry 16 bits
        CHECK(err < 1e-4);
    }
}

TEST_CASE("gpu: tiled attention over runs beside flash-decoding tokens matches the CPU twin (short contexts)") {
    Ops* g = gpu();
    if (!g) return;
    std::mt19937 rng(4242);
    for (const AttentionCase& cs : std::vector<AttentionCase>{
             {"GQA 8 hd64 bs32, one verify run (no decode tokens: splits)", 16, 2, 64, 32, 1600, {{1490, 9}}},
             {"GQA 3 hd96: a token's heads across two tiles", 6, 2, 96, 16, 300, {{0, 30}, {2, 1}, {40, 25}, {7, 3}}},
             {"MHA hd32, two runs side by side, no decode tokens", 8, 8, 32, 16, 200, {{0, 33}, {10, 30}}},
             {"GQA 2 hd256 (the tiled kernel where shared memory allows)", 4, 2, 256, 16, 400, {{0, 100}, {50, 1}}},
             {"hd8: the flash-decoding kernel for everything", 8, 4, 8, 16, 100, {{0, 20}, {3, 1}}}})
        check_attention_case(g, cs, rng);
}

TEST_CASE("gpu: tiled attention over runs beside flash-decoding tokens matches the CPU twin (long contexts)") {
    Ops* g = gpu();
    if (!g) return;
    std::mt19937 rng(4343);
    for (const AttentionCase& cs : std::vector<AttentionCase>{
             {"MHA hd64 bs16, prompts and chunks among decodes", 4, 4, 64, 16, 1600,
              {{37, 1}, {0, 45}, {120, 77}, {300, 1}, {1499, 1}, {0, 1}}},
             {"GQA 4 hd128 bs32, a 1500-token prompt", 8, 2, 128, 32, 1600, {{5, 1}, {0, 1500}, {1499, 1}, {63, 1}}},
             {"GQA 8 hd128 bs16, chunks of two sequences", 8, 1, 128, 16, 1200,
              {{700, 1}, {0, 63}, {1000, 20}, {5, 1}, {33, 31}}},
             {"GQA 4 hd128 bs16, a long chunk after a cached prefix", 16, 4, 128, 16, 2100, {{1000, 600}, {3, 1}}}})
        check_attention_case(g, cs, rng);
}

TEST_CASE("gpu: rope_kv_write with a negative slot (padding) rotates q and k and writes no K/V") {
    Ops* g = gpu();
    if (!g) return;
    Ops* cpu = cpu_ops(0);
    std::mt19937 rng(31);
    const int n = 3, n_heads = 4, n_kv_heads = 2, hd = 32, kv_dim = n_kv_heads * hd, slots_total = 16;
    const std::vector<int> slots = {5, -1, 9}, cpu_slots = {5, 15, 9};  // the CPU writes token 1 to a spare slot
    std::vector<float> rope(size_t(n) * hd);
    for (int t = 0; t < n; t++)
        for (int i = 0; i < hd / 2; i++) {
            const double a = (7 + t) * std::pow(10000.0, -2.0 * i / hd);
            rope[size_t(t) * hd + 2 * i] = float(std::cos(a)), rope[size_t(t) * hd + 2 * i + 1] = float(std::sin(a));
        }
    std::vector<float> q = randn(size_t(n) * n_heads * hd, rng), k = randn(size_t(n) * kv_dim, rng), v = randn(size_t(n) * kv_dim, rng);
    std::vector<float> kc = randn(size_t(slots_total) * kv_dim, rng), vc = randn(size_t(slots_total) * kv_dim, rng);
    std::vector<uint16_t> kb(kc.size()), vb(vc.size());
    convert_floats(kc.data(), DType::F32, kb.data(), DType::BF16, kc.size());
    convert_floats(vc.data(), DType::F32, vb.data(), DType::BF16, vc.size());
    Buffer dq = put(g, q), dk = put(g, k), dv = put(g, v), drope = put(g, rope), dslots = put(g, slots), dkc = put(g, kb),
           dvc = put(g, vb);
    std::vector<float> kc2 = kc, vc2 = vc;
    cpu->rope_kv_write(q.data(), k.data(), v.data(), kc2.data(), vc2.data(), rope.data(), cpu_slots.data(), n, n_heads,
                       n_kv_heads, hd);
    g->rope_kv_write(dq.f32(), dk.f32(), dv.f32(), dkc.data(), dvc.data(), drope.f32(), static_cast<const int*>(dslots.data()),
                     n, n_heads, n_kv_heads, hd);
    CHECK(rel_l2(get(g, dq, q.size()), q) < 1e-6);
    CHECK(rel_l2(get(g, dk, k.size()), k) < 1e-6);
    std::vector<uint16_t> kb2(kb.size()), vb2(vb.size());
    g->download(kb2.data(), dkc.data(), kb2.size() * 2);
    g->download(vb2.data(), dvc.data(), vb2.size() * 2);
    for (int s = 0; s < slots_total; s++) {
        CAPTURE(s);
        const size_t at = size_t(s) * kv_dim;
        if (s != 5 && s != 9) {  // untouched, bit for bit (slot 15 included)
            CHECK(std::equal(kb2.begin() + at, kb2.begin() + at + kv_dim, kb.begin() + at));
            CHECK(std::equal(vb2.begin() + at, vb2.begin() + at + kv_dim, vb.begin() + at));
            continue;
        }
        std::vector<float> a(static_cast<size_t>(kv_dim)), b(kc2.begin() + at, kc2.begin() + at + kv_dim);
        convert_floats(kb2.data() + at, DType::BF16, a.data(), DType::F32, size_t(kv_dim));
        CHECK(rel_l2(a, b) < 5e-3);  // the CPU's f32 row, rounded to bf16
        std::vector<float> c(static_cast<size_t>(kv_dim)), d(vc2.begin() + at, vc2.begin() + at + kv_dim);
        convert_floats(vb2.data() + at, DType::BF16, c.data(), DType::F32, size_t(kv_dim));
        CHECK(rel_l2(c, d) < 5e-3);
    }
}

TEST_CASE("gpu: mixed batches and bucketed CUDA graphs: logits match the CPU, padding writes no K/V") {
    Ops* g = gpu();
    if (!g) return;
    const std::string path = bucket_model();
    Model cpu(path, cpu_ops(0)), dev(path, g);
    dev.reserve_scratch(64, 64);  // as generate does: no buffer moves (which drop the graphs) later
    KVCache kc(cpu.cfg, 1024, 16), kg(dev.cfg, 1024, 16);
    const int V = cpu.cfg.vocab_size;
    for (const BucketStep& st : bucket_scenario(V)) {
        CAPTURE(st.what);
        for (const BatchToken& t : st.batch) {
            REQUIRE(kc.reserve(t.seq, t.pos + 1));
            REQUIRE(kg.reserve(t.seq, t.pos + 1));
        }
        std::vector<float> want(st.rows.size() * size_t(V)), got(want.size());
        cpu.forward(kc, st.batch, st.rows, want.data());
        const size_t bytes = kg.bytes() / 2;  // of K, and of V (0 before the first forward)
        std::vector<uint8_t> k0(bytes), v0(bytes), k1(bytes), v1(bytes);
        if (bytes > 0) g->download(k0.data(), kg.k.data(), bytes), g->download(v0.data(), kg.v.data(), bytes);
        dev.forward(kg, st.batch, st.rows, got.data());
        CHECK(worst_rel_error(got, want, V) < 3e-2);  // bf16 KV cache (and bf16 cuBLAS operands past 8 entries)
        if (bytes == 0) continue;
        // No slot but the batch's own changed: the padding entries wrote nothing.
        g->download(k1.data(), kg.k.data(), bytes);
        g->download(v1.data(), kg.v.data(), bytes);
        std::set<int> written;
        for (const BatchToken& t : st.batch) written.insert(kg.tables[t.seq][size_t(t.pos / 16)] * 16 + t.pos % 16);
        const size_t slot_bytes = size_t(kg.kv_dim) * 2, layer = kg.layer_bytes();
        int changed = 0;
        for (size_t at = 0; at < bytes; at += slot_bytes) {
            if (written.count(int((at % layer) / slot_bytes))) continue;
            changed += std::memcmp(k0.data() + at, k1.data() + at, slot_bytes) != 0;
            changed += std::memcmp(v0.data() + at, v1.data() + at, slot_bytes) != 0;
        }
        CHECK(changed == 0);
    }
    // buckets 2, 4 (also the gathered rows' steps), 8 (verify), 8 without the classifier, 16
    CHECK(dev.graphs_captured() == 5);
}

TEST_CASE("gpu: argmax and top-k / top-p sampling on the device match the host Sampler") {
    Ops* g = gpu();
    if (!g) return;
    std::mt19937 rng(5);
    struct P { float temperature; int top_k; float top_p; };
    for (int vocab : {512, 32000, 128256})
        for (P p : {P{0.0f, 200, 1.0f}, P{0.8f, 0, 1.0f}, P{0.8f, 40, 1.0f}, P{1.0f, 0, 0.9f}, P{0.7f, 200, 0.5f}}) {
            CAPTURE(vocab);
            CAPTURE(p.temperature);
            CAPTURE(p.top_k);
            CAPTURE(p.top_p);
            SamplingParams sp{p.temperature, p.top_k, p.top_p};
            const int rows = 4, trials = 25;
            int mismatches = 0;
            for (int trial = 0; trial < trials; trial++) {
                std::vector<float> logits = randn(size_t(rows) * vocab, rng, 2.0f);
                if (trial == 0) logits[size_t(vocab) / 2] = logits[size_t(vocab) / 3] = 50.0f;  // a tie: the lower id wins
                Buffer dl = put(g, logits);
                std::vector<float> u(static_cast<size_t>(rows));
                std::vector<int> want(static_cast<size_t>(rows)), got(static_cast<size_t>(rows), -1);
                for (int r = 0; r < rows; r++) {
                    Sampler a(sp, uint64_t(trial) * 131 + r), b = a;  // b draws the u that a hands over
                    u[size_t(r)] = a.uniform();
                    want[size_t(r)] = b.sample(logits.data() + size_t(r) * vocab, vocab);
                }
                g->sample(got.data(), dl.f32(), rows, vocab, sp, u.data());
                for (int r = 0; r < rows; r++) mismatches += got[size_t(r)] != want[size_t(r)];
            }
            // Greedy must agree exactly; sampling may differ only where u falls within rounding of
            // a boundary between two tokens' mass (sums in another order).
            if (p.temperature == 0.0f) CHECK(mismatches == 0);
            else CHECK(mismatches <= 1);
        }
}

TEST_CASE("gpu: tiny random models: logits on the GPU match the CPU backend, prefill and token by token") {
    Ops* g = gpu();
    if (!g) return;
    // quant: a convert mode, or "gguf" for write_gguf_like_model's Q8_0 + Q4_1 formats
    struct M { const char* name; Config c; DType dtype; const char* quant; };
    Config moe = tiny_config(64, 96, 2, 8, 4, false);
    moe.n_experts = 4, moe.n_experts_per_tok = 2;
    std::vector<M> models = {{"f32 GQA", tiny_config(64, 172, 2, 8, 4, false), DType::F32, nullptr},
                             {"bf16 MHA tied", tiny_config(128, 344, 3, 4, 4, true), DType::BF16, nullptr},
                             {"f16 GQA 8/2", tiny_config(128, 256, 2, 8, 2, false), DType::F16, nullptr},
                             {"int8", tiny_config(64, 172, 2, 8, 4, false), DType::F32, "int8"},
                             {"int4", tiny_config(64, 192, 2, 8, 4, false), DType::F32, "int4"},
                             {"GGUF Q8_0 + Q4_1 tied", tiny_config(128, 256, 2, 4, 2, true), DType::F32, "gguf"},
                             {"GGUF Q8_0 + Q4_1 GQA", tiny_config(192, 320, 2, 6, 3, false), DType::F32, "gguf"},
                             {"MoE", moe, DType::F32, nullptr}};
    int seed = 11;
    for (const M& m : models) {
        CAPTURE(std::string(m.name));
        std::string path = temp_dir() + "/gpu-" + std::to_string(seed) + ".bin";
        if (m.quant && std::string(m.quant) == "gguf") write_gguf_like_model(random_weights(m.c, unsigned(seed++)), path);
        else write_model_bin(random_weights(m.c, unsigned(seed++)), path, m.dtype);
        if (m.quant && std::string(m.quant) != "gguf") {
            ConvertOptions o;
            o.input = path;
            o.output = path + ".q";
            o.mode = m.quant;
            o.progress = false;
            convert_checkpoint(o);
            path = o.output;
        }
        Model cpu(path, cpu_ops(0)), dev(path, g);
        std::vector<int> tokens = random_tokens(40, m.c.vocab_size, unsigned(seed));
        // bf16 KV cache and (prefill) bf16 operands on the GPU: bf16-level differences. int8 / int4
        // models: the CPU's matmuls also round x to 15 bits per 32-column block (matmul_tolerance),
        // ~1e-4 of the logits, well inside the bf16 differences.
        const int V = m.c.vocab_size;
        const double tol = 3e-2;
        const double pre = worst_rel_error(prefill_logits(dev, tokens), prefill_logits(cpu, tokens), V);
        const double dec = worst_rel_error(decode_logits(dev, tokens), decode_logits(cpu, tokens), V);
        MESSAGE(std::string(m.name) << ": worst relative logit error GPU vs CPU: prefill " << pre << ", decode " << dec);
        CHECK(pre < tol);
        CHECK(dec < tol);
    }
}

TEST_CASE("gpu: stories260K greedy text on the GPU equals the CPU's, with graphs and device sampling") {
    Ops* g = gpu();
    if (!g) return;
    std::unique_ptr<Model> a, b;
    Model& cpu = stories260k_bin(cpu_ops(0), a);
    Model& dev = stories260k_bin(g, b);
    auto run = [](Model& m) {
        KVCache kv(m.cfg, m.cfg.max_seq_len);
        SamplingParams p{0.0f, 0, 1.0f};
        Sampler s(p, 1);
        std::vector<int> out;
        decode(m, kv, {m.cfg.bos_id}, 200, s, nullptr, 0, [&](int id) {
            out.push_back(id);
            return true;
        });
        return out;
    };
    std::vector<int> want = run(cpu), got = run(dev);
    CHECK(want.size() >= 150);
    CHECK(got == want);
    // Sampled with a seed: the device's draws follow the host's (same uniforms, same rules).
    auto sampled = [](Model& m) {
        KVCache kv(m.cfg, m.cfg.max_seq_len);
        Sampler s(SamplingParams{0.8f, 40, 0.95f}, 42);
        std::vector<int> out;
        decode(m, kv, {m.cfg.bos_id}, 100, s, nullptr, 0, [&](int id) {
            out.push_back(id);
            return true;
        });
        return out;
    };
    std::vector<int> ws = sampled(cpu), gs = sampled(dev);
    size_t same = 0;
    while (same < std::min(ws.size(), gs.size()) && ws[same] == gs[same]) same++;
    MESSAGE("sampled text: first " << same << " of " << ws.size() << " tokens agree");
    CHECK(same >= 20);  // until a near-tie in the logits (bf16 KV cache) sends them apart
}

TEST_CASE("gpu: continuous batching over the prefix cache: the same greedy text as without it") {
    Ops* g = gpu();
    if (!g) return;
    std::unique_ptr<Model> b;
    Model& dev = stories260k_bin(g, b);
    Tokenizer tok(dev.tokenizer_model, "stories260K");
    // Two shared prefixes (37 and 21 tokens: neither a multiple of the block), five questions each.
    const std::vector<int> story = tok.encode(
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
        "friends, and one day she saw a big red ball under a tree.", true, false);
    REQUIRE(story.size() >= 37);
    const std::vector<std::string> questions = {" Then", " The dog", " Her mom said", " They", " So she"};
    std::vector<Request> reqs;
    for (int p = 0; p < 2; p++)
        for (size_t q = 0; q < questions.size(); q++) {
            Request r;
            r.id = "r" + std::to_string(reqs.size());
            r.prompt.assign(story.begin(), story.begin() + (p == 0 ? 37 : 21));
            const std::vector<int> more = tok.encode(questions[q], false, false);
            r.prompt.insert(r.prompt.end(), more.begin(), more.end());
            r.max_new_tokens = 24;
            r.sampling = {0.0f, 0, 1.0f};
            reqs.push_back(r);
        }
    auto run = [&](bool cache, BatchStats* st) {
        KVCache kv(dev.cfg, dev.cfg.max_seq_len * 4);
        kv.prefix_cache = cache;
        BatchOptions opt;
        opt.max_batch_tokens = 48;
        opt.max_seqs = 3;
        std::map<std::string, std::vector<int>> out;
        BatchRunner runner(dev, kv, nullptr, opt, [&](const Result& r) { out[r.id] = r.tokens; });
        for (const Request& r : reqs) runner.add(r);
        runner.run();
        *st = runner.stats();
        CHECK(kv.held_blocks() == 0);
        CHECK(kv.check() == "");
        return out;
    };
    BatchStats with_st, without_st;
    const auto with = run(true, &with_st), without = run(false, &without_st);
    CHECK(with_st.prefix_hit_tokens >= 32);
    CHECK(without_st.prefix_hit_tokens == 0);
    REQUIRE(with.size() == reqs.size());
    for (const Request& r : reqs) {
        CAPTURE(r.id);
        CHECK(with.at(r.id) == without.at(r.id));
    }
}

TEST_CASE("gpu: SmolLM2-135M (Q8_0 embedding, Q4_1 layers): logits and greedy tokens on the GPU match the CPU") {
    Ops* g = gpu();
    if (!g) return;
    // scripts/get_smollm2.sh makes it; 113 MB, so it is not in the repository.
    const std::string path = "models/smollm2-135m-instruct.bin";
    struct stat st;
    if (stat(path.c_str(), &st) != 0) {
        MESSAGE("skipped: no " << path << " (run scripts/get_smollm2.sh)");
        return;
    }
    Model cpu(path, cpu_ops(0)), dev(path, g);
    REQUIRE(dev.w.tok_embeddings.dtype == DType::I8);
    REQUIRE(dev.w.tok_embeddings.group == 32);
    REQUIRE(dev.w.layers[0].wq.mins != nullptr);
    // A story's first 48 tokens (its BPE ids, tests/data): every position's logits, as one prefill
    // batch (cuBLAS over dequantized bf16) and token by token (the GEMV kernels, graphs).
    std::ifstream in("tests/data/smollm2_tinystory_ids.txt");
    REQUIRE(in.good());
    std::vector<int> tokens;
    for (std::string id; tokens.size() < 48 && std::getline(in, id, ',');) tokens.push_back(std::stoi(id));
    REQUIRE(tokens.size() == 48);
    const int V = cpu.cfg.vocab_size;
    const double pre = worst_rel_error(prefill_logits(dev, tokens), prefill_logits(cpu, tokens), V);
    const double dec = worst_rel_error(decode_logits(dev, tokens), decode_logits(cpu, tokens), V);
    MESSAGE("SmolLM2 worst relative logit error GPU vs CPU: prefill " << pre << ", decode " << dec);
    CHECK(pre < 5e-2);  // bf16 operands (cuBLAS) and bf16 KV cache through 30 layers
    CHECK(dec < 3e-2);  // f32 GEMV arithmetic, bf16 KV cache
    // Greedy from the story's first 16 tokens, 20 more on the GPU (device argmax, captured decode
    // steps). Each pick must be the CPU's argmax after the same prefix, except where the CPU's top
    // two are nearly tied (this continuation has a step whose top two differ by 0.1% of the
    // largest logit, which bf16 rounding may flip).
    const std::vector<int> prompt(tokens.begin(), tokens.begin() + 16);
    KVCache kv(dev.cfg, 64);
    Sampler s(SamplingParams{0.0f, 0, 1.0f}, 1);
    std::vector<int> got;
    decode(dev, kv, prompt, 20, s, nullptr, 0, [&](int id) {
        got.push_back(id);
        return true;
    });
    REQUIRE(got.size() == 20);
    std::vector<int> seq = prompt;
    seq.insert(seq.end(), got.begin(), got.end());
    const std::vector<float> want = prefill_logits(cpu, seq);
    int near_ties = 0;
    for (size_t i = 0; i < got.size(); i++) {
        const float* row = want.data() + (prompt.size() - 1 + i) * size_t(V);
        const int best = int(std::max_element(row, row + V) - row);
        float scale = 0;
        for (int j = 0; j < V; j++) scale = std::max(scale, std::fabs(row[j]));
        CAPTURE(i);
        CAPTURE(best);
        CAPTURE(got[i]);
        if (got[i] == best) continue;
        near_ties++;
        CHECK((row[best] - row[got[i]]) / scale < 1e-2);
    }
    MESSAGE("SmolLM2 greedy on the GPU: " << near_ties << " of 20 picks differ from the CPU's argmax (near ties)");
    CHECK(near_ties <= 2);
}

}  // TEST_SUITE
