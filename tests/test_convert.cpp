// tests/test_convert.cpp: the checkpoint converter: llama2.c, Hugging Face (single file and sharded)
// and model.bin inputs give model.bin tensors equal to the source weights; bad inputs name the problem.
#include <doctest/doctest.h>
#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "common.h"
#include "convert.h"
#include "test_util.h"

using json = nlohmann::json;

namespace {

std::string tok_path() { return models_dir() + "/tok512.model"; }

// A fresh folder under the run's temp dir.
std::string make_dir(const std::string& name) {
    std::string d = temp_dir() + "/convert-" + name;
    ::mkdir(d.c_str(), 0755);
    return d;
}

ConvertOptions options(const std::string& in, const std::string& out, const std::string& tok,
                       const std::string& mode = "auto") {
    ConvertOptions o;
    o.input = in;
    o.output = out;
    o.tokenizer = tok;
    o.mode = mode;
    o.progress = false;
    return o;
}

const char* kLayerOrder[] = {"attention_norm.weight", "attention.wq.weight", "attention.wk.weight",
                             "attention.wv.weight", "attention.wo.weight", "ffn_norm.weight",
                             "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight"};

// A llama2.c checkpoint of tw: legacy (7 int32, f32 tensors, RoPE tables, classifier if untied)
// or version 1 (256-byte header with magic, norms first, no RoPE tables).
std::string llama2c_bytes(const TinyWeights& tw, int version) {
    const Config& c = tw.cfg;
    std::string b;
    auto put = [&](const void* p, size_t n) { b.append(static_cast<const char*>(p), n); };
    auto put_tensor = [&](const std::string& name) {
        const std::vector<float>& v = tw.get(name);
        put(v.data(), v.size() * sizeof(float));
    };
    auto put_layers = [&](const char* what) {
        for (int l = 0; l < c.n_layers; l++) put_tensor(layer_tensor(l, what));
    };
    if (version == 0) {
        int32_t h[7] = {c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads,
                        c.tie_embeddings ? c.vocab_size : -c.vocab_size, c.max_seq_len};
        put(h, sizeof h);
        put_tensor("tok_embeddings.weight");
        for (const char* what : kLayerOrder) put_layers(what);
        put_tensor("norm.weight");
        std::vector<float> freqs(size_t(c.max_seq_len) * size_t(c.head_dim / 2), 0.25f);  // ignored
        put(freqs.data(), freqs.size() * sizeof(float));
        put(freqs.data(), freqs.size() * sizeof(float));
    } else {
        int32_t h[9] = {0x616b3432, 1, c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size,
                        c.max_seq_len};
        put(h, sizeof h);
        b.push_back(char(c.tie_embeddings));
        b.resize(256, '\0');
        put_layers("attention_norm.weight");
        put_layers("ffn_norm.weight");
        put_tensor("norm.weight");
        put_tensor("tok_embeddings.weight");
        for (const char* what : {"attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                                 "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
                                 "feed_forward.w3.weight"})
            put_layers(what);
    }
    if (!c.tie_embeddings) put_tensor("output.weight");
    return b;
}

// Meta -> HF rotate-half row order, as HF's convert_llama_weights_to_hf.py does:
// w.view(n_heads, hd/2, 2, in).transpose(1, 2).reshape(out, in).
std::vector<float> permute_rotate_half(const std::vector<float>& w, int n_heads, size_t rows, size_t cols) {
    std::vector<float> out(w.size());
    size_t hd = rows / size_t(n_heads), half = hd / 2;
    for (size_t h = 0; h < size_t(n_heads); h++)
        for (size_t i = 0; i < half; i++)
            for (size_t a = 0; a < 2; a++)
                std::memcpy(&out[(h * hd + a * half + i) * cols], &w[(h * hd + 2 * i + a) * cols],
                            cols * sizeof(float));
    return out;
}

struct HfOptions {
    DType dtype = DType::F32;  // every tensor, norms included, as real bf16 checkpoints are
    int shards = 1;            // > 1: model-0000k-of-0000n.safetensors plus the index json
    std::string drop;          // an HF tensor to leave out
    std::string bad_shape;     // an HF tensor to store with rows and columns swapped
    std::string extra;         // an extra HF tensor (a bias) the converter has no place for
    std::string config_patch;  // JSON merged into config.json
};

// tw as a Hugging Face folder: config.json, safetensors (HF names, q/k permuted), tokenizer.model.
void write_hf(const TinyWeights& tw, const std::string& dir, const HfOptions& o = {}) {
    const Config& c = tw.cfg;
    json cfg = {{"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"}, {"hidden_act", "silu"},
                {"hidden_size", c.dim}, {"intermediate_size", c.hidden_dim},
                {"num_hidden_layers", c.n_layers}, {"num_attention_heads", c.n_heads},
                {"num_key_value_heads", c.n_kv_heads}, {"vocab_size", c.vocab_size},
                {"max_position_embeddings", c.max_seq_len}, {"rms_norm_eps", c.norm_eps},
                {"rope_theta", c.rope_theta}, {"tie_word_embeddings", c.tie_embeddings},
                {"bos_token_id", 1}, {"eos_token_id", 2}, {"torch_dtype", "float32"}};
    if (c.n_experts > 0) {  // Mixtral: intermediate_size is each expert's width
        cfg["architectures"] = {"MixtralForCausalLM"};
        cfg["model_type"] = "mixtral";
        cfg["num_local_experts"] = c.n_experts;
        cfg["num_experts_per_tok"] = c.n_experts_per_tok;
        cfg["sliding_window"] = nullptr;
        cfg["router_aux_loss_coef"] = 0.02;
    }
    if (!o.config_patch.empty()) cfg.merge_patch(json::parse(o.config_patch));
    write_bytes(dir + "/config.json", cfg.dump(2));
    write_bytes(dir + "/tokenizer.model", read_file(tok_path()));

    // (HF name, canonical name, rope heads) in HF's usual order.
    struct Item { std::string hf, ours; int rope; };
    std::vector<Item> items = {{"model.embed_tokens.weight", "tok_embeddings.weight", 0}};
    const char* theirs[] = {"input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                            "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                            "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.down_proj.weight",
                            "mlp.up_proj.weight"};
    for (int l = 0; l < c.n_layers; l++) {
        for (int k = 0; k < (c.n_experts > 0 ? 6 : 9); k++)
            items.push_back({fmt("model.layers.%d.%s", l, theirs[k]), layer_tensor(l, kLayerOrder[k]),
                             k == 1 ? c.n_heads : k == 2 ? c.n_kv_heads : 0});
        if (c.n_experts > 0) {  // HF Mixtral's block_sparse_moe: w1 gate, w2 down, w3 up
            items.push_back({fmt("model.layers.%d.block_sparse_moe.gate.weight", l),
                             layer_tensor(l, "feed_forward.gate.weight"), 0});
            for (int e = 0; e < c.n_experts; e++)
                for (const char* w : {"w1", "w2", "w3"})
                    items.push_back({fmt("model.layers.%d.block_sparse_moe.experts.%d.%s.weight", l, e, w),
                                     expert_tensor(l, e, w), 0});
        }
    }
    items.push_back({"model.norm.weight", "norm.weight", 0});
    // Tied HF checkpoints often still carry lm_head.weight (a copy); the converter must ignore it.
    items.push_back({"lm_head.weight", c.tie_embeddings ? "tok_embeddings.weight" : "output.weight", 0});

    std::vector<SafetensorsWriter> writers(size_t(o.shards));
    std::vector<std::string> files;
    for (int s = 0; s < o.shards; s++)
        files.push_back(o.shards == 1 ? "model.safetensors" : fmt("model-%05d-of-%05d.safetensors", s + 1, o.shards));
    json weight_map = json::object();
    std::vector<std::shared_ptr<std::vector<float>>> keep;  // data must outlive write()
    size_t k = 0;
    auto add = [&](const std::string& hf, std::vector<float> v, std::vector<int64_t> shape) {
        auto data = std::make_shared<std::vector<float>>(std::move(v));
        keep.push_back(data);
        size_t s = (k++) % size_t(o.shards);
        DType t = o.dtype;
        writers[s].add(hf, t, shape, [data, t](uint8_t* dst) {
            convert_floats(data->data(), DType::F32, dst, t, data->size());
        });
        weight_map[hf] = files[s];
    };
    for (const Item& it : items) {
        if (it.hf == o.drop) continue;
        std::vector<int64_t> shape = tw.shape_of(it.ours);
        std::vector<float> v = tw.get(it.ours);
        if (it.rope) v = permute_rotate_half(v, it.rope, size_t(shape[0]), size_t(shape[1]));
        if (it.hf == o.bad_shape) std::swap(shape[0], shape[1]);
        add(it.hf, std::move(v), shape);
    }
    if (!o.extra.empty()) add(o.extra, std::vector<float>(size_t(c.dim), 0.0f), {c.dim});
    for (int s = 0; s < o.shards; s++) writers[size_t(s)].write(dir + "/" + files[size_t(s)]);
    if (o.shards > 1) {
        json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}};
        write_bytes(dir + "/model.safetensors.index.json", index.dump(2));
    }
}

