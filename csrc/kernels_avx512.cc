// AVX-512 kernels (F/BW/VL/DQ + BF16 + VNNI): compiled with those flags, called
// only when cpu_features() reports them. No C++ library templates in here (see
// CMakeLists.txt); everything has internal linkage.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "epilogue_avx512.h"
#include "qmm.h"

// This file is compiled twice (CMakeLists.txt): as itself, and through
// kernels_avx512_l1.cc with XQK_PREFETCH_INTO_L1 = 1. The two sets differ in
// where the decode streams' software prefetches put the weight lines they
// read next (each line once): non-temporally (NTA) or into L1 (T0). A hint is
// an instruction's immediate; a runtime branch per prefetch cost up to 2x in
// the per-channel M=4 dot form. stream_prefetch_into_l1 (cpu_features.h)
// picks the set.
#ifndef XQK_PREFETCH_INTO_L1
#define XQK_PREFETCH_INTO_L1 0
#endif
// The Intel set also forms the int8 W8A16 decode's products by FMA
// (kInt8ByFma).
#ifndef XQK_INT8_DOT_BY_FMA
#define XQK_INT8_DOT_BY_FMA 0
#endif

namespace xqk {
namespace {

// The decode streams' prefetch hint (kStreamHint at each _mm_prefetch). A
// macro: an inline helper taking the hint lost GCC 8 of the 12 prefetch
// instructions of dot_a16_t<4>.
#define kStreamHint (XQK_PREFETCH_INTO_L1 ? _MM_HINT_T0 : _MM_HINT_NTA)

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline __mmask16 tail_mask(int n) {  // first n of 16 lanes (n may be <= 0 or >= 16)
  return n >= 16 ? static_cast<__mmask16>(0xffff)
                 : (n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1));
}

// ---------------------------------------------------------------- x preparation
// 16 values of x (activation dtype XT) as float32; lanes outside `mask` are 0.
template <XType XT>
inline __m512 load_x16(const Problem& p, int64_t i, __mmask16 mask) {
  if constexpr (XT == kF32) return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(p.x) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(p.x) + i);
  if constexpr (XT == kF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __mmask16 lanes(int64_t n) { return n >= 16 ? 0xffff : (n <= 0 ? 0 : (__mmask16)((1u << n) - 1)); }

// max |x| over the group; NaN if any element is NaN (vmaxps alone would drop
// it), so that a NaN row of an A8 product is NaN, as API.md's formula gives.
template <XType XT>
inline float group_absmax(const Problem& p, int64_t base, int64_t len) {
  __m512 mx = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t k = 0; k < len; k += 16) {
    const __m512 v = load_x16<XT>(p, base + k, lanes(len - k));
    mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  return nan ? __builtin_nanf("") : _mm512_reduce_max_ps(mx);
}

// bf16 bits of v (exact when v has <= 8 significant bits), round to nearest even.
inline __m256i bf16_bits(__m512 v) {
  const __m256bh h = _mm512_cvtneps_pbh(v);
  return reinterpret_cast<const __m256i&>(h);
}
inline __m512 bf16_to_f32v(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <XType XT, int T>
void prep_a16_t(const Problem& p, const XA16& xa, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t base = m * p.K;
    const float absmax = group_absmax<XT>(p, base, p.K);
    int e = 0;
    if (absmax > 0.0f && absmax <= 3.4028235e38f) {
      __builtin_frexpf(absmax, &e);  // builtins: no libstdc++ inline copies here
      e = e < -64 ? -64 : (e > 64 ? 64 : e);
    }
    xa.rowexp[m] = __builtin_ldexpf(1.0f, e);
    const float down_s = __builtin_ldexpf(1.0f, -e);
    const __m512 down = _mm512_set1_ps(down_s);
    for (int64_t g = 0; g < p.groups; ++g) {
      __m512 sum = _mm512_setzero_ps();
      for (int64_t kk = 0; kk < xa.Gp; kk += 16) {
        const __m512 v = load_x16<XT>(p, base + g * p.G + kk, lanes(p.G - kk));
        sum = _mm512_add_ps(sum, v);
        __m512 r = _mm512_mul_ps(v, down);
        const __mmask16 out = lanes(xa.Gp - kk);
        for (int t = 0; t < T; ++t) {
          const __m256i h = bf16_bits(r);
          _mm256_mask_storeu_epi16(xa.xb + (m * T + t) * xa.Kp + g * xa.Gp + kk, out, h);
          if (t + 1 < T) r = _mm512_sub_ps(r, bf16_to_f32v(h));  // exact remainder
        }
      }
      xa.xsum[m * p.groups + g] = _mm512_reduce_add_ps(sum) * down_s;
    }
  }
}

// One instance per activation dtype: no branch on it in the per-element loops.
void prep_a16(const Problem& p, const XA16& xa, int64_t m0, int64_t m1) {
  switch (p.xt) {
    case kBF16: return prep_a16_t<kBF16, 1>(p, xa, m0, m1);
    case kF16: return prep_a16_t<kF16, 2>(p, xa, m0, m1);
    default: return prep_a16_t<kF32, 3>(p, xa, m0, m1);
  }
}

// activation.py: inv = 127 / absmax (0 if absmax == 0), q = clip(rint(x * inv)).
template <XType XT>
void prep_a8_t(const Problem& p, const XA8& xa, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t g = 0; g < p.groups; ++g) {
      const int64_t base = m * p.K + g * p.G;
      const float absmax = group_absmax<XT>(p, base, p.G);
      const float inv_s = absmax == 0.0f ? 0.0f : 127.0f / absmax;
      const __m512 inv = _mm512_set1_ps(inv_s);
      __m512i sum = _mm512_setzero_si512();
      int8_t* row = xa.xq + m * xa.Kp + g * xa.Gp;
      for (int64_t kk = 0; kk < xa.Gp; kk += 16) {
        const __m512 v = load_x16<XT>(p, base + kk, lanes(p.G - kk));
        __m512i q = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v, inv),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
        sum = _mm512_add_epi32(sum, q);
        _mm_mask_storeu_epi8(row + kk, lanes(xa.Gp - kk), _mm512_cvtepi32_epi8(q));
      }
      const int32_t sq = _mm512_reduce_add_epi32(sum);
      const float xs = absmax / 127.0f;
      xa.xs[m * p.groups + g] = xs;
      xa.sq[m * p.groups + g] = sq;
      xa.xzs[m * p.groups + g] = xs * static_cast<float>(sq);
    }
  }
}

void prep_a8(const Problem& p, const XA8& xa, int64_t m0, int64_t m1) {
  switch (p.xt) {
    case kBF16: return prep_a8_t<kBF16>(p, xa, m0, m1);
    case kF16: return prep_a8_t<kF16>(p, xa, m0, m1);
    default: return prep_a8_t<kF32>(p, xa, m0, m1);
  }
}

// v rounded to nearest even onto the e4m3fn grid (|v| <= 448, or NaN: kept),
// as float32: 3 mantissa bits from 2^-6 up, multiples of 2^-9 below.
inline __m512 round_to_e4m3(__m512 v) {
  const __m512 a = _mm512_abs_ps(v);
  __m512i u = _mm512_castps_si512(a);
  u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7ffff),
                                           _mm512_and_si512(_mm512_srli_epi32(u, 20), _mm512_set1_epi32(1))));
  __m512 r = _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(0xfff00000u))));
  const __mmask16 small = _mm512_cmp_ps_mask(a, _mm512_set1_ps(0.015625f), _CMP_LT_OQ);
  const __m512 sub = _mm512_mul_ps(
      _mm512_roundscale_ps(_mm512_mul_ps(a, _mm512_set1_ps(512.0f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
      _mm512_set1_ps(1.0f / 512.0f));
  r = _mm512_mask_mov_ps(r, small, sub);
  // The sign of v (r >= 0), and NaN lanes as they were.
  r = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_castps_si512(r), _mm512_castps_si512(v),
                                                    _mm512_set1_epi32(static_cast<int>(0x80000000u)), 0xf8));
  return _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v);
}

// The float-product A8 form's x (Kernels::prep_a8f): prep_a8's int8 rule, or
// the fp8 rule (inv = 448 / absmax, clip x * inv to +-448 keeping NaN, round
// onto e4m3; scale absmax / 448, 1 for an all-zero group), values as bf16.
template <XType XT, bool FP8>
void prep_a8f_t(const Problem& p, const XA16& xa, float* xgs, int64_t m0, int64_t m1) {
  constexpr float top = FP8 ? 448.0f : 127.0f;
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t g = 0; g < p.groups; ++g) {
      const int64_t base = m * p.K + g * p.G;
      const float absmax = group_absmax<XT>(p, base, p.G);
      const __m512 inv = _mm512_set1_ps(absmax == 0.0f ? 0.0f : top / absmax);
      __m512 sum = _mm512_setzero_ps();
      uint16_t* row = xa.xb + m * xa.Kp + g * xa.Gp;
      for (int64_t kk = 0; kk < xa.Gp; kk += 16) {
        const __m512 v = _mm512_mul_ps(load_x16<XT>(p, base + kk, lanes(p.G - kk)), inv);
        __m512 q;
        if constexpr (FP8) {
          // max(lo, v) / min(hi, .) return v when it is NaN (the second operand).
          q = round_to_e4m3(_mm512_min_ps(_mm512_set1_ps(448.0f), _mm512_max_ps(_mm512_set1_ps(-448.0f), v)));
        } else {
          q = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          q = _mm512_min_ps(_mm512_set1_ps(127.0f), _mm512_max_ps(_mm512_set1_ps(-127.0f), q));
        }
        const __mmask16 valid = lanes(p.G - kk);
        q = _mm512_maskz_mov_ps(valid, q);  // padding: 0 (a NaN row's too)
        sum = _mm512_add_ps(sum, q);
        _mm256_mask_storeu_epi16(row + kk, lanes(xa.Gp - kk), bf16_bits(q));  // exact
      }
      const float xs = FP8 ? (absmax == 0.0f ? 1.0f : absmax / 448.0f) : absmax / 127.0f;
      const float total = _mm512_reduce_add_ps(sum);
      xgs[m * p.groups + g] = xs;
      xa.xsum[m * p.groups + g] = p.blockwise ? xs * total : total;
    }
    xa.rowexp[m] = p.blockwise ? 1.0f : xgs[m];
  }
}

void prep_a8f(const Problem& p, const XA16& xa, float* xgs, int64_t m0, int64_t m1) {
  const bool fp8 = p.af == kAFp8;
  switch (p.xt) {
    case kBF16: return fp8 ? prep_a8f_t<kBF16, true>(p, xa, xgs, m0, m1) : prep_a8f_t<kBF16, false>(p, xa, xgs, m0, m1);
    case kF16: return fp8 ? prep_a8f_t<kF16, true>(p, xa, xgs, m0, m1) : prep_a8f_t<kF16, false>(p, xa, xgs, m0, m1);
    default: return fp8 ? prep_a8f_t<kF32, true>(p, xa, xgs, m0, m1) : prep_a8f_t<kF32, false>(p, xa, xgs, m0, m1);
  }
}

// ---------------------------------------------------------------- panel packers

