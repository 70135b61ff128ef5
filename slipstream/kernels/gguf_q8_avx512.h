// gguf_linear_q8's kernel for Q4 rows interleaved by 16 on AVX-512 VNNI (the avx512_vnni variant).
//
// The layout of q4x8_groups (gguf_linear_q8.cpp) with 16 rows a group: for rows 16g..16g+15 and block b, 256 bytes
// hold four 64-byte vectors whose low nibbles are quads 2t and high nibbles quads 2t+1, lane i (4 bytes) of quad k
// being row 16g+i's weights 4k..4k+3 (Q5_0, Q6_K: then planes of their high bits, gguf_blocks.h). One vpdpbusd
// against a broadcast quad of x advances sixteen rows, twice the 8-row kernel's eight, and each block's sums go to
// float32 and meet the scales once for all sixteen.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "gguf_blocks.h"

namespace slipstream::avx512 {

// Sixteen rows' scales (or mins) from index `at`: fp16 or float32 (`half_scales`).
template <QType T, Layout L>
inline __m512 load_scales16(const uint16_t* halves, const float* floats, int64_t at) {
  if constexpr (half_scales(T, L))
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(halves + at)));
  else return _mm512_loadu_ps(floats + at);
}

// Block gb (group g's block b) of 16-row nibble groups unpacked: lo[t] / hi[t] hold quads 2t / 2t+1 (its low / high
// nibbles) of the 16 rows, with the high bits of the 5- and 6-bit types ORed in; the weights 12 KB ahead are asked
// for. (16-bit shifts: the masks keep each byte's own bits, never those shifted in from its neighbour; ternary logic
// 0xF8 is A | (B & C).)
template <QType T>
[[gnu::always_inline]] inline void unpack_nibble_block(const Weights& w, int64_t gb, __m512i lo[4], __m512i hi[4]) {
  const uint8_t* q = w.qs + gb * group_block_bytes<T, 16>();
  prefetch_groups_ahead<T, Layout::NibbleGroups, 16, group_block_bytes<T, 16>(), nibble_group_scales(T)>(w, gb);
  const __m512i low = _mm512_set1_epi8(0x0F), fifth = _mm512_set1_epi8(0x10), pair = _mm512_set1_epi8(0x30);
  [[maybe_unused]] __m512i high_bits;  // 5 bits: bits 0 and 1 of each byte are quads 2t and 2t+1's fifth bits
  if constexpr (high_bit_planes(T) == 1) high_bits = _mm512_loadu_si512(q + 256);
  for (int t = 0; t < 4; ++t) {
    const __m512i packed = _mm512_loadu_si512(q + 64 * t);
    lo[t] = _mm512_and_si512(packed, low);
    hi[t] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
    if constexpr (high_bit_planes(T) == 1) {
      lo[t] = _mm512_ternarylogic_epi32(lo[t], _mm512_slli_epi16(high_bits, 4), fifth, 0xF8);
      hi[t] = _mm512_ternarylogic_epi32(hi[t], _mm512_slli_epi16(high_bits, 3), fifth, 0xF8);
      high_bits = _mm512_srli_epi16(high_bits, 2);
    } else if constexpr (high_bit_planes(T) == 2) {  // plane t / 2, its bits 0-3 (t even) or 4-7 (odd): two pairs
      __m512i pairs = _mm512_loadu_si512(q + 256 + 64 * (t / 2));
      if (t % 2) pairs = _mm512_srli_epi16(pairs, 4);
      lo[t] = _mm512_ternarylogic_epi32(lo[t], _mm512_slli_epi16(pairs, 4), pair, 0xF8);
      hi[t] = _mm512_ternarylogic_epi32(hi[t], _mm512_slli_epi16(pairs, 2), pair, 0xF8);
    }
  }
}

// x's quantized block b (`xq` at row m's block b: 32 bytes, rows K apart) for rows 0..MM-1 against the unpacked
// weights, then scaled: acc[m] += d * x scale * sum (per scale h of the block), + offset * x sum.
template <QType T, int MM, typename Acc>
[[gnu::always_inline]] inline void nibble_block_dots(const Weights& w, int64_t gb, const __m512i lo[4],
                                                     const __m512i hi[4], const int8_t* xq, int64_t K, const float* xd,
                                                     const float* xs, const float* xhs, int64_t stride, Acc acc) {
  constexpr int S = nibble_group_scales(T);  // Q6_K: a scale per 16 weights, vectors 0-1 and 2-3
  __m512i sum[S][MM];
  for (int h = 0; h < S; ++h)
    for (int m = 0; m < MM; ++m) sum[h][m] = _mm512_setzero_si512();
  for (int t = 0; t < 4; ++t)
    for (int m = 0; m < MM; ++m) {
      int32_t x0, x1;
      std::memcpy(&x0, xq + m * K + 8 * t, 4);
      std::memcpy(&x1, xq + m * K + 8 * t + 4, 4);
      sum[t * S / 4][m] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(sum[t * S / 4][m], lo[t], _mm512_set1_epi32(x0)),
                                              hi[t], _mm512_set1_epi32(x1));
    }
  for (int h = 0; h < S; ++h) {
    const __m512 d = load_scales16<T, Layout::NibbleGroups>(w.scales, w.fscales, (gb * S + h) * 16);
    // The types with mins: + min * sum(x); the others' quants are offset by 8 / 16 / 32: - offset * d * sum(x).
    __m512 offset;
    if constexpr (has_mins(T)) offset = load_scales16<T, Layout::NibbleGroups>(w.mins, w.fmins, gb * 16);
    else offset = _mm512_mul_ps(d, _mm512_set1_ps(-quant_offset(T)));
    for (int m = 0; m < MM; ++m) {
      __m512& a = acc(m);
      a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[h][m]), _mm512_mul_ps(d, _mm512_set1_ps(xd[m * stride])), a);
      a = _mm512_fmadd_ps(offset, _mm512_set1_ps(S == 1 ? xs[m * stride] : xhs[2 * m * stride + h]), a);
    }
  }
}

