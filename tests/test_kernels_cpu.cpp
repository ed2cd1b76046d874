// tests/test_kernels_cpu.cpp: the CPU kernels on every SIMD target this build and host run
// (ops.h cpu_simd_targets: an AVX-512 host checks its AVX2 and SSE4 code too). Per target, every
// matmul format against double sums of the exact weights, and batch invariance, bitwise: a token's
// row alone equals its row in any batch; attention and rmsnorm likewise.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "ops.h"
#include "safetensors.h"
#include "test_util.h"

namespace {

// Runs f once per SIMD target, with the target restricted to it (then the best again).
template <typename F>
void for_each_target(F f) {
    const std::vector<std::string> targets = cpu_simd_targets();
    REQUIRE(!targets.empty());
    for (const std::string& t : targets) {
        std::string why;
        REQUIRE_MESSAGE(cpu_set_simd_target(t, &why), why);
        REQUIRE(cpu_simd_target() == t);
        CAPTURE(t);
        f(t);
    }
    std::string why;
    REQUIRE(cpu_set_simd_target("auto", &why));
}

enum class Fmt { F32, BF16, F16, I8Row, I8Group, I4Zeros, I4Mins };
const char* fmt_name(Fmt f) {
    switch (f) {
        case Fmt::F32: return "f32";
        case Fmt::BF16: return "bf16";
        case Fmt::F16: return "f16";
        case Fmt::I8Row: return "int8 per row";
        case Fmt::I8Group: return "int8 grouped";
        case Fmt::I4Zeros: return "int4 zero points";
        default: return "int4 minimums";
    }
}
bool integer(Fmt f) { return f != Fmt::F32 && f != Fmt::BF16 && f != Fmt::F16; }

// A random matrix in format f, [rows][cols] (group: columns per group of the grouped formats), and
// its exact values as dequantize_row gives them.
struct Matrix {
    Fmt fmt;
    int rows, cols, group;
    std::vector<uint8_t> data;
    std::vector<float> scales, mins;
    std::vector<uint8_t> zeros;
    Weight w;

    Matrix(Fmt f, int r, int c, int g, unsigned seed) : fmt(f), rows(r), cols(c), group(g) {
        std::mt19937 rng(seed);
        std::uniform_real_distribution<float> val(-1.0f, 1.0f), scale(0.002f, 0.02f), mn(-0.15f, 0.05f);
        const size_t n = size_t(r) * c;
        w.rows = r, w.cols = c, w.stride = c;
        switch (f) {
            case Fmt::F32: case Fmt::BF16: case Fmt::F16: {
                std::vector<float> v(n);
                for (float& x : v) x = val(rng);
                const DType t = f == Fmt::F32 ? DType::F32 : f == Fmt::BF16 ? DType::BF16 : DType::F16;
                data.resize(n * dtype_size(t));
                convert_floats(v.data(), DType::F32, data.data(), t, n);
                w.dtype = t;
                break;
            }
            case Fmt::I8Row: case Fmt::I8Group: {
                data.resize(n);
                for (auto& b : data) b = uint8_t(int8_t(int(rng() % 256) - 128));  // -128 too (GGUF Q8_0 has it)
                w.dtype = DType::I8;
                w.group = f == Fmt::I8Group ? g : 0;
                scales.resize(f == Fmt::I8Group ? n / size_t(g) : size_t(r));
                break;
            }
            default: {
                data.resize(n / 2);
                for (auto& b : data) b = uint8_t(rng());
                w.dtype = DType::U8;
                w.group = g;
                scales.resize(n / size_t(g));
                if (f == Fmt::I4Zeros) {
                    zeros.resize(scales.size());
                    for (auto& z : zeros) z = uint8_t(rng() % 16);
                } else {
                    mins.resize(scales.size());
                    for (auto& m : mins) m = mn(rng);
                }
            }
        }
        for (float& s : scales) s = scale(rng);
        w.data = data.data();
        w.scales = integer(f) ? scales.data() : nullptr;
        w.zeros = zeros.empty() ? nullptr : zeros.data();
        w.mins = mins.empty() ? nullptr : mins.data();
    }
    std::vector<float> row(int r) const {
        std::vector<float> out(static_cast<size_t>(cols));
        dequantize_row(w, r, out.data());
        return out;
    }
};

// out [n][rows] against double sums of x (rounded as the integer kernels round it) times the exact
// weights, relative to the sum of |terms| (float accumulation errors scale with it).
void check_values(const Matrix& m, const std::vector<float>& x, int n, const std::vector<float>& out) {
    const std::vector<double> xr = integer(m.fmt) ? rounded_activations(x, n, m.cols) : std::vector<double>(x.begin(), x.end());
    int bad = 0;
    for (int r = 0; r < m.rows; r++) {
        const std::vector<float> w = m.row(r);
        for (int t = 0; t < n; t++) {
            double s = 0, mag = 0;
            for (int c = 0; c < m.cols; c++) {
                const double xv = xr[size_t(t) * m.cols + c], term = xv * w[size_t(c)];
                s += term;
                // int4 sums x * q * s and the group's x * (z * s or m) apart: bound both terms
                mag += m.fmt == Fmt::I4Mins || m.fmt == Fmt::I4Zeros ? 0.6 * std::fabs(xv) : std::fabs(term);
            }
            const double got = out[size_t(t) * m.rows + r];
            if (std::fabs(got - s) > 1e-5 * mag + 1e-30 && bad++ < 3)
                FAIL_CHECK(fmt_name(m.fmt) << " " << m.rows << "x" << m.cols << " token " << t << " row " << r << ": " << got
                                           << " vs " << s << " (terms " << mag << ")");
        }
    }
}

// Shapes per format: tails of every kind (columns not a multiple of any step, rows not of any tile).
std::vector<std::pair<int, int>> shapes(Fmt f) {  // (rows, cols)
    if (f == Fmt::F32 || f == Fmt::BF16 || f == Fmt::F16) return {{1, 8}, {7, 37}, {13, 64}, {66, 200}, {9, 576}, {5, 1030}};
    if (f == Fmt::I8Row) return {{1, 16}, {7, 37}, {13, 172}, {66, 576}, {9, 200}};
    return {{1, 64}, {7, 192}, {13, 576}, {66, 320}, {9, 1536}};
}

}  // namespace

