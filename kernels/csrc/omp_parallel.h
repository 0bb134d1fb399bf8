// parallel_for for this repository's C++ CPU ops: at::parallel_for's split, on the calling
// thread's OpenMP team, sized by that thread's own count.
//
// Why not at::parallel_for: its header runs `at::init_num_threads()` on a thread's first
// parallel call through each library's own copy of a thread-local flag, and that function
// applies the process-wide count the latest `torch.set_num_threads` stored, from whichever
// thread. Runtime helper threads store 1 (runtime/model/threads.py), so the engine thread's
// first call into an extension built with -fopenmp dropped the engine to one thread for good
// (measured: torch.get_num_threads() 2 -> 1 after the first adapter load). This loop reads
// only omp_get_max_threads() of the calling thread, which torch.set_num_threads on that thread
// sets and no other thread changes. Built without OpenMP it is a serial call.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <mutex>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace loragate_cpu {

// The calling thread's OpenMP team size (1 without OpenMP, or inside a parallel region).
inline int64_t max_threads() {
#ifdef _OPENMP
  return omp_in_parallel() ? 1 : omp_get_max_threads();
#else
  return 1;
#endif
}

// f(chunk_begin, chunk_end) over [begin, end) in at most max_threads() contiguous chunks of at
// least `grain` items each; an exception thrown by any chunk is rethrown here after all end.
template <typename F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t range = end - begin;
  if (range <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t threads = std::min<int64_t>(max_threads(), (range + grain - 1) / grain);
  if (threads <= 1) {
    f(begin, end);
    return;
  }
#ifdef _OPENMP
  std::exception_ptr failure;
  std::mutex failure_lock;
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    const int64_t team = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t chunk = (range + team - 1) / team;
    const int64_t b = begin + id * chunk, e = std::min(end, b + chunk);
    if (b < e) {
      try {
        f(b, e);
      } catch (...) {
        std::lock_guard<std::mutex> hold(failure_lock);
        if (!failure) failure = std::current_exception();
      }
    }
  }
  if (failure) std::rethrow_exception(failure);
#endif
}

}  // namespace loragate_cpu
