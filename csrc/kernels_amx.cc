// AMX microkernels (Intel Sapphire Rapids and later) for the panel path: the
// products of many rows of x with one panel, on the tile matrix unit.
//
// The panel path's layouts are already AMX's (qmm.h): a panel is [steps][kNR]
// dwords, each a pair of bf16 (A16) or a quad of biased uint8 (A8) along k,
// so 16 steps x 16 columns of it (64-byte rows, 256-byte stride) is a B tile
// as TDPBF16PS / TDPBSUD read it; 16 rows of x x 16 steps (64 bytes of each
// row, stride ldx) is an A tile. Each call:
//   acc[r][0:kNR] (= if init, else +=) sum_s x[r][step s] . panel[s][0:kNR]
// for r < rows, rows a multiple of 16 (the driver gives the rest to the
// AVX-512 microkernels). Tiles: C0-C3 the accumulators of two 16-row blocks
// by two 16-column blocks (one half of the panel's 64 columns at a time),
// A0-A1 the two row blocks of x, B0-B1 the two column blocks of the panel.
// The steps past the last multiple of 16 (a group of 40 features: 20 steps,
// 4 of them left) run after the main pass with a tile configuration of that
// depth, adding into acc. The blockwise forms (fused_a16 / fused_a8) run
// every group of a panel for a block of rows and scale its sums on L1; the
// driver folds scales that keep q * s exact in bf16 into the panel (scale_panel).
//
// Arithmetic: A8 sums are exact int32 (wrapping as VPDPBUSD does), the same
// bits as the AVX-512 microkernel. A16: each bf16 x bf16 product is exact in
// float32 and is added to the float32 sum in step order, with denormals
// flushed as VDPBF16PS does (x is scaled so that none of its terms is
// subnormal: XA16); the tile unit adds a pair's two products in another
// association than VDPBF16PS, so sums may differ from the AVX-512 set's in
// their float32 rounding (tested: within one unit of the output's last
// place).
//
// Compiled with -mamx-tile/-mamx-bf16/-mamx-int8 (and the AVX-512 flags) and
// only called after amx_in_use() (cpu_features.cc) has checked CPUID, XCR0
// and obtained the kernel's permission for the tile data state. Built with
// XQK_NO_AMX (a compiler without AMX) it holds no kernels.
#include "qmm.h"

