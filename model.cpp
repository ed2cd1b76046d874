// model.cpp: Config (JSON), loading model.bin into weight views, and the forward pass, written
// once over the op table (ops.h).
#include "model.h"

#include <algorithm>
#include <cassert>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "common.h"

using json = nlohmann::json;

// ---------------------------------------------------------------------------------------------
// Config

std::string Config::to_json() const {
    json j = {{"dim", dim}, {"hidden_dim", hidden_dim}, {"n_layers", n_layers}, {"n_heads", n_heads},
              {"n_kv_heads", n_kv_heads}, {"head_dim", head_dim}, {"vocab_size", vocab_size},
              {"max_seq_len", max_seq_len}, {"norm_eps", norm_eps}, {"rope_theta", rope_theta},
              {"tie_embeddings", tie_embeddings}, {"bos_id", bos_id}, {"eos_id", eos_id}};
    if (n_experts > 0) {
        j["n_experts"] = n_experts;
        j["n_experts_per_tok"] = n_experts_per_tok;
    }
    if (rope_factor != 0)
        j["rope_scaling"] = {{"type", "llama3"}, {"factor", rope_factor}, {"low_freq_factor", rope_low_freq_factor},
                             {"high_freq_factor", rope_high_freq_factor},
                             {"original_max_seq_len", rope_original_max_seq_len}};
    return j.dump();
}

namespace {
// A JSON integer that fits an int (unsigned ones above INT64_MAX included, which get<int64_t> wraps).
bool int32_value(const json& v, int* out) {
    if (!v.is_number_integer()) return false;
    if (v.is_number_unsigned() ? v.get<uint64_t>() > uint64_t(INT_MAX)
                               : v.get<int64_t>() < INT_MIN || v.get<int64_t>() > INT_MAX)
        return false;
    *out = int(v.get<int64_t>());
    return true;
}

// A JSON number within float range (a double beyond it would not convert to float defined).
bool float_value(const json& v, float* out) {
    const double d = v.get<double>();
    if (!(std::fabs(d) <= double(std::numeric_limits<float>::max()))) return false;
    *out = float(d);
    return true;
}
}  // namespace

Config Config::from_json(const std::string& text, const std::string& where) {
    json j;
    try {
        j = json::parse(text, JsonDepthLimit{where});
    } catch (const json::exception& e) {
        throw Error(fmt("%s: config is not valid JSON: %s", where.c_str(), e.what()));
    }
    if (!j.is_object()) throw Error(fmt("%s: config is not a JSON object", where.c_str()));
    Config c;
    auto get_int = [&](const char* key, int* out, bool required) {
        if (!j.contains(key)) {
            if (required) throw Error(fmt("%s: config is missing '%s'", where.c_str(), key));
            return;
        }
        if (!int32_value(j[key], out))
            throw Error(fmt("%s: config '%s' must be an integer (32-bit), found %s", where.c_str(), key,
                            j[key].dump().c_str()));
    };
    auto get_number = [&](const char* key, float* out) {
        if (!j.contains(key)) return;
        if (!j[key].is_number()) throw Error(fmt("%s: config '%s' must be a number", where.c_str(), key));
        if (!float_value(j[key], out))
            throw Error(fmt("%s: config '%s' = %s is out of float range", where.c_str(), key, j[key].dump().c_str()));
    };
    get_int("dim", &c.dim, true);
    get_int("hidden_dim", &c.hidden_dim, true);
    get_int("n_layers", &c.n_layers, true);
    get_int("n_heads", &c.n_heads, true);
    c.n_kv_heads = c.n_heads;
    get_int("n_kv_heads", &c.n_kv_heads, false);
    c.head_dim = c.n_heads > 0 ? c.dim / c.n_heads : 0;
    get_int("head_dim", &c.head_dim, false);
    get_int("vocab_size", &c.vocab_size, true);
    get_int("max_seq_len", &c.max_seq_len, true);
    get_int("bos_id", &c.bos_id, false);
    get_int("eos_id", &c.eos_id, false);
    get_int("n_experts", &c.n_experts, false);
    get_int("n_experts_per_tok", &c.n_experts_per_tok, false);
    get_number("norm_eps", &c.norm_eps);
    get_number("rope_theta", &c.rope_theta);
    if (j.contains("rope_scaling")) {
        const json& r = j["rope_scaling"];
        if (!r.is_object() || r.value("type", json()) != "llama3")
            throw Error(fmt("%s: config rope_scaling %s: only {\"type\": \"llama3\", ...} is supported", where.c_str(),
                            r.dump().c_str()));
        for (const char* key : {"factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"})
            if (!r.contains(key) || !r[key].is_number())
                throw Error(fmt("%s: config rope_scaling needs a number '%s'", where.c_str(), key));
        if (!int32_value(r["original_max_seq_len"], &c.rope_original_max_seq_len) ||
            !float_value(r["factor"], &c.rope_factor) || !float_value(r["low_freq_factor"], &c.rope_low_freq_factor) ||
            !float_value(r["high_freq_factor"], &c.rope_high_freq_factor))
            throw Error(fmt("%s: config rope_scaling %s: original_max_seq_len must be a 32-bit integer and the "
                            "factors within float range", where.c_str(), r.dump().c_str()));
    }
    if (j.contains("tie_embeddings")) {
        if (!j["tie_embeddings"].is_boolean())
            throw Error(fmt("%s: config 'tie_embeddings' must be true or false", where.c_str()));
        c.tie_embeddings = j["tie_embeddings"].get<bool>();
    }
    c.validate(where);
    // (Not in validate(): converters fill these in from the tokenizer after validating.)
    if (c.bos_id < 0 || c.bos_id >= c.vocab_size || c.eos_id < 0 || c.eos_id >= c.vocab_size)
        throw Error(fmt("%s: config bos_id = %d and eos_id = %d must be token ids below vocab_size = %d",
                        where.c_str(), c.bos_id, c.eos_id, c.vocab_size));
    return c;
}

