from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.layers.attention import AttnMeta, KVCache
from lmforge.layers.norm import RMSNorm
from lmforge.layers.rope import Rotary


class Decoder(nn.Module):
    """The trunk every family shares (HF's `model.`): embeddings, the family's blocks, final norm, rotary.

    `block(args, layer_index)` builds one decoder layer; it is called as `layer(x, rope, meta, kv)`.
    `checkpoint_every = k` (training) recomputes every k-th block's activations in backward instead of keeping them.
    `step_graphs` (set by the serving engine on CPU) may run a decode step's layers from a recording of
    `run_layers` instead (lmforge/engine/cpu_graph.py).
    """

    def __init__(self, args, block: Callable[[object, int], nn.Module]):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary = Rotary(args.rope)
        self.checkpoint_every = 0
        self.step_graphs = None  # set by the serving engine on CPU: replays decode steps' layers (engine/cpu_graph.py)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMeta,
                kv: list[KVCache] | None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary(positions, x.dtype)
        if self.step_graphs is not None and (out := self.step_graphs(x, rope, meta, kv)) is not None:
            return self.norm(out)
        return self.norm(self.run_layers(x, rope, meta, kv))

    def run_layers(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttnMeta,
                   kv: list[KVCache] | None) -> torch.Tensor:
        every = self.checkpoint_every if torch.is_grad_enabled() and kv is None else 0
        for i, layer in enumerate(self.layers):
            if every and i % every == 0:
                x = checkpoint(layer, x, rope, meta, None, use_reentrant=False)
            else:
                x = layer(x, rope, meta, kv[i] if kv is not None else None)
        return x
