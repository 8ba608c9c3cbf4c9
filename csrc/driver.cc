// The loop nest shared by every ISA: prepare x, then one task per 64-column
// tile (see qmm.h for the scheme).
#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "cpu_features.h"
#include "numeric.h"
#include "qmm.h"

namespace xqk {
namespace {

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<char, FreeDeleter>;

Buffer alloc(int64_t bytes) {
  size_t n = static_cast<size_t>(round_up(bytes > 0 ? bytes : 64, 64));
  return Buffer(static_cast<char*>(std::aligned_alloc(64, n)));
}

// Per-thread scratch that only grows.
struct Scratch {
  Buffer buf;
  int64_t size = 0;
  char* get(int64_t bytes) {
    if (bytes > size) {
      buf = alloc(bytes);
      size = bytes;
    }
    return buf.get();
  }
};
thread_local Scratch tl_panel, tl_acc, tl_out, tl_parts, tl_fold;
// The caller's prepared x (kept between calls: fresh pages cost more than the work).
thread_local Scratch tl_x[5];

const Kernels& kernels() {
  static const Kernels& k = std::strcmp(active_isa(), "avx512") == 0
                                ? (stream_prefetch_into_l1() ? avx512_l1_kernels() : avx512_kernels())
                            : std::strcmp(active_isa(), "avx2") == 0 ? avx2_kernels()
                                                                     : generic_kernels();
  return k;
}

// Rows of x per preparation task: enough work to be worth a task.
int64_t prep_rows_per_task(const Problem& p) {
  int64_t rows = (1 << 16) / (p.K > 0 ? p.K : 1);
  return rows < 1 ? 1 : rows;
}

// K slices of the blockwise decode, whole groups: at most 8 (each slice adds
// an M x N partial sum, written and read again: 16 slices cost an lm_head's
// M=4 decode a third of its speed), 4 for the kernels' wide form (rows >
// k.stream_register_rows), whose sweeps are whole groups: in a slice of 2
// groups half of the sweeps would start without a prefetched predecessor.
// More threads than slices get column blocks (stream_blocks). A function of
// K and the row count alone: the order of the sums depends on neither the
// thread count nor N, so a column-parallel shard computes its columns bit
// for bit as one device does.
int64_t stream_slices(const Problem& p, int64_t rows, const Kernels& k) {
  const int64_t most = rows > k.stream_register_rows ? 4 : 8;
  return p.groups < most ? p.groups : most;
}
// Column blocks of the blockwise decode: only as many as it takes for twice
// as many tasks as threads when there are few K slices (a small K). A block
// reads short runs of each weight row, which streams from DRAM more slowly
// than whole rows (measured with 32-tile blocks, one thread: 2048x32000 at
// M=1 10-16 GB/s against 19-21 unblocked, 4096x4096 18.5 against 23-27).
// Blocking does not change any column's arithmetic.
int64_t stream_blocks(const Executor& ex, int64_t slices, int64_t tiles) {
  const int64_t wanted = (2 * ex.num_threads() + slices - 1) / slices;
  const int64_t most = tiles / 8 > 1 ? tiles / 8 : 1;  // blocks of at least 8 tiles
  return wanted < most ? wanted : most;
}

// XLA_QOPS_TRACE=1 prints the time of each phase (for tuning).
const bool kTrace = std::getenv("XLA_QOPS_TRACE") != nullptr;
double now_ms() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}
double cpu_ms() {  // CPU time of the whole process: unaffected by other load
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

template <class Prep, class X>
void prepare(const Executor& ex, const Problem& p, Prep prep, const X& xa) {
  const int64_t rows = prep_rows_per_task(p);
  const int64_t tasks = (p.M + rows - 1) / rows;
  ex.parallel_for(tasks, [&](int64_t t) {
    int64_t m0 = t * rows, m1 = m0 + rows < p.M ? m0 + rows : p.M;
    prep(p, xa, m0, m1);
  });
}

// Runs fn(tile) for every tile: each thread takes strips of consecutive tiles,
// so the packers can prefetch the next tile (the same rows, 64 columns on).
template <class Fn>
void for_each_strip(const Executor& ex, int64_t tiles, const Fn& fn) {
  const int64_t strips_wanted = 2 * static_cast<int64_t>(ex.num_threads());
  const int64_t per = (tiles + strips_wanted - 1) / strips_wanted;
  const int64_t strips = (tiles + per - 1) / per;
  ex.parallel_for(strips, [&](int64_t strip) {
    const int64_t t1 = (strip + 1) * per < tiles ? (strip + 1) * per : tiles;
    fn(strip * per, t1);
  });
}
template <class Fn>
void for_each_tile(const Executor& ex, int64_t tiles, const Fn& fn) {
  for_each_strip(ex, tiles, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) fn(t);
  });
}

