// AVX2 kernels (AVX2 + FMA + F16C: Intel Haswell and later, AMD Zen 1-3),
// for x86-64 CPUs without the AVX-512 set's BF16 / VNNI / VBMI. Without them
// every call ran the portable scalar kernels, 50-200x slower than these.
//
// What is here, for every weight format (int8, int4, fp8, fp4): the panel
// path of qmm.h (weight packers, the A16 and A8 microkernels); the
// per-channel decode in dot-product form (weight rows streamed once, no
// panel); the blockwise decode streamed row by row (float products, and the
// integer A8 product: vpmaddubsw for int4, vpmaddwd for int8). The rest (x
// preparation, epilogues, stores) is kernels_generic.cc compiled again for
// this ISA (included below under another table name).
//
// Numerics: the panel path is bit-identical to the portable kernels (the
// streams too within each group; they add groups per K slice). A16
// products of two bf16 images are exact in float32 (8 x 8 significant
// bits), so an FMA rounds once, as the portable multiply-then-add does, and
// each column sums its pairs in the same order (the pair's odd k first); A8
// sums are exact int32 (vpmaddwd of 16-bit values never saturates). The dot
// form sums K in another order (eight float32 partial sums per row, reduced
// at the end): within float32 rounding of the portable result, like the
// AVX-512 dot form. The file is compiled with -ffp-contract=off so that the
// included portable code rounds as in its own build.
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#define generic_kernels generic_kernels_avx2_build  // kernels_generic.cc's table, this ISA's build
#include "kernels_generic.cc"
#undef generic_kernels

namespace xqk {
namespace {

inline __m256i zero8() { return _mm256_setzero_si256(); }

// Weight values as float32, exactly, through float16: every int4, e2m1 and
// e4m3fn value (scaled by 2^-8) is a float16, and F16C widens 8 of them in one
// instruction. The integer work before it runs on 128-bit registers, which
// Zen 1-2 execute as one operation where a 256-bit one costs two.
//
// The float16 top byte of v, for the values whose float16 low byte is zero
// (at most two mantissa bits: the integers -8..7 and e2m1's values).
constexpr uint8_t f16_top_byte(float v, bool negative) {
  float a = v < 0 ? -v : v;
  if (a == 0) return negative ? 0x80 : 0;
  int e = 15;
  while (a >= 2) a /= 2, ++e;
  while (a < 1) a *= 2, --e;
  return static_cast<uint8_t>((negative ? 0x80 : 0) | (e << 2) | static_cast<int>((a - 1) * 4));
}
struct NibbleTable {
  alignas(16) uint8_t top[16];  // the float16 top byte of each nibble's value
};
constexpr NibbleTable nibble_table(int wf) {
  NibbleTable t{};
  constexpr float e2m1[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  for (int n = 0; n < 16; ++n)
    t.top[n] = wf == kWFp4 ? f16_top_byte(e2m1[n & 7], n >= 8)
                           : f16_top_byte(static_cast<float>(n >= 8 ? n - 16 : n), n >= 8);
  return t;
}
constexpr NibbleTable kInt4Table = nibble_table(kWInt), kFp4Table = nibble_table(kWFp4);

// As float32: the 8 float16 whose top bytes are top's low (lo) or high (hi)
// 8 bytes and whose low bytes are zero.
inline __m256 f16_top_lo_to_f32(__m128i top) {
  return _mm256_cvtph_ps(_mm_unpacklo_epi8(_mm_setzero_si128(), top));
}
inline __m256 f16_top_hi_to_f32(__m128i top) {
  return _mm256_cvtph_ps(_mm_unpackhi_epi8(_mm_setzero_si128(), top));
}
// Bytes of packed nibbles (int4: two's complement; e2m1: sign in bit 3) as the
// float16 top bytes of their low and of their high nibbles' values.
template <int WF>
inline void nibble_tops(__m128i raw, __m128i& lo, __m128i& hi) {
  const __m128i table = _mm_load_si128(reinterpret_cast<const __m128i*>(
      (WF == kWFp4 ? kFp4Table : kInt4Table).top));
  const __m128i mask = _mm_set1_epi8(0x0f);
  lo = _mm_shuffle_epi8(table, _mm_and_si128(raw, mask));
  hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(raw, 4), mask));
}
// 8 bytes of packed nibbles: lo, the low nibbles' values; hi, the high ones'.
template <int WF>
inline void nibbles_to_f32(const uint8_t* src, __m256& lo, __m256& hi) {
  __m128i l, h;
  nibble_tops<WF>(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)), l, h);
  lo = f16_top_lo_to_f32(l);
  hi = f16_top_lo_to_f32(h);
}
// 8 e4m3fn bytes times 2^-8: sign-extended to 16 bits and shifted left by 7,
// a byte's sign lands in bit 15 (and 14, cleared) and its 7 magnitude bits
// in the float16's exponent and top mantissa bits: the value times 2^-8,
// exactly, subnormal codes included (F16C widens float16 subnormals
// exactly). 0x7f / 0xff (all 7 bits set) become all-ones, a float16 NaN.
inline __m256 e4m3_times_2m8_to_f32(const uint8_t* src) {
  const __m128i w = _mm_slli_epi16(
      _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src))), 7);
  const __m128i magnitude = _mm_set1_epi16(0x3f80);
  const __m128i nan = _mm_cmpeq_epi16(_mm_and_si128(w, magnitude), magnitude);
  const __m128i half = _mm_or_si128(_mm_and_si128(w, _mm_set1_epi16(static_cast<short>(0xbfff))), nan);
  return _mm256_cvtph_ps(half);
}
// 8 bytes of an 8-bit weight format (int8 or e4m3fn) as float32.
template <int WF>
inline __m256 bytes_to_f32(const uint8_t* src) {
  if constexpr (WF == kWFp8)
    return _mm256_mul_ps(e4m3_times_2m8_to_f32(src), _mm256_set1_ps(256.0f));  // exact
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
}
// The decode forms (streams, dot forms) multiply e4m3fn values times 2^-8 by
// x times 2^8: the same exact products, without a multiply per 8 weights. x
// there is prepared (prep_a16) as each row over 2^e, |x| < 2 (or the row
// holds inf or NaN and its outputs are not finite anyway), so x * 2^8 cannot
// overflow.
template <int WF>
constexpr float kDecodeXScale = WF == kWFp8 ? 256.0f : 1.0f;
template <int WF>
inline __m256 decode_bytes_to_f32(const uint8_t* src) {
  if constexpr (WF == kWFp8) return e4m3_times_2m8_to_f32(src);
  return bytes_to_f32<WF>(src);
}

// The A16 panel entry (qmm.h) of every byte value of a packed int4 / fp4
// pair, and the bf16 bits of every int8 / e4m3fn byte: the per-channel
// packers' lookups (the portable packer's values).
struct PairTables {
  uint32_t int4_pair[256], fp4_pair[256];
  uint16_t int8_bf16[256], fp8_bf16[256];
  uint16_t int4_biased_pair[256];  // the A8 panel's bytes of a packed pair: nibbles ^ 8
  PairTables() {
    for (int b = 0; b < 256; ++b) {
      const int lo = (b & 0xf) >= 8 ? (b & 0xf) - 16 : (b & 0xf);
      const int hi = (b >> 4) >= 8 ? (b >> 4) - 16 : (b >> 4);
      int4_pair[b] = small_int_to_bf16(lo) | (static_cast<uint32_t>(small_int_to_bf16(hi)) << 16);
      int8_bf16[b] = small_int_to_bf16(static_cast<int8_t>(b));
      fp8_bf16[b] = f32_to_bf16(e4m3_value(static_cast<uint8_t>(b)));
      fp4_pair[b] = f32_to_bf16(e2m1_value(b & 0xf)) |
                    (static_cast<uint32_t>(f32_to_bf16(e2m1_value(b >> 4))) << 16);
      int4_biased_pair[b] = static_cast<uint16_t>(((b & 0xf) ^ 8) | (((b >> 4) ^ 8) << 8));
    }
  }
};
const PairTables& tables() {
  static const PairTables t;
  return t;
}

