// tests/test_sampler.cpp: temperature 0 is argmax; top-k and top-p restrict the support; a seed
// reproduces; sampled frequencies follow the distribution.
#include <doctest/doctest.h>

#include <cmath>
#include <set>

#include "sampler.h"

TEST_CASE("temperature 0 is argmax, first index on ties") {
    std::vector<float> logits = {0.1f, 3.0f, -2.0f, 3.0f, 1.0f};
    Sampler s({0.0f, 0, 1.0f}, 1);
    for (int i = 0; i < 10; i++) CHECK(s.sample(logits.data(), 5) == 1);
    std::vector<float> p;
    s.distribution(logits.data(), 5, p);
    CHECK(p == std::vector<float>{0, 1, 0, 0, 0});
}

TEST_CASE("top-k and top-p restrict the support") {
    std::vector<float> logits = {2.0f, 1.0f, 0.5f, 0.0f, -1.0f, 3.0f};
    SUBCASE("top-k 2 keeps the two largest, renormalised") {
        Sampler s({1.0f, 2, 1.0f}, 7);
        std::vector<float> p;
        s.distribution(logits.data(), 6, p);
        CHECK(p[5] == doctest::Approx(std::exp(3.0) / (std::exp(3.0) + std::exp(2.0))));
        CHECK(p[0] == doctest::Approx(std::exp(2.0) / (std::exp(3.0) + std::exp(2.0))));
        for (int i : {1, 2, 3, 4}) CHECK(p[i] == 0.0f);
        std::set<int> seen;
        for (int i = 0; i < 2000; i++) seen.insert(s.sample(logits.data(), 6));
        CHECK(seen == std::set<int>{0, 5});
    }
    SUBCASE("top-p keeps the smallest prefix reaching p") {
        // probabilities at T=1: 3.0 -> 0.61, 2.0 -> 0.22, 1.0 -> 0.08, ...
        Sampler s({1.0f, 0, 0.8f}, 7);
        std::vector<float> p;
        s.distribution(logits.data(), 6, p);
        CHECK(p[5] > 0);
        CHECK(p[0] > 0);  // 0.61 < 0.8, so the second token is needed
        for (int i : {1, 2, 3, 4}) CHECK(p[i] == 0.0f);
        Sampler tiny({1.0f, 0, 0.1f}, 7);
        tiny.distribution(logits.data(), 6, p);
        CHECK(p[5] == 1.0f);  // the top token alone already reaches p
    }
}

TEST_CASE("a seed reproduces the samples, another seed does not") {
    std::vector<float> logits(100);
    for (int i = 0; i < 100; i++) logits[i] = std::sin(float(i));
    auto draw = [&](uint64_t seed) {
        Sampler s({1.0f, 0, 1.0f}, seed);
        std::vector<int> out;
        for (int i = 0; i < 50; i++) out.push_back(s.sample(logits.data(), 100));
        return out;
    };
    CHECK(draw(42) == draw(42));
    CHECK(draw(42) != draw(43));
}

TEST_CASE("sampled frequencies follow the distribution (chi-square, fixed seed)") {
    std::vector<float> logits = {0.0f, 1.0f, 2.0f, 0.5f, -1.0f};
    Sampler s({0.7f, 0, 1.0f}, 123);
    std::vector<float> p;
    s.distribution(logits.data(), 5, p);
    const int n = 20000;
    std::vector<int> count(5);
    for (int i = 0; i < n; i++) count[size_t(s.sample(logits.data(), 5))]++;
    double chi2 = 0;
    for (int i = 0; i < 5; i++) chi2 += std::pow(count[i] - n * p[i], 2) / (n * p[i]);
    CHECK(chi2 < 18.47);  // p = 0.001 critical value for 4 degrees of freedom
}

TEST_CASE("log_prob is a stable log-softmax") {
    std::vector<float> logits = {1000.0f, 1000.0f};
    CHECK(log_prob(logits.data(), 2, 0) == doctest::Approx(std::log(0.5)));
}
