// What every AMX kernel needs: the process's permission and a tile configuration before its first tile instruction,
// float32 split into bf16 parts for the tiles, and the transposes between rows and the tiles' dword layouts.
#pragma once
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

#include "cache_lines.h"

namespace slipstream::amx {

// Linux gives a process the tiles' state only once asked (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA); without it
// the first tile instruction kills the process.
inline bool tiles_permitted() {
  static const bool permitted = [] {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return permitted;
}

// Palette 1's configuration: rows and bytes a row of each of the eight tiles (unused ones zero).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};

  TileConfig& tile(int t, int rows_, int bytes) {
    rows[t] = static_cast<uint8_t>(rows_);
    bytes_per_row[t] = static_cast<uint16_t>(bytes);
    return *this;
  }
  void load() const { _tile_loadconfig(this); }
};

// Eight tiles of 16 rows of 64 bytes (each kernel's tile macros say which holds what).
inline void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.tile(t, 16, 64);
  config.load();
}

// Transposes 16 rows of 16 dwords in place.
inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + j], lane L: rows 4i..4i+3 of column 4L + j
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i a0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88), a1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xdd);
    const __m512i b0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88),
                  b1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xdd);
    r[j] = _mm512_shuffle_i32x4(a0, b0, 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(a0, b0, 0xdd);
    r[j + 4] = _mm512_shuffle_i32x4(a1, b1, 0x88);
    r[j + 12] = _mm512_shuffle_i32x4(a1, b1, 0xdd);
  }
}

inline __m512 bf16_low_as_float(__m512i words) {  // words 0..15 as floats
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(words)), 16));
}
inline __m512 bf16_high_as_float(__m512i words) {  // words 16..31 as floats
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(words, 1)), 16));
}

// 32 floats (x0: 0..15, x1: 16..31) as Parts bf16 parts, each the bf16 nearest what the parts before left (a float32
// difference, exact): three parts are x exactly (each holds the next 8 of float32's 24 significant bits), one is x
// rounded to bf16. words[p]: part p's 32 words; x0 and x1 are left holding what no part took.
template <int Parts>
[[gnu::always_inline]] inline void split_parts(__m512& x0, __m512& x1, __m512i (&words)[Parts]) {
  for (auto& w : words) {
    w = (__m512i)_mm512_cvtne2ps_pbh(x1, x0);
    x0 = _mm512_sub_ps(x0, bf16_low_as_float(w));
    x1 = _mm512_sub_ps(x1, bf16_high_as_float(w));
  }
}

}  // namespace slipstream::amx
