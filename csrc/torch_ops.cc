// The kernels as a torch operator, for torch CPU tensors: no JAX, no DLPack,
// and the tasks run on torch's own intra-op pool (at::parallel_for), so that
// torch's OpenMP workers and the kernels never compete for the cores.
//
//   xla_qops_cpu::quantized_matmul(Tensor x, Tensor w, Tensor scale,
//       Tensor? zero_point, int block_size, int bits, bool quantize_activation,
//       str weight_format="int", str activation_format="int8") -> Tensor
//
// x [..., K] (bf16/f16/f32, any strides); w, scale, zero_point as the FFI
// target takes them (module.cc): API.md layouts, contiguous, w int8 (bits 8)
// or packed uint8 (bits 4; int4, or e2m1 codes with weight_format "fp4"),
// or e4m3fn bytes (weight_format "fp8": float8_e4m3fn, or its bits as
// uint8), scale / zero_point float32. The result is
// [..., N] in x's dtype, bit-identical to the FFI target's for the same
// inputs (same kernels; results do not depend on the thread count).
//
// torch_bridge/cpu_ops.py validates the user's arguments (xla_qops.spec) and
// prepares w / scale / zero_point; the checks here only keep the kernels
// in bounds.
//
// Built only when torch is importable at build time (CMakeLists.txt); the
// module is loaded by importing it after torch (it registers the operator
// from static initializers, and torch's libraries satisfy its links).
// Compiled with -fopenmp: at::parallel_for is inline and uses the OpenMP
// runtime that torch already loaded (torch/lib/libgomp.so.1, same soname).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <optional>
#include <string_view>
#include <vector>

#include "problem.h"
#include "qmm.h"

namespace {

// Tasks are pulled from a shared counter by each of torch's threads (the
// driver's tasks are not of equal cost; a static split would idle threads).
void torch_parallel_for(int64_t n_tasks, const std::function<void(int64_t)>& fn) {
  const int64_t workers = std::min<int64_t>(n_tasks, at::get_num_threads());
  if (workers <= 1 || at::in_parallel_region()) {
    xqk::FloatEnv env;
    for (int64_t t = 0; t < n_tasks; ++t) fn(t);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    xqk::FloatEnv env;
    for (int64_t t = next.fetch_add(1); t < n_tasks; t = next.fetch_add(1)) fn(t);
  });
}

int torch_threads() { return at::get_num_threads(); }

const xqk::Executor kTorchExecutor{&torch_parallel_for, &torch_threads};

std::vector<int64_t> dims(const at::Tensor& t) { return t.sizes().vec(); }

// The checked problem of one call (y allocated); x2 keeps a contiguous copy
// of a strided x alive.
struct Call {
  xqk::Problem p{};
  at::Tensor x2, y;
  std::vector<int64_t> out_shape;
};

