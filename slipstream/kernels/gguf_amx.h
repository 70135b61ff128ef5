// gguf_linear on AMX (the amx variant): Q4_0 / Q4_1 / Q4_K / Q8_0 / BF16 rows and the 5-bit types' HighBitRows
// times float32 activations on bf16 tiles, still x @ dequantize(W)^T up to summation order (exact mode), for batches
// and prompts.
//
// A block's quants are small integers, exact in bf16; x is not, so each activation is split into three bf16 parts
// (hi + mid + lo == x exactly: each holds the next 8 of float32's 24 significant bits). Every product of a quant and a
// part is exact in float32, and the tiles sum them in float32: per block, the three parts' dot products with the
// quants add up to the block's sum of x times quants as a float32 kernel's would (in another order). That sum is
// then scaled by the block's scale and the min term (its min times the block's sum of x) added, as the AVX2 kernels
// do. Tiles: the weights are A (16 weight rows x one block of 32, expanded to bf16 once a call), the activations B
// (16 rows of x, pairs of k in the dword layout TDPBF16PS takes), C = 16 weight rows x 16 activation rows, stored
// after every block to be scaled into float32 sums. Three products a block where a float32 kernel has one FMA a
// weight and row, at 16x an FMA's work each: on 2 cores of an AMX Xeon 2.2-2.7x the AVX-512 kernel's speed at 32
// rows and more (~200 GMAC/s). Where the time goes, a one-thread probe of this loop (K = 576, 32 x 32 outputs a block,
// the operands in L2): 160 ns a block, of which the 12 products and 8 tile loads 80-85 (TDPBF16PS alone: 5.4 ns), the
// 4 C stores 35 and the scaling 45. The three add up: the vector code does not run beside the tile unit's. Scaling a
// block after the next block's products (0.92-1.09x), or a run of blocks' C tiles at once into sums in registers
// (1.0x for 3 blocks, 0.8x for 6-48), with the weights as B and x as A (the scales then a vector: 1.0x), with x's
// parts prefetched into L1 (0.90-0.99x in place) gained nothing. Every block's C tiles must be stored and scaled (a
// scale per 32 weights), three products a tile: ~2x the products' own time is this layout's floor.
// --dtype bfloat16 takes one part, x rounded to bf16 (`gguf_linear_rounded`): one product a block.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <vector>

#include "amx_tiles.h"
#include "gguf_blocks.h"
#include "gguf_rows_avx512.h"
#include "stolen_items.h"