// In-place transpose of a 16x16 matrix of dwords (r[i] = row i).
inline void transpose16(__m512i r[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 16; i += 2) {
    a[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    a[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int q = 0; q < 4; ++q) {  // b[4q + j]: lane L = rows 4q..4q+3, column 4L + j
    const __m512i* x = a + 4 * q;
    b[4 * q + 0] = _mm512_unpacklo_epi64(x[0], x[2]);
    b[4 * q + 1] = _mm512_unpackhi_epi64(x[0], x[2]);
    b[4 * q + 2] = _mm512_unpacklo_epi64(x[1], x[3]);
    b[4 * q + 3] = _mm512_unpackhi_epi64(x[1], x[3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i c0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x88);
    const __m512i c1 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xdd);
    const __m512i c2 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x88);
    const __m512i c3 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xdd);
    r[j] = _mm512_shuffle_i32x4(c0, c2, 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(c0, c2, 0xdd);
    r[4 + j] = _mm512_shuffle_i32x4(c1, c3, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(c1, c3, 0xdd);
  }
}

inline __mmask16 mask16(int64_t n) { return n >= 16 ? 0xffff : (n <= 0 ? 0 : (__mmask16)((1u << n) - 1)); }
inline __mmask32 mask32(int64_t n) { return n >= 32 ? 0xffffffffu : (n <= 0 ? 0 : (__mmask32)((1u << n) - 1)); }
inline __mmask64 mask64(int64_t n) { return n >= 64 ? ~0ull : (n <= 0 ? 0 : (__mmask64)((1ull << n) - 1)); }

// bf16 of each sign-extended nibble value, indexed by the low 5 bits of a word.
inline __m512i nibble_bf16_lut() {
  alignas(64) uint16_t t[32];
  for (int i = 0; i < 32; ++i) {
    const int v = (i & 15) >= 8 ? (i & 15) - 16 : (i & 15);
    const float f = static_cast<float>(v);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    t[i] = static_cast<uint16_t>(u >> 16);
  }
  return _mm512_load_si512(t);
}

// bf16 of each e2m1 code (fp4), indexed like nibble_bf16_lut (bit 4 ignored):
// sign bit 3, magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 (all exact in bf16).
inline __m512i e2m1_bf16_lut() {
  static constexpr uint16_t kMagnitude[8] = {0x0000, 0x3f00, 0x3f80, 0x3fc0,
                                             0x4000, 0x4040, 0x4080, 0x40c0};
  alignas(64) uint16_t t[32];
  for (int i = 0; i < 32; ++i)
    t[i] = static_cast<uint16_t>(kMagnitude[i & 7] | ((i & 8) ? 0x8000 : 0));
  return _mm512_load_si512(t);
}
// The nibble table of the weight format: int4 integers or e2m1 values.
inline __m512i nibble_lut(const Problem& p) {
  return p.wf == kWFp4 ? e2m1_bf16_lut() : nibble_bf16_lut();
}

// e4m3fn -> bf16 (fp8 weights), exact: two 128-entry byte tables (the low and
// the high byte of the bf16 image of each 7-bit magnitude) looked up with
// vpermt2b, which reads the low 7 bits of each index byte; the sign bit is
// then or-ed into the high byte. Subnormals (m * 2^-9) and NaN (0x7f) come
// out exactly, and the lookups cost less than int8's widening conversions.
constexpr uint16_t e4m3_magnitude_bf16(int mag) {
  if (mag == 0x7f) return 0x7fc0;  // NaN
  const int e = mag >> 3, m = mag & 7;
  if (e > 0) return static_cast<uint16_t>(((e + 120) << 7) | (m << 4));  // 2^(e-7) (1 + m/8)
  if (m == 0) return 0;
  const int top = m >= 4 ? 2 : (m >= 2 ? 1 : 0);  // m * 2^-9 = 2^(top-9) * (m / 2^top)
  return static_cast<uint16_t>(((118 + top) << 7) | ((m - (1 << top)) << (7 - top)));
}
// The low and the high byte of the bf16 images of 128 magnitudes (vpermt2b
// tables): e4m3's here, int8's below (Int8Decoder).
struct Bf16ByteTables {
  uint8_t lo[128], hi[128];
};
constexpr Bf16ByteTables make_byte_tables(uint16_t (*image)(int)) {
  Bf16ByteTables t{};
  for (int i = 0; i < 128; ++i) {
    t.lo[i] = static_cast<uint8_t>(image(i) & 0xff);
    t.hi[i] = static_cast<uint8_t>(image(i) >> 8);
  }
  return t;
}
alignas(64) constexpr Bf16ByteTables kFp8Tables = make_byte_tables(e4m3_magnitude_bf16);

// Byte index tables: kInterleave[h] (h = 0, 1) puts byte j of a and byte j of
// b (j = 32h .. 32h+31) into word j - 32h: 32 words in element order.
// kPairWords[h]: word j of a and word j of b (j = 16h .. 16h+15) into dword
// j - 16h (vpermt2w).
struct Fp8Indices {
  uint8_t interleave[2][64];
  uint16_t pair_words[2][32];
};
constexpr Fp8Indices make_fp8_indices() {
  Fp8Indices t{};
  for (int h = 0; h < 2; ++h) {
    for (int j = 0; j < 32; ++j) {
      t.interleave[h][2 * j] = static_cast<uint8_t>(32 * h + j);
      t.interleave[h][2 * j + 1] = static_cast<uint8_t>(64 + 32 * h + j);
    }
    for (int j = 0; j < 16; ++j) {
      t.pair_words[h][2 * j] = static_cast<uint16_t>(16 * h + j);
      t.pair_words[h][2 * j + 1] = static_cast<uint16_t>(32 + 16 * h + j);
    }
  }
  return t;
}
alignas(64) constexpr Fp8Indices kFp8Indices = make_fp8_indices();

// A decoder of 64 bytes to bf16 through two 128-entry byte tables.
struct ByteTableDecoder {
  __m512i lo0, lo1, hi0, hi1, ilv0, ilv1;
  explicit ByteTableDecoder(const Bf16ByteTables& t)
      : lo0(_mm512_load_si512(t.lo)), lo1(_mm512_load_si512(t.lo + 64)),
        hi0(_mm512_load_si512(t.hi)), hi1(_mm512_load_si512(t.hi + 64)),
        ilv0(_mm512_load_si512(kFp8Indices.interleave[0])),
        ilv1(_mm512_load_si512(kFp8Indices.interleave[1])) {}
  // The table bytes of the low 7 bits of each index byte, the sign bit of
  // `sign` or-ed into the high byte.
  void lookup(__m512i index, __m512i sign, __m512i& lo, __m512i& hi) const {
    lo = _mm512_permutex2var_epi8(lo0, index, lo1);
    hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(hi0, index, hi1), sign,
                                   _mm512_set1_epi8(static_cast<char>(0x80)), 0xf8);
  }
  // Low and high bytes -> words in element order: w0 elements 0..31, w1 32..63.
  void interleave(__m512i lo, __m512i hi, __m512i& w0, __m512i& w1) const {
    w0 = _mm512_permutex2var_epi8(lo, ilv0, hi);
    w1 = _mm512_permutex2var_epi8(lo, ilv1, hi);
  }
};

struct Fp8Decoder : ByteTableDecoder {
  Fp8Decoder() : ByteTableDecoder(kFp8Tables) {}
  // 64 e4m3 bytes -> the low and high bytes of their bf16 images.
  void bytes(__m512i v, __m512i& lo, __m512i& hi) const { lookup(v, v, lo, hi); }
  // 64 e4m3 bytes -> their bf16 images in element order: w0 elements 0..31, w1 32..63.
  void words(__m512i v, __m512i& w0, __m512i& w1) const {
    __m512i lo, hi;
    bytes(v, lo, hi);
    interleave(lo, hi, w0, w1);
  }
  // Only the first 32 elements (w0).
  __m512i words32(__m512i v) const {
    __m512i lo, hi;
    bytes(v, lo, hi);
    return _mm512_permutex2var_epi8(lo, ilv0, hi);
  }
};

// int8 -> bf16 (the per-channel W8A16 dot form), exact, Fp8Decoder's way:
// the low and high bytes of bf16(|q|) from two 128-entry tables indexed by
// |q| (vpabsb), the sign or-ed into the high byte. |-128| is 0x80, which
// vpermt2b reads as entry 0 (7 index bits): bf16(128) = 0x4300 has entry 0's
// low byte, and its high byte (0xc3 with the sign) is set where the
// magnitude's bit 7 is. Four shuffles and four other operations per 64
// weights, where the conversions (vpmovsxbd, vcvtdq2ps, vcvtne2ps2bf16 and
// the extracts) took twelve.
constexpr uint16_t int_magnitude_bf16(int mag) {  // mag in [0, 127]: <= 7 significant bits
  if (mag == 0) return 0;
  int e = 0;
  while ((2 << e) <= mag) ++e;  // 2^e <= mag < 2^(e+1)
  return static_cast<uint16_t>(((127 + e) << 7) | (((mag - (1 << e)) << (7 - e)) & 0x7f));
}
alignas(64) constexpr Bf16ByteTables kInt8Tables = make_byte_tables(int_magnitude_bf16);
static_assert(int_magnitude_bf16(1) == 0x3f80 && int_magnitude_bf16(3) == 0x4040 &&
                  int_magnitude_bf16(127) == 0x42fe && int_magnitude_bf16(64) == 0x4280,
              "bf16 images of the int8 magnitudes");

struct Int8Decoder : ByteTableDecoder {
  Int8Decoder() : ByteTableDecoder(kInt8Tables) {}
  // 64 int8 -> their bf16 images in element order: w0 elements 0..31, w1 32..63.
  void words(__m512i v, __m512i& w0, __m512i& w1) const {
    const __m512i mag = _mm512_abs_epi8(v);  // -128 -> 0x80
    __m512i lo, hi;
    lookup(mag, v, lo, hi);
    hi = _mm512_mask_mov_epi8(hi, _mm512_movepi8_mask(mag), _mm512_set1_epi8(static_cast<char>(0xc3)));
    interleave(lo, hi, w0, w1);
  }
};

// 16 packed bytes (one k-pair each) -> 16 dwords bf16(lo) | bf16(hi) << 16.
inline __m512i int4_pairs_to_bf16(__m128i bytes, __m512i lut) {
  const __m512i d = _mm512_cvtepu8_epi32(bytes);
  // word 0: the low nibble (bit 4 = the high nibble's bit 0, which the LUT
  // ignores); word 1: the high nibble.
  return _mm512_permutexvar_epi16(_mm512_or_si512(d, _mm512_slli_epi32(d, 12)), lut);
}

// 16 int8 -> 16 dwords of exact float32 bit patterns (low 16 bits zero).
inline __m512i int8_to_f32bits(__m128i bytes) {
  return _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)));
}

// 32 packed bytes (64 nibbles along k) -> 64 bytes (nibble ^ 8) in k order.
inline __m512i int4_to_u8(__m256i bytes) {
  const __m512i w = _mm512_cvtepu8_epi16(bytes);
  const __m512i lo = _mm512_and_si512(w, _mm512_set1_epi16(0x000f));
  const __m512i hi = _mm512_slli_epi16(_mm512_and_si512(w, _mm512_set1_epi16(0x00f0)), 4);
  return _mm512_xor_si512(_mm512_or_si512(lo, hi), _mm512_set1_epi16(0x0808));
}

// The 4 vpermt2b index tables that build dword i of quarter cb (cb = 0..3,
// i = 0..15) from byte 16cb+i of two 64-byte rows a and b: byte j of the
// dword comes from a where from_b[j] is 0, from b where it is 1.
inline void dword_pick_tables(const int (&from_b)[4], __m512i idx[4]) {
  for (int cb = 0; cb < 4; ++cb) {
    alignas(64) uint8_t ix[64];
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 4; ++j) ix[4 * i + j] = static_cast<uint8_t>(64 * from_b[j] + 16 * cb + i);
    idx[cb] = _mm512_load_si512(ix);
  }
}

struct PairUnpacker {  // 64 columns of one k-pair -> 4 x (bf16 lo | bf16 hi << 16)
  __m512i idx[4], lut;
  explicit PairUnpacker(const Problem& p) {
    // Dword i of quarter cb takes byte 16cb+i of the row (word 0: its low
    // nibble in bits 0-3) and byte 16cb+i of the row shifted right by 4 (word 1:
    // its high nibble in bits 0-3); the LUT reads bits 0-4 and ignores bit 4.
    dword_pick_tables({0, 0, 1, 1}, idx);
    lut = nibble_lut(p);
  }
  // Two shuffles per 16 columns, columns in natural order: w[cb] lane i = column 16cb+i.
  void int4(const uint8_t* src, __mmask64 m, __m512i w[4]) const {
    const __m512i v = _mm512_maskz_loadu_epi8(m, src);
    const __m512i hi = _mm512_srli_epi16(v, 4);  // each byte's high nibble in its bits 0-3
    for (int cb = 0; cb < 4; ++cb)
      w[cb] = _mm512_permutexvar_epi16(_mm512_permutex2var_epi8(v, idx[cb], hi), lut);
  }
  static void int8(const uint8_t* a, const uint8_t* b, __mmask64 m, __m512i w[4]) {
    for (int cb = 0; cb < 4; ++cb) {
      const __mmask16 mc = static_cast<__mmask16>(m >> (16 * cb));
      const __m512i fa = int8_to_f32bits(_mm_maskz_loadu_epi8(mc, a + 16 * cb));
      const __m512i fb = b ? int8_to_f32bits(_mm_maskz_loadu_epi8(mc, b + 16 * cb)) : _mm512_setzero_si512();
      w[cb] = _mm512_or_si512(_mm512_srli_epi32(fa, 16), fb);
    }
  }
  // fp8 rows a and b (null: zeros), columns in natural order.
  static void fp8(const Fp8Decoder& d, const uint8_t* a, const uint8_t* b, __mmask64 m,
                  __m512i w[4]) {
    __m512i a0, a1, b0, b1;
    d.words(_mm512_maskz_loadu_epi8(m, a), a0, a1);
    if (b) {
      d.words(_mm512_maskz_loadu_epi8(m, b), b0, b1);
    } else {
      b0 = b1 = _mm512_setzero_si512();
    }
    const __m512i i0 = _mm512_load_si512(kFp8Indices.pair_words[0]);
    const __m512i i1 = _mm512_load_si512(kFp8Indices.pair_words[1]);
    w[0] = _mm512_permutex2var_epi16(a0, i0, b0);
    w[1] = _mm512_permutex2var_epi16(a0, i1, b0);
    w[2] = _mm512_permutex2var_epi16(a1, i0, b1);
    w[3] = _mm512_permutex2var_epi16(a1, i1, b1);
  }
};

// Per-channel packers: the same rows' bytes of the next panel (a panel spans
// 2 * kMaxSteps features for A16 and 4 * kMaxSteps for A8), into L2: it is
// used after this panel's microkernels, by which time L1 has been refilled.
constexpr int64_t kNextPanelA16 = 2 * kMaxSteps, kNextPanelA8 = 4 * kMaxSteps;

