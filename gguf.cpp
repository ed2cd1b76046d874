// gguf.cpp: the GGUF reader (validated over mmap), the ggml block formats fastgen converts from,
// and the `llama` architecture's metadata as a Config and a tokenizer.
#include "gguf.h"

#include <algorithm>
#include <cassert>
#include <climits>
#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "common.h"
#include "model.h"

using json = nlohmann::json;

// ---------------------------------------------------------------------------------------------
// Types

const char* gguf_type_name(GgufType t) {
    static const char* names[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array",
                                  "u64", "i64", "f64"};
    uint32_t i = uint32_t(t);
    return i < sizeof names / sizeof names[0] ? names[i] : "unknown";
}

bool GgufValue::is_integer() const {
    switch (type) {
        case GgufType::U8: case GgufType::I8: case GgufType::U16: case GgufType::I16: case GgufType::U32:
        case GgufType::I32: case GgufType::U64: case GgufType::I64: return true;
        default: return false;
    }
}

namespace {

// Every ggml type id llama.cpp has shipped (ids 4 and 5, Q4_2/Q4_3, and 31-33/36-38, the
// interleaved repacks, were removed from the format and never appear in files).
const GgmlType kGgmlTypes[] = {
    {0, "F32", 1, 4, true},        {1, "F16", 1, 2, true},        {2, "Q4_0", 32, 18, true},
    {3, "Q4_1", 32, 20, true},     {6, "Q5_0", 32, 22, false},    {7, "Q5_1", 32, 24, false},
    {8, "Q8_0", 32, 34, true},     {9, "Q8_1", 32, 40, false},    {10, "Q2_K", 256, 84, false},
    {11, "Q3_K", 256, 110, false}, {12, "Q4_K", 256, 144, false}, {13, "Q5_K", 256, 176, false},
    {14, "Q6_K", 256, 210, false}, {15, "Q8_K", 256, 292, false}, {16, "IQ2_XXS", 256, 66, false},
    {17, "IQ2_XS", 256, 74, false}, {18, "IQ3_XXS", 256, 98, false}, {19, "IQ1_S", 256, 50, false},
    {20, "IQ4_NL", 32, 18, false}, {21, "IQ3_S", 256, 110, false}, {22, "IQ2_S", 256, 82, false},
    {23, "IQ4_XS", 256, 136, false}, {24, "I8", 1, 1, false},     {25, "I16", 1, 2, false},
    {26, "I32", 1, 4, false},      {27, "I64", 1, 8, false},      {28, "F64", 1, 8, false},
    {29, "IQ1_M", 256, 56, false}, {30, "BF16", 1, 2, true},      {34, "TQ1_0", 256, 54, false},
    {35, "TQ2_0", 256, 66, false}, {39, "MXFP4", 32, 17, false},
};

}  // namespace

const GgmlType* ggml_type(uint32_t id) {
    for (const GgmlType& t : kGgmlTypes)
        if (t.id == id) return &t;
    return nullptr;
}

std::string ggml_type_name(uint32_t id) {
    const GgmlType* t = ggml_type(id);
    return t ? t->name : fmt("unknown type %u", id);
}

int64_t GgufTensor::numel() const {
    int64_t n = 1;
    for (int64_t d : ne) n *= d;
    return n;
}

std::vector<int64_t> GgufTensor::shape() const { return std::vector<int64_t>(ne.rbegin(), ne.rend()); }

// ---------------------------------------------------------------------------------------------
// Reading

namespace {

constexpr uint32_t kGgufMagic = 0x46554747;  // "GGUF" little-endian
constexpr int kMaxDims = 4;                  // GGML_MAX_DIMS
constexpr int kMaxArrayDepth = 8;            // nesting arrays deeper than this is corruption, not data

// A bounds-checked cursor over the mapped header; every read names what it was reading.
struct Cursor {
    const uint8_t* data;
    size_t size, pos = 0;
    const std::string& path;

