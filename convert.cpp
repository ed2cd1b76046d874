// convert.cpp: checkpoint conversion into model.bin: input detection, one reader per input kind
// (llama2.c .bin, Hugging Face folder, model.bin), and the streaming writer.
#include "convert.h"

#include <sys/stat.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>

#include "common.h"
#include "gguf.h"
#include "model.h"
#include "ops.h"
#include "safetensors.h"
#include "tokenizer.h"

using json = nlohmann::json;

namespace {

// ---------------------------------------------------------------------------------------------
// What every reader produces

// One input tensor, viewed in place: `data` points into a mapping the Checkpoint keeps alive, laid
// out row-major in the canonical shape (rows possibly in another RoPE order, see rope_heads).
struct SourceTensor {
    DType dtype = DType::F32;
    const uint8_t* data = nullptr;
    int rope_heads = 0;  // > 0: wq/wk rows in HF rotate-half order for this many heads; un-permute
    int ggml_type = -1;  // >= 0: GGUF Q8_0/Q4_0/Q4_1 blocks (dtype F32: what fills dequantize to)
    // A quantized matrix of a model.bin input (quant.data set; dtype F32: what fills dequantize to):
    // its view, and its value and companion tensors as stored, which --mode auto copies.
    Weight quant = {};
    std::vector<const TensorView*> stored = {};
};

struct Checkpoint {
    std::string kind;                             // for messages: "llama2.c", "Hugging Face", ...
    Config cfg;                                   // bos_id/eos_id < 0: take them from the tokenizer
    std::map<std::string, SourceTensor> tensors;  // by canonical name
    std::string tokenizer_model;                  // sentencepiece model bytes
    std::string tokenizer_json;                   // or a Hugging Face tokenizer.json (GGUF input)
    std::map<std::string, std::string> metadata;  // extra model.bin metadata ("chat_template")
    bool keep_dtypes = false;                     // auto mode keeps each tensor's float type (GGUF mixes them)
    std::string quantization = "none";            // a model.bin input's label, kept by auto with its matrices
    std::vector<std::unique_ptr<GgufFile>> ggufs;
    std::vector<std::unique_ptr<MappedFile>> maps;
    std::vector<std::unique_ptr<SafetensorsFile>> files;
};

bool ends_with(const std::string& s, const char* suffix) {
    size_t n = std::strlen(suffix);
    return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}

// Norm weights stay f32 whatever the mode: they are tiny and the forward pass reads them as f32.
bool is_norm(const std::string& name) { return ends_with(name, "norm.weight"); }

bool is_float(DType t) { return t == DType::F32 || t == DType::BF16 || t == DType::F16; }

bool path_exists(const std::string& p) {
    struct stat st;
    return stat(p.c_str(), &st) == 0;
}

std::string read_whole_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error(fmt("%s: cannot open: %s", path.c_str(), std::strerror(errno)));
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

// ---------------------------------------------------------------------------------------------
// llama2.c: legacy (7 int32, then f32 tensors) and version 1 (256-byte header, other order)

constexpr uint32_t kLlama2cMagic = 0x616b3432;  // "ak42"

struct Llama2cHeader {
    int32_t dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
};

// Whether the 7 ints look like llama2.c hyperparameters. The bounds keep every size product
// (at most layers * dim * dim, about 2^52 floats) far from overflowing size_t.
bool plausible(const Llama2cHeader& h) {
    auto in = [](int32_t v, int32_t hi) { return v > 0 && v <= hi; };
    const int32_t big = 1 << 20, small = 1 << 12;
    // vocab_size is negative for an untied classifier; compared, not std::abs'd (INT_MIN overflows).
    return in(h.dim, big) && in(h.hidden_dim, big) && in(h.n_layers, small) && in(h.n_heads, small) &&
           in(h.n_kv_heads, small) && h.vocab_size != 0 && h.vocab_size >= -big && h.vocab_size <= big &&
           in(h.seq_len, big);
}

Checkpoint read_llama2c(const std::string& path, const std::string& tokenizer_path) {
    Checkpoint ck;
    ck.maps.push_back(std::make_unique<MappedFile>(path));
    const MappedFile& m = *ck.maps.back();
    const char* f = path.c_str();

    uint32_t magic = 0;
    if (m.size >= 4) std::memcpy(&magic, m.data, 4);
    const bool v1 = magic == kLlama2cMagic;
    const size_t header_bytes = v1 ? 256 : 28;
    if (m.size < header_bytes) throw Error(fmt("%s: %zu bytes, too short for a llama2.c header", f, m.size));
    if (v1) {
        int32_t version;
        std::memcpy(&version, m.data + 4, 4);
        if (version != 1)
            throw Error(fmt("%s: llama2.c export version %d is not supported (legacy and version 1 "
                            "float32 files are)", f, version));
    }
    Llama2cHeader h;
    std::memcpy(&h, m.data + (v1 ? 8 : 0), sizeof h);
    if (!plausible(h))
        throw Error(fmt("%s: implausible llama2.c header (dim %d, hidden_dim %d, n_layers %d, n_heads %d, "
                        "n_kv_heads %d, vocab_size %d, seq_len %d)", f, h.dim, h.hidden_dim, h.n_layers,
                        h.n_heads, h.n_kv_heads, h.vocab_size, h.seq_len));
    if (h.dim % h.n_heads != 0)
        throw Error(fmt("%s: dim %d is not divisible by n_heads %d", f, h.dim, h.n_heads));

    // Legacy files flag an untied classifier with a negative vocab size; version 1 has a byte.
    const bool tied = v1 ? m.data[36] != 0 : h.vocab_size > 0;
    Config& c = ck.cfg;
    c.dim = h.dim;
    c.hidden_dim = h.hidden_dim;
    c.n_layers = h.n_layers;
    c.n_heads = h.n_heads;
    c.n_kv_heads = h.n_kv_heads;
    c.head_dim = h.dim / h.n_heads;
    c.vocab_size = std::abs(h.vocab_size);
    c.max_seq_len = h.seq_len;
    c.norm_eps = 1e-5f;
    c.rope_theta = 10000.0f;
    c.tie_embeddings = tied;
    c.bos_id = c.eos_id = -1;
    c.validate(path);  // head counts must divide before any offset is computed

    // The file's tensor order as (canonical name or "" to skip, floats, once per layer?).
    struct Block {
        const char* what;
        size_t numel;
        bool per_layer;
    };
    const size_t d = size_t(c.dim), hd = size_t(c.hidden_dim), v = size_t(c.vocab_size);
    const size_t kv = size_t(c.n_kv_heads) * size_t(c.head_dim);
    const Block emb = {"tok_embeddings.weight", v * d, false}, att_norm = {"attention_norm.weight", d, true},
                ffn_norm = {"ffn_norm.weight", d, true}, norm = {"norm.weight", d, false},
                wq = {"attention.wq.weight", d * d, true}, wk = {"attention.wk.weight", kv * d, true},
                wv = {"attention.wv.weight", kv * d, true}, wo = {"attention.wo.weight", d * d, true},
                w1 = {"feed_forward.w1.weight", hd * d, true}, w2 = {"feed_forward.w2.weight", d * hd, true},
                w3 = {"feed_forward.w3.weight", hd * d, true}, out = {"output.weight", v * d, false};
    // freq_cis_real and freq_cis_imag, [seq_len, head_dim/2] each: we compute RoPE ourselves.
    const Block freqs = {"", size_t(c.max_seq_len) * size_t(c.head_dim), false};
    std::vector<Block> order =
        v1 ? std::vector<Block>{att_norm, ffn_norm, norm, emb, wq, wk, wv, wo, w1, w2, w3}
           : std::vector<Block>{emb, att_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3, norm, freqs};
    if (!tied) order.push_back(out);

    size_t expect = header_bytes;
    for (const Block& b : order) expect += b.numel * sizeof(float) * (b.per_layer ? size_t(c.n_layers) : 1);
    if (m.size != expect)
        throw Error(fmt("%s: file is %zu bytes but its header (dim %d, hidden_dim %d, %d layers, %d heads, "
                        "%d kv heads, vocab %d, seq_len %d, %s) implies %zu: %s", f, m.size, c.dim,
                        c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.max_seq_len,
                        tied ? "tied" : "untied", expect,
                        m.size < expect ? "truncated" : "trailing bytes (not a llama2.c checkpoint?)"));

    size_t off = header_bytes;
    for (const Block& b : order) {
        for (int l = 0; l < (b.per_layer ? c.n_layers : 1); l++) {
            if (*b.what) {
                std::string name = b.per_layer ? layer_tensor(l, b.what) : std::string(b.what);
                ck.tensors[name] = {DType::F32, m.data + off, 0};
            }
            off += b.numel * sizeof(float);
        }
    }
    assert(off == m.size);

    if (tokenizer_path.empty())
        throw Error(fmt("%s: a llama2.c checkpoint has no tokenizer inside: pass --tokenizer with its "
                        "sentencepiece .model file", f));
    ck.tokenizer_model = read_whole_file(tokenizer_path);
    ck.kind = v1 ? "llama2.c version 1" : "llama2.c legacy";
    return ck;
}

// ---------------------------------------------------------------------------------------------
// Hugging Face folder: config.json, model.safetensors or shards, tokenizer.model or tokenizer.json

json read_json(const std::string& path) {
    std::string text = read_whole_file(path);
    try {
        return json::parse(text, JsonDepthLimit{path});
    } catch (const json::exception& e) {
        throw Error(fmt("%s: not valid JSON: %s", path.c_str(), e.what()));
    }
}

// A config.json field; absent and null (as in "head_dim": null) both count as missing.
const json* field(const json& j, const char* key) {
    auto it = j.find(key);
    return it == j.end() || it->is_null() ? nullptr : &*it;
}

int json_int(const json& j, const char* key, const std::string& where, std::optional<int> fallback = {}) {
    const json* v = field(j, key);
    if (!v && fallback) return *fallback;
    if (!v) throw Error(fmt("%s: missing \"%s\"", where.c_str(), key));
    if (!v->is_number_integer() || v->get<int64_t>() <= 0 || v->get<int64_t>() > INT_MAX)
        throw Error(fmt("%s: \"%s\" must be a positive integer, found %s", where.c_str(), key, v->dump().c_str()));
    return int(v->get<int64_t>());
}

float json_float(const json& j, const char* key, const std::string& where, std::optional<float> fallback = {}) {
    const json* v = field(j, key);
    if (!v && fallback) return *fallback;
    if (!v) throw Error(fmt("%s: missing \"%s\"", where.c_str(), key));
    // (Beyond float range the conversion to float would be undefined.)
    if (!v->is_number() || !(v->get<double>() > 0) || v->get<double>() > double(std::numeric_limits<float>::max()))
        throw Error(fmt("%s: \"%s\" must be a positive number within float range, found %s", where.c_str(), key,
                        v->dump().c_str()));
    return v->get<float>();
}

// bos/eos ids: an int, or a list (Llama 3 lists several EOS ids; the first is the main one).
std::optional<int> json_token_id(const json& j, const char* key, const std::string& where, int vocab_size) {
    const json* v = field(j, key);
    if (v && v->is_array() && !v->empty()) v = &(*v)[0];
    if (!v) return std::nullopt;
    if (!v->is_number_integer() || v->get<int64_t>() < 0 || v->get<int64_t>() >= vocab_size)
        throw Error(fmt("%s: \"%s\" must be a token id below vocab_size %d, found %s", where.c_str(), key, vocab_size,
                        v->dump().c_str()));
    return int(v->get<int64_t>());
}

Config read_hf_config(const std::string& path) {
    json j = read_json(path);
    if (!j.is_object()) throw Error(fmt("%s: not a JSON object", path.c_str()));
    const char* p = path.c_str();
    // Refuse what the forward pass would silently get wrong rather than convert it.
    if (const json* a = field(j, "hidden_act"); a && *a != "silu")
        throw Error(fmt("%s: hidden_act %s is not supported (only silu)", p, a->dump().c_str()));
    // Mistral v0.1 attends within a sliding window; without it the model would be wrong past it.
    if (const json* sw = field(j, "sliding_window");
        sw && sw->is_number_integer() && sw->get<int64_t>() < json_int(j, "max_position_embeddings", path))
        throw Error(fmt("%s: sliding_window %s (attention limited to a window) is not supported yet", p,
                        sw->dump().c_str()));
    // Llama 3.1's rope scaling is supported; linear, dynamic, yarn, ... are not.
    const json* rs = field(j, "rope_scaling");
    if (rs) {
        const json* type = rs->is_object() ? field(*rs, "rope_type") : nullptr;
        if (!type && rs->is_object()) type = field(*rs, "type");
        if (!type || *type != "llama3")
            throw Error(fmt("%s: rope_scaling %s is not supported (only rope_type \"llama3\")", p, rs->dump().c_str()));
    }

    Config c;
    c.dim = json_int(j, "hidden_size", path);
    c.hidden_dim = json_int(j, "intermediate_size", path);
    c.n_layers = json_int(j, "num_hidden_layers", path);
    c.n_heads = json_int(j, "num_attention_heads", path);
    c.n_kv_heads = json_int(j, "num_key_value_heads", path, c.n_heads);
    if (!field(j, "head_dim") && c.dim % c.n_heads != 0)
        throw Error(fmt("%s: hidden_size %d is not divisible by num_attention_heads %d", p, c.dim, c.n_heads));
    c.head_dim = json_int(j, "head_dim", path, c.dim / c.n_heads);
    c.vocab_size = json_int(j, "vocab_size", path);
    c.max_seq_len = json_int(j, "max_position_embeddings", path);
    c.norm_eps = json_float(j, "rms_norm_eps", path);
    c.rope_theta = json_float(j, "rope_theta", path, 10000.0f);
    if (rs) {
        const std::string where = path + ": rope_scaling";
        c.rope_factor = json_float(*rs, "factor", where);
        c.rope_low_freq_factor = json_float(*rs, "low_freq_factor", where);
        c.rope_high_freq_factor = json_float(*rs, "high_freq_factor", where);
        c.rope_original_max_seq_len = json_int(*rs, "original_max_position_embeddings", where);
    }
    const json* tie = field(j, "tie_word_embeddings");
    if (tie && !tie->is_boolean())
        throw Error(fmt("%s: \"tie_word_embeddings\" must be true or false, found %s", p, tie->dump().c_str()));
    c.tie_embeddings = tie && tie->get<bool>();
    c.bos_id = json_token_id(j, "bos_token_id", path, c.vocab_size).value_or(-1);
    c.eos_id = json_token_id(j, "eos_token_id", path, c.vocab_size).value_or(-1);
    // Mixtral: intermediate_size is each expert's width.
    if (field(j, "num_local_experts")) {
        c.n_experts = json_int(j, "num_local_experts", path);
        c.n_experts_per_tok = json_int(j, "num_experts_per_tok", path);
    }
    c.validate(path);
    return c;
}

Checkpoint read_hf(const std::string& dir, const std::string& tokenizer_path) {
    Checkpoint ck;
    ck.kind = "Hugging Face";
    const std::string config_path = dir + "/config.json";
    if (!path_exists(config_path))
        throw Error(fmt("%s: no config.json: a Hugging Face checkpoint folder needs one", dir.c_str()));
    ck.cfg = read_hf_config(config_path);
    const Config& c = ck.cfg;

    // Where each HF tensor lives: one model.safetensors, or shards listed in the index's weight_map.
    const std::string single = dir + "/model.safetensors", index_path = dir + "/model.safetensors.index.json";
    json weight_map;
    std::string where;  // the file that lists the tensors, for messages
    if (path_exists(single)) {
        ck.files.push_back(std::make_unique<SafetensorsFile>(single));
        where = single;
    } else if (path_exists(index_path)) {
        json index = read_json(index_path);
        if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
            throw Error(fmt("%s: no \"weight_map\" object", index_path.c_str()));
        weight_map = index["weight_map"];
        where = index_path;
    } else {
        throw Error(fmt("%s: neither model.safetensors nor model.safetensors.index.json found", dir.c_str()));
    }
    std::map<std::string, SafetensorsFile*> shards;
    auto file_of = [&](const std::string& hf) -> const SafetensorsFile& {
        if (weight_map.is_null()) return *ck.files[0];
        auto it = weight_map.find(hf);
        if (it == weight_map.end())
            throw Error(fmt("%s: tensor '%s' is missing from weight_map", index_path.c_str(), hf.c_str()));
        // A shard is a file beside the index: no folders, so an index cannot point outside `dir`.
        if (!it->is_string() || it->get<std::string>().empty() || it->get<std::string>().find('/') != std::string::npos ||
            it->get<std::string>() == "." || it->get<std::string>() == "..")
            throw Error(fmt("%s: weight_map entry '%s' is %s, not a file name in the folder", index_path.c_str(),
                            hf.c_str(), it->dump().c_str()));
        std::string shard = it->get<std::string>();
        if (!shards.count(shard)) {
            ck.files.push_back(std::make_unique<SafetensorsFile>(dir + "/" + shard));
            shards[shard] = ck.files.back().get();
        }
        return *shards[shard];
    };

    std::map<std::string, std::vector<int64_t>> shapes;
    for (const TensorSpec& e : model_tensors(c)) shapes[e.name] = e.shape;
    std::set<std::string> used;
    auto take = [&](const std::string& name, const std::string& hf, int rope_heads) {
        const SafetensorsFile& f = file_of(hf);
        const TensorView& t = f.get(hf, shapes.at(name));  // throws naming file, tensor, shapes
        if (!is_float(t.dtype))
            throw Error(fmt("%s: tensor '%s': dtype %s is not F32, BF16 or F16", f.path.c_str(), hf.c_str(),
                            dtype_name(t.dtype)));
        ck.tensors[name] = {t.dtype, t.data, rope_heads};
        used.insert(hf);
    };
    // HF's q_proj/k_proj rows are permuted for rotate-half RoPE; the fill undoes it (rope_heads).
    static const struct { const char *ours, *theirs; } kLayer[] = {
        {"attention_norm.weight", "input_layernorm.weight"},
        {"attention.wq.weight", "self_attn.q_proj.weight"},
        {"attention.wk.weight", "self_attn.k_proj.weight"},
        {"attention.wv.weight", "self_attn.v_proj.weight"},
        {"attention.wo.weight", "self_attn.o_proj.weight"},
        {"ffn_norm.weight", "post_attention_layernorm.weight"},
        {"feed_forward.w1.weight", "mlp.gate_proj.weight"},
        {"feed_forward.w2.weight", "mlp.down_proj.weight"},
        {"feed_forward.w3.weight", "mlp.up_proj.weight"},
    };
    take("tok_embeddings.weight", "model.embed_tokens.weight", 0);
    for (int l = 0; l < c.n_layers; l++) {
        for (const auto& n : kLayer) {
            if (c.n_experts > 0 && ends_with(n.theirs, "proj.weight") && std::strncmp(n.theirs, "mlp.", 4) == 0)
                continue;  // Mixtral: block_sparse_moe below instead of mlp
            int rope = ends_with(n.ours, "wq.weight") ? c.n_heads : ends_with(n.ours, "wk.weight") ? c.n_kv_heads : 0;
            take(layer_tensor(l, n.ours), fmt("model.layers.%d.%s", l, n.theirs), rope);
        }
        if (c.n_experts > 0) {  // HF Mixtral: w1 gate, w2 down, w3 up, as Meta's names
            take(layer_tensor(l, "feed_forward.gate.weight"), fmt("model.layers.%d.block_sparse_moe.gate.weight", l), 0);
            for (int e = 0; e < c.n_experts; e++)
                for (const char* w : {"w1", "w2", "w3"})
                    take(expert_tensor(l, e, w),
                         fmt("model.layers.%d.block_sparse_moe.experts.%d.%s.weight", l, e, w), 0);
        }
    }
    take("norm.weight", "model.norm.weight", 0);
    if (!c.tie_embeddings) take("output.weight", "lm_head.weight", 0);

    // A tensor we do not place (a bias, an extra norm) means an architecture we would run wrongly.
    std::vector<std::string> all;
    if (weight_map.is_null()) {
        for (const auto& [name, t] : ck.files[0]->tensors) all.push_back(name);
    } else {
        for (const auto& [name, file] : weight_map.items()) all.push_back(name);
    }
    for (const std::string& name : all) {
        if (used.count(name) || ends_with(name, "rotary_emb.inv_freq") || name == "lm_head.weight") continue;
        throw Error(fmt("%s: tensor '%s' has no place in a Llama-family model (unsupported architecture)",
                        where.c_str(), name.c_str()));
    }

    // --tokenizer, else the folder's tokenizer.model (sentencepiece, or Llama 3's tiktoken file),
    // else its tokenizer.json (byte-level BPE), which model.bin keeps as the tensor tokenizer.json.
    if (!tokenizer_path.empty()) {
        ck.tokenizer_model = read_whole_file(tokenizer_path);
    } else if (path_exists(dir + "/tokenizer.model")) {
        ck.tokenizer_model = read_whole_file(dir + "/tokenizer.model");
    } else if (path_exists(dir + "/tokenizer.json")) {
        ck.tokenizer_json = read_whole_file(dir + "/tokenizer.json");
    } else {
        throw Error(fmt("%s: no tokenizer.model (sentencepiece or tiktoken) or tokenizer.json in the folder; pass "
                        "--tokenizer", dir.c_str()));
    }
    // The chat template (generate --interactive recognises its format), when the folder has one.
    if (path_exists(dir + "/tokenizer_config.json")) {
        const std::string where = dir + "/tokenizer_config.json";
        json tc = read_json(where);
        if (const json* t = tc.is_object() ? field(tc, "chat_template") : nullptr) {
            if (t->is_string()) ck.metadata["chat_template"] = t->get<std::string>();
            // Some models list named templates: [{"name": "default", "template": ...}, ...].
            else if (t->is_array())
                for (const json& e : *t)
                    if (e.is_object() && e.value("name", "") == "default" && e.contains("template") && e["template"].is_string())
                        ck.metadata["chat_template"] = e["template"].get<std::string>();
        }
    }
    return ck;
}

// ---------------------------------------------------------------------------------------------
// fastgen model.bin: re-encode its tensors (quantized ones dequantized, or copied as they are by auto)

Checkpoint read_model_bin(const std::string& path, const std::string& tokenizer_path) {
    Checkpoint ck;
    ck.kind = "model.bin";
    ck.files.push_back(std::make_unique<SafetensorsFile>(path));
    const SafetensorsFile& f = *ck.files.back();
    const char* p = path.c_str();
    auto meta = [&](const char* key) {
        auto it = f.metadata.find(key);
        return it == f.metadata.end() ? std::string() : it->second;
    };
    if (meta("format") != kFormatName)
        throw Error(fmt("%s: a safetensors file but not a fastgen model.bin (metadata format '%s'); for a "
                        "Hugging Face checkpoint pass the folder holding config.json", p, meta("format").c_str()));
    if (meta("version") != kFormatVersion)
        throw Error(fmt("%s: model.bin format version '%s', this build reads '%s'", p, meta("version").c_str(),
                        kFormatVersion));
    ck.quantization = meta("quantization");
    if (ck.quantization.empty()) throw Error(fmt("%s: metadata 'quantization' is missing or empty", p));
    ck.cfg = Config::from_json(meta("config"), path + ": config");  // validates
    for (const TensorSpec& e : model_tensors(ck.cfg)) {
        const TensorView* q = f.find(e.name);
        if (q && e.shape.size() == 2 && (q->dtype == DType::I8 || q->dtype == DType::U8)) {
            SourceTensor s;  // checked as the loader checks it: shapes, group, zeros or mins
            size_t companions = 0;
            s.quant = load_matrix(f, e.name, int(e.shape[0]), int(e.shape[1]), &companions);
            s.stored = {q, &f.get(e.name + ".scales")};
            for (const char* c : {".zeros", ".mins"})
                if (const TensorView* t = f.find(e.name + c)) s.stored.push_back(t);
            assert(s.stored.size() == companions + 1);
            ck.tensors[e.name] = s;
            ck.keep_dtypes = true;  // the embedding may be quantized: float matrices keep their own type
            continue;
        }
        const TensorView& t = f.get(e.name, e.shape);
        if (!is_float(t.dtype))
            throw Error(fmt("%s: tensor '%s': dtype %s is not F32, BF16 or F16%s", p, e.name.c_str(),
                            dtype_name(t.dtype), e.shape.size() == 2 ? " (nor I8 / U8 with scales)" : ""));
        ck.tensors[e.name] = {t.dtype, t.data, 0};
    }
    // The tokenizer travels as stored: tokenizer.model, or tokenizer.json (a GGUF or HF BPE import).
    const TensorView* json_tok = f.find("tokenizer.json");
    if (!tokenizer_path.empty()) {
        ck.tokenizer_model = read_whole_file(tokenizer_path);
    } else {
        const TensorView& t = json_tok && !f.find("tokenizer.model") ? *json_tok : f.get("tokenizer.model");
        if (t.dtype != DType::U8 || t.shape.size() != 1)
            throw Error(fmt("%s: tensor '%s' must be U8 [nbytes], found %s %s", p, t.name.c_str(),
                            dtype_name(t.dtype), t.shape_str().c_str()));
        (&t == json_tok ? ck.tokenizer_json : ck.tokenizer_model).assign(reinterpret_cast<const char*>(t.data), t.nbytes);
    }
    if (auto it = f.metadata.find("chat_template"); it != f.metadata.end()) ck.metadata["chat_template"] = it->second;
    return ck;
}

// ---------------------------------------------------------------------------------------------
// GGUF (llama.cpp): the llama architecture, F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors. llama.cpp's
// converter already permuted wq/wk rows into the adjacent-pairs RoPE order we use, so no rope_heads.

Checkpoint read_gguf(const std::string& path, const std::string& tokenizer_path) {
    Checkpoint ck;
    ck.ggufs.push_back(std::make_unique<GgufFile>(path));
    const GgufFile& f = *ck.ggufs.back();
    const char* p = path.c_str();
    ck.kind = fmt("GGUF v%u", f.version);
    ck.keep_dtypes = true;
    ck.cfg = gguf_llama_config(f);
    const Config& c = ck.cfg;

    // GGUF name -> canonical name.
    std::map<std::string, std::string> ours = {
        {"token_embd.weight", "tok_embeddings.weight"}, {"output_norm.weight", "norm.weight"},
        {"output.weight", "output.weight"}};
    static const struct { const char *ours, *theirs; } kLayer[] = {
        {"attention_norm.weight", "attn_norm.weight"}, {"attention.wq.weight", "attn_q.weight"},
        {"attention.wk.weight", "attn_k.weight"},      {"attention.wv.weight", "attn_v.weight"},
        {"attention.wo.weight", "attn_output.weight"}, {"ffn_norm.weight", "ffn_norm.weight"},
        {"feed_forward.w1.weight", "ffn_gate.weight"}, {"feed_forward.w2.weight", "ffn_down.weight"},
        {"feed_forward.w3.weight", "ffn_up.weight"},
    };
    for (int l = 0; l < c.n_layers; l++)
        for (const auto& n : kLayer) ours[fmt("blk.%d.%s", l, n.theirs)] = layer_tensor(l, n.ours);
    std::map<std::string, std::vector<int64_t>> shapes;
    for (const TensorSpec& e : model_tensors(c)) shapes[e.name] = e.shape;

    for (const GgufTensor& t : f.tensors) {
        const char* n = t.name.c_str();
        if (t.name == "rope_freqs.weight") continue;  // Llama 3 RoPE scaling: gguf_llama_config read it
        auto it = ours.find(t.name);
        if (it == ours.end())
            throw Error(fmt("%s: tensor '%s' has no place in a Llama model (unsupported architecture)", p, n));
        const std::vector<int64_t>& want = shapes.at(it->second);
        if (t.shape() != want) {
            TensorView a, b;  // for shape_str
            a.shape = t.shape();
            b.shape = want;
            throw Error(fmt("%s: tensor '%s': shape %s (GGUF ne reversed), expected %s", p, n, a.shape_str().c_str(),
                            b.shape_str().c_str()));
        }
        const GgmlType* gt = ggml_type(t.type);
        if (!gt->convertible)
            throw Error(fmt("%s: tensor '%s' is %s, which fastgen cannot convert (F32, F16, BF16, Q8_0, Q4_0 and Q4_1 "
                            "can be: requantize the GGUF to one of them)", p, n, gt->name));
        SourceTensor s;
        s.data = t.data;
        if (t.type == kGgmlF32 || t.type == kGgmlF16 || t.type == kGgmlBF16) {
            s.dtype = t.type == kGgmlF32 ? DType::F32 : t.type == kGgmlF16 ? DType::F16 : DType::BF16;
        } else {
            s.dtype = DType::F32;
            s.ggml_type = int(t.type);
        }
        ck.tensors[it->second] = s;
    }
    for (const auto& [theirs, name] : ours)
        if (!ck.tensors.count(name) && shapes.count(name))
            throw Error(fmt("%s: no tensor '%s' (%s)", p, theirs.c_str(), name.c_str()));

    if (!tokenizer_path.empty()) {
        ck.tokenizer_model = read_whole_file(tokenizer_path);
    } else {
        const std::string& model = f.get_string("tokenizer.ggml.model");
        if (model == "gpt2") ck.tokenizer_json = gguf_tokenizer_json(f);
        else if (model == "llama") ck.tokenizer_model = gguf_sentencepiece_model(f);
        else
            throw Error(fmt("%s: tokenizer.ggml.model '%s' is not supported (gpt2: byte-level BPE, llama: "
                            "sentencepiece); pass --tokenizer with a sentencepiece .model", p, model.c_str()));
    }
    if (f.find("tokenizer.chat_template")) {
        const std::string& t = f.get_string("tokenizer.chat_template");
        if (!well_formed_utf8(t))  // it goes into model.bin's JSON header
            throw Error(fmt("%s: metadata 'tokenizer.chat_template' is not valid UTF-8", p));
        ck.metadata["chat_template"] = t;
    }
    return ck;
}

// auto mode: a GGUF Q8_0 / Q4_0 / Q4_1 matrix [rows, cols] repacked without requantizing:
//   Q8_0 -> NAME I8 [rows, cols] + NAME.scales F32 [rows, cols/32]             (grouped int8)
//   Q4_0 -> NAME U8 [rows, cols/2] + .scales F32 + .zeros U8 (all 8) [rows, cols/32]
//   Q4_1 -> NAME U8 [rows, cols/2] + .scales F32 + .mins F32 [rows, cols/32]
// Returns the number of companion tensors added (scales, zeros, mins). Each fill reads the blocks again (cheap) for its own part.
size_t add_ggml_matrix(SafetensorsWriter& w, const std::string& name, const std::vector<int64_t>& shape,
                       const SourceTensor& s) {
    const int64_t rows = shape[0], cols = shape[1], groups = cols / kGgmlBlock;
    const uint32_t type = uint32_t(s.ggml_type);
    const size_t row_bytes = size_t(groups) * size_t(ggml_type(type)->bytes);
    const uint8_t* src = s.data;
    // Runs `one_row(block row, r)` over every row.
    auto each_row = [=](auto one_row) {
        for (int64_t r = 0; r < rows; r++) one_row(src + size_t(r) * row_bytes, size_t(r));
    };
    const size_t n = size_t(cols), g = size_t(groups);
    if (type == kGgmlQ8_0) {
        w.add(name, DType::I8, {rows, cols}, [=](uint8_t* dst) {
            each_row([&](const uint8_t* b, size_t r) { ggml_q8_0_split(b, n, reinterpret_cast<int8_t*>(dst) + r * n, nullptr); });
        });
        w.add(name + ".scales", DType::F32, {rows, groups}, [=](uint8_t* dst) {
            each_row([&](const uint8_t* b, size_t r) { ggml_q8_0_split(b, n, nullptr, reinterpret_cast<float*>(dst) + r * g); });
        });
        return 1;
    }
    w.add(name, DType::U8, {rows, cols / 2}, [=](uint8_t* dst) {
        each_row([&](const uint8_t* b, size_t r) { ggml_q4_split(type, b, n, dst + r * n / 2, nullptr, nullptr, nullptr); });
    });
    w.add(name + ".scales", DType::F32, {rows, groups}, [=](uint8_t* dst) {
        each_row([&](const uint8_t* b, size_t r) {
            ggml_q4_split(type, b, n, nullptr, reinterpret_cast<float*>(dst) + r * g, nullptr, nullptr);
        });
    });
    if (type == kGgmlQ4_0)
        w.add(name + ".zeros", DType::U8, {rows, groups}, [=](uint8_t* dst) { std::memset(dst, 8, size_t(rows) * g); });
    else
        w.add(name + ".mins", DType::F32, {rows, groups}, [=](uint8_t* dst) {
            each_row([&](const uint8_t* b, size_t r) {
                ggml_q4_split(type, b, n, nullptr, nullptr, nullptr, reinterpret_cast<float*>(dst) + r * g);
            });
        });
    return 2;
}

// ---------------------------------------------------------------------------------------------
// Detection and writing

Checkpoint read_checkpoint(const std::string& path, const std::string& tokenizer_path) {
    struct stat st;
    if (stat(path.c_str(), &st) != 0)
        throw Error(fmt("%s: cannot open: %s", path.c_str(), std::strerror(errno)));
    if (S_ISDIR(st.st_mode)) return read_hf(path, tokenizer_path);

    uint8_t head[40] = {};
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error(fmt("%s: cannot open: %s", path.c_str(), std::strerror(errno)));
    in.read(reinterpret_cast<char*>(head), sizeof head);
    const size_t n = size_t(in.gcount()), size = size_t(st.st_size);
    // safetensors: u64 header length that fits the file, then the JSON object.
    uint64_t header_len = 0;
    if (n >= 8) std::memcpy(&header_len, head, 8);
    if (n >= 9 && head[8] == '{' && header_len <= size - 8) return read_model_bin(path, tokenizer_path);
    if (n >= 4 && std::memcmp(head, "GGUF", 4) == 0) return read_gguf(path, tokenizer_path);
    uint32_t magic = 0;
    if (n >= 4) std::memcpy(&magic, head, 4);
    Llama2cHeader h = {};
    if (n >= sizeof h) std::memcpy(&h, head, sizeof h);
    if (magic == kLlama2cMagic || (n >= sizeof h && plausible(h))) return read_llama2c(path, tokenizer_path);
    // A JSON header whose length does not fit the file: a model.bin cut short or with a corrupt
    // length; the safetensors reader says which.
    if (n >= 9 && head[8] == '{') return read_model_bin(path, tokenizer_path);
    throw Error(fmt("%s: unknown input kind: not a llama2.c checkpoint, a fastgen model.bin, a GGUF file, or a "
                    "Hugging Face folder (a directory with config.json)", path.c_str()));
}

void copy_floats(const uint8_t* src, DType from, uint8_t* dst, DType to, size_t n) {
    if (from == to) std::memcpy(dst, src, n * dtype_size(to));
    else convert_floats(src, from, dst, to, n);
}

// Writes one tensor as `to`. HF wq/wk rows come in rotate-half order: HF row h*hd + j*hd/2 + i holds
// Meta row h*hd + 2i + j (pair i, member j), i.e. w.view(heads, 2, hd/2, in).transpose(1, 2).
void fill_tensor(const SourceTensor& s, const std::vector<int64_t>& shape, DType to, uint8_t* dst) {
    size_t numel = 1;
    for (int64_t d : shape) numel *= size_t(d);
    if (s.quant.data) {  // a quantized model.bin matrix: dequantize row by row
        assert(shape.size() == 2 && shape[0] == s.quant.rows && shape[1] == s.quant.cols);
        std::vector<float> row(size_t(s.quant.cols));
        for (int r = 0; r < s.quant.rows; r++) {
            dequantize_row(s.quant, r, row.data());
            convert_floats(row.data(), DType::F32, dst + size_t(r) * row.size() * dtype_size(to), to, row.size());
        }
        return;
    }
    if (s.ggml_type >= 0) {  // GGUF blocks: dequantize row by row (blocks never straddle rows)
        const size_t cols = size_t(shape.back()), rows = numel / cols;
        const size_t row_bytes = cols / kGgmlBlock * size_t(ggml_type(uint32_t(s.ggml_type))->bytes);
        std::vector<float> row(to == DType::F32 ? 0 : cols);
        for (size_t r = 0; r < rows; r++) {
            float* out = to == DType::F32 ? reinterpret_cast<float*>(dst) + r * cols : row.data();
            ggml_dequantize_row(uint32_t(s.ggml_type), s.data + r * row_bytes, out, cols);
            if (to != DType::F32) convert_floats(out, DType::F32, dst + r * cols * dtype_size(to), to, cols);
        }
        return;
    }
    if (s.rope_heads == 0) {
        copy_floats(s.data, s.dtype, dst, to, numel);
        return;
    }
    assert(shape.size() == 2 && shape[0] % s.rope_heads == 0);
    const size_t rows = size_t(shape[0]), cols = size_t(shape[1]);
    const size_t hd = rows / size_t(s.rope_heads), half = hd / 2;
    const size_t src_row = cols * dtype_size(s.dtype), dst_row = cols * dtype_size(to);
    for (size_t r = 0; r < rows; r++) {
        size_t head = r / hd, i = (r % hd) / 2, j = r % 2;
        copy_floats(s.data + (head * hd + j * half + i) * src_row, s.dtype, dst + r * dst_row, to, cols);
    }
}

// Quantizes one matrix per ConvertOptions. The value tensor's fill does the work and keeps the
// scales (and int4's minimums) for the fills of NAME.scales and NAME.mins, which the writer calls next.
struct QuantJob {
    SourceTensor src;
    std::vector<int64_t> shape;
    bool int4 = false;
    int group = 0;
    std::vector<float> scales;
    std::vector<float> mins;
};

void quantize_into(QuantJob& j, uint8_t* dst, std::vector<std::pair<std::string, double>>* errors,
                   const std::string& name) {
    const int rows = int(j.shape[0]), cols = int(j.shape[1]);
    std::vector<float> w(size_t(rows) * cols);
    fill_tensor(j.src, j.shape, DType::F32, reinterpret_cast<uint8_t*>(w.data()));
    // A NaN or infinity has no integer level (casting one is undefined behaviour, and the scale of
    // its row would be NaN): refuse the checkpoint, before the threads below start.
    for (size_t i = 0; i < w.size(); i++)
        if (!std::isfinite(w[i]))
            throw Error(fmt("%s: element [%zu, %zu] is %s; quantizing to %s needs finite weights (the checkpoint is damaged; "
                            "--mode f32 would copy it as it is)",
                            name.c_str(), i / size_t(cols), i % size_t(cols), std::isnan(w[i]) ? "NaN" : "infinite",
                            j.int4 ? "int4" : "int8"));
    const int gs = j.int4 ? cols / j.group : 1;
    j.scales.assign(size_t(rows) * gs, 0.0f);
    if (j.int4) j.mins.assign(size_t(rows) * gs, 0.0f);
    Weight q{j.int4 ? DType::U8 : DType::I8, dst, rows, cols, cols};
    q.scales = j.scales.data();
    q.mins = j.int4 ? j.mins.data() : nullptr;
    q.group = j.int4 ? j.group : 0;  // an int8 fallback matrix is per-row int8, whatever --groupsize says
    // Rows are independent (int4's search is the slow part): threads over rows, and the error sums
    // added up in row order afterwards, so the output does not depend on the thread count.
    std::vector<double> row_err(static_cast<size_t>(rows)), row_norm(static_cast<size_t>(rows));
#pragma omp parallel for schedule(dynamic, 16)
    for (int r = 0; r < rows; r++) {
        const float* wr = w.data() + size_t(r) * cols;
        if (j.int4)
            quantize_row_int4_min(wr, cols, j.group, dst + size_t(r) * cols / 2, j.scales.data() + size_t(r) * gs,
                                  j.mins.data() + size_t(r) * gs);
        else
            j.scales[size_t(r)] = quantize_row_int8(wr, cols, reinterpret_cast<int8_t*>(dst) + size_t(r) * cols);
        std::vector<float> deq(static_cast<size_t>(cols));
        dequantize_row(q, r, deq.data());
        for (int i = 0; i < cols; i++) {  // in double: the float difference of huge weights overflows
            const double e = double(wr[i]) - double(deq[size_t(i)]);
            row_err[size_t(r)] += e * e;
            row_norm[size_t(r)] += double(wr[i]) * wr[i];
        }
    }
    double err = 0, norm = 0;
    for (int r = 0; r < rows; r++) err += row_err[size_t(r)], norm += row_norm[size_t(r)];
    // Finite weights whose grid reads back past float's range (int8 with max|w| at FLT_MAX: 127
    // steps of the rounded scale can land past it): the file would hold infinities. (int4's search
    // never picks such a grid: its error is infinite.)
    if (!std::isfinite(err))
        throw Error(fmt("%s: its %s quantization reads back as infinite (weights up to %g are too close to "
                        "float's limit); convert it with --mode f32 or bf16",
                        name.c_str(), j.int4 ? "int4" : "int8",
                        double(std::fabs(*std::max_element(w.begin(), w.end(), [](float a, float b) {
                            return std::fabs(a) < std::fabs(b);
                        })))));
    errors->push_back({name, norm > 0 ? std::sqrt(err / norm) : 0.0});
}

}  // namespace

