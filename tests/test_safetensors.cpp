// tests/test_safetensors.cpp: the safetensors container: writer -> reader round trip and layout
// (4096-aligned data, packed tensors), f32 <-> bf16/f16 conversions against known bit patterns,
// refusal of malformed files with a message naming the problem, and the writer's atomicity.
#include <doctest/doctest.h>
#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <random>

#include "common.h"
#include "safetensors.h"
#include "test_util.h"

namespace {

std::string st_dir() {
    static std::string d = [] {
        std::string p = temp_dir() + "/safetensors";
        ::mkdir(p.c_str(), 0755);
        return p;
    }();
    return d;
}

bool exists(const std::string& path) {
    struct stat st;
    return stat(path.c_str(), &st) == 0;
}

void write_raw(const std::string& path, const std::string& bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), std::streamsize(bytes.size()));
    REQUIRE(out.good());
}

// A hand-made safetensors file: u64 header length (the JSON's length unless given), the JSON, data.
std::string crafted(const std::string& name, const std::string& header, const std::string& data,
                    uint64_t header_len = ~uint64_t(0)) {
    std::string path = st_dir() + "/" + name;
    uint64_t n = header_len == ~uint64_t(0) ? header.size() : header_len;
    std::string bytes(reinterpret_cast<const char*>(&n), 8);
    write_raw(path, bytes + header + data);
    return path;
}

// The Error message of opening `path`, or "" when it opens.
std::string open_error(const std::string& path) { return error_of([&] { SafetensorsFile f(path); }); }

uint32_t bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

float from_bits(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

}  // namespace

