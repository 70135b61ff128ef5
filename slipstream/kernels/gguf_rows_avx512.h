// gguf_linear's row kernels for AVX-512 (the avx512_vnni variant): 16 float32 lanes, 32 vector registers.
//
// Unlike the AVX2 kernels, which multiply x with a block's bare quants and apply its scale (and min, through
// sums of x) afterwards, these build each weight's value in registers exactly as the gguf package dequantizes it
// (scale x quant + min: the product is exact in float32, so one FMA rounds as the package's two operations do)
// and multiply x with it: the result is x @ dequantize(W)^T up to summation order, with no second term.
// A Q4 block costs one FMA for the 16 values its nibbles stand for (a table) and two permutes that look the
// nibbles up in it, where converting them to float took eight instructions. The 5-bit types come a byte a weight
// (Rows) or at their 5 bits (HighBitRows, what the loader gives this build: gguf_blocks.h).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cache_lines.h"
#include "gguf_blocks.h"

namespace slipstream::avx512 {

// Block (or group) `at`'s scale and min, so that its weights are scale * q + min.
template <QType T, Layout L = Layout::Rows>
inline float scale_at(const Weights& w, int64_t at) {
  if constexpr (half_scales(T, L)) return _cvtsh_ss(w.scales[at]);
  else return w.fscales[at];
}

// Whether a type's quants in a layout are offset (Q4_0's by 8 as in the file, Q5_0's by 16 in HighBitRows).
template <QType T, Layout L>
constexpr bool offset_quants() {
  return T == QType::Q4_0 || (T == QType::Q5_0 && L == Layout::HighBitRows);
}

template <QType T, Layout L = Layout::Rows>
inline float min_at(const Weights& w, int64_t at, float scale) {
  if constexpr (offset_quants<T, L>()) return -quant_offset(T) * scale;
  else if constexpr (!has_mins(T)) return 0.0f;
  else if constexpr (half_scales(T, L)) return _cvtsh_ss(w.mins[at]);
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

// Sixteen blocks' scales and (the types with them) stored mins from block `at` (count <= 16 of them; zero beyond) as
// floats, fp16 or float32 as the layout keeps them.
template <QType T, Layout L>
[[gnu::always_inline]] inline void row_scales16(const Weights& w, int64_t at, int64_t count, __m512& d, __m512& mn) {
  const __mmask16 valid = static_cast<__mmask16>((1u << count) - 1);
  if constexpr (half_scales(T, L)) {
    d = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, w.scales + at));
    if constexpr (has_mins(T)) mn = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, w.mins + at));
  } else {
    d = _mm512_maskz_loadu_ps(valid, w.fscales + at);
    if constexpr (has_mins(T)) mn = _mm512_maskz_loadu_ps(valid, w.fmins + at);
  }
}

// Sixteen blocks' scales and mins (an offset type's from its scale) from block `at` (count <= 16) into d and mn.
template <QType T, Layout L>
inline void half_scales16(const Weights& w, int64_t at, int64_t count, float* d, float* mn) {
  __m512 s, m = _mm512_setzero_ps();
  row_scales16<T, L>(w, at, count, s, m);
  _mm512_store_ps(d, s);
  if constexpr (offset_quants<T, L>()) _mm512_store_ps(mn, _mm512_mul_ps(s, _mm512_set1_ps(-quant_offset(T))));
  else if constexpr (has_mins(T)) _mm512_store_ps(mn, m);
}

// The rows' stream PREFETCH_AHEAD_BYTES ahead of block `at`, a line at a time, and their scales' (and mins') lines: the
// hardware prefetcher alone left a Q8_0 LM head (49152 x 576) read from DRAM at 10.9 GB/s at one row, 22.5 with these
// (2.1x; Q4_1's gate_up 1.25x), where the same weight in cache reads at 33 (Intel Xeon, 2 threads).
template <QType T, Layout L>
[[gnu::always_inline]] inline void prefetch_ahead(const Weights& w, int64_t at) {
  constexpr bool five_bits = L == Layout::HighBitRows;
  // bytes of a block (32 weights) and of its scales in their stream
  constexpr int64_t bytes = five_bits ? nibble_group_row_bytes(T) : is_q4(T) ? 16 : is_half(T) ? 64 : 32;
  constexpr int64_t scale_bytes = is_half(T) ? 0 : half_scales(T, L) ? 2 : is_k16(T) && !five_bits ? 8 : 4;
  constexpr int64_t ahead = PREFETCH_AHEAD_BYTES / bytes;  // (blocks)
  // (unsigned: a remainder is then one AND; signed, five instructions more a block: matmuls at one row 1.11x)
  const uint64_t block = static_cast<uint64_t>(at);
  if ((block * bytes) % 64 < bytes) prefetch_l2(w.qs + (at + ahead) * bytes);
  if constexpr (scale_bytes > 0) {
    if ((block * scale_bytes) % 64 >= scale_bytes) return;
    const int64_t i = (at + ahead) * scale_bytes;  // (bytes into the scales and mins)
    if constexpr (half_scales(T, L)) {
      prefetch_l2(w.scales + i / 2);
      if constexpr (has_mins(T)) prefetch_l2(w.mins + i / 2);
    } else {
      prefetch_l2(w.fscales + i / 4);
      if constexpr (has_mins(T)) prefetch_l2(w.fmins + i / 4);
    }
  }
}