void pack_a16(const Problem& p, int64_t g, int64_t kk0, int64_t kk1, int64_t n0, uint32_t* panel) {
  const int64_t steps = (kk1 - kk0) / 2;
  if (p.blockwise && p.bits == 4) {
    // Packed [K/2, N]: a step (one k-pair) of 64 columns is one 64-byte row segment.
    const int64_t N = p.N;
    const uint8_t* row = p.w + ((g * p.G + kk0) / 2) * N + n0;
    const __mmask64 m = mask64(N - n0);
    const PairUnpacker unpack(p);
    for (int64_t s = 0; s < steps; ++s, row += N) {
      // Rows are N bytes apart, which the hardware prefetchers do not follow:
      // fetch the next panel's rows (the same columns, used after this
      // panel's microkernels; a line fetched for the next tile would be gone
      // by then, x streams through L2 in between).
      _mm_prefetch(reinterpret_cast<const char*>(row + steps * N), _MM_HINT_T1);
      __m512i w[4];
      unpack.int4(row, m, w);
      for (int cb = 0; cb < 4; ++cb) _mm512_store_si512(panel + s * kNR + 16 * cb, w[cb]);
    }
    return;
  }
  if (p.blockwise && p.wf == kWFp8) {
    // fp8 [K, N]: two rows per step, as int8 below.
    const int64_t N = p.N;
    const uint8_t* row = p.w + (g * p.G + kk0) * N + n0;
    const __mmask64 m = mask64(N - n0);
    const Fp8Decoder dec;
    for (int64_t s = 0; s < steps; ++s, row += 2 * N) {
      _mm_prefetch(reinterpret_cast<const char*>(row + 2 * steps * N), _MM_HINT_T1);  // the next panel
      _mm_prefetch(reinterpret_cast<const char*>(row + 2 * steps * N + N), _MM_HINT_T1);
      __m512i w[4];
      PairUnpacker::fp8(dec, row, kk0 + 2 * s + 1 < p.G ? row + N : nullptr, m, w);
      for (int cb = 0; cb < 4; ++cb) _mm512_store_si512(panel + s * kNR + 16 * cb, w[cb]);
    }
    return;
  }
  if (p.blockwise) {
    // int8 [K, N]: two rows per step.
    const int64_t N = p.N;
    const uint8_t* row = p.w + (g * p.G + kk0) * N + n0;
    __mmask16 m[4];
    for (int cb = 0; cb < 4; ++cb) m[cb] = mask16(N - n0 - 16 * cb);
    for (int64_t s = 0; s < steps; ++s, row += 2 * N) {
      const int64_t kk = kk0 + 2 * s;
      _mm_prefetch(reinterpret_cast<const char*>(row + 2 * steps * N), _MM_HINT_T1);  // the next panel
      _mm_prefetch(reinterpret_cast<const char*>(row + 2 * steps * N + N), _MM_HINT_T1);
      const bool has_b = kk + 1 < p.G;  // an odd block ends in a padding feature
      for (int cb = 0; cb < 4; ++cb) {
        const __m512i fa = int8_to_f32bits(_mm_maskz_loadu_epi8(m[cb], row + 16 * cb));
        const __m512i fb = has_b ? int8_to_f32bits(_mm_maskz_loadu_epi8(m[cb], row + N + 16 * cb))
                                 : _mm512_setzero_si512();
        _mm512_store_si512(panel + s * kNR + 16 * cb, _mm512_or_si512(_mm512_srli_epi32(fa, 16), fb));
      }
    }
    return;
  }
  // Per-channel [N, K] / packed [N, K/2]: 16 steps of 16 columns, then transpose.
  const __m512i lut = nibble_lut(p);
  const Fp8Decoder dec;
  for (int64_t s0 = 0; s0 < steps; s0 += 16) {
    const int64_t k0 = kk0 + 2 * s0;  // g == 0
    const int64_t valid_k = p.K - k0;  // features left in the row
    const int ns = static_cast<int>(steps - s0 < 16 ? steps - s0 : 16);
    for (int cb = 0; cb < 4; ++cb) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t n = n0 + 16 * cb + i;
        if (n >= p.N) {
          r[i] = _mm512_setzero_si512();
        } else if (p.bits == 4) {
          _mm_prefetch(reinterpret_cast<const char*>(p.w + n * (p.K / 2) + (k0 + kNextPanelA16) / 2), _MM_HINT_T1);
          r[i] = int4_pairs_to_bf16(
              _mm_maskz_loadu_epi8(mask16(valid_k / 2), p.w + n * (p.K / 2) + k0 / 2), lut);
        } else if (p.wf == kWFp8) {
          _mm_prefetch(reinterpret_cast<const char*>(p.w + n * p.K + k0 + kNextPanelA16), _MM_HINT_T1);
          r[i] = dec.words32(_mm512_maskz_loadu_epi8(mask64(valid_k < 32 ? valid_k : 32),
                                                     p.w + n * p.K + k0));
        } else {
          _mm_prefetch(reinterpret_cast<const char*>(p.w + n * p.K + k0 + kNextPanelA16), _MM_HINT_T1);
          const __m256i b = _mm256_maskz_loadu_epi8(mask32(valid_k), p.w + n * p.K + k0);
          const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
          const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
          r[i] = reinterpret_cast<const __m512i&>(static_cast<const __m512bh&>(_mm512_cvtne2ps_pbh(hi, lo)));
        }
      }
      transpose16(r);
      for (int c = 0; c < ns; ++c) _mm512_store_si512(panel + (s0 + c) * kNR + 16 * cb, r[c]);
    }
  }
}

void pack_a8(const Problem& p, int64_t g, int64_t kk0, int64_t kk1, int64_t n0, uint32_t* panel) {
  const int64_t steps = (kk1 - kk0) / 4;
  if (p.blockwise) {
    const __m128i flip = _mm_set1_epi8(static_cast<char>(0x80));
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t kk = kk0 + 4 * s, k = g * p.G + kk;
      const int64_t rows = p.bits == 4 ? 2 : 4, first = p.bits == 4 ? k / 2 : k;
      for (int64_t j = 0; j < rows; ++j)  // the next tile's part of these rows
        _mm_prefetch(reinterpret_cast<const char*>(p.w + (first + j) * p.N + n0 + kNR), _MM_HINT_T1);
      for (int cb = 0; cb < 4; ++cb) {
        const int64_t n = n0 + 16 * cb;
        const __mmask16 m = mask16(p.N - n);
        __m512i v = _mm512_setzero_si512();
        if (p.bits == 4) {
          for (int j = 0; j < 2; ++j) {  // two k-pairs: bytes (lo, hi) at 2j, 2j+1
            if (kk + 2 * j >= p.G) break;
            const __m512i d = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, p.w + (k / 2 + j) * p.N + n));
            const __m512i e = _mm512_or_si512(_mm512_and_si512(d, _mm512_set1_epi32(0x0f)),
                                              _mm512_slli_epi32(_mm512_and_si512(d, _mm512_set1_epi32(0xf0)), 4));
            v = _mm512_or_si512(v, _mm512_slli_epi32(_mm512_xor_si512(e, _mm512_set1_epi32(0x0808)), 16 * j));
          }
        } else {
          for (int j = 0; j < 4; ++j) {
            if (kk + j >= p.G) break;
            const __m128i b = _mm_xor_si128(_mm_maskz_loadu_epi8(m, p.w + (k + j) * p.N + n), flip);
            v = _mm512_or_si512(v, _mm512_slli_epi32(_mm512_cvtepu8_epi32(b), 8 * j));
          }
        }
        _mm512_store_si512(panel + s * kNR + 16 * cb, v);
      }
    }
    return;
  }
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t s0 = 0; s0 < steps; s0 += 16) {
    const int64_t k0 = kk0 + 4 * s0;
    const int64_t valid_k = p.K - k0;
    const int ns = static_cast<int>(steps - s0 < 16 ? steps - s0 : 16);
    for (int cb = 0; cb < 4; ++cb) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t n = n0 + 16 * cb + i;
        if (n >= p.N) {
          r[i] = _mm512_setzero_si512();
        } else if (p.bits == 4) {
          _mm_prefetch(reinterpret_cast<const char*>(p.w + n * (p.K / 2) + (k0 + kNextPanelA8) / 2), _MM_HINT_T1);
          r[i] = int4_to_u8(_mm256_maskz_loadu_epi8(mask32(valid_k / 2), p.w + n * (p.K / 2) + k0 / 2));
        } else {
          _mm_prefetch(reinterpret_cast<const char*>(p.w + n * p.K + k0 + kNextPanelA8), _MM_HINT_T1);
          r[i] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask64(valid_k), p.w + n * p.K + k0), flip);
        }
      }
      transpose16(r);
      for (int c = 0; c < ns; ++c) _mm512_store_si512(panel + (s0 + c) * kNR + 16 * cb, r[c]);
    }
  }
}

// ---------------------------------------------------------------- microkernels
// The microkernels keep MR x 4 accumulators in named registers (GCC spills an
// array of vectors to the stack on every step), written out by these macros.
#define XQK_ROWS(F) F(0) F(1) F(2) F(3) F(4) F(5)