TEST_SUITE("safetensors") {

// ---------------------------------------------------------------------------------------------
// round trip and layout

TEST_CASE("writer -> reader round trip: dtypes, shapes, metadata, packed and 4096-aligned") {
    std::vector<float> f32 = {1.5f, -2.0f, 3.25f, 0.0f, -0.0f, 1e-30f};
    std::vector<uint16_t> bf16 = {0x3f80, 0xc000, 0x7f80, 0x0001};
    std::vector<uint16_t> f16 = {0x3c00, 0x7bff, 0x0001, 0xfc00, 0x3555};
    std::vector<int8_t> i8 = {-128, -1, 0, 1, 127, 5, -7};
    std::vector<int32_t> i32 = {-2147483647 - 1, 0, 2147483647};
    std::string blob(1000, '\0');
    for (size_t i = 0; i < blob.size(); i++) blob[i] = char(i * 7 + 3);
    float scalar = 42.0f;

    SafetensorsWriter w;
    w.metadata = {{"format", "fastgen"}, {"config", R"({"dim": 64, "name": "a \"quoted\" value"})"},
                  {"empty", ""}};
    w.add_bytes("f32", DType::F32, {2, 3}, f32.data());
    w.add_bytes("bf16", DType::BF16, {4}, bf16.data());
    w.add_bytes("f16", DType::F16, {1, 5}, f16.data());
    w.add_bytes("i8", DType::I8, {7}, i8.data());
    w.add_bytes("i32", DType::I32, {3, 1}, i32.data());
    w.add_bytes("blob", DType::U8, {int64_t(blob.size())}, blob.data());
    w.add_bytes("scalar", DType::F32, {}, &scalar);           // 0-d: one element
    w.add("empty", DType::F32, {0}, [](uint8_t*) {});           // no elements
    w.add("empty2d", DType::BF16, {3, 0}, [](uint8_t*) {});
    w.add("filled", DType::F32, {2, 2}, [](uint8_t* dst) {     // through a Fill callback
        float v[4] = {1, 2, 3, 4};
        std::memcpy(dst, v, sizeof v);
    });
    std::string path = st_dir() + "/roundtrip.safetensors";
    w.write(path);
    CHECK_FALSE(exists(path + ".tmp"));

    SafetensorsFile f(path);
    CHECK(f.path == path);
    CHECK(f.metadata == w.metadata);
    CHECK(f.tensors.size() == 10);

    auto check_tensor = [&](const char* name, DType t, std::vector<int64_t> shape, const void* src, size_t n) {
        CAPTURE(name);
        const TensorView& v = f.get(name, shape);
        CHECK(v.name == name);
        CHECK(v.dtype == t);
        CHECK(v.shape == shape);
        REQUIRE(v.nbytes == n);
        CHECK(int64_t(v.nbytes) == v.numel() * int64_t(dtype_size(t)));
        if (n) CHECK(std::memcmp(v.data, src, n) == 0);
    };
    check_tensor("f32", DType::F32, {2, 3}, f32.data(), 24);
    check_tensor("bf16", DType::BF16, {4}, bf16.data(), 8);
    check_tensor("f16", DType::F16, {1, 5}, f16.data(), 10);
    check_tensor("i8", DType::I8, {7}, i8.data(), 7);
    check_tensor("i32", DType::I32, {3, 1}, i32.data(), 12);
    check_tensor("blob", DType::U8, {1000}, blob.data(), 1000);
    check_tensor("scalar", DType::F32, {}, &scalar, 4);
    check_tensor("empty", DType::F32, {0}, nullptr, 0);
    check_tensor("empty2d", DType::BF16, {3, 0}, nullptr, 0);
    float filled[4] = {1, 2, 3, 4};
    check_tensor("filled", DType::F32, {2, 2}, filled, 16);
    CHECK(f.get("scalar").numel() == 1);
    CHECK(f.get("empty2d").numel() == 0);
    CHECK(f.get("f32").shape_str() == "[2, 3]");
    CHECK(f.get("scalar").shape_str() == "[]");

    // Layout: data starts 4096-aligned; tensors packed back to back, no holes, up to the file's end.
    uint64_t header_len;
    std::memcpy(&header_len, f.map.data, 8);
    const size_t data_start = 8 + size_t(header_len);
    CHECK(data_start % 4096 == 0);
    CHECK(data_start == 4096);  // this small header fits in the first page
    std::vector<std::pair<size_t, size_t>> spans;
    for (const auto& [name, t] : f.tensors) {
        if (!t.nbytes) continue;
        size_t begin = size_t(t.data - f.map.data) - data_start;
        spans.push_back({begin, begin + t.nbytes});
    }
    std::sort(spans.begin(), spans.end());
    CHECK(spans.front().first == 0);
    for (size_t i = 1; i < spans.size(); i++) CHECK(spans[i].first == spans[i - 1].second);
    CHECK(data_start + spans.back().second == f.map.size);
    CHECK(f.map.size == 4096 + 24 + 8 + 10 + 7 + 12 + 1000 + 4 + 16);
    // Each tensor starts at a multiple of its element size, though the 7-byte i8 came before i32.
    for (const auto& [name, t] : f.tensors)
        CHECK_MESSAGE(size_t(t.data - f.map.data) % dtype_size(t.dtype) == 0, name);
    // The padding is spaces after the JSON, so any safetensors reader parses it.
    std::string header(reinterpret_cast<const char*>(f.map.data + 8), size_t(header_len));
    size_t last = header.find_last_not_of(' ');
    REQUIRE(last != std::string::npos);
    CHECK(header[last] == '}');
    CHECK(header[0] == '{');
}