    size_t left() const { return size - pos; }
    void need(size_t n, const std::string& what) const {
        if (n > left())
            throw Error(fmt("%s: truncated: %s needs %zu bytes at offset %zu, the file has %zu left", path.c_str(),
                            what.c_str(), n, pos, left()));
    }
    template <typename T>
    T get(const std::string& what) {
        need(sizeof(T), what);
        T v;
        std::memcpy(&v, data + pos, sizeof(T));
        pos += sizeof(T);
        return v;
    }
    std::string string(const std::string& what) {
        uint64_t n = get<uint64_t>(what + " (string length)");
        need(n, fmt("%s (a %llu-byte string)", what.c_str(), (unsigned long long)n));
        std::string s(reinterpret_cast<const char*>(data + pos), size_t(n));
        pos += size_t(n);
        return s;
    }
};

size_t scalar_size(GgufType t) {
    switch (t) {
        case GgufType::U8: case GgufType::I8: case GgufType::BOOL: return 1;
        case GgufType::U16: case GgufType::I16: return 2;
        case GgufType::U32: case GgufType::I32: case GgufType::F32: return 4;
        case GgufType::U64: case GgufType::I64: case GgufType::F64: return 8;
        case GgufType::STRING: case GgufType::ARRAY: return 0;
    }
    return 0;
}

bool known_type(uint32_t t) { return t <= uint32_t(GgufType::F64); }

GgufValue read_value(Cursor& c, GgufType type, const std::string& key, int depth) {
    GgufValue v;
    v.type = type;
    const std::string what = "metadata '" + key + "'";
    switch (type) {
        case GgufType::U8: v.i = c.get<uint8_t>(what); break;
        case GgufType::I8: v.i = c.get<int8_t>(what); break;
        case GgufType::U16: v.i = c.get<uint16_t>(what); break;
        case GgufType::I16: v.i = c.get<int16_t>(what); break;
        case GgufType::U32: v.i = c.get<uint32_t>(what); break;
        case GgufType::I32: v.i = c.get<int32_t>(what); break;
        case GgufType::I64: v.i = c.get<int64_t>(what); break;
        case GgufType::U64:
            v.u = c.get<uint64_t>(what);
            v.i = v.u > uint64_t(INT64_MAX) ? INT64_MAX : int64_t(v.u);
            break;
        case GgufType::F32: v.f = c.get<float>(what); break;
        case GgufType::F64: v.f = c.get<double>(what); break;
        case GgufType::BOOL: {
            uint8_t b = c.get<uint8_t>(what);
            if (b > 1) throw Error(fmt("%s: %s: bool value %u is neither 0 nor 1", c.path.c_str(), what.c_str(), b));
            v.i = b;
            break;
        }
        case GgufType::STRING: v.s = c.string(what); break;
        case GgufType::ARRAY: {
            if (depth >= kMaxArrayDepth)
                throw Error(fmt("%s: %s: arrays nested more than %d deep", c.path.c_str(), what.c_str(), kMaxArrayDepth));
            uint32_t et = c.get<uint32_t>(what + " (array element type)");
            if (!known_type(et))
                throw Error(fmt("%s: %s: unknown array element type %u", c.path.c_str(), what.c_str(), et));
            v.elem = GgufType(et);
            uint64_t n = c.get<uint64_t>(what + " (array length)");
            // Every element takes at least one byte (a string or array at least 8): a count the rest
            // of the file cannot hold is corruption, refused before anything is allocated for it.
            size_t min_elem = scalar_size(v.elem) ? scalar_size(v.elem) : 8;
            if (n > c.left() / min_elem)
                throw Error(fmt("%s: %s: array of %llu %s elements does not fit in the %zu bytes left", c.path.c_str(),
                                what.c_str(), (unsigned long long)n, gguf_type_name(v.elem), c.left()));
            v.array.reserve(size_t(n));
            for (uint64_t i = 0; i < n; i++) v.array.push_back(read_value(c, v.elem, key, depth + 1));
            break;
        }
    }
    return v;
}

}  // namespace

