// y ~= x @ dequantize(W)^T with the activations quantized as well (opt-in, `--quantization w4a8`).
//
// Each row of x is cut into 32-value blocks and rounded to int8 with one fp32 scale per block, as
// llama.cpp does; a block's dot product with a GGUF weight block is then integer multiply-adds
// (maddubs + madd: 32 products in two instructions) rather than expanding the weights to fp32,
// about half the instructions of gguf_linear. The min term (Q4_1, Q4_K, Q5_1, Q5_K) and the -8 / -16
// offsets (Q4_0, interleaved Q5_0) meet the block sums of the rounded x, as llama.cpp's Q8_1 sums do: the
// result is then the rounded x times the dequantized weights, whose error goes with the weights (centred on
// zero), not with their unsigned quants. (The exact sums of x left a min x sum-of-rounding-errors term: w4a8
// agreed with the exact engine on 0.932 of SmolLM2's greedy tokens, max logprob error 0.64, and on 0.949 / 0.58
// of its Q4_K_M copy's; with the rounded sums 0.967 / 0.31 and 0.963 / 0.32.)
// Every type the loader gives is served: Q4_0 / Q4_1 / Q4_K as nibbles, Q5_0 / Q5_1 / Q5_K / Q6_K as nibbles
// and planes of high bits (rows interleaved by groups), Q8_0 as bytes, and the byte-per-weight form of Q5_0 / Q5_1 /
// Q5_K / Q6_K (|q| <= 32, scales per 16 weights: gguf_blocks.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstring>
#include <cstdint>
#include <vector>

#include "cache_lines.h"
#include "gguf_blocks.h"
#if defined(__AVX512VNNI__)
#include "gguf_q8_avx512.h"
#endif
#if defined(__AMX_INT8__)
#include "gguf_q8_amx.h"
#endif
#include "kernels.h"
#include "vec.h"

namespace {

using namespace slipstream;

// x as int8 blocks: quants [M, K] (zero rows below, up to `rows` in all: the tiles load whole tiles of 16), and per
// block its scale and the sum of its rounded values (and the sums of its two halves, for mins per 16 weights), rows
// padded with 8 zero blocks so vector loads of a last partial group of 8 blocks (16 halves) stay in bounds.
struct QuantizedRows {
  CacheLineVector<int8_t> q;  // (the int8 tiles load its rows)
  std::vector<float> scale, sum, half_sum;
  int64_t stride;  // per row, of scale and sum; half_sum's is twice this
};

inline void quantize_block(const float* x, int8_t* q, float* scale, float* sum, float* half_sum) {
  __m256 v[4];
  for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(x + 8 * i);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 amax = _mm256_andnot_ps(sign, v[0]);
  for (int i = 1; i < 4; ++i) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  const float mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
  *scale = mx / 127.0f;
  const __m256 inv = _mm256_set1_ps(mx > 0.0f ? 127.0f / mx : 0.0f);
  __m256i i[4];
  for (int k = 0; k < 4; ++k) i[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], inv));  // rounds to nearest
  // (integer sums of at most 16 quants: exact in float32, as is their total)
  half_sum[0] = hsum(_mm256_cvtepi32_ps(_mm256_add_epi32(i[0], i[1])));
  half_sum[1] = hsum(_mm256_cvtepi32_ps(_mm256_add_epi32(i[2], i[3])));
  *sum = (half_sum[0] + half_sum[1]) * *scale;
  half_sum[0] *= *scale;
  half_sum[1] *= *scale;
  // The packs work within 128-bit lanes; the permute puts the 32 bytes back in order.
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, int64_t rows = 0) {
  const int64_t nb = K / QK;
  rows = std::max(M, rows);
  QuantizedRows r{CacheLineVector<int8_t>(rows * K, 0), std::vector<float>(rows * (nb + 8)),
                  std::vector<float>(rows * (nb + 8)), std::vector<float>(rows * 2 * (nb + 8)), nb + 8};
  at::parallel_for(0, M * nb, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m = i / nb, b = i % nb;
      quantize_block(x + i * QK, r.q.data() + i * QK, &r.scale[m * r.stride + b], &r.sum[m * r.stride + b],
                     &r.half_sum[2 * (m * r.stride + b)]);
    }
  });
  return r;
}

