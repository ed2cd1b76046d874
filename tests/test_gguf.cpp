// tests/test_gguf.cpp: GGUF input: the reader (every metadata type, tensor infos, refusals of bad
// files), conversion of F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors into model.bin (block values equal
// d*q (+m) computed here in double), the tokenizer (tokenizer.json from a BPE vocabulary, a
// sentencepiece model rebuilt from tok512.model's and Llama 2's pieces), a tiny converted model
// against reference.py, and a real SmolLM2 GGUF end to end (skipped when absent).
// The GGUF files are written by the small writer below, so nothing outside the test is needed.
#include <doctest/doctest.h>
#include <sentencepiece_processor.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "common.h"
#include "convert.h"
#include "gguf.h"
#include "kv_cache.h"
#include "model.h"
#include "ops.h"
#include "safetensors.h"
#include "test_util.h"
#include "tokenizer.h"

using json = nlohmann::json;

namespace {

// ---------------------------------------------------------------------------------------------
// A GGUF writer: metadata entries in the order given, tensors aligned in the data section.

struct GgufBuilder {
    uint32_t magic = 0x46554747, version = 3;
    size_t alignment = 32;
    std::string kv;
    uint64_t n_kv = 0;
    struct Tensor {
        std::string name;
        std::vector<int64_t> ne;
        uint32_t type;
        std::string data;
    };
    std::vector<Tensor> tensors;