// `v` as stored in a checkpoint of dtype `src` (F32: unchanged), then as f32 again.
std::vector<float> round_through(const std::vector<float>& v, DType src) {
    if (src == DType::F32) return v;
    std::vector<uint16_t> h(v.size());
    convert_floats(v.data(), DType::F32, h.data(), src, v.size());
    std::vector<float> out(v.size());
    convert_floats(h.data(), src, out.data(), DType::F32, v.size());
    return out;
}

// Every tensor of the model.bin at `path` equals tw's: first stored as `src` (the checkpoint's
// dtype), then converted to `dtype` (norms: f32), bit for bit. Checks the metadata and config too.
void check_model_bin(const std::string& path, const TinyWeights& tw, DType dtype, DType src = DType::F32) {
    SafetensorsFile f(path);
    CHECK(f.metadata.at("format") == kFormatName);
    CHECK(f.metadata.at("version") == kFormatVersion);
    CHECK(f.metadata.at("quantization") == "none");
    Config c = Config::from_json(f.metadata.at("config"), path);
    const Config& e = tw.cfg;
    CHECK(c.dim == e.dim);
    CHECK(c.hidden_dim == e.hidden_dim);
    CHECK(c.n_layers == e.n_layers);
    CHECK(c.n_heads == e.n_heads);
    CHECK(c.n_kv_heads == e.n_kv_heads);
    CHECK(c.head_dim == e.head_dim);
    CHECK(c.vocab_size == e.vocab_size);
    CHECK(c.max_seq_len == e.max_seq_len);
    CHECK(c.tie_embeddings == e.tie_embeddings);
    CHECK(c.norm_eps == doctest::Approx(1e-5));
    CHECK(c.rope_theta == 10000.0f);
    CHECK(c.bos_id == 1);
    CHECK(c.eos_id == 2);

    CHECK(f.tensors.size() == tw.tensors.size() + 1);
    for (const auto& [name, v] : tw.tensors) {
        const TensorView& t = f.get(name, tw.shape_of(name));
        DType want = name.find("norm") != std::string::npos ? DType::F32 : dtype;
        CHECK_MESSAGE(t.dtype == want, name);
        std::vector<float> x = round_through(v, src);
        std::vector<uint8_t> expect(x.size() * dtype_size(want));
        convert_floats(x.data(), DType::F32, expect.data(), want, x.size());
        REQUIRE(t.nbytes == expect.size());
        CHECK_MESSAGE(std::memcmp(t.data, expect.data(), expect.size()) == 0, name);
    }
    const TensorView& tok = f.get("tokenizer.model");
    CHECK(tok.dtype == DType::U8);
    CHECK(std::string(reinterpret_cast<const char*>(tok.data), tok.nbytes) == read_file(tok_path()));
}

