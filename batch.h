// batch.h: continuous batching: many requests, one forward per step over a paged KV cache, with
// chunked prefill under a token budget, preemption by recomputation, prefix caching (shared prompt
// blocks computed once), and JSONL requests/results.
#pragma once
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "model.h"
#include "sampler.h"
#include "tokenizer.h"

struct Request {
    std::string id;
    std::vector<int> prompt;  // token ids, BOS included; 1 <= size < the model's context
    int max_new_tokens = 200;
    SamplingParams sampling;
    uint64_t seed = 0;
    std::vector<std::string> stop;  // finish when the text contains one (it is cut from the text)
    bool ignore_eos = false;        // EOS is an ordinary token (benchmarks: fixed output lengths)
    std::vector<int> end_ids;       // more tokens that end the answer as EOS does (a chat's end of turn)
};

struct Result {
    std::string id;
    std::vector<int> tokens;  // generated ids, EOS not included
    std::string text;         // their text (empty without a tokenizer), cut before a stop string
    int prompt_tokens = 0;
    int completion_tokens = 0;   // tokens sampled, EOS included
    std::string finish_reason;  // eos | length | stop | context | error | cancelled
    std::string error;          // why, when finish_reason is error
    double ttft_ms = 0;         // from add() to the first sampled token
    double tpot_ms = 0;         // mean time between later tokens (0 with one token)
    int preemptions = 0;
    int cached_tokens = 0;      // prompt tokens found in the prefix cache, not computed
};

struct BatchOptions {
    int max_batch_tokens = 512;  // tokens per forward: decodes first, prefill chunks fill the rest
    int max_seqs = 32;           // running sequences at most
    bool static_batching = false;  // groups of max_seqs that wait for their longest member
    // Static batching as fixed-shape engines run it (HF generate, FasterTransformer): a finished
    // member keeps its slot and is computed every step (a padding token, discarded) until its group
    // ends. False: finished members leave the forward, their slots idle until the group ends.
    bool static_padding = true;
};

struct BatchStats {
    int steps = 0;
    int preemptions = 0;
    long prompt_tokens = 0;     // prompt tokens of finished requests
    long output_tokens = 0;     // tokens sampled
    long computed_tokens = 0;   // tokens through forward, recomputation and padding included
    long padding_tokens = 0;    // static batching: finished members' discarded tokens
    int peak_blocks = 0;        // KV blocks in use, most at once
    int peak_running = 0;
    // Prefix cache (continuous batching with KVCache::prefix_cache on):
    long prefix_query_tokens = 0;  // prompt tokens of admitted requests, looked up in the cache
    long prefix_hit_tokens = 0;    // of those, found there (their K/V not computed)
    long resume_hit_tokens = 0;    // tokens a preempted sequence found cached again when readmitted
    int cached_blocks = 0;         // blocks in the cache now (held or idle)
    long evictions = 0;            // idle cached blocks evicted for new content
};

// Iteration-level scheduler (Orca/vLLM): each step() runs ONE forward holding one token for every
// decoding sequence plus prefill chunks, admitting waiting requests while KV blocks allow. When a
// sequence needs a block and none is free, the newest running sequence is preempted: its blocks
// are freed and it waits at the front of the queue to recompute prompt + generated tokens. Its
// Sampler lives on, so its output does not change. Every CPU kernel computes a token's row
// independently of the rest of the batch, so each result equals its solo decode() output.
// Prefix caching (continuous batching, when the cache's prefix_cache is on): an admitted sequence
// attaches the longest cached chain of its tokens and computes only the rest (at least its last
// token, whose logits it samples from); after every forward the full blocks computed are
// committed, so they outlive the sequence (and a preempted one resumes over them). The K/V of a
// cached block are the ones its tokens would get again, bitwise on the CPU, so outputs do not change.
class BatchRunner {
  public:
    // tok may be null (then results have no text and stop strings are refused).
    BatchRunner(Model& model, KVCache& kv, const Tokenizer* tok, BatchOptions opt,
                std::function<void(const Result&)> on_finish);
    ~BatchRunner();
    void add(Request r);  // queued now; its TTFT counts from here
    bool step();          // one scheduling iteration; false when nothing is left to do
    void run() { while (step()) {} }
    // Ends request `id` (waiting or running) now, its blocks freed, finish_reason "cancelled";
    // false when no such request is queued or running. Call between steps.
    bool cancel(const std::string& id);
    // Streaming: called with each piece of a request's text as it becomes final, so the pieces of
    // a request add up to its Result's text. Text that could begin a stop string is held back until
    // it does not (or the request ends), and pieces never split a UTF-8 character.
    void set_on_text(std::function<void(const std::string& id, const std::string& text)> f) { on_text_ = std::move(f); }
    const BatchStats& stats() const { return stats_; }
    int running() const { return int(running_.size()); }
    int waiting() const { return int(waiting_.size()); }

  private:
    struct Seq;
    Model& model_;
    KVCache& kv_;
    const Tokenizer* tok_;
    BatchOptions opt_;
    std::function<void(const Result&)> on_finish_;
    std::function<void(const std::string&, const std::string&)> on_text_;
    std::deque<std::unique_ptr<Seq>> waiting_;
    std::vector<std::unique_ptr<Seq>> running_;  // admission order: the back is the newest
    int next_seq_id_ = 0;
    int group_slots_ = 0;  // static batching: admissions left in the current group
    struct Pad {           // static batching with padding: a finished member's last position,
        int kv_id, pos, token;  // recomputed every step (same K/V) until its group ends
    };
    std::vector<Pad> pads_;
    BatchStats stats_;
    std::vector<BatchToken> batch_;
    std::vector<int> rows_;
    std::vector<Seq*> row_seqs_;
    std::vector<float> logits_;
    bool use_cache_ = false;    // prefix caching: the cache's switch, and not static batching
    long evictions_base_ = 0;   // the cache's evictions when this runner started

    void preempt_newest();
    void finish(std::unique_ptr<Seq> s, const std::string& reason, const std::string& error = "", bool keep_kv = false);
    void drop_pads();
    bool emit(Seq& s, int token);  // appends a sampled token; true when the sequence is finished
    void stream_text(Seq& s, bool all);  // on_text_ with the text that is final (all: the rest)
};

// ---------------------------------------------------------------------------------------------
// JSONL

// One request line: {"id", "prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed",
// "stop", "ignore_eos"}, all but prompt optional (defaults from `defaults`; id defaults to
// "line-N"). Throws Error naming the problem (malformed JSON, wrong types, empty prompt, a prompt
// that does not fit in `context` tokens with room for one more).
Request parse_request(const std::string& line, int line_no, const Tokenizer& tok, const Request& defaults,
                      int context);
std::string result_json(const Result& r);  // one line, no newline
// The "id" of a result line, or "" when the line is not a JSON object with a string id.
std::string result_id(const std::string& line);

// p-th percentile (0..100) by linear interpolation; 0 for an empty list.
double percentile(std::vector<double> v, double p);
