// Exact mode's prompt attention on AMX bf16 tiles (the amx variant): a tile of a prompt chunk's query rows (up to 16
// rows x the task's heads: up to 48 query vectors of D) against one KV head's float32 keys and values.
//
// Both operands of q . k and of p . v are float32, so each is split into three bf16 parts (hi + mid + lo == x
// exactly) and six of the nine products of parts go to the tiles (hi.hi, mid.hi, lo.hi, hi.mid, mid.mid, hi.lo: the
// three left out are below float32's last bit), each product exact in float32 and summed in float32 on the tiles:
// float32's accuracy in another summation order, as the tiles' matmuls are (gguf_amx.h). A row's result differs in
// the last bits from the FMA kernel's (paged_attention.cpp), which decode rows and short tiles keep.
// Scores: keys are A (16 keys x 32 dims a tile, as the cache holds them), query vectors B (pairs of dims x 16
// vectors, transposed once a task), C = 16 keys x 16 vectors. Values: the probabilities are A (16 vectors x 32
// tokens), values B (pairs of tokens x 16 dims, interleaved), C = 16 vectors x 16 dims, summed over every token in the
// tiles. Keys and values are split once a call (split_step); a group of 16 query vectors takes them VALUE_CHUNK tokens
// at a time, an online softmax between (tile_attention): its scores never leave L1.
// Against scores of whole rows written out, softmaxed and read back (a 48-vector task's 1.4 MB at 7500 tokens), with
// a 512-bit exp: a 512-row chunk's attention from token 0 / 2048 / 7000 1.38x / 1.18x / 1.17x (Xeon, AMX, 2 threads;
// one thread at 7000 1.22x). Of the rest, the tiles' loads and products alone are ~60 %, at 2.3x what the products
// take with their operands in L1: the keys' and values' parts come from L2 / L3.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "amx_tiles.h"
#include "vec.h"

namespace slipstream::amx {

// Tiles of fewer prompt rows (a decode row, a speculative step's, a chunk's last few) stay on the FMA kernel.
constexpr int64_t ATTENTION_MIN_ROWS = 8;
// Tokens a group of query vectors takes between its online softmax's rescalings (its scores, 8 KiB, and its
// probabilities' parts, 12 KiB, stay in L1); the C tiles of its sums are loaded and stored once a chunk.
constexpr int64_t VALUE_CHUNK = 128;
constexpr int64_t TILE_WORDS = 512;  // a tile of 16 rows of 64 bytes, in bf16 words

// A thread's buffers for the tiles' operands, kept between tasks.
struct AttentionScratch {
  CacheLineVector<uint16_t> queries, probabilities;
  CacheLineVector<float> sums, scores;
};

// The task's query vectors (vector v: row v / P's head v % P) as B tiles: for group g of 16 vectors, chunk h of 32
// dims and part p, row k holds each vector's pair of dims k; at ((g * KH + h) * 3 + p) tiles. Vectors past V are 0.
template <class Rows>
void query_tiles(const Rows& task, int64_t P, int64_t D, uint16_t* out) {
  const int64_t V = task.n * P, groups = (V + 15) / 16, KH = D / 32;
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t h = 0; h < KH; ++h) {
      __m512i parts[3][16];
      for (int64_t c = 0; c < 16; ++c) {
        const int64_t v = 16 * g + c;
        if (v >= V) {
          for (auto& part : parts) part[c] = _mm512_setzero_si512();
          continue;
        }
        const float* q = task.q[v / P] + (v % P) * D + 32 * h;
        __m512 x0 = _mm512_loadu_ps(q), x1 = _mm512_loadu_ps(q + 16);
        __m512i words[3];
        split_parts(x0, x1, words);
        for (int p = 0; p < 3; ++p) parts[p][c] = words[p];
      }
      for (int p = 0; p < 3; ++p) {
        transpose16(parts[p]);  // vector c's pair k -> row k, dword c
        uint16_t* tile = out + ((g * KH + h) * 3 + p) * TILE_WORDS;
        for (int k = 0; k < 16; ++k) _mm512_storeu_si512(tile + 32 * k, parts[p][k]);
      }
    }
}

