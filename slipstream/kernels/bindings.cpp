#include <pybind11/stl.h>
#include <torch/extension.h>

#include "kernels.h"

void register_layer_stack(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The matmul and attention kernels touch no Python object and hold most of a step's time: the HTTP
  // thread runs meanwhile. The small ops keep the GIL (re-taking it after each would cost more).
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("gguf_linear", &gguf_linear, "x @ dequantize(W)^T with W in GGUF blocks or F16 / BF16 rows", nogil);
  m.def("gguf_linear_rounded", &gguf_linear_rounded,
        "gguf_linear, x rounded to bf16 where that is faster (the types on AMX tiles)", nogil);
  m.def("gguf_dequantize", &gguf_dequantize, "the float32 values of GGUF blocks (row layout) or F16 / BF16 rows",
        nogil);
  m.def("takes_high_bit_rows", &takes_high_bit_rows, "whether gguf_linear takes Q5_0 / Q5_1 / Q5_K at 5 bits a weight");
  m.def("tile_types", &tile_types, "GGML types gguf_linear multiplies on AMX tiles at any row count");
  m.def("bf16_dot_gain", &bf16_dot_gain, "bf16 dot products a second over float32 FMAs' on this core (0: none)");
  m.def("gguf_linear_q8", &gguf_linear_q8, "gguf_linear with x rounded to int8 blocks (Q8 activations)", nogil);
  m.def("q4_group_rows", &q4_group_rows, "rows per group of the interleaved Q4 layout this build does best (8, 16)");
  m.def("q8_group_rows", &q8_group_rows, "rows per group of the interleaved Q8_0 layout this build takes");
  m.def("paged_attention", &paged_attention,
        "attention of query rows (a block table and a context length each) over the paged KV cache", nogil);
  m.def("rms_norm", &rms_norm, "RMSNorm of each row");
  m.def("add_rms_norm_", &add_rms_norm_, "residual += x in place, then RMSNorm of the residual");
  m.def("rotary_", &rotary_, "rotary position embedding of q and k, in place");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up of a fused [gate, up] row");
  m.def("argmax_rows", &argmax_rows, "index of each row's largest value (torch.argmax's answer)");
  m.def("write_kv_cache", &write_kv_cache, "copy new keys and values into their cache slots");
  register_layer_stack(m);
}