// ---------------------------------------------------------------- A16 panel

// Columns [c, 64) of a panel row: the portable packer's values (zero beyond N).
inline void pack_a16_tail(const Problem& p, int64_t g, int64_t kk, int64_t n0, int c,
                          uint32_t* dst) {
  for (; c < kNR; ++c)
    dst[c] = weight_bf16_at(p, g, kk, n0 + c) |
             (static_cast<uint32_t>(weight_bf16_at(p, g, kk + 1, n0 + c)) << 16);
}

// A panel row of 8 columns from the pair's values: bf16(lo) | bf16(hi) << 16
// (exact values: the top half of their float32 bits).
inline __m256i bf16_pairs(__m256 lo, __m256 hi) {
  return _mm256_or_si256(_mm256_srli_epi32(_mm256_castps_si256(lo), 16),
                         _mm256_and_si256(_mm256_castps_si256(hi),
                                          _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}

// Blockwise rows [kk0, kk1) of group g, one weight format (BITS 4: nibbles,
// G even; 8: bytes, k and k + 1 rows N apart).
template <int BITS, int WF>
void pack_a16_blockwise(const Problem& p, int64_t g, int64_t kk0, int64_t kk1, int64_t n0,
                        uint32_t* panel) {
  const int64_t steps = (kk1 - kk0) / 2;
  const int full = tile_cols(p.N, n0) / 8 * 8;
  for (int64_t s = 0; s < steps; ++s) {
    uint32_t* dst = panel + s * kNR;
    const int64_t kk = kk0 + 2 * s;
    if (kk >= p.G) {
      std::memset(dst, 0, kNR * 4);
      continue;
    }
    const int64_t k = g * p.G + kk;
    const uint8_t* src = p.w + (BITS == 4 ? k / 2 : k) * p.N + n0;
    for (int c = 0; c < full; c += 8) {
      __m256 lo, hi;
      if constexpr (BITS == 4) {
        nibbles_to_f32<WF>(src + c, lo, hi);
      } else {
        lo = bytes_to_f32<WF>(src + c);
        hi = kk + 1 < p.G ? bytes_to_f32<WF>(src + p.N + c) : _mm256_setzero_ps();
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), bf16_pairs(lo, hi));
    }
    pack_a16_tail(p, g, kk, n0, full, dst);
  }
}

void pack_a16_avx2(const Problem& p, int64_t g, int64_t kk0, int64_t kk1, int64_t n0,
                   uint32_t* panel) {
  const int64_t steps = (kk1 - kk0) / 2;
  const int ncols = tile_cols(p.N, n0);
  if (!p.blockwise) {  // [N, K] / [N, K/2]: one weight row per column, by table
    const PairTables& t = tables();
    const uint32_t* pair4 = p.wf == kWFp4 ? t.fp4_pair : t.int4_pair;
    const uint16_t* byte8 = p.wf == kWFp8 ? t.fp8_bf16 : t.int8_bf16;
    for (int c = 0; c < ncols; ++c) {
      const int64_t n = n0 + c;
      if (p.bits == 4) {  // packed nibbles need an even K: a pair is one byte
        const uint8_t* row = p.w + n * (p.K / 2);
        for (int64_t s = 0; s < steps; ++s) {
          const int64_t kk = kk0 + 2 * s;
          panel[s * kNR + c] = kk < p.K ? pair4[row[kk / 2]] : 0;
        }
      } else {
        const uint8_t* row = p.w + n * p.K;
        for (int64_t s = 0; s < steps; ++s) {
          const int64_t kk = kk0 + 2 * s;
          const uint32_t lo = kk < p.K ? byte8[row[kk]] : 0;
          const uint32_t hi = kk + 1 < p.K ? byte8[row[kk + 1]] : 0;
          panel[s * kNR + c] = lo | (hi << 16);
        }
      }
    }
    for (int64_t s = 0; s < steps; ++s)
      for (int c = ncols; c < kNR; ++c) panel[s * kNR + c] = 0;
    return;
  }
  if (p.wf == kWFp8) return pack_a16_blockwise<8, kWFp8>(p, g, kk0, kk1, n0, panel);
  if (p.wf == kWFp4) return pack_a16_blockwise<4, kWFp4>(p, g, kk0, kk1, n0, panel);
  if (p.bits == 4) return pack_a16_blockwise<4, kWInt>(p, g, kk0, kk1, n0, panel);
  return pack_a16_blockwise<8, kWInt>(p, g, kk0, kk1, n0, panel);
}

// acc[r][32 columns from cb] for R rows (R <= 2: 8 accumulators, 4 x values
// and the unpacked pair in 16 registers).
template <int R>
inline void mk_a16_block(const uint16_t* x, int64_t ldx, const uint32_t* panel, int64_t steps,
                         float* acc, bool init, int cb) {
  __m256 c[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j)
      c[r][j] = init ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + r * kNR + cb + 8 * j);
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t s = 0; s < steps; ++s) {
    __m256 xl[R], xh[R];
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      std::memcpy(&pair, x + r * ldx + 2 * s, 4);
      xl[r] = _mm256_set1_ps(bits_to_f32(pair << 16));
      xh[r] = _mm256_set1_ps(bits_to_f32(pair & 0xffff0000u));
    }
    const uint32_t* w = panel + s * kNR + cb;
    for (int j = 0; j < 4; ++j) {
      const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 8 * j));
      const __m256 wl = _mm256_castsi256_ps(_mm256_slli_epi32(d, 16));
      const __m256 wh = _mm256_castsi256_ps(_mm256_and_si256(d, high));
      for (int r = 0; r < R; ++r) {  // the odd k first, as the portable kernel
        c[r][j] = _mm256_fmadd_ps(xh[r], wh, c[r][j]);
        c[r][j] = _mm256_fmadd_ps(xl[r], wl, c[r][j]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(acc + r * kNR + cb + 8 * j, c[r][j]);
}

void mk_a16_avx2(int mr, const uint16_t* x, int64_t ldx, const uint32_t* panel, int64_t steps,
                 float* acc, bool init) {
  for (int r0 = 0; r0 < mr; r0 += 2) {
    for (int cb = 0; cb < kNR; cb += 32) {
      if (mr - r0 >= 2) {
        mk_a16_block<2>(x + r0 * ldx, ldx, panel, steps, acc + r0 * kNR, init, cb);
      } else {
        mk_a16_block<1>(x + r0 * ldx, ldx, panel, steps, acc + r0 * kNR, init, cb);
      }
    }
  }
}

// ----------------------------------------------------------------- A8 panel

void pack_a8_avx2(const Problem& p, int64_t g, int64_t kk0, int64_t kk1, int64_t n0,
                  uint32_t* panel) {
  if (p.wf != kWInt) return pack_a8(p, g, kk0, kk1, n0, panel);
  const int64_t steps = (kk1 - kk0) / 4;
  const int ncols = tile_cols(p.N, n0);
  const PairTables& t = tables();
  // q + bias as a byte: int8 q + 128 = q ^ 0x80; a nibble's q + 8 = nibble ^ 8.
  const auto biased = [&](int64_t k, int64_t n) -> uint32_t {
    if (p.bits == 8) {
      const uint8_t b = p.blockwise ? p.w[k * p.N + n] : p.w[n * p.K + k];
      return b ^ 0x80u;
    }
    const uint8_t b = p.blockwise ? p.w[(k / 2) * p.N + n] : p.w[n * (p.K / 2) + k / 2];
    return ((k & 1) ? (b >> 4) : (b & 0xf)) ^ 8u;
  };
  // One dword the slow way: columns past N and k past the group are zero.
  const auto quad = [&](int64_t s, int c) -> uint32_t {
    uint32_t d = 0;
    if (c < ncols)
      for (int j = 0; j < 4; ++j) {
        const int64_t kk = kk0 + 4 * s + j;
        if (kk < p.G) d |= biased(g * p.G + kk, n0 + c) << (8 * j);
      }
    return d;
  };
  if (!p.blockwise) {  // a column's 4 k are contiguous in its weight row
    for (int c = 0; c < kNR; ++c)
      for (int64_t s = 0; s < steps; ++s) {
        const int64_t kk = kk0 + 4 * s;
        uint32_t d;
        if (c >= ncols || kk + 4 > p.K) {
          d = quad(s, c);
        } else if (p.bits == 8) {
          std::memcpy(&d, p.w + (n0 + c) * p.K + kk, 4);
          d ^= 0x80808080u;
        } else {  // kk is even (4 s): two whole bytes
          const uint8_t* row = p.w + (n0 + c) * (p.K / 2) + kk / 2;
          d = t.int4_biased_pair[row[0]] | (static_cast<uint32_t>(t.int4_biased_pair[row[1]]) << 16);
        }
        panel[s * kNR + c] = d;
      }
    return;
  }
  const int full = ncols / 8 * 8;
  for (int64_t s = 0; s < steps; ++s) {
    uint32_t* dst = panel + s * kNR;
    const int64_t kk = kk0 + 4 * s;
    int c = 0;
    if (kk + 4 <= p.G) {  // four rows of the group (k even: G is even for packed int4)
      const int64_t k = g * p.G + kk;
      if (p.bits == 4) {
        const uint8_t* r01 = p.w + (k / 2) * p.N + n0;  // k, k + 1
        const uint8_t* r23 = r01 + p.N;                  // k + 2, k + 3
        const __m256i lo = _mm256_set1_epi32(0xf), hi = _mm256_set1_epi32(0xf0);
        for (; c < full; c += 8) {
          const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r01 + c)));
          const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r23 + c)));
          const __m256i pa = _mm256_or_si256(_mm256_and_si256(a, lo), _mm256_slli_epi32(_mm256_and_si256(a, hi), 4));
          const __m256i pb = _mm256_or_si256(_mm256_and_si256(b, lo), _mm256_slli_epi32(_mm256_and_si256(b, hi), 4));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c),
                              _mm256_xor_si256(_mm256_or_si256(pa, _mm256_slli_epi32(pb, 16)),
                                               _mm256_set1_epi32(0x08080808)));
        }
      } else {
        const uint8_t* r0 = p.w + k * p.N + n0;
        for (; c < full; c += 8) {
          __m256i d = zero8();
          for (int j = 0; j < 4; ++j)
            d = _mm256_or_si256(d, _mm256_slli_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                                    reinterpret_cast<const __m128i*>(r0 + j * p.N + c))), 8 * j));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c),
                              _mm256_xor_si256(d, _mm256_set1_epi32(static_cast<int>(0x80808080u))));
        }
      }
    }
    for (; c < kNR; ++c) dst[c] = quad(s, c);
  }
}