// A weight block's 32 quants as bytes in the activations' order (Q4: low nibbles are weights
// 0..15, high nibbles 16..31).
template <QType T>
inline __m256i load_quants(const uint8_t* q) {
  if constexpr (!is_q4(T)) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  } else {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i mask = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask), _mm_and_si128(bytes, mask));
  }
}

// One weight row times MM activation rows, accumulators in registers. The integer dot of a block
// goes to fp32 once (8 lanes of int32 partial sums) and is scaled by weight scale x row scale.
// Tiles of several weight rows measured slower at every batch size: they read the weights hopping
// between rows, which the hardware prefetchers do not follow (a 30-layer chain of batch-1 matmuls
// straight from DRAM took 8.7 ms in tiles of 8 rows, 5.4 ms row by row).
template <QType T, int MM>
void q8_rows(const QuantizedRows& xq, int64_t m0, Weights w, float* y, int64_t K, int64_t N, int64_t n0,
             int64_t n1) {
  const int64_t nb = K / QK, row_bytes = nb * quant_bytes<T>();
  const int8_t* xb = xq.q.data() + m0 * K;
  const float* xd = xq.scale.data() + m0 * xq.stride;
  const float* xs = xq.sum.data() + m0 * xq.stride;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qs = w.qs + n * row_bytes;
    __m256 acc[MM];
    for (int m = 0; m < MM; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b0 = 0; b0 < nb; b0 += 8) {
      const int64_t count = std::min<int64_t>(8, nb - b0);
      alignas(32) float scale[MM][8];
      const __m256 d = load_scales<T>(w.scales, w.fscales, n * nb + b0, count);
      // Q4_1 / Q4_K: + min * sum(x); Q4_0: quants are offset by 8, so - 8 * d * sum(x).
      __m256 offset = _mm256_setzero_ps();
      if constexpr (has_mins(T)) offset = load_scales<T>(w.mins, w.fmins, n * nb + b0, count);
      if constexpr (T == QType::Q4_0) offset = _mm256_mul_ps(d, _mm256_set1_ps(-8.0f));
      for (int m = 0; m < MM; ++m) {
        _mm256_store_ps(scale[m], _mm256_mul_ps(d, _mm256_loadu_ps(xd + m * xq.stride + b0)));
        if constexpr (T != QType::Q8_0)
          acc[m] = _mm256_fmadd_ps(offset, _mm256_loadu_ps(xs + m * xq.stride + b0), acc[m]);
      }
      for (int64_t j = 0; j < count; ++j) {
        const int64_t b = b0 + j;
        const __m256i wq = load_quants<T>(qs + b * quant_bytes<T>());
        // maddubs multiplies unsigned by signed bytes: Q8_0 moves the weights' signs onto x.
        const __m256i wu = T == QType::Q8_0 ? _mm256_sign_epi8(wq, wq) : wq;
        for (int m = 0; m < MM; ++m) {
          __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + m * K + b * QK));
          if constexpr (T == QType::Q8_0) xv = _mm256_sign_epi8(xv, wq);
          const __m256 dot = _mm256_cvtepi32_ps(dot_u8s8(_mm256_setzero_si256(), wu, xv));
          acc[m] = _mm256_fmadd_ps(dot, _mm256_broadcast_ss(&scale[m][j]), acc[m]);
        }
      }
    }
    for (int m = 0; m < MM; ++m) y[(m0 + m) * N + n] = hsum(acc[m]);
  }
}

