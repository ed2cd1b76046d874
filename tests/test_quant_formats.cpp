// tests/test_quant_formats.cpp: the GGUF-shaped weight formats: grouped int8 (Q8_0: a scale per
// group of 32) and int4 with float minimums (Q4_1: w = q * scale + min). The CPU kernels against
// sums computed here in double from the raw values, batch invariance, a tiny model in these formats
// against scripts/reference.py (which dequantizes through scripts/modelbin.py), its tensor-parallel
// shards against the whole model, the loader's refusals, and quantize re-encoding such a file.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <list>
#include <map>
#include <random>

#include "common.h"
#include "convert.h"
#include "test_util.h"
#include "tp.h"

namespace {

// ---------------------------------------------------------------------------------------------
// Matrices from raw values

enum class Fmt { I8Group, I4Zeros, I4Mins };

// A grouped matrix made of random raw values (not through any quantizer): int8 q, or 4-bit q
// packed two per byte (low nibble = even column), and per group a scale and a zero point or a
// minimum. weight(r, c) is the exact value in double, the reference the kernels are held to.
struct RawMatrix {
    Fmt fmt;
    int rows, cols, group;
    std::vector<int8_t> q8;       // [rows][cols]
    std::vector<uint8_t> q4;      // [rows][cols/2]
    std::vector<float> scales;    // [rows][cols/group]
    std::vector<uint8_t> zeros;   // I4Zeros
    std::vector<float> mins;      // I4Mins

    RawMatrix(Fmt f, int r, int c, int g, unsigned seed) : fmt(f), rows(r), cols(c), group(g) {
        std::mt19937 rng(seed);
        std::uniform_real_distribution<float> scale(0.002f, 0.02f), min(-0.15f, 0.05f);
        const size_t n = size_t(rows) * cols, ng = n / size_t(group);
        for (size_t i = 0; i < ng; i++) scales.push_back(scale(rng));
        if (f == Fmt::I8Group) {
            for (size_t i = 0; i < n; i++) q8.push_back(int8_t(int(rng() % 255) - 127));
            return;
        }
        for (size_t i = 0; i < n / 2; i++) q4.push_back(uint8_t(rng() & 0xff));
        for (size_t i = 0; i < ng; i++) {
            if (f == Fmt::I4Zeros) zeros.push_back(uint8_t(rng() % 16));
            else mins.push_back(min(rng));
        }
    }
    int level(int r, int c) const {  // the 4-bit q of (r, c)
        uint8_t b = q4[(size_t(r) * cols + c) / 2];
        return c % 2 ? b >> 4 : b & 0xf;
    }
    double weight(int r, int c) const {
        const size_t g = size_t(r) * (cols / group) + size_t(c / group);
        if (fmt == Fmt::I8Group) return double(q8[size_t(r) * cols + c]) * scales[g];
        if (fmt == Fmt::I4Zeros) return double(level(r, c) - zeros[g]) * scales[g];
        return double(level(r, c)) * scales[g] + mins[g];
    }
    // The largest magnitude the kernel's arithmetic handles for (r, c): the terms it sums.
    double magnitude(int r, int c) const {
        const size_t g = size_t(r) * (cols / group) + size_t(c / group);
        if (fmt == Fmt::I4Mins) return double(level(r, c)) * scales[g] + std::fabs(mins[g]);
        if (fmt == Fmt::I4Zeros) return double(level(r, c) + zeros[g]) * scales[g];
        return std::fabs(weight(r, c));
    }
    // Columns [c0, c0 + n) of every row, viewed as model.cpp's cols_of does (stride = cols).
    Weight view(int c0 = 0, int n = -1) const {
        Weight w{fmt == Fmt::I8Group ? DType::I8 : DType::U8, nullptr, rows, n < 0 ? cols : n, cols};
        w.data = fmt == Fmt::I8Group ? static_cast<const void*>(q8.data() + c0) : q4.data() + c0 / 2;
        w.scales = scales.data() + c0 / group;
        if (fmt == Fmt::I4Zeros) w.zeros = zeros.data() + c0 / group;
        if (fmt == Fmt::I4Mins) w.mins = mins.data() + c0 / group;
        w.group = group;
        return w;
    }
};

std::vector<float> uniform_x(int n, int cols, unsigned seed) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> ud(-1.0f, 1.0f);
    std::vector<float> x(size_t(n) * cols);
    for (float& v : x) v = ud(rng);
    return x;
}