// Two model.bin files hold the same config and the same tensors, byte for byte.
void check_same_tensors(const std::string& a_path, const std::string& b_path) {
    SafetensorsFile a(a_path), b(b_path);
    CHECK(a.metadata == b.metadata);
    CHECK(a.tensors.size() == b.tensors.size());
    for (const auto& [name, t] : a.tensors) {
        const TensorView* u = b.find(name);
        REQUIRE_MESSAGE(u, name);
        CHECK_MESSAGE((t.dtype == u->dtype && t.shape == u->shape && t.nbytes == u->nbytes), name);
        if (t.nbytes == u->nbytes) CHECK_MESSAGE(std::memcmp(t.data, u->data, t.nbytes) == 0, name);
    }
}

// GQA (4 heads, 2 kv heads, head_dim 8), two layers; untied unless asked.
TinyWeights tiny(bool tied = false) { return random_weights(tiny_config(32, 48, 2, 4, 2, tied), 7); }

// The inverse of permute_rotate_half: HF rotate-half row order back to Meta's interleaved order.
std::vector<float> unpermute_rotate_half(const std::vector<float>& w, int n_heads, size_t rows, size_t cols) {
    std::vector<float> out(w.size());
    size_t hd = rows / size_t(n_heads), half = hd / 2;
    for (size_t h = 0; h < size_t(n_heads); h++)
        for (size_t i = 0; i < half; i++)
            for (size_t a = 0; a < 2; a++)
                std::memcpy(&out[(h * hd + 2 * i + a) * cols], &w[(h * hd + a * half + i) * cols],
                            cols * sizeof(float));
    return out;
}

// Logits at every position of `tokens`, the whole sequence as one prefill batch on the CPU.
std::vector<float> all_logits(const std::string& model_bin, const std::vector<int>& tokens) {
    Model m(model_bin, cpu_ops(0));
    return prefill_logits(m, tokens);
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
    REQUIRE(a.size() == b.size());
    double d = 0;
    for (size_t i = 0; i < a.size(); i++) d = std::max(d, std::fabs(double(a[i]) - b[i]));
    return d;
}

}  // namespace

