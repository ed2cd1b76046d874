// batch.cpp: the continuous-batching scheduler (admission over the prefix cache, chunked prefill,
// decode, preemption by recomputation, finishing) and the JSONL request/result lines.
#include "batch.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <nlohmann/json.hpp>

#include "common.h"

// ---------------------------------------------------------------------------------------------
// per-request state

struct BatchRunner::Seq {
    Request req;
    int kv_id = 0;           // sequence id in the KV cache
    std::vector<int> tokens;  // prompt + generated (what a recomputation after preemption replays)
    int computed = 0;        // positions [0, computed) are in the KV cache
    Sampler sampler;         // lives across preemptions, so the sampled output does not change
    Result res;
    std::unique_ptr<StreamDecoder> dec;  // null without a tokenizer
    size_t max_stop = 0;                 // longest stop string, bytes
    int generated = 0;                   // tokens sampled, EOS included
    size_t streamed = 0;                 // bytes of res.text handed to on_text
    double t_add = 0, t_first = 0, t_last = 0;

    Seq(Request r, int id) : req(std::move(r)), kv_id(id), tokens(req.prompt), sampler(req.sampling, req.seed) {}
    int remaining() const { return int(tokens.size()) - computed; }  // tokens not yet in the cache
};

BatchRunner::BatchRunner(Model& model, KVCache& kv, const Tokenizer* tok, BatchOptions opt,
                         std::function<void(const Result&)> on_finish)
    : model_(model), kv_(kv), tok_(tok), opt_(opt), on_finish_(std::move(on_finish)),
      use_cache_(kv.prefix_cache && !opt.static_batching), evictions_base_(kv.evictions) {
    if (opt_.max_seqs < 1) throw Error(fmt("max_seqs must be at least 1, got %d", opt_.max_seqs));
    if (opt_.max_batch_tokens < opt_.max_seqs)
        throw Error(fmt("max_batch_tokens (%d) must be at least max_seqs (%d): every running sequence decodes one "
                        "token per step",
                        opt_.max_batch_tokens, opt_.max_seqs));
}

BatchRunner::~BatchRunner() {
    for (auto& s : running_) kv_.release(s->kv_id);
    drop_pads();
}

void BatchRunner::drop_pads() {
    for (const Pad& p : pads_) kv_.release(p.kv_id);
    pads_.clear();
}

void BatchRunner::add(Request r) {
    auto s = std::make_unique<Seq>(std::move(r), next_seq_id_++);
    s->t_add = now_seconds();
    s->res.id = s->req.id;
    s->res.prompt_tokens = int(s->req.prompt.size());
    for (const std::string& stop : s->req.stop) s->max_stop = std::max(s->max_stop, stop.size());
    const int context = model_.cfg.max_seq_len;
    if (s->req.prompt.empty()) return finish(std::move(s), "error", "empty prompt");
    if (int(s->req.prompt.size()) >= context)
        return finish(std::move(s), "error",
                      fmt("prompt is %zu tokens but the context is %d", s->req.prompt.size(), context));
    if (s->req.max_new_tokens < 1) return finish(std::move(s), "error", "max_new_tokens must be at least 1");
    if (!s->req.stop.empty() && !tok_) return finish(std::move(s), "error", "stop strings need a tokenizer");
    if (tok_) {
        // Prime the decoder with the prompt: a token's text depends on the one before it.
        s->dec = std::make_unique<StreamDecoder>(*tok_);
        for (int id : s->req.prompt) s->dec->push(id);
        s->dec->flush();
    }
    waiting_.push_back(std::move(s));
}

// ---------------------------------------------------------------------------------------------
// scheduling

void BatchRunner::preempt_newest() {
    std::unique_ptr<Seq> s = std::move(running_.back());
    running_.pop_back();
    kv_.release(s->kv_id);
    s->computed = 0;  // recompute prompt + generated when it is admitted again
    s->res.preemptions++;
    stats_.preemptions++;
    if (opt_.static_batching) group_slots_++;  // it rejoins its own group
    waiting_.push_front(std::move(s));
}