// The kernel's x . W^T for columns [c0, c0 + n) against the double-precision sum of xr * weight,
// xr = x rounded to 15-bit integers per 32-column block as the kernel rounds it (quantize_activations).
// Tolerance: a few float roundings of the magnitudes summed (1e-5 relative); dropping a term
// (a minimum, a group's scale) or misplacing a nibble is off by orders of magnitude more. Against
// the exact x: at most the rounding (|x - xr| <= d/2 per column) times |w| more.
void check_matmul(const RawMatrix& m, int n_tokens, unsigned seed, int c0 = 0, int ncols = -1) {
    const Weight W = m.view(c0, ncols);
    std::vector<float> x = uniform_x(n_tokens, W.cols, seed), out(size_t(n_tokens) * W.rows, NAN);
    const std::vector<double> xr = rounded_activations(x, n_tokens, W.cols);
    cpu_ops(0)->matmul(out.data(), x.data(), W, n_tokens);
    int bad = 0;
    for (int t = 0; t < n_tokens; t++)
        for (int r = 0; r < W.rows; r++) {
            double ref = 0, exact = 0, mag = 0, rounding = 0;
            for (int k = 0; k < W.cols; k++) {
                const size_t i = size_t(t) * W.cols + k;
                ref += xr[i] * m.weight(r, c0 + k);
                exact += double(x[i]) * m.weight(r, c0 + k);
                mag += std::fabs(xr[i]) * m.magnitude(r, c0 + k);
                rounding += std::fabs(xr[i] - x[i]) * std::fabs(m.weight(r, c0 + k));
            }
            const double got = out[size_t(t) * W.rows + r];
            if (!(std::fabs(got - ref) <= 1e-5 * mag) && bad++ < 5)
                FAIL_CHECK("token " << t << " row " << r << ": got " << got << ", expected " << ref);
            if (!(std::fabs(got - exact) <= rounding + 1e-5 * mag) && bad++ < 5)
                FAIL_CHECK("token " << t << " row " << r << ": got " << got << ", exact x gives " << exact);
        }
    CHECK(bad == 0);
}

const char* fmt_name(Fmt f) { return f == Fmt::I8Group ? "grouped int8" : f == Fmt::I4Zeros ? "int4 zeros" : "int4 mins"; }

}  // namespace

TEST_CASE("grouped int8 and int4-with-minimums matmul against double sums of the raw values") {
    for (Fmt f : {Fmt::I8Group, Fmt::I4Mins, Fmt::I4Zeros}) {
        for (int g : {32, 64, 128}) {
            for (int groups : {1, 3, 5}) {
                for (int rows : {1, 7, 13}) {
                    RawMatrix m(f, rows, g * groups, g, unsigned(g * 7 + groups * 3 + rows));
                    for (int n = 1; n <= 9; n++) {
                        CAPTURE(std::string(fmt_name(f)));  // a const char* would print as a pointer
                        CAPTURE(g);
                        CAPTURE(groups);
                        CAPTURE(rows);
                        CAPTURE(n);
                        check_matmul(m, n, unsigned(n + 17));
                    }
                }
            }
        }
        // A tensor-parallel rank's column slice (stride > cols), on group boundaries; enough rows
        // (66) for several 4-row tiles and a tail, and two row blocks at batch 1.
        RawMatrix m(f, 66, 6 * 32, 32, 5);
        for (int n : {1, 4, 6}) {
            CAPTURE(std::string(fmt_name(f)));  // a const char* would print as a pointer
            CAPTURE(n);
            check_matmul(m, n, 23, 64, 96);
        }
        RawMatrix wide(f, 130, 576, 32, 6);  // SmolLM2's dim: 18 groups, more than 16 per row
        for (int n : {1, 5}) check_matmul(wide, n, 29);
    }
}

TEST_CASE("dequantize_row of the new formats gives the exact values") {
    for (Fmt f : {Fmt::I8Group, Fmt::I4Mins}) {
        RawMatrix m(f, 5, 96, 32, 3);
        std::vector<float> row(96);
        for (int r = 0; r < 5; r++) {
            dequantize_row(m.view(), r, row.data());
            for (int c = 0; c < 96; c++)
                if (std::fabs(row[size_t(c)] - m.weight(r, c)) > 1e-7 * (1 + std::fabs(m.weight(r, c))))
                    FAIL_CHECK(fmt_name(f) << " (" << r << ", " << c << "): " << row[size_t(c)] << " vs " << m.weight(r, c));
        }
    }
}

