// A small fixed thread pool for the kernels (the caller thread participates).
//
// Determinism: callers split work into tasks that write disjoint outputs with a
// fixed arithmetic order, so which thread runs a task never changes a result.
// Concurrent callers: one parallel region runs at a time; a caller that finds
// the pool busy runs its tasks on its own thread instead of waiting.
#pragma once

#include <cstdint>
#include <functional>

#include "executor.h"

namespace xqk {

// Runs fn(task) for task in [0, n_tasks) and returns when all are done.
void parallel_for(int64_t n_tasks, const std::function<void(int64_t)>& fn);

// Threads used by parallel_for (the caller included). Default: the CPUs this
// process may run on (sched_getaffinity), or XLA_QOPS_NUM_THREADS if set.
int num_threads();
void set_num_threads(int n);  // n >= 1

// parallel_for / num_threads above as an Executor (the XLA FFI path's).
const Executor& pool_executor();

}  // namespace xqk
