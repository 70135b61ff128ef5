// y = x @ W^T with W kept in its GGUF block quantization (Q4_0, Q4_1, Q8_0; Q5_0, Q5_1, Q4_K, Q5_K, Q6_K as
// the loader unpacks them: gguf_blocks.h) or in half precision (F16, BF16), for small batches.
//
// Each 32-weight block is expanded to fp32 in registers and multiplied with fp32 activations, so
// the result equals x @ dequantize(W)^T up to summation order: the weights stay exactly what the
// file holds, and only a quarter (Q4) or a half (Q8) of fp32's bytes cross the memory bus.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gguf_blocks.h"
#ifdef __AVX512F__
#include "gguf_rows_avx512.h"
#endif
#ifdef __AMX_BF16__
#include "gguf_amx.h"
#endif
#include "kernels.h"
#include "vec.h"

namespace {

using namespace slipstream;

// The 32 quantized weights of one block as four vectors of 8 floats, before scale (and min).
template <QType T>
inline void load_block(const uint8_t* q, __m256 w[4]) {
  if constexpr (T == QType::Q8_0) {
    for (int i = 0; i < 4; ++i) w[i] = load_bytes8(reinterpret_cast<const int8_t*>(q) + 8 * i);
  } else {
    // Low nibbles are weights 0..15, high nibbles 16..31.
    __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    __m128i mask = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(bytes, mask);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
    if constexpr (T == QType::Q4_0) {
      __m256 eight = _mm256_set1_ps(8.0f);
      for (int i = 0; i < 4; ++i) w[i] = _mm256_sub_ps(w[i], eight);
    }
  }
}

// A Q4 block's 32 weights "in place", for linear_rows: its 16 bytes in both halves of a vector, vector t keeping in
// lane l nibble 2t (lanes 0-3) or 2t + 1 (lanes 4-7) of dword l % 4 where it lies, i.e. as the integer q * 16^nibble
// (the last vector shifted right by 4 first, so that nibble 7 stays clear of the sign bit); Q4_0's offset of 8 goes
// at the same place. Masks and conversions only: expanding the nibbles to one a lane took six shuffles a block, and
// AVX2 CPUs have two shuffle ports (AMD EPYC Zen 3, one thread: the layers' matmuls 1.3x faster at one activation row;
// an exact decode step 1.2x at batch 1, 1.09x at 4 and 16). x comes in the matching order and scale (in_place_x):
// every product is still the quant's times x's, exactly. (Q8_0 the same way, bytes masked in place: 1.16x at 3 rows,
// 0.92x at 1: not done.)
template <QType T>
inline void load_block_in_place(const uint8_t* q, __m256 w[4]) {
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  const __m256i nibbles01 = _mm256_setr_epi32(0xF, 0xF, 0xF, 0xF, 0xF0, 0xF0, 0xF0, 0xF0);
  const __m256i eights01 = _mm256_setr_epi32(8, 8, 8, 8, 0x80, 0x80, 0x80, 0x80);
  for (int t = 0; t < 4; ++t) {
    const int shift = t < 3 ? 8 * t : 20;  // (of the mask: the nibbles' positions, the last vector's after its shift)
    __m256i quants = _mm256_and_si256(t < 3 ? v : _mm256_srli_epi32(v, 4), _mm256_slli_epi32(nibbles01, shift));
    if constexpr (T == QType::Q4_0) quants = _mm256_sub_epi32(quants, _mm256_slli_epi32(eights01, shift));
    w[t] = _mm256_cvtepi32_ps(quants);
  }
}

// x [M, K] in load_block_in_place's order, block by block: position 8t + l holds weight 4(l % 4) + nibble / 2 (+ 16
// for an odd nibble) times 16^-nibble (the last vector's 16^-(nibble - 1)), nibble = 2t + l / 4. (Powers of two:
// exact, short of values below 2^-102, which become subnormal.)
std::vector<float> in_place_x(const float* x, int64_t M, int64_t K) {
  struct Source {
    int weight;
    float scale;
  };
  static const auto sources = [] {
    std::array<Source, QK> s{};
    for (int i = 0; i < QK; ++i) {
      const int t = i / 8, l = i % 8, nibble = 2 * t + l / 4;
      s[i] = {4 * (l % 4) + nibble / 2 + 16 * (nibble % 2), std::ldexp(1.0f, -4 * (t < 3 ? nibble : nibble - 1))};
    }
    return s;
  }();
  std::vector<float> out(M * K);
  for (int64_t b = 0; b < M * K; b += QK)
    for (int i = 0; i < QK; ++i) out[b + i] = x[b + sources[i].weight] * sources[i].scale;
  return out;
}

// One weight row times MM activation rows, accumulators in registers: MM independent FMA chains
// per block, each block's weights expanded once. One row at a time reads the weights in order,
// which the hardware prefetchers follow; tiles of several rows (hopping between them) did not.
template <QType T, int MM>
void linear_rows(const float* x, Weights w, const float* xsum, float* y, int64_t K, int64_t N, int64_t n0,
                 int64_t n1) {
  const int64_t nb = K / QK;
  const int64_t row_bytes = nb * quant_bytes<T>();
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qs = w.qs + n * row_bytes;
    __m256 acc[MM], min_acc[MM];
    for (int m = 0; m < MM; ++m) acc[m] = min_acc[m] = _mm256_setzero_ps();
    for (int64_t b0 = 0; b0 < nb; b0 += 8) {
      const int64_t count = std::min<int64_t>(8, nb - b0);
      alignas(32) float d[8];
      _mm256_store_ps(d, load_scales<T>(w.scales, w.fscales, n * nb + b0, count));
      if constexpr (has_mins(T)) {
        const __m256 mins = load_scales<T>(w.mins, w.fmins, n * nb + b0, count);
        for (int m = 0; m < MM; ++m)
          min_acc[m] = _mm256_fmadd_ps(mins, _mm256_loadu_ps(xsum + m * (nb + 8) + b0), min_acc[m]);
      }
      for (int64_t j = 0; j < count; ++j) {
        const int64_t b = b0 + j;
        __m256 wv[4];
        if constexpr (is_q4(T)) load_block_in_place<T>(qs + b * quant_bytes<T>(), wv);
        else load_block<T>(qs + b * quant_bytes<T>(), wv);
        const __m256 scale = _mm256_broadcast_ss(&d[j]);
        for (int m = 0; m < MM; ++m) {
          const float* xb = x + m * K + b * QK;
          __m256 dot = _mm256_mul_ps(wv[0], _mm256_loadu_ps(xb));
          dot = _mm256_fmadd_ps(wv[1], _mm256_loadu_ps(xb + 8), dot);
          dot = _mm256_fmadd_ps(wv[2], _mm256_loadu_ps(xb + 16), dot);
          dot = _mm256_fmadd_ps(wv[3], _mm256_loadu_ps(xb + 24), dot);
          acc[m] = _mm256_fmadd_ps(scale, dot, acc[m]);
        }
      }
    }
    for (int m = 0; m < MM; ++m) y[m * N + n] = hsum(_mm256_add_ps(acc[m], min_acc[m]));
  }
}