namespace slipstream::amx {

// The types these tiles take in a layout: quants of at most 8 bits, 32 to a scale, and BF16 rows (a bf16
// checkpoint's own weights; F16's would need two bf16 parts); the Q4 types, Q8_0 and BF16 as rows, the 5-bit ones
// (Q5_0, Q5_1, Q5_K) as HighBitRows (a Q4_K_M file's Q5_0 where K is not a multiple of 256).
template <QType T, Layout L>
constexpr bool takes() {
  return L == Layout::HighBitRows ? high_bit_planes(T) == 1 : is_q4(T) || T == QType::Q8_0 || T == QType::BF16;
}

// Fewer activation rows than this go to the AVX-512 row kernel: a tile of 16 activation rows then computes mostly
// padding, and expanding every weight to bf16 costs more than it saves. (This Xeon, 2 threads, the embedded model's
// exact matmuls in a step on the tiles / on the row kernel at 8 / 9 / 10 / 11 / 12 / 15 rows: 0.87-0.89x / 1.17-1.20x
// / 1.20-1.24x / 1.31x / 1.35x / 1.69x; the row kernel takes 8 rows in one pass and a ninth in another.)
constexpr int64_t MIN_ROWS = 9;

// x's activation rows as the B tiles take them: for tile j of 16 rows and block b, Parts parts of 16 rows (pairs of
// k) x 16 activation rows' dwords, at ((j * nb + b) * Parts + part) * 512 words; rows beyond M are zero. Three parts
// are x exactly (exact mode); one is x rounded to bf16 (`gguf_linear_rounded`: --dtype bfloat16). And each block's
// sum of x, 16 rows at a time (xsum[(j * nb + b) * 16 + i]), for the min term of the types with mins (Sums).
struct SplitX {
  CacheLineVector<uint16_t> parts;  // (every word written: not zeroed first)
  std::vector<float> xsum;
};

template <bool Sums, int Parts>
SplitX split_x(const float* x, int64_t M, int64_t K) {
  const int64_t nb = K / QK, tiles = (M + 15) / 16;
  SplitX s{CacheLineVector<uint16_t>(tiles * nb * Parts * 512), std::vector<float>(tiles * nb * 16, 0.0f)};
  at::parallel_for(0, tiles * nb, 16, [&](int64_t begin, int64_t end) {  // (a prompt's rows: the threads share them)
    for (int64_t jb = begin; jb < end; ++jb) {
      const int64_t j = jb / nb, b = jb % nb;
      __m512i rows[Parts][16];
      for (int i = 0; i < 16; ++i) {
        const int64_t m = 16 * j + i;
        if (m >= M) {
          for (auto& part : rows) part[i] = _mm512_setzero_si512();
          continue;
        }
        const float* xb = x + m * K + b * QK;
        const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
        __m512i words[Parts];
        __m512 r0 = x0, r1 = x1;
        split_parts(r0, r1, words);
        for (int p = 0; p < Parts; ++p) rows[p][i] = words[p];
        // The sum of what the parts hold (x - what is left, exactly: x itself for three parts, x rounded for one).
        if constexpr (Sums)
          s.xsum[(j * nb + b) * 16 + i] =
              _mm512_reduce_add_ps(_mm512_add_ps(_mm512_sub_ps(x0, r0), _mm512_sub_ps(x1, r1)));
      }
      for (int p = 0; p < Parts; ++p) {
        transpose16(rows[p]);  // row i's pair k -> B row k, dword i
        uint16_t* out = s.parts.data() + ((j * nb + b) * Parts + p) * 512;
        for (int k = 0; k < 16; ++k) _mm512_storeu_si512(out + 32 * k, rows[p][k]);
      }
    }
  });
  return s;
}

// Weight rows [n0, n0 + rows) expanded to bf16 quants (Q4_0's less 8, HighBitRows' Q5_0 less 16), 16 rows of K;
// scales (and the types' with mins, mins) per block and row (d[b * 16 + r]), zero for rows beyond. A row's scales are
// read 16 blocks at a time and 16 rows' transposed at once, a Q4 row's quants 4 blocks a load: with a scalar scale
// and min a block and row instead (~30 instructions a block), the embedded model's exact matmuls ran 0.92-0.94x at
// 16 / 32 rows (a quarter of their time was this expansion), 1.0x at 132 (AMX Xeon, 2 threads).
template <QType T, Layout L>
void expand_weights(const Weights& w, int64_t K, int64_t n0, int64_t rows, uint16_t* a, float* d, float* mn) {
  constexpr bool five_bits = L == Layout::HighBitRows;
  const int64_t nb = K / QK;
  if constexpr (T == QType::BF16) {  // (only a last partial tile: the rows, zero below; no scales)
    std::memcpy(a, w.qs + n0 * K * 2, rows * K * 2);
    std::memset(a + rows * K, 0, (16 - rows) * K * 2);
    return;
  }
  for (int64_t b0 = 0; b0 < nb; b0 += 16) {
    const int64_t count = std::min<int64_t>(16, nb - b0);
    __m512i ds[16], mns[16];
    for (int r = 0; r < 16; ++r) {
      __m512 dr = _mm512_setzero_ps(), mr = _mm512_setzero_ps();
      if (r < rows) avx512::row_scales16<T, L>(w, (n0 + r) * nb + b0, count, dr, mr);
      ds[r] = _mm512_castps_si512(dr);
      mns[r] = _mm512_castps_si512(mr);
    }
    transpose16(ds);  // ds[i]: block b0 + i's scales of the 16 rows
    for (int64_t i = 0; i < count; ++i) _mm512_storeu_si512(d + (b0 + i) * 16, ds[i]);
    if constexpr (has_mins(T)) {
      transpose16(mns);
      for (int64_t i = 0; i < count; ++i) _mm512_storeu_si512(mn + (b0 + i) * 16, mns[i]);
    }
  }
  static const auto table = [] {  // bf16 of each quant (less the type's offset), looked up by quant
    std::array<uint16_t, 32> t{};
    for (int i = 0; i < 32; ++i) {
      const float f = static_cast<float>(i) - (avx512::offset_quants<T, L>() ? quant_offset(T) : 0.0f);
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      t[i] = static_cast<uint16_t>(bits >> 16);
    }
    return t;
  }();
  const __m512i lookup = _mm512_loadu_si512(table.data());
  const __m512i low = _mm512_set1_epi8(0x0F);
  // [low nibbles of blocks 0 and 1, high nibbles of 0 and 1] -> [low 0, high 0, low 1, high 1] (16 bytes a part)
  const __m512i pair_order = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
  std::memset(a + rows * K, 0, (16 - rows) * K * 2);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = n0 + r;
    int64_t b = 0;
    if constexpr (is_q4(T) && !five_bits) {  // low nibbles are weights 0..15, high nibbles 16..31
      for (; b + 4 <= nb; b += 4) {
        const int64_t at = n * nb + b;
        for (int i = 0; i < 4; ++i) avx512::prefetch_ahead<T, L>(w, at + i);
        const __m512i v = _mm512_loadu_si512(w.qs + at * 16);
        const __m512i lows = _mm512_and_si512(v, low), highs = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        const __m512i blocks01 = _mm512_permutex2var_epi64(lows, pair_order, highs);
        const __m512i blocks23 = _mm512_permutex2var_epi64(_mm512_shuffle_i64x2(lows, lows, 0xEE), pair_order,
                                                           _mm512_shuffle_i64x2(highs, highs, 0xEE));
        uint16_t* out = a + r * K + b * QK;
        const __m256i halves[4] = {_mm512_castsi512_si256(blocks01), _mm512_extracti64x4_epi64(blocks01, 1),
                                   _mm512_castsi512_si256(blocks23), _mm512_extracti64x4_epi64(blocks23, 1)};
        for (int i = 0; i < 4; ++i)
          _mm512_storeu_si512(out + i * QK, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(halves[i]), lookup));
      }
    }
    for (; b < nb; ++b) {
      const int64_t at = n * nb + b;
      avx512::prefetch_ahead<T, L>(w, at);
      __m512i words;
      if constexpr (T == QType::Q8_0) {
        const int8_t* q = reinterpret_cast<const int8_t*>(w.qs) + at * 32;
        const __m512 lo = avx512::load_bytes16(q), hi = avx512::load_bytes16(q + 16);
        words = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
      } else {  // low nibbles are weights 0..15, high nibbles 16..31 (5 bits: bit i of the word after them, i's fifth)
        const uint8_t* block = w.qs + at * (five_bits ? nibble_group_row_bytes(T) : 16);
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block));
        const __m128i low16 = _mm512_castsi512_si128(low);
        const __m256i nibbles = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low16), _mm_and_si128(v, low16));
        __m512i quants = _mm512_cvtepu8_epi16(nibbles);
        if constexpr (five_bits) {
          __mmask32 fifth;
          std::memcpy(&fifth, block + 16, 4);
          quants = _mm512_mask_add_epi16(quants, fifth, quants, _mm512_set1_epi16(16));  // (nibble + 16: its fifth bit)
        }
        words = _mm512_permutexvar_epi16(quants, lookup);
      }
      _mm512_storeu_si512(a + r * K + b * QK, words);
    }
  }
}

