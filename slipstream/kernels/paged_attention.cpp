// Attention straight from the paged KV cache: each query row (a decode token, or a prompt token: a chunk's rows share
// one block table, a stride-0 view) attends to the first `len` tokens of its block table, without gathering them
// into a contiguous copy. Every row of every step and path takes this kernel on the CPU, its arithmetic independent
// of the other rows (model/attention.py: what makes results independent of batch and prefix cache).
// A task is a pack of query heads of one (tile of rows, KV head) group, which loads and converts each key and value
// row once for the pack and the tile (one head a task when there are too few groups to share among the threads): a
// decode row is a tile alone, a prompt chunk's rows go up to TILE_ROWS a tile (MATRIX_TILE_ROWS on AMX tiles). The
// rows a group shares stay in cache between its tasks. The cache holds float32, float16 (half the bytes to read: ~15 %
// faster at batch 32, where this kernel is a quarter of the step) or int8 rows with a scale each (model/kv_cache.py:
// D + 4 bytes a row); the arithmetic is float32, but for an int8 cache's q . k (int8_key_scores).
// Packs of SmolLM2's 3 heads against one head a task (AMD EPYC Zen 4, 2 threads, batch 32, 164-token contexts):
// 249 -> 172 us a layer with the cache hot, 455 -> 396 us cold; a w4a8 decode step at batch 32 42 -> 36.5 ms.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "cache_lines.h"
#include "kernels.h"
#include "kv_rows.h"
#include "stolen_items.h"
#include "vec.h"
#ifdef __AMX_BF16__
#include "attention_amx.h"
#endif

namespace {

// Eight cache values (float32, or float16 in at::Half) as floats.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const int8_t* p) { return slipstream::load_bytes8(p); }

// An int8 row's values are scaled by the float32 after them (kv_rows.h): a key's by its score, a value's by
// its probability.
template <typename C>
constexpr bool SCALED = std::is_same_v<C, int8_t>;
template <typename C>
constexpr int64_t row_width(int64_t D) { return SCALED<C> ? slipstream::int8_row_width(D) : D; }

// A step's keys and values come from DRAM or L3 (the weights streamed through the caches since the last step), and
// a KV head's rows run on only within a block (model/kv_cache.py): so the kernel asks for them ahead, values
// 2 x PREFETCH tokens, keys 4 x (eight at a time). With the cache laid out token by token (a head's row a slice of
// each token's row of all heads, which the hardware prefetcher did not follow) this made the kernel 17-20 % faster
// at batch 8 / 32 or 600-token contexts with the cache cold, the same with it hot (AMD EPYC Zen 4, SmolLM2-135M's
// heads); a head's rows together in a block then took float16 1.12-1.14x at batch 8 / 32 cold, the same hot.
constexpr int64_t PREFETCH = 8;

template <typename C>
inline void prefetch_row(const C* row, int64_t count) {
  for (int64_t i = 0; i < count * static_cast<int64_t>(sizeof(C)); i += 64)
    _mm_prefetch(reinterpret_cast<const char*>(row) + i, _MM_HINT_T0);
}

// The next KV group's keys and values, brought into L2 while this group's heads run: a group's rows come from
// DRAM (the weights streamed through the caches since the last step) and its first head would wait on them.
// Each head of a group prefetches its share of the next group's rows, a few each eight tokens it works through.
template <typename C>
struct AheadStream {
  const C* keys;
  const C* values;
  int64_t row_elems;
  std::vector<int64_t> rows;  // the next group's row offsets; empty when another thread runs it
  int64_t next = 0, end = 0, per_step = 0;

  // Task `g` of G in a group whose L tokens take 2 * ceil(L / 8) steps: its share of the rows, spread over them.
  void start_task(int64_t g, int64_t G, int64_t L) {
    const int64_t n = static_cast<int64_t>(rows.size()), share = (n + G - 1) / G, steps = 2 * ((L + 7) / 8);
    next = std::min(n, g * share);
    end = std::min(n, next + share);
    per_step = (share + steps - 1) / steps;
  }

  [[gnu::always_inline]] void step() {
    for (const int64_t stop = std::min(end, next + per_step); next < stop; ++next)
      for (int64_t i = 0; i < row_elems * static_cast<int64_t>(sizeof(C)); i += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(keys + rows[next]) + i, _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(values + rows[next]) + i, _MM_HINT_T1);
      }
  }
};

// A task's heads share their KV head's rows (GQA): each key and value row is loaded and converted once for all of
// them. Beyond one head, the accumulators of 8 keys (or 64 value dimensions) for each of 3 heads need the 32
// registers of an AVX-512 build; an AVX2 build takes 4 keys and 32 dimensions at a time.
#if defined(__AVX512F__)
constexpr bool WIDE_REGISTERS = true;
#else
constexpr bool WIDE_REGISTERS = false;
#endif
constexpr int MAX_PACK = 3;  // heads a task takes together
// (The loops over heads, keys and dimensions below are unrolled by pragma: left to GCC, the nested loops stayed
// rolled and the accumulator arrays in memory, every update a store and a reload.)