    template <typename T>
    static void put(std::string& b, T v) {
        b.append(reinterpret_cast<const char*>(&v), sizeof v);
    }
    static void put_str(std::string& b, const std::string& s) {
        put<uint64_t>(b, s.size());
        b += s;
    }
    void key(const std::string& k, GgufType t) {
        put_str(kv, k);
        put<uint32_t>(kv, uint32_t(t));
        n_kv++;
    }
    void u32(const std::string& k, uint32_t v) { key(k, GgufType::U32), put(kv, v); }
    void f32(const std::string& k, float v) { key(k, GgufType::F32), put(kv, v); }
    void boolean(const std::string& k, bool v) { key(k, GgufType::BOOL), put<uint8_t>(kv, v); }
    void str(const std::string& k, const std::string& v) { key(k, GgufType::STRING), put_str(kv, v); }
    void strs(const std::string& k, const std::vector<std::string>& v) {
        key(k, GgufType::ARRAY);
        put<uint32_t>(kv, uint32_t(GgufType::STRING));
        put<uint64_t>(kv, v.size());
        for (const std::string& s : v) put_str(kv, s);
    }
    template <typename T>
    void array(const std::string& k, GgufType elem, const std::vector<T>& v) {
        key(k, GgufType::ARRAY);
        put<uint32_t>(kv, uint32_t(elem));
        put<uint64_t>(kv, v.size());
        for (T x : v) put(kv, x);
    }
    void tensor(const std::string& name, std::vector<int64_t> ne, uint32_t type, std::string data) {
        tensors.push_back({name, std::move(ne), type, std::move(data)});
    }
    std::string bytes() const {
        std::string b;
        put(b, magic);
        put(b, version);
        put<uint64_t>(b, tensors.size());
        put<uint64_t>(b, n_kv);
        b += kv;
        size_t offset = 0;
        for (const Tensor& t : tensors) {
            put_str(b, t.name);
            put<uint32_t>(b, uint32_t(t.ne.size()));
            for (int64_t n : t.ne) put(b, n);
            put(b, t.type);
            put<uint64_t>(b, offset);
            offset += (t.data.size() + alignment - 1) / alignment * alignment;
        }
        b.resize((b.size() + alignment - 1) / alignment * alignment, '\0');
        for (const Tensor& t : tensors) {
            b += t.data;
            b.resize((b.size() + alignment - 1) / alignment * alignment, '\0');
        }
        return b;
    }
};

std::string gguf_error(const std::string& path) { return error_of([&] { GgufFile f(path); }); }

ConvertOptions options(const std::string& in, const std::string& out, const std::string& mode = "auto") {
    ConvertOptions o;
    o.input = in;
    o.output = out;
    o.mode = mode;
    o.progress = false;
    return o;
}

// ---------------------------------------------------------------------------------------------
// Tensors in each type, from values chosen here; `expected` gets the values they stand for, in
// double: d*q, d*(q-8), d*q + m with d and m rounded to fp16 first, as the file stores them.

float round_f16(float x) { return f16_to_f32(f32_to_f16(x)); }

std::string encode(uint32_t type, int64_t rows, int64_t cols, std::mt19937& rng, std::vector<double>* expected) {
    std::uniform_real_distribution<float> value(-1.0f, 1.0f), scale(0.002f, 0.05f);
    std::string out;
    auto put16 = [&](uint16_t h) { out.append(reinterpret_cast<const char*>(&h), 2); };
    expected->clear();
    const size_t n = size_t(rows * cols);
    if (type == kGgmlF32 || type == kGgmlF16 || type == kGgmlBF16) {
        for (size_t i = 0; i < n; i++) {
            float v = value(rng);
            if (type == kGgmlF32) {
                out.append(reinterpret_cast<const char*>(&v), 4);
                expected->push_back(v);
            } else {
                uint16_t h = type == kGgmlF16 ? f32_to_f16(v) : f32_to_bf16(v);
                put16(h);
                expected->push_back(type == kGgmlF16 ? f16_to_f32(h) : bf16_to_f32(h));
            }
        }
        return out;
    }
    for (size_t b = 0; b < n / kGgmlBlock; b++) {
        const float d = round_f16(scale(rng)), m = round_f16(-8 * scale(rng));
        put16(f32_to_f16(d));
        if (type == kGgmlQ8_0) {
            for (int j = 0; j < kGgmlBlock; j++) {
                int q = int(rng() % 255) - 127;
                out.push_back(char(int8_t(q)));
                expected->push_back(double(d) * q);
            }
            continue;
        }
        if (type == kGgmlQ4_1) put16(f32_to_f16(m));
        int q[kGgmlBlock];
        for (int& x : q) x = int(rng() % 16);
        q[0] = 0, q[1] = 15;  // both ends of the range in every block
        for (int j = 0; j < 16; j++) out.push_back(char(uint8_t(q[j] | q[j + 16] << 4)));
        for (int j = 0; j < kGgmlBlock; j++)
            expected->push_back(type == kGgmlQ4_1 ? double(d) * q[j] + double(m) : double(d) * (q[j] - 8));
    }
    return out;
}

// A tiny llama GGUF: 2 layers, dim 64, hidden 128, 4 heads (2 KV), head_dim 16, a 40-token BPE
// vocabulary. Matrices take the types in `types` (by GGUF name; default Q4_1); norms are F32.
struct TinyGguf {
    GgufBuilder b;
    Config c;
    std::map<std::string, std::vector<double>> expected;  // canonical name -> values, row-major
    std::map<std::string, uint32_t> type_of;              // canonical name -> ggml type
};

const char* kGgufLayer[][2] = {
    {"attn_norm.weight", "attention_norm.weight"}, {"attn_q.weight", "attention.wq.weight"},
    {"attn_k.weight", "attention.wk.weight"},      {"attn_v.weight", "attention.wv.weight"},
    {"attn_output.weight", "attention.wo.weight"}, {"ffn_norm.weight", "ffn_norm.weight"},
    {"ffn_gate.weight", "feed_forward.w1.weight"}, {"ffn_down.weight", "feed_forward.w2.weight"},
    {"ffn_up.weight", "feed_forward.w3.weight"}};

std::vector<std::string> tiny_tokens() {
    std::vector<std::string> t = {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool>", "a", "b", "c",
                                  "ab", "abc", "\xC4\xA0", "\xC4\xA0" "a", "\xC4\xA0" "ab"};
    while (t.size() < 40) t.push_back("t" + std::to_string(t.size()));
    return t;
}

// The metadata every test file shares, less the keys in `skip`; tokenizer.ggml.pre and
// add_bos_token as given ("" and -1: absent).
void tiny_metadata(GgufBuilder& b, const std::set<std::string>& skip = {}, const std::string& pre = "smollm",
                   int add_bos = 1) {
    auto keep = [&](const std::string& k) { return !skip.count(k); };
    auto u32 = [&](const std::string& k, uint32_t v) { if (keep(k)) b.u32(k, v); };
    if (keep("general.architecture")) b.str("general.architecture", "llama");
    b.str("general.name", "tiny");
    u32("llama.block_count", 2);
    u32("llama.context_length", 256);
    u32("llama.embedding_length", 64);
    u32("llama.feed_forward_length", 128);
    u32("llama.attention.head_count", 4);
    u32("llama.attention.head_count_kv", 2);
    u32("llama.rope.dimension_count", 16);
    if (keep("llama.rope.freq_base")) b.f32("llama.rope.freq_base", 50000.0f);
    if (keep("llama.attention.layer_norm_rms_epsilon")) b.f32("llama.attention.layer_norm_rms_epsilon", 1e-6f);
    if (keep("tokenizer.ggml.model")) b.str("tokenizer.ggml.model", "gpt2");
    if (!pre.empty()) b.str("tokenizer.ggml.pre", pre);
    const std::vector<std::string> tokens = tiny_tokens();
    if (keep("tokenizer.ggml.tokens")) b.strs("tokenizer.ggml.tokens", tokens);
    std::vector<int32_t> types(tokens.size(), 1);
    types[0] = types[1] = types[2] = 3;  // control
    types[3] = 4;                        // user defined
    if (keep("tokenizer.ggml.token_type")) b.array("tokenizer.ggml.token_type", GgufType::I32, types);
    if (keep("tokenizer.ggml.merges")) b.strs("tokenizer.ggml.merges", {"a b", "ab c", "\xC4\xA0 a", "\xC4\xA0" "a b"});
    u32("tokenizer.ggml.bos_token_id", 1);
    u32("tokenizer.ggml.eos_token_id", 2);
    if (add_bos >= 0) b.boolean("tokenizer.ggml.add_bos_token", add_bos == 1);
    if (keep("tokenizer.chat_template"))
        b.str("tokenizer.chat_template", "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}");
}

TinyGguf tiny_gguf(uint32_t version, bool tied, const std::map<std::string, uint32_t>& types, unsigned seed = 1,
                   int vocab = 40) {
    TinyGguf t;
    t.b.version = version;
    tiny_metadata(t.b);
    std::mt19937 rng(seed);
    t.c.dim = 64, t.c.hidden_dim = 128, t.c.n_layers = 2, t.c.n_heads = 4, t.c.n_kv_heads = 2, t.c.head_dim = 16;
    t.c.vocab_size = vocab, t.c.max_seq_len = 256, t.c.norm_eps = 1e-6f, t.c.rope_theta = 50000;
    t.c.tie_embeddings = tied, t.c.bos_id = 1, t.c.eos_id = 2;
    std::map<std::string, std::vector<int64_t>> shapes;
    for (const TensorSpec& e : model_tensors(t.c)) shapes[e.name] = e.shape;
    auto add = [&](const std::string& theirs, const std::string& ours) {
        const std::vector<int64_t>& s = shapes.at(ours);
        uint32_t type = s.size() == 1 ? kGgmlF32 : types.count(theirs) ? types.at(theirs) : kGgmlQ4_1;
        const int64_t rows = s.size() == 1 ? 1 : s[0], cols = s.back();
        std::string data = encode(type, rows, cols, rng, &t.expected[ours]);
        t.type_of[ours] = type;
        t.b.tensor(theirs, s.size() == 1 ? std::vector<int64_t>{cols} : std::vector<int64_t>{cols, rows}, type, data);
    };
    add("token_embd.weight", "tok_embeddings.weight");
    for (int l = 0; l < 2; l++)
        for (auto& n : kGgufLayer) add(fmt("blk.%d.%s", l, n[0]), layer_tensor(l, n[1]));
    add("output_norm.weight", "norm.weight");
    if (!tied) add("output.weight", "output.weight");
    return t;
}

// Every ggml type the converter takes, spread over the tiny model's matrices.
const std::map<std::string, uint32_t> kMixedTypes = {
    {"token_embd.weight", kGgmlQ8_0},       {"output.weight", kGgmlQ4_0},
    {"blk.0.attn_q.weight", kGgmlQ4_0},     {"blk.0.attn_k.weight", kGgmlQ4_1},
    {"blk.0.attn_v.weight", kGgmlQ8_0},     {"blk.0.attn_output.weight", kGgmlF16},
    {"blk.0.ffn_gate.weight", kGgmlBF16},   {"blk.0.ffn_down.weight", kGgmlF32},
    {"blk.0.ffn_up.weight", kGgmlQ4_1},     {"blk.1.attn_q.weight", kGgmlQ8_0},
    {"blk.1.ffn_down.weight", kGgmlQ4_0}};

// The values a model.bin matrix or vector stands for, dequantized here in double from its raw
// tensors (independently of the loader and kernels).
std::vector<double> stored_values(const SafetensorsFile& f, const std::string& name) {
    const TensorView& t = f.get(name);
    std::vector<double> v;
    if (t.dtype == DType::F32 || t.dtype == DType::F16 || t.dtype == DType::BF16) {
        std::vector<float> x(size_t(t.numel()));
        convert_floats(t.data, t.dtype, x.data(), DType::F32, x.size());
        return std::vector<double>(x.begin(), x.end());
    }
    const TensorView& s = f.get(name + ".scales");
    const float* scales = reinterpret_cast<const float*>(s.data);
    const int64_t rows = t.shape[0], groups = s.shape[1];
    if (t.dtype == DType::I8) {
        const int64_t cols = t.shape[1], g = cols / groups;
        for (int64_t r = 0; r < rows; r++)
            for (int64_t c = 0; c < cols; c++)
                v.push_back(double(scales[r * groups + c / g]) * double(reinterpret_cast<const int8_t*>(t.data)[r * cols + c]));
        return v;
    }
    const int64_t cols = t.shape[1] * 2, g = cols / groups;
    const TensorView *z = f.find(name + ".zeros"), *m = f.find(name + ".mins");
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) {
            uint8_t byte = t.data[r * cols / 2 + c / 2];
            int q = c % 2 ? byte >> 4 : byte & 0xf;
            size_t gi = size_t(r * groups + c / g);
            v.push_back(z ? double(scales[gi]) * (q - int(z->data[gi]))
                          : double(scales[gi]) * q + double(reinterpret_cast<const float*>(m->data)[gi]));
        }
    return v;
}