// The byte-per-weight form (Q5_0, Q5_1, Q5_K, Q6_K): as q8_rows with Q8_0's signed bytes, except that each
// block's two halves have their own weight scale (int32 lanes 0-3 of the dot are the first 16 products, 4-7
// the second) and Q5_1 / Q5_K's mins per 16 meet the sums of x's rounded halves.
template <QType T, int MM>
void q8_k16_rows(const QuantizedRows& xq, int64_t m0, Weights w, float* y, int64_t K, int64_t N, int64_t n0,
                 int64_t n1) {
  const int64_t nb = K / QK, groups = K / 16;
  const int8_t* xb = xq.q.data() + m0 * K;
  const float* xd = xq.scale.data() + m0 * xq.stride;
  const float* xs = xq.half_sum.data() + m0 * 2 * xq.stride;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qs = w.qs + n * K;
    const float* d = w.fscales + n * groups;
    __m256 acc[MM];
    for (int m = 0; m < MM; ++m) acc[m] = _mm256_setzero_ps();
    if constexpr (has_mins(T)) {
      for (int64_t g0 = 0; g0 < groups; g0 += 8) {
        const __m256 mins = load_floats(w.fmins + n * groups + g0, std::min<int64_t>(8, groups - g0));
        for (int m = 0; m < MM; ++m)
          acc[m] = _mm256_fmadd_ps(mins, _mm256_loadu_ps(xs + m * 2 * xq.stride + g0), acc[m]);
      }
    }
    for (int64_t b = 0; b < nb; ++b) {
      const __m256i wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + b * QK));
      const __m256i wu = _mm256_sign_epi8(wq, wq);  // maddubs takes unsigned weights: their signs move onto x
      const __m256 halves = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(d[2 * b])),
                                                 _mm_set1_ps(d[2 * b + 1]), 1);
      for (int m = 0; m < MM; ++m) {
        const __m256i xv = _mm256_sign_epi8(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + m * K + b * QK)), wq);
        const __m256 dot = _mm256_cvtepi32_ps(dot_u8s8(_mm256_setzero_si256(), wu, xv));
        acc[m] = _mm256_fmadd_ps(dot, _mm256_mul_ps(halves, _mm256_broadcast_ss(xd + m * xq.stride + b)), acc[m]);
      }
    }
    for (int m = 0; m < MM; ++m) y[(m0 + m) * N + n] = hsum(acc[m]);
  }
}

// Q4 weights interleaved by 8 rows (`interleave_q4_rows` in layers.py): for rows 8g..8g+7 and
// block b, 128 bytes hold four vectors whose low nibbles are quads 2t and high nibbles quads 2t+1,
// lane i (4 bytes) of quad k being row 8g+i's weights 4k..4k+3 (5 and 6 bits: then planes of their high
// bits, gguf_blocks.h). One maddubs against a broadcast quad of x then advances eight rows at once,
// the block's eight products add up in int16 (|sum| <= 8 * 2 * 15 * 127 < 2^15; the 5- and 6-bit quants,
// up to 31 / 63, widen to int32 every two), and converting and scaling happen once per block for all eight
// rows: about half the multiply-unit work of the row layout, which bounds large batches.

// Vector t of block `q` of a group of 8 rows unpacked: lo / hi hold quads 2t / 2t+1 (its low / high nibbles) of the 8
// rows, with the high bits of the 5- and 6-bit types ORed in. (16-bit shifts: the masks keep each byte's own bits,
// never those shifted in from its neighbour.)
template <QType T>
[[gnu::always_inline]] inline void unpack_nibble_vector8(const uint8_t* q, int t, __m256i& lo, __m256i& hi) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * t));
  lo = _mm256_and_si256(packed, low);
  hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
  if constexpr (high_bit_planes(T) == 1) {  // bits 2t and 2t+1 of each byte are quads 2t and 2t+1's fifth bits
    const __m256i fifth = _mm256_set1_epi8(0x10);
    const __m256i high_bits = _mm256_srl_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 128)),
                                               _mm_cvtsi32_si128(2 * t));
    lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(high_bits, 4), fifth));
    hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(high_bits, 3), fifth));
  } else if constexpr (high_bit_planes(T) == 2) {  // plane t / 2, its bits 0-3 (t even) or 4-7 (odd): two pairs
    const __m256i pair = _mm256_set1_epi8(0x30);
    const __m256i pairs = _mm256_srl_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 128 + 32 * (t / 2))),
                                           _mm_cvtsi32_si128(4 * (t % 2)));
    lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(pairs, 4), pair));
    hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(pairs, 2), pair));
  }
}