// Groups [g0, g1) of 16 weight rows times MM activation rows from m0 of x quantized to int8 blocks: `xq` its quants
// [M, K], `xd` / `xs` / `xhs` its block scales, sums of rounded values and sums of their halves (`stride` per row,
// 2 `stride` for halves). The accumulators stay in registers.
template <QType T, int MM>
void q4x16_groups(const int8_t* xq, const float* xd, const float* xs, const float* xhs, int64_t stride, int64_t m0,
                  Weights w, float* y, int64_t K, int64_t N, int64_t g0, int64_t g1) {
  const int64_t nb = K / QK;
  for (int64_t g = g0; g < g1; ++g) {
    __m512 acc[MM];
    for (int m = 0; m < MM; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t gb = g * nb + b;
      __m512i lo[4], hi[4];
      unpack_nibble_block<T>(w, gb, lo, hi);
      nibble_block_dots<T, MM>(w, gb, lo, hi, xq + m0 * K + b * QK, K, xd + m0 * stride + b, xs + m0 * stride + b,
                               xhs + 2 * (m0 * stride + b), stride, [&](int m) -> __m512& { return acc[m]; });
    }
    for (int m = 0; m < MM; ++m) _mm512_storeu_ps(y + (m0 + m) * N + 16 * g, acc[m]);
  }
}

// As q4x16_groups for group g and `rows` (<= 64) activation rows, each block's weights unpacked once for all of them:
// they pass it in pieces of up to PIECE, their outputs gathering in a tile in L1. Where unpacking is costly (the 5-
// and 6-bit types' high bits), once per block rather than once per piece of 4 rows: Q6_K's 576x1536 at 8 / 32 / 64
// rows 20 / 31 / 28 % faster, Q5_0's 960x576 2 / 9 / 6 % (AMD EPYC Zen 4); Q4's, cheaper to unpack, lost as much to
// the tile.
template <QType T, int PIECE>
void q4x16_group_tile(const int8_t* xq, const float* xd, const float* xs, const float* xhs, int64_t stride, int64_t m0,
                      int64_t rows, Weights w, float* y, int64_t K, int64_t N, int64_t g) {
  const int64_t nb = K / QK;
  alignas(64) __m512 tile[64];  // (not y itself: its rows are N apart, at N = 3072 all in one L1 set)
  for (int64_t m = 0; m < rows; ++m) tile[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t gb = g * nb + b;
    __m512i lo[4], hi[4];
    unpack_nibble_block<T>(w, gb, lo, hi);
    for_row_pieces<PIECE>(rows, [&](auto mm, int64_t mp) {
      const int64_t r = (m0 + mp) * stride + b;
      nibble_block_dots<T, decltype(mm)::value>(w, gb, lo, hi, xq + (m0 + mp) * K + b * QK, K, xd + r, xs + r,
                                                xhs + 2 * r, stride, [&](int m) -> __m512& { return tile[mp + m]; });
    });
  }
  for (int64_t m = 0; m < rows; ++m) _mm512_storeu_ps(y + (m0 + m) * N + 16 * g, tile[m]);
}

