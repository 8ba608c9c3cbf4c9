// The Python extension module xla_qops._cpu_kernels: the XLA FFI handler for
// the cpu platform, plus a few introspection functions.
//
// Target "xla_qops_quantized_matmul":
//   operands  x [..., M, K] (bf16/f16/f32), w (int8 / packed uint8, API.md
//             layout), scale and zero_point (float32, API.md layout; zero_point
//             is ignored unless has_zero_point)
//   result    y [..., M, N] of x's dtype
//   attrs     block_size (-1 per-channel), bits (8, or 4 = packed int4 / fp4),
//             has_zero_point, quantize_activation (0/1), weight_format ("int",
//             "fp8": w float8_e4m3fn, "fp4": w packed e2m1 codes, uint8),
//             activation_format ("int8" or "fp8"; with quantize_activation)
// Leading dims come from vmap (vmap_method="expand_dims"): each operand's are
// either the result's or 1 (broadcast). When only x is batched the batch is
// folded into M, so the weights are streamed once.
#include <Python.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "cpu_features.h"
#include "problem.h"
#include "qmm.h"
#include "thread_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error invalid(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "xla_qops_quantized_matmul: " + what);
}

struct Operand {
  std::vector<int64_t> lead;  // leading (batch) dims
  std::vector<int64_t> core;  // the unbatched shape
  int64_t core_size = 1;
};

bool split(ffi::AnyBuffer::Dimensions dims, size_t core_rank, Operand& o) {
  if (dims.size() < core_rank) return false;
  size_t n_lead = dims.size() - core_rank;
  for (size_t i = 0; i < dims.size(); ++i) (i < n_lead ? o.lead : o.core).push_back(dims[i]);
  for (int64_t d : o.core) o.core_size *= d;
  return true;
}

