// tests/test_decode.cpp: speculative decoding: greedy output identical to plain decoding with the
// real TinyStories pair, sampled output following the target's distribution (chi-square, fixed
// seeds), and both KV caches consistent after rejections.
#include <doctest/doctest.h>

#include <cmath>
#include <map>

#include "convert.h"
#include "decode.h"
#include "test_util.h"

namespace {

// The real pair from ../shared/models, converted once.
Model& real_model(const std::string& name) {
    static std::map<std::string, std::unique_ptr<Model>> cache;
    auto& m = cache[name];
    if (!m) {
        m = std::make_unique<Model>(shared_model_bin(name), cpu_ops(0));
    }
    return *m;
}

struct Run {
    std::vector<int> tokens;
    DecodeStats stats;
};

Run run_decode(Model& target, Drafter* drafter, int k, const std::vector<int>& prompt, int n, Sampler& s) {
    KVCache kv(target.cfg, target.cfg.max_seq_len);
    Run r;
    r.stats = decode(target, kv, prompt, n, s, drafter, k, [&](int id) {
        r.tokens.push_back(id);
        return true;
    });
    return r;
}

// 0.001 upper quantile of chi-square with df degrees of freedom (Wilson-Hilferty).
double chi2_critical(int df) {
    const double z = 3.0902, a = 2.0 / (9.0 * df);
    return df * std::pow(1.0 - a + z * std::sqrt(a), 3.0);
}

// Chi-square statistic of observed counts against expected probabilities, lumping cells whose
// expected count is under 5 into one; returns {statistic, degrees of freedom}.
std::pair<double, int> chi_square(const std::map<int, int>& observed, const std::map<int, double>& expected, int n) {
    double stat = 0, lump_obs = 0, lump_exp = 0;
    int cells = 0;
    for (auto& [key, p] : expected) {
        double e = p * n, o = observed.count(key) ? observed.at(key) : 0;
        if (e < 5) {
            lump_exp += e;
            lump_obs += o;
            continue;
        }
        stat += (o - e) * (o - e) / e;
        cells++;
    }
    for (auto& [key, o] : observed)  // outcomes the target gives probability 0 must never occur
        if (!expected.count(key)) lump_obs += o, lump_exp += 1e-9;
    if (lump_exp > 0) {
        stat += (lump_obs - lump_exp) * (lump_obs - lump_exp) / std::max(lump_exp, 1e-9);
        cells++;
    }
    return {stat, cells - 1};
}

std::vector<float> target_distribution(Model& m, const std::vector<int>& context, const SamplingParams& sp) {
    KVCache kv(m.cfg, int(context.size()));
    REQUIRE(kv.reserve(0, int(context.size())));
    std::vector<BatchToken> batch;
    for (int i = 0; i < int(context.size()); i++) batch.push_back({0, i, context[size_t(i)]});
    std::vector<float> logits(size_t(m.cfg.vocab_size)), p;
    m.forward(kv, batch, {int(context.size()) - 1}, logits.data());
    Sampler(sp, 0).distribution(logits.data(), m.cfg.vocab_size, p);
    return p;
}

}  // namespace

TEST_CASE("speculative greedy output equals plain greedy output, K = 1..8, both directions") {
    struct Pair { const char *target, *draft; } pairs[] = {{"stories260K", "llama2xs_tok512"},
                                                          {"llama2xs_tok512", "stories260K"}};
    const std::vector<int> prompt = {1, 403, 407, 261, 378};  // BOS "Once upon a time"
    for (const Pair& pr : pairs) {
        Model& target = real_model(pr.target);
        Model& draft = real_model(pr.draft);
        Sampler greedy({0.0f, 0, 1.0f}, 1);
        Run plain = run_decode(target, nullptr, 0, prompt, 200, greedy);
        REQUIRE(plain.tokens.size() > 100);
        for (int k = 1; k <= 8; k++) {
            CAPTURE(pr.target);
            CAPTURE(k);
            ModelDrafter drafter(draft);
            Run spec = run_decode(target, &drafter, k, prompt, 200, greedy);
            CHECK(spec.tokens == plain.tokens);
            CHECK(spec.stats.accepted > 0);                     // some drafts accepted...
            CHECK(spec.stats.accepted < spec.stats.drafted);  // ...and some rejected
            CHECK(spec.stats.target_forwards < int(plain.tokens.size()));
        }
        NgramDrafter lookup(target.cfg.vocab_size, 3);
        Run ngram = run_decode(target, &lookup, 4, prompt, 200, greedy);
        CHECK(ngram.tokens == plain.tokens);
        CHECK(ngram.stats.accepted > 0);
    }
}

