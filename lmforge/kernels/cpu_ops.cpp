// lmforge's CPU kernels. For inference, each replaces a chain of small eager ops whose dispatch cost dominates
// decode on a CPU: every kernel takes float32 or bfloat16, computes in float32 and rounds where the eager PyTorch
// code it replaces rounds, so results match the pure-torch path (lmforge/layers) to the last bit or within one
// bfloat16 rounding. For training (the autograd Functions of lmforge/layers/train_kernels.py and the fused loss),
// forward and backward passes of element-wise chains, attention's backward on AMX tiles and the loss's softmax.
// Compiled at first use by lmforge/kernels/__init__.py; hot path — keep minimal.
//
// One extension from several sources, which share cpu_ops.h: linear.cpp and linear_bf16.cpp (GEMMs),
// elementwise.cpp (a decode step's element-wise ops), paged_attention.cpp (the paged KV cache), training.cpp and
// attention_backward.cpp (training's kernels), step_graph.h (the recorder/replayer) and this file, the bindings.

#include <torch/csrc/utils/pybind.h>

#include "cpu_ops.h"
#include "step_graph.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace lmforge;
  // The inference kernels run without the GIL: engine threads (data-parallel replicas) compute at the same time.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  // module_local: each level's module registers its own StepGraph (one C++ name), and tests load several at once
  py::class_<StepGraph>(m, "StepGraph", py::module_local())
      .def(py::init<>())
      .def("linear_small", &StepGraph::linear_small)
      .def("linear", &StepGraph::linear)
      .def("linear_f32", &StepGraph::linear_f32)
      .def("vnni_linear", &StepGraph::vnni_linear)
      .def("amx_linear", &StepGraph::amx_linear)
      .def("rms_norm", &StepGraph::rms_norm)
      .def("rope_", &StepGraph::rope_)
      .def("silu_mul", &StepGraph::silu_mul)
      .def("write_kv", &StepGraph::write_kv, py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"),
           py::arg("slots"), py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none())
      .def("paged_attention", &StepGraph::paged_attention, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
           py::arg("cu_q"), py::arg("seqlens_k"), py::arg("block_tables"), py::arg("seqs"), py::arg("scale"),
           py::arg("window"), py::arg("out"), py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none())
      .def("shm_all_reduce", &StepGraph::shm_all_reduce)
      .def("add_tensors", &StepGraph::add_tensors)
      .def("external", &StepGraph::external)
      .def("set_inputs", &StepGraph::set_inputs)
      .def("guard", &StepGraph::guard)
      .def("size", &StepGraph::size)
      .def("run", &StepGraph::run, py::call_guard<py::gil_scoped_release>(),
           "copies the inputs in and replays the recorded kernels; false (nothing run) when a guard or input fails");
  m.def("linear_small", &linear_small, nogil, "x [<=8, in] @ w[out, in].T (+ b), streaming w once");
  m.def("linear", &linear, nogil, "F.linear of a 2-d x through ATen, callable from step graphs");
  m.def("linear_f32_available", &linear_f32_available, "whether the AVX2 float32 linear is built");
  m.def("linear_f32", &linear_f32, nogil, "float32 x [m, in] @ w[out, in].T (+ b) on AVX2 FMAs, batch-invariant");
  m.def("vnni_available", &vnni_available, "whether the AVX512-BF16 GEMM (vnni_pack / vnni_linear) is built");
  m.def("vnni_pack", &vnni_pack, "bf16 weight [N, K] -> 48-output panels of k pairs");
  m.def("vnni_linear", &vnni_linear, nogil, "x [M, K] @ w.T on AVX512-BF16 dot products, w packed by vnni_pack");
  m.def("amx_available", &amx_available, "whether AMX tiles can be used here");
  m.def("amx_pack", &amx_pack, "bf16 weight [N, K] -> AMX tile layout");
  m.def("amx_linear", &amx_linear, nogil, "x [M, K] @ w.T on AMX tiles, w packed by amx_pack");
  m.def("rms_norm", &rms_norm, nogil, "RMSNorm as Hugging Face computes it");
  m.def("rope_", &rope_, nogil, "rotary embedding in place (half-split layout)");
  m.def("shm_all_reduce", &shm_all_reduce, nogil, "tensor parallelism's shared-memory all-reduce, in place");
  m.def("silu_mul", &silu_mul, nogil, "silu(gate) * up");
  m.def("argmax_rows", &argmax_rows, nogil, "row-wise argmax, first of equal maxima");
  m.def("write_kv", &write_kv, nogil, "new keys/values into paged-cache slots (int8 ones quantised, with scales)",
        py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"),
        py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none());
  m.def("paged_attention", &paged_attention, nogil,
        "attention of few-token queries over a paged KV cache (or an int8 one)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cu_q"), py::arg("seqlens_k"),
        py::arg("block_tables"), py::arg("seqs"), py::arg("scale"), py::arg("window"), py::arg("out"),
        py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none());
  m.def("attention_backward", &attention_backward, "causal attention backward on AMX tiles (dq, dk, dv)");
  m.def("rms_norm_train", &rms_norm_train, "RMSNorm for training: (y, 1/rms per row)");
  m.def("rms_norm_train_backward", &rms_norm_train_backward, "RMSNorm backward: (dx, dw or empty)");
  m.def("rope_train", &rope_train, "rotary embedding out of place (inverse: its backward)");
  m.def("silu_mul_backward", &silu_mul_backward, "d/d(gate, up) of silu(gate) * up");
  m.def("accumulate_", &accumulate_, "float32 dst += src in place");
  m.def("cross_entropy_", &cross_entropy_, "per-row cross-entropy; the logits become its gradient in place");
}