TEST_CASE("writer: fills run in add() order, while the file puts wider elements first (aligned, no holes)") {
    // The converter's int4 matrices: the packed levels' fill computes the scales a later fill copies.
    // An odd-sized U8 tensor laid out first misaligned every F32 after it (found by fuzzing: a GGUF
    // Q4_0 embedding of 10 rows has 10 one-byte zero points).
    SafetensorsWriter w;
    std::vector<std::string> order;
    float scale = 0;
    w.add("q", DType::U8, {5}, [&](uint8_t* d) {
        order.push_back("q");
        for (int i = 0; i < 5; i++) d[i] = uint8_t(10 + i);
        scale = 0.25f;
    });
    w.add("q.scales", DType::F32, {1}, [&](uint8_t* d) {
        order.push_back("q.scales");
        std::memcpy(d, &scale, 4);
    });
    const uint16_t h = 0x3c00;
    w.add("h", DType::F16, {1}, [&](uint8_t* d) {
        order.push_back("h");
        std::memcpy(d, &h, 2);
    });
    const std::string path = st_dir() + "/order.safetensors";
    w.write(path);
    CHECK(order == std::vector<std::string>{"q", "q.scales", "h"});
    SafetensorsFile f(path);
    CHECK(*reinterpret_cast<const float*>(f.get("q.scales").data) == 0.25f);
    CHECK(f.get("q").data[4] == 14);
    CHECK(f.get("h").data[1] == 0x3c);
    const uint8_t* data = f.map.data + 4096;
    CHECK(f.get("q.scales").data == data);      // 4-byte elements first,
    CHECK(f.get("h").data == data + 4);         // then 2-byte,
    CHECK(f.get("q").data == data + 6);         // then 1-byte: packed, each aligned
    CHECK(f.map.size == 4096 + 4 + 2 + 5);
}

TEST_CASE("a header larger than one page pads to the next 4096 boundary") {
    SafetensorsWriter w;
    std::vector<float> x(3, 0.5f);
    for (int i = 0; i < 150; i++) w.add_bytes(fmt("layers.%d.some_long_tensor_name.weight", i), DType::F32, {3}, x.data());
    std::string path = st_dir() + "/bigheader.safetensors";
    w.write(path);
    SafetensorsFile f(path);
    uint64_t header_len;
    std::memcpy(&header_len, f.map.data, 8);
    CHECK(header_len > 4096);
    CHECK((8 + header_len) % 4096 == 0);
    CHECK(f.tensors.size() == 150);
    CHECK(f.map.size == 8 + header_len + 150 * 12);
    CHECK(std::memcmp(f.get("layers.149.some_long_tensor_name.weight", {3}).data, x.data(), 12) == 0);
}

TEST_CASE("dtype names") {
    for (DType t : {DType::F32, DType::F16, DType::BF16, DType::I8, DType::U8, DType::I32}) {
        DType back = DType::U8;
        REQUIRE(dtype_from_name(dtype_name(t), &back));
        CHECK(back == t);
    }
    CHECK(std::string(dtype_name(DType::BF16)) == "BF16");
    CHECK(dtype_size(DType::F32) == 4);
    CHECK(dtype_size(DType::BF16) == 2);
    CHECK(dtype_size(DType::F16) == 2);
    CHECK(dtype_size(DType::I8) == 1);
    CHECK(dtype_size(DType::U8) == 1);
    CHECK(dtype_size(DType::I32) == 4);
    DType t;
    CHECK_FALSE(dtype_from_name("F64", &t));
    CHECK_FALSE(dtype_from_name("bf16", &t));  // the safetensors spelling is upper case
}

// ---------------------------------------------------------------------------------------------
// number conversions

TEST_CASE("f32 -> bf16: round to nearest even, inf, nan, subnormals") {
    struct Case { uint32_t in; uint16_t out; };
    const Case cases[] = {
        {0x3f800000, 0x3f80},  // 1.0
        {0xbf800000, 0xbf80},  // -1.0
        {0x00000000, 0x0000},  // +0
        {0x80000000, 0x8000},  // -0
        {0x3f807fff, 0x3f80},  // just below half an ulp: down
        {0x3f808000, 0x3f80},  // tie, even below: down
        {0x3f808001, 0x3f81},  // just above half: up
        {0x3f818000, 0x3f82},  // tie, odd below: up to even
        {0x3f81ffff, 0x3f82},
        {0xbf818000, 0xbf82},  // the same for negatives
        {0x7f800000, 0x7f80},  // +inf
        {0xff800000, 0xff80},  // -inf
        {0x7f7fffff, 0x7f80},  // max finite f32 rounds to inf
        {0x7f7f7fff, 0x7f7f},  // largest that stays finite
        {0x00010000, 0x0001},  // subnormals keep their top bits
        {0x00008000, 0x0000},  // tie to even (0)
        {0x00018000, 0x0002},  // tie to even (2)
        {0x80010000, 0x8001},
        {0x007fffff, 0x0080},  // largest subnormal rounds up to the smallest normal
    };
    for (const Case& c : cases) {
        CAPTURE(c.in);
        CHECK(f32_to_bf16(from_bits(c.in)) == c.out);
    }
    // NaNs stay NaN, even one whose payload is only in the low bits truncation would drop.
    for (uint32_t nan : {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0x7fffffffu, 0xff800001u}) {
        CAPTURE(nan);
        uint16_t h = f32_to_bf16(from_bits(nan));
        CHECK((h & 0x7f80) == 0x7f80);
        CHECK((h & 0x007f) != 0);
        CHECK((h & 0x8000) == ((nan >> 16) & 0x8000));
    }
}