// Query rows that attend through one block table to lengths one apart (a prompt chunk's rows) go in tiles of up to
// TILE_ROWS: each key and value row is read once for the tile (from DRAM or L3: a long prompt's keys outgrow L2) and
// reused from L1 by every row that reaches it, where each row alone read them all. A row's arithmetic is the same in
// a tile of any size (the same tiles of keys from token 0, each lane's sum over tokens in order): results stay
// independent of the batch.
constexpr int64_t TILE_ROWS = 16;
// Where the AMX tiles serve a prompt's tiles (attention_amx.h) and its rows attend to MATRIX_TILE_CONTEXT tokens or
// more, up to this many rows a tile: each 128-token chunk of its keys and values, split for the tiles, is read from L3
// once for 64 rows and from L2 by the rest. (Against 16, a 512-row chunk's attention from token 2048 / 7000 1.12x /
// 1.04x, a 6000-token prompt's prefill 1.07x; but from token 0 0.95x and a 300-row prompt's beside 32 decodes 0.92x,
// fewer tasks for the threads to share where the keys and values stay in L2 anyway: AMX Xeon.)
constexpr int64_t MATRIX_TILE_ROWS = 64, MATRIX_TILE_CONTEXT = 1024;
constexpr int64_t MAX_TILE_ROWS = std::max(TILE_ROWS, MATRIX_TILE_ROWS);
// A row's value sums take this many tokens before the tile's next row takes them (the rows' accumulators wait in
// `out`; a lone row takes all its tokens at once).
constexpr int64_t VALUE_SPAN = 64;

// A row of 2 x SPAN tokens or more attends to them in spans: SPAN tokens each from token 0, the last taking the rest
// (up to 2 x SPAN - 1). A span's softmax is its own (its probabilities times its values; its maximum and sum beside
// them), and the row's result folds the spans' in together, in order (fold_span). A row's spans follow from its own
// length and its arithmetic from them, so it is the same in any batch; a row of one span is computed as before spans
// were. Rows of up to SPAN_TASK_ROWS a run (a decode row, with its guesses) take a task a span: the threads then share
// a long row's keys and values, and a task reads each key and value row once for a pack of heads, where batch 1's
// three KV groups had left one head a task for two threads (each row read three times, from DRAM or L3 at these
// lengths, and one thread given twice the other's work); the task that ends a run's last span folds them. A prompt's
// runs of more rows take their spans one after another in one task, folding each in as it ends (their results a
// span each would outweigh the keys and values they attend to). (A decode step alternated against the kernel
// without spans, `benchmarks/engine_ab.py`, AMD EPYC Zen 3: 1.25x / 1.06x / 1.13x at batch 1 / 2 / 8 with
// 2000-token contexts in exact mode, 1.63x at batch 1 with 8000, 1.43x at batch 1 with 2000 under w4a8; a prompt
// chunk's attention 1.00-1.03x. Spans of 256 from token 0 with a short last one cost up to 0.82x at batch 32 from
// 300 tokens.)
constexpr int64_t SPAN = 256, SPAN_TASK_ROWS = 4;

struct SoftmaxStats {
  float max, sum;
};

// A task's query rows for the span of tokens it takes: lengths (within the span) ascending, the last the longest.
struct TaskRows {
  int64_t n = 0;
  const float* q[MAX_TILE_ROWS];  // P rows of D each
  float* out[MAX_TILE_ROWS];
  SoftmaxStats* stats[MAX_TILE_ROWS];  // the span's softmax maximum and sum for each of P heads; null for one span
  int64_t len[MAX_TILE_ROWS];
  const uint16_t* parts = nullptr;  // its keys and values split for the AMX tiles (attention_amx.h), if they serve it
  int64_t longest() const { return len[n - 1]; }
};

// The T keys of the tile at t0 (the last one repeated past L) into k.
template <int T, typename C>
[[gnu::always_inline]] inline void tile_keys(const C* keys, const int64_t* rows, int64_t t0, int64_t L,
                                             const C* (&k)[T]) {
  const int64_t n = std::min<int64_t>(T, L - t0);
  #pragma GCC unroll 8
  for (int j = 0; j < T; ++j) k[j] = keys + rows[t0 + std::min<int64_t>(j, n - 1)];
}

// tile(r, k, t0) for each tile of T keys from token 0 and each of the task's rows that reaches it, k the tile's keys
// for that row; the keys 4 x PREFETCH ahead of the longest row asked for, and the next group's stream stepped.
template <int T, typename C, typename Tile>
[[gnu::always_inline]] inline void for_key_tiles(const TaskRows& task, const C* keys, const int64_t* rows,
                                                 int64_t width, AheadStream<C>& ahead, Tile&& tile) {
  const int64_t L = task.longest();
  for (int64_t t0 = 0; t0 < L; t0 += T) {
    const C* k[T];
    tile_keys(keys, rows, t0, L, k);
    for (int64_t j = t0 + 4 * PREFETCH; j < std::min(L, t0 + 4 * PREFETCH + T); ++j) prefetch_row(keys + rows[j], width);
    if (t0 % 8 == 0) ahead.step();
    for (int64_t r = 0; r < task.n; ++r) {
      if (task.len[r] >= t0 + T || r == task.n - 1) {
        tile(r, k, t0);
      } else if (task.len[r] > t0) {  // a shorter row's last tile
        const C* mine[T];
        tile_keys(keys, rows, t0, task.len[r], mine);
        tile(r, mine, t0);
      }
    }
  }
}

// The P rows of scores past L, up to a multiple of 8, -> -inf (no weight in the softmax).
template <int P>
inline void pad_scores(float* const* scores, int64_t L) {
  const float pad = -std::numeric_limits<float>::infinity();
  for (int g = 0; g < P; ++g) std::fill(scores[g] + L, scores[g] + (L + 7) / 8 * 8, pad);
}