#ifdef XQK_NO_AMX
namespace xqk {
const AmxKernels& amx_kernels() {
  static const AmxKernels k{nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  return k;
}
}  // namespace xqk
#else
#include <immintrin.h>

#include <cstring>

#include "epilogue_avx512.h"

namespace xqk {
namespace {

// The 64-byte operand of LDTILECFG (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tile registers (macros: the intrinsics paste the number into the instruction).
#define kC0 0
#define kC1 1
#define kC2 2
#define kC3 3
#define kA0 4
#define kA1 5
#define kB0 6
#define kB1 7

// Every tile for a depth of `depth` steps (1..16, 4 bytes each). Loaded on
// every call: other code on this thread (oneDNN under torch) may have loaded
// its own configuration since the last one.
void configure(int depth) {
  TileConfig c;
  std::memset(&c, 0, sizeof(c));
  c.palette_id = 1;
  for (int t = kC0; t <= kC3; ++t) c.rows[t] = 16, c.colsb[t] = 64;
  for (int t = kA0; t <= kA1; ++t) c.rows[t] = 16, c.colsb[t] = static_cast<uint16_t>(4 * depth);
  for (int t = kB0; t <= kB1; ++t) c.rows[t] = static_cast<uint8_t>(depth), c.colsb[t] = 64;
  // GCC 12 does not count LDTILECFG as reading c: built at -O3 into a small
  // harness, the stores above were dropped and the first tile instruction
  // raised SIGILL. The barrier keeps them.
  asm volatile("" : : "r"(&c) : "memory");
  _tile_loadconfig(&c);
}

// The C tiles of 16 rows (two: 32) x 32 columns: zeroed, or loaded from /
// stored to rows of 4-byte sums `stride` bytes apart.
inline void zero_c(bool two) {
  _tile_zero(kC0);
  _tile_zero(kC1);
  if (two) {
    _tile_zero(kC2);
    _tile_zero(kC3);
  }
}
inline void load_c(bool two, const char* c, int64_t stride) {
  _tile_loadd(kC0, c, stride);
  _tile_loadd(kC1, c + 64, stride);
  if (two) {
    _tile_loadd(kC2, c + 16 * stride, stride);
    _tile_loadd(kC3, c + 16 * stride + 64, stride);
  }
}
inline void store_c(bool two, char* c, int64_t stride) {
  _tile_stored(kC0, c, stride);
  _tile_stored(kC1, c + 64, stride);
  if (two) {
    _tile_stored(kC2, c + 16 * stride, stride);
    _tile_stored(kC3, c + 16 * stride + 64, stride);
  }
}

// One block of steps: C0-C1 (+)= A0 . B0-B1 and, with two, C2-C3 (+)= A1 .
// B0-B1, A0 / A1 x's rows from xr / xr + 16 rows, B0-B1 the panel's 32
// columns at b (kInt8 as pass).
template <bool kInt8>
inline void dp_block(bool two, const char* xr, int64_t x_stride, const char* b) {
  constexpr int64_t kPanelStride = kNR * 4;
  _tile_loadd(kB0, b, kPanelStride);
  _tile_loadd(kB1, b + 64, kPanelStride);
  _tile_loadd(kA0, xr, x_stride);
  if constexpr (kInt8) {
    _tile_dpbsud(kC0, kA0, kB0);
    _tile_dpbsud(kC1, kA0, kB1);
  } else {
    _tile_dpbf16ps(kC0, kA0, kB0);
    _tile_dpbf16ps(kC1, kA0, kB1);
  }
  if (two) {
    _tile_loadd(kA1, xr + 16 * x_stride, x_stride);
    if constexpr (kInt8) {
      _tile_dpbsud(kC2, kA1, kB0);
      _tile_dpbsud(kC3, kA1, kB1);
    } else {
      _tile_dpbf16ps(kC2, kA1, kB0);
      _tile_dpbf16ps(kC3, kA1, kB1);
    }
  }
}

// One pass over steps [s0, s1) in blocks of `depth` (s1 - s0 a multiple of
// it) for every row block and column half. kInt8: x int8 (4 per step) and
// int32 sums; else x bf16 (2 per step) and float32 sums; a step is 4 bytes
// of x either way, and acc rows are kNR elements of 4 bytes.
template <bool kInt8>
void pass(int64_t rows, const char* x, int64_t ldx_bytes, const uint32_t* panel, int64_t s0,
          int64_t s1, int depth, char* acc, bool init) {
  constexpr int64_t kAccStride = kNR * 4;  // bytes
  for (int64_t r = 0; r < rows; r += 32) {
    const bool two = rows - r >= 32;
    const char* xr = x + r * ldx_bytes;
    for (int half = 0; half < 2; ++half) {
      char* a = acc + r * kAccStride + half * 32 * 4;  // columns 32*half .. +32
      if (init) {
        zero_c(two);
      } else {
        load_c(two, a, kAccStride);
      }
      for (int64_t s = s0; s < s1; s += depth) {
        dp_block<kInt8>(two, xr + 4 * s, ldx_bytes,
                        reinterpret_cast<const char*>(panel + s * kNR + 32 * half));
      }
      store_c(two, a, kAccStride);
    }
  }
}

template <bool kInt8>
void mk_rows(int64_t rows, const char* x, int64_t ldx_bytes, const uint32_t* panel,
             int64_t steps, char* acc, bool init) {
  const int64_t main = steps / 16 * 16;
  if (main > 0) {
    configure(16);
    pass<kInt8>(rows, x, ldx_bytes, panel, 0, main, 16, acc, init);
  }
  if (steps > main) {
    configure(static_cast<int>(steps - main));
    pass<kInt8>(rows, x, ldx_bytes, panel, main, steps, static_cast<int>(steps - main), acc,
                init && main == 0);
  }
  _tile_release();
}

// 16-column masks of the first ncols columns of a 64-column tile.
inline __mmask16 tail_mask(int n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}

// One group's product for a block of 16 (two: 32) rows of x, all 64 columns,
// into cbuf [32][kNR] (4-byte sums; kInt8 as mk_rows). The configuration of
// depth `depth` is loaded; steps is a multiple of it.
template <bool kInt8>
void group_tiles(bool two, const char* xr, int64_t ldx_bytes, const uint32_t* pg, int64_t steps,
                 int depth, void* cbuf) {
  constexpr int64_t kStride = kNR * 4;  // bytes: C buffer rows
  for (int half = 0; half < 2; ++half) {
    zero_c(two);
    for (int64_t st = 0; st < steps; st += depth) {
      dp_block<kInt8>(two, xr + 4 * st, ldx_bytes,
                      reinterpret_cast<const char*>(pg + st * kNR + 32 * half));
    }
    store_c(two, static_cast<char*>(cbuf) + half * 32 * 4, kStride);
  }
}

// The blockwise A16 form for T == 1 (AmxKernels::fused_a16): row blocks
// outer, groups inner, each group's product in the C tiles, stored to a small
// buffer and scaled into out's rows while both are in L1.
void amx_fused_a16(int64_t rows, int64_t groups, const uint16_t* x, int64_t ldx,
                   int64_t x_group_stride, const uint32_t* panel, int64_t steps, const float* s,
                   const float* z, int64_t sz_group_stride, const float* xsum, const float* xgs,
                   int64_t xsum_stride, int ncols, float* out, bool init_out) {
  alignas(64) float cbuf[32 * kNR];
  const int depth = static_cast<int>(steps < 16 ? steps : 16);
  configure(depth);
  for (int64_t r = 0; r < rows; r += 32) {
    const bool two = rows - r >= 32;
    const int nr = two ? 32 : 16;
    for (int64_t gi = 0; gi < groups; ++gi) {
      group_tiles<false>(two, reinterpret_cast<const char*>(x + r * ldx + gi * x_group_stride),
                         ldx * 2, panel + gi * steps * kNR, steps, depth, cbuf);
      // fin_a16's arithmetic: out = (out +) s * (xgs *) acc (- z * xsum), one FMA each.
      const bool init = init_out && gi == 0;
      const float* sg = s + gi * sz_group_stride;
      const float* zg = z ? z + gi * sz_group_stride : nullptr;
      for (int j = 0; j < 4; ++j) {
        const __mmask16 mask = tail_mask(ncols - 16 * j);
        if (!mask) break;
        const __m512 sv = _mm512_maskz_loadu_ps(mask, sg + 16 * j);
        const __m512 zv = zg ? _mm512_maskz_loadu_ps(mask, zg + 16 * j) : _mm512_setzero_ps();
        for (int i = 0; i < nr; ++i) {
          const int64_t xi = (r + i) * xsum_stride + gi;
          __m512 sum = _mm512_load_ps(cbuf + i * kNR + 16 * j);
          if (xgs) sum = _mm512_mul_ps(sum, _mm512_set1_ps(xgs[xi]));
          float* o = out + (r + i) * kNR + 16 * j;
          __m512 v = init ? _mm512_mul_ps(sv, sum) : _mm512_fmadd_ps(sv, sum, _mm512_loadu_ps(o));
          if (zg) v = _mm512_fnmadd_ps(zv, _mm512_set1_ps(xsum[xi]), v);
          _mm512_storeu_ps(o, v);
        }
      }
    }
  }
  _tile_release();
}

// The blockwise integer A8 form (AmxKernels::fused_a8): fused_a16's loops,
// fin_a8's arithmetic, a8_epilogue (the same bits: the int32 sums are exact).
void amx_fused_a8(int64_t rows, int64_t groups, const int8_t* x, int64_t ldx,
                  int64_t x_group_stride, const uint32_t* panel, int64_t steps, const float* s,
                  const float* z, int64_t sz_group_stride, const int32_t* sq, const float* xs,
                  const float* xzs, int64_t x_stats_stride, int32_t bias, int ncols, float* out,
                  bool init_out) {
  alignas(64) int32_t cbuf[32 * kNR];
  const int depth = static_cast<int>(steps < 16 ? steps : 16);
  configure(depth);
  for (int64_t r = 0; r < rows; r += 32) {
    const bool two = rows - r >= 32;
    const int nr = two ? 32 : 16;
    for (int64_t gi = 0; gi < groups; ++gi) {
      group_tiles<true>(two, reinterpret_cast<const char*>(x + r * ldx + gi * x_group_stride),
                        ldx, panel + gi * steps * kNR, steps, depth, cbuf);
      const bool init = init_out && gi == 0;
      const float* sg = s + gi * sz_group_stride;
      const float* zg = z ? z + gi * sz_group_stride : nullptr;
      for (int j = 0; j < 4; ++j) {
        const __mmask16 mask = tail_mask(ncols - 16 * j);
        if (!mask) break;
        const __m512 sv = _mm512_maskz_loadu_ps(mask, sg + 16 * j);
        const __m512 zv = zg ? _mm512_maskz_loadu_ps(mask, zg + 16 * j) : _mm512_setzero_ps();
        for (int i = 0; i < nr; ++i) {
          const int64_t xi = (r + i) * x_stats_stride + gi;
          const __m512i a = _mm512_sub_epi32(_mm512_load_si512(cbuf + i * kNR + 16 * j),
                                             _mm512_set1_epi32(bias * sq[xi]));
          float* o = out + (r + i) * kNR + 16 * j;
          _mm512_storeu_ps(o, a8_epilogue(a, _mm512_mul_ps(_mm512_set1_ps(xs[xi]), sv),
                                          zg != nullptr, zv, xzs[xi], init, o));
        }
      }
    }
  }
  _tile_release();
}

// AmxKernels::scale_panel: each bf16 of the panel's `steps` rows times its
// column's scale, exactly (the driver chose the scales: fold_tile).
void amx_scale_panel(uint32_t* panel, int64_t steps, const float* s, int ncols) {
  __m512 sv[4];
  for (int j = 0; j < 4; ++j) sv[j] = _mm512_maskz_loadu_ps(tail_mask(ncols - 16 * j), s + 16 * j);
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t st = 0; st < steps; ++st) {
    for (int j = 0; j < 4; ++j) {
      uint32_t* d = panel + st * kNR + 16 * j;
      const __m512i v = _mm512_load_si512(d);
      const __m512 even = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), sv[j]);
      const __m512 odd = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(v, high)), sv[j]);
      _mm512_store_si512(d, _mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(even), 16),
                                            _mm512_and_si512(_mm512_castps_si512(odd), high)));
    }
  }
}