void BatchRunner::finish(std::unique_ptr<Seq> s, const std::string& reason, const std::string& error, bool keep_kv) {
    if (!keep_kv) kv_.release(s->kv_id);
    Result& r = s->res;
    if (s->dec && reason != "stop") r.text += s->dec->flush();
    r.finish_reason = reason;
    r.error = error;
    if (reason != "error" && reason != "cancelled") stream_text(*s, true);
    r.completion_tokens = s->generated;
    if (s->generated > 0) r.ttft_ms = 1e3 * (s->t_first - s->t_add);
    if (s->generated > 1) r.tpot_ms = 1e3 * (s->t_last - s->t_first) / (s->generated - 1);
    stats_.prompt_tokens += r.prompt_tokens;
    if (on_finish_) on_finish_(r);
}

bool BatchRunner::cancel(const std::string& id) {
    auto match = [&](const std::unique_ptr<Seq>& p) { return p->req.id == id; };
    if (auto it = std::find_if(running_.begin(), running_.end(), match); it != running_.end()) {
        std::unique_ptr<Seq> s = std::move(*it);
        running_.erase(it);
        finish(std::move(s), "cancelled");
        if (running_.empty()) drop_pads();
        return true;
    }
    if (auto it = std::find_if(waiting_.begin(), waiting_.end(), match); it != waiting_.end()) {
        std::unique_ptr<Seq> s = std::move(*it);
        waiting_.erase(it);
        if (opt_.static_batching && s->res.preemptions > 0) group_slots_--;  // its group's slot is not coming back
        finish(std::move(s), "cancelled");
        return true;
    }
    return false;
}

void BatchRunner::stream_text(Seq& s, bool all) {
    if (!on_text_) return;
    const std::string& text = s.res.text;
    size_t end = text.size();
    if (!all) {
        // Hold back what could be the start of a stop string, and never end inside a character.
        end = s.max_stop > 0 ? (end >= s.max_stop - 1 ? end - (s.max_stop - 1) : 0) : end;
        while (end > s.streamed && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) end--;
    }
    if (end <= s.streamed) return;
    on_text_(s.req.id, text.substr(s.streamed, end - s.streamed));
    s.streamed = end;
}

bool BatchRunner::emit(Seq& s, int token) {
    const double t = now_seconds();
    if (s.generated == 0) s.t_first = t;
    s.t_last = t;
    s.generated++;
    stats_.output_tokens++;
    // The same order of checks as decode(): EOS, then the token limit, then the context end.
    const bool end_id = std::find(s.req.end_ids.begin(), s.req.end_ids.end(), token) != s.req.end_ids.end();
    if ((token == model_.cfg.eos_id && !s.req.ignore_eos) || end_id) {
        s.res.finish_reason = "eos";
        return true;
    }
    s.tokens.push_back(token);
    s.res.tokens.push_back(token);
    if (s.dec) {
        std::string& text = s.res.text;
        const size_t before = text.size();
        text += s.dec->push(token);
        if (s.max_stop > 0 && text.size() > before) {
            // Only a match that ends in the new bytes is new.
            const size_t from = before >= s.max_stop ? before - s.max_stop + 1 : 0;
            size_t cut = std::string::npos;
            for (const std::string& stop : s.req.stop) cut = std::min(cut, text.find(stop, from));
            if (cut != std::string::npos) {
                text.resize(cut);
                s.res.finish_reason = "stop";
                return true;
            }
        }
    }
    if (s.generated >= s.req.max_new_tokens) {
        s.res.finish_reason = "length";
        return true;
    }
    if (int(s.tokens.size()) - 1 >= model_.cfg.max_seq_len) {  // the next token has no position left
        s.res.finish_reason = "context";
        return true;
    }
    stream_text(s, false);
    return false;
}

