// GGUF block weights as the matmul kernels take them: the loader splits each row of 32-weight
// blocks into quants [N, nb * quant bytes], fp16 scales [N, nb] and (Q4_1) fp16 mins [N, nb], so
// eight blocks' scales convert in one instruction and the min term is a vector FMA over eight blocks.
//
// K-quants (256-weight super-blocks with 6/8-bit sub-block scales) arrive unpacked by the loader
// (`split_gguf_blocks` in layers.py) into exact float32 scales and mins per sub-block (each an fp16 times a
// small integer: exact in float32): Q4_K as Q4_1's nibble layout per 32 weights with float32 scales [N, nb]
// and mins [N, nb]; Q5_K and Q6_K as one byte per weight (0..31, -32..31) in blocks of 16 with float32
// scales [N, K / 16] (and, Q5_K, mins). Q5_0 / Q5_1 (5-bit blocks of 32) take the same byte-per-weight form; the
// layouts below keep the 5- and 6-bit types at their own bits a weight where a kernel takes them so.
//
// F16 / BF16 rows [N, 2 K bytes] (no scales) are a half-precision checkpoint's own weights, exact in float32.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace slipstream {

constexpr int QK = 32;  // weights per block

enum class QType { F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30 };
// (GGML's ids)

// The classic types: fp16 scales (and mins) per 32 weights, as the file holds them.
constexpr bool is_classic(QType t) { return t == QType::Q4_0 || t == QType::Q4_1 || t == QType::Q8_0; }
// Nibbles in Q4_1's order per 32 weights (Q4_K as the loader gives it).
constexpr bool is_q4(QType t) { return t == QType::Q4_0 || t == QType::Q4_1 || t == QType::Q4_K; }
// Q5_0, Q5_1, Q5_K and Q6_K as the loader gives them: a byte per weight, blocks of 16.
constexpr bool is_k16(QType t) {
  return t == QType::Q5_0 || t == QType::Q5_1 || t == QType::Q5_K || t == QType::Q6_K;
}
constexpr bool is_half(QType t) { return t == QType::F16 || t == QType::BF16; }
constexpr bool has_mins(QType t) {
  return t == QType::Q4_1 || t == QType::Q5_1 || t == QType::Q4_K || t == QType::Q5_K;
}

// How split weights are laid out: row after row (gguf_linear, and gguf_linear_q8's row kernels), or rows interleaved
// in groups for gguf_linear_q8's group kernels (viewed as [N, ...] for the checks):
// - NibbleGroups (`interleave_q4_rows`, `interleave_high_bit_rows` in layers.py), G = 8 or 16 rows: per group and
//   block, 16 G bytes of nibbles (vector t: quads 2t and 2t+1, lane i row i's), then the high bits of the types with
//   more than four: the 5-bit types' plane of fifth bits (4 G bytes; bit k of byte j belongs to the weight whose low
//   bits are byte j of quad k), Q6_K's two planes of high pairs (8 G bytes; bits 2k..2k+1 of byte j of plane p belong
//   to quad 4p+k's byte j). Q5_0's and Q6_K's quants, 0..31 / 0..63, are offset by 16 / 32 as Q4_0's by 8. Scales
//   (and mins) fp16 (Q4_0, Q4_1, Q5_0, Q5_1) or float32 (Q4_K, Q5_K, Q6_K), one a row and block (Q6_K: one per 16
//   weights, two).
// - ByteGroups (`interleave_byte_rows`), Q8_GROUP rows: Q8_0: per group and block, 32 Q8_GROUP bytes of quants (vector
//   k's lane i: row i's weights 4k..4k+3), then, by 16 (AVX-512 VNNI), each row's sum of quants (int16); fp16 scales.
// - HighBitRows (`high_bit_rows`), gguf_linear's on AVX-512: the 5-bit types (Q5_0, Q5_1, Q5_K) row after row at
//   their own 5 bits a weight: per row and block 16 bytes of nibbles in Q4_1's order, then 4 bytes whose bit i is
//   weight i's fifth; quants 0..31 (Q5_0's offset by 16); scales (and mins) per 32 weights, fp16 for Q5_0 / Q5_1.
enum class Layout { Rows, NibbleGroups, ByteGroups, HighBitRows };
// Q8_0's ByteGroups: 16 rows with AVX-512 VNNI, whose vpdpbusd takes x + 128 as unsigned bytes and the rows' sums
// take the 128 back; else 8, for AVX2's maddubs (the weights' magnitudes, their signs moved onto x: no sums).
#if defined(__AVX512VNNI__)
constexpr int64_t Q8_GROUP = 16, Q8_GROUP_SUM_BYTES = 2;
#else
constexpr int64_t Q8_GROUP = 8, Q8_GROUP_SUM_BYTES = 0;
#endif
// Planes of bits beyond the nibbles in the nibble groups.
constexpr int high_bit_planes(QType t) {
  return t == QType::Q6_K ? 2 : t == QType::Q5_0 || t == QType::Q5_1 || t == QType::Q5_K ? 1 : 0;
}
constexpr bool is_nibble_group_type(QType t) { return is_q4(t) || high_bit_planes(t) > 0; }
constexpr int64_t nibble_group_row_bytes(QType t) { return 16 + 4 * high_bit_planes(t); }  // a row and block
constexpr int nibble_group_scales(QType t) { return t == QType::Q6_K ? 2 : 1; }  // a row and block
// Whether the scales (and mins) of a type in a layout are fp16: the classic types' everywhere, and Q5_0's and Q5_1's
// in the nibble groups (the file's d and m, exact; their byte form's per-16 values are float32, as are the K-quants'
// products of two).
constexpr bool half_scales(QType t, Layout layout) {
  return is_classic(t) ||
         ((t == QType::Q5_0 || t == QType::Q5_1) && (layout == Layout::NibbleGroups || layout == Layout::HighBitRows));
}
// The row layout of quants [N, row bytes] for K weights a row: a 5-bit type's HighBitRows (20 bytes a block, where its
// byte form takes 32), else Rows.
inline Layout row_layout(QType t, int64_t row_bytes, int64_t K) {
  return high_bit_planes(t) == 1 && row_bytes == K / QK * nibble_group_row_bytes(t) ? Layout::HighBitRows
                                                                                    : Layout::Rows;
}
template <QType T, int G>
constexpr int64_t group_block_bytes() {
  return nibble_group_row_bytes(T) * G;
}
// What the quants of the types without mins are offset by in the nibble groups (Q4_0 as in the file; Q5_0's 0..31,
// Q6_K's 0..63).
constexpr float quant_offset(QType t) { return t == QType::Q5_0 ? 16.0f : t == QType::Q6_K ? 32.0f : 8.0f; }
// Bytes of one 32-weight block's quants.
template <QType T>
constexpr int quant_bytes() {
  return T == QType::Q8_0 ? 32 : 16;
}

