// How the driver runs its tasks. Two executors exist: the library's own pool
// (thread_pool.cc; the XLA FFI path) and torch's intra-op pool (torch_ops.cc;
// torch CPU tensors, so that torch's OpenMP workers and the kernels never
// compete for the same cores).
//
// Determinism: the driver splits work into tasks that write disjoint outputs
// with a fixed arithmetic order, so which thread runs a task never changes a
// result; every task runs under FloatEnv.
#pragma once

#include <xmmintrin.h>

#include <cstdint>
#include <functional>

namespace xqk {

struct Executor {
  // Runs fn(task) for task in [0, n_tasks) and returns when all are done.
  void (*parallel_for)(int64_t n_tasks, const std::function<void(int64_t)>& fn);
  // Threads parallel_for uses (the caller included); only sizes the work split.
  int (*num_threads)();
};

// Every task runs with the default floating-point environment (round to
// nearest even, no flush-to-zero / denormals-are-zero), whatever the calling
// thread had set: the same task gives the same bits on any thread.
struct FloatEnv {
  unsigned saved = _mm_getcsr();
  FloatEnv() { _mm_setcsr(0x1f80); }
  ~FloatEnv() { _mm_setcsr(saved); }
  FloatEnv(const FloatEnv&) = delete;
  FloatEnv& operator=(const FloatEnv&) = delete;
};

}  // namespace xqk