GgufFile::GgufFile(const std::string& p) : path(p), map(p) {
    const char* f = path.c_str();
    Cursor c{map.data, map.size, 0, path};
    if (map.size < 4 || c.get<uint32_t>("magic") != kGgufMagic)
        throw Error(fmt("%s: not a GGUF file (no \"GGUF\" magic at the start)", f));
    version = c.get<uint32_t>("version");
    if (version == 0x02000000 || version == 0x03000000)  // v3 allows big-endian files: ours are little
        throw Error(fmt("%s: a big-endian GGUF file (version %u byte-swapped); only little-endian files are read", f,
                        version >> 24));
    if (version != 2 && version != 3)
        throw Error(fmt("%s: GGUF version %u is not supported (versions 2 and 3 are)", f, version));
    const uint64_t n_tensors = c.get<uint64_t>("tensor count"), n_kv = c.get<uint64_t>("metadata count");
    // A metadata entry takes at least 8 (key length) + 4 (type) + 1 bytes, a tensor info 8 + 4 + 4 + 8.
    if (n_kv > c.left() / 13)
        throw Error(fmt("%s: metadata count %llu cannot fit in a %zu-byte file", f, (unsigned long long)n_kv, map.size));
    if (n_tensors > c.left() / 24)
        throw Error(fmt("%s: tensor count %llu cannot fit in a %zu-byte file", f, (unsigned long long)n_tensors, map.size));

    for (uint64_t k = 0; k < n_kv; k++) {
        std::string key = c.string(fmt("metadata key %llu", (unsigned long long)k));
        uint32_t t = c.get<uint32_t>("metadata '" + key + "' type");
        if (!known_type(t)) throw Error(fmt("%s: metadata '%s': unknown value type %u", f, key.c_str(), t));
        GgufValue v = read_value(c, GgufType(t), key, 0);
        if (metadata.count(key)) throw Error(fmt("%s: metadata key '%s' appears twice", f, key.c_str()));
        keys.push_back(key);
        metadata.emplace(key, std::move(v));
    }
    if (const GgufValue* a = find("general.alignment")) {
        if (!a->is_integer() || a->i <= 0 || a->i > (1 << 20) || (a->i & (a->i - 1)) != 0)
            throw Error(fmt("%s: general.alignment must be a power of two, found %lld", f, (long long)a->i));
        alignment = size_t(a->i);
    }

    for (uint64_t k = 0; k < n_tensors; k++) {
        GgufTensor t;
        t.name = c.string(fmt("tensor info %llu name", (unsigned long long)k));
        const std::string what = "tensor '" + t.name + "'";
        const char* w = what.c_str();
        uint32_t n_dims = c.get<uint32_t>(what + " dimension count");
        if (n_dims == 0 || n_dims > kMaxDims)
            throw Error(fmt("%s: %s has %u dimensions (1 to %d allowed)", f, w, n_dims, kMaxDims));
        for (uint32_t d = 0; d < n_dims; d++) {
            int64_t n = c.get<int64_t>(what + " dimensions");
            if (n <= 0 || n > (int64_t(1) << 40))
                throw Error(fmt("%s: %s: dimension %u is %lld", f, w, d, (long long)n));
            t.ne.push_back(n);
        }
        t.type = c.get<uint32_t>(what + " type");
        t.offset = c.get<uint64_t>(what + " offset");
        const GgmlType* gt = ggml_type(t.type);
        if (!gt) throw Error(fmt("%s: %s has unknown ggml type %u", f, w, t.type));
        if (t.ne[0] % gt->block != 0)
            throw Error(fmt("%s: %s: %lld columns are not a whole number of %s blocks of %d", f, w,
                            (long long)t.ne[0], gt->name, gt->block));
        // Dims are at most 2^40 each: compute the element count in long double to see overflow.
        long double numel = 1;
        for (int64_t d : t.ne) numel *= (long double)d;
        if (numel > (long double)(int64_t(1) << 50))
            throw Error(fmt("%s: %s: %Lg elements is absurd", f, w, numel));
        t.nbytes = size_t(t.numel()) / size_t(gt->block) * size_t(gt->bytes);
        if (tensor_index.count(t.name)) throw Error(fmt("%s: %s appears twice", f, w));
        tensor_index[t.name] = tensors.size();
        tensors.push_back(std::move(t));
    }

    data_start = (c.pos + alignment - 1) / alignment * alignment;
    if (data_start > map.size && !tensors.empty())
        throw Error(fmt("%s: truncated: the data section would start at %zu, past the end (%zu bytes)", f, data_start,
                        map.size));
    const size_t data_size = map.size > data_start ? map.size - data_start : 0;
    for (GgufTensor& t : tensors) {
        if (t.offset % alignment != 0)
            throw Error(fmt("%s: tensor '%s': offset %llu is not a multiple of the alignment %zu", f, t.name.c_str(),
                            (unsigned long long)t.offset, alignment));
        if (t.offset > data_size || t.nbytes > data_size - t.offset)
            throw Error(fmt("%s: truncated tensor data: tensor '%s' (%s, %zu bytes at data offset %llu) runs past the "
                            "end of the file (data section is %zu bytes)", f, t.name.c_str(),
                            ggml_type_name(t.type).c_str(), t.nbytes, (unsigned long long)t.offset, data_size));
        t.data = map.data + data_start + t.offset;
    }
}

const GgufValue* GgufFile::find(const std::string& key) const {
    auto it = metadata.find(key);
    return it == metadata.end() ? nullptr : &it->second;
}

const GgufTensor* GgufFile::find_tensor(const std::string& name) const {
    auto it = tensor_index.find(name);
    return it == tensor_index.end() ? nullptr : &tensors[it->second];
}

namespace {
const GgufValue& need_key(const GgufFile& f, const std::string& key) {
    const GgufValue* v = f.find(key);
    if (!v) throw Error(fmt("%s: GGUF metadata has no '%s'", f.path.c_str(), key.c_str()));
    return *v;
}

Error wrong_type(const GgufFile& f, const std::string& key, const GgufValue& v, const char* want) {
    return Error(fmt("%s: GGUF metadata '%s' is %s, expected %s", f.path.c_str(), key.c_str(), gguf_type_name(v.type),
                     want));
}
}  // namespace

