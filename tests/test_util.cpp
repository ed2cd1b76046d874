// tests/test_util.cpp: shared test helpers (paths, temp dirs, tiny random models).
#include "test_util.h"

#include "common.h"
#include "convert.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <sys/wait.h>
#include <filesystem>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <stdexcept>

void write_bytes(const std::string& path, const std::string& bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), std::streamsize(bytes.size()));
    if (!out.good()) throw std::runtime_error("cannot write " + path);
}

bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

std::string shared_model_bin(const std::string& name) {
    static std::map<std::string, std::string> done;
    std::string& path = done[name];
    if (path.empty()) {
        ConvertOptions o;
        o.input = models_dir() + "/" + name + ".bin";
        o.tokenizer = models_dir() + "/tok512.model";
        o.output = temp_dir() + "/" + name + ".model.bin";
        o.progress = false;
        convert_checkpoint(o);
        path = o.output;
    }
    return path;
}

std::string error_of(const std::function<void()>& f) {
    try {
        f();
    } catch (const Error& e) {
        return e.what();
    }
    return "";
}

std::string convert_error(const ConvertOptions& o) { return error_of([&] { convert_checkpoint(o); }); }

std::string models_dir() {
    const char* env = std::getenv("FASTGEN_MODELS");
    return env ? env : "../shared/models";
}

std::string temp_dir() {
    static std::string dir = [] {
        char tmpl[] = "/tmp/fastgen-test-XXXXXX";
        if (!mkdtemp(tmpl)) throw std::runtime_error("mkdtemp failed");
        static std::string made = tmpl;
        std::atexit([] { std::filesystem::remove_all(made); });
        return made;
    }();
    return dir;
}

std::string read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("cannot read " + path);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

std::vector<float> prefill_logits(Model& m, const std::vector<int>& tokens) {
    const int n = int(tokens.size());
    KVCache kv(m.cfg, n);
    if (!kv.reserve(0, n)) throw std::runtime_error("prefill_logits: KV cache too small");
    std::vector<BatchToken> batch;
    std::vector<int> rows;
    for (int i = 0; i < n; i++) {
        batch.push_back({0, i, tokens[size_t(i)]});
        rows.push_back(i);
    }
    std::vector<float> logits(size_t(n) * m.cfg.vocab_size);
    m.forward(kv, batch, rows, logits.data());
    return logits;
}

// Logits for every position of `tokens` from scripts/reference.py (float64 PyTorch), rounding the
// inputs of int8/int4 matrices as the CPU kernels do (--int16-activations).
std::vector<float> reference_logits(const std::string& model, const std::vector<int>& tokens, int vocab) {
    std::string ids;
    for (int t : tokens) ids += (ids.empty() ? "" : ",") + std::to_string(t);
    std::string out = model + ".ref";
    std::string cmd =
        "/usr/bin/python3 scripts/reference.py " + model + " --int16-activations --tokens " + ids + " --out " + out;
    if (std::system(cmd.c_str()) != 0) throw std::runtime_error("failed: " + cmd);
    std::string bytes = read_file(out);
    if (bytes.size() != tokens.size() * size_t(vocab) * sizeof(float)) throw std::runtime_error("bad size: " + out);
    std::vector<float> v(bytes.size() / sizeof(float));
    std::memcpy(v.data(), bytes.data(), bytes.size());
    return v;
}

std::vector<double> rounded_activations(const std::vector<float>& x, int n, int cols) {
    const int blocks = (cols + 31) / 32;
    std::vector<int16_t> q(size_t(blocks) * 32);
    std::vector<float> d(static_cast<size_t>(blocks));
    std::vector<double> out(size_t(n) * cols);
    for (int t = 0; t < n; t++) {
        quantize_activations(x.data() + size_t(t) * cols, cols, q.data(), d.data());
        for (int k = 0; k < cols; k++) out[size_t(t) * cols + k] = double(q[size_t(k)]) * d[size_t(k / 32)];
    }
    return out;
}

std::vector<float> random_x(int n, int cols, unsigned seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> x(size_t(n) * cols);
    for (float& v : x) v = nd(rng);
    return x;
}

std::vector<int> random_tokens(int n, int vocab, unsigned seed) {
    std::mt19937 rng(seed);
    std::vector<int> t{1};
    while (int(t.size()) < n) t.push_back(int(rng() % unsigned(vocab)));
    return t;
}

// One token per forward through the KV cache, as decoding does.
std::vector<float> decode_logits(Model& m, const std::vector<int>& tokens) {
    KVCache kv(m.cfg, int(tokens.size()));
    std::vector<float> logits(tokens.size() * size_t(m.cfg.vocab_size));
    for (int i = 0; i < int(tokens.size()); i++) {
        if (!kv.reserve(0, i + 1)) throw std::runtime_error("decode_logits: KV cache full");
        m.forward(kv, {{0, i, tokens[i]}}, {0}, logits.data() + size_t(i) * m.cfg.vocab_size);
    }
    return logits;
}