// int16 sums (AVX2 without VNNI) widen to int32 once a block, the 5- and 6-bit types' every two vectors; VNNI's are
// int32 already.
template <QType T>
constexpr bool wide_sums() {
  return SLIPSTREAM_VNNI || high_bit_planes(T) > 0;
}

// Vector t's products with MM rows of x's quantized block (`xb` at row 0's block, rows K apart), into the sums of its
// scale (Q6_K: vectors 0-1 and 2-3 have a scale each).
template <QType T, int MM>
[[gnu::always_inline]] inline void nibble_vector_dots8(__m256i lo, __m256i hi, int t, const int8_t* xb, int64_t K,
                                                       __m256i sum[][MM]) {
  for (int m = 0; m < MM; ++m) {
    int32_t x0, x1;
    std::memcpy(&x0, xb + m * K + 8 * t, 4);
    std::memcpy(&x1, xb + m * K + 8 * t + 4, 4);
    __m256i& s = sum[t * nibble_group_scales(T) / 4][m];
#if SLIPSTREAM_VNNI
    s = dot_u8s8(dot_u8s8(s, lo, _mm256_set1_epi32(x0)), hi, _mm256_set1_epi32(x1));
#else
    const __m256i two = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(x0)),
                                         _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x1)));
    if constexpr (wide_sums<T>()) s = _mm256_add_epi32(s, _mm256_madd_epi16(two, _mm256_set1_epi16(1)));
    else s = _mm256_add_epi16(s, two);
#endif
  }
}

// A block's sums scaled: acc(m) += d * x scale * sum (per scale h), + offset * x sum (`xd`, `xs` at row 0's block,
// rows `stride` apart; `xhs` at its first half, rows 2 `stride` apart).
template <QType T, int MM, typename Acc>
[[gnu::always_inline]] inline void scale_nibble_block8(const Weights& w, int64_t gb, __m256i sum[][MM], const float* xd,
                                                       const float* xs, const float* xhs, int64_t stride, Acc acc) {
  constexpr int S = nibble_group_scales(T);
  for (int h = 0; h < S; ++h) {
    const __m256 d = load_scales<T, Layout::NibbleGroups>(w.scales, w.fscales, (gb * S + h) * 8, 8);
    // The types with mins: + min * sum(x); the others' quants are offset by 8 / 16 / 32: - offset * d * sum(x).
    __m256 offset;
    if constexpr (has_mins(T)) offset = load_scales<T, Layout::NibbleGroups>(w.mins, w.fmins, gb * 8, 8);
    else offset = _mm256_mul_ps(d, _mm256_set1_ps(-quant_offset(T)));
    for (int m = 0; m < MM; ++m) {
      __m256& a = acc(m);
      const __m256i s = wide_sums<T>() ? sum[h][m] : _mm256_madd_epi16(sum[h][m], _mm256_set1_epi16(1));
      a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d, _mm256_set1_ps(xd[m * stride])), a);
      a = _mm256_fmadd_ps(offset, _mm256_set1_ps(S == 1 ? xs[m * stride] : xhs[2 * m * stride + h]), a);
    }
  }
}

