// Group epilogues shared by the AVX-512 and AMX kernels (included only by
// files compiled with AVX-512; internal linkage, so no baseline code can
// link to them).
#pragma once

#include <immintrin.h>

namespace xqk {
namespace {

// fin_a8's arithmetic for 16 columns: a = the int32 sums minus bias * sum(xq),
// sx = x_scale * s; out = (out +) a * sx (- z * x_scale * sum(xq)). Each
// rounding is spelled out (an FMA where there is no zero point), so that the
// AVX-512 panel path and AMX give the same bits whatever the compiler would
// contract on its own.
inline __m512 a8_epilogue(__m512i a, __m512 sx, bool has_z, __m512 zv, float xzs, bool init,
                          const float* o) {
  const __m512 f = _mm512_cvtepi32_ps(a);
  if (!has_z) return init ? _mm512_mul_ps(f, sx) : _mm512_fmadd_ps(f, sx, _mm512_loadu_ps(o));
  const __m512 v = _mm512_fnmadd_ps(zv, _mm512_set1_ps(xzs), _mm512_mul_ps(f, sx));
  return init ? v : _mm512_add_ps(_mm512_loadu_ps(o), v);
}

}  // namespace
}  // namespace xqk