int64_t GgufFile::get_int(const std::string& key) const {
    const GgufValue& v = need_key(*this, key);
    if (!v.is_integer()) throw wrong_type(*this, key, v, "an integer");
    if (v.type == GgufType::U64 && v.u > uint64_t(INT64_MAX))
        throw Error(fmt("%s: GGUF metadata '%s' = %llu is out of range", path.c_str(), key.c_str(),
                        (unsigned long long)v.u));
    return v.i;
}

double GgufFile::get_float(const std::string& key) const {
    const GgufValue& v = need_key(*this, key);
    if (v.type == GgufType::F32 || v.type == GgufType::F64) return v.f;
    if (v.is_integer()) return double(v.i);
    throw wrong_type(*this, key, v, "a number");
}

const std::string& GgufFile::get_string(const std::string& key) const {
    const GgufValue& v = need_key(*this, key);
    if (v.type != GgufType::STRING) throw wrong_type(*this, key, v, "a string");
    return v.s;
}

bool GgufFile::get_bool(const std::string& key) const {
    const GgufValue& v = need_key(*this, key);
    if (v.type != GgufType::BOOL) throw wrong_type(*this, key, v, "a bool");
    return v.i != 0;
}

const GgufValue& GgufFile::get_array(const std::string& key, GgufType elem) const {
    const GgufValue& v = need_key(*this, key);
    if (v.type != GgufType::ARRAY || v.elem != elem)
        throw wrong_type(*this, key, v, fmt("an array of %s", gguf_type_name(elem)).c_str());
    return v;
}

bool is_gguf_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    uint32_t magic = 0;
    in.read(reinterpret_cast<char*>(&magic), 4);
    return in.gcount() == 4 && magic == kGgufMagic;
}

// ---------------------------------------------------------------------------------------------
// Block formats

namespace {
float f16_at(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return f16_to_f32(h);
}
}  // namespace

void ggml_q8_0_split(const uint8_t* src, size_t n, int8_t* q, float* scales) {
    for (size_t b = 0; b < n / kGgmlBlock; b++, src += 34) {
        if (scales) scales[b] = f16_at(src);
        if (q) std::memcpy(q + b * kGgmlBlock, src + 2, kGgmlBlock);
    }
}

void ggml_q4_split(uint32_t type, const uint8_t* src, size_t n, uint8_t* packed, float* scales, uint8_t* zeros,
                   float* mins) {
    assert(type == kGgmlQ4_0 || type == kGgmlQ4_1);
    const bool q4_1 = type == kGgmlQ4_1;
    const size_t block_bytes = q4_1 ? 20 : 18;
    for (size_t b = 0; b < n / kGgmlBlock; b++, src += block_bytes) {
        if (scales) scales[b] = f16_at(src);
        if (zeros) zeros[b] = 8;
        if (mins) mins[b] = q4_1 ? f16_at(src + 2) : 0.0f;
        if (!packed) continue;
        const uint8_t* qs = src + (q4_1 ? 4 : 2);
        // ggml: element j in the low nibble of qs[j], element j + 16 in its high nibble.
        // fastgen: element 2i in the low nibble of byte i, element 2i + 1 in the high nibble.
        uint8_t* out = packed + b * kGgmlBlock / 2;
        for (int i = 0; i < kGgmlBlock / 2; i++) {
            auto q = [&](int j) { return j < 16 ? qs[j] & 0xf : qs[j - 16] >> 4; };
            out[i] = uint8_t(q(2 * i) | q(2 * i + 1) << 4);
        }
    }
}

void ggml_dequantize_row(uint32_t type, const uint8_t* src, float* dst, size_t n) {
    switch (type) {
        case kGgmlF32: std::memcpy(dst, src, n * 4); return;
        case kGgmlF16: convert_floats(src, DType::F16, dst, DType::F32, n); return;
        case kGgmlBF16: convert_floats(src, DType::BF16, dst, DType::F32, n); return;
        case kGgmlQ8_0:
            for (size_t b = 0; b < n / kGgmlBlock; b++, src += 34) {
                const float d = f16_at(src);
                for (int j = 0; j < kGgmlBlock; j++) dst[b * kGgmlBlock + j] = d * float(int8_t(src[2 + j]));
            }
            return;
        case kGgmlQ4_0: case kGgmlQ4_1: {
            const bool q4_1 = type == kGgmlQ4_1;
            for (size_t b = 0; b < n / kGgmlBlock; b++, src += q4_1 ? 20 : 18) {
                const float d = f16_at(src), m = q4_1 ? f16_at(src + 2) : 0.0f;
                const uint8_t* qs = src + (q4_1 ? 4 : 2);
                float* o = dst + b * kGgmlBlock;
                for (int j = 0; j < 16; j++) {
                    const int lo = qs[j] & 0xf, hi = qs[j] >> 4;
                    o[j] = q4_1 ? d * float(lo) + m : d * float(lo - 8);
                    o[j + 16] = q4_1 ? d * float(hi) + m : d * float(hi - 8);
                }
            }
            return;
        }
    }
    assert(false && "ggml_dequantize_row: type not convertible");
}

