// tests/cuda_emu/mma.h: nvcuda::wmma for the CUDA emulator (cuda_runtime.h), 16x16x16 tiles with
// bf16 or f16 operands and f32 accumulators.
//
// A fragment is the whole tile, held by every lane: num_elements 256, x[e] = element (e / 16,
// e % 16) of the tile (row, column; for matrix_b row = k). A real fragment spreads the tile over
// the lanes in an undocumented layout, so a kernel may only treat x[] elementwise, learning an
// element's row or column by loading a tile of indices; that works here too. load, store and
// mma_sync are warp-collective: all 32 lanes must arrive with the same pointer and ldm (and equal
// fragments), which is also what a GPU requires; the pointer must be 32-byte aligned and ldm a
// multiple of 16 bytes. mma_sync multiplies the exact operands and accumulates in f32 in k order
// (a tensor core's order and rounding inside the sum are its own).
#pragma once
#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "the emulator has 16x16x16 tiles only");
    static constexpr int num_elements = 256;
    T x[num_elements];
};

namespace emu_detail {
inline float to_float(float v) { return v; }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float to_float(__half v) { return __half2float(v); }
template <class T>
T from_float(float v) {
    if constexpr (std::is_same_v<T, float>) return v;
    else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
    else return __float2bfloat16_rn(v);
}

template <class A, class B, class C>
void mma_run(const ::emu::detail::WarpCall& w) {
    const A* a = static_cast<const A*>(w.in[0]);
    const B* b = static_cast<const B*>(w.in[1]);
    const C* c = static_cast<const C*>(w.in[2]);
    float fa[256], fb[256], d[256];
    for (int e = 0; e < 256; e++) fa[e] = to_float(a[e]), fb[e] = to_float(b[e]), d[e] = to_float(c[e]);
    for (int i = 0; i < 16; i++)
        for (int k = 0; k < 16; k++)
            for (int j = 0; j < 16; j++) d[i * 16 + j] += fa[i * 16 + k] * fb[k * 16 + j];
    C* out = static_cast<C*>(w.out);
    for (int e = 0; e < 256; e++) out[e] = from_float<C>(d[e]);
}
template <class T>
::emu::detail::WarpCall memory_call(::emu::detail::WarpCall::Kind kind, const char* what, const T* p, unsigned ldm,
                                    bool col) {
    ::emu::detail::WarpCall w{};
    w.kind = kind, w.what = what, w.ptr = p, w.ldm = ldm, w.col = col, w.elem = sizeof(T);
    if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
        ::emu::detail::fault("%s: pointer %p is not 32-byte aligned", what, static_cast<const void*>(p));
    if (ldm * sizeof(T) % 16 != 0) ::emu::detail::fault("%s: ldm %u is not a multiple of 16 bytes", what, ldm);
    return w;
}
}  // namespace emu_detail

template <class Use, class T, class L>
void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, float v) {
    for (auto& e : f.x) e = emu_detail::from_float<T>(v);
}

// matrix_a / matrix_b: the layout is the fragment's.
template <class Use, class T, class L>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
    static_assert(!std::is_same_v<Use, accumulator>, "an accumulator load names its layout");
    ::emu::detail::WarpCall w = emu_detail::memory_call(::emu::detail::WarpCall::kLoad, "wmma::load_matrix_sync", p, ldm,
                                                        std::is_same_v<L, col_major>);
    w.out = f.x, w.out_bytes = sizeof f.x;
    ::emu::detail::warp_call(w);
}
template <class T>
void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const T* p, unsigned ldm, layout_t layout) {
    ::emu::detail::WarpCall w = emu_detail::memory_call(::emu::detail::WarpCall::kLoad, "wmma::load_matrix_sync", p, ldm,
                                                        layout == mem_col_major);
    w.out = f.x, w.out_bytes = sizeof f.x;
    ::emu::detail::warp_call(w);
}
template <class T>
void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ldm, layout_t layout) {
    ::emu::detail::WarpCall w = emu_detail::memory_call(::emu::detail::WarpCall::kStore, "wmma::store_matrix_sync", p, ldm,
                                                        layout == mem_col_major);
    w.in[0] = f.x, w.in_bytes[0] = sizeof f.x;
    ::emu::detail::warp_call(w);
}
template <class A, class LA, class B, class LB, class C>
void mma_sync(fragment<accumulator, 16, 16, 16, C>& d, const fragment<matrix_a, 16, 16, 16, A, LA>& a,
              const fragment<matrix_b, 16, 16, 16, B, LB>& b, const fragment<accumulator, 16, 16, 16, C>& c) {
    static_assert(std::is_same_v<A, B> && !std::is_same_v<A, float>, "bf16 x bf16 or f16 x f16 operands");
    ::emu::detail::WarpCall w{};
    w.kind = ::emu::detail::WarpCall::kMma, w.what = "wmma::mma_sync";
    w.out = d.x, w.out_bytes = sizeof d.x;
    w.in[0] = a.x, w.in_bytes[0] = sizeof a.x;
    w.in[1] = b.x, w.in_bytes[1] = sizeof b.x;
    w.in[2] = c.x, w.in_bytes[2] = sizeof c.x;
    w.run = emu_detail::mma_run<A, B, C>;
    ::emu::detail::warp_call(w);
}

}  // namespace wmma
}  // namespace nvcuda