TEST_CASE("verify_drafts: emitted tokens follow the target distribution") {
    // Fixed rows: p (target) and q (draft) disagree, so both branches run.
    std::vector<std::vector<float>> p = {{0.1f, 0.4f, 0.2f, 0.3f, 0.0f}, {0.5f, 0.1f, 0.1f, 0.1f, 0.2f},
                                         {0.2f, 0.2f, 0.2f, 0.2f, 0.2f}};
    std::vector<std::vector<float>> q = {{0.3f, 0.1f, 0.1f, 0.2f, 0.3f}, {0.1f, 0.6f, 0.1f, 0.1f, 0.1f}};
    Sampler s({1.0f, 0, 1.0f}, 99);
    const int n = 20000;
    std::map<int, int> first;
    int accepted = 0, rejected = 0;
    for (int t = 0; t < n; t++) {
        std::vector<int> drafts = {s.draw(q[0]), s.draw(q[1])};
        int next;
        int m = verify_drafts(p, q, drafts, s, &next);
        first[m > 0 ? drafts[0] : next]++;
        (m > 0 ? accepted : rejected)++;
    }
    CHECK(accepted > 0);
    CHECK(rejected > 0);
    CHECK(first.count(4) == 0);  // p gives token 4 nothing, though q proposes it 30% of the time
    std::map<int, double> expect;
    for (int i = 0; i < 5; i++) if (p[0][size_t(i)] > 0) expect[i] = p[0][size_t(i)];
    auto [stat, df] = chi_square(first, expect, n);
    CHECK(stat < chi2_critical(df));

    SUBCASE("identical distributions accept everything; disjoint ones nothing") {
        int next;
        std::vector<std::vector<float>> same = {p[0], p[1], p[2]};
        for (int t = 0; t < 200; t++) CHECK(verify_drafts(same, {p[0], p[1]}, {s.draw(p[0]), s.draw(p[1])}, s, &next) == 2);
        std::vector<std::vector<float>> only0 = {{1, 0, 0, 0, 0}, {1, 0, 0, 0, 0}};
        std::vector<std::vector<float>> only3 = {{0, 0, 0, 1, 0}};
        CHECK(verify_drafts(only0, only3, {3}, s, &next) == 0);
        CHECK(next == 0);
    }
}

TEST_CASE("speculative sampling with tiny random models matches the target's distribution") {
    // The draft is the target with noise on every weight: it agrees often but not always, like a
    // real draft model, so accepted and rejected drafts both occur.
    Config tc = tiny_config(48, 96, 2, 4, 2, false);
    std::string tp = temp_dir() + "/spec-target.bin", dp = temp_dir() + "/spec-draft.bin";
    TinyWeights tw = random_weights(tc, 11), noisy = tw, noise = random_weights(tc, 12);
    for (size_t i = 0; i < noisy.tensors.size(); i++)
        for (size_t j = 0; j < noisy.tensors[i].second.size(); j++)
            noisy.tensors[i].second[j] += 0.3f * noise.tensors[i].second[j];
    write_model_bin(tw, tp, DType::F32);
    write_model_bin(noisy, dp, DType::F32);
    Model target(tp, cpu_ops(0)), draft(dp, cpu_ops(0));
    const SamplingParams sp{1.0f, 4, 1.0f};  // top-4 keeps the support small enough to count
    const std::vector<int> prompt = {1, 17, 42};

    // Exact joint distribution of the first two tokens under the target alone.
    std::vector<float> p1 = target_distribution(target, prompt, sp);
    std::map<int, double> joint;
    for (int a = 0; a < tc.vocab_size; a++) {
        if (p1[size_t(a)] == 0) continue;
        std::vector<int> ctx = prompt;
        ctx.push_back(a);
        std::vector<float> p2 = target_distribution(target, ctx, sp);
        for (int b = 0; b < tc.vocab_size; b++)
            if (p2[size_t(b)] > 0) joint[a * tc.vocab_size + b] = double(p1[size_t(a)]) * p2[size_t(b)];
    }
    const int n = 3000;
    std::map<int, int> seen;
    int drafted = 0, accepted = 0;
    Sampler s(sp, 2024);
    ModelDrafter drafter(draft);
    for (int t = 0; t < n; t++) {
        Run r = run_decode(target, &drafter, 3, prompt, 2, s);
        REQUIRE(r.tokens.size() == 2);
        seen[r.tokens[0] * tc.vocab_size + r.tokens[1]]++;
        drafted += r.stats.drafted;
        accepted += r.stats.accepted;
    }
    CHECK(accepted > 0);
    CHECK(accepted < drafted);
    auto [stat, df] = chi_square(seen, joint, n);
    MESSAGE("joint of two tokens: chi-square " << stat << " on " << df << " df, acceptance " << double(accepted) / drafted);
    CHECK(df >= 4);
    CHECK(stat < chi2_critical(df));
}

