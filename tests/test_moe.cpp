// tests/test_moe.cpp: Mixtral-style mixture of experts: the router (softmax, top-k, ties,
// renormalisation), MoE forward against the PyTorch reference, batch grouping against one token
// at a time, int8 experts, and the per-token byte count.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>

#include "common.h"
#include "convert.h"
#include "model.h"
#include "test_util.h"

namespace {

Config moe_config(int dim, int hidden, int layers, int heads, int kv_heads, int experts, int top_k) {
    Config c = tiny_config(dim, hidden, layers, heads, kv_heads, false);
    c.n_experts = experts;
    c.n_experts_per_tok = top_k;
    return c;
}

std::vector<float>& tensor(TinyWeights& tw, const std::string& name) {
    for (auto& [n, v] : tw.tensors)
        if (n == name) return v;
    FAIL("no tensor " << name);
    throw 0;
}

}  // namespace

TEST_SUITE("moe") {

TEST_CASE("router: softmax, top-k, renormalised weights, ties to the lower index") {
    int chosen[3];
    float w[3];
    SUBCASE("distinct logits") {
        const float logits[4] = {0.0f, 1.0f, 2.0f, -1.0f};
        moe_route(logits, 4, 2, chosen, w);
        CHECK(chosen[0] == 2);
        CHECK(chosen[1] == 1);
        // renormalised over the two: e^2 / (e^2 + e^1) and e / (e^2 + e)
        const double a = std::exp(2.0), b = std::exp(1.0);
        CHECK(w[0] == doctest::Approx(a / (a + b)).epsilon(1e-6));
        CHECK(w[1] == doctest::Approx(b / (a + b)).epsilon(1e-6));
    }
    SUBCASE("three-way tie below a winner") {
        const float logits[5] = {0.5f, 3.0f, 3.0f, 3.0f, 4.0f};
        moe_route(logits, 5, 3, chosen, w);
        CHECK(chosen[0] == 4);
        CHECK(chosen[1] == 1);
        CHECK(chosen[2] == 2);
        const double e4 = std::exp(1.0), s = e4 + 2;
        CHECK(w[0] == doctest::Approx(e4 / s).epsilon(1e-6));
        CHECK(w[1] == doctest::Approx(1 / s).epsilon(1e-6));
        CHECK(w[2] == doctest::Approx(1 / s).epsilon(1e-6));
    }
    SUBCASE("all equal") {
        const float logits[8] = {};
        moe_route(logits, 8, 2, chosen, w);
        CHECK(chosen[0] == 0);
        CHECK(chosen[1] == 1);
        CHECK(w[0] == 0.5f);
        CHECK(w[1] == 0.5f);
    }
}

TEST_CASE("MoE forward matches the PyTorch reference at every position") {
    struct Case { const char* what; Config cfg; DType dtype; };
    Case cases[] = {
        {"4 experts, top-2, GQA 8/4", moe_config(64, 96, 2, 8, 4, 4, 2), DType::F32},
        {"8 experts, top-2, GQA 6/2, odd sizes", moe_config(72, 100, 2, 6, 2, 8, 2), DType::F32},
        {"8 experts, top-2, bf16", moe_config(64, 128, 2, 4, 2, 8, 2), DType::BF16},
    };
    int idx = 0;
    for (const Case& c : cases) {
        SUBCASE(c.what) {
            std::string path = temp_dir() + "/moe-ref" + std::to_string(idx) + ".bin";
            write_model_bin(random_weights(c.cfg, 200 + unsigned(idx)), path, c.dtype);
            Model m(path, cpu_ops(0));
            REQUIRE(m.w.layers[0].experts.size() == size_t(c.cfg.n_experts));
            std::vector<int> tokens = random_tokens(37, c.cfg.vocab_size, 50 + unsigned(idx));
            std::vector<float> ref = reference_logits(path, tokens, c.cfg.vocab_size);
            std::vector<float> prefill = prefill_logits(m, tokens), decode = decode_logits(m, tokens);
            double e1 = worst_rel_error(prefill, ref, c.cfg.vocab_size);
            double e2 = worst_rel_error(decode, ref, c.cfg.vocab_size);
            MESSAGE(std::string(c.what) << ": prefill " << e1 << ", token by token " << e2);
            CHECK(e1 < 1e-4);
            CHECK(e2 < 1e-4);
            // Experts grouped over the whole batch equal one token at a time (only the matmul
            // blocking differs).
            CHECK(worst_rel_error(prefill, decode, c.cfg.vocab_size) < 1e-5);
        }
        idx++;
    }
}

TEST_CASE("MoE: tied router logits pick the lower experts, equal weights") {
    // A zero router ties all experts at every token: top-2 must be experts 0 and 1 with weight 1/2
    // each. With both of them set to one FFN W (and the others different), the model must equal
    // the dense model whose FFN is W: 1/2 W(x) + 1/2 W(x) = W(x).
    Config dc = tiny_config(64, 96, 2, 8, 4, false);
    TinyWeights dense = random_weights(dc, 31);
    for (int experts : {4, 8}) {
        CAPTURE(experts);
        Config mc = dc;
        mc.n_experts = experts;
        mc.n_experts_per_tok = 2;
        TinyWeights moe = random_weights(mc, 32);
        for (auto& [name, v] : moe.tensors)  // attention, norms, embeddings, classifier from dense
            for (auto& [dn, dv] : dense.tensors)
                if (dn == name) v = dv;
        for (int l = 0; l < mc.n_layers; l++) {
            std::vector<float>& gate = tensor(moe, layer_tensor(l, "feed_forward.gate.weight"));
            std::fill(gate.begin(), gate.end(), 0.0f);
            for (int e : {0, 1})
                for (const char* w : {"w1", "w2", "w3"})
                    tensor(moe, expert_tensor(l, e, w)) = dense.get(layer_tensor(l, (std::string("feed_forward.") + w + ".weight").c_str()));
        }
        const std::string dp = temp_dir() + "/tie-dense.bin", mp = temp_dir() + "/tie-moe" + std::to_string(experts) + ".bin";
        write_model_bin(dense, dp, DType::F32);
        write_model_bin(moe, mp, DType::F32);
        Model d(dp, cpu_ops(0)), m(mp, cpu_ops(0));
        std::vector<int> tokens = random_tokens(20, dc.vocab_size, 9);
        CHECK(worst_rel_error(prefill_logits(m, tokens), prefill_logits(d, tokens), dc.vocab_size) < 1e-5);
        CHECK(worst_rel_error(decode_logits(m, tokens), prefill_logits(d, tokens), dc.vocab_size) < 1e-5);
    }
}

TEST_CASE("MoE int8 experts: logits close to f32, router kept f32, bytes per token count k experts") {
    Config c = moe_config(64, 128, 2, 8, 4, 8, 2);
    std::string path = temp_dir() + "/moe-int8.bin";
    write_model_bin(random_weights(c, 77), path, DType::F32);
    ConvertOptions o;
    o.input = path;
    o.output = path + ".q";
    o.mode = "int8";
    o.progress = false;
    convert_checkpoint(o);
    Model f(path, cpu_ops(0)), q(path + ".q", cpu_ops(0));
    CHECK(q.w.layers[0].gate.dtype == DType::F32);
    CHECK(q.w.layers[1].experts[7].w2.dtype == DType::I8);
    std::vector<int> tokens = random_tokens(24, c.vocab_size, 4);
    double err = worst_rel_error(prefill_logits(q, tokens), prefill_logits(f, tokens), c.vocab_size);
    MESSAGE("int8 MoE logits relative error " << err);
    CHECK(err < 0.05);
    CHECK(err > 0);  // the experts were quantized

    // f32: per layer attention + router + 2 of 8 experts; plus the classifier and one embedding row.
    const size_t d = 64, h = 128, q_dim = 64, kv = 32;  // wq, wo [64, 64]; wk, wv [32, 64]
    size_t per_layer = (q_dim * d + 2 * kv * d + d * q_dim + 8 * d + 2 * 3 * h * d) * 4;
    size_t expect = 2 * per_layer + (size_t(c.vocab_size) * d + d) * 4;
    CHECK(f.weight_bytes_per_token() == expect);
}

}  // TEST_SUITE