// Keys of 16 tokens (row offsets rows[0, n), n >= 1; past n the last again) as A tiles: for chunk h of 32 dims and
// part p, row i holds token i's dims; at (h * 3 + p) tiles.
inline void key_tiles(const float* keys, const int64_t* rows, int64_t n, int64_t D, uint16_t* out) {
  for (int64_t i = 0; i < 16; ++i) {
    const float* k = keys + rows[std::min(i, n - 1)];
    for (int64_t h = 0; h < D / 32; ++h) {
      __m512 x0 = _mm512_loadu_ps(k + 32 * h), x1 = _mm512_loadu_ps(k + 32 * h + 16);
      __m512i words[3];
      split_parts(x0, x1, words);
      for (int p = 0; p < 3; ++p) _mm512_storeu_si512(out + (h * 3 + p) * TILE_WORDS + 32 * i, words[p]);
    }
  }
}

// Values of 32 tokens (rows[0, n), past n the last again) as B tiles: for tile dt of 16 dims and part p, row k holds
// tokens 2k and 2k + 1 interleaved, dim by dim; at (dt * 3 + p) tiles.
inline void value_tiles(const float* values, const int64_t* rows, int64_t n, int64_t D, uint16_t* out) {
  static const __m512i first_half = [] {  // word 2d + j: dim d of token j (j = 0: a's words, 1: b's)
    alignas(64) uint16_t idx[32];
    for (int i = 0; i < 32; ++i) idx[i] = static_cast<uint16_t>((i % 2) * 32 + i / 2);
    return _mm512_load_si512(idx);
  }();
  const __m512i second_half = _mm512_add_epi16(first_half, _mm512_set1_epi16(16));
  for (int64_t k = 0; k < 16; ++k) {
    const float* a = values + rows[std::min(2 * k, n - 1)];
    const float* b = values + rows[std::min(2 * k + 1, n - 1)];
    for (int64_t h = 0; h < D / 32; ++h) {
      __m512 a0 = _mm512_loadu_ps(a + 32 * h), a1 = _mm512_loadu_ps(a + 32 * h + 16);
      __m512 b0 = _mm512_loadu_ps(b + 32 * h), b1 = _mm512_loadu_ps(b + 32 * h + 16);
      __m512i wa[3], wb[3];
      split_parts(a0, a1, wa);
      split_parts(b0, b1, wb);
      for (int p = 0; p < 3; ++p) {
        uint16_t* tile = out + (2 * h * 3 + p) * TILE_WORDS + 32 * k;
        _mm512_storeu_si512(tile, _mm512_permutex2var_epi16(wa[p], first_half, wb[p]));
        _mm512_storeu_si512(tile + 3 * TILE_WORDS, _mm512_permutex2var_epi16(wa[p], second_half, wb[p]));
      }
    }
  }
}

// A KV head's tokens as the tiles take them, split once a call for every task that attends to them (a prompt
// chunk's tiles share them; each splitting them again cost more than the tiles' products): steps of 32 tokens, each
// the key tiles of its two halves (KH x 3 each) then its value tiles (DT x 3).
constexpr int64_t step_words(int64_t D) { return (2 * (D / 32) + D / 16) * 3 * TILE_WORDS; }

// Step s's parts: its n tokens' row offsets rows[0, n), 1 <= n <= 32.
inline void split_step(const float* keys, const float* values, const int64_t* rows, int64_t n, int64_t D,
                       uint16_t* out) {
  const int64_t key_set = D / 32 * 3 * TILE_WORDS;
  key_tiles(keys, rows, std::min<int64_t>(n, 16), D, out);
  if (n > 16) key_tiles(keys, rows + 16, n - 16, D, out + key_set);
  else key_tiles(keys, rows + n - 1, 1, D, out + key_set);
  value_tiles(values, rows, n, D, out + 2 * key_set);
}