// acc[r][0:64] (+)= sum_s dpbf16(broadcast x[r][2s:2s+2], panel[s][0:64]).
template <int MR>
void mk_a16_t(const uint16_t* x, int64_t ldx, const uint32_t* panel, int64_t steps,
              float* acc, bool init) {
#define DECL(r) __m512 c##r##0, c##r##1, c##r##2, c##r##3;
  XQK_ROWS(DECL)
#undef DECL
#define INIT(r)                                                    \
  if constexpr (r < MR) {                                          \
    if (init) {                                                    \
      c##r##0 = c##r##1 = c##r##2 = c##r##3 = _mm512_setzero_ps(); \
    } else {                                                       \
      c##r##0 = _mm512_loadu_ps(acc + r * kNR);                    \
      c##r##1 = _mm512_loadu_ps(acc + r * kNR + 16);               \
      c##r##2 = _mm512_loadu_ps(acc + r * kNR + 32);               \
      c##r##3 = _mm512_loadu_ps(acc + r * kNR + 48);               \
    }                                                              \
  }
  XQK_ROWS(INIT)
#undef INIT
  for (int64_t s = 0; s < steps; ++s) {
    const uint32_t* pb = panel + s * kNR;
    const __m512bh b0 = as_bh(_mm512_load_si512(pb)), b1 = as_bh(_mm512_load_si512(pb + 16)),
                   b2 = as_bh(_mm512_load_si512(pb + 32)), b3 = as_bh(_mm512_load_si512(pb + 48));
#define STEP(r)                                                                 \
  if constexpr (r < MR) {                                                       \
    const __m512bh a = as_bh(_mm512_set1_epi32(load_i32(x + r * ldx + 2 * s))); \
    c##r##0 = _mm512_dpbf16_ps(c##r##0, a, b0);                                 \
    c##r##1 = _mm512_dpbf16_ps(c##r##1, a, b1);                                 \
    c##r##2 = _mm512_dpbf16_ps(c##r##2, a, b2);                                 \
    c##r##3 = _mm512_dpbf16_ps(c##r##3, a, b3);                                 \
  }
    XQK_ROWS(STEP)
#undef STEP
  }
#define STORE(r)                                   \
  if constexpr (r < MR) {                          \
    _mm512_storeu_ps(acc + r * kNR, c##r##0);      \
    _mm512_storeu_ps(acc + r * kNR + 16, c##r##1); \
    _mm512_storeu_ps(acc + r * kNR + 32, c##r##2); \
    _mm512_storeu_ps(acc + r * kNR + 48, c##r##3); \
  }
  XQK_ROWS(STORE)
#undef STORE
}

void mk_a16(int mr, const uint16_t* x, int64_t ldx, const uint32_t* panel, int64_t steps,
            float* acc, bool init) {
  switch (mr) {
    case 1: return mk_a16_t<1>(x, ldx, panel, steps, acc, init);
    case 2: return mk_a16_t<2>(x, ldx, panel, steps, acc, init);
    case 3: return mk_a16_t<3>(x, ldx, panel, steps, acc, init);
    case 4: return mk_a16_t<4>(x, ldx, panel, steps, acc, init);
    case 5: return mk_a16_t<5>(x, ldx, panel, steps, acc, init);
    default: return mk_a16_t<6>(x, ldx, panel, steps, acc, init);
  }
}

// mk_a16_t with fin_a16's epilogue in registers (T == 1, one panel per group).
template <int MR>
void mk_a16_fused_t(const uint16_t* x, int64_t ldx, const uint32_t* panel, int64_t steps,
                    const float* sp, const float* zp, const float* xsum, const float* xgs,
                    int64_t xsum_stride, int ncols, float* out, bool init_out) {
#define DECL(r) __m512 c##r##0, c##r##1, c##r##2, c##r##3;
  XQK_ROWS(DECL)
#undef DECL
#define INIT(r) \
  if constexpr (r < MR) c##r##0 = c##r##1 = c##r##2 = c##r##3 = _mm512_setzero_ps();
  XQK_ROWS(INIT)
#undef INIT
  for (int64_t s = 0; s < steps; ++s) {
    const uint32_t* pb = panel + s * kNR;
    const __m512bh b0 = as_bh(_mm512_load_si512(pb)), b1 = as_bh(_mm512_load_si512(pb + 16)),
                   b2 = as_bh(_mm512_load_si512(pb + 32)), b3 = as_bh(_mm512_load_si512(pb + 48));
#define STEP(r)                                                                 \
  if constexpr (r < MR) {                                                       \
    const __m512bh a = as_bh(_mm512_set1_epi32(load_i32(x + r * ldx + 2 * s))); \
    c##r##0 = _mm512_dpbf16_ps(c##r##0, a, b0);                                 \
    c##r##1 = _mm512_dpbf16_ps(c##r##1, a, b1);                                 \
    c##r##2 = _mm512_dpbf16_ps(c##r##2, a, b2);                                 \
    c##r##3 = _mm512_dpbf16_ps(c##r##3, a, b3);                                 \
  }
    XQK_ROWS(STEP)
#undef STEP
  }
  __m512 sv[4], zv[4];
  for (int j = 0; j < 4; ++j) {
    const __mmask16 m = tail_mask(ncols - 16 * j);
    sv[j] = _mm512_maskz_loadu_ps(m, sp + 16 * j);
    zv[j] = zp ? _mm512_maskz_loadu_ps(m, zp + 16 * j) : _mm512_setzero_ps();
  }
  // Same arithmetic as fin_a16: out = (out +) s * (xgs *) acc (- z * xsum), one FMA each.
#define EPI1(r, j)                                                                          \
  {                                                                                         \
    float* o = out + r * kNR + 16 * j;                                                      \
    if (xgs) c##r##j = _mm512_mul_ps(c##r##j, _mm512_set1_ps(xgs[r * xsum_stride]));        \
    __m512 v = init_out ? _mm512_mul_ps(sv[j], c##r##j)                                     \
                        : _mm512_fmadd_ps(sv[j], c##r##j, _mm512_loadu_ps(o));              \
    if (zp) v = _mm512_fnmadd_ps(zv[j], _mm512_set1_ps(xsum[r * xsum_stride]), v);          \
    _mm512_storeu_ps(o, v);                                                                 \
  }
#define EPI(r)                                      \
  if constexpr (r < MR) {                           \
    EPI1(r, 0) EPI1(r, 1) EPI1(r, 2) EPI1(r, 3)     \
  }
  XQK_ROWS(EPI)
#undef EPI
#undef EPI1
}

void mk_a16_fused(int mr, const uint16_t* x, int64_t ldx, const uint32_t* panel, int64_t steps,
                  const float* s, const float* z, const float* xsum, const float* xgs,
                  int64_t xsum_stride, int ncols, float* out, bool init_out) {
  switch (mr) {
    case 1: return mk_a16_fused_t<1>(x, ldx, panel, steps, s, z, xsum, xgs, xsum_stride, ncols, out, init_out);
    case 2: return mk_a16_fused_t<2>(x, ldx, panel, steps, s, z, xsum, xgs, xsum_stride, ncols, out, init_out);
    case 3: return mk_a16_fused_t<3>(x, ldx, panel, steps, s, z, xsum, xgs, xsum_stride, ncols, out, init_out);
    case 4: return mk_a16_fused_t<4>(x, ldx, panel, steps, s, z, xsum, xgs, xsum_stride, ncols, out, init_out);
    case 5: return mk_a16_fused_t<5>(x, ldx, panel, steps, s, z, xsum, xgs, xsum_stride, ncols, out, init_out);
    default: return mk_a16_fused_t<6>(x, ldx, panel, steps, s, z, xsum, xgs, xsum_stride, ncols, out, init_out);
  }
}

// acc[r][0:64] (+)= sum_s dpbusd(panel[s] as u8, broadcast x[r][4s:4s+4] as s8).
template <int MR>
void mk_a8_t(const int8_t* x, int64_t ldx, const uint32_t* panel, int64_t steps,
             int32_t* acc, bool init) {
#define DECL(r) __m512i c##r##0, c##r##1, c##r##2, c##r##3;
  XQK_ROWS(DECL)
#undef DECL
#define INIT(r)                                                       \
  if constexpr (r < MR) {                                             \
    if (init) {                                                       \
      c##r##0 = c##r##1 = c##r##2 = c##r##3 = _mm512_setzero_si512(); \
    } else {                                                          \
      c##r##0 = _mm512_loadu_si512(acc + r * kNR);                    \
      c##r##1 = _mm512_loadu_si512(acc + r * kNR + 16);               \
      c##r##2 = _mm512_loadu_si512(acc + r * kNR + 32);               \
      c##r##3 = _mm512_loadu_si512(acc + r * kNR + 48);               \
    }                                                                 \
  }
  XQK_ROWS(INIT)
#undef INIT
  for (int64_t s = 0; s < steps; ++s) {
    const uint32_t* pb = panel + s * kNR;
    const __m512i b0 = _mm512_load_si512(pb), b1 = _mm512_load_si512(pb + 16),
                  b2 = _mm512_load_si512(pb + 32), b3 = _mm512_load_si512(pb + 48);
#define STEP(r)                                                       \
  if constexpr (r < MR) {                                             \
    const __m512i a = _mm512_set1_epi32(load_i32(x + r * ldx + 4 * s)); \
    c##r##0 = _mm512_dpbusd_epi32(c##r##0, b0, a);                    \
    c##r##1 = _mm512_dpbusd_epi32(c##r##1, b1, a);                    \
    c##r##2 = _mm512_dpbusd_epi32(c##r##2, b2, a);                    \
    c##r##3 = _mm512_dpbusd_epi32(c##r##3, b3, a);                    \
  }
    XQK_ROWS(STEP)
#undef STEP
  }
#define STORE(r)                                      \
  if constexpr (r < MR) {                             \
    _mm512_storeu_si512(acc + r * kNR, c##r##0);      \
    _mm512_storeu_si512(acc + r * kNR + 16, c##r##1); \
    _mm512_storeu_si512(acc + r * kNR + 32, c##r##2); \
    _mm512_storeu_si512(acc + r * kNR + 48, c##r##3); \
  }
  XQK_ROWS(STORE)
#undef STORE
}

void mk_a8(int mr, const int8_t* x, int64_t ldx, const uint32_t* panel, int64_t steps,
           int32_t* acc, bool init) {
  switch (mr) {
    case 1: return mk_a8_t<1>(x, ldx, panel, steps, acc, init);
    case 2: return mk_a8_t<2>(x, ldx, panel, steps, acc, init);
    case 3: return mk_a8_t<3>(x, ldx, panel, steps, acc, init);
    case 4: return mk_a8_t<4>(x, ldx, panel, steps, acc, init);
    case 5: return mk_a8_t<5>(x, ldx, panel, steps, acc, init);
    default: return mk_a8_t<6>(x, ldx, panel, steps, acc, init);
  }
}

// ---------------------------------------------------------------- group epilogues
void fin_a16(const Problem& p, const XA16& xa, int64_t g, int64_t n0, int ncols,
             const float* acc, float* out, bool init) {
  const float* s = p.scale + (p.blockwise ? g * p.N : 0) + n0;
  const float* z = p.has_zp ? p.zp + (p.blockwise ? g * p.N : 0) + n0 : nullptr;
  const int64_t ahead = p.blockwise ? p.N : kNR;  // the next group's (or tile's) scale / zero point
  for (int l = 0; l < 4; ++l) {
    _mm_prefetch(reinterpret_cast<const char*>(s + ahead + 16 * l), _MM_HINT_T1);
    if (z) _mm_prefetch(reinterpret_cast<const char*>(z + ahead + 16 * l), _MM_HINT_T1);
  }
  for (int j = 0; j < 4; ++j) {
    const __mmask16 mask = tail_mask(ncols - 16 * j);
    if (!mask) break;
    const __m512 sv = _mm512_maskz_loadu_ps(mask, s + 16 * j);
    const __m512 zv = z ? _mm512_maskz_loadu_ps(mask, z + 16 * j) : _mm512_setzero_ps();
    for (int64_t m = 0; m < p.M; ++m) {
      const float* a = acc + (m * xa.T) * kNR + 16 * j;
      __m512 sum = _mm512_loadu_ps(a);
      for (int t = 1; t < xa.T; ++t) sum = _mm512_add_ps(sum, _mm512_loadu_ps(a + t * kNR));
      if (xa.xgs) sum = _mm512_mul_ps(sum, _mm512_set1_ps(xa.xgs[m * p.groups + g]));
      float* o = out + m * kNR + 16 * j;
      __m512 v = init ? _mm512_mul_ps(sv, sum) : _mm512_fmadd_ps(sv, sum, _mm512_loadu_ps(o));
      if (z) v = _mm512_fnmadd_ps(zv, _mm512_set1_ps(xa.xsum[m * p.groups + g]), v);
      _mm512_storeu_ps(o, v);
    }
  }
}

void fin_a8(const Problem& p, const XA8& xa, int64_t g, int64_t n0, int ncols,
            const int32_t* acc, float* out, bool init) {
  const float* s = p.scale + (p.blockwise ? g * p.N : 0) + n0;
  const float* z = p.has_zp ? p.zp + (p.blockwise ? g * p.N : 0) + n0 : nullptr;
  const int32_t bias = p.bits == 8 ? 128 : 8;
  const int64_t ahead = p.blockwise ? p.N : kNR;  // the next group's (or tile's) scale / zero point
  for (int l = 0; l < 4; ++l) {
    _mm_prefetch(reinterpret_cast<const char*>(s + ahead + 16 * l), _MM_HINT_T1);
    if (z) _mm_prefetch(reinterpret_cast<const char*>(z + ahead + 16 * l), _MM_HINT_T1);
  }
  for (int j = 0; j < 4; ++j) {
    const __mmask16 mask = tail_mask(ncols - 16 * j);
    if (!mask) break;
    const __m512 sv = _mm512_maskz_loadu_ps(mask, s + 16 * j);
    const __m512 zv = z ? _mm512_maskz_loadu_ps(mask, z + 16 * j) : _mm512_setzero_ps();
    for (int64_t m = 0; m < p.M; ++m) {
      const int64_t i = m * p.groups + g;
      const __m512i a = _mm512_sub_epi32(_mm512_loadu_si512(acc + m * kNR + 16 * j),
                                         _mm512_set1_epi32(bias * xa.sq[i]));
      float* o = out + m * kNR + 16 * j;
      _mm512_storeu_ps(o, a8_epilogue(a, _mm512_mul_ps(_mm512_set1_ps(xa.xs[i]), sv), z != nullptr,
                                      zv, xa.xzs[i], init, o));
    }
  }
}

// float32 -> bf16 bits, round to nearest even, NaN kept (no flush to zero).
inline __m256i to_bf16_exact(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x400000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}
// The same bits as to_bf16_exact; vcvtneps2bf16 (one instruction) where no
// lane is subnormal or NaN (it flushes the former and may differ on the latter).
inline __m256i to_bf16(__m512 v) {
  if (_mm512_fpclass_ps_mask(v, 0x20 | 0x01 | 0x80)) return to_bf16_exact(v);  // denormal, QNaN, SNaN
  return bf16_bits(v);
}

void store(const Problem& p, const float* rowexp, int64_t n0, int ncols, const float* out) {
  for (int64_t m = 0; m < p.M; ++m) {
    const __m512 f = _mm512_set1_ps(rowexp ? rowexp[m] : 1.0f);
    const int64_t base = m * p.N + n0;
    for (int j = 0; j < 4; ++j) {
      const __mmask16 mask = tail_mask(ncols - 16 * j);
      if (!mask) break;
      const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(out + m * kNR + 16 * j), f);
      if (p.xt == kF32) {
        _mm512_mask_storeu_ps(static_cast<float*>(p.y) + base + 16 * j, mask, v);
      } else {
        const __m256i h = p.xt == kBF16 ? to_bf16(v)
                                        : _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p.y) + base + 16 * j, mask, h);
      }
    }
  }
}

// ---------------------------------------------------------------- per-channel decode
// Dot-product form for small M: each weight row [K] (or [K/2] packed) is read
// once, NW rows at a time, and multiplied with every prepared x row. K is cut
// into chunks whose x rows (all R of them) stay in L1 (~32 KiB: with x from L2
// the M=8..16 cases ran at a third of the dot-product rate); per chunk the zmm
// partial sums are reduced and added to the row's result (fixed order).
constexpr int kMaxDotRows = 16;
// Weight rows are prefetched kAhead rows ahead (same offset) by
// kStreamHint (each line is used once). Measured on Zen 4 at 4096x4096
// int8: M=1 0.39 ms non-temporal against 0.49 with T0 four rows ahead; M=4
// 0.40 against 0.46 (on an Intel Xeon, T0 eight rows ahead is the faster).
constexpr int kAhead = 8;
// The W8A16 decode (per-channel with one row of x, and the blockwise stream's
// register form): the products of each int8 pair with x's bf16 pair by two
// FMAs on their float32 images (the Intel set: dot_pairs_by_fma) or by
// VDPBF16PS on bf16 images converted from them. On that Xeon VDPBF16PS issues once per 2 cycles
// with an 8-cycle latency and the VCVTNE2PS2BF16 before it costs as much:
// the FMAs took 0.68-0.73x the time (2048 -> 5632, M=1, two threads, weights
// from DRAM: 598-642 -> 439-465 us; one thread from L2 1.3-1.5x). The
// blockwise int8 stream's register form likewise (W8A16 g128 2048 -> 5632:
// M=1 586 -> 467-523 us, M=4 1047-1073 -> 805-879). fp8's and int4's lookups
// feed VDPBF16PS directly; FMAs there measured no gain. Zen 4, where these
// loops were tuned, keeps VDPBF16PS.
constexpr bool kInt8ByFma = XQK_INT8_DOT_BY_FMA;

// A vector of bf16 pairs as the float32 images of its even and odd elements.
inline void bf16_pair_images(__m512i v, __m512& even, __m512& odd) {
  even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

// VDPBF16PS's arithmetic on float32 images: per lane acc + the odd product,
// then + the even one, each rounded to float32 (checked bit for bit against
// VDPBF16PS on the Intel Xeon, 3.2M random lanes; the other order differs in
// 8% of them). x has no subnormal terms (XA16), so VDPBF16PS's flushing
// never applies.
inline __m512 dot_pairs_by_fma(__m512 acc, __m512 w_even, __m512 w_odd, __m512 x_even,
                               __m512 x_odd) {
  return _mm512_fmadd_ps(w_even, x_even, _mm512_fmadd_ps(w_odd, x_odd, acc));
}
constexpr int64_t kDotXBytes = 32 << 10;  // x bytes per K chunk

// fn(Rows<R>{}) for R = rows, clamped to [1, kMax]: one instance of a
// row-count template per count (a compile-time count keeps the accumulators
// in registers). Hand-written, not std::integral_constant: no C++ library
// templates in this file (see CMakeLists.txt).
template <int R>
struct Rows {
  static constexpr int value = R;
};
template <bool B, class T, class F>
struct Select {  // std::conditional, hand-written for the same reason
  using type = T;
};
template <class T, class F>
struct Select<false, T, F> {
  using type = F;
};
template <int kMax, int R = 1, class Fn>
inline void with_rows(int64_t rows, const Fn& fn) {
  if constexpr (R < kMax) {
    if (rows > R) return with_rows<kMax, R + 1>(rows, fn);
  }
  fn(Rows<R>{});
}

// xd for the A16 dot kernels, blocks of 128 features with the R rows of each
// block together ([Kq/128][R][128]: one base pointer per step, the rows at
// constant offsets). Within a block int8 weights use k order; packed int4
// uses four runs of 32 (t = 0..3) holding x[4i + t], the order in which the
// weight nibbles come out of a 16-bit lane (see dot_a16_t).
void dot_prep_a16(const Problem& p, const XA16& xa, uint16_t* xd, int64_t Kq) {
  const int64_t R = p.M * xa.T;
  alignas(64) uint16_t tmp[32];
  __m512i idx;  // word 8t + i  <-  word 4i + t
  {
    alignas(64) uint16_t ix[32];
    for (int t = 0; t < 4; ++t)
      for (int i = 0; i < 8; ++i) ix[8 * t + i] = static_cast<uint16_t>(4 * i + t);
    idx = _mm512_load_si512(ix);
  }
  for (int64_t r = 0; r < R; ++r) {
    const uint16_t* src = xa.xb + r * xa.Kp;
    for (int64_t c = 0; c < Kq; c += 128) {
      uint16_t* dst = xd + c * R + r * 128 - c;  // + c below: block c / 128, row r
      for (int j = 0; j < 4; ++j) {
        const __m512i a = _mm512_maskz_loadu_epi16(mask32(xa.Kp - c - 32 * j), src + c + 32 * j);
        if (p.bits == 8) {
          _mm512_storeu_si512(dst + c + 32 * j, a);
          continue;
        }
        _mm512_store_si512(tmp, _mm512_permutexvar_epi16(idx, a));
        for (int t = 0; t < 4; ++t) std::memcpy(dst + c + 32 * t + 8 * j, tmp + 8 * t, 16);
      }
    }
  }
}

// xd for the A8 dot kernels, [Kq/128][M][128] like dot_prep_a16's: int8 in k
// order; packed int4, per block, the 64 even then the 64 odd features (low and
// high nibbles).
void dot_prep_a8(const Problem& p, const XA8& xa, int8_t* xd, int64_t Kq) {
  alignas(64) uint8_t ev[64], od[64];
  for (int i = 0; i < 64; ++i) {
    ev[i] = static_cast<uint8_t>(i < 32 ? 2 * i : 64 + 2 * (i - 32));
    od[i] = static_cast<uint8_t>(ev[i] + 1);
  }
  for (int64_t m = 0; m < p.M; ++m) {
    const int8_t* src = xa.xq + m * xa.Kp;
    for (int64_t c = 0; c < Kq; c += 128) {
      int8_t* dst = xd + c * p.M + m * 128 - c;  // + c below: block c / 128, row m
      const __m512i a = _mm512_maskz_loadu_epi8(mask64(xa.Kp - c), src + c);
      const __m512i b = _mm512_maskz_loadu_epi8(mask64(xa.Kp - c - 64), src + c + 64);
      if (p.bits == 8) {
        _mm512_storeu_si512(dst + c, a);
        _mm512_storeu_si512(dst + c + 64, b);
        continue;
      }
      _mm512_storeu_si512(dst + c, _mm512_permutex2var_epi8(a, _mm512_load_si512(ev), b));
      _mm512_storeu_si512(dst + c + 64, _mm512_permutex2var_epi8(a, _mm512_load_si512(od), b));
    }
  }
}

template <int R>
void dot_a16_t(const Problem& p, const XA16& xa, const uint16_t* xd, int64_t Kq, int64_t n0,
               int ncols, float* out) {
  // Weight rows at a time (NW * R accumulators). One row of x: 8 rows, whose
  // 8 concurrent streams read DRAM faster (W8A16 M=1, one core and two
  // threads, the decoder bench's shapes: 1.02-1.11x per turn against 4
  // rows; 2 rows 0.83-0.88x, 16 rows 0.94-1.03x; int4 1.00-1.12x).
  constexpr int NW = R == 1 ? 8 : (R <= 4 ? 4 : (R <= 8 ? 2 : 1));
  constexpr int64_t KC = kDotXBytes / (2 * R) / 128 * 128;  // features per chunk
  const int64_t K = p.K;
  const __m512i lut = nibble_lut(p);
  const Fp8Decoder fp8;
  const Int8Decoder int8;
  alignas(64) float res[R][kNR] = {};
  for (int64_t kc = 0; kc < K; kc += KC) {
  const int64_t kend = K - kc < KC ? K : kc + KC;
  for (int c0 = 0; c0 < ncols; c0 += NW) {
    const uint8_t* row[NW];
    for (int i = 0; i < NW; ++i) {  // a short last group repeats its last row
      const int64_t n = n0 + (c0 + i < ncols ? c0 + i : ncols - 1);
      row[i] = p.w + n * (p.bits == 4 ? K / 2 : K);
    }
    __m512 acc[NW][R];
    for (int i = 0; i < NW; ++i)
      for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
    // fp8, and int8 for more than one row: 64 features a step (never across
    // a 128-block: kc is a multiple of 128), decoded to exact bf16 by table
    // lookups; the two dot products per row take features k..k+31, then
    // k+32..k+63, in the order of the 32-feature int8 steps (the same sums).
    const auto bytes_by_64 = [&](const auto& dec) __attribute__((always_inline)) {
      for (int64_t k = kc; k < kend; k += 64) {
        const __mmask64 m = mask64(K - k);
        const uint16_t* xk = xd + (k & ~int64_t{127}) * R + (k & 127);  // x rows of this 128-block
        for (int i = 0; i < NW; ++i) {
          // Rows kAhead further on, same offset (within a thread rows run in order).
          _mm_prefetch(reinterpret_cast<const char*>(row[i] + kAhead * K + k), kStreamHint);
          __m512i w0, w1;  // 64 exact bf16 in k order
          dec.words(_mm512_maskz_loadu_epi8(m, row[i] + k), w0, w1);
          for (int r = 0; r < R; ++r) {
            __m512 a = _mm512_dpbf16_ps(acc[i][r], as_bh(_mm512_loadu_si512(xk + r * 128)), as_bh(w0));
            acc[i][r] = _mm512_dpbf16_ps(a, as_bh(_mm512_loadu_si512(xk + r * 128 + 32)), as_bh(w1));
          }
        }
      }
    };
    if (p.wf == kWFp8) {
      bytes_by_64(fp8);
    } else if (p.bits == 8 && R > 1) {
      bytes_by_64(int8);
    } else if (p.bits == 8) {
      // One row: int8 converted 32 at a time. The lookups are faster here too
      // with the weights in cache (2048x2560: 1.30x), but from DRAM (huge
      // pages, one thread, a loaded machine) they took 0.89-0.96x of this
      // loop's time, and a decode step reads its weights from DRAM.
      for (int64_t k = kc; k < kend; k += 32) {
        const __mmask32 m = mask32(K - k);
        const uint16_t* xk = xd + (k & ~int64_t{127}) * R + (k & 127);  // x rows of this 128-block
        __m512 x_even, x_odd;  // kInt8ByFma: x's pairs split once for all rows
        if constexpr (kInt8ByFma) bf16_pair_images(_mm512_loadu_si512(xk), x_even, x_odd);
        for (int i = 0; i < NW; ++i) {
          if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(row[i] + kAhead * K + k), kStreamHint);
          const __m256i b = _mm256_maskz_loadu_epi8(m, row[i] + k);
          if constexpr (kInt8ByFma) {  // the int8 pairs' sign-extended halves
            const __m512i pairs = _mm512_cvtepi8_epi16(b);
            const __m512 w_even = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(pairs, 16), 16));
            const __m512 w_odd = _mm512_cvtepi32_ps(_mm512_srai_epi32(pairs, 16));
            acc[i][0] = dot_pairs_by_fma(acc[i][0], w_even, w_odd, x_even, x_odd);
            continue;
          }
          const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
          const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
          const __m512bh w = _mm512_cvtne2ps_pbh(hi, lo);  // 32 exact bf16 in k order
          for (int r = 0; r < R; ++r)
            acc[i][r] = _mm512_dpbf16_ps(acc[i][r], as_bh(_mm512_loadu_si512(xk + r * 128)), w);
        }
      }
    } else {
      for (int64_t k = kc; k < kend; k += 128) {
        const __mmask64 m = mask64((K - k) / 2);
        const uint16_t* xk = xd + (k & ~int64_t{127}) * R + (k & 127);  // x rows of this 128-block
        for (int i = 0; i < NW; ++i) {
          _mm_prefetch(reinterpret_cast<const char*>(row[i] + kAhead * (K / 2) + k / 2), kStreamHint);
          const __m512i v = _mm512_maskz_loadu_epi8(m, row[i] + k / 2);
          // Word j of v holds features 4j..4j+3, one per nibble; the LUT takes
          // the low 5 bits (bit 4 is ignored), so a shift selects the nibble.
          const __m512i w0 = _mm512_permutexvar_epi16(v, lut);
          const __m512i w1 = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), lut);
          const __m512i w2 = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), lut);
          const __m512i w3 = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), lut);
          for (int r = 0; r < R; ++r) {
            const uint16_t* x = xk + r * 128;
            __m512 a = acc[i][r];
            a = _mm512_dpbf16_ps(a, as_bh(_mm512_loadu_si512(x)), as_bh(w0));
            a = _mm512_dpbf16_ps(a, as_bh(_mm512_loadu_si512(x + 32)), as_bh(w1));
            a = _mm512_dpbf16_ps(a, as_bh(_mm512_loadu_si512(x + 64)), as_bh(w2));
            acc[i][r] = _mm512_dpbf16_ps(a, as_bh(_mm512_loadu_si512(x + 96)), as_bh(w3));
          }
        }
      }
    }
    for (int i = 0; i < NW && c0 + i < ncols; ++i)
      for (int r = 0; r < R; ++r) res[r][c0 + i] += _mm512_reduce_add_ps(acc[i][r]);
  }
  }
  const int T = xa.T;
  for (int64_t m = 0; m < p.M; ++m)
    for (int c = 0; c < ncols; ++c) {
      float a = res[m * T][c];
      for (int t = 1; t < T; ++t) a += res[m * T + t][c];
      float v = p.scale[n0 + c] * a;
      if (p.has_zp) v = __builtin_fmaf(-p.zp[n0 + c], xa.xsum[m], v);
      out[m * kNR + c] = v;
    }
}

