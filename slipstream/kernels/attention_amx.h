// Exact mode's prompt attention on AMX bf16 tiles (the amx variant): a tile of a prompt chunk's query rows (up to 16
// rows x the task's heads: up to 48 query vectors of D) against one KV head's float32 keys and values.
//
// Both operands of q . k and of p . v are float32, so each is split into three bf16 parts (hi + mid + lo == x
// exactly) and six of the nine products of parts go to the tiles (hi.hi, mid.hi, lo.hi, hi.mid, mid.mid, hi.lo: the
// three left out are below float32's last bit), each product exact in float32 and summed in float32 on the tiles:
// float32's accuracy in another summation order, as the tiles' matmuls are (gguf_amx.h). A row's result differs in
// the last bits from the FMA kernel's (paged_attention.cpp), which decode rows and short tiles keep.
// Scores: keys are A (16 keys x 32 dims a tile, as the cache holds them), query vectors B (pairs of dims x 16
// vectors, transposed once a task), C = 16 keys x 16 vectors, transposed into the scores' rows. Values: the
// probabilities are A (16 vectors x 32 tokens, as the scores lie), values B (pairs of tokens x 16 dims,
// interleaved), C = 16 vectors x 16 dims, summed over every token in the tiles. Keys and values are split once a call
// (split_step), the probabilities VALUE_CHUNK tokens at a time.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "amx_tiles.h"

