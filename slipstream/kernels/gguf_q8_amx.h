// gguf_linear_q8 (w4a8) on AMX int8 tiles (the amx variant): the 16-row nibble groups of the types with a scale a
// block (Q4_0, Q4_1, Q4_K; Q5_0, Q5_1, Q5_K with their plane of fifth bits) and Q8_0's byte groups, for batches and
// prompts, bitwise as the AVX-512 VNNI group kernels (gguf_q8_avx512.h) compute them.
//
// A block's dot products are integers, exact in int32 however they are summed. One tile product per block, 16
// activation rows and group: A is 16 activation rows of x's int8 quants (the block's 32 bytes of each, where
// quantize_rows put them), B the block's weights for a group of 16 weight rows (8 quads x 16 rows: the nibble groups'
// own order once unpacked to bytes; Q8_0's byte groups as they lie), so C's row m is the vector of 16 sums the VNNI
// kernel builds with eight vpdpbusd for activation row m. Each C row then meets the scales through the VNNI kernel's
// instructions in its order (block after block, from zero): a row's outputs do not depend on which kernel served it,
// and w4a8's batch invariance holds across the switch between them. (TDPBSUD: x signed, the nibbles unsigned; Q8_0
// TDPBSSD.)
//
// What bounds it: every block's C tile is stored (1 KB per 8192 products at K = 32, a scale per 32) and its rows
// scaled with four float instructions each, the VNNI kernel's; the tiles only take the eight vpdpbusd a row. One
// thread, K = 1536, a block of 16 x 16 (a probe of this loop): 26 ns, of which the tile loads, product and store
// alone 12.6 and the scaling alone 9 (near its 64 float instructions on two ports). The embedded model's w4a8 matmuls
// in a step, 32 / 128 / 512 rows: 1.32x / 1.35x / 1.29x VNNI's (AMX Xeon, 2 threads).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "amx_tiles.h"
#include "gguf_blocks.h"
#include "gguf_q8_avx512.h"
#include "stolen_items.h"