struct Weights {
  const uint8_t* qs;
  const uint16_t* scales;  // fp16 (classic types)
  const uint16_t* mins;
  const float* fscales;  // float32 (K-quants)
  const float* fmins;
};

// Bytes ahead of a group kernel's streams (quants, scales, mins) that it asks L2 for: the hardware prefetcher alone
// leaves them short of DRAM's bandwidth. 12 KB ahead, 30 layers of SmolLM2's w4a8 matmuls (weights on huge pages,
// from DRAM; AMD EPYC Zen 4, 2 threads) ran faster by 1-3 / 16-20 / 10 % at 1 / 8 / 32 rows in 16-row Q4 groups,
// 8 / 15 / 3 % in 8-row groups; byte groups (40 distinct weights in turn, one process) 15-30 % at 1 / 4 / 16 rows,
// the 49152-row Q8_0 LM head included (28 GB/s at one row). Always inlined: as a call in the block loop, it made GCC
// keep the sums in memory (slower than none).
constexpr int64_t PREFETCH_AHEAD_BYTES = 12 * 1024;

[[gnu::always_inline]] inline void prefetch_l2(const void* p) {
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1);
}

// Block gb + (12 KB) of rows interleaved by G, Bytes of quants a block and S scales (and mins) a row and block (fp16
// or float32): its quants, and the lines of scales (and mins) it starts. A prefetch past the end of the weights is
// dropped, never faults.
template <QType T, Layout L, int G, int64_t Bytes, int S = 1>
[[gnu::always_inline]] inline void prefetch_groups_ahead(const Weights& w, int64_t gb) {
  constexpr int64_t ahead = PREFETCH_AHEAD_BYTES / Bytes, scale_bytes = G * S * (half_scales(T, L) ? 2 : 4);
  for (int64_t i = 0; i < Bytes; i += 64) prefetch_l2(w.qs + (gb + ahead) * Bytes + i);
  if (scale_bytes < 64 && (gb + ahead) % (64 / scale_bytes)) return;  // (several blocks' scales to a line)
  const int64_t at = (gb + ahead) * G * S;
  for (int64_t i = 0; i < std::max<int64_t>(scale_bytes, 64); i += 64) {
    if constexpr (half_scales(T, L)) {
      prefetch_l2(w.scales + at + i / 2);
      if constexpr (has_mins(T)) prefetch_l2(w.mins + at + i / 2);
    } else {
      prefetch_l2(w.fscales + at + i / 4);
      if constexpr (has_mins(T)) prefetch_l2(w.fmins + at + i / 4);
    }
  }
}