namespace slipstream::amx {

// Tiles of fewer prompt rows (a decode row, a speculative step's, a chunk's last few) stay on the FMA kernel.
constexpr int64_t ATTENTION_MIN_ROWS = 8;
// Tokens whose probabilities are split at once (48 KiB of parts for 48 vectors, in L2); the C tiles of sums are
// loaded and stored once a chunk.
constexpr int64_t VALUE_CHUNK = 128;
constexpr int64_t TILE_WORDS = 512;  // a tile of 16 rows of 64 bytes, in bf16 words

// A thread's buffers for the tiles' operands, kept between tasks.
struct AttentionScratch {
  CacheLineVector<uint16_t> queries, probabilities;
  CacheLineVector<float> sums;
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

// Six products of parts a.b (hi.hi, mid.hi, lo.hi, hi.mid, mid.mid, hi.lo: pb = 0, 1, 2 with the a parts that keep
// their sum's significance within float32's), each A tile loaded once for the products of it with several B tiles
// into several C tiles. (On this VM a product takes ~4.8 ns chained or not: the order is not latency-bound.) GCC's
// tile intrinsics take tile numbers as literals, hence the macros.
// Scores: C 0-2 one group of 16 query vectors each (B 5-7, at b + the group's offset), A 3 a part of the keys (at a).
#define SLIPSTREAM_KEY_PART(a, pa)                                  \
  do {                                                              \
    _tile_loadd(3, (a) + (pa) * TILE_WORDS, 64);                    \
    _tile_dpbf16ps(0, 3, 5);                                        \
    if (groups > 1) _tile_dpbf16ps(1, 3, 6);                        \
    if (groups > 2) _tile_dpbf16ps(2, 3, 7);                        \
  } while (0)
#define SLIPSTREAM_QUERY_PARTS(pb, b, group_words)                                   \
  do {                                                                               \
    _tile_loadd(5, (b) + (pb) * TILE_WORDS, 64);                                     \
    if (groups > 1) _tile_loadd(6, (b) + (group_words) + (pb) * TILE_WORDS, 64);     \
    if (groups > 2) _tile_loadd(7, (b) + 2 * (group_words) + (pb) * TILE_WORDS, 64); \
  } while (0)
// Values: C 0-3 four tiles of 16 dims (B 5-7 then 5 again, their parts at b, 3 tiles apart), A 4 the
// probabilities' part (at a, rows `lda` bytes apart).
#define SLIPSTREAM_VALUE_PART(a, lda, pa, b, pb)                          \
  do {                                                                    \
    _tile_loadd(4, (a) + (pa) * 16 * VALUE_CHUNK, lda);                   \
    _tile_loadd(5, (b) + (pb) * TILE_WORDS, 64);                          \
    _tile_dpbf16ps(0, 4, 5);                                              \
    if (tiles > 1) {                                                      \
      _tile_loadd(6, (b) + (3 + (pb)) * TILE_WORDS, 64);                  \
      _tile_dpbf16ps(1, 4, 6);                                            \
    }                                                                     \
    if (tiles > 2) {                                                      \
      _tile_loadd(7, (b) + (6 + (pb)) * TILE_WORDS, 64);                  \
      _tile_dpbf16ps(2, 4, 7);                                            \
    }                                                                     \
    if (tiles > 3) {                                                      \
      _tile_loadd(5, (b) + (9 + (pb)) * TILE_WORDS, 64);                  \
      _tile_dpbf16ps(3, 4, 5);                                            \
    }                                                                     \
  } while (0)

// scores[v][t] = scale * q_v . k_t for the task's V = n x P query vectors and every token t < L (the longest row's
// length; a shorter row's scores past its length are left for the caller to mask). Tiles: C 0-2 a group of 16
// vectors each, A 3-5 the keys' parts, B 6-7 the queries'.
template <class Rows>
void tile_key_scores(const Rows& task, int64_t P, const uint16_t* parts, int64_t D, float scale,
                     float* const* scores, AttentionScratch& scratch) {
  const int64_t V = task.n * P, groups = (V + 15) / 16, KH = D / 32, L = task.longest();
  const int64_t group_words = KH * 3 * TILE_WORDS;
  scratch.queries.resize(groups * group_words);
  query_tiles(task, P, D, scratch.queries.data());
  const __m512 sv = _mm512_set1_ps(scale);
  alignas(64) float c[3][256];
  for (int64_t t0 = 0; t0 < L; t0 += 16) {
    const uint16_t* keys = parts + t0 / 32 * step_words(D) + (t0 / 16) % 2 * group_words;
    _tile_zero(0);
    if (groups > 1) _tile_zero(1);
    if (groups > 2) _tile_zero(2);
    for (int64_t h = 0; h < KH; ++h) {
      const uint16_t* a = keys + h * 3 * TILE_WORDS;
      const uint16_t* b = scratch.queries.data() + h * 3 * TILE_WORDS;
      for (int pb = 0; pb < 3; ++pb) {
        SLIPSTREAM_QUERY_PARTS(pb, b, group_words);
        for (int pa = 0; pa < 3 - pb; ++pa) SLIPSTREAM_KEY_PART(a, pa);
      }
    }
    _tile_stored(0, c[0], 64);
    if (groups > 1) _tile_stored(1, c[1], 64);
    if (groups > 2) _tile_stored(2, c[2], 64);
    const __mmask16 valid = static_cast<__mmask16>(L - t0 >= 16 ? 0xFFFF : (1u << (L - t0)) - 1);
    for (int64_t g = 0; g < groups; ++g) {  // c[g] row i (key t0 + i), dword j (vector 16 g + j): transposed
      __m512i m[16];
      for (int i = 0; i < 16; ++i) m[i] = _mm512_load_si512(c[g] + 16 * i);
      transpose16(m);
      for (int64_t j = 0; j < 16 && 16 * g + j < V; ++j)
        _mm512_mask_storeu_ps(scores[16 * g + j] + t0, valid, _mm512_mul_ps(_mm512_castsi512_ps(m[j]), sv));
    }
  }
}

// The probabilities of tokens c0 .. c0 + 32 x steps as A tiles (a row's tokens past its length 0): for group g of 16
// vectors and part p, row c holds vector 16 g + c's VALUE_CHUNK tokens; at (g * 3 + p) x 16 x VALUE_CHUNK words.
template <class Rows>
void probability_tiles(const Rows& task, int64_t P, float* const* p, int64_t c0, int64_t steps, uint16_t* out) {
  const int64_t V = task.n * P, groups = (V + 15) / 16;
  for (int64_t v = 0; v < 16 * groups; ++v) {
    const int64_t len = v < V ? task.len[v / P] : 0;
    const float* probabilities = p[std::min(v, V - 1)];  // (a vector past V loads nothing: len 0)
    uint16_t* row = out + ((v / 16) * 3 * 16 + v % 16) * VALUE_CHUNK;
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t t = c0 + 32 * s;
      auto first = [](int64_t n) { return static_cast<__mmask16>((1u << std::clamp<int64_t>(n, 0, 16)) - 1); };
      __m512 x0 = _mm512_maskz_loadu_ps(first(len - t), probabilities + t);
      __m512 x1 = _mm512_maskz_loadu_ps(first(len - t - 16), probabilities + t + 16);
      __m512i words[3];
      split_parts(x0, x1, words);
      for (int q = 0; q < 3; ++q) _mm512_storeu_si512(row + q * 16 * VALUE_CHUNK + 32 * s, words[q]);
    }
  }
}

// Each vector's out = sum_t p[v][t] * values[t] (its row's tokens), for the task's V query vectors, the values' parts
// from split_step. Tiles: C 0-3 four tiles of 16 dims of a group's sums, A 4 a part of the probabilities, B 5-7.
template <class Rows>
void tile_weighted_values(const Rows& task, int64_t P, float* const* p, const uint16_t* parts, int64_t D,
                          AttentionScratch& scratch) {
  const int64_t V = task.n * P, groups = (V + 15) / 16, DT = D / 16, L = task.longest();
  scratch.sums.assign(groups * 16 * D, 0.0f);
  scratch.probabilities.resize(groups * 3 * 16 * VALUE_CHUNK);
  const int64_t stride = D * 4;
  for (int64_t c0 = 0; c0 < L; c0 += VALUE_CHUNK) {
    const int64_t steps = (std::min(VALUE_CHUNK, L - c0) + 31) / 32;
    probability_tiles(task, P, p, c0, steps, scratch.probabilities.data());
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t dt = 0; dt < DT; dt += 4) {
        const int64_t tiles = std::min<int64_t>(4, DT - dt);
        float* sums = scratch.sums.data() + 16 * g * D + 16 * dt;
        _tile_loadd(0, sums, stride);
        if (tiles > 1) _tile_loadd(1, sums + 16, stride);
        if (tiles > 2) _tile_loadd(2, sums + 32, stride);
        if (tiles > 3) _tile_loadd(3, sums + 48, stride);
        for (int64_t s = 0; s < steps; ++s) {
          const uint16_t* a = scratch.probabilities.data() + g * 3 * 16 * VALUE_CHUNK + 32 * s;
          const uint16_t* b = parts + (c0 / 32 + s) * step_words(D) + (2 * (D / 32) + dt) * 3 * TILE_WORDS;
          for (int pa = 0; pa < 3; ++pa)
            for (int pb = 0; pb < 3 - pa; ++pb) SLIPSTREAM_VALUE_PART(a, VALUE_CHUNK * 2, pa, b, pb);
        }
        _tile_stored(0, sums, stride);
        if (tiles > 1) _tile_stored(1, sums + 16, stride);
        if (tiles > 2) _tile_stored(2, sums + 32, stride);
        if (tiles > 3) _tile_stored(3, sums + 48, stride);
      }
  }
  for (int64_t v = 0; v < V; ++v)
    std::memcpy(task.out[v / P] + (v % P) * D, scratch.sums.data() + v * D, D * sizeof(float));
}

}  // namespace slipstream::amx