// One block of two weight tiles (A: tiles 4, 5) times x's three parts for one or two activation tiles (B: 6, 7),
// into C tiles 0 (weights 0-15 x activations 0-15), 1 (weights 0-15 x activations 16-31), 2 and 3 (weights 16-31):
// Intel's 2 x 2 blocking, four products independent of each other in flight, which covers a product's latency
// (several times its issue interval; chaining the three parts' products in one tile was bound by it). GCC's tile
// intrinsics take tile numbers as literals, hence the macro.
#define SLIPSTREAM_ZERO_C_TILES(two) \
  do {                               \
    _tile_zero(0);                   \
    _tile_zero(2);                   \
    if (two) {                       \
      _tile_zero(1);                 \
      _tile_zero(3);                 \
    }                                \
  } while (0)
#define SLIPSTREAM_STORE_C_TILES(c, two) \
  do {                                   \
    _tile_stored(0, (c)[0], 64);         \
    _tile_stored(2, (c)[2], 64);         \
    if (two) {                           \
      _tile_stored(1, (c)[1], 64);       \
      _tile_stored(3, (c)[3], 64);       \
    }                                    \
  } while (0)
#define SLIPSTREAM_TILE_PRODUCTS(a, lda, parts0, parts1, two, parts) \
  do {                                                               \
    _tile_loadd(4, a, lda);                                          \
    _tile_loadd(5, (a) + 16 * (lda) / 2, lda);                       \
    for (int p = 0; p < (parts); ++p) {                              \
      _tile_loadd(6, (parts0) + 512 * p, 64);                        \
      _tile_dpbf16ps(0, 4, 6);                                       \
      _tile_dpbf16ps(2, 5, 6);                                       \
      if (two) {                                                     \
        _tile_loadd(7, (parts1) + 512 * p, 64);                      \
        _tile_dpbf16ps(1, 4, 7);                                     \
        _tile_dpbf16ps(3, 5, 7);                                     \
      }                                                              \
    }                                                                \
  } while (0)