// Rows of x (of `rows`) that the panel path multiplies on AMX: whole tiles of
// kAmxRows where amx_in_use(), the rest on the ISA's microkernel. A function
// of the row count alone (as every choice of form is), never of N or the
// thread count.
int64_t amx_rows_of(int64_t rows) {
  return amx_in_use() ? rows / kAmxRows * kAmxRows : 0;
}

// Blockwise scales without zero points that fold into the A16 panel (AMX):
// each scale of column n is c_n * t, one float32 factor c_n for the column
// and t zero or a float32 of at most `fold_bits(p)` explicit mantissa bits
// within [2^-117, 2^118], so that q * t is exact in bf16 for every weight
// value q (a normal number of at most 8 significant bits): the panel holds
// q * t, the sum over K runs as one group (no per-group epilogue) and c_n
// multiplies the column's sums. MXFP4's scales are powers of two (c = 1, t = s
// exactly). NVFP4's are e4m3 block scales times (or over) one float32 of the
// tensor, rounded once: s / c lies within a few float32 ulps of a 4-bit t, so
// the weight used is q * t * c = q * s * (1 + e), |e| <= 2^-20 (kFoldUlps),
// below the rounding of the float32 sums it enters.
int fold_bits(const Problem& p) { return p.wf == kWInt && p.bits == 8 ? 0 : 3; }  // int8: |q| <= 128

// Whether |s * inv|'s bits `a` round to a t (above; fold_rounded, qmm.h) within
// kFoldUlps of it, with t's exponent in range.
inline bool fold_fits(uint32_t a, int bits) {
  const uint32_t r = fold_rounded(a, bits), e = r >> 23;
  const int32_t d = static_cast<int32_t>(a - r);
  return a == 0 || ((d < 0 ? -d : d) <= kFoldUlps && e >= kFoldExpLow && e <= kFoldExpHigh);
}

// The first candidate factor of a column from `j` on (-1: c = 1; j >= 0: the
// column's first nonzero scale, that of group g0, over the mantissa
// 1 + j / 2^bits) whose t fit the column's scales of groups [g0, g1) (`s`: its
// first group's, groups `stride` apart): sets j, inv = 1 / c and c; false when
// none does.
bool fold_candidate(const float* s, int64_t stride, int64_t g0, int64_t g1, int bits, int& j,
                    float& inv, float& c) {
  const double first = std::fabs(static_cast<double>(s[g0 * stride]));
  for (; j < (1 << bits); ++j) {
    const double mantissa = 1.0 + (j < 0 ? 0 : j) / static_cast<double>(1 << bits);
    inv = j < 0 ? 1.f : static_cast<float>(mantissa / first);
    c = j < 0 ? 1.f : static_cast<float>(first / mantissa);
    bool fits = std::isnormal(inv) && std::isnormal(c);
    for (int64_t g = g0; g < g1 && fits; ++g) {
      fits = fold_fits(f32_to_bits(s[g * stride] * inv) & 0x7FFFFFFFu, bits);
    }
    if (fits) return true;
  }
  return false;
}