// The integer form: 16-bit pairs (bytes 0 and 2, bytes 1 and 3 of each
// panel dword) times the matching pairs of x with vpmaddwd.
template <int R>
inline void mk_a8_block(const int8_t* x, int64_t ldx, const uint32_t* panel, int64_t steps,
                        int32_t* acc, bool init, int cb) {
  __m256i c[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j)
      c[r][j] = init ? zero8()
                     : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + r * kNR + cb + 8 * j));
  const __m256i bytes02 = _mm256_set1_epi32(0x00ff00ff);
  for (int64_t s = 0; s < steps; ++s) {
    __m256i x02[R], x13[R];
    for (int r = 0; r < R; ++r) {
      const int8_t* xr = x + r * ldx + 4 * s;
      const uint32_t e = static_cast<uint16_t>(xr[0]) | (static_cast<uint32_t>(static_cast<uint16_t>(xr[2])) << 16);
      const uint32_t o = static_cast<uint16_t>(xr[1]) | (static_cast<uint32_t>(static_cast<uint16_t>(xr[3])) << 16);
      x02[r] = _mm256_set1_epi32(static_cast<int>(e));
      x13[r] = _mm256_set1_epi32(static_cast<int>(o));
    }
    const uint32_t* w = panel + s * kNR + cb;
    for (int j = 0; j < 4; ++j) {
      const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 8 * j));
      const __m256i w02 = _mm256_and_si256(d, bytes02);
      const __m256i w13 = _mm256_and_si256(_mm256_srli_epi32(d, 8), bytes02);
      for (int r = 0; r < R; ++r)
        c[r][j] = _mm256_add_epi32(c[r][j], _mm256_add_epi32(_mm256_madd_epi16(w02, x02[r]),
                                                             _mm256_madd_epi16(w13, x13[r])));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + r * kNR + cb + 8 * j), c[r][j]);
}

void mk_a8_avx2(int mr, const int8_t* x, int64_t ldx, const uint32_t* panel, int64_t steps,
                int32_t* acc, bool init) {
  for (int r0 = 0; r0 < mr; r0 += 2) {
    for (int cb = 0; cb < kNR; cb += 32) {
      if (mr - r0 >= 2) {
        mk_a8_block<2>(x + r0 * ldx, ldx, panel, steps, acc + r0 * kNR, init, cb);
      } else {
        mk_a8_block<1>(x + r0 * ldx, ldx, panel, steps, acc + r0 * kNR, init, cb);
      }
    }
  }
}

// ----------------------------------------------------- per-channel A16 decode

// Rows of x (R = M*T) up to which the per-channel A16 decode takes the dot form.
constexpr int kDotRows = 4;

// fn(std::integral_constant<int, R>) for R = rows (1..kDotRows).
template <class Fn>
inline void with_rows_dot(int rows, const Fn& fn) {
  switch (rows) {
    case 1: return fn(std::integral_constant<int, 1>());
    case 2: return fn(std::integral_constant<int, 2>());
    case 3: return fn(std::integral_constant<int, 3>());
    default: return fn(std::integral_constant<int, 4>());
  }
}

// Whether xd holds each 32 k as evens then odds (packed int4 / fp4 weights,
// unpacked by nibble); else k in order.
inline bool dot_deinterleaved(const Problem& p) { return p.bits == 4; }
// The k that xd holds at position j (the preparations), and the position of k
// (the dot forms' tails): within each 32, evens then odds where deinterleaved.
inline int64_t xd_source(bool deinterleaved, int64_t j) {
  if (!deinterleaved) return j;
  const int64_t base = j / 32 * 32, i = j % 32;
  return base + (i < 16 ? 2 * i : 2 * (i - 16) + 1);
}
inline int64_t xd_position(bool deinterleaved, int64_t k) {
  if (!deinterleaved) return k;
  const int64_t base = k / 32 * 32, i = k % 32;
  return base + (i % 2 == 0 ? i / 2 : 16 + i / 2);
}


// xd [R][Kq]: x's bf16 rows in the order the weight unpacking yields k: as
// they are for 8-bit weights; for packed nibbles (int4, fp4), within each 32 k
// the 16 even k (low nibbles) then the 16 odd k. Zero beyond Kp.
// rows x [Kp] -> xd rows x [Kq] in xd's order (both dot forms' preparation).
template <class T>
void reorder_for_dot(const Problem& p, const T* x, int64_t rows, int64_t Kp, T* xd, int64_t Kq) {
  const bool deinterleaved = dot_deinterleaved(p);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < Kq; ++k) {
      const int64_t from = xd_source(deinterleaved, k);
      xd[r * Kq + k] = from < Kp ? x[r * Kp + from] : 0;
    }
}

void dot_prep_a16_avx2(const Problem& p, const XA16& xa, uint16_t* xd, int64_t Kq) {
  reorder_for_dot(p, xa.xb, p.M * xa.T, xa.Kp, xd, Kq);
}