// Q5_0 / Q5_1 / Q5_K / Q6_K: one byte per weight, blocks of 16 each with a float32 scale (and, Q5_K, min): as
// linear_rows, over blocks of 16, the min term a scalar FMA per block against the block's sum of x.
template <QType T, int MM>
void k16_rows(const float* x, Weights w, const float* xsum, float* y, int64_t K, int64_t N, int64_t n0,
              int64_t n1) {
  const int64_t groups = K / 16;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* qs = reinterpret_cast<const int8_t*>(w.qs) + n * K;
    const float* d = w.fscales + n * groups;
    __m256 acc[MM];
    float min_acc[MM] = {};
    for (int m = 0; m < MM; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const __m256 w0 = load_bytes8(qs + 16 * g), w1 = load_bytes8(qs + 16 * g + 8);
      const __m256 scale = _mm256_broadcast_ss(d + g);
      for (int m = 0; m < MM; ++m) {
        const float* xb = x + m * K + 16 * g;
        const __m256 dot = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), _mm256_mul_ps(w0, _mm256_loadu_ps(xb)));
        acc[m] = _mm256_fmadd_ps(scale, dot, acc[m]);
        if constexpr (has_mins(T)) min_acc[m] += w.fmins[n * groups + g] * xsum[m * groups + g];
      }
    }
    for (int m = 0; m < MM; ++m) y[m * N + n] = hsum(acc[m]) + min_acc[m];
  }
}