// Scores of each row's P queries (rows of D) against its keys (row offsets `rows` into `keys`), T keys at a time so
// T x P independent FMA chains run and one horizontal reduction serves T keys, into scores[r * P + g].
template <int P, typename C>
void key_scores(const TaskRows& task, const C* keys, const int64_t* rows, int64_t D, float scale,
                float* const* scores, AheadStream<C>& ahead) {
  constexpr int T = P == 1 || WIDE_REGISTERS ? 8 : 4;
  const __m256 sv = _mm256_set1_ps(scale);
  for_key_tiles<T>(task, keys, rows, D, ahead, [&](int64_t r, const C* const (&k)[T], int64_t t0) {
    const float* q = task.q[r];
    __m256 acc[P][T];
    #pragma GCC unroll 8
    for (int g = 0; g < P; ++g)
      #pragma GCC unroll 8
      for (int j = 0; j < T; ++j) acc[g][j] = _mm256_setzero_ps();
    for (int64_t i = 0; i < D; i += 8) {
      __m256 qv[P];
      #pragma GCC unroll 8
      for (int g = 0; g < P; ++g) qv[g] = _mm256_loadu_ps(q + g * D + i);
      #pragma GCC unroll 8
      for (int j = 0; j < T; ++j) {
        const __m256 kv = load8(k[j] + i);
        #pragma GCC unroll 8
        for (int g = 0; g < P; ++g) acc[g][j] = _mm256_fmadd_ps(qv[g], kv, acc[g][j]);
      }
    }
    #pragma GCC unroll 8
    for (int g = 0; g < P; ++g) {
      float* s = scores[r * P + g] + t0;
      if constexpr (T == 8) _mm256_storeu_ps(s, _mm256_mul_ps(slipstream::hsum8(acc[g]), sv));
      else _mm_storeu_ps(s, _mm_mul_ps(slipstream::hsum4(acc[g]), _mm256_castps256_ps128(sv)));
    }
  });
}

// key_scores for int8 keys (D a multiple of 32: KernelTable.cache_fits), in integers: the queries rounded to int8
// too, with a scale a head (as llama.cpp rounds its query for a q8_0 cache), and q . k summed by dot_u8s8 as
// |q| . (k with q's signs) (products of two signed bytes, of which VNNI's vpdpbusd takes one unsigned): 32
// multiply-adds in 2 instructions with VNNI, 4 without, where float32 took 4 FMAs and the keys' conversion. The
// kernel's int8 path measured 1.46-1.55x the float16 one before the cache's layout by blocks, 1.2-1.36x after it
// (benchmarks/decode_attention.py: 30 layers, batch 8 / 32, 164-200 tokens, cold; AMD EPYC Zen 4); hot 0.9-1.0x
// (its values' conversion to float32).
template <int P>
void int8_key_scores(const TaskRows& task, const int8_t* keys, const int64_t* rows, int64_t D, float scale,
                     float* const* scores, AheadStream<int8_t>& ahead, std::vector<int8_t>& scratch) {
  constexpr int T = P == 1 || WIDE_REGISTERS ? 8 : 4;
  scratch.resize(task.n * 2 * P * D);  // a row's P rows of D rounded to int8, then their magnitudes
  float q_scales[MAX_TILE_ROWS][P];
  for (int64_t r = 0; r < task.n; ++r) {
    int8_t* q8 = scratch.data() + r * 2 * P * D;
    for (int g = 0; g < P; ++g) {
      q_scales[r][g] = slipstream::round_to_int8(task.q[r] + g * D, D, q8 + g * D) * scale;
      for (int64_t d = 0; d < D; ++d) q8[(P + g) * D + d] = static_cast<int8_t>(std::abs(q8[g * D + d]));
    }
  }
  const auto at = [](const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
  for_key_tiles<T>(task, keys, rows, row_width<int8_t>(D), ahead, [&](int64_t r, const int8_t* const (&k)[T],
                                                                      int64_t t0) {
    const int8_t* q8 = scratch.data() + r * 2 * P * D;
    const int8_t* magnitudes = q8 + P * D;  // |q8|, read as unsigned bytes
    __m256i acc[P][T];
    #pragma GCC unroll 8
    for (int g = 0; g < P; ++g)
      #pragma GCC unroll 8
      for (int j = 0; j < T; ++j) acc[g][j] = _mm256_setzero_si256();
    for (int64_t i = 0; i < D; i += 32) {
      #pragma GCC unroll 8
      for (int j = 0; j < T; ++j) {
        const __m256i kv = at(k[j] + i);
        #pragma GCC unroll 8
        for (int g = 0; g < P; ++g)
          acc[g][j] = slipstream::dot_u8s8(acc[g][j], at(magnitudes + g * D + i),
                                           _mm256_sign_epi8(kv, at(q8 + g * D + i)));
      }
    }
    // The keys' scales gathered in a register: stored to a buffer and loaded as one vector, they stalled every 8 tokens
    // (a wide load over narrower stores, which store forwarding cannot serve).
    const auto row_scale = [&](int j) { return j < T ? slipstream::int8_row_scale(k[j], D) : 0.0f; };
    const __m256 key_scale = _mm256_setr_ps(row_scale(0), row_scale(1), row_scale(2), row_scale(3), row_scale(4),
                                            row_scale(5), row_scale(6), row_scale(7));
    #pragma GCC unroll 8
    for (int g = 0; g < P; ++g) {
      __m256 sums[T];  // (exact: a lane's sum is below 2^24 for D < 1040)
      #pragma GCC unroll 8
      for (int j = 0; j < T; ++j) sums[j] = _mm256_cvtepi32_ps(acc[g][j]);
      const __m256 scale_t = _mm256_mul_ps(_mm256_set1_ps(q_scales[r][g]), key_scale);
      float* s = scores[r * P + g] + t0;
      if constexpr (T == 8) _mm256_storeu_ps(s, _mm256_mul_ps(slipstream::hsum8(sums), scale_t));
      else _mm_storeu_ps(s, _mm_mul_ps(slipstream::hsum4(sums), _mm256_castps256_ps128(scale_t)));
    }
  });
}

// scores -> softmax probabilities in place (padding -> 0); returns the scores' maximum and the sum of their
// exponentials less it. L >= 1.
SoftmaxStats softmax(float* s, int64_t L) {
  const int64_t padded = (L + 7) / 8 * 8;
  __m256 mx = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < padded; t += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + t));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mx);
  const __m256 m = _mm256_set1_ps(*std::max_element(lanes, lanes + 8));
  __m256 sum = _mm256_setzero_ps();
  for (int64_t t = 0; t < padded; t += 8) {
    const __m256 e = slipstream::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), m));
    _mm256_storeu_ps(s + t, e);
    if (t + 8 <= L) sum = _mm256_add_ps(sum, e);
  }
  float total = slipstream::hsum(sum);
  for (int64_t t = L / 8 * 8; t < L; ++t) total += s[t];
  const __m256 inv = _mm256_set1_ps(1.0f / total);
  for (int64_t t = 0; t < padded; t += 8) _mm256_storeu_ps(s + t, _mm256_mul_ps(_mm256_loadu_ps(s + t), inv));
  return {_mm256_cvtss_f32(m), total};
}

