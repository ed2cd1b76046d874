// kernels_cpu.cpp: the CPU backend of the op table: OpenMP threads, and SIMD written once against
// Highway's portable ops, compiled for every SIMD target of the architecture (x86: SSE4, AVX2,
// AVX-512, AVX-512 with VNNI; Arm: NEON) and chosen at run time for the CPU it runs on. Also the
// reference twin for the CUDA kernels.
//
// The file is read once per target (hwy/foreach_target.h includes it again with HWY_TARGET set):
//   1. shared declarations, once (include guard);
//   2. the kernels, in namespace cpu_kernels::HWY_NAMESPACE, once per target;
//   3. (HWY_ONCE) the dispatch tables, the op table and the scalar code, once.
//
// Batch invariance on every target: each (token, row) dot product has its own accumulator vector
// fed the same operations in the same order whatever tile it runs in, and every horizontal sum is
// one fixed tree (SumLanes), so a token's output is bitwise the same alone and in any batch. The
// order differs between targets (their vectors differ in width), never within one. The build
// turns off floating-point contraction (Makefile: -ffp-contract=off), so no path gets an FMA the
// other does not.

#ifndef FASTGEN_KERNELS_CPU_SHARED
#define FASTGEN_KERNELS_CPU_SHARED
#include <omp.h>

#include <algorithm>
#include <cassert>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"
#include "ops.h"

// SVE's vectors have no compile-time size, and the tiles below keep arrays of vectors; Arm builds
// run NEON. SSSE3 is below the x86 baseline the Makefile sets (x86-64-v2 with AES and CLMUL: Highway's SSE4).
#define HWY_DISABLED_TARGETS (HWY_SVE | HWY_SVE2 | HWY_SVE_256 | HWY_SVE2_128 | HWY_SSSE3)
#define HWY_WANT_AVX3_DL 1  // AVX-512 with VNNI (Ice Lake, Zen 4 and later): vpdpwssd

namespace cpu_kernels {

// Activations of the int8/int4 matmuls. These multiply by x rounded to 15-bit integers per
// 32-column block (quantize_activations): a dot product is then integer multiply-adds (pairs of
// 16-bit products per 32-bit lane: vpmaddwd, or AVX-512 VNNI's vpdpwssd) and the scales apply once
// per block, where widening and converting every weight to f32 kept these formats compute-bound.
// 15 bits, not llama.cpp's 8: with 8-bit blocks, a model with massive activations (SmolLM2) turned
// chaotic (a 1e-6 change of x moved its logits by 3-30%, as rounding flipped around outliers); 15
// bits round 128x finer. The rounding is per token: a token's result does not depend on its batch.
struct QuantizedX {
    int n = 0, cols = 0, stride = 0;  // stride: cols rounded up to 128, the widest kernel step
    std::vector<int16_t> v;           // [n][stride] rounded x, zero-padded
    std::vector<float> d;             // [n][stride / 32] the blocks' scales (0 for padding)
    // The kernels' layouts, made by the running target (its vector width N floats sets them):
    std::vector<int16_t> v8, v4;      // [n][stride] v reordered for the int8 / int4 tile (PrepInt8/4)
    std::vector<float> lanes8, lanes4;  // per token and kernel step, each lane's block scale d
                                        // (int8: divided by 256, its kernel multiplies by 256 w)

    // Sized for n rows of cols, zero-filled (QuantizeRows rounds x into it).
    void resize(int n_, int cols_) {
        n = n_, cols = cols_, stride = (cols + 127) / 128 * 128;
        v.assign(size_t(n) * stride, 0);
        d.assign(size_t(n) * (stride / 32), 0.0f);
        v8.clear(), v4.clear(), lanes8.clear(), lanes4.clear();
    }
};

// For a grouped W, per kernel step (a target's int8 or int4 step of columns): lane 0's group, how
// many groups the step's lanes see (1..4), how many lanes see the first one (groups rise with the
// lane), and each lane's group relative to the first.
struct StepTable {
    std::vector<int32_t> first, distinct, split;  // [steps]
    std::vector<int32_t> idx;                     // [steps][N]
};

// What an int8/int4 tile reads besides W: the rounded x, and for W's groups the sums of rounded x
// per group (int4's zero points and minimums) and the step table.
struct IntX {
    const QuantizedX* x = nullptr;
    const float* gsum = nullptr;      // [n][cols / group]
    const StepTable* steps = nullptr;
};

// One matmul's operands as the tiles read them: x in the layout of W's format (PrepFloatX), or
// the rounded x of the integer formats.
struct MatmulArgs {
    float* out;        // [n][w->rows]
    const float* x;    // [n][x_stride]: f32 / f16 / bf16 weights
    size_t x_stride;
    const Weight* w;
    IntX ix;           // int8 / int4 weights
    int n;
};

}  // namespace cpu_kernels
#endif  // FASTGEN_KERNELS_CPU_SHARED

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels_cpu.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/cache_control.h>
#include <hwy/highway.h>