TEST_CASE("new formats: a token's output is bitwise the same alone and in any batch") {
    for (Fmt f : {Fmt::I8Group, Fmt::I4Mins}) {
        CAPTURE(std::string(fmt_name(f)));  // a const char* would print as a pointer
        RawMatrix m(f, 71, 5 * 32, 32, 11);  // 71 rows: 4-row tiles and a 3-row tail
        const Weight W = m.view();
        const int n = 9;
        std::vector<float> x = uniform_x(n, W.cols, 3), batch(size_t(n) * W.rows), alone(size_t(W.rows));
        cpu_ops(0)->matmul(batch.data(), x.data(), W, n);
        for (int t = 0; t < n; t++) {
            cpu_ops(0)->matmul(alone.data(), x.data() + size_t(t) * W.cols, W, 1);
            CHECK_MESSAGE(std::memcmp(alone.data(), batch.data() + size_t(t) * W.rows, alone.size() * 4) == 0, "token " << t);
        }
        // Tokens 2..6 as a batch of 5 (a 4-token tile, then a 1-token one): each as in the batch of 9.
        std::vector<float> five(size_t(5) * W.rows);
        cpu_ops(0)->matmul(five.data(), x.data() + size_t(2) * W.cols, W, 5);
        CHECK(std::memcmp(five.data(), batch.data() + size_t(2) * W.rows, five.size() * 4) == 0);
    }
}