// Span s of a row's head (D values `part`: its probabilities times its values; its softmax maximum and sum) folded
// into the head's running result: `acc` (D values: each span's weighed by exp(its maximum - top) times its sum), the
// greatest maximum so far and the weights' total. Span 0 starts it; after the last, acc / total is the result.
inline void fold_span(int64_t s, const float* part, SoftmaxStats span, float* acc, SoftmaxStats& run, int64_t D) {
  const float top = s ? std::max(run.max, span.max) : span.max;
  const float kept = s ? std::exp(run.max - top) : 0.0f, weight = std::exp(span.max - top) * span.sum;
  run = {top, (s ? run.sum * kept : 0.0f) + weight};
  const __m256 k = _mm256_set1_ps(kept), w = _mm256_set1_ps(weight);
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 weighed = _mm256_mul_ps(_mm256_loadu_ps(part + d), w);
    _mm256_storeu_ps(acc + d, s ? _mm256_fmadd_ps(_mm256_loadu_ps(acc + d), k, weighed) : weighed);
  }
}

inline void finish_spans(float* acc, SoftmaxStats run, int64_t D) {
  const __m256 inv = _mm256_set1_ps(1.0f / run.sum);
  for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(acc + d, _mm256_mul_ps(_mm256_loadu_ps(acc + d), inv));
}

// out[g * D + d0 : ... + 8 * NV] = sum_t p[g][t] * values[rows[t] + d0 : ...] for each row's P heads (p[r * P + g]),
// VALUE_SPAN tokens a row at a time (the accumulators wait in out between). NV is a compile-time count so the
// accumulators stay in registers (with a runtime count GCC kept them on the stack, and every token's update waited
// on a store and a reload: 20 % of the kernel at batch 32). The first row asks for values ahead, and its first part
// of a row steps the AheadStream (which counts on one pass over the tokens).
template <int P, int NV, typename C>
void weighted_values_part(const TaskRows& task, float* const* p, const C* values, const int64_t* rows, int64_t D,
                          int64_t d0, AheadStream<C>& ahead) {
  const int64_t L = task.longest(), span = task.n == 1 ? L : VALUE_SPAN;
  for (int64_t t_begin = 0; t_begin < L; t_begin += span)
    for (int64_t r = 0; r < task.n; ++r) {
      const int64_t t_end = std::min(task.len[r], t_begin + span);
      if (t_begin >= t_end) continue;  // (a row past its length: its sums are in out already)
      const bool lead = r == 0;
      float* out = task.out[r] + d0;
      __m256 acc[P][NV];
      #pragma GCC unroll 8
      for (int g = 0; g < P; ++g)
        #pragma GCC unroll 8
        for (int i = 0; i < NV; ++i) acc[g][i] = t_begin ? _mm256_loadu_ps(out + g * D + 8 * i) : _mm256_setzero_ps();
      for (int64_t t = t_begin; t < t_end; ++t) {
        __m256 pt[P];
        #pragma GCC unroll 8
        for (int g = 0; g < P; ++g) pt[g] = _mm256_broadcast_ss(p[r * P + g] + t);
        const C* v = values + rows[t] + d0;
        if (lead) {
          if (t + 2 * PREFETCH < L) prefetch_row(values + rows[t + 2 * PREFETCH] + d0, 8 * NV);
          if (d0 == 0 && t % 8 == 0) ahead.step();
        }
        #pragma GCC unroll 8
        for (int i = 0; i < NV; ++i) {
          const __m256 vv = load8(v + 8 * i);
          #pragma GCC unroll 8
          for (int g = 0; g < P; ++g) acc[g][i] = _mm256_fmadd_ps(pt[g], vv, acc[g][i]);
        }
      }
      #pragma GCC unroll 8
      for (int g = 0; g < P; ++g)
        #pragma GCC unroll 8
        for (int i = 0; i < NV; ++i) _mm256_storeu_ps(out + g * D + 8 * i, acc[g][i]);
    }
}