HWY_BEFORE_NAMESPACE();
namespace cpu_kernels {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;      // N floats
using VF = hn::Vec<DF>;
using DI = hn::RebindToSigned<DF>;      // N int32
using VI = hn::Vec<DI>;
using DU = hn::RebindToUnsigned<DF>;    // N uint32
using D16 = hn::Repartition<int16_t, DF>;  // 2N int16
using V16 = hn::Vec<D16>;
using D8 = hn::Repartition<int8_t, DF>;    // 4N int8
using DU8 = hn::Repartition<uint8_t, DF>;  // 4N uint8
constexpr size_t N = hn::MaxLanes(DF());
// HWY_UNROLL(16) on the loops over a tile's tokens and rows: fully unrolled, its arrays of
// vectors live in registers (unrolled partly, GCC kept them on the stack: int4 decode -20%).

// Vector registers: 32 on AVX-512 and NEON, 16 on SSE4/AVX2; the prefill tiles are sized to fit.
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL || HWY_ARCH_ARM
constexpr bool kManyRegisters = true;
#else
constexpr bool kManyRegisters = false;
#endif

const char* TargetName() { return hwy::TargetName(HWY_TARGET); }

// ---------------------------------------------------------------------------------------------
// Horizontal sums, one fixed order

// out[j] = the sum of v[j]'s lanes, for j < J, N vectors at a time: each level adds every vector's
// adjacent lanes (2i, 2i+1) and packs two vectors' results into one (ConcatEven + ConcatOdd), so
// after log2(N) levels lane j holds vector j's sum. A vector's arithmetic is the same tree of
// adjacent pairs in whichever slot it sits and whatever sits beside it (a missing neighbour is
// zero): a dot product is bitwise the same from any tile, and the shuffles are shared by N sums.
template <size_t J>
HWY_INLINE void SumLanes(const VF (&v)[J], float* out) {
    const DF d;
    for (size_t j0 = 0; j0 < J; j0 += N) {
        const size_t m = std::min(N, J - j0);
        VF cur[N];
        size_t count = m;
        for (size_t j = 0; j < count; j++) cur[j] = v[j0 + j];
        for (size_t width = N; width > 1; width /= 2) {
            const size_t next = (count + 1) / 2;
            for (size_t i = 0; i < next; i++) {
                const VF a = cur[2 * i], b = 2 * i + 1 < count ? cur[2 * i + 1] : hn::Zero(d);
                cur[i] = hn::Add(hn::ConcatEven(d, b, a), hn::ConcatOdd(d, b, a));
            }
            count = next;
        }
        alignas(64) float lanes[N];
        hn::Store(cur[0], d, lanes);
        for (size_t j = 0; j < m; j++) out[j0 + j] = lanes[j];
    }
}

// The first `bytes` bytes at p as a vector of D's lanes, the rest zero, reading nothing past them:
// row tails. AVX-512 loads bytes under a mask, AVX2 whole 32-bit lanes (masked loads never fault
// past the mask); elsewhere, or on AVX2 for a byte count that is not a multiple of 4, a
// zero-padded copy (its store and reload cost a store-forwarding stall).
template <class D>
HWY_INLINE hn::Vec<D> LoadTailBytes(D d, const void* p, size_t bytes) {
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3  // AVX-512: masks of single bytes
    const hn::Repartition<uint8_t, D> du8;
    return hn::BitCast(d, hn::MaskedLoad(hn::FirstN(du8, bytes), du8, static_cast<const uint8_t*>(p)));
#elif HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2
    if (bytes % 4 == 0) {
        const hn::Repartition<uint32_t, D> du;
        return hn::BitCast(d, hn::MaskedLoad(hn::FirstN(du, bytes / 4), du, static_cast<const uint32_t*>(p)));
    }
#endif
    alignas(64) uint8_t buf[hn::MaxLanes(D()) * sizeof(hn::TFromD<D>)] = {};
    std::memcpy(buf, p, bytes);
    return hn::Load(d, reinterpret_cast<const hn::TFromD<D>*>(buf));
}

// A tile's results: out[t][r] = the sum of acc[t][r]'s lanes (SumLanes), times row_scale[r] when
// given (per-row int8).
template <int NT, int NR>
HWY_INLINE void StoreSums(const VF (&acc)[NT * NR], float* out, size_t out_stride, const float* row_scale) {
    float sums[NT * NR];
    SumLanes(acc, sums);
    HWY_UNROLL(16)
    for (int t = 0; t < NT; t++)
        HWY_UNROLL(16)
        for (int r = 0; r < NR; r++) out[t * out_stride + r] = row_scale ? sums[t * NR + r] * row_scale[r] : sums[t * NR + r];
}

// `len` (< N) floats from p, the rest zero: column tails, without reading past the end.
HWY_INLINE VF LoadTail(const float* p, size_t len) { return LoadTailBytes(DF(), p, len * sizeof(float)); }

// sum a[i] * b[i] over i < n.
HWY_INLINE float DotOne(const float* a, const float* b, int n) {
    const DF d;
    VF acc[1] = {hn::Zero(d)};
    size_t i = 0;
    for (; i + N <= size_t(n); i += N) acc[0] = hn::MulAdd(hn::LoadU(d, a + i), hn::LoadU(d, b + i), acc[0]);
    if (i < size_t(n)) acc[0] = hn::MulAdd(LoadTail(a + i, n - i), LoadTail(b + i, n - i), acc[0]);
    float s;
    SumLanes(acc, &s);
    return s;
}

// ---------------------------------------------------------------------------------------------
// Attention's inner products (CpuOps::attention)

// out[p] = a . rows[p] for p < len, N positions at a time sharing a's loads and the sums' shuffles;
// each summed exactly as DotOne sums it.
void Dots(const float* a, const float* const* rows, int len, int n, float* out) {
    const DF d;
    int p = 0;
    for (; p + int(N) <= len; p += int(N)) {
        VF acc[N];
        for (size_t j = 0; j < N; j++) acc[j] = hn::Zero(d);
        size_t i = 0;
        for (; i + N <= size_t(n); i += N) {
            const VF av = hn::LoadU(d, a + i);
            for (size_t j = 0; j < N; j++) acc[j] = hn::MulAdd(av, hn::LoadU(d, rows[p + j] + i), acc[j]);
        }
        if (i < size_t(n)) {
            const VF av = LoadTail(a + i, n - i);
            for (size_t j = 0; j < N; j++) acc[j] = hn::MulAdd(av, LoadTail(rows[p + j] + i, n - i), acc[j]);
        }
        SumLanes(acc, out + p);
    }
    for (; p < len; p++) out[p] = DotOne(a, rows[p], n);
}

// out[i] = sum over p < len of a[p] * rows[p][i], for i < n: the weighted sum of value rows, in
// position order, 4N columns at a time in registers (accumulating into memory per position was
// bound by its loads and stores). Each output is one chain of fused multiply-adds.
void WeightedRows(const float* a, const float* const* rows, int len, int n, float* out) {
    const DF d;
    for (size_t c0 = 0; c0 < size_t(n); c0 += 4 * N) {
        const size_t width = std::min(4 * N, size_t(n) - c0), full = width / N;  // full: chunks of N
        VF acc[4] = {hn::Zero(d), hn::Zero(d), hn::Zero(d), hn::Zero(d)};
        for (int p = 0; p < len; p++) {
            const VF ap = hn::Set(d, a[p]);
            const float* r = rows[p] + c0;
            for (size_t j = 0; j < full; j++) acc[j] = hn::MulAdd(ap, hn::LoadU(d, r + j * N), acc[j]);
            if (full < 4 && width % N) acc[full] = hn::MulAdd(ap, LoadTail(r + full * N, width % N), acc[full]);
        }
        for (size_t j = 0; j < full; j++) hn::StoreU(acc[j], d, out + c0 + j * N);
        if (width % N) {
            alignas(64) float buf[N];
            hn::Store(acc[full], d, buf);
            std::memcpy(out + c0 + full * N, buf, (width % N) * sizeof(float));
        }
    }
}

// out[t] = x[t] / rms(x[t]) * weight, for the n rows [n][dim].
void Rmsnorm(float* out, const float* x, const float* weight, int n, int dim, float eps) {
    const DF d;
    for (int t = 0; t < n; t++) {
        const float* xt = x + size_t(t) * dim;
        float* ot = out + size_t(t) * dim;
        const float s = 1.0f / std::sqrt(DotOne(xt, xt, dim) / float(dim) + eps);
        const VF scale = hn::Set(d, s);
        int i = 0;
        for (; i + int(N) <= dim; i += int(N))
            hn::StoreU(hn::Mul(hn::Mul(hn::LoadU(d, xt + i), scale), hn::LoadU(d, weight + i)), d, ot + i);
        for (; i < dim; i++) ot[i] = xt[i] * s * weight[i];
    }
}

// ---------------------------------------------------------------------------------------------
// matmul: out[n][rows] = x[n][cols] . W[rows][cols]^T, W in f32/bf16/f16 (f32 accumulation) or
// int8/int4 (integer dot products on x rounded to 15 bits, above).
//
// Decode (n = 1) is a matrix-vector product bound by memory bandwidth: threads take contiguous
// row ranges, and each step streams 4 weight rows (int8 on AVX-512: 8) so enough loads are in
// flight (bf16 and the integer formats also prefetch 16 rows ahead). Prefill (n > 1) tiles tokens
// x rows in registers (AVX-512 and NEON: 4 x 4; SSE4/AVX2, with half the registers: 4 x 2): each
// weight vector loaded (and converted) once feeds several tokens, and a block of rows is reused
// from cache across all token tiles, so weights come from memory once per matmul rather than once
// per token. Column tails: x comes zero-padded to whole steps, and each row's last columns are
// copied to a zero-padded step, so no load reads past a row.

// Columns a step of format T covers: N (f32, f16: one vector), 2N (bf16: a vector of pairs).
constexpr size_t FloatStep(DType T) { return T == DType::BF16 ? 2 * N : N; }

// x [n][cols] in the layout format T's tiles read, zero-padded to whole steps: f32 and f16 read it
// as it is (a padded copy only when cols is not a multiple of N); bf16 reads each 2N-column block
// as its N even columns, then its N odd ones (see FloatSteps). Returns x or buf's data.
const float* PrepFloatX(DType T, const float* x, int n, int cols, std::vector<float>* buf, size_t* stride) {
    const size_t step = FloatStep(T), padded = (size_t(cols) + step - 1) / step * step;
    *stride = padded;
    if (T != DType::BF16 && padded == size_t(cols)) {
        *stride = size_t(cols);
        return x;
    }
    buf->assign(size_t(n) * padded, 0.0f);
    for (int t = 0; t < n; t++) {
        const float* xt = x + size_t(t) * cols;
        float* ot = buf->data() + size_t(t) * padded;
        if (T != DType::BF16) {
            std::memcpy(ot, xt, sizeof(float) * size_t(cols));
            continue;
        }
        size_t b = 0;
        for (; b + step <= size_t(cols); b += step)
            for (size_t i = 0; i < N; i++) {
                ot[b + i] = xt[b + 2 * i];
                ot[b + N + i] = xt[b + 2 * i + 1];
            }
        for (size_t k = b; k < size_t(cols); k++) ot[b + (k - b) % 2 * N + (k - b) / 2] = xt[k];
    }
    return buf->data();
}

// One step of an NT x NR float tile at column k (the tail step: `bytes` of each row): each weight
// vector feeds NT fused multiply-adds. bf16 without shuffles: a vector of 32-bit lanes holds 2N
// weights, each lane an even column (low half) and the next odd one (high half), so a shift gives
// the even columns as f32 and a mask the odd ones, against x's matching halves (PrepFloatX).
// Widening instead costs a shuffle per N weights, which made bf16 decode compute-bound on AVX-512
// (36 vs 42 GB/s for f32).
template <DType T, int NT, int NR, bool kTail>
HWY_INLINE void FloatSteps(VF (&acc)[NT * NR], const float* x, size_t xs, const uint8_t* w, size_t ws, size_t k,
                           size_t bytes) {
    const DF d;
    constexpr size_t es = T == DType::F32 ? 4 : 2;
    if constexpr (T == DType::BF16) {
        const DU du;
        const auto high = hn::Set(du, 0xffff0000u);
        VF even[NR], odd[NR];
        HWY_UNROLL(16)
        for (int r = 0; r < NR; r++) {
            const uint8_t* p = w + r * ws + k * es;
            const auto v = kTail ? LoadTailBytes(du, p, bytes) : hn::LoadU(du, reinterpret_cast<const uint32_t*>(p));
            even[r] = hn::BitCast(d, hn::ShiftLeft<16>(v));
            odd[r] = hn::BitCast(d, hn::And(v, high));
        }
        HWY_UNROLL(16)
        for (int t = 0; t < NT; t++) {
            const VF xe = hn::LoadU(d, x + t * xs + k), xo = hn::LoadU(d, x + t * xs + k + N);
            HWY_UNROLL(16)
            for (int r = 0; r < NR; r++) acc[t * NR + r] = hn::MulAdd(xo, odd[r], hn::MulAdd(xe, even[r], acc[t * NR + r]));
        }
    } else {
        VF wv[NR];
        HWY_UNROLL(16)
        for (int r = 0; r < NR; r++) {
            const uint8_t* p = w + r * ws + k * es;
            if constexpr (T == DType::F32) {
                wv[r] = kTail ? LoadTailBytes(d, p, bytes) : hn::LoadU(d, reinterpret_cast<const float*>(p));
            } else {
                const hn::Rebind<hwy::float16_t, DF> dh;
                wv[r] = hn::PromoteTo(d, kTail ? LoadTailBytes(dh, p, bytes) : hn::LoadU(dh, reinterpret_cast<const hwy::float16_t*>(p)));
            }
        }
        HWY_UNROLL(16)
        for (int t = 0; t < NT; t++) {
            const VF xv = hn::LoadU(d, x + t * xs + k);
            HWY_UNROLL(16)
            for (int r = 0; r < NR; r++) acc[t * NR + r] = hn::MulAdd(xv, wv[r], acc[t * NR + r]);
        }
    }
}

// Prefetching a tile asks for: none, the next tile's rows at the same column (the first token
// tile of a prefill block streams its rows from memory; later tiles find the block in L2, where
// prefetching into L1 measured much slower, n = 64: 79 -> 155+ ms), or rows 16 ahead (decode).
enum Fetch { kNoPrefetch, kNextTile, kAhead };

// NT tokens x NR rows of dot products over all columns; results to out[t][r].
template <DType T, int NT, int NR, Fetch P>
HWY_INLINE void FloatTile(float* out, size_t out_stride, const float* x, size_t xs, const uint8_t* w, size_t ws,
                          int cols) {
    constexpr size_t S = FloatStep(T), es = T == DType::F32 ? 4 : 2;
    VF acc[NT * NR];
    HWY_UNROLL(16)
    for (auto& a : acc) a = hn::Zero(DF());
    size_t k = 0;
    for (; k + S <= size_t(cols); k += S) {
        if constexpr (P == kNextTile)
            HWY_UNROLL(16)
            for (int r = 0; r < NR; r++) hwy::Prefetch(w + (NR + r) * ws + k * es);
        // bf16 decode: rows 4 tiles ahead, once per cache line (bf16 110m decode 158 -> 187 tok/s
        // on AVX-512). f32 measured slower with it: its longer rows keep the hardware prefetcher
        // ahead on its own.
        if constexpr (P == kAhead)
            if ((k * es) % 64 == 0)
                HWY_UNROLL(16)
                for (int r = 0; r < NR; r++) hwy::Prefetch(w + (16 + r) * ws + k * es);
        FloatSteps<T, NT, NR, false>(acc, x, xs, w, ws, k, 0);
    }
    if (k < size_t(cols)) FloatSteps<T, NT, NR, true>(acc, x, xs, w, ws, k, (size_t(cols) - k) * es);
    StoreSums<NT, NR>(acc, out, out_stride, nullptr);
}

// quantize_activations (ops.h) for each of X's rows of x, N columns at a time: the same values
// bitwise (the block maximum is exact in any order; x * (16256 / max) rounds to even as nearbyint
// does), without its scalar loop (4% of an int4 prefill).
void QuantizeRows(const float* x, QuantizedX* X) {
    const DF d;
    const DI di;
    constexpr float kMax = 16256.0f;
    const size_t cols = size_t(X->cols), stride = size_t(X->stride), blocks = stride / 32;
    for (size_t t = 0; t < size_t(X->n); t++) {
        const float* xt = x + t * cols;
        int16_t* vt = X->v.data() + t * stride;
        for (size_t k0 = 0; k0 < cols; k0 += 32) {
            const size_t len = std::min<size_t>(32, cols - k0);
            alignas(64) float buf[32] = {};
            const float* p = xt + k0;
            if (len < 32) p = static_cast<const float*>(std::memcpy(buf, p, len * sizeof(float)));
            VF amax = hn::Zero(d);
            for (size_t i = 0; i < 32; i += N) amax = hn::Max(amax, hn::Abs(hn::LoadU(d, p + i)));
            const float m = hn::GetLane(hn::MaxOfLanes(d, amax));
            X->d[t * blocks + k0 / 32] = m / kMax;
            const VF inv = hn::Set(d, m > 0.0f ? kMax / m : 0.0f), lim = hn::Set(d, kMax);
            for (size_t i = 0; i < 32; i += N) {
                const VF q = hn::Min(hn::Max(hn::Round(hn::Mul(hn::LoadU(d, p + i), inv)), hn::Neg(lim)), lim);
                hn::StoreU(hn::DemoteTo(hn::Rebind<int16_t, DF>(), hn::ConvertTo(di, q)), hn::Rebind<int16_t, DF>(), vt + k0 + i);
            }
        }
    }
}

// ---- the integer formats

// Lane sums of 16-bit products: lane i of the result = sum over j of a[j][2i] b[j][2i] +
// a[j][2i+1] b[j][2i+1], exact in 32 bits here (|a b| < 2^29, at most 8 products a lane).
// AVX-512 VNNI fuses each multiply and add (vpdpwssd), which Highway's op does not use; written
// as asm because Highway 1.0.3's AVX3_DL target does not enable the intrinsic (it names avxvnni).
template <size_t K>
HWY_INLINE VI PairDots(const V16 (&a)[K], const V16 (&b)[K]) {
    const DI di;
// Pairs of operands go to separate accumulators, added at the end (integers: the same sums), so
// the chain of dependent multiply-adds is two long, not K.
#if HWY_TARGET == HWY_AVX3_DL
    __m512i s[2] = {hn::Zero(di).raw, hn::Zero(di).raw};
    HWY_UNROLL(16)
    for (size_t j = 0; j < K; j++) asm("vpdpwssd %2, %1, %0" : "+v"(s[j / 2 % 2]) : "v"(a[j].raw), "vm"(b[j].raw));
    return hn::Add(VI{s[0]}, VI{s[1]});
#else
    VI s0[2] = {hn::Zero(di), hn::Zero(di)}, s1[2] = {hn::Zero(di), hn::Zero(di)};
    HWY_UNROLL(16)
    for (size_t j = 0; j < K; j++) s0[j / 2 % 2] = hn::ReorderWidenMulAccumulate(di, a[j], b[j], s0[j / 2 % 2], s1[j / 2 % 2]);
    return hn::Add(hn::RearrangeToOddPlusEven(s0[0], s1[0]), hn::RearrangeToOddPlusEven(s0[1], s1[1]));
#endif
}

#if HWY_TARGET == HWY_AVX3_DL
// int4 with VNNI: the nibbles (even columns lo, odd hi) against x's int8 digits (PrepInt4),
// vpdpbusd's 4 unsigned x signed byte products per lane: 128 * sum(q h) + sum(q l), exact, lanes
// 4j..4j+3 summing block j as PairDots' do. Half the multiply instructions of the 16-bit words
// and no interleaving (AVX-512 int4 decode and prefill measured 15-20% faster this way).
HWY_INLINE VI DigitDots(hn::Vec<DU8> lo, hn::Vec<DU8> hi, const hn::Vec<D8> (&x)[4]) {
    __m512i h = _mm512_setzero_si512(), l = _mm512_setzero_si512();
    asm("vpdpbusd %2, %1, %0" : "+v"(h) : "v"(lo.raw), "v"(x[0].raw));
    asm("vpdpbusd %2, %1, %0" : "+v"(l) : "v"(lo.raw), "v"(x[2].raw));
    asm("vpdpbusd %2, %1, %0" : "+v"(h) : "v"(hi.raw), "v"(x[1].raw));
    asm("vpdpbusd %2, %1, %0" : "+v"(l) : "v"(hi.raw), "v"(x[3].raw));
    return hn::Add(hn::ShiftLeft<7>(VI{h}), VI{l});
}
#endif

// The integer kernels' steps. int8: 4N columns (one vector of weight bytes); each byte goes to a
// 16-bit word as 256 w by interleaving under a zero byte, within each 128-bit block j: columns
// 16j..16j+7 to the first vector, 16j+8..16j+15 to the second, so that lane l's products stay in
// 16-column chunk l / 4, inside one 32-column block. int4: 8N columns (4N bytes, two nibbles
// each); the low nibbles (even columns) and high ones (odd columns) interleave under zero bytes
// into four vectors of 16-bit q, and each 128-bit block j of them holds exactly the 32 columns
// 32j..32j+31: lanes 4j..4j+3 sum one block.
constexpr size_t kStepI8 = 4 * N, kStepI4 = 8 * N;
// The first column of lane l's chunk in step s.
inline int LaneColumnI8(size_t s, size_t l) { return int(s * kStepI8 + 16 * (l / 4)); }
inline int LaneColumnI4(size_t s, size_t l) { return int(s * kStepI4 + 32 * (l / 4)); }

// x's rounded values in the int8 tile's order (above): per step, for each 128-bit block j, x
// [16j..16j+7] then (in the second vector) x[16j+8..16j+15]; lanes8: each lane's block d / 256.
void PrepInt8(QuantizedX* X) {
    if (!X->v8.empty()) return;
    const size_t stride = size_t(X->stride), steps = stride / kStepI8, blocks = stride / 32;
    X->v8.resize(X->v.size());
    X->lanes8.resize(size_t(X->n) * steps * N);
    for (size_t t = 0; t < size_t(X->n); t++)
        for (size_t s = 0; s < steps; s++) {
            const int16_t* v = X->v.data() + t * stride + s * kStepI8;
            int16_t* o = X->v8.data() + t * stride + s * kStepI8;
            for (size_t j = 0; j < N / 4; j++)
                for (size_t i = 0; i < 8; i++) {
                    o[8 * j + i] = v[16 * j + i];
                    o[2 * N + 8 * j + i] = v[16 * j + 8 + i];
                }
            for (size_t l = 0; l < N; l++)
                X->lanes8[(t * steps + s) * N + l] = X->d[t * blocks + size_t(LaneColumnI8(s, l)) / 32] / 256;
        }
}

// x's rounded values in the int4 tile's order: per step and 128-bit block j, the block's columns
// 32j + {0, 2, .., 14}, {16, .., 30}, {1, .., 15}, {17, .., 31}, one vector each; lanes4: each
// lane's block d.
void PrepInt4(QuantizedX* X) {
    if (!X->v4.empty()) return;
    const size_t stride = size_t(X->stride), steps = stride / kStepI4, blocks = stride / 32;
    X->v4.resize(X->v.size());
    X->lanes4.resize(size_t(X->n) * steps * N);
    static constexpr int kBase[4] = {0, 16, 1, 17};
    for (size_t t = 0; t < size_t(X->n); t++)
        for (size_t s = 0; s < steps; s++) {
            const int16_t* v = X->v.data() + t * stride + s * kStepI4;
            int16_t* o = X->v4.data() + t * stride + s * kStepI4;
#if HWY_TARGET == HWY_AVX3_DL
            // VNNI (StepI4): v = 128 h + l as int8 digits, l in [-64, 63], in the 256 bytes of the
            // step's words: h of the even columns, h of the odd ones, l of the even, l of the odd.
            int8_t* o8 = reinterpret_cast<int8_t*>(o);
            for (size_t i = 0; i < kStepI4 / 2; i++)
                for (size_t odd = 0; odd < 2; odd++) {
                    const int x = v[2 * i + odd], h = (x + 64) >> 7;
                    o8[64 * odd + i] = int8_t(h);
                    o8[128 + 64 * odd + i] = int8_t(x - 128 * h);
                }
#else
            for (size_t q = 0; q < 4; q++)
                for (size_t j = 0; j < N / 4; j++)
                    for (size_t i = 0; i < 8; i++) o[q * 2 * N + 8 * j + i] = v[32 * j + size_t(kBase[q]) + 2 * i];
#endif
            for (size_t l = 0; l < N; l++)
                X->lanes4[(t * steps + s) * N + l] = X->d[t * blocks + size_t(LaneColumnI4(s, l)) / 32];
        }
}

// W's groups as each step's lanes see them (StepTable), for the int8 or int4 step of this target.
void BuildSteps(int cols, int group, bool int4, StepTable* st) {
    const size_t step = int4 ? kStepI4 : kStepI8, steps = (size_t(cols) + step - 1) / step;
    st->first.resize(steps), st->distinct.resize(steps), st->split.resize(steps), st->idx.resize(steps * N);
    for (size_t s = 0; s < steps; s++) {
        int first = 0, last = 0, split = 0;
        for (size_t l = 0; l < N; l++) {
            // lanes past the last column (zero x) take the last group's scale
            const int col = std::min(int4 ? LaneColumnI4(s, l) : LaneColumnI8(s, l), cols - 1);
            const int g = col / group;
            if (l == 0) first = g;
            last = g;
            split += g == first;
            st->idx[s * N + l] = g - first;
        }
        st->first[s] = first, st->distinct[s] = last - first + 1, st->split[s] = split;
    }
}

// p[0..3] in the first four lanes (16-lane vectors only; narrower ones never need it).
template <class D>
HWY_INLINE hn::Vec<D> LoadFour(D d, const float* p) {
    if constexpr (hn::MaxLanes(D()) == 16)
        return hn::ZeroExtendVector(d, hn::ZeroExtendVector(hn::Half<D>(), hn::LoadU(hn::Full128<float>(), p)));
    else
        return hn::LoadU(d, p);  // unreached
}

// How the lanes of step s find their group scales (StepTable), worked out once for all the rows of
// a tile: one group (a broadcast), two (two broadcasts and a blend), or up to four consecutive
// ones (AVX-512 int4 at group 32: one load of four, one permute).
using IdxF = decltype(hn::SetTableIndices(DF(), static_cast<const int32_t*>(nullptr)));
struct StepScales {
    int first = 0, distinct = 1;
    bool four = false;  // distinct > 2: the load of four stays inside the row
    hn::Mask<DF> lead;  // distinct == 2: the lanes of the first group
    IdxF idx;           // distinct > 2: each lane's group relative to the first
    // Spelled out: an implicit constructor would lack the target's attributes (GCC on Arm refuses
    // to inline Highway's mask constructor into it).
    HWY_INLINE StepScales() {}  // lead and idx unset: read only where distinct says so
    HWY_INLINE StepScales(const StepTable& st, size_t s, int ng)
        : first(st.first[s]), distinct(st.distinct[s]), four(N == 16 && distinct > 2 && first + 4 <= ng),
          lead(hn::FirstN(DF(), size_t(st.split[s]))), idx(hn::SetTableIndices(DF(), &st.idx[s * N])) {}
};

HWY_INLINE StepScales PlanScales(const StepTable& st, size_t s, int ng) { return StepScales(st, s, ng); }

// Each lane's group scale, for a row whose group scales start at sc. kStep: the step's columns;
// a step inside one 32-column block sees one group (AVX2's and SSE4's int8, SSE4's int4), and the
// plan is not looked at.
template <size_t kStep>
HWY_INLINE VF RowScales(const StepScales& p, const StepTable& st, size_t s, const float* sc, int group) {
    const DF d;
    if constexpr (kStep <= 32) return hn::Set(d, sc[s * kStep / size_t(group)]);
    const float* g = sc + p.first;
    if (p.distinct == 1) return hn::Set(d, g[0]);
    if (p.distinct == 2) return hn::IfThenElse(p.lead, hn::Set(d, g[0]), hn::Set(d, g[1]));
    if (p.four) return hn::TableLookupLanes(LoadFour(d, g), p.idx);
    alignas(64) float lanes[N];
    for (size_t l = 0; l < N; l++) lanes[l] = g[st.idx[s * N + l]];
    return hn::Load(d, lanes);
}

// RowScales for NR rows gs groups apart, with the plan's branch taken once for all of them.
template <size_t kStep, int NR>
HWY_INLINE void RowScalesAll(const StepScales& p, const StepTable& st, size_t s, const float* sc, size_t gs, int group,
                             VF (&sw)[NR]) {
    const DF d;
    if (kStep <= 32) {
        HWY_UNROLL(16)
        for (int r = 0; r < NR; r++) sw[r] = hn::Set(d, sc[r * gs + s * kStep / size_t(group)]);
    } else if (p.distinct == 1) {
        HWY_UNROLL(16)
        for (int r = 0; r < NR; r++) sw[r] = hn::Set(d, sc[r * gs + size_t(p.first)]);
    } else if (p.distinct == 2) {
        HWY_UNROLL(16)
        for (int r = 0; r < NR; r++)
            sw[r] = hn::IfThenElse(p.lead, hn::Set(d, sc[r * gs + size_t(p.first)]), hn::Set(d, sc[r * gs + size_t(p.first) + 1]));
    } else if (p.four) {
        HWY_UNROLL(16)
        for (int r = 0; r < NR; r++) sw[r] = hn::TableLookupLanes(LoadFour(d, sc + r * gs + p.first), p.idx);
    } else {
        for (int r = 0; r < NR; r++) sw[r] = RowScales<kStep>(p, st, s, sc + r * gs, group);
    }
}

// Step s's plan: at group 32 every full step's is step 0's shifted by its groups (`uniform`, made
// once per tile: the table loads and mask of each step were a tenth of AVX-512 int4 decode).
template <size_t kStep>
HWY_INLINE StepScales StepPlan(const IntX& ix, const Weight& W, size_t s, const StepScales* uniform) {
    if (!uniform) return PlanScales(*ix.steps, s, W.cols / W.group);
    StepScales p = *uniform;
    p.first = int(s * (kStep / 32));
    return p;
}

// The uniform plan of a group-32 matrix with at least one full step, else null (into *p).
template <size_t kStep>
HWY_INLINE const StepScales* UniformPlan(const IntX& ix, const Weight& W, StepScales* p) {
    if (kStep <= 32 || W.group != 32 || size_t(W.cols) < kStep) return nullptr;
    *p = PlanScales(*ix.steps, 0, W.cols / W.group);
    return p;
}

// One step of the int8 tile: NR rows of 4N weight bytes at column k (the tail step: `bytes` of
// them), against NT tokens' x. Decode prefetches rows (and group scales) 16 ahead, once per cache
// line of the row (as StepI4, where it took SmolLM2's shapes from 27 to 42 GB/s on AVX-512).
template <int NT, int NR, bool kTail>
HWY_INLINE void StepI8(VF (&acc)[NT * NR], const IntX& ix, const Weight& W, const int8_t* w, size_t ws,
                       const float* sc, size_t gs, const int16_t* xv, size_t xs, const float* xl, size_t ls, size_t s,
                       size_t bytes, const StepScales* uniform) {
    const DF d;
    const D16 d16;
    const D8 d8;
    const size_t k = s * kStepI8;
    StepScales plan;
    if (kStepI8 > 32 && W.group) plan = StepPlan<kStepI8>(ix, W, s, uniform);
    HWY_UNROLL(16)
    for (int r = 0; r < NR; r++) {  // row by row: a row's vectors live only while its tokens use them
        const int8_t* p = w + r * ws + k;
        const auto b = kTail ? LoadTailBytes(d8, p, bytes) : hn::LoadU(d8, p);
        const V16 q[2] = {hn::BitCast(d16, hn::InterleaveLower(d8, hn::Zero(d8), b)),
                          hn::BitCast(d16, hn::InterleaveUpper(d8, hn::Zero(d8), b))};
        if constexpr (NT == 1 && NR >= 4 && !kTail)
            if (k % 64 == 0) {
                hwy::Prefetch(p + 16 * ws);
                if (W.group) hwy::Prefetch(sc + (r + 16) * gs + k / size_t(W.group));
            }
        const VF sw = W.group ? RowScales<kStepI8>(plan, *ix.steps, s, sc + r * gs, W.group) : hn::Set(d, 1.0f);
        HWY_UNROLL(16)
        for (int t = 0; t < NT; t++) {
            const int16_t* px = xv + t * xs + k;
            const V16 x[2] = {hn::LoadU(d16, px), hn::LoadU(d16, px + 2 * N)};
            const VF dv = hn::LoadU(d, xl + t * ls + s * N);
            const VF sums = hn::ConvertTo(d, PairDots(q, x));
            acc[t * NR + r] = hn::MulAdd(sums, W.group ? hn::Mul(dv, sw) : dv, acc[t * NR + r]);
        }
    }
}

// int8 weights (per row or grouped) x rounded x, NT tokens x NR rows from row r0: per step two
// vectors of 256 w words against x's (PrepInt8), the 32-bit lane sums converted once and scaled by
// the lane's block d / 256 (grouped: times the lane's group scale). A per-row scale multiplies the
// finished dot product.
template <int NT, int NR>
HWY_INLINE void TileI8(float* out, size_t out_stride, const IntX& ix, int t0, const Weight& W, int r0) {
    const QuantizedX& X = *ix.x;
    const size_t ws = size_t(W.stride), gs = W.group ? size_t(W.stride) / W.group : 0;
    const size_t xs = size_t(X.stride), ls = xs / kStepI8 * N;
    const int8_t* w = static_cast<const int8_t*>(W.data) + r0 * ws;
    const float* sc = W.scales + r0 * gs;
    const int16_t* xv = X.v8.data() + size_t(t0) * xs;
    const float* xl = X.lanes8.data() + size_t(t0) * ls;
    VF acc[NT * NR];
    HWY_UNROLL(16)
    for (auto& a : acc) a = hn::Zero(DF());
    const size_t full = size_t(W.cols) / kStepI8;
    StepScales u;
    const StepScales* uniform = W.group ? UniformPlan<kStepI8>(ix, W, &u) : nullptr;
    for (size_t s = 0; s < full; s++) StepI8<NT, NR, false>(acc, ix, W, w, ws, sc, gs, xv, xs, xl, ls, s, 0, uniform);
    if (full * kStepI8 < size_t(W.cols))
        StepI8<NT, NR, true>(acc, ix, W, w, ws, sc, gs, xv, xs, xl, ls, full, size_t(W.cols) - full * kStepI8, nullptr);
    StoreSums<NT, NR>(acc, out, out_stride, W.group ? nullptr : W.scales + r0);
}

// `len` (<= N) floats from p into the lanes, the rest zero.
HWY_INLINE VF LoadUpTo(const float* p, size_t len) { return len == N ? hn::LoadU(DF(), p) : LoadTail(p, len); }

// Decode's int4 prefetch, once per cache line of the row: the row, its scales and its minimums
// 16 rows ahead.
template <bool kMins>
HWY_INLINE void PrefetchI4(const Weight& W, int row, const uint8_t* p, size_t ws, const float* sc, size_t gs, size_t k) {
    if (k % 128) return;
    hwy::Prefetch(p + 16 * ws);
    hwy::Prefetch(sc + 16 * gs + k / W.group);
    if constexpr (kMins) hwy::Prefetch(W.mins + (size_t(row) + 16) * gs + k / W.group);
}

// One step of the int4 tile: NR rows of 4N bytes (8N columns) at column k (the tail: `bytes`),
// against NT tokens' x; decode prefetches rows, scales and minimums 16 rows ahead.
template <int NT, int NR, bool kMins, bool kTail>
HWY_INLINE void StepI4(VF (&acc)[NT * NR], const IntX& ix, const Weight& W, int r0, const uint8_t* w, size_t ws,
                       const float* sc, size_t gs, const int16_t* xv, size_t xs, const float* xl, size_t ls, size_t s,
                       size_t bytes, const StepScales* uniform) {
    const DF d;
    const D16 d16;
    const DU8 du8;
    const hn::Repartition<uint16_t, DF> du16;
    const size_t k = s * kStepI4;
    const auto nib = hn::Set(du8, uint8_t(0x0f));
    StepScales plan;
    if (kStepI4 > 32) plan = StepPlan<kStepI4>(ix, W, s, uniform);
#if HWY_TARGET == HWY_AVX3_DL
    // Rows first, then each token's digits once against every row (the digits are 4 vectors a
    // token, the nibbles 2 a row: 2 x 4 tiles fit the registers).
    hn::Vec<DU8> lo[NR], hi[NR];
    VF sw[NR];
    RowScalesAll<kStepI4, NR>(plan, *ix.steps, s, sc, gs, W.group, sw);
    HWY_UNROLL(16)
    for (int r = 0; r < NR; r++) {
        const uint8_t* p = w + r * ws + k / 2;
        const auto b = kTail ? LoadTailBytes(du8, p, bytes) : hn::LoadU(du8, p);
        lo[r] = hn::And(b, nib);
        hi[r] = hn::And(hn::BitCast(du8, hn::ShiftRight<4>(hn::BitCast(du16, b))), nib);
        if constexpr (NT == 1 && NR == 4 && !kTail) PrefetchI4<kMins>(W, r0 + r, p, ws, sc + r * gs, gs, k);
    }
    HWY_UNROLL(16)
    for (int t = 0; t < NT; t++) {
        const int8_t* px = reinterpret_cast<const int8_t*>(xv + t * xs + k);
        const hn::Vec<D8> x[4] = {hn::LoadU(D8(), px), hn::LoadU(D8(), px + 64), hn::LoadU(D8(), px + 128),
                                  hn::LoadU(D8(), px + 192)};
        const VF dv = hn::LoadU(d, xl + t * ls + s * N);
        HWY_UNROLL(16)
        for (int r = 0; r < NR; r++) {
            const VF sums = hn::ConvertTo(d, DigitDots(lo[r], hi[r], x));
            acc[t * NR + r] = hn::MulAdd(sums, hn::Mul(dv, sw[r]), acc[t * NR + r]);
        }
    }
#else
    VF sws[NR];
    RowScalesAll<kStepI4, NR>(plan, *ix.steps, s, sc, gs, W.group, sws);
    HWY_UNROLL(16)
    for (int r = 0; r < NR; r++) {  // row by row: a row's vectors live only while its tokens use them
        const uint8_t* p = w + r * ws + k / 2;
        const auto b = kTail ? LoadTailBytes(du8, p, bytes) : hn::LoadU(du8, p);
        const auto lo = hn::And(b, nib), hi = hn::And(hn::BitCast(du8, hn::ShiftRight<4>(hn::BitCast(du16, b))), nib);
        const V16 q[4] = {hn::BitCast(d16, hn::InterleaveLower(du8, lo, hn::Zero(du8))),
                          hn::BitCast(d16, hn::InterleaveUpper(du8, lo, hn::Zero(du8))),
                          hn::BitCast(d16, hn::InterleaveLower(du8, hi, hn::Zero(du8))),
                          hn::BitCast(d16, hn::InterleaveUpper(du8, hi, hn::Zero(du8)))};
        const VF sw = sws[r];
        if constexpr (NT == 1 && NR == 4 && !kTail) PrefetchI4<kMins>(W, r0 + r, p, ws, sc + r * gs, gs, k);
        HWY_UNROLL(16)
        for (int t = 0; t < NT; t++) {
            const int16_t* px = xv + t * xs + k;
            const V16 x[4] = {hn::LoadU(d16, px), hn::LoadU(d16, px + 2 * N), hn::LoadU(d16, px + 4 * N),
                              hn::LoadU(d16, px + 6 * N)};
            const VF dv = hn::LoadU(d, xl + t * ls + s * N);
            const VF sums = hn::ConvertTo(d, PairDots(q, x));
            acc[t * NR + r] = hn::MulAdd(sums, hn::Mul(dv, sw), acc[t * NR + r]);
        }
    }
#endif
}

// int4 x rounded x, NT tokens x NR rows from row r0: per step four vectors of q words against x's
// (PrepInt4), each block's exact integer sum scaled once by the block's d times its group's scale.
// Per group, sum x*w = s * sum x*q + m * sum x (minimums) or s * sum x*q - s*z * sum x (zero
// points): the second terms go in at the end, N groups at a time, from the sums of rounded x per
// group (gsum). cols is a multiple of the group.
template <int NT, int NR, bool kMins>
HWY_INLINE void TileI4(float* out, size_t out_stride, const IntX& ix, int t0, const Weight& W, int r0) {
    const DF d;
    const QuantizedX& X = *ix.x;
    const size_t ws = size_t(W.stride) / 2, gs = size_t(W.stride) / W.group;  // bytes, groups per row
    const int ng = W.cols / W.group;
    const size_t xs = size_t(X.stride), ls = xs / kStepI4 * N;
    const uint8_t* w = static_cast<const uint8_t*>(W.data) + r0 * ws;
    const float* sc = W.scales + r0 * gs;
    const int16_t* xv = X.v4.data() + size_t(t0) * xs;
    const float* xl = X.lanes4.data() + size_t(t0) * ls;
    VF acc[NT * NR];
    HWY_UNROLL(16)
    for (auto& a : acc) a = hn::Zero(d);
    const size_t full = size_t(W.cols) / kStepI4;
    StepScales u;
    const StepScales* uniform = UniformPlan<kStepI4>(ix, W, &u);
    for (size_t s = 0; s < full; s++) StepI4<NT, NR, kMins, false>(acc, ix, W, r0, w, ws, sc, gs, xv, xs, xl, ls, s, 0, uniform);
    if (full * kStepI4 < size_t(W.cols))
        StepI4<NT, NR, kMins, true>(acc, ix, W, r0, w, ws, sc, gs, xv, xs, xl, ls, full, size_t(W.cols) / 2 - full * kStepI4 / 2, nullptr);
    const float* xsum = ix.gsum + size_t(t0) * ng;
    for (int g = 0; g < ng; g += int(N)) {  // acc -= s * z * xsum (or += m * xsum), N groups a step
        const size_t len = std::min(N, size_t(ng - g));
        HWY_UNROLL(16)
        for (int r = 0; r < NR; r++) {
            VF m;
            if constexpr (kMins) {
                m = LoadUpTo(W.mins + (r0 + r) * gs + g, len);
            } else {
                const hn::Rebind<uint8_t, DI> dz;
                const uint8_t* zp = W.zeros + (r0 + r) * gs + g;
                const auto z = len == N ? hn::LoadU(dz, zp) : LoadTailBytes(dz, zp, len);
                m = hn::Mul(LoadUpTo(sc + r * gs + g, len), hn::ConvertTo(d, hn::PromoteTo(DI(), z)));
            }
            HWY_UNROLL(16)
            for (int t = 0; t < NT; t++) {
                const VF xg = LoadUpTo(xsum + t * ng + g, len);
                acc[t * NR + r] = kMins ? hn::MulAdd(m, xg, acc[t * NR + r]) : hn::NegMulAdd(m, xg, acc[t * NR + r]);
            }
        }
    }
    StoreSums<NT, NR>(acc, out, out_stride, nullptr);
}

// NT tokens x NR rows starting at row r: the tile for format T.
template <DType T, int NT, int NR, Fetch P>
HWY_INLINE void TileAt(const MatmulArgs& a, int t0, int r) {
    const Weight& W = *a.w;
    float* o = a.out + size_t(t0) * W.rows + r;
    if constexpr (T == DType::I8) {
        TileI8<NT, NR>(o, W.rows, a.ix, t0, W, r);
    } else if constexpr (T == DType::U8) {
        if (W.mins) TileI4<NT, NR, true>(o, W.rows, a.ix, t0, W, r);
        else TileI4<NT, NR, false>(o, W.rows, a.ix, t0, W, r);
    } else {
        const size_t ws = size_t(W.stride) * dtype_size(T);
        FloatTile<T, NT, NR, P>(o, W.rows, a.x + size_t(t0) * a.x_stride, a.x_stride,
                                static_cast<const uint8_t*>(W.data) + r * ws, ws, W.cols);
    }
}

// Tile shapes. Decode: 4 rows (int8 with 32 registers: 8, its loop is bound by instructions, not
// memory: +7-9% decode). Prefill, tokens x rows: the floats 4 x 4 with 32 registers, 4 x 2 with 16;
// int8 4 x 4 / 4 x 1 (4 x 2 spilled its accumulators on AVX2); int4, whose rows unpack to four q vectors each, 4 x 2 / 4 x 1. More tokens per
// tile share each row's unpacking (int4 at 2 x 4 spilled on AVX-512).
template <DType T>
constexpr int PrefillTokens() { return T == DType::U8 && HWY_TARGET == HWY_AVX3_DL ? 2 : 4; }
template <DType T, int NT>
constexpr int TileRows() {
    if (NT == 1) return T == DType::I8 && kManyRegisters ? 8 : 4;
    if (T == DType::U8) return HWY_TARGET == HWY_AVX3_DL ? 4 : kManyRegisters ? 2 : 1;
    if (T == DType::I8) return kManyRegisters ? 4 : 1;
    return kManyRegisters ? 4 : 2;
}

// Rows [r0, r1) for tokens [t0, t0 + NT): full tiles, then the row tail one row at a time.
template <DType T, int NT>
HWY_INLINE void RowsForTokens(const MatmulArgs& a, int t0, int r0, int r1) {
    constexpr int NR = TileRows<T, NT>();
    constexpr Fetch kStream = NT > 1 ? kNextTile : T != DType::F32 ? kAhead : kNoPrefetch;
    int r = r0;
    if (NT == 1 || t0 == 0)
        for (; r + NR <= r1; r += NR) TileAt<T, NT, NR, kStream>(a, t0, r);
    else
        for (; r + NR <= r1; r += NR) TileAt<T, NT, NR, kNoPrefetch>(a, t0, r);
    if constexpr (NR > 4)
        for (; r + 4 <= r1; r += 4) TileAt<T, NT, 4, kNoPrefetch>(a, t0, r);
    if constexpr (NR > 2)
        for (; r + 2 <= r1; r += 2) TileAt<T, NT, 2, kNoPrefetch>(a, t0, r);
    for (; r < r1; r++) TileAt<T, NT, 1, kNoPrefetch>(a, t0, r);
}

// Rows [r0, r1) of out[n][W.rows] for all n tokens: token tiles, then the token tail.
template <DType T>
void MatmulRowsOf(const MatmulArgs& a, int r0, int r1) {
    constexpr int NT = PrefillTokens<T>();
    int t = 0;
    for (; t + NT <= a.n; t += NT) RowsForTokens<T, NT>(a, t, r0, r1);
    switch (a.n - t) {
        case 3: RowsForTokens<T, 3>(a, t, r0, r1); break;
        case 2: RowsForTokens<T, 2>(a, t, r0, r1); break;
        case 1: RowsForTokens<T, 1>(a, t, r0, r1); break;
        default: break;
    }
}

void MatmulRows(const MatmulArgs& a, int r0, int r1) {
    switch (a.w->dtype) {
        case DType::F32: MatmulRowsOf<DType::F32>(a, r0, r1); break;
        case DType::BF16: MatmulRowsOf<DType::BF16>(a, r0, r1); break;
        case DType::F16: MatmulRowsOf<DType::F16>(a, r0, r1); break;
        case DType::I8: MatmulRowsOf<DType::I8>(a, r0, r1); break;
        case DType::U8: MatmulRowsOf<DType::U8>(a, r0, r1); break;
        default: assert(false && "matmul: unsupported weight dtype");
    }
}

}  // namespace HWY_NAMESPACE
}  // namespace cpu_kernels
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace cpu_kernels {
HWY_EXPORT(TargetName);
HWY_EXPORT(Dots);
HWY_EXPORT(WeightedRows);
HWY_EXPORT(Rmsnorm);
HWY_EXPORT(PrepFloatX);
HWY_EXPORT(QuantizeRows);
HWY_EXPORT(PrepInt8);
HWY_EXPORT(PrepInt4);
HWY_EXPORT(BuildSteps);
HWY_EXPORT(MatmulRows);

// The kernels for the target chosen at start (or by cpu_set_simd_target). HWY_DYNAMIC_DISPATCH
// names the exported function from inside this namespace: where Highway has no run-time dispatch
// (GCC on Arm) it becomes the static target's namespace prefixed to that name.
const char* target_name() { return HWY_DYNAMIC_DISPATCH(TargetName)(); }
void dots(const float* a, const float* const* rows, int len, int n, float* out) {
    HWY_DYNAMIC_DISPATCH(Dots)(a, rows, len, n, out);
}
void weighted_rows(const float* a, const float* const* rows, int len, int n, float* out) {
    HWY_DYNAMIC_DISPATCH(WeightedRows)(a, rows, len, n, out);
}
void rmsnorm(float* out, const float* x, const float* weight, int n, int dim, float eps) {
    HWY_DYNAMIC_DISPATCH(Rmsnorm)(out, x, weight, n, dim, eps);
}
const float* prep_float_x(DType t, const float* x, int n, int cols, std::vector<float>* buf, size_t* stride) {
    return HWY_DYNAMIC_DISPATCH(PrepFloatX)(t, x, n, cols, buf, stride);
}
void quantize_rows(const float* x, QuantizedX* X) { HWY_DYNAMIC_DISPATCH(QuantizeRows)(x, X); }
void prep_int8(QuantizedX* x) { HWY_DYNAMIC_DISPATCH(PrepInt8)(x); }
void prep_int4(QuantizedX* x) { HWY_DYNAMIC_DISPATCH(PrepInt4)(x); }
void build_steps(int cols, int group, bool int4, StepTable* st) { HWY_DYNAMIC_DISPATCH(BuildSteps)(cols, group, int4, st); }
void matmul_rows(const MatmulArgs& a, int r0, int r1) { HWY_DYNAMIC_DISPATCH(MatmulRows)(a, r0, r1); }
}  // namespace cpu_kernels