void Config::validate(const std::string& where) const {
    const char* w = where.c_str();
    struct { const char* name; int value; } sizes[] = {
        {"dim", dim}, {"hidden_dim", hidden_dim}, {"n_layers", n_layers}, {"n_heads", n_heads},
        {"n_kv_heads", n_kv_heads}, {"head_dim", head_dim}, {"vocab_size", vocab_size},
        {"max_seq_len", max_seq_len}};
    for (auto& s : sizes)
        if (s.value <= 0) throw Error(fmt("%s: config %s = %d must be positive", w, s.name, s.value));
    // Matrix sizes are computed in int across the code: keep every product of two sizes in range.
    struct { const char* what; int64_t value; } products[] = {
        {"n_heads x head_dim", int64_t(n_heads) * head_dim}, {"vocab_size x dim", int64_t(vocab_size) * dim},
        {"hidden_dim x dim", int64_t(hidden_dim) * dim}, {"max_seq_len x n_kv_heads x head_dim",
                                                          int64_t(max_seq_len) * n_kv_heads * head_dim}};
    for (auto& p : products)
        if (p.value > INT_MAX) throw Error(fmt("%s: config %s = %lld is too large", w, p.what, (long long)p.value));
    if (max_seq_len < 2) throw Error(fmt("%s: config max_seq_len = %d must be at least 2", w, max_seq_len));
    if (n_heads % n_kv_heads != 0)
        throw Error(fmt("%s: config n_heads = %d is not a multiple of n_kv_heads = %d", w, n_heads, n_kv_heads));
    if (head_dim % 2 != 0) throw Error(fmt("%s: config head_dim = %d must be even for RoPE", w, head_dim));
    if (n_experts < 0 || (n_experts == 0 && n_experts_per_tok != 0) ||
        (n_experts > 0 && (n_experts_per_tok < 1 || n_experts_per_tok > n_experts)))
        throw Error(fmt("%s: config n_experts_per_tok = %d must be between 1 and n_experts = %d (0 and 0 for a "
                        "dense model)", w, n_experts_per_tok, n_experts));
    // Readers list every tensor the config implies (model_tensors) before looking in the file: a
    // corrupt layer or expert count must not make that list run the machine out of memory. The
    // largest published models have well under 10^5 tensors.
    const int64_t per_layer = 6 + (n_experts > 0 ? 1 + 3 * int64_t(n_experts) : 3);
    if (int64_t(n_layers) * per_layer > kMaxTensors)
        throw Error(fmt("%s: config n_layers = %d with n_experts = %d means %lld tensors, more than the %lld this "
                        "build accepts (a corrupt config?)", w, n_layers, n_experts,
                        (long long)(int64_t(n_layers) * per_layer), (long long)kMaxTensors));
    if (!(norm_eps > 0) || !(rope_theta > 0) || !std::isfinite(norm_eps) || !std::isfinite(rope_theta))
        throw Error(fmt("%s: config norm_eps = %g and rope_theta = %g must be positive and finite", w, norm_eps,
                        rope_theta));
    if (rope_factor != 0 && !(rope_factor >= 1 && std::isfinite(rope_factor) && rope_low_freq_factor > 0 &&
                              rope_high_freq_factor > rope_low_freq_factor && rope_original_max_seq_len > 0))
        throw Error(fmt("%s: config rope_scaling needs factor >= 1, 0 < low_freq_factor < high_freq_factor and "
                        "original_max_seq_len > 0 (found %g, %g, %g, %d)", w, rope_factor, rope_low_freq_factor,
                        rope_high_freq_factor, rope_original_max_seq_len));
}

std::vector<double> Config::rope_frequencies() const {
    std::vector<double> f(size_t(head_dim / 2));
    for (int i = 0; i < head_dim / 2; i++) {
        f[i] = std::pow(double(rope_theta), -2.0 * i / head_dim);
        if (rope_factor == 0) continue;
        // Meta's apply_scaling (Llama 3.1): keep short wavelengths, stretch long ones, blend between.
        const double wavelen = 2 * M_PI / f[i];
        const double low_wavelen = rope_original_max_seq_len / double(rope_low_freq_factor);
        const double high_wavelen = rope_original_max_seq_len / double(rope_high_freq_factor);
        if (wavelen > low_wavelen) {
            f[i] /= rope_factor;
        } else if (wavelen >= high_wavelen) {
            const double smooth = (rope_original_max_seq_len / wavelen - rope_low_freq_factor) /
                                  (rope_high_freq_factor - rope_low_freq_factor);
            f[i] = (1 - smooth) * f[i] / rope_factor + smooth * f[i];
        }
    }
    return f;
}

Config Config::shard(int n, const std::string& where) const {
    struct { const char* name; int value; } parts[] = {{"n_heads", n_heads}, {"n_kv_heads", n_kv_heads}, {"hidden_dim", hidden_dim}};
    for (auto& p : parts)
        if (p.value % n != 0)
            throw Error(fmt("%s: %s = %d is not divisible by %d tensor-parallel ranks", where.c_str(), p.name, p.value, n));
    Config c = *this;
    c.n_heads /= n;
    c.n_kv_heads /= n;
    c.hidden_dim /= n;
    return c;
}

std::string layer_tensor(int layer, const char* what) { return "layers." + std::to_string(layer) + "." + what; }

std::string expert_tensor(int layer, int expert, const char* w) {
    return "layers." + std::to_string(layer) + ".feed_forward.experts." + std::to_string(expert) + "." + w + ".weight";
}

std::vector<TensorSpec> model_tensors(const Config& c) {
    int64_t d = c.dim, h = c.hidden_dim, v = c.vocab_size;
    int64_t q = int64_t(c.n_heads) * c.head_dim, kv = int64_t(c.n_kv_heads) * c.head_dim;
    std::vector<TensorSpec> t = {{"tok_embeddings.weight", {v, d}}};
    for (int l = 0; l < c.n_layers; l++) {
        t.push_back({layer_tensor(l, "attention_norm.weight"), {d}});
        t.push_back({layer_tensor(l, "attention.wq.weight"), {q, d}});
        t.push_back({layer_tensor(l, "attention.wk.weight"), {kv, d}});
        t.push_back({layer_tensor(l, "attention.wv.weight"), {kv, d}});
        t.push_back({layer_tensor(l, "attention.wo.weight"), {d, q}});
        t.push_back({layer_tensor(l, "ffn_norm.weight"), {d}});
        if (c.n_experts > 0) {
            t.push_back({layer_tensor(l, "feed_forward.gate.weight"), {c.n_experts, d}});
            for (int e = 0; e < c.n_experts; e++) {
                t.push_back({expert_tensor(l, e, "w1"), {h, d}});
                t.push_back({expert_tensor(l, e, "w2"), {d, h}});
                t.push_back({expert_tensor(l, e, "w3"), {h, d}});
            }
            continue;
        }
        t.push_back({layer_tensor(l, "feed_forward.w1.weight"), {h, d}});
        t.push_back({layer_tensor(l, "feed_forward.w2.weight"), {d, h}});
        t.push_back({layer_tensor(l, "feed_forward.w3.weight"), {h, d}});
    }
    t.push_back({"norm.weight", {d}});
    if (!c.tie_embeddings) t.push_back({"output.weight", {v, d}});
    return t;
}

