// tests/cuda_emu/cuda_bf16.h: __nv_bfloat16 for the CUDA emulator (cuda_runtime.h): the storage
// type and its round-to-nearest-even conversions, bit for bit CUDA's (a NaN becomes 0x7fff).
#pragma once
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
    unsigned short __x;
};

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fff};
    u += 0x7fffu + ((u >> 16) & 1u);  // ties to even; carries into the exponent (and to infinity) correctly
    return __nv_bfloat16{static_cast<unsigned short>(u >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 h) {
    const uint32_t u = uint32_t(h.__x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
