// generate.cpp: the generate program: CLI, backend and draft set-up, streaming output and stats,
// --perplexity, --interactive (a chat over chat.cpp's formats), and --prompts-file (JSONL in and
// out through the batch scheduler in batch.cpp).
// The decode loop itself (prefill, draft, verify, emit) is in decode.cpp.
#include <CLI/CLI.hpp>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "batch.h"
#include "chat.h"
#include "common.h"
#include "decode.h"
#include "model.h"
#include "ops.h"
#include "sampler.h"
#include "serve.h"
#include "tokenizer.h"
#include "tp.h"

namespace {

struct Options {
    std::string checkpoint;
    std::string prompt;
    bool has_prompt = false;
    int max_new_tokens = 200;
    SamplingParams sampling;
    uint64_t seed = 0;
    bool has_seed = false;
    int num_samples = 1;
    std::string device = "auto";
    int threads = 0;
    std::string simd = "auto";  // the CPU kernels' SIMD target (ops.h cpu_set_simd_target)
    std::string perplexity_file;
    std::string draft_checkpoint;
    std::string draft = "none";  // none | model | ngram
    int speculate_k = 5;
    int ngram_max = 3;
    // many prompts: --prompts-file
    std::string prompts_file, output;
    bool resume = false;
    bool write_results = true;  // false on tensor-parallel ranks other than 0
    bool ignore_eos = false;
    int max_batch_tokens = 512;
    int max_seqs = 32;
    int kv_capacity = 0;  // tokens; 0 = batch mode: max_seqs full contexts within a budget; else one context
    std::string batching = "continuous";  // continuous | static | static-unpadded
    bool prefix_cache = true;  // --no-prefix-cache: false (KVCache::prefix_cache)
    // chat: --interactive
    bool interactive = false;
    std::string system_prompt;
    bool has_system = false;
    std::string chat_template = "auto";  // auto | llama2 | llama3 | chatml
    // the server: --serve
    bool serve = false;
    ServeOptions serve_opt;
    std::string model_name;  // "model" in requests and answers (default: the checkpoint's file name)
};

// Picks the backend: --device auto takes CUDA when a GPU is usable, else the CPU; --device cuda
// without a usable GPU (or in a build without CUDA) is a user error. Under mpirun each rank takes
// its own GPU (tp.h rank_device), set before any CUDA call that makes a context; *device says which.
Ops* choose_backend(const Options& o, Comm* world, int* device) {
    if (o.device == "cpu") return cpu_ops(o.threads);
    std::string why;
    if (const int n = cuda_device_count(&why); n > 0) {
        *device = world ? rank_device(world->rank(), n) : 0;
        return cuda_ops(*device);
    }
    if (o.device == "cuda") throw Error(fmt("--device cuda: no CUDA device found (%s); use --device cpu", why.c_str()));
    return cpu_ops(o.threads);
}

// Positions one sequence can use: the model's context, or fewer when the cache holds fewer.
int sequence_context(const Model& model, const KVCache& kv) { return std::min(model.cfg.max_seq_len, kv.capacity_tokens()); }

// The KV cache (tokens) of a one-sequence run (--prompt, --interactive, --perplexity): --kv-capacity,
// else the model's whole context, cut on a GPU to 90% of its free memory less 512 MB for the
// backend's workspaces (Llama 3.1's 131072 positions are 17 GB of bf16 K/V at 8B). Generation
// stops at the cache's end as it would at the context's.
int single_sequence_capacity(const Model& model, int kv_capacity) {
    const Config& c = model.cfg;
    if (kv_capacity > 0) return std::min(kv_capacity, c.max_seq_len);
    const double free = double(model.ops()->free_memory());
    if (free <= 0) return c.max_seq_len;  // the CPU: calloc'd pages cost nothing until written
    const double bytes_per_token = 2.0 * c.n_layers * c.n_kv_heads * c.head_dim * dtype_size(model.ops()->kv_dtype());
    const double fits = std::max(0.0, 0.9 * free - 512e6) / bytes_per_token;
    if (fits >= c.max_seq_len) return c.max_seq_len;
    const int cut = std::max(256, int(fits));  // too little even for this: the allocation says so
    std::fprintf(stderr, "KV cache: %d tokens fit in free memory, not the model's %d; --kv-capacity sets it\n", cut,
                 c.max_seq_len);
    return cut;
}

// What a backend with its own memory holds, printed once the KV cache is allocated.
void print_memory_plan(const Model& model, KVCache& kv) {
    Ops* ops = model.ops();
    if (ops->host_memory()) return;
    kv.allocate(ops);
    std::fprintf(stderr,
                 "memory plan (%s): weights %.2f GB, KV cache %.2f GB (%d tokens, %s), workspace %.1f MB; "
                 "%.2f GB free after\n",
                 ops->name(), model.device_weight_bytes() / 1e9, kv.bytes() / 1e9, kv.capacity_tokens(),
                 dtype_name(kv.dtype), model.scratch_bytes() / 1e6, ops->free_memory() / 1e9);
}

// Bytes one decode step reads: all weights plus the KV cache up to `context` positions.
double bytes_per_token(const Model& m, double context) {
    const Config& c = m.cfg;
    return double(m.weight_bytes_per_token()) +
           2.0 * c.n_layers * context * c.n_kv_heads * c.head_dim * dtype_size(m.ops()->kv_dtype());
}

// Seconds per single-token target forward at about `pos` (median of 5), for the speculative
// comparison. Runs after generation: the sequence's blocks are reused (their contents only need
// to be finite for a timing).
double time_target_step(Model& model, KVCache& kv, int pos) {
    const int seq = 0;
    pos = std::min(pos, model.cfg.max_seq_len - 1);
    kv.release(seq);
    if (!kv.reserve(seq, pos + 1)) return 0.0;
    std::vector<float> logits(size_t(model.cfg.vocab_size));
    std::vector<double> t;
    for (int i = 0; i < 5; i++) {
        double t0 = now_seconds();
        model.forward(kv, {{seq, pos, model.cfg.bos_id}}, {0}, logits.data());
        t.push_back(now_seconds() - t0);
    }
    kv.release(seq);
    std::sort(t.begin(), t.end());
    return t[2];
}

// One completion of `prompt_ids`, streamed to stdout; stats to stderr.
void generate_one(Model& model, KVCache& kv, const Tokenizer& tok, const std::vector<int>& prompt_ids,
                  int max_new_tokens, Sampler& sampler, Drafter* drafter, int k) {
    StreamDecoder out(tok);
    for (int id : prompt_ids) std::fputs(out.push(id).c_str(), stdout);
    std::fflush(stdout);
    DecodeStats st = decode(model, kv, prompt_ids, max_new_tokens, sampler, drafter, k, [&](int id) {
        std::fputs(out.push(id).c_str(), stdout);
        std::fflush(stdout);
        return true;
    });
    std::fputs(out.flush().c_str(), stdout);
    std::fputs("\n", stdout);
    std::fflush(stdout);

    const int n_prompt = st.prompt_tokens, positions = n_prompt + st.generated;
    const double tps = st.generated / st.t_decode;
    const double gbps = st.target_forwards / st.t_decode * bytes_per_token(model, 0.5 * positions) / 1e9;
    std::fprintf(stderr,
                 "prompt %d tokens, prefill %.1f tok/s | generated %d tokens, decode %.1f tok/s, %.2f ms/token, %.2f GB/s\n",
                 n_prompt, n_prompt > 1 ? (n_prompt - 1) / st.t_prefill : 0.0, st.generated, tps,
                 1e3 * st.t_decode / st.generated, gbps);
    if (drafter) {
        // What plain decoding would cost: one target forward over a single token, measured now.
        const double step = time_target_step(model, kv, positions);
        std::fprintf(stderr,
                     "speculative: k %d, acceptance %.1f%% (%d of %d drafts), %.2f tokens per target forward; "
                     "time %.0f%% draft, %.0f%% target; %.1f tok/s vs ~%.1f tok/s plain (one target step %.2f ms)\n",
                     k, st.drafted ? 100.0 * st.accepted / st.drafted : 0.0, st.accepted, st.drafted,
                     double(st.generated) / st.target_forwards, 100.0 * st.t_draft / st.t_decode,
                     100.0 * st.t_target / st.t_decode, tps, 1.0 / step, 1e3 * step);
    }
}

// The chat layout: --chat-template, else recognised in the model's template (with its default
// system message), else Llama 2's; --system replaces the system message.
ChatStyle chat_style(const Model& model, const Options& o) {
    ChatStyle style{ChatFormat::Llama2, o.system_prompt};
    if (o.chat_template != "auto") {
        style.format = parse_chat_format(o.chat_template);
    } else if (auto f = detect_chat_format(model.chat_template)) {
        style.format = *f;
        if (!o.has_system) style.system = template_default_system(model.chat_template);
    } else {
        std::fprintf(stderr, "chat: %s; using llama2 (choose with --chat-template)\n",
                     model.chat_template.empty() ? "the model has no chat template"
                                                 : "the model's chat template is not one of llama2, llama3, chatml");
    }
    return style;
}

// The token that ends an assistant answer: the format's end-of-turn token, or EOS (Llama 2).
int end_of_answer_id(const Model& model, const Tokenizer& tok, const ChatStyle& style) {
    const std::string end_text = style.end_of_answer();
    return end_text.empty() ? model.cfg.eos_id : chat_tokens(tok, style, end_text, false).at(0);
}

// --interactive: a chat on stdin/stdout. The conversation's tokens stay in sequence 0 of the KV
// cache between turns, so each turn prefills only its own new tokens; its full blocks are also
// committed to the prefix cache, so after /reset a conversation that begins the same way (the
// system message) reuses them. Under mpirun rank 0 reads the lines and hands them to the other ranks.
bool read_line(Comm* comm, std::string* line) {
    int64_t n = -1;  // -1: end of input
    if (!comm || comm->rank() == 0) {
        if (isatty(STDIN_FILENO)) {
            std::fputs("> ", stdout);
            std::fflush(stdout);
        }
        if (std::getline(std::cin, *line)) n = int64_t(line->size());
    }
    if (!comm) return n >= 0;
    comm->broadcast(&n, sizeof n, 0);
    if (n < 0) return false;
    line->resize(size_t(n));
    comm->broadcast(line->data(), size_t(n), 0);
    return true;
}

void chat(Model& model, KVCache& kv, const Tokenizer& tok, const ChatStyle& style, const Options& o,
          Sampler& sampler, Comm* comm) {
    const int end_id = end_of_answer_id(model, tok, style);
    std::fprintf(stderr, "chat: %s format%s; end of answer: token %d; /reset starts over, /exit or end of input "
                 "quits\n", chat_format_name(style.format),
                 style.system.empty() ? "" : fmt(", system \"%s\"", style.system.c_str()).c_str(), end_id);
    std::vector<int> history;  // the whole conversation, as the model has seen it
    int cached = 0;            // leading history tokens whose K/V are in the cache
    std::string line;
    while (read_line(comm, &line)) {
        if (line == "/exit") break;
        if (line == "/reset") {
            history.clear();
            cached = 0;
            std::fprintf(stderr, "chat: conversation reset\n");
            continue;
        }
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        std::vector<int> turn = chat_tokens(tok, style, style.user_turn(line, history.empty()), true);
        if (history.size() + turn.size() + 1 >= size_t(sequence_context(model, kv))) {
            std::fprintf(stderr, "chat: this turn would pass the context of %d tokens (%zu used); /reset to start over\n",
                         sequence_context(model, kv), history.size());
            continue;
        }
        history.insert(history.end(), turn.begin(), turn.end());
        StreamDecoder out(tok);
        int shown = 0;
        bool ended = false;  // the model closed its answer (end-of-answer token or EOS)
        DecodeStats st = decode(model, kv, history, o.max_new_tokens, sampler, nullptr, 0, [&](int id) {
            if (id == end_id) {
                ended = true;
                return false;
            }
            shown++;
            history.push_back(id);
            std::fputs(out.push(id).c_str(), stdout);
            std::fflush(stdout);
            return true;
        }, cached);
        std::fputs(out.flush().c_str(), stdout);
        std::fputs("\n", stdout);
        std::fflush(stdout);
        if (st.generated > shown) ended = true;  // decode() stops at EOS without showing it
        // The cache now holds everything but the newest token: the next turn recomputes from there.
        cached = int(history.size()) - 1;
        if (ended) {
            std::vector<int> close = {end_id};
            const std::string after = style.after_answer();
            if (!after.empty()) {
                std::vector<int> more = chat_tokens(tok, style, after, false);
                close.insert(close.end(), more.begin(), more.end());
            }
            history.insert(history.end(), close.begin(), close.end());
        } else {
            std::fprintf(stderr, "chat: answer cut at --max-new-tokens %d\n", o.max_new_tokens);
        }
        std::fprintf(stderr, "[turn: prefill %d tokens (%d reused from the cache), %d generated, %.1f tok/s; "
                     "context %zu of %d]\n", st.prompt_tokens - st.cached_tokens, st.cached_tokens, st.generated,
                     st.generated / std::max(st.t_decode, 1e-9), history.size(), sequence_context(model, kv));
    }
}

// Teacher-forced mean negative log-likelihood of a text file, in windows of the model's context.
void perplexity(Model& model, KVCache& kv, const Tokenizer& tok, const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error(fmt("--perplexity %s: cannot read the file", path.c_str()));
    std::stringstream ss;
    ss << in.rdbuf();
    std::vector<int> ids = tok.encode(ss.str(), false, false);
    if (ids.empty()) throw Error(fmt("--perplexity %s: the file has no text", path.c_str()));
    const Config& c = model.cfg;
    const int window = sequence_context(model, kv) - 1;  // BOS + up to window text tokens per pass
    constexpr size_t kChunk = 512;
    std::vector<float> logits;
    double nll = 0.0;
    size_t counted = 0;
    double t0 = now_seconds();
    for (size_t start = 0; start < ids.size(); start += size_t(window)) {
        size_t end = std::min(ids.size(), start + size_t(window));
        std::vector<BatchToken> batch{{0, 0, c.bos_id}};
        for (size_t i = start; i < end; i++) batch.push_back({0, int(i - start) + 1, ids[i]});
        kv.release(0);
        if (!kv.reserve(0, int(batch.size()))) throw Error("KV cache too small for a perplexity window");
        // Entry r predicts ids[start + r] (the last one predicts nothing scored). The window goes
        // through in prefill chunks over the cached prefix, so the logits held are a chunk's rows,
        // not a long-context model's whole window (131071 rows of 128256 for Llama 3.1).
        const size_t n = batch.size();
        for (size_t a = 0; a + 1 < n; a += kChunk) {
            const std::vector<BatchToken> chunk(batch.begin() + a, batch.begin() + std::min(n, a + kChunk));
            std::vector<int> rows;
            for (size_t r = a; r < std::min(n - 1, a + kChunk); r++) rows.push_back(int(r - a));
            logits.resize(rows.size() * size_t(c.vocab_size));
            model.forward(kv, chunk, rows, logits.data());
            for (size_t r = 0; r < rows.size(); r++)
                nll -= log_prob(logits.data() + r * c.vocab_size, c.vocab_size, ids[start + a + r]);
            counted += rows.size();
        }
    }
    double mean = nll / double(counted);
    std::printf("perplexity: %zu tokens, mean NLL %.6f, perplexity %.6f\n", counted, mean, std::exp(mean));
    std::fprintf(stderr, "%.1f tokens/s\n", counted / (now_seconds() - t0));
}

// Speculative decoding compares distributions token by token: the draft must use the same ids.
void check_same_vocabulary(const Model& target, const Tokenizer& target_tok, const Model& draft,
                           const Tokenizer& draft_tok, const Options& o) {
    if (draft.cfg.vocab_size != target.cfg.vocab_size || draft_tok.vocab_size() != target_tok.vocab_size())
        throw Error(fmt("%s: the draft's vocabulary (%d tokens, tokenizer %d) differs from the target's (%d, tokenizer %d)",
                        o.draft_checkpoint.c_str(), draft.cfg.vocab_size, draft_tok.vocab_size(),
                        target.cfg.vocab_size, target_tok.vocab_size()));
    for (int id = 0; id < target_tok.vocab_size(); id++)
        if (draft_tok.token_bytes(-2, id) != target_tok.token_bytes(-2, id))
            throw Error(fmt("%s: the draft's tokenizer differs from the target's at token %d", o.draft_checkpoint.c_str(), id));
}

// ---------------------------------------------------------------------------------------------
// --prompts-file: many requests through the batch scheduler, results as JSONL as each finishes

// Ids already in `path` (for --resume); lines that do not parse (a cut-off last line) are ignored.
std::set<std::string> finished_ids(const std::string& path) {
    std::set<std::string> ids;
    std::ifstream in(path);
    std::string line;
    while (std::getline(in, line)) {
        std::string id = result_id(line);
        if (!id.empty()) ids.insert(id);
    }
    return ids;
}

// The KV cache (tokens) of many sequences (--prompts-file, --serve): --kv-capacity, else max_seqs
// full contexts, within ~1 GiB on the CPU, or within 90% of the GPU memory left after the weights
// and the scratch of the largest step (less 512 MB for the backend's own workspaces).
int many_sequence_capacity(Model& model, const Options& o, Comm* comm) {
    if (o.kv_capacity > 0) return o.kv_capacity;
    const Config& c = model.cfg;
    model.reserve_scratch(o.max_batch_tokens, o.max_seqs);
    const double bytes_per_token = 2.0 * c.n_layers * c.n_kv_heads * c.head_dim * dtype_size(model.ops()->kv_dtype());
    const double free = double(model.ops()->free_memory());
    const double budget = free > 0 ? std::max(0.0, 0.9 * free - 512e6) : double(1ull << 30);
    const int bound = std::max(c.max_seq_len, int(std::min(budget / bytes_per_token, 1e9)));
    int capacity = int(std::min<long long>((long long)o.max_seqs * c.max_seq_len, bound));
    // Each GPU rank's free memory is its own; the ranks must agree on the cache's blocks, or
    // their schedules (and so their collectives) would part.
    if (comm) capacity = int(min_over_ranks(capacity));
    return capacity;
}

BatchOptions batch_options(const Options& o) {
    BatchOptions bo;
    bo.max_batch_tokens = o.max_batch_tokens;
    bo.max_seqs = o.max_seqs;
    bo.static_batching = o.batching != "continuous";
    bo.static_padding = o.batching == "static";
    return bo;
}

int generate_batch(Model& model, const Tokenizer& tok, const Options& o, Comm* comm) {
    const Config& c = model.cfg;
    Request defaults;
    defaults.max_new_tokens = o.max_new_tokens;
    defaults.sampling = o.sampling;
    defaults.seed = o.seed;
    defaults.ignore_eos = o.ignore_eos;

    // Requests: a bad line is reported with its number and skipped; the rest still run.
    std::ifstream in(o.prompts_file);
    if (!in) throw Error(fmt("--prompts-file %s: cannot read the file", o.prompts_file.c_str()));
    const std::set<std::string> done = o.resume ? finished_ids(o.output) : std::set<std::string>{};
    std::vector<Request> reqs;
    std::map<std::string, int> line_of;  // id -> the line that first used it
    int bad = 0, skipped_done = 0, line_no = 0;
    std::string line;
    while (std::getline(in, line)) {
        line_no++;
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;  // blank
        try {
            Request r = parse_request(line, line_no, tok, defaults, c.max_seq_len);
            auto [it, fresh] = line_of.emplace(r.id, line_no);
            if (!fresh) throw Error(fmt("duplicate id \"%s\" (first on line %d)", r.id.c_str(), it->second));
            if (done.count(r.id)) {
                skipped_done++;
                continue;
            }
            reqs.push_back(std::move(r));
        } catch (const Error& e) {
            std::fprintf(stderr, "%s:%d: %s; line skipped\n", o.prompts_file.c_str(), line_no, e.what());
            bad++;
        }
    }

    // Results are appended and flushed one line at a time, so an interrupted run keeps them.
    if (comm) {
        // Every rank must run the same requests in the same order, or their collectives mismatch.
        std::string ids;
        for (const Request& r : reqs) ids += r.id + '\n';
        check_same_on_all_ranks(*comm, ids, "requests (--prompts-file and the --resume state of --output)");
    }
    FILE* out = o.write_results ? std::fopen(o.output.c_str(), o.resume ? "a+" : "w") : std::fopen("/dev/null", "w");
    if (!out) throw Error(fmt("--output %s: cannot open the file for writing", o.output.c_str()));
    if (o.resume && std::fseek(out, -1, SEEK_END) == 0 && std::fgetc(out) != '\n') std::fputc('\n', out);  // a cut line

    KVCache kv(c, many_sequence_capacity(model, o, comm));
    kv.prefix_cache = o.prefix_cache;
    print_memory_plan(model, kv);
    const BatchOptions bo = batch_options(o);
    const bool cache_used = o.prefix_cache && !bo.static_batching;
    std::fprintf(stderr,
                 "batch: %zu requests from %s (%d bad lines skipped, %d already in %s); %s batching, max %d seqs, "
                 "max %d tokens per step; KV cache %d tokens (%d blocks of %d, %.1f MB); prefix cache %s\n",
                 reqs.size(), o.prompts_file.c_str(), bad, skipped_done, o.output.c_str(), o.batching.c_str(),
                 o.max_seqs, o.max_batch_tokens, kv.capacity_tokens(), kv.num_blocks, kv.block_size,
                 2.0 * c.n_layers * kv.capacity_tokens() * kv.kv_dim * dtype_size(model.ops()->kv_dtype()) / 1e6,
                 cache_used ? "on" : o.prefix_cache ? "off (static batching)" : "off");

    std::vector<double> ttft, tpot;
    std::map<std::string, int> reasons;
    BatchRunner runner(model, kv, &tok, bo, [&](const Result& r) {
        std::fputs((result_json(r) + "\n").c_str(), out);
        std::fflush(out);
        reasons[r.finish_reason]++;
        if (r.finish_reason == "error") std::fprintf(stderr, "request %s: %s\n", r.id.c_str(), r.error.c_str());
        if (r.completion_tokens > 0) ttft.push_back(r.ttft_ms);
        if (r.completion_tokens > 1) tpot.push_back(r.tpot_ms);
    });
    const double t0 = now_seconds();
    for (Request& r : reqs) runner.add(std::move(r));
    runner.run();
    const double secs = now_seconds() - t0;
    std::fclose(out);

    const BatchStats& st = runner.stats();
    std::string why;
    for (auto& [reason, n] : reasons) why += fmt("%s%s %d", why.empty() ? "" : ", ", reason.c_str(), n);
    std::fprintf(stderr,
                 "requests %zu (%s) in %.2f s | output %ld tokens, %.1f tok/s | total %.1f tok/s (prompt %ld + output)\n"
                 "TTFT ms p50 %.1f p90 %.1f p99 %.1f | TPOT ms p50 %.2f p90 %.2f p99 %.2f\n"
                 "peak KV blocks %d of %d (%.0f%%), peak running %d, preemptions %d, forward steps %d, "
                 "tokens computed %ld (padding %ld)\n",
                 reqs.size(), why.empty() ? "none" : why.c_str(), secs, st.output_tokens, st.output_tokens / secs,
                 (st.prompt_tokens + st.output_tokens) / secs, st.prompt_tokens, percentile(ttft, 50),
                 percentile(ttft, 90), percentile(ttft, 99), percentile(tpot, 50), percentile(tpot, 90),
                 percentile(tpot, 99), st.peak_blocks, kv.num_blocks, 100.0 * st.peak_blocks / kv.num_blocks,
                 st.peak_running, st.preemptions, st.steps, st.computed_tokens, st.padding_tokens);
    if (cache_used)
        std::fprintf(stderr,
                     "prefix cache: %ld of %ld prompt tokens reused (%.1f%%), %ld more on resuming preempted "
                     "sequences; %d blocks cached, %ld evictions\n",
                     st.prefix_hit_tokens, st.prefix_query_tokens,
                     100.0 * double(st.prefix_hit_tokens) / double(std::max(st.prefix_query_tokens, 1L)),
                     st.resume_hit_tokens, st.cached_blocks, st.evictions);
    return 0;
}

// Where a rank reports a failure: ranks other than 0 run with stdout and stderr silenced (rank 0
// talks to the user) but keep a copy of stderr for their errors.
struct ErrorOut {
    int fd = STDERR_FILENO;
    int rank = 0;
};

// Under mpirun: every rank runs the same command over its slice of the model (tensor parallel).
// Checks that the ranks agree, gives them rank 0's seed, and silences the others.
Comm* join_ranks(int argc, char** argv, Options& o, ErrorOut* err) {
    if (!launched_by_mpirun()) return nullptr;
    Comm& world = mpi_world();
    std::string flags;
    for (int i = 1; i < argc; i++) flags += std::string(argv[i]) + '\n';
    check_same_on_all_ranks(world, flags, "command-line flags");
    world.broadcast(&o.seed, sizeof o.seed, 0);  // a seed from the clock differs per rank
    if (world.rank() > 0) {
        std::fflush(stdout);
        std::fflush(stderr);
        err->fd = dup(STDERR_FILENO);
        err->rank = world.rank();
        int null = open("/dev/null", O_WRONLY);
        if (err->fd < 0 || null < 0 || dup2(null, STDOUT_FILENO) < 0 || dup2(null, STDERR_FILENO) < 0)
            throw Error("cannot silence the output of a rank other than 0");
        close(null);
        o.write_results = false;  // rank 0 writes the results file; every rank reads it for --resume
    }
    return &world;
}

// CLI::Range lets "nan" through (every comparison with NaN is false): a float flag must also be finite.
// Not a number at all is left to the flag's own conversion, which names it.
const CLI::Validator kFinite(
    [](std::string& s) -> std::string {
        char* end = nullptr;
        const double d = std::strtod(s.c_str(), &end);
        return end != s.c_str() && !std::isfinite(d) ? "Value " + s + " is not a finite number" : "";
    },
    "");

// CLI11 reads an unsigned flag with strtoull, which wraps "-1" and saturates past 2^64 - 1: take
// plain decimal digits that fit, or refuse.
const CLI::Validator kUint64(
    [](std::string& s) -> std::string {
        const std::string bad = "Value " + s + " is not an integer in [0, 18446744073709551615]";
        if (s.empty() || s.find_first_not_of("0123456789") != std::string::npos) return bad;
        errno = 0;
        std::strtoull(s.c_str(), nullptr, 10);
        return errno == ERANGE ? bad : "";
    },
    "");

int run(int argc, char** argv, ErrorOut* err) {
    Options o;
    CLI::App app{"fastgen generate: text generation for Llama-family models"};
    app.add_option("--checkpoint,--checkpoint_path", o.checkpoint, "model.bin to load")
        ->required()->check(CLI::ExistingFile);
    app.add_option("--prompt", o.prompt, "text to continue (default: start from BOS alone)");
    app.add_option("--max-new-tokens,--max_new_tokens", o.max_new_tokens, "tokens to generate")
        ->check(CLI::Range(1, 1 << 30));
    app.add_option("--temperature", o.sampling.temperature, "0 = greedy")
        ->check(kFinite)->check(CLI::Range(0.0, 100.0));
    app.add_option("--top-k,--top_k", o.sampling.top_k, "keep the k most likely tokens; 0 = all")
        ->check(CLI::Range(0, 1 << 30));
    app.add_option("--top-p,--top_p", o.sampling.top_p, "nucleus sampling mass, in (0, 1]")
        ->check(kFinite)->check(CLI::Range(1e-6, 1.0));
    app.add_option("--seed", o.seed, "random seed (default: from the clock, printed)")->check(kUint64);
    app.add_option("--num-samples,--num_samples", o.num_samples, "completions of the prompt")
        ->check(CLI::Range(1, 1 << 20));
    app.add_option("--device", o.device, "auto, cpu or cuda")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
    app.add_option("--threads", o.threads, "CPU threads (0 = all cores)")->check(CLI::Range(0, 4096));
    std::vector<std::string> simd_names = cpu_simd_targets();
    simd_names.insert(simd_names.begin(), "auto");
    app.add_option("--simd", o.simd,
                   "the CPU kernels' SIMD target: auto (the best this CPU runs) or one of those it runs, "
                   "to compare them (avx3_dl = AVX-512 with VNNI, avx3 = AVX-512)")
        ->check(CLI::IsMember(simd_names));
    app.add_option("--perplexity", o.perplexity_file, "report the perplexity of a text file instead")
        ->check(CLI::ExistingFile);
    app.add_option("--draft-checkpoint,--draft_checkpoint_path", o.draft_checkpoint,
                   "speculative decoding with this smaller model.bin as the draft")
        ->check(CLI::ExistingFile);
    app.add_option("--draft", o.draft, "none, model (with --draft-checkpoint) or ngram (prompt lookup)")
        ->check(CLI::IsMember({"none", "model", "ngram"}));
    app.add_option("--speculate-k,--speculate_k", o.speculate_k, "draft tokens per target forward")
        ->check(CLI::Range(1, 64));
    app.add_option("--ngram-max", o.ngram_max, "longest n-gram prompt lookup matches")->check(CLI::Range(1, 64));
    app.add_option("--prompts-file", o.prompts_file, "JSONL requests, one per line, run by continuous batching")
        ->check(CLI::ExistingFile);
    app.add_option("--output", o.output, "JSONL results of --prompts-file, one line as each request finishes");
    app.add_flag("--resume", o.resume, "skip requests whose id is already in --output, and append to it");
    app.add_flag("--ignore-eos", o.ignore_eos, "--prompts-file: EOS is an ordinary token (default for requests)");
    app.add_option("--max-batch-tokens", o.max_batch_tokens, "tokens per forward step: decodes + prefill chunks")
        ->check(CLI::Range(1, 1 << 20));
    app.add_option("--max-seqs", o.max_seqs, "sequences running at once")->check(CLI::Range(1, 1 << 16));
    app.add_option("--kv-capacity", o.kv_capacity, "KV cache size in tokens (default: --prompts-file: max-seqs full contexts, within ~1 GiB on the CPU or 90% of free GPU memory; else one full context, cut to 90% of free GPU memory)")
        ->check(CLI::Range(16, 1 << 28));
    app.add_flag("--interactive,-i", o.interactive,
                 "chat on stdin/stdout in the model's chat format; the KV cache is kept between turns");
    app.add_option("--system", o.system_prompt, "--interactive: the system message (default: the template's own, if any)");
    app.add_option("--chat-template", o.chat_template,
                   "--interactive: auto (from the model's chat template), llama2, llama3 or chatml")
        ->check(CLI::IsMember({"auto", "llama2", "llama3", "chatml"}));
    app.add_option("--batching", o.batching,
                   "continuous; static (groups of max-seqs that wait for their longest member, finished members "
                   "computed as padding, as fixed-shape batches run); or static-unpadded (finished members leave "
                   "the forward)")
        ->check(CLI::IsMember({"continuous", "static", "static-unpadded"}));
    bool no_prefix_cache = false;
    app.add_flag("--no-prefix-cache", no_prefix_cache,
                 "compute every prompt in full: no reuse of cached KV blocks of earlier prompts and turns "
                 "(continuous batching, --serve, --interactive)");
    app.add_flag("--serve", o.serve,
                 "an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions) on the continuous-batching "
                 "loop");
    app.add_option("--host", o.serve_opt.host, "--serve: the address to listen on (default loopback only)");
    app.add_option("--port", o.serve_opt.port, "--serve: the TCP port (0: any free one, printed)")
        ->check(CLI::Range(0, 65535));
    app.add_option("--api-key", o.serve_opt.api_key,
                   "--serve: require Authorization: Bearer KEY on every endpoint but /health")
        ->envname("FASTGEN_API_KEY");
    app.add_option("--max-queue", o.serve_opt.max_queue, "--serve: requests waiting beyond the running ones; more get 503")
        ->check(CLI::Range(1, 1 << 16));
    app.add_option("--max-body-bytes", o.serve_opt.max_body, "--serve: the largest request body; larger get 413")
        ->check(CLI::Range(size_t(1024), size_t(1) << 30));
    app.add_option("--request-timeout", o.serve_opt.timeout_s,
                   "--serve: seconds to read a request, or to write to a client that does not read")
        ->check(CLI::Range(1, 3600));
    app.add_option("--model-name", o.model_name, "--serve: the model's name in requests and answers (default: the "
                   "checkpoint's file name without .bin)");
    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        return app.exit(e) == 0 ? 0 : 1;  // --help is not an error; bad flags exit 1
    }
    o.prefix_cache = !no_prefix_cache;
    if (std::string why; !cpu_set_simd_target(o.simd, &why)) throw Error("--simd: " + why);
    o.has_prompt = app.count("--prompt") > 0;
    o.has_system = app.count("--system") > 0;
    o.has_seed = app.count("--seed") > 0;
    if (!o.has_seed) o.seed = uint64_t(std::chrono::system_clock::now().time_since_epoch().count());
    if (!o.draft_checkpoint.empty()) {
        if (o.draft == "ngram") throw Error("--draft ngram and --draft-checkpoint exclude each other; pick one");
        o.draft = "model";
    } else if (o.draft == "model") {
        throw Error("--draft model needs --draft-checkpoint D.bin");
    }
    if (o.has_prompt && o.prompt.empty())
        throw Error("--prompt is empty: give some text, or leave --prompt out to start from BOS alone");
    const bool batch_mode = !o.prompts_file.empty();
    if (o.serve) {
        if (batch_mode) throw Error("--serve and --prompts-file exclude each other; POST the requests to the server");
        if (o.has_prompt) throw Error("--serve and --prompt exclude each other; POST the prompt to the server");
        if (!o.perplexity_file.empty()) throw Error("--serve and --perplexity exclude each other");
        if (o.interactive) throw Error("--serve and --interactive exclude each other");
        if (o.draft != "none") throw Error("--serve does not support speculative decoding (--draft) yet");
        if (o.num_samples != 1) throw Error("--serve and --num-samples exclude each other");
        for (const char* flag : {"--output", "--resume", "--ignore-eos"})
            if (app.count(flag)) throw Error(fmt("%s only applies with --prompts-file; requests say ignore_eos", flag));
        if (o.max_seqs > o.max_batch_tokens)
            throw Error(fmt("--max-seqs %d is more than --max-batch-tokens %d: every running sequence needs a token per "
                            "step; raise --max-batch-tokens",
                            o.max_seqs, o.max_batch_tokens));
        o.serve_opt.max_running = o.max_seqs;
    } else {
        for (const char* flag : {"--host", "--port", "--api-key", "--max-queue", "--max-body-bytes", "--request-timeout",
                                 "--model-name"})
            if (app.count(flag)) throw Error(fmt("%s only applies with --serve", flag));
    }
    if (batch_mode) {
        if (o.output.empty()) throw Error("--prompts-file needs --output FILE.jsonl for the results");
        if (o.has_prompt) throw Error("--prompts-file and --prompt exclude each other; put the prompt in the file");
        if (!o.perplexity_file.empty()) throw Error("--prompts-file and --perplexity exclude each other");
        if (o.draft != "none") throw Error("--prompts-file does not support speculative decoding (--draft) yet");
        if (o.num_samples != 1) throw Error("--prompts-file and --num-samples exclude each other; repeat the line with another id");
        if (o.interactive) throw Error("--prompts-file and --interactive exclude each other");
        if (o.max_seqs > o.max_batch_tokens)
            throw Error(fmt("--max-seqs %d is more than --max-batch-tokens %d: every running sequence needs a token per "
                            "step; raise --max-batch-tokens",
                            o.max_seqs, o.max_batch_tokens));
    } else if (!o.serve) {
        if (!o.interactive)
            for (const char* flag : {"--system", "--chat-template"})
                if (app.count(flag)) throw Error(fmt("%s only applies with --interactive or --serve", flag));
        if (o.interactive) {
            if (o.has_prompt) throw Error("--interactive and --prompt exclude each other; type the prompt in the chat");
            if (!o.perplexity_file.empty()) throw Error("--interactive and --perplexity exclude each other");
            if (o.draft != "none") throw Error("--interactive does not support speculative decoding (--draft) yet");
            if (o.num_samples != 1) throw Error("--interactive and --num-samples exclude each other");
        }
        for (const char* flag : {"--output", "--resume", "--ignore-eos", "--max-batch-tokens", "--max-seqs", "--batching"})
            if (app.count(flag)) throw Error(fmt("%s only applies with --prompts-file", flag));
    }