// The folded scales of the tile's columns [n0, n0 + ncols): each column's
// c_n in c[] and its t for group g in t[g * kNR + n - n0]; false where some
// column does not fold (the tile keeps the per-group epilogue). c_n is 1, or
// the column's first nonzero scale over one of the 2^bits mantissas (one of
// them is NVFP4's tensor factor times a power of two): the first that fits
// the column's first 8 groups, unless it fails the others, then the first
// that fits them all (NVFP4's columns of 4096x4096: about one in 2000 passed
// 8 groups with a wrong mantissa). A function of the column's scales alone,
// so every thread count and column shard gives the same bits.
bool fold_tile(const Problem& p, int64_t n0, int ncols, float* c, float* t) {
  constexpr int64_t kProbes = 8;
  const int bits = fold_bits(p);
  alignas(64) float inv[kNR] = {};
  int next[kNR];
  int64_t first[kNR];
  for (int col = 0; col < ncols; ++col) {
    const float* s = p.scale + n0 + col;
    first[col] = 0;
    while (first[col] < p.groups && s[first[col] * p.N] == 0.f) ++first[col];
    c[col] = inv[col] = 1.f;
    next[col] = 1 << bits;  // all zero: nothing else to try
    if (first[col] == p.groups) continue;
    int j = -1;
    const int64_t probe = std::min(first[col] + kProbes, p.groups);
    if (!fold_candidate(s, p.N, first[col], probe, bits, j, inv[col], c[col])) {
      return false;
    }
    next[col] = j + 1;
  }
  // Every group (AVX-512: the AMX forms run only where that set is active).
  uint64_t bad = amx_kernels().fold_scales(p.scale + n0, p.N, p.groups, inv, ncols, bits, t);
  if (bad == 0) return true;
  for (int col = 0; col < ncols; ++col) {
    if (!(bad >> col & 1)) continue;
    const float* s = p.scale + n0 + col;
    int j = next[col];
    if (!fold_candidate(s, p.N, first[col], p.groups, bits, j, inv[col], c[col])) {
      return false;
    }
  }
  return amx_kernels().fold_scales(p.scale + n0, p.N, p.groups, inv, ncols, bits, t) == 0;
}

// The panels of groups [g0, g1) for the AMX forms, each whole group (its
// padded k range [0, Gp), packed `chunk` features at a time), one after
// another from `panels`; `per_step` features per panel row (2: A16, 4: A8).
// Packed 4-bit A16 weights of even groups are one run of K (no padding, and
// pack_a16 reads the rows without regard to groups): packed `chunk` features
// at a time across groups, so that its prefetch of the rows `chunk` ahead
// covers several groups of B = 16 or 32 rather than the next group only
// (measured in alternating turns: NVFP4 / MXFP4 4096x4096 and 2048x5632 at
// M=64 0.93-0.96x the time packing group by group, at M=256 0.95-1.00x).
template <class Pack>
void pack_groups(const Pack& pack, const Problem& p, int64_t Gp, int64_t chunk, int per_step,
                 int64_t g0, int64_t g1, int64_t n0, uint32_t* panels) {
  if (per_step == 2 && p.blockwise && p.bits == 4 && Gp == p.G) {
    for (int64_t k0 = g0 * Gp; k0 < g1 * Gp; k0 += chunk) {
      const int64_t k1 = k0 + chunk < g1 * Gp ? k0 + chunk : g1 * Gp;
      pack(p, 0, k0, k1, n0, panels + (k0 - g0 * Gp) / 2 * kNR);
    }
    return;
  }
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t kk0 = 0; kk0 < Gp; kk0 += chunk) {
      const int64_t kk1 = kk0 + chunk < Gp ? kk0 + chunk : Gp;
      pack(p, g, kk0, kk1, n0, panels + ((g - g0) * Gp + kk0) / per_step * kNR);
    }
  }
}

// Partial sums of at most this size are summed by one task (run_slices): about
// as long as a parallel region's hand-off to the workers and back.
constexpr int64_t kSumInTaskBytes = 256 << 10;

// The blockwise decode's loop: K slices x column blocks, one task each (blocks
// fastest: neighbouring tasks read neighbouring bytes of the same weight
// rows), each writing its slice's partial sums part [M][N]; then the slices'
// parts summed in slice order: by the task that completes a column block
// (small parts, or a block per thread), else in a second region, a strip of
// tiles per task.
//   slice(g0, g1, t0, t1, part)   groups [g0, g1), tiles [t0, t1)
//   finish(parts, slices, t0, t1) tiles [t0, t1) of y
template <class Slice, class Finish>
void run_slices(const Executor& ex, const Problem& p, const Kernels& k, int64_t rows, int64_t tiles,
                const Slice& slice, const Finish& finish) {
  const int64_t slices = stream_slices(p, rows, k);
  const int64_t blocks = stream_blocks(ex, slices, tiles);
  const int64_t part_bytes = slices * p.M * p.N * 4;
  float* parts = reinterpret_cast<float*>(tl_parts.get(part_bytes));
  const auto block_tiles = [&](int64_t b, int64_t& t0, int64_t& t1) {
    t0 = b * tiles / blocks, t1 = (b + 1) * tiles / blocks;
  };
  const auto run_slice = [&](int64_t sl, int64_t b) {
    int64_t t0, t1;
    block_tiles(b, t0, t1);
    slice(sl * p.groups / slices, (sl + 1) * p.groups / slices, t0, t1, parts + sl * p.M * p.N);
  };
  // One region a call when the sum is cheap or already spread over the
  // threads: the task that completes a column block's last slice sums that
  // block (in slice order, whichever thread it runs on: the same bits).
  // A second region costs a hand-off to the workers and back (a time slice
  // each on a loaded machine); summing a large part on one thread costs more.
  if (blocks >= ex.num_threads() || part_bytes <= kSumInTaskBytes) {
    std::unique_ptr<std::atomic<int64_t>[]> slices_done(new std::atomic<int64_t>[blocks]);
    for (int64_t b = 0; b < blocks; ++b) slices_done[b].store(0, std::memory_order_relaxed);
    ex.parallel_for(slices * blocks, [&](int64_t task) {
      const int64_t sl = task / blocks, b = task % blocks;
      run_slice(sl, b);
      // acq_rel: the last one sees every other slice's part of the block.
      if (slices_done[b].fetch_add(1, std::memory_order_acq_rel) == slices - 1) {
        int64_t t0, t1;
        block_tiles(b, t0, t1);
        finish(parts, slices, t0, t1);
      }
    });
    return;
  }
  ex.parallel_for(slices * blocks, [&](int64_t task) { run_slice(task / blocks, task % blocks); });
  for_each_strip(ex, tiles, [&](int64_t t0, int64_t t1) { finish(parts, slices, t0, t1); });
}