TEST_CASE("cpu kernels: the SIMD targets are named and can be chosen; a bad name is refused, naming it") {
    const std::vector<std::string> targets = cpu_simd_targets();
    REQUIRE(!targets.empty());
    MESSAGE("SIMD targets this build and CPU run: " << [&] {
        std::string s;
        for (const auto& t : targets) s += (s.empty() ? "" : ", ") + t;
        return s;
    }());
    CHECK(cpu_simd_target() == targets.front());  // the best by default
    std::string why;
    CHECK_FALSE(cpu_set_simd_target("avx9000", &why));
    CHECK(has(why, "avx9000"));
    CHECK(has(why, targets.front()));
    CHECK(cpu_simd_target() == targets.front());  // a refusal changes nothing
}

TEST_CASE("cpu kernels: every matmul format against double sums, on every SIMD target") {
    for_each_target([](const std::string&) {
        for (Fmt f : {Fmt::F32, Fmt::BF16, Fmt::F16, Fmt::I8Row, Fmt::I8Group, Fmt::I4Zeros, Fmt::I4Mins})
            for (int group : integer(f) && f != Fmt::I8Row ? std::vector<int>{32, 64} : std::vector<int>{0}) {
                unsigned seed = 1;
                for (auto [rows, cols] : shapes(f)) {
                    if (group && cols % group) continue;
                    CAPTURE(std::string(fmt_name(f)));
                    CAPTURE(group);
                    const Matrix m(f, rows, cols, group, seed++);
                    for (int n : {1, 3, 4, 5, 9}) {
                        CAPTURE(n);
                        const std::vector<float> x = random_x(n, cols, seed + unsigned(n));
                        std::vector<float> out(size_t(n) * rows);
                        cpu_ops(0)->matmul(out.data(), x.data(), m.w, n);
                        check_values(m, x, n, out);
                    }
                }
            }
    });
}

