// Decode attention straight from the paged KV cache: one query token per sequence attends to
// its context through its block table, without gathering the context into a contiguous copy.
// One task per (sequence, query head); the keys and values a GQA group shares stay in cache
// between its heads' tasks. The cache holds float32 or float16 (half the bytes to read: ~15 %
// faster at batch 32, where this kernel is a quarter of the step); the arithmetic is float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <limits>
#include <vector>

#include "kernels.h"
#include "vec.h"

namespace {

// Eight cache values (float32, or float16 in at::Half) as floats.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// A KV head's row is a slice of each token's row of all KV heads (2 cache lines in 6 for SmolLM2's 3 half-precision
// heads): the hardware prefetcher does not follow them, and a step's keys and values come from DRAM or L3 (the
// weights streamed through the caches since the last step). So the kernel asks for them ahead, values 2 x PREFETCH
// tokens, keys 4 x (eight at a time): 17-20 % faster at batch 8 / 32 or 600-token contexts with the cache cold, the
// same with it hot (AMD EPYC Zen 4, SmolLM2-135M's heads).
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

  // Head `g` of G in a group whose L tokens take 2 * ceil(L / 8) steps: its share of the rows, spread over them.
  void start_head(int64_t g, int64_t G, int64_t L) {
    const int64_t n = static_cast<int64_t>(rows.size()), share = (n + G - 1) / G, steps = 2 * ((L + 7) / 8);
    next = std::min(n, g * share);
    end = std::min(n, next + share);
    per_step = (share + steps - 1) / steps;
  }

  void step() {
    for (const int64_t stop = std::min(end, next + per_step); next < stop; ++next)
      for (int64_t i = 0; i < row_elems * static_cast<int64_t>(sizeof(C)); i += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(keys + rows[next]) + i, _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(values + rows[next]) + i, _MM_HINT_T1);
      }
  }
};

// Scores of one query against L keys (row offsets `rows` into `keys`), eight keys at a time so
// eight independent FMA chains run and one horizontal reduction serves all eight. `scores` has
// room for L rounded up to 8; the padding gets -inf.
template <typename C>
void key_scores(const float* q, const C* keys, const int64_t* rows, int64_t L, int64_t D, float scale,
                float* scores, AheadStream<C>& ahead) {
  const __m256 sv = _mm256_set1_ps(scale);
  for (int64_t t0 = 0; t0 < L; t0 += 8) {
    const int64_t n = std::min<int64_t>(8, L - t0);
    const C* k[8];
    for (int j = 0; j < 8; ++j) k[j] = keys + rows[t0 + std::min<int64_t>(j, n - 1)];
    for (int64_t j = t0 + 4 * PREFETCH; j < std::min(L, t0 + 4 * PREFETCH + 8); ++j)
      prefetch_row(keys + rows[j], D);
    ahead.step();
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t i = 0; i < D; i += 8) {
      const __m256 qv = _mm256_loadu_ps(q + i);
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, load8(k[j] + i), acc[j]);
    }
    _mm256_storeu_ps(scores + t0, _mm256_mul_ps(slipstream::hsum8(acc), sv));
  }
  std::fill(scores + L, scores + (L + 7) / 8 * 8, -std::numeric_limits<float>::infinity());
}

// scores -> softmax probabilities in place (padding -> 0); returns nothing, L >= 1.
void softmax(float* s, int64_t L) {
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
}

// out[d0 : d0 + 8 * NV] = sum_t p[t] * values[rows[t] + d0 : ...]. NV is a compile-time count so
// the accumulators stay in registers (with a runtime count GCC kept them on the stack, and every
// token's update waited on a store and a reload: 20 % of the kernel at batch 32).
template <int NV, typename C>
void weighted_values_part(const float* p, const C* values, const int64_t* rows, int64_t L, int64_t d0, float* out,
                          AheadStream<C>& ahead) {
  __m256 acc[NV];
  for (int i = 0; i < NV; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t t = 0; t < L; ++t) {
    const __m256 pt = _mm256_broadcast_ss(p + t);
    const C* v = values + rows[t] + d0;
    if (t + 2 * PREFETCH < L) prefetch_row(values + rows[t + 2 * PREFETCH] + d0, 8 * NV);
    if (t % 8 == 0) ahead.step();
    for (int i = 0; i < NV; ++i) acc[i] = _mm256_fmadd_ps(pt, load8(v + 8 * i), acc[i]);
  }
  for (int i = 0; i < NV; ++i) _mm256_storeu_ps(out + d0 + 8 * i, acc[i]);
}