// Eight half-precision weights as floats (exact: BF16 is float32's upper half, F16 widens losslessly).
template <QType T>
inline __m256 load_half8(const uint16_t* h) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(h));
  if constexpr (T == QType::F16) return _mm256_cvtph_ps(v);
  else return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

// F16 / BF16 rows: half the bytes of float32 and no scales, two accumulators per activation row.
template <QType T, int MM>
void half_rows(const float* x, Weights w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* row = reinterpret_cast<const uint16_t*>(w.qs) + n * K;
    __m256 acc[MM][2];
    for (int m = 0; m < MM; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __m256 w0 = load_half8<T>(row + k), w1 = load_half8<T>(row + k + 8);
      for (int m = 0; m < MM; ++m) {
        acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), acc[m][1]);
      }
    }
    for (int m = 0; m < MM; ++m) y[m * N + n] = hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
  }
}

template <QType T>
void half_linear_impl(const float* x, Weights w, float* y, int64_t M, int64_t K, int64_t N) {
  for_weight_tiles<4>(M, N, [&](auto mm, int64_t m0, int64_t n0, int64_t n1) {
    half_rows<T, decltype(mm)::value>(x + m0 * K, w, y + m0 * N, K, N, n0, n1);
  });
}

template <QType T>
void k16_linear_impl(const float* x, Weights w, float* y, int64_t M, int64_t K, int64_t N) {
  const int64_t groups = K / 16;
  std::vector<float> xsum;
  if constexpr (has_mins(T)) {
    xsum.assign(M * groups, 0.0f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < groups; ++g) {
        float s = 0;
        for (int i = 0; i < 16; ++i) s += x[m * K + 16 * g + i];
        xsum[m * groups + g] = s;
      }
  }
  for_weight_tiles<4>(M, N, [&](auto mm, int64_t m0, int64_t n0, int64_t n1) {
    const float* sm = xsum.empty() ? nullptr : xsum.data() + m0 * groups;
    k16_rows<T, decltype(mm)::value>(x + m0 * K, w, sm, y + m0 * N, K, N, n0, n1);
  });
}

template <QType T>
void linear_impl(const float* x, Weights w, float* y, int64_t M, int64_t K, int64_t N) {
  const int64_t nb = K / QK;
  // Sum of each activation block, for the blocks' minimum term; rows padded by 8 zeros so the
  // vector loads of a partial last group of blocks stay in bounds (and add nothing).
  std::vector<float> xsum;
  if constexpr (has_mins(T)) {
    xsum.assign(M * (nb + 8), 0.0f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < nb; ++b) {
        float s = 0;
        for (int i = 0; i < QK; ++i) s += x[m * K + b * QK + i];
        xsum[m * (nb + 8) + b] = s;
      }
  }
  std::vector<float> xq;
  if constexpr (is_q4(T)) xq = in_place_x(x, M, K);
  const float* xs = is_q4(T) ? xq.data() : x;
  // Pieces of 4, 2 and 1 activation rows, each fully unrolled (at 8 the accumulators no longer fit the 16 vector
  // registers).
  for_weight_tiles<4>(M, N, [&](auto mm, int64_t m0, int64_t n0, int64_t n1) {
    const float* sm = xsum.empty() ? nullptr : xsum.data() + m0 * (nb + 8);
    linear_rows<T, decltype(mm)::value>(xs + m0 * K, w, sm, y + m0 * N, K, N, n0, n1);
  });
}

