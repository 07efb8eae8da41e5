"""Step graphs: a decode step's decoder layers recorded once per shape and replayed from C++ (CPU).

The CPU counterpart of vLLM's CUDA graphs. A decode step on CPU spends about a quarter of its time in the Python
between the kernels (module calls, attribute reads, the checks each layer makes before it takes a kernel). The first
decode step of each batch size runs the model's own layers eagerly while every kernel call and residual add is
recorded, with the tensors it reads and writes, into a `StepGraph` (lmforge/kernels/step_graph.h); later steps of
that size copy their inputs (hidden states, rotary tables, slot mapping, block tables, context lengths) into the
recorded input tensors and replay the kernels in one call. Steps with a few tokens per sequence that the paged kernel
attends (speculative verification: 1 + k tokens each) are recorded the same way per (tokens, sequences), once such a
shape recurs. The model definition stays the one in lmforge/models: nothing here knows a layer's structure, and
nothing is written onto the model (the runner owns its graphs).

A recording is kept only if it is closed: each tensor a kernel reads is an input, a parameter, a packed weight, the
KV cache (an int8 cache's scales included), or an output of an earlier recorded step; and nothing but kernels,
residual adds, views and allocations ran. Anything else (an op without a kernel, a tensor built during the step)
leaves that shape eager, logged.
Graphs decline when a parameter was changed in place since recording (its version moved); they are then recorded
again. `enforce_eager` turns them off.

Like a CUDA graph, a recording holds one path through the layers' Python: layer code must not choose between
kernels on a step's values other than its shape (context lengths, positions, how the tokens split among the
sequences), or a replay would repeat the recorded choice. No model file does; the branches in lmforge/layers depend
on shapes, dtypes and the kernel rows, which are the same for every step of a shape.
"""

import contextlib
import dataclasses
import logging
import threading
import time
from collections import OrderedDict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmforge import kernels
from lmforge.engine import tensor_parallel
from lmforge.layers.attention import AttnMeta

log = logging.getLogger("lmforge")
aten = torch.ops.aten
# Batch sizes kept, least recently used dropped first: each graph holds its step's intermediates (about 0.6 MB per
# sequence for SmolLM2-135M, some 2.5 MB for an 8B Llama).
MAX_GRAPHS = 8
MAX_GRAPH_BYTES = 1 << 30
# A multi-token step is recorded only if its intermediates fit a quarter of that: a batch's whole prefill (a benchmark
# repeating its prompts: 2,910 tokens of 64 sequences, ~1.6 GB for SmolLM2) would otherwise evict the decode steps'
# graphs each time it recurs and be evicted by them, costing a recording of both per round; speculative verification
# (1 + k tokens per sequence) fits.
MAX_MULTI_TOKEN_GRAPH_BYTES = MAX_GRAPH_BYTES // 4
RECORD_AFTER = 2  # a multi-token step shape is recorded the second time it is seen
# The kernels recorded (returning a new tensor: with it as their output; in place: with their arguments as they are),
# passed through (no step work) and quant_ops' recorded as StepGraph.external steps, named once in lmforge/kernels.
_RETURNING, _IN_PLACE = kernels.GRAPH_RETURNING, kernels.GRAPH_IN_PLACE
_QUERIES, _QUANT_RETURNING = kernels.GRAPH_QUERIES, kernels.GRAPH_QUANT_RETURNING
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.split_with_sizes.default, aten.alias.default,
          aten.slice.Tensor, aten.select.int, aten.unsqueeze.default, aten.squeeze.dim, aten.t.default,
          aten.transpose.int, aten.expand.default, aten.as_strided.default}
_ALLOCATIONS = {aten.empty.memory_format, aten.empty_like.default}


