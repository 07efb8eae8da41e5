"""LLMEngine: requests in, one scheduled model step at a time, RequestOutputs out. LLM: vLLM's offline API."""

import copy
import logging
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lmforge.engine import tp_workers as tp
from lmforge.engine.block_manager import BlockManager
from lmforge.engine.config import EngineConfig, kv_budget_bytes, step_activation_bytes
from lmforge.engine.draft import SelfDraftProposer
from lmforge.engine.logits_processors import resolve_constraints
from lmforge.engine.lora_manager import AdapterInUseError, AdapterNotFoundError, LoadedAdapter, LoRAManager, LoRARequest
from lmforge.engine.model_runner import ModelRunner, plan_num_blocks
from lmforge.engine.output_processor import CompletionState
from lmforge.engine.outputs import EngineStats, Logprob, RequestMetrics, RequestOutput
from lmforge.engine.prompt_logprobs import record_prompt_logprobs
from lmforge.engine.sampler import SamplingRow, sample
from lmforge.engine.sampling_params import SamplingParams
from lmforge.engine.scheduler import Scheduler
from lmforge.engine.sequence import Sequence
from lmforge.engine.speculative import NgramProposer, SpecDecodeStats, verify
from lmforge.engine.structured import (
    GrammarCompiler,
    SequenceGrammar,
    batch_bitmask,
    failed_grammars,
    grammar_start,
)
from lmforge.errors import LmforgeError
from lmforge.layers.kv_quant import kv_storage_dtype

