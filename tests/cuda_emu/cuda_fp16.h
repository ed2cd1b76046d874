// tests/cuda_emu/cuda_fp16.h: __half for the CUDA emulator (cuda_runtime.h): the storage type and
// its conversions, round-to-nearest-even with subnormals and overflow to infinity, bit for bit
// CUDA's (a NaN becomes 0x7fff).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

struct __half {
    unsigned short __x;
};

inline __half __ushort_as_half(unsigned short u) { return __half{u}; }

inline __half __float2half_rn(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return __half{0x7fff};
    if (a >= 0x477ff000u) return __half{static_cast<unsigned short>(sign | 0x7c00u)};  // >= 65520: infinity
    if (a < 0x38800000u) {  // below 2^-14: a subnormal half, in units of 2^-24 (exact scaling, then RNE)
        const float units = std::nearbyint(std::fabs(f) * 16777216.0f);
        return __half{static_cast<unsigned short>(sign | uint32_t(units))};  // 1024 is the smallest normal
    }
    uint32_t r = a - 0x38000000u;  // exponent rebiased from 127 to 15
    r += 0xfffu + ((r >> 13) & 1u);  // 23 -> 10 mantissa bits, ties to even
    return __half{static_cast<unsigned short>(sign | (r >> 13))};
}
inline float __half2float(__half h) {
    const uint32_t sign = uint32_t(h.__x & 0x8000u) << 16, e = (h.__x >> 10) & 0x1fu, m = h.__x & 0x3ffu;
    uint32_t u;
    if (e == 0x1f) {
        u = sign | 0x7f800000u | (m << 13);
    } else if (e == 0) {  // zero or subnormal: m * 2^-24, exact in float
        const float v = float(m) * 5.9604644775390625e-8f;
        std::memcpy(&u, &v, 4);
        u |= sign;
    } else {
        u = sign | ((e + 112) << 23) | (m << 13);
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