void dot_a16(const Problem& p, const XA16& xa, const uint16_t* xd, int64_t Kq, int64_t n0,
             int ncols, float* out) {
  with_rows<kMaxDotRows>(p.M * xa.T, [&](auto rows) {
    dot_a16_t<decltype(rows)::value>(p, xa, xd, Kq, n0, ncols, out);
  });
}

template <int R>
void dot_a8_t(const Problem& p, const XA8& xa, const int8_t* xd, int64_t Kq, int64_t n0,
              int ncols, float* out) {
  constexpr int NW = R <= 4 ? 4 : (R <= 8 ? 2 : 1);
  constexpr int64_t KC = kDotXBytes / R / 128 * 128;  // features per chunk
  const int64_t K = p.K;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i x88 = _mm512_set1_epi8(static_cast<char>(0x88)), low = _mm512_set1_epi8(0x0f);
  alignas(64) int32_t res[R][kNR] = {};
  for (int64_t kc = 0; kc < K; kc += KC) {
  const int64_t kend = K - kc < KC ? K : kc + KC;
  for (int c0 = 0; c0 < ncols; c0 += NW) {
    const uint8_t* row[NW];
    for (int i = 0; i < NW; ++i) {
      const int64_t n = n0 + (c0 + i < ncols ? c0 + i : ncols - 1);
      row[i] = p.w + n * (p.bits == 4 ? K / 2 : K);
    }
    __m512i acc[NW][R];
    for (int i = 0; i < NW; ++i)
      for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_si512();
    if (p.bits == 8) {
      for (int64_t k = kc; k < kend; k += 64) {
        const __mmask64 m = mask64(K - k);
        const int8_t* xk = xd + (k & ~int64_t{127}) * R + (k & 127);  // x rows of this 128-block
        for (int i = 0; i < NW; ++i) {
          _mm_prefetch(reinterpret_cast<const char*>(row[i] + kAhead * K + k), kStreamHint);
          const __m512i w = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, row[i] + k), flip);  // q + 128
          for (int r = 0; r < R; ++r)
            acc[i][r] = _mm512_dpbusd_epi32(acc[i][r], w, _mm512_loadu_si512(xk + r * 128));
        }
      }
    } else {
      for (int64_t k = kc; k < kend; k += 128) {
        const __mmask64 m = mask64((K - k) / 2);
        const int8_t* xk = xd + (k & ~int64_t{127}) * R + (k & 127);  // x rows of this 128-block
        for (int i = 0; i < NW; ++i) {
          _mm_prefetch(reinterpret_cast<const char*>(row[i] + kAhead * (K / 2) + k / 2), kStreamHint);
          const __m512i v = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, row[i] + k / 2), x88);
          const __m512i lo = _mm512_and_si512(v, low);                          // even k, q + 8
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);   // odd k, q + 8
          for (int r = 0; r < R; ++r) {
            const int8_t* x = xk + r * 128;
            acc[i][r] = _mm512_dpbusd_epi32(acc[i][r], lo, _mm512_loadu_si512(x));
            acc[i][r] = _mm512_dpbusd_epi32(acc[i][r], hi, _mm512_loadu_si512(x + 64));
          }
        }
      }
    }
    for (int i = 0; i < NW && c0 + i < ncols; ++i)
      for (int r = 0; r < R; ++r) res[r][c0 + i] += _mm512_reduce_add_epi32(acc[i][r]);
  }
  }
  const int32_t bias = p.bits == 8 ? 128 : 8;
  for (int64_t m = 0; m < p.M; ++m) {
    const int32_t comp = bias * xa.sq[m];
    for (int c = 0; c < ncols; ++c) {
      float v = static_cast<float>(res[m][c] - comp) * (xa.xs[m] * p.scale[n0 + c]);
      if (p.has_zp) v = __builtin_fmaf(-p.zp[n0 + c], xa.xzs[m], v);
      out[m * kNR + c] = v;
    }
  }
}