TEST_CASE("bf16 -> f32 is exact, and every bf16 survives the round trip") {
    CHECK(bf16_to_f32(0x3f80) == 1.0f);
    CHECK(bf16_to_f32(0xc040) == -3.0f);
    CHECK(bits(bf16_to_f32(0x0001)) == 0x00010000u);  // subnormal
    CHECK(bits(bf16_to_f32(0x8000)) == 0x80000000u);  // -0
    CHECK(bf16_to_f32(0x7f80) == std::numeric_limits<float>::infinity());
    CHECK(bf16_to_f32(0xff80) == -std::numeric_limits<float>::infinity());
    CHECK(std::isnan(bf16_to_f32(0x7fc0)));
    int bad = 0;
    for (uint32_t h = 0; h < 0x10000; h++) {
        float f = bf16_to_f32(uint16_t(h));
        if (std::isnan(f)) continue;
        if (f32_to_bf16(f) != h) bad++;
    }
    CHECK(bad == 0);
}

TEST_CASE("f32 -> f16: round to nearest even, overflow, subnormals, inf, nan") {
    struct Case { float in; uint16_t out; };
    const float u = std::ldexp(1.0f, -24);  // smallest f16 subnormal
    const Case cases[] = {
        {1.0f, 0x3c00},
        {-2.0f, 0xc000},
        {0.0f, 0x0000},
        {-0.0f, 0x8000},
        {0.5f, 0x3800},
        {65504.0f, 0x7bff},                            // max finite
        {65519.0f, 0x7bff},                            // below the midpoint to 65536
        {65520.0f, 0x7c00},                            // the midpoint: ties to even = inf
        {1e6f, 0x7c00},
        {-1e6f, 0xfc00},
        {1.0f + std::ldexp(1.0f, -11), 0x3c00},        // tie, even below
        {1.0f + 3 * std::ldexp(1.0f, -11), 0x3c02},    // tie, odd below: up
        {1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20), 0x3c01},  // just above the tie
        {1.0f / 3.0f, 0x3555},
        {u, 0x0001},                                   // smallest subnormal
        {-u, 0x8001},
        {u / 2, 0x0000},                               // tie to even (0)
        {u / 2 * 1.0001f, 0x0001},
        {u * 1.5f, 0x0002},                            // tie to even (2)
        {u * 2.5f, 0x0002},                            // tie to even (2)
        {u * 1023, 0x03ff},                            // largest subnormal
        {u * 1023.5f, 0x0400},                         // rounds up into the normals
        {std::ldexp(1.0f, -14), 0x0400},               // smallest normal
        {std::ldexp(1.0f, -30), 0x0000},               // underflow to zero
        {std::numeric_limits<float>::infinity(), 0x7c00},
        {-std::numeric_limits<float>::infinity(), 0xfc00},
    };
    for (const Case& c : cases) {
        CAPTURE(c.in);
        CHECK(f32_to_f16(c.in) == c.out);
    }
    for (uint32_t nan : {0x7fc00000u, 0xffc00000u, 0x7f800001u}) {
        CAPTURE(nan);
        uint16_t h = f32_to_f16(from_bits(nan));
        CHECK((h & 0x7c00) == 0x7c00);
        CHECK((h & 0x03ff) != 0);
    }
}

