// The int8 KV-cache row (model/kv_cache.py): a head's D values rounded to int8, then the float32 scale they were
// rounded with. write_kv_cache (layer_ops.cpp) writes it; decode attention (paged_attention.cpp) reads it and rounds
// its queries the same way.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace slipstream {

constexpr int64_t INT8_ROW_SCALE_BYTES = 4;

constexpr int64_t int8_row_width(int64_t D) { return D + INT8_ROW_SCALE_BYTES; }
// The head_dim of a cache row `width` elements wide (an int8 row's last bytes are its scale).
constexpr int64_t row_head_dim(int64_t width, bool int8) { return int8 ? width - INT8_ROW_SCALE_BYTES : width; }

// x[0:D] rounded to int8 into out: each value times 127 / the largest magnitude (0 for a row of zeros), half to even,
// with kv_cache.encode's float32 operations (bitwise its result). Returns the scale (largest / 127) that gives the
// values back.
inline float round_to_int8(const float* x, int64_t D, int8_t* out) {
  float largest = 0.0f;
  for (int64_t d = 0; d < D; ++d) largest = std::max(largest, std::fabs(x[d]));
  const float inverse = largest > 0.0f ? 127.0f / largest : 0.0f;
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<int8_t>(std::nearbyint(x[d] * inverse));
  return largest / 127.0f;
}

inline float int8_row_scale(const int8_t* row, int64_t D) {
  float s;
  std::memcpy(&s, row + D, sizeof s);
  return s;
}

}  // namespace slipstream
