// generate.cpp: the generate program: CLI, backend and draft set-up, streaming output and stats,
// and --perplexity. The decode loop itself (prefill, draft, verify, emit) is in decode.cpp.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "common.h"
#include "decode.h"
#include "model.h"
#include "ops.h"
#include "sampler.h"
#include "tokenizer.h"

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
    std::string perplexity_file;
    std::string draft_checkpoint;
    std::string draft = "none";  // none | model | ngram
    int speculate_k = 5;
    int ngram_max = 3;
};

// Picks the backend; --device cuda without a usable GPU or CUDA build is a user error.
Ops* choose_backend(const Options& o) {
#ifdef FASTGEN_CUDA
    std::string why;
    int gpus = cuda_device_count(&why);
    if (o.device == "cuda") {
        if (gpus == 0) throw Error(fmt("--device cuda: no CUDA device found (%s); use --device cpu", why.c_str()));
        throw Error("--device cuda: the CUDA backend is not implemented yet in this build; use --device cpu");
    }
    if (o.device == "auto" && gpus > 0)
        std::fprintf(stderr, "note: a GPU is present but the CUDA backend is not implemented yet; using the CPU\n");
#else
    if (o.device == "cuda")
        throw Error("--device cuda: this build has no CUDA backend (nvcc was not found when it was built); use --device cpu");
#endif
    return cpu_ops(o.threads);
}