namespace {

// ---------------------------------------------------------------------------------------------
// Tiny models in these formats

// What a matrix of a test model is stored as; group 0 keeps it f32.
struct Store {
    Fmt fmt = Fmt::I8Group;
    int group = 0;
};

// One tensor of a model.bin under construction: the test edits these before writing.
struct Entry {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
};

template <typename T>
std::vector<uint8_t> as_bytes(const std::vector<T>& v) {
    std::vector<uint8_t> b(v.size() * sizeof(T));
    std::memcpy(b.data(), v.data(), b.size());
    return b;
}

// Quantizes w [rows][cols] as GGUF does, written here and not through the library: Q8_0-style
// grouped int8 (s = max|w| / 127, q = round(w / s)) or Q4_1-style int4 (m = min, s = (max - min)
// / 15, q = round((w - m) / s)). Q4_0-style zero points use the library's quantize_row_int4.
std::vector<Entry> quantize_matrix(const std::string& name, const std::vector<float>& w, int rows, int cols, Store s) {
    const int g = s.group, ng = cols / g;
    std::vector<float> scales(size_t(rows) * ng), mins;
    if (s.fmt == Fmt::I8Group) {
        std::vector<int8_t> q(w.size());
        for (size_t gi = 0; gi < scales.size(); gi++) {
            float amax = 0;
            for (int i = 0; i < g; i++) amax = std::max(amax, std::fabs(w[gi * g + size_t(i)]));
            const float sc = amax > 0 ? amax / 127 : 1;
            scales[gi] = sc;
            for (int i = 0; i < g; i++) q[gi * g + size_t(i)] = int8_t(std::nearbyint(w[gi * g + size_t(i)] / sc));
        }
        return {{name, DType::I8, {rows, cols}, as_bytes(q)}, {name + ".scales", DType::F32, {rows, ng}, as_bytes(scales)}};
    }
    std::vector<uint8_t> packed(w.size() / 2), zeros(scales.size());
    if (s.fmt == Fmt::I4Zeros) {
        for (int r = 0; r < rows; r++)
            quantize_row_int4(w.data() + size_t(r) * cols, cols, g, packed.data() + size_t(r) * cols / 2,
                              scales.data() + size_t(r) * ng, zeros.data() + size_t(r) * ng);
        return {{name, DType::U8, {rows, cols / 2}, packed},
                {name + ".scales", DType::F32, {rows, ng}, as_bytes(scales)},
                {name + ".zeros", DType::U8, {rows, ng}, zeros}};
    }
    mins.resize(scales.size());
    for (size_t gi = 0; gi < scales.size(); gi++) {
        const float* p = w.data() + gi * g;
        const float lo = *std::min_element(p, p + g), hi = *std::max_element(p, p + g);
        const float sc = hi > lo ? (hi - lo) / 15 : 1;
        scales[gi] = sc;
        mins[gi] = lo;
        for (int i = 0; i < g; i++) {
            const int q = int(std::clamp(std::nearbyint((p[i] - lo) / sc), 0.0f, 15.0f));
            packed[(gi * g + size_t(i)) / 2] |= uint8_t(i % 2 ? q << 4 : q);
        }
    }
    return {{name, DType::U8, {rows, cols / 2}, packed},
            {name + ".scales", DType::F32, {rows, ng}, as_bytes(scales)},
            {name + ".mins", DType::F32, {rows, ng}, as_bytes(mins)}};
}

// The tensors of a model.bin holding tw, each matrix stored as `store` says (f32 when absent).
std::vector<Entry> model_entries(const TinyWeights& tw, const std::map<std::string, Store>& store) {
    std::vector<Entry> out;
    for (auto& [name, v] : tw.tensors) {
        const std::vector<int64_t> shape = tw.shape_of(name);
        auto it = store.find(name);
        if (it == store.end()) {
            out.push_back({name, DType::F32, shape, as_bytes(v)});
            continue;
        }
        for (Entry& e : quantize_matrix(name, v, int(shape[0]), int(shape[1]), it->second)) out.push_back(std::move(e));
    }
    static const std::string tok = read_file(models_dir() + "/tok512.model");
    out.push_back({"tokenizer.model", DType::U8, {int64_t(tok.size())}, std::vector<uint8_t>(tok.begin(), tok.end())});
    return out;
}

void write_entries(const std::vector<Entry>& entries, const Config& c, const std::string& path,
                   const std::string& quantization = "gguf-Q4_1+Q8_0",
                   const std::map<std::string, std::string>& extra_metadata = {}) {
    SafetensorsWriter w;
    w.metadata = {{"format", kFormatName}, {"version", kFormatVersion}, {"config", c.to_json()},
                  {"quantization", quantization}};
    for (const auto& [k, v] : extra_metadata) w.metadata[k] = v;
    for (const Entry& e : entries) w.add_bytes(e.name, e.dtype, e.shape, e.bytes.data());
    w.write(path);
}

// A model as a GGUF Q4_1 import of SmolLM2 looks: Q8_0 (grouped int8, group 32) embedding, tied
// or with an int4-with-minimums classifier; Q4_1 (int4 with minimums) attention and FFN, except
// a few matrices in the other grouped formats and group sizes so every kind meets every role.
std::map<std::string, Store> gguf_like(const Config& c) {
    std::map<std::string, Store> s;
    s["tok_embeddings.weight"] = {Fmt::I8Group, 32};
    if (!c.tie_embeddings) s["output.weight"] = {Fmt::I4Mins, 32};
    for (int l = 0; l < c.n_layers; l++)
        for (const char* m : {"attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
                              "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight"})
            s[layer_tensor(l, m)] = {Fmt::I4Mins, 32};
    s[layer_tensor(0, "attention.wo.weight")] = {Fmt::I8Group, 64};
    s[layer_tensor(0, "feed_forward.w2.weight")] = {Fmt::I4Zeros, 64};  // Q4_0-style
    s[layer_tensor(c.n_layers - 1, "feed_forward.w2.weight")] = {Fmt::I8Group, 32};
    s[layer_tensor(c.n_layers - 1, "attention.wv.weight")] = {Fmt::I4Mins, 64};
    return s;
}

void check_close(const std::vector<float>& ours, const std::vector<float>& ref, int vocab, double tol) {
    double worst = worst_rel_error(ours, ref, vocab);
    MESSAGE("worst relative error " << worst);
    CHECK(worst < tol);
}

std::string mpirun(int ranks) {
    return "OMP_NUM_THREADS=1 timeout 120 mpirun --allow-run-as-root --oversubscribe -np " + std::to_string(ranks) +
           " build/run_tests -tc='quant formats tp worker*' --no-skip --no-colors";
}

}  // namespace

TEST_CASE("a model in GGUF-shaped formats matches the PyTorch reference at every position") {
    // 192 = 6 groups of 32 or 3 of 64: odd group counts per row.
    Config tied = tiny_config(128, 256, 2, 4, 2, true), untied = tiny_config(192, 320, 2, 6, 3, false);
    int idx = 0;
    for (const Config& c : {tied, untied}) {
        CAPTURE(c.tie_embeddings);
        const std::string path = temp_dir() + "/formats" + std::to_string(idx++) + ".bin";
        write_entries(model_entries(random_weights(c, 31 + unsigned(idx)), gguf_like(c)), c, path);
        Model m(path, cpu_ops(0));
        CHECK(m.w.tok_embeddings.dtype == DType::I8);
        CHECK(m.w.tok_embeddings.group == 32);
        CHECK(m.w.layers[0].wq.mins != nullptr);
        CHECK(m.w.layers[0].w2.zeros != nullptr);
        CHECK(m.w.layers[0].wo.group == 64);
        // Grouped int8 reads 1 + 4/32 bytes a weight, int4 with minimums 1/2 + 8/32.
        const size_t d = size_t(c.dim), v = size_t(c.vocab_size);
        CHECK(m.w.tok_embeddings.bytes() == v * d + v * d / 32 * 4);
        CHECK(m.w.layers[0].wq.bytes() == m.w.layers[0].wq.rows * d / 2 + m.w.layers[0].wq.rows * d / 32 * 8);
        const std::vector<int> tokens = random_tokens(37, c.vocab_size, 5);
        const std::vector<float> ref = reference_logits(path, tokens, c.vocab_size);
        // 1e-3, not float rounding's 1e-5: the int8/int4 matmuls round x to 15 bits per block, and
        // where our f32 x and the reference's f64 x straddle a rounding boundary the step shows.
        check_close(prefill_logits(m, tokens), ref, c.vocab_size, 1e-3);
        check_close(decode_logits(m, tokens), ref, c.vocab_size, 1e-3);
    }
}

