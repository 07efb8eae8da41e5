// The step graph of lmforge/engine/cpu_graph.py. Each kernel it records has a method here; lmforge/kernels/__init__.py
// names them for the recorder (GRAPH_RETURNING, GRAPH_IN_PLACE) and tests/unit/test_step_graphs.py checks the two.

#pragma once

#include <ATen/ops/add.h>

#include <functional>
#include <utility>

#include "cpu_ops.h"

namespace lmforge {

// ---- a recorded decode step, replayed without Python: the CPU counterpart of a CUDA graph -----------------------
// lmforge/engine/cpu_graph.py runs a decode step's layers once while each kernel call (and each residual add) is
// recorded here with the very tensors it read and wrote; run() copies a new step's inputs into the recorded input
// tensors and calls the same kernels on the same tensors again, so none of the Python between them runs. It declines
// (returns false, nothing computed) when a guarded tensor was changed in place since recording (a weight update) or
// an input does not fit its recorded tensor.
class StepGraph {
 public:
  using T = at::Tensor;
  using B = OptTensor;
  void linear_small(T x, T w, B b, T y) { add([=] { linear_small_into(x, w, b, y); }); }
  void linear(T x, T w, B b, T y) { add([=] { linear_into(x, w, b, y); }); }
  void linear_f32(T x, T w, B b, T y) { add([=] { linear_f32_into(x, w, b, y); }); }
  void vnni_linear(T x, T w, B b, T y) { add([=] { vnni_linear_into(x, w, b, y); }); }
  void amx_linear(T x, T w, B b, T y) { add([=] { amx_linear_into(x, w, b, y); }); }
  void rms_norm(T x, T w, double eps, T y) { add([=] { rms_norm_into(x, w, eps, y); }); }
  void rope_(T x, T cos, T sin) { add([=] { lmforge::rope_(x, cos, sin); }); }
  void silu_mul(T gate, T up, T y) { add([=] { silu_mul_into(gate, up, y); }); }
  void write_kv(T k, T v, T kc, T vc, T slots, B ks, B vs) {
    add([=] { lmforge::write_kv(k, v, kc, vc, slots, ks, vs); });
  }
  void paged_attention(T q, T kc, T vc, T cu_q, T lk, T tables, T seqs, double scale, int64_t window, T out, B ks,
                       B vs) {
    add([=] { lmforge::paged_attention(q, kc, vc, cu_q, lk, tables, seqs, scale, window, out, ks, vs); });
  }
  void shm_all_reduce(T x, T data, T seqs, T state, T watch) {
    add([=] { lmforge::shm_all_reduce(x, data, seqs, state, watch); });
  }
  void add_tensors(T a, T b, T out) { add([=]() mutable { at::add_out(out, a, b); }); }
  // A kernel of another lmforge extension (quant_ops.cpp), given as the address of a function of the step's tensors.
  void external(int64_t fn, std::vector<T> tensors) {
    const auto step = reinterpret_cast<void (*)(const std::vector<T>&)>(fn);
    add([=] { step(tensors); });
  }
  void set_inputs(std::vector<T> inputs) { inputs_ = std::move(inputs); }
  void guard(std::vector<T> tensors) {
    for (auto& t : tensors) guards_.emplace_back(t, t._version());
  }
  int64_t size() const { return static_cast<int64_t>(steps_.size()); }

  // Each fresh input goes into its recorded tensor, or into the leading part of it when smaller (a block table
  // narrower than the recorded one).
  bool run(std::vector<T> fresh) {
    for (auto& [t, version] : guards_)
      if (t._version() != version) return false;
    if (fresh.size() != inputs_.size()) return false;
    for (size_t i = 0; i < fresh.size(); ++i) {
      const T& src = fresh[i];
      T dst = inputs_[i];
      if (src.dim() != dst.dim() || src.scalar_type() != dst.scalar_type()) return false;
      for (int64_t d = 0; d < src.dim(); ++d) {
        if (src.size(d) > dst.size(d) || (d == 0 && src.size(0) != dst.size(0))) return false;
        if (src.size(d) < dst.size(d)) dst = dst.narrow(d, 0, src.size(d));
      }
      dst.copy_(src);
    }
    for (auto& step : steps_) step();
    return true;
  }

 private:
  void add(std::function<void()> step) { steps_.push_back(std::move(step)); }
  std::vector<std::function<void()>> steps_;
  std::vector<T> inputs_;
  std::vector<std::pair<T, int64_t>> guards_;
};

}  // namespace lmforge