TEST_SUITE("convert") {

TEST_CASE("llama2.c legacy and version 1 files convert to the same tensors") {
    for (bool tied : {false, true}) {
        CAPTURE(tied);
        TinyWeights tw = tiny(tied);
        std::string d = make_dir(tied ? "l2c-tied" : "l2c-untied");
        write_bytes(d + "/legacy.bin", llama2c_bytes(tw, 0));
        write_bytes(d + "/v1.bin", llama2c_bytes(tw, 1));
        ConvertStats st = convert_checkpoint(options(d + "/legacy.bin", d + "/a.bin", tok_path()));
        CHECK(st.tensors == tw.tensors.size() + 1);
        CHECK(st.dtype == "F32");
        CHECK(st.bytes > 0);
        check_model_bin(d + "/a.bin", tw, DType::F32);
        convert_checkpoint(options(d + "/v1.bin", d + "/b.bin", tok_path()));
        check_same_tensors(d + "/a.bin", d + "/b.bin");
    }
}

TEST_CASE("llama2.c to bf16 and f16: rounded to nearest, norms kept f32") {
    TinyWeights tw = tiny();
    std::string d = make_dir("l2c-half");
    write_bytes(d + "/in.bin", llama2c_bytes(tw, 0));
    for (DType t : {DType::BF16, DType::F16}) {
        CAPTURE(dtype_name(t));
        std::string out = d + "/" + dtype_name(t) + ".bin";
        convert_checkpoint(options(d + "/in.bin", out, tok_path(), t == DType::BF16 ? "bf16" : "f16"));
        check_model_bin(out, tw, t);
        // And independently of convert_floats: within half an ulp of the original.
        SafetensorsFile f(out);
        const TensorView& wq = f.get(layer_tensor(1, "attention.wq.weight"));
        const std::vector<float>& x = tw.get(layer_tensor(1, "attention.wq.weight"));
        const uint16_t* h = reinterpret_cast<const uint16_t*>(wq.data);
        double rel = t == DType::BF16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);
        for (size_t i = 0; i < x.size(); i++) {
            float y = t == DType::BF16 ? bf16_to_f32(h[i]) : f16_to_f32(h[i]);
            REQUIRE(std::fabs(double(y) - x[i]) <= std::fabs(x[i]) * rel + std::ldexp(1.0, -25));
        }
    }
}

TEST_CASE("Hugging Face folder (single file and sharded) equals the llama2.c path") {
    for (bool tied : {false, true}) {
        CAPTURE(tied);
        TinyWeights tw = tiny(tied);
        std::string d = make_dir(tied ? "hf-tied" : "hf-untied");
        write_bytes(d + "/l2c.bin", llama2c_bytes(tw, 0));
        convert_checkpoint(options(d + "/l2c.bin", d + "/from_l2c.bin", tok_path()));

        std::string single = make_dir(tied ? "hf-single-tied" : "hf-single-untied");
        write_hf(tw, single);
        // No --tokenizer: the folder's tokenizer.model is used.
        convert_checkpoint(options(single, d + "/from_hf.bin", ""));
        check_model_bin(d + "/from_hf.bin", tw, DType::F32);
        check_same_tensors(d + "/from_l2c.bin", d + "/from_hf.bin");

        std::string sharded = make_dir(tied ? "hf-sharded-tied" : "hf-sharded-untied");
        HfOptions o;
        o.shards = 3;
        write_hf(tw, sharded, o);
        convert_checkpoint(options(sharded, d + "/from_shards.bin", ""));
        check_same_tensors(d + "/from_l2c.bin", d + "/from_shards.bin");
    }
}

TEST_CASE("Hugging Face bf16 checkpoint: auto keeps bf16, q/k un-permuted in bf16") {
    TinyWeights tw = tiny();
    std::string d = make_dir("hf-bf16");
    HfOptions o;
    o.dtype = DType::BF16;
    write_hf(tw, d, o);
    convert_checkpoint(options(d, d + "/auto.bin", ""));
    check_model_bin(d + "/auto.bin", tw, DType::BF16, DType::BF16);
    convert_checkpoint(options(d, d + "/f32.bin", "", "f32"));
    check_model_bin(d + "/f32.bin", tw, DType::F32, DType::BF16);
}

TEST_CASE("Hugging Face Mixtral folder converts to the canonical MoE model.bin") {
    Config c = tiny_config(32, 48, 2, 4, 2, false);
    c.n_experts = 4;
    c.n_experts_per_tok = 2;
    TinyWeights tw = random_weights(c, 11);
    std::string d = make_dir("hf-mixtral");
    write_model_bin(tw, d + "/canonical.bin", DType::F32);
    std::string hf = make_dir("hf-mixtral-src");
    HfOptions o;
    o.shards = 2;
    write_hf(tw, hf, o);
    convert_checkpoint(options(hf, d + "/from_hf.bin", ""));
    check_same_tensors(d + "/canonical.bin", d + "/from_hf.bin");
    std::vector<int> tokens = {1, 7, 99, 300, 5, 42, 17, 256, 511, 3};
    CHECK(max_abs_diff(all_logits(d + "/from_hf.bin", tokens), all_logits(d + "/canonical.bin", tokens)) == 0);

    // bf16 checkpoint: experts stay bf16, the router is widened to f32.
    std::string hf16 = make_dir("hf-mixtral-bf16");
    o.dtype = DType::BF16;
    write_hf(tw, hf16, o);
    convert_checkpoint(options(hf16, d + "/bf16.bin", ""));
    SafetensorsFile f(d + "/bf16.bin");
    CHECK(f.get("layers.1.feed_forward.gate.weight").dtype == DType::F32);
    CHECK(f.get("layers.1.feed_forward.experts.3.w2.weight").dtype == DType::BF16);
    CHECK(Config::from_json(f.metadata.at("config"), "bf16.bin").n_experts == 4);
}