void dot_a8(const Problem& p, const XA8& xa, const int8_t* xd, int64_t Kq, int64_t n0,
            int ncols, float* out) {
  with_rows<kMaxDotRows>(p.M, [&](auto rows) {
    dot_a8_t<decltype(rows)::value>(p, xa, xd, Kq, n0, ncols, out);
  });
}

// ---------------------------------------------------------------- blockwise decode
// See Kernels::stream_a16. Up to kRegisterRows rows of x, a sweep's weights
// are unpacked in registers and multiplied with every row as they come (the
// register form). For more rows (the wide form, R = 0 in the templates
// below) a sweep is a whole group (up to kWidePairs k-pairs): its unpacked
// weights go to a stack buffer in L1 (16 KiB) and are applied to the rows
// in groups of up to kWideGroupRows, each group's accumulators in registers
// from the first k to the scale epilogue. Each weight byte is unpacked once
// whatever the batch, and the weight is still read in address order: the
// panel path, which M = 5..16 took before, reads 64-column strips of every
// row, which ran at half the speed from transparent huge pages (measured
// 4096x4096 W4A16 g128, two threads, rotated weights: M=5 1.54 -> 0.65 ms,
// M=16 1.99 -> 1.02 ms).
constexpr int kRegisterRows = 4;
// The wide form's row groups: up to 6 rows x 64 columns of accumulators (24
// zmm), the 4 weight vectors and a broadcast x fit the 32 registers.
constexpr int kWideGroupRows = 6;
constexpr int kMaxStreamRows = 16;
// k-pairs per sweep (weight rows read together): more rows of x share each
// load and store of the accumulators kept between sweeps. The wide form's
// sweep is a whole group if it has at most kWidePairs k-pairs (a g128 group
// has 64), so that its accumulators never leave registers (FusedEpilogue).
constexpr int64_t kWidePairs = 64;
constexpr int64_t stream_pairs(int rows) { return rows == 0 ? kWidePairs : (rows == 1 ? 4 : 8); }
// Column blocks (tiles) within a task, so that what a sweep keeps in cache
// stays small whatever N: the register form's accumulators between sweeps
// (rows x 256 bytes a tile) within 128 KiB (measured 2048x32000 M=4: 1.3x
// torch's int4 kernel against 0.7x unblocked, 0.5 MiB of them), the wide
// form's prefetched next sweep (kWidePairs k-pairs of `rows_per_pair`
// weight rows) within 256 KiB of L2. A column's arithmetic does not depend
// on the blocking.
constexpr int64_t stream_block_tiles(int64_t rows, int64_t rows_per_pair) {
  return rows > kRegisterRows ? (256 << 10) / (kWidePairs * rows_per_pair * kNR)
                              : (128 << 10) / (rows * kNR * 4);
}
template <class Fn>
inline void in_column_blocks(int64_t t0, int64_t t1, int64_t block, const Fn& fn) {
  for (int64_t b0 = t0; b0 < t1; b0 += block) fn(b0, b0 + block < t1 ? b0 + block : t1);
}

// The wide form's epilogue when one sweep covers a whole group (T = 1):
// fin_a16's / fin_a8's arithmetic on the accumulators in registers, into the
// slice's part rows, instead of storing the accumulators. Pointers are at
// row 0 of the row group and column n0 of the tile; per-row values at stride
// `groups` (the group's own entry).
struct FusedEpilogue {
  float* part;  // row r at part + r * N
  int64_t N, groups;
  const float *s, *z;      // the group's scale / zero point at n0 (z: null if none)
  const float* xsum;       // A16: the rows' sums of x over the group
  const float *xs, *xzs;   // A8: x_scale, x_scale * sum xq
  const int32_t* sq;       // A8: sum xq
  int32_t bias;            // A8: 8 (int4) or 128 (int8)
  int ncols;               // real columns of the tile
  bool init;               // the slice's first group: part = v, else part += v
  const float* xgs;        // A16: the rows' group factors (float-product A8), or null
};

// The wide form's row group: rows x0 + r*ldx (r < RG) times the ns unpacked
// k-steps wb[4*s .. 4*s+4), into the accumulators a[r][kNR] (zeroed first if
// `first`), or through `ep` into the part rows: dpbf16 for A16 (bf16 pairs,
// float sums), dpbusd for A8 (int8 quads, int32 sums). Not inlined, and
// written without lambdas: inlined into the sweep, GCC spilled the
// accumulators to the stack (half the speed).
template <int RG, bool A8>
__attribute__((noinline)) void sweep_rows(void* acc, const void* xv, int64_t ldx,
                                          const __m512i* wb, int64_t ns, bool first,
                                          const FusedEpilogue* ep) {
  using XT = typename Select<A8, int8_t, uint16_t>::type;
  using CT = typename Select<A8, __m512i, __m512>::type;
  constexpr int64_t xstep = A8 ? 4 : 2;  // x elements per k-step
  // One definition of the accumulators before the loop (a zero source when
  // `first`): with two (zeros or loads) GCC copied all 16 every step.
  alignas(64) static const float zeros[kWideGroupRows * kNR] = {};
  const XT* x0 = static_cast<const XT*>(xv);
  float* a = static_cast<float*>(acc);
  const float* src = first ? zeros : a;
  CT c[RG][4];
  for (int r = 0; r < RG; ++r)
    for (int cb = 0; cb < 4; ++cb) {
      if constexpr (A8) {
        c[r][cb] = _mm512_load_si512(src + r * kNR + 16 * cb);
      } else {
        c[r][cb] = _mm512_load_ps(src + r * kNR + 16 * cb);
      }
    }
  for (int64_t s = 0; s < ns; ++s) {
    const __m512i* w = wb + 4 * s;
    for (int r = 0; r < RG; ++r) {
      const __m512i xr = _mm512_set1_epi32(load_i32(x0 + r * ldx + xstep * s));
      for (int cb = 0; cb < 4; ++cb) {
        if constexpr (A8) {
          c[r][cb] = _mm512_dpbusd_epi32(c[r][cb], _mm512_load_si512(w + cb), xr);
        } else {
          c[r][cb] = _mm512_dpbf16_ps(c[r][cb], (__m512bh)xr, (__m512bh)_mm512_load_si512(w + cb));
        }
      }
    }
  }
  if (ep == nullptr) {
    for (int r = 0; r < RG; ++r)
      for (int cb = 0; cb < 4; ++cb) {
        if constexpr (A8) {
          _mm512_store_si512(a + r * kNR + 16 * cb, c[r][cb]);
        } else {
          _mm512_store_ps(a + r * kNR + 16 * cb, c[r][cb]);
        }
      }
    return;
  }
  for (int cb = 0; cb < 4; ++cb) {
    const __mmask16 mc = tail_mask(ep->ncols - 16 * cb);
    const __m512 sv = _mm512_maskz_loadu_ps(mc, ep->s + 16 * cb);
    const __m512 zv = ep->z ? _mm512_maskz_loadu_ps(mc, ep->z + 16 * cb) : _mm512_setzero_ps();
    for (int r = 0; r < RG; ++r) {
      const int64_t i = r * ep->groups;
      __m512 v;
      if constexpr (A8) {
        const __m512i ai = _mm512_sub_epi32(c[r][cb], _mm512_set1_epi32(ep->bias * ep->sq[i]));
        v = _mm512_mul_ps(_mm512_cvtepi32_ps(ai), _mm512_mul_ps(_mm512_set1_ps(ep->xs[i]), sv));
        if (ep->z) v = _mm512_fnmadd_ps(zv, _mm512_set1_ps(ep->xzs[i]), v);
        float* o = ep->part + r * ep->N + 16 * cb;
        _mm512_mask_storeu_ps(o, mc, ep->init ? v : _mm512_add_ps(_mm512_maskz_loadu_ps(mc, o), v));
      } else {
        float* o = ep->part + r * ep->N + 16 * cb;
        if (ep->xgs) c[r][cb] = _mm512_mul_ps(c[r][cb], _mm512_set1_ps(ep->xgs[i]));
        v = ep->init ? _mm512_mul_ps(sv, c[r][cb]) : _mm512_fmadd_ps(sv, c[r][cb], _mm512_maskz_loadu_ps(mc, o));
        if (ep->z) v = _mm512_fnmadd_ps(zv, _mm512_set1_ps(ep->xsum[i]), v);
        _mm512_mask_storeu_ps(o, mc, v);
      }
    }
  }
}
// All rows, in the fewest groups of at most kWideGroupRows, of equal size
// (give or take one row: 5 rows as one group, 8 as 4 + 4, 16 as 6 + 5 + 5).
// `ep`: null, or the fused epilogue for row 0 (moved on for each row group).
template <bool A8>
void sweep_all_rows(int rows, void* acc, const void* x0, int64_t ldx, const __m512i* wb,
                    int64_t ns, bool first, const FusedEpilogue* ep) {
  using XT = typename Select<A8, int8_t, uint16_t>::type;
  const int groups = (rows + kWideGroupRows - 1) / kWideGroupRows;
  for (int g = 0, r0 = 0; g < groups; ++g) {
    const int rg = (rows - r0) / (groups - g);  // what is left, split evenly
    FusedEpilogue e;
    if (ep) {
      e = *ep;
      e.part += r0 * e.N;
      e.xsum = e.xsum ? e.xsum + r0 * e.groups : nullptr;
      e.xs = e.xs ? e.xs + r0 * e.groups : nullptr;
      e.xzs = e.xzs ? e.xzs + r0 * e.groups : nullptr;
      e.sq = e.sq ? e.sq + r0 * e.groups : nullptr;
      e.xgs = e.xgs ? e.xgs + r0 * e.groups : nullptr;
    }
    with_rows<kWideGroupRows>(rg, [&](auto n) {
      sweep_rows<decltype(n)::value, A8>(static_cast<char*>(acc) + 4 * r0 * kNR,
                                         static_cast<const XT*>(x0) + r0 * ldx, ldx, wb, ns, first,
                                         ep ? &e : nullptr);
    });
    r0 += rg;
  }
}

// Prefetch distance in sweeps (kStreamHint: each weight line is used
// once): measured on Zen 4 at M=1 4096x4096, two sweeps ahead with NTA took
// 0.21 ms where one sweep ahead into L2 (T1) took 0.30 ms. (On an Intel Xeon,
// with T0, 16 k-pairs ahead measured the same as 8.)
constexpr int64_t kStreamAhead = 2;
constexpr int64_t kStreamAheadPairs = 8;  // the same distance in k-pairs
// The prefetch distance of a sweep of sp k-pairs: kStreamAheadPairs, or one
// sweep for the wide form's longer sweeps.
constexpr int64_t stream_ahead_pairs(int64_t sp) { return sp > kStreamAheadPairs ? sp : kStreamAheadPairs; }

// Lines [l0, l1) of a later sweep (its rows `stride` bytes apart from
// `next`, block_lines lines of each), in address order, with kStreamHint
// (into L1: the register form's sweeps are 8 k-pairs). (Measured: the same
// prefetches without the division per line, which spaces them out, halved
// the M=1 decode's speed from DRAM.)
inline void prefetch_sweep_lines(const char* next, int64_t stride, int64_t block_lines, int64_t l0,
                                 int64_t l1) {
  for (int64_t l = l0; l < l1; ++l)
    _mm_prefetch(next + (l / block_lines) * stride + (l % block_lines) * 64, kStreamHint);
}
// The wide form's, whose sweeps are more than L1 holds: the next sweep,
// line after line in address order from line_index on, one or two per step
// of the unpacking (no division per line: the steps space them out), by
// kStreamHint.
struct SweepCursor {
  const char* row;
  int64_t stride, block_lines, line, line_index;
  SweepCursor(const char* next, int64_t stride_, int64_t block_lines_, int64_t l0)
      : row(next + (l0 / block_lines_) * stride_), stride(stride_), block_lines(block_lines_),
        line(l0 % block_lines_), line_index(l0) {}
  void fetch() {
    _mm_prefetch(row + line * 64, kStreamHint);
    ++line_index;
    if (++line == block_lines) line = 0, row += stride;
  }
};

// The wide form's unpacking of one tile's sweep (ns steps) into wb, with
// this tile's share (lines_per_tile, from the cursor's line on) of the next
// sweep's prefetches spread over the steps.
template <int64_t S, class UnpackStep>
inline void unpack_sweep(__m512i (&wb)[S][4], int64_t ns, const UnpackStep& unpack_step,
                         SweepCursor cursor, int64_t lines_per_tile, int64_t sweep_lines) {
  const int64_t end = cursor.line_index + lines_per_tile < sweep_lines
                          ? cursor.line_index + lines_per_tile : sweep_lines;
  const int64_t per = (lines_per_tile + ns - 1) / ns;
  for (int64_t s = 0; s < ns; ++s) {
    unpack_step(s, wb[s]);
    for (int64_t i = 0; i < per && cursor.line_index < end; ++i) cursor.fetch();
  }
}

