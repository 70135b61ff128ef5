// The small per-layer operations of a decoder layer, each one call instead of the chain of tensor
// ops PyTorch would run (at batch 1 the chain's per-op overhead costs more than the arithmetic).
// Same float32 formulas as the reference (transformers), row by row.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "kernels.h"
#include "kv_rows.h"
#include "vec.h"

namespace {

using slipstream::exp8;
using slipstream::hsum;

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.stride(1) == 1, name,
              " must be a 2-D float32 tensor with contiguous rows");
}

// out = weight * x / sqrt(mean(x^2) + eps), one row.
inline void rms_norm_row(const float* x, const float* w, float* out, int64_t n, float eps) {
  const int64_t n8 = n / 8 * 8;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < n8; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float ss = hsum(acc);
  for (int64_t i = n8; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  const __m256 iv = _mm256_set1_ps(inv);
  for (int64_t i = 0; i < n8; i += 8)
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(x + i), iv)));
  for (int64_t i = n8; i < n; ++i) out[i] = w[i] * (x[i] * inv);
}

}  // namespace

void slipstream::rms_norm_rows(const float* x, int64_t ldx, const float* w, float* out, int64_t T, int64_t n,
                               float eps) {
  at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) rms_norm_row(x + t * ldx, w, out + t * n, n, eps);
  });
}

void slipstream::add_rms_norm_rows(const float* x, int64_t ldx, float* residual, int64_t ldr, const float* w,
                                   float* out, int64_t T, int64_t n, float eps) {
  at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* xr = x + t * ldx;
      float* r = residual + t * ldr;
      for (int64_t i = 0; i < n; ++i) r[i] = r[i] + xr[i];
      rms_norm_row(r, w, out + t * n, n, eps);
    }
  });
}

at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps) {
  check_rows(x, "x");
  const int64_t T = x.size(0), n = x.size(1);
  auto out = at::empty({T, n}, x.options());
  slipstream::rms_norm_rows(x.data_ptr<float>(), x.stride(0), weight.contiguous().data_ptr<float>(),
                            out.data_ptr<float>(), T, n, eps);
  return out;
}

// residual += x (in place), then returns rms_norm(residual): the pre-norm of the next sublayer.
at::Tensor add_rms_norm_(at::Tensor x, at::Tensor residual, at::Tensor weight, double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  const int64_t T = x.size(0), n = x.size(1);
  auto out = at::empty({T, n}, x.options());
  slipstream::add_rms_norm_rows(x.data_ptr<float>(), x.stride(0), residual.data_ptr<float>(), residual.stride(0),
                                weight.contiguous().data_ptr<float>(), out.data_ptr<float>(), T, n, eps);
  return out;
}

// Rotary embedding in place on q [T, H, D] and k [T, Hkv, D] (rows may be strided views of the
// fused qkv output). cos/sin: [max_pos, D/2]. Interleaved rotates pairs (2i, 2i+1) (GPT-J style),
// otherwise (i, i + D/2) (GPT-NeoX style).
void slipstream::rotary_rows(float* q, int64_t ldq, int64_t H, float* k, int64_t ldk, int64_t Hkv, int64_t head_stride,
                             int64_t D, const int64_t* positions, const float* cos, const float* sin, int64_t T,
                             bool interleaved) {
  const int64_t half = D / 2;
  at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* c = cos + positions[t] * half;
      const float* s = sin + positions[t] * half;
      for (auto [base, heads] : {std::pair{q + t * ldq, H}, std::pair{k + t * ldk, Hkv}}) {
        for (int64_t h = 0; h < heads; ++h) {
          float* v = base + h * head_stride;
          for (int64_t i = 0; i < half; ++i) {
            float* a = interleaved ? v + 2 * i : v + i;
            float* bb = interleaved ? v + 2 * i + 1 : v + i + half;
            const float x1 = *a, x2 = *bb;
            *a = x1 * c[i] - x2 * s[i];
            *bb = x2 * c[i] + x1 * s[i];
          }
        }
      }
    }
  });
}