TEST_CASE("cpu kernels: a token's matmul row is bitwise the same alone and in any batch, on every SIMD target") {
    for_each_target([](const std::string&) {
        for (Fmt f : {Fmt::F32, Fmt::BF16, Fmt::F16, Fmt::I8Row, Fmt::I8Group, Fmt::I4Zeros, Fmt::I4Mins}) {
            const int group = integer(f) && f != Fmt::I8Row ? 32 : 0;
            for (auto [rows, cols] : shapes(f)) {
                CAPTURE(std::string(fmt_name(f)));
                CAPTURE(rows);
                CAPTURE(cols);
                const Matrix m(f, rows, cols, group, unsigned(rows + cols));
                const int n = 11;  // tiles of 4 and 2 tokens and a tail of every size, below
                const std::vector<float> x = random_x(n, cols, 7);
                std::vector<float> batch(size_t(n) * rows);
                cpu_ops(0)->matmul(batch.data(), x.data(), m.w, n);
                for (int t0 = 0; t0 < n; t0++)
                    for (int len : {1, 2, 3, 5}) {
                        if (t0 + len > n) continue;
                        std::vector<float> part(size_t(len) * rows);
                        cpu_ops(0)->matmul(part.data(), x.data() + size_t(t0) * cols, m.w, len);
                        CHECK_MESSAGE(std::memcmp(part.data(), batch.data() + size_t(t0) * rows, part.size() * 4) == 0,
                                      "tokens " << t0 << ".." << t0 + len - 1 << " apart from the batch of " << n);
                    }
            }
        }
    });
}

TEST_CASE("cpu kernels: attention against double softmax sums, and each token bitwise the same alone, on every SIMD target") {
    for_each_target([](const std::string&) {
        for (int hd : {8, 40, 64}) {
            CAPTURE(hd);
            const int n_heads = 4, n_kv = 2, kv_dim = n_kv * hd, block = 16, len = 300;  // chunks of 128: three
            const int blocks = (len + block - 1) / block;
            std::vector<int> table(static_cast<size_t>(blocks));
            for (int b = 0; b < blocks; b++) table[size_t(b)] = blocks - 1 - b;  // pages out of order
            std::vector<float> kc(static_cast<size_t>(blocks) * block * kv_dim), vc(kc.size());
            std::mt19937 rng{unsigned(hd)};
            std::normal_distribution<float> nd(0.0f, 1.0f);
            for (float& v : kc) v = nd(rng);
            for (float& v : vc) v = nd(rng);
            const std::vector<int> probe = {0, 1, 127, 128, 200, len - 1};  // positions queried
            const int n = int(probe.size());
            std::vector<float> q(size_t(n) * n_heads * hd);
            for (float& v : q) v = nd(rng);
            std::vector<int> offsets(size_t(n), 0);
            AttentionBatch b{probe.data(), table.data(), offsets.data(), block, n_heads, n_kv, hd, len};
            std::vector<float> all(q.size());
            cpu_ops(0)->attention(all.data(), q.data(), kc.data(), vc.data(), b, n);
            auto slot = [&](int p) { return size_t(table[size_t(p / block)]) * block + size_t(p % block); };
            for (int i = 0; i < n; i++) {
                std::vector<float> one(static_cast<size_t>(n_heads) * hd);
                AttentionBatch b1{&probe[size_t(i)], table.data(), offsets.data(), block, n_heads, n_kv, hd, len};
                cpu_ops(0)->attention(one.data(), q.data() + size_t(i) * n_heads * hd, kc.data(), vc.data(), b1, 1);
                CHECK_MESSAGE(std::memcmp(one.data(), all.data() + size_t(i) * n_heads * hd, one.size() * 4) == 0,
                              "position " << probe[size_t(i)] << " alone differs from the batch");
                for (int h = 0; h < n_heads; h++) {
                    const float* qh = q.data() + (size_t(i) * n_heads + h) * hd;
                    const int kvh = h / (n_heads / n_kv);
                    std::vector<double> s(static_cast<size_t>(probe[size_t(i)]) + 1), o(static_cast<size_t>(hd), 0.0);
                    double mx = -1e300, sum = 0;
                    for (int p = 0; p <= probe[size_t(i)]; p++) {
                        double d = 0;
                        for (int k = 0; k < hd; k++) d += double(qh[k]) * kc[slot(p) * kv_dim + size_t(kvh) * hd + k];
                        s[size_t(p)] = d / std::sqrt(double(hd));
                        mx = std::max(mx, s[size_t(p)]);
                    }
                    for (int p = 0; p <= probe[size_t(i)]; p++) sum += s[size_t(p)] = std::exp(s[size_t(p)] - mx);
                    for (int p = 0; p <= probe[size_t(i)]; p++)
                        for (int k = 0; k < hd; k++) o[size_t(k)] += s[size_t(p)] / sum * vc[slot(p) * kv_dim + size_t(kvh) * hd + k];
                    for (int k = 0; k < hd; k++) {
                        const float got = all[(size_t(i) * n_heads + h) * hd + k];
                        if (std::fabs(got - o[size_t(k)]) > 1e-4)
                            FAIL_CHECK("position " << probe[size_t(i)] << " head " << h << " dim " << k << ": " << got << " vs " << o[size_t(k)]);
                    }
                }
            }
        }
    });
}