    // comm: the MPI world, for everything the host hands between ranks (flags, prompts, chat lines,
    // requests, the logits every rank samples from). The model's all-reduces go over it on CPU
    // ranks, and over NCCL on GPU ranks (device pointers, on the CUDA backend's stream).
    Comm* comm = join_ranks(argc, argv, o, err);
    // The server listens before the model loads, so /health can say it is loading.
    std::unique_ptr<ApiServer> server;
    if (o.serve && (!comm || comm->rank() == 0)) server = std::make_unique<ApiServer>(o.serve_opt);
    int device = 0;
    Ops* ops = choose_backend(o, comm, &device);
    std::unique_ptr<Comm> nccl;
    if (comm && comm->size() > 1) {
        // --device auto on a mix of nodes with and without GPUs would pair NCCL's set-up with
        // other ranks' collectives.
        check_same_on_all_ranks(*comm, ops->name(), "backends (--device)");
        if (!ops->host_memory()) nccl = nccl_comm(*comm, device);
    }
    Model model(o.checkpoint, ops, nccl ? nccl.get() : comm);
    const Config& c = model.cfg;
    if (comm) {
        // Same flags do not mean the same file on every node: compare what was loaded.
        check_same_on_all_ranks(*comm, model.cfg.to_json() + fmt("%zu", model.tokenizer_model.size()) +
                                           fmt("%zu", model.weight_bytes_per_token()), "model file");
        std::fprintf(stderr, "tensor parallel: %d ranks over %s; this rank holds %d of %d heads\n", comm->size(),
                     nccl ? "NCCL" : "MPI", c.n_heads, c.n_heads * comm->size());
    }
    Tokenizer tok(model.tokenizer_model, o.checkpoint + ": " + model.tokenizer_tensor);
    if (tok.vocab_size() > c.vocab_size)
        throw Error(fmt("%s: tokenizer has %d tokens but the model's vocab_size is %d", o.checkpoint.c_str(),
                        tok.vocab_size(), c.vocab_size));
    // The server's sampling comes from each request (OpenAI's defaults), not from the flags.
    const std::string sampling =
        o.serve ? "sampling per request"
                : fmt("temperature %g, top-k %d, top-p %g, seed %llu, max new tokens %d", o.sampling.temperature,
                      o.sampling.top_k, o.sampling.top_p, (unsigned long long)o.seed, o.max_new_tokens);
    std::fprintf(stderr,
                 "model %s: dim %d, %d layers, %d heads (%d kv)%s, vocab %d, context %d, %.1f MB of weights "
                 "read per token (%s)\n"
                 "device %s, %s; %s\n",
                 o.checkpoint.c_str(), c.dim, c.n_layers, c.n_heads, c.n_kv_heads,
                 c.n_experts ? fmt(", %d experts (top %d)", c.n_experts, c.n_experts_per_tok).c_str() : "",
                 c.vocab_size, c.max_seq_len, model.weight_bytes_per_token() / 1e6,
                 dtype_name(model.w.layers[0].wq.dtype),
                 ops->name(),
                 !ops->host_memory()  ? fmt("GPU %d", device).c_str()
                 : o.threads > 0      ? fmt("%d threads, simd %s", o.threads, cpu_simd_target().c_str()).c_str()
                                      : fmt("all cores, simd %s", cpu_simd_target().c_str()).c_str(),
                 sampling.c_str());