namespace slipstream::amx {

// The group layouts these tiles take: Q6_K's two scales a block would need two products of 16 (not done).
template <QType T, Layout L>
constexpr bool int8_takes() {
  if constexpr (L == Layout::ByteGroups) return T == QType::Q8_0;
  else return L == Layout::NibbleGroups && is_nibble_group_type(T) && nibble_group_scales(T) == 1;
}

// Fewer activation rows than this go to the VNNI kernel: a tile of 16 rows would compute mostly padding. (This Xeon,
// 2 threads, the embedded model's w4a8 matmuls in a step on the tiles / on VNNI at 8 / 10 / 11 / 12 / 13 / 15 rows:
// 0.86x / 0.95x / 0.97x / 1.02-1.03x / 1.08x / 1.17x.)
constexpr int64_t INT8_MIN_ROWS = 12;

// Activation rows a thread takes through all its weight groups before the next ones: their quants stay in L2, and
// y's rows written for a group (N apart: one L1 set at N = 3072) are few. (gate_up, 1600 rows: 7.6 / 9.0 ms in chunks
// of 128 / 256, VNNI 8.8; 512 rows 2.15 ms, VNNI 2.75.)
constexpr int64_t INT8_CHUNK_ROWS = 128;

// x as quantize_rows leaves it, rows padded with zeros to a whole tile: quants [rows, K], and scales and sums of
// rounded values per row and block, `stride` apart.
struct Int8Rows {
  const int8_t* q;
  const float* scale;
  const float* sum;
  int64_t stride;
};

// A block's product into C tile c (A tile a: 16 activation rows of the block's 32 bytes, `ldx` apart; B tile bt:
// the group's 8 quads x 16 rows of 4 bytes). GCC's tile intrinsics take tile numbers as literals, hence the macro.
#define SLIPSTREAM_INT8_PRODUCT(dp, c, a, bt, x, ldx, w) \
  do {                                                  \
    _tile_loadd(a, x, ldx);                             \
    _tile_loadd(bt, w, 64);                             \
    _tile_zero(c);                                      \
    dp(c, a, bt);                                       \
  } while (0)

// y's rows [m0, m0 + 16) x group g (16 columns) for x's int8 rows times the group's blocks in layout L (`weights(b)`:
// block b's 8 quads x 16 rows as B takes them; `xd` / `xs`: x's block scales and sums as [block][row]). The sums stay
// in registers, a row each, named: GCC kept an array of them in memory (a load and a store a row and block), and
// 16 row pointers for the scales' broadcasts spilled its integer registers (both: 1.15x at 16-512 rows). Each
// block's product runs on the tiles while the one before is stored and scaled (C tiles 0 and 1 in turn; scaling a
// block one later, or three C tiles, ran 0.93x).
template <QType T, Layout L, typename BlockWeights>
[[gnu::always_inline]] inline void int8_group_tile(const int8_t* xq, const float* xd, const float* xs, const Weights& w,
                                                   float* y, int64_t valid, int64_t K, int64_t N, int64_t g,
                                                   BlockWeights weights) {
  constexpr bool nibbles = L == Layout::NibbleGroups;
  const int64_t nb = K / QK;
  alignas(64) int32_t c[2][256];
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0, a9 = a0,
         a10 = a0, a11 = a0, a12 = a0, a13 = a0, a14 = a0, a15 = a0;
  auto scale = [&](const int32_t* sums, int64_t b) {  // (the VNNI kernels' instructions, in their order)
    const int64_t gb = g * nb + b;
    const __m512 d = avx512::load_scales16<T, L>(w.scales, w.fscales, gb * 16);
    [[maybe_unused]] __m512 offset;
    if constexpr (has_mins(T)) offset = avx512::load_scales16<T, L>(w.mins, w.fmins, gb * 16);
    else if constexpr (nibbles) offset = _mm512_mul_ps(d, _mm512_set1_ps(-quant_offset(T)));
    const float* bd = xd + 16 * b;
    const float* bs = xs + 16 * b;
    auto row = [&](__m512& a, int r) {
      const __m512 sum = _mm512_cvtepi32_ps(_mm512_load_si512(sums + 16 * r));
      a = _mm512_fmadd_ps(sum, _mm512_mul_ps(d, _mm512_set1_ps(bd[r])), a);
      if constexpr (nibbles) a = _mm512_fmadd_ps(offset, _mm512_set1_ps(bs[r]), a);
    };
    row(a0, 0); row(a1, 1); row(a2, 2); row(a3, 3); row(a4, 4); row(a5, 5); row(a6, 6); row(a7, 7);
    row(a8, 8); row(a9, 9); row(a10, 10); row(a11, 11); row(a12, 12); row(a13, 13); row(a14, 14); row(a15, 15);
  };
  auto product = [](const int8_t* xb, int64_t ldx, const uint8_t* wb, int tile) {
    if constexpr (nibbles) {
      if (tile == 0) SLIPSTREAM_INT8_PRODUCT(_tile_dpbsud, 0, 2, 4, xb, ldx, wb);
      else SLIPSTREAM_INT8_PRODUCT(_tile_dpbsud, 1, 3, 5, xb, ldx, wb);
    } else {
      if (tile == 0) SLIPSTREAM_INT8_PRODUCT(_tile_dpbssd, 0, 2, 4, xb, ldx, wb);
      else SLIPSTREAM_INT8_PRODUCT(_tile_dpbssd, 1, 3, 5, xb, ldx, wb);
    }
  };
  product(xq, K, weights(0), 0);
  for (int64_t b = 0; b < nb; b += 2) {
    if (b + 1 < nb) product(xq + (b + 1) * QK, K, weights(b + 1), 1);
    _tile_stored(0, c[0], 64);
    scale(c[0], b);
    if (b + 1 < nb) {
      if (b + 2 < nb) product(xq + (b + 2) * QK, K, weights(b + 2), 0);
      _tile_stored(1, c[1], 64);
      scale(c[1], b + 1);
    }
  }
  const __m512 acc[16] = {a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15};
  for (int r = 0; r < valid; ++r) _mm512_storeu_ps(y + r * N + 16 * g, acc[r]);
}

#undef SLIPSTREAM_INT8_PRODUCT

// y [M, N] = x's int8 rows times groups of 16 weight rows in layout L, on the tiles.
template <QType T, Layout L>
void int8_groups_linear(const Int8Rows& x, Weights w, float* y, int64_t M, int64_t K, int64_t N) {
  constexpr bool nibbles = L == Layout::NibbleGroups;
  const int64_t nb = K / QK, tiles = (M + 15) / 16;
  // Each tile's block scales and sums as [block][row]: one pointer serves the 16 rows' broadcasts. (quantize_rows
  // writing them in this order instead measured no faster: 0.98-1.02x at 16-512 rows, 0.93x at 17.)
  CacheLineVector<float> xd(tiles * nb * 16), xs(nibbles ? tiles * nb * 16 : 0);
  for (int64_t m = 0; m < tiles * 16; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t at = ((m / 16) * nb + b) * 16 + m % 16;
      xd[at] = x.scale[m * x.stride + b];
      if constexpr (nibbles) xs[at] = x.sum[m * x.stride + b];
    }
  for (int64_t mc = 0; mc < M; mc += INT8_CHUNK_ROWS) {
    const int64_t rows = std::min(INT8_CHUNK_ROWS, M - mc);
    for_items_stealing(even_runs(N / 16), [&](const auto& claim, int64_t) {
      TileConfig config;
      config.tile(0, 16, 64).tile(1, 16, 64).tile(2, 16, QK).tile(3, 16, QK).tile(4, QK / 4, 64).tile(5, QK / 4, 64);
      config.load();
      CacheLineVector<uint8_t> unpacked(nibbles ? nb * 512 : 0);  // the group's blocks: 8 quads x 64 bytes each
      for (int64_t g; (g = claim()) >= 0;) {
        if constexpr (nibbles) {
          for (int64_t b = 0; b < nb; ++b) {
            __m512i lo[4], hi[4];
            avx512::unpack_nibble_block<T>(w, g * nb + b, lo, hi);
            for (int t = 0; t < 4; ++t) {
              _mm512_storeu_si512(unpacked.data() + b * 512 + 128 * t, lo[t]);
              _mm512_storeu_si512(unpacked.data() + b * 512 + 128 * t + 64, hi[t]);
            }
          }
        }
        for (int64_t m0 = mc; m0 < mc + rows; m0 += 16)
          int8_group_tile<T, L>(x.q + m0 * K, xd.data() + m0 * nb, nibbles ? xs.data() + m0 * nb : nullptr, w,
                                y + m0 * N, std::min<int64_t>(16, mc + rows - m0), K, N, g, [&](int64_t b) {
            if constexpr (nibbles) return static_cast<const uint8_t*>(unpacked.data() + b * 512);
            else return static_cast<const uint8_t*>(w.qs + (g * nb + b) * (512 + 32));
          });
      }
      _tile_release();
    });
  }
}

}  // namespace slipstream::amx