// The weight rows [n, n + 4) a dot form reads (the last valid one repeated
// where W < 4); returns the k it covers with whole vectors (K % 32 or K % 16
// are left to its scalar tail).
inline int64_t dot_weight_rows(const Problem& p, int bits, int64_t n, int W, const uint8_t* (&rows)[4]) {
  const int64_t row_bytes = bits == 4 ? p.K / 2 : p.K;
  for (int w = 0; w < 4; ++w) rows[w] = p.w + (n + (w < W ? w : 0)) * row_bytes;
  return bits == 4 ? p.K / 32 * 32 : p.K / 16 * 16;
}

inline __m256 bf16x8_to_f32(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Weight rows [n, n + 4) (W of them valid) times the R rows of xd: sums[r][w].
template <int R, int BITS, int WF>
void dot_rows(const Problem& p, const uint16_t* xd, int64_t Kq, int64_t n, int W,
              float (*sums)[4]) {
  __m256 a[R][4];
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < 4; ++w) a[r][w] = _mm256_setzero_ps();
  const uint8_t* rows[4];
  const int64_t kfull = dot_weight_rows(p, BITS, n, W, rows);
  for (int64_t k = 0; k < kfull; k += BITS == 4 ? 32 : 16) {
    __m256 x0[R], x1[R], x2[R], x3[R];
    for (int r = 0; r < R; ++r) {
      const uint16_t* xr = xd + r * Kq + k;
      x0[r] = bf16x8_to_f32(xr);
      x1[r] = bf16x8_to_f32(xr + 8);
      if constexpr (BITS == 4) {
        x2[r] = bf16x8_to_f32(xr + 16);
        x3[r] = bf16x8_to_f32(xr + 24);
      } else if constexpr (kDecodeXScale<WF> != 1.0f) {
        x0[r] = _mm256_mul_ps(x0[r], _mm256_set1_ps(kDecodeXScale<WF>));
        x1[r] = _mm256_mul_ps(x1[r], _mm256_set1_ps(kDecodeXScale<WF>));
      }
    }
    for (int w = 0; w < 4; ++w) {
      if constexpr (BITS == 4) {
        __m128i lt, ht;
        nibble_tops<WF>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[w] + k / 2)), lt, ht);
        const __m256 l0 = f16_top_lo_to_f32(lt), l1 = f16_top_hi_to_f32(lt);
        const __m256 h0 = f16_top_lo_to_f32(ht), h1 = f16_top_hi_to_f32(ht);
        for (int r = 0; r < R; ++r) {
          a[r][w] = _mm256_fmadd_ps(x0[r], l0, a[r][w]);
          a[r][w] = _mm256_fmadd_ps(x1[r], l1, a[r][w]);
          a[r][w] = _mm256_fmadd_ps(x2[r], h0, a[r][w]);
          a[r][w] = _mm256_fmadd_ps(x3[r], h1, a[r][w]);
        }
      } else {
        const __m256 w0 = decode_bytes_to_f32<WF>(rows[w] + k), w1 = decode_bytes_to_f32<WF>(rows[w] + k + 8);
        for (int r = 0; r < R; ++r) {
          a[r][w] = _mm256_fmadd_ps(x0[r], w0, a[r][w]);
          a[r][w] = _mm256_fmadd_ps(x1[r], w1, a[r][w]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < 4; ++w) sums[r][w] = hsum(a[r][w]);
  // The last K % 32 (4 bits) / K % 16 (8 bits) k, in xd's order.
  for (int64_t k = kfull; k < p.K; ++k) {
    const int64_t at = xd_position(BITS == 4, k);
    for (int w = 0; w < W; ++w) {
      const float q = bf16_to_f32(weight_bf16_at(p, 0, k, n + w));
      for (int r = 0; r < R; ++r) sums[r][w] += bf16_to_f32(xd[r * Kq + at]) * q;
    }
  }
}

// out[m][c] for the tile's columns: s * sum_t (the row's T terms) (- z * xsum),
// as fin_a16 with one group (per-channel float products: rowexp is x_scale).
void dot_a16_avx2(const Problem& p, const XA16& xa, const uint16_t* xd, int64_t Kq, int64_t n0,
                  int ncols, float* out) {
  const int R = static_cast<int>(p.M * xa.T);
  for (int c = 0; c < ncols; c += 4) {
    const int W = ncols - c < 4 ? ncols - c : 4;
    float sums[kDotRows][4];
    with_rows_dot(R, [&](auto rr) {
      constexpr int RR = decltype(rr)::value;
      if (p.wf == kWFp8) {
        dot_rows<RR, 8, kWFp8>(p, xd, Kq, n0 + c, W, sums);
      } else if (p.wf == kWFp4) {
        dot_rows<RR, 4, kWFp4>(p, xd, Kq, n0 + c, W, sums);
      } else if (p.bits == 4) {
        dot_rows<RR, 4, kWInt>(p, xd, Kq, n0 + c, W, sums);
      } else {
        dot_rows<RR, 8, kWInt>(p, xd, Kq, n0 + c, W, sums);
      }
    });
    for (int64_t m = 0; m < p.M; ++m)
      for (int w = 0; w < W; ++w) {
        float a = sums[m * xa.T][w];
        for (int t = 1; t < xa.T; ++t) a += sums[m * xa.T + t][w];
        float v = p.scale[n0 + c + w] * a;
        if (p.has_zp) v -= p.zp[n0 + c + w] * xa.xsum[m];
        out[m * kNR + c + w] = v;
      }
  }
}


// ------------------------------------------------------ per-channel A8 decode

// xd [M][Kq]: x's int8 rows in dot_prep_a16's order (packed int4: each 32 k
// as 16 even then 16 odd), zero beyond Kp.
void dot_prep_a8_avx2(const Problem& p, const XA8& xa, int8_t* xd, int64_t Kq) {
  reorder_for_dot(p, xa.xq, p.M, xa.Kp, xd, Kq);
}

// Weight rows [n, n + 4) (W valid) times the R rows of xd: exact int32 sums
// of q * x (vpmaddwd of 16-bit values).
template <int R, int BITS>
void dot_rows_a8(const Problem& p, const int8_t* xd, int64_t Kq, int64_t n, int W,
                 int32_t (*sums)[4]) {
  __m256i a[R][4];
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < 4; ++w) a[r][w] = zero8();
  const uint8_t* rows[4];
  const int64_t kfull = dot_weight_rows(p, BITS, n, W, rows);
  const __m128i nib = _mm_set1_epi8(0xf);
  const __m256i eight = _mm256_set1_epi16(8);
  for (int64_t k = 0; k < kfull; k += BITS == 4 ? 32 : 16) {
    __m256i x0[R], x1[R];
    for (int r = 0; r < R; ++r) {
      x0[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xd + r * Kq + k)));
      if constexpr (BITS == 4)
        x1[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xd + r * Kq + k + 16)));
    }
    for (int w = 0; w < 4; ++w) {
      if constexpr (BITS == 4) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[w] + k / 2));
        // Nibble n's value (n ^ 8) - 8, as 16-bit lanes.
        const __m256i lo = _mm256_sub_epi16(_mm256_xor_si256(_mm256_cvtepu8_epi16(_mm_and_si128(b, nib)), eight), eight);
        const __m256i hi = _mm256_sub_epi16(
            _mm256_xor_si256(_mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), nib)), eight), eight);
        for (int r = 0; r < R; ++r)
          a[r][w] = _mm256_add_epi32(a[r][w], _mm256_add_epi32(_mm256_madd_epi16(lo, x0[r]),
                                                               _mm256_madd_epi16(hi, x1[r])));
      } else {
        const __m256i q = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[w] + k)));
        for (int r = 0; r < R; ++r) a[r][w] = _mm256_add_epi32(a[r][w], _mm256_madd_epi16(q, x0[r]));
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < 4; ++w) {
      __m128i v = _mm_add_epi32(_mm256_castsi256_si128(a[r][w]), _mm256_extracti128_si256(a[r][w], 1));
      v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0x4e));
      v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0xb1));
      sums[r][w] = _mm_cvtsi128_si32(v);
    }
  for (int64_t k = kfull; k < p.K; ++k) {  // the last K % 32 / K % 16, in xd's order
    const int64_t at = xd_position(BITS == 4, k);
    for (int w = 0; w < W; ++w) {
      int q;
      if (BITS == 4) {
        const uint8_t b = rows[w][k / 2];
        const int nb = (k & 1) ? (b >> 4) : (b & 0xf);
        q = nb >= 8 ? nb - 16 : nb;
      } else {
        q = static_cast<int8_t>(rows[w][k]);
      }
      for (int r = 0; r < R; ++r) sums[r][w] += q * xd[r * Kq + at];
    }
  }
}

