// safetensors.cpp: mmap'd, validated reading and streaming, atomic writing of safetensors files.
#include "safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "common.h"

using json = nlohmann::json;

// ---------------------------------------------------------------------------------------------
// dtypes and number conversions

size_t dtype_size(DType t) {
    switch (t) {
        case DType::F32: case DType::I32: return 4;
        case DType::F16: case DType::BF16: return 2;
        case DType::I8: case DType::U8: return 1;
    }
    return 0;
}

const char* dtype_name(DType t) {
    switch (t) {
        case DType::F32: return "F32";
        case DType::F16: return "F16";
        case DType::BF16: return "BF16";
        case DType::I8: return "I8";
        case DType::U8: return "U8";
        case DType::I32: return "I32";
    }
    return "?";
}

bool dtype_from_name(const std::string& s, DType* out) {
    for (DType t : {DType::F32, DType::F16, DType::BF16, DType::I8, DType::U8, DType::I32}) {
        if (s == dtype_name(t)) { *out = t; return true; }
    }
    return false;
}

float bf16_to_f32(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

uint16_t f32_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // keep NaN a NaN
    u += 0x7fffu + ((u >> 16) & 1);                                           // round to nearest even
    return uint16_t(u >> 16);
}

float f16_to_f32(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else {  // subnormal: normalise
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            u = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3ff) << 13;
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | man << 13;
    } else {
        u = sign | (exp + 127 - 15) << 23 | man << 13;
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

uint16_t f32_to_f16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint16_t sign = uint16_t((u >> 16) & 0x8000);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00;                 // NaN
    if (a >= 0x477ff000u) return sign | 0x7c00;                // overflow (incl. inf) -> inf
    if (a < 0x38800000u) {                                     // subnormal or zero in f16
        float af;
        std::memcpy(&af, &a, 4);
        return sign | uint16_t(std::nearbyint(af * 16777216.0f));  // units of 2^-24, ties even
    }
    uint32_t r = a - 0x38000000u;                              // rebias exponent 127 -> 15
    r += 0xfffu + ((r >> 13) & 1);                             // round to nearest even
    return sign | uint16_t(r >> 13);
}

// By memcpy: a safetensors file need not align its tensors (a converter reads them from wherever
// the data section puts them; only model.bin's in-place views are held to alignment, in model.cpp).
static float load_float(const void* src, DType t, size_t i) {
    const uint8_t* p = static_cast<const uint8_t*>(src) + i * dtype_size(t);
    float f;
    uint16_t h;
    switch (t) {
        case DType::F32: std::memcpy(&f, p, 4); return f;
        case DType::BF16: std::memcpy(&h, p, 2); return bf16_to_f32(h);
        case DType::F16: std::memcpy(&h, p, 2); return f16_to_f32(h);
        default: assert(false && "not a float dtype"); return 0;
    }
}

void convert_floats(const void* src, DType src_t, void* dst, DType dst_t, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float f = load_float(src, src_t, i);
        switch (dst_t) {
            case DType::F32: static_cast<float*>(dst)[i] = f; break;
            case DType::BF16: static_cast<uint16_t*>(dst)[i] = f32_to_bf16(f); break;
            case DType::F16: static_cast<uint16_t*>(dst)[i] = f32_to_f16(f); break;
            default: assert(false && "not a float dtype");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// reading

int64_t TensorView::numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
}

static std::string shape_string(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); i++) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

std::string TensorView::shape_str() const { return shape_string(shape); }

MappedFile::MappedFile(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) throw Error(fmt("%s: cannot open: %s", path.c_str(), std::strerror(errno)));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ::close(fd);
        throw Error(fmt("%s: not a regular file", path.c_str()));
    }
    size = size_t(st.st_size);
    if (size > 0) {
        void* p = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            ::close(fd);
            throw Error(fmt("%s: mmap failed: %s", path.c_str(), std::strerror(errno)));
        }
        data = static_cast<const uint8_t*>(p);
    }
    ::close(fd);  // the mapping stays valid after close
}

MappedFile::~MappedFile() {
    if (data) munmap(const_cast<uint8_t*>(data), size);
}