// ---------------------------------------------------------------------------------------------
// SIMD targets (ops.h)

namespace {
// Targets this build compiled that this CPU runs, best first (Highway's bits: lower is better).
std::vector<int64_t> runnable_targets() {
    std::vector<int64_t> out;
    hwy::SetSupportedTargetsForTest(0);  // the real CPU, not a restriction in force
    const int64_t all = hwy::SupportedTargets() & HWY_TARGETS;
    for (int64_t t = all; t != 0; t &= t - 1) out.push_back(t & ~(t - 1));
    return out;
}
std::string lower(std::string s) {
    for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
    return s;
}
int64_t g_forced_target = 0;  // 0: the best the CPU runs
}  // namespace

std::string cpu_simd_target() { return lower(cpu_kernels::target_name()); }

std::vector<std::string> cpu_simd_targets() {
    std::vector<std::string> names;
    const int64_t forced = g_forced_target;
    for (int64_t t : runnable_targets()) names.push_back(lower(hwy::TargetName(t)));
    hwy::SetSupportedTargetsForTest(forced);
    return names;
}

bool cpu_set_simd_target(const std::string& name, std::string* why) {
    if (name.empty() || name == "auto") {
        g_forced_target = 0;
        hwy::SetSupportedTargetsForTest(0);
        return true;
    }
    std::string known;
    for (int64_t t : runnable_targets()) {
        const std::string n = lower(hwy::TargetName(t));
        if (n == lower(name)) {
            g_forced_target = t;
            hwy::SetSupportedTargetsForTest(t);
            return true;
        }
        known += (known.empty() ? "" : ", ") + n;
    }
    hwy::SetSupportedTargetsForTest(g_forced_target);
    if (why) *why = fmt("SIMD target '%s' is not one this build and CPU can run (they are: %s, or auto)", name.c_str(), known.c_str());
    return false;
}

