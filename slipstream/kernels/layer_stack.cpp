// Every decoder layer of a step in one call, decode tokens and prompt chunks alike (each query row attends through
// the paged kernel with its own block table and context length). At batch 1 a step is ~300 small kernel calls, and
// reaching each through Python (module calls, argument conversion, the GIL) costs about a quarter of the step; with
// a prompt chunk in it, a few ms (a 100-token prompt beside 31 decode tokens under w4a8, AMD EPYC Zen 4: 71.5 ms
// through the Python layers, 67.7 here). This runs the very kernels the Python layers run, in the same
// order, so the results are identical; the model falls back to its Python layers for anything else (matmuls that
// take dense weights at this row count, biases, q/k norms, tensor parallelism).
#include <torch/extension.h>

#include <vector>

#include "kernels.h"
#include "team.h"

namespace {

// Rows of a linear layer's weight in one GGUF type; a fused layer whose parts differ in type has several, rows
// stacked in order.
struct Part {
  at::Tensor qs, scales, mins;
  int64_t qtype;
};
using Linear = std::vector<Part>;

class LayerStack {
 public:
  // linears: [qs, scales, mins] of each part of each layer's qkv, o, gate_up and down projections, layer by layer;
  // qtypes: the parts' types.
  LayerStack(std::vector<at::Tensor> input_norms, std::vector<at::Tensor> post_norms,
              std::vector<std::vector<at::Tensor>> linears, std::vector<std::vector<int64_t>> qtypes,
              std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches, at::Tensor cos, at::Tensor sin,
              double eps, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, bool interleaved,
              double scale, bool int8_activations)
      : input_norms_(std::move(input_norms)), post_norms_(std::move(post_norms)), k_caches_(std::move(k_caches)),
        v_caches_(std::move(v_caches)), cos_(std::move(cos)), sin_(std::move(sin)), eps_(eps), heads_(num_heads),
        kv_heads_(num_kv_heads), head_dim_(head_dim), interleaved_(interleaved), scale_(scale),
        int8_(int8_activations) {
    const size_t n = input_norms_.size();
    TORCH_CHECK(post_norms_.size() == n && linears.size() == 4 * n && qtypes.size() == 4 * n &&
                k_caches_.size() == n && v_caches_.size() == n, "one norm pair, 4 linears and a cache per layer");
    for (size_t i = 0; i < linears.size(); ++i) {
      TORCH_CHECK(!qtypes[i].empty() && linears[i].size() == 3 * qtypes[i].size(),
                  "a linear is [quants, scales, mins] of each part");
      Linear parts;
      for (size_t j = 0; j < qtypes[i].size(); ++j)
        parts.push_back({linears[i][3 * j], linears[i][3 * j + 1], linears[i][3 * j + 2], qtypes[i][j]});
      linears_.push_back(std::move(parts));
    }
  }

  // x: embeddings [T, hidden] of T query rows, each with its block table and context length (the tokens it
  // attends to, itself included) -> (last layer's output, residual stream), for the final add + norm.
  std::tuple<at::Tensor, at::Tensor> forward(at::Tensor x, at::Tensor positions, at::Tensor block_tables,
                                             at::Tensor context_lens, at::Tensor slots) {
    std::tuple<at::Tensor, at::Tensor> out;
    slipstream::Team::run([&] { out = layers(x, positions, block_tables, context_lens, slots); });
    return out;
  }

 private:
  std::tuple<at::Tensor, at::Tensor> layers(at::Tensor x, const at::Tensor& positions, const at::Tensor& block_tables,
                                            const at::Tensor& context_lens, const at::Tensor& slots) {
    const int64_t T = x.size(0), q_size = heads_ * head_dim_, kv_size = kv_heads_ * head_dim_;
    at::Tensor residual = x;
    for (size_t i = 0; i < input_norms_.size(); ++i) {
      const Linear* lin = &linears_[4 * i];
      at::Tensor h = i == 0 ? rms_norm(x, input_norms_[i], eps_) : add_rms_norm_(x, residual, input_norms_[i], eps_);
      const at::Tensor qkv = linear(h, lin[0]);
      const at::Tensor q = qkv.narrow(1, 0, q_size).view({T, heads_, head_dim_});
      const at::Tensor k = qkv.narrow(1, q_size, kv_size).view({T, kv_heads_, head_dim_});
      const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({T, kv_heads_, head_dim_});
      rotary_(q, k, positions, cos_, sin_, interleaved_);
      write_kv_cache(k, v, k_caches_[i], v_caches_[i], slots);
      const at::Tensor attn = paged_attention(q, k_caches_[i], v_caches_[i], block_tables, context_lens, scale_);
      h = add_rms_norm_(linear(attn.flatten(1), lin[1]), residual, post_norms_[i], eps_);
      x = linear(silu_and_mul(linear(h, lin[2])), lin[3]);
    }
    return {x, residual};
  }

  at::Tensor linear(const at::Tensor& x, const Linear& parts) const {
    std::vector<at::Tensor> ys;
    for (const Part& w : parts)
      ys.push_back(int8_ ? gguf_linear_q8(x, w.qs, w.scales, w.mins, w.qtype)
                         : gguf_linear(x, w.qs, w.scales, w.mins, w.qtype));
    return ys.size() == 1 ? ys[0] : at::cat(ys, 1);
  }

  std::vector<at::Tensor> input_norms_, post_norms_;
  std::vector<Linear> linears_;
  std::vector<at::Tensor> k_caches_, v_caches_;
  at::Tensor cos_, sin_;
  double eps_;
  int64_t heads_, kv_heads_, head_dim_;
  bool interleaved_;
  double scale_;
  bool int8_;
};

}  // namespace

void register_layer_stack(pybind11::module& m) {
  pybind11::class_<LayerStack>(m, "LayerStack")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<std::vector<at::Tensor>>,
                          std::vector<std::vector<int64_t>>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                          at::Tensor, at::Tensor, double, int64_t, int64_t, int64_t, bool, double, bool>())
      // Touches no Python object: the HTTP thread runs for the whole step.
      .def("forward", &LayerStack::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
}