// Each row's out[g * D : (g + 1) * D] = sum_t p[r * P + g][t] * values[rows[t]]: 64 dimensions at a time (32 for
// several heads without AVX-512's registers), then 32, 16, 8.
template <int P, typename C>
void weighted_values(const TaskRows& task, float* const* p, const C* values, const int64_t* rows, int64_t D,
                     AheadStream<C>& ahead) {
  constexpr int WIDEST = P == 1 || WIDE_REGISTERS ? 8 : 4;
  int64_t d0 = 0;
  for (; d0 + 8 * WIDEST <= D; d0 += 8 * WIDEST) weighted_values_part<P, WIDEST>(task, p, values, rows, D, d0, ahead);
  if (WIDEST > 4 && D - d0 >= 32) weighted_values_part<P, 4>(task, p, values, rows, D, d0, ahead), d0 += 32;
  if (D - d0 >= 16) weighted_values_part<P, 2>(task, p, values, rows, D, d0, ahead), d0 += 16;
  if (D - d0 >= 8) weighted_values_part<P, 1>(task, p, values, rows, D, d0, ahead);
}

// Each row's scores -> its softmax probabilities (an int8 cache's times each value row's scale).
template <int P, typename C>
void probabilities(const TaskRows& task, float* const* s, const C* values, const int64_t* rows, int64_t D) {
  for (int64_t r = 0; r < task.n; ++r) {
    pad_scores<P>(s + r * P, task.len[r]);  // (the scores of a row's last tile past its length)
    for (int g = 0; g < P; ++g) {
      const SoftmaxStats stats = softmax(s[r * P + g], task.len[r]);
      if (task.stats[r]) task.stats[r][g] = stats;
    }
    if constexpr (SCALED<C>)
      for (int64_t t = 0; t < task.len[r]; ++t) {
        const float scale_t = slipstream::int8_row_scale(values + rows[t], D);
        for (int g = 0; g < P; ++g) s[r * P + g][t] *= scale_t;
      }
  }
}

#ifdef __AMX_BF16__
using TileScratch = slipstream::amx::AttentionScratch;
#else
struct TileScratch {};
#endif

// P heads of one KV head for each of the task's rows (q and out at each row's first head).
template <int P, typename C>
void attend(const TaskRows& task, const C* keys, const C* values, const int64_t* rows, int64_t D, float scale,
            std::vector<float>& scores, std::vector<int8_t>& scratch, [[maybe_unused]] TileScratch& tile_scratch,
            AheadStream<C>& ahead) {
#ifdef __AMX_BF16__
  if (task.parts) {
    slipstream::amx::configure_tiles();
    slipstream::amx::tile_attention(task, P, task.parts, D, scale, tile_scratch);
    _tile_release();
    return;
  }
#endif
  const int64_t padded = (task.longest() + 7) / 8 * 8;
  scores.resize(task.n * P * padded);
  float* s[MAX_TILE_ROWS * P];
  for (int64_t i = 0; i < task.n * P; ++i) s[i] = scores.data() + i * padded;
  if constexpr (SCALED<C>) int8_key_scores<P>(task, keys, rows, D, scale, s, ahead, scratch);
  else key_scores<P>(task, keys, rows, D, scale, s, ahead);
  probabilities<P>(task, s, values, rows, D);
  weighted_values<P>(task, s, values, rows, D, ahead);
}

// Whether the AMX tiles serve a cache of C with heads of D (a prompt's tiles of ATTENTION_MIN_ROWS rows or more).
template <typename C>
bool matrix_tiles_serve([[maybe_unused]] int64_t D) {
#ifdef __AMX_BF16__
  return std::is_same_v<C, float> && D % 32 == 0 && slipstream::amx::tiles_permitted();
#else
  return false;
#endif
}

// The keys and values of the prompt tiles the AMX tiles serve (attention_amx.h: tiles of ATTENTION_MIN_ROWS rows or
// more over a float32 cache, exact mode's; the float16 and int8 caches are w4a8's, whose rows stay bitwise the same in
// any batch), split for them once for each block table and KV head the tiles share (a prompt chunk's tiles share
// one). Returns each (tile, KV head) group's parts, null where the FMA kernel serves it; empty where none take them.
// The parts stay in this thread's buffer until its next call.
#ifdef __AMX_BF16__
template <typename C, typename TokenRows>
std::vector<const uint16_t*> split_for_tiles(const std::vector<std::pair<int64_t, int64_t>>& tiles, const int64_t* lens,
                                             const int64_t* bt, int64_t W, int64_t bs, int64_t Hkv, int64_t D,
                                             const C* kp, const C* vp, TokenRows&& token_rows) {
  namespace amx = slipstream::amx;
  std::vector<const uint16_t*> parts;
  if constexpr (std::is_same_v<C, float>) {
    if (!matrix_tiles_serve<C>(D)) return parts;
    struct Source {
      int64_t b, L;  // the row whose table it reads, its tokens
    };
    std::vector<Source> sources;
    std::vector<int64_t> source_of(tiles.size(), -1);
    for (size_t i = 0; i < tiles.size(); ++i) {
      const auto [first, n] = tiles[i];
      if (n < amx::ATTENTION_MIN_ROWS) continue;
      const int64_t b = first + n - 1, L = lens[b];
      if (!sources.empty()) {
        Source& last = sources.back();
        const int64_t blocks = (std::max(L, last.L) + bs - 1) / bs;
        if (W == 0 || std::equal(bt + b * W, bt + b * W + blocks, bt + last.b * W)) {
          if (L > last.L) last = {b, L};
          source_of[i] = static_cast<int64_t>(sources.size()) - 1;
          continue;
        }
      }
      source_of[i] = static_cast<int64_t>(sources.size());
      sources.push_back({b, L});
    }
    if (sources.empty()) return parts;
    // (source, KV head) j's steps of 32 tokens are [steps_before[j], steps_before[j + 1])
    std::vector<int64_t> steps_before{0};
    for (const Source& source : sources)
      for (int64_t kvh = 0; kvh < Hkv; ++kvh) steps_before.push_back(steps_before.back() + (source.L + 31) / 32);
    thread_local slipstream::CacheLineVector<uint16_t> buffer;  // (this thread's: the threads below write through `out`)
    buffer.resize(steps_before.back() * amx::step_words(D));
    uint16_t* const out = buffer.data();
    at::parallel_for(0, steps_before.back(), 8, [&](int64_t begin, int64_t end) {
      int64_t j = std::upper_bound(steps_before.begin(), steps_before.end(), begin) - steps_before.begin() - 1;
      for (int64_t step = begin; step < end; ++step) {
        while (step >= steps_before[j + 1]) ++j;
        const Source& source = sources[j / Hkv];
        const int64_t t0 = 32 * (step - steps_before[j]), n = std::min<int64_t>(32, source.L - t0);
        int64_t rows[32];
        token_rows(source.b, j % Hkv, t0, n, rows);
        amx::split_step(kp, vp, rows, n, D, out + step * amx::step_words(D));
      }
    });
    parts.assign(tiles.size() * Hkv, nullptr);
    for (size_t i = 0; i < tiles.size(); ++i)
      for (int64_t kvh = 0; source_of[i] >= 0 && kvh < Hkv; ++kvh)
        parts[i * Hkv + kvh] = out + steps_before[source_of[i] * Hkv + kvh] * amx::step_words(D);
  }
  return parts;
}
#else
template <typename C, typename... Args>
std::vector<const uint16_t*> split_for_tiles(Args&&...) {
  return {};
}
#endif

