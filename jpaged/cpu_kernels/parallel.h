// A parallel loop over XLA's intra-op thread pool, for the FFI kernels.
#ifndef JPAGED_CPU_KERNELS_PARALLEL_H_
#define JPAGED_CPU_KERNELS_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace jpaged {

constexpr int kSpins = 20000;

inline void Pause() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#endif
}

// Runs fn(i) for i in [0, n) on the calling thread and the pool's threads.
// Late tasks (started after every item is done) touch only the shared state.
template <typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, F fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto st = std::make_shared<State>();
  auto* fp = &fn;
  // The caller waits for every item, so fn outlives each call of it; a task
  // that starts later finds no item left and never calls fn.
  auto work = [st, fp, n]() {
    for (int64_t i; (i = st->next.fetch_add(1)) < n;) {
      (*fp)(i);
      if (st->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(st->mu);
        st->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  // Every item has started and the last ones end soon: spin a while (up to
  // a few hundred microseconds) before sleeping, since being woken costs
  // tens of microseconds (in a VM more), paid on every call: with the
  // matmul kernel's 30 products of scripts/bench_cpu_matmul.py at 32 rows,
  // 11.3 -> 10.2 ms.
  for (int spin = 0; spin < kSpins && st->done.load(std::memory_order_acquire) != n; ++spin)
    Pause();
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->done.load() == n; });
}

}  // namespace jpaged

#endif  // JPAGED_CPU_KERNELS_PARALLEL_H_