// out[m][c] = float(sum q x) * (x_scale * s) (- z * x_scale * sum xq): fin_a8's
// arithmetic with one group.
void dot_a8_avx2(const Problem& p, const XA8& xa, const int8_t* xd, int64_t Kq, int64_t n0,
                 int ncols, float* out) {
  for (int c = 0; c < ncols; c += 4) {
    const int W = ncols - c < 4 ? ncols - c : 4;
    int32_t sums[kDotRows][4];
    with_rows_dot(static_cast<int>(p.M), [&](auto rr) {
      constexpr int RR = decltype(rr)::value;
      if (p.bits == 4) {
        dot_rows_a8<RR, 4>(p, xd, Kq, n0 + c, W, sums);
      } else {
        dot_rows_a8<RR, 8>(p, xd, Kq, n0 + c, W, sums);
      }
    });
    for (int64_t m = 0; m < p.M; ++m)
      for (int w = 0; w < W; ++w) {
        float v = static_cast<float>(sums[m][w]) * (xa.xs[m] * p.scale[n0 + c + w]);
        if (p.has_zp) v -= p.zp[n0 + c + w] * xa.xzs[m];
        out[m * kNR + c + w] = v;
      }
  }
}

// ------------------------------------------------------ blockwise A16 decode

// Rows of x (R = M*T) up to which the blockwise A16 decode streams (the
// driver's K slices and column blocks, qmm.h): each slice's weight rows are
// read once, in address order, SP k-pairs at a time across the block's
// columns, the accumulators kept in L1/L2 between sweeps. The panel path
// instead reads a 64-byte strip of every row per tile: on a Zen 1 that was
// latency-bound at ~1 GB/s. 8 k-pairs a sweep rather than 4: the same at
// M = 1, 12-17% faster at M = 4 (fewer accumulator loads and stores).
constexpr int kStreamRows = 4;
constexpr int64_t kSweepPairs = 8;
// Tiles per column block: the block's accumulators within 64 KiB.
constexpr int64_t sweep_block_tiles(int64_t rows) { return (64 << 10) / (rows * kNR * 4); }

// 8 columns of one k-pair as float32 (e4m3fn: times 2^-8, kDecodeXScale):
// the even k (lo) and the odd k (hi).
template <int BITS, int WF>
inline void unpack8(const uint8_t* src, int64_t row_bytes, bool has_hi, __m256& lo, __m256& hi) {
  if constexpr (BITS == 4) {
    nibbles_to_f32<WF>(src, lo, hi);
  } else {
    lo = decode_bytes_to_f32<WF>(src);
    hi = has_hi ? decode_bytes_to_f32<WF>(src + row_bytes) : _mm256_setzero_ps();
  }
}

// The common sweep: kSweepPairs whole k-pairs (every hi row present) over the
// full 8-column chunks [0, cols) of one tile; x broadcast once per sweep. U
// chunks at a time: each chunk's sums are one chain of dependent FMAs (the
// portable order), so independent chunks side by side keep the FMA units busy.
template <int R, int BITS, int WF, int U>
__attribute__((always_inline)) inline void sweep_chunks(
    const uint8_t* src, int64_t pair_bytes, int64_t row_bytes, const __m256 (&xb)[kSweepPairs][R][2],
    float* a, bool first) {
  __m256 v[U][R];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r)
      v[u][r] = first ? _mm256_setzero_ps() : _mm256_load_ps(a + r * kNR + 8 * u);
  const auto accumulate = [&](int s, int u, __m256 lo, __m256 hi) {
    for (int r = 0; r < R; ++r) {  // the odd k first, as the portable kernel
      v[u][r] = _mm256_fmadd_ps(xb[s][r][0], hi, v[u][r]);
      v[u][r] = _mm256_fmadd_ps(xb[s][r][1], lo, v[u][r]);
    }
  };
#pragma GCC unroll 4
  for (int s = 0; s < kSweepPairs; ++s) {
    if constexpr (BITS == 4 && U % 2 == 0 && R <= 2) {
      // Two chunks' 16 bytes share one load and one nibble split (with more
      // rows the extra live values cost more than they save: M = 4 0.92-0.99x).
      for (int u = 0; u < U; u += 2) {
        __m128i lt, ht;
        nibble_tops<WF>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + s * pair_bytes + 8 * u)),
                        lt, ht);
        accumulate(s, u, f16_top_lo_to_f32(lt), f16_top_lo_to_f32(ht));
        accumulate(s, u + 1, f16_top_hi_to_f32(lt), f16_top_hi_to_f32(ht));
      }
    } else {
      for (int u = 0; u < U; ++u) {
        __m256 lo, hi;
        unpack8<BITS, WF>(src + s * pair_bytes + 8 * u, row_bytes, true, lo, hi);
        accumulate(s, u, lo, hi);
      }
    }
  }
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r) _mm256_store_ps(a + r * kNR + 8 * u, v[u][r]);
}
template <int R, int BITS, int WF>
__attribute__((always_inline)) inline void sweep_full_chunks(
    const uint8_t* src, int64_t pair_bytes, int64_t row_bytes, const __m256 (&xb)[kSweepPairs][R][2],
    int cols, float* a, bool first) {
  constexpr int U = R == 1 ? 4 : 2;
  int c = 0;
  for (; c + 8 * U <= cols; c += 8 * U)
    sweep_chunks<R, BITS, WF, U>(src + c, pair_bytes, row_bytes, xb, a + c, first);
  for (; c < cols; c += 8) sweep_chunks<R, BITS, WF, 1>(src + c, pair_bytes, row_bytes, xb, a + c, first);
}

// Group g's epilogue (fin_a16's arithmetic) for one tile: part[m][n0 + c]
// (= if first, else +=) s * sum_t acc[m*T + t][c] (* xgs) (- z * xsum).
inline void group_epilogue(const Problem& p, const XA16& xa, int64_t g, bool first, const float* a,
                           int64_t n0, int ncols, const float* sg, const float* zg, float* part) {
  for (int c = 0; c < ncols; c += 8) {
    const int nc = ncols - c < 8 ? ncols - c : 8;
    alignas(32) float sv[8] = {}, zv[8] = {}, o[8];
    std::memcpy(sv, sg + n0 + c, nc * 4);
    if (zg) std::memcpy(zv, zg + n0 + c, nc * 4);
    for (int64_t m = 0; m < p.M; ++m) {
      __m256 sum = _mm256_load_ps(a + (m * xa.T) * kNR + c);
      for (int tt = 1; tt < xa.T; ++tt) sum = _mm256_add_ps(sum, _mm256_load_ps(a + (m * xa.T + tt) * kNR + c));
      if (xa.xgs) sum = _mm256_mul_ps(sum, _mm256_set1_ps(xa.xgs[m * p.groups + g]));
      __m256 y = _mm256_mul_ps(_mm256_load_ps(sv), sum);
      if (zg)
        y = _mm256_sub_ps(y, _mm256_mul_ps(_mm256_load_ps(zv), _mm256_set1_ps(xa.xsum[m * p.groups + g])));
      float* dst = part + m * p.N + n0 + c;
      if (nc == 8) {
        if (!first) y = _mm256_add_ps(_mm256_loadu_ps(dst), y);
        _mm256_storeu_ps(dst, y);
        continue;
      }
      if (!first) {
        std::memcpy(o, dst, nc * 4);
        y = _mm256_add_ps(_mm256_load_ps(o), y);
      }
      _mm256_store_ps(o, y);
      std::memcpy(dst, o, nc * 4);
    }
  }
}