// Cache element C: float, at::Half or int8_t. Rows go in tiles (TILE_ROWS); a task is a pack of up to MAX_PACK heads
// of a (tile, KV head, span) group when there are two groups or more a thread, one head otherwise (batch 1 below
// 2 x SPAN tokens: 3 groups for 2 threads). (From four a thread before: two query rows, 6 groups for 2 threads, then
// took one head a task and converted each key and value row three times; in packs, 16-21 % faster hot at 300
// tokens, a w4a8 step at batch 2 1.04x, AMD EPYC Zen 4. A head's arithmetic is the same in a pack as alone.)
template <typename C>
void decode(const float* qp, int64_t ldq, const C* kp, const C* vp, const int64_t* bt, const int64_t* lens, float* op,
            int64_t B, int64_t H, int64_t D, int64_t bs, int64_t Hkv, int64_t W, float scale) {
  const auto spans_of = [&](int64_t b) { return std::max<int64_t>(1, lens[b] / SPAN); };
  // Tiles: (first row, rows), a row joining the last tile where it attends through the same table one token further.
  std::vector<std::pair<int64_t, int64_t>> tiles;
  const bool matrix = matrix_tiles_serve<C>(D);
  for (int64_t b = 0; b < B; ++b) {
    if (!tiles.empty()) {
      auto& [first, n] = tiles.back();
      const int64_t last = first + n - 1;
      const int64_t tile_rows = matrix && lens[b] >= MATRIX_TILE_CONTEXT ? MATRIX_TILE_ROWS : TILE_ROWS;
      if (n < tile_rows && lens[b] == lens[last] + 1 &&
          (W == 0 || std::equal(bt + b * W, bt + b * W + (lens[b] + bs - 1) / bs, bt + last * W))) {
        ++n;
        continue;
      }
    }
    tiles.emplace_back(b, 1);
  }
  const int64_t num_tiles = static_cast<int64_t>(tiles.size()), G = H / Hkv;
  const int64_t width = row_width<C>(D);
  // The row offsets of KV head kvh's tokens [t0, t0 + n) through row b's block table.
  auto token_rows = [&](int64_t b, int64_t kvh, int64_t t0, int64_t n, int64_t* out) {
    for (int64_t t = t0, j = t0 / bs; t < t0 + n; ++j)  // block by block: no division per token
      for (int64_t first_slot = (bt[b * W + j] * Hkv + kvh) * bs, o = t % bs; o < bs && t < t0 + n; ++o, ++t)
        out[t - t0] = (first_slot + o) * width;
  };
  const std::vector<const uint16_t*> tile_parts =
      split_for_tiles<C>(tiles, lens, bt, W, bs, Hkv, D, kp, vp, token_rows);
  // Groups: a run of a tile's rows, a KV head and spans of tokens. A tile on the AMX tiles is one run and takes its
  // tokens in one span; a tile the FMA kernel serves splits into runs of rows with as many spans (two at most: its
  // rows' lengths are one apart).
  struct Group {
    int64_t first, n, kvh, spans;  // rows [first, first + n), each of `spans` spans; KV head kvh
    int64_t s0, s1;  // the spans it takes
    const uint16_t* parts;  // its keys and values split for the AMX tiles, if they serve it
    int64_t unit;  // for a span of a run that takes a task a span: its (run, KV head)'s index in `unit_spans`; else -1
    int64_t t0(int64_t s) const { return s * SPAN; }
    int64_t t1(int64_t s, const int64_t* lens) const { return s + 1 < spans ? (s + 1) * SPAN : lens[first + n - 1]; }
  };
  // The results of the spans of runs that take a task a span, until the last is done: for row b's span s and head h,
  // D values at slot (slot_of[b] + s * H + h) of `spans_out`, its softmax maximum and sum at that slot of
  // `spans_stats`.
  std::vector<Group> groups;
  std::vector<int64_t> slot_of(B, -1), unit_spans;
  int64_t slots = 0;
  for (int64_t i = 0; i < num_tiles; ++i) {
    const auto [first, n] = tiles[i];
    const bool matrix_tiles = !tile_parts.empty() && tile_parts[i * Hkv];
    for (int64_t b = first, end; b < first + n; b = end) {
      const int64_t spans = matrix_tiles ? 1 : spans_of(b);
      for (end = b + 1; end < first + n && (matrix_tiles || spans_of(end) == spans); ++end) {}
      const bool span_tasks = spans > 1 && end - b <= SPAN_TASK_ROWS;
      for (int64_t kvh = 0; kvh < Hkv; ++kvh) {
        const uint16_t* parts = matrix_tiles ? tile_parts[i * Hkv + kvh] : nullptr;
        if (!span_tasks) {
          groups.push_back({b, end - b, kvh, spans, 0, spans, parts, -1});
          continue;
        }
        for (int64_t s = 0; s < spans; ++s)
          groups.push_back({b, end - b, kvh, spans, s, s + 1, parts, static_cast<int64_t>(unit_spans.size())});
        unit_spans.push_back(spans);
      }
      for (int64_t r = b; span_tasks && r < end; ++r) slot_of[r] = slots, slots += spans * H;
    }
  }
  // (Kept from call to call and not zeroed: each value is written before it is read. The threads below reach them
  // through the pointers: a thread_local's name is each thread's own.)
  thread_local slipstream::CacheLineVector<float> spans_out_buffer;
  thread_local std::vector<SoftmaxStats> spans_stats_buffer;
  spans_out_buffer.resize(slots * D);
  spans_stats_buffer.resize(slots);
  float* const spans_out = spans_out_buffer.data();
  SoftmaxStats* const spans_stats = spans_stats_buffer.data();
  const int64_t num_groups = static_cast<int64_t>(groups.size());
  const int64_t packs = num_groups >= 2 * at::get_num_threads() ? (G + MAX_PACK - 1) / MAX_PACK : G;
  const int64_t pack_size = (G + packs - 1) / packs, tasks = num_groups * packs;
  if (tasks == 0) return;
  // For each (run, KV head) that takes a task a span and pack of heads, its span tasks not yet done: the thread that
  // does the last folds them, while their results are still in the caches, and no second fork / join is needed.
  const std::unique_ptr<std::atomic<int64_t>[]> spans_left(new std::atomic<int64_t>[unit_spans.size() * packs]);
  for (size_t i = 0; i < unit_spans.size() * packs; ++i) spans_left[i].store(unit_spans[i / packs]);
  // Each thread's run of tasks holds its share of the work (a task costs its rows' tokens in its spans and a fixed
  // part), not of the tasks: a prompt's rows attend to 1, 2, ... n tokens, and an even split of them left one thread
  // 3/4 of the work. A thread done with its run takes the others' last tasks (stolen_items.h).
  std::vector<int64_t> work_before(tasks + 1, 0);  // the cost of tasks [0, i)
  for (int64_t task = 0; task < tasks; ++task) {
    const Group& g = groups[task / packs];
    int64_t work = 16 * g.n * (g.s1 - g.s0);
    for (int64_t b = g.first; b < g.first + g.n; ++b) work += std::min(lens[b], g.t1(g.s1 - 1, lens)) - g.t0(g.s0);
    work_before[task + 1] = work_before[task] + work;
  }
  const int64_t shares = std::min<int64_t>(at::get_num_threads(), tasks);
  std::vector<int64_t> bounds(shares + 1);
  for (int64_t i = 0; i <= shares; ++i)
    bounds[i] = std::lower_bound(work_before.begin(), work_before.end(), work_before[tasks] * i / shares) -
                work_before.begin();
  slipstream::for_items_stealing(bounds, [&](const auto& claim, int64_t me) {
    std::vector<float> scores;
    std::vector<int8_t> scratch;
    TileScratch tile_scratch;
    std::vector<int64_t> rows;
    std::vector<float> span_out;  // a run's span's results, before they are folded in (its spans in one task)
    SoftmaxStats span_stats[MAX_TILE_ROWS * MAX_PACK], run_stats[MAX_TILE_ROWS * MAX_PACK];
    // The row offsets of `group`'s tokens (its longest row's).
    auto group_rows = [&](int64_t group, std::vector<int64_t>& out) {
      const Group& g = groups[group];
      const int64_t t0 = g.t0(g.s0), t1 = g.t1(g.s1 - 1, lens);
      out.resize(t1 - t0);
      token_rows(g.first + g.n - 1, g.kvh, t0, t1 - t0, out.data());
    };
    AheadStream<C> ahead{kp, vp, width};
    int64_t held = -1, next_held = -1;  // the groups whose rows `rows` and `ahead.rows` hold
    for (int64_t task; (task = claim()) >= 0;) {
      const int64_t group = task / packs, pack = task % packs;
      if (group != held) {  // its rows, and those of the next group of this thread's run (not of a stolen task's)
        if (group == next_held) rows.swap(ahead.rows);
        else group_rows(group, rows);
        held = group;
        next_held = task >= bounds[me] && (group + 1) * packs < bounds[me + 1] ? group + 1 : -1;
        if (next_held >= 0) group_rows(next_held, ahead.rows);
        else ahead.rows.clear();
      }
      const Group& g = groups[group];
      const int64_t h0 = g.kvh * G + pack * pack_size, heads = std::min(pack_size, G - pack * pack_size);
      const bool folded_here = g.spans > 1 && g.unit < 0;
      if (folded_here) span_out.resize(g.n * heads * D);
      ahead.start_task(pack, packs, g.t1(g.s1 - 1, lens) - g.t0(g.s0));
      for (int64_t s = g.s0; s < g.s1; ++s) {
        const int64_t t0 = g.t0(s), t1 = g.t1(s, lens);
        TaskRows rows_of_task;
        rows_of_task.n = g.n;
        for (int64_t r = 0, b = g.first; r < g.n; ++r, ++b) {
          rows_of_task.q[r] = qp + b * ldq + h0 * D;
          rows_of_task.len[r] = std::min(lens[b], t1) - t0;
          if (g.spans == 1) {
            rows_of_task.out[r] = op + (b * H + h0) * D;
            rows_of_task.stats[r] = nullptr;
          } else if (folded_here) {
            rows_of_task.out[r] = span_out.data() + r * heads * D;
            rows_of_task.stats[r] = span_stats + r * heads;
          } else {
            const int64_t slot = slot_of[b] + s * H + h0;
            rows_of_task.out[r] = spans_out + slot * D;
            rows_of_task.stats[r] = spans_stats + slot;
          }
        }
        rows_of_task.parts = g.parts;
        const int64_t* span_rows = rows.data() + (t0 - g.t0(g.s0));
        switch (heads) {
          case 1: attend<1>(rows_of_task, kp, vp, span_rows, D, scale, scores, scratch, tile_scratch, ahead); break;
          case 2: attend<2>(rows_of_task, kp, vp, span_rows, D, scale, scores, scratch, tile_scratch, ahead); break;
          default: attend<3>(rows_of_task, kp, vp, span_rows, D, scale, scores, scratch, tile_scratch, ahead); break;
        }
        for (int64_t r = 0, b = g.first; folded_here && r < g.n; ++r, ++b)
          for (int64_t h = 0; h < heads; ++h)
            fold_span(s, span_out.data() + (r * heads + h) * D, span_stats[r * heads + h],
                      op + (b * H + h0 + h) * D, run_stats[r * heads + h], D);
      }
      if (folded_here) {
        for (int64_t r = 0, b = g.first; r < g.n; ++r, ++b)
          for (int64_t h = 0; h < heads; ++h) finish_spans(op + (b * H + h0 + h) * D, run_stats[r * heads + h], D);
      } else if (g.unit >= 0 && spans_left[g.unit * packs + pack].fetch_sub(1, std::memory_order_acq_rel) == 1) {
        for (int64_t b = g.first; b < g.first + g.n; ++b)  // the run's last span task: it folds them all
          for (int64_t h = h0; h < h0 + heads; ++h) {
            SoftmaxStats run;
            float* acc = op + (b * H + h) * D;
            for (int64_t s = 0; s < g.spans; ++s) {
              const int64_t slot = slot_of[b] + s * H + h;
              fold_span(s, spans_out + slot * D, spans_stats[slot], acc, run, D);
            }
            finish_spans(acc, run, D);
          }
      }
    }
  });
}

}  // namespace