Call make_call(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
               const std::optional<at::Tensor>& zero_point, int64_t block_size, int64_t bits,
               bool quantize_activation, std::string_view weight_format,
               std::string_view activation_format) {
  const char* op = "xla_qops_cpu::quantized_matmul: ";
  for (const at::Tensor* t : {&x, &w, &scale})
    TORCH_CHECK(t->device().is_cpu(), op, "expected CPU tensors");
  xqk::Problem p{};
  switch (x.scalar_type()) {
    case at::kBFloat16: p.xt = xqk::kBF16; break;
    case at::kHalf: p.xt = xqk::kF16; break;
    case at::kFloat: p.xt = xqk::kF32; break;
    default: TORCH_CHECK(false, op, "x: expected bfloat16, float16 or float32, got ", x.scalar_type());
  }
  TORCH_CHECK(x.dim() >= 1, op, "x: expected [..., K]");
  const std::string misformat = xqk::fit_formats(p, bits, weight_format, activation_format);
  TORCH_CHECK(misformat.empty(), op, misformat);
  if (p.wf == xqk::kWFp8) {
    TORCH_CHECK(w.scalar_type() == at::kFloat8_e4m3fn || w.scalar_type() == at::kByte, op,
                "w: expected float8_e4m3fn (or its bits as uint8) for weight_format fp8, got ",
                w.scalar_type());
  } else {
    TORCH_CHECK(w.scalar_type() == (bits == 4 ? at::kByte : at::kChar), op,
                "w: expected int8 (bits=8) or uint8 packed int4 / fp4 (bits=4), got ",
                w.scalar_type());
  }
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous(), op,
              "scale: expected contiguous float32");
  TORCH_CHECK(w.is_contiguous(), op, "w: expected a contiguous tensor");
  const bool has_zp = zero_point.has_value();
  if (has_zp) {
    TORCH_CHECK(zero_point->device().is_cpu() && zero_point->scalar_type() == at::kFloat &&
                    zero_point->is_contiguous(),
                op, "zero_point: expected contiguous float32 on the CPU");
  }
  p.K = x.size(-1);
  const bool blockwise = block_size != -1;
  TORCH_CHECK(w.dim() == static_cast<int64_t>(xqk::weight_rank(blockwise)), op,
              "w: rank does not match block_size");
  p.N = blockwise ? w.size(2) : w.size(0);
  std::vector<int64_t> zp_dims = has_zp ? dims(*zero_point) : std::vector<int64_t>{};
  const std::string misfit =
      xqk::fit_scheme(p, block_size, bits, dims(w), dims(scale), has_zp ? &zp_dims : nullptr);
  TORCH_CHECK(misfit.empty(), op, misfit);
  p.has_zp = has_zp;
  p.qa = quantize_activation;

  Call call;
  call.out_shape = x.sizes().vec();
  call.out_shape.back() = p.N;
  p.M = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) p.M *= x.size(i);
  call.x2 = x.reshape({p.M, p.K}).contiguous();
  call.y = at::empty({p.M, p.N}, x.options());
  p.x = call.x2.const_data_ptr();
  p.w = static_cast<const uint8_t*>(w.const_data_ptr());
  p.scale = scale.const_data_ptr<float>();
  p.zp = has_zp ? zero_point->const_data_ptr<float>() : nullptr;
  p.y = call.y.mutable_data_ptr();
  call.p = p;
  return call;
}

at::Tensor quantized_matmul(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                            const std::optional<at::Tensor>& zero_point, int64_t block_size,
                            int64_t bits, bool quantize_activation, c10::string_view weight_format,
                            c10::string_view activation_format) {
  Call call = make_call(x, w, scale, zero_point, block_size, bits, quantize_activation,
                        std::string_view(weight_format.data(), weight_format.size()),
                        std::string_view(activation_format.data(), activation_format.size()));
  xqk::run(call.p, kTorchExecutor);  // M == 0 or N == 0: nothing; K == 0: zeros
  return call.y.view(call.out_shape);
}

