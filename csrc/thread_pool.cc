#include "thread_pool.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace xqk {
namespace {

int default_threads() {
  if (const char* env = std::getenv("XLA_QOPS_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n >= 1) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n >= 1) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

// Waking a sleeping thread costs tens of microseconds here (a futex wake and a
// reschedule inside a VM): more than a whole decode matmul's share of work. So
// after a region a worker polls for the next one for kSpin before it sleeps,
// and the caller polls for the workers to finish before it sleeps; the polls
// call sched_yield, so a spinning thread gives way to any runnable thread
// (XLA's or torch's) instead of starving it. Back-to-back calls (a model's
// layers) then start and end without a wake-up.
constexpr auto kSpin = std::chrono::microseconds(300);

// Polls ready() with pause/yield for at most kSpin; true if it became ready.
template <class Ready>
bool spin_until(const Ready& ready) {
  const auto deadline = std::chrono::steady_clock::now() + kSpin;
  for (int i = 0;; ++i) {
    if (ready()) return true;
    _mm_pause();
    if ((i & 63) == 63) {
      if (std::chrono::steady_clock::now() > deadline) return ready();
      sched_yield();
    }
  }
}

class Pool {
 public:
  Pool() : target_(default_threads()) {}
  ~Pool() { stop(); }

  int threads() const { return target_.load(); }
  void set_threads(int n) {
    std::lock_guard<std::mutex> region(region_);  // not while a region runs
    stop();
    target_ = std::max(1, n);
  }

  void run(int64_t n_tasks, const std::function<void(int64_t)>& fn) {
    if (n_tasks <= 0) return;
    std::unique_lock<std::mutex> region(region_, std::try_to_lock);
    if (!region.owns_lock() || target_ <= 1 || n_tasks == 1) {
      FloatEnv env;
      for (int64_t t = 0; t < n_tasks; ++t) fn(t);
      return;
    }
    start();
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      n_tasks_ = n_tasks;
      next_.store(0);
      active_.store(static_cast<int>(workers_.size()));
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    work(fn, n_tasks);
    if (!spin_until([&] { return active_.load(std::memory_order_acquire) == 0; })) {
      std::unique_lock<std::mutex> lock(mu_);
      done_cv_.wait(lock, [&] { return active_.load() == 0; });
    }
    std::lock_guard<std::mutex> lock(mu_);
    fn_ = nullptr;
  }

 private:
  void work(const std::function<void(int64_t)>& fn, int64_t n_tasks) {
    FloatEnv env;
    for (int64_t t = next_.fetch_add(1); t < n_tasks; t = next_.fetch_add(1)) fn(t);
  }

  // In a forked child the workers did not survive the fork: their std::thread
  // objects are abandoned (leaked, never joined) and new ones are started.
  void forget_workers_after_fork() {
    if (owner_ == getpid()) return;
    new std::vector<std::thread>(std::move(workers_));
    workers_.clear();
    owner_ = getpid();
  }

  void start() {
    forget_workers_after_fork();
    int want = target_ - 1;
    if (static_cast<int>(workers_.size()) == want) return;
    stop();
    quit_ = false;
    const uint64_t gen = generation_.load();
    // A worker starts from the generation current now, so a region published
    // before the thread first runs is not missed.
    for (int i = 0; i < want; ++i) workers_.emplace_back([this, gen] { loop(gen); });
  }

  void stop() {
    forget_workers_after_fork();
    {
      std::lock_guard<std::mutex> lock(mu_);
      quit_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  void loop(uint64_t seen) {
    for (;;) {
      const std::function<void(int64_t)>* fn;
      int64_t n;
      spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; });
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return quit_ || generation_.load() != seen; });
        if (quit_) return;
        seen = generation_.load();
        fn = fn_;
        n = n_tasks_;
      }
      work(*fn, n);
      if (active_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mu_);  // the caller may be about to sleep
        done_cv_.notify_one();
      }
    }
  }

  std::atomic<int> target_;
  std::mutex region_;  // one parallel region at a time
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_tasks_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<int> active_{0};
  std::atomic<uint64_t> generation_{0};  // written under mu_, polled without it
  bool quit_ = false;
  pid_t owner_ = getpid();
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: workers may outlive static teardown
  return *p;
}

}  // namespace

void parallel_for(int64_t n_tasks, const std::function<void(int64_t)>& fn) {
  pool().run(n_tasks, fn);
}
int num_threads() { return pool().threads(); }
void set_num_threads(int n) { pool().set_threads(n); }

const Executor& pool_executor() {
  static const Executor ex{&parallel_for, &num_threads};
  return ex;
}

}  // namespace xqk