namespace {
using cpu_kernels::IntX;
using cpu_kernels::MatmulArgs;
using cpu_kernels::QuantizedX;
using cpu_kernels::StepTable;

// gsum[t][g] = sum of rounded x over W's group g: per block d * (the integer sum of v), in order.
void group_sums(const QuantizedX& x, int group, std::vector<float>& gsum) {
    const int ng = x.cols / group, bpg = group / 32, blocks = x.stride / 32;
    gsum.resize(size_t(x.n) * ng);
    for (int t = 0; t < x.n; t++)
        for (int g = 0; g < ng; g++) {
            float s = 0.0f;
            for (int b = g * bpg; b < (g + 1) * bpg; b++) {
                int vs = 0;
                for (int i = 0; i < 32; i++) vs += x.v[size_t(t) * x.stride + b * 32 + i];
                s += x.d[size_t(t) * blocks + b] * float(vs);
            }
            gsum[size_t(t) * ng + g] = s;
        }
}

// One matmul ready to run a row block at a time, so that several matmuls of one input share a
// parallel region (matmul_qkv, ffn_gate_up): on 2 cores a small model's decode is bound by the
// fork/barrier of each region, not by bandwidth.
struct RowBlocks {
    MatmulArgs a;
    int block, n_blocks;

    // Row blocks small enough that a block of weights stays in L2 while every token tile uses it
    // (at most 64 rows at decode), as many as a multiple of the threads, and of equal size: with
    // blocks of the largest size, a 768-row int4 matrix at prefill was 680 + 88 rows, one thread
    // idle most of the time.
    explicit RowBlocks(const MatmulArgs& a_) : a(a_) {
        const Weight& w = *a.w;
        const size_t row_bytes = w.dtype == DType::U8 ? size_t(w.cols) / 2 : size_t(w.cols) * dtype_size(w.dtype);
        const int largest = a.n == 1 ? 64 : std::max<int>(4, int((256 * 1024) / row_bytes) / 4 * 4);
        const int threads = omp_get_max_threads();
        const int blocks = ((w.rows + largest - 1) / largest + threads - 1) / threads * threads;
        block = ((w.rows + blocks - 1) / blocks + 3) / 4 * 4;
        n_blocks = (w.rows + block - 1) / block;
    }
    // Rows [r0, r1), or the rows of block b; the same arithmetic per row whatever the range.
    void run_rows(int r0, int r1) const { cpu_kernels::matmul_rows(a, r0, r1); }
    void run(int b) const { run_rows(b * block, std::min(a.w->rows, (b + 1) * block)); }
};

// silu(h) * up over rows [r0, r1) of h and up [n][rows], in place in h.
inline void silu_mul_rows(float* h, const float* up, int n, int rows, int r0, int r1) {
    for (int t = 0; t < n; t++)
        for (size_t i = size_t(t) * rows + r0; i < size_t(t) * rows + r1; i++) {
            float g = h[i];
            h[i] = g / (1.0f + std::exp(-g)) * up[i];
        }
}

// ---------------------------------------------------------------------------------------------
// the op table

struct CpuOps final : Ops {
    const char* name() const override { return "cpu"; }
    // Memory is host memory: calloc (large blocks come as fresh zero pages, as std::vector's did).
    void* alloc(size_t bytes) override {
        void* p = std::calloc(1, bytes);
        if (!p) throw Error(fmt("out of host memory allocating %.1f MB", bytes / 1e6));
        return p;
    }
    void free(void* p) override { std::free(p); }
    void upload(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
    void download(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
    void copy(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
    void zero(void* p, size_t bytes) override { std::memset(p, 0, bytes); }

    // The forms of one input x that its matmuls' kernels read, each made at most once per x
    // (matmul_qkv and ffn_gate_up run several matmuls of one x): f32/f16 read it zero-padded to
    // whole steps, bf16 in even/odd halves (PrepFloatX), int8 and int4 rounded (x_q_, in the
    // layout of each).
    struct XForms {
        const float* floats = nullptr;  // PrepFloatX's x, for f32/f16 (`pairs` false) or bf16
        bool pairs = false;
        size_t stride = 0;
        bool quantized = false;
    };

    // One matmul ready to run; `slot` (0..2) keeps the scratch of W's group sums and step tables
    // apart for the matmuls of one parallel region.
    RowBlocks prepare(float* out, const float* x, const Weight& w, int n, int slot, XForms& xf) {
        assert(w.dtype == DType::F32 || w.dtype == DType::BF16 || w.dtype == DType::F16 || w.dtype == DType::I8 ||
               w.dtype == DType::U8);
        MatmulArgs a{out, x, size_t(w.cols), &w, IntX{}, n};
        if (w.dtype == DType::I8 || w.dtype == DType::U8) {
            assert(w.group == 0 || (w.group % 32 == 0 && w.cols % w.group == 0 && w.stride % w.group == 0));
            assert(w.dtype == DType::I8 || (w.group > 0 && (w.zeros == nullptr) != (w.mins == nullptr)));
            if (!xf.quantized) {
                x_q_.resize(n, w.cols);
                cpu_kernels::quantize_rows(x, &x_q_);
            }
            xf.quantized = true;
            assert(x_q_.n == n && x_q_.cols == w.cols);
            a.ix.x = &x_q_;
            if (w.dtype == DType::U8) {
                cpu_kernels::prep_int4(&x_q_);
                group_sums(x_q_, w.group, x_gsum_[slot]);
                a.ix.gsum = x_gsum_[slot].data();
            } else {
                cpu_kernels::prep_int8(&x_q_);
            }
            if (w.group) {
                cpu_kernels::build_steps(w.cols, w.group, w.dtype == DType::U8, &steps_[slot]);
                a.ix.steps = &steps_[slot];
            }
            return RowBlocks(a);
        }
        const bool pairs = w.dtype == DType::BF16;
        if (!xf.floats || xf.pairs != pairs) {
            xf.floats = cpu_kernels::prep_float_x(w.dtype, x, n, w.cols, &x_float_[pairs], &xf.stride);
            xf.pairs = pairs;
        }
        a.x = xf.floats;
        a.x_stride = xf.stride;
        return RowBlocks(a);
    }

    void matmul(float* out, const float* x, const Weight& w, int n) override {
        XForms xf;
        const RowBlocks m = prepare(out, x, w, n, 0, xf);
#pragma omp parallel for schedule(static)
        for (int b = 0; b < m.n_blocks; b++) m.run(b);
    }

    // One parallel region over the row blocks of wq, then wk, then wv (each blocked as matmul
    // blocks it), instead of three.
    void matmul_qkv(float* q, float* k, float* v, const float* x, const Weight& wq, const Weight& wk, const Weight& wv,
                    int n) override {
        XForms xf;
        const RowBlocks m[3] = {prepare(q, x, wq, n, 0, xf), prepare(k, x, wk, n, 1, xf), prepare(v, x, wv, n, 2, xf)};
        const int total = m[0].n_blocks + m[1].n_blocks + m[2].n_blocks;
#pragma omp parallel for schedule(static)
        for (int i = 0; i < total; i++) {
            int j = 0, b = i;
            for (; b >= m[j].n_blocks; j++) b -= m[j].n_blocks;
            m[j].run(b);
        }
    }

    // One parallel region: per block of w1's rows, those rows of w1, the same rows of w3, then
    // silu * up for those outputs (the unfused path's three regions, in the same arithmetic).
    void ffn_gate_up(float* h, float* up, const float* x, const Weight& w1, const Weight& w3, int n) override {
        assert(w1.rows == w3.rows && w1.cols == w3.cols);
        XForms xf;
        const RowBlocks gate = prepare(h, x, w1, n, 0, xf), lin = prepare(up, x, w3, n, 1, xf);
#pragma omp parallel for schedule(static)
        for (int b = 0; b < gate.n_blocks; b++) {
            const int r0 = b * gate.block, r1 = std::min(w1.rows, r0 + gate.block);
            gate.run_rows(r0, r1);
            lin.run_rows(r0, r1);
            silu_mul_rows(h, up, n, w1.rows, r0, r1);
        }
    }

    void rmsnorm(float* out, const float* x, const float* weight, int n, int dim, float eps) override {
        if (n == 1) return cpu_kernels::rmsnorm(out, x, weight, 1, dim, eps);
#pragma omp parallel for schedule(static)
        for (int t = 0; t < n; t++)
            cpu_kernels::rmsnorm(out + size_t(t) * dim, x + size_t(t) * dim, weight, 1, dim, eps);
    }

    // Rotations, then the copies into the cache (f32 on the CPU).
    void rope_kv_write(float* q, float* k, const float* v, void* k_cache, void* v_cache, const float* cos_sin,
                       const int* slots, int n, int n_heads, int n_kv_heads, int head_dim) override {
        rope(q, cos_sin, n, n_heads, head_dim);
        rope(k, cos_sin, n, n_kv_heads, head_dim);
        const int kv_dim = n_kv_heads * head_dim;
        for (int t = 0; t < n; t++) {
            std::memcpy(static_cast<float*>(k_cache) + size_t(slots[t]) * kv_dim, k + size_t(t) * kv_dim,
                        sizeof(float) * kv_dim);
            std::memcpy(static_cast<float*>(v_cache) + size_t(slots[t]) * kv_dim, v + size_t(t) * kv_dim,
                        sizeof(float) * kv_dim);
        }
    }

    static void rope(float* x, const float* cos_sin, int n, int n_heads, int head_dim) {
#pragma omp parallel for schedule(static) if (n > 1)
        for (int t = 0; t < n; t++) {
            float* xt = x + size_t(t) * n_heads * head_dim;
            const float* cs = cos_sin + size_t(t) * head_dim;  // [head_dim / 2][2]
            for (int i = 0; i < head_dim / 2; i++) {
                const float c = cs[2 * i], s = cs[2 * i + 1];
                for (int h = 0; h < n_heads; h++) {
                    float* p = xt + h * head_dim + 2 * i;
                    float a = p[0], b = p[1];
                    p[0] = a * c - b * s;
                    p[1] = a * s + b * c;
                }
            }
        }
    }

    // Attention, split along the sequence (flash-decoding on the CPU): work items are (token, KV
    // head, chunk of kAttnChunk positions), so a decode step of a few KV heads still fills every
    // core; the query heads that share a KV head (GQA) read each cached K and V row once. Per
    // chunk: scores (N positions at a time, each summed like DotOne), the chunk's max, exp, its sum
    // and the unnormalised weighted sum of values; then per (token, KV head) the chunks combine in
    // order. The chunking depends on the position alone, so a token's result is the same
    // operation sequence whatever the batch.
    static constexpr int kAttnChunk = 128;

    void attention(float* out, const float* q, const void* k_cache_, const void* v_cache_, const AttentionBatch& b,
                   int n) override {
        const float* k_cache = static_cast<const float*>(k_cache_);
        const float* v_cache = static_cast<const float*>(v_cache_);
        const int hd = b.head_dim, kv_dim = b.n_kv_heads * hd, group = b.n_heads / b.n_kv_heads;
        const float scale = 1.0f / std::sqrt(float(hd));
        // item i of token t: first_item[t] + kvh * chunks(t) + c
        attn_first_.resize(size_t(n) + 1);
        attn_first_[0] = 0;
        for (int t = 0; t < n; t++) {
            const int chunks = b.positions[t] / kAttnChunk + 1;
            attn_first_[size_t(t) + 1] = attn_first_[size_t(t)] + b.n_kv_heads * chunks;
        }
        const int items = attn_first_[size_t(n)];
        const size_t part = size_t(group) * (hd + 2);  // per item: o [group][hd], then max and sum [group]
        attn_part_.resize(size_t(items) * part);
        auto slot_of = [&](int t, int p) {
            const int* table = b.block_tables + b.table_offsets[t];
            return size_t(table[p / b.block_size]) * b.block_size + p % b.block_size;
        };
#pragma omp parallel
        {
            std::vector<float> scores(size_t(group) * kAttnChunk);
            const float* rows[kAttnChunk];   // the chunk's cached K rows for this KV head
            const float* vrows[kAttnChunk];  // and V rows
#pragma omp for schedule(dynamic)
            for (int i = 0; i < items; i++) {
                const int t = int(std::upper_bound(attn_first_.begin(), attn_first_.begin() + n + 1, i) -
                                  attn_first_.begin()) - 1;
                const int chunks = b.positions[t] / kAttnChunk + 1, kvh = (i - attn_first_[size_t(t)]) / chunks,
                          c = (i - attn_first_[size_t(t)]) % chunks;
                const int p0 = c * kAttnChunk, len = std::min(kAttnChunk, b.positions[t] + 1 - p0);
                const float* qg = q + (size_t(t) * b.n_heads + size_t(kvh) * group) * hd;  // [group][hd]
                float* o = attn_part_.data() + size_t(i) * part;
                float* mx = o + size_t(group) * hd;
                float* sum = mx + group;
                for (int p = 0; p < len; p++) {
                    const size_t slot = slot_of(t, p0 + p);
                    rows[p] = k_cache + slot * kv_dim + kvh * hd;
                    vrows[p] = v_cache + slot * kv_dim + kvh * hd;
                }
                for (int g = 0; g < group; g++) {
                    float* sg = scores.data() + size_t(g) * len;
                    cpu_kernels::dots(qg + g * hd, rows, len, hd, sg);
                    mx[g] = -INFINITY;
                    for (int p = 0; p < len; p++) mx[g] = std::max(mx[g], sg[p] *= scale);
                    float s = 0.0f;
                    for (int p = 0; p < len; p++) s += (sg[p] = std::exp(sg[p] - mx[g]));
                    sum[g] = s;
                }
                for (int g = 0; g < group; g++)
                    cpu_kernels::weighted_rows(scores.data() + size_t(g) * len, vrows, len, hd, o + g * hd);
            }
            // Combine each (token, query head)'s chunks: rescale to the largest max, then normalise.
#pragma omp for schedule(static)
            for (int th = 0; th < n * b.n_heads; th++) {
                const int t = th / b.n_heads, h = th % b.n_heads, kvh = h / group, g = h % group;
                const int chunks = b.positions[t] / kAttnChunk + 1;
                const float* first = attn_part_.data() + size_t(attn_first_[size_t(t)] + kvh * chunks) * part;
                float m = -INFINITY;
                for (int c = 0; c < chunks; c++) m = std::max(m, first[c * part + size_t(group) * hd + g]);
                float* oh = out + (size_t(t) * b.n_heads + h) * hd;
                std::fill(oh, oh + hd, 0.0f);
                float total = 0.0f;
                for (int c = 0; c < chunks; c++) {
                    const float* pc = first + c * part;
                    const float w = std::exp(pc[size_t(group) * hd + g] - m);
                    total += w * pc[size_t(group) * hd + group + g];
                    for (int d = 0; d < hd; d++) oh[d] += w * pc[size_t(g) * hd + d];
                }
                for (int d = 0; d < hd; d++) oh[d] /= total;
            }
        }
    }

    std::vector<int> attn_first_;   // scratch: per token, its first attention work item
    std::vector<float> attn_part_;  // scratch: per work item, partial outputs, maxima and sums

    std::vector<float> x_float_[2];  // scratch: PrepFloatX's x for f32/f16 [0] and bf16 [1]
    QuantizedX x_q_;                 // scratch: x rounded for int8/int4 weights
    std::vector<float> x_gsum_[3];   // scratch per slot: int4 group sums of rounded x
    StepTable steps_[3];             // scratch per slot: BuildSteps tables

    void add(float* x, const float* y, size_t n) override {
        for (size_t i = 0; i < n; i++) x[i] += y[i];
    }

    void add_scaled(float* x, const float* y, float a, size_t n) override {
        for (size_t i = 0; i < n; i++) x[i] += a * y[i];
    }

    // Routes every token, then runs each chosen expert once over the tokens routed to it: their
    // rows gathered (expert by expert, tokens in order) into one array, so an expert's products
    // are batched matmuls that read its weights once. Each token's k outputs are then summed in its
    // routing order.
    void moe_ffn(float* out, const float* x, const float* router_logits, const FfnWeights* experts, int n_experts,
                 int k, int n) override {
        const int dim = experts[0].w2.rows, hidden = experts[0].w1.rows;
        const size_t pairs = size_t(n) * k;  // pair p = t * k + j: token t's j-th choice
        moe_chosen_.resize(pairs);
        moe_weight_.resize(pairs);
        for (int t = 0; t < n; t++)
            moe_route(router_logits + size_t(t) * n_experts, n_experts, k, &moe_chosen_[size_t(t) * k],
                      &moe_weight_[size_t(t) * k]);
        moe_slot_.resize(pairs);  // pair -> its row in the gathered arrays
        moe_first_.assign(size_t(n_experts) + 1, 0);  // expert -> its first row
        moe_x_.resize(pairs * dim);
        size_t row = 0;
        for (int e = 0; e < n_experts; e++) {
            moe_first_[size_t(e)] = row;
            for (size_t p = 0; p < pairs; p++) {
                if (moe_chosen_[p] != e) continue;
                moe_slot_[p] = row;
                std::memcpy(&moe_x_[row * dim], x + p / size_t(k) * dim, sizeof(float) * size_t(dim));
                row++;
            }
        }
        moe_first_[size_t(n_experts)] = row;
        moe_h_.resize(pairs * hidden);
        moe_up_.resize(pairs * hidden);
        moe_y_.resize(pairs * dim);
        for (int e = 0; e < n_experts; e++) {
            const size_t r0 = moe_first_[size_t(e)];
            const int m = int(moe_first_[size_t(e) + 1] - r0);
            if (m == 0) continue;
            const FfnWeights& X = experts[e];
            ffn_gate_up(&moe_h_[r0 * hidden], &moe_up_[r0 * hidden], &moe_x_[r0 * dim], X.w1, X.w3, m);
            matmul(&moe_y_[r0 * dim], &moe_h_[r0 * hidden], X.w2, m);
        }
        for (int t = 0; t < n; t++) {
            float* o = out + size_t(t) * dim;
            for (int i = 0; i < dim; i++) {
                float acc = 0.0f;
                for (size_t p = size_t(t) * k; p < size_t(t + 1) * k; p++) acc += moe_weight_[p] * moe_y_[moe_slot_[p] * dim + i];
                o[i] = acc;
            }
        }
    }
    std::vector<int> moe_chosen_;        // scratch: per (token, choice) pair, the expert
    std::vector<float> moe_weight_;      //   and its weight
    std::vector<size_t> moe_slot_;       //   and its row in moe_x_ / moe_y_
    std::vector<size_t> moe_first_;      // scratch: per expert, its first row
    std::vector<float> moe_x_, moe_h_, moe_up_, moe_y_;  // scratch: gathered rows, FFN inner, outputs

    void embed(float* out, const Weight& table, const int* tokens, int n) override {
        if (table.dtype == DType::I8 || table.dtype == DType::U8) {  // a quantized embedding
            for (int t = 0; t < n; t++) dequantize_row(table, tokens[t], out + size_t(t) * table.cols);
            return;
        }
        const size_t row = size_t(table.stride) * dtype_size(table.dtype);
        for (int t = 0; t < n; t++)
            convert_floats(static_cast<const uint8_t*>(table.data) + size_t(tokens[t]) * row, table.dtype,
                           out + size_t(t) * table.cols, DType::F32, size_t(table.cols));
    }
};

}  // namespace

void moe_route(const float* logits, int n, int k, int* chosen, float* weights) {
    assert(n > 0 && k >= 1 && k <= n);
    std::vector<double> p(static_cast<size_t>(n));
    double mx = logits[0], sum = 0;
    for (int e = 1; e < n; e++) mx = std::max(mx, double(logits[e]));
    for (int e = 0; e < n; e++) sum += p[size_t(e)] = std::exp(double(logits[e]) - mx);
    for (int e = 0; e < n; e++) p[size_t(e)] /= sum;
    // Selection by repeated maximum: a strictly greater probability wins, so equal ones keep the
    // lower index (k is 2 for Mixtral; n at most a few dozen).
    std::vector<bool> taken(static_cast<size_t>(n), false);
    double chosen_sum = 0;
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < n; e++)
            if (!taken[size_t(e)] && (best < 0 || p[size_t(e)] > p[size_t(best)])) best = e;
        taken[size_t(best)] = true;
        chosen[j] = best;
        chosen_sum += p[size_t(best)];
    }
    for (int j = 0; j < k; j++) weights[j] = float(p[size_t(chosen[j])] / chosen_sum);
}

Ops* cpu_ops(int threads) {
    if (threads > 0) omp_set_num_threads(threads);
    static CpuOps ops;
    return &ops;
}

#ifndef FASTGEN_CUDA
// A CPU-only build (no nvcc): --device cuda reports this, --device auto picks the CPU. (CUDA builds,
// the emulated one in build/emu included, get them from kernels.cu.)
int cuda_device_count(std::string* why) {
    if (why) *why = "this build has no CUDA backend (nvcc was not found when it was built)";
    return 0;
}
Ops* cuda_ops(int) {
    throw Error("--device cuda: this build has no CUDA backend (nvcc was not found when it was built); "
                "use --device cpu");
}
#endif
#endif  // HWY_ONCE