// max |a - b| / max |b|
double max_rel(const std::vector<double>& a, const std::vector<double>& b) {
    REQUIRE(a.size() == b.size());
    double err = 0, scale = 0;
    for (size_t i = 0; i < a.size(); i++) {
        err = std::max(err, std::fabs(a[i] - b[i]));
        scale = std::max(scale, std::fabs(b[i]));
    }
    return err / scale;
}

std::string tiny_path(const std::string& name, const GgufBuilder& b) {
    std::string p = temp_dir() + "/" + name + ".gguf";
    write_bytes(p, b.bytes());
    return p;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The reader

TEST_CASE("gguf: every metadata type and the tensor infos parse back, v3 and v2") {
    for (uint32_t version : {3u, 2u}) {
        CAPTURE(version);
        GgufBuilder b;
        b.version = version;
        b.key("u8", GgufType::U8), b.put<uint8_t>(b.kv, 200);
        b.key("i8", GgufType::I8), b.put<int8_t>(b.kv, -100);
        b.key("u16", GgufType::U16), b.put<uint16_t>(b.kv, 60000);
        b.key("i16", GgufType::I16), b.put<int16_t>(b.kv, -30000);
        b.u32("u32", 4000000000u);
        b.key("i32", GgufType::I32), b.put<int32_t>(b.kv, -2000000000);
        b.key("u64", GgufType::U64), b.put<uint64_t>(b.kv, 18000000000000000000ull);
        b.key("i64", GgufType::I64), b.put<int64_t>(b.kv, -9000000000000000000ll);
        b.f32("f32", 0.25f);
        b.key("f64", GgufType::F64), b.put<double>(b.kv, -1.5e300);
        b.boolean("bool", true);
        b.str("string", std::string("h\0llo", 5));
        b.strs("strings", {"", "x y", "\xC4\xA0"});
        // An array of two arrays of i16.
        b.key("nested", GgufType::ARRAY), b.put<uint32_t>(b.kv, uint32_t(GgufType::ARRAY)), b.put<uint64_t>(b.kv, 2);
        for (int a = 0; a < 2; a++) {
            b.put<uint32_t>(b.kv, uint32_t(GgufType::I16)), b.put<uint64_t>(b.kv, 3);
            for (int i = 0; i < 3; i++) b.put<int16_t>(b.kv, int16_t(a * 10 + i));
        }
        b.u32("general.alignment", 64);
        b.alignment = 64;
        std::string f16 = {1, 2, 3, 4, 5, 6}, q8(34 * 2, '\x07');
        b.tensor("a", {3}, kGgmlF16, f16);
        b.tensor("b.weight", {32, 2}, kGgmlQ8_0, q8);
        const std::string path = tiny_path(fmt("types-v%u", version), b);

        GgufFile f(path);
        CHECK(f.version == version);
        CHECK(f.alignment == 64);
        CHECK(f.keys.size() == 15);
        CHECK(f.keys.front() == "u8");
        CHECK(f.get_int("u8") == 200);
        CHECK(f.get_int("i8") == -100);
        CHECK(f.get_int("u16") == 60000);
        CHECK(f.get_int("i16") == -30000);
        CHECK(f.get_int("u32") == 4000000000ll);
        CHECK(f.get_int("i32") == -2000000000);
        CHECK(f.find("u64")->u == 18000000000000000000ull);
        CHECK(has([&] { try { f.get_int("u64"); } catch (const Error& e) { return std::string(e.what()); } return std::string(); }(),
                  "out of range"));
        CHECK(f.get_int("i64") == -9000000000000000000ll);
        CHECK(f.get_float("f32") == 0.25);
        CHECK(f.get_float("f64") == -1.5e300);
        CHECK(f.get_float("u16") == 60000.0);  // integers read as numbers too
        CHECK(f.get_bool("bool"));
        CHECK(f.get_string("string") == std::string("h\0llo", 5));
        const GgufValue& s = f.get_array("strings", GgufType::STRING);
        REQUIRE(s.array.size() == 3);
        CHECK(s.array[1].s == "x y");
        CHECK(s.array[2].s == "\xC4\xA0");
        const GgufValue& n = f.get_array("nested", GgufType::ARRAY);
        REQUIRE(n.array.size() == 2);
        CHECK(n.array[1].elem == GgufType::I16);
        CHECK(n.array[1].array[2].i == 12);
        // Wrong types and missing keys name the key.
        auto err = [&](auto fn) { try { fn(); } catch (const Error& e) { return std::string(e.what()); } return std::string(); };
        CHECK(has(err([&] { f.get_string("u32"); }), "'u32' is u32, expected a string"));
        CHECK(has(err([&] { f.get_int("nope"); }), "has no 'nope'"));
        CHECK(has(err([&] { f.get_array("strings", GgufType::I32); }), "expected an array of i32"));

        REQUIRE(f.tensors.size() == 2);
        const GgufTensor& a = f.tensors[0];
        CHECK(a.name == "a");
        CHECK(a.ne == std::vector<int64_t>{3});
        CHECK(a.type == kGgmlF16);
        CHECK(a.nbytes == 6);
        CHECK(std::memcmp(a.data, f16.data(), 6) == 0);
        const GgufTensor* w = f.find_tensor("b.weight");
        REQUIRE(w);
        CHECK(w->ne == std::vector<int64_t>{32, 2});
        CHECK(w->shape() == std::vector<int64_t>{2, 32});  // [rows, cols]
        CHECK(w->offset == 64);                             // aligned after a's 6 bytes
        CHECK(w->nbytes == 68);
        CHECK(size_t(w->data - f.map.data) == f.data_start + 64);
        CHECK(f.data_start % 64 == 0);
        CHECK(is_gguf_file(path));
    }
    CHECK(ggml_type_name(13) == "Q5_K");
    CHECK(ggml_type_name(99) == "unknown type 99");
    CHECK(!is_gguf_file(models_dir() + "/stories260K.bin"));
}

TEST_CASE("gguf: bad files are refused with the file and what is wrong") {
    TinyGguf t = tiny_gguf(3, true, {});
    const std::string good = t.b.bytes();
    const std::string path = temp_dir() + "/bad.gguf";
    auto refused = [&](const std::string& bytes) {
        write_bytes(path, bytes);
        return gguf_error(path);
    };
    CHECK(refused(good) == "");

    std::string b = good;
    b[0] = 'X';
    CHECK(has(refused(b), "not a GGUF file"));
    CHECK(has(refused(b), path));
    CHECK(has(refused("GG"), "not a GGUF file"));
    for (uint32_t v : {1u, 4u}) {
        b = good;
        std::memcpy(&b[4], &v, 4);
        CHECK(has(refused(b), fmt("GGUF version %u is not supported", v)));
    }
    b = good;
    std::swap(b[4], b[7]), std::swap(b[5], b[6]);
    CHECK(has(refused(b), "a big-endian GGUF file (version 3 byte-swapped)"));
    // Truncated tensor data: the last tensor runs past the end; the message names it.
    CHECK(has(refused(good.substr(0, good.size() - 40)), "truncated tensor data: tensor 'output_norm.weight'"));
    // Cut inside the metadata.
    CHECK(has(refused(good.substr(0, 600)), "truncated: metadata 'tokenizer.ggml.tokens'"));
    // Absurd counts are refused before anything is allocated.
    b = good;
    uint64_t huge = uint64_t(1) << 50;
    std::memcpy(&b[8], &huge, 8);
    CHECK(has(refused(b), "tensor count 1125899906842624 cannot fit"));
    b = good;
    std::memcpy(&b[16], &huge, 8);
    CHECK(has(refused(b), "metadata count 1125899906842624 cannot fit"));

    // An unknown ggml type id, and one that is known but not convertible (named by its name).
    GgufBuilder u;
    tiny_metadata(u);
    u.tensor("token_embd.weight", {64, 40}, 99, std::string(64 * 40, '\0'));
    CHECK(has(refused(u.bytes()), "tensor 'token_embd.weight' has unknown ggml type 99"));
    GgufBuilder k;  // Q5_K blocks are 256 wide
    k.tensor("blk.1.attn_v.weight", {64, 32}, 13, std::string(32 * 176, '\0'));
    CHECK(has(refused(k.bytes()), "tensor 'blk.1.attn_v.weight': 64 columns are not a whole number of Q5_K blocks"));

    // A bad array element type, a bool that is not 0/1, general.alignment not a power of two.
    GgufBuilder a;
    a.key("x", GgufType::ARRAY), a.put<uint32_t>(a.kv, 77), a.put<uint64_t>(a.kv, 1);
    CHECK(has(refused(a.bytes()), "metadata 'x': unknown array element type 77"));
    GgufBuilder c;
    c.key("flag", GgufType::BOOL), c.put<uint8_t>(c.kv, 2);
    CHECK(has(refused(c.bytes()), "metadata 'flag': bool value 2"));
    GgufBuilder d;
    d.u32("general.alignment", 48);
    CHECK(has(refused(d.bytes()), "general.alignment must be a power of two"));
    GgufBuilder e;
    e.u32("k", 1), e.u32("k", 2);
    CHECK(has(refused(e.bytes()), "metadata key 'k' appears twice"));
}

// ---------------------------------------------------------------------------------------------
// Conversion

TEST_CASE("gguf: auto mode keeps Q8_0/Q4_0/Q4_1 blocks exactly, floats as they are") {
    for (uint32_t version : {3u, 2u}) {
        CAPTURE(version);
        TinyGguf t = tiny_gguf(version, false, kMixedTypes);
        const std::string in = tiny_path(fmt("mixed-v%u", version), t.b), out = temp_dir() + "/mixed.bin";
        ConvertStats st = convert_checkpoint(options(in, out));
        CHECK(st.kind == fmt("GGUF v%u", version));
        CHECK(st.dtype == "gguf-Q4_1+Q4_0+Q8_0");  // 9 Q4_1, 3 Q4_0, 3 Q8_0 matrices

        SafetensorsFile f(out);
        CHECK(f.metadata.at("quantization") == "gguf-Q4_1+Q4_0+Q8_0");
        CHECK(has(f.metadata.at("chat_template"), "<|im_start|>{{ m['content'] }}"));
        Config c = Config::from_json(f.metadata.at("config"), out);
        CHECK(c.to_json() == t.c.to_json());  // dims, eps, theta, bos/eos, untied

        for (const auto& [name, expected] : t.expected) {
            CAPTURE(name);
            const uint32_t type = t.type_of.at(name);
            const TensorView& v = f.get(name);
            const int64_t rows = v.shape[0];
            if (type == kGgmlQ8_0) {
                CHECK(v.dtype == DType::I8);
                CHECK(f.get(name + ".scales").shape == std::vector<int64_t>{rows, v.shape[1] / 32});
            } else if (type == kGgmlQ4_0 || type == kGgmlQ4_1) {
                CHECK(v.dtype == DType::U8);
                const std::vector<int64_t> groups = {rows, v.shape[1] * 2 / 32};
                CHECK(f.get(name + ".scales").shape == groups);
                const TensorView* zeros = f.find(name + ".zeros");
                const TensorView* mins = f.find(name + ".mins");
                CHECK((type == kGgmlQ4_0 ? zeros : mins) != nullptr);
                CHECK((type == kGgmlQ4_0 ? mins : zeros) == nullptr);
                if (zeros) {
                    CHECK(zeros->shape == groups);
                    for (size_t i = 0; i < zeros->nbytes; i++) REQUIRE(zeros->data[i] == 8);
                }
            } else {
                // Floats keep their type (norms are F32 in the file and stay so).
                CHECK(v.dtype == (type == kGgmlF16 ? DType::F16 : type == kGgmlBF16 ? DType::BF16 : DType::F32));
            }
            // Exact: fp16 d and m are f32 scales and minimums, q unchanged, so d*q (+m) in double is
            // what the stored tensors say, to the last bit.
            CHECK(stored_values(f, name) == expected);
        }
        CHECK(f.tensors.size() == st.tensors);
        // The tokenizer travels as tokenizer.json; no sentencepiece model.
        CHECK(f.find("tokenizer.json") != nullptr);
        CHECK(f.find("tokenizer.model") == nullptr);
    }
}

TEST_CASE("gguf: other modes dequantize, then take the usual f32/bf16/int8/int4 paths") {
    TinyGguf t = tiny_gguf(3, true, kMixedTypes);
    const std::string in = tiny_path("mixed-tied", t.b), out = temp_dir() + "/modes.bin";
    convert_checkpoint(options(in, out, "f32"));
    {
        SafetensorsFile f(out);
        CHECK(f.metadata.at("quantization") == "none");
        CHECK(f.find("output.weight") == nullptr);  // tied: no output.weight in the GGUF
        for (const auto& [name, expected] : t.expected) {
            CAPTURE(name);
            CHECK(f.get(name).dtype == DType::F32);
            // f32 of d*q: the product rounded once.
            CHECK(max_rel(stored_values(f, name), expected) < 1e-7);
        }
    }
    convert_checkpoint(options(in, out, "bf16"));
    {
        SafetensorsFile f(out);
        CHECK(f.get("layers.0.attention.wq.weight").dtype == DType::BF16);
        CHECK(f.get("layers.0.attention_norm.weight").dtype == DType::F32);
        CHECK(max_rel(stored_values(f, "layers.0.attention.wk.weight"), t.expected.at("layers.0.attention.wk.weight")) < 1 / 128.0);
    }
    ConvertOptions o = options(in, out, "int4");
    ConvertStats st = convert_checkpoint(o);
    {
        SafetensorsFile f(out);
        CHECK(f.metadata.at("quantization") == "int4-g32");
        CHECK(f.get("layers.1.attention.wq.weight").dtype == DType::U8);
        CHECK(f.find("layers.1.attention.wq.weight.mins") != nullptr);
        // Requantizing 4-bit values from 16 levels to 16 levels: small but not zero error.
        for (const auto& [name, err] : st.rel_errors) CHECK(err < 0.1);
    }
}

TEST_CASE("gguf: conversion refusals name the key, tensor or type") {
    const std::string out = temp_dir() + "/refused.bin";
    auto error_of = [&](const GgufBuilder& b) { return convert_error(options(tiny_path("refused", b), out)); };
    TinyGguf t = tiny_gguf(3, true, {});

    for (const char* key : {"llama.block_count", "llama.embedding_length", "llama.attention.head_count",
                            "llama.context_length", "llama.attention.layer_norm_rms_epsilon", "tokenizer.ggml.tokens",
                            "tokenizer.ggml.eos_token_id", "general.architecture", "tokenizer.ggml.model"}) {
        const std::string k = key;
        CAPTURE(k);
        GgufBuilder b;
        tiny_metadata(b, {key});
        b.tensors = t.b.tensors;
        CHECK(has(error_of(b), fmt("GGUF metadata has no '%s'", key)));
    }
    CHECK(error_of(t.b) == "");

    GgufBuilder arch;
    arch.str("general.architecture", "gpt2");
    CHECK(has(error_of(arch), "GGUF architecture 'gpt2' is not supported"));
    TinyGguf moe = tiny_gguf(3, true, {});
    moe.b.u32("llama.expert_count", 8);
    CHECK(has(error_of(moe.b), "mixture-of-experts model (llama.expert_count = 8) is not supported from GGUF"));
    TinyGguf rope = tiny_gguf(3, true, {});
    rope.b.tensor("rope_freqs.weight", {8}, kGgmlF32, std::string(32, '\0'));  // factors of 0
    CHECK(has(error_of(rope.b), "tensor 'rope_freqs.weight'[0] = 0: not Llama 3 RoPE scaling"));
    TinyGguf scaled = tiny_gguf(3, true, {});
    scaled.b.str("llama.rope.scaling.type", "yarn");
    CHECK(has(error_of(scaled.b), "llama.rope.scaling.type = 'yarn'"));
    TinyGguf partial = tiny_gguf(3, true, {});
    GgufBuilder pb;
    tiny_metadata(pb, {"llama.rope.dimension_count"});
    pb.u32("llama.rope.dimension_count", 8);
    pb.tensors = partial.b.tensors;
    CHECK(has(error_of(pb), "llama.rope.dimension_count = 8 but the head dimension is 16"));
    TinyGguf extra = tiny_gguf(3, true, {});
    extra.b.tensor("blk.0.attn_q.bias", {64}, kGgmlF32, std::string(256, '\0'));
    CHECK(has(error_of(extra.b), "tensor 'blk.0.attn_q.bias' has no place in a Llama model"));
    TinyGguf missing = tiny_gguf(3, true, {});
    missing.b.tensors.erase(missing.b.tensors.begin() + 3);  // blk.0.attn_k.weight
    CHECK(has(error_of(missing.b), "no tensor 'blk.0.attn_k.weight'"));
    TinyGguf shape = tiny_gguf(3, true, {});
    std::swap(shape.b.tensors[2].ne[0], shape.b.tensors[2].ne[1]);  // blk.0.attn_q.weight, square: use ffn
    std::swap(shape.b.tensors[7].ne[0], shape.b.tensors[7].ne[1]);  // blk.0.ffn_gate.weight [64,128] -> [128,64]
    CHECK(has(error_of(shape.b), "tensor 'blk.0.ffn_gate.weight': shape [64, 128] (GGUF ne reversed), expected [128, 64]"));
    // A known but unconvertible type: Q5_K, in a model 256 wide so its rows are whole blocks.
    GgufBuilder q5;
    tiny_metadata(q5, {"llama.embedding_length", "llama.rope.dimension_count"});
    q5.u32("llama.embedding_length", 256);
    q5.tensor("token_embd.weight", {256, 40}, 13, std::string(40 * 176, '\0'));
    CHECK(has(error_of(q5), "tensor 'token_embd.weight' is Q5_K, which fastgen cannot convert"));
    // Tokenizer: an unknown pre-tokenizer and tokenizer model are named.
    GgufBuilder pre;
    tiny_metadata(pre, {}, "qwen2");
    pre.tensors = t.b.tensors;
    CHECK(has(error_of(pre), "tokenizer.ggml.pre 'qwen2' is not supported"));
    GgufBuilder bert;
    tiny_metadata(bert, {"tokenizer.ggml.model"});
    bert.str("tokenizer.ggml.model", "bert");
    bert.tensors = t.b.tensors;
    CHECK(has(error_of(bert), "tokenizer.ggml.model 'bert' is not supported"));
    // Found by fuzzing: tokens, merges or a chat template that are not UTF-8 cannot go into JSON
    // (tokenizer.json, model.bin's header); they ended in an "internal" nlohmann exception.
    std::vector<std::string> tokens = tiny_tokens();
    tokens[5] = "b\xff";
    GgufBuilder token;
    tiny_metadata(token, {"tokenizer.ggml.tokens"});
    token.strs("tokenizer.ggml.tokens", tokens);
    token.tensors = t.b.tensors;
    CHECK(has(error_of(token), "tokenizer.ggml.tokens: token 5 is not valid UTF-8"));
    GgufBuilder merge;
    tiny_metadata(merge, {"tokenizer.ggml.merges"});
    merge.strs("tokenizer.ggml.merges", {"a b", "ab \xc3"});
    merge.tensors = t.b.tensors;
    CHECK(has(error_of(merge), "tokenizer.ggml.merges: merge 1 is not valid UTF-8"));
    GgufBuilder chat;
    tiny_metadata(chat, {"tokenizer.chat_template"});
    chat.str("tokenizer.chat_template", "{{ messages }}\xe2\x82");
    chat.tensors = t.b.tensors;
    CHECK(has(error_of(chat), "metadata 'tokenizer.chat_template' is not valid UTF-8"));
    // Found by fuzzing: one flipped byte of llama.block_count (2 -> 134217730) made the converter
    // list 10^9 tensor names before looking for them (a hang, then out of memory).
    GgufBuilder layers;
    tiny_metadata(layers, {"llama.block_count"});
    layers.u32("llama.block_count", 134217730);
    layers.tensors = t.b.tensors;
    CHECK(has(error_of(layers), "config n_layers = 134217730 with n_experts = 0 means 1207959570 tensors"));
    // No half-written output after any refusal.
    CHECK(!std::ifstream(out + ".tmp").good());
}

// ---------------------------------------------------------------------------------------------
// Tokenizers

TEST_CASE("gguf: a Q4_0 embedding of 10 rows converts to a file that loads and runs") {
    // The fuzzer's regression input (tests/data/fuzz/gguf/regression-q4_0-vocab10: two option bytes,
    // then the GGUF): 10 rows x 1 group of zero points, 10 bytes, used to misalign the F32 tensors
    // written after them, and generate refused the output.
    const std::string seed = read_file("tests/data/fuzz/gguf/regression-q4_0-vocab10");
    const std::string in = temp_dir() + "/vocab10.gguf", out = temp_dir() + "/vocab10.bin";
    write_bytes(in, seed.substr(2));
    for (bool quantize_embeddings : {false, true}) {
        CAPTURE(quantize_embeddings);
        ConvertOptions o = options(in, out);
        o.quantize_embeddings = quantize_embeddings;
        convert_checkpoint(o);
        SafetensorsFile f(out);
        for (const auto& [name, t] : f.tensors)
            CHECK_MESSAGE(size_t(t.data - f.map.data) % dtype_size(t.dtype) == 0, name);
        CHECK(f.get("tok_embeddings.weight.zeros").nbytes == 10);
        Model m(out, cpu_ops(1));
        CHECK(m.cfg.vocab_size == 10);
        KVCache kv(m.cfg, 2);
        REQUIRE(kv.reserve(0, 1));
        std::vector<float> logits(10);
        m.forward(kv, {{0, 0, 1}}, {0}, logits.data());
        for (float x : logits) CHECK(std::isfinite(x));
    }
}

TEST_CASE("gguf: a gpt2 tokenizer becomes a Hugging Face tokenizer.json") {
    TinyGguf t = tiny_gguf(3, true, {});
    const std::string in = tiny_path("tok", t.b), out = temp_dir() + "/tok.bin";
    convert_checkpoint(options(in, out));
    SafetensorsFile f(out);
    const TensorView& tj = f.get("tokenizer.json");
    CHECK(tj.dtype == DType::U8);
    json j = json::parse(std::string(reinterpret_cast<const char*>(tj.data), tj.nbytes));
    const std::vector<std::string> tokens = tiny_tokens();
    CHECK(j["model"]["type"] == "BPE");
    CHECK(j["model"]["vocab"].size() == tokens.size());
    for (size_t i = 0; i < tokens.size(); i++) CHECK(j["model"]["vocab"][tokens[i]] == i);
    CHECK(j["model"]["merges"] == json({"a b", "ab c", "\xC4\xA0 a", "\xC4\xA0" "a b"}));
    REQUIRE(j["added_tokens"].size() == 4);  // three control tokens and one user-defined
    CHECK(j["added_tokens"][3]["id"] == 3);
    CHECK(j["added_tokens"][3]["content"] == "<tool>");
    CHECK(j["added_tokens"][3]["special"] == true);
    CHECK(j["pre_tokenizer"]["type"] == "Sequence");
    CHECK(j["pre_tokenizer"]["pretokenizers"][0] == json({{"type", "Digits"}, {"individual_digits", true}}));
    CHECK(j["pre_tokenizer"]["pretokenizers"][1]["type"] == "ByteLevel");
    CHECK(j["post_processor"]["single"][0]["SpecialToken"]["id"] == "<|im_start|>");  // BOS = token 1
    CHECK(j["post_processor"]["special_tokens"]["<|im_start|>"]["ids"] == json({1}));
    CHECK(j["decoder"]["type"] == "ByteLevel");

    // The other pre-tokenizers, and no BOS (or the default, BOS) as the file says.
    for (const char* pre : {"", "gpt2", "llama-bpe", "llama3"}) {
        for (int add_bos : {0, -1}) {
            CAPTURE(pre);
            CAPTURE(add_bos);
            GgufBuilder b;
            tiny_metadata(b, {}, pre, add_bos);
            b.tensors = t.b.tensors;
            convert_checkpoint(options(tiny_path("tok2", b), out));
            SafetensorsFile g(out);
            const TensorView& v = g.get("tokenizer.json");
            json k = json::parse(std::string(reinterpret_cast<const char*>(v.data), v.nbytes));
            CHECK(k["post_processor"].is_null() == (add_bos == 0));
            const json& p = k["pre_tokenizer"];
            if (std::string(pre).substr(0, 5) == "llama") {
                CHECK(p["pretokenizers"][0]["type"] == "Split");
                CHECK(has(p["pretokenizers"][0]["pattern"]["Regex"].get<std::string>(), "\\p{N}{1,3}"));
                CHECK(p["pretokenizers"][1]["use_regex"] == false);
            } else {
                CHECK(p == json({{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true},
                                 {"use_regex", true}}));
            }
        }
    }
}

TEST_CASE("gguf: a llama (sentencepiece) vocabulary becomes a sentencepiece model that encodes alike") {
    // A sentencepiece model's pieces, scores and types written as a Llama 2 GGUF's tokenizer.ggml.*
    // arrays (as llama.cpp's converter does), rebuilt into a ModelProto, must encode as the
    // original: tok512.model and Meta's Llama 2 tokenizer.model.
    struct Case {
        const char* file;
        bool collapses_spaces;  // tok512 removes extra whitespace; Llama 2 (and GGUF) keep it
        std::vector<int> once;  // "Once upon a time", from the models README
    };
    for (const Case& k : {Case{"tok512.model", true, {403, 407, 261, 378}},
                          Case{"tokenizer.model", false, {9038, 2501, 263, 931}}}) {
        CAPTURE(k.file);
        const std::string original = read_file(models_dir() + "/" + k.file);
        sentencepiece::SentencePieceProcessor sp;
        REQUIRE(sp.LoadFromSerializedProto(original).ok());
        std::vector<std::string> pieces;
        std::vector<float> scores;
        std::vector<int32_t> types;
        for (int i = 0; i < sp.GetPieceSize(); i++) {
            pieces.push_back(sp.IdToPiece(i));
            scores.push_back(sp.GetScore(i));
            types.push_back(sp.IsUnknown(i) ? 2 : sp.IsControl(i) ? 3 : sp.IsByte(i) ? 6 : sp.IsUnused(i) ? 5 : 1);
        }
        TinyGguf t = tiny_gguf(3, true, {}, 1, int(pieces.size()));
        GgufBuilder b;
        tiny_metadata(b, {"tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                          "tokenizer.ggml.merges"}, "");
        b.str("tokenizer.ggml.model", "llama");
        b.strs("tokenizer.ggml.tokens", pieces);
        b.array("tokenizer.ggml.scores", GgufType::F32, scores);
        b.array("tokenizer.ggml.token_type", GgufType::I32, types);
        b.u32("tokenizer.ggml.unknown_token_id", 0);
        b.tensors = t.b.tensors;
        const std::string out = temp_dir() + "/spm.bin";
        convert_checkpoint(options(tiny_path("spm", b), out));

        SafetensorsFile f(out);
        CHECK(f.find("tokenizer.json") == nullptr);
        const TensorView& tm = f.get("tokenizer.model");
        Tokenizer ours(std::string(reinterpret_cast<const char*>(tm.data), tm.nbytes), "spm.bin");
        Tokenizer theirs(original, k.file);
        CHECK(ours.vocab_size() == theirs.vocab_size());
        CHECK(ours.bos_id() == 1);
        CHECK(ours.eos_id() == 2);
        std::vector<std::string> texts = {"Once upon a time", "Lily and Tom went to the park. They saw a big dog!",
                                          "x\xE2\x98\x83y \xF0\x9F\x98\x80 caf\xC3\xA9", "1234567890", "a\nb\tc", ""};
        if (!k.collapses_spaces) texts.insert(texts.end(), {"  two  spaces ", " leading", "trailing  "});
        for (const std::string& text : texts) {
            CAPTURE(text);
            const std::vector<int> ids = theirs.encode(text, true, false);
            CHECK(ours.encode(text, true, false) == ids);
            CHECK(ours.decode(ids) == theirs.decode(ids));
        }
        CHECK(ours.encode("Once upon a time", false, false) == k.once);
    }
}

TEST_CASE("gguf: a converted tiny model runs and matches the PyTorch reference") {
    // Every block format through the loader and the CPU kernels, against reference.py reading the
    // same model.bin (modelbin.py dequantizes the grouped int8 and int4 + mins formats itself).
    TinyGguf t = tiny_gguf(3, false, kMixedTypes, 7);
    const std::string out = temp_dir() + "/tiny-run.bin";
    convert_checkpoint(options(tiny_path("tiny-run", t.b), out));
    Model m(out, cpu_ops(0));
    const std::vector<int> tokens = random_tokens(12, t.c.vocab_size, 5);
    const std::vector<float> ours = prefill_logits(m, tokens);
    const std::vector<float> ref = reference_logits(out, tokens, t.c.vocab_size);
    const double err = worst_rel_error(ours, ref, t.c.vocab_size);
    MESSAGE("tiny GGUF model: worst relative logit error vs reference.py " << err);
    CHECK(err < 1e-4);
    // And the embedding row the loader sees for a token is the Q8_0 row d*q.
    std::vector<float> row(size_t(t.c.dim));
    dequantize_row(m.w.tok_embeddings, 3, row.data());
    const std::vector<double>& e = t.expected.at("tok_embeddings.weight");
    for (int i = 0; i < t.c.dim; i++) REQUIRE(double(row[size_t(i)]) == e[size_t(3 * t.c.dim + i)]);
}

// ---------------------------------------------------------------------------------------------
// A real model: SmolLM2-135M-Instruct, Q4_1 with a Q8_0 embedding (scripts/get_smollm2.sh)

// (test_smollm2.cpp checks its greedy tokens against reference.py on the same model.bin, and the
// tiny model above every block format's logits; neither can tell the RoPE row order: reference.py
// reads the same rows, and a greedy "Paris" survives the wrong order.)
TEST_CASE("gguf: SmolLM2-135M Q4_1 converts, runs, and reads English: wq/wk rows are in RoPE order") {
    const char* env = std::getenv("FASTGEN_SMOLLM2_GGUF");
    const std::string gguf = env ? env : "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    if (!std::ifstream(gguf).good()) {
        MESSAGE("skipped: no " << gguf << " (run scripts/get_smollm2.sh, or set FASTGEN_SMOLLM2_GGUF)");
        return;
    }
    const std::string out = temp_dir() + "/smollm2.bin";
    ConvertStats st = convert_checkpoint(options(gguf, out));
    CHECK(st.dtype == "gguf-Q4_1+Q8_0");
    Model m(out, cpu_ops(0));
    CHECK(m.cfg.n_layers == 30);
    CHECK(m.cfg.tie_embeddings);

    // The layout check: RoPE pairs rows 2i and 2i+1 of wq/wk. Had llama.cpp's converter left them
    // in HF's rotate-half order, the model would still babble, but badly: the mean NLL of the first
    // 100 tokens of this English story is 2.43 with the right order and 4.14 with rows in
    // rotate-half order (scripts/gguf_rope_order_nll.py, over reference.py), so 2.8 tells them apart.
    std::vector<int> ids;
    {
        std::ifstream in("tests/data/smollm2_tinystory_ids.txt");
        REQUIRE(in.good());
        for (std::string tok; std::getline(in, tok, ',') && ids.size() < 100;) ids.push_back(std::stoi(tok));
    }
    REQUIRE(ids.size() == 100);
    const int V = m.cfg.vocab_size;
    const std::vector<float> logits = prefill_logits(m, ids);
    double nll = 0;
    for (size_t p = 0; p + 1 < ids.size(); p++) {
        const float* l = logits.data() + p * size_t(V);
        double mx = *std::max_element(l, l + V), sum = 0;
        for (int v = 0; v < V; v++) sum += std::exp(double(l[v]) - mx);
        nll += mx + std::log(sum) - double(l[ids[p + 1]]);
    }
    nll /= double(ids.size() - 1);
    MESSAGE("SmolLM2 GGUF: mean NLL " << nll << " over " << ids.size() - 1 << " tokens of tinystory.txt");
    CHECK(nll < 2.8);
}

TEST_CASE("gguf: quantize --from, and --input recognising GGUF; misuse exits 1 with a message") {
    TinyGguf t = tiny_gguf(3, false, kMixedTypes);
    const std::string in = tiny_path("cli", t.b), out = temp_dir() + "/cli.bin";
    CommandResult r = run_command("./quantize --from " + shell_quote(in) + " -o " + shell_quote(out) + " -q");
    CHECK(r.rc == 0);
    CHECK(has(r.out, "gguf-Q4_1+Q4_0+Q8_0"));
    CHECK(has(r.out, "from a GGUF v3 checkpoint"));
    CHECK(SafetensorsFile(out).metadata.at("quantization") == "gguf-Q4_1+Q4_0+Q8_0");
    r = run_command("./quantize --input " + shell_quote(in) + " -o " + shell_quote(out) + " -q --mode bf16");
    CHECK(r.rc == 0);
    CHECK(SafetensorsFile(out).get("layers.0.attention.wq.weight").dtype == DType::BF16);

    r = run_command("./quantize --from " + shell_quote(models_dir() + "/stories260K.bin") + " -o " + shell_quote(out));
    CHECK(r.rc == 1);
    CHECK(has(r.err, "not a GGUF file"));
    r = run_command("./quantize --from " + shell_quote(in) + " --input " + shell_quote(in) + " -o " + shell_quote(out));
    CHECK(r.rc == 1);
    CHECK(has(r.err, "excludes"));
    r = run_command("./quantize -o " + shell_quote(out));
    CHECK(r.rc == 1);
    CHECK(has(r.err, "an input is required"));
    // A damaged GGUF through the converter: the message names the file and the tensor.
    const std::string bytes = t.b.bytes(), cut = temp_dir() + "/cut.gguf";
    write_bytes(cut, bytes.substr(0, bytes.size() - 100));
    r = run_command("./quantize --from " + shell_quote(cut) + " -o " + shell_quote(out));
    CHECK(r.rc == 1);
    CHECK(has(r.err, "error: " + cut + ": truncated tensor data: tensor 'output.weight'"));
    CHECK(has(run_command("./quantize --help").out, "--from"));
}

namespace {
// llama.cpp's rope_freqs.weight for Meta's Llama 3 scaling, written out here from the formula
// (convert_hf_to_gguf's LlamaModel): per pair i, 1, `factor`, or a blend by wavelength.
std::string llama3_rope_factors(int head_dim, double theta, double factor, double low, double high, double L) {
    std::string out;
    for (int i = 0; i < head_dim / 2; i++) {
        const double freq = 1.0 / std::pow(theta, 2.0 * i / head_dim), wavelen = 2 * M_PI / freq;
        double ff;
        if (wavelen < L / high) ff = 1;
        else if (wavelen > L / low) ff = factor;
        else {
            const double smooth = (L / wavelen - low) / (high - low);
            ff = 1 / ((1 - smooth) / factor + smooth);
        }
        const float v = float(ff);
        out.append(reinterpret_cast<const char*>(&v), 4);
    }
    return out;
}

// Only the metadata and rope_freqs.weight: enough for gguf_llama_config.
Config rope_config(int head_dim, float theta, const std::string& factors) {
    GgufBuilder b;
    tiny_metadata(b, {"llama.embedding_length", "llama.attention.head_count", "llama.attention.head_count_kv",
                      "llama.rope.dimension_count", "llama.rope.freq_base"});
    b.u32("llama.embedding_length", uint32_t(2 * head_dim));
    b.u32("llama.attention.head_count", 2);
    b.u32("llama.attention.head_count_kv", 2);
    b.u32("llama.rope.dimension_count", uint32_t(head_dim));
    b.f32("llama.rope.freq_base", theta);
    b.tensor("rope_freqs.weight", {int64_t(factors.size() / 4)}, kGgmlF32, factors);
    GgufFile f(tiny_path("rope", b));
    return gguf_llama_config(f);
}
}  // namespace

TEST_CASE("gguf: Llama 3's RoPE scaling comes back from rope_freqs.weight, checked pair by pair") {
    struct Case { const char* what; int head_dim; float theta; double factor, low, high, L; };
    for (const Case& k : {Case{"Llama 3.1 8B", 128, 500000, 8, 1, 4, 8192}, Case{"Llama 3.2 1B", 64, 500000, 32, 1, 4, 8192},
                          Case{"tiny", 16, 50000, 8, 1, 16, 4096}, Case{"low 2", 128, 500000, 4, 2, 8, 16384}}) {
        CAPTURE(k.what);
        const std::string factors = llama3_rope_factors(k.head_dim, k.theta, k.factor, k.low, k.high, k.L);
        const Config c = rope_config(k.head_dim, k.theta, factors);
        CHECK(c.rope_factor == float(k.factor));
        // Only low/L and high/L matter (they place the blend); L is taken so that low is 1.
        CHECK(double(c.rope_low_freq_factor) / c.rope_original_max_seq_len == doctest::Approx(k.low / k.L).epsilon(1e-6));
        CHECK(double(c.rope_high_freq_factor) / c.rope_original_max_seq_len == doctest::Approx(k.high / k.L).epsilon(1e-6));
        if (k.low == 1) {
            CHECK(c.rope_low_freq_factor == 1.0f);
            CHECK(c.rope_high_freq_factor == float(k.high));
            CHECK(c.rope_original_max_seq_len == int(k.L));
        }
        // What llama.cpp computes: theta^(-2i/d) / ff_i, for every pair.
        const std::vector<double> freq = c.rope_frequencies();
        for (int i = 0; i < k.head_dim / 2; i++) {
            float ff;
            std::memcpy(&ff, factors.data() + 4 * i, 4);
            CHECK(freq[size_t(i)] == doctest::Approx(std::pow(double(k.theta), -2.0 * i / k.head_dim) / ff).epsilon(1e-6));
        }
    }
    // All ones: no scaling.
    std::string ones;
    for (int i = 0; i < 64; i++) ones.append("\x00\x00\x80\x3f", 4);
    CHECK(rope_config(128, 500000, ones).rope_factor == 0);
    // Factors that no Llama 3 scaling gives, and the wrong length, are refused naming the tensor.
    std::string bent = llama3_rope_factors(128, 500000, 8, 1, 4, 8192);
    const float odd = 5.5f;  // one pair in the blend region moved
    std::memcpy(&bent[4 * 31], &odd, 4);
    auto error = [&](const std::string& factors, int head_dim) {
        try {
            rope_config(head_dim, 500000, factors);
        } catch (const Error& e) {
            return std::string(e.what());
        }
        return std::string();
    };
    CHECK(has(error(bent, 128), "tensor 'rope_freqs.weight': pair"));
    CHECK(has(error(bent, 64), "tensor 'rope_freqs.weight' is F32 [64], expected F32 [32]"));
    std::string step;  // a jump from 1 to 8 with no blend: its thresholds cannot be placed
    for (int i = 0; i < 64; i++) step.append(i < 40 ? "\x00\x00\x80\x3f" : "\x00\x00\x00\x41", 4);
    CHECK(has(error(step, 128), "does not explain"));

    // Through the converter: the tensor is read into the config, not written.
    TinyGguf t = tiny_gguf(3, true, {});
    t.b.tensor("rope_freqs.weight", {8}, kGgmlF32, llama3_rope_factors(16, 50000, 8, 1, 16, 4096));
    const std::string out = temp_dir() + "/rope.bin";
    convert_checkpoint(options(tiny_path("rope-model", t.b), out));
    SafetensorsFile f(out);
    CHECK(f.find("rope_freqs.weight") == nullptr);
    const Config c = Config::from_json(f.metadata.at("config"), out);
    CHECK(c.rope_factor == 8.0f);
    CHECK(c.rope_original_max_seq_len == 4096);
}