// ---------------------------------------------------------------------------------------------
// loading

namespace {

// The int4 / grouped int8 group size from NAME.scales [rows, cols/group]: a multiple of 32 (the
// kernels' step) that divides the columns.
int group_of(const SafetensorsFile& f, const std::string& name, const TensorView& s, int rows, int cols) {
    const char* fp = f.path.c_str();
    if (s.shape.size() != 2 || s.shape[0] != rows || s.shape[1] < 1)
        throw Error(fmt("%s: tensor '%s.scales': shape %s, expected [%d, columns / group] for the %d x %d matrix",
                        fp, name.c_str(), s.shape_str().c_str(), rows, rows, cols));
    const int64_t groups = s.shape[1];
    if (cols % groups != 0 || (cols / groups) % 32 != 0)
        throw Error(fmt("%s: tensor '%s': %lld groups per row (from '%s.scales' %s) do not split its %d columns "
                        "into groups of a multiple of 32 columns", fp, name.c_str(), (long long)groups, name.c_str(),
                        s.shape_str().c_str(), cols));
    return int(cols / groups);
}

// The kernels read weights in place from the mapping as typed arrays: each must start at a
// multiple of its element size (our writer's files do; a hand-edited offset may not).
const TensorView& aligned(const SafetensorsFile& f, const TensorView& t) {
    const size_t at = size_t(t.data - f.map.data);
    if (at % dtype_size(t.dtype) != 0)
        throw Error(fmt("%s: tensor '%s': %s data at file offset %zu is not aligned to its %zu-byte elements", f.path.c_str(),
                        t.name.c_str(), dtype_name(t.dtype), at, dtype_size(t.dtype)));
    return t;
}

const TensorView& f32_tensor(const SafetensorsFile& f, const std::string& name, const std::vector<int64_t>& shape) {
    const TensorView& t = f.get(name, shape);
    if (t.dtype != DType::F32)
        throw Error(fmt("%s: tensor '%s': dtype %s, expected F32", f.path.c_str(), name.c_str(), dtype_name(t.dtype)));
    return aligned(f, t);
}

}  // namespace

Weight load_matrix(const SafetensorsFile& f, const std::string& name, int rows, int cols, size_t* companions) {
    const TensorView* t = f.find(name);
    if (!t) f.get(name);  // throws naming the missing tensor
    const char* fp = f.path.c_str();
    const std::string zeros_name = name + ".zeros", mins_name = name + ".mins";
    const TensorView *zeros = f.find(zeros_name), *mins = f.find(mins_name);
    if (t->dtype == DType::I8) {
        f.get(name, {rows, cols});
        if (zeros || mins)
            throw Error(fmt("%s: tensor '%s' is int8 (I8), which takes no '%s'", fp, name.c_str(),
                            (zeros ? zeros_name : mins_name).c_str()));
        const TensorView& s = f.get(name + ".scales");
        Weight w{DType::I8, t->data, rows, cols, cols};
        if (s.shape.size() == 1) {
            f32_tensor(f, name + ".scales", {rows});  // one scale per row
        } else if (s.shape.size() == 2) {
            w.group = group_of(f, name, s, rows, cols);
            f32_tensor(f, name + ".scales", s.shape);
        } else {
            throw Error(fmt("%s: tensor '%s.scales': shape %s, expected [%d] (a scale per row) or [%d, columns / "
                            "group] (a scale per group)", fp, name.c_str(), s.shape_str().c_str(), rows, rows));
        }
        w.scales = reinterpret_cast<const float*>(s.data);
        *companions += 1;
        return w;
    }
    if (t->dtype == DType::U8) {
        f.get(name, {rows, cols / 2});
        if (cols % 2 != 0)
            throw Error(fmt("%s: tensor '%s': packed int4 needs an even number of columns, not %d", fp, name.c_str(), cols));
        if (zeros && mins)
            throw Error(fmt("%s: tensor '%s' has both '%s' and '%s': int4 takes zero points or minimums, not both",
                            fp, name.c_str(), zeros_name.c_str(), mins_name.c_str()));
        if (!zeros && !mins)
            throw Error(fmt("%s: tensor '%s' is packed int4 (U8) but has neither '%s' (zero points) nor '%s' "
                            "(minimums)", fp, name.c_str(), zeros_name.c_str(), mins_name.c_str()));
        const TensorView& s = f.get(name + ".scales");
        Weight w{DType::U8, t->data, rows, cols, cols};
        w.group = group_of(f, name, s, rows, cols);
        const std::vector<int64_t> gshape = {rows, cols / w.group};
        w.scales = reinterpret_cast<const float*>(f32_tensor(f, name + ".scales", gshape).data);
        if (zeros) {
            const TensorView& z = f.get(zeros_name, gshape);
            if (z.dtype != DType::U8)
                throw Error(fmt("%s: tensor '%s': dtype %s, expected U8", fp, zeros_name.c_str(), dtype_name(z.dtype)));
            w.zeros = z.data;
        } else {
            w.mins = reinterpret_cast<const float*>(f32_tensor(f, mins_name, gshape).data);
        }
        *companions += 2;
        return w;
    }
    f.get(name, {rows, cols});
    if (t->dtype != DType::F32 && t->dtype != DType::BF16 && t->dtype != DType::F16)
        throw Error(fmt("%s: tensor '%s': dtype %s is not a float format (F32, BF16, F16), I8 or U8", fp,
                        name.c_str(), dtype_name(t->dtype)));
    aligned(f, *t);
    return Weight{t->dtype, t->data, rows, cols, cols};
}

