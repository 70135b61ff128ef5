// Entry points of the compiled kernels, shared by the Python bindings and the layer stack.
#pragma once
#include <ATen/ATen.h>

at::Tensor gguf_linear(at::Tensor x, at::Tensor qs, at::Tensor scales, at::Tensor mins, int64_t qtype);
bool takes_high_bit_rows();  // whether this build's gguf_linear takes the 5-bit types in HighBitRows (gguf_blocks.h)
at::Tensor gguf_dequantize(at::Tensor qs, at::Tensor scales, at::Tensor mins, int64_t qtype);
at::Tensor gguf_linear_q8(at::Tensor x, at::Tensor qs, at::Tensor scales, at::Tensor mins, int64_t qtype);
int64_t q4_group_rows();  // rows per group of the interleaved Q4 layout this build's gguf_linear_q8 does best
int64_t q8_group_rows();  // rows per group of the interleaved Q8_0 layout this build's gguf_linear_q8 takes (0: none)
at::Tensor paged_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_tables,
                           at::Tensor context_lens, double scale);
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps);
at::Tensor add_rms_norm_(at::Tensor x, at::Tensor residual, at::Tensor weight, double eps);
void rotary_(at::Tensor q, at::Tensor k, at::Tensor positions, at::Tensor cos, at::Tensor sin, bool interleaved);
at::Tensor silu_and_mul(at::Tensor gate_up);
at::Tensor argmax_rows(at::Tensor x);
void write_kv_cache(at::Tensor k, at::Tensor v, at::Tensor k_cache, at::Tensor v_cache, at::Tensor slots);