// ---------------------------------------------------------------------------------------------
// The llama architecture

namespace {
int positive_int(const GgufFile& f, const std::string& key) {
    int64_t v = f.get_int(key);
    if (v <= 0 || v > INT_MAX)
        throw Error(fmt("%s: GGUF metadata '%s' = %lld must be a positive int", f.path.c_str(), key.c_str(),
                        (long long)v));
    return int(v);
}

// Llama 3.1/3.2 GGUFs carry Meta's RoPE scaling as the tensor rope_freqs.weight: per rotated pair i
// the factor ff_i that divides its frequency (llama.cpp's converter computes them from HF's
// rope_scaling and keeps none of its parameters). We recover them: `factor` is the largest ff; in
// the blend region 1/ff = (1 - s)/factor + s with s = L/wavelen/(high - low) - low/(high - low), a
// line in 1/wavelen whose slope and intercept give high and low once L (original_max_seq_len) is
// chosen; every L gives the same frequencies, so we take the L that makes low 1, as Meta's. Then
// every pair's frequency from the Config must equal theta^(-2i/d) / ff_i, or the file is refused.
void rope_scaling_from_factors(const GgufFile& f, const GgufTensor& t, Config& c) {
    const char* p = f.path.c_str();
    const int n = c.head_dim / 2;
    if (t.type != kGgmlF32 || t.ne != std::vector<int64_t>{n})
        throw Error(fmt("%s: tensor 'rope_freqs.weight' is %s [%lld], expected F32 [%d] (head_dim / 2)", p,
                        ggml_type_name(t.type).c_str(), (long long)t.ne[0], n));
    std::vector<double> ff(static_cast<size_t>(n)), base(static_cast<size_t>(n));
    double factor = 0;
    for (int i = 0; i < n; i++) {
        float v;
        std::memcpy(&v, t.data + 4 * size_t(i), 4);
        if (!(v >= 1.0f - 1e-6f && v < 1e6f))
            throw Error(fmt("%s: tensor 'rope_freqs.weight'[%d] = %g: not Llama 3 RoPE scaling (factors >= 1)", p, i, v));
        ff[size_t(i)] = v;
        base[size_t(i)] = std::pow(double(c.rope_theta), -2.0 * i / c.head_dim);
        factor = std::max(factor, double(v));
    }
    if (factor < 1 + 1e-6) return;  // all ones: no scaling
    // Least squares over the blend pairs: s = a / wavelen - b.
    double sx = 0, sy = 0, sxx = 0, sxy = 0;
    int m = 0;
    for (int i = 0; i < n; i++) {
        const double v = ff[size_t(i)];
        if (v < 1 + 1e-4 || v > factor * (1 - 1e-4)) continue;
        const double x = base[size_t(i)] / (2 * M_PI), y = (1 / v - 1 / factor) / (1 - 1 / factor);
        sx += x, sy += y, sxx += x * x, sxy += x * y, m++;
    }
    const double a = m >= 2 ? (m * sxy - sx * sy) / (m * sxx - sx * sx) : 0, b = m >= 2 ? (a * sx - sy) / m : 0;
    if (m < 2 || !(a > 0) || !(b > 0) || !(a / b < double(INT_MAX)))
        throw Error(fmt("%s: tensor 'rope_freqs.weight': RoPE factors that Llama 3's scaling (factor, low and high "
                        "frequency factors, original context) does not explain", p));
    // Parameters are round numbers in practice (8, 1, 4, 8192): snap what f32 noise moved off them.
    auto snap = [](double v) {
        const double r = std::round(v * 256) / 256;
        return std::fabs(r - v) <= 1e-5 * std::fabs(v) ? r : v;
    };
    c.rope_original_max_seq_len = int(std::lround(a / b));
    const double L = c.rope_original_max_seq_len;
    c.rope_factor = float(snap(factor));
    c.rope_low_freq_factor = float(snap(b * L / a));
    c.rope_high_freq_factor = float(snap((1 + b) * L / a));
    const std::vector<double> freq = c.rope_frequencies();
    for (int i = 0; i < n; i++) {
        const double want = base[size_t(i)] / ff[size_t(i)];
        if (std::fabs(freq[size_t(i)] - want) > 1e-5 * want)
            throw Error(fmt("%s: tensor 'rope_freqs.weight': pair %d's factor %g does not follow Llama 3's RoPE scaling "
                            "(best fit: factor %g, low %g, high %g, original context %d gives %g)", p, i, ff[size_t(i)],
                            c.rope_factor, c.rope_low_freq_factor, c.rope_high_freq_factor,
                            c.rope_original_max_seq_len, base[size_t(i)] / freq[size_t(i)]));
    }
}

int token_id(const GgufFile& f, const std::string& key, int vocab) {
    int64_t v = f.get_int(key);
    if (v < 0 || v >= vocab)
        throw Error(fmt("%s: GGUF metadata '%s' = %lld is not a token id below the vocabulary size %d",
                        f.path.c_str(), key.c_str(), (long long)v, vocab));
    return int(v);
}
}  // namespace

