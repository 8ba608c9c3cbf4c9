// AVX-512 kernels (F/BW/VL/DQ + BF16 + VNNI): compiled with those flags, called
// only when cpu_features() reports them. No C++ library templates in here (see
// CMakeLists.txt); everything has internal linkage.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "qmm.h"

namespace xqk {
namespace {

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

// ---------------------------------------------------------------- microkernels
// acc[r][0:64] (+)= sum_s dpbf16(broadcast x[r][2s:2s+2], panel[s][0:64]).
template <int MR>
void mk_a16_t(const uint16_t* x, int64_t ldx, const uint32_t* panel, int64_t steps,
              float* acc, bool init) {
  __m512 c[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j)
      c[r][j] = init ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + r * kNR + 16 * j);
  for (int64_t s = 0; s < steps; ++s) {
    const uint32_t* pb = panel + s * kNR;
    const __m512bh b0 = as_bh(_mm512_load_si512(pb)), b1 = as_bh(_mm512_load_si512(pb + 16)),
                   b2 = as_bh(_mm512_load_si512(pb + 32)), b3 = as_bh(_mm512_load_si512(pb + 48));
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = as_bh(_mm512_set1_epi32(load_i32(x + r * ldx + 2 * s)));
      c[r][0] = _mm512_dpbf16_ps(c[r][0], a, b0);
      c[r][1] = _mm512_dpbf16_ps(c[r][1], a, b1);
      c[r][2] = _mm512_dpbf16_ps(c[r][2], a, b2);
      c[r][3] = _mm512_dpbf16_ps(c[r][3], a, b3);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(acc + r * kNR + 16 * j, c[r][j]);
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

// acc[r][0:64] (+)= sum_s dpbusd(panel[s] as u8, broadcast x[r][4s:4s+4] as s8).
template <int MR>
void mk_a8_t(const int8_t* x, int64_t ldx, const uint32_t* panel, int64_t steps,
             int32_t* acc, bool init) {
  __m512i c[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j)
      c[r][j] = init ? _mm512_setzero_si512() : _mm512_loadu_si512(acc + r * kNR + 16 * j);
  for (int64_t s = 0; s < steps; ++s) {
    const uint32_t* pb = panel + s * kNR;
    const __m512i b0 = _mm512_load_si512(pb), b1 = _mm512_load_si512(pb + 16),
                  b2 = _mm512_load_si512(pb + 32), b3 = _mm512_load_si512(pb + 48);
    for (int r = 0; r < MR; ++r) {
      const __m512i a = _mm512_set1_epi32(load_i32(x + r * ldx + 4 * s));
      c[r][0] = _mm512_dpbusd_epi32(c[r][0], b0, a);
      c[r][1] = _mm512_dpbusd_epi32(c[r][1], b1, a);
      c[r][2] = _mm512_dpbusd_epi32(c[r][2], b2, a);
      c[r][3] = _mm512_dpbusd_epi32(c[r][3], b3, a);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) _mm512_storeu_si512(acc + r * kNR + 16 * j, c[r][j]);
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
  for (int j = 0; j < 4; ++j) {
    const __mmask16 mask = tail_mask(ncols - 16 * j);
    if (!mask) break;
    const __m512 sv = _mm512_maskz_loadu_ps(mask, s + 16 * j);
    const __m512 zv = z ? _mm512_maskz_loadu_ps(mask, z + 16 * j) : _mm512_setzero_ps();
    for (int64_t m = 0; m < p.M; ++m) {
      const float* a = acc + (m * xa.T) * kNR + 16 * j;
      __m512 sum = _mm512_loadu_ps(a);
      for (int t = 1; t < xa.T; ++t) sum = _mm512_add_ps(sum, _mm512_loadu_ps(a + t * kNR));
      __m512 v = _mm512_mul_ps(sv, sum);
      if (z) v = _mm512_fnmadd_ps(zv, _mm512_set1_ps(xa.xsum[m * p.groups + g]), v);
      float* o = out + m * kNR + 16 * j;
      _mm512_storeu_ps(o, init ? v : _mm512_add_ps(_mm512_loadu_ps(o), v));
    }
  }
}

void fin_a8(const Problem& p, const XA8& xa, int64_t g, int64_t n0, int ncols,
            const int32_t* acc, float* out, bool init) {
  const float* s = p.scale + (p.blockwise ? g * p.N : 0) + n0;
  const float* z = p.has_zp ? p.zp + (p.blockwise ? g * p.N : 0) + n0 : nullptr;
  const int32_t bias = p.bits == 8 ? 128 : 8;
  for (int j = 0; j < 4; ++j) {
    const __mmask16 mask = tail_mask(ncols - 16 * j);
    if (!mask) break;
    const __m512 sv = _mm512_maskz_loadu_ps(mask, s + 16 * j);
    const __m512 zv = z ? _mm512_maskz_loadu_ps(mask, z + 16 * j) : _mm512_setzero_ps();
    for (int64_t m = 0; m < p.M; ++m) {
      const int64_t i = m * p.groups + g;
      const __m512i a = _mm512_sub_epi32(_mm512_loadu_si512(acc + m * kNR + 16 * j),
                                         _mm512_set1_epi32(bias * xa.sq[i]));
      __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_mul_ps(_mm512_set1_ps(xa.xs[i]), sv));
      if (z) v = _mm512_fnmadd_ps(zv, _mm512_set1_ps(xa.xzs[i]), v);
      float* o = out + m * kNR + 16 * j;
      _mm512_storeu_ps(o, init ? v : _mm512_add_ps(_mm512_loadu_ps(o), v));
    }
  }
}

// float32 -> bf16 bits, round to nearest even, NaN kept (no flush to zero).
inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x400000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
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

}  // namespace

const Kernels& avx512_kernels() {
  static const Kernels k = [] {
    Kernels t = generic_kernels();
    t.mk_a16 = mk_a16;
    t.mk_a8 = mk_a8;
    t.fin_a16 = fin_a16;
    t.fin_a8 = fin_a8;
    t.store = store;
    return t;
  }();
  return k;
}

}  // namespace xqk
