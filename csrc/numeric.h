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

// e4m3fn (API.md section 7): bias 7, 3 mantissa bits, no infinities,
// 0x7f / 0xff NaN, largest finite 448; subnormals m * 2^-9.
inline float e4m3_value(uint8_t b) {
  const int e = (b >> 3) & 15, m = b & 7;
  float v;
  if (e == 15 && m == 7) {
    v = bits_to_f32(0x7fc00000u);
  } else if (e == 0) {
    v = std::ldexp(static_cast<float>(m), -9);
  } else {
    v = std::ldexp(static_cast<float>(8 + m), e - 10);
  }
  return (b & 0x80) ? -v : v;
}

// e2m1 code (low 4 bits): sign bit 3, magnitude {0, 0.5, 1, 1.5, 2, 3, 4, 6}.
inline float e2m1_value(int code) {
  static const float kMagnitude[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  const float v = kMagnitude[code & 7];
  return (code & 8) ? -v : v;
}

// v rounded to nearest even onto the e4m3fn grid, for |v| <= 448 (the fp8
// activation rule clips first) or NaN (kept).
inline float round_to_e4m3(float v) {
  if (std::isnan(v)) return v;
  const float a = std::fabs(v);
  float r;
  if (a < 0.015625f) {  // below the smallest normal 2^-6: multiples of 2^-9
    r = std::nearbyint(a * 512.0f) * (1.0f / 512.0f);  // exact scalings, RNE
  } else {  // 3 mantissa bits, RNE (a carry moves into the exponent)
    uint32_t u = f32_to_bits(a);
    u += 0x7ffffu + ((u >> 20) & 1u);
    r = bits_to_f32(u & 0xfff00000u);
  }
  return std::copysign(r, v);
}

// The fp8 activation rule's clip to [-448, 448], NaN kept.
inline float clip_e4m3(float v) {
  if (std::isnan(v)) return v;
  return v > 448.0f ? 448.0f : (v < -448.0f ? -448.0f : v);
}

}  // namespace
}  // namespace xqk