// Block b of weight row n as the gguf package dequantizes it: weights 32b..32b+15 in w0, 32b+16..32b+31 in w1.
// A Q4 or 5-bit block takes its scale d and min from the caller (block_rows reads sixteen blocks' at once).
template <QType T, Layout L>
[[gnu::always_inline]] inline void block_values(const Weights& w, int64_t n, int64_t b, int64_t K, float d, float min,
                                                __m512& w0, __m512& w1) {
  constexpr bool five_bits = L == Layout::HighBitRows;
  const int64_t nb = K / QK;
  if constexpr (is_q4(T) || five_bits) {
    // Low nibbles are weights 0..15, high nibbles 16..31.
    const uint8_t* block = w.qs + (n * nb + b) * (five_bits ? nibble_group_row_bytes(T) : 16);
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block)));
    if constexpr (five_bits) {
      // Each weight's fifth bit ORed in from the block's word of them (in mask registers), its value then
      // converted: one FMA rounds d * q + min as the table's does (as fast as a lookup in a table of 32 through
      // permutex2var at 1-8 rows, 5-10 % faster at 32-64, AMD EPYC Zen 4).
      __mmask16 fifth0, fifth1;
      std::memcpy(&fifth0, block + 16, 2);
      std::memcpy(&fifth1, block + 18, 2);
      const __m512i sixteen = _mm512_set1_epi32(16);
      const __m512i low = _mm512_and_si512(q, _mm512_set1_epi32(0x0F)), high = _mm512_srli_epi32(q, 4);
      const __m512 dv = _mm512_set1_ps(d), mv = _mm512_set1_ps(min);
      w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_mask_or_epi32(low, fifth0, low, sixteen)), dv, mv);
      w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_mask_or_epi32(high, fifth1, high, sixteen)), dv, mv);
    } else {  // a table of the 16 values, looked up by nibble (permutexvar reads an index's low 4 bits only)
      const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      const __m512 table = _mm512_fmadd_ps(iota, _mm512_set1_ps(d), _mm512_set1_ps(min));
      w0 = _mm512_permutexvar_ps(q, table);
      w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table);
    }
  } else if constexpr (T == QType::Q8_0) {
    const uint8_t* q = w.qs + (n * nb + b) * 32;
    const __m512 scale = _mm512_set1_ps(scale_at<T>(w, n * nb + b));
    w0 = _mm512_mul_ps(load_bytes16(q), scale);
    w1 = _mm512_mul_ps(load_bytes16(q + 16), scale);
  } else if constexpr (is_k16(T)) {  // a byte per weight, a scale (and min) per 16
    const int8_t* q = reinterpret_cast<const int8_t*>(w.qs) + n * K + 32 * b;
    const int64_t g = n * (K / 16) + 2 * b;
    w0 = _mm512_fmadd_ps(load_bytes16(q), _mm512_set1_ps(w.fscales[g]), _mm512_set1_ps(min_at<T>(w, g, 0.0f)));
    w1 = _mm512_fmadd_ps(load_bytes16(q + 16), _mm512_set1_ps(w.fscales[g + 1]),
                         _mm512_set1_ps(min_at<T>(w, g + 1, 0.0f)));
  } else {  // F16 / BF16 rows
    const uint16_t* h = reinterpret_cast<const uint16_t*>(w.qs) + n * K + 32 * b;
    w0 = load_half16<T>(h);
    w1 = load_half16<T>(h + 16);
  }
}

// The same, a Q4 or 5-bit block's scale and min read here.
template <QType T, Layout L>
[[gnu::always_inline]] inline void block_values(const Weights& w, int64_t n, int64_t b, int64_t K, __m512& w0,
                                                __m512& w1) {
  float d = 0.0f, min = 0.0f;
  if constexpr (is_q4(T) || L == Layout::HighBitRows) {
    const int64_t at = n * (K / QK) + b;
    d = scale_at<T, L>(w, at);
    min = min_at<T, L>(w, at, d);
  }
  block_values<T, L>(w, n, b, K, d, min, w0, w1);
}