ffi::Error QmmImpl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> scale,
                   ffi::Buffer<ffi::F32> zp, ffi::Result<ffi::AnyBuffer> y, int64_t block_size,
                   int64_t bits, int64_t has_zero_point, int64_t quantize_activation,
                   std::string_view weight_format, std::string_view activation_format) {
  xqk::Problem p{};
  switch (x.element_type()) {
    case ffi::DataType::BF16: p.xt = xqk::kBF16; break;
    case ffi::DataType::F16: p.xt = xqk::kF16; break;
    case ffi::DataType::F32: p.xt = xqk::kF32; break;
    default: return invalid("x: expected bfloat16, float16 or float32");
  }
  if (y->element_type() != x.element_type()) return invalid("y: expected x's dtype");
  const std::string misformat = xqk::fit_formats(p, bits, weight_format, activation_format);
  if (!misformat.empty()) return invalid(misformat);
  const bool packed = bits == 4;
  if (p.wf == xqk::kWFp8) {
    if (w.element_type() != ffi::DataType::F8E4M3FN)
      return invalid("w: expected float8_e4m3fn (weight_format fp8)");
  } else if (w.element_type() != (packed ? ffi::DataType::U8 : ffi::DataType::S8)) {
    return invalid("w: expected int8 (bits=8) or uint8 packed int4 / fp4 (bits=4)");
  }
  const bool blockwise = block_size != -1;
  p.has_zp = has_zero_point != 0;
  p.qa = quantize_activation != 0;

  Operand ox, ow, os, oz, oy;
  if (!split(x.dimensions(), 2, ox) || !split(w.dimensions(), xqk::weight_rank(blockwise), ow) ||
      !split(scale.dimensions(), xqk::scale_rank(blockwise), os) ||
      !split(zp.dimensions(), xqk::scale_rank(blockwise), oz) || !split(y->dimensions(), 2, oy))
    return invalid("operand ranks do not match the scheme");
  p.M = ox.core[0];
  p.K = ox.core[1];
  p.N = oy.core[1];
  if (oy.core[0] != p.M) return invalid("y: rows differ from x");
  const std::string misfit =
      xqk::fit_scheme(p, block_size, bits, ow.core, os.core, p.has_zp ? &oz.core : nullptr);
  if (!misfit.empty()) return invalid(misfit);

  // Batch dims (from vmap): each operand's leading dims are the result's or 1.
  const size_t L = oy.lead.size();
  for (const Operand* o : {&ox, &ow, &os, &oz}) {
    if (o->lead.size() != L) return invalid("batch ranks differ between operands");
    for (size_t i = 0; i < L; ++i)
      if (o->lead[i] != 1 && o->lead[i] != oy.lead[i]) return invalid("batch dims do not broadcast");
  }
  int64_t batch = 1;
  for (int64_t d : oy.lead) batch *= d;
  const int64_t xbytes = p.xt == xqk::kF32 ? 4 : 2;
  auto* xb = static_cast<const char*>(x.untyped_data());
  auto* wb = static_cast<const uint8_t*>(w.untyped_data());
  const float* sb = scale.typed_data();
  const float* zb = zp.typed_data();
  auto* yb = static_cast<char*>(y->untyped_data());

  bool weights_shared = true;
  for (const Operand* o : {&ow, &os, &oz})
    for (int64_t d : o->lead) weights_shared &= d == 1;
  if (weights_shared) {
    // Only x is batched (or nothing): fold every x row into M; broadcast x if needed.
    bool x_full = true;
    for (size_t i = 0; i < L; ++i) x_full &= ox.lead[i] == oy.lead[i];
    p.w = wb;
    p.scale = sb;
    p.zp = p.has_zp ? zb : nullptr;
    if (x_full) {
      p.x = xb;
      p.y = yb;
      p.M *= batch;
      xqk::run(p, xqk::pool_executor());
      return ffi::Error::Success();
    }
  }
  // General broadcasting: one problem per result batch element.
  std::vector<int64_t> idx(L, 0);
  for (int64_t b = 0; b < batch; ++b) {
    auto offset = [&](const Operand& o) {
      int64_t off = 0;
      for (size_t i = 0; i < L; ++i) off = off * o.lead[i] + (o.lead[i] == 1 ? 0 : idx[i]);
      return off * o.core_size;
    };
    p.x = xb + offset(ox) * xbytes;
    p.w = wb + offset(ow);
    p.scale = sb + offset(os);
    p.zp = p.has_zp ? zb + offset(oz) : nullptr;
    p.y = yb + b * p.M * p.N * xbytes;
    xqk::run(p, xqk::pool_executor());
    for (size_t i = L; i-- > 0;) {
      if (++idx[i] < oy.lead[i]) break;
      idx[i] = 0;
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QuantizedMatmulHandler, QmmImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("block_size")
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("has_zero_point")
                                  .Attr<int64_t>("quantize_activation")
                                  .Attr<std::string_view>("weight_format")
                                  .Attr<std::string_view>("activation_format"));

// ------------------------------------------------------------------ Python API

static PyObject* py_registrations(PyObject*, PyObject*) {
  PyObject* capsule = PyCapsule_New(reinterpret_cast<void*>(&QuantizedMatmulHandler), nullptr, nullptr);
  if (!capsule) return nullptr;
  PyObject* d = Py_BuildValue("{s:N}", "xla_qops_quantized_matmul", capsule);
  return d;
}

static PyObject* py_isa(PyObject*, PyObject*) { return PyUnicode_FromString(xqk::active_isa()); }

static PyObject* py_cpu_features(PyObject*, PyObject*) {
  const xqk::CpuFeatures& f = xqk::cpu_features();
  return Py_BuildValue("{s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:s,s:O}", "avx2", f.avx2 ? Py_True : Py_False,
                       "avx512_core", f.avx512_core ? Py_True : Py_False,
                       "avx512_vbmi", f.avx512_vbmi ? Py_True : Py_False,
                       "avx512_bf16", f.avx512_bf16 ? Py_True : Py_False, "avx512_vnni",
                       f.avx512_vnni ? Py_True : Py_False, "amx_tile", f.amx_tile ? Py_True : Py_False,
                       "amx_bf16", f.amx_bf16 ? Py_True : Py_False, "amx_int8",
                       f.amx_int8 ? Py_True : Py_False, "intel", f.intel ? Py_True : Py_False,
                       "stream_prefetch", xqk::stream_prefetch_into_l1() ? "t0" : "nta",
                       "amx", xqk::amx_in_use() ? Py_True : Py_False);
}

static PyObject* py_num_threads(PyObject*, PyObject*) { return PyLong_FromLong(xqk::num_threads()); }

static PyObject* py_set_num_threads(PyObject*, PyObject* arg) {
  long n = PyLong_AsLong(arg);
  if (n == -1 && PyErr_Occurred()) return nullptr;
  if (n < 1) {
    PyErr_Format(PyExc_ValueError, "num_threads: expected an int >= 1, got %ld", n);
    return nullptr;
  }
  Py_BEGIN_ALLOW_THREADS xqk::set_num_threads(static_cast<int>(n));
  Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyMethodDef kMethods[] = {
    {"registrations", py_registrations, METH_NOARGS, "FFI target name -> handler capsule."},
    {"isa", py_isa, METH_NOARGS, "Kernel set in use: 'avx512' or 'generic'."},
    {"cpu_features", py_cpu_features, METH_NOARGS, "CPUID features relevant to the kernels."},
    {"num_threads", py_num_threads, METH_NOARGS, "Threads the kernels use."},
    {"set_num_threads", py_set_num_threads, METH_O, "Sets the threads the kernels use (>= 1)."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_cpu_kernels",
                              "Host-CPU quantized-matmul kernels (XLA FFI).", -1, kMethods,
                              nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__cpu_kernels() { return PyModule_Create(&kModule); }