SafetensorsFile::SafetensorsFile(const std::string& p) : path(p), map(p) {
    const char* f = path.c_str();
    if (map.size < 8) throw Error(fmt("%s: file is %zu bytes, too short for a safetensors header", f, map.size));
    uint64_t header_len;
    std::memcpy(&header_len, map.data, 8);  // little-endian hosts only (x86, ARM)
    if (header_len < 2 || header_len > map.size - 8)
        throw Error(fmt("%s: bad header length %llu (file is %zu bytes)", f,
                        (unsigned long long)header_len, map.size));
    json header;
    try {
        header = json::parse(map.data + 8, map.data + 8 + header_len, JsonDepthLimit{path});
    } catch (const json::exception& e) {
        throw Error(fmt("%s: header is not valid JSON: %s", f, e.what()));
    }
    if (!header.is_object()) throw Error(fmt("%s: header JSON is not an object", f));

    const size_t data_start = 8 + size_t(header_len);
    const size_t data_size = map.size - data_start;
    std::vector<std::pair<size_t, size_t>> ranges;
    for (auto& [name, entry] : header.items()) {
        if (name == "__metadata__") {
            if (!entry.is_object()) throw Error(fmt("%s: __metadata__ is not an object", f));
            for (auto& [k, v] : entry.items()) {
                if (!v.is_string()) throw Error(fmt("%s: metadata '%s' is not a string", f, k.c_str()));
                metadata[k] = v.get<std::string>();
            }
            continue;
        }
        const char* n = name.c_str();
        if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") ||
            !entry.contains("data_offsets"))
            throw Error(fmt("%s: tensor '%s': entry needs dtype, shape and data_offsets", f, n));
        TensorView t;
        t.name = name;
        const json& dt = entry["dtype"];
        if (!dt.is_string() || !dtype_from_name(dt.get<std::string>(), &t.dtype))
            throw Error(fmt("%s: tensor '%s': unsupported dtype %s", f, n, dt.dump().c_str()));
        const json& sh = entry["shape"];
        if (!sh.is_array()) throw Error(fmt("%s: tensor '%s': shape is not a list", f, n));
        for (const json& d : sh) {
            if (!d.is_number_integer() || d.get<int64_t>() < 0)
                throw Error(fmt("%s: tensor '%s': bad shape %s", f, n, sh.dump().c_str()));
            t.shape.push_back(d.get<int64_t>());
        }
        // Refuse shapes whose nonzero dims multiply past 2^62, so numel() never overflows int64
        // (a zero dim would otherwise hide the overflow from the byte-count check below).
        long double nonzero = 1;
        for (int64_t d : t.shape) nonzero *= d ? (long double)d : 1;
        if (nonzero > (long double)(int64_t(1) << 62))
            throw Error(fmt("%s: tensor '%s': shape %s is too large", f, n, t.shape_str().c_str()));
        const json& off = entry["data_offsets"];
        if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
            !off[1].is_number_unsigned())
            throw Error(fmt("%s: tensor '%s': data_offsets must be [begin, end]", f, n));
        size_t begin = off[0].get<size_t>(), end = off[1].get<size_t>();
        if (begin > end || end > data_size)
            throw Error(fmt("%s: tensor '%s': data_offsets [%zu, %zu] past the end of the data (%zu bytes)",
                            f, n, begin, end, data_size));
        // numel * size must not overflow and must equal the byte range
        long double expect = dtype_size(t.dtype);
        for (int64_t d : t.shape) expect *= (long double)d;
        if (expect != (long double)(end - begin))
            throw Error(fmt("%s: tensor '%s': %s %s needs %.0Lf bytes but data_offsets span %zu", f, n,
                            dtype_name(t.dtype), t.shape_str().c_str(), expect, end - begin));
        t.data = map.data + data_start + begin;
        t.nbytes = end - begin;
        if (t.nbytes) ranges.push_back({begin, end});
        tensors[name] = std::move(t);
    }
    std::sort(ranges.begin(), ranges.end());
    for (size_t i = 1; i < ranges.size(); i++)
        if (ranges[i].first < ranges[i - 1].second)
            throw Error(fmt("%s: tensor data ranges overlap at offset %zu", f, ranges[i].first));
}

const TensorView* SafetensorsFile::find(const std::string& name) const {
    auto it = tensors.find(name);
    return it == tensors.end() ? nullptr : &it->second;
}

const TensorView& SafetensorsFile::get(const std::string& name) const {
    const TensorView* t = find(name);
    if (!t) throw Error(fmt("%s: missing tensor '%s'", path.c_str(), name.c_str()));
    return *t;
}

const TensorView& SafetensorsFile::get(const std::string& name, const std::vector<int64_t>& shape) const {
    const TensorView& t = get(name);
    if (t.shape != shape)
        throw Error(fmt("%s: tensor '%s': expected shape %s, found %s", path.c_str(), name.c_str(),
                        shape_string(shape).c_str(), t.shape_str().c_str()));
    return t;
}

// ---------------------------------------------------------------------------------------------
// writing

void SafetensorsWriter::add(const std::string& name, DType dtype, std::vector<int64_t> shape, Fill fill) {
    entries_.push_back({name, dtype, std::move(shape), std::move(fill)});
}

