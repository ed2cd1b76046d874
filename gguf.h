// gguf.h: reading llama.cpp's GGUF files (versions 2 and 3) over mmap: metadata, tensor infos,
// the ggml block formats fastgen converts from (F32, F16, BF16, Q8_0, Q4_0, Q4_1), and what the
// `llama` architecture's metadata means in fastgen's terms (Config, tokenizer).
//
// Layout (little-endian): "GGUF", u32 version, u64 tensor count, u64 metadata count; metadata
// entries (string key, u32 value type, value); tensor infos (string name, u32 n_dims, u64 ne[n_dims],
// u32 ggml type, u64 offset); padding to general.alignment (default 32); the data section, where
// each tensor starts `offset` bytes in (a multiple of the alignment). A string is a u64 length and
// that many bytes; an array is a u32 element type, a u64 count and the elements (arrays may nest).
// ne[0] is the fastest-varying dimension: a matrix with ne = [in, out] is row-major [out][in].
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "safetensors.h"

struct Config;

// GGUF metadata value types (the numbers are the file's).
enum class GgufType : uint32_t {
    U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7, STRING = 8, ARRAY = 9,
    U64 = 10, I64 = 11, F64 = 12
};
const char* gguf_type_name(GgufType t);  // "u32", "string", ... ("type 13" style for others)

// One metadata value. Integers and bools are held in `i` (u64 values above INT64_MAX in `u`),
// floats in `f`, strings in `s`, arrays' elements in `array` (each with type `elem`).
struct GgufValue {
    GgufType type = GgufType::U8;
    int64_t i = 0;
    uint64_t u = 0;
    double f = 0;
    std::string s;
    GgufType elem = GgufType::U8;
    std::vector<GgufValue> array;
    bool is_integer() const;
};

// ggml tensor types: every id llama.cpp has used, by name, with its block size (elements) and bytes
// per block, so sizes check out even for types fastgen refuses to convert.
struct GgmlType {
    uint32_t id;
    const char* name;
    int block;   // elements per block (1 for plain types)
    int bytes;   // bytes per block
    bool convertible;  // F32, F16, BF16, Q8_0, Q4_0, Q4_1
};
const GgmlType* ggml_type(uint32_t id);  // nullptr for an id no ggml version used
std::string ggml_type_name(uint32_t id); // "Q5_K", or "unknown type 99"
constexpr uint32_t kGgmlF32 = 0, kGgmlF16 = 1, kGgmlQ4_0 = 2, kGgmlQ4_1 = 3, kGgmlQ8_0 = 8, kGgmlBF16 = 30;
// Block layouts (32 elements each): Q8_0 = f16 d, int8 q[32] (w = d*q); Q4_0 = f16 d, u8 qs[16]
// (w = d*(q-8)); Q4_1 = f16 d, f16 m, u8 qs[16] (w = d*q + m). In a 4-bit block element j < 16 is
// the low nibble of qs[j] and element j + 16 its high nibble.
constexpr int kGgmlBlock = 32;

struct GgufTensor {
    std::string name;
    std::vector<int64_t> ne;  // GGUF dims, ne[0] fastest-varying (columns)
    uint32_t type = 0;        // ggml type id
    uint64_t offset = 0;      // from the start of the data section
    const uint8_t* data = nullptr;  // into the mapping
    size_t nbytes = 0;
    int64_t numel() const;
    std::vector<int64_t> shape() const;  // row-major, slowest first: ne reversed
};

struct GgufFile {
    std::string path;
    MappedFile map;
    uint32_t version = 0;
    size_t alignment = 32;
    size_t data_start = 0;  // file offset of the data section
    std::vector<std::string> keys;             // metadata keys in file order
    std::map<std::string, GgufValue> metadata;
    std::vector<GgufTensor> tensors;           // in file order
    std::map<std::string, size_t> tensor_index;

    // Maps and validates the whole file: magic, version, counts, every string, array and value
    // type, tensor dims, types and offsets against the file size. Throws Error naming the file
    // (and the key or tensor).
    explicit GgufFile(const std::string& path);

    const GgufValue* find(const std::string& key) const;
    const GgufTensor* find_tensor(const std::string& name) const;
    // Typed metadata: Error naming the file and key when missing or of another type.
    int64_t get_int(const std::string& key) const;
    double get_float(const std::string& key) const;  // any integer or float type
    const std::string& get_string(const std::string& key) const;
    bool get_bool(const std::string& key) const;
    const GgufValue& get_array(const std::string& key, GgufType elem) const;
};

// True when the file starts with the GGUF magic.
bool is_gguf_file(const std::string& path);

// One row of n elements of a convertible type (n a multiple of the block) into f32.
void ggml_dequantize_row(uint32_t type, const uint8_t* src, float* dst, size_t n);
// A row of n Q8_0 elements as int8 q[n] and one f32 scale per block: w = q * scale. Each output
// may be null when not wanted.
void ggml_q8_0_split(const uint8_t* src, size_t n, int8_t* q, float* scales);
// A row of n Q4_0 / Q4_1 elements as fastgen int4: packed[n/2] (low nibble = even column), one f32
// scale per block, and per block either the zero point (Q4_0: always 8; w = (q - 8) * scale) or the
// min (Q4_1: w = q * scale + min). Each output may be null when not wanted.
void ggml_q4_split(uint32_t type, const uint8_t* src, size_t n, uint8_t* packed, float* scales,
                   uint8_t* zeros, float* mins);

// ---------------------------------------------------------------------------------------------
// The `llama` architecture in fastgen's terms

// Config from llama.* and tokenizer.ggml.* metadata. Refuses other architectures, MoE, linear/YaRN
// RoPE scaling and partial rotary embeddings with a message naming the key. Llama 3.1/3.2's RoPE
// scaling, stored by llama.cpp as per-pair factors in the tensor rope_freqs.weight, becomes
// Config's rope_factor/low/high/original_max_seq_len (recovered, then checked pair by pair).
Config gguf_llama_config(const GgufFile& f);

// tokenizer.ggml.model "gpt2" (byte-level BPE) as a Hugging Face tokenizer.json that the tokenizers
// library loads as it is (it refuses unknown top-level keys, so nothing of ours is added). Whether
// BOS is added (tokenizer.ggml.add_bos_token, default true) is said the HF way: "post_processor" is a
// TemplateProcessing whose "single" template starts with {"SpecialToken": {"id": BOS}}, or null
// when no BOS is added. Control (3) and user-defined (4) tokens are "added_tokens", special.
std::string gguf_tokenizer_json(const GgufFile& f);

// tokenizer.ggml.model "llama" (sentencepiece) as a serialized sentencepiece ModelProto: a BPE
// model with byte fallback and the identity normalizer, pieces/scores/types from the metadata.
std::string gguf_sentencepiece_model(const GgufFile& f);