log = logging.getLogger("lmforge")


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    states: list[CompletionState]
    metrics: RequestMetrics
    generators: list[torch.Generator | None] = field(default_factory=list)
    lora_request: LoRARequest | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # [None, ...] while filled in, if asked for

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    """Serves one model: `LLMEngine(model, tokenizer, config)` over an lmforge model that exists in memory (a
    trainer's live model, with or without LoRA), or `LLMEngine.from_config(config)` from a path, GGUF file or alias.
    The model is left as the engine found it (parameters, modules, training mode): what the engine derives from it
    lives in its runner; `update_weights()` brings that up to date after the weights change; `sleep()` / `wake()`
    hand the KV pool's memory back and forth. With tensor_parallel_size > 1 a live model is served from copies of
    its weights split over the ranks (engine/tp_workers.py), which `update_weights()` and `wake()` refresh."""

    def __init__(self, model: nn.Module, tokenizer, config: EngineConfig | None = None, *, owns_model: bool = False,
                 quantization: str | None = None, tp_workers: tp.Workers | None = None):
        """owns_model: the engine built the model for itself (from_config), so it may lay fused weights out in place
        and add multi-LoRA slots; quantization: the linears' quantisation, for the log and metrics; tp_workers: ranks
        1.. when `model` is rank 0's share (from_config with tensor_parallel_size > 1)."""
        from lmforge.weights.quantized import weight_bytes

        config = config or EngineConfig()
        if not owns_model and (config.quantization is not None or config.enable_lora):
            raise ValueError("quantization and enable_lora apply to a model the engine loads itself "
                             "(LLMEngine.from_config / LLM(path)); a live model is served as it is")
        self.live = None  # a live model served from its shares over tensor-parallel ranks (the engine owns those)
        if not owns_model and config.tensor_parallel_size > 1:
            self.live, (model, tp_workers), owns_model = model, tp.split_live(model, config.tensor_parallel_size), True
        self.tp_workers = tp_workers
        if tp_workers is not None:  # stopped with the engine, or at exit
            self._finalizer = weakref.finalize(self, tp_workers.stop)
        self.config, self.owns_model = config, owns_model
        self.model, self.tokenizer, self.quantization = model, tokenizer, quantization
        self.weight_bytes = weight_bytes(model)
        p = next(model.parameters())
        self.generator = torch.Generator(device=p.device).manual_seed(config.seed)  # unseeded requests' draws
        self.weight_version = 0  # bumped by update_weights
        limit = getattr(model, "config", {}).get("max_position_embeddings") or 4096
        self.max_model_len = config.max_model_len or limit
        self.loras = self._lora_slots() if config.enable_lora else None
        kv_dtype = kv_storage_dtype(config.kv_cache_dtype, p.dtype)
        budget = kv_budget_bytes(config, p.device, step_activation_bytes(model.args, config, p.dtype))
        num_blocks = plan_num_blocks(model, config.block_size, kv_dtype, budget,
                                     self.max_model_len, model_dtype=p.dtype)
        t1 = time.perf_counter()
        runner_args = dict(num_blocks=num_blocks, block_size=config.block_size, enforce_eager=config.enforce_eager,
                           max_model_len=self.max_model_len, kv_dtype=kv_dtype, owned=owns_model,
                           # a step graph holds collectives only as the shared-memory kernel (shm_collective.cpp)
                           step_graphs=config.step_graphs and (tp_workers is None or tp_workers.graphable),
                           max_num_seqs=config.max_num_seqs)
        if tp_workers is not None:  # every rank's pool has rank 0's number of blocks (its KV heads are the most)
            lora = (config.max_loras, config.max_lora_rank) if config.enable_lora else None
            tp_workers.broadcast("runner", {**runner_args, "lora": lora})
        self.runner = ModelRunner(model, **runner_args, workers=tp_workers)
        if tp_workers is not None:
            held = tp_workers.holdings(model, self.runner)
            log.info("tensor parallel ranks hold weights %s MiB (read from the checkpoint: %s MiB), KV pools %s MiB",
                     *(" / ".join(f"{h[k] / 2**20:.0f}" for h in held) for k in ("weights", "read", "kv")))
        t2 = time.perf_counter()
        log.info("KV cache allocated in %.1fs", t2 - t1)
        self.runner.warm_up()
        log.info("warm-up (%s) in %.1fs", self.runner.fast_paths, time.perf_counter() - t2)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.scheduling_policy)
        self.eos_token_ids = self.tokenizer.eos_token_ids
        self.requests: dict[str, Request] = {}
        self._seq_index: dict[int, tuple[Request, int]] = {}
        self.num_steps = 0  # model steps run (a clock for "freed within one step" checks and metrics)
        self.asleep = False
        spec = config.speculative_config
        self.proposer = None
        if spec is not None:
            self.proposer = NgramProposer(spec, self.max_model_len) if spec.method == "ngram" else \
                SelfDraftProposer(spec, self.runner, self.max_model_len)
        self.spec_stats = SpecDecodeStats(accepted_per_pos=[0] * spec.num_speculative_tokens) if spec else None
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids,
                                        config.structured_outputs_timeout)
        self.think_ids = None  # (start, end) tag ids: grammars begin after the thinking
        if config.reasoning_parser is not None:
            from lmforge.serve.reasoning import get_reasoning_parser

            self.think_ids = get_reasoning_parser(config.reasoning_parser).token_ids(self.tokenizer)

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLMEngine":
        """Loads config.model (a directory, .gguf file, Hub id or alias) with its tokenizer and serves it."""
        from lmforge.hardware import compute_dtype
        from lmforge.tokenizer import Tokenizer
        from lmforge.weights.quantized import load_for_serving, weight_bytes
        from lmforge.weights.resolve import resolve_model

        t0 = time.perf_counter()
        model_dir = resolve_model(config.model)
        world, workers = config.tensor_parallel_size, None
        try:
            if world > 1:  # ranks > 0 of a torchrun launch serve rank 0 inside join() and exit there
                tp.check_splittable(config.model, model_dir, config.quantization)
                launch = tp.launched()
                workers = tp.Workers.join(config, launch) if launch else tp.Workers.start(config, world)
                (model, _), quantization = tp.load_shard(config, 0, world), config.quantization
            else:
                model, quantization = load_for_serving(config.model, model_dir, config.quantization,
                                                       compute_dtype(config.dtype, config.device), config.device)
            tokenizer = Tokenizer.from_dir(Path(model_dir))
            log.info("weights: %.2f GiB (%s%s%s) loaded in %.1fs", weight_bytes(model) / 2**30,
                     next(model.parameters()).dtype, f", {quantization} linears" if quantization else "",
                     f", rank 0's share of {world}" if workers else "", time.perf_counter() - t0)
            return cls(model, tokenizer, config, owns_model=True, quantization=quantization, tp_workers=workers)
        except BaseException:
            if workers is not None:
                workers.stop()
            raise

    # ---- the live model ------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_weights(self, weights: dict[str, torch.Tensor] | str | Path | None = None) -> int:
        """After the model's weights changed (optimizer steps), or to change them: `weights` a state dict (the
        model's own names, copied in place, any subset) or a PEFT adapter directory (into the live model's LoRA
        layers). Refreshes what the engine derived from the weights, records step graphs anew, empties the prefix
        cache (its blocks hold keys and values of the old weights) and returns the new weight version. Refused while
        requests are in flight: their caches were computed with the old weights. Under tensor parallelism each rank
        gets its slices (all of a live model's weights when `weights` is None)."""
        if self.has_unfinished_requests():
            raise RuntimeError(f"update_weights: {len(self.requests)} requests are in flight; finish or abort them "
                               "first")
        if self.tp_workers is not None:
            if isinstance(weights, (str, Path)):
                raise RuntimeError("update_weights from a PEFT adapter directory is not supported with "
                                   "tensor_parallel_size > 1 (a live model's LoRA layers are not split); serve "
                                   "adapters with enable_lora and add_lora")
            if weights is None and self.live is not None:
                weights = dict(self.live.named_parameters())
            self.tp_workers.set_weights(self.model, weights or {})
        elif isinstance(weights, (str, Path)):
            from lmforge.weights.peft import load_adapter_weights

            load_adapter_weights(self.model, weights)
        elif weights is not None:
            params = dict(self.model.state_dict(keep_vars=True))
            unknown = [name for name in weights if name not in params]
            if unknown:
                raise KeyError(f"update_weights: the model has no tensor {unknown[0]!r} "
                               f"({len(unknown)} unknown names)")
            for name, value in weights.items():
                params[name].copy_(value)
        if not self.asleep:
            if self.tp_workers is not None:
                self.tp_workers.broadcast("refresh")
            self.runner.refresh()
        self.block_manager.reset_prefix_cache()
        self.weight_version += 1
        return self.weight_version

    def shutdown(self) -> None:
        """Stops the tensor-parallel worker processes (nothing to do without them); the engine cannot step after."""
        if self.tp_workers is not None:
            self._finalizer()

    def sleep(self) -> None:
        """Frees the KV pool, the step graphs and the derived weight copies (vLLM's sleep mode), so that training can
        use the memory; `wake()` brings them back. Refused while requests are in flight."""
        if self.has_unfinished_requests():
            raise RuntimeError(f"sleep: {len(self.requests)} requests are in flight; finish or abort them first")
        if not self.asleep:
            self.block_manager.reset_prefix_cache()
            if self.tp_workers is not None:
                self.tp_workers.broadcast("sleep")
            self.runner.release()
            self.asleep = True

    def wake(self) -> None:
        """Allocates the KV pool again and derives from the model's current weights (no update_weights needed)."""
        if self.asleep:
            if self.live is not None:  # the shares take the live model's current weights
                self.tp_workers.set_weights(self.model, dict(self.live.named_parameters()))
            if self.tp_workers is not None:
                self.tp_workers.broadcast("wake")
            self.runner.allocate()
            self.asleep = False

    def _lora_slots(self) -> LoRAManager:
        from lmforge.layers.multi_lora import add_multi_lora

        c = self.config
        if self.tp_workers is not None:  # each rank keeps its parts of the adapters
            manager = tp.lora_manager(self.model, c.max_loras, c.max_lora_rank)
        else:
            manager = LoRAManager(self.model, add_multi_lora(self.model, c.max_loras, c.max_lora_rank), c.max_loras,
                                  c.max_lora_rank)
        layers = manager.layers.values()
        size = sum((m.lora_a.numel() + m.lora_b.numel()) * m.lora_a.element_size() for m in layers)
        log.info("LoRA: %d adapter slots of rank <= %d over %d layers, %.1f MiB", c.max_loras, c.max_lora_rank,
                 len(layers), size / 2**20)
        return manager

    # ---- adapters ----------------------------------------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> LoadedAdapter:
        """Loads a PEFT adapter directory into a free slot, checked against the model (LmforgeError if unfit)."""
        adapter = self._require_loras().add(lora_request)
        if self.tp_workers is not None:
            try:
                self.tp_workers.add_lora(lora_request, adapter.slot)
            except LmforgeError:
                self.loras.remove(lora_request.lora_name)
                self.tp_workers.broadcast("remove_lora", lora_request.lora_name)
                raise
        return adapter

    def remove_lora(self, name: str) -> LoadedAdapter:
        """Unloads an adapter; refused (AdapterInUseError) while requests that use it are queued or running."""
        loras = self._require_loras()
        adapter = loras.get(name)
        busy = [r.request_id for r in self.requests.values() if adapter and r.seqs[0].adapter_id == adapter.uid]
        if busy:
            raise AdapterInUseError(f"LoRA adapter {name!r} has {len(busy)} requests in flight (e.g. {busy[0]}); "
                                    "unload it when they have finished")
        removed = loras.remove(name)
        if self.tp_workers is not None:
            self.tp_workers.broadcast("remove_lora", name)
        return removed

    def list_loras(self) -> list[LoadedAdapter]:
        return self.loras.loaded() if self.loras is not None else []

    def _require_loras(self) -> LoRAManager:
        if self.loras is None:
            raise ValueError("this engine was built without LoRA support; build it with enable_lora=True")
        return self.loras

    def _adapter_id(self, lora_request: LoRARequest | None) -> int:
        if lora_request is None:
            return 0
        adapter = self._require_loras().get(lora_request.lora_name)
        if adapter is None:
            raise AdapterNotFoundError(f"LoRA adapter {lora_request.lora_name!r} is not loaded; load it first "
                                       "(add_lora)")
        if adapter.request != lora_request:
            raise ValueError(f"LoRA adapter {lora_request.lora_name!r} is loaded as {adapter.request}, not as "
                             f"{lora_request}")
        return adapter.uid

    # ---- requests ----------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, priority: int = 0,
                    arrival_time: float | None = None, lora_request: LoRARequest | None = None) -> None:
        """Validates and queues a request (n sequences); raises ValueError naming the field before queueing.
        With lora_request, the request is generated with that (loaded) adapter."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if self.asleep:
            raise RuntimeError("the engine is asleep; wake() it before adding requests")
        adapter_id = self._adapter_id(lora_request)
        text, ids = self._tokenize(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens, which leaves no room to generate within "
                             f"max_model_len={self.max_model_len}")
        params = resolve_constraints(params, self.tokenizer, self.vocab_size)
        constraint = params.structured_outputs
        grammar = self.grammars.compile(constraint) if constraint is not None else None  # off the step loop
        start = grammar_start(ids, self.think_ids)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        request = Request(request_id, text, ids, [], [], RequestMetrics(arrival), lora_request=lora_request,
                          prompt_logprobs=None if params.prompt_logprobs is None else [None])
        for index in range(params.n):
            # the first sequence scores the prompt (engine/prompt_logprobs.py); its siblings share its blocks
            seq = Sequence(request_id, list(ids), params, index=index, priority=priority, arrival_time=arrival,
                           adapter_id=adapter_id,
                           needs_prompt_logprobs=index == 0 and params.prompt_logprobs is not None and len(ids) > 1)
            if grammar is not None:  # each of the n sequences advances its own matcher
                seq.grammar = SequenceGrammar(constraint, grammar, self.grammars, start)
            request.seqs.append(seq)
            request.states.append(CompletionState(self.tokenizer, ids, params, index))
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.runner.device).manual_seed(params.seed + index)
            request.generators.append(generator)
            self._seq_index[seq.seq_id] = (request, index)
        self.requests[request_id] = request
        for seq in request.seqs:
            self.scheduler.add(seq)

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            text = prompt
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
            ids, text = list(prompt), None
        else:
            raise ValueError("prompt must be a string or a list of token ids")
        if not ids:
            raise ValueError("prompt must not be empty")
        vocab = self.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        return text, ids

    def abort(self, request_id: str) -> RequestOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            self.scheduler.finish(seq, "abort")
            self._seq_index.pop(seq.seq_id, None)
        return self._output(request)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def has_running_requests(self) -> bool:
        """Whether a step would run the model (False while only waiters, e.g. grammars compiling, remain)."""
        return bool(self.scheduler.running)

    def num_waiting_beyond_batch(self) -> int:
        """Waiting sequences that the running batch has no free place for (max_num_seqs)."""
        room = max(0, self.scheduler.max_num_seqs - len(self.scheduler.running))
        return len(self.scheduler.waiting) - room

    def stats(self) -> EngineStats:
        """Counters and gauges of the scheduler, KV pool, prefix cache and speculation; call between steps."""
        bm, sched = self.block_manager, self.scheduler
        return EngineStats(len(sched.running), len(sched.waiting), bm.usage, bm.num_blocks, bm.prefix_queries,
                           bm.prefix_hits, sched.num_preemptions, self.num_steps, copy.deepcopy(self.spec_stats))

    @property
    def vocab_size(self) -> int:
        return self.model.args.vocab_size

    # ---- one step ----------------------------------------------------------------------------------------
    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """Schedules and runs one model step; returns the requests that made progress (finished ones removed), or
        with final_only only those that finished (vLLM's FINAL_ONLY output kind: offline generation reads nothing
        else, and building an output copies a request's tokens so far)."""
        if self.proposer is not None:  # sequences under a grammar take no drafts
            self.proposer.propose([s for s in self.scheduler.running if s.grammar is None])
        failed = [self._output(r) for r in self._refuse_failed_grammars()]
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return failed
        self.num_steps += 1
        lora = self.loras.batch(batch.seqs, batch.num_new_tokens) if self.loras is not None else None
        try:
            if self.proposer is not None:
                self.proposer.draft(batch)
            logits, rows, prompt_scores = self.runner.execute(batch, lora)
        except Exception:
            self.scheduler.step_failed(batch)
            raise
        self.scheduler.advance(batch)
        for scores in prompt_scores:
            record_prompt_logprobs(scores, self._seq_index[scores.seq.seq_id][0].prompt_logprobs, self.tokenizer)
        if not rows:
            return failed
        seqs = [batch.seqs[r] for r in rows]
        sampling_rows, grammars = [], []
        for seq in seqs:
            request, index = self._seq_index[seq.seq_id]
            output, spec = seq.output_token_ids, seq.spec_token_ids
            # one row per scored position; the draft tokens before a position are its context (penalties,
            # min_tokens), so each row's distribution is the one plain decoding would sample from there
            for j in range(len(spec) + 1):
                sampling_rows.append(SamplingRow(seq.params, request.generators[index], seq.prompt_token_ids,
                                                 output + spec[:j] if j else output, self.eos_token_ids))
                grammars.append(seq.grammar)
        result = sample(logits, sampling_rows, batch_bitmask(grammars, logits.shape[1]), self.generator,
                        self.config.logprobs_mode)
        now = time.monotonic()
        touched: dict[str, Request] = {}
        i = 0
        for seq in seqs:
            request, index = self._seq_index[seq.seq_id]
            spec = seq.spec_token_ids
            emitted = verify(spec, result.token_ids[i:i + len(spec) + 1]) if spec else result.token_ids[i:i + 1]
            for j, token in enumerate(emitted):  # a stop, EOS or length limit ends the run: nothing after it
                self._append(request, index, seq, token, result.logprobs[i + j] if result.logprobs else None,
                             result.top_logprobs[i + j] if result.top_logprobs else None, now)
                if seq.is_finished:
                    break
            if spec:
                self.spec_stats.record(len(spec), len(emitted) - 1)
                self.scheduler.discard_rejected(seq)
            i += len(spec) + 1
            touched[request.request_id] = request
        outputs = failed
        for request in touched.values():
            finished = request.finished
            if finished or not final_only:
                outputs.append(self._output(request))
            if finished:
                self._retire(request)
        return outputs

    def _append(self, request: Request, index: int, seq: Sequence, token: int, logprob, top, now: float) -> None:
        seq.token_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = now
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
        state = request.states[index]
        stop = state.add_token(token, logprob, top)
        refused = seq.grammar is not None and not seq.grammar.accept(token)  # no continuation can follow
        end = state.finish(token, stop, self.eos_token_ids, seq.num_output_tokens, seq.num_tokens, self.max_model_len,
                           refused)
        if end is not None:
            self._finish(seq, *end)

    def _finish(self, seq: Sequence, reason: str, stop_reason) -> None:
        seq.stop_reason = stop_reason
        seq.finished_time = time.monotonic()
        self.scheduler.finish(seq, reason)

    def _refuse_failed_grammars(self) -> list[Request]:
        """Finishes (as aborted) the waiting requests whose grammar failed to compile or timed out; callers that
        must report the reason wait on `grammars.wait(...)` before adding the request (LLM.generate, the server)."""
        failed = {}
        for seq, reason in failed_grammars(self.scheduler.waiting):
            request = failed.setdefault(seq.request_id, self._seq_index[seq.seq_id][0])
            log.warning("request %s refused: %s", request.request_id, reason)
        for request in failed.values():
            for seq in request.seqs:
                self.scheduler.finish(seq, "abort")
            self._retire(request)
        return list(failed.values())

    def _retire(self, request: Request) -> None:
        self.requests.pop(request.request_id, None)
        for seq in request.seqs:
            self._seq_index.pop(seq.seq_id, None)

    def _output(self, request: Request) -> RequestOutput:
        m = request.metrics
        first = request.seqs[0]
        m.first_scheduled_time = first.first_scheduled_time
        m.num_cached_tokens = first.num_cached_tokens
        m.num_preemptions = sum(s.num_preemptions for s in request.seqs)
        if request.finished:
            m.finished_time = max((s.finished_time or time.monotonic()) for s in request.seqs)
        outs = [state.output(seq.output_token_ids, seq.finish_reason, seq.stop_reason)
                for seq, state in zip(request.seqs, request.states, strict=True)]
        deltas = [state.delta(seq.is_finished) for seq, state in zip(request.seqs, request.states, strict=True)]
        scored = request.prompt_logprobs
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outs, request.finished, m,
                             first.num_cached_tokens, deltas, request.lora_request,
                             scored if scored is not None and len(scored) == len(request.prompt_token_ids) else None)

    def reset_prefix_cache(self) -> bool:
        return self.block_manager.reset_prefix_cache()