namespace {

// Bytes of values before element (row r, column c) of a matrix in w's format.
size_t value_offset(const Weight& w, size_t r, size_t c) {
    size_t e = r * size_t(w.stride) + c;
    return w.dtype == DType::U8 ? e / 2 : e * dtype_size(w.dtype);
}

// Grouped scales, zero points and minimums [rows][stride/group] of w, moved by `groups` entries.
void advance_groups(Weight& w, size_t groups) {
    w.scales += groups;
    if (w.zeros) w.zeros += groups;
    if (w.mins) w.mins += groups;
}

// Rows [r0, r0 + n): a rank's output features (heads, FFN units) of a column-parallel matrix.
Weight rows_of(Weight w, int r0, int n) {
    w.data = static_cast<const uint8_t*>(w.data) + value_offset(w, size_t(r0), 0);
    if (w.group > 0) advance_groups(w, size_t(r0) * size_t(w.stride / w.group));
    else if (w.dtype == DType::I8) w.scales += r0;
    w.rows = n;
    return w;
}

// Columns [c0, c0 + n): a rank's input features of a row-parallel matrix, a strided view. Groups
// (int4, grouped int8) may not straddle ranks (a per-row int8 scale serves every slice of its row).
Weight cols_of(Weight w, int c0, int n, const std::string& where) {
    if (w.group > 0) {
        if (c0 % w.group != 0 || n % w.group != 0)
            throw Error(fmt("%s: a tensor-parallel rank's %d columns are not a multiple of the %s group size %d "
                            "(use fewer ranks or a smaller group)", where.c_str(), n,
                            w.dtype == DType::U8 ? "int4" : "int8", w.group));
        advance_groups(w, size_t(c0 / w.group));
    }
    w.data = static_cast<const uint8_t*>(w.data) + value_offset(w, 0, size_t(c0));
    w.cols = n;
    return w;
}

// Norm weights are tiny; keep them as f32 copies so the kernels see one format. Appends to `out`.
void vector_f32(const SafetensorsFile& f, const std::string& name, int n, std::vector<float>& out) {
    const TensorView& t = f.get(name, {n});
    if (t.dtype != DType::F32 && t.dtype != DType::BF16 && t.dtype != DType::F16)
        throw Error(fmt("%s: tensor '%s': dtype %s is not a float format", f.path.c_str(), name.c_str(),
                        dtype_name(t.dtype)));
    out.resize(out.size() + size_t(n));
    convert_floats(t.data, t.dtype, out.data() + out.size() - size_t(n), DType::F32, size_t(n));
}

// The pieces of a matrix a backend without host memory needs a copy of: its values, scales and
// zero points or minimums, each [rows][per_row bytes], row r starting `pitch` bytes after row r - 1
// in the file (pitch > per_row for a tensor-parallel column slice).
struct Piece {
    const void** ptr;  // the Weight's pointer, moved to the copy
    size_t per_row, pitch;
    int rows;
};

std::vector<Piece> pieces_of(Weight& w, const std::string& name) {
    switch (w.dtype) {
        case DType::F32:
        case DType::BF16:
        case DType::F16: {
            const size_t e = dtype_size(w.dtype);
            return {{&w.data, size_t(w.cols) * e, size_t(w.stride) * e, w.rows}};
        }
        case DType::I8:
            if (w.group == 0)  // a scale per row
                return {{&w.data, size_t(w.cols), size_t(w.stride), w.rows},
                        {reinterpret_cast<const void**>(&w.scales), sizeof(float), sizeof(float), w.rows}};
            [[fallthrough]];
        case DType::U8: {
            // Grouped: the scales (and the zero points or minimums) hold cols/group entries a row of
            // the copy, stride/group a row of the file.
            const size_t groups = size_t(w.cols / w.group), row_groups = size_t(w.stride / w.group);
            const size_t q = w.dtype == DType::U8 ? 2 : 1;  // weights a byte
            std::vector<Piece> p = {
                {&w.data, size_t(w.cols) / q, size_t(w.stride) / q, w.rows},
                {reinterpret_cast<const void**>(&w.scales), groups * sizeof(float), row_groups * sizeof(float), w.rows}};
            if (w.zeros) p.push_back({reinterpret_cast<const void**>(&w.zeros), groups, row_groups, w.rows});
            if (w.mins)
                p.push_back({reinterpret_cast<const void**>(&w.mins), groups * sizeof(float), row_groups * sizeof(float), w.rows});
            return p;
        }
        default:
            throw Error(fmt("tensor '%s': dtype %s is not supported by this backend", name.c_str(), dtype_name(w.dtype)));
    }
}

}  // namespace