bool BatchRunner::step() {
    if (running_.empty() && waiting_.empty()) return false;
    batch_.clear();
    rows_.clear();
    row_seqs_.clear();
    int budget = opt_.max_batch_tokens;
    bool finished_any = false;
    auto schedule = [&](Seq& s, int n) {  // the next n uncomputed tokens of s; logits if they end it
        for (int i = 0; i < n; i++) batch_.push_back({s.kv_id, s.computed + i, s.tokens[size_t(s.computed + i)]});
        s.computed += n;
        budget -= n;
        if (s.remaining() == 0) {
            rows_.push_back(int(batch_.size()) - 1);
            row_seqs_.push_back(&s);
        }
    };

    // 1. One decode token for every running sequence whose prompt is in the cache, oldest first.
    //    A sequence that needs a new block and finds none frees the newest running sequence's blocks
    //    (possibly its own); alone and still without room, the cache cannot hold it at all.
    for (size_t i = 0; i < running_.size(); i++) {
        Seq& s = *running_[i];
        if (s.remaining() != 1) continue;
        bool self_preempted = false, fits = true;
        while (!kv_.reserve(s.kv_id, s.computed + 1)) {
            if (!pads_.empty()) {  // padding gives its blocks back first
                kv_.release(pads_.back().kv_id);
                pads_.pop_back();
                continue;
            }
            if (running_.size() == 1) {
                fits = false;
                break;
            }
            self_preempted = running_.back().get() == &s;
            preempt_newest();
            if (self_preempted) break;
        }
        if (self_preempted) break;  // it was the newest: nothing after it is running
        if (!fits) {                // alone: the cache cannot hold it at all
            const std::string why = fmt("the KV cache (%d tokens) cannot hold this sequence's %d positions",
                                        kv_.capacity_tokens(), s.computed + 1);
            std::unique_ptr<Seq> alone = std::move(running_[i]);
            running_.erase(running_.begin() + long(i));
            finish(std::move(alone), "error", why);
            finished_any = true;
            break;
        }
        schedule(s, 1);
    }
    // Static batching with padding: the group's finished members, as if still decoding.
    for (const Pad& p : pads_) {
        batch_.push_back({p.kv_id, p.pos, p.token});
        budget--;
        stats_.padding_tokens++;
    }
    // 2. Prefill chunks of running sequences (blocks reserved at admission), oldest first.
    for (auto& sp : running_) {
        Seq& s = *sp;
        if (budget <= 0) break;
        if (s.remaining() > 1) schedule(s, std::min(s.remaining(), budget));
    }
    // 3. Admit waiting requests while the budget, max_seqs and the KV cache allow. A new sequence
    //    reserves blocks for all its tokens at once, and (unless it would run alone) must leave a
    //    block per running sequence free so the decodes it joins do not preempt it at once.
    if (opt_.static_batching && running_.empty()) {  // the group is over (its padding went with it)
        assert(pads_.empty());
        group_slots_ = opt_.max_seqs;
    }
    //    With the prefix cache, the longest cached chain of its tokens is attached rather than
    //    computed, all but the last token at most (the last one's logits are its first sample).
    while (budget > 0 && !waiting_.empty() && int(running_.size()) < opt_.max_seqs &&
           (!opt_.static_batching || group_slots_ > 0)) {
        Seq& s = *waiting_.front();
        const int need = int(s.tokens.size());
        const int blocks = (need + kv_.block_size - 1) / kv_.block_size;
        const std::vector<int> hit = use_cache_ ? kv_.match(s.tokens, need - 1) : std::vector<int>{};
        const int fresh = blocks - int(hit.size());  // blocks to take from the free list (or evict)
        if (!running_.empty() && kv_.available_blocks() - kv_.idle_count(hit) - fresh < int(running_.size())) break;
        kv_.attach(s.kv_id, hit);
        if (!kv_.reserve(s.kv_id, need)) {
            kv_.release(s.kv_id);
            if (!running_.empty()) break;  // wait for blocks to come back
            std::unique_ptr<Seq> s_own = std::move(waiting_.front());
            waiting_.pop_front();
            finish(std::move(s_own), "error",
                   fmt("the KV cache (%d tokens) cannot hold this sequence's %d positions", kv_.capacity_tokens(), need));
            finished_any = true;
            continue;
        }
        s.computed = int(hit.size()) * kv_.block_size;
        if (s.res.preemptions > 0) {
            stats_.resume_hit_tokens += s.computed;
        } else if (use_cache_) {
            s.res.cached_tokens = s.computed;
            stats_.prefix_query_tokens += need;
            stats_.prefix_hit_tokens += s.computed;
        }
        running_.push_back(std::move(waiting_.front()));
        waiting_.pop_front();
        if (opt_.static_batching) group_slots_--;
        schedule(s, std::min(s.remaining(), budget));
    }
    stats_.peak_running = std::max(stats_.peak_running, int(running_.size()));
    stats_.peak_blocks = std::max(stats_.peak_blocks, kv_.held_blocks());
    if (batch_.empty()) {
        assert(finished_any && "a step with nothing to run must have finished a request");
        (void)finished_any;
        return true;
    }

    // 4. One forward, logits only for the rows that sample.
    const int vocab = model_.cfg.vocab_size;
    logits_.resize(rows_.size() * size_t(vocab));
    model_.forward(kv_, batch_, rows_, logits_.data());
    stats_.steps++;
    stats_.computed_tokens += long(batch_.size());
    if (use_cache_) {  // the full blocks just computed outlive their sequences
        for (auto& sp : running_) kv_.commit(sp->kv_id, sp->tokens, sp->computed);
        stats_.cached_blocks = kv_.cached_blocks();
        stats_.evictions = kv_.evictions - evictions_base_;
    }

    // 5. Sample, append, finish: a finished sequence leaves at once and frees its blocks.
    std::vector<Seq*> done;
    for (size_t r = 0; r < rows_.size(); r++) {
        Seq& s = *row_seqs_[r];
        const int token = s.sampler.sample(logits_.data() + r * size_t(vocab), vocab);
        if (emit(s, token)) done.push_back(&s);
    }
    for (Seq* d : done) {
        auto it = std::find_if(running_.begin(), running_.end(), [&](const auto& p) { return p.get() == d; });
        assert(it != running_.end());
        std::unique_ptr<Seq> s = std::move(*it);
        running_.erase(it);
        const std::string reason = s->res.finish_reason;
        const bool pad = opt_.static_batching && opt_.static_padding && !running_.empty();
        if (pad) pads_.push_back({s->kv_id, s->computed - 1, s->tokens[size_t(s->computed - 1)]});
        finish(std::move(s), reason, "", pad);
    }
    if (running_.empty()) drop_pads();  // the group is over
    return true;
}

