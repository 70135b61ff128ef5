// Causal attention of prompt chunks to their own keys (no cached prefix): the flash-attention loop on the CPU.
// Queries go in tiles of 4 against tiles of 16 keys with an online softmax, so a score matrix is never
// written out. The keys are transposed once per KV head ([D, T]): a tile's 4 x 16 scores are then 8 vector
// accumulators that each dimension updates with one load and a broadcast per query, with no horizontal sums.
// A task is a KV head's block of 16 queries for each of its G query heads, which read the same transposed keys
// and values (in L2 up to the chunk length dispatch.py gives this kernel: PREFILL_KERNEL_MAX_TOKENS, beyond which
// SDPA's flash kernel, which tiles the keys too, is faster). SDPA took 340-370 us for a 100-token SmolLM2 chunk
// (2 threads), a fifth of a prefill.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"
#include "vec.h"

namespace {

constexpr int QT = 4;        // queries a register tile
constexpr int KT = 16;       // keys a tile: two vectors of scores per query
constexpr int64_t QB = 16;   // queries a task (per query head of the KV head's group)

struct Rows {  // [T, heads, D] with any row stride (q, k and v are views of the fused qkv projection)
  const float* p;
  int64_t stride;
  const float* at(int64_t t, int64_t h, int64_t D) const { return p + t * stride + h * D; }
};

// a[d0 : d0 + 8 * NV] = a[...] * correction + sum_j p[j] * v[j0 + j][d0 : ...] over `last` keys. NV is a
// compile-time count so the accumulators stay in registers.
template <int NV>
inline void weighted_values(const float* p, int64_t last, Rows v, int64_t j0, int64_t kvh, int64_t D, int64_t d0,
                            __m256 correction, float* a) {
  __m256 acc[NV];
  for (int c = 0; c < NV; ++c) acc[c] = _mm256_mul_ps(_mm256_loadu_ps(a + d0 + 8 * c), correction);
  for (int64_t j = 0; j < last; ++j) {
    const __m256 pj = _mm256_broadcast_ss(p + j);
    const float* row = v.at(j0 + j, kvh, D) + d0;
    for (int c = 0; c < NV; ++c) acc[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(row + 8 * c), acc[c]);
  }
  for (int c = 0; c < NV; ++c) _mm256_storeu_ps(a + d0 + 8 * c, acc[c]);
}

// p[i][0:16] = scale * q_i . keys [j0, j0 + 16) (kd: their transposed columns, rows Tp apart): each dimension
// updates the 4 x 2 vectors of scores with two loads and a broadcast per query. (Its own function: inline in the
// tile loop GCC kept the accumulators on the stack, a store and a reload per FMA.)
inline void tile_scores(const float* const qr[QT], const float* kd, int64_t Tp, int64_t D, float scale,
                        float p[QT][KT]) {
  __m256 s[QT][2];
  for (int i = 0; i < QT; ++i) s[i][0] = s[i][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d, kd += Tp) {
    const __m256 k0 = _mm256_loadu_ps(kd), k1 = _mm256_loadu_ps(kd + 8);
    for (int i = 0; i < QT; ++i) {
      const __m256 qd = _mm256_broadcast_ss(qr[i] + d);
      s[i][0] = _mm256_fmadd_ps(qd, k0, s[i][0]);
      s[i][1] = _mm256_fmadd_ps(qd, k1, s[i][1]);
    }
  }
  const __m256 sv = _mm256_set1_ps(scale);
  for (int i = 0; i < QT; ++i) {
    _mm256_store_ps(p[i], _mm256_mul_ps(s[i][0], sv));
    _mm256_store_ps(p[i] + 8, _mm256_mul_ps(s[i][1], sv));
  }
}

// Queries [i0, i0 + n) of head h (n <= QT) against keys [0, i0 + n) of KV head kvh: out rows of those queries.
void query_tile(Rows q, const float* kt, Rows v, int64_t Tp, int64_t D, int64_t h, int64_t kvh,
                int64_t i0, int n, float scale, float* acc, float* out, int64_t out_stride) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float m[QT], l[QT];
  for (int i = 0; i < QT; ++i) m[i] = neg_inf, l[i] = 0.0f;
  std::fill(acc, acc + QT * D, 0.0f);
  const float* qr[QT];
  for (int i = 0; i < QT; ++i) qr[i] = q.at(i0 + std::min(i, n - 1), h, D);
  const int64_t keys = i0 + n;
  for (int64_t j0 = 0; j0 < keys; j0 += KT) {
    alignas(32) float p[QT][KT];
    tile_scores(qr, kt + j0, Tp, D, scale, p);
    for (int i = 0; i < QT; ++i) {
      const int64_t last = std::min<int64_t>(KT, i0 + i + 1 - j0);  // keys after the query's own are masked
      if (i >= n || last <= 0) continue;
      float mx = m[i];
      for (int64_t j = 0; j < last; ++j) mx = std::max(mx, p[i][j]);
      for (int64_t j = last; j < KT; ++j) p[i][j] = neg_inf;
      // Online softmax: the running sum and accumulator rescaled to the new maximum.
      const __m256 mv = _mm256_set1_ps(mx);
      const __m256 e0 = slipstream::exp8(_mm256_sub_ps(_mm256_load_ps(p[i]), mv));
      const __m256 e1 = slipstream::exp8(_mm256_sub_ps(_mm256_load_ps(p[i] + 8), mv));
      // (exp8 clamps its input: a masked key's -inf gives ~1e-38, not 0; zero them outright)
      const __m256 keep0 = _mm256_cmp_ps(_mm256_load_ps(p[i]), _mm256_set1_ps(neg_inf), _CMP_NEQ_OQ);
      const __m256 keep1 = _mm256_cmp_ps(_mm256_load_ps(p[i] + 8), _mm256_set1_ps(neg_inf), _CMP_NEQ_OQ);
      _mm256_store_ps(p[i], _mm256_and_ps(e0, keep0));
      _mm256_store_ps(p[i] + 8, _mm256_and_ps(e1, keep1));
      const float correction = m[i] == neg_inf ? 0.0f : std::exp(m[i] - mx);
      m[i] = mx;
      l[i] = l[i] * correction + slipstream::hsum(_mm256_add_ps(_mm256_load_ps(p[i]), _mm256_load_ps(p[i] + 8)));
      // acc = acc * correction + p @ V[j0 : j0 + last], 64 dimensions at a time, then 32, 16, 8.
      float* a = acc + i * D;
      const __m256 cv = _mm256_set1_ps(correction);
      int64_t d0 = 0;
      for (; d0 + 64 <= D; d0 += 64) weighted_values<8>(p[i], last, v, j0, kvh, D, d0, cv, a);
      if (D - d0 >= 32) weighted_values<4>(p[i], last, v, j0, kvh, D, d0, cv, a), d0 += 32;
      if (D - d0 >= 16) weighted_values<2>(p[i], last, v, j0, kvh, D, d0, cv, a), d0 += 16;
      if (D - d0 >= 8) weighted_values<1>(p[i], last, v, j0, kvh, D, d0, cv, a);
    }
  }
  for (int i = 0; i < n; ++i) {
    const __m256 inv = _mm256_set1_ps(1.0f / l[i]);
    float* o = out + (i0 + i) * out_stride + h * D;
    for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(acc + i * D + d), inv));
  }
}

}  // namespace