Config gguf_llama_config(const GgufFile& f) {
    const char* p = f.path.c_str();
    const std::string& arch = f.get_string("general.architecture");
    if (arch != "llama")
        throw Error(fmt("%s: GGUF architecture '%s' is not supported (only 'llama')", p, arch.c_str()));
    if (const GgufValue* e = f.find("llama.expert_count"); e && e->is_integer() && e->i > 0)
        throw Error(fmt("%s: a mixture-of-experts model (llama.expert_count = %lld) is not supported from GGUF; "
                        "convert the Hugging Face checkpoint instead", p, (long long)e->i));
    // Linear and YaRN RoPE scaling change every angle: refuse, do not run a model with the wrong
    // positions. (Llama 3's scaling comes as the tensor rope_freqs.weight, read below.)
    if (const GgufValue* s = f.find("llama.rope.scaling.type"); s && !(s->type == GgufType::STRING && s->s == "none"))
        throw Error(fmt("%s: RoPE scaling (llama.rope.scaling.type = '%s') is not supported yet", p, s->s.c_str()));
    for (const char* key : {"llama.rope.scaling.factor", "llama.rope.scale_linear"})
        if (const GgufValue* s = f.find(key); s && f.get_float(key) != 0.0 && f.get_float(key) != 1.0)
            throw Error(fmt("%s: RoPE scaling (%s = %g) is not supported yet", p, key, f.get_float(key)));

    Config c;
    c.n_layers = positive_int(f, "llama.block_count");
    c.dim = positive_int(f, "llama.embedding_length");
    c.hidden_dim = positive_int(f, "llama.feed_forward_length");
    c.n_heads = positive_int(f, "llama.attention.head_count");
    c.n_kv_heads = f.find("llama.attention.head_count_kv") ? positive_int(f, "llama.attention.head_count_kv") : c.n_heads;
    c.max_seq_len = positive_int(f, "llama.context_length");
    if (f.find("llama.attention.key_length")) {
        c.head_dim = positive_int(f, "llama.attention.key_length");
        if (f.find("llama.attention.value_length") && positive_int(f, "llama.attention.value_length") != c.head_dim)
            throw Error(fmt("%s: llama.attention.value_length differs from key_length %d (not supported)", p,
                            c.head_dim));
    } else {
        if (c.dim % c.n_heads != 0)
            throw Error(fmt("%s: llama.embedding_length %d is not divisible by llama.attention.head_count %d", p,
                            c.dim, c.n_heads));
        c.head_dim = c.dim / c.n_heads;
    }
    if (f.find("llama.rope.dimension_count") && positive_int(f, "llama.rope.dimension_count") != c.head_dim)
        throw Error(fmt("%s: llama.rope.dimension_count = %d but the head dimension is %d: partial rotary "
                        "embeddings are not supported", p, positive_int(f, "llama.rope.dimension_count"), c.head_dim));
    c.norm_eps = float(f.get_float("llama.attention.layer_norm_rms_epsilon"));
    c.rope_theta = f.find("llama.rope.freq_base") ? float(f.get_float("llama.rope.freq_base")) : 10000.0f;
    const GgufValue& tokens = f.get_array("tokenizer.ggml.tokens", GgufType::STRING);
    if (tokens.array.empty() || tokens.array.size() > size_t(INT_MAX))
        throw Error(fmt("%s: tokenizer.ggml.tokens has %zu entries", p, tokens.array.size()));
    c.vocab_size = int(tokens.array.size());
    if (f.find("llama.vocab_size") && positive_int(f, "llama.vocab_size") != c.vocab_size)
        throw Error(fmt("%s: llama.vocab_size = %d but tokenizer.ggml.tokens has %d entries", p,
                        positive_int(f, "llama.vocab_size"), c.vocab_size));
    c.bos_id = token_id(f, "tokenizer.ggml.bos_token_id", c.vocab_size);
    c.eos_id = token_id(f, "tokenizer.ggml.eos_token_id", c.vocab_size);
    c.tie_embeddings = f.find_tensor("output.weight") == nullptr;
    if (const GgufTensor* t = f.find_tensor("rope_freqs.weight")) rope_scaling_from_factors(f, *t, c);
    c.validate(f.path);
    return c;
}

