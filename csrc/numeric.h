// Portable scalar conversions (internal linkage in every translation unit, so
// no copy compiled with AVX-512 can be shared with baseline code).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace xqk {
namespace {

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bf16_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    float v = std::ldexp(static_cast<float>(man), -24);
    return sign ? -v : v;
  }
  if (exp == 31) return bits_to_f32(sign | 0x7f800000u | (man << 13));
  return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

// Round to nearest even, overflow to inf, subnormals kept.
inline uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return sign | 0x7e00u;
  if (a >= 65520.0f) return sign | 0x7c00u;  // rounds to inf
  if (a < 6.103515625e-05f) {                // subnormal half: multiple of 2^-24
    float scaled = std::nearbyint(a * 16777216.0f);  // exact scaling, RNE
    return sign | static_cast<uint16_t>(scaled);
  }
  uint32_t v = f32_to_bits(a);
  uint32_t exp = (v >> 23) - 112u, man = v & 0x7fffffu;
  uint32_t h = (exp << 10) | (man >> 13);
  uint32_t rest = man & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into exp
  return sign | static_cast<uint16_t>(h);
}

inline float load_x(const void* x, int xt, int64_t i) {
  switch (xt) {
    case 0: return bf16_to_f32(static_cast<const uint16_t*>(x)[i]);
    case 1: return f16_to_f32(static_cast<const uint16_t*>(x)[i]);
    default: return static_cast<const float*>(x)[i];
  }
}

// The exponent e with |absmax| in [2^(e-1), 2^e), clamped; 0 for 0/inf/NaN.
inline int row_exponent(float absmax) {
  if (!(absmax > 0.0f) || !std::isfinite(absmax)) return 0;
  int e;
  std::frexp(absmax, &e);
  return e < -64 ? -64 : (e > 64 ? 64 : e);
}

}  // namespace
}  // namespace xqk