void slipstream::paged_attention_rows(const float* q, int64_t ldq, int64_t T, int64_t H, const at::Tensor& k_cache,
                                      const at::Tensor& v_cache, const int64_t* block_tables, int64_t W,
                                      const int64_t* context_lens, float* out, double scale) {
  const auto type = k_cache.scalar_type();
  const int64_t Hkv = k_cache.size(1), bs = k_cache.size(2);  // (model/kv_cache.py)
  const int64_t D = slipstream::row_head_dim(k_cache.size(3), type == at::kChar);
  const float s = static_cast<float>(scale);
  if (type == at::kFloat)
    decode(q, ldq, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), block_tables, context_lens, out, T, H, D, bs,
           Hkv, W, s);
  else if (type == at::kHalf)
    decode(q, ldq, k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>(), block_tables, context_lens, out, T, H,
           D, bs, Hkv, W, s);
  else
    decode(q, ldq, k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(), block_tables, context_lens, out, T, H, D,
           bs, Hkv, W, s);
}

at::Tensor paged_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                           at::Tensor block_tables, at::Tensor context_lens, double scale) {
  const auto cache_type = k_cache.scalar_type();
  TORCH_CHECK(q.scalar_type() == at::kFloat &&
              (cache_type == at::kFloat || cache_type == at::kHalf || cache_type == at::kChar) &&
              v_cache.scalar_type() == cache_type, "float32 queries, float32, float16 or int8 caches");
  q = q.contiguous();
  block_tables = block_tables.to(at::kLong);
  if (block_tables.size(1) > 1 && block_tables.stride(1) != 1) block_tables = block_tables.contiguous();
  context_lens = context_lens.to(at::kLong).contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  TORCH_CHECK(block_tables.size(0) == B && context_lens.numel() == B, "a block table and a length per query row");
  // (W: the tables' row stride; 0 where one table serves every row, a prompt chunk's expanded)
  const int64_t Hkv = k_cache.size(1);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "query heads must be a multiple of the cache's KV heads");
  TORCH_CHECK(D % (cache_type == at::kChar ? 32 : 8) == 0, "head_dim must be a multiple of 8 (32 for an int8 cache)");
  TORCH_CHECK(k_cache.size(3) == (cache_type == at::kChar ? row_width<int8_t>(D) : D),
              "cache rows of another head_dim");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  auto out = at::empty_like(q);
  slipstream::paged_attention_rows(q.data_ptr<float>(), H * D, B, H, k_cache, v_cache,
                                   block_tables.data_ptr<int64_t>(), block_tables.stride(0),
                                   context_lens.data_ptr<int64_t>(), out.data_ptr<float>(), scale);
  return out;
}