TEST_CASE("cpu kernels: rmsnorm against double, each row the same alone, on every SIMD target") {
    for_each_target([](const std::string&) {
        for (int dim : {8, 37, 576, 2048}) {
            CAPTURE(dim);
            const int n = 5;
            const std::vector<float> x = random_x(n, dim, unsigned(dim)), wt = random_x(1, dim, 3);
            std::vector<float> out(x.size()), one(static_cast<size_t>(dim));
            cpu_ops(0)->rmsnorm(out.data(), x.data(), wt.data(), n, dim, 1e-5f);
            for (int t = 0; t < n; t++) {
                double ss = 0;
                for (int i = 0; i < dim; i++) ss += double(x[size_t(t) * dim + i]) * x[size_t(t) * dim + i];
                const double inv = 1.0 / std::sqrt(ss / dim + 1e-5);
                for (int i = 0; i < dim; i++) {
                    const double want = x[size_t(t) * dim + i] * inv * wt[size_t(i)];
                    if (std::fabs(out[size_t(t) * dim + i] - want) > 1e-5 * (1 + std::fabs(want)))
                        FAIL_CHECK("row " << t << " [" << i << "]: " << out[size_t(t) * dim + i] << " vs " << want);
                }
                cpu_ops(0)->rmsnorm(one.data(), x.data() + size_t(t) * dim, wt.data(), 1, dim, 1e-5f);
                CHECK(std::memcmp(one.data(), out.data() + size_t(t) * dim, one.size() * 4) == 0);
            }
        }
    });
}

TEST_CASE("cpu kernels: int8 and int4 matmuls round x exactly as quantize_activations does, on every SIMD target") {
    // W = the identity in per-row int8 (scale 1): out[t][c] = d(block of c) * v[t][c], one rounding,
    // which equals float(v) * d from ops.h's scalar quantize_activations only if v and d are its own.
    for_each_target([](const std::string&) {
        for (int cols : {32, 200, 576}) {
            CAPTURE(cols);
            std::vector<int8_t> q(size_t(cols) * cols, 0);
            for (int c = 0; c < cols; c++) q[size_t(c) * cols + c] = 1;
            std::vector<float> scales(size_t(cols), 1.0f);
            Weight w{DType::I8, q.data(), cols, cols, cols, scales.data()};
            const int n = 3;
            std::vector<float> x = random_x(n, cols, unsigned(cols));
            x[5] = 37.5f, x[size_t(cols) + 7] = -1e-3f;  // an outlier; a block of small values
            for (int c = 0; c < 32; c++) x[size_t(2 * cols + c)] = 0.0f;  // an all-zero block
            std::vector<float> out(size_t(n) * cols);
            cpu_ops(0)->matmul(out.data(), x.data(), w, n);
            const int blocks = (cols + 31) / 32;
            for (int t = 0; t < n; t++) {
                std::vector<int16_t> v(size_t(blocks) * 32);
                std::vector<float> d(static_cast<size_t>(blocks));
                quantize_activations(x.data() + size_t(t) * cols, cols, v.data(), d.data());
                for (int c = 0; c < cols; c++) {
                    const float want = float(v[size_t(c)]) * d[size_t(c / 32)];
                    if (std::memcmp(&want, &out[size_t(t) * cols + c], 4) != 0)
                        FAIL_CHECK("token " << t << " column " << c << ": " << out[size_t(t) * cols + c] << " vs " << want);
                }
            }
        }
    });
}
