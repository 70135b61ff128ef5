// Every decoder layer of a step in one call, decode tokens and prompt chunks alike (each query row attends through
// the paged kernel with its own block table and context length). At batch 1 a step is ~300 small kernel calls, and
// reaching each through Python (module calls, argument conversion, the GIL) costs about a quarter of the step; with
// a prompt chunk in it, a few ms (a 100-token prompt beside 31 decode tokens under w4a8, AMD EPYC Zen 4: 71.5 ms
// through the Python layers, 67.7 here). This runs the very kernels the Python layers run, in the same
// order, so the results are identical; the model falls back to its Python layers for anything else (matmuls that
// take dense weights at this row count, biases, q/k norms, tensor parallelism).
// The weights, caches and rotary tables are checked once, here; a call checks its inputs, takes one buffer for its
// intermediate rows, then runs the layers on raw rows. Through the tensor entry points, each taking its tensors
// apart, checking them and allocating its output, the layers of a decode step at batch 1 spent ~1 ms of their ~4.5
// outside the kernels' loops, OpenMP's fork / join included (AMD EPYC Zen 3, w4a8).
#include <torch/extension.h>

#include <cstring>
#include <vector>

#include "kernels.h"
#include "kv_rows.h"

namespace {

// Rows of a linear layer's weight in one GGUF type; a fused layer whose parts differ in type has several, rows
// stacked in order. The tensors keep the weights the kernel points into.
struct Part {
  at::Tensor qs, scales, mins;
  slipstream::BlockLinear kernel;
};
using Linear = std::vector<Part>;

int64_t out_features(const Linear& parts) {
  int64_t n = 0;
  for (const Part& p : parts) n += p.kernel.N;
  return n;
}

// y [T, N] = x [T, K] times the layer's weights: each part's columns in turn.
void run_linear(const Linear& parts, const float* x, int64_t T, float* y, int64_t N) {
  if (parts.size() == 1) return parts[0].kernel(x, y, T);
  std::vector<float> part_rows;
  int64_t col = 0;
  for (const Part& p : parts) {
    const int64_t n = p.kernel.N;
    if (T == 1) {
      p.kernel(x, y + col, 1);
    } else {
      part_rows.resize(T * n);
      p.kernel(x, part_rows.data(), T);
      for (int64_t t = 0; t < T; ++t) std::memcpy(y + t * N + col, part_rows.data() + t * n, n * sizeof(float));
    }
    col += n;
  }
}

class LayerStack {
 public:
  // linears: [qs, scales, mins] of each part of each layer's qkv, o, gate_up and down projections, layer by layer;
  // qtypes: the parts' types; rounded: x may be rounded to bf16 (gguf_linear_rounded's kernels).
  LayerStack(std::vector<at::Tensor> input_norms, std::vector<at::Tensor> post_norms,
             std::vector<std::vector<at::Tensor>> linears, std::vector<std::vector<int64_t>> qtypes,
             std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches, at::Tensor cos, at::Tensor sin,
             double eps, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, bool interleaved, double scale,
             bool int8_activations, bool rounded)
      : input_norms_(std::move(input_norms)), post_norms_(std::move(post_norms)), k_caches_(std::move(k_caches)),
        v_caches_(std::move(v_caches)), cos_(cos.contiguous()), sin_(sin.contiguous()), eps_(eps), heads_(num_heads),
        kv_heads_(num_kv_heads), head_dim_(head_dim), interleaved_(interleaved), scale_(scale) {
    const size_t n = input_norms_.size();
    TORCH_CHECK(n > 0 && post_norms_.size() == n && linears.size() == 4 * n && qtypes.size() == 4 * n &&
                k_caches_.size() == n && v_caches_.size() == n, "one norm pair, 4 linears and a cache per layer");
    hidden_ = input_norms_[0].numel();
    const int64_t q_size = heads_ * head_dim_, kv_size = kv_heads_ * head_dim_;
    for (size_t i = 0; i < linears.size(); ++i) {
      TORCH_CHECK(!qtypes[i].empty() && linears[i].size() == 3 * qtypes[i].size(),
                  "a linear is [quants, scales, mins] of each part");
      // in_features: o takes the attention's heads, down gate_up's halves, qkv and gate_up the hidden state
      const int64_t K = i % 4 == 1 ? q_size : i % 4 == 3 ? intermediate_ : hidden_;
      Linear parts;
      for (size_t j = 0; j < qtypes[i].size(); ++j) {
        const at::Tensor &qs = linears[i][3 * j], &scales = linears[i][3 * j + 1], &mins = linears[i][3 * j + 2];
        parts.push_back({qs, scales, mins,
                         int8_activations ? gguf_linear_q8_kernel(qs, scales, mins, qtypes[i][j], K)
                                          : gguf_linear_kernel(qs, scales, mins, qtypes[i][j], K, rounded)});
      }
      if (i % 4 == 2) intermediate_ = out_features(parts) / 2;
      linears_.push_back(std::move(parts));
    }
    for (size_t i = 0; i < n; ++i) {
      const Linear* lin = &linears_[4 * i];
      TORCH_CHECK(out_features(lin[0]) == q_size + 2 * kv_size && out_features(lin[1]) == hidden_ &&
                  out_features(lin[2]) == 2 * intermediate_ && out_features(lin[3]) == hidden_,
                  "layers of one shape: qkv, o, gate_up and down");
      for (const at::Tensor* norm : {&input_norms_[i], &post_norms_[i]})
        TORCH_CHECK(norm->scalar_type() == at::kFloat && norm->is_contiguous() && norm->numel() == hidden_,
                    "float32 norm weights of hidden_size");
      const at::Tensor &kc = k_caches_[i], &vc = v_caches_[i];
      const auto type = kc.scalar_type();
      TORCH_CHECK((type == at::kFloat || type == at::kHalf || type == at::kChar) && vc.scalar_type() == type &&
                  kc.is_contiguous() && vc.is_contiguous() && kc.dim() == 4 && kc.sizes() == vc.sizes() &&
                  kc.size(1) == kv_heads_ && heads_ % kv_heads_ == 0 &&
                  kc.size(3) == (type == at::kChar ? slipstream::int8_row_width(head_dim_) : head_dim_) &&
                  head_dim_ % (type == at::kChar ? 32 : 8) == 0,
                  "contiguous float32, float16 or int8 caches [blocks, KV heads, block size, a row of head_dim]");
    }
    TORCH_CHECK(cos_.scalar_type() == at::kFloat && sin_.sizes() == cos_.sizes() && cos_.size(1) == head_dim_ / 2,
                "float32 rotary tables [positions, head_dim / 2]");
  }