// Groups [g0, g1) of 8 weight rows times MM activation rows from m0, the accumulators in registers.
template <QType T, int MM>
void q4x8_groups(const QuantizedRows& xq, int64_t m0, Weights w, float* y, int64_t K, int64_t N, int64_t g0,
                 int64_t g1) {
  constexpr int S = nibble_group_scales(T);
  const int64_t nb = K / QK, stride = xq.stride;
  for (int64_t g = g0; g < g1; ++g) {
    __m256 acc[MM];
    for (int m = 0; m < MM; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t gb = g * nb + b, r = m0 * stride + b;
      const uint8_t* q = w.qs + gb * group_block_bytes<T, 8>();
      prefetch_groups_ahead<T, Layout::NibbleGroups, 8, group_block_bytes<T, 8>(), S>(w, gb);
      __m256i sum[S][MM];
      for (int h = 0; h < S; ++h)
        for (int m = 0; m < MM; ++m) sum[h][m] = _mm256_setzero_si256();
      // Vector by vector, not unrolled: unrolled (or all four unpacked first), GCC keeps more vectors than AVX2's 16
      // registers hold and spills them (Q4 groups 15-30 % slower at 4-64 rows).
#pragma GCC unroll 1
      for (int t = 0; t < 4; ++t) {
        __m256i lo, hi;
        unpack_nibble_vector8<T>(q, t, lo, hi);
        nibble_vector_dots8<T, MM>(lo, hi, t, xq.q.data() + m0 * K + b * QK, K, sum);
      }
      scale_nibble_block8<T, MM>(w, gb, sum, xq.scale.data() + r, xq.sum.data() + r, xq.half_sum.data() + 2 * r,
                                 stride, [&](int m) -> __m256& { return acc[m]; });
    }
    for (int m = 0; m < MM; ++m) _mm256_storeu_ps(y + (m0 + m) * N + 8 * g, acc[m]);
  }
}

// As q4x8_groups for group g and `rows` (<= 64) activation rows, each block's weights unpacked once for all of them
// (into L1) and met by pieces of up to 4 rows, their outputs gathering in a tile: for the 5- and 6-bit types, whose
// high bits made unpacking once per piece costly.
template <QType T>
void q4x8_group_tile(const QuantizedRows& xq, int64_t m0, int64_t rows, Weights w, float* y, int64_t K, int64_t N,
                     int64_t g) {
  constexpr int S = nibble_group_scales(T);
  const int64_t nb = K / QK, stride = xq.stride;
  alignas(32) __m256 tile[64];  // (not y itself: its rows are N apart, which can alias in one L1 set)
  for (int64_t m = 0; m < rows; ++m) tile[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t gb = g * nb + b;
    const uint8_t* q = w.qs + gb * group_block_bytes<T, 8>();
    prefetch_groups_ahead<T, Layout::NibbleGroups, 8, group_block_bytes<T, 8>(), S>(w, gb);
    alignas(32) __m256i lo[4], hi[4];
    for (int t = 0; t < 4; ++t) unpack_nibble_vector8<T>(q, t, lo[t], hi[t]);
    for_row_pieces<4>(rows, [&](auto mm, int64_t mp) {
      constexpr int MM = decltype(mm)::value;
      const int64_t r = (m0 + mp) * stride + b;
      const int8_t* xb = xq.q.data() + (m0 + mp) * K + b * QK;
      __m256i sum[S][MM];
      for (int h = 0; h < S; ++h)
        for (int m = 0; m < MM; ++m) sum[h][m] = _mm256_setzero_si256();
      for (int t = 0; t < 4; ++t) nibble_vector_dots8<T, MM>(lo[t], hi[t], t, xb, K, sum);
      scale_nibble_block8<T, MM>(w, gb, sum, xq.scale.data() + r, xq.sum.data() + r, xq.half_sum.data() + 2 * r,
                                 stride, [&](int m) -> __m256& { return tile[mp + m]; });
    });
  }
  for (int64_t m = 0; m < rows; ++m) _mm256_storeu_ps(y + (m0 + m) * N + 8 * g, tile[m]);
}