TEST_CASE("HF config: head_dim and token ids from config.json, defaults from the tokenizer") {
    TinyWeights tw = tiny();
    std::string d = make_dir("hf-config");
    HfOptions o;
    // Explicit head_dim equal to the default; Llama 3 style eos list; bos from the tokenizer.
    o.config_patch = R"({"head_dim": 8, "eos_token_id": [2, 7], "bos_token_id": null})";
    write_hf(tw, d, o);
    convert_checkpoint(options(d, d + "/out.bin", ""));
    check_model_bin(d + "/out.bin", tw, DType::F32);
}

TEST_CASE("HF config: Llama 3.1 rope_scaling is kept, other kinds refused") {
    TinyWeights tw = tiny();
    std::string d = make_dir("hf-rope-llama3");
    HfOptions o;
    o.config_patch = R"({"rope_theta": 500000.0, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"}})";
    write_hf(tw, d, o);
    convert_checkpoint(options(d, d + "/out.bin", ""));
    SafetensorsFile f(d + "/out.bin");
    Config c = Config::from_json(f.metadata.at("config"), "out.bin");
    CHECK(c.rope_theta == 500000.0f);
    CHECK(c.rope_factor == 8.0f);
    CHECK(c.rope_low_freq_factor == 1.0f);
    CHECK(c.rope_high_freq_factor == 4.0f);
    CHECK(c.rope_original_max_seq_len == 8192);

    // The chat template of tokenizer_config.json travels as metadata.
    CHECK(f.metadata.count("chat_template") == 0);
    d = make_dir("hf-chat-template");
    write_hf(tw, d, HfOptions());
    write_bytes(d + "/tokenizer_config.json", R"({"chat_template": "{{ '<|im_start|>' + message['content'] }}"})");
    convert_checkpoint(options(d, d + "/out.bin", ""));
    CHECK(SafetensorsFile(d + "/out.bin").metadata.at("chat_template") == "{{ '<|im_start|>' + message['content'] }}");
    CHECK(Model(d + "/out.bin", cpu_ops(1)).chat_template == "{{ '<|im_start|>' + message['content'] }}");

    d = make_dir("hf-rope-linear");
    o.config_patch = R"({"rope_scaling": {"factor": 2.0, "type": "linear"}})";
    write_hf(tw, d, o);
    std::string msg = convert_error(options(d, d + "/out.bin", ""));
    CHECK_MESSAGE(has(msg, "rope_scaling"), msg);
    CHECK_MESSAGE(has(msg, "linear"), msg);
}

TEST_CASE("model.bin input re-encodes to the chosen dtype") {
    TinyWeights tw = tiny();
    std::string d = make_dir("modelbin");
    write_bytes(d + "/in.bin", llama2c_bytes(tw, 0));
    convert_checkpoint(options(d + "/in.bin", d + "/f32.bin", tok_path()));
    convert_checkpoint(options(d + "/in.bin", d + "/bf16_direct.bin", tok_path(), "bf16"));
    convert_checkpoint(options(d + "/f32.bin", d + "/bf16_again.bin", "", "bf16"));
    check_same_tensors(d + "/bf16_direct.bin", d + "/bf16_again.bin");
    convert_checkpoint(options(d + "/f32.bin", d + "/f32_again.bin", ""));
    check_same_tensors(d + "/f32.bin", d + "/f32_again.bin");
    // bf16 -> f32 -> bf16 is lossless, so the round trip lands on the same bytes.
    convert_checkpoint(options(d + "/bf16_again.bin", d + "/widened.bin", "", "f32"));
    convert_checkpoint(options(d + "/widened.bin", d + "/narrowed.bin", "", "bf16"));
    check_same_tensors(d + "/bf16_direct.bin", d + "/narrowed.bin");
    // Also a model.bin written by the test helper.
    write_model_bin(tw, d + "/helper.bin", DType::F32);
    convert_checkpoint(options(d + "/helper.bin", d + "/helper_bf16.bin", "", "bf16"));
    check_model_bin(d + "/helper_bf16.bin", tw, DType::BF16);
}

TEST_CASE("stories260K.bin converts with tok512.model") {
    std::string in = models_dir() + "/stories260K.bin", out = make_dir("stories") + "/model.bin";
    ConvertStats st = convert_checkpoint(options(in, out, tok_path()));
    CHECK(st.kind == "llama2.c legacy");
    CHECK(st.tensors == 1 + 5 * 9 + 1 + 1);
    SafetensorsFile f(out);
    Config c = Config::from_json(f.metadata.at("config"), out);
    CHECK(c.dim == 64);
    CHECK(c.hidden_dim == 172);
    CHECK(c.n_layers == 5);
    CHECK(c.n_heads == 8);
    CHECK(c.n_kv_heads == 4);
    CHECK(c.head_dim == 8);
    CHECK(c.vocab_size == 512);
    CHECK(c.max_seq_len == 512);
    CHECK(c.tie_embeddings);
    CHECK(c.bos_id == 1);
    CHECK(c.eos_id == 2);
    CHECK(f.find("output.weight") == nullptr);
    // The embedding is the first tensor in the file, right after the 28-byte header.
    std::string raw = read_file(in);
    const TensorView& emb = f.get("tok_embeddings.weight", {512, 64});
    CHECK(std::memcmp(emb.data, raw.data() + 28, emb.nbytes) == 0);
    // The final norm sits just before the two RoPE tables (512 x 4 floats each).
    const TensorView& norm = f.get("norm.weight", {64});
    CHECK(std::memcmp(norm.data, raw.data() + raw.size() - 2 * 512 * 4 * 4 - 64 * 4, norm.nbytes) == 0);
}