// Bytes one decode step reads: all weights plus the KV cache up to `context` positions.
double bytes_per_token(const Model& m, double context) {
    const Config& c = m.cfg;
    return double(m.weight_bytes_per_token()) + 2.0 * c.n_layers * context * c.n_kv_heads * c.head_dim * sizeof(float);
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

// Teacher-forced mean negative log-likelihood of a text file, in windows of the model's context.
void perplexity(Model& model, KVCache& kv, const Tokenizer& tok, const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error(fmt("--perplexity %s: cannot read the file", path.c_str()));
    std::stringstream ss;
    ss << in.rdbuf();
    std::vector<int> ids = tok.encode(ss.str(), false, false);
    if (ids.empty()) throw Error(fmt("--perplexity %s: the file has no text", path.c_str()));
    const Config& c = model.cfg;
    const int window = c.max_seq_len - 1;  // BOS + up to window text tokens per pass
    std::vector<float> logits;
    double nll = 0.0;
    size_t counted = 0;
    double t0 = now_seconds();
    for (size_t start = 0; start < ids.size(); start += size_t(window)) {
        size_t end = std::min(ids.size(), start + size_t(window));
        std::vector<BatchToken> batch{{0, 0, c.bos_id}};
        std::vector<int> rows{0};
        for (size_t i = start; i < end; i++) {
            batch.push_back({0, int(i - start) + 1, ids[i]});
            rows.push_back(int(i - start) + 1);
        }
        rows.pop_back();  // the last token predicts nothing we score
        kv.release(0);
        if (!kv.reserve(0, int(batch.size()))) throw Error("KV cache too small for a perplexity window");
        logits.resize(rows.size() * size_t(c.vocab_size));
        model.forward(kv, batch, rows, logits.data());
        for (size_t r = 0; r < rows.size(); r++)
            nll -= log_prob(logits.data() + r * c.vocab_size, c.vocab_size, ids[start + r]);
        counted += rows.size();
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

int run(int argc, char** argv) {
    Options o;
    CLI::App app{"fastgen generate: text generation for Llama-family models"};
    app.add_option("--checkpoint,--checkpoint_path", o.checkpoint, "model.bin to load")
        ->required()->check(CLI::ExistingFile);
    app.add_option("--prompt", o.prompt, "text to continue (default: start from BOS alone)");
    app.add_option("--max-new-tokens,--max_new_tokens", o.max_new_tokens, "tokens to generate")
        ->check(CLI::Range(1, 1 << 30));
    app.add_option("--temperature", o.sampling.temperature, "0 = greedy")->check(CLI::Range(0.0, 100.0));
    app.add_option("--top-k,--top_k", o.sampling.top_k, "keep the k most likely tokens; 0 = all")
        ->check(CLI::Range(0, 1 << 30));
    app.add_option("--top-p,--top_p", o.sampling.top_p, "nucleus sampling mass, in (0, 1]")
        ->check(CLI::Range(1e-6, 1.0));
    app.add_option("--seed", o.seed, "random seed (default: from the clock, printed)");
    app.add_option("--num-samples,--num_samples", o.num_samples, "completions of the prompt")
        ->check(CLI::Range(1, 1 << 20));
    app.add_option("--device", o.device, "auto, cpu or cuda")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
    app.add_option("--threads", o.threads, "CPU threads (0 = all cores)")->check(CLI::NonNegativeNumber & CLI::Range(0, 4096));
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
    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        return app.exit(e) == 0 ? 0 : 1;  // --help is not an error; bad flags exit 1
    }
    o.has_prompt = app.count("--prompt") > 0;
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

    Ops* ops = choose_backend(o);
    Model model(o.checkpoint, ops);
    const Config& c = model.cfg;
    Tokenizer tok(model.tokenizer_model, o.checkpoint + ": tokenizer.model");
    if (tok.vocab_size() > c.vocab_size)
        throw Error(fmt("%s: tokenizer has %d tokens but the model's vocab_size is %d", o.checkpoint.c_str(),
                        tok.vocab_size(), c.vocab_size));
    std::fprintf(stderr,
                 "model %s: dim %d, %d layers, %d heads (%d kv), vocab %d, context %d, %.1f MB of weights (%s)\n"
                 "device cpu, %s; temperature %g, top-k %d, top-p %g, seed %llu, max new tokens %d\n",
                 o.checkpoint.c_str(), c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.max_seq_len,
                 model.weight_bytes_per_token() / 1e6, dtype_name(model.w.layers[0].wq.dtype),
                 o.threads > 0 ? fmt("%d threads", o.threads).c_str() : "all cores",
                 o.sampling.temperature, o.sampling.top_k, o.sampling.top_p, (unsigned long long)o.seed,
                 o.max_new_tokens);

    KVCache kv(c, c.max_seq_len);
    if (!o.perplexity_file.empty()) {
        perplexity(model, kv, tok, o.perplexity_file);
        return 0;
    }
    // Speculative decoding: a draft model sharing the target's vocabulary, or prompt lookup.
    std::unique_ptr<Model> draft_model;
    std::unique_ptr<Drafter> drafter;
    if (o.draft == "model") {
        draft_model = std::make_unique<Model>(o.draft_checkpoint, ops);
        Tokenizer draft_tok(draft_model->tokenizer_model, o.draft_checkpoint + ": tokenizer.model");
        check_same_vocabulary(model, tok, *draft_model, draft_tok, o);
        drafter = std::make_unique<ModelDrafter>(*draft_model);
        std::fprintf(stderr, "draft %s: dim %d, %d layers, %.1f MB of weights; k %d\n", o.draft_checkpoint.c_str(),
                     draft_model->cfg.dim, draft_model->cfg.n_layers, draft_model->weight_bytes_per_token() / 1e6,
                     o.speculate_k);
    } else if (o.draft == "ngram") {
        drafter = std::make_unique<NgramDrafter>(c.vocab_size, o.ngram_max);
        std::fprintf(stderr, "draft: prompt lookup, n-grams up to %d; k %d\n", o.ngram_max, o.speculate_k);
    }
    const int context = drafter ? std::min(c.max_seq_len, drafter->max_positions()) : c.max_seq_len;

    std::vector<int> prompt_ids = o.has_prompt ? tok.encode(o.prompt, true, false) : std::vector<int>{c.bos_id};
    if (int(prompt_ids.size()) >= context)
        throw Error(fmt("--prompt is %zu tokens but the context is %d tokens%s; shorten it", prompt_ids.size(),
                        context, context < c.max_seq_len ? " (the draft model's)" : ""));
    Sampler sampler(o.sampling, o.seed);
    for (int s = 0; s < o.num_samples; s++) {
        if (o.num_samples > 1) std::fprintf(stderr, "--- sample %d of %d\n", s + 1, o.num_samples);
        generate_one(model, kv, tok, prompt_ids, o.max_new_tokens, sampler, drafter.get(), o.speculate_k);
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        return run(argc, argv);
    } catch (const Error& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