TEST_CASE("quant formats tp worker: sharded forward equals the whole model" * doctest::skip(!launched_by_mpirun())) {
    Comm& world = mpi_world();
    CAPTURE(world.size());
    const Config c = tiny_config(128, 256, 2, 4, 2, true);
    std::map<std::string, Store> store = gguf_like(c);
    const std::string path = temp_dir() + "/tp-formats.bin";  // each rank its own, the same bytes
    write_entries(model_entries(random_weights(c, 77), store), c, path);
    Model whole(path, cpu_ops(1)), shard(path, cpu_ops(1), &world);
    CHECK(shard.weight_bytes_per_token() < whole.weight_bytes_per_token());
    const std::vector<int> tokens = random_tokens(20, c.vocab_size, 9);
    // Summation orders differ, so x differs in its last bits, and its 15-bit rounding in the
    // int8/int4 matmuls can step differently: 1e-3, not 1e-5.
    CHECK(worst_rel_error(prefill_logits(shard, tokens), prefill_logits(whole, tokens), c.vocab_size) < 1e-3);
    CHECK(worst_rel_error(decode_logits(shard, tokens), decode_logits(whole, tokens), c.vocab_size) < 1e-3);

    // wo's 128 columns in one grouped-int8 group of 128 cannot be split between ranks.
    store[layer_tensor(1, "attention.wo.weight")] = {Fmt::I8Group, 128};
    write_entries(model_entries(random_weights(c, 77), store), c, path + ".g128");
    CHECK_THROWS_WITH_AS(Model(path + ".g128", cpu_ops(1), &world),
                         doctest::Contains("tensor 'layers.1.attention.wo.weight': a tensor-parallel rank's 64 columns "
                                           "are not a multiple of the int8 group size 128"), Error);
}

TEST_CASE("tensor parallel over MPI: the GGUF-shaped formats on 2 ranks") {
    if (launched_by_mpirun()) return;
    if (std::system("command -v mpirun >/dev/null 2>&1") != 0) {
        MESSAGE("skipped: mpirun not found (bash scripts/setup.sh installs Open MPI)");
        return;
    }
    CommandResult r = run_command(mpirun(2));
    CHECK_MESSAGE(r.rc == 0, r.out << r.err);
    CHECK_MESSAGE(r.out.find("1 passed | 0 failed") != std::string::npos, r.out);
}

