"""`LLM`: vLLM's offline API (generate / chat over many prompts at once) on LLMEngine."""

import itertools
from collections.abc import Iterator
from collections.abc import Sequence as Seq

from torch import nn
from tqdm import tqdm

from lmforge.engine.config import EngineConfig
from lmforge.engine.llm_engine import LLMEngine
from lmforge.engine.lora_manager import LoadedAdapter, LoRARequest
from lmforge.engine.outputs import RequestOutput
from lmforge.engine.sampling_params import SamplingParams

Prompt = str | list[int] | dict
OFFLINE_MAX_NUM_BATCHED_TOKENS = 4096  # vLLM's default for its LLM class on CPU (its server: 2048)


class LLM:
    """LLM(model, dtype=..., max_model_len=..., kv_cache_memory=..., enable_prefix_caching=True, ...).

    Keyword arguments are EngineConfig's fields: dtype, device, max_model_len, kv_cache_memory (GiB), kv_cache_dtype,
    block_size, max_num_seqs, max_num_batched_tokens, enable_prefix_caching, scheduling_policy, seed,
    enforce_eager, step_graphs, enable_lora, max_loras, max_lora_rank, quantization ("int8", "int4", "gguf"; a .gguf
    path means "gguf"), speculative_config (vLLM's dict: {"method": "ngram", "num_speculative_tokens": k,
    "prompt_lookup_max": 4, "prompt_lookup_min": 1}), logprobs_mode ("raw_logprobs", the default, or
    "processed_logprobs": each sampled token's log-prob under the distribution it was drawn from; "raw_logits",
    "processed_logits").
    max_num_batched_tokens defaults to 4096 here, twice the server's 2048, as in vLLM on CPU: offline work is all
    throughput, a server also keeps its streams moving.

    `model` may also be an lmforge model in memory, with `tokenizer=` its tokenizer: the engine then serves that
    live object (LLMEngine's update_weights / sleep / wake through `llm.engine`).
    """

    def __init__(self, model: str | nn.Module | None = None, tokenizer=None, **engine_args):
        engine_args.setdefault("max_num_batched_tokens", OFFLINE_MAX_NUM_BATCHED_TOKENS)
        if isinstance(model, nn.Module):  # a live model (e.g. the one a trainer holds): served as it is
            if tokenizer is None:
                raise ValueError("LLM(model=<module>) needs its tokenizer: LLM(model=module, tokenizer=tok)")
            self.engine = LLMEngine(model, tokenizer, EngineConfig(**engine_args))
        else:
            self.engine = LLMEngine.from_config(EngineConfig(model=model, **engine_args))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None
                 = None, use_tqdm: bool = True, priority: Seq[int] | None = None,
                 lora_request: LoRARequest | Seq[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs come back in the prompts' order.

        A prompt is a string, a list of token ids, or {"prompt": str} / {"prompt_token_ids": [...]}.
        `lora_request`: one adapter for every prompt or one per prompt (None: the base model), as in vLLM; an
        adapter not loaded yet is loaded first (enable_lora=True), and stays loaded.
        """
        prompts = self._as_list(prompts)
        params = sampling_params or SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        priority = list(priority) if priority is not None else [0] * len(prompts)
        loras = self._loras(lora_request, len(prompts))
        for p in params:  # a constraint that cannot compile is a ValueError here, before anything is queued
            if p.structured_outputs is not None:
                self.engine.grammars.wait(p.structured_outputs)
        ids = []
        try:
            for prompt, p, prio, lora in zip(prompts, params, priority, loras, strict=True):
                ids.append(f"offline-{next(self._ids)}")
                self.engine.add_request(ids[-1], self._unwrap(prompt), p, priority=prio, lora_request=lora)
        except Exception:  # a bad prompt queues nothing: the engine stays clean for the next call
            for request_id in ids:
                self.engine.abort(request_id)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True, chat_template: str | None = None,
             tools: list | None = None, **template_kwargs) -> list[RequestOutput]:
        """One conversation (a list of messages) or several; rendered with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        prompts = [tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt, tokenize=True,
                                           tools=tools, chat_template=chat_template, **template_kwargs)
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """One prompt's completion as text pieces, each yielded once it is decided (a possible stop string is held
        back until it is settled); leaving the loop early aborts the request."""
        request_id = f"stream-{next(self._ids)}"
        self.engine.add_request(request_id, self._unwrap(prompt), sampling_params or SamplingParams())
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id == request_id and out.new_text[0]:
                        yield out.new_text[0]
        finally:
            self.engine.abort(request_id)  # a no-op once it finished

    def reset_prefix_cache(self) -> bool:
        return self.engine.reset_prefix_cache()

    def add_lora(self, lora_request: LoRARequest) -> LoadedAdapter:
        return self.engine.add_lora(lora_request)

    def remove_lora(self, name: str) -> LoadedAdapter:
        return self.engine.remove_lora(name)

    def list_loras(self) -> list[LoadedAdapter]:
        return self.engine.list_loras()

    def _loras(self, lora_request, count: int) -> list[LoRARequest | None]:
        """One LoRARequest (or None) per prompt, each adapter loaded."""
        loras = [lora_request] * count if lora_request is None or isinstance(lora_request, LoRARequest) \
            else list(lora_request)
        if len(loras) != count:
            raise ValueError(f"got {len(loras)} lora_requests for {count} prompts")
        for lora in loras:
            if lora is not None and self.engine.loras is not None and self.engine.loras.get(lora.lora_name) is None:
                self.engine.add_lora(lora)
        return loras

    @staticmethod
    def _as_list(prompts) -> list:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(t, int) for t in prompts):  # one prompt given as token ids
            return [prompts]
        return prompts

    @staticmethod
    def _unwrap(prompt: Prompt) -> str | list[int]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return prompt["prompt"]
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        return prompt

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending, done = set(ids), {}
        bar = tqdm(total=len(ids), desc="generating", unit=" req", disable=None if use_tqdm else True)
        while pending:
            for out in self.engine.step(final_only=True):
                if out.finished and out.request_id in pending:
                    done[out.request_id] = out
                    pending.discard(out.request_id)
                    bar.update()
            if pending and not self.engine.has_unfinished_requests():
                raise RuntimeError(f"engine stopped with {len(pending)} requests unfinished")
        bar.close()
        return [done[i] for i in ids]
