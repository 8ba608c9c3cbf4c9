// Quantized matmul on the host CPU: shared declarations.
//
// Problem (API.md conventions, x already flattened to [M, K]):
//   y[m, n] = sum_g sum_{k in group g} x_hat[m, k] * (scale[g, n] * q[k, n] - zp[g, n])
// with x_hat = x (A16) or x_scale * x_q (A8, xla_qops/activation.py), groups of
// G = block_size input features (G = K per-channel).
//
// Weight layouts as stored by the API (never repacked outside a call):
//   per-channel int8        [N, K]       int4 packed [N, K/2]
//   blockwise   int8 [K/G, G, N] = [K, N]     int4 packed [K/2, N]
// (packed: two's-complement nibbles, even k in the low nibble).
//
// Scheme of the panel path (driver.cc; the decode forms are described at
// Kernels::dot_a16 and Kernels::stream_a16): output columns are cut into tiles of
// kNR = 64 (one task each, so results do not depend on the thread count); for
// each tile and group the weights are unpacked into a small "panel" in L1, in
// the pair/quad-interleaved order that vdpbf16ps / vpdpbusd consume:
//   A16: panel[s][c] = bf16(q[2s, c]) | bf16(q[2s+1, c]) << 16   (exact integers)
//   A8:  panel[s][c] = bytes (q[4s+j, c] + bias), j = 0..3        (bias 128 / 8)
// and a register-blocked microkernel multiplies up to kMR rows of x by it.
// Integer weights stay exact; scales and zero points are applied to the
// float32 / int32 partial sums of each group (the activation-sum trick handles
// zero points: sum_k x (s q - z) = s * sum_k x q - z * sum_k x).
#pragma once

#include <cstdint>

#include "executor.h"

