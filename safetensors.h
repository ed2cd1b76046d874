// safetensors.h: the container model.bin uses: mmap'd reading with full validation, and a writer
// that streams one tensor at a time to a temporary file and renames it into place.
//
// Layout: u64 little-endian header length N, N bytes of JSON
// {"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}},
// then the data section; offsets are relative to the start of the data section.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

enum class DType { F32, F16, BF16, I8, U8, I32 };
size_t dtype_size(DType t);
const char* dtype_name(DType t);           // safetensors spelling: "F32", "BF16", ...
bool dtype_from_name(const std::string& s, DType* out);

struct TensorView {
    std::string name;
    DType dtype = DType::F32;
    std::vector<int64_t> shape;
    const uint8_t* data = nullptr;  // points into the mapping
    size_t nbytes = 0;
    int64_t numel() const;
    std::string shape_str() const;  // "[64, 512]"
};

// A read-only memory map of a whole file; unmapped on destruction.
struct MappedFile {
    const uint8_t* data = nullptr;
    size_t size = 0;
    explicit MappedFile(const std::string& path);  // throws Error naming the path
    ~MappedFile();
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;
};

struct SafetensorsFile {
    std::string path;
    MappedFile map;
    std::map<std::string, std::string> metadata;
    std::map<std::string, TensorView> tensors;

    // Opens and validates: header length, JSON, every dtype, shape, offset (in bounds, matching
    // dtype size x numel, non-overlapping). Throws Error naming the file and tensor.
    explicit SafetensorsFile(const std::string& path);

    const TensorView* find(const std::string& name) const;
    // The tensor, checked against the expected dtype set and shape; throws Error saying
    // "<path>: tensor 'name': expected shape [..], found [..]" (or missing / dtype).
    const TensorView& get(const std::string& name, const std::vector<int64_t>& shape) const;
    const TensorView& get(const std::string& name) const;
};

// Streams tensors to disk one at a time: each tensor's bytes come from a callback invoked during
// write(), so a converter never holds more than one converted tensor in memory.
struct SafetensorsWriter {
    using Fill = std::function<void(uint8_t* dst)>;  // fill exactly nbytes
    void add(const std::string& name, DType dtype, std::vector<int64_t> shape, Fill fill);
    void add_bytes(const std::string& name, DType dtype, std::vector<int64_t> shape,
                   const void* src);  // src must stay alive until write()
    std::map<std::string, std::string> metadata;
    // Writes <path>.tmp, pads the header with spaces so data starts 4096-aligned, packs the tensors
    // back to back (no holes) and each at a multiple of its element size (widest elements first: 4-byte
    // dtypes, then 2-byte, then 1-byte), fsyncs and renames to <path>. Fills run in add() order whatever the
    // layout (a fill may use what an earlier one computed). Removes the temp file on failure.
    void write(const std::string& path, bool show_progress = false) const;

  private:
    struct Entry {
        std::string name;
        DType dtype;
        std::vector<int64_t> shape;
        Fill fill;
    };
    std::vector<Entry> entries_;
};

// Number conversions used by loaders, converters and kernels (round-to-nearest-even for bf16).
float bf16_to_f32(uint16_t h);
uint16_t f32_to_bf16(float f);
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);
// Convert n elements of src (F32/F16/BF16) into dst of another float dtype.
void convert_floats(const void* src, DType src_t, void* dst, DType dst_t, size_t n);