TEST_CASE("the loader refuses malformed grouped and int4-with-minimums matrices, naming the tensor") {
    const Config c = tiny_config(128, 256, 1, 4, 2, false);
    const TinyWeights tw = random_weights(c, 3);
    const std::map<std::string, Store> store = gguf_like(c);
    const std::string wq = layer_tensor(0, "attention.wq.weight"), wk = layer_tensor(0, "attention.wk.weight");
    const std::string emb = "tok_embeddings.weight";
    auto find = [](std::vector<Entry>& es, const std::string& name) -> Entry& {
        for (Entry& e : es)
            if (e.name == name) return e;
        FAIL("no entry " << name);
        throw std::runtime_error("unreachable");
    };
    struct Case {
        const char* what;
        std::function<void(std::vector<Entry>&)> edit;
        std::string expect;
        std::string quantization = "gguf-Q4_1+Q8_0";
    };
    const std::vector<Case> cases = {
        {"both zeros and mins",
         [&](std::vector<Entry>& es) {
             es.push_back({wq + ".zeros", DType::U8, {128, 4}, std::vector<uint8_t>(512, 8)});
         },
         "tensor '" + wq + "' has both '" + wq + ".zeros' and '" + wq + ".mins'"},
        {"neither zeros nor mins",
         [&](std::vector<Entry>& es) { find(es, wq + ".mins").name = "unrelated"; },
         "tensor '" + wq + "' is packed int4 (U8) but has neither '" + wq + ".zeros' (zero points) nor '" + wq +
             ".mins' (minimums)"},
        {"groups that do not divide the columns",
         [&](std::vector<Entry>& es) {
             for (const char* s : {".scales", ".mins"}) {
                 Entry& e = find(es, wk + s);
                 e.shape = {64, 3};
                 e.bytes.resize(64 * 3 * 4);
             }
         },
         "tensor '" + wk + "': 3 groups per row (from '" + wk + ".scales' [64, 3]) do not split its 128 columns"},
        {"a group of 16 columns (not a multiple of 32)",
         [&](std::vector<Entry>& es) {
             Entry& e = find(es, emb + ".scales");
             e.shape = {512, 8};
             e.bytes.resize(512 * 8 * 4);
         },
         "tensor '" + emb + "': 8 groups per row (from '" + emb + ".scales' [512, 8]) do not split its 128 columns "
         "into groups of a multiple of 32"},
        {"int8 scales neither per row nor per group",
         [&](std::vector<Entry>& es) {
             Entry& e = find(es, emb + ".scales");
             e.shape = {512, 2, 2};
             e.bytes.resize(512 * 4 * 4);
         },
         "tensor '" + emb + ".scales': shape [512, 2, 2], expected [512] (a scale per row) or [512, columns / group]"},
        {"grouped scales with the wrong row count",
         [&](std::vector<Entry>& es) {
             Entry& e = find(es, wq + ".scales");
             e.shape = {127, 4};
             e.bytes.resize(127 * 4 * 4);
         },
         "tensor '" + wq + ".scales': shape [127, 4], expected [128, columns / group]"},
        {"minimums with the wrong shape",
         [&](std::vector<Entry>& es) {
             Entry& e = find(es, wq + ".mins");
             e.shape = {128, 2};
             e.bytes.resize(128 * 2 * 4);
         },
         "tensor '" + wq + ".mins': expected shape [128, 4], found [128, 2]"},
        {"minimums stored as U8",
         [&](std::vector<Entry>& es) {
             Entry& e = find(es, wq + ".mins");
             e.dtype = DType::U8;
             e.bytes.resize(128 * 4);
         },
         "tensor '" + wq + ".mins': dtype U8, expected F32"},
        {"int8 with minimums",
         [&](std::vector<Entry>& es) {
             es.push_back({emb + ".mins", DType::F32, {512, 4}, std::vector<uint8_t>(512 * 4 * 4)});
         },
         "tensor '" + emb + "' is int8 (I8), which takes no '" + emb + ".mins'"},
        {"quantized matrices in a file labelled 'none'", [](std::vector<Entry>&) {},
         "tensor '" + emb + "' is quantized (I8) but the file's quantization is 'none'", "none"},
    };
    int idx = 0;
    for (const Case& k : cases) {
        CAPTURE(k.what);
        std::vector<Entry> es = model_entries(tw, store);
        k.edit(es);
        const std::string path = temp_dir() + "/bad-format" + std::to_string(idx++) + ".bin";
        write_entries(es, c, path, k.quantization);
        CHECK_THROWS_WITH_AS(Model(path, cpu_ops(0)), doctest::Contains(k.expect.c_str()), Error);
    }
}