// Row n of W as float32, the values the gguf package dequantizes (scale x quant, + min): every product is exact in
// float32 (an fp16, or a K-quant's fp16 x 6-bit scale, times a quant of at most 6 bits), so only the + min rounds.
template <QType T, Layout L = Layout::Rows>
void dequantize_row(Weights w, int64_t n, int64_t K, float* out) {
  if constexpr (L == Layout::HighBitRows) {  // (5-bit types: nibbles, then a word of fifth bits, gguf_blocks.h)
    const int64_t nb = K / QK;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), low = _mm256_set1_epi32(0x0F);
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t at = n * nb + b;
      const uint8_t* block = w.qs + at * nibble_group_row_bytes(T);
      const float d = half_scales(T, L) ? _cvtsh_ss(w.scales[at]) : w.fscales[at];
      float min = T == QType::Q5_0 ? -quant_offset(T) * d : 0.0f;  // (Q5_0's quants are offset by 16)
      if constexpr (has_mins(T)) min = half_scales(T, L) ? _cvtsh_ss(w.mins[at]) : w.fmins[at];
      uint32_t fifth;
      std::memcpy(&fifth, block + 16, 4);
      for (int i = 0; i < 4; ++i) {  // weights 8i..8i+7: nibbles of bytes 8(i % 2).., low (i < 2) or high
        const __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 8 * (i % 2)));
        const __m256i bytes = _mm256_cvtepu8_epi32(eight);
        const __m256i nibble = _mm256_and_si256(i < 2 ? bytes : _mm256_srli_epi32(bytes, 4), low);
        const __m256i bit = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(fifth >> (8 * i)), lane),
                                             _mm256_set1_epi32(1));
        const __m256 q = _mm256_cvtepi32_ps(_mm256_or_si256(nibble, _mm256_slli_epi32(bit, 4)));
        _mm256_storeu_ps(out + b * QK + 8 * i, _mm256_fmadd_ps(q, _mm256_set1_ps(d), _mm256_set1_ps(min)));
      }
    }
  } else if constexpr (is_half(T)) {
    const uint16_t* row = reinterpret_cast<const uint16_t*>(w.qs) + n * K;
    for (int64_t k = 0; k < K; k += 8) _mm256_storeu_ps(out + k, load_half8<T>(row + k));
  } else if constexpr (is_k16(T)) {
    const int64_t groups = K / 16;
    const int8_t* qs = reinterpret_cast<const int8_t*>(w.qs) + n * K;
    for (int64_t g = 0; g < groups; ++g) {
      const __m256 scale = _mm256_broadcast_ss(w.fscales + n * groups + g);
      __m256 w0 = _mm256_mul_ps(scale, load_bytes8(qs + 16 * g));
      __m256 w1 = _mm256_mul_ps(scale, load_bytes8(qs + 16 * g + 8));
      if constexpr (has_mins(T)) {
        const __m256 min = _mm256_broadcast_ss(w.fmins + n * groups + g);
        w0 = _mm256_add_ps(w0, min);
        w1 = _mm256_add_ps(w1, min);
      }
      _mm256_storeu_ps(out + 16 * g, w0);
      _mm256_storeu_ps(out + 16 * g + 8, w1);
    }
  } else {
    const int64_t nb = K / QK;
    const uint8_t* qs = w.qs + n * nb * quant_bytes<T>();
    for (int64_t b = 0; b < nb; ++b) {
      __m256 v[4];
      load_block<T>(qs + b * quant_bytes<T>(), v);
      const int64_t at = n * nb + b;
      const __m256 scale = _mm256_set1_ps(is_classic(T) ? _cvtsh_ss(w.scales[at]) : w.fscales[at]);
      __m256 min = _mm256_setzero_ps();
      if constexpr (has_mins(T)) min = _mm256_set1_ps(is_classic(T) ? _cvtsh_ss(w.mins[at]) : w.fmins[at]);
      for (int i = 0; i < 4; ++i) {
        const __m256 x = _mm256_mul_ps(scale, v[i]);
        _mm256_storeu_ps(out + b * QK + 8 * i, has_mins(T) ? _mm256_add_ps(x, min) : x);
      }
    }
  }
}