  // x: embeddings [T, hidden] of T query rows, each with its position, cache slot, block table and context length
  // (the tokens it attends to, itself included) -> (last layer's output, residual stream: x, updated in place), for
  // the final add + norm.
  std::tuple<at::Tensor, at::Tensor> forward(at::Tensor x, at::Tensor positions, at::Tensor block_tables,
                                             at::Tensor context_lens, at::Tensor slots) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == hidden_ && x.is_contiguous(),
                "x must be contiguous float32 rows of hidden_size");
    const int64_t T = x.size(0);
    positions = positions.to(at::kLong).contiguous();
    slots = slots.to(at::kLong).contiguous();
    context_lens = context_lens.to(at::kLong).contiguous();
    block_tables = block_tables.to(at::kLong);
    if (block_tables.size(1) > 1 && block_tables.stride(1) != 1) block_tables = block_tables.contiguous();
    TORCH_CHECK(slots.numel() == T && positions.numel() == T && context_lens.numel() == T &&
                block_tables.dim() == 2 && block_tables.size(0) == T,
                "a cache slot per row, and a position, block table and context length");
    const int64_t q_size = heads_ * head_dim_, qkv_size = q_size + 2 * kv_heads_ * head_dim_;
    at::Tensor out = at::empty({T, hidden_}, x.options());
    // h, qkv, attention, o, gate_up and its activation: [T, width] each
    at::Tensor work = at::empty({T * (2 * hidden_ + qkv_size + q_size + 3 * intermediate_)}, x.options());
    const Rows rows{T, positions.data_ptr<int64_t>(), slots.data_ptr<int64_t>(), block_tables.data_ptr<int64_t>(),
                    block_tables.stride(0), context_lens.data_ptr<int64_t>()};
    layers(rows, x.data_ptr<float>(), out.data_ptr<float>(), work.data_ptr<float>());
    return {out, x};
  }

 private:
  struct Rows {
    int64_t T;
    const int64_t *positions, *slots, *block_tables;
    int64_t table_stride;  // 0 where one table serves every row (a prompt chunk's, expanded)
    const int64_t* context_lens;
  };

  void layers(const Rows& r, float* residual, float* out, float* work) const {
    using namespace slipstream;
    const int64_t T = r.T, q_size = heads_ * head_dim_, kv_size = kv_heads_ * head_dim_;
    const int64_t qkv_size = q_size + 2 * kv_size, gate_up_size = 2 * intermediate_;
    const auto f = static_cast<float>(eps_);
    float* h = work;
    float* qkv = h + T * hidden_;
    float* attn = qkv + T * qkv_size;
    float* o = attn + T * q_size;
    float* gate_up = o + T * hidden_;
    float* act = gate_up + T * gate_up_size;
    for (size_t i = 0; i < input_norms_.size(); ++i) {
      const Linear* lin = &linears_[4 * i];
      const float* input_norm = input_norms_[i].data_ptr<float>();
      if (i == 0) rms_norm_rows(residual, hidden_, input_norm, h, T, hidden_, f);
      else add_rms_norm_rows(out, hidden_, residual, hidden_, input_norm, h, T, hidden_, f);
      run_linear(lin[0], h, T, qkv, qkv_size);
      float *q = qkv, *k = qkv + q_size, *v = k + kv_size;
      rotary_rows(q, qkv_size, heads_, k, qkv_size, kv_heads_, head_dim_, head_dim_, r.positions,
                  cos_.data_ptr<float>(), sin_.data_ptr<float>(), T, interleaved_);
      write_kv_rows(k, qkv_size, v, qkv_size, T, k_caches_[i], v_caches_[i], r.slots);
      paged_attention_rows(q, qkv_size, T, heads_, k_caches_[i], v_caches_[i], r.block_tables, r.table_stride,
                           r.context_lens, attn, scale_);
      run_linear(lin[1], attn, T, o, hidden_);
      add_rms_norm_rows(o, hidden_, residual, hidden_, post_norms_[i].data_ptr<float>(), h, T, hidden_, f);
      run_linear(lin[2], h, T, gate_up, gate_up_size);
      silu_and_mul_rows(gate_up, gate_up_size, act, T, intermediate_);
      run_linear(lin[3], act, T, out, hidden_);
    }
  }

  std::vector<at::Tensor> input_norms_, post_norms_;
  std::vector<Linear> linears_;
  std::vector<at::Tensor> k_caches_, v_caches_;
  at::Tensor cos_, sin_;
  double eps_;
  int64_t heads_, kv_heads_, head_dim_, hidden_ = 0, intermediate_ = 0;
  bool interleaved_;
  double scale_;
};

}  // namespace

void register_layer_stack(pybind11::module& m) {
  pybind11::class_<LayerStack>(m, "LayerStack")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<std::vector<at::Tensor>>,
                          std::vector<std::vector<int64_t>>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                          at::Tensor, at::Tensor, double, int64_t, int64_t, int64_t, bool, double, bool, bool>())
      // Touches no Python object: the HTTP thread runs for the whole step.
      .def("forward", &LayerStack::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
}