// Groups [g0, g1), tiles [t0, t1) of one weight format (BITS 4: int4 / fp4
// nibbles; 8: int8 / fp8 bytes) into part [M][N] (stream_a16's contract,
// qmm.h); acc: [t1 - t0][R][kNR].
template <int R, int BITS, int WF>
void stream_a16_rows(const Problem& p, const XA16& xa, int64_t g0, int64_t g1, int64_t t0,
                     int64_t t1, float* acc, float* part) {
  const int64_t N = p.N, pairs = xa.Gp / 2;
  const int64_t pair_bytes = BITS == 4 ? N : 2 * N;  // one k-pair's weight bytes
  const int64_t row_bytes = N;                        // 8 bits: k and k + 1 are rows N apart
  alignas(32) float xf[kSweepPairs][R][2];  // the sweep's x pairs as float32 (odd, even)
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* wg = p.w + (BITS == 4 ? (g * p.G) / 2 : g * p.G) * N;
    const float* sg = p.scale + g * N;
    const float* zg = p.has_zp ? p.zp + g * N : nullptr;
    for (int64_t s0 = 0; s0 < pairs; s0 += kSweepPairs) {
      const int64_t ns = pairs - s0 < kSweepPairs ? pairs - s0 : kSweepPairs;
      const bool first = s0 == 0, last = s0 + ns == pairs;
      for (int64_t s = 0; s < ns; ++s)
        for (int r = 0; r < R; ++r) {
          uint32_t pr;
          std::memcpy(&pr, xa.xb + r * xa.Kp + g * xa.Gp + 2 * (s0 + s), 4);
          xf[s][r][0] = bits_to_f32(pr & 0xffff0000u) * kDecodeXScale<WF>;  // exact
          xf[s][r][1] = bits_to_f32(pr << 16) * kDecodeXScale<WF>;
        }
      // The common sweep: every pair whole (an int8 group of odd G lacks its
      // last hi row).
      const bool fast = ns == kSweepPairs && (BITS == 4 || !last || p.G % 2 == 0);
      __m256 xb[kSweepPairs][R][2];
      for (int64_t s = 0; s < ns; ++s)
        for (int r = 0; r < R; ++r)
          for (int h = 0; h < 2; ++h) xb[s][r][h] = _mm256_set1_ps(xf[s][r][h]);
      const uint8_t* ws = wg + s0 * pair_bytes;
      // This sweep's rows two sweeps on (the hardware prefetchers see one
      // stream per row, and four rows of strided lines each sweep).
      const uint8_t* ahead = ws + 2 * kSweepPairs * pair_bytes;
      const bool fetch = s0 + 3 * kSweepPairs <= pairs;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * kNR;
        const int ncols = tile_cols(N, n0);
        if (fetch)
          for (int64_t s = 0; s < kSweepPairs * (BITS == 4 ? 1 : 2); ++s)
            _mm_prefetch(reinterpret_cast<const char*>(ahead + s * row_bytes + n0), _MM_HINT_T0);
        float* a = acc + (t - t0) * R * kNR;
        const int full = fast ? ncols / 8 * 8 : 0;
        if (full) sweep_full_chunks<R, BITS, WF>(ws + n0, pair_bytes, row_bytes, xb, full, a, first);
        for (int c = full; c < ncols; c += 8) {  // the rest: N's last columns, short sweeps
          __m256 v[R];
          for (int r = 0; r < R; ++r)
            v[r] = first ? _mm256_setzero_ps() : _mm256_load_ps(a + r * kNR + c);
          for (int64_t s = 0; s < ns; ++s) {
            const int64_t kk = 2 * (s0 + s);
            const uint8_t* src = ws + s * pair_bytes + n0 + c;
            __m256 lo, hi;
            if (ncols - c < 8) {  // through a zero-padded copy
              alignas(16) uint8_t tmp[2][16] = {};
              std::memcpy(tmp[0], src, ncols - c);
              if (BITS == 8 && kk + 1 < p.G) std::memcpy(tmp[1], src + row_bytes, ncols - c);
              unpack8<BITS, WF>(tmp[0], 16, kk + 1 < p.G, lo, hi);
            } else {
              unpack8<BITS, WF>(src, row_bytes, kk + 1 < p.G, lo, hi);
            }
            for (int r = 0; r < R; ++r) {  // the odd k first, as the portable kernel
              v[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(&xf[s][r][0]), hi, v[r]);
              v[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(&xf[s][r][1]), lo, v[r]);
            }
          }
          for (int r = 0; r < R; ++r) _mm256_store_ps(a + r * kNR + c, v[r]);
        }
        if (last) group_epilogue(p, xa, g, g == g0, a, n0, ncols, sg, zg, part);
      }
    }
  }
}

// fn(b0, b1) for the column blocks of tiles [t0, t1) the streams take one at a time.
template <class Fn>
inline void in_sweep_blocks(int64_t t0, int64_t t1, int rows, const Fn& fn) {
  for (int64_t b0 = t0; b0 < t1; b0 += sweep_block_tiles(rows))
    fn(b0, b0 + sweep_block_tiles(rows) < t1 ? b0 + sweep_block_tiles(rows) : t1);
}

void stream_a16_avx2(const Problem& p, const XA16& xa, int64_t g0, int64_t g1, int64_t t0,
                     int64_t t1, float* acc, float* part) {
  const int rows = static_cast<int>(p.M * xa.T);
  in_sweep_blocks(t0, t1, rows, [&](int64_t b0, int64_t b1) {
    with_rows_dot(rows, [&](auto rr) {
      constexpr int RR = decltype(rr)::value;
      if (p.wf == kWFp8) {
        stream_a16_rows<RR, 8, kWFp8>(p, xa, g0, g1, b0, b1, acc, part);
      } else if (p.wf == kWFp4) {
        stream_a16_rows<RR, 4, kWFp4>(p, xa, g0, g1, b0, b1, acc, part);
      } else if (p.bits == 4) {
        stream_a16_rows<RR, 4, kWInt>(p, xa, g0, g1, b0, b1, acc, part);
      } else {
        stream_a16_rows<RR, 8, kWInt>(p, xa, g0, g1, b0, b1, acc, part);
      }
    });
  });
}

// ------------------------------------------------------- blockwise A8 decode

// Blockwise decode with the integer A8 product. Packed int4 weights (W4A8):
// bytes of (q + 8) and of x multiplied pairwise by vpmaddubsw (each k-pair of
// a column as adjacent bytes), exact int16 sums over a sweep of kA8SweepPairs
// k-pairs (at most 15 * 127 * 2 * 8 = 30480 < 2^15), widened into int32 per
// column; the 8 * sum x of the bias comes off in fin_a8's arithmetic. Int8
// weights (W8A8) would overflow vpmaddubsw's int16 (255 * 127 * 2): their two
// rows of a k-pair are interleaved and sign-extended to 16 bits for vpmaddwd,
// whose int32 sums never overflow (no bias).
constexpr int64_t kA8SweepPairs = 8;