namespace xqk {

enum XType : int { kBF16 = 0, kF16 = 1, kF32 = 2 };
// Weight element format (API.md section 7): integers (int8, or packed int4 by
// `bits`), e4m3fn bytes (fp8, bits 8, the layout of int8), or e2m1 codes
// packed two per byte exactly as int4 (fp4, bits 4). Every value of each is
// exact in bf16.
enum WFormat : int { kWInt = 0, kWFp8 = 1, kWFp4 = 2 };
// Activation format with quantize_activation: int8 (xla_qops/activation.py)
// or e4m3fn (pallas_kernels/formats.py: inv = 448 / absmax, x * inv rounded
// to nearest even onto e4m3, saturating; scale absmax / 448, 1 for all-zero).
enum AFormat : int { kAInt8 = 0, kAFp8 = 1 };

constexpr int kNR = 64;  // output columns per tile (4 ZMM of float32)
constexpr int kMR = 6;   // max rows of x per microkernel call

struct Problem {
  int64_t M, K, N;
  int64_t G;       // group size along K: block_size, or K per-channel
  int64_t groups;  // K / G
  int bits;        // 8: int8 / fp8 weights; 4: packed int4 / fp4 (uint8 pairs along K)
  int wf;          // WFormat
  int af;          // AFormat (with qa)
  bool blockwise, has_zp, qa;
  XType xt;
  const void* x;        // [M, K] of xt
  const uint8_t* w;     // API layout (see above)
  const float* scale;   // [N] per-channel, [groups, N] blockwise
  const float* zp;      // same shape as scale, or nullptr
  void* y;              // [M, N] of xt
};

// x prepared for the A16 kernels. Each row is scaled by a power of two 2^-e
// (absmax into [0.5, 1), e clamped to [-64, 64]) so that no bf16 term is
// subnormal (vdpbf16ps flushes those); rowexp undoes it exactly. f16 and f32
// values are split into T bf16 terms whose sum is exact.
//
// The float-product form of A8 (fp8 activations, or any quantized activation
// times a float weight: Problem::float_products) uses this layout too: xb
// holds the quantized activations' values, exact in bf16 (T = 1), so the A16
// kernels multiply them with the weight's bf16 images (exact products,
// float32 sums). Per-channel: rowexp = x_scale per row and xsum = sum of the
// quantized values; blockwise: rowexp = 1, xsum = x_scale * sum, and xgs the
// per-group x_scale that the group epilogues multiply in.
struct XA16 {
  int T;            // 1 (bf16), 2 (f16), 3 (f32)
  int64_t Gp, Kp;   // group length padded to even; Kp = groups * Gp
  uint16_t* xb;     // [M*T][Kp] bf16, row m*T+t, zero padded
  float* rowexp;    // [M] 2^e
  float* xsum;      // [M][groups] sum of x over the group, times 2^-e
  const float* xgs = nullptr;  // [M][groups] or null: factor of each group's sum
};

// Whether an A8 problem multiplies float images (bf16 dot products) rather
// than integers (vpdpbusd).
inline bool float_products(const Problem& p) {
  return p.qa && (p.af == kAFp8 || p.wf != kWInt);
}

// x prepared for the A8 kernels: exactly xla_qops/activation.py's integers.
struct XA8 {
  int64_t Gp, Kp;   // group length padded to a multiple of 4; Kp = groups * Gp
  int8_t* xq;       // [M][Kp]
  float* xs;        // [M][groups] x_scale = absmax / 127
  int32_t* sq;      // [M][groups] sum of xq over the group
  float* xzs;       // [M][groups] x_scale * sum(xq)  (zero-point term)
};

static inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
// Columns of the tile starting at column n0 of N (the last tile may be short).
static inline int tile_cols(int64_t N, int64_t n0) {
  return static_cast<int>(N - n0 < kNR ? N - n0 : kNR);
}

// One implementation per ISA; the driver calls through this table.
struct Kernels {
  void (*prep_a16)(const Problem&, const XA16&, int64_t m0, int64_t m1);
  void (*prep_a8)(const Problem&, const XA8&, int64_t m0, int64_t m1);
  // The float-product A8 form's x (float_products): the quantized values as
  // bf16 into xa.xb (T = 1), x_scale into xgs [M][groups], and rowexp / xsum
  // as XA16 describes; xgs is the buffer xa.xgs points at.
  void (*prep_a8f)(const Problem&, const XA16&, float* xgs, int64_t m0, int64_t m1);
  // Panel ([steps][kNR] dwords) of group g, padded-k range [kk0, kk1), columns
  // n0.. (zero beyond N and beyond the group's G features).
  void (*pack_a16)(const Problem&, int64_t g, int64_t kk0, int64_t kk1, int64_t n0,
                   uint32_t* panel);
  void (*pack_a8)(const Problem&, int64_t g, int64_t kk0, int64_t kk1, int64_t n0,
                  uint32_t* panel);
  // acc[r][kNR] (= if init, else +=) x rows [0, mr) (row stride ldx) times panel.
  void (*mk_a16)(int mr, const uint16_t* x, int64_t ldx, const uint32_t* panel,
                 int64_t steps, float* acc, bool init);
  void (*mk_a8)(int mr, const int8_t* x, int64_t ldx, const uint32_t* panel,
                int64_t steps, int32_t* acc, bool init);
  // out[m][c] (= if init, else +=) group g's scaled contribution, all M rows.
  void (*fin_a16)(const Problem&, const XA16&, int64_t g, int64_t n0, int ncols,
                  const float* acc, float* out, bool init);
  void (*fin_a8)(const Problem&, const XA8&, int64_t g, int64_t n0, int ncols,
                 const int32_t* acc, float* out, bool init);
  // y[m][n0 + c] = out[m][c] * rowexp[m] (rowexp may be null), in p.xt.
  void (*store)(const Problem&, const float* rowexp, int64_t n0, int ncols,
                const float* out);

