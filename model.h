// model.h: Config, weights as views into the mapped model.bin, and forward() (over kv_cache.h's paged cache).
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kv_cache.h"
#include "ops.h"
#include "sampler.h"
#include "safetensors.h"
#include "tp.h"

// The model's blueprint; stored as JSON in model.bin's metadata under "config".
struct Config {
    int dim = 0;          // residual stream width
    int hidden_dim = 0;   // FFN inner width (of each expert in a MoE model)
    int n_layers = 0;
    int n_heads = 0;      // query heads
    int n_kv_heads = 0;   // key/value heads (GQA when < n_heads)
    int head_dim = 0;     // usually dim / n_heads
    int vocab_size = 0;
    int max_seq_len = 0;  // context length the model was trained for
    float norm_eps = 1e-5f;
    float rope_theta = 10000.0f;
    bool tie_embeddings = false;  // classifier shares tok_embeddings.weight
    int bos_id = 1;
    int eos_id = 2;
    // Mixture of experts (Mixtral): every layer's FFN is n_experts SwiGLU experts and a router that
    // sends each token to n_experts_per_tok of them. 0 = dense. JSON keys "n_experts" and
    // "n_experts_per_tok", written only when n_experts > 0 (dense files stay as before).
    int n_experts = 0;
    int n_experts_per_tok = 0;
    // Llama 3.1 RoPE scaling (HF "rope_type": "llama3"): wavelengths longer than
    // original_max_seq_len / low_freq_factor are stretched by `factor`, those shorter than
    // original_max_seq_len / high_freq_factor kept, a linear blend between. rope_factor 0 = none.
    // JSON: "rope_scaling": {"type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    // "original_max_seq_len"}, written only when scaled.
    float rope_factor = 0, rope_low_freq_factor = 1, rope_high_freq_factor = 4;
    int rope_original_max_seq_len = 0;

    // Radians per position of each rotated pair i < head_dim / 2: theta^(-2i/head_dim), scaled.
    std::vector<double> rope_frequencies() const;

    std::string to_json() const;
    // One of n tensor-parallel ranks' share: heads, KV heads and the FFN width (each expert's in a
    // MoE model) divided by n
    // (Error naming `where` when they do not divide).
    Config shard(int n, const std::string& where) const;
    // Parses and validates (positive sizes, divisibility); `where` names the source in errors.
    static Config from_json(const std::string& json, const std::string& where);
    void validate(const std::string& where) const;
};

// Config::validate refuses configs implying more tensors than this (model_tensors' length).
constexpr int64_t kMaxTensors = int64_t(1) << 18;

// model.bin metadata keys and the format version this build reads and writes.
constexpr const char* kFormatName = "fastgen";
constexpr const char* kFormatVersion = "1";

// Canonical tensor names in model.bin (Meta layout: RoPE rotates adjacent pairs).
std::string layer_tensor(int layer, const char* what);  // "layers.3.attention.wq.weight"
// Per layer: attention_norm, attention.wq/wk/wv/wo, ffn_norm, then the FFN:
//   dense: feed_forward.w1/w2/w3.weight                       [h, d], [d, h], [h, d]
//   MoE:   feed_forward.gate.weight                           [n_experts, d]  (router, kept float)
//          feed_forward.experts.{e}.w1/w2/w3.weight, e < n_experts   [h, d], [d, h], [h, d]
std::string expert_tensor(int layer, int expert, const char* w);  // "layers.3.feed_forward.experts.5.w1.weight"

struct TensorSpec {
    std::string name;
    std::vector<int64_t> shape;
};
// Every weight tensor of model.bin for `c`, in file order (the tokenizer.model blob not included).
// A quantized matrix NAME also has companions: NAME.scales, and NAME.zeros or NAME.mins (ops.h Weight).
std::vector<TensorSpec> model_tensors(const Config& c);

// Matrix NAME [rows, cols] of model.bin viewed in place, in the format its dtype and companion
// tensors say (F32/BF16/F16; I8 + .scales [rows] or [rows, cols/group]; U8 [rows, cols/2] + .scales
// and .zeros or .mins [rows, cols/group]). Checks every shape and dtype; Error names the tensor.
// Adds the number of companion tensors to *companions.
Weight load_matrix(const SafetensorsFile& f, const std::string& name, int rows, int cols, size_t* companions);

struct LayerWeights {
    const float* attn_norm = nullptr;  // [dim] f32, in the backend's memory (Model::norms_)
    Weight wq;                     // [n_heads*head_dim, dim]
    Weight wk;                     // [n_kv_heads*head_dim, dim]
    Weight wv;                     // [n_kv_heads*head_dim, dim]
    Weight wo;                     // [dim, n_heads*head_dim]
    const float* ffn_norm = nullptr;   // [dim] f32, likewise
    Weight w1;                     // gate [hidden_dim, dim]
    Weight w2;                     // down [dim, hidden_dim]
    Weight w3;                     // up   [hidden_dim, dim]
    // MoE layers instead of w1/w2/w3 (which stay empty): the router and the experts.
    Weight gate;                   // router [n_experts, dim], replicated under TP
    std::vector<FfnWeights> experts;  // [n_experts], shaped as w1/w2/w3 above
};

struct Weights {
    Weight tok_embeddings;         // [vocab, dim]
    std::vector<LayerWeights> layers;
    const float* norm = nullptr;   // [dim] f32, in the backend's memory
    Weight output;                 // [vocab, dim]; the embedding when tied
};