// x_k and x_{k+1} of each k-pair of the sweep (pairs s0 .. s0 + ns of group
// g), row by row, as one lane of the multiply's x operand: Pair int16_t holds
// them as bytes (vpmaddubsw's signed operand), int32_t as sign-extended
// 16-bit halves (vpmaddwd's).
template <class Pair, int R>
inline void pack_x_pairs(const XA8& xa, int64_t g, int64_t s0, int64_t ns,
                         Pair (&xp)[kA8SweepPairs][R]) {
  static_assert(std::is_same_v<Pair, int16_t> || std::is_same_v<Pair, int32_t>);
  using Half = std::conditional_t<sizeof(Pair) == 2, int8_t, int16_t>;
  using UPair = std::make_unsigned_t<Pair>;
  const auto half = [](int8_t v) {
    return static_cast<UPair>(static_cast<std::make_unsigned_t<Half>>(static_cast<Half>(v)));
  };
  for (int64_t s = 0; s < ns; ++s)
    for (int r = 0; r < R; ++r) {
      const int8_t* xr = xa.xq + r * xa.Kp + g * xa.Gp + 2 * (s0 + s);
      xp[s][r] = static_cast<Pair>(half(xr[0]) | static_cast<UPair>(half(xr[1]) << (8 * sizeof(Half))));
    }
}

// Group g's epilogue for one tile (fin_a8's arithmetic, into part): a holds
// sum (q + bias) x per row and column.
inline void a8_group_epilogue(const Problem& p, const XA8& xa, int64_t g, bool first_group,
                              const int32_t* a, int64_t n0, int ncols, int32_t bias, float* part) {
  for (int64_t m = 0; m < p.M; ++m) {
    const int64_t i = m * p.groups + g;
    const int32_t comp = bias * xa.sq[i];
    const float* sc = p.scale + g * p.N + n0;
    const float* zc = p.has_zp ? p.zp + g * p.N + n0 : nullptr;
    float* dst = part + m * p.N + n0;
    for (int c = 0; c < ncols; ++c) {
      float v = static_cast<float>(a[m * kNR + c] - comp) * (xa.xs[i] * sc[c]);
      if (zc) v -= zc[c] * xa.xzs[i];
      dst[c] = first_group ? v : dst[c] + v;
    }
  }
}

// Groups [g0, g1), tiles [t0, t1) into part [M][N] (stream_a8's contract,
// qmm.h); acc: [t1 - t0][R][kNR] int32.
template <int R>
void stream_a8_int4_rows(const Problem& p, const XA8& xa, int64_t g0, int64_t g1, int64_t t0, int64_t t1,
                    int32_t* acc, float* part) {
  const int64_t N = p.N, pairs = p.G / 2;
  const __m256i nib = _mm256_set1_epi8(0xf), flip = _mm256_set1_epi8(static_cast<char>(0x88));
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* wg = p.w + (g * p.G / 2) * N;
    for (int64_t s0 = 0; s0 < pairs; s0 += kA8SweepPairs) {
      const int64_t ns = pairs - s0 < kA8SweepPairs ? pairs - s0 : kA8SweepPairs;
      const bool first = s0 == 0, last = s0 + ns == pairs;
      int16_t xp[kA8SweepPairs][R];  // x_k | x_{k+1} << 8 of each pair, as vpmaddubsw's bytes
      pack_x_pairs(xa, g, s0, ns, xp);
      const uint8_t* ws = wg + s0 * N;
      const bool fetch = s0 + 3 * kA8SweepPairs <= pairs;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * kNR;
        const int ncols = tile_cols(N, n0);
        int32_t* a = acc + (t - t0) * R * kNR;
        if (fetch)
          for (int64_t s = 0; s < kA8SweepPairs; ++s)
            _mm_prefetch(reinterpret_cast<const char*>(ws + (2 * kA8SweepPairs + s) * N + n0), _MM_HINT_T0);
        int c = 0;
        for (; c + 32 <= ncols; c += 32) {
          // Columns as vpunpck{l,h}bw leave them: lo = c + {0..7, 16..23}, hi = c + {8..15, 24..31}.
          __m256i lo16[R], hi16[R];
          for (int r = 0; r < R; ++r) lo16[r] = hi16[r] = zero8();
          for (int64_t s = 0; s < ns; ++s) {
            const __m256i b = _mm256_xor_si256(
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws + s * N + n0 + c)), flip);
            const __m256i ue = _mm256_and_si256(b, nib);                        // q_k + 8
            const __m256i uo = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib);  // q_{k+1} + 8
            const __m256i pl = _mm256_unpacklo_epi8(ue, uo), ph = _mm256_unpackhi_epi8(ue, uo);
            for (int r = 0; r < R; ++r) {
              const __m256i xv = _mm256_set1_epi16(xp[s][r]);
              lo16[r] = _mm256_add_epi16(lo16[r], _mm256_maddubs_epi16(pl, xv));
              hi16[r] = _mm256_add_epi16(hi16[r], _mm256_maddubs_epi16(ph, xv));
            }
          }
          for (int r = 0; r < R; ++r) {
            int32_t* ar = a + r * kNR + c;
            const __m256i v[4] = {
                _mm256_cvtepi16_epi32(_mm256_castsi256_si128(lo16[r])),       // c + 0..7
                _mm256_cvtepi16_epi32(_mm256_castsi256_si128(hi16[r])),       // c + 8..15
                _mm256_cvtepi16_epi32(_mm256_extracti128_si256(lo16[r], 1)),  // c + 16..23
                _mm256_cvtepi16_epi32(_mm256_extracti128_si256(hi16[r], 1))};  // c + 24..31
            for (int j = 0; j < 4; ++j) {
              __m256i* dst = reinterpret_cast<__m256i*>(ar + 8 * j);
              _mm256_store_si256(dst, first ? v[j] : _mm256_add_epi32(_mm256_load_si256(dst), v[j]));
            }
          }
        }
        for (; c < ncols; ++c)  // N's last columns, one at a time
          for (int r = 0; r < R; ++r) {
            int32_t sum = first ? 0 : a[r * kNR + c];
            for (int64_t s = 0; s < ns; ++s) {
              const uint8_t b = ws[s * N + n0 + c];
              const int8_t* xr = xa.xq + r * xa.Kp + g * xa.Gp + 2 * (s0 + s);
              sum += static_cast<int32_t>((b & 0xf) ^ 8) * xr[0] + static_cast<int32_t>((b >> 4) ^ 8) * xr[1];
            }
            a[r * kNR + c] = sum;
          }
        if (last) a8_group_epilogue(p, xa, g, g == g0, a, n0, ncols, 8, part);
      }
    }
  }
}