void rotary_(at::Tensor q, at::Tensor k, at::Tensor positions, at::Tensor cos, at::Tensor sin, bool interleaved) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && q.stride(2) == 1 &&
              k.stride(2) == 1 && q.stride(1) == k.stride(1), "q and k must be float32 with contiguous heads");
  positions = positions.to(at::kLong).contiguous();
  cos = cos.contiguous();
  sin = sin.contiguous();
  const int64_t T = q.size(0), D = q.size(2);
  TORCH_CHECK(cos.size(1) == D / 2 && sin.size(1) == D / 2, "the rotary tables must cover the whole head");
  TORCH_CHECK(k.size(0) == T && k.size(2) == D && positions.numel() == T, "a position per row of q and k");
  slipstream::rotary_rows(q.data_ptr<float>(), q.stride(0), q.size(1), k.data_ptr<float>(), k.stride(0), k.size(1),
                          q.stride(1), D, positions.data_ptr<int64_t>(), cos.data_ptr<float>(), sin.data_ptr<float>(),
                          T, interleaved);
}

// SwiGLU: gate_up [T, 2I] -> silu(gate) * up [T, I].
void slipstream::silu_and_mul_rows(const float* gate_up, int64_t ld, float* out, int64_t T, int64_t I) {
  at::parallel_for(0, T, 4, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* g = gate_up + t * ld;
      const float* u = g + I;
      float* o = out + t * I;
      const __m256 one = _mm256_set1_ps(1.0f);
      const int64_t i8 = I / 8 * 8;
      for (int64_t i = i8; i < I; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
      for (int64_t i = 0; i < i8; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
      }
    }
  });
}

at::Tensor silu_and_mul(at::Tensor gate_up) {
  check_rows(gate_up, "gate_up");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = at::empty({T, I}, gate_up.options());
  slipstream::silu_and_mul_rows(gate_up.data_ptr<float>(), gate_up.stride(0), out.data_ptr<float>(), T, I);
  return out;
}

// Index of each row's largest value, the first where it repeats, NaN counting as the largest (torch.argmax's
// answer): greedy sampling's pick. torch's CPU argmax walks a row element by element: 0.7 ms for 32 rows of a
// 49K vocabulary, where the max alone takes 0.04 ms.
at::Tensor argmax_rows(at::Tensor x) {
  check_rows(x, "x");
  const int64_t T = x.size(0), V = x.size(1);
  TORCH_CHECK(V > 0 && V < (int64_t{1} << 31), "rows of 1 to 2^31 - 1 values");
  auto out = at::empty({T}, x.options().dtype(at::kLong));
  at::parallel_for(0, T, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* row = x.data_ptr<float>() + t * x.stride(0);
      const int64_t v32 = V / 32 * 32;
      int64_t arg = 0;
      float top = row[0];
      if (v32) {
        // Lane j of chain c: the largest of values 8c + j, 8c + j + 32, ... and its index. Strictly larger replaces:
        // a lane keeps its first. Four chains, so that a compare and blend's latency does not bound the walk (one
        // chain: 262 / 15.7 us for 32 rows / one row of a 49K vocabulary, four 154 / 6.3; AMX Xeon, 2 threads). NaN
        // compares false; a NaN seen anywhere sends the row to the scalar walk below.
        __m256 best[4], nan = _mm256_setzero_ps();
        __m256i where[4], idx[4];
        const __m256i step = _mm256_set1_epi32(32);
        for (int c = 0; c < 4; ++c) {
          best[c] = _mm256_loadu_ps(row + 8 * c);
          nan = _mm256_or_ps(nan, _mm256_cmp_ps(best[c], best[c], _CMP_UNORD_Q));
          where[c] = idx[c] = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(8 * c));
        }
        for (int64_t i = 32; i < v32; i += 32) {
          for (int c = 0; c < 4; ++c) {
            const __m256 v = _mm256_loadu_ps(row + i + 8 * c);
            idx[c] = _mm256_add_epi32(idx[c], step);
            const __m256 larger = _mm256_cmp_ps(v, best[c], _CMP_GT_OQ);
            best[c] = _mm256_blendv_ps(best[c], v, larger);
            where[c] = _mm256_blendv_epi8(where[c], idx[c], _mm256_castps_si256(larger));
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
          }
        }
        if (_mm256_movemask_ps(nan)) {
          arg = std::find_if(row, row + V, [](float f) { return std::isnan(f); }) - row;
          out.data_ptr<int64_t>()[t] = arg;
          continue;
        }
        alignas(32) float vals[32];
        alignas(32) int32_t at[32];
        for (int c = 0; c < 4; ++c) {
          _mm256_store_ps(vals + 8 * c, best[c]);
          _mm256_store_si256(reinterpret_cast<__m256i*>(at + 8 * c), where[c]);
        }
        top = vals[0], arg = at[0];
        for (int j = 1; j < 32; ++j)
          if (vals[j] > top || (vals[j] == top && at[j] < arg)) top = vals[j], arg = at[j];
      }
      for (int64_t i = v32; i < V; ++i) {  // the tail: later than every index above, so only larger replaces
        if (std::isnan(row[i])) {
          arg = i;
          break;
        }
        if (row[i] > top) top = row[i], arg = i;
      }
      out.data_ptr<int64_t>()[t] = arg;
    }
  });
  return out;
}