// Q8_0 rows interleaved by 8 (ByteGroups without AVX-512 VNNI: an LM head under w4a8): vector k of a group's block
// holds quad k of its 8 rows, met by a broadcast quad of x. As in q8_rows, maddubs takes the weights' magnitudes, their
// signs moved onto x; a pair of products (|sum| <= 2 x 128 x 127) fills an int16, so each widens to int32 at once
// (dot_u8s8). The conversion and scaling happen once a block for 8 rows, not per row: the embedded model's LM head
// 1.33x / 1.64x / 1.48x q8_rows' speed at 1 / 8 / 32 rows (AMD EPYC Zen 3, 2 threads).
template <int MM>
void q8_0_x8_groups(const QuantizedRows& xq, int64_t m0, Weights w, float* y, int64_t K, int64_t N, int64_t g0,
                    int64_t g1) {
  constexpr int64_t BYTES = 8 * QK;
  const int64_t nb = K / QK, stride = xq.stride;
  const int8_t* xb = xq.q.data() + m0 * K;
  const float* xd = xq.scale.data() + m0 * stride;
  for (int64_t g = g0; g < g1; ++g) {
    __m256 acc[MM];
    for (int m = 0; m < MM; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t gb = g * nb + b;
      const uint8_t* q = w.qs + gb * BYTES;
      prefetch_groups_ahead<QType::Q8_0, Layout::ByteGroups, 8, BYTES>(w, gb);
      __m256i sum[MM];
      for (int m = 0; m < MM; ++m) sum[m] = _mm256_setzero_si256();
#pragma GCC unroll 1
      for (int k = 0; k < 8; ++k) {
        const __m256i wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * k));
        const __m256i wu = _mm256_sign_epi8(wq, wq);
        for (int m = 0; m < MM; ++m) {
          int32_t quad;
          std::memcpy(&quad, xb + m * K + b * QK + 4 * k, 4);
          sum[m] = dot_u8s8(sum[m], wu, _mm256_sign_epi8(_mm256_set1_epi32(quad), wq));
        }
      }
      const __m256 d = load_scales<QType::Q8_0, Layout::ByteGroups>(w.scales, w.fscales, gb * 8, 8);
      for (int m = 0; m < MM; ++m)
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[m]), _mm256_mul_ps(d, _mm256_set1_ps(xd[m * stride + b])),
                                 acc[m]);
    }
    for (int m = 0; m < MM; ++m) _mm256_storeu_ps(y + (m0 + m) * N + 8 * g, acc[m]);
  }
}

#if defined(__AMX_INT8__)
// Whether the AMX int8 tiles (gguf_q8_amx.h) take a matmul of M rows in the 16-row groups.
inline bool int8_tiles_serve(int64_t M) { return M >= amx::INT8_MIN_ROWS && amx::tiles_permitted(); }

template <QType T, Layout L>
void int8_tiles_linear(const float* x, Weights w, float* y, int64_t M, int64_t K, int64_t N) {
  const QuantizedRows xq = quantize_rows(x, M, K, (M + 15) / 16 * 16);
  amx::int8_groups_linear<T, L>({xq.q.data(), xq.scale.data(), xq.sum.data(), xq.stride}, w, y, M, K, N);
}
#endif