  // Per-channel decode in dot-product form: weight rows [N, K] are streamed
  // once, a few at a time, with no panel (null / 0 where not implemented).
  // x rows (R = M*T for A16, M for A8, R <= max_dot_rows) are first copied to
  // xd [Kq/128][R][128] (Kq = Kp rounded up to 128, zero padded) in the order
  // the weight unpacking produces. dot_* write out[m][c] like fin_* then store.
  // Optional (null = use mk_a16 + fin_a16): the A16 microkernel for T == 1
  // when a whole group fits one panel, with fin_a16's epilogue applied in
  // registers: out[r] = (out[r] +) s * acc (- z * xsum[r * xsum_stride]).
  // xgs (null: none): out[r] = (out[r] +) s * (xgs[r * xsum_stride] * acc) (- ...).
  void (*mk_a16_fused)(int mr, const uint16_t* x, int64_t ldx, const uint32_t* panel,
                       int64_t steps, const float* s, const float* z, const float* xsum,
                       const float* xgs, int64_t xsum_stride, int ncols, float* out,
                       bool init_out);
  int max_dot_rows;  // (with dot_a16 / dot_a8 non-null; an ISA may have only one)
  // Blockwise decode (R = M*T <= max_stream_rows): the K groups [g0, g1) of
  // one slice, the columns of tiles [t0, t1) (a column block), into part
  // [M][N]; acc: [t1 - t0][R][kNR] scratch. Each slice is one contiguous run
  // of weight memory, a block the same columns of each of its rows (see
  // kernels_avx512.cc).
  // sum_slices then writes y for tiles [t0, t1): the slices' parts (stride
  // M*N floats) summed in slice order, times rowexp.
  int max_stream_rows;
  // Rows up to which stream_a16 / stream_a8 keep their accumulators in
  // registers; beyond, their wide form (the driver cuts fewer K slices).
  int stream_register_rows;
  void (*stream_a16)(const Problem&, const XA16&, int64_t g0, int64_t g1, int64_t t0, int64_t t1,
                     float* acc, float* part);
  // Blockwise A8 decode (M <= max_stream_rows_a8): stream_a16's structure
  // with the integer product; acc: [t1 - t0][M][kNR] int32 scratch.
  int max_stream_rows_a8;
  void (*stream_a8)(const Problem&, const XA8&, int64_t g0, int64_t g1, int64_t t0, int64_t t1,
                    int32_t* acc, float* part);
  void (*sum_slices)(const Problem&, const float* rowexp, const float* parts, int64_t slices,
                     int64_t t0, int64_t t1);
  void (*dot_prep_a16)(const Problem&, const XA16&, uint16_t* xd, int64_t Kq);
  void (*dot_a16)(const Problem&, const XA16&, const uint16_t* xd, int64_t Kq, int64_t n0,
                  int ncols, float* out);
  void (*dot_prep_a8)(const Problem&, const XA8&, int8_t* xd, int64_t Kq);
  void (*dot_a8)(const Problem&, const XA8&, const int8_t* xd, int64_t Kq, int64_t n0,
                 int ncols, float* out);
};

const Kernels& generic_kernels();
const Kernels& avx512_kernels();  // only after cpu_features() says so
const Kernels& avx512_l1_kernels();  // the same, prefetching into L1 (kernels_avx512_l1.cc)
const Kernels& avx2_kernels();    // likewise

// AMX (kernels_amx.cc; only after amx_in_use()): the panel path's products for
// `rows` (a multiple of 16) rows of x at once, mk_a16 / mk_a8's contract
// otherwise: acc[r][kNR] (= if init, else +=) x rows [0, rows) times panel.
struct AmxKernels {
  void (*mk_a16)(int64_t rows, const uint16_t* x, int64_t ldx, const uint32_t* panel,
                 int64_t steps, float* acc, bool init);
  void (*mk_a8)(int64_t rows, const int8_t* x, int64_t ldx, const uint32_t* panel,
                int64_t steps, int32_t* acc, bool init);
  // Blockwise A16 with T == 1, `groups` consecutive groups of `steps` steps
  // each (steps a multiple of 16, or less than 16), their panels one after
  // another: for each group gi, out[r][0:ncols] (= if init_out and gi == 0,
  // else +=) s_gi * (xgs *) (x rows . panel_gi) (- z_gi * xsum), fin_a16's
  // arithmetic. x, s, z, xsum and xgs point at the first group's; x_group_stride
  // and sz_group_stride step x and s / z to the next group, xsum / xgs step
  // by 1 per group and xsum_stride per row. The scale reaches the sums while
  // they are in L1 (mk_a16 + fin_a16 write and read them through L2).
  void (*fused_a16)(int64_t rows, int64_t groups, const uint16_t* x, int64_t ldx,
                    int64_t x_group_stride, const uint32_t* panel, int64_t steps,
                    const float* s, const float* z, int64_t sz_group_stride, const float* xsum,
                    const float* xgs, int64_t xsum_stride, int ncols, float* out, bool init_out);
  // The same for integer A8 (steps of 4 int8), fin_a8's arithmetic: sq, xs and
  // xzs (XA8) point at the first group's, stepping by 1 per group and
  // x_stats_stride per row; bias 128 (int8) or 8 (int4).
  void (*fused_a8)(int64_t rows, int64_t groups, const int8_t* x, int64_t ldx,
                   int64_t x_group_stride, const uint32_t* panel, int64_t steps, const float* s,
                   const float* z, int64_t sz_group_stride, const int32_t* sq, const float* xs,
                   const float* xzs, int64_t x_stats_stride, int32_t bias, int ncols, float* out,
                   bool init_out);
  // A16 panel of `steps` rows: each bf16 times its column's scale s[c]
  // (c < ncols; 0 beyond), truncated to bf16: the caller chooses scales that
  // make every product exact in bf16 (driver.cc, fold_tile).
  void (*scale_panel)(uint32_t* panel, int64_t steps, const float* s, int ncols);
  // Folded scales (driver.cc, fold_tile): t[g * kNR + c] = s[g * stride + c] *
  // inv[c] with its magnitude rounded to `bits` explicit mantissa bits (to
  // nearest, fold_rounded; the sign kept) for g < groups, c < ncols; returns
  // the columns (bit c) where some rounded value does not lie within
  // kFoldUlps of the unrounded one with its exponent field in [kFoldExpLow,
  // kFoldExpHigh] (zero always does): 0 when every one fits.
  uint64_t (*fold_scales)(const float* s, int64_t stride, int64_t groups, const float* inv,
                          int ncols, int bits, float* t);
};
// Folding scales into the panel (driver.cc, fold_tile): how far a scale may lie
// from its rounded t (float32 ulps), and t's exponent range (biased), which keeps
// q * t a normal bf16 for every weight value.
constexpr int32_t kFoldUlps = 8;
constexpr uint32_t kFoldExpLow = 127 - 117, kFoldExpHigh = 127 + 118;
// |v|'s bits rounded to `bits` explicit mantissa bits, to nearest (a carry into
// the exponent is the next power of two; ties and overflow fail the checks).
inline uint32_t fold_rounded(uint32_t a, int bits) {
  const uint32_t drop = 23 - bits;
  return (a + (1u << (drop - 1))) & ~((1u << drop) - 1);
}
// Steps of the panel that the AMX forms pack at once (several groups, or a
// stretch of a long one: 128 KiB, in L2).
constexpr int64_t kAmxPanelSteps = 512;
const AmxKernels& amx_kernels();
// Rows of x from which the panel path multiplies on AMX (a tile's height).
constexpr int64_t kAmxRows = 16;

// Panel/acc sizes.
constexpr int64_t kMaxSteps = 128;  // panel: 128 x 64 dwords = 32 KiB

// Runs the whole problem, its tasks on `ex`'s threads.
void run(const Problem& p, const Executor& ex);

}  // namespace xqk