TEST_CASE("bad llama2.c inputs are refused with a message that names the problem") {
    TinyWeights tw = tiny();
    std::string d = make_dir("l2c-bad");
    std::string bytes = llama2c_bytes(tw, 0);

    write_bytes(d + "/short.bin", bytes.substr(0, bytes.size() - 4));
    std::string msg = convert_error(options(d + "/short.bin", d + "/out.bin", tok_path()));
    CHECK_MESSAGE(has(msg, d + "/short.bin"), msg);
    CHECK_MESSAGE(has(msg, "truncated"), msg);
    CHECK_MESSAGE(has(msg, std::to_string(bytes.size())), msg);
    CHECK_MESSAGE(has(msg, std::to_string(bytes.size() - 4)), msg);

    write_bytes(d + "/ok.bin", bytes);
    msg = convert_error(options(d + "/ok.bin", d + "/out.bin", ""));
    CHECK_MESSAGE(has(msg, "--tokenizer"), msg);

    std::string heads = bytes;  // n_heads 3 does not divide dim 32
    int32_t three = 3;
    std::memcpy(&heads[12], &three, 4);
    write_bytes(d + "/heads.bin", heads);
    msg = convert_error(options(d + "/heads.bin", d + "/out.bin", tok_path()));
    CHECK_MESSAGE(has(msg, "not divisible by n_heads 3"), msg);

    write_bytes(d + "/text.bin", "hello, this is not a checkpoint at all\n");
    msg = convert_error(options(d + "/text.bin", d + "/out.bin", tok_path()));
    CHECK_MESSAGE(has(msg, "unknown input kind"), msg);

    msg = convert_error(options(d + "/ok.bin", d + "/out.bin", tok_path(), "int3"));
    CHECK_MESSAGE(has(msg, "int3"), msg);

    msg = convert_error(options(d + "/ok.bin", d + "/out.bin", models_dir() + "/stories260K.bin"));
    CHECK_MESSAGE(has(msg, "not a sentencepiece model"), msg);

    // Found by fuzzing (UBSan): vocab_size INT_MIN overflowed std::abs in the header check.
    std::string vocab = bytes;
    int32_t most_negative = INT32_MIN;
    std::memcpy(&vocab[20], &most_negative, 4);
    write_bytes(d + "/vocab.bin", vocab);
    msg = convert_error(options(d + "/vocab.bin", d + "/out.bin", tok_path()));
    CHECK_MESSAGE(has(msg, "unknown input kind"), msg);

    // Found by fuzzing: a model.bin cut inside its header was "unknown input kind"; the safetensors
    // reader names the length that no longer fits.
    write_model_bin(tw, d + "/model.bin", DType::F32);
    write_bytes(d + "/cut.bin", read_file(d + "/model.bin").substr(0, 100));
    msg = convert_error(options(d + "/cut.bin", d + "/out.bin", ""));
    CHECK_MESSAGE(has(msg, "bad header length 4088 (file is 100 bytes)"), msg);

    struct stat st;
    CHECK(stat((d + "/out.bin").c_str(), &st) != 0);  // nothing written by any failure
}

TEST_CASE("int8 and int4 refuse a NaN or infinite weight, naming the tensor and the element; f32 copies it") {
    // Found by fuzzing (tests/data/fuzz/llama2c/regression-*): the float-to-int cast of a NaN is
    // undefined behaviour, and the file was written with a "relative error" of NaN.
    const std::string d = make_dir("l2c-nonfinite");
    const float bads[] = {std::nanf(""), INFINITY, -INFINITY};
    for (float bad : bads)
        for (const std::string mode : {"int8", "int4"}) {
            CAPTURE(bad);
            CAPTURE(mode);
            TinyWeights tw = tiny();
            const std::string name = layer_tensor(1, "attention.wq.weight");
            for (auto& [n, v] : tw.tensors)
                if (n == name) v[size_t(3 * tw.shape_of(name)[1] + 5)] = bad;
            write_bytes(d + "/bad.bin", llama2c_bytes(tw, 0));
            ConvertOptions o = options(d + "/bad.bin", d + "/out.bin", tok_path(), mode);
            o.int8_fallback = true;  // tiny()'s 48-wide w2 has no int4 groups of 32
            const std::string msg = convert_error(o);
            CHECK_MESSAGE(has(msg, name + ": element [3, 5] is " + (std::isnan(bad) ? "NaN" : "infinite")), msg);
            CHECK_MESSAGE(has(msg, mode), msg);
            struct stat st;
            CHECK(stat((d + "/out.bin").c_str(), &st) != 0);
            CHECK(stat((d + "/out.bin.tmp").c_str(), &st) != 0);
        }
    TinyWeights tw = tiny();
    for (auto& [n, v] : tw.tensors)
        if (n == layer_tensor(0, "attention.wq.weight")) v[7] = std::nanf("");
    write_bytes(d + "/bad.bin", llama2c_bytes(tw, 0));
    convert_checkpoint(options(d + "/bad.bin", d + "/out.bin", tok_path(), "f32"));
    SafetensorsFile f(d + "/out.bin");
    CHECK(std::isnan(reinterpret_cast<const float*>(f.get(layer_tensor(0, "attention.wq.weight")).data)[7]));
}