Model::Model(const std::string& p, Ops* ops, Comm* comm)
    : path(p), file_(std::make_unique<SafetensorsFile>(p)), ops_(ops), comm_(comm && comm->size() > 1 ? comm : nullptr) {
    const SafetensorsFile& f = *file_;
    const char* fp = path.c_str();
    auto meta = [&](const char* key) -> const std::string& {
        auto it = f.metadata.find(key);
        if (it == f.metadata.end())
            throw Error(fmt("%s: metadata has no '%s': not a fastgen model.bin (convert it with quantize)", fp, key));
        return it->second;
    };
    if (meta("format") != kFormatName)
        throw Error(fmt("%s: metadata format is '%s', expected '%s'", fp, meta("format").c_str(), kFormatName));
    if (meta("version") != kFormatVersion)
        throw Error(fmt("%s: format version %s, this build reads version %s", fp, meta("version").c_str(), kFormatVersion));
    // The "quantization" label describes the file ("none", "int8", "int4-g32", ...); each matrix's
    // format is read off its own dtype and companion tensors, so a file may mix formats (an
    // imported GGUF model, the converter's --int8-fallback). "none" promises float matrices only.
    const std::string& quantization = meta("quantization");
    if (quantization.empty()) throw Error(fmt("%s: metadata 'quantization' is empty", fp));
    size_t extra = 0;  // scale, zero-point and minimum tensors
    const Config g = Config::from_json(meta("config"), path + ": metadata config");  // the whole model
    const int ranks = comm_ ? comm_->size() : 1, rank = comm_ ? comm_->rank() : 0;
    cfg = ranks > 1 ? g.shard(ranks, path) : g;

    const Config& c = cfg;  // this rank's share
    const int q_dim = g.n_heads * g.head_dim, kv_dim = g.n_kv_heads * g.head_dim;
    const int q_local = c.n_heads * c.head_dim, kv_local = c.n_kv_heads * c.head_dim, h_local = c.hidden_dim;
    std::vector<float> norms;  // [2 * n_layers + 1][dim], moved to the backend below
    auto mat = [&](const std::string& name, int rows, int cols) {
        Weight m = load_matrix(f, name, rows, cols, &extra);
        if (quantization == "none" && (m.dtype == DType::I8 || m.dtype == DType::U8))
            throw Error(fmt("%s: tensor '%s' is quantized (%s) but the file's quantization is 'none'", fp, name.c_str(),
                            dtype_name(m.dtype)));
        return m;
    };
    w.tok_embeddings = mat("tok_embeddings.weight", g.vocab_size, g.dim);
    for (int l = 0; l < g.n_layers; l++) {
        auto name = [&](const char* s) { return layer_tensor(l, s); };
        LayerWeights L;
        vector_f32(f, name("attention_norm.weight"), g.dim, norms);
        L.wq = rows_of(mat(name("attention.wq.weight"), q_dim, g.dim), rank * q_local, q_local);
        L.wk = rows_of(mat(name("attention.wk.weight"), kv_dim, g.dim), rank * kv_local, kv_local);
        L.wv = rows_of(mat(name("attention.wv.weight"), kv_dim, g.dim), rank * kv_local, kv_local);
        L.wo = cols_of(mat(name("attention.wo.weight"), g.dim, q_dim), rank * q_local, q_local,
                       path + ": tensor '" + name("attention.wo.weight") + "'");
        vector_f32(f, name("ffn_norm.weight"), g.dim, norms);
        // Each expert splits like the dense FFN (rows of w1/w3, columns of w2); the router is whole.
        auto ffn = [&](const std::string& w1, const std::string& w2, const std::string& w3) {
            return FfnWeights{
                rows_of(mat(w1, g.hidden_dim, g.dim), rank * h_local, h_local),
                cols_of(mat(w2, g.dim, g.hidden_dim), rank * h_local, h_local, path + ": tensor '" + w2 + "'"),
                rows_of(mat(w3, g.hidden_dim, g.dim), rank * h_local, h_local)};
        };
        if (g.n_experts > 0) {
            L.gate = mat(name("feed_forward.gate.weight"), g.n_experts, g.dim);
            for (int e = 0; e < g.n_experts; e++)
                L.experts.push_back(ffn(expert_tensor(l, e, "w1"), expert_tensor(l, e, "w2"), expert_tensor(l, e, "w3")));
        } else {
            FfnWeights d = ffn(name("feed_forward.w1.weight"), name("feed_forward.w2.weight"),
                               name("feed_forward.w3.weight"));
            L.w1 = d.w1;
            L.w2 = d.w2;
            L.w3 = d.w3;
        }
        w.layers.push_back(std::move(L));
    }
    vector_f32(f, "norm.weight", c.dim, norms);
    if (c.tie_embeddings) {
        if (f.find("output.weight"))
            throw Error(fmt("%s: config says tie_embeddings but the file has 'output.weight'", fp));
        w.output = w.tok_embeddings;
    } else {
        w.output = mat("output.weight", c.vocab_size, c.dim);
    }
    // One tokenizer: tokenizer.model (sentencepiece or tiktoken) or tokenizer.json (Hugging Face BPE).
    const bool json_tok = f.find("tokenizer.json") != nullptr;
    if (json_tok && f.find("tokenizer.model"))
        throw Error(fmt("%s: has both 'tokenizer.model' and 'tokenizer.json'; a model.bin holds one tokenizer", fp));
    tokenizer_tensor = json_tok ? "tokenizer.json" : "tokenizer.model";
    const TensorView& tok = f.get(tokenizer_tensor);
    if (tok.dtype != DType::U8 || tok.shape.size() != 1)
        throw Error(fmt("%s: tensor '%s' must be U8 [nbytes], found %s %s", fp, tokenizer_tensor.c_str(),
                        dtype_name(tok.dtype), tok.shape_str().c_str()));
    tokenizer_model.assign(reinterpret_cast<const char*>(tok.data), tok.nbytes);
    if (auto it = f.metadata.find("chat_template"); it != f.metadata.end()) chat_template = it->second;

    // Every tensor in the file must be one we understood: a stray one means a mismatched file.
    size_t expected = model_tensors(g).size() + 1 + extra;  // + the tokenizer, companion tensors
    if (f.tensors.size() != expected)
        throw Error(fmt("%s: has %zu tensors, a model with this config has %zu", fp, f.tensors.size(), expected));

    norms_ = Buffer(ops_, norms.size() * sizeof(float));
    ops_->upload(norms_.data(), norms.data(), norms_.bytes());
    for (int l = 0; l < c.n_layers; l++) {
        w.layers[size_t(l)].attn_norm = norms_.f32() + size_t(2 * l) * c.dim;
        w.layers[size_t(l)].ffn_norm = norms_.f32() + size_t(2 * l + 1) * c.dim;
    }
    w.norm = norms_.f32() + size_t(2 * c.n_layers) * c.dim;
    upload_weights();
}

Model::~Model() { drop_graphs(); }

// The CPU reads the matrices in place from the mapped file. A backend with memory of its own gets
// one allocation holding a copy of every matrix piece (column slices made contiguous), and the
// Weights are pointed at it.
void Model::upload_weights() {
    if (ops_->host_memory()) return;
    std::vector<std::pair<Weight*, std::string>> all = {{&w.tok_embeddings, "tok_embeddings.weight"}};
    for (size_t l = 0; l < w.layers.size(); l++) {
        LayerWeights& L = w.layers[l];
        auto name = [&](const char* s) { return layer_tensor(int(l), s); };
        for (auto [m, s] : {std::pair<Weight*, const char*>{&L.wq, "attention.wq.weight"}, {&L.wk, "attention.wk.weight"},
                            {&L.wv, "attention.wv.weight"}, {&L.wo, "attention.wo.weight"}})
            all.push_back({m, name(s)});
        if (L.experts.empty()) {
            for (auto [m, s] : {std::pair<Weight*, const char*>{&L.w1, "feed_forward.w1.weight"},
                                {&L.w2, "feed_forward.w2.weight"}, {&L.w3, "feed_forward.w3.weight"}})
                all.push_back({m, name(s)});
            continue;
        }
        all.push_back({&L.gate, name("feed_forward.gate.weight")});
        for (size_t e = 0; e < L.experts.size(); e++) {
            all.push_back({&L.experts[e].w1, expert_tensor(int(l), int(e), "w1")});
            all.push_back({&L.experts[e].w2, expert_tensor(int(l), int(e), "w2")});
            all.push_back({&L.experts[e].w3, expert_tensor(int(l), int(e), "w3")});
        }
    }
    const bool tied = cfg.tie_embeddings;
    if (!tied) all.push_back({&w.output, "output.weight"});

    // Offsets first (each piece 256-byte aligned, for 16-byte vector loads), then the copies.
    std::vector<std::pair<Piece, size_t>> plan;
    size_t total = 0;
    for (auto& [m, name] : all)
        for (const Piece& p : pieces_of(*m, path + ": tensor '" + name + "'")) {
            plan.push_back({p, total});
            total += (p.per_row * size_t(p.rows) + 255) / 256 * 256;
        }
    weights_ = Buffer(ops_, total);
    std::vector<uint8_t> packed;  // a column slice made contiguous
    for (auto& [p, offset] : plan) {
        uint8_t* dst = static_cast<uint8_t*>(weights_.data()) + offset;
        const uint8_t* src = static_cast<const uint8_t*>(*p.ptr);
        const size_t bytes = p.per_row * size_t(p.rows);
        if (p.pitch == p.per_row) {
            ops_->upload(dst, src, bytes);
        } else {
            packed.resize(bytes);
            for (int r = 0; r < p.rows; r++)
                std::memcpy(packed.data() + size_t(r) * p.per_row, src + size_t(r) * p.pitch, p.per_row);
            ops_->upload(dst, packed.data(), bytes);
        }
        *p.ptr = dst;
    }
    for (auto& [m, name] : all) m->stride = m->cols;  // every copy is contiguous
    if (tied) w.output = w.tok_embeddings;
}