// ---------------------------------------------------------------------------------------------
// Tokenizers

namespace {

// GGUF token types (the same numbers as sentencepiece's piece types).
enum TokenType { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };

std::vector<int32_t> token_types(const GgufFile& f, size_t n) {
    std::vector<int32_t> types(n, kNormal);
    if (!f.find("tokenizer.ggml.token_type")) return types;
    const GgufValue& a = f.get_array("tokenizer.ggml.token_type", GgufType::I32);
    if (a.array.size() != n)
        throw Error(fmt("%s: tokenizer.ggml.token_type has %zu entries, tokenizer.ggml.tokens %zu", f.path.c_str(),
                        a.array.size(), n));
    for (size_t i = 0; i < n; i++) types[i] = int32_t(a.array[i].i);
    return types;
}

bool add_bos(const GgufFile& f) {
    return f.find("tokenizer.ggml.add_bos_token") ? f.get_bool("tokenizer.ggml.add_bos_token") : true;
}

json byte_level(bool use_regex) {
    return {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", use_regex}};
}

// llama.cpp's tokenizer.ggml.pre names the pre-tokenizer regexes of the Hugging Face original.
json pre_tokenizer(const GgufFile& f) {
    const std::string pre = f.find("tokenizer.ggml.pre") ? f.get_string("tokenizer.ggml.pre") : "gpt2";
    if (pre == "gpt2" || pre == "default") return byte_level(true);
    if (pre == "smollm")
        return {{"type", "Sequence"},
                {"pretokenizers", {{{"type", "Digits"}, {"individual_digits", true}}, byte_level(true)}}};
    if (pre == "llama-bpe" || pre == "llama3") {
        const char* regex =
            "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
            "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
        json split = {{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", "Isolated"}, {"invert", false}};
        return {{"type", "Sequence"}, {"pretokenizers", {split, byte_level(false)}}};
    }
    throw Error(fmt("%s: tokenizer.ggml.pre '%s' is not supported (gpt2, smollm, llama-bpe)", f.path.c_str(),
                    pre.c_str()));
}

}  // namespace

std::string gguf_tokenizer_json(const GgufFile& f) {
    const char* p = f.path.c_str();
    const std::string& model = f.get_string("tokenizer.ggml.model");
    if (model != "gpt2")
        throw Error(fmt("%s: tokenizer.ggml.model '%s' is not a byte-level BPE (gpt2) tokenizer", p, model.c_str()));
    const GgufValue& tokens = f.get_array("tokenizer.ggml.tokens", GgufType::STRING);
    const GgufValue& merges = f.get_array("tokenizer.ggml.merges", GgufType::STRING);
    const std::vector<int32_t> types = token_types(f, tokens.array.size());

    json vocab = json::object(), added = json::array(), merge_list = json::array();
    for (size_t id = 0; id < tokens.array.size(); id++) {
        const std::string& t = tokens.array[id].s;
        if (!well_formed_utf8(t))  // byte-level BPE tokens are always UTF-8 (bytes mapped to characters)
            throw Error(fmt("%s: tokenizer.ggml.tokens: token %zu is not valid UTF-8", p, id));
        if (vocab.contains(t))
            throw Error(fmt("%s: tokenizer.ggml.tokens: token %zu '%s' repeats token %d", p, id, t.c_str(),
                            vocab[t].get<int>()));
        vocab[t] = id;
        if (types[id] == kControl || types[id] == kUserDefined)
            added.push_back({{"id", id}, {"content", t}, {"single_word", false}, {"lstrip", false},
                             {"rstrip", false}, {"normalized", false}, {"special", true}});
    }
    for (size_t i = 0; i < merges.array.size(); i++) {
        const std::string& m = merges.array[i].s;
        size_t space = m.find(' ');
        if (space == std::string::npos || space == 0 || space + 1 == m.size() || m.find(' ', space + 1) != std::string::npos)
            throw Error(fmt("%s: tokenizer.ggml.merges: '%s' is not two tokens separated by one space", p, m.c_str()));
        if (!well_formed_utf8(m)) throw Error(fmt("%s: tokenizer.ggml.merges: merge %zu is not valid UTF-8", p, i));
        merge_list.push_back(m);
    }
    json j = {{"version", "1.0"}, {"truncation", nullptr}, {"padding", nullptr}, {"added_tokens", added},
              {"normalizer", nullptr}, {"pre_tokenizer", pre_tokenizer(f)}};
    const bool bos = add_bos(f);
    if (bos) {
        const int bos_id = token_id(f, "tokenizer.ggml.bos_token_id", int(tokens.array.size()));
        const std::string& b = tokens.array[size_t(bos_id)].s;
        j["post_processor"] = {
            {"type", "TemplateProcessing"},
            {"single", {{{"SpecialToken", {{"id", b}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
            {"pair",
             {{{"SpecialToken", {{"id", b}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
              {{"SpecialToken", {{"id", b}, {"type_id", 1}}}}, {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}}},
            {"special_tokens", {{b, {{"id", b}, {"ids", {bos_id}}, {"tokens", {b}}}}}}};
    } else {
        j["post_processor"] = nullptr;
    }
    j["decoder"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};
    j["model"] = {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
                  {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false},
                  {"ignore_merges", false}, {"vocab", vocab}, {"merges", merge_list}};
    return j.dump();
}

namespace {
// Protocol buffer wire format, just what a sentencepiece ModelProto needs.
void put_varint(std::string& out, uint64_t v) {
    while (v >= 0x80) {
        out.push_back(char(uint8_t(v) | 0x80));
        v >>= 7;
    }
    out.push_back(char(v));
}
void put_tag(std::string& out, int field, int wire) { put_varint(out, uint64_t(field) << 3 | uint64_t(wire)); }
void put_bytes(std::string& out, int field, const std::string& s) {
    put_tag(out, field, 2);
    put_varint(out, s.size());
    out += s;
}
void put_int(std::string& out, int field, int64_t v) {  // int32/bool/enum: negatives as 10-byte varints
    put_tag(out, field, 0);
    put_varint(out, uint64_t(v));
}
void put_float(std::string& out, int field, float v) {
    put_tag(out, field, 5);
    char b[4];
    std::memcpy(b, &v, 4);
    out.append(b, 4);
}
}  // namespace

std::string gguf_sentencepiece_model(const GgufFile& f) {
    const char* p = f.path.c_str();
    const std::string& model = f.get_string("tokenizer.ggml.model");
    if (model != "llama")
        throw Error(fmt("%s: tokenizer.ggml.model '%s' is not a sentencepiece (llama) tokenizer", p, model.c_str()));
    const GgufValue& tokens = f.get_array("tokenizer.ggml.tokens", GgufType::STRING);
    const GgufValue& scores = f.get_array("tokenizer.ggml.scores", GgufType::F32);
    const size_t n = tokens.array.size();
    if (scores.array.size() != n)
        throw Error(fmt("%s: tokenizer.ggml.scores has %zu entries, tokenizer.ggml.tokens %zu", p, scores.array.size(), n));
    const std::vector<int32_t> types = token_types(f, n);
    const int vocab = int(n);
    auto id_or = [&](const char* key, int fallback) { return f.find(key) ? token_id(f, key, vocab) : fallback; };
    const int unk = id_or("tokenizer.ggml.unknown_token_id", 0), bos = id_or("tokenizer.ggml.bos_token_id", 1),
              eos = id_or("tokenizer.ggml.eos_token_id", 2), pad = id_or("tokenizer.ggml.padding_token_id", -1);
    // sentencepiece refuses a model whose special ids are not control/unknown pieces, or whose unk
    // is not the one unknown piece: the types follow the ids.
    std::string out;
    bool bytes = false;
    for (size_t i = 0; i < n; i++) {
        int type = types[i];
        if (type < kNormal || type > kByte)
            throw Error(fmt("%s: tokenizer.ggml.token_type[%zu] = %d is not a sentencepiece piece type", p, i, type));
        if (int(i) == unk) type = kUnknown;
        else if (type == kUnknown) type = kControl;
        bytes |= type == kByte;
        std::string piece;
        put_bytes(piece, 1, tokens.array[i].s);
        put_float(piece, 2, float(scores.array[i].f));
        if (type != kNormal) put_int(piece, 3, type);
        put_bytes(out, 1, piece);
    }
    std::string trainer;
    put_int(trainer, 3, 2);  // model_type BPE
    put_int(trainer, 4, vocab);
    put_int(trainer, 35, bytes ? 1 : 0);  // byte_fallback
    put_int(trainer, 40, unk);
    put_int(trainer, 41, bos);
    put_int(trainer, 42, eos);
    put_int(trainer, 43, pad);
    put_bytes(out, 2, trainer);
    // llama.cpp's sentencepiece tokenizer: no normalization, a space before the text unless
    // tokenizer.ggml.add_space_prefix says not, runs of spaces kept.
    const bool prefix = f.find("tokenizer.ggml.add_space_prefix") ? f.get_bool("tokenizer.ggml.add_space_prefix") : true;
    std::string norm;
    put_bytes(norm, 1, "identity");
    put_int(norm, 3, prefix ? 1 : 0);  // add_dummy_prefix
    put_int(norm, 4, 0);               // remove_extra_whitespaces
    put_bytes(out, 3, norm);
    return out;
}
