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
    The serving engine runs `embed`, then `run_layers` (or its recording of them: lmforge/engine/cpu_graph.py),
    then `norm` itself.
    """

    def __init__(self, args, block: Callable[[object, int], nn.Module]):
        super().__init__()
        # nn.Embedding's init, skipped on the meta device (build_on_meta): normal_ there imports torch._dynamo, 1.5 s
        # of every serving process's start, for values the checkpoint overwrites
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size,
                                         _weight=torch.empty(args.vocab_size, args.hidden_size))
        if not self.embed_tokens.weight.is_meta:
            nn.init.normal_(self.embed_tokens.weight)
        self.layers = nn.ModuleList(block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary = Rotary(args.rope)
        self.checkpoint_every = 0

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMeta,
                kv: list[KVCache] | None) -> torch.Tensor:
        x, rope = self.embed(input_ids, positions)
        return self.norm(self.run_layers(x, rope, meta, kv))

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """The first layer's input and the rotary tables of the positions."""
        x = self.embed_tokens(input_ids)
        return x, self.rotary(positions, x.dtype)

    def run_layers(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttnMeta,
                   kv: list[KVCache] | None) -> torch.Tensor:
        every = self.checkpoint_every if torch.is_grad_enabled() and kv is None else 0
        for i, layer in enumerate(self.layers):
            if every and i % every == 0:
                x = checkpoint(layer, x, rope, meta, None, use_reentrant=False)
            else:
                x = layer(x, rope, meta, kv[i] if kv is not None else None)
        return x