// A row's last, partial group of blocks (K = 576: 18 blocks, 8 + 8 + 2) takes its n < 8 scales without a trip
// through memory: copied to a stack buffer and loaded as a vector, they stalled every row on store forwarding (the
// wide load spans narrower stores), ~70 cycles a row, nearly half of a one-row matmul at K = 576 (AMD EPYC Zen 3).

// Eight float32 values (n <= 8 of them valid, the rest zero; masked lanes are not read).
inline __m256 load_floats(const float* f, int64_t n) {
  if (n == 8) return _mm256_loadu_ps(f);
  const __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                                           _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_maskload_ps(f, valid);
}

// Eight fp16 values (n <= 8 of them valid, the rest zero) as floats.
inline __m256 load_halves(const uint16_t* h, int64_t n) {
  if (n == 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
  __m128i v = _mm_setzero_si128();
  switch (n) {  // (lane by lane: AVX2 has no masked 16-bit load)
    case 7: v = _mm_insert_epi16(v, h[6], 6); [[fallthrough]];
    case 6: v = _mm_insert_epi16(v, h[5], 5); [[fallthrough]];
    case 5: v = _mm_insert_epi16(v, h[4], 4); [[fallthrough]];
    case 4: v = _mm_insert_epi16(v, h[3], 3); [[fallthrough]];
    case 3: v = _mm_insert_epi16(v, h[2], 2); [[fallthrough]];
    case 2: v = _mm_insert_epi16(v, h[1], 1); [[fallthrough]];
    case 1: v = _mm_insert_epi16(v, h[0], 0);
  }
  return _mm256_cvtph_ps(v);
}

// Eight blocks' scales (or mins) from index `at`, `count` of them valid: fp16 or float32 (`half_scales`).
template <QType T, Layout L = Layout::Rows>
inline __m256 load_scales(const uint16_t* halves, const float* floats, int64_t at, int64_t count) {
  if constexpr (half_scales(T, L)) return load_halves(halves + at, count);
  else return load_floats(floats + at, count);
}

// Calls piece(std::integral_constant<int, MM>{}, m0) over M activation rows in pieces of MaxMM
// rows while that many are left, then of halves down to 1, and 3 where 3 are left (not 2 + 1: each
// piece streams the weights' work once): each size is its own unrolled kernel.
template <int MM, typename Piece>
inline int64_t run_piece(int64_t left, int64_t m0, Piece& piece) {
  if constexpr (MM == 4)
    if (left == 3) {
      piece(std::integral_constant<int, 3>{}, m0);
      return 3;
    }
  if constexpr (MM > 1)
    if (left < MM) return run_piece<MM / 2>(left, m0, piece);
  piece(std::integral_constant<int, MM>{}, m0);
  return MM;
}

template <int MaxMM, typename Piece>
inline void for_row_pieces(int64_t M, Piece piece) {
  for (int64_t m0 = 0; m0 < M;) m0 += run_piece<MaxMM>(M - m0, m0, piece);
}

// piece(mm, m0, n0, n1) for every tile of 16 weight rows [n0, n1) (tiles split between the threads) and every
// piece of the M activation rows (for_row_pieces): the 16 weight rows stay in L1 while the pieces pass them.
template <int MaxMM, typename Piece>
inline void for_weight_tiles(int64_t M, int64_t N, Piece piece) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n0 = begin; n0 < end; n0 += 16) {
      const int64_t n1 = std::min(n0 + 16, end);
      for_row_pieces<MaxMM>(M, [&](auto mm, int64_t m0) { piece(mm, m0, n0, n1); });
    }
  });
}

