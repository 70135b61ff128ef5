// Items split among the threads in contiguous runs, each thread taking its own run from the front and then, when it is
// done, the others' last items from their backs. On 2 cores one thread falls behind the other now and then (a
// neighbour on its core, an interrupt, the server's event loop), and with fixed runs the other waited at the loop's
// end: served exact load at 32 clients (AMX Xeon), the OpenMP worker spent 23 % of its time waiting, half of it while
// the engine thread was still in the tile matmuls or the decode attention. With stealing there, 1.03-1.06x the output
// tok/s at 32 clients in exact mode, 1.01-1.06x under w4a8 (three rounds each, alternated). Items handed out one at a
// time from a shared counter instead broke the runs, and the weights' streams with them: 0.96-0.98x. Which thread
// computes an item changes nothing in its arithmetic.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

namespace slipstream {

// body(claim, i) runs once on each thread i (its set-up before its loop); claim() returns its next item, or -1 when
// none is left anywhere. Thread i's own run is [bounds[i], bounds[i + 1]); bounds has a thread count + 1 entries,
// ascending.
template <typename Body>
void for_items_stealing(const std::vector<int64_t>& bounds, const Body& body) {
  const int64_t runs = static_cast<int64_t>(bounds.size()) - 1;
  struct alignas(64) Run {
    std::atomic<uint64_t> range;  // (next item << 32) | end
  };
  const std::unique_ptr<Run[]> run(new Run[runs]);
  for (int64_t i = 0; i < runs; ++i)
    run[i].range.store(static_cast<uint64_t>(bounds[i]) << 32 | static_cast<uint64_t>(bounds[i + 1]));
  // The front item of run i (own) or its back item (stolen), or -1 where it is empty.
  const auto take = [&](int64_t i, bool own) {
    uint64_t r = run[i].range.load(std::memory_order_relaxed);
    while (true) {
      const uint64_t next = r >> 32, end = r & 0xFFFFFFFFu;
      if (next >= end) return int64_t{-1};
      const uint64_t taken = own ? (next + 1) << 32 | end : next << 32 | (end - 1);
      if (run[i].range.compare_exchange_weak(r, taken, std::memory_order_relaxed))
        return static_cast<int64_t>(own ? next : end - 1);
    }
  };
  at::parallel_for(0, runs, 1, [&](int64_t me, int64_t) {
    body([&] {
      if (const int64_t item = take(me, true); item >= 0) return item;
      for (int64_t k = 1; k < runs; ++k)
        if (const int64_t item = take((me + k) % runs, false); item >= 0) return item;
      return int64_t{-1};
    }, me);
  });
}

// Bounds that give each of the threads an equal share of n items.
inline std::vector<int64_t> even_runs(int64_t n) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  std::vector<int64_t> bounds(threads + 1);
  for (int64_t i = 0; i <= threads; ++i) bounds[i] = n * i / threads;
  return bounds;
}

}  // namespace slipstream
