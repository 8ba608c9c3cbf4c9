// Portable scalar kernels: any x86-64 (and the reference the AVX-512 kernels'
// tests are run against besides numpy). Same panel formats as kernels_avx512.cc.
#include <cmath>

#include "numeric.h"
#include "qmm.h"

namespace xqk {
namespace {

// q[k, n] for k = g * G + kk (0 outside the group or beyond N).
inline int weight_at(const Problem& p, int64_t g, int64_t kk, int64_t n) {
  if (kk >= p.G || n >= p.N) return 0;
  const int64_t k = g * p.G + kk;
  if (p.bits == 8) {
    const int8_t* w = reinterpret_cast<const int8_t*>(p.w);
    return p.blockwise ? w[k * p.N + n] : w[n * p.K + k];
  }
  const uint8_t byte = p.blockwise ? p.w[(k / 2) * p.N + n] : p.w[n * (p.K / 2) + k / 2];
  const int nib = (k & 1) ? (byte >> 4) : (byte & 0xf);
  return nib >= 8 ? nib - 16 : nib;
}

inline uint16_t small_int_to_bf16(int q) {  // exact for |q| <= 256
  return static_cast<uint16_t>(f32_to_bits(static_cast<float>(q)) >> 16);
}

// The weight's value at (g, kk, n) as bf16 bits (exact in every format; 0
// outside the group or beyond N).
inline uint16_t weight_bf16_at(const Problem& p, int64_t g, int64_t kk, int64_t n) {
  if (p.wf == kWInt) return small_int_to_bf16(weight_at(p, g, kk, n));
  if (kk >= p.G || n >= p.N) return 0;
  const int64_t k = g * p.G + kk;
  if (p.wf == kWFp8) {
    const uint8_t b = p.blockwise ? p.w[k * p.N + n] : p.w[n * p.K + k];
    return f32_to_bf16(e4m3_value(b));
  }
  const uint8_t byte = p.blockwise ? p.w[(k / 2) * p.N + n] : p.w[n * (p.K / 2) + k / 2];
  return f32_to_bf16(e2m1_value((k & 1) ? (byte >> 4) : (byte & 0xf)));
}

void prep_a16(const Problem& p, const XA16& xa, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t base = m * p.K;
    float absmax = 0.0f;
    for (int64_t k = 0; k < p.K; ++k) absmax = std::fmax(absmax, std::fabs(load_x(p.x, p.xt, base + k)));
    const int e = row_exponent(absmax);
    const double down = std::ldexp(1.0, -e);
    xa.rowexp[m] = std::ldexp(1.0f, e);
    for (int64_t g = 0; g < p.groups; ++g) {
      float sum = 0.0f;
      for (int64_t kk = 0; kk < xa.Gp; ++kk) {
        float v = kk < p.G ? load_x(p.x, p.xt, base + g * p.G + kk) : 0.0f;
        sum += v;
        float r = static_cast<float>(static_cast<double>(v) * down);
        const int64_t col = g * xa.Gp + kk;
        for (int t = 0; t < xa.T; ++t) {
          uint16_t h = f32_to_bf16(r);
          xa.xb[(m * xa.T + t) * xa.Kp + col] = h;
          r -= bf16_to_f32(h);  // exact: the remainder fits in float
        }
      }
      xa.xsum[m * p.groups + g] = static_cast<float>(static_cast<double>(sum) * down);
    }
  }
}

void prep_a8(const Problem& p, const XA8& xa, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t g = 0; g < p.groups; ++g) {
      const int64_t base = m * p.K + g * p.G;
      float absmax = 0.0f;  // NaN if any element is (fmax alone would drop it)
      for (int64_t kk = 0; kk < p.G; ++kk) {
        const float v = std::fabs(load_x(p.x, p.xt, base + kk));
        absmax = std::isnan(v) || std::isnan(absmax) ? v + absmax : std::fmax(absmax, v);
      }
      const float inv = absmax == 0.0f ? 0.0f : 127.0f / absmax;
      int32_t sum = 0;
      int8_t* row = xa.xq + m * xa.Kp + g * xa.Gp;
      for (int64_t kk = 0; kk < xa.Gp; ++kk) {
        int q = 0;
        if (kk < p.G) {
          float r = std::nearbyint(load_x(p.x, p.xt, base + kk) * inv);  // half-even
          q = static_cast<int>(std::fmin(127.0f, std::fmax(-127.0f, r)));
        }
        row[kk] = static_cast<int8_t>(q);
        sum += q;
      }
      const float xs = absmax / 127.0f;
      xa.xs[m * p.groups + g] = xs;
      xa.sq[m * p.groups + g] = sum;
      xa.xzs[m * p.groups + g] = xs * static_cast<float>(sum);
    }
  }
}

