// The compute threads of one layer-stack call work as a team (Team::run): the calling thread leads, running the
// layers, and the others wait for its kernels' parallel loops spinning on a shared counter, so that a loop starts and
// ends in well under a microsecond instead of an OpenMP fork and join (~2.3 us with 2 threads, AMD EPYC Zen 3: a decode
// step at batch 1 runs ~150 parallel loops). The kernels split their loops with slipstream::parallel_for, which is
// at::parallel_for outside a team and splits the same way inside one (same chunks to the same thread numbers).
#pragma once
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>

namespace slipstream {

class Team {
 public:
  // Runs body() on this thread, leading a team of the compute threads; alone where there is one thread or this
  // already runs in a parallel region. An exception from body or from a loop's part is rethrown here.
  template <typename Body>
  static void run(const Body& body) {
    const int threads = at::get_num_threads();
    if (threads < 2 || at::in_parallel_region() || leader_ != nullptr) return body();
    Team team;
#pragma omp parallel num_threads(threads)
    {
      if (omp_get_thread_num() == 0) {
        team.size_ = omp_get_num_threads();
        leader_ = &team;
        try {
          body();
        } catch (...) {
          team.error_ = std::current_exception();
        }
        leader_ = nullptr;
        team.post(nullptr, nullptr, 0, 0, 0);  // the others leave
      } else {
        team.serve(omp_get_thread_num());
      }
    }
    if (team.error_) std::rethrow_exception(team.error_);
  }

  // The team this thread leads (null outside Team::run and on the other members).
  static Team* leading() { return leader_; }
  int size() const { return size_; }

  // f(b, e) over [begin, end) in the chunks at::parallel_for gives: at most one a thread; all here for grain or fewer.
  template <typename F>
  void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
    const int64_t n = end - begin;
    if (n <= 0) return;
    if (n <= grain || n == 1) return f(begin, end);
    const int64_t tasks = std::min<int64_t>(size_, (n + grain - 1) / std::max<int64_t>(grain, 1));
    const int64_t chunk = (n + tasks - 1) / tasks;
    post([](const void* fn, int64_t b, int64_t e) { (*static_cast<const F*>(fn))(b, e); }, &f, begin, end, chunk);
    std::exception_ptr own;
    try {
      f(begin, std::min(end, begin + chunk));
    } catch (...) {
      own = std::current_exception();
    }
    while (finished_.load(std::memory_order_acquire) != size_ - 1) _mm_pause();  // (they read f and its range)
    if (own) std::rethrow_exception(own);
    if (failed_.load(std::memory_order_acquire)) std::rethrow_exception(error_);
  }

 private:
  using Call = void (*)(const void*, int64_t, int64_t);
  // Spins (~50-100 us) after which a waiting member gives its core up between checks: the leader may have been
  // descheduled (the HTTP thread runs beside a step).
  static constexpr int SPINS_BEFORE_YIELD = 1 << 12;

  void post(Call call, const void* fn, int64_t begin, int64_t end, int64_t chunk) {
    call_ = call;
    fn_ = fn;
    begin_ = begin;
    end_ = end;
    chunk_ = chunk;
    finished_.store(0, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
  }

  void serve(int rank) {
    for (uint32_t seen = 0;;) {
      uint32_t posted;
      for (int spins = 0; (posted = generation_.load(std::memory_order_acquire)) == seen; ++spins) {
        _mm_pause();
        if (spins > SPINS_BEFORE_YIELD) sched_yield();
      }
      seen = posted;
      if (call_ == nullptr) return;
      const int64_t b = begin_ + rank * chunk_;
      if (b < end_) {
        try {
          call_(fn_, b, std::min(end_, b + chunk_));
        } catch (...) {
          if (!failed_.exchange(true)) error_ = std::current_exception();
        }
      }
      finished_.fetch_add(1, std::memory_order_acq_rel);
    }
  }

  static inline thread_local Team* leader_ = nullptr;
  int size_ = 1;
  Call call_ = nullptr;
  const void* fn_ = nullptr;
  int64_t begin_ = 0, end_ = 0, chunk_ = 0;
  alignas(64) std::atomic<uint32_t> generation_{0};
  alignas(64) std::atomic<int> finished_{0};
  std::atomic<bool> failed_{false};
  std::exception_ptr error_;
};

// at::parallel_for, or the team's where this thread leads one.
template <typename F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (Team* team = Team::leading()) team->parallel_for(begin, end, grain, f);
  else at::parallel_for(begin, end, grain, f);
}

// The threads a parallel loop may use.
inline int num_threads() {
  const Team* team = Team::leading();
  return team != nullptr ? team->size() : at::get_num_threads();
}

}  // namespace slipstream