// Q8_0 rows interleaved by 16 (gguf_blocks.h's ByteGroups, `interleave_byte_rows`): an LM head under w4a8. For rows
// 16g..16g+15 and block b, eight 64-byte vectors, vector k's lane i (4 bytes) being row 16g+i's weights 4k..4k+3. One
// vpdpbusd against a broadcast quad of x advances sixteen rows, where byte_rows reduces each row across its lanes at
// the end. vpdpbusd takes one side unsigned: x's quants offset by 128 (`xu`, x ^ 0x80), the offset taken back off as
// 128 times each row's sum of quants (int16, after the quants): exact in int32.
template <int MM>
void q8_0_x16_groups(const uint8_t* xu, const float* xd, int64_t stride, int64_t m0, Weights w, float* y, int64_t K,
                     int64_t N, int64_t g0, int64_t g1) {
  constexpr int64_t BYTES = 512 + 32;  // a group's block: quants, then the rows' sums
  const int64_t nb = K / QK;
  const uint8_t* xb = xu + m0 * K;
  xd += m0 * stride;
  for (int64_t g = g0; g < g1; ++g) {
    __m512 acc[MM];
    for (int m = 0; m < MM; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t gb = g * nb + b;
      const uint8_t* q = w.qs + gb * BYTES;
      prefetch_groups_ahead<QType::Q8_0, Layout::ByteGroups, 16, BYTES>(w, gb);
      __m512i sum[MM];
      for (int m = 0; m < MM; ++m) sum[m] = _mm512_setzero_si512();
      for (int k = 0; k < 8; ++k) {
        const __m512i wv = _mm512_loadu_si512(q + 64 * k);
        for (int m = 0; m < MM; ++m) {
          int32_t quad;
          std::memcpy(&quad, xb + m * K + b * QK + 4 * k, 4);
          sum[m] = _mm512_dpbusd_epi32(sum[m], _mm512_set1_epi32(quad), wv);
        }
      }
      const __m256i sums = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 512));
      const __m512i offset = _mm512_slli_epi32(_mm512_cvtepi16_epi32(sums), 7);
      const __m512 d = load_scales16<QType::Q8_0, Layout::ByteGroups>(w.scales, w.fscales, gb * 16);
      for (int m = 0; m < MM; ++m)
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sum[m], offset)),
                                 _mm512_mul_ps(d, _mm512_set1_ps(xd[m * stride + b])), acc[m]);
    }
    for (int m = 0; m < MM; ++m) _mm512_storeu_ps(y + (m0 + m) * N + 16 * g, acc[m]);
  }
}

// Byte-per-weight rows — Q8_0 (an LM head, a Q4 file's embedding; a scale per 32) and the byte form of Q5_0 / Q5_1 /
// Q5_K / Q6_K (a scale, and for Q5_1 / Q5_K a min, per 16) — times MM activation rows, two blocks per 64-byte
// vpdpbusd: int32 lanes 0-7 hold block b's sums (0-3 its first 16 products), 8-15 block b+1's, scaled lane by lane.
// As in q8_rows (gguf_linear_q8.cpp), vpdpbusd takes unsigned bytes: the weights' magnitudes, their signs moved
// onto x. The mins meet the sums of x's rounded halves (`xhs`, 2 `stride` per row), 16 at a time.
template <QType T, int MM>
void byte_rows(const int8_t* xq, const float* xd, const float* xhs, int64_t stride, int64_t m0, Weights w, float* y,
               int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t nb = K / QK, groups = K / 16;
  const int8_t* xb = xq + m0 * K;
  xd += m0 * stride;
  xhs += m0 * 2 * stride;
  const __m512i quarter = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qs = w.qs + n * K;  // (K bytes a row in both forms)
    __m512 acc[MM];
    for (int m = 0; m < MM; ++m) acc[m] = _mm512_setzero_ps();
    if constexpr (has_mins(T)) {
      for (int64_t g0 = 0; g0 < groups; g0 += 16) {
        const __mmask16 valid = groups - g0 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (groups - g0)) - 1);
        const __m512 mins = _mm512_maskz_loadu_ps(valid, w.fmins + n * groups + g0);
        for (int m = 0; m < MM; ++m) acc[m] = _mm512_fmadd_ps(mins, _mm512_loadu_ps(xhs + m * 2 * stride + g0), acc[m]);
      }
    }
    for (int64_t b = 0; b < nb; b += 2) {
      const bool pair = b + 1 < nb;
      const __mmask64 bytes = pair ? ~0ULL : 0xFFFFFFFFULL;  // a last single block: the upper half zero
      const __m512i wq = _mm512_maskz_loadu_epi8(bytes, qs + b * 32);
      const __m512i wu = _mm512_abs_epi8(wq);
      const __mmask64 negative = _mm512_movepi8_mask(wq);
      __m512 dw;  // the weights' scales, lane by lane
      if constexpr (T == QType::Q8_0) {
        const float d0 = _cvtsh_ss(w.scales[n * nb + b]), d1 = pair ? _cvtsh_ss(w.scales[n * nb + b + 1]) : 0.0f;
        dw = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(d0), _mm512_set1_ps(d1));
      } else {
        dw = _mm512_permutexvar_ps(quarter, _mm512_maskz_loadu_ps(pair ? 0xF : 0x3, w.fscales + n * groups + 2 * b));
      }
      for (int m = 0; m < MM; ++m) {
        __m512i xv = _mm512_maskz_loadu_epi8(bytes, xb + m * K + b * QK);
        xv = _mm512_mask_sub_epi8(xv, negative, _mm512_setzero_si512(), xv);
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, xv));
        // (x's scales of a missing last block are its padding: zero)
        const __m512 dx = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(xd[m * stride + b]),
                                               _mm512_set1_ps(xd[m * stride + b + 1]));
        acc[m] = _mm512_fmadd_ps(dot, _mm512_mul_ps(dw, dx), acc[m]);
      }
    }
    for (int m = 0; m < MM; ++m) y[(m0 + m) * N + n] = _mm512_reduce_add_ps(acc[m]);
  }
}

}  // namespace slipstream::avx512