size_t Model::scratch_bytes() const {
    size_t n = meta_dev_.bytes();
    for (const Buffer* b : {&x_, &xb_, &q_, &k_, &v_, &att_, &hb_, &hb2_, &xlast_, &logits_, &picked_, &router_, &moe_})
        n += b->bytes();
    return n;
}

size_t Model::weight_bytes_per_token() const {
    const Weight& e = w.tok_embeddings;  // one embedding row
    size_t n = w.output.bytes() + e.bytes() / size_t(e.rows);
    for (const LayerWeights& L : w.layers) {
        n += L.wq.bytes() + L.wk.bytes() + L.wv.bytes() + L.wo.bytes();
        if (L.experts.empty()) {
            n += L.w1.bytes() + L.w2.bytes() + L.w3.bytes();
            continue;
        }
        // The router, and k experts (the average expert's bytes, exact when all share a format).
        size_t all = 0;
        for (const FfnWeights& e : L.experts) all += e.w1.bytes() + e.w2.bytes() + e.w3.bytes();
        n += L.gate.bytes() + all * size_t(cfg.n_experts_per_tok) / L.experts.size();
    }
    return n;
}

// ---------------------------------------------------------------------------------------------
// forward

namespace {
// Where each array sits in the per-forward metadata (16-byte aligned sections): token ids,
// positions, cache slots and table offsets [n] each, the RoPE table [n][head_dim], then the block
// tables, sized for the longest context so the layout depends on n alone (a captured graph keeps
// reading the same addresses).
struct MetaLayout {
    size_t tokens, positions, slots, offsets, rope, tables, end;
    MetaLayout(int n, int head_dim, int max_blocks) {
        auto up = [](size_t b) { return (b + 15) / 16 * 16; };
        const size_t ints = up(sizeof(int) * size_t(n));
        tokens = 0;
        positions = tokens + ints;
        slots = positions + ints;
        offsets = slots + ints;
        rope = offsets + ints;
        tables = rope + up(sizeof(float) * size_t(n) * head_dim);
        end = tables + sizeof(int) * size_t(n) * max_blocks;
    }
};
}  // namespace

bool Model::grow(Buffer& b, size_t bytes) {
    if (b.bytes() >= bytes) return false;
    b = Buffer(ops_, bytes);
    drop_graphs();  // they read the old address
    return true;
}

void Model::drop_graphs() {
    for (auto& [key, g] : graphs_) ops_->graph_destroy(g);
    graphs_.clear();
    graph_seen_.clear();
}

void Model::reserve_scratch(int n, int m) {
    const Config& c = cfg;
    const size_t f = sizeof(float), q_dim = size_t(c.n_heads) * c.head_dim, kv_dim = size_t(c.n_kv_heads) * c.head_dim;
    grow(x_, f * n * c.dim);            // residual stream      [n][dim]
    grow(xb_, f * n * c.dim);           // normed / projected   [n][dim]
    grow(q_, f * n * q_dim);            // queries              [n][q_dim]
    grow(k_, f * n * kv_dim);           // new keys             [n][kv_dim]
    grow(v_, f * n * kv_dim);           // new values           [n][kv_dim]
    grow(att_, f * n * q_dim);          // attention output     [n][q_dim]
    grow(hb_, f * n * c.hidden_dim);    // FFN gate             [n][hidden]
    grow(hb2_, f * n * c.hidden_dim);   // FFN up               [n][hidden]
    grow(xlast_, f * m * c.dim);        // rows for the logits  [m][dim]
    if (!ops_->host_memory()) grow(logits_, f * m * c.vocab_size);  // [m][vocab]
    if (c.n_experts > 0) {
        grow(router_, f * n * c.n_experts);  // router logits   [n][n_experts]
        grow(moe_, f * n * c.dim);           // experts' sum    [n][dim]
    }
}

// CUDA graphs per batch-size bucket. A batch of n <= kGraphMaxTokens entries (decode steps,
// verify runs, short prefills) runs as a bucket of N = 1, 2, 4, ..., 64 entries, padded with
// entries that change nothing: token 0 at position 0, cache slot -1 (rope_kv_write writes no K/V
// for it: ops.h) and a one-entry block table of its own (block 0, only read), so no sequence's
// cache is touched, no real token attends to a padding entry (tables are per entry), and padding
// rows are never logit rows. A graph is captured per key: the bucket, whether the classifier
// runs, the attention hints (has_runs, has_singles: they choose the attention kernels), and the
// cache; everything else that changes between steps (tokens, positions, slots, tables, RoPE
// angles) is read on the device from meta_dev_, whose layout depends on N alone, and scratch
// buffers that move drop every graph (grow). MoE layers route on the device (ops.h moe_ffn), so
// they are captured too; padding entries are routed like tokens (their experts' rows are computed
// and discarded). The classifier runs over all N rows, which costs what
// m rows cost when N <= 8 (one pass over its weights in the decode-sized product) or when every
// entry wants its logits (a decode step); other batches run op by op. Buckets rather than exact n:
// at most 7 sizes to capture (each capture is a full eager run plus instantiation) and a bounded
// number of graphs per cache; the padding costs little (padding rows ride along in products that
// read the weights once, and their attention reads one key).
namespace {
constexpr size_t kMaxGraphs = 64;  // captures stop here (keys seen later run op by op)
int graph_bucket(int n) {
    int b = 1;
    while (b < n) b *= 2;
    return b;
}
}  // namespace

