// What the CPU flags do not say: whether this core's bf16 dot product (vdpbf16ps, AVX512-BF16) does more products a
// second than float32 FMAs, so that oneDNN's bf16 GEMM can beat the float32 kernels (dispatch.py's
// `native_bf16_gemm`, asked once). It does on AMD Zen 4 (oneDNN's bf16 GEMM 1.1-2.7x the float32 half kernel there);
// on an Intel Xeon with AVX512-BF16 but no AMX exposed (family 6 model 207) vdpbf16ps did 42 G products a second a
// core against float32 FMAs' 84, and oneDNN's bf16 GEMM ran at 0.64-0.90x exact mode's float32 tiles.
#include <immintrin.h>

#include <algorithm>
#include <chrono>

#include "kernels.h"

namespace {

#ifdef __AVX512F__
constexpr int CHAINS = 24;  // independent sums: enough to cover any latency at two instructions a cycle
constexpr long STEPS = 4096;

// CHAINS sums of STEPS bf16 dot products (32 products each), or of float32 FMAs (16 each). (Both compiled for
// AVX512-BF16: bf16_dot_gain runs them only where the CPU has it.)
template <bool BF16>
[[gnu::target("avx512bf16")]] float chains() {
  const __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(1e-4f);
  const __m512bh a_pairs = _mm512_cvtne2ps_pbh(a, a), b_pairs = _mm512_cvtne2ps_pbh(b, b);
  __m512 acc[CHAINS];
  for (int i = 0; i < CHAINS; ++i) acc[i] = _mm512_set1_ps(1e-3f * i);
  for (long s = 0; s < STEPS; ++s)
#pragma GCC unroll 24
    for (int i = 0; i < CHAINS; ++i) {
      if constexpr (BF16) acc[i] = _mm512_dpbf16_ps(acc[i], a_pairs, b_pairs);
      else acc[i] = _mm512_fmadd_ps(acc[i], a, b);
    }
  for (int i = 1; i < CHAINS; ++i) acc[0] = _mm512_add_ps(acc[0], acc[i]);
  return _mm512_reduce_add_ps(acc[0]);
}

// The fastest of five runs of `sums` (~0.1 ms each), in seconds.
template <class Sums>
double fastest(Sums sums) {
  double best = 1e9;
  for (int run = 0; run < 5; ++run) {
    const auto start = std::chrono::steady_clock::now();
    volatile float sink = sums();  // (keeps every chain)
    (void)sink;
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return best;
}
#endif

}  // namespace

double bf16_dot_gain() {
#ifdef __AVX512F__
  if (!__builtin_cpu_supports("avx512bf16")) return 0.0;
  return 2.0 * fastest(chains<false>) / fastest(chains<true>);  // (32 products an instruction against 16)
#else
  return 0.0;  // (no AVX-512 build: no vdpbf16ps to measure)
#endif
}