TEST_CASE("f16 -> f32 is exact, every f16 survives the round trip, and rounding is to the nearest") {
    CHECK(f16_to_f32(0x3c00) == 1.0f);
    CHECK(f16_to_f32(0x3555) == 0.333251953125f);
    CHECK(f16_to_f32(0x7bff) == 65504.0f);
    CHECK(f16_to_f32(0x0001) == std::ldexp(1.0f, -24));
    CHECK(f16_to_f32(0x03ff) == 1023 * std::ldexp(1.0f, -24));
    CHECK(f16_to_f32(0x0400) == std::ldexp(1.0f, -14));
    CHECK(bits(f16_to_f32(0x8000)) == 0x80000000u);
    CHECK(f16_to_f32(0x7c00) == std::numeric_limits<float>::infinity());
    CHECK(f16_to_f32(0xfc00) == -std::numeric_limits<float>::infinity());
    CHECK(std::isnan(f16_to_f32(0x7e00)));
    CHECK(std::isnan(f16_to_f32(0x7c01)));
    int bad = 0;
    for (uint32_t h = 0; h < 0x10000; h++) {
        float f = f16_to_f32(uint16_t(h));
        if (std::isnan(f)) continue;
        if (f32_to_f16(f) != h) bad++;
    }
    CHECK(bad == 0);

    // Random f32 over the whole f16 range: the result is a nearest f16 (ties to the even one).
    std::mt19937 rng(5);
    std::uniform_real_distribution<float> expo(-26.0f, 15.9f);  // below 65504: no overflow
    int not_nearest = 0;
    for (int i = 0; i < 20000; i++) {
        float x = std::exp2(expo(rng)) * ((rng() & 1) ? 1.0f : -1.0f);
        uint16_t h = f32_to_f16(x);
        double err = std::fabs(double(f16_to_f32(h)) - x);
        uint16_t mag = h & 0x7fff;
        for (int d : {-1, 1}) {
            int m = int(mag) + d;
            if (m < 0 || m > 0x7c00) continue;
            double other = std::fabs(double(f16_to_f32(uint16_t((h & 0x8000) | m))) - x);
            if (other < err || (other == err && (mag & 1))) not_nearest++;
        }
    }
    CHECK(not_nearest == 0);
}

TEST_CASE("convert_floats between F32, BF16 and F16") {
    std::vector<float> x = {1.0f, -2.5f, 3.0f / 7.0f, 1e-3f, 65504.0f};
    std::vector<uint16_t> b(x.size()), h(x.size());
    convert_floats(x.data(), DType::F32, b.data(), DType::BF16, x.size());
    convert_floats(x.data(), DType::F32, h.data(), DType::F16, x.size());
    for (size_t i = 0; i < x.size(); i++) {
        CHECK(b[i] == f32_to_bf16(x[i]));
        CHECK(h[i] == f32_to_f16(x[i]));
    }
    CHECK(b[0] == 0x3f80);
    CHECK(h[0] == 0x3c00);
    // f16 -> bf16 goes through f32: 1/3 in f16 (0x3555 = 0.333251953125) rounds to bf16 0x3eab.
    uint16_t third = 0x3555, out = 0;
    convert_floats(&third, DType::F16, &out, DType::BF16, 1);
    CHECK(out == 0x3eab);
    std::vector<float> back(x.size());
    convert_floats(b.data(), DType::BF16, back.data(), DType::F32, x.size());
    CHECK(back[1] == -2.5f);
    CHECK(back[2] == bf16_to_f32(b[2]));
}