ConvertStats convert_checkpoint(const ConvertOptions& o) {
    const double t0 = now_seconds();
    std::optional<DType> mode_dtype;  // none: auto
    if (o.mode == "f32") mode_dtype = DType::F32;
    else if (o.mode == "bf16") mode_dtype = DType::BF16;
    else if (o.mode == "f16") mode_dtype = DType::F16;
    const bool int8 = o.mode == "int8", int4 = o.mode == "int4";
    if (!mode_dtype && !int8 && !int4 && o.mode != "auto")
        throw Error(fmt("unknown mode '%s' (auto, f32, bf16, f16, int8, int4)", o.mode.c_str()));
    if (int4 && o.group != 32 && o.group != 64 && o.group != 128)
        throw Error(fmt("int4 group size %d is not supported (32, 64 or 128)", o.group));
    if (o.input.empty() || o.output.empty()) throw Error("convert: input and output paths are required");

    Checkpoint ck = read_checkpoint(o.input, o.tokenizer);
    Config& c = ck.cfg;
    // A tokenizer.json given as --tokenizer is stored under its own name, as the readers' are.
    if (ck.tokenizer_json.empty() && is_tokenizer_json(ck.tokenizer_model)) std::swap(ck.tokenizer_model, ck.tokenizer_json);
    {
        const bool json_tok = ck.tokenizer_model.empty();
        const std::string tok_where = o.input + (json_tok ? ": tokenizer.json" : ": tokenizer.model");
        Tokenizer tok(json_tok ? ck.tokenizer_json : ck.tokenizer_model, o.tokenizer.empty() ? tok_where : o.tokenizer);
        if (tok.vocab_size() > c.vocab_size)
            throw Error(fmt("%s: the tokenizer has %d pieces but the model's vocabulary is %d", o.input.c_str(),
                            tok.vocab_size(), c.vocab_size));
        if (c.bos_id < 0) c.bos_id = tok.bos_id();
        if (c.eos_id < 0) c.eos_id = tok.eos_id();
        // The loader refuses a model.bin without both (Config::from_json): refuse to write one.
        if (c.bos_id < 0 || c.bos_id >= c.vocab_size || c.eos_id < 0 || c.eos_id >= c.vocab_size)
            throw Error(fmt("%s: BOS id %d and EOS id %d (from the checkpoint's config, else its tokenizer; -1: "
                            "none) must be token ids below vocab_size %d", o.input.c_str(), c.bos_id, c.eos_id,
                            c.vocab_size));
    }

    // auto keeps the source's float type, read off the embedding (norms may differ in HF files).
    const DType dtype = mode_dtype.value_or(ck.tensors.at("tok_embeddings.weight").dtype);
    std::string quantization = int8 ? "int8" : int4 ? fmt("int4-g%d", o.group) : "none";
    SafetensorsWriter w;
    w.metadata = {{"format", kFormatName}, {"version", kFormatVersion}, {"config", c.to_json()},
                  {"quantization", quantization}};
    ConvertStats st;
    const std::vector<TensorSpec> expected = model_tensors(c);
    std::vector<std::shared_ptr<QuantJob>> jobs;
    std::map<std::string, int> ggml_counts;  // GGUF block types written as they are, matrices of each
    bool kept = false;                       // a model.bin's quantized matrices written as they are
    size_t n_tensors = expected.size() + 1;
    for (const TensorSpec& e : expected) {
        auto it = ck.tensors.find(e.name);
        assert(it != ck.tensors.end() && "every reader fills every canonical tensor");
        const SourceTensor src = it->second;
        if (o.mode == "auto" && src.quant.data) {  // a model.bin's quantized matrix, kept as it is
            for (const TensorView* t : src.stored) w.add_bytes(t->name, t->dtype, t->shape, t->data);
            n_tensors += src.stored.size() - 1;
            kept = true;
            continue;
        }
        if (o.mode == "auto" && src.ggml_type >= 0 && e.shape.size() == 2) {  // GGUF blocks, kept as they are
            n_tensors += add_ggml_matrix(w, e.name, e.shape, src);
            ggml_counts[ggml_type_name(uint32_t(src.ggml_type))]++;
            continue;
        }
        const bool embedding = e.name == "tok_embeddings.weight" || e.name == "output.weight";
        // The MoE router stays float: it is tiny and its logits pick the experts.
        const bool router = ends_with(e.name, "feed_forward.gate.weight");
        if ((int8 || int4) && e.shape.size() == 2 && !router && (!embedding || o.quantize_embeddings)) {
            auto j = std::make_shared<QuantJob>();
            j->src = src;
            j->shape = e.shape;
            j->int4 = int4;
            j->group = o.group;
            const int64_t rows = e.shape[0], cols = e.shape[1];
            if (int4 && cols % o.group != 0) {
                if (!o.int8_fallback)
                    throw Error(fmt("%s: tensor '%s' [%lld, %lld]: %lld columns are not a multiple of the int4 "
                                    "group size %d (try another --groupsize, or --int8-fallback to store such "
                                    "tensors as int8)", o.input.c_str(), e.name.c_str(), (long long)rows,
                                    (long long)cols, (long long)cols, o.group));
                j->int4 = false;  // int8 fallback: the loader reads each matrix's format off its dtype
            }
            jobs.push_back(j);
            auto* errors = &st.rel_errors;
            const std::string name = e.name;
            st.source_matrix_bytes += size_t(rows * cols) * 4;
            if (j->int4) {
                const int64_t gs = cols / o.group;
                w.add(e.name, DType::U8, {rows, cols / 2}, [j, errors, name](uint8_t* dst) { quantize_into(*j, dst, errors, name); });
                w.add(e.name + ".scales", DType::F32, {rows, gs}, [j](uint8_t* dst) {
                    std::memcpy(dst, j->scales.data(), j->scales.size() * sizeof(float));
                });
                w.add(e.name + ".mins", DType::F32, {rows, gs}, [j](uint8_t* dst) {
                    std::memcpy(dst, j->mins.data(), j->mins.size() * sizeof(float));
                    *j = QuantJob();  // done with this matrix: free its scratch
                });
                st.quant_matrix_bytes += size_t(rows * cols / 2 + rows * gs * 8);
                n_tensors += 2;
            } else {
                w.add(e.name, DType::I8, {rows, cols}, [j, errors, name](uint8_t* dst) { quantize_into(*j, dst, errors, name); });
                w.add(e.name + ".scales", DType::F32, {rows}, [j](uint8_t* dst) {
                    std::memcpy(dst, j->scales.data(), j->scales.size() * sizeof(float));
                    *j = QuantJob();
                });
                st.quant_matrix_bytes += size_t(rows * cols + rows * 4);
                n_tensors += 1;
            }
            continue;
        }
        const DType to = is_norm(e.name) || router ? DType::F32 : ck.keep_dtypes && !mode_dtype ? src.dtype : dtype;
        w.add(e.name, to, e.shape, [src, shape = e.shape, to](uint8_t* dst) { fill_tensor(src, shape, to, dst); });
    }
    if (!ck.tokenizer_model.empty())
        w.add_bytes("tokenizer.model", DType::U8, {int64_t(ck.tokenizer_model.size())}, ck.tokenizer_model.data());
    else
        w.add_bytes("tokenizer.json", DType::U8, {int64_t(ck.tokenizer_json.size())}, ck.tokenizer_json.data());
    for (const auto& [key, value] : ck.metadata) w.metadata[key] = value;
    if (kept) {
        quantization = ck.quantization;
        w.metadata["quantization"] = quantization;
    }
    if (!ggml_counts.empty()) {  // "gguf-Q4_1+Q8_0": the block types kept, the most used first
        std::vector<std::pair<int, std::string>> by_count;
        for (const auto& [type, count] : ggml_counts) by_count.push_back({-count, type});
        std::sort(by_count.begin(), by_count.end());
        quantization = "gguf";
        for (size_t i = 0; i < by_count.size(); i++) quantization += (i ? "+" : "-") + by_count[i].second;
        w.metadata["quantization"] = quantization;
    }

    if (o.progress)
        std::fprintf(stderr, "%s: %s checkpoint: dim %d, hidden %d, %d layers, %d heads (%d kv, head_dim %d)%s, "
                             "vocab %d, seq_len %d, %s; writing %s matrices\n", o.input.c_str(), ck.kind.c_str(), c.dim,
                     c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim,
                     c.n_experts ? fmt(", %d experts (top %d)", c.n_experts, c.n_experts_per_tok).c_str() : "", c.vocab_size,
                     c.max_seq_len, c.tie_embeddings ? "tied" : "untied",
                     int8 || int4 || kept || !ggml_counts.empty()
                         ? (quantization + " (other matrices " + (ck.keep_dtypes && !mode_dtype ? "as in the file" : dtype_name(dtype)) + ")").c_str()
                         : dtype_name(dtype));
    w.write(o.output, o.progress);

    st.kind = ck.kind;
    st.dtype = int8 || int4 || kept || !ggml_counts.empty() ? quantization : std::string(dtype_name(dtype));
    st.tensors = n_tensors;
    struct stat sb;
    st.bytes = stat(o.output.c_str(), &sb) == 0 ? size_t(sb.st_size) : 0;
    st.seconds = now_seconds() - t0;
    return st;
}