// Groups [g0, g1) of the columns of tiles [t0, t1) (one K slice of one column
// block) into part[m][N]. The slice is one contiguous run of memory; a block
// reads the same columns of each of its rows, in address order: a sweep
// multiplies kStreamPairs weight rows (k-pairs) with every column of the
// block, 64 at a time, and prefetches a later sweep's rows line by line in
// address order. (Reading the rows interleaved, or a column strip of each
// row, leaves DRAM bandwidth unused: ~33 GB/s against ~50 for an
// address-order stream on this machine.) A column block (the driver's
// stream_blocks) reads the same span of each row; each column's arithmetic
// does not depend on the blocking.
// R: rows of x (M*T) when at most kRegisterRows, 0 for the wide form.
// BITS 4: int4 or fp4 nibbles (PairUnpacker's table); 8: int8, or fp8 when FP8.
template <int R, int BITS, bool FP8 = false>
void stream_a16_t(const Problem& p, const XA16& xa, int64_t g0, int64_t g1, int64_t t0,
                  int64_t t1, float* acc, float* part) {
  const PairUnpacker unpack(p);
  const Fp8Decoder dec;
  constexpr int64_t SP = stream_pairs(R);
  const int rows = R > 0 ? R : static_cast<int>(p.M * xa.T);
  const int64_t N = p.N, tiles = (N + kNR - 1) / kNR, pairs = xa.Gp / 2;
  const int64_t row_bytes = BITS == 4 ? N : 2 * N;  // weight bytes of one k-pair
  const int64_t rows_per_pair = BITS == 4 ? 1 : 2;
  const __mmask64 last_mask = mask64(N - (tiles - 1) * kNR);
  // The block's bytes of one weight row (one byte a column; the last block
  // may be short), and the lines of a later sweep each tile prefetches.
  const int64_t block_bytes = t1 == tiles ? N - t0 * kNR : (t1 - t0) * kNR;
  const int64_t block_lines = (block_bytes + 63) / 64;
  const int64_t sweep_lines = SP * rows_per_pair * block_lines;
  const int64_t lines_per_tile = (sweep_lines + (t1 - t0) - 1) / (t1 - t0);
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* wg = p.w + (BITS == 4 ? (g * p.G) / 2 : g * p.G) * N;
    const float* sg = p.scale + g * N;
    const float* zg = p.has_zp ? p.zp + g * N : nullptr;
    for (int64_t s0 = 0; s0 < pairs; s0 += SP) {
      const int64_t ns = pairs - s0 < SP ? pairs - s0 : SP;
      const uint8_t* ws = wg + s0 * row_bytes;
      // The first row of the sweep kStreamAhead later, at this block's columns.
      const char* next = reinterpret_cast<const char*>(
          ws + stream_ahead_pairs(SP) * row_bytes + t0 * kNR);
      const uint16_t* xs = xa.xb + g * xa.Gp + 2 * s0;
      const bool first = s0 == 0, last = s0 + ns == pairs;
      // The group's scale / zero-point rows are read by its last sweep; the
      // sweep kStreamAhead before it (or the first) fetches them, a tile's
      // 64 columns at a time.
      const int64_t last_s0 = (pairs - 1) / SP * SP;
      const int64_t fetch_s0 = last_s0 - stream_ahead_pairs(SP);
      const bool fetch_sz = s0 == (fetch_s0 > 0 ? fetch_s0 : 0);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * kNR;
        // Register form: this tile's share of a later sweep's lines. (The
        // wide form prefetches a few tiles ahead in its own sweep instead.)
        if constexpr (R > 0) {
          const int64_t la = (t - t0) * lines_per_tile;
          prefetch_sweep_lines(next, N, block_lines, la,
                               la + lines_per_tile < sweep_lines ? la + lines_per_tile : sweep_lines);
        }
        if (fetch_sz)
          for (int64_t l = 0; l < kNR; l += 16) {
            _mm_prefetch(reinterpret_cast<const char*>(sg + n0 + l), _MM_HINT_T1);
            if (zg) _mm_prefetch(reinterpret_cast<const char*>(zg + n0 + l), _MM_HINT_T1);
          }
        const __mmask64 m = t + 1 == tiles ? last_mask : ~0ull;
        float* a = acc + (t - t0) * rows * kNR;
        const auto unpack_step = [&](int64_t s, __m512i w[4]) __attribute__((always_inline)) {
          const uint8_t* src = ws + s * row_bytes + n0;
          if constexpr (BITS == 4) {
            unpack.int4(src, m, w);
          } else if constexpr (FP8) {
            PairUnpacker::fp8(dec, src, 2 * (s0 + s) + 1 < p.G ? src + N : nullptr, m, w);
          } else {
            PairUnpacker::int8(src, 2 * (s0 + s) + 1 < p.G ? src + N : nullptr, m, w);
          }
        };
        if constexpr (R == 0) {  // wide: unpack the sweep once, then every row group
          alignas(64) __m512i wb[SP][4];
          unpack_sweep(wb, ns, unpack_step,
                       SweepCursor(next, N, block_lines, (t - t0) * lines_per_tile),
                       lines_per_tile, sweep_lines);
          if (first && last && xa.T == 1) {  // the whole group in one sweep: fused epilogue
            const FusedEpilogue ep{part + n0, N, p.groups, sg + n0, zg ? zg + n0 : nullptr,
                                   xa.xsum + g, nullptr, nullptr, nullptr, 0,
                                   static_cast<int>(N - n0 < kNR ? N - n0 : kNR), g == g0,
                                   xa.xgs ? xa.xgs + g : nullptr};
            sweep_all_rows<false>(rows, a, xs, xa.Kp, wb[0], ns, true, &ep);
            continue;
          }
          sweep_all_rows<false>(rows, a, xs, xa.Kp, wb[0], ns, first, nullptr);
        } else {
          __m512 c[R][4];
          for (int r = 0; r < R; ++r)
            for (int cb = 0; cb < 4; ++cb)
              c[r][cb] = first ? _mm512_setzero_ps() : _mm512_load_ps(a + r * kNR + 16 * cb);
          const auto step = [&](int64_t s) __attribute__((always_inline)) {
            if constexpr (kInt8ByFma && BITS == 8 && !FP8) {
              // kInt8ByFma: the pair's rows as float32 (even k, odd k: zero past
              // the group), x's pair split.
              const uint8_t* src = ws + s * row_bytes + n0;
              const bool has_b = 2 * (s0 + s) + 1 < p.G;
              __m512 even[4], odd[4];
              for (int cb = 0; cb < 4; ++cb) {
                const __mmask16 mc = static_cast<__mmask16>(m >> (16 * cb));
                even[cb] = _mm512_castsi512_ps(int8_to_f32bits(_mm_maskz_loadu_epi8(mc, src + 16 * cb)));
                odd[cb] = has_b ? _mm512_castsi512_ps(int8_to_f32bits(_mm_maskz_loadu_epi8(mc, src + N + 16 * cb)))
                                : _mm512_setzero_ps();
              }
              for (int r = 0; r < R; ++r) {
                __m512 xe, xo;
                bf16_pair_images(_mm512_set1_epi32(load_i32(xs + r * xa.Kp + 2 * s)), xe, xo);
                for (int cb = 0; cb < 4; ++cb)
                  c[r][cb] = dot_pairs_by_fma(c[r][cb], even[cb], odd[cb], xe, xo);
              }
              return;
            }
            __m512i w[4];
            unpack_step(s, w);
            for (int r = 0; r < R; ++r) {
              const __m512bh xr = as_bh(_mm512_set1_epi32(load_i32(xs + r * xa.Kp + 2 * s)));
              for (int cb = 0; cb < 4; ++cb) c[r][cb] = _mm512_dpbf16_ps(c[r][cb], xr, as_bh(w[cb]));
            }
          };
          if (ns == SP) {  // a constant trip count: unrolled, so tiles overlap
#pragma GCC unroll 8
            for (int64_t s = 0; s < SP; ++s) step(s);
          } else {
            for (int64_t s = 0; s < ns; ++s) step(s);
          }
          for (int r = 0; r < R; ++r)
            for (int cb = 0; cb < 4; ++cb) _mm512_store_ps(a + r * kNR + 16 * cb, c[r][cb]);
        }
        if (!last) continue;
        // The group's last sweep: fin_a16's arithmetic (from L1, which keeps
        // c in registers above): part = (part +) s * sum_t acc (- z * xsum).
        for (int cb = 0; cb < 4; ++cb) {
          const __mmask16 mc = tail_mask(static_cast<int>(N - n0 - 16 * cb));
          const __m512 sv = _mm512_maskz_loadu_ps(mc, sg + n0 + 16 * cb);
          const __m512 zv = zg ? _mm512_maskz_loadu_ps(mc, zg + n0 + 16 * cb) : _mm512_setzero_ps();
          for (int64_t m_row = 0; m_row < p.M; ++m_row) {
            const float* am = a + m_row * xa.T * kNR + 16 * cb;
            __m512 sum = _mm512_load_ps(am);
            for (int tt = 1; tt < xa.T; ++tt) sum = _mm512_add_ps(sum, _mm512_load_ps(am + tt * kNR));
            if (xa.xgs) sum = _mm512_mul_ps(sum, _mm512_set1_ps(xa.xgs[m_row * p.groups + g]));
            float* o = part + m_row * N + n0 + 16 * cb;
            __m512 v = g == g0 ? _mm512_mul_ps(sv, sum) : _mm512_fmadd_ps(sv, sum, _mm512_maskz_loadu_ps(mc, o));
            if (zg) v = _mm512_fnmadd_ps(zv, _mm512_set1_ps(xa.xsum[m_row * p.groups + g]), v);
            _mm512_mask_storeu_ps(o, mc, v);
          }
        }
      }
    }
  }
}

template <int R>
void stream_a16_r(const Problem& p, const XA16& xa, int64_t g0, int64_t g1, int64_t t0, int64_t t1,
                  float* acc, float* part) {
  if (p.bits == 4) return stream_a16_t<R, 4>(p, xa, g0, g1, t0, t1, acc, part);
  if (p.wf == kWFp8) return stream_a16_t<R, 8, true>(p, xa, g0, g1, t0, t1, acc, part);
  return stream_a16_t<R, 8>(p, xa, g0, g1, t0, t1, acc, part);
}

void stream_a16(const Problem& p, const XA16& xa, int64_t g0, int64_t g1, int64_t t0, int64_t t1,
                float* acc, float* part) {
  const bool int4 = p.bits == 4;
  const int64_t rows = p.M * xa.T;
  in_column_blocks(t0, t1, stream_block_tiles(rows, int4 ? 1 : 2), [&](int64_t b0, int64_t b1) {
    switch (rows) {
      case 1: return stream_a16_r<1>(p, xa, g0, g1, b0, b1, acc, part);
      case 2: return stream_a16_r<2>(p, xa, g0, g1, b0, b1, acc, part);
      case 3: return stream_a16_r<3>(p, xa, g0, g1, b0, b1, acc, part);
      case 4: return stream_a16_r<4>(p, xa, g0, g1, b0, b1, acc, part);
      default: return stream_a16_r<0>(p, xa, g0, g1, b0, b1, acc, part);
    }
  });
}

// ---------------------------------------------------------------- blockwise A8 decode
// See Kernels::stream_a8: stream_a16's sweeps with the integer product. A
// "quad" is 4 consecutive k (two packed int4 rows, or four int8 rows): one
// vpdpbusd lane takes the quad's 4 weights of a column (unsigned: q + 8 or
// q ^ 0x80) and the token's 4 activation integers.
constexpr int kMaxStreamRowsA8 = 16;
// Quads per sweep: 4 packed int4 rows (2 quads) for one row of x, as
// stream_a16's; 8 weight rows (4 quads of packed int4, 2 of int8) for more,
// as stream_a16's sweeps with more than one row (measured W4A8 g128, one
// thread, CPU time, 4 quads against 2: M=4 1.10x from L3 and 1.15x from
// DRAM at 2048x2560; at M=1 1.06x from L3 but 0.89x from DRAM at
// 5632x2048; int8 with 4 quads lost 5%); the wide form (R = 0) sweeps as
// many k as stream_a16's (kWidePairs k-pairs), for the same reason.
constexpr int64_t stream_quads(int rows, int bits) {
  return rows == 0 ? kWidePairs / 2 : (bits == 4 && rows > 1 ? 4 : 2);
}

