#include "problem.h"

namespace xqk {

std::string fit_scheme(Problem& p, int64_t block_size, int64_t bits,
                       const std::vector<int64_t>& w, const std::vector<int64_t>& scale,
                       const std::vector<int64_t>* zp) {
  if (bits != 8 && bits != 4) return "bits: expected 8 or 4";
  const bool packed = bits == 4;
  p.bits = static_cast<int>(bits);
  p.blockwise = block_size != -1;
  if (w.size() != weight_rank(p.blockwise) || scale.size() != scale_rank(p.blockwise) ||
      (zp && zp->size() != scale.size()))
    return "operand ranks do not match the scheme";
  if (p.blockwise) {
    p.G = block_size;
    if (p.G <= 0 || p.K % p.G != 0) return "block_size must divide K";
    p.groups = p.K / p.G;
    if (w[0] != p.groups || w[1] != (packed ? p.G / 2 : p.G) || w[2] != p.N || (packed && p.G % 2))
      return "w: shape does not match [K/B, B(/2), N]";
    if (scale[0] != p.groups || scale[1] != p.N) return "scale: expected [K/B, N]";
  } else {
    p.G = p.K;
    p.groups = 1;
    if (w[0] != p.N || w[1] != (packed ? p.K / 2 : p.K) || (packed && p.K % 2))
      return "w: shape does not match [N, K(/2)]";
    if (scale[0] != p.N) return "scale: expected [N]";
  }
  if (zp && *zp != scale) return "zero_point: expected scale's shape";
  return "";
}

std::string fit_formats(Problem& p, int64_t bits, std::string_view weight_format,
                        std::string_view activation_format) {
  if (weight_format == "int") {
    p.wf = kWInt;
  } else if (weight_format == "fp8") {
    if (bits != 8) return "weight_format fp8: expected bits=8";
    p.wf = kWFp8;
  } else if (weight_format == "fp4") {
    if (bits != 4) return "weight_format fp4: expected bits=4 (packed e2m1 codes)";
    p.wf = kWFp4;
  } else {
    return "weight_format: expected int, fp8 or fp4";
  }
  if (activation_format == "int8") {
    p.af = kAInt8;
  } else if (activation_format == "fp8") {
    p.af = kAFp8;
  } else {
    return "activation_format: expected int8 or fp8";
  }
  return "";
}

}  // namespace xqk