// A16, and the float-product form of A8 (float_products: its x is quantized
// to values exact in bf16, then multiplied like bf16 activations).
void run_a16(const Problem& p, const Kernels& k, const Executor& ex) {
  XA16 xa;
  const bool qf = float_products(p);
  xa.T = qf || p.xt == kBF16 ? 1 : (p.xt == kF16 ? 2 : 3);
  xa.Gp = round_up(p.G, 2);
  xa.Kp = p.groups * xa.Gp;
  const int64_t R = p.M * xa.T;
  xa.xb = reinterpret_cast<uint16_t*>(tl_x[0].get(R * xa.Kp * 2));
  xa.rowexp = reinterpret_cast<float*>(tl_x[1].get(p.M * 4));
  xa.xsum = reinterpret_cast<float*>(tl_x[2].get(p.M * p.groups * 4));
  const double t0 = kTrace ? now_ms() : 0;
  if (qf) {
    float* xgs = reinterpret_cast<float*>(tl_x[4].get(p.M * p.groups * 4));
    prepare(ex, p, [&](const Problem& pp, const XA16& x, int64_t m0, int64_t m1) {
      k.prep_a8f(pp, x, xgs, m0, m1);
    }, xa);
    if (p.blockwise) xa.xgs = xgs;  // per-channel: x_scale is rowexp
  } else {
    prepare(ex, p, k.prep_a16, xa);
  }
  const double t1 = kTrace ? now_ms() : 0, c1 = kTrace ? cpu_ms() : 0;

  const int64_t tiles = (p.N + kNR - 1) / kNR;
  // On AMX, 16 rows or more take the panel path: at 16 rows of x it measured
  // 1.5-3.8x the decode forms' speed (the decoder's shapes, weights from DRAM).
  const bool decode = amx_rows_of(R) == 0;
  if (decode && !p.blockwise && R <= k.max_dot_rows && k.dot_a16) {  // decode, per-channel: dot-product form
    const int64_t Kq = round_up(xa.Kp, 128);
    uint16_t* xd = reinterpret_cast<uint16_t*>(tl_x[3].get(R * Kq * 2));
    k.dot_prep_a16(p, xa, xd, Kq);
    for_each_tile(ex, tiles, [&](int64_t tile) {
      const int64_t n0 = tile * kNR;
      const int ncols = tile_cols(p.N, n0);
      float* out = reinterpret_cast<float*>(tl_out.get(p.M * kNR * 4));
      k.dot_a16(p, xa, xd, Kq, n0, ncols, out);
      k.store(p, xa.rowexp, n0, ncols, out);
    });
    if (kTrace) std::fprintf(stderr, "a16 dot M=%ld K=%ld N=%ld prep %.3f ms, tiles %.3f ms, tiles cpu %.3f ms\n",
                             (long)p.M, (long)p.K, (long)p.N, t1 - t0, now_ms() - t1, cpu_ms() - c1);
    return;
  }
  if (decode && p.blockwise && R <= k.max_stream_rows) {  // decode, blockwise: K slices, then their sum
    run_slices(ex, p, k, R, tiles, [&](int64_t g0, int64_t g1, int64_t t0, int64_t t1, float* part) {
      float* acc = reinterpret_cast<float*>(tl_acc.get((t1 - t0) * R * kNR * 4));
      k.stream_a16(p, xa, g0, g1, t0, t1, acc, part);
    }, [&](const float* parts, int64_t slices, int64_t t0, int64_t t1) {
      k.sum_slices(p, xa.rowexp, parts, slices, t0, t1);
    });
    if (kTrace) std::fprintf(stderr, "a16 stream M=%ld K=%ld N=%ld prep %.3f ms, total %.3f ms\n",
                             (long)p.M, (long)p.K, (long)p.N, t1 - t0, now_ms() - t0);
    return;
  }
  const int64_t chunk = 2 * kMaxSteps;  // padded-k per panel
  const int64_t amx_rows = amx_rows_of(R);
  // On AMX, scales that fold (fold_tile: MXFP4's powers of two, NVFP4's e4m3
  // block scales) go into the panel: one sum over K, no per-group epilogue
  // (which bounds small groups: MXFP4's B = 32 ran at 0.57x bf16 torch's
  // prefill with it, NVFP4's B = 16 at 0.29x). Scaling a panel costs about
  // what the epilogue of 30 rows does at B = 32 (15 at B = 16), so only from
  // 64 rows (32 at B <= 16): 4096x4096 at M=16, MXFP4 this way took 1.36x the
  // time of int4 B=32 with the epilogue; at M=64 MXFP4 took 0.85-0.92x its
  // own time with the epilogue; NVFP4 at M=32 / 48 took 0.75-0.92x / 0.72-0.80x
  // its time with the epilogue on the decoder's shapes, at M=16 1.05-1.15x.
  const int64_t fold_rows = p.G <= 16 ? 32 : 64;
  const bool may_fold = amx_rows >= fold_rows && xa.T == 1 && p.blockwise && !p.has_zp &&
                        !xa.xgs && xa.Gp / 2 <= kAmxPanelSteps;
  for_each_tile(ex, tiles, [&](int64_t tile) {
    const int64_t n0 = tile * kNR;
    const int ncols = tile_cols(p.N, n0);
    uint32_t* panel = reinterpret_cast<uint32_t*>(tl_panel.get(kMaxSteps * kNR * 4));
    float* acc = reinterpret_cast<float*>(tl_acc.get(R * kNR * 4));
    float* out = reinterpret_cast<float*>(tl_out.get(p.M * kNR * 4));
    const int64_t gsteps = xa.Gp / 2;
    alignas(64) float c[kNR];
    float* t = may_fold ? reinterpret_cast<float*>(tl_fold.get(p.groups * kNR * 4)) : nullptr;
    if (may_fold && fold_tile(p, n0, ncols, c, t)) {
      const int64_t per = kAmxPanelSteps / gsteps;
      uint32_t* panels = reinterpret_cast<uint32_t*>(tl_panel.get(kAmxPanelSteps * kNR * 4));
      for (int64_t g0 = 0; g0 < p.groups; g0 += per) {
        const int64_t g1 = g0 + per < p.groups ? g0 + per : p.groups;
        pack_groups(k.pack_a16, p, xa.Gp, chunk, 2, g0, g1, n0, panels);
        for (int64_t g = g0; g < g1; ++g) {
          amx_kernels().scale_panel(panels + (g - g0) * gsteps * kNR, gsteps, t + g * kNR, ncols);
        }
        const int64_t steps = (g1 - g0) * gsteps;
        const uint16_t* x = xa.xb + g0 * xa.Gp;
        amx_kernels().mk_a16(amx_rows, x, xa.Kp, panels, steps, acc, g0 == 0);
        for (int64_t r0 = amx_rows; r0 < R; r0 += kMR) {
          const int mr = static_cast<int>(R - r0 < kMR ? R - r0 : kMR);
          k.mk_a16(mr, x + r0 * xa.Kp, xa.Kp, panels, steps, acc + r0 * kNR, g0 == 0);
        }
      }
      for (int64_t r = 0; r < R; ++r) {  // the columns' factors (1 for powers of two: exact)
        for (int col = 0; col < ncols; ++col) acc[r * kNR + col] *= c[col];
      }
      k.store(p, xa.rowexp, n0, ncols, acc);  // T == 1: acc's rows are out's
      return;
    }
    if (amx_rows && xa.T == 1 && p.blockwise && gsteps <= kAmxPanelSteps &&
        (gsteps % 16 == 0 || gsteps < 16)) {
      // Blockwise on AMX: the panels of as many groups as kAmxPanelSteps
      // holds, then every row block through all of them (fused_a16).
      const int64_t per = kAmxPanelSteps / gsteps;
      uint32_t* panels = reinterpret_cast<uint32_t*>(tl_panel.get(kAmxPanelSteps * kNR * 4));
      for (int64_t g0 = 0; g0 < p.groups; g0 += per) {
        const int64_t g1 = g0 + per < p.groups ? g0 + per : p.groups;
        pack_groups(k.pack_a16, p, xa.Gp, chunk, 2, g0, g1, n0, panels);
        const float* s = p.scale + g0 * p.N + n0;
        const float* z = p.has_zp ? p.zp + g0 * p.N + n0 : nullptr;
        amx_kernels().fused_a16(amx_rows, g1 - g0, xa.xb + g0 * xa.Gp, xa.Kp, xa.Gp, panels, gsteps,
                                s, z, p.N, xa.xsum + g0, xa.xgs ? xa.xgs + g0 : nullptr, p.groups,
                                ncols, out, g0 == 0);
        for (int64_t g = g0; g < g1; ++g) {  // rows past the last whole tile
          for (int64_t r0 = amx_rows; r0 < R; r0 += kMR) {
            const int mr = static_cast<int>(R - r0 < kMR ? R - r0 : kMR);
            k.mk_a16_fused(mr, xa.xb + r0 * xa.Kp + g * xa.Gp, xa.Kp,
                           panels + (g - g0) * gsteps * kNR, gsteps, s + (g - g0) * p.N,
                           z ? z + (g - g0) * p.N : nullptr, xa.xsum + r0 * p.groups + g,
                           xa.xgs ? xa.xgs + r0 * p.groups + g : nullptr, p.groups, ncols,
                           out + r0 * kNR, g == 0);
          }
        }
      }
      k.store(p, xa.rowexp, n0, ncols, out);
      return;
    }
    const bool fused = !amx_rows && k.mk_a16_fused && xa.T == 1 && xa.Gp <= chunk;
    // On AMX the sums of each panel go through acc and back: from 512 rows
    // on, panels of kAmxPanelSteps (four ordinary ones, out of L1) cut that
    // traffic by four and gain more than the panel's L1 residence costs
    // (per-channel 4096x4096 on the Intel Xeon: M=1024 33 -> 25.6 ms; at
    // M=256 5.3 -> 5.9, so not there).
    const bool long_panels = amx_rows >= 512;
    const int64_t panel_k = long_panels ? 2 * kAmxPanelSteps : chunk;
    if (long_panels) panel = reinterpret_cast<uint32_t*>(tl_panel.get(kAmxPanelSteps * kNR * 4));
    for (int64_t g = 0; g < p.groups; ++g) {
      if (fused) {  // the group in one panel: scale in the microkernel's epilogue
        k.pack_a16(p, g, 0, xa.Gp, n0, panel);
        const int64_t gs = p.blockwise ? g * p.N : 0;
        const float* s = p.scale + gs + n0;
        const float* z = p.has_zp ? p.zp + gs + n0 : nullptr;
        for (int64_t r0 = 0; r0 < R; r0 += kMR) {
          const int mr = static_cast<int>(R - r0 < kMR ? R - r0 : kMR);
          k.mk_a16_fused(mr, xa.xb + r0 * xa.Kp + g * xa.Gp, xa.Kp, panel, xa.Gp / 2, s, z,
                         xa.xsum + r0 * p.groups + g,
                         xa.xgs ? xa.xgs + r0 * p.groups + g : nullptr, p.groups, ncols,
                         out + r0 * kNR, g == 0);
        }
        continue;
      }
      for (int64_t kk0 = 0; kk0 < xa.Gp; kk0 += panel_k) {
        const int64_t kk1 = kk0 + panel_k < xa.Gp ? kk0 + panel_k : xa.Gp;
        for (int64_t pk = kk0; pk < kk1; pk += chunk) {
          k.pack_a16(p, g, pk, pk + chunk < kk1 ? pk + chunk : kk1, n0, panel + (pk - kk0) / 2 * kNR);
        }
        const uint16_t* x = xa.xb + g * xa.Gp + kk0;
        if (amx_rows) amx_kernels().mk_a16(amx_rows, x, xa.Kp, panel, (kk1 - kk0) / 2, acc, kk0 == 0);
        for (int64_t r0 = amx_rows; r0 < R; r0 += kMR) {
          const int mr = static_cast<int>(R - r0 < kMR ? R - r0 : kMR);
          k.mk_a16(mr, x + r0 * xa.Kp, xa.Kp, panel, (kk1 - kk0) / 2, acc + r0 * kNR,
                   kk0 == 0);
        }
      }
      k.fin_a16(p, xa, g, n0, ncols, acc, out, g == 0);
    }
    k.store(p, xa.rowexp, n0, ncols, out);
  });
  if (kTrace) std::fprintf(stderr, "a16 M=%ld K=%ld N=%ld prep %.3f ms, tiles %.3f ms, tiles cpu %.3f ms\n",
                           (long)p.M, (long)p.K, (long)p.N, t1 - t0, now_ms() - t1, cpu_ms() - c1);
}

