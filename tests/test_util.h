// tests/test_util.h: helpers shared by the test files: paths, temp dirs, tiny random models.
#pragma once
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "convert.h"
#include "model.h"

std::string models_dir();                 // ../shared/models, or $FASTGEN_MODELS
std::string temp_dir();                   // a fresh directory under /tmp for this test run
std::string read_file(const std::string& path);
// id -> text of each result line of a --prompts-file --output JSONL file.
std::map<std::string, std::string> result_texts(const std::string& jsonl_path);
void write_bytes(const std::string& path, const std::string& bytes);  // throws when it cannot
bool has(const std::string& s, const std::string& part);              // s contains part
// ../shared/models/NAME.bin (a llama2.c checkpoint, tokenizer tok512.model) converted to model.bin
// once per test run; its path.
std::string shared_model_bin(const std::string& name);
// The message of the Error that f throws, or "" when it throws none.
std::string error_of(const std::function<void()>& f);
// The Error message of a conversion, or "" when it succeeds.
std::string convert_error(const ConvertOptions& o);

// Random weights for `c`, deterministic in `seed`, keyed by canonical tensor name, f32 row-major.
struct TinyWeights {
    Config cfg;
    std::vector<std::pair<std::string, std::vector<float>>> tensors;  // canonical names, in order
    std::vector<int64_t> shape_of(const std::string& name) const;
    const std::vector<float>& get(const std::string& name) const;
};
TinyWeights random_weights(const Config& c, unsigned seed);
// Writes them as model.bin (tokenizer: ../shared/models/tok512.model) stored in `dtype`.
void write_model_bin(const TinyWeights& tw, const std::string& path, DType dtype);
// path converted by quantize's code with --mode `mode` ("int8", "int4") into path + ".q"; returns it.
std::string quantized_copy(const std::string& path, const std::string& mode);
// Logits for every position of `tokens` from scripts/reference.py (float64 PyTorch), [n][vocab].
std::vector<float> reference_logits(const std::string& model_bin, const std::vector<int>& tokens, int vocab);
// x [n][cols] of standard normal values, deterministic in seed (activations for kernel tests).
std::vector<float> random_x(int n, int cols, unsigned seed);
// BOS, then n - 1 random ids below vocab, deterministic in seed.
std::vector<int> random_tokens(int n, int vocab, unsigned seed);
// x [n][cols] as the CPU's int8/int4 matmuls multiply it: rounded to 15-bit integers per 32-column block
// (quantize_activations), back in double.
std::vector<double> rounded_activations(const std::vector<float>& x, int n, int cols);
// Logits at every position, one token per forward through the KV cache, as decoding does.
std::vector<float> decode_logits(Model& m, const std::vector<int>& tokens);
// max |a - b| / max |b| over one row of n logits: the relative error the tests bound.
double rel_error(const float* a, const float* b, int n);
// The worst rel_error over the rows of two [positions][vocab] logit arrays.
double worst_rel_error(const std::vector<float>& a, const std::vector<float>& b, int vocab);
// Logits at every position of `tokens`: the whole sequence as one prefill batch (sequence 0).
std::vector<float> prefill_logits(Model& m, const std::vector<int>& tokens);

// A shell command run to completion, stdout and stderr captured apart. rc is its exit status
// (-1 when it did not exit normally).
struct CommandResult {
    int rc = -1;
    std::string out, err;
};
CommandResult run_command(const std::string& cmd);
std::string shell_quote(const std::string& s);  // one single-quoted shell word
// The perplexity in `generate --perplexity` output ("... mean NLL x, perplexity y").
double perplexity_of(const std::string& generate_stdout);

// A small config; vocab 512 matches tok512.model.
Config tiny_config(int dim, int hidden, int layers, int heads, int kv_heads, bool tied);