// Writes each new token's key and value [T, Hkv, D] into its cache slot (caches [blocks, Hkv, block size, row]:
// model/kv_cache.py).
void slipstream::write_kv_rows(const float* k, int64_t ldk, const float* v, int64_t ldv, int64_t T,
                               const at::Tensor& k_cache, const at::Tensor& v_cache, const int64_t* slots) {
  const auto type = k_cache.scalar_type();
  const int64_t H = k_cache.size(1), block_size = k_cache.size(2), width = k_cache.size(3);
  const int64_t D = slipstream::row_head_dim(width, type == at::kChar);
  const int64_t row_bytes = width * k_cache.element_size();
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  auto store = [&](const float* src, char* dst) {
    if (type == at::kFloat) return void(std::memcpy(dst, src, D * sizeof(float)));
    if (type == at::kHalf) {  // rounds to nearest even, as torch's float -> half conversion does
      for (int64_t d = 0; d < D; d += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst) + d / 8,
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + d), _MM_FROUND_TO_NEAREST_INT));
      return;
    }
    const float scale = slipstream::round_to_int8(src, D, reinterpret_cast<int8_t*>(dst));
    std::memcpy(dst + D, &scale, sizeof scale);
  };
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t dst = ((slots[t] / block_size * H + h) * block_size + slots[t] % block_size) * row_bytes;
      store(k + t * ldk + h * D, kc + dst);
      store(v + t * ldv + h * D, vc + dst);
    }
}

void write_kv_cache(at::Tensor k, at::Tensor v, at::Tensor k_cache, at::Tensor v_cache, at::Tensor slots) {
  const auto type = k_cache.scalar_type();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && v_cache.scalar_type() == type &&
              (type == at::kFloat || type == at::kHalf || type == at::kChar) && k.scalar_type() == at::kFloat &&
              v.scalar_type() == at::kFloat, "float32 keys and values, contiguous float32, float16 or int8 caches");
  slots = slots.to(at::kLong).contiguous();
  const int64_t T = k.size(0), H = k.size(1), D = k.size(2);
  TORCH_CHECK(slots.numel() == T && v.sizes() == k.sizes(), "a cache slot per row of k and v");
  auto heads_in_a_row = [D](const at::Tensor& t) { return t.stride(2) == 1 && t.stride(1) == D ? t : t.contiguous(); };
  k = heads_in_a_row(k);
  v = heads_in_a_row(v);
  TORCH_CHECK(type != at::kHalf || D % 8 == 0, "a float16 cache needs head_dim a multiple of 8");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(1) == H &&
              k_cache.size(3) == (type == at::kChar ? slipstream::int8_row_width(D) : D),
              "caches [blocks, k and v's heads, block size, a row of their head_dim]");
  slipstream::write_kv_rows(k.data_ptr<float>(), k.stride(0), v.data_ptr<float>(), v.stride(0), T, k_cache, v_cache,
                            slots.data_ptr<int64_t>());
}