// Checks the split weights (in `layout`, viewed as rows) for K inputs a row and returns their pointers.
inline Weights check_weights(const at::Tensor& qs, const at::Tensor& scales, const at::Tensor& mins, int64_t qtype,
                             int64_t K, Layout layout = Layout::Rows) {
  const int64_t N = qs.size(0), nb = K / QK;
  TORCH_CHECK(K % QK == 0, "in_features must be a multiple of 32");
  const auto type = static_cast<QType>(qtype);
  TORCH_CHECK(is_classic(type) || type == QType::Q4_K || is_k16(type) || is_half(type), "unsupported GGUF type ",
              qtype);
  TORCH_CHECK(layout != Layout::HighBitRows || high_bit_planes(type) == 1, "bad 5-bit rows");
  const bool bytes = is_k16(type) && layout == Layout::Rows;  // a byte a weight, a scale per 16
  const int64_t per_block = bytes ? 2 : nibble_group_scales(type);  // scales
  int64_t q_bytes = nb * (type == QType::Q8_0 ? 32 : nibble_group_row_bytes(type));  // (5-6 bits: nibble groups)
  if (is_half(type)) q_bytes = 2 * K;
  else if (layout == Layout::ByteGroups) q_bytes = nb * (32 + Q8_GROUP_SUM_BYTES);  // (quants, sums by 16)
  else if (bytes) q_bytes = K;
  TORCH_CHECK(layout != Layout::ByteGroups || type == QType::Q8_0, "bad interleaved bytes");
  TORCH_CHECK(qs.scalar_type() == at::kByte && qs.is_contiguous() && qs.dim() == 2 && qs.size(1) == q_bytes,
              "bad GGUF weight");
  Weights w{qs.data_ptr<uint8_t>(), nullptr, nullptr, nullptr, nullptr};
  if (is_half(type)) return w;
  const int64_t groups = nb * per_block;  // scales per row
  const bool half = half_scales(type, layout);
  const auto scale_type = half ? at::kShort : at::kFloat;
  TORCH_CHECK(scales.scalar_type() == scale_type && scales.is_contiguous() && scales.dim() == 2 &&
              scales.size(0) == N && scales.size(1) == groups, "bad GGUF weight");
  TORCH_CHECK(!has_mins(type) || (mins.scalar_type() == scale_type && mins.is_contiguous() &&
                                  mins.sizes() == scales.sizes()), "this GGUF type needs a min per block");
  if (half) {
    w.scales = reinterpret_cast<const uint16_t*>(scales.data_ptr<int16_t>());
    if (has_mins(type)) w.mins = reinterpret_cast<const uint16_t*>(mins.data_ptr<int16_t>());
  } else {
    w.fscales = scales.data_ptr<float>();
    if (has_mins(type)) w.fmins = mins.data_ptr<float>();
  }
  return w;
}

// f(std::integral_constant<QType, T>{}) for qtype's T: the weight type as a compile-time constant.
template <typename F>
void with_qtype(int64_t qtype, F f) {
  switch (static_cast<QType>(qtype)) {
    case QType::Q4_0: return f(std::integral_constant<QType, QType::Q4_0>{});
    case QType::Q4_1: return f(std::integral_constant<QType, QType::Q4_1>{});
    case QType::Q5_0: return f(std::integral_constant<QType, QType::Q5_0>{});
    case QType::Q5_1: return f(std::integral_constant<QType, QType::Q5_1>{});
    case QType::Q8_0: return f(std::integral_constant<QType, QType::Q8_0>{});
    case QType::Q4_K: return f(std::integral_constant<QType, QType::Q4_K>{});
    case QType::Q5_K: return f(std::integral_constant<QType, QType::Q5_K>{});
    case QType::Q6_K: return f(std::integral_constant<QType, QType::Q6_K>{});
    case QType::F16: return f(std::integral_constant<QType, QType::F16>{});
    case QType::BF16: return f(std::integral_constant<QType, QType::BF16>{});
  }
}

// y [M, N] = x [M, K] (contiguous rows) times the weights' transpose.
using LinearImpl = void (*)(const float* x, Weights w, float* y, int64_t M, int64_t K, int64_t N);

// Weights checked once, with the kernel that serves them (gguf_linear_kernel, gguf_linear_q8_kernel): what every
// GGUF matmul call runs, and what the layer stack keeps for its calls on raw rows.
struct BlockLinear {
  LinearImpl impl = nullptr;
  Weights w{};
  int64_t K = 0, N = 0;
  void operator()(const float* x, float* y, int64_t M) const { impl(x, w, y, M, K, N); }
};

// The kernel pick(std::integral_constant<QType, T>{}) gives for qtype's weights split as `layout` (null: none).
template <typename Pick>
BlockLinear block_linear(const at::Tensor& qs, const at::Tensor& scales, const at::Tensor& mins, int64_t qtype,
                         int64_t K, Pick pick, Layout layout = Layout::Rows) {
  BlockLinear lin{nullptr, check_weights(qs, scales, mins, qtype, K, layout), K, qs.size(0)};
  with_qtype(qtype, [&](auto type) { lin.impl = pick(type); });
  TORCH_CHECK(lin.impl != nullptr, "this build has no kernel for GGUF type ", qtype, " in this layout");
  return lin;
}

// lin(x) for x [M, K] float32, into a new [M, N].
inline at::Tensor run_block_linear(at::Tensor x, const BlockLinear& lin) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == lin.K,
              "x must be a 2-D float32 tensor of in_features columns");
  x = x.contiguous();
  auto y = at::empty({x.size(0), lin.N}, x.options());
  lin(x.data_ptr<float>(), y.data_ptr<float>(), x.size(0));
  return y;
}

}  // namespace slipstream