// acc[r] (activation rows of weight row r) += scale x row r of a drained C tile c (+ min x the block's sums of x).
template <bool Mins>
[[gnu::always_inline]] inline void scale_block(const float* c, const float* d, const float* mn, const float* xsum,
                                               float* acc) {
  const __m512 sums = Mins ? _mm512_loadu_ps(xsum) : _mm512_setzero_ps();
  for (int r = 0; r < 16; ++r) {
    __m512 v = _mm512_fmadd_ps(_mm512_load_ps(c + 16 * r), _mm512_set1_ps(d[r]), _mm512_load_ps(acc + 16 * r));
    if constexpr (Mins) v = _mm512_fmadd_ps(sums, _mm512_set1_ps(mn[r]), v);
    _mm512_store_ps(acc + 16 * r, v);
  }
}

// A weight tile pair's blocks times activation tiles j (parts, xsum at j's) and j + 1 when Two, into acc: each block's
// C tiles scaled into it, or (not Scaled: BF16 rows) the whole row summed in the tiles and stored once.
template <bool Two, bool Mins, bool Scaled, int Parts>
[[gnu::always_inline]] inline void block_pass(const uint16_t* rows_a, int64_t K, int64_t nb, const uint16_t* parts,
                                              const float* d, const float* mn, const float* xsum, float (*c)[256],
                                              float (*acc)[256]) {
  if (!Scaled) SLIPSTREAM_ZERO_C_TILES(Two);
  for (int64_t b = 0; b < nb; ++b) {
    const uint16_t* parts0 = parts + b * Parts * 512;
    if (Scaled) SLIPSTREAM_ZERO_C_TILES(Two);
    SLIPSTREAM_TILE_PRODUCTS(rows_a + b * QK, K * 2, parts0, parts0 + nb * Parts * 512, Two, Parts);
    if (!Scaled) continue;
    SLIPSTREAM_STORE_C_TILES(c, Two);
    #pragma GCC unroll 4
    for (int i = 0; i < (Two ? 4 : 2); ++i) {
      const int wt = Two ? i / 2 : i, at = Two ? i % 2 : 0;
      const int ci = Two ? i : 2 * i;
      scale_block<Mins>(c[ci], d + wt * nb * 16 + b * 16, mn + wt * nb * 16 + b * 16, xsum + (at * nb + b) * 16,
                        acc[ci]);
    }
  }
  if (!Scaled) SLIPSTREAM_STORE_C_TILES(acc, Two);
}