// y[m, n] for R weight rows from n and MM activation rows: each 32 weights (two vectors) are dequantized once and
// meet the MM rows of x in two accumulator chains per activation row and weight row.
template <QType T, int MM, int R, Layout L>
[[gnu::always_inline]] inline void block_rows_pass(const float* x, Weights w, float* y, int64_t K, int64_t N,
                                                   int64_t n) {
  constexpr bool five_bits = L == Layout::HighBitRows;
  const int64_t nb = K / QK;
  // At one or two rows a Q4 block's work is its lookup, and converting its fp16 scale and min there took six
  // instructions, on the pipes the lookup needs: sixteen blocks' are converted at once and broadcast from memory
  // (30 layers of SmolLM2's matmuls at one row 10 % faster, AMD EPYC Zen 4). So too Q5_0's and Q5_1's at any count.
  constexpr bool scales_in_memory = half_scales(T, L) && (is_q4(T) || five_bits) && (MM <= 2 || five_bits);
  alignas(64) float scales16[R][16], mins16[R][16];
  __m512 acc[R][MM][2];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MM; ++m) acc[r][m][0] = acc[r][m][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    for (int r = 0; r < R; ++r) {
      const int64_t at = (n + r) * nb + b;
      prefetch_ahead<T, L>(w, at);
      float d = 0.0f, min = 0.0f;
      if constexpr (is_q4(T) || five_bits) {
        if (scales_in_memory && b % 16 == 0)
          half_scales16<T, L>(w, at, std::min<int64_t>(16, nb - b), scales16[r], mins16[r]);
        d = scales_in_memory ? scales16[r][b % 16] : scale_at<T, L>(w, at);
        min = scales_in_memory ? mins16[r][b % 16] : min_at<T, L>(w, at, d);
      }
      __m512 w0, w1;
      block_values<T, L>(w, n + r, b, K, d, min, w0, w1);
      for (int m = 0; m < MM; ++m) {
        acc[r][m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * K + 32 * b), acc[r][m][0]);
        acc[r][m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * K + 32 * b + 16), acc[r][m][1]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MM; ++m) y[m * N + n + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][m][0], acc[r][m][1]));
}

// y[m, n] for weight rows [n0, n1) and MM activation rows (block_rows_pass). Layout L: Rows, or a 5-bit type's
// HighBitRows. At one or two activation rows each FMA chain waited on the one before it (4 cycles a block), so two
// weight rows go through together, each with its own chains: every sum is still its row's own, in the same order
// (bitwise as one at a time). Intel Xeon without AMX, one thread, weights in L2, ns a block at one row: Q4_K 1.66 ->
// 1.45, Q4_1 2.2 -> 1.6, Q4_0 1.76 -> 1.60 (now as many 512-bit operations as ports 0 and 5 take); Q4_K at two rows
// 2.14 -> 1.80. The embedded model's decode steps 1.11x / 1.17x at batch 1 / 2 (engine_ab.py); a 740M-parameter
// Q4_K_M model's, whose weights come from DRAM, 1.02x / 1.00x.
template <QType T, int MM, Layout L = Layout::Rows>
void block_rows(const float* x, Weights w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  constexpr int R = MM <= 2 ? 2 : 1;
  int64_t n = n0;
  for (; n + R <= n1; n += R) block_rows_pass<T, MM, R, L>(x, w, y, K, N, n);
  for (; n < n1; ++n) block_rows_pass<T, MM, 1, L>(x, w, y, K, N, n);
}

// Batches (TILED_MIN_ROWS or more): as a GEMM does. TILE_N weight rows at a time are dequantized to float32 once (the
// gguf package's values, block_values) and laid out k-major, [K][TILE_N], in a buffer that stays in L2; x is laid out
// k-major too, by pieces of TILE_M rows; then a register tile of TILE_M x TILE_N sums (24 vectors) takes, for each k,
// two weight vectors and one broadcast x value a row: one FMA per 16 products, and the sums are y's own rows, with
// no scale per block and no horizontal sums. Still x @ dequantize(W)^T up to summation order.
// (Intel Xeon without AMX, 2 threads, the embedded model's matmuls against the row kernel: 0.66x / 0.90x / 1.02x /
// 1.10x / 1.33x / 1.60x at 8 / 12 / 15 / 16 / 32 / 64 rows; against dequantize + oneDNN 1.07-1.55x at 64-256 rows.)
constexpr int64_t TILED_MIN_ROWS = 16;
constexpr int64_t TILE_N = 32;
constexpr int TILE_M = 12;