TEST_CASE("convert_floats reads sources at any byte offset (a safetensors file need not align its tensors)") {
    // Found by fuzzing: an F32 tensor at an odd data offset made the loads misaligned (UBSan).
    std::vector<float> x = {1.0f, -2.5f, 3.0f / 7.0f};
    std::vector<uint8_t> bytes(1 + sizeof(float) * x.size());
    std::memcpy(bytes.data() + 1, x.data(), sizeof(float) * x.size());
    std::vector<float> out(x.size());
    convert_floats(bytes.data() + 1, DType::F32, out.data(), DType::F32, x.size());
    CHECK(out == x);
    std::vector<uint16_t> b(x.size());
    for (size_t i = 0; i < x.size(); i++) b[i] = f32_to_bf16(x[i]);
    std::memcpy(bytes.data() + 1, b.data(), 2 * b.size());
    convert_floats(bytes.data() + 1, DType::BF16, out.data(), DType::F32, x.size());
    for (size_t i = 0; i < x.size(); i++) CHECK(out[i] == bf16_to_f32(b[i]));
}

// ---------------------------------------------------------------------------------------------
// refusing malformed files

TEST_CASE("reader refuses malformed files with a message naming the file and the problem") {
    const std::string f32x4(16, '\0');  // data for one F32 [4]
    std::string path, msg;

    SUBCASE("shorter than the 8-byte header length") {
        path = st_dir() + "/short.safetensors";
        write_raw(path, "abc");
        msg = open_error(path);
        CHECK_MESSAGE(has(msg, "3 bytes, too short"), msg);
    }
    SUBCASE("empty file") {
        path = st_dir() + "/empty.safetensors";
        write_raw(path, "");
        msg = open_error(path);
        CHECK_MESSAGE(has(msg, "0 bytes, too short"), msg);
    }
    SUBCASE("missing file") {
        path = st_dir() + "/does-not-exist.safetensors";
        msg = open_error(path);
        CHECK_MESSAGE(has(msg, "cannot open"), msg);
    }
    SUBCASE("header length larger than the file") {
        std::string h = R"({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})";
        path = crafted("hlen.safetensors", h, f32x4, 100000);
        msg = open_error(path);
        CHECK_MESSAGE(has(msg, "bad header length 100000"), msg);
        CHECK_MESSAGE(has(msg, fmt("file is %zu bytes", 8 + h.size() + 16)), msg);
    }
    SUBCASE("header length absurdly large (would overflow 8 + len)") {
        path = crafted("hlen-huge.safetensors", "{}", "", ~uint64_t(0) - 3);
        msg = open_error(path);
        CHECK_MESSAGE(has(msg, "bad header length"), msg);
    }
    SUBCASE("header is not JSON") {
        path = crafted("badjson.safetensors", R"({"x": {"dtype": "F32", )", f32x4);
        msg = open_error(path);
        CHECK_MESSAGE(has(msg, "not valid JSON"), msg);
    }
    SUBCASE("header is not an object") {
        path = crafted("array.safetensors", "[1, 2, 3]", "");
        msg = open_error(path);
        CHECK_MESSAGE(has(msg, "not an object"), msg);
    }
    SUBCASE("metadata value not a string") {
        path = crafted("meta.safetensors", R"({"__metadata__": {"version": 1}})", "");
        msg = open_error(path);
        CHECK_MESSAGE(has(msg, "metadata 'version' is not a string"), msg);
    }
    SUBCASE("entry without data_offsets") {
        path = crafted("nooffsets.safetensors", R"({"x": {"dtype": "F32", "shape": [4]}})", f32x4);
        msg = open_error(path);
        CHECK_MESSAGE(has(msg, "tensor 'x'"), msg);
        CHECK_MESSAGE(has(msg, "data_offsets"), msg);
    }
    SUBCASE("unknown dtype") {
        path = crafted("dtype.safetensors", R"({"x": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 16]}})", f32x4);
        msg = open_error(path);
        CHECK_MESSAGE(has(msg, "tensor 'x'"), msg);
        CHECK_MESSAGE(has(msg, "unsupported dtype \"Q7\""), msg);
    }
    SUBCASE("negative dimension") {
        path = crafted("negdim.safetensors", R"({"x": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}})", f32x4);
        msg = open_error(path);
        CHECK_MESSAGE(has(msg, "bad shape [-4]"), msg);
    }
    SUBCASE("offsets past the end of the data") {
        path = crafted("past.safetensors", R"({"x": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}})", f32x4);
        msg = open_error(path);
        CHECK_MESSAGE(has(msg, "tensor 'x'"), msg);
        CHECK_MESSAGE(has(msg, "data_offsets [0, 32] past the end of the data (16 bytes)"), msg);
    }
    SUBCASE("begin after end") {
        path = crafted("reversed.safetensors", R"({"x": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}})", f32x4);
        msg = open_error(path);
        CHECK_MESSAGE(has(msg, "data_offsets [8, 4]"), msg);
    }
    SUBCASE("negative offset") {
        path = crafted("negoff.safetensors", R"({"x": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}})", f32x4);
        msg = open_error(path);
        CHECK_MESSAGE(has(msg, "data_offsets must be [begin, end]"), msg);
    }
    SUBCASE("byte span does not match dtype x numel") {
        path = crafted("span.safetensors", R"({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}})", f32x4);
        msg = open_error(path);
        CHECK_MESSAGE(has(msg, "tensor 'x': F32 [3] needs 12 bytes but data_offsets span 16"), msg);
    }
    SUBCASE("numel x size overflows") {
        path = crafted("overflow.safetensors",
                       R"({"x": {"dtype": "F32", "shape": [4611686018427387904, 4], "data_offsets": [0, 0]}})", "");
        msg = open_error(path);
        CHECK_MESSAGE(has(msg, "tensor 'x': shape [4611686018427387904, 4] is too large"), msg);
    }
    SUBCASE("a zero dim does not hide an overflowing shape") {
        path = crafted("overflow0.safetensors",
                       R"({"x": {"dtype": "F32", "shape": [4294967296, 4294967296, 0], "data_offsets": [0, 0]}})", "");
        msg = open_error(path);
        CHECK_MESSAGE(has(msg, "tensor 'x': shape [4294967296, 4294967296, 0] is too large"), msg);
    }
    SUBCASE("overlapping ranges") {
        path = crafted("overlap.safetensors",
                       R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                       R"( "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                       f32x4);
        msg = open_error(path);
        CHECK_MESSAGE(has(msg, "overlap at offset 4"), msg);
    }
    SUBCASE("nesting deeper than 128 levels") {
        // Found by fuzzing: quoting such a dtype in the message overflowed the stack (dump() recurses).
        path = crafted("deep.safetensors",
                       R"({"x": {"dtype": )" + std::string(300000, '[') + std::string(300000, ']') +
                           R"(, "shape": [], "data_offsets": [0, 0]}})",
                       "");
        msg = open_error(path);
        CHECK_MESSAGE(has(msg, "JSON nested deeper than 128 levels"), msg);
    }
    SUBCASE("a good file cut short: offsets run past the end") {
        std::vector<float> a(100, 1.0f), b(100, 2.0f);
        SafetensorsWriter w;
        w.add_bytes("a", DType::F32, {100}, a.data());
        w.add_bytes("b", DType::F32, {10, 10}, b.data());
        std::string good = st_dir() + "/tocut.safetensors";
        w.write(good);
        REQUIRE(open_error(good) == "");
        std::string bytes = read_file(good);
        path = st_dir() + "/cut.safetensors";
        write_raw(path, bytes.substr(0, bytes.size() - 1));
        msg = open_error(path);
        CHECK_MESSAGE(has(msg, "tensor 'b'"), msg);
        CHECK_MESSAGE(has(msg, "data_offsets [400, 800] past the end of the data (799 bytes)"), msg);
        // Cut inside the header: the header length no longer fits.
        write_raw(path, bytes.substr(0, 100));
        msg = open_error(path);
        CHECK_MESSAGE(has(msg, "bad header length 4088 (file is 100 bytes)"), msg);
    }
    CHECK_MESSAGE(has(msg, path), msg);  // every message names the file
}