// The float-product A8 form: x quantized per token (and group) by the int8
// rule (prep_a8's arithmetic) or the fp8 rule, the values as bf16 (exact).
void prep_a8f(const Problem& p, const XA16& xa, float* xgs, int64_t m0, int64_t m1) {
  const bool fp8 = p.af == kAFp8;
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t g = 0; g < p.groups; ++g) {
      const int64_t base = m * p.K + g * p.G;
      float absmax = 0.0f;  // NaN if any element is
      for (int64_t kk = 0; kk < p.G; ++kk) {
        const float v = std::fabs(load_x(p.x, p.xt, base + kk));
        absmax = std::isnan(v) || std::isnan(absmax) ? v + absmax : std::fmax(absmax, v);
      }
      const float top = fp8 ? 448.0f : 127.0f;
      const float inv = absmax == 0.0f ? 0.0f : top / absmax;
      float sum = 0.0f;
      uint16_t* row = xa.xb + m * xa.Kp + g * xa.Gp;
      for (int64_t kk = 0; kk < xa.Gp; ++kk) {
        float q = 0.0f;
        if (kk < p.G) {
          const float v = load_x(p.x, p.xt, base + kk) * inv;
          q = fp8 ? round_to_e4m3(clip_e4m3(v))
                  : std::fmin(127.0f, std::fmax(-127.0f, std::nearbyint(v)));  // half-even
        }
        row[kk] = f32_to_bf16(q);  // exact
        sum += q;
      }
      const float xs = fp8 ? (absmax == 0.0f ? 1.0f : absmax / 448.0f) : absmax / 127.0f;
      xgs[m * p.groups + g] = xs;
      xa.xsum[m * p.groups + g] = p.blockwise ? xs * sum : sum;
    }
    xa.rowexp[m] = p.blockwise ? 1.0f : xgs[m];
  }
}

void pack_a16(const Problem& p, int64_t g, int64_t kk0, int64_t kk1, int64_t n0, uint32_t* panel) {
  for (int64_t s = 0; s < (kk1 - kk0) / 2; ++s)
    for (int c = 0; c < kNR; ++c) {
      const int64_t kk = kk0 + 2 * s, n = n0 + c;
      panel[s * kNR + c] = weight_bf16_at(p, g, kk, n) |
                           (static_cast<uint32_t>(weight_bf16_at(p, g, kk + 1, n)) << 16);
    }
}

void pack_a8(const Problem& p, int64_t g, int64_t kk0, int64_t kk1, int64_t n0, uint32_t* panel) {
  const int bias = p.bits == 8 ? 128 : 8;
  for (int64_t s = 0; s < (kk1 - kk0) / 4; ++s)
    for (int c = 0; c < kNR; ++c) {
      uint32_t d = 0;
      for (int j = 0; j < 4; ++j) {
        const int64_t kk = kk0 + 4 * s + j;
        const int u = (kk < p.G && n0 + c < p.N) ? weight_at(p, g, kk, n0 + c) + bias : 0;
        d |= static_cast<uint32_t>(u) << (8 * j);
      }
      panel[s * kNR + c] = d;
    }
}

