// Decode attention straight from the paged KV cache: one query token per sequence attends to
// its context through its block table, without gathering the context into a contiguous copy.
// Query heads that share a KV head (GQA) are handled together so each key/value is read once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  float r = _mm_cvtss_f32(s);
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

inline void axpy(float a, const float* x, float* y, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
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
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  auto out = at::zeros_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, kvh = task % Hkv, L = lens[b];
      scores.assign(G * L, 0.0f);
      for (int64_t t = 0; t < L; ++t) {
        const int64_t slot = bt[b * W + t / bs] * bs + t % bs;
        const float* k = kp + (slot * Hkv + kvh) * D;
        for (int64_t g = 0; g < G; ++g) scores[g * L + t] = dot(qp + (b * H + kvh * G + g) * D, k, D) * scale;
      }
      for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + g * L;
        const float mx = *std::max_element(s, s + L);
        float sum = 0.0f;
        for (int64_t t = 0; t < L; ++t) sum += (s[t] = std::exp(s[t] - mx));
        const float inv = 1.0f / sum;
        for (int64_t t = 0; t < L; ++t) s[t] *= inv;
      }
      for (int64_t t = 0; t < L; ++t) {
        const int64_t slot = bt[b * W + t / bs] * bs + t % bs;
        const float* v = vp + (slot * Hkv + kvh) * D;
        for (int64_t g = 0; g < G; ++g) axpy(scores[g * L + t], v, op + (b * H + kvh * G + g) * D, D);
      }
    }
  });
  return out;
}