TEST_CASE("bad Hugging Face folders are refused with a message that names the problem") {
    TinyWeights tw = tiny();

    std::string d = make_dir("hf-no-config");
    write_hf(tw, d);
    std::remove((d + "/config.json").c_str());
    std::string msg = convert_error(options(d, d + "/out.bin", ""));
    CHECK_MESSAGE(has(msg, "config.json"), msg);

    d = make_dir("hf-missing");
    HfOptions o;
    o.drop = "model.layers.1.mlp.up_proj.weight";
    write_hf(tw, d, o);
    msg = convert_error(options(d, d + "/out.bin", ""));
    CHECK_MESSAGE(has(msg, "model.layers.1.mlp.up_proj.weight"), msg);
    CHECK_MESSAGE(has(msg, "missing"), msg);

    d = make_dir("hf-missing-sharded");
    o.shards = 2;
    write_hf(tw, d, o);
    msg = convert_error(options(d, d + "/out.bin", ""));
    CHECK_MESSAGE(has(msg, "model.layers.1.mlp.up_proj.weight"), msg);
    CHECK_MESSAGE(has(msg, "model.safetensors.index.json"), msg);

    // A shard is a file beside the index: an entry naming a folder (here one outside the model's)
    // is refused before anything is opened.
    d = make_dir("hf-shard-path");
    o = HfOptions();
    o.shards = 2;
    write_hf(tw, d, o);
    json index = json::parse(read_file(d + "/model.safetensors.index.json"));
    index["weight_map"]["model.embed_tokens.weight"] = "../hf-missing-sharded/model-00001-of-00002.safetensors";
    write_bytes(d + "/model.safetensors.index.json", index.dump());
    msg = convert_error(options(d, d + "/out.bin", ""));
    CHECK_MESSAGE(has(msg, "weight_map entry 'model.embed_tokens.weight' is \"../hf-missing-sharded/"), msg);
    CHECK_MESSAGE(has(msg, "not a file name in the folder"), msg);

    d = make_dir("hf-shape");
    o = HfOptions();
    o.bad_shape = "model.layers.0.self_attn.k_proj.weight";
    write_hf(tw, d, o);
    msg = convert_error(options(d, d + "/out.bin", ""));
    CHECK_MESSAGE(has(msg, "model.layers.0.self_attn.k_proj.weight"), msg);
    CHECK_MESSAGE(has(msg, "expected shape [16, 32], found [32, 16]"), msg);

    d = make_dir("hf-heads");
    o = HfOptions();
    o.config_patch = R"({"num_key_value_heads": 3})";
    write_hf(tw, d, o);
    msg = convert_error(options(d, d + "/out.bin", ""));
    CHECK_MESSAGE(has(msg, "config.json"), msg);
    CHECK_MESSAGE(has(msg, "not a multiple of n_kv_heads"), msg);

    d = make_dir("hf-no-key");
    o.config_patch = R"({"intermediate_size": null})";
    write_hf(tw, d, o);
    msg = convert_error(options(d, d + "/out.bin", ""));
    CHECK_MESSAGE(has(msg, "missing \"intermediate_size\""), msg);

    d = make_dir("hf-bias");
    o = HfOptions();
    o.extra = "model.layers.0.self_attn.q_proj.bias";
    write_hf(tw, d, o);
    msg = convert_error(options(d, d + "/out.bin", ""));
    CHECK_MESSAGE(has(msg, "model.layers.0.self_attn.q_proj.bias"), msg);
    CHECK_MESSAGE(has(msg, "unsupported architecture"), msg);

    d = make_dir("hf-moe");  // a MoE config over dense tensors: the experts are missing
    o = HfOptions();
    o.config_patch = R"({"num_local_experts": 8, "num_experts_per_tok": 2})";
    write_hf(tw, d, o);
    msg = convert_error(options(d, d + "/out.bin", ""));
    CHECK_MESSAGE(has(msg, "model.layers.0.block_sparse_moe.gate.weight"), msg);

    d = make_dir("hf-moe-no-k");
    o = HfOptions();
    o.config_patch = R"({"num_local_experts": 8})";
    write_hf(tw, d, o);
    msg = convert_error(options(d, d + "/out.bin", ""));
    CHECK_MESSAGE(has(msg, "num_experts_per_tok"), msg);

    d = make_dir("hf-moe-bad-k");
    o = HfOptions();
    o.config_patch = R"({"num_local_experts": 2, "num_experts_per_tok": 3})";
    write_hf(tw, d, o);
    msg = convert_error(options(d, d + "/out.bin", ""));
    CHECK_MESSAGE(has(msg, "n_experts_per_tok = 3 must be between 1 and n_experts = 2"), msg);

    // Found by fuzzing: a sliding_window beside a max_position_embeddings that is not a number
    // ended in an "internal" JSON type error instead of naming the key.
    d = make_dir("hf-window");
    o = HfOptions();
    o.config_patch = R"({"sliding_window": 4, "max_position_embeddings": "x"})";
    write_hf(tw, d, o);
    msg = convert_error(options(d, d + "/out.bin", ""));
    CHECK_MESSAGE(has(msg, "config.json: \"max_position_embeddings\" must be a positive integer, found \"x\""), msg);

    // Beyond float range (undefined to convert; inf in practice) is refused where it is read.
    d = make_dir("hf-eps");
    o.config_patch = R"({"rms_norm_eps": 1e300})";
    write_hf(tw, d, o);
    msg = convert_error(options(d, d + "/out.bin", ""));
    CHECK_MESSAGE(has(msg, "\"rms_norm_eps\" must be a positive number within float range, found 1e+300"), msg);

    // Found by fuzzing: a bos_token_id past the vocabulary was written into a model.bin that
    // generate then refused; refuse it at conversion, naming the key.
    d = make_dir("hf-bos");
    o.config_patch = R"({"bos_token_id": 600})";
    write_hf(tw, d, o);
    msg = convert_error(options(d, d + "/out.bin", ""));
    CHECK_MESSAGE(has(msg, "\"bos_token_id\" must be a token id below vocab_size 512, found 600"), msg);
    struct stat st;
    CHECK(stat((d + "/out.bin").c_str(), &st) != 0);

    // Found by fuzzing: a value nested 300000 levels deep overflowed the stack (SIGSEGV) when its
    // message quoted it; config.json is refused at the parse.
    d = make_dir("hf-deep");
    o.config_patch = "";
    write_hf(tw, d, o);
    write_bytes(d + "/config.json", "{\"hidden_size\": " + std::string(300000, '[') + std::string(300000, ']') + "}");
    msg = convert_error(options(d, d + "/out.bin", ""));
    CHECK_MESSAGE(has(msg, d + "/config.json: JSON nested deeper than 128 levels"), msg);

    d = make_dir("hf-no-weights");
    write_bytes(d + "/config.json", read_file(make_dir("hf-missing") + "/config.json"));
    msg = convert_error(options(d, d + "/out.bin", ""));
    CHECK_MESSAGE(has(msg, "model.safetensors"), msg);
}