// Builds this batch's metadata on the host and makes it visible to the backend, then runs it.
// Returns where the logits are: `host_logits` on a host-memory backend, else logits_ (or picked_).
float* Model::run_batch(KVCache& kv, const std::vector<BatchToken>& batch, const std::vector<int>& logit_rows,
                        float* host_logits) {
    const Config& c = cfg;
    const int n = int(batch.size()), m = int(logit_rows.size());
    assert(kv.kv_dim == c.n_kv_heads * c.head_dim && kv.n_layers == c.n_layers);
    kv.allocate(ops_);
    const int bucket = graph_bucket(n);
    // Not under tensor parallelism: the all-reduces would have to be captured too, and NCCL in a
    // graph needs care (every rank capturing and replaying the same graphs in step, NCCL's own
    // capture rules); untried, so tensor-parallel steps run op by op.
    const bool graph = ops_->graphs() && !comm_ && n >= 1 && n <= kGraphMaxTokens &&
                       (m == 0 || m == n || bucket <= 8);
    const int padded = graph ? bucket : n;  // entries run: the batch, then padding
    const int classified = graph && m > 0 ? padded : m;  // rows through the classifier
    reserve_scratch(padded, classified);

    // Where each token's K/V go, and its block table: each sequence's table once, as far as the
    // batch's furthest position in it needs.
    tokens_.resize(size_t(padded));
    positions_.resize(size_t(padded));
    slots_.resize(size_t(padded));
    table_offsets_.resize(size_t(padded));
    tables_.clear();
    for (int i = 0; i < n; i++) {
        const BatchToken& t = batch[i];
        auto it = kv.tables.find(t.seq);
        assert(it != kv.tables.end() && size_t(t.pos / kv.block_size) < it->second.size() &&
               "forward: positions must be reserved in the KV cache first");
        assert(t.token >= 0 && t.token < c.vocab_size && t.pos >= 0 && t.pos < c.max_seq_len);
        tokens_[i] = t.token;
        positions_[i] = t.pos;
        slots_[i] = it->second[t.pos / kv.block_size] * kv.block_size + t.pos % kv.block_size;
        int j = 0;  // an earlier token of the same sequence shares its table
        while (j < i && batch[j].seq != t.seq) j++;
        if (j < i) {
            table_offsets_[i] = table_offsets_[j];
            continue;
        }
        int last = t.pos;
        for (int k = i + 1; k < n; k++)
            if (batch[k].seq == t.seq) last = std::max(last, batch[k].pos);
        table_offsets_[i] = int(tables_.size());
        tables_.insert(tables_.end(), it->second.begin(), it->second.begin() + (last / kv.block_size + 1));
    }
    for (int i = n; i < padded; i++) {  // padding (see above)
        tokens_[i] = 0;
        positions_[i] = 0;
        slots_[i] = -1;
        table_offsets_[i] = int(tables_.size());
        tables_.push_back(0);
    }
    // Runs (adjacent entries sharing a table) and singles, for the attention kernels' choice.
    bool has_runs = false, has_singles = false;
    for (int i = 0; i < padded; i++) {
        const int off = table_offsets_[i];
        const bool shared = (i > 0 && table_offsets_[i - 1] == off) || (i + 1 < padded && table_offsets_[i + 1] == off);
        has_runs = has_runs || shared;
        has_singles = has_singles || !shared;
    }
    // RoPE angles, once for every layer: pos * frequency in double (positions times small
    // frequencies lose digits in f32), then cos and sin.
    if (rope_freq_.empty()) rope_freq_ = c.rope_frequencies();
    rope_.resize(size_t(padded) * c.head_dim);
    for (int t = 0; t < padded; t++)
        for (int i = 0; i < c.head_dim / 2; i++) {
            const double angle = positions_[t] * rope_freq_[i];
            rope_[size_t(t) * c.head_dim + 2 * i] = float(std::cos(angle));
            rope_[size_t(t) * c.head_dim + 2 * i + 1] = float(std::sin(angle));
        }
    const int max_blocks = (c.max_seq_len + kv.block_size - 1) / kv.block_size;
    const MetaLayout L(padded, c.head_dim, max_blocks);
    const size_t used = L.tables + sizeof(int) * tables_.size();
    assert(used <= L.end);
    meta_.resize(used);
    std::memcpy(meta_.data() + L.tokens, tokens_.data(), sizeof(int) * size_t(padded));
    std::memcpy(meta_.data() + L.positions, positions_.data(), sizeof(int) * size_t(padded));
    std::memcpy(meta_.data() + L.slots, slots_.data(), sizeof(int) * size_t(padded));
    std::memcpy(meta_.data() + L.offsets, table_offsets_.data(), sizeof(int) * size_t(padded));
    std::memcpy(meta_.data() + L.rope, rope_.data(), sizeof(float) * rope_.size());
    std::memcpy(meta_.data() + L.tables, tables_.data(), sizeof(int) * tables_.size());
    const uint8_t* meta = meta_.data();  // the CPU reads the host bytes in place
    if (!ops_->host_memory()) {
        grow(meta_dev_, L.end);
        ops_->upload(meta_dev_.data(), meta_.data(), used);
        meta = static_cast<const uint8_t*>(meta_dev_.data());
    }
    auto ints = [&](size_t at) { return reinterpret_cast<const int*>(meta + at); };
    AttentionBatch ab{ints(L.positions), ints(L.tables), ints(L.offsets), kv.block_size,
                      c.n_heads, c.n_kv_heads, c.head_dim, c.max_seq_len};
    ab.has_runs = has_runs;
    ab.has_singles = has_singles;
    float* out = ops_->host_memory() ? host_logits : logits_.f32();
    const float* rope = reinterpret_cast<const float*>(meta + L.rope);
    if (!graph) {
        run_ops(kv, n, logit_rows, out, ab, ints(L.tokens), rope, ints(L.slots));
        return out;
    }

    // The bucket's graph: the first step of each key runs the ops, the second captures them, every
    // later one replays the capture.
    assert(!ops_->host_memory());
    all_rows_.resize(size_t(classified));
    for (int r = 0; r < classified; r++) all_rows_[size_t(r)] = r;
    // The cache's addresses and layout are baked into the captured kernels' arguments.
    const std::string key = fmt("%d %d %d %d %p %p %d %d", padded, classified > 0, int(has_runs), int(has_singles),
                                kv.k.data(), kv.v.data(), kv.block_size, kv.num_blocks);
    auto it = graphs_.find(key);
    if (it == graphs_.end() && (graph_seen_[key]++ == 0 || graphs_.size() >= kMaxGraphs)) {
        run_ops(kv, padded, all_rows_, out, ab, ints(L.tokens), rope, ints(L.slots));
    } else {
        if (it == graphs_.end()) {
            ops_->capture_begin();
            try {
                run_ops(kv, padded, all_rows_, out, ab, ints(L.tokens), rope, ints(L.slots));
            } catch (...) {
                ops_->graph_destroy(ops_->capture_end());
                throw;
            }
            it = graphs_.emplace(key, ops_->capture_end()).first;
        }
        ops_->graph_launch(it->second);
    }
    // The rows asked for, in their order: the first m rows when they are 0..m-1 (a decode step),
    // else gathered.
    bool prefix = true;
    for (int r = 0; r < m; r++) prefix = prefix && logit_rows[size_t(r)] == r;
    if (prefix) return out;
    const size_t row = sizeof(float) * size_t(c.vocab_size);
    if (picked_.bytes() < row * size_t(m)) picked_ = Buffer(ops_, row * size_t(m));  // no graph reads it
    for (int r = 0; r < m; r++)
        ops_->copy(static_cast<uint8_t*>(picked_.data()) + row * size_t(r),
                   reinterpret_cast<const uint8_t*>(out) + row * size_t(logit_rows[size_t(r)]), row);
    return picked_.f32();
}