// dst[j][i] = src[i][j] for a 16 x 16 block of floats (rows `ss` and `ds` floats apart).
inline void transpose16(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ss);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ds, r[i]);
}

// y[r, 0..TILE_N) for MR rows of x (xt: [K][MR]) and a tile of weights (wt: [K][TILE_N]); `valid`: which of the
// TILE_N columns y has (two masks of 16).
template <int MR>
void tile_product(const float* xt, const float* wt, float* y, int64_t K, int64_t N, const __mmask16 valid[2]) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 w0 = _mm512_load_ps(wt + k * TILE_N), w1 = _mm512_load_ps(wt + k * TILE_N + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512 xv = _mm512_set1_ps(xt[k * MR + r]);
      acc[r][0] = _mm512_fmadd_ps(w0, xv, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(w1, xv, acc[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(y + r * N, valid[0], acc[r][0]);
    _mm512_mask_storeu_ps(y + r * N + 16, valid[1], acc[r][1]);
  }
}

// tile_product<rows> for 1 <= rows <= MR.
template <int MR>
inline void tile_product_rows(int64_t rows, const float* xt, const float* wt, float* y, int64_t K, int64_t N,
                              const __mmask16 valid[2]) {
  if constexpr (MR > 1)
    if (rows < MR) return tile_product_rows<MR - 1>(rows, xt, wt, y, K, N, valid);
  tile_product<MR>(xt, wt, y, K, N, valid);
}

template <QType T, Layout L>
void tiled_linear_impl(const float* x, Weights w, float* y, int64_t M, int64_t K, int64_t N) {
  const int64_t nb = K / QK;
  CacheLineVector<float> xt(M * K);  // piece by piece of TILE_M rows, each [K][its rows]
  for (int64_t m0 = 0; m0 < M; m0 += TILE_M) {
    const int64_t rows = std::min<int64_t>(TILE_M, M - m0);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t r = 0; r < rows; ++r) xt[m0 * K + k * rows + r] = x[(m0 + r) * K + k];
  }
  at::parallel_for(0, (N + TILE_N - 1) / TILE_N, 1, [&](int64_t t0, int64_t t1) {
    CacheLineVector<float> expanded(TILE_N * K), wt(K * TILE_N);  // row-major, then k-major
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * TILE_N, count = std::min(TILE_N, N - n0);
      for (int64_t i = 0; i < TILE_N; ++i) {
        float* row = expanded.data() + i * K;
        if (i >= count) {
          std::fill(row, row + K, 0.0f);
          continue;
        }
        for (int64_t b = 0; b < nb; ++b) {
          __m512 w0, w1;
          block_values<T, L>(w, n0 + i, b, K, w0, w1);
          _mm512_storeu_ps(row + 32 * b, w0);
          _mm512_storeu_ps(row + 32 * b + 16, w1);
        }
      }
      for (int64_t k0 = 0; k0 < K; k0 += 16)
        for (int64_t h = 0; h < TILE_N; h += 16)
          transpose16(expanded.data() + h * K + k0, K, wt.data() + k0 * TILE_N + h, TILE_N);
      const auto mask = [](int64_t c) { return static_cast<__mmask16>(c >= 16 ? 0xFFFF : (1u << c) - 1); };
      const __mmask16 valid[2] = {mask(count), mask(std::max<int64_t>(0, count - 16))};
      for (int64_t m0 = 0; m0 < M; m0 += TILE_M)
        tile_product_rows<TILE_M>(std::min<int64_t>(TILE_M, M - m0), xt.data() + m0 * K, wt.data(),
                                  y + m0 * N + n0, K, N, valid);
    }
  });
}

// y [M, N] = x @ dequantize(W)^T: below TILED_MIN_ROWS, over tiles of 16 weight rows, in pieces of up to 8 activation
// rows (16 accumulators) while the piece's rows of x fit in L1 beside the weights (24 KiB), else of up to 4: for the
// down projection (K = 1536) pieces of 8 read x from L2 for every weight row and measured 1.3x slower than pieces of 4.
template <QType T, Layout L = Layout::Rows>
void linear_impl(const float* x, Weights w, float* y, int64_t M, int64_t K, int64_t N) {
  if (M >= TILED_MIN_ROWS) return tiled_linear_impl<T, L>(x, w, y, M, K, N);
  auto piece = [&](auto mm, int64_t m0, int64_t n0, int64_t n1) {
    block_rows<T, decltype(mm)::value, L>(x + m0 * K, w, y + m0 * N, K, N, n0, n1);
  };
  if (8 * K * sizeof(float) <= 24 * 1024) for_weight_tiles<8>(M, N, piece);
  else for_weight_tiles<4>(M, N, piece);
}

}  // namespace slipstream::avx512