TEST_CASE("llama2.c and Hugging Face copies of one model give the same logits; unpermuted q/k do not") {
    TinyWeights tw = tiny();
    std::string d = make_dir("logits");
    write_bytes(d + "/l2c.bin", llama2c_bytes(tw, 0));
    convert_checkpoint(options(d + "/l2c.bin", d + "/from_l2c.bin", tok_path()));
    std::string hf = make_dir("logits-hf");
    write_hf(tw, hf);  // q/k in HF's rotate-half order
    convert_checkpoint(options(hf, d + "/from_hf.bin", ""));

    std::vector<int> tokens = {1, 403, 407, 261, 378, 5, 77, 300, 12, 499, 42, 7, 256, 128, 64, 3, 9, 400, 1, 33};
    std::vector<float> a = all_logits(d + "/from_l2c.bin", tokens), b = all_logits(d + "/from_hf.bin", tokens);
    double scale = 0;
    for (float x : a) scale = std::max(scale, double(std::fabs(x)));
    REQUIRE(scale > 0.1);  // real logits, not all zeros
    CHECK(max_abs_diff(a, b) < 1e-6);

    // The same weights exported as HF without the rotate-half permutation (Meta order under HF
    // names): the converter's un-permute then scrambles q/k, and the logits must show it. Storing
    // the inverse-permuted q/k through write_hf (which permutes) leaves them in Meta order on disk.
    TinyWeights raw = tw;
    for (auto& [name, v] : raw.tensors) {
        bool is_q = name.find("attention.wq") != std::string::npos, is_k = name.find("attention.wk") != std::string::npos;
        if (!is_q && !is_k) continue;
        std::vector<int64_t> shape = raw.shape_of(name);
        v = unpermute_rotate_half(v, is_q ? raw.cfg.n_heads : raw.cfg.n_kv_heads, size_t(shape[0]), size_t(shape[1]));
    }
    std::string bad = make_dir("logits-hf-unpermuted");
    write_hf(raw, bad);
    convert_checkpoint(options(bad, d + "/from_bad_hf.bin", ""));
    std::vector<float> c = all_logits(d + "/from_bad_hf.bin", tokens);
    double diff = max_abs_diff(a, c);
    CHECK_MESSAGE(diff > 1e-3, "max |logit difference| without the rotate-half permutation: " << diff);
}

}  // TEST_SUITE