// max |a - b| / max |b| over one row: the relative error the issue bounds.
double rel_error(const float* a, const float* b, int n) {
    double diff = 0, scale = 0;
    for (int i = 0; i < n; i++) {
        diff = std::max(diff, std::fabs(double(a[i]) - b[i]));
        scale = std::max(scale, std::fabs(double(b[i])));
    }
    return diff / scale;
}

double worst_rel_error(const std::vector<float>& a, const std::vector<float>& b, int vocab) {
    if (a.size() != b.size()) throw std::runtime_error("worst_rel_error: sizes differ");
    double worst = 0;
    for (size_t p = 0; p < b.size() / size_t(vocab); p++)
        worst = std::max(worst, rel_error(a.data() + p * vocab, b.data() + p * vocab, vocab));
    return worst;
}

CommandResult run_command(const std::string& cmd) {
    static int n = 0;
    const std::string base = temp_dir() + "/cmd-" + std::to_string(n++);
    int status = std::system((cmd + " >" + base + ".out 2>" + base + ".err").c_str());
    CommandResult r;
    r.rc = status != -1 && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    r.out = read_file(base + ".out");
    r.err = read_file(base + ".err");
    return r;
}

std::string shell_quote(const std::string& s) {
    std::string r = "'";
    for (char c : s) r += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return r + "'";
}

double perplexity_of(const std::string& out) {
    size_t at = out.find("perplexity ", out.find("mean NLL"));
    if (at == std::string::npos) throw std::runtime_error("no perplexity in: " + out);
    return std::stod(out.substr(at + 11));
}

Config tiny_config(int dim, int hidden, int layers, int heads, int kv_heads, bool tied) {
    Config c;
    c.dim = dim;
    c.hidden_dim = hidden;
    c.n_layers = layers;
    c.n_heads = heads;
    c.n_kv_heads = kv_heads;
    c.head_dim = dim / heads;
    c.vocab_size = 512;
    c.max_seq_len = 64;
    c.norm_eps = 1e-5f;
    c.rope_theta = 10000.0f;
    c.tie_embeddings = tied;
    return c;
}

std::vector<int64_t> TinyWeights::shape_of(const std::string& name) const {
    for (const TensorSpec& t : model_tensors(cfg))
        if (t.name == name) return t.shape;
    throw std::runtime_error("shape_of: unknown tensor " + name);
}

const std::vector<float>& TinyWeights::get(const std::string& name) const {
    for (auto& [n, v] : tensors)
        if (n == name) return v;
    throw std::runtime_error("TinyWeights: no tensor " + name);
}

TinyWeights random_weights(const Config& c, unsigned seed) {
    TinyWeights tw;
    tw.cfg = c;
    std::mt19937 rng(seed);
    for (const TensorSpec& spec : model_tensors(c)) {
        const std::string& n = spec.name;
        int64_t numel = 1;
        for (int64_t d : spec.shape) numel *= d;
        std::vector<float> v(static_cast<size_t>(numel));
        // Scale so every part of the model moves the logits: unit-variance projections (q.k scores
        // of a few units, so attention is peaked and RoPE matters), norms near 1.
        bool is_norm = n.find("norm") != std::string::npos;
        int64_t fan_in = spec.shape.back();
        float stdev = is_norm ? 0.1f : n == "tok_embeddings.weight" ? 1.0f : 1.0f / std::sqrt(float(fan_in));
        if (n.find("wq") != std::string::npos || n.find("wk") != std::string::npos) stdev *= 2.0f;
        std::normal_distribution<float> dist(is_norm ? 1.0f : 0.0f, stdev);
        for (float& x : v) x = dist(rng);
        tw.tensors.push_back({n, std::move(v)});
    }
    return tw;
}

void write_model_bin(const TinyWeights& tw, const std::string& path, DType dtype) {
    static std::string tok = read_file(models_dir() + "/tok512.model");
    SafetensorsWriter w;
    w.metadata = {{"format", kFormatName}, {"version", kFormatVersion}, {"config", tw.cfg.to_json()},
                  {"quantization", "none"}};
    for (auto& [name, v] : tw.tensors) {
        bool is_norm = name.find("norm") != std::string::npos;
        DType t = is_norm ? DType::F32 : dtype;
        const std::vector<float>* src = &v;
        w.add(name, t, tw.shape_of(name), [src, t](uint8_t* dst) { convert_floats(src->data(), DType::F32, dst, t, src->size()); });
    }
    w.add_bytes("tokenizer.model", DType::U8, {int64_t(tok.size())}, tok.data());
    w.write(path);
}

std::map<std::string, std::string> result_texts(const std::string& jsonl_path) {
    std::map<std::string, std::string> m;
    std::istringstream lines(read_file(jsonl_path));
    for (std::string line; std::getline(lines, line);) {
        const nlohmann::json j = nlohmann::json::parse(line);
        m[j["id"].get<std::string>()] = j["text"].get<std::string>();
    }
    return m;
}

std::string quantized_copy(const std::string& path, const std::string& mode) {
    ConvertOptions o;
    o.input = path;
    o.output = path + ".q";
    o.mode = mode;
    o.progress = false;
    convert_checkpoint(o);
    return o.output;
}