void run_a8(const Problem& p, const Kernels& k, const Executor& ex) {
  XA8 xa;
  xa.Gp = round_up(p.G, 4);
  xa.Kp = p.groups * xa.Gp;
  const int64_t mg = p.M * p.groups;
  xa.xq = reinterpret_cast<int8_t*>(tl_x[0].get(p.M * xa.Kp));
  xa.xs = reinterpret_cast<float*>(tl_x[1].get(mg * 4));
  xa.sq = reinterpret_cast<int32_t*>(tl_x[2].get(mg * 4));
  xa.xzs = reinterpret_cast<float*>(tl_x[3].get(mg * 4));
  const double t0 = kTrace ? now_ms() : 0;
  prepare(ex, p, k.prep_a8, xa);
  const double t1 = kTrace ? now_ms() : 0, c1 = kTrace ? cpu_ms() : 0;

  const int64_t tiles = (p.N + kNR - 1) / kNR;
  // (Integer A8 keeps its VNNI decode forms on AMX too: at 16 rows the tiles
  // measured 0.59-0.82x their speed per-channel, 0.81-1.71x blockwise.)
  if (!p.blockwise && p.M <= k.max_dot_rows && k.dot_a8) {  // decode, per-channel: dot-product form
    const int64_t Kq = round_up(xa.Kp, 128);
    int8_t* xd = reinterpret_cast<int8_t*>(tl_x[4].get(p.M * Kq));
    k.dot_prep_a8(p, xa, xd, Kq);
    for_each_tile(ex, tiles, [&](int64_t tile) {
      const int64_t n0 = tile * kNR;
      const int ncols = tile_cols(p.N, n0);
      float* out = reinterpret_cast<float*>(tl_out.get(p.M * kNR * 4));
      k.dot_a8(p, xa, xd, Kq, n0, ncols, out);
      k.store(p, nullptr, n0, ncols, out);
    });
    if (kTrace) std::fprintf(stderr, "a8 dot M=%ld K=%ld N=%ld prep %.3f ms, tiles %.3f ms, tiles cpu %.3f ms\n",
                             (long)p.M, (long)p.K, (long)p.N, t1 - t0, now_ms() - t1, cpu_ms() - c1);
    return;
  }
  if (p.blockwise && p.M <= k.max_stream_rows_a8) {  // decode, blockwise: K slices, then their sum
    run_slices(ex, p, k, p.M, tiles, [&](int64_t g0, int64_t g1, int64_t t0, int64_t t1, float* part) {
      int32_t* acc = reinterpret_cast<int32_t*>(tl_acc.get((t1 - t0) * p.M * kNR * 4));
      k.stream_a8(p, xa, g0, g1, t0, t1, acc, part);
    }, [&](const float* parts, int64_t slices, int64_t t0, int64_t t1) {
      k.sum_slices(p, nullptr, parts, slices, t0, t1);
    });
    if (kTrace) std::fprintf(stderr, "a8 stream M=%ld K=%ld N=%ld prep %.3f ms, total %.3f ms\n",
                             (long)p.M, (long)p.K, (long)p.N, t1 - t0, now_ms() - t0);
    return;
  }
  const int64_t chunk = 4 * kMaxSteps;
  const int64_t amx_rows = amx_rows_of(p.M);
  for_each_tile(ex, tiles, [&](int64_t tile) {
    const int64_t n0 = tile * kNR;
    const int ncols = tile_cols(p.N, n0);
    uint32_t* panel = reinterpret_cast<uint32_t*>(tl_panel.get(kMaxSteps * kNR * 4));
    int32_t* acc = reinterpret_cast<int32_t*>(tl_acc.get(p.M * kNR * 4));
    float* out = reinterpret_cast<float*>(tl_out.get(p.M * kNR * 4));
    const int64_t gsteps = xa.Gp / 4;
    if (amx_rows && p.blockwise && gsteps <= kAmxPanelSteps && (gsteps % 16 == 0 || gsteps < 16)) {
      // Blockwise on AMX, as run_a16's: panels of several groups, then every
      // row block through them (fused_a8); the rows past the last whole tile
      // on the ISA's microkernel and epilogue (fin_a8 over those rows).
      const int64_t per = kAmxPanelSteps / gsteps;
      uint32_t* panels = reinterpret_cast<uint32_t*>(tl_panel.get(kAmxPanelSteps * kNR * 4));
      Problem rest = p;
      rest.M = p.M - amx_rows;
      XA8 rest_x = xa;
      rest_x.xs += amx_rows * p.groups, rest_x.sq += amx_rows * p.groups, rest_x.xzs += amx_rows * p.groups;
      for (int64_t g0 = 0; g0 < p.groups; g0 += per) {
        const int64_t g1 = g0 + per < p.groups ? g0 + per : p.groups;
        pack_groups(k.pack_a8, p, xa.Gp, chunk, 4, g0, g1, n0, panels);
        amx_kernels().fused_a8(amx_rows, g1 - g0, xa.xq + g0 * xa.Gp, xa.Kp, xa.Gp, panels, gsteps,
                               p.scale + g0 * p.N + n0, p.has_zp ? p.zp + g0 * p.N + n0 : nullptr,
                               p.N, xa.sq + g0, xa.xs + g0, xa.xzs + g0, p.groups,
                               p.bits == 8 ? 128 : 8, ncols, out, g0 == 0);
        for (int64_t g = g0; g < g1 && rest.M > 0; ++g) {
          for (int64_t r0 = amx_rows; r0 < p.M; r0 += kMR) {
            const int mr = static_cast<int>(p.M - r0 < kMR ? p.M - r0 : kMR);
            k.mk_a8(mr, xa.xq + r0 * xa.Kp + g * xa.Gp, xa.Kp, panels + (g - g0) * gsteps * kNR,
                    gsteps, acc + r0 * kNR, true);
          }
          k.fin_a8(rest, rest_x, g, n0, ncols, acc + amx_rows * kNR, out + amx_rows * kNR, g == 0);
        }
      }
      k.store(p, nullptr, n0, ncols, out);
      return;
    }
    for (int64_t g = 0; g < p.groups; ++g) {
      for (int64_t kk0 = 0; kk0 < xa.Gp; kk0 += chunk) {
        const int64_t kk1 = kk0 + chunk < xa.Gp ? kk0 + chunk : xa.Gp;
        k.pack_a8(p, g, kk0, kk1, n0, panel);
        const int8_t* x = xa.xq + g * xa.Gp + kk0;
        if (amx_rows) amx_kernels().mk_a8(amx_rows, x, xa.Kp, panel, (kk1 - kk0) / 4, acc, kk0 == 0);
        for (int64_t r0 = amx_rows; r0 < p.M; r0 += kMR) {
          const int mr = static_cast<int>(p.M - r0 < kMR ? p.M - r0 : kMR);
          k.mk_a8(mr, x + r0 * xa.Kp, xa.Kp, panel, (kk1 - kk0) / 4, acc + r0 * kNR,
                  kk0 == 0);
        }
      }
      k.fin_a8(p, xa, g, n0, ncols, acc, out, g == 0);
    }
    k.store(p, nullptr, n0, ncols, out);
  });
  if (kTrace) std::fprintf(stderr, "a8 M=%ld K=%ld N=%ld prep %.3f ms, tiles %.3f ms, tiles cpu %.3f ms\n",
                           (long)p.M, (long)p.K, (long)p.N, t1 - t0, now_ms() - t1, cpu_ms() - c1);
}

}  // namespace

void run(const Problem& p, const Executor& ex) {
  if (p.M == 0 || p.N == 0) return;
  const Kernels& k = kernels();
  if (p.K == 0) {  // empty contraction: y = 0
    const int64_t bytes = p.xt == kF32 ? 4 : 2;
    std::memset(p.y, 0, static_cast<size_t>(p.M * p.N * bytes));
    return;
  }
  if (p.qa && !float_products(p)) {
    run_a8(p, k, ex);
  } else {
    run_a16(p, k, ex);
  }
}

}  // namespace xqk