// Six products of parts a.b (hi.hi, mid.hi, lo.hi, hi.mid, mid.mid, hi.lo: the pairs that keep their sum's
// significance within float32's), each part of one operand loaded once for its products with the other's parts that
// stay on tiles. GCC's tile intrinsics take tile numbers as literals, hence the macros.
// Scores: C 0 (16 keys x 16 query vectors) += the keys' parts of 32 dims at k (A 1 in turn, TILE_WORDS apart) . the
// query parts b0-b2 of those dims.
#define SLIPSTREAM_KEY_DIMS(k, b0, b1, b2)    \
  do {                                        \
    _tile_loadd(1, (k), 64);                  \
    _tile_dpbf16ps(0, 1, b0);                 \
    _tile_dpbf16ps(0, 1, b1);                 \
    _tile_dpbf16ps(0, 1, b2);                 \
    _tile_loadd(1, (k) + TILE_WORDS, 64);     \
    _tile_dpbf16ps(0, 1, b0);                 \
    _tile_dpbf16ps(0, 1, b1);                 \
    _tile_loadd(1, (k) + 2 * TILE_WORDS, 64); \
    _tile_dpbf16ps(0, 1, b0);                 \
  } while (0)
// Values: C `c` (16 vectors x 16 dims) += the probabilities' parts (A 4-6) . the 16 dims' value parts at v (B 7 in
// turn, TILE_WORDS apart).
#define SLIPSTREAM_VALUE_DIMS(c, v)            \
  do {                                         \
    _tile_loadd(7, (v), 64);                   \
    _tile_dpbf16ps(c, 4, 7);                   \
    _tile_dpbf16ps(c, 5, 7);                   \
    _tile_dpbf16ps(c, 6, 7);                   \
    _tile_loadd(7, (v) + TILE_WORDS, 64);      \
    _tile_dpbf16ps(c, 4, 7);                   \
    _tile_dpbf16ps(c, 5, 7);                   \
    _tile_loadd(7, (v) + 2 * TILE_WORDS, 64);  \
    _tile_dpbf16ps(c, 4, 7);                   \
  } while (0)

// scores + 256 b (b < blocks) = the 16 keys from c0 + 16 b (rows) . the 16 query vectors whose parts are at
// `queries` (columns), unscaled. The query parts of two 32-dim chunks stay on tiles (B 2-7) for all the blocks; with
// more dims than 64 the blocks' sums wait in `scores` between pairs of chunks.
inline void chunk_key_scores(const uint16_t* parts, const uint16_t* queries, int64_t c0, int64_t blocks, int64_t D,
                             float* scores) {
  const int64_t KH = D / 32, key_set = KH * 3 * TILE_WORDS;
  for (int64_t h = 0; h < KH; h += 2) {
    const bool pair = h + 1 < KH;
    const uint16_t* q = queries + h * 3 * TILE_WORDS;
    _tile_loadd(2, q, 64);
    _tile_loadd(3, q + TILE_WORDS, 64);
    _tile_loadd(4, q + 2 * TILE_WORDS, 64);
    if (pair) {
      _tile_loadd(5, q + 3 * TILE_WORDS, 64);
      _tile_loadd(6, q + 4 * TILE_WORDS, 64);
      _tile_loadd(7, q + 5 * TILE_WORDS, 64);
    }
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t t0 = c0 + 16 * b;
      const uint16_t* k = parts + t0 / 32 * step_words(D) + (t0 / 16) % 2 * key_set + h * 3 * TILE_WORDS;
      if (h == 0) _tile_zero(0);
      else _tile_loadd(0, scores + 256 * b, 64);
      SLIPSTREAM_KEY_DIMS(k, 2, 3, 4);
      if (pair) SLIPSTREAM_KEY_DIMS(k + 3 * TILE_WORDS, 5, 6, 7);
      _tile_stored(0, scores + 256 * b, 64);
    }
  }
}

