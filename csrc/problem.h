// The checks shared by the two entry points (the XLA FFI handler in
// module.cc and the torch operator in torch_ops.cc). They are the last line of
// defence for memory safety: the Python layers validate first (with the
// user-facing messages, xla_qops/spec.py), so these never fire for input that
// passed there.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "qmm.h"

namespace xqk {

// Sets p.bits, p.blockwise, p.G and p.groups from the static attributes and
// checks the unbatched shapes of w, scale and zero_point (zp may be null)
// against p.K and p.N, which the caller has set. Returns "" when they fit, else
// what does not.
std::string fit_scheme(Problem& p, int64_t block_size, int64_t bits,
                       const std::vector<int64_t>& w, const std::vector<int64_t>& scale,
                       const std::vector<int64_t>* zp);

// Sets p.wf and p.af from the element formats' names: weight_format "int"
// (bits 8 or 4), "fp8" (bits 8) or "fp4" (bits 4); activation_format "int8"
// or "fp8". Returns "" when they fit `bits`, else what does not.
std::string fit_formats(Problem& p, int64_t bits, std::string_view weight_format,
                        std::string_view activation_format);

// Rank of w and of scale for a scheme.
inline size_t weight_rank(bool blockwise) { return blockwise ? 3 : 2; }
inline size_t scale_rank(bool blockwise) { return blockwise ? 2 : 1; }

}  // namespace xqk