TEST_CASE("KV caches after rejections equal a fresh run") {
    Model& target = real_model("stories260K");
    Model& draft = real_model("llama2xs_tok512");
    const std::vector<int> prompt = {1, 403, 407, 261, 378};
    Sampler s({0.9f, 0, 1.0f}, 5);
    ModelDrafter drafter(draft);
    KVCache kv(target.cfg, target.cfg.max_seq_len);
    std::vector<int> out;
    DecodeStats st = decode(target, kv, prompt, 60, s, &drafter, 4, [&](int id) {
        out.push_back(id);
        return true;
    });
    REQUIRE(st.accepted < st.drafted);  // rejections happened
    std::vector<int> context = prompt;
    context.insert(context.end(), out.begin(), out.end());
    const int last = int(context.size()) - 1, V = target.cfg.vocab_size;

    // Target: the cache holds positions [0, last); one more step must equal a fresh prefill.
    std::vector<float> cont(static_cast<size_t>(V));
    REQUIRE(kv.reserve(0, last + 1));
    target.forward(kv, {{0, last, context.back()}}, {0}, cont.data());
    KVCache fresh(target.cfg, target.cfg.max_seq_len);
    REQUIRE(fresh.reserve(0, last + 1));
    std::vector<BatchToken> batch;
    for (int i = 0; i <= last; i++) batch.push_back({0, i, context[size_t(i)]});
    std::vector<float> ref(static_cast<size_t>(V));
    target.forward(fresh, batch, {last}, ref.data());
    for (int i = 0; i < V; i++) REQUIRE(cont[size_t(i)] == doctest::Approx(ref[size_t(i)]).epsilon(1e-5));

    // Draft: its next proposal distribution must equal the draft model's on a fresh run.
    std::vector<int> d;
    std::vector<std::vector<float>> q;
    drafter.propose(context, 1, s, d, q);
    SamplingParams sp{0.9f, 0, 1.0f};
    std::vector<float> fresh_q = target_distribution(draft, context, sp);
    for (int i = 0; i < V; i++) REQUIRE(q[0][size_t(i)] == doctest::Approx(fresh_q[size_t(i)]).epsilon(1e-5));
}

TEST_CASE("n-gram drafter proposes what followed the latest match") {
    NgramDrafter nd(10, 3);
    Sampler s({0.0f, 0, 1.0f}, 1);
    std::vector<int> d;
    std::vector<std::vector<float>> q;
    nd.propose({1, 5, 6, 7, 2, 5, 6, 8, 9, 5, 6}, 3, s, d, q);  // "5 6" last seen followed by 8 9 5
    CHECK(d == std::vector<int>{8, 9, 5});
    REQUIRE(q.size() == 3);
    CHECK(q[0][8] == 1.0f);
    d.clear();
    q.clear();
    nd.propose({1, 2, 3, 4}, 3, s, d, q);  // no earlier match at all
    CHECK(d.empty());
}
