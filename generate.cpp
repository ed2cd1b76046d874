// generate.cpp: the generate program: CLI, the generation loop (prefill, decode, sample, stream,
// stop), and --perplexity.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "common.h"
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

// One completion of `prompt_ids`, streamed to stdout; stats line to stderr.
void generate_one(Model& model, KVCache& kv, const Tokenizer& tok, const std::vector<int>& prompt_ids,
                  int max_new_tokens, Sampler& sampler) {
    const Config& c = model.cfg;
    const int seq = 0, n_prompt = int(prompt_ids.size());
    std::vector<float> logits(size_t(c.vocab_size));
    kv.release(seq);
    if (!kv.reserve(seq, n_prompt)) throw Error("KV cache too small for the prompt");

    StreamDecoder out(tok);
    for (int id : prompt_ids) std::fputs(out.push(id).c_str(), stdout);
    std::fflush(stdout);

    // prefill: the whole prompt in one batch; logits only for its last token
    double t0 = now_seconds();
    std::vector<BatchToken> batch;
    for (int i = 0; i < n_prompt; i++) batch.push_back({seq, i, prompt_ids[i]});
    model.forward(kv, batch, {n_prompt - 1}, logits.data());
    double t_prefill = now_seconds() - t0;

    // decode: one token per step until EOS, max_new_tokens, or the context is full
    int pos = n_prompt, generated = 0;
    double t1 = now_seconds();
    while (generated < max_new_tokens) {
        int next = sampler.sample(logits.data(), c.vocab_size);
        generated++;
        if (next == c.eos_id) break;
        std::fputs(out.push(next).c_str(), stdout);
        std::fflush(stdout);
        if (generated == max_new_tokens || pos >= c.max_seq_len) break;
        if (!kv.reserve(seq, pos + 1)) throw Error("KV cache full");
        model.forward(kv, {{seq, pos, next}}, {0}, logits.data());
        pos++;
    }
    std::fputs(out.flush().c_str(), stdout);
    std::fputs("\n", stdout);
    std::fflush(stdout);
    double t_decode = now_seconds() - t1;
    int steps = pos - n_prompt;  // decode forwards run
    double tps = steps > 0 ? steps / t_decode : 0.0;
    double gbps = tps * bytes_per_token(model, 0.5 * (n_prompt + pos)) / 1e9;
    std::fprintf(stderr,
                 "prompt %d tokens, prefill %.1f tok/s | generated %d tokens, decode %.1f tok/s, %.2f ms/token, %.2f GB/s\n",
                 n_prompt, n_prompt / t_prefill, generated, tps, steps > 0 ? 1e3 * t_decode / steps : 0.0, gbps);
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
    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        return app.exit(e) == 0 ? 0 : 1;  // --help is not an error; bad flags exit 1
    }
    o.has_prompt = app.count("--prompt") > 0;
    o.has_seed = app.count("--seed") > 0;
    if (!o.has_seed) o.seed = uint64_t(std::chrono::system_clock::now().time_since_epoch().count());
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
    std::vector<int> prompt_ids = o.has_prompt ? tok.encode(o.prompt, true, false) : std::vector<int>{c.bos_id};
    if (int(prompt_ids.size()) >= c.max_seq_len)
        throw Error(fmt("--prompt is %zu tokens but the model's context is %d tokens; shorten it", prompt_ids.size(),
                        c.max_seq_len));
    Sampler sampler(o.sampling, o.seed);
    for (int s = 0; s < o.num_samples; s++) {
        if (o.num_samples > 1) std::fprintf(stderr, "--- sample %d of %d\n", s + 1, o.num_samples);
        generate_one(model, kv, tok, prompt_ids, o.max_new_tokens, sampler);
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