void prefill_attention_(at::Tensor out, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor spans, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
              out.scalar_type() == at::kFloat, "float32 queries, keys, values and output");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
              q.size(2) == k.size(2) && out.sizes() == q.sizes() && out.is_contiguous(),
              "q and out [T, H, D], k and v [T, Hkv, D]");
  const int64_t T = q.size(0), H = q.size(1), Hkv = k.size(1), D = q.size(2);
  TORCH_CHECK(H % Hkv == 0 && D % 8 == 0, "heads a multiple of the KV heads, head_dim a multiple of 8");
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->stride(2) == 1 && t->stride(1) == D, "rows of contiguous heads");
  TORCH_CHECK(spans.scalar_type() == at::kLong && spans.dim() == 2 && spans.size(1) == 2 && spans.is_contiguous(),
              "spans: [chunks, 2] int64 (first row, rows)");
  const int64_t chunks = spans.size(0), G = H / Hkv;
  const int64_t* span = spans.data_ptr<int64_t>();
  // Each chunk's keys transposed per KV head, [Hkv, D, Tp] from kt_at[c], Tp its length rounded up to a tile, the
  // padding zero (masked anyway); 64-byte aligned, so a tile's 16 keys of a dimension are one cache line.
  auto tiles = [&](int64_t c) { return (span[2 * c + 1] + KT - 1) / KT * KT; };
  std::vector<int64_t> kt_at(chunks + 1, 0);
  for (int64_t c = 0; c < chunks; ++c) {
    TORCH_CHECK(span[2 * c] >= 0 && span[2 * c + 1] >= 1 && span[2 * c] + span[2 * c + 1] <= T, "span out of range");
    kt_at[c + 1] = kt_at[c] + Hkv * D * tiles(c);
  }
  at::Tensor kt_buf = at::zeros({kt_at[chunks]}, q.options());
  float* kt = kt_buf.data_ptr<float>();
  const Rows kr{k.data_ptr<float>(), k.stride(0)}, vr{v.data_ptr<float>(), v.stride(0)}, qr{q.data_ptr<float>(),
                                                                                            q.stride(0)};
  at::parallel_for(0, chunks * Hkv, 1, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      const int64_t c = task / Hkv, kvh = task % Hkv, Tp = tiles(c);
      for (int64_t t = 0; t < span[2 * c + 1]; ++t) {
        const float* row = kr.at(span[2 * c] + t, kvh, D);
        for (int64_t d = 0; d < D; ++d) kt[kt_at[c] + (kvh * D + d) * Tp + t] = row[d];
      }
    }
  });
  float* op = out.data_ptr<float>();
  // Tasks (chunk, query block, KV head), one call for all of a step's chunks so that their tasks are shared among
  // the threads at once: a call a chunk (21 tasks for a 100-token chunk of SmolLM2) left a thread idle at the end of
  // each; one call made a w4a8 prefill of 32 such prompts 5-15 % faster (AMD EPYC Zen 4, 2 threads). Within a chunk
  // the blocks go in the order 0, n-1, 1, n-2, ...: causal blocks grow with their position, and each thread's
  // contiguous range of tasks then holds as much work as another's.
  std::vector<int64_t> first_task(chunks + 1, 0);
  for (int64_t c = 0; c < chunks; ++c) first_task[c + 1] = first_task[c] + (span[2 * c + 1] + QB - 1) / QB * Hkv;
  at::parallel_for(0, first_task[chunks], 1, [&](int64_t b, int64_t e) {
    std::vector<float> acc(QT * D);
    for (int64_t task = b; task < e; ++task) {
      const int64_t c = std::upper_bound(first_task.begin(), first_task.end(), task) - first_task.begin() - 1;
      const int64_t s = span[2 * c], L = span[2 * c + 1], blocks = (L + QB - 1) / QB, Tp = tiles(c);
      const int64_t z = (task - first_task[c]) / Hkv, kvh = (task - first_task[c]) % Hkv;
      const int64_t block = z % 2 == 0 ? z / 2 : blocks - 1 - z / 2;
      const Rows qc{qr.at(s, 0, D), qr.stride}, vc{vr.at(s, 0, D), vr.stride};
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i0 = block * QB; i0 < std::min(L, (block + 1) * QB); i0 += QT)
          query_tile(qc, kt + kt_at[c] + kvh * D * Tp, vc, Tp, D, kvh * G + g, kvh, i0,
                     static_cast<int>(std::min<int64_t>(QT, L - i0)), static_cast<float>(scale), acc.data(),
                     op + s * H * D, H * D);
    }
  });
}
