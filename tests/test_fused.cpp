// tests/test_fused.cpp: the CPU backend's fused ops (matmul_qkv: q, k, v in one parallel region;
// ffn_gate_up: w1, w3 and silu * up in one) are bitwise the unfused path, separate matmuls then
// silu * up computed here, in every weight format, batch sizes 1, 3, 9 and odd row counts.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "common.h"
#include "ops.h"
#include "test_util.h"

namespace {

enum class Fmt { F32, BF16, I8Row, I8Group, I4Zeros, I4Mins };
const char* fmt_name(Fmt f) {
    const char* names[] = {"f32", "bf16", "int8 per row", "int8 grouped", "int4 zeros", "int4 mins"};
    return names[int(f)];
}

// A random rows x cols matrix stored in format f (quantized by ops.h's quantizers), viewed by w.
struct Mat {
    std::vector<float> f32;
    std::vector<uint16_t> bf16;
    std::vector<uint8_t> q;  // int8 [rows][cols] or packed int4 [rows][cols/2]
    std::vector<float> scales, mins;
    std::vector<uint8_t> zeros;
    Weight w;

    Mat(Fmt f, int rows, int cols, unsigned seed) {
        std::mt19937 rng(seed);
        std::normal_distribution<float> nd(0.0f, 0.05f);
        std::vector<float> v(size_t(rows) * cols);
        for (float& a : v) a = nd(rng);
        const int group = f == Fmt::I8Group || f == Fmt::I4Mins ? 32 : f == Fmt::I4Zeros ? 64 : 0;
        const int ng = group ? cols / group : 1;
        w.rows = rows, w.cols = cols, w.stride = cols, w.group = group;
        switch (f) {
            case Fmt::F32:
                f32 = v;
                w.dtype = DType::F32, w.data = f32.data();
                break;
            case Fmt::BF16:
                bf16.resize(v.size());
                convert_floats(v.data(), DType::F32, bf16.data(), DType::BF16, v.size());
                w.dtype = DType::BF16, w.data = bf16.data();
                break;
            case Fmt::I8Row:
            case Fmt::I8Group:
                q.resize(v.size());
                scales.resize(size_t(rows) * ng);
                for (int r = 0; r < rows; r++)
                    for (int g = 0; g < ng; g++) {
                        const size_t at = size_t(r) * cols + size_t(g) * (group ? group : cols);
                        scales[size_t(r) * ng + g] = quantize_row_int8(v.data() + at, group ? group : cols,
                                                                       reinterpret_cast<int8_t*>(q.data()) + at);
                    }
                w.dtype = DType::I8, w.data = q.data(), w.scales = scales.data();
                break;
            case Fmt::I4Zeros:
            case Fmt::I4Mins:
                q.resize(v.size() / 2);
                scales.resize(size_t(rows) * ng);
                if (f == Fmt::I4Zeros) zeros.resize(size_t(rows) * ng);
                else mins.resize(size_t(rows) * ng);
                for (int r = 0; r < rows; r++) {
                    const float* row = v.data() + size_t(r) * cols;
                    uint8_t* packed = q.data() + size_t(r) * cols / 2;
                    float* s = scales.data() + size_t(r) * ng;
                    if (f == Fmt::I4Zeros) quantize_row_int4(row, cols, group, packed, s, zeros.data() + size_t(r) * ng);
                    else quantize_row_int4_min(row, cols, group, packed, s, mins.data() + size_t(r) * ng);
                }
                w.dtype = DType::U8, w.data = q.data(), w.scales = scales.data();
                if (f == Fmt::I4Zeros) w.zeros = zeros.data();
                else w.mins = mins.data();
                break;
        }
    }
};

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) == 0;
}