class StepGraphs:
    """Called by the model runner as `graphs(x, rope, meta, kv)`: the decoder layers' output for a step it can
    replay or record, else None (the runner then runs the layers itself). Owned by one engine's runner."""

    def __init__(self, decoder: torch.nn.Module, kv: list, max_blocks_per_seq: int | None = None, derived=None):
        self.decoder = decoder
        self.kv = kv  # the engine's KV pool: recordings write into it, so a forward over another cache stays eager
        self.max_blocks = max_blocks_per_seq or 0
        self.derived = derived  # the engine's DerivedWeights (lmforge/layers/linear.py): recordings may read them
        # key (a batch size, or (tokens, sequences)) -> (graph, out, bytes)
        self.graphs: OrderedDict[int | tuple[int, int], tuple[object, torch.Tensor, int]] = OrderedDict()
        self.eager: set[int | tuple[int, int]] = set()  # keys whose recording was rejected
        self.seen: set[int | tuple[int, int]] = set()  # keys recorded at least once (the first recording is logged)
        self.sightings: dict[tuple[int, int], int] = {}  # multi-token keys not recorded yet: steps seen
        self.replays = self.recordings = 0
        self.bytes_per_token = 0.0  # the largest recorded so far: predicts a multi-token recording's size

    def __call__(self, x: torch.Tensor, rope, meta: AttnMeta, kv) -> torch.Tensor | None:
        kr = meta.kernel
        tokens, seqs = x.shape[0], len(meta.seqlens_q)
        # a decode step is keyed by its batch size; a step with several tokens per sequence (speculative
        # verification, short prompt chunks) by (tokens, sequences): the kernels read the rest from the inputs
        key = tokens if tokens == seqs else (tokens, seqs)
        if kr is None or kv is not self.kv or meta.lora is not None or len(kr.rows) != seqs \
                or key in self.eager or torch.is_grad_enabled() or kernels.switched_off():
            return None  # not a step whose every sequence the paged kernel attends, or kernels switched off
        entry = self.graphs.get(key)
        if entry is not None:
            graph, out, _ = entry
            if graph.run([x, rope[0], rope[1], meta.slot_mapping, meta.block_tables, kr.cu_q, kr.seqlens_k,
                          kr.rows_t]):
                self.graphs.move_to_end(key)
                self.replays += 1
                return out
            del self.graphs[key]  # a weight changed in place, or a wider block table: record again
        elif tokens != seqs:
            # multi-token shapes vary from step to step: record one only when it recurs, so that a mix of shapes
            # seen once each costs no recordings (nor evicts the decode steps' graphs)
            self.sightings[key] = self.sightings.get(key, 0) + 1
            if self.sightings[key] < RECORD_AFTER or tokens * self.bytes_per_token > MAX_MULTI_TOKEN_GRAPH_BYTES:
                return None
            if len(self.sightings) > 4096:
                self.sightings.clear()
        return self._record(key, x, rope, meta, kv)

    def _record(self, key, x: torch.Tensor, rope, meta: AttnMeta, kv) -> torch.Tensor:
        start = time.perf_counter()
        ops = kernels.cpu_ops()
        seqs, width = meta.block_tables.shape
        tables = meta.block_tables.new_zeros((seqs, max(width, self.max_blocks)))  # room for the longest context
        tables[:, :width] = meta.block_tables
        kr = meta.kernel
        inputs = [x.clone(), rope[0].clone(), rope[1].clone(), meta.slot_mapping.clone(), tables, kr.cu_q.clone(),
                  kr.seqlens_k.clone(), kr.rows_t.clone()]
        recorded_meta = dataclasses.replace(
            meta, slot_mapping=inputs[3], block_tables=tables,
            kernel=dataclasses.replace(kr, cu_q=inputs[5], seqlens_k=inputs[6], rows_t=inputs[7]))
        graph = ops.StepGraph()
        recorder = _Recorder(ops, graph, kernels._state.get("quant"))
        with recorder, _recording_ops(recorder):
            out = self.decoder.run_layers(inputs[0], (inputs[1], inputs[2]), recorded_meta, kv)
        problem = recorder.problem or self._unknown_tensor(recorder, inputs, kv, out)
        if problem is not None:
            self.eager.add(key)
            log.info("step graphs: steps of %s stay eager (%s)", _describe(key), problem)
            return out
        graph.set_inputs(inputs)
        graph.guard([p for p in self.decoder.parameters() if not p.is_inference()])
        size = sum(recorder.produced.values())
        self.bytes_per_token = max(self.bytes_per_token, size / x.shape[0])
        if isinstance(key, tuple) and size > MAX_MULTI_TOKEN_GRAPH_BYTES:
            return out  # not kept (above); its size now keeps steps as large from being recorded
        self.graphs[key] = (graph, out, size)
        while len(self.graphs) > 1 and (len(self.graphs) > MAX_GRAPHS or self.nbytes > MAX_GRAPH_BYTES):
            self.graphs.popitem(last=False)
        self.recordings += 1
        (log.debug if key in self.seen else log.info)(
            "step graph for %s recorded: %d kernel calls, %.1f MiB, in %.0f ms", _describe(key), graph.size(),
            size / 2**20, 1000 * (time.perf_counter() - start))
        self.seen.add(key)
        return out

    def clear(self) -> None:
        """Drops every recording (the weights changed: the engine's update_weights); shapes are recorded anew."""
        self.graphs.clear()
        self.eager.clear()
        self.sightings.clear()

    @property
    def nbytes(self) -> int:
        """Memory the kept graphs hold (their intermediates)."""
        return sum(size for _, _, size in self.graphs.values())

    def _unknown_tensor(self, recorder: "_Recorder", inputs, kv, out: torch.Tensor) -> str | None:
        """Why the recording is not closed (a tensor read that the replay would not refresh), or None."""
        known = set(recorder.produced) | {_storage(t) for t in inputs}
        known |= {_storage(t) for layer in kv for t in layer}
        known |= {_storage(t) for t in tensor_parallel.comm_tensors()}  # a tensor-parallel rank's all-reduces
        known |= {_storage(t) for t in self.decoder.parameters()} | {_storage(t) for t in self.decoder.buffers()}
        if self.derived is not None:
            known |= {_storage(t) for t in self.derived.tensors()}
        for name, tensors in recorder.reads:
            for t in tensors:
                if _storage(t) not in known and t.numel():  # an empty tensor (a kernel's "none") holds no data
                    return f"{name} reads a tensor made outside the recorded layers, shape {tuple(t.shape)}"
        if _storage(out) not in recorder.produced:
            return "the layers' output is not a recorded tensor"
        return None