// Batches (tiled_min_rows or more): a tile of weight rows is expanded to float32 once (dequantize_row: the values the
// gguf package gives) into a buffer that stays in L2, then multiplied as a dense GEMM by register tiles of TileMM
// activation rows x TileNN weight rows: each weight vector loaded serves TileMM rows and each x vector TileNN, one FMA
// a product and no scale per block. Still x @ dequantize(W)^T up to summation order. AMD EPYC Zen 3, 2 threads, the
// embedded model's q/k/v, o, gate_up and down against linear_rows: 1.0x at 8 rows, 1.3x at 16, 1.5x at 32 and 64;
// against gguf_dequantize + MKL's GEMM 1.1-3x at 32-128 rows, even at 256 (dispatch.py's block_kernel_max_rows).
// F16 / BF16 rows (no block expansion to save) from 16 rows: 0.83x at 8, 1.07-1.17x at 16-128. (Tiles of 4 x 3
// measured best of 4 x 3, 3 x 4, 6 x 2 and 5 x 2; chunks of 64 or 128 activation rows gained nothing at 128-1024.)
constexpr int64_t tiled_min_rows(QType t) { return is_half(t) ? 16 : 8; }
constexpr int TileMM = 4, TileNN = 3;
constexpr int64_t TILE_ROWS = 4 * TileNN;  // weight rows expanded at a time

template <int MM, int NN>
void dense_tile(const float* x, const float* w, float* y, int64_t K, int64_t N) {
  __m256 acc[MM][NN];
  for (int m = 0; m < MM; ++m)
    for (int j = 0; j < NN; ++j) acc[m][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 wv[NN];
    for (int j = 0; j < NN; ++j) wv[j] = _mm256_loadu_ps(w + j * K + k);
    for (int m = 0; m < MM; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int j = 0; j < NN; ++j) acc[m][j] = _mm256_fmadd_ps(wv[j], xv, acc[m][j]);
    }
  }
  for (int m = 0; m < MM; ++m)
    for (int j = 0; j < NN; ++j) y[m * N + j] = hsum(acc[m][j]);
}

template <int MM>
void dense_tiles(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t rows) {
  int64_t j = 0;
  for (; j + TileNN <= rows; j += TileNN) dense_tile<MM, TileNN>(x, w + j * K, y + j, K, N);
  if (rows - j == 2) dense_tile<MM, 2>(x, w + j * K, y + j, K, N);
  else if (rows - j == 1) dense_tile<MM, 1>(x, w + j * K, y + j, K, N);
}

template <QType T>
void tiled_linear_impl(const float* x, Weights w, float* y, int64_t M, int64_t K, int64_t N) {
  at::parallel_for(0, N, TILE_ROWS, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(TILE_ROWS * K);
    for (int64_t n0 = begin; n0 < end; n0 += TILE_ROWS) {
      const int64_t rows = std::min(TILE_ROWS, end - n0);
      for (int64_t i = 0; i < rows; ++i) dequantize_row<T>(w, n0 + i, K, tile.data() + i * K);
      for_row_pieces<TileMM>(M, [&](auto mm, int64_t m0) {
        dense_tiles<decltype(mm)::value>(x + m0 * K, tile.data(), y + m0 * N + n0, K, N, rows);
      });
    }
  });
}

template <QType T, LinearImpl Rows>
void rows_or_tiles(const float* x, Weights w, float* y, int64_t M, int64_t K, int64_t N) {
  if (M >= tiled_min_rows(T)) tiled_linear_impl<T>(x, w, y, M, K, N);
  else Rows(x, w, y, M, K, N);
}

}  // namespace

at::Tensor gguf_dequantize(at::Tensor qs, at::Tensor scales, at::Tensor mins, int64_t qtype) {
  const auto type = static_cast<QType>(qtype);
  TORCH_CHECK(qs.dim() == 2 && scales.dim() <= 2, "bad GGUF weight (dequantize takes the row layout)");
  int64_t K = is_half(type) ? qs.size(1) / 2 : is_k16(type) ? qs.size(1) : scales.size(-1) * QK;
  const Layout layout = row_layout(type, qs.size(1), scales.size(-1) * QK);
  if (layout == Layout::HighBitRows) K = scales.size(-1) * QK;  // (a scale per 32 weights)
  auto out = at::empty({qs.size(0), K}, at::kFloat);
  float* op = out.data_ptr<float>();
  const Weights w = check_weights(qs, scales, mins, qtype, K, layout);
  with_qtype(qtype, [&](auto type) {
    constexpr QType T = decltype(type)::value;
    at::parallel_for(0, qs.size(0), 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        if constexpr (high_bit_planes(T) == 1)
          if (layout == Layout::HighBitRows) {
            dequantize_row<T, Layout::HighBitRows>(w, n, K, op + n * K);
            continue;
          }
        dequantize_row<T>(w, n, K, op + n * K);
      }
    });
  });
  return out;
}

