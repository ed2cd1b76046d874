// decode.h: the decode loop for one sequence: prefill, then rounds of (draft, verify, emit) until
// EOS, the token limit or the end of the context. Plain decoding is a round with no drafts;
// speculative decoding adds a Drafter (a smaller model, or prompt lookup).
#pragma once
#include <algorithm>
#include <climits>
#include <functional>
#include <vector>

#include "model.h"
#include "sampler.h"

// Proposes tokens to follow a context, with the distribution each was drawn from.
class Drafter {
  public:
    virtual ~Drafter() = default;
    // Up to k tokens; drafts[i] was drawn from probs[i]. Fewer (or none) is allowed.
    virtual void propose(const std::vector<int>& context, int k, Sampler& sampler, std::vector<int>& drafts,
                         std::vector<std::vector<float>>& probs) = 0;
    // The first n context tokens are final: forget whatever was computed past them.
    virtual void rollback(int n) = 0;
    // Positions the drafter can handle (its model's context, or its cache's length).
    virtual int max_positions() const { return INT_MAX; }
};

// A smaller model with its own KV cache, sampled with the target's settings (its own Sampler
// would break the exactness argument only if the settings differed; it shares the target's).
class ModelDrafter final : public Drafter {
  public:
    // The draft's cache holds its context, or `positions` when fewer (the target's: no more is used).
    explicit ModelDrafter(Model& draft, int positions = INT_MAX);
    void propose(const std::vector<int>& context, int k, Sampler& sampler, std::vector<int>& drafts,
                 std::vector<std::vector<float>>& probs) override;
    void rollback(int n) override;
    int max_positions() const override { return std::min(model_.cfg.max_seq_len, kv.capacity_tokens()); }
    KVCache kv;  // sequence 0 holds positions [0, done_) of the context (+ unverified drafts)

  private:
    Model& model_;
    int done_ = 0;
    std::vector<float> logits_;
};

// Prompt lookup decoding: find the most recent earlier occurrence of the context's last n tokens
// (n = max_n down to 1) and propose what followed it. Proposals are one-hot distributions, so the
// same verification keeps the output exactly the target's.
class NgramDrafter final : public Drafter {
  public:
    NgramDrafter(int vocab_size, int max_n) : vocab_(vocab_size), max_n_(max_n) {}
    void propose(const std::vector<int>& context, int k, Sampler& sampler, std::vector<int>& drafts,
                 std::vector<std::vector<float>>& probs) override;
    void rollback(int) override {}

  private:
    int vocab_, max_n_;
};

// Accept or reject drafts against the target's distributions: p has drafts.size() + 1 rows, q[i]
// is the distribution drafts[i] was drawn from. Draft x is accepted with probability
// min(1, p(x) / q(x)); at the first rejection the next token is drawn from max(0, p - q)
// renormalised, and when all pass, from the last row of p. Returns the number accepted and sets
// *next; the emitted tokens then follow p exactly (Leviathan et al. 2023, Chen et al. 2023).
int verify_drafts(const std::vector<std::vector<float>>& p, const std::vector<std::vector<float>>& q,
                  const std::vector<int>& drafts, Sampler& sampler, int* next);

struct DecodeStats {
    int prompt_tokens = 0;
    int cached_tokens = 0;    // prompt tokens not computed: kept from the last call, or prefix-cached
    int generated = 0;        // tokens sampled, EOS included
    int target_forwards = 0;  // decode rounds
    int drafted = 0, accepted = 0;
    double t_prefill = 0, t_decode = 0;  // seconds
    double t_draft = 0, t_target = 0;    // parts of t_decode
};

// Generates after `prompt` into sequence 0 of `kv`. on_token(id) sees each emitted token in order
// (not EOS) and may return false to stop. drafter may be null (k ignored). The first `cached`
// prompt tokens are already in sequence 0 (a chat's earlier turns: the caller guarantees they
// are the same tokens); everything past them is dropped and recomputed. cached = 0: a new sequence,
// which starts over the longest cached chain of its prompt (KVCache::match). The full blocks
// computed are committed to the prefix cache as they fill, so they outlive the sequence.
DecodeStats decode(Model& target, KVCache& kv, const std::vector<int>& prompt, int max_new_tokens,
                   Sampler& sampler, Drafter* drafter, int k, const std::function<bool(int)>& on_token,
                   int cached = 0);