TEST_CASE("get() refuses a missing tensor and a wrong shape") {
    std::vector<float> x(6, 0.0f);
    SafetensorsWriter w;
    w.add_bytes("x", DType::F32, {3, 2}, x.data());
    std::string path = st_dir() + "/get.safetensors";
    w.write(path);
    SafetensorsFile f(path);
    CHECK(f.find("nope") == nullptr);
    CHECK(f.find("x") != nullptr);
    CHECK_THROWS_WITH_AS(f.get("nope"), doctest::Contains((path + ": missing tensor 'nope'").c_str()), Error);
    CHECK_THROWS_WITH_AS(f.get("nope", {1}), doctest::Contains("missing tensor 'nope'"), Error);
    CHECK_THROWS_WITH_AS(f.get("x", {2, 3}),
                         doctest::Contains((path + ": tensor 'x': expected shape [2, 3], found [3, 2]").c_str()), Error);
    CHECK_THROWS_WITH_AS(f.get("x", {6}), doctest::Contains("expected shape [6], found [3, 2]"), Error);
    CHECK(f.get("x", {3, 2}).nbytes == 24);
}

// ---------------------------------------------------------------------------------------------
// the writer leaves no half-written file

TEST_CASE("writer: a failed write leaves neither the file nor its temp file") {
    float x = 1.0f;
    SUBCASE("folder does not exist") {
        std::string path = st_dir() + "/no-such-folder/model.bin";
        SafetensorsWriter w;
        w.add_bytes("x", DType::F32, {1}, &x);
        CHECK_THROWS_WITH_AS(w.write(path), doctest::Contains("cannot create"), Error);
        CHECK_THROWS_WITH_AS(w.write(path), doctest::Contains(path.c_str()), Error);
        CHECK_FALSE(exists(path));
        CHECK_FALSE(exists(path + ".tmp"));
        CHECK_FALSE(exists(st_dir() + "/no-such-folder"));
    }
    SUBCASE("a Fill callback throws") {
        std::string path = st_dir() + "/fill-throws.bin";
        SafetensorsWriter w;
        w.add_bytes("first", DType::F32, {1}, &x);
        w.add("second", DType::F32, {1}, [](uint8_t*) { throw Error("bad tensor 'second'"); });
        CHECK_THROWS_WITH_AS(w.write(path), doctest::Contains("bad tensor 'second'"), Error);
        CHECK_FALSE(exists(path));
        CHECK_FALSE(exists(path + ".tmp"));
        // An older file at the path survives a failed rewrite untouched.
        write_raw(path, "old contents");
        CHECK_THROWS_AS(w.write(path), Error);
        CHECK(read_file(path) == "old contents");
        CHECK_FALSE(exists(path + ".tmp"));
    }
    SUBCASE("a path that is not a regular file is left alone") {
        // Found by fuzzing quantize --output: /dev/null, as root, became a regular file (the temp
        // file was renamed over it). A pipe stands in for the device here.
        std::string path = st_dir() + "/pipe";
        std::remove(path.c_str());
        REQUIRE(mkfifo(path.c_str(), 0600) == 0);
        SafetensorsWriter w;
        w.add_bytes("x", DType::F32, {1}, &x);
        CHECK_THROWS_WITH_AS(w.write(path), doctest::Contains((path + ": exists and is not a regular file").c_str()),
                             Error);
        struct stat st;
        REQUIRE(stat(path.c_str(), &st) == 0);
        CHECK(S_ISFIFO(st.st_mode));
        CHECK_FALSE(exists(path + ".tmp"));
    }
    SUBCASE("a successful write replaces an older file") {
        std::string path = st_dir() + "/replace.bin";
        write_raw(path, "old contents");
        SafetensorsWriter w;
        w.add_bytes("x", DType::F32, {1}, &x);
        w.write(path);
        SafetensorsFile f(path);
        CHECK(f.get("x", {1}).nbytes == 4);
        CHECK_FALSE(exists(path + ".tmp"));
    }
}

}  // TEST_SUITE