void mk_a16(int mr, const uint16_t* x, int64_t ldx, const uint32_t* panel, int64_t steps,
            float* acc, bool init) {
  for (int r = 0; r < mr; ++r)
    for (int c = 0; c < kNR; ++c) {
      float a = init ? 0.0f : acc[r * kNR + c];
      for (int64_t s = 0; s < steps; ++s) {
        const uint32_t w = panel[s * kNR + c];
        a += bf16_to_f32(x[r * ldx + 2 * s + 1]) * bf16_to_f32(static_cast<uint16_t>(w >> 16));
        a += bf16_to_f32(x[r * ldx + 2 * s]) * bf16_to_f32(static_cast<uint16_t>(w));
      }
      acc[r * kNR + c] = a;
    }
}

void mk_a8(int mr, const int8_t* x, int64_t ldx, const uint32_t* panel, int64_t steps,
           int32_t* acc, bool init) {
  for (int r = 0; r < mr; ++r)
    for (int c = 0; c < kNR; ++c) {
      int32_t a = init ? 0 : acc[r * kNR + c];
      for (int64_t s = 0; s < steps; ++s) {
        const uint32_t w = panel[s * kNR + c];
        for (int j = 0; j < 4; ++j)
          a += static_cast<int32_t>((w >> (8 * j)) & 0xff) * x[r * ldx + 4 * s + j];
      }
      acc[r * kNR + c] = a;
    }
}

void fin_a16(const Problem& p, const XA16& xa, int64_t g, int64_t n0, int ncols,
             const float* acc, float* out, bool init) {
  const float* s = p.scale + (p.blockwise ? g * p.N : 0) + n0;
  const float* z = p.has_zp ? p.zp + (p.blockwise ? g * p.N : 0) + n0 : nullptr;
  for (int64_t m = 0; m < p.M; ++m) {
    const float xsum = xa.xsum[m * p.groups + g];
    for (int c = 0; c < ncols; ++c) {
      float a = acc[(m * xa.T) * kNR + c];
      for (int t = 1; t < xa.T; ++t) a += acc[(m * xa.T + t) * kNR + c];
      if (xa.xgs) a *= xa.xgs[m * p.groups + g];
      float v = s[c] * a;
      if (z) v -= z[c] * xsum;
      out[m * kNR + c] = init ? v : out[m * kNR + c] + v;
    }
  }
}

void fin_a8(const Problem& p, const XA8& xa, int64_t g, int64_t n0, int ncols,
            const int32_t* acc, float* out, bool init) {
  const float* s = p.scale + (p.blockwise ? g * p.N : 0) + n0;
  const float* z = p.has_zp ? p.zp + (p.blockwise ? g * p.N : 0) + n0 : nullptr;
  const int32_t bias = p.bits == 8 ? 128 : 8;
  for (int64_t m = 0; m < p.M; ++m) {
    const int64_t i = m * p.groups + g;
    const int32_t comp = bias * xa.sq[i];
    for (int c = 0; c < ncols; ++c) {
      float v = static_cast<float>(acc[m * kNR + c] - comp) * (xa.xs[i] * s[c]);
      if (z) v -= z[c] * xa.xzs[i];
      out[m * kNR + c] = init ? v : out[m * kNR + c] + v;
    }
  }
}

void store(const Problem& p, const float* rowexp, int64_t n0, int ncols, const float* out) {
  for (int64_t m = 0; m < p.M; ++m) {
    const float f = rowexp ? rowexp[m] : 1.0f;
    const int64_t base = m * p.N + n0;
    for (int c = 0; c < ncols; ++c) {
      const float v = out[m * kNR + c] * f;
      if (p.xt == kF32) {
        static_cast<float*>(p.y)[base + c] = v;
      } else {
        static_cast<uint16_t*>(p.y)[base + c] = p.xt == kBF16 ? f32_to_bf16(v) : f32_to_f16(v);
      }
    }
  }
}

}  // namespace

const Kernels& generic_kernels() {
  static const Kernels k = [] {
    Kernels t{};  // the decode forms (dot, K slices) are AVX-512 only: null / 0
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
    return t;
  }();
  return k;
}

}  // namespace xqk