// The kernels' own time, for the benchmarks: `rounds` passes over the weights
// (w[i], scale[i], zero_point[i]; distinct copies, so that a pass can read
// more than the last-level cache holds), one call each, timed in C++ around
// the same work quantized_matmul does for a call. Returns the seconds of
// every call, [rounds * len(w)], float64.
at::Tensor kernel_seconds(const at::Tensor& x, at::TensorList w, at::TensorList scale,
                          const c10::List<std::optional<at::Tensor>>& zero_point,
                          int64_t block_size, int64_t bits, bool quantize_activation,
                          int64_t rounds, c10::string_view weight_format,
                          c10::string_view activation_format) {
  TORCH_CHECK(!w.empty() && scale.size() == w.size() && zero_point.size() == w.size(),
              "xla_qops_cpu::kernel_seconds: expected equally many w, scale, zero_point");
  std::vector<double> seconds;
  for (int64_t r = 0; r < rounds; ++r)
    for (size_t i = 0; i < w.size(); ++i) {
      const auto start = std::chrono::steady_clock::now();
      Call call = make_call(x, w[i], scale[i], zero_point.get(i), block_size, bits,
                            quantize_activation,
                            std::string_view(weight_format.data(), weight_format.size()),
                            std::string_view(activation_format.data(), activation_format.size()));
      xqk::run(call.p, kTorchExecutor);
      seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
  at::Tensor out = at::empty({static_cast<int64_t>(seconds.size())}, at::kDouble);
  std::copy(seconds.begin(), seconds.end(), out.mutable_data_ptr<double>());
  return out;
}

// x [..., K] (bf16, f16 or f32) times the block-diagonal matrix of normalised
// Sylvester Hadamard blocks of `block` features (torch_bridge/rotation.py):
// per row, the fast Walsh-Hadamard transform in float32 (log2(block) stages
// of sums and differences), scaled by 1/sqrt(block) and rounded once to x's
// dtype. The rotated layers' inputs (smoothing="hadamard") on the direct CPU
// path: at decode sizes a torch mm's call cost 70-125 us beside the layer's
// kernel for 10-20 us of work; this is a few us (rows split over torch's
// threads only where there is work enough).
at::Tensor hadamard_rows(const at::Tensor& x, int64_t block) {
  const char* op = "xla_qops_cpu::hadamard_rows: ";
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1, op, "x: expected a CPU tensor [..., K]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kFloat,
              op, "x: expected bfloat16, float16 or float32, got ", x.scalar_type());
  const int64_t K = x.size(-1);
  TORCH_CHECK(block >= 2 && (block & (block - 1)) == 0 && K % block == 0, op,
              "block: expected a power of two >= 2 dividing K=", K, ", got ", block);
  // A float32 copy of x's rows, transformed in place (never x's own storage).
  at::Tensor f = x.scalar_type() == at::kFloat ? x.reshape({-1, K}).clone(at::MemoryFormat::Contiguous)
                                               : x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t rows = f.size(0);
  float* data = f.mutable_data_ptr<float>();
  const float norm = static_cast<float>(1.0 / std::sqrt(static_cast<double>(block)));
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(K, 1)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* row = data + r * K;
      for (int64_t b0 = 0; b0 < K; b0 += block) {
        float* v = row + b0;
        for (int64_t h = 1; h < block; h *= 2) {
          for (int64_t i = 0; i < block; i += 2 * h) {
            for (int64_t j = i; j < i + h; ++j) {
              const float a = v[j], c = v[j + h];
              v[j] = a + c;
              v[j + h] = a - c;
            }
          }
        }
        for (int64_t j = 0; j < block; ++j) v[j] *= norm;
      }
    }
  });
  return f.to(x.scalar_type()).view(x.sizes());
}

}  // namespace

TORCH_LIBRARY(xla_qops_cpu, m) {
  m.def("quantized_matmul(Tensor x, Tensor w, Tensor scale, Tensor? zero_point, int block_size, "
        "int bits, bool quantize_activation, str weight_format=\"int\", "
        "str activation_format=\"int8\") -> Tensor");
  m.def("kernel_seconds(Tensor x, Tensor[] w, Tensor[] scale, Tensor?[] zero_point, "
        "int block_size, int bits, bool quantize_activation, int rounds, "
        "str weight_format=\"int\", str activation_format=\"int8\") -> Tensor");
  m.def("hadamard_rows(Tensor x, int block) -> Tensor");
}

TORCH_LIBRARY_IMPL(xla_qops_cpu, CPU, m) {
  m.impl("quantized_matmul", &quantized_matmul);
  m.impl("kernel_seconds", &kernel_seconds);
  m.impl("hadamard_rows", &hadamard_rows);
}

// Importing the module (after torch) is what registers the operator.
static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_torch_ops",
                              "Registers torch.ops.xla_qops_cpu.quantized_matmul.", -1, nullptr,
                              nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__torch_ops() { return PyModule_Create(&kModule); }
