// tests/test_model.cpp: the forward pass against the PyTorch reference (scripts/reference.py),
// batching/paging equivalences, and the stories260K golden text.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <nlohmann/json.hpp>
#include <random>

#include "common.h"

#include "model.h"
#include "sampler.h"
#include "test_util.h"

namespace {

void check_close(const std::vector<float>& ours, const std::vector<float>& ref, int vocab, double tol) {
    int n = int(ref.size() / vocab);
    double worst = 0;
    for (int p = 0; p < n; p++) {
        double e = rel_error(ours.data() + size_t(p) * vocab, ref.data() + size_t(p) * vocab, vocab);
        if (e > tol) MESSAGE("position " << p << ": relative error " << e);
        worst = std::max(worst, e);
    }
    CHECK(worst < tol);
}

}  // namespace

TEST_CASE("forward matches the PyTorch reference at every position") {
    struct Case { const char* what; Config cfg; DType dtype; int n_tokens = 37; };  // 37: > 2 KV blocks
    Config odd = tiny_config(72, 172, 2, 6, 2, false);  // odd sizes, GQA 3:1
    odd.vocab_size = 517;
    Config theta = tiny_config(64, 160, 2, 4, 4, true);
    theta.rope_theta = 500000.0f;
    theta.norm_eps = 1e-6f;
    // Llama 3.1 rope scaling, with a short original context so that head_dim 16's pairs fall in
    // all three regimes (wavelengths 6 kept, 33 blended, 167+ stretched).
    Config scaled = theta;
    scaled.rope_factor = 8;
    scaled.rope_low_freq_factor = 1;
    scaled.rope_high_freq_factor = 4;
    scaled.rope_original_max_seq_len = 64;
    Config long_ctx = tiny_config(64, 172, 2, 8, 2, false);  // the CPU's attention splits at 128 positions
    long_ctx.max_seq_len = 320;
    Case cases[] = {
        {"GQA, tied", tiny_config(64, 172, 3, 8, 4, true), DType::F32},
        {"MHA, untied", tiny_config(48, 128, 2, 4, 4, false), DType::F32},
        {"dim 72, hidden 172, vocab 517, GQA 3:1", odd, DType::F32},
        {"theta 5e5, eps 1e-6", theta, DType::F32},
        {"Llama 3.1 rope scaling", scaled, DType::F32},
        {"bf16 weights, hidden 184 (32-blocks, a 16-step and a tail)", tiny_config(64, 184, 2, 8, 2, false), DType::BF16},
        {"f16 weights", tiny_config(64, 172, 2, 8, 2, false), DType::F16},
        {"300 positions: attention in 3 chunks, GQA 4:1", long_ctx, DType::F32, 300},
    };
    int idx = 0;
    for (const Case& c : cases) {
        SUBCASE(c.what) {
            std::string path = temp_dir() + "/ref" + std::to_string(idx) + ".bin";
            write_model_bin(random_weights(c.cfg, 100 + unsigned(idx)), path, c.dtype);
            Model m(path, cpu_ops(0));
            std::vector<int> tokens = random_tokens(c.n_tokens, c.cfg.vocab_size, unsigned(idx));
            std::vector<float> ref = reference_logits(path, tokens, c.cfg.vocab_size);
            check_close(prefill_logits(m, tokens), ref, c.cfg.vocab_size, 1e-4);
            check_close(decode_logits(m, tokens), ref, c.cfg.vocab_size, 1e-4);
        }
        idx++;
    }
}

TEST_CASE("a mixed batch over the paged cache equals each sequence alone") {
    Config c = tiny_config(64, 172, 2, 8, 4, false);
    std::string path = temp_dir() + "/mixed.bin";
    write_model_bin(random_weights(c, 7), path, DType::F32);
    Model m(path, cpu_ops(0));
    std::vector<int> a = random_tokens(30, c.vocab_size, 1), b = random_tokens(21, c.vocab_size, 2);
    std::vector<float> solo_a = prefill_logits(m, a), solo_b = prefill_logits(m, b);

    // Prefill a's first 20 tokens and all of b together (blocks interleave in the cache), then
    // decode a's remaining tokens in batches that also carry b's last tokens again.
    KVCache kv(c, 64, 4);
    REQUIRE(kv.reserve(1, 1));  // b takes block 0 first, so neither sequence's blocks are contiguous
    std::vector<BatchToken> batch;
    std::vector<int> rows;
    std::vector<float> logits((20 + 21) * size_t(c.vocab_size));
    for (int i = 0; i < 20; i++) batch.push_back({0, i, a[i]});
    for (int i = 0; i < 21; i++) batch.push_back({1, i, b[i]});
    for (int i = 0; i < 41; i++) rows.push_back(i);
    for (int i = 0; i < 41; i += 4) {  // grow both sequences block by block
        REQUIRE(kv.reserve(0, std::min(20, i + 4)));
        REQUIRE(kv.reserve(1, std::min(21, i + 4)));
    }
    m.forward(kv, batch, rows, logits.data());
    const int V = c.vocab_size;
    for (int i = 0; i < 20; i++) CHECK(rel_error(&logits[size_t(i) * V], &solo_a[size_t(i) * V], V) < 1e-5);
    for (int i = 0; i < 21; i++) CHECK(rel_error(&logits[size_t(20 + i) * V], &solo_b[size_t(i) * V], V) < 1e-5);
    std::vector<float> step(static_cast<size_t>(V));
    for (int i = 20; i < 30; i++) {
        REQUIRE(kv.reserve(0, i + 1));
        m.forward(kv, {{0, i, a[i]}}, {0}, step.data());
        CHECK(rel_error(step.data(), &solo_a[size_t(i) * V], V) < 1e-5);
    }
    // Truncating and re-running a tail reproduces the same logits (what speculative rejection does).
    kv.truncate(0, 25);
    for (int i = 25; i < 30; i++) {
        REQUIRE(kv.reserve(0, i + 1));
        m.forward(kv, {{0, i, a[i]}}, {0}, step.data());
        CHECK(rel_error(step.data(), &solo_a[size_t(i) * V], V) < 1e-5);
    }
    kv.release(0);
    kv.release(1);
    CHECK(kv.free_tokens() == kv.capacity_tokens());
}