// Each query vector's softmax(scale * q . k) . values over its row's tokens, for the task's V = n x P vectors (vector
// v: row v / P's head v % P) in groups of 16, against the keys' and values' parts from split_step: an online softmax
// over chunks of VALUE_CHUNK tokens. A chunk's scores stay in L1 (from the tiles to the probabilities' parts), its
// probabilities are taken against each vector's greatest score so far, and the sums of the chunks before are scaled
// down where that grew. A vector's arithmetic depends on its own row alone (its scores and length; chunks from token
// 0), never on the task's other rows.
template <class Rows>
void tile_attention(const Rows& task, int64_t P, const uint16_t* parts, int64_t D, float scale,
                    AttentionScratch& scratch) {
  const int64_t V = task.n * P, groups = (V + 15) / 16, KH = D / 32, DT = D / 16, L = task.longest();
  const int64_t group_words = KH * 3 * TILE_WORDS, stride = D * 4;
  scratch.queries.resize(groups * group_words);
  query_tiles(task, P, D, scratch.queries.data());
  scratch.sums.assign(groups * 16 * D, 0.0f);
  scratch.probabilities.resize(3 * 16 * VALUE_CHUNK);
  scratch.scores.resize(VALUE_CHUNK / 16 * 256);
  float* const scores = scratch.scores.data();  // block b: scores + 256 b, row = key, lane = vector
  uint16_t* const probabilities = scratch.probabilities.data();  // part p, vector j: + (16 p + j) * VALUE_CHUNK
  // Per group, lane by lane (vector by vector): its length, greatest scaled score so far and the sum of its
  // probabilities against that.
  std::vector<__m512i> lens(groups);
  std::vector<__m512> top(groups, _mm512_set1_ps(std::numeric_limits<float>::lowest())),
      total(groups, _mm512_setzero_ps());
  for (int64_t g = 0; g < groups; ++g) {
    alignas(64) int32_t lanes[16];
    for (int64_t j = 0; j < 16; ++j) lanes[j] = 16 * g + j < V ? static_cast<int32_t>(task.len[(16 * g + j) / P]) : 0;
    lens[g] = _mm512_load_si512(lanes);
  }
  const __m512 sv = _mm512_set1_ps(scale);
  auto keys_reached = [&](int64_t g, int64_t t) {  // the lanes whose vectors attend to token t
    return _mm512_cmpgt_epi32_mask(lens[g], _mm512_set1_epi32(static_cast<int>(t)));
  };
  for (int64_t c0 = 0; c0 < L; c0 += VALUE_CHUNK) {
    const int64_t steps = (std::min(VALUE_CHUNK, L - c0) + 31) / 32, blocks = 2 * steps;
    for (int64_t g = 0; g < groups; ++g) {
      chunk_key_scores(parts, scratch.queries.data() + g * group_words, c0, blocks, D, scores);
      __m512 chunk_top = _mm512_set1_ps(std::numeric_limits<float>::lowest());
      for (int64_t t = c0; t < c0 + 16 * blocks; ++t) {
        const __m512 row = _mm512_load_ps(scores + 16 * (t - c0));
        chunk_top = _mm512_mask_max_ps(chunk_top, keys_reached(g, t), chunk_top, row);
      }
      const __m512 grown = _mm512_max_ps(top[g], _mm512_mul_ps(chunk_top, sv));
      const __m512 shrink = exp16(_mm512_sub_ps(top[g], grown));  // 1 where the greatest score stays
      top[g] = grown;
      float* sums = scratch.sums.data() + 16 * g * D;
      // (Only where a greatest score grew: the sums' tiles load from these rows next, and a tile load waits for
      // vector stores before it to reach the cache.)
      if (_mm512_cmp_ps_mask(shrink, _mm512_set1_ps(1.0f), _CMP_NEQ_UQ)) {
        alignas(64) float factor[16];
        _mm512_store_ps(factor, shrink);
        for (int64_t j = 0; j < 16; ++j)
          for (int64_t d = 0; d < D; d += 16)
            _mm512_store_ps(sums + j * D + d,
                            _mm512_mul_ps(_mm512_load_ps(sums + j * D + d), _mm512_set1_ps(factor[j])));
      }
      // The probabilities, 32 tokens at a time transposed to the vectors' rows and split into parts.
      __m512 chunk_total = _mm512_setzero_ps();  // (summed apart from the chunks before: a shorter chain of adds)
      for (int64_t s = 0; s < steps; ++s) {
        __m512i rows[2][16];
        for (int half = 0; half < 2; ++half) {
          const int64_t t0 = c0 + 32 * s + 16 * half;
          for (int64_t k = 0; k < 16; ++k) {
            const __m512 e = _mm512_maskz_mov_ps(
                keys_reached(g, t0 + k),
                exp16(_mm512_sub_ps(_mm512_mul_ps(_mm512_load_ps(scores + 16 * (t0 + k - c0)), sv), grown)));
            chunk_total = _mm512_add_ps(chunk_total, e);
            rows[half][k] = _mm512_castps_si512(e);
          }
          transpose16(rows[half]);  // row j: vector j's 16 tokens
        }
        for (int64_t j = 0; j < 16; ++j) {
          __m512 x0 = _mm512_castsi512_ps(rows[0][j]), x1 = _mm512_castsi512_ps(rows[1][j]);
          __m512i words[3];
          split_parts(x0, x1, words);
          for (int q = 0; q < 3; ++q)
            _mm512_store_si512(probabilities + (q * 16 + j) * VALUE_CHUNK + 32 * s, words[q]);
        }
      }
      total[g] = _mm512_fmadd_ps(total[g], shrink, chunk_total);
      // The value sums: C 0-3 four tiles of 16 dims, A 4-6 the probabilities' parts, B 7 the values'.
      for (int64_t dt = 0; dt < DT; dt += 4) {
        const int64_t tiles = std::min<int64_t>(4, DT - dt);
        _tile_loadd(0, sums + 16 * dt, stride);
        if (tiles > 1) _tile_loadd(1, sums + 16 * dt + 16, stride);
        if (tiles > 2) _tile_loadd(2, sums + 16 * dt + 32, stride);
        if (tiles > 3) _tile_loadd(3, sums + 16 * dt + 48, stride);
        for (int64_t s = 0; s < steps; ++s) {
          _tile_loadd(4, probabilities + 32 * s, VALUE_CHUNK * 2);
          _tile_loadd(5, probabilities + 16 * VALUE_CHUNK + 32 * s, VALUE_CHUNK * 2);
          _tile_loadd(6, probabilities + 32 * VALUE_CHUNK + 32 * s, VALUE_CHUNK * 2);
          const uint16_t* v = parts + (c0 / 32 + s) * step_words(D) + (2 * KH + dt) * 3 * TILE_WORDS;
          SLIPSTREAM_VALUE_DIMS(0, v);
          if (tiles > 1) SLIPSTREAM_VALUE_DIMS(1, v + 3 * TILE_WORDS);
          if (tiles > 2) SLIPSTREAM_VALUE_DIMS(2, v + 6 * TILE_WORDS);
          if (tiles > 3) SLIPSTREAM_VALUE_DIMS(3, v + 9 * TILE_WORDS);
        }
        _tile_stored(0, sums + 16 * dt, stride);
        if (tiles > 1) _tile_stored(1, sums + 16 * dt + 16, stride);
        if (tiles > 2) _tile_stored(2, sums + 16 * dt + 32, stride);
        if (tiles > 3) _tile_stored(3, sums + 16 * dt + 48, stride);
      }
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    alignas(64) float sum[16];
    _mm512_store_ps(sum, total[g]);
    for (int64_t j = 0; j < 16 && 16 * g + j < V; ++j) {
      const int64_t v = 16 * g + j;
      const __m512 inv = _mm512_set1_ps(1.0f / sum[j]);
      float* out = task.out[v / P] + (v % P) * D;
      for (int64_t d = 0; d < D; d += 16)
        _mm512_storeu_ps(out + d, _mm512_mul_ps(_mm512_load_ps(scratch.sums.data() + v * D + d), inv));
    }
  }
}

}  // namespace slipstream::amx