namespace {

ConvertStats convert(const std::string& in, const std::string& out, const char* mode, bool embeddings = false,
                     int group = 32) {
    ConvertOptions o;
    o.input = in;
    o.output = out;
    o.mode = mode;
    o.group = group;
    o.quantize_embeddings = embeddings;
    o.int8_fallback = true;
    o.progress = false;
    return convert_checkpoint(o);
}

// Every tensor of a is in b with the same dtype, shape and bytes, and b has no others.
void check_same_tensors(const std::string& a, const std::string& b) {
    SafetensorsFile fa(a), fb(b);
    CHECK(fa.tensors.size() == fb.tensors.size());
    for (const auto& [name, t] : fa.tensors) {
        const TensorView* u = fb.find(name);
        REQUIRE_MESSAGE(u, name);
        CHECK_MESSAGE((u->dtype == t.dtype && u->shape == t.shape && u->nbytes == t.nbytes), name);
        if (u->nbytes == t.nbytes) CHECK_MESSAGE(std::memcmp(u->data, t.data, t.nbytes) == 0, name);
    }
}

// Matrix `name` of the quantized file q, dequantized here in double from its raw tensors, against
// the f32 tensor of the same name in file f (what quantize --mode f32 wrote).
void check_dequantized(const SafetensorsFile& q, const SafetensorsFile& f, const std::string& name) {
    const TensorView &v = q.get(name), &s = q.get(name + ".scales"), &out = f.get(name);
    REQUIRE(out.dtype == DType::F32);
    const int rows = int(out.shape[0]), cols = int(out.shape[1]);
    const int ng = s.shape.size() == 2 ? int(s.shape[1]) : 1, g = cols / ng;
    const float* sc = reinterpret_cast<const float*>(s.data);
    const TensorView *z = q.find(name + ".zeros"), *m = q.find(name + ".mins");
    const float* got = reinterpret_cast<const float*>(out.data);
    int bad = 0;
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) {
            const size_t gi = size_t(r) * ng + size_t(c / g), e = size_t(r) * cols + c;
            double w, scale;  // scale: |q * s| + |m|, what float rounding error is relative to
            if (v.dtype == DType::I8) {
                w = double(reinterpret_cast<const int8_t*>(v.data)[e]) * sc[gi];
                scale = std::fabs(w);
            } else {
                const int lv = c % 2 ? v.data[e / 2] >> 4 : v.data[e / 2] & 0xf;
                const double mn = m ? reinterpret_cast<const float*>(m->data)[gi] : 0.0;
                w = m ? lv * double(sc[gi]) + mn : (lv - z->data[gi]) * double(sc[gi]);
                scale = m ? std::fabs(lv * double(sc[gi])) + std::fabs(mn) : std::fabs(w);
            }
            // float's q * s + m rounds twice (unfused: the build does not contract), so near
            // cancellation the error is relative to the terms, not to the result
            if (std::fabs(got[e] - w) > 1e-6 * scale + 1e-9 && bad++ < 3)
                FAIL_CHECK(name << " (" << r << ", " << c << "): " << got[e] << " vs " << w);
        }
}

}  // namespace

TEST_CASE("quantize re-encodes a model.bin in the new formats: auto keeps them, other modes dequantize") {
    const std::string dir = temp_dir();
    const Config c = tiny_config(128, 256, 2, 4, 2, false);
    const std::string src = dir + "/reencode.bin";
    write_entries(model_entries(random_weights(c, 12), gguf_like(c)), c, src);
    const std::vector<int> tokens = random_tokens(12, c.vocab_size, 4);
    Model q(src, cpu_ops(0));
    const std::vector<float> q_logits = prefill_logits(q, tokens);

    // auto: every tensor copied as it is, the label kept
    ConvertStats st = convert(src, dir + "/auto.bin", "auto");
    check_same_tensors(src, dir + "/auto.bin");
    CHECK(SafetensorsFile(dir + "/auto.bin").metadata.at("quantization") == "gguf-Q4_1+Q8_0");
    CHECK(st.dtype == "gguf-Q4_1+Q8_0");
    CHECK(st.rel_errors.empty());

    // f32: each quantized matrix's exact values; the model computes the same logits
    convert(src, dir + "/f32.bin", "f32");
    {
        SafetensorsFile fq(src), ff(dir + "/f32.bin");
        CHECK(ff.metadata.at("quantization") == "none");
        CHECK(ff.tensors.size() == model_tensors(c).size() + 1);
        for (const TensorSpec& t : model_tensors(c))
            if (fq.find(t.name + ".scales")) check_dequantized(fq, ff, t.name);
        Model f(dir + "/f32.bin", cpu_ops(0));
        // (up to the quantized matmuls' 15-bit rounding of x, which f32 weights do not do)
        CHECK(worst_rel_error(prefill_logits(f, tokens), q_logits, c.vocab_size) < 1e-3);
    }

    // bf16, int8 (the embeddings stay float: F32, which holds their values exactly) and int4 of
    // everything: the quantized matrices are dequantized first, so each file is byte for byte what
    // re-encoding the f32 file (checked above) gives.
    const char* modes[] = {"bf16", "int8", "int4"};
    for (const char* mode : modes) {
        const std::string what = mode;
        CAPTURE(what);
        const std::string a = dir + "/" + mode + ".bin", b = dir + "/" + mode + "-via-f32.bin";
        const bool int4 = std::strcmp(mode, "int4") == 0;
        st = convert(src, a, mode, int4, 64);
        convert(dir + "/f32.bin", b, mode, int4, 64);
        check_same_tensors(a, b);
        CHECK(SafetensorsFile(a).metadata == SafetensorsFile(b).metadata);
        Model m(a, cpu_ops(0));
        if (int4) CHECK((m.w.tok_embeddings.dtype == DType::U8 && m.w.tok_embeddings.mins && m.w.tok_embeddings.group == 64));
        if (!int4) CHECK(m.w.tok_embeddings.dtype == (std::strcmp(mode, "bf16") == 0 ? DType::BF16 : DType::F32));
        MESSAGE(what << " re-encoding: logits relative error " << worst_rel_error(prefill_logits(m, tokens), q_logits, c.vocab_size));
    }
}