struct QuadUnpacker {  // 64 columns of one quad -> 4 x u8[4] (dword lanes, column order)
  __m512i idx[4], pick02, split[4];
  QuadUnpacker() {
    dword_pick_tables({0, 1, 0, 1}, split);  // int4_split's: bytes (a, b, a, b)[16cb+i]
    dword_pick_tables({0, 0, 1, 1}, idx);    // bytes (a, a, b, b)[16cb+i]
    alignas(64) int8_t t[64];  // per dword: bytes 0 and 2 into bytes 0 and 1, zeros above
    for (int i = 0; i < 64; i += 4) {
      t[i] = static_cast<int8_t>(i & 15);
      t[i + 1] = static_cast<int8_t>((i & 15) + 2);
      t[i + 2] = t[i + 3] = -1;
    }
    pick02 = _mm512_load_si512(t);
  }
  // Packed rows a (k-pair 2s) and b (k-pair 2s+1; mask mb 0: zeros): byte 0 of
  // a lane is a's low nibble, byte 1 its high nibble, bytes 2-3 b's; + 8 each.
  void int4(const uint8_t* a, const uint8_t* b, __mmask64 m, __mmask64 mb, __m512i w[4]) const {
    const __m512i va = _mm512_maskz_loadu_epi8(m, a);
    const __m512i vb = _mm512_maskz_loadu_epi8(mb, b);
    for (int cb = 0; cb < 4; ++cb) {
      const __m512i q = _mm512_permutex2var_epi8(va, idx[cb], vb);
      // Odd bytes: the byte's high nibble, brought down by a 16-bit shift.
      const __m512i odd = _mm512_srli_epi16(q, 4);
      // sel = mask ? odd : q (bytes 1 and 3 from odd), then (sel & 0x0f) ^ 0x08.
      const __m512i sel = _mm512_ternarylogic_epi32(_mm512_set1_epi32(0xff00ff00), odd, q, 0xca);
      w[cb] = _mm512_ternarylogic_epi32(sel, _mm512_set1_epi8(0x0f), _mm512_set1_epi8(0x08), 0x6a);
    }
  }
  // int4's nibbles in the lane order (a low, b low, a high, b high), i.e. the
  // quad's features 0, 2, 1, 3 (the x integers are reordered to match:
  // split_order): one shuffle, one variable shift (word 0 by 0, word 1 by 4)
  // and one ternary operation per 16 columns, where int4 takes four. The
  // integer sums are exact, so the order of the products changes nothing.
  void int4_split(const uint8_t* a, const uint8_t* b, __mmask64 m, __mmask64 mb, __m512i w[4]) const {
    const __m512i va = _mm512_maskz_loadu_epi8(m, a);
    const __m512i vb = _mm512_maskz_loadu_epi8(mb, b);
    const __m512i shifts = _mm512_set1_epi32(4 << 16);
    for (int cb = 0; cb < 4; ++cb) {
      const __m512i q = _mm512_srlv_epi16(_mm512_permutex2var_epi8(va, split[cb], vb), shifts);
      w[cb] = _mm512_ternarylogic_epi32(q, _mm512_set1_epi8(0x0f), _mm512_set1_epi8(0x08), 0x6a);
    }
  }
  // The quad's 4 x integers (k order, little-endian) in int4_split's order: 0, 2, 1, 3.
  static int32_t split_order(int32_t x) {
    const uint32_t u = static_cast<uint32_t>(x);
    return static_cast<int32_t>((u & 0xff0000ffu) | ((u & 0x0000ff00u) << 8) | ((u & 0x00ff0000u) >> 8));
  }
  // int8 rows r, r + N, r + 2N, r + 3N (row j loaded where bit j of `real` is
  // set, else zeros): lane bytes r0, r1, r2, r3 of the column, ^ 0x80.
  void int8(const uint8_t* r, int64_t N, __mmask64 m, int real, __m512i w[4]) const {
    __m512i v[4];
    for (int j = 0; j < 4; ++j) v[j] = _mm512_maskz_loadu_epi8((real >> j) & 1 ? m : 0, r + j * N);
    for (int cb = 0; cb < 4; ++cb) {
      const __m512i p01 = _mm512_permutex2var_epi8(v[0], idx[cb], v[1]);  // r0 r0 r1 r1
      const __m512i p23 = _mm512_permutex2var_epi8(v[2], idx[cb], v[3]);  // r2 r2 r3 r3
      const __m512i lo = _mm512_shuffle_epi8(p01, pick02);                // r0 r1 0 0
      const __m512i hi = _mm512_slli_epi32(_mm512_shuffle_epi8(p23, pick02), 16);  // 0 0 r2 r3
      w[cb] = _mm512_ternarylogic_epi32(lo, hi, _mm512_set1_epi8(static_cast<char>(0x80)),
                                        0x56);  // (lo | hi) ^ 0x80
    }
  }
};

// Groups [g0, g1) of the columns of tiles [t0, t1) into part[m][N] (as
// stream_a16_t): part = sum over the groups of fin_a8's arithmetic,
// x_scale * scale * (acc - bias * sum xq) - zero_point * x_scale * sum xq.
// R: rows of x (M) when at most kRegisterRows, 0 for the wide form.
template <int R, int BITS>
void stream_a8_t(const Problem& p, const XA8& xa, int64_t g0, int64_t g1, int64_t t0,
                 int64_t t1, int32_t* acc, float* part) {
  const QuadUnpacker unpack;
  constexpr int64_t kStreamQuads = stream_quads(R, BITS);
  const int rows = R > 0 ? R : static_cast<int>(p.M);
  const int64_t N = p.N, tiles = (N + kNR - 1) / kNR, quads = xa.Gp / 4;
  // Weight rows (N bytes each) per quad, and real rows in a group.
  constexpr int64_t rows_per_quad = BITS == 4 ? 2 : 4;
  const int64_t group_rows = BITS == 4 ? p.G / 2 : p.G;
  const int32_t bias = BITS == 4 ? 8 : 128;
  const __mmask64 last_mask = mask64(N - (tiles - 1) * kNR);
  const int64_t block_bytes = t1 == tiles ? N - t0 * kNR : (t1 - t0) * kNR;
  const int64_t block_lines = (block_bytes + 63) / 64;
  const int64_t sweep_lines = kStreamQuads * rows_per_quad * block_lines;
  const int64_t lines_per_tile = (sweep_lines + (t1 - t0) - 1) / (t1 - t0);
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* wg = p.w + g * group_rows * N;
    const float* sg = p.scale + g * N;
    const float* zg = p.has_zp ? p.zp + g * N : nullptr;
    for (int64_t s0 = 0; s0 < quads; s0 += kStreamQuads) {
      const int64_t ns = quads - s0 < kStreamQuads ? quads - s0 : kStreamQuads;
      const int64_t row0 = s0 * rows_per_quad;  // the sweep's first weight row in the group
      const char* next = reinterpret_cast<const char*>(
          wg + (row0 + kStreamAhead * kStreamQuads * rows_per_quad) * N + t0 * kNR);
      const int8_t* xs = xa.xq + g * xa.Gp + 4 * s0;
      const bool first = s0 == 0, last = s0 + ns == quads;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * kNR;
        // Register form: this tile's share of a later sweep's lines. (The
        // wide form prefetches a few tiles ahead in its own sweep instead.)
        if constexpr (R > 0) {
          const int64_t la = (t - t0) * lines_per_tile;
          prefetch_sweep_lines(next, N, block_lines, la,
                               la + lines_per_tile < sweep_lines ? la + lines_per_tile : sweep_lines);
        }
        const __mmask64 m = t + 1 == tiles ? last_mask : ~0ull;
        int32_t* a = acc + (t - t0) * rows * kNR;
        const auto unpack_step = [&](int64_t s, __m512i w[4]) __attribute__((always_inline)) {
          const int64_t row = row0 + s * rows_per_quad;  // within the group
          const uint8_t* src = wg + row * N + n0;
          if constexpr (BITS == 4 && R > 0) {  // the register form: x in split order below
            unpack.int4_split(src, src + N, m, row + 1 < group_rows ? m : 0, w);
          } else if constexpr (BITS == 4) {
            unpack.int4(src, src + N, m, row + 1 < group_rows ? m : 0, w);
          } else {
            const int64_t real = group_rows - row;  // rows of the quad inside the group
            unpack.int8(src, N, m, real >= 4 ? 15 : (1 << real) - 1, w);
          }
        };
        if constexpr (R == 0) {  // wide: unpack the sweep once, then every row group
          alignas(64) __m512i wb[kStreamQuads][4];
          unpack_sweep(wb, ns, unpack_step,
                       SweepCursor(next, N, block_lines, (t - t0) * lines_per_tile),
                       lines_per_tile, sweep_lines);
          if (first && last) {  // the whole group in one sweep: fused epilogue
            const FusedEpilogue ep{part + n0, N, p.groups, sg + n0, zg ? zg + n0 : nullptr,
                                   nullptr, xa.xs + g, xa.xzs + g, xa.sq + g, bias,
                                   static_cast<int>(N - n0 < kNR ? N - n0 : kNR), g == g0,
                                   nullptr};
            sweep_all_rows<true>(rows, a, xs, xa.Kp, wb[0], ns, true, &ep);
            continue;
          }
          sweep_all_rows<true>(rows, a, xs, xa.Kp, wb[0], ns, first, nullptr);
        } else {
          __m512i c[R][4];
          for (int r = 0; r < R; ++r)
            for (int cb = 0; cb < 4; ++cb)
              c[r][cb] = first ? _mm512_setzero_si512() : _mm512_load_si512(a + r * kNR + 16 * cb);
          const auto step = [&](int64_t s) __attribute__((always_inline)) {
            __m512i w[4];
            unpack_step(s, w);
            for (int r = 0; r < R; ++r) {
              const int32_t xq = load_i32(xs + r * xa.Kp + 4 * s);
              const __m512i xr = _mm512_set1_epi32(BITS == 4 ? QuadUnpacker::split_order(xq) : xq);
              for (int cb = 0; cb < 4; ++cb) c[r][cb] = _mm512_dpbusd_epi32(c[r][cb], w[cb], xr);
            }
          };
          if (ns == kStreamQuads) {  // a constant trip count: unrolled, so tiles overlap
#pragma GCC unroll 8
            for (int64_t s = 0; s < kStreamQuads; ++s) step(s);
          } else {
            for (int64_t s = 0; s < ns; ++s) step(s);
          }
          for (int r = 0; r < R; ++r)
            for (int cb = 0; cb < 4; ++cb) _mm512_store_si512(a + r * kNR + 16 * cb, c[r][cb]);
        }
        if (!last) continue;
        // The group's last sweep: fin_a8's arithmetic (from L1), into the slice's part.
        for (int cb = 0; cb < 4; ++cb) {
          const __mmask16 mc = tail_mask(static_cast<int>(N - n0 - 16 * cb));
          const __m512 sv = _mm512_maskz_loadu_ps(mc, sg + n0 + 16 * cb);
          const __m512 zv = zg ? _mm512_maskz_loadu_ps(mc, zg + n0 + 16 * cb) : _mm512_setzero_ps();
          for (int r = 0; r < rows; ++r) {
            const int64_t i = r * p.groups + g;
            const __m512i ai = _mm512_sub_epi32(_mm512_load_si512(a + r * kNR + 16 * cb),
                                                _mm512_set1_epi32(bias * xa.sq[i]));
            __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(ai), _mm512_mul_ps(_mm512_set1_ps(xa.xs[i]), sv));
            if (zg) v = _mm512_fnmadd_ps(zv, _mm512_set1_ps(xa.xzs[i]), v);
            float* o = part + r * N + n0 + 16 * cb;
            _mm512_mask_storeu_ps(o, mc, g == g0 ? v : _mm512_add_ps(_mm512_maskz_loadu_ps(mc, o), v));
          }
        }
      }
    }
  }
}

void stream_a8(const Problem& p, const XA8& xa, int64_t g0, int64_t g1, int64_t t0, int64_t t1,
               int32_t* acc, float* part) {
  const bool int4 = p.bits == 4;
  in_column_blocks(t0, t1, stream_block_tiles(p.M, int4 ? 1 : 2), [&](int64_t b0, int64_t b1) {
    switch (p.M) {
      case 1: return int4 ? stream_a8_t<1, 4>(p, xa, g0, g1, b0, b1, acc, part) : stream_a8_t<1, 8>(p, xa, g0, g1, b0, b1, acc, part);
      case 2: return int4 ? stream_a8_t<2, 4>(p, xa, g0, g1, b0, b1, acc, part) : stream_a8_t<2, 8>(p, xa, g0, g1, b0, b1, acc, part);
      case 3: return int4 ? stream_a8_t<3, 4>(p, xa, g0, g1, b0, b1, acc, part) : stream_a8_t<3, 8>(p, xa, g0, g1, b0, b1, acc, part);
      case 4: return int4 ? stream_a8_t<4, 4>(p, xa, g0, g1, b0, b1, acc, part) : stream_a8_t<4, 8>(p, xa, g0, g1, b0, b1, acc, part);
      default: return int4 ? stream_a8_t<0, 4>(p, xa, g0, g1, b0, b1, acc, part) : stream_a8_t<0, 8>(p, xa, g0, g1, b0, b1, acc, part);
    }
  });
}

// y[:, tiles t0..t1) = rowexp * sum over the slices' partial sums, in slice order.
void sum_slices(const Problem& p, const float* rowexp, const float* parts, int64_t slices,
                int64_t t0, int64_t t1) {
  alignas(64) float out[kMaxStreamRows * kNR];
  const int64_t N = p.N;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * kNR;
    const int ncols = tile_cols(N, n0);
    for (int64_t m = 0; m < p.M; ++m)
      for (int cb = 0; cb < 4; ++cb) {
        const __mmask16 mc = tail_mask(ncols - 16 * cb);
        const float* src = parts + m * N + n0 + 16 * cb;
        __m512 v = _mm512_maskz_loadu_ps(mc, src);
        for (int64_t sl = 1; sl < slices; ++sl)
          v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mc, src + sl * p.M * N));
        _mm512_store_ps(out + m * kNR + 16 * cb, v);
      }
    store(p, rowexp, n0, ncols, out);
  }
}

}  // namespace

#if XQK_PREFETCH_INTO_L1
const Kernels& avx512_l1_kernels() {
#else
const Kernels& avx512_kernels() {
#endif
  static const Kernels k = [] {
    Kernels t = generic_kernels();
    t.prep_a16 = prep_a16;
    t.prep_a8 = prep_a8;
    t.prep_a8f = prep_a8f;
    t.pack_a16 = pack_a16;
    t.pack_a8 = pack_a8;
    t.mk_a16 = mk_a16;
    t.mk_a8 = mk_a8;
    t.fin_a16 = fin_a16;
    t.fin_a8 = fin_a8;
    t.store = store;
    t.mk_a16_fused = mk_a16_fused;
    t.max_dot_rows = kMaxDotRows;
    t.max_stream_rows = kMaxStreamRows;
    t.stream_register_rows = kRegisterRows;
    t.stream_a16 = stream_a16;
    t.max_stream_rows_a8 = kMaxStreamRowsA8;
    t.stream_a8 = stream_a8;
    t.sum_slices = sum_slices;
    t.dot_prep_a16 = dot_prep_a16;
    t.dot_a16 = dot_a16;
    t.dot_prep_a8 = dot_prep_a8;
    t.dot_a8 = dot_a8;
    return t;
  }();
  return k;
}

}  // namespace xqk
