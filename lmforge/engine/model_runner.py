"""Turns a scheduled step into one flat forward over the paged KV pool; hot path — keep minimal."""

import contextlib
import dataclasses
import logging

import torch
from torch import nn

from lmforge import kernels
from lmforge.engine.cpu_graph import StepGraphs
from lmforge.engine.cuda_graph import DecodeGraphs
from lmforge.engine.prompt_logprobs import PromptScores, prompt_logits, prompt_rows, score_prompt_tokens
from lmforge.engine.scheduler import ScheduledBatch
from lmforge.engine.tp_workers import StepPlan, Workers
from lmforge.errors import LmforgeError
from lmforge.layers.attention import AttnMeta, KVCache
from lmforge.layers.decoder import Decoder
from lmforge.layers.kv_quant import kv_row_bytes
from lmforge.layers.linear import DerivedWeights, derive_weights
from lmforge.layers.multi_lora import LoraBatch

log = logging.getLogger("lmforge")


def kv_bytes_per_block(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
    """dtype: what the pool stores keys and values in (torch.int8: with a float32 scale per row)."""
    a = model.args
    return 2 * a.num_hidden_layers * block_size * a.num_key_value_heads * kv_row_bytes(a.head_dim, dtype)


def plan_num_blocks(model: nn.Module, block_size: int, dtype: torch.dtype, budget_bytes: int,
                    max_model_len: int, model_dtype: torch.dtype | None = None) -> int:
    """How many KV blocks the budget holds; fails with the numbers when not even one full-length sequence fits.
    dtype: the pool's (torch.int8 for an int8 cache); model_dtype, when it differs: the log says the gain over it."""
    per_block = kv_bytes_per_block(model, block_size, dtype)
    num_blocks = budget_bytes // per_block
    per_seq = -(-max_model_len // block_size)
    if num_blocks < per_seq:
        need = per_seq * per_block / 2**30
        raise LmforgeError(f"the KV cache budget of {budget_bytes / 2**30:.3f} GiB holds {num_blocks} blocks of "
                           f"{block_size} tokens ({per_block / 2**20:.2f} MiB each), fewer than the {per_seq} one "
                           f"sequence of max_model_len={max_model_len} needs; raise kv_cache_memory to at least "
                           f"{need:.3f} GiB or lower max_model_len")
    gain = ""
    if model_dtype is not None and model_dtype != dtype:
        ratio = kv_bytes_per_block(model, block_size, model_dtype) / per_block
        gain = f", {ratio:.2f}x the tokens of a {str(model_dtype).removeprefix('torch.')} cache"
    log.info("KV cache (%s): %d blocks x %d tokens, %.2f MiB per block, %.2f GiB in all; %d sequences of %d tokens "
             "fit at once%s", str(dtype).removeprefix("torch."), num_blocks, block_size, per_block / 2**20,
             num_blocks * per_block / 2**30, num_blocks // per_seq, max_model_len, gain)
    return num_blocks


def layer_kv_cache(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> KVCache:
    """(keys, values); int8 ones with their float32 scales per (token, kv head) (lmforge/layers/kv_quant.py)."""
    return kv_pool(1, shape, dtype, device)[0]


def kv_pool(num_layers: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> list[KVCache]:
    """layer_kv_cache for every layer, as views of one allocation (one for int8 scales): freeing it hands the whole
    pool back to the operating system at once (`LLMEngine.sleep`), where many smaller blocks could stay in the
    allocator's heap."""
    data = torch.zeros((num_layers, 2, *shape), dtype=dtype, device=device)
    scales = torch.zeros((num_layers, 2, *shape[:-1]), dtype=torch.float32, device=device) \
        if dtype == torch.int8 else None
    return [(data[i, 0], data[i, 1]) + ((scales[i, 0], scales[i, 1]) if scales is not None else ())
            for i in range(num_layers)]


class ModelRunner:
    """Runs scheduled steps of `model` over the engine's KV pool. It leaves the model as it found it: what it derives
    from the weights (fused products, packed copies: DerivedWeights; recorded step graphs) it keeps to itself.
    owned=True: the engine built the model for itself, so fused products may share the layers' storage; False (a
    live model, e.g. the one a trainer optimises): they are copies that `refresh()` brings up to date."""

    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, enforce_eager: bool = False,
                 max_model_len: int | None = None, kv_dtype: torch.dtype | None = None, owned: bool = True,
                 step_graphs: bool = True, workers: Workers | None = None, max_num_seqs: int = 256):
        self.model, self.owned = model, owned
        self.workers = workers  # rank 0 of tensor parallelism: each step's plan goes to the other ranks first
        self.step_graphs = step_graphs
        self.block_size = block_size
        self.enforce_eager = enforce_eager
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        a = model.args
        self.scratch_slot = num_blocks * block_size  # CUDA graphs' padding rows write here: one block more
        self.kv_shape = (num_blocks + (self.device.type == "cuda"), block_size, a.num_key_value_heads, a.head_dim)
        self.kv_dtype = kv_dtype or self.dtype
        self.max_blocks = -(-(max_model_len or 0) // block_size)
        decoder = getattr(model, "model", None)
        self.decoder = decoder if isinstance(decoder, Decoder) else None
        self.kv: list[KVCache] = []
        self.derived: DerivedWeights | None = None
        self.graphs: StepGraphs | None = None
        self.cuda_graphs: DecodeGraphs | None = None
        self.max_num_seqs = max_num_seqs
        self.allocate()

    def allocate(self) -> None:
        """The KV pool (zeroed), the derived weights (from the current ones) and an empty set of step graphs."""
        self.kv = kv_pool(self.model.args.num_hidden_layers, self.kv_shape, self.kv_dtype, self.device)
        if self.derived is None:
            self.derived = derive_weights(self.model, share=self.owned)
        else:  # kept through sleep (an owned model's joints are its own storage): bring the rest up to date
            self.derived.refresh()
        if self.decoder is not None and self.device.type == "cpu" and not self.enforce_eager and self.step_graphs:
            # decode steps replayed from C++ without the Python between the kernels (engine/cpu_graph.py)
            self.graphs = StepGraphs(self.decoder, self.kv, self.max_blocks, self.derived)
        if self.device.type == "cuda" and not self.enforce_eager and self.step_graphs:
            self.cuda_graphs = DecodeGraphs(self.model, self.kv, self.max_num_seqs, self.max_blocks,
                                            self.scratch_slot)

    def release(self) -> None:
        """Frees the KV pool, the step graphs and the derived copies (allocate() makes them again)."""
        self.kv, self.graphs, self.cuda_graphs = [], None, None
        if self.owned:
            self.derived.packs.clear()  # the joints are the model's own storage: nothing to free
        else:
            self.derived = None

    def refresh(self) -> None:
        """After the model's weights changed: derived copies take the new values, step graphs are recorded again."""
        self.derived.refresh()
        for graphs in (self.graphs, self.cuda_graphs):
            if graphs is not None:
                graphs.clear()

    @contextlib.contextmanager
    def context(self):
        """What the engine's forwards run under: its kernel switch, its derived weights, and inference behaviour
        (dropout off) for a live model that may be in training mode, restored after."""
        training = [m for m in self.model.modules() if m.training] if not self.owned else []
        for m in training:
            m.training = False
        try:
            with self.derived.active(), kernels.disabled() if self.enforce_eager else contextlib.nullcontext():
                yield
        finally:
            for m in training:
                m.training = True

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
        """The model's final hidden states for a step over the KV pool, the layers replayed from a step graph where
        one is recorded for the step's shape. Call inside `context()`."""
        d = self.decoder
        if self.cuda_graphs is not None and (out := self.cuda_graphs(ids, positions, meta)) is not None:
            return out
        if self.graphs is None:
            return self.model(ids, positions, meta, self.kv)
        x, rope = d.embed(ids, positions)
        out = self.graphs(x, rope, meta, self.kv)
        return d.norm(out if out is not None else d.run_layers(x, rope, meta, self.kv))

    def plan(self, batch: ScheduledBatch) -> tuple[StepPlan, list[int]]:
        """The step as plain lists (what tensor-parallel ranks receive; `inputs` makes the flat ids, positions and
        metadata of them) and the rows (sequence indices) that get logits. A row with k draft tokens gets k + 1
        logits: at its last token and at each draft token."""
        bs = self.block_size
        ids, positions, slots, seqlens_k, logits_idx, sample_rows = [], [], [], [], [], []
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            table = seq.block_table
            spec = seq.spec_token_ids
            ids.extend((seq.token_ids + spec if spec else seq.token_ids)[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            seqlens_k.append(end)
            if end == seq.num_tokens + len(spec):  # the step reaches the last token: its logits pick the next one
                logits_idx.extend(range(len(ids) - 1 - len(spec), len(ids)))
                sample_rows.append(row)
        width = max(len(seq.block_table) for seq in batch.seqs)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in batch.seqs]
        scored = prompt_rows(batch.seqs, batch.num_new_tokens)[0] \
            if self.workers is not None and any(seq.needs_prompt_logprobs for seq in batch.seqs) else []
        return StepPlan(ids, positions, slots, list(batch.num_new_tokens), seqlens_k, tables, logits_idx,
                        scored), sample_rows

    def inputs(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor, AttnMeta]:
        device = self.device
        meta = AttnMeta.for_paged(plan.seqlens_q, plan.seqlens_k, torch.tensor(plan.slots, device=device),
                                  torch.tensor(plan.tables, device=device),
                                  torch.tensor(plan.logits_idx, device=device), block_size=self.block_size,
                                  num_blocks=self.kv_shape[0])
        return torch.tensor(plan.ids, device=device), torch.tensor(plan.positions, device=device), meta

    @torch.inference_mode()
    def run_plan(self, plan: StepPlan) -> torch.Tensor | None:
        """A tensor-parallel worker's step: the same forward (and LM head) as rank 0's, whose collectives it joins."""
        ids, positions, meta = self.inputs(plan)
        if plan.lora_slots:
            meta = dataclasses.replace(meta, lora=LoraBatch.build(list(plan.lora_slots), plan.seqlens_q, self.device))
        with self.context():
            hidden = self.forward(ids, positions, meta)
            for _ in prompt_logits(self.model, hidden, plan.prompt_rows):  # rank 0's prompt log-prob chunks
                pass
            return self.model.logits(hidden[meta.logits_indices], float32=False) if plan.logits_idx else None

    @property
    def fast_paths(self) -> str:
        if self.enforce_eager:
            return "eager: fast paths off"
        if self.device.type == "cpu":
            if kernels.cpu_ops() is None:
                return "eager: CPU kernels unavailable"
            return "CPU kernels, step graphs" if self.graphs is not None else "CPU kernels"
        return "CUDA graphs for decode steps" if self.cuda_graphs is not None else "eager"

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One throw-away step over four short sequences: builds the CPU kernels (once per machine), packs the
        weights (the LM head too: four rows reach it), touches every code path of a step. Runs before any request
        exists and writes into block 0 only, which it zeroes again."""
        if self.workers is not None:
            self.workers.broadcast("warm_up")
        seqs, n = 4, min(self.block_size, 4)
        ids = torch.zeros(seqs * n, dtype=torch.long, device=self.device)
        positions = torch.arange(n, device=self.device).repeat(seqs)
        tables = torch.zeros(seqs, 1, dtype=torch.long, device=self.device)
        meta = AttnMeta.for_paged([n] * seqs, [n] * seqs, positions.clone(), tables,
                                  torch.arange(n - 1, seqs * n, n, device=self.device), block_size=self.block_size)
        with self.context():
            self.model.logits(self.forward(ids, positions, meta)[meta.logits_indices], float32=False)
        for layer in self.kv:
            for cache in layer:
                cache[0].zero_()

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, lora: LoraBatch | None = None
                ) -> tuple[torch.Tensor, list[int], list[PromptScores]]:
        """Runs the step; returns logits [sum over rows of 1 + draft length, vocab] in the model's dtype (the
        sampler widens them to fp32 when it needs more than an argmax), the rows they belong to, and the prompt
        log-probs of the sequences that want them (prompt_logprobs.py; [] for all others). `lora`: which tokens use
        which adapter (multi-LoRA serving), None when no sequence of the step uses one."""
        plan, rows = self.plan(batch)
        if self.workers is not None:
            self.workers.broadcast("step", dataclasses.replace(plan, lora_slots=lora.per_seq) if lora else plan)
        ids, positions, meta = self.inputs(plan)
        if lora is not None:
            meta = dataclasses.replace(meta, lora=lora)
        with self.context(), self.workers.watch() if self.workers is not None else contextlib.nullcontext():
            hidden = self.forward(ids, positions, meta)
            scores = score_prompt_tokens(self.model, hidden, batch.seqs, batch.num_new_tokens) \
                if any(seq.needs_prompt_logprobs for seq in batch.seqs) else []
            if not rows:
                return hidden.new_empty((0, 0)), rows, scores
            return self.model.logits(hidden[meta.logits_indices], float32=False), rows, scores