// AmxKernels::fold_scales (qmm.h): 16 columns a vector; the checks as unsigned
// ranges (a zero gives a == r == 0: no deviation, its exponent not checked).
uint64_t amx_fold_scales(const float* s, int64_t stride, int64_t groups, const float* inv,
                         int ncols, int bits, float* t) {
  const uint32_t drop = 23 - bits;
  const __m512i half = _mm512_set1_epi32(static_cast<int>(1u << (drop - 1)));
  const __m512i keep = _mm512_set1_epi32(static_cast<int>(~((1u << drop) - 1)));
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF), sign = _mm512_set1_epi32(INT32_MIN);
  const __m512i ulps = _mm512_set1_epi32(kFoldUlps), span = _mm512_set1_epi32(2 * kFoldUlps);
  const __m512i low = _mm512_set1_epi32(static_cast<int>(kFoldExpLow << 23));
  const __m512i width = _mm512_set1_epi32(
      static_cast<int>(((kFoldExpHigh - kFoldExpLow) << 23) | 0x7FFFFF));
  __m512 iv[4];
  __mmask16 m[4];
  for (int j = 0; j < 4; ++j) {
    m[j] = tail_mask(ncols - 16 * j);
    iv[j] = _mm512_maskz_loadu_ps(m[j], inv + 16 * j);
  }
  __mmask16 bad[4] = {0, 0, 0, 0};
  for (int64_t g = 0; g < groups; ++g) {
    for (int j = 0; j < 4; ++j) {
      if (!m[j]) break;
      const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m[j], s + g * stride + 16 * j), iv[j]);
      const __m512i vb = _mm512_castps_si512(v), a = _mm512_and_si512(vb, magnitude);
      const __m512i r = _mm512_and_si512(_mm512_add_epi32(a, half), keep);
      const __mmask16 far = _mm512_cmpgt_epu32_mask(
          _mm512_add_epi32(_mm512_sub_epi32(a, r), ulps), span);
      const __mmask16 out = _mm512_mask_cmpgt_epu32_mask(
          _mm512_test_epi32_mask(a, a), _mm512_sub_epi32(r, low), width);
      bad[j] |= (far | out) & m[j];
      _mm512_store_si512(t + g * kNR + 16 * j,
                         _mm512_or_si512(_mm512_and_si512(vb, sign), r));
    }
  }
  return static_cast<uint64_t>(bad[0]) | static_cast<uint64_t>(bad[1]) << 16 |
         static_cast<uint64_t>(bad[2]) << 32 | static_cast<uint64_t>(bad[3]) << 48;
}

void amx_mk_a16(int64_t rows, const uint16_t* x, int64_t ldx, const uint32_t* panel,
                int64_t steps, float* acc, bool init) {
  mk_rows<false>(rows, reinterpret_cast<const char*>(x), ldx * 2, panel, steps,
                 reinterpret_cast<char*>(acc), init);
}

void amx_mk_a8(int64_t rows, const int8_t* x, int64_t ldx, const uint32_t* panel,
               int64_t steps, int32_t* acc, bool init) {
  mk_rows<true>(rows, reinterpret_cast<const char*>(x), ldx, panel, steps,
                reinterpret_cast<char*>(acc), init);
}

#undef kC0
#undef kC1
#undef kC2
#undef kC3
#undef kA0
#undef kA1
#undef kB0
#undef kB1

}  // namespace

const AmxKernels& amx_kernels() {
  static const AmxKernels k{amx_mk_a16,     amx_mk_a8,       amx_fused_a16,
                            amx_fused_a8,   amx_scale_panel, amx_fold_scales};
  return k;
}

}  // namespace xqk
#endif  // XQK_NO_AMX