// Int8 weights: groups [g0, g1), tiles [t0, t1) as stream_a8_int4_rows.
template <int R>
void stream_a8_int8_rows(const Problem& p, const XA8& xa, int64_t g0, int64_t g1, int64_t t0,
                         int64_t t1, int32_t* acc, float* part) {
  const int64_t N = p.N, pairs = (p.G + 1) / 2;
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* wg = p.w + g * p.G * N;
    for (int64_t s0 = 0; s0 < pairs; s0 += kA8SweepPairs) {
      const int64_t ns = pairs - s0 < kA8SweepPairs ? pairs - s0 : kA8SweepPairs;
      const bool first = s0 == 0, last = s0 + ns == pairs;
      int32_t xp[kA8SweepPairs][R];  // x_k | x_{k+1} << 16 as 16-bit lanes (vpmaddwd)
      pack_x_pairs(xa, g, s0, ns, xp);
      const uint8_t* ws = wg + 2 * s0 * N;  // row k of the sweep's first pair
      const bool fetch = s0 + 3 * kA8SweepPairs <= pairs;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * kNR;
        const int ncols = tile_cols(N, n0);
        int32_t* a = acc + (t - t0) * R * kNR;
        if (fetch)
          for (int64_t s = 0; s < 2 * kA8SweepPairs; ++s)
            _mm_prefetch(reinterpret_cast<const char*>(ws + (4 * kA8SweepPairs + s) * N + n0), _MM_HINT_T0);
        int c = 0;
        for (; c + 16 <= ncols; c += 16) {
          __m256i v0[R], v1[R];  // columns c + 0..7, c + 8..15
          for (int r = 0; r < R; ++r) {
            v0[r] = first ? zero8() : _mm256_load_si256(reinterpret_cast<const __m256i*>(a + r * kNR + c));
            v1[r] = first ? zero8() : _mm256_load_si256(reinterpret_cast<const __m256i*>(a + r * kNR + c + 8));
          }
          for (int64_t s = 0; s < ns; ++s) {
            const uint8_t* row = ws + 2 * s * N + n0 + c;
            const __m128i k0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row));
            const __m128i k1 = 2 * (s0 + s) + 1 < p.G  // an odd G's last pair has no k + 1
                                   ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + N))
                                   : _mm_setzero_si128();
            const __m256i w0 = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(k0, k1));  // columns 0..7
            const __m256i w1 = _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(k0, k1));  // columns 8..15
            for (int r = 0; r < R; ++r) {
              const __m256i xv = _mm256_set1_epi32(xp[s][r]);
              v0[r] = _mm256_add_epi32(v0[r], _mm256_madd_epi16(w0, xv));
              v1[r] = _mm256_add_epi32(v1[r], _mm256_madd_epi16(w1, xv));
            }
          }
          for (int r = 0; r < R; ++r) {
            _mm256_store_si256(reinterpret_cast<__m256i*>(a + r * kNR + c), v0[r]);
            _mm256_store_si256(reinterpret_cast<__m256i*>(a + r * kNR + c + 8), v1[r]);
          }
        }
        for (; c < ncols; ++c)  // N's last columns, one at a time
          for (int r = 0; r < R; ++r) {
            int32_t sum = first ? 0 : a[r * kNR + c];
            for (int64_t s = 0; s < ns; ++s) {
              const int64_t kk = 2 * (s0 + s);
              const int8_t* xr = xa.xq + r * xa.Kp + g * xa.Gp + kk;
              const int8_t* w = reinterpret_cast<const int8_t*>(ws + 2 * s * N + n0 + c);
              sum += static_cast<int32_t>(w[0]) * xr[0];
              if (kk + 1 < p.G) sum += static_cast<int32_t>(w[N]) * xr[1];
            }
            a[r * kNR + c] = sum;
          }
        if (last) a8_group_epilogue(p, xa, g, g == g0, a, n0, ncols, 0, part);
      }
    }
  }
}

void stream_a8_avx2(const Problem& p, const XA8& xa, int64_t g0, int64_t g1, int64_t t0, int64_t t1,
                    int32_t* acc, float* part) {
  const int rows = static_cast<int>(p.M);
  in_sweep_blocks(t0, t1, rows, [&](int64_t b0, int64_t b1) {
    with_rows_dot(rows, [&](auto rr) {
      if (p.bits == 4) {
        stream_a8_int4_rows<decltype(rr)::value>(p, xa, g0, g1, b0, b1, acc, part);
      } else {
        stream_a8_int8_rows<decltype(rr)::value>(p, xa, g0, g1, b0, b1, acc, part);
      }
    });
  });
}

// ------------------------------------------------------ panel epilogues

// fin_a16 / fin_a8 (qmm.h), 8 columns at a time: the portable arithmetic
// operation for operation (separate multiplies and adds, as its build
// compiles it), so bit-identical; the last ncols % 8 columns by the portable
// code itself. The portable loops do not vectorize (acc, out and the scales
// may alias): at G = 32, M = 128 they took as long as the microkernel.
void fin_a16_avx2(const Problem& p, const XA16& xa, int64_t g, int64_t n0, int ncols,
                  const float* acc, float* out, bool init) {
  const int full = ncols / 8 * 8;
  const float* s = p.scale + (p.blockwise ? g * p.N : 0) + n0;
  const float* z = p.has_zp ? p.zp + (p.blockwise ? g * p.N : 0) + n0 : nullptr;
  for (int64_t m = 0; m < p.M; ++m) {
    const __m256 xsum = _mm256_set1_ps(xa.xsum[m * p.groups + g]);
    const float* am = acc + (m * xa.T) * kNR;
    float* om = out + m * kNR;
    for (int c = 0; c < full; c += 8) {
      __m256 a = _mm256_loadu_ps(am + c);
      for (int t = 1; t < xa.T; ++t) a = _mm256_add_ps(a, _mm256_loadu_ps(am + t * kNR + c));
      if (xa.xgs) a = _mm256_mul_ps(a, _mm256_set1_ps(xa.xgs[m * p.groups + g]));
      __m256 v = _mm256_mul_ps(_mm256_loadu_ps(s + c), a);
      if (z) v = _mm256_sub_ps(v, _mm256_mul_ps(_mm256_loadu_ps(z + c), xsum));
      _mm256_storeu_ps(om + c, init ? v : _mm256_add_ps(_mm256_loadu_ps(om + c), v));
    }
  }
  if (full < ncols) fin_a16(p, xa, g, n0 + full, ncols - full, acc + full, out + full, init);
}

void fin_a8_avx2(const Problem& p, const XA8& xa, int64_t g, int64_t n0, int ncols,
                 const int32_t* acc, float* out, bool init) {
  const int full = ncols / 8 * 8;
  const float* s = p.scale + (p.blockwise ? g * p.N : 0) + n0;
  const float* z = p.has_zp ? p.zp + (p.blockwise ? g * p.N : 0) + n0 : nullptr;
  const int32_t bias = p.bits == 8 ? 128 : 8;
  for (int64_t m = 0; m < p.M; ++m) {
    const int64_t i = m * p.groups + g;
    const __m256i comp = _mm256_set1_epi32(bias * xa.sq[i]);
    const __m256 xs = _mm256_set1_ps(xa.xs[i]), xzs = _mm256_set1_ps(xa.xzs[i]);
    float* om = out + m * kNR;
    for (int c = 0; c < full; c += 8) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + m * kNR + c));
      __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(a, comp)),
                               _mm256_mul_ps(xs, _mm256_loadu_ps(s + c)));
      if (z) v = _mm256_sub_ps(v, _mm256_mul_ps(_mm256_loadu_ps(z + c), xzs));
      _mm256_storeu_ps(om + c, init ? v : _mm256_add_ps(_mm256_loadu_ps(om + c), v));
    }
  }
  if (full < ncols) fin_a8(p, xa, g, n0 + full, ncols - full, acc + full, out + full, init);
}

// y for tiles [t0, t1): the slices' parts summed in slice order, times rowexp.
void sum_slices_avx2(const Problem& p, const float* rowexp, const float* parts, int64_t slices,
                     int64_t t0, int64_t t1) {
  alignas(32) float out[kStreamRows * kNR];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * kNR;
    const int ncols = tile_cols(p.N, n0);
    for (int64_t m = 0; m < p.M; ++m)
      for (int c = 0; c < ncols; ++c) {
        const float* src = parts + m * p.N + n0 + c;
        float v = src[0];
        for (int64_t sl = 1; sl < slices; ++sl) v += src[sl * p.M * p.N];
        out[m * kNR + c] = v;
      }
    store(p, rowexp, n0, ncols, out);
  }
}

}  // namespace

const Kernels& avx2_kernels() {
  static const Kernels k = [] {
    Kernels t = generic_kernels_avx2_build();  // preparation, epilogues, stores, float formats
    t.pack_a16 = pack_a16_avx2;
    t.mk_a16 = mk_a16_avx2;
    t.pack_a8 = pack_a8_avx2;
    t.mk_a8 = mk_a8_avx2;
    t.fin_a16 = fin_a16_avx2;
    t.fin_a8 = fin_a8_avx2;
    t.max_dot_rows = kDotRows;
    t.dot_prep_a16 = dot_prep_a16_avx2;
    t.dot_a16 = dot_a16_avx2;
    t.dot_prep_a8 = dot_prep_a8_avx2;
    t.dot_a8 = dot_a8_avx2;
    t.max_stream_rows = kStreamRows;
    t.stream_register_rows = kStreamRows;
    t.max_stream_rows_a8 = kStreamRows;
    t.stream_a8 = stream_a8_avx2;
    t.stream_a16 = stream_a16_avx2;
    t.sum_slices = sum_slices_avx2;
    return t;
  }();
  return k;
}

}  // namespace xqk