def _describe(key: int | tuple[int, int]) -> str:
    return f"{key} sequences" if isinstance(key, int) else f"{key[0]} tokens of {key[1]} sequences"


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Recorder(TorchDispatchMode):
    """Sees every aten op the layers run while recording: residual adds become graph steps, views and allocations
    are let through, anything else marks the recording unusable."""

    def __init__(self, ops, graph, quant=None):
        super().__init__()
        self.ops, self.graph, self.quant = ops, graph, quant
        self.in_kernel = False
        self.problem: str | None = None
        self.produced: dict[int, int] = {}  # storages written by recorded steps or allocated while recording: bytes
        self.reads: list[tuple[str, list[torch.Tensor]]] = []

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch otherwise wraps __torch_dispatch__ in a dynamo guard whose first call imports torch._dynamo (~1.5 s
        # of a process's first step); nothing here is ever compiled
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.in_kernel or func in _VIEWS:
            return out
        if func is aten.reshape.default and _storage(out) == _storage(args[0]):  # reshape that is a view
            return out
        if func in _ALLOCATIONS:
            self.produce(out)
        elif func is aten.add.Tensor and not kwargs and all(isinstance(a, torch.Tensor) for a in args):
            self.graph.add_tensors(args[0], args[1], out)
            self.note("add", args, out)
        elif self.problem is None:
            self.problem = f"{func} has no recorded kernel"
        return out

    def note(self, name: str, args, out: torch.Tensor | None) -> None:
        self.reads.append((name, [a for a in args if isinstance(a, torch.Tensor)]))
        if out is not None:
            self.produce(out)

    def produce(self, t: torch.Tensor) -> None:
        self.produced[_storage(t)] = t.untyped_storage().nbytes()

    def quant_kernel(self, name: str):
        """quant_ops.cpp's kernel `name` as the recording sees it (the quantised linears of lmforge/layers)."""
        real = getattr(self.quant, name)
        if name not in _QUANT_RETURNING:
            return self._refuse(name, real)
        address = self.quant.quant_linear_step_address()

        def call(*args):
            out = self._run(real, args)
            self.graph.external(address, [*args, out])
            self.note(name, args, out)
            return out
        return call

    def _run(self, real, args):
        self.in_kernel = True
        try:
            return real(*args)
        finally:
            self.in_kernel = False

    def _refuse(self, name: str, real):
        def refuse(*args):
            self.problem = self.problem or f"kernel {name} is not recorded"
            return real(*args)
        return refuse

    def kernel(self, name: str):
        real = getattr(self.ops, name)
        if name in _QUERIES:
            return real
        if name not in _RETURNING and name not in _IN_PLACE:
            return self._refuse(name, real)

        def call(*args):
            out = self._run(real, args)
            if name in _RETURNING:
                getattr(self.graph, name)(*args, out)
                self.note(name, args, out)
            else:
                getattr(self.graph, name)(*args)
                self.note(name, args, args[9] if name == "paged_attention" else None)  # args[9]: its output
            return out
        return call


class _RecordingOps:
    """The kernels as the recording thread sees them: wrapped by the recorder. Other threads get the kernels."""

    def __init__(self, wrap, real):
        self._wrap, self._real, self._thread = wrap, real, threading.get_ident()

    def __getattr__(self, name: str):
        if threading.get_ident() != self._thread:
            return getattr(self._real, name)
        return self._wrap(name)


@contextlib.contextmanager
def _recording_ops(recorder: _Recorder):
    """While recording, `kernels.cpu_ops()` (and `kernels.quant_ops()`, once built) hand out the recorder's
    wrappers instead of the kernels."""
    real, built, quant = kernels._state["ops"], "quant" in kernels._state, kernels._state.get("quant")
    kernels._state["ops"] = _RecordingOps(recorder.kernel, real)
    # not built yet: quantised layers take their pure-torch path, which the recorder refuses (never an unseen call)
    kernels._state["quant"] = _RecordingOps(recorder.quant_kernel, quant) if quant is not None else None
    try:
        yield
    finally:
        kernels._state["ops"] = real
        if built:
            kernels._state["quant"] = quant
        else:
            del kernels._state["quant"]
