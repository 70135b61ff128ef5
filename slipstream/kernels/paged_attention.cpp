// Decode attention straight from the paged KV cache: one query token per sequence attends to
// its context through its block table, without gathering the context into a contiguous copy.
// One task per (sequence, query head); the keys and values a GQA group shares stay in cache
// between its heads' tasks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <limits>
#include <vector>

#include "kernels.h"
#include "vec.h"

namespace {

// Scores of one query against L keys (row offsets `rows` into `keys`), eight keys at a time so
// eight independent FMA chains run and one horizontal reduction serves all eight. `scores` has
// room for L rounded up to 8; the padding gets -inf.
void key_scores(const float* q, const float* keys, const int64_t* rows, int64_t L, int64_t D, float scale,
                float* scores) {
  const __m256 sv = _mm256_set1_ps(scale);
  for (int64_t t0 = 0; t0 < L; t0 += 8) {
    const int64_t n = std::min<int64_t>(8, L - t0);
    const float* k[8];
    for (int j = 0; j < 8; ++j) k[j] = keys + rows[t0 + std::min<int64_t>(j, n - 1)];
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t i = 0; i < D; i += 8) {
      const __m256 qv = _mm256_loadu_ps(q + i);
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[j] + i), acc[j]);
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

// out[0:D] = sum_t p[t] * values[rows[t]], 64 dimensions (8 accumulators) at a time.
void weighted_values(const float* p, const float* values, const int64_t* rows, int64_t L, int64_t D, float* out) {
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    const int nv = static_cast<int>(std::min<int64_t>(8, (D - d0) / 8));
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t t = 0; t < L; ++t) {
      const __m256 pt = _mm256_broadcast_ss(p + t);
      const float* v = values + rows[t] + d0;
      for (int i = 0; i < nv; ++i) acc[i] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(v + 8 * i), acc[i]);
    }
    for (int i = 0; i < nv; ++i) _mm256_storeu_ps(out + d0 + 8 * i, acc[i]);
  }
}

}  // namespace

at::Tensor paged_attention_decode(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                  at::Tensor block_tables, at::Tensor context_lens, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat, "float32 only");
  q = q.contiguous();
  block_tables = block_tables.to(at::kLong).contiguous();
  context_lens = context_lens.to(at::kLong).contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2), W = block_tables.size(1);
  const int64_t G = H / Hkv;
  TORCH_CHECK(D % 8 == 0, "head_dim must be a multiple of 8");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  auto out = at::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<int64_t> rows;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H, kvh = h / G, L = lens[b];
      rows.resize(L);
      for (int64_t t = 0, j = 0; t < L; ++j)  // block by block: no division per token
        for (int64_t slot = bt[b * W + j] * bs, o = 0; o < bs && t < L; ++o, ++t) rows[t] = ((slot + o) * Hkv + kvh) * D;
      scores.resize((L + 7) / 8 * 8);
      key_scores(qp + task * D, kp, rows.data(), L, D, static_cast<float>(scale), scores.data());
      softmax(scores.data(), L);
      weighted_values(scores.data(), vp, rows.data(), L, D, op + task * D);
    }
  });
  return out;
}