TEST_CASE("KV cache: reserve fails cleanly when blocks run out") {
    Config c = tiny_config(32, 64, 1, 4, 2, true);
    KVCache kv(c, 32, 16);  // two blocks
    CHECK(kv.reserve(0, 16));
    CHECK(kv.reserve(1, 16));
    CHECK_FALSE(kv.reserve(0, 17));
    CHECK(kv.tables[0].size() == 1);  // unchanged by the failed reserve
    kv.release(1);
    CHECK(kv.reserve(0, 32));
}

TEST_CASE("model.bin loader refuses files that do not match their config") {
    Config c = tiny_config(32, 64, 1, 4, 2, false);
    TinyWeights tw = random_weights(c, 3);
    std::string dir = temp_dir();
    SUBCASE("missing tensor") {
        TinyWeights bad = tw;
        bad.tensors.erase(bad.tensors.begin() + 3);  // layers.0.attention.wk.weight
        write_model_bin(bad, dir + "/missing.bin", DType::F32);
        CHECK_THROWS_WITH_AS(Model(dir + "/missing.bin", cpu_ops(0)),
                             doctest::Contains("missing tensor 'layers.0.attention.wk.weight'"), Error);
    }
    SUBCASE("config disagrees with a shape") {
        TinyWeights bad = tw;
        bad.cfg.hidden_dim = 96;  // the tensors still say 64
        SafetensorsWriter w;
        w.metadata = {{"format", kFormatName}, {"version", kFormatVersion}, {"config", bad.cfg.to_json()},
                      {"quantization", "none"}};
        for (auto& [name, v] : tw.tensors) w.add_bytes(name, DType::F32, tw.shape_of(name), v.data());
        std::string tok = read_file(models_dir() + "/tok512.model");
        w.add_bytes("tokenizer.model", DType::U8, {int64_t(tok.size())}, tok.data());
        w.write(dir + "/shape.bin");
        CHECK_THROWS_WITH_AS(Model(dir + "/shape.bin", cpu_ops(0)),
                             doctest::Contains("'layers.0.feed_forward.w1.weight': expected shape [96, 32], found [64, 32]"),
                             Error);
    }
    SUBCASE("integer dtype for a matrix") {
        SafetensorsWriter w;
        w.metadata = {{"format", kFormatName}, {"version", kFormatVersion}, {"config", c.to_json()},
                      {"quantization", "none"}};
        std::vector<int32_t> ints(size_t(c.vocab_size) * c.dim);
        for (auto& [name, v] : tw.tensors) {
            if (name == "tok_embeddings.weight") w.add_bytes(name, DType::I32, tw.shape_of(name), ints.data());
            else w.add_bytes(name, DType::F32, tw.shape_of(name), v.data());
        }
        w.write(dir + "/dtype.bin");
        CHECK_THROWS_WITH_AS(Model(dir + "/dtype.bin", cpu_ops(0)),
                             doctest::Contains("'tok_embeddings.weight': dtype I32 is not a float format"), Error);
    }
    SUBCASE("config values of the wrong type or out of range") {
        auto with_config = [&](const std::string& json) {
            SafetensorsWriter w;
            w.metadata = {{"format", kFormatName}, {"version", kFormatVersion}, {"config", json},
                          {"quantization", "none"}};
            for (auto& [name, v] : tw.tensors) w.add_bytes(name, DType::F32, tw.shape_of(name), v.data());
            w.write(dir + "/cfg.bin");
            return dir + "/cfg.bin";
        };
        std::string good = c.to_json();
        auto patched = [&](const std::string& key, const std::string& value) {  // replace one "key": value
            std::string s = good;
            size_t at = s.find("\"" + key + "\":");
            REQUIRE(at != std::string::npos);
            size_t from = s.find(':', at) + 1, to = s.find_first_of(",}", from);
            return s.replace(from, to - from, value);
        };
        CHECK_THROWS_WITH_AS(Model(with_config(patched("norm_eps", "\"tiny\"")), cpu_ops(0)),
                             doctest::Contains("config 'norm_eps' must be a number"), Error);
        CHECK_THROWS_WITH_AS(Model(with_config(patched("bos_id", "600")), cpu_ops(0)),
                             doctest::Contains("bos_id = 600 and eos_id = 2 must be token ids below vocab_size = 512"),
                             Error);
        CHECK_THROWS_WITH_AS(Model(with_config(patched("max_seq_len", "1")), cpu_ops(0)),
                             doctest::Contains("max_seq_len = 1 must be at least 2"), Error);
        CHECK_THROWS_WITH_AS(Model(with_config(patched("head_dim", "600000000")), cpu_ops(0)),
                             doctest::Contains("n_heads x head_dim = 2400000000 is too large"), Error);
        CHECK_THROWS_WITH_AS(Model(with_config(patched("dim", "99999999999")), cpu_ops(0)),
                             doctest::Contains("config 'dim' must be an integer (32-bit), found 99999999999"), Error);
        // An unsigned value above INT64_MAX is named as written, not wrapped to a negative size.
        CHECK_THROWS_WITH_AS(Model(with_config(patched("dim", "18446744073709551615")), cpu_ops(0)),
                             doctest::Contains("config 'dim' must be an integer (32-bit), found 18446744073709551615"),
                             Error);
        // Found by fuzzing: a corrupt layer count made quantize list 9 x 10^8 tensors before looking in
        // the file (a hang, then out of memory); the loader, the converter and GGUF import share this.
        CHECK_THROWS_WITH_AS(Model(with_config(patched("n_layers", "100000000")), cpu_ops(0)),
                             doctest::Contains("config n_layers = 100000000 with n_experts = 0 means 900000000 tensors"),
                             Error);
        CHECK_THROWS_WITH_AS(Model(with_config(patched("n_layers", "2000")), cpu_ops(0)),  // within the bound
                             doctest::Contains("missing tensor 'layers.1.attention_norm.weight'"), Error);
        // A double beyond float range would convert to float undefined (inf in practice, which
        // passed "positive"); infinities are refused too.
        CHECK_THROWS_WITH_AS(Model(with_config(patched("norm_eps", "1e300")), cpu_ops(0)),
                             doctest::Contains("config 'norm_eps' = 1e+300 is out of float range"), Error);
        CHECK_THROWS_WITH_AS(Model(with_config(patched("rope_theta", "3.5e38")), cpu_ops(0)),
                             doctest::Contains("config 'rope_theta' = 3.5e+38 is out of float range"), Error);
        std::string scaled = good;
        scaled.insert(scaled.size() - 1, R"(,"rope_scaling":{"type":"llama3","factor":8,"low_freq_factor":1,)"
                                         R"("high_freq_factor":4,"original_max_seq_len":8192.5})");
        CHECK_THROWS_WITH_AS(Model(with_config(scaled), cpu_ops(0)),
                             doctest::Contains("original_max_seq_len must be a 32-bit integer"), Error);
    }
    SUBCASE("a matrix whose data offset breaks its element alignment") {
        // Found by fuzzing: the kernels read weights in place as typed arrays (UBSan: misaligned
        // load). The tokenizer (7522 bytes, 2 mod 4) laid out first puts every F32 tensor 2 bytes off.
        // Written by hand: SafetensorsWriter aligns every tensor (widest elements first).
        std::string tok = read_file(models_dir() + "/tok512.model");
        REQUIRE(tok.size() % 4 == 2);
        nlohmann::json header = {{"__metadata__", {{"format", kFormatName}, {"version", kFormatVersion},
                                                   {"config", c.to_json()}, {"quantization", "none"}}}};
        std::string data = tok;
        header["tokenizer.model"] = {{"dtype", "U8"}, {"shape", {tok.size()}}, {"data_offsets", {0, tok.size()}}};
        for (auto& [name, v] : tw.tensors) {
            const size_t begin = data.size();
            data.append(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
            header[name] = {{"dtype", "F32"}, {"shape", tw.shape_of(name)}, {"data_offsets", {begin, data.size()}}};
        }
        std::string h = header.dump();
        h.resize(4096 - 8, ' ');
        const uint64_t hl = h.size();
        write_bytes(dir + "/misaligned.bin", std::string(reinterpret_cast<const char*>(&hl), 8) + h + data);
        CHECK_THROWS_WITH_AS(Model(dir + "/misaligned.bin", cpu_ops(0)),
                             doctest::Contains(fmt("tensor 'tok_embeddings.weight': F32 data at file offset %zu is "
                                                   "not aligned to its 4-byte elements", 4096 + tok.size()).c_str()),
                             Error);
    }
    SUBCASE("not a fastgen file") {
        SafetensorsWriter w;
        float x = 1;
        w.add_bytes("x", DType::F32, {1}, &x);
        w.write(dir + "/plain.safetensors");
        CHECK_THROWS_WITH_AS(Model(dir + "/plain.safetensors", cpu_ops(0)),
                             doctest::Contains("metadata has no 'format'"), Error);
    }
}