TEST_CASE("per-row int8 and int4-with-zeros files: re-encoded by quantize, dequantized by the reference") {
    const std::string dir = temp_dir();
    const Config c = tiny_config(64, 96, 2, 4, 2, false);  // w2's 96 columns: int8 fallback at group 64
    const TinyWeights tw = random_weights(c, 21);
    write_model_bin(tw, dir + "/old-f32.bin", DType::F32);
    // quantize still writes per-row int8 (here --int8-fallback's w2; the rest int4 with minimums);
    // it wrote int4 with zero points before its int4 moved to minimums, so that file comes from raw
    // entries (group 32: every matrix, w2 included, is int4 with zero points).
    convert(dir + "/old-f32.bin", dir + "/old-int4.bin", "int4", true, 64);
    std::map<std::string, Store> zeros;
    for (const TensorSpec& t : model_tensors(c))
        if (t.shape.size() == 2 && t.name.rfind("layers.", 0) == 0) zeros[t.name] = {Fmt::I4Zeros, 32};
    write_entries(model_entries(tw, zeros), c, dir + "/old-zeros.bin", "int4-g32");
    const std::vector<int> tokens = random_tokens(20, c.vocab_size, 8);
    for (const std::string old : {"old-int4", "old-zeros"}) {
        CAPTURE(old);
        const std::string path = dir + "/" + old + ".bin";
        Model q(path, cpu_ops(0));
        if (old == "old-int4") REQUIRE((q.w.layers[0].w2.dtype == DType::I8 && q.w.layers[0].w1.mins));
        else REQUIRE((q.w.layers[0].w2.zeros && q.w.layers[0].w1.zeros));
        const std::vector<float> q_logits = prefill_logits(q, tokens);
        check_close(q_logits, reference_logits(path, tokens, c.vocab_size), c.vocab_size, 1e-3);  // 1e-3: x's 15-bit rounding, as above

        convert(path, dir + "/auto.bin", "auto");
        check_same_tensors(path, dir + "/auto.bin");
        CHECK(SafetensorsFile(dir + "/auto.bin").metadata.at("quantization") == (old == "old-int4" ? "int4-g64" : "int4-g32"));
        convert(path, dir + "/f32-again.bin", "f32");
        SafetensorsFile fq(path), ff(dir + "/f32-again.bin");
        for (const TensorSpec& t : model_tensors(c))
            if (fq.find(t.name + ".scales")) check_dequantized(fq, ff, t.name);
        Model f(dir + "/f32-again.bin", cpu_ops(0));
        CHECK(worst_rel_error(prefill_logits(f, tokens), q_logits, c.vocab_size) < 1e-3);  // x's rounding
    }
}

TEST_CASE("re-encoding a GGUF import keeps its tokenizer.json and chat template") {
    const std::string dir = temp_dir();
    Config c = tiny_config(64, 128, 1, 4, 2, true);
    c.vocab_size = 672;  // tests/data/bpe_tiny.json has 660 tokens
    std::vector<Entry> es = model_entries(random_weights(c, 5), gguf_like(c));
    const std::string json = read_file("tests/data/bpe_tiny.json");
    es.back() = {"tokenizer.json", DType::U8, {int64_t(json.size())}, std::vector<uint8_t>(json.begin(), json.end())};
    const std::string tmpl = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}";
    write_entries(es, c, dir + "/import.bin", "gguf-Q4_1+Q8_0", {{"chat_template", tmpl}});
    for (const char* mode : {"auto", "int8"}) {
        const std::string what = mode, out = dir + "/import-" + what + ".bin";
        CAPTURE(what);
        convert(dir + "/import.bin", out, mode);
        SafetensorsFile f(out);
        CHECK(f.metadata.at("chat_template") == tmpl);
        CHECK(!f.find("tokenizer.model"));
        const TensorView& t = f.get("tokenizer.json");
        CHECK(std::string(reinterpret_cast<const char*>(t.data), t.nbytes) == json);
        Model m(out, cpu_ops(0));
        CHECK(m.cfg.vocab_size == 672);
    }
}
