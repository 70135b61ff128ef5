// AVX2 helpers shared by the kernels (and the instructions a variant's flags add: dispatch.py's VARIANTS).
#pragma once
#include <immintrin.h>

#include <cstdint>

// VNNI (AVX512-VNNI with VL, or AVX-VNNI): vpdpbusd adds four u8 x s8 products straight into an int32 lane,
// where AVX2 needs maddubs (to int16) and madd (to int32). The results are the same: no int16 sum of AVX2's
// saturates (a pair is at most 2 * 128 * 127 for Q8_0's magnitudes, 2 * 15 * 127 for Q4's quants).
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
#define SLIPSTREAM_VNNI 1
#else
#define SLIPSTREAM_VNNI 0
#endif

namespace slipstream {

// acc + the sums of each 4-byte group's products of unsigned bytes `u` and signed bytes `s`, per int32 lane.
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// Eight signed bytes as floats, loaded on their own so that the widening takes them from memory (one fused
// instruction); the upper half of a 16-byte load took a shuffle first: the byte form's matmuls (gguf_linear.cpp's
// k16_rows) 1.10x at one activation row, 1.19x at four (AMD EPYC Zen 3, a Q4_K_M file's Q5_0 / Q6_K layers).
inline __m256 load_bytes8(const int8_t* q) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}

// Sum of the 8 lanes.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lane j of the result is the sum of the 8 lanes of v[j]: eight horizontal sums at the cost of two.
inline __m256 hsum8(const __m256 v[8]) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // a holds v0..v3's partial sums of the low 128-bit halves in its low half, of the high halves in
  // its high half; add the halves across a and b.
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// The sums of v[0..3]'s lanes, added in hsum8's order.
inline __m128 hsum4(const __m256 v[4]) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  return _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));  // low halves' sums + high halves'
}

// exp(x) within ~2 ulp: 2^n * e^r with r = x - n ln2 (ln2 split in two for accuracy) and a degree-6 polynomial for
// e^r on |r| <= ln2/2 (Cephes' coefficients), the bounds keeping 2^n finite.
constexpr float EXP_LOWEST = -87.3f, EXP_HIGHEST = 88.3f, LOG2E = 1.44269504088896341f, LN2_HIGH = 0.693359375f,
                LN2_LOW = -2.12194440e-4f;
constexpr float EXP_POLYNOMIAL[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                    4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

inline __m256 exp8(__m256 x) {  // 8 floats
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(EXP_LOWEST)), _mm256_set1_ps(EXP_HIGHEST));
  const __m256 n =
      _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HIGH), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LOW), r);
  __m256 p = _mm256_set1_ps(EXP_POLYNOMIAL[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_POLYNOMIAL[i]));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#ifdef __AVX512F__
inline __m512 exp16(__m512 x) {  // 16 floats, the same arithmetic lane by lane
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(EXP_LOWEST)), _mm512_set1_ps(EXP_HIGHEST));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HIGH), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LOW), r);
  __m512 p = _mm512_set1_ps(EXP_POLYNOMIAL[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_POLYNOMIAL[i]));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}
#endif

}  // namespace slipstream