// out[0:D] = sum_t p[t] * values[rows[t]]: 64 dimensions at a time, then 32, 16, 8.
template <typename C>
void weighted_values(const float* p, const C* values, const int64_t* rows, int64_t L, int64_t D, float* out,
                     AheadStream<C>& ahead) {
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) weighted_values_part<8>(p, values, rows, L, d0, out, ahead);
  if (D - d0 >= 32) weighted_values_part<4>(p, values, rows, L, d0, out, ahead), d0 += 32;
  if (D - d0 >= 16) weighted_values_part<2>(p, values, rows, L, d0, out, ahead), d0 += 16;
  if (D - d0 >= 8) weighted_values_part<1>(p, values, rows, L, d0, out, ahead);
}

// Cache element C: float or at::Half.
template <typename C>
void decode(const float* qp, const C* kp, const C* vp, const int64_t* bt, const int64_t* lens, float* op, int64_t B,
            int64_t H, int64_t D, int64_t bs, int64_t Hkv, int64_t W, float scale) {
  const int64_t G = H / Hkv;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<int64_t> rows;
    // The row offsets of (sequence, KV head) `group`'s tokens.
    auto group_rows = [&](int64_t group, std::vector<int64_t>& out) {
      const int64_t b = group / Hkv, kvh = group % Hkv, L = lens[b];
      out.resize(L);
      for (int64_t t = 0, j = 0; t < L; ++j)  // block by block: no division per token
        for (int64_t slot = bt[b * W + j] * bs, o = 0; o < bs && t < L; ++o, ++t) out[t] = ((slot + o) * Hkv + kvh) * D;
    };
    AheadStream<C> ahead{kp, vp, D};
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H, group = task / G, L = lens[b];
      if (task == begin || h % G == 0) {  // a group's first head here: its rows, and the next group's
        if (task == begin) group_rows(group, rows);
        else rows.swap(ahead.rows);
        if ((group + 1) * G < end) group_rows(group + 1, ahead.rows);
        else ahead.rows.clear();
      }
      ahead.start_head(h % G, G, L);
      scores.resize((L + 7) / 8 * 8);
      key_scores(qp + task * D, kp, rows.data(), L, D, scale, scores.data(), ahead);
      softmax(scores.data(), L);
      weighted_values(scores.data(), vp, rows.data(), L, D, op + task * D, ahead);
    }
  });
}

}  // namespace

at::Tensor paged_attention_decode(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                  at::Tensor block_tables, at::Tensor context_lens, double scale) {
  const auto cache_type = k_cache.scalar_type();
  TORCH_CHECK(q.scalar_type() == at::kFloat && (cache_type == at::kFloat || cache_type == at::kHalf) &&
              v_cache.scalar_type() == cache_type, "float32 queries, float32 or float16 caches");
  q = q.contiguous();
  block_tables = block_tables.to(at::kLong).contiguous();
  context_lens = context_lens.to(at::kLong).contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2), W = block_tables.size(1);
  TORCH_CHECK(D % 8 == 0, "head_dim must be a multiple of 8");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  auto out = at::empty_like(q);
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const float s = static_cast<float>(scale);
  if (cache_type == at::kFloat)
    decode(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), bt, lens,
           out.data_ptr<float>(), B, H, D, bs, Hkv, W, s);
  else
    decode(q.data_ptr<float>(), k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>(), bt, lens,
           out.data_ptr<float>(), B, H, D, bs, Hkv, W, s);
  return out;
}
