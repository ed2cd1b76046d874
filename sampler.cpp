// sampler.cpp: temperature / top-k / top-p sampling with a small, platform-independent RNG.
#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

Sampler::Sampler(SamplingParams p, uint64_t seed) : p_(p), state_(seed ^ 0x9e3779b97f4a7c15ull) {}

// splitmix64: the same stream on every platform, unlike std:: distributions.
float Sampler::uniform() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return float(z >> 40) * (1.0f / 16777216.0f);  // 24 random bits
}

int argmax(const float* x, int n) { return int(std::max_element(x, x + n) - x); }

double log_prob(const float* logits, int n, int target) {
    double mx = *std::max_element(logits, logits + n), sum = 0.0;
    for (int i = 0; i < n; i++) sum += std::exp(double(logits[i]) - mx);
    return double(logits[target]) - mx - std::log(sum);
}

void Sampler::distribution(const float* logits, int vocab, std::vector<float>& probs) const {
    probs.assign(size_t(vocab), 0.0f);
    if (p_.temperature <= 0.0f) {
        probs[size_t(argmax(logits, vocab))] = 1.0f;
        return;
    }
    // Softmax at temperature.
    float mx = *std::max_element(logits, logits + vocab);
    double sum = 0.0;
    for (int i = 0; i < vocab; i++) sum += probs[i] = std::exp((logits[i] - mx) / p_.temperature);
    for (float& q : probs) q = float(q / sum);
    if (p_.top_k <= 0 && p_.top_p >= 1.0f) return;
    // Rank tokens by probability (ties by id, so the kept set is deterministic).
    std::vector<int> order(static_cast<size_t>(vocab));
    std::iota(order.begin(), order.end(), 0);
    int keep = p_.top_k > 0 ? std::min(p_.top_k, vocab) : vocab;
    auto by_prob = [&](int a, int b) { return probs[a] > probs[b] || (probs[a] == probs[b] && a < b); };
    std::partial_sort(order.begin(), order.begin() + keep, order.end(), by_prob);
    if (p_.top_p < 1.0f) {
        // Smallest prefix whose mass reaches top_p of the top-k mass; always at least one token.
        double kept = 0.0, total = 0.0;
        for (int i = 0; i < keep; i++) total += probs[order[i]];
        int n = 0;
        while (n < keep && (n == 0 || kept < p_.top_p * total)) kept += probs[order[n++]];
        keep = n;
    }
    std::vector<float> out(static_cast<size_t>(vocab), 0.0f);
    double mass = 0.0;
    for (int i = 0; i < keep; i++) mass += probs[order[i]];
    for (int i = 0; i < keep; i++) out[order[i]] = float(probs[order[i]] / mass);
    probs.swap(out);
}

int Sampler::sample(const float* logits, int vocab) {
    if (p_.temperature <= 0.0f) return argmax(logits, vocab);
    distribution(logits, vocab, probs_);
    return draw(probs_);
}

int Sampler::draw(const std::vector<float>& probs) {
    double total = 0.0;
    for (float q : probs) total += q;
    double r = uniform() * total, cdf = 0.0;
    int last = 0;
    for (size_t i = 0; i < probs.size(); i++) {
        if (probs[i] <= 0.0f) continue;
        cdf += probs[i];
        last = int(i);
        if (r < cdf) return last;
    }
    return last;  // r fell past the rounded total
}