    if (batch_mode) return generate_batch(model, tok, o, comm);
    if (o.serve) {
        KVCache kv(c, many_sequence_capacity(model, o, comm));
        kv.prefix_cache = o.prefix_cache;
        print_memory_plan(model, kv);
        ApiModel m;
        m.tok = &tok;
        m.style = chat_style(model, o);
        m.end_id = end_of_answer_id(model, tok, m.style);
        m.context = std::min(c.max_seq_len, kv.capacity_tokens());
        m.name = o.model_name;
        if (m.name.empty()) {
            m.name = o.checkpoint.substr(o.checkpoint.find_last_of('/') + 1);
            if (m.name.size() > 4 && m.name.compare(m.name.size() - 4, 4, ".bin") == 0) m.name.resize(m.name.size() - 4);
        }
        std::fprintf(stderr, "serve: max %d running, max %d waiting, max %d tokens per step; KV cache %d tokens (%d "
                     "blocks of %d), prefix cache %s; chat format %s\n",
                     o.max_seqs, o.serve_opt.max_queue, o.max_batch_tokens, kv.capacity_tokens(), kv.num_blocks,
                     kv.block_size, kv.prefix_cache ? "on" : "off", chat_format_name(m.style.format));
        if (server) server->run(model, kv, tok, m, batch_options(o), comm);
        else serve_follower(model, kv, tok, batch_options(o), *comm);
        return 0;
    }
    int capacity = single_sequence_capacity(model, o.kv_capacity);
    if (comm) capacity = int(min_over_ranks(capacity));  // GPU ranks' free memory differs; their steps must not
    KVCache kv(c, capacity);
    kv.prefix_cache = o.prefix_cache;
    print_memory_plan(model, kv);
    if (!o.perplexity_file.empty()) {
        perplexity(model, kv, tok, o.perplexity_file);
        return 0;
    }
    if (o.interactive) {
        const ChatStyle style = chat_style(model, o);
        Sampler sampler(o.sampling, o.seed);
        chat(model, kv, tok, style, o, sampler, comm);
        return 0;
    }
    // Speculative decoding: a draft model sharing the target's vocabulary, or prompt lookup.
    std::unique_ptr<Model> draft_model;
    std::unique_ptr<Drafter> drafter;
    if (o.draft == "model") {
        draft_model = std::make_unique<Model>(o.draft_checkpoint, ops);
        Tokenizer draft_tok(draft_model->tokenizer_model, o.draft_checkpoint + ": " + draft_model->tokenizer_tensor);
        check_same_vocabulary(model, tok, *draft_model, draft_tok, o);
        drafter = std::make_unique<ModelDrafter>(*draft_model, sequence_context(model, kv));
        std::fprintf(stderr, "draft %s: dim %d, %d layers, %.1f MB of weights; k %d\n", o.draft_checkpoint.c_str(),
                     draft_model->cfg.dim, draft_model->cfg.n_layers, draft_model->weight_bytes_per_token() / 1e6,
                     o.speculate_k);
    } else if (o.draft == "ngram") {
        drafter = std::make_unique<NgramDrafter>(c.vocab_size, o.ngram_max);
        std::fprintf(stderr, "draft: prompt lookup, n-grams up to %d; k %d\n", o.ngram_max, o.speculate_k);
    }
    const int context = std::min(sequence_context(model, kv), drafter ? drafter->max_positions() : INT_MAX);