// max |out - x . w^T| over out [n][w.rows], the reference in double from the dequantized rows: the
// fused results are also right, not only equal to the unfused ones. int8/int4 matmuls multiply by
// x rounded to 15-bit integers per 32-column block, so their reference does too.
double max_error(const std::vector<float>& out, const std::vector<float>& x_, const Weight& w, int n) {
    std::vector<float> row(size_t(w.cols));
    std::vector<double> x(x_.begin(), x_.end());
    if (w.dtype == DType::I8 || w.dtype == DType::U8) x = rounded_activations(x_, n, w.cols);
    double worst = 0.0;
    for (int r = 0; r < w.rows; r++) {
        dequantize_row(w, r, row.data());
        for (int t = 0; t < n; t++) {
            double s = 0.0;
            for (int c = 0; c < w.cols; c++) s += x[size_t(t) * w.cols + c] * row[size_t(c)];
            worst = std::max(worst, std::fabs(double(out[size_t(t) * w.rows + r]) - s));
        }
    }
    return worst;
}

// The fused ops against separate matmuls (and silu * up computed here) for one set of formats.
void check_fused(Fmt fq, Fmt fk, Fmt fv, Fmt f1, Fmt f3, int cols) {
    Ops* cpu = cpu_ops(0);
    const int q_rows = 67, kv_rows = 23, hidden = 131;  // odd; 131 > 2 blocks of 64 at n = 1
    const Mat wq(fq, q_rows, cols, 1), wk(fk, kv_rows, cols, 2), wv(fv, kv_rows, cols, 3);
    const Mat w1(f1, hidden, cols, 4), w3(f3, hidden, cols, 5);
    for (int n : {1, 3, 9}) {
        CAPTURE(n);
        const std::vector<float> x = random_x(n, cols, 100 + unsigned(n));
        // unfused
        std::vector<float> q(size_t(n) * q_rows), k(size_t(n) * kv_rows), v(size_t(n) * kv_rows);
        std::vector<float> h(size_t(n) * hidden), up(size_t(n) * hidden);
        cpu->matmul(q.data(), x.data(), wq.w, n);
        cpu->matmul(k.data(), x.data(), wk.w, n);
        cpu->matmul(v.data(), x.data(), wv.w, n);
        cpu->matmul(h.data(), x.data(), w1.w, n);
        cpu->matmul(up.data(), x.data(), w3.w, n);
        const std::vector<float> gate = h;
        for (size_t i = 0; i < h.size(); i++) h[i] = h[i] / (1.0f + std::exp(-h[i])) * up[i];
        // fused, into buffers holding garbage so that every output must be written
        std::vector<float> fq_(q.size(), NAN), fk_(k.size(), NAN), fv_(v.size(), NAN);
        std::vector<float> fh(h.size(), NAN), fup(up.size(), NAN);
        cpu->matmul_qkv(fq_.data(), fk_.data(), fv_.data(), x.data(), wq.w, wk.w, wv.w, n);
        cpu->ffn_gate_up(fh.data(), fup.data(), x.data(), w1.w, w3.w, n);
        CHECK(bitwise_equal(fq_, q));
        CHECK(bitwise_equal(fk_, k));
        CHECK(bitwise_equal(fv_, v));
        CHECK(bitwise_equal(fh, h));
        // the unfused matmuls themselves against double sums (f32 accumulation over cols terms)
        const double tol = 1e-4;
        CHECK(max_error(fq_, x, wq.w, n) < tol);
        CHECK(max_error(fv_, x, wv.w, n) < tol);
        CHECK(max_error(gate, x, w1.w, n) < tol);
    }
}

}  // namespace

TEST_CASE("CPU fused matmul_qkv and ffn_gate_up are bitwise the separate matmuls and silu * up") {
    for (Fmt f : {Fmt::F32, Fmt::BF16, Fmt::I8Row, Fmt::I8Group, Fmt::I4Zeros, Fmt::I4Mins}) {
        CAPTURE(fmt_name(f));
        check_fused(f, f, f, f, f, 576);
    }
    // float formats with a column count that is no multiple of 16 or 32 (the masked tail)
    for (Fmt f : {Fmt::F32, Fmt::BF16, Fmt::I8Row}) {
        CAPTURE(fmt_name(f));
        check_fused(f, f, f, f, f, 200);
    }
    // a different format per weight
    check_fused(Fmt::I4Mins, Fmt::I8Group, Fmt::BF16, Fmt::I4Zeros, Fmt::I4Mins, 576);
    check_fused(Fmt::F32, Fmt::I4Zeros, Fmt::I8Row, Fmt::BF16, Fmt::I8Group, 576);
}