// Nibble groups (Q4, 5 and 6 bits) by G = 8 (q4x8_groups) or, in AVX-512 VNNI builds, 16 (gguf_q8_avx512.h).
template <QType T, int G>
void q4_groups_linear_impl(const float* x, Weights w, float* y, int64_t M, int64_t K, int64_t N) {
#if defined(__AMX_INT8__)
  if constexpr (G == 16 && amx::int8_takes<T, Layout::NibbleGroups>())
    if (int8_tiles_serve(M)) return int8_tiles_linear<T, Layout::NibbleGroups>(x, w, y, M, K, N);
#endif
  const QuantizedRows xq = quantize_rows(x, M, K);
  at::parallel_for(0, N / G, 16 / G, [&](int64_t begin, int64_t end) {
    // 16 weight rows at a time stay in L1 while the pieces of 64 activation rows (in L2) pass them.
    // Without the 64-row chunks a prompt's 2048 rows (1.2 MB at K = 576) came from L3 for every 16
    // weight rows: 15 % slower.
    for (int64_t mc = 0; mc < M; mc += 64)
      for (int64_t g0 = begin; g0 < end; g0 += 16 / G) {
        const int64_t rows = std::min<int64_t>(64, M - mc), g1 = std::min(g0 + 16 / G, end);
        if constexpr (high_bit_planes(T) > 0) {  // (their high bits: unpacked once for all the rows)
          if (rows > 4) {
            for (int64_t g = g0; g < g1; ++g) {
#if defined(__AVX512VNNI__)
              if constexpr (G == 16) {
                avx512::q4x16_group_tile<T, T == QType::Q6_K ? 4 : 8>(xq.q.data(), xq.scale.data(), xq.sum.data(),
                                                                      xq.half_sum.data(), xq.stride, mc, rows, w, y,
                                                                      K, N, g);
                continue;
              }
#endif
              q4x8_group_tile<T>(xq, mc, rows, w, y, K, N, g);
            }
            continue;
          }
        }
        for_row_pieces<4>(rows, [&](auto mm, int64_t m0) {
#if defined(__AVX512VNNI__)
          if constexpr (G == 16) {
            avx512::q4x16_groups<T, decltype(mm)::value>(xq.q.data(), xq.scale.data(), xq.sum.data(),
                                                         xq.half_sum.data(), xq.stride, mc + m0, w, y, K, N, g0, g1);
            return;
          }
#endif
          q4x8_groups<T, decltype(mm)::value>(xq, mc + m0, w, y, K, N, g0, g1);
        });
      }
  });
}

// Q8_0 rows interleaved by Q8_GROUP: 16 (gguf_q8_avx512.h) or 8 (q8_0_x8_groups).
void q8_0_groups_linear_impl(const float* x, Weights w, float* y, int64_t M, int64_t K, int64_t N) {
#if defined(__AMX_INT8__)
  if (int8_tiles_serve(M)) return int8_tiles_linear<QType::Q8_0, Layout::ByteGroups>(x, w, y, M, K, N);
#endif
  const QuantizedRows xq = quantize_rows(x, M, K);
#if !defined(__AVX512VNNI__)
  at::parallel_for(0, N / 8, 2, [&](int64_t begin, int64_t end) {
    for (int64_t mc = 0; mc < M; mc += 64)  // (as q4_groups_linear_impl: two groups' 16 rows stay in L1)
      for (int64_t g0 = begin; g0 < end; g0 += 2)
        for_row_pieces<4>(std::min<int64_t>(64, M - mc), [&](auto mm, int64_t m0) {
          q8_0_x8_groups<decltype(mm)::value>(xq, mc + m0, w, y, K, N, g0, std::min(g0 + 2, end));
        });
  });
#else
  std::vector<uint8_t> xu(xq.q.size());
  for (size_t i = 0; i < xu.size(); ++i) xu[i] = static_cast<uint8_t>(xq.q[i]) ^ 0x80;
  at::parallel_for(0, N / 16, 1, [&](int64_t begin, int64_t end) {
    for (int64_t mc = 0; mc < M; mc += 64)  // (as q4_groups_linear_impl: a group's 16 rows stay in L1)
      for (int64_t g = begin; g < end; ++g)
        for_row_pieces<8>(std::min<int64_t>(64, M - mc), [&](auto mm, int64_t m0) {
          avx512::q8_0_x16_groups<decltype(mm)::value>(xu.data(), xq.scale.data(), xq.stride, mc + m0, w, y, K, N, g,
                                                       g + 1);
        });
  });
#endif
}