// y [M, N] for up to CHUNK_TILES tiles of activation rows, x in Parts bf16 parts (split_x).
template <QType T, Layout L, int Parts>
void chunk_linear(const float* x, Weights w, float* y, int64_t M, int64_t K, int64_t N) {
  constexpr bool mins = has_mins(T);
  // BF16 rows are the weights' values themselves: no scale a block, so the C tiles sum the whole row before one store,
  // and the tiles load the rows where they lie (but a last partial tile of them, copied with zeros below).
  constexpr bool scaled = T != QType::BF16;
  const int64_t nb = K / QK, tiles = (M + 15) / 16;
  const SplitX s = split_x<mins, Parts>(x, M, K);
  for_items_stealing(even_runs((N + 31) / 32), [&](const auto& claim, int64_t) {
    configure_tiles();
    CacheLineVector<uint16_t> a(32 * K);
    std::vector<float> d(nb * 32), mn(nb * 32);
    alignas(64) float c[4][256], acc[4][256];  // [weight tile * 2 + activation tile]
    for (int64_t t; (t = claim()) >= 0;) {
      const int64_t n0 = 32 * t, rows = std::min<int64_t>(32, N - n0);
      const uint16_t* rows_a = a.data();
      if (!scaled && rows == 32) rows_a = reinterpret_cast<const uint16_t*>(w.qs) + n0 * K;
      else
        for (int half = 0; half < 2; ++half)
          expand_weights<T, L>(w, K, n0 + 16 * half, std::clamp<int64_t>(rows - 16 * half, 0, 16),
                               a.data() + half * 16 * K, d.data() + half * nb * 16, mn.data() + half * nb * 16);
      for (int64_t j = 0; j < tiles; j += 2) {
        const bool two = j + 1 < tiles;
        std::memset(acc, 0, sizeof(acc));
        const uint16_t* parts = s.parts.data() + j * nb * Parts * 512;
        const float* xsum = s.xsum.data() + j * nb * 16;
        if (two) block_pass<true, mins, scaled, Parts>(rows_a, K, nb, parts, d.data(), mn.data(), xsum, c, acc);
        else block_pass<false, mins, scaled, Parts>(rows_a, K, nb, parts, d.data(), mn.data(), xsum, c, acc);
        // acc[i] row r, lane l is y[16 (j + at) + l, n0 + 16 wt + r]: transposed, row l is y's
        for (int i = 0; i < 4; ++i) {
          const int wt = i / 2, at = i % 2;
          const int64_t m0 = 16 * (j + at), valid_rows = std::clamp<int64_t>(rows - 16 * wt, 0, 16);
          if ((at == 1 && !two) || valid_rows == 0) continue;
          __m512i out[16];
          for (int r = 0; r < 16; ++r) out[r] = _mm512_castps_si512(_mm512_load_ps(acc[i] + 16 * r));
          transpose16(out);
          const __mmask16 valid = static_cast<__mmask16>((1u << valid_rows) - 1);
          for (int64_t l = 0; l < 16 && m0 + l < M; ++l)
            _mm512_mask_storeu_ps(y + (m0 + l) * N + n0 + 16 * wt, valid, _mm512_castsi512_ps(out[l]));
        }
      }
    }
    _tile_release();
  });
}

// Activation rows go in chunks of at most this many tiles (160 rows), split into their parts just before use: a
// chunk's parts (540 KiB to 1.4 MiB for K = 576 to 1536) stay in L2 while every weight tile passes them, where a whole
// prompt's would stream from memory once per weight tile. The chunks of a call are as even as they can be: each
// expands every weight again, and a step of 32 decodes and a 128-token prompt chunk in one chunk, not 128 + 32 rows,
// ran its matmuls 1.07-1.19x faster (AMX Xeon, 2 threads, two runs; 512 rows, four chunks of 128, the same).
constexpr int64_t CHUNK_TILES = 10;

// Parts 3: exact mode; 1: x rounded to bf16 (from MIN_ROWS rows; below, the exact row kernel serves either).
template <QType T, Layout L, int Parts>
void linear_impl(const float* x, Weights w, float* y, int64_t M, int64_t K, int64_t N) {
  if (M < MIN_ROWS) return avx512::linear_impl<T, L>(x, w, y, M, K, N);
  const int64_t tiles = (M + 15) / 16, chunks = (tiles + CHUNK_TILES - 1) / CHUNK_TILES;
  const int64_t chunk = 16 * ((tiles + chunks - 1) / chunks);
  for (int64_t m0 = 0; m0 < M; m0 += chunk)
    chunk_linear<T, L, Parts>(x + m0 * K, w, y + m0 * N, std::min(M - m0, chunk), K, N);
}

// The tiles' kernel for type T in layout L: x exactly (three parts), or `rounded` to bf16 (one).
template <QType T, Layout L>
LinearImpl kernel(bool rounded) {
  return rounded ? &linear_impl<T, L, 1> : &linear_impl<T, L, 3>;
}

}  // namespace slipstream::amx
