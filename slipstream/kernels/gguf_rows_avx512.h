// gguf_linear's row kernels for AVX-512 (the avx512_vnni variant): 16 float32 lanes, 32 vector registers.
//
// Unlike the AVX2 kernels, which multiply x with a block's bare quants and apply its scale (and min, through
// sums of x) afterwards, these build each weight's value in registers exactly as the gguf package dequantizes it
// (scale x quant + min: the product is exact in float32, so one FMA rounds as the package's two operations do)
// and multiply x with it: the result is x @ dequantize(W)^T up to summation order, with no second term.
// A Q4 block costs one FMA for the 16 values its nibbles stand for (a table) and two permutes that look the
// nibbles up in it, where converting them to float took eight instructions.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "gguf_blocks.h"

namespace slipstream::avx512 {

// Block (or group) `at`'s scale and min, so that its weights are scale * q + min.
template <QType T>
inline float scale_at(const Weights& w, int64_t at) {
  if constexpr (is_classic(T)) return _cvtsh_ss(w.scales[at]);
  else return w.fscales[at];
}

template <QType T>
inline float min_at(const Weights& w, int64_t at, float scale) {
  if constexpr (T == QType::Q4_0) return -8.0f * scale;  // quants are offset by 8
  else if constexpr (!has_mins(T)) return 0.0f;
  else if constexpr (is_classic(T)) return _cvtsh_ss(w.mins[at]);
  else return w.fmins[at];
}

// Sixteen F16 / BF16 weights as floats (exact).
template <QType T>
inline __m512 load_half16(const uint16_t* h) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h));
  if constexpr (T == QType::F16) return _mm512_cvtph_ps(v);
  else return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// Sixteen signed bytes as floats.
inline __m512 load_bytes16(const void* q) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(static_cast<const __m128i*>(q))));
}

// Sixteen blocks' scales and mins from block `at` (count <= 16 of them) as floats.
template <QType T>
inline void classic_scales16(const Weights& w, int64_t at, int64_t count, float* d, float* mn) {
  const __mmask16 valid = static_cast<__mmask16>((1u << count) - 1);
  const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, w.scales + at));
  _mm512_store_ps(d, s);
  if constexpr (T == QType::Q4_0) _mm512_store_ps(mn, _mm512_mul_ps(s, _mm512_set1_ps(-8.0f)));
  else if constexpr (has_mins(T)) _mm512_store_ps(mn, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, w.mins + at)));
}

// y[m, n] for weight rows [n0, n1) and MM activation rows: each 32 weights (two vectors) are dequantized once and
// meet the MM rows of x in two accumulator chains per row.
template <QType T, int MM>
void block_rows(const float* x, Weights w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t nb = K / QK;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // At one or two rows a Q4 block's work is its lookup, and converting its fp16 scale and min there took six
  // instructions, on the pipes the lookup needs: sixteen blocks' are converted at once and broadcast from memory
  // (30 layers of SmolLM2's matmuls at one row 10 % faster, AMD EPYC Zen 4).
  constexpr bool scales_in_memory = is_classic(T) && is_q4(T) && MM <= 2;
  alignas(64) float scales16[16], mins16[16];
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc[MM][2];
    for (int m = 0; m < MM; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      __m512 w0, w1;  // weights 32b..32b+15, 32b+16..32b+31
      if constexpr (is_q4(T)) {
        // Low nibbles are weights 0..15, high nibbles 16..31; permutexvar reads an index's low 4 bits only.
        const int64_t at = n * nb + b;
        if (scales_in_memory && b % 16 == 0)
          classic_scales16<T>(w, at, std::min<int64_t>(16, nb - b), scales16, mins16);
        const float d = scales_in_memory ? scales16[b % 16] : scale_at<T>(w, at);
        const float min = scales_in_memory ? mins16[b % 16] : min_at<T>(w, at, d);
        const __m512 table = _mm512_fmadd_ps(iota, _mm512_set1_ps(d), _mm512_set1_ps(min));
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
            w.qs + (n * nb + b) * 16)));
        w0 = _mm512_permutexvar_ps(q, table);
        w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table);
      } else if constexpr (T == QType::Q8_0) {
        const uint8_t* q = w.qs + (n * nb + b) * 32;
        const __m512 d = _mm512_set1_ps(scale_at<T>(w, n * nb + b));
        w0 = _mm512_mul_ps(load_bytes16(q), d);
        w1 = _mm512_mul_ps(load_bytes16(q + 16), d);
      } else if constexpr (is_k16(T)) {  // a byte per weight, a scale (and min) per 16
        const int8_t* q = reinterpret_cast<const int8_t*>(w.qs) + n * K + 32 * b;
        const int64_t g = n * (K / 16) + 2 * b;
        w0 = _mm512_fmadd_ps(load_bytes16(q), _mm512_set1_ps(w.fscales[g]),
                             _mm512_set1_ps(min_at<T>(w, g, 0.0f)));
        w1 = _mm512_fmadd_ps(load_bytes16(q + 16), _mm512_set1_ps(w.fscales[g + 1]),
                             _mm512_set1_ps(min_at<T>(w, g + 1, 0.0f)));
      } else {  // F16 / BF16 rows
        const uint16_t* h = reinterpret_cast<const uint16_t*>(w.qs) + n * K + 32 * b;
        w0 = load_half16<T>(h);
        w1 = load_half16<T>(h + 16);
      }
      for (int m = 0; m < MM; ++m) {
        acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * K + 32 * b), acc[m][0]);
        acc[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * K + 32 * b + 16), acc[m][1]);
      }
    }
    for (int m = 0; m < MM; ++m) y[m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
  }
}

// y [M, N] = x @ dequantize(W)^T over tiles of 16 weight rows, in pieces of up to 8 activation rows (16
// accumulators) while the piece's rows of x fit in L1 beside the weights (24 KiB), else of up to 4: for the down
// projection (K = 1536) pieces of 8 read x from L2 for every weight row and measured 1.3x slower than pieces of 4.
template <QType T>
void linear_impl(const float* x, Weights w, float* y, int64_t M, int64_t K, int64_t N) {
  auto piece = [&](auto mm, int64_t m0, int64_t n0, int64_t n1) {
    block_rows<T, decltype(mm)::value>(x + m0 * K, w, y + m0 * N, K, N, n0, n1);
  };
  if (8 * K * sizeof(float) <= 24 * 1024) for_weight_tiles<8>(M, N, piece);
  else for_weight_tiles<4>(M, N, piece);
}

}  // namespace slipstream::avx512