template <QType T>
void q8_linear_impl(const float* x, Weights w, float* y, int64_t M, int64_t K, int64_t N) {
  const QuantizedRows xq = quantize_rows(x, M, K);
  for_weight_tiles<8>(M, N, [&](auto mm, int64_t m0, int64_t n0, int64_t n1) {
#if defined(__AVX512VNNI__)
    if constexpr (T == QType::Q8_0 || is_k16(T)) {
      avx512::byte_rows<T, decltype(mm)::value>(xq.q.data(), xq.scale.data(), xq.half_sum.data(), xq.stride, m0, w,
                                                y, K, N, n0, n1);
      return;
    }
#endif
    if constexpr (is_k16(T)) q8_k16_rows<T, decltype(mm)::value>(xq, m0, w, y, K, N, n0, n1);
    else q8_rows<T, decltype(mm)::value>(xq, m0, w, y, K, N, n0, n1);
  });
}

}  // namespace

int64_t q8_group_rows() { return Q8_GROUP; }

int64_t q4_group_rows() {
#if defined(__AVX512VNNI__)
  return 16;
#else
  return 8;
#endif
}

BlockLinear gguf_linear_q8_kernel(const at::Tensor& qs, const at::Tensor& scales, const at::Tensor& mins,
                                  int64_t qtype, int64_t K) {
  const auto type = static_cast<QType>(qtype);
  TORCH_CHECK(!is_half(type), "gguf_linear_q8 takes quantized blocks, not F16 / BF16 rows");
  if (qs.dim() == 3 && type == QType::Q8_0) {  // Q8_0 rows by Q8_GROUP
    TORCH_CHECK(qs.size(2) == Q8_GROUP * (QK + Q8_GROUP_SUM_BYTES),
                "bad interleaved bytes: this build takes Q8_0 rows interleaved by ", Q8_GROUP);
    return block_linear(qs.view({qs.size(0) * Q8_GROUP, -1}), scales.view({qs.size(0) * Q8_GROUP, -1}), mins, qtype,
                        K, [](auto type) -> LinearImpl {
                          if constexpr (decltype(type)::value == QType::Q8_0) return &q8_0_groups_linear_impl;
                          else return nullptr;
                        }, Layout::ByteGroups);
  }
  if (qs.dim() == 3) {  // nibble groups of G rows: [N / G, blocks, 16 G (5 bits: 20 G, Q6_K: 24 G)]
    const int64_t G = qs.size(2) / nibble_group_row_bytes(type);
    TORCH_CHECK(is_nibble_group_type(type) && qs.size(2) == nibble_group_row_bytes(type) * G &&
                (G == 8 || G == q4_group_rows()), "bad interleaved nibble groups");
    return block_linear(qs.view({qs.size(0) * G, -1}), scales.view({qs.size(0) * G, -1}),
                        mins.numel() ? mins.view({qs.size(0) * G, -1}) : mins, qtype, K,
                        [G](auto type) -> LinearImpl {
                          constexpr QType T = decltype(type)::value;
                          if constexpr (is_nibble_group_type(T)) {
#if defined(__AVX512VNNI__)
                            if (G == 16) return &q4_groups_linear_impl<T, 16>;
#endif
                            return &q4_groups_linear_impl<T, 8>;
                          } else {
                            return nullptr;
                          }
                        }, Layout::NibbleGroups);
  }
  return block_linear(qs, scales, mins, qtype, K, [](auto type) -> LinearImpl {
    if constexpr (!is_half(decltype(type)::value)) return &q8_linear_impl<decltype(type)::value>;
    else return nullptr;
  });
}

at::Tensor gguf_linear_q8(at::Tensor x, at::Tensor qs, at::Tensor scales, at::Tensor mins, int64_t qtype) {
  return run_block_linear(x, gguf_linear_q8_kernel(qs, scales, mins, qtype, x.size(-1)));
}
