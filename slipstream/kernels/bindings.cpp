#include <torch/extension.h>

torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor w, int64_t qtype, int64_t out_features);
torch::Tensor paged_attention_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gguf_linear", &gguf_linear, "x @ dequantize(W)^T with W in GGUF blocks (Q4_0, Q4_1, Q8_0)");
  m.def("paged_attention_decode", &paged_attention_decode, "one-token attention over the paged KV cache");
}