    std::vector<int> prompt_ids = o.has_prompt ? tok.encode(o.prompt, true, false) : std::vector<int>{c.bos_id};
    if (int(prompt_ids.size()) >= context)
        throw Error(fmt("--prompt is %zu tokens but the context is %d tokens%s; shorten it", prompt_ids.size(), context,
                        context < sequence_context(model, kv) ? " (the draft model's)"
                        : context < c.max_seq_len         ? " (the KV cache's: --kv-capacity)"
                                                          : ""));
    Sampler sampler(o.sampling, o.seed);
    for (int s = 0; s < o.num_samples; s++) {
        if (o.num_samples > 1) std::fprintf(stderr, "--- sample %d of %d\n", s + 1, o.num_samples);
        generate_one(model, kv, tok, prompt_ids, o.max_new_tokens, sampler, drafter.get(), o.speculate_k);
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    ErrorOut err;
    try {
        return run(argc, argv, &err);
    } catch (const std::exception& e) {
        // Error is bad input; anything else (out of memory, a library's exception) is reported the
        // same way rather than ending in std::terminate.
        const char* kind = dynamic_cast<const Error*>(&e) ? "" : "internal: ";
        if (err.rank > 0) dprintf(err.fd, "rank %d: error: %s%s\n", err.rank, kind, e.what());
        else dprintf(err.fd, "error: %s%s\n", kind, e.what());
        // Other ranks may be waiting in a collective for this one: end them all.
        if (launched_by_mpirun()) abort_all_ranks(1);
        return 1;
    }
}
