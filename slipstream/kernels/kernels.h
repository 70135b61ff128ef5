// Entry points of the compiled kernels, shared by the Python bindings and the layer stack.
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "gguf_blocks.h"

at::Tensor gguf_linear(at::Tensor x, at::Tensor qs, at::Tensor scales, at::Tensor mins, int64_t qtype);
// gguf_linear where x may be rounded to bf16 (--dtype bfloat16): the AMX tile types, one product a block.
at::Tensor gguf_linear_rounded(at::Tensor x, at::Tensor qs, at::Tensor scales, at::Tensor mins, int64_t qtype);
// The kernels gguf_linear (gguf_linear_rounded) and gguf_linear_q8 run for these weights and K inputs a row, checked
// once.
slipstream::BlockLinear gguf_linear_kernel(const at::Tensor& qs, const at::Tensor& scales, const at::Tensor& mins,
                                           int64_t qtype, int64_t K, bool rounded = false);
slipstream::BlockLinear gguf_linear_q8_kernel(const at::Tensor& qs, const at::Tensor& scales, const at::Tensor& mins,
                                              int64_t qtype, int64_t K);
// GGML types this build's gguf_linear multiplies on matrix tiles (AMX), at any row count; empty where it has none.
std::vector<int64_t> tile_types();
bool takes_high_bit_rows();  // whether this build's gguf_linear takes the 5-bit types in HighBitRows (gguf_blocks.h)
// Products a second of this core's bf16 dot product (vdpbf16ps) over float32 FMAs'; 0 where it has none to measure.
double bf16_dot_gain();
at::Tensor gguf_dequantize(at::Tensor qs, at::Tensor scales, at::Tensor mins, int64_t qtype);
at::Tensor gguf_linear_q8(at::Tensor x, at::Tensor qs, at::Tensor scales, at::Tensor mins, int64_t qtype);
int64_t q4_group_rows();  // rows per group of the interleaved Q4 layout this build's gguf_linear_q8 does best
int64_t q8_group_rows();  // rows per group of the interleaved Q8_0 layout this build's gguf_linear_q8 takes
at::Tensor paged_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_tables,
                           at::Tensor context_lens, double scale);
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps);
at::Tensor add_rms_norm_(at::Tensor x, at::Tensor residual, at::Tensor weight, double eps);
void rotary_(at::Tensor q, at::Tensor k, at::Tensor positions, at::Tensor cos, at::Tensor sin, bool interleaved);
at::Tensor silu_and_mul(at::Tensor gate_up);
at::Tensor argmax_rows(at::Tensor x);
void write_kv_cache(at::Tensor k, at::Tensor v, at::Tensor k_cache, at::Tensor v_cache, at::Tensor slots);

// The same operations on raw float32 rows (ld*: a row's stride in floats), with no checks: for the layer stack, which
// checks its weights and caches once and its buffers by construction.
namespace slipstream {
void rms_norm_rows(const float* x, int64_t ldx, const float* w, float* out, int64_t T, int64_t n, float eps);
void add_rms_norm_rows(const float* x, int64_t ldx, float* residual, int64_t ldr, const float* w, float* out, int64_t T,
                       int64_t n, float eps);
void rotary_rows(float* q, int64_t ldq, int64_t H, float* k, int64_t ldk, int64_t Hkv, int64_t head_stride, int64_t D,
                 const int64_t* positions, const float* cos, const float* sin, int64_t T, bool interleaved);
void silu_and_mul_rows(const float* gate_up, int64_t ld, float* out, int64_t T, int64_t I);
// k and v rows [T, Hkv heads of D]; slots [T].
void write_kv_rows(const float* k, int64_t ldk, const float* v, int64_t ldv, int64_t T, const at::Tensor& k_cache,
                   const at::Tensor& v_cache, const int64_t* slots);
// q rows [T, H heads of D] -> out [T, H, D]; block_tables [T, W] (W = 0: one table for every row), context_lens [T].
void paged_attention_rows(const float* q, int64_t ldq, int64_t T, int64_t H, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const int64_t* block_tables, int64_t W,
                          const int64_t* context_lens, float* out, double scale);
}  // namespace slipstream