void SafetensorsWriter::add_bytes(const std::string& name, DType dtype, std::vector<int64_t> shape,
                                  const void* src) {
    size_t n = dtype_size(dtype);
    for (int64_t d : shape) n *= size_t(d);
    add(name, dtype, std::move(shape), [src, n](uint8_t* dst) { std::memcpy(dst, src, n); });
}

void SafetensorsWriter::write(const std::string& path, bool show_progress) const {
    // Tensors are packed back to back: strict safetensors readers refuse holes in the data section.
    // Each must still start at a multiple of its element size (the loader maps the file and reads
    // F32 in place): laid out widest element first, every size a multiple of the next group's
    // element size, no tensor needs padding. (In add() order, an odd-sized U8 tensor, such as the
    // zero points of a GGUF Q4_0 matrix of 10 rows, misaligned every F32 tensor after it.)
    constexpr size_t kDataAlign = 4096;
    // Lay out the data section, then the header that describes it.
    json header = json::object();
    json meta = json::object();
    for (auto& [k, v] : metadata) meta[k] = v;
    header["__metadata__"] = meta;
    std::vector<size_t> layout(entries_.size());
    for (size_t i = 0; i < layout.size(); i++) layout[i] = i;
    std::stable_sort(layout.begin(), layout.end(), [&](size_t a, size_t b) {
        return dtype_size(entries_[a].dtype) > dtype_size(entries_[b].dtype);
    });
    std::vector<size_t> offsets(entries_.size()), sizes(entries_.size());
    size_t pos = 0, total = 0;
    for (size_t i : layout) {
        const Entry& e = entries_[i];
        size_t n = dtype_size(e.dtype);
        for (int64_t d : e.shape) n *= size_t(d);
        header[e.name] = {{"dtype", dtype_name(e.dtype)}, {"shape", e.shape}, {"data_offsets", {pos, pos + n}}};
        offsets[i] = pos;
        sizes[i] = n;
        pos += n;
        total += n;
    }
    std::string h = header.dump();
    size_t padded = (8 + h.size() + kDataAlign - 1) / kDataAlign * kDataAlign - 8;
    h.append(padded - h.size(), ' ');

    // The rename below replaces whatever `path` names: never a device or a pipe (--output /dev/null
    // as root turned /dev/null into a regular file).
    struct stat st;
    if (stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode))
        throw Error(fmt("%s: exists and is not a regular file (a device, pipe or folder); the model is written to "
                        "a temporary file and renamed over its path, so give a file name", path.c_str()));
    const std::string tmp = path + ".tmp";
    FILE* out = std::fopen(tmp.c_str(), "wb");
    if (!out) throw Error(fmt("%s: cannot create: %s", tmp.c_str(), std::strerror(errno)));
    auto fail = [&](const std::string& why) {
        std::fclose(out);
        std::remove(tmp.c_str());
        throw Error(fmt("%s: write failed: %s", tmp.c_str(), why.c_str()));
    };
    uint64_t hl = h.size();
    if (std::fwrite(&hl, 8, 1, out) != 1 || std::fwrite(h.data(), 1, h.size(), out) != h.size())
        fail(std::strerror(errno));
    std::vector<uint8_t> buf;
    size_t done = 0;
    double t0 = now_seconds(), last = t0;
    for (size_t i = 0; i < entries_.size(); i++) {
        buf.assign(sizes[i], 0);
        try {
            entries_[i].fill(buf.data());
        } catch (...) {
            std::fclose(out);
            std::remove(tmp.c_str());
            throw;
        }
        if (fseeko(out, off_t(8 + h.size() + offsets[i]), SEEK_SET) != 0 ||
            std::fwrite(buf.data(), 1, buf.size(), out) != buf.size())
            fail(std::strerror(errno));
        done += sizes[i];
        if (show_progress && (now_seconds() - last > 0.5 || i + 1 == entries_.size())) {
            last = now_seconds();
            std::fprintf(stderr, "\r  writing %s: %3.0f%% (%.1f / %.1f MB)", path.c_str(),
                         100.0 * double(done) / double(std::max<size_t>(total, 1)), done / 1e6, total / 1e6);
            if (i + 1 == entries_.size()) std::fprintf(stderr, "\n");
        }
    }
    if (std::fflush(out) != 0 || fsync(fileno(out)) != 0) fail(std::strerror(errno));
    if (std::fclose(out) != 0) {
        std::remove(tmp.c_str());
        throw Error(fmt("%s: close failed: %s", tmp.c_str(), std::strerror(errno)));
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
        std::remove(tmp.c_str());
        throw Error(fmt("%s: cannot rename into place: %s", path.c_str(), std::strerror(errno)));
    }
}