// The model proper, as PyTorch's Llama reads: embed, then per layer attention and the FFN, each a
// residual branch; the final norm and the classifier only for the rows the caller asked for.
void Model::run_ops(KVCache& kv, int n, const std::vector<int>& logit_rows, float* out, const AttentionBatch& ab,
                    const int* tokens, const float* rope, const int* slots) {
    const Config& c = cfg;
    float *x = x_.f32(), *xb = xb_.f32(), *q = q_.f32(), *k = k_.f32(), *v = v_.f32(), *att = att_.f32();
    ops_->embed(x, w.tok_embeddings, tokens, n);
    for (int l = 0; l < c.n_layers; l++) {
        const LayerWeights& L = w.layers[l];
        // attention block
        ops_->rmsnorm(xb, x, L.attn_norm, n, c.dim, c.norm_eps);
        ops_->matmul_qkv(q, k, v, xb, L.wq, L.wk, L.wv, n);
        ops_->rope_kv_write(q, k, v, kv.k_layer(l), kv.v_layer(l), rope, slots, n, c.n_heads, c.n_kv_heads, c.head_dim);
        ops_->attention(att, q, kv.k_layer(l), kv.v_layer(l), ab, n);
        ops_->matmul(xb, att, L.wo, n);
        if (comm_) comm_->all_reduce_sum(xb, size_t(n) * c.dim);  // sum the ranks' heads
        ops_->add(x, xb, size_t(n) * c.dim);
        // SwiGLU feed-forward block: dense, or a mixture of SwiGLU experts
        ops_->rmsnorm(xb, x, L.ffn_norm, n, c.dim, c.norm_eps);
        float* ffn_out = xb;
        if (c.n_experts > 0) {  // this rank's part of every expert under TP: the all-reduce completes it
            ops_->matmul(router_.f32(), xb, L.gate, n);
            ops_->moe_ffn(moe_.f32(), xb, router_.f32(), L.experts.data(), c.n_experts, c.n_experts_per_tok, n);
            ffn_out = moe_.f32();
        } else {
            ops_->ffn_gate_up(hb_.f32(), hb2_.f32(), xb, L.w1, L.w3, n);
            ops_->matmul(xb, hb_.f32(), L.w2, n);
        }
        if (comm_) comm_->all_reduce_sum(ffn_out, size_t(n) * c.dim);  // sum the ranks' FFN units
        ops_->add(x, ffn_out, size_t(n) * c.dim);
    }
    const int m = int(logit_rows.size());
    if (m == 0) return;
    bool contiguous = true;  // rows r0, r0 + 1, ...: one copy (a captured step's classifier takes all rows)
    for (int r = 0; r < m; r++) {
        assert(logit_rows[r] >= 0 && logit_rows[r] < n);
        contiguous = contiguous && logit_rows[r] == logit_rows[0] + r;
    }
    if (contiguous) {
        ops_->copy(xlast_.f32(), x + size_t(logit_rows[0]) * c.dim, sizeof(float) * c.dim * size_t(m));
    } else {
        for (int r = 0; r < m; r++)
            ops_->copy(xlast_.f32() + size_t(r) * c.dim, x + size_t(logit_rows[r]) * c.dim, sizeof(float) * c.dim);
    }
    ops_->rmsnorm(xlast_.f32(), xlast_.f32(), w.norm, m, c.dim, c.norm_eps);
    ops_->matmul(out, xlast_.f32(), w.output, m);
}

void Model::forward(KVCache& kv, const std::vector<BatchToken>& batch, const std::vector<int>& logit_rows,
                    float* logits) {
    const size_t m = logit_rows.size();
    float* out = run_batch(kv, batch, logit_rows, logits);
    if (m > 0 && out != logits) ops_->download(logits, out, sizeof(float) * m * cfg.vocab_size);
    // The classifier is replicated, so ranks agree already if the all-reduces gave every rank the
    // same bits; rank 0's logits make sure of it, since every rank samples from them.
    if (comm_ && m > 0) comm_->broadcast(logits, m * cfg.vocab_size * sizeof(float), 0);
}

bool Model::forward_sample(KVCache& kv, const std::vector<BatchToken>& batch, const std::vector<int>& logit_rows,
                           Sampler& sampler, int* tokens) {
    if (!ops_->can_sample() || comm_ || logit_rows.empty()) return false;
    std::vector<float> u(logit_rows.size());
    for (float& x : u) x = sampler.uniform();
    const float* out = run_batch(kv, batch, logit_rows, nullptr);
    ops_->sample(tokens, out, int(logit_rows.size()), cfg.vocab_size, sampler.params(), u.data());
    return true;
}