// One entry of a forward batch: the Orca/vLLM shape (prefill, decode, verify all use it).
struct BatchToken {
    int seq;    // sequence id in the KV cache (must have positions reserved up to pos)
    int pos;    // position in that sequence
    int token;  // token id
};

class Model {
  public:
    Config cfg;  // this rank's share under tensor parallelism (see Config::shard), else the model's
    Weights w;   // in the backend's memory: views into the mapped file on the CPU, copies on CUDA
    // The embedded tokenizer's bytes, for Tokenizer(tokenizer_model, ...), which tells the kinds
    // apart by content; tokenizer_tensor names the tensor that held them, for messages:
    // "tokenizer.model" (sentencepiece or Llama 3 tiktoken) or "tokenizer.json" (Hugging Face BPE).
    std::string tokenizer_model;
    std::string tokenizer_tensor;
    std::string chat_template;  // the model's Jinja chat template (metadata "chat_template"), or ""
    std::string path;

    // Maps model.bin, checks format/version/config and every tensor's name, dtype and shape.
    // With a communicator of n > 1 ranks, this rank keeps views of its slices only: wq/wk/wv/w1/w3
    // split by output rows (heads, FFN width), wo/w2 by input columns; forward() all-reduces after
    // each of those two. A backend without host memory (CUDA) gets the weights copied to it.
    Model(const std::string& path, Ops* ops, Comm* comm = nullptr);
    ~Model();
    Model(const Model&) = delete;
    Model& operator=(const Model&) = delete;

    // Runs the batch through the model, writing K/V for every token into `kv`, then logits for the
    // batch entries listed in `logit_rows` to logits[logit_rows.size()][vocab_size] (host memory).
    void forward(KVCache& kv, const std::vector<BatchToken>& batch,
                 const std::vector<int>& logit_rows, float* logits);
    // The same forward, then one token sampled on the backend per logit row (Ops::sample, with
    // sampler's settings and one uniform draw of it per row), into tokens[logit_rows.size()].
    // False, having done nothing, when the backend samples on the host (the CPU).
    bool forward_sample(KVCache& kv, const std::vector<BatchToken>& batch, const std::vector<int>& logit_rows,
                        Sampler& sampler, int* tokens);

    // Scratch for batches of up to n_tokens tokens and n_rows logit rows, allocated now rather
    // than by the first forward that needs it (for the memory plan; a CUDA graph captured before
    // buffers grow is captured again after).
    void reserve_scratch(int n_tokens, int n_rows);
    Ops* ops() const { return ops_; }

    // Bytes of weights read by one decode step (for the GB/s figure); MoE layers count the router
    // and n_experts_per_tok experts, the weights a batch-1 step actually reads.
    size_t weight_bytes_per_token() const;
    size_t device_weight_bytes() const { return weights_.bytes() + norms_.bytes(); }  // copies on the backend
    size_t scratch_bytes() const;  // activation buffers now allocated
    size_t graphs_captured() const { return graphs_.size(); }  // CUDA graphs held (tests)

  private:
    std::unique_ptr<SafetensorsFile> file_;
    Ops* ops_;
    Comm* comm_;  // null, or the tensor-parallel ranks
    Buffer weights_;  // the matrices' copies on a backend without host memory (else empty)
    Buffer norms_;    // every norm weight as f32: [2 * n_layers + 1][dim]
    void upload_weights();
    // Scratch activations in the backend's memory, grown to the largest batch seen: [n_tokens][width] each.
    Buffer x_, xb_, q_, k_, v_, att_, hb_, hb2_, xlast_, logits_;
    Buffer picked_;  // [m][vocab] logit rows gathered out of a captured step's logits_ (run_batch)
    // This forward's token ids, positions, cache slots, block tables and RoPE table, built on the
    // host in meta_ and seen by the backend at meta_dev_ (the same bytes on the CPU; an upload on CUDA).
    std::vector<int> tokens_, positions_, slots_, table_offsets_, tables_;
    std::vector<double> rope_freq_;  // [head_dim / 2] Config::rope_frequencies()
    std::vector<float> rope_;  // [n][head_dim / 2][cos, sin] of this forward's positions
    std::vector<uint8_t> meta_;
    Buffer meta_dev_;
    // MoE scratch: router logits [n][n_experts], the experts' weighted sum [n][dim].
    Buffer router_, moe_;
    // The layers, the final norm and the classifier into `out` (logits_, or the caller's host
    // memory on a host-memory backend), for a batch whose metadata is in place.
    void run_ops(KVCache& kv, int n, const std::vector<int>& logit_rows, float* out, const AttentionBatch& ab,
                 const int* tokens, const float* rope, const int* slots);
    // Builds the metadata, then runs the batch op by op or as a captured graph (per bucket).
    float* run_batch(KVCache& kv, const std::vector<BatchToken>& batch, const std::vector<int>& logit_rows,
                     float* host_logits);
    // Captured steps per batch-size bucket (model.cpp, run_batch), by (bucket, classifier or not,
    // attention hints, cache); dropped when scratch buffers move.
    std::map<std::string, void*> graphs_;
    std::map<std::string, int> graph_seen_;  // sightings of each key (the first runs op by op)
    std::vector<int> all_rows_;              // 0..N-1: a captured step's classifier rows
    void drop_graphs();
    bool grow(Buffer& b, size_t bytes);  // true when b was reallocated
};
