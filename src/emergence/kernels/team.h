// One thread team for a whole decode step (decode.cpp), as llama.cpp keeps one for a whole graph.
//
// at::parallel_for opens an OpenMP region per call: a fork and a join around every matrix
// product, about 150 of them per token for a 30-layer model, each costing more than the
// product's share of work on small matrices. Inside `team(body)` every thread of one region runs
// `body`; a loop over rows (`parallel_rows`: a kernel's weight rows, a batch's token rows) then
// takes this thread's share and waits at a barrier, and work that does not split by rows (a
// mixture of experts' gathers and weighted sums) runs on the first thread (`serially`) while the
// others wait at the barrier after it.
//
// Outside a team both behave as before (parallel_rows is at::parallel_for, serially just runs),
// so the kernels serve the eager ops (gemv.cpp) unchanged.
//
// Rules for code run in a team: every thread must meet the same parallel_rows and serially
// calls in the same order (control flow may depend only on data every thread reads alike), a
// buffer a kernel writes must be shared, not a local of one thread, and nothing may throw (an
// exception leaving an OpenMP region ends the process): checks happen before the team starts.
#pragma once
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace emergence {

// True on a thread while it runs a team's body.
inline thread_local bool t_in_team = false;

// f(begin', end') over this thread's share of [begin, end): the same split as at::parallel_for
// (at most one chunk a thread, no chunk under `grain` unless the range is), then a barrier, so
// every thread sees the whole result after it.
template <typename F>
inline void parallel_rows(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (!t_in_team) {
    at::parallel_for(begin, end, grain, f);
    return;
  }
  const int64_t n = end - begin, g = std::max<int64_t>(grain, 1);
  if (n > 0) {
    const int64_t threads = std::min<int64_t>(omp_get_num_threads(), (n + g - 1) / g);
    const int64_t chunk = (n + threads - 1) / threads, tid = omp_get_thread_num();
    const int64_t start = begin + tid * chunk;
    if (tid < threads && start < end) f(start, std::min(end, start + chunk));
  }
#pragma omp barrier
}

// The threads a parallel_rows call here splits its rows among: the team's, or at::parallel_for's.
inline int64_t team_threads() { return t_in_team ? omp_get_num_threads() : at::get_num_threads(); }

// f() once: on the team's first thread, the others waiting at the barrier after it.
template <typename F>
inline void serially(const F& f) {
  if (!t_in_team) {
    f();
    return;
  }
  if (omp_get_thread_num() == 0) f();
#pragma omp barrier
}

// body() on every thread of one OpenMP team of at::get_num_threads() threads (one thread: no
// region at all).
template <typename F>
inline void team(const F& body) {
  const int threads = at::get_num_threads();
  if (threads <= 1 || omp_in_parallel()) {
    body();
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    t_in_team = true;
    body();
    t_in_team = false;
  }
}

}  // namespace emergence