// ---------------------------------------------------------------------------------------------
// JSONL

using nlohmann::json;

Request parse_request(const std::string& line, int line_no, const Tokenizer& tok, const Request& defaults,
                      int context) {
    json j;
    try {
        j = json::parse(line, JsonDepthLimit{});
    } catch (const json::exception& e) {
        throw Error(fmt("malformed JSON (%s)", e.what()));
    }
    if (!j.is_object()) throw Error("a request must be a JSON object");
    Request r = defaults;
    r.id = fmt("line-%d", line_no);
    bool has_prompt = false;
    std::string prompt;
    // Not a structured binding: C++17 lets no lambda capture one (GCC accepts it, clang does not).
    for (auto& item : j.items()) {
        const std::string& key = item.key();
        auto& v = item.value();
        auto need = [&](bool ok, const char* what) {
            if (!ok) throw Error(fmt("\"%s\" must be %s, got %s", key.c_str(), what, v.dump().c_str()));
        };
        if (key == "id") {
            need(v.is_string() || v.is_number_integer(), "a string or an integer");
            r.id = v.is_string() ? v.get<std::string>() : v.dump();
            need(!r.id.empty(), "a non-empty string");
        } else if (key == "prompt") {
            need(v.is_string(), "a string");
            prompt = v.get<std::string>();
            has_prompt = true;
        } else if (key == "max_new_tokens") {
            need(v.is_number_integer() && v.get<long long>() >= 1 && v.get<long long>() <= (1 << 30),
                 "an integer in [1, 2^30]");
            r.max_new_tokens = v.get<int>();
        } else if (key == "temperature") {
            need(v.is_number() && v.get<double>() >= 0 && v.get<double>() <= 100, "a number in [0, 100]");
            r.sampling.temperature = v.get<float>();
        } else if (key == "top_k") {
            need(v.is_number_integer() && v.get<long long>() >= 0 && v.get<long long>() <= (1 << 30),
                 "an integer in [0, 2^30] (0 = all)");
            r.sampling.top_k = v.get<int>();
        } else if (key == "top_p") {
            need(v.is_number() && v.get<double>() > 0 && v.get<double>() <= 1, "a number in (0, 1]");
            r.sampling.top_p = v.get<float>();
        } else if (key == "seed") {
            need(v.is_number_unsigned() || (v.is_number_integer() && v.get<long long>() >= 0), "an integer >= 0");
            r.seed = v.get<uint64_t>();
        } else if (key == "stop") {
            r.stop.clear();
            if (v.is_string()) {
                r.stop.push_back(v.get<std::string>());
            } else {
                need(v.is_array(), "a string or an array of strings");
                for (auto& s : v) {
                    need(s.is_string(), "a string or an array of strings");
                    r.stop.push_back(s.get<std::string>());
                }
            }
            for (const std::string& s : r.stop) need(!s.empty(), "non-empty strings");
        } else if (key == "ignore_eos") {
            need(v.is_boolean(), "true or false");
            r.ignore_eos = v.get<bool>();
        } else {
            throw Error(fmt("unknown field \"%s\" (known: id, prompt, max_new_tokens, temperature, top_k, top_p, "
                            "seed, stop, ignore_eos)",
                            key.c_str()));
        }
    }
    if (!has_prompt) throw Error("no \"prompt\"");
    if (prompt.empty()) throw Error("empty prompt");
    r.prompt = tok.encode(prompt, true, false);
    if (int(r.prompt.size()) >= context)
        throw Error(fmt("the prompt is %zu tokens but the context is %d tokens; shorten it", r.prompt.size(), context));
    return r;
}

std::string result_json(const Result& r) {
    nlohmann::ordered_json j = {{"id", r.id},
              {"text", r.text},
              {"prompt_tokens", r.prompt_tokens},
              {"cached_tokens", r.cached_tokens},
              {"completion_tokens", r.completion_tokens},
              {"finish_reason", r.finish_reason},
              {"ttft_ms", std::round(r.ttft_ms * 1000) / 1000},
              {"tpot_ms", std::round(r.tpot_ms * 1000) / 1000}};
    if (!r.error.empty()) j["error"] = r.error;
    return j.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
}

std::string result_id(const std::string& line) {
    json j = json::parse(line, nullptr, false);
    if (!j.is_object() || !j.contains("id") || !j["id"].is_string()) return "";
    return j["id"].get<std::string>();
}

double percentile(std::vector<double> v, double p) {
    if (v.empty()) return 0.0;
    std::sort(v.begin(), v.end());
    const double x = p / 100.0 * double(v.size() - 1);
    const size_t lo = size_t(x), hi = std::min(v.size() - 1, lo + 1);
    return v[lo] + (x - double(lo)) * (v[hi] - v[lo]);
}
