// decode.cpp: one sequence's decode loop with optional speculative drafts, the exact
// accept/reject rule, and the two drafters (a draft model, prompt lookup).
#include "decode.h"

#include <algorithm>

#include "common.h"

// ---------------------------------------------------------------------------------------------
// verification

int verify_drafts(const std::vector<std::vector<float>>& p, const std::vector<std::vector<float>>& q,
                  const std::vector<int>& drafts, Sampler& sampler, int* next) {
    const size_t k = drafts.size();
    for (size_t i = 0; i < k; i++) {
        const int x = drafts[i];
        const float px = p[i][size_t(x)], qx = q[i][size_t(x)];
        if (qx > 0.0f && sampler.uniform() < std::min(1.0f, px / qx)) continue;  // accepted
        std::vector<float> residual(p[i].size());
        double mass = 0.0;
        for (size_t j = 0; j < residual.size(); j++) mass += residual[j] = std::max(0.0f, p[i][j] - q[i][j]);
        *next = sampler.draw(mass > 0.0 ? residual : p[i]);  // mass 0 only through rounding
        return int(i);
    }
    *next = sampler.draw(p[k]);
    return int(k);
}

// ---------------------------------------------------------------------------------------------
// drafters

ModelDrafter::ModelDrafter(Model& draft, int positions)
    : kv(draft.cfg, std::min(draft.cfg.max_seq_len, positions)), model_(draft) {}

void ModelDrafter::propose(const std::vector<int>& context, int k, Sampler& sampler, std::vector<int>& drafts,
                           std::vector<std::vector<float>>& probs) {
    const int vocab = model_.cfg.vocab_size;
    logits_.resize(size_t(vocab));
    // Catch up on context tokens not yet in the cache (the last one, or two after a round where
    // every draft was accepted), then draft one token per forward.
    std::vector<BatchToken> batch;
    for (int i = done_; i < int(context.size()); i++) batch.push_back({0, i, context[size_t(i)]});
    for (int i = 0; i < k; i++) {
        int pos = batch.back().pos;
        if (!kv.reserve(0, pos + 1)) throw Error("draft model: KV cache full");
        model_.forward(kv, batch, {int(batch.size()) - 1}, logits_.data());
        done_ = pos + 1;
        probs.emplace_back();
        sampler.distribution(logits_.data(), vocab, probs.back());
        drafts.push_back(sampler.draw(probs.back()));
        if (i + 1 < k) batch = {{0, pos + 1, drafts.back()}};
    }
}

void ModelDrafter::rollback(int n) {
    done_ = std::min(done_, n);
    kv.truncate(0, done_);
}