std::vector<int64_t> tile_types() {
  std::vector<int64_t> types;
#ifdef __AMX_BF16__
  if (!amx::tiles_permitted()) return types;
  for (const QType t : {QType::Q4_0, QType::Q4_1, QType::Q5_0, QType::Q5_1, QType::Q8_0, QType::Q4_K, QType::Q5_K,
                        QType::Q6_K, QType::F16, QType::BF16})
    with_qtype(static_cast<int64_t>(t), [&](auto type) {
      constexpr QType T = decltype(type)::value;  // (the 5-bit ones as HighBitRows, the loader's on AVX-512 builds)
      if (amx::takes<T, Layout::Rows>() || amx::takes<T, Layout::HighBitRows>())
        types.push_back(static_cast<int64_t>(T));
    });
#endif
  return types;
}

bool takes_high_bit_rows() {
#ifdef __AVX512F__
  return true;
#else
  return false;
#endif
}

BlockLinear gguf_linear_kernel(const at::Tensor& qs, const at::Tensor& scales, const at::Tensor& mins, int64_t qtype,
                               int64_t K, bool rounded) {
  const auto type = static_cast<QType>(qtype);
  const Layout layout = qs.dim() == 2 ? row_layout(type, qs.size(1), K) : Layout::Rows;
#ifdef __AVX512F__  // every type in one kernel (gguf_rows_avx512.h), the 5-bit ones in HighBitRows too
  return block_linear(
      qs, scales, mins, qtype, K,
      [layout, rounded](auto type) -> LinearImpl {
        constexpr QType T = decltype(type)::value;
#ifdef __AMX_BF16__
        if (amx::tiles_permitted()) {  // (rounded: x as one bf16 part, not three)
          if constexpr (amx::takes<T, Layout::HighBitRows>())
            if (layout == Layout::HighBitRows) return amx::kernel<T, Layout::HighBitRows>(rounded);
          if constexpr (amx::takes<T, Layout::Rows>())
            if (layout == Layout::Rows) return amx::kernel<T, Layout::Rows>(rounded);
        }
#endif
        if constexpr (high_bit_planes(T) == 1)
          if (layout == Layout::HighBitRows) return &avx512::linear_impl<T, Layout::HighBitRows>;
        return &avx512::linear_impl<T>;
      },
      layout);
#else
  (void)rounded;  // (no tiles: x stays float32)
  TORCH_CHECK(layout == Layout::Rows, "this build takes the 5-bit types a byte a weight (HighBitRows: AVX-512)");
  return block_linear(qs, scales, mins, qtype, K, [](auto type) -> LinearImpl {
    constexpr QType T = decltype(type)::value;
    if constexpr (is_half(T)) return &rows_or_tiles<T, half_linear_impl<T>>;
    else if constexpr (is_k16(T)) return &rows_or_tiles<T, k16_linear_impl<T>>;
    else return &rows_or_tiles<T, linear_impl<T>>;
  });
#endif
}

at::Tensor gguf_linear(at::Tensor x, at::Tensor qs, at::Tensor scales, at::Tensor mins, int64_t qtype) {
  return run_block_linear(x, gguf_linear_kernel(qs, scales, mins, qtype, x.size(-1)));
}

at::Tensor gguf_linear_rounded(at::Tensor x, at::Tensor qs, at::Tensor scales, at::Tensor mins, int64_t qtype) {
  return run_block_linear(x, gguf_linear_kernel(qs, scales, mins, qtype, x.size(-1), true));
}
