"""One sequence at a time over a paged KV cache, for the CLI. The batching engine will replace it."""

from collections.abc import Iterator

import torch
from torch import nn

from lmforge.engine.sampling_params import SamplingParams
from lmforge.layers.attention import AttnMeta, KVCache

BLOCK_SIZE = 16


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits [vocab] fp32 -> token id."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > params.top_p  # keep the smallest set reaching top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


class SimpleGenerator:
    def __init__(self, model: nn.Module, max_len: int = 4096):
        self.model = model
        a = model.args
        p = next(model.parameters())
        blocks = (max_len + BLOCK_SIZE - 1) // BLOCK_SIZE
        shape = (blocks, BLOCK_SIZE, a.num_key_value_heads, a.head_dim)
        self.kv: list[KVCache] = [(torch.empty(shape, dtype=p.dtype, device=p.device),
                                   torch.empty(shape, dtype=p.dtype, device=p.device))
                                  for _ in range(a.num_hidden_layers)]
        self.block_table = torch.arange(blocks, device=p.device)[None]
        self.max_len = max_len
        self.device = p.device

    @torch.inference_mode()
    def _step(self, ids: list[int], start: int) -> torch.Tensor:
        n = len(ids)
        positions = torch.arange(start, start + n, device=self.device)
        meta = AttnMeta.for_paged([n], [start + n], positions, self.block_table)
        hidden = self.model(torch.tensor(ids, device=self.device), positions, meta, self.kv)
        return self.model.logits(hidden[-1:])[0]

    def stream(self, prompt_ids: list[int], params: SamplingParams, eos_ids: frozenset[int] = frozenset()
               ) -> Iterator[int]:
        """Yields generated token ids until max_tokens, a stop token, EOS (unless ignored) or the cache is full."""
        if not prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        if len(prompt_ids) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit max_len {self.max_len}")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        logits = self._step(prompt_ids, 0)
        length = len(prompt_ids)
        for _ in range(params.max_tokens):
            token = sample(logits, params, generator)
            yield token
            if token in stops or length + 1 >= self.max_len:
                return
            logits = self._step([token], length)
            length += 1