void NgramDrafter::propose(const std::vector<int>& context, int k, Sampler&, std::vector<int>& drafts,
                           std::vector<std::vector<float>>& probs) {
    const int len = int(context.size());
    for (int n = std::min(max_n_, len - 1); n >= 1; n--) {
        const int* tail = context.data() + len - n;
        // Most recent earlier match: it must end before the context's own tail.
        for (int j = len - n - 1; j >= 0; j--) {
            if (!std::equal(tail, tail + n, context.data() + j)) continue;
            for (int i = j + n; i < len && int(drafts.size()) < k; i++) {
                drafts.push_back(context[size_t(i)]);
                probs.emplace_back(size_t(vocab_), 0.0f);
                probs.back()[size_t(context[size_t(i)])] = 1.0f;
            }
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// the loop

DecodeStats decode(Model& target, KVCache& kv, const std::vector<int>& prompt, int max_new_tokens,
                   Sampler& sampler, Drafter* drafter, int k_max, const std::function<bool(int)>& on_token,
                   int cached) {
    const Config& c = target.cfg;
    const int limit = std::min({c.max_seq_len, kv.capacity_tokens(), drafter ? drafter->max_positions() : INT_MAX});
    DecodeStats st;
    st.prompt_tokens = int(prompt.size());
    // The last prompt token is always recomputed below (it is the first round's input). A new
    // sequence starts over the longest chain of the prompt in the prefix cache.
    cached = std::max(0, std::min(cached, int(prompt.size()) - 1));
    if (cached == 0) {
        kv.release(0);
        const std::vector<int> hit = kv.match(prompt, int(prompt.size()) - 1);
        kv.attach(0, hit);
        cached = int(hit.size()) * kv.block_size;
    } else {
        kv.truncate(0, cached);
    }
    st.cached_tokens = cached;
    if (drafter) drafter->rollback(cached);  // nothing the drafter computed past them applies

    // Prefill all but the last prompt token; the last one is the first round's input, so every
    // emitted token comes out of the same draft/verify step.
    double t0 = now_seconds();
    std::vector<int> context = prompt;
    const int n_prefill = int(prompt.size()) - 1;
    if (!kv.reserve(0, n_prefill + 1)) throw Error("KV cache too small for the prompt");
    if (n_prefill > cached) {
        std::vector<BatchToken> batch;
        for (int i = cached; i < n_prefill; i++) batch.push_back({0, i, prompt[size_t(i)]});
        target.forward(kv, batch, {}, nullptr);
    }
    kv.commit(0, prompt, n_prefill);
    st.t_prefill = now_seconds() - t0;

    std::vector<int> drafts;
    std::vector<std::vector<float>> p, q;
    std::vector<float> logits;
    std::vector<BatchToken> batch;
    std::vector<int> rows;
    double t1 = now_seconds();
    bool done = false;
    while (!done && st.generated < max_new_tokens) {
        const int pos = int(context.size()) - 1;  // position of the newest token, not yet processed
        if (pos >= limit) break;                  // context full
        drafts.clear();
        q.clear();
        const int k = drafter ? std::min(k_max, limit - 1 - pos) : 0;
        if (k > 0) {
            double td = now_seconds();
            drafter->propose(context, k, sampler, drafts, q);
            st.t_draft += now_seconds() - td;
        }
        // One target forward scores the newest token and every draft.
        double tt = now_seconds();
        const int n = int(drafts.size()) + 1;
        if (!kv.reserve(0, pos + n)) throw Error("KV cache full");
        batch = {{0, pos, context.back()}};
        rows = {0};
        for (int i = 0; i < n - 1; i++) {
            batch.push_back({0, pos + 1 + i, drafts[size_t(i)]});
            rows.push_back(i + 1);
        }
        int next, m = 0;
        // Plain decoding on a backend that samples where the logits are (CUDA) reads back one
        // token; otherwise the logits come back and the host samples (the same draws either way).
        const bool sampled = n == 1 && target.forward_sample(kv, batch, rows, sampler, &next);
        if (!sampled) {
            logits.resize(size_t(n) * c.vocab_size);
            target.forward(kv, batch, rows, logits.data());
            p.resize(size_t(n));
            for (int i = 0; i < n; i++)
                sampler.distribution(logits.data() + size_t(i) * c.vocab_size, c.vocab_size, p[size_t(i)]);
        }
        st.t_target += now_seconds() - tt;
        st.target_forwards++;
        if (!sampled) m = verify_drafts(p, q, drafts, sampler, &next);
        st.drafted += n - 1;
        st.accepted += m;
        // Keep the newest token and the accepted drafts in both caches; `next` is processed next round.
        kv.truncate(0, pos + 1 + m);
        if (drafter) drafter->rollback(pos + 1 + m);
        drafts.resize(size_t(m));
        drafts.push_back(next);
        for (int id : drafts) {
            st.generated++;
            if (id == c.eos_id || !on_token(id)) {
                done = true;
                break;
            }
            context.push_back(id);
            if (st.generated == max_new_tokens) break;
        }
        kv.commit(0, context, std::min(pos + 1 + m, int(context.size())));
    }
    st.t_decode = now_seconds() - t1;
    return st;
}
