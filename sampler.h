// sampler.h: turning logits into the next token: temperature, top-k, top-p, a seeded RNG.
#pragma once
#include <cstdint>
#include <vector>

struct SamplingParams {
    float temperature = 0.8f;  // 0 = greedy (argmax)
    int top_k = 200;           // keep the k most likely tokens; 0 = all
    float top_p = 1.0f;        // keep the smallest set whose probability reaches p; 1 = all
};

class Sampler {
  public:
    Sampler(SamplingParams p, uint64_t seed);
    int sample(const float* logits, int vocab);
    // The exact distribution sample() draws from (one-hot at argmax when temperature is 0);
    // speculative decoding compares these for target and draft.
    void distribution(const float* logits, int vocab, std::vector<float>& probs) const;
    float uniform();  // in [0, 1), from the seeded generator
    // A token drawn from probs (any non-negative weights; normalised here).
    int draw(const std::vector<float>& probs);
    const SamplingParams& params() const { return p_; }

  private:
    SamplingParams p_;
    uint64_t state_;
    std::vector<float> probs_;
};

int argmax(const float* x, int n);  // first index of the maximum
// log softmax(logits)[target], computed stably in double (for perplexity).
double log_prob(const float* logits, int n, int target);
