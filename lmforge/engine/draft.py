"""A layer-truncated self-draft for speculative decoding: the target's first N layers, its final norm and LM head.

It shares the target's weights and its KV cache: the draft writes its N layers' keys and values at the positions
the step then scores, and the target's verifying forward overwrites every layer there, so no cache of its own is
needed. Drafts are greedy (the draft's argmax), so q is one-hot and `speculative.verify` keeps the target's
distribution exactly, as for n-gram drafts.
"""

import torch

from lmforge.engine.model_runner import ModelRunner
from lmforge.engine.scheduler import ScheduledBatch
from lmforge.engine.sequence import Sequence
from lmforge.engine.speculative import SpeculativeConfig
from lmforge.layers.attention import AttnMeta
from lmforge.layers.decoder import Decoder


class SelfDraftProposer:
    def __init__(self, config: SpeculativeConfig, runner: ModelRunner, max_model_len: int):
        decoder = getattr(runner.model, "model", None)
        if not isinstance(decoder, Decoder):
            raise ValueError("speculative_config.model 'self' needs a model built on lmforge's Decoder")
        layers = len(decoder.layers)
        self.num_layers = config.num_draft_layers or layers // 2
        if not 1 <= self.num_layers < layers:
            raise ValueError(f"speculative_config.num_draft_layers must be in [1, {layers - 1}] for this "
                             f"{layers}-layer model, got {self.num_layers}")
        self.config = config
        self.runner = runner
        self.decoder = decoder
        self.max_model_len = max_model_len

    def propose(self, running: list[Sequence]) -> None:
        """Reserves k draft slots (placeholder tokens) for each decoding sequence; `draft` fills them once the
        scheduler has allocated their KV slots."""
        k = self.config.num_speculative_tokens
        for seq in running:
            if seq.num_computed_tokens == seq.num_tokens - 1:
                n = min(k, seq.params.max_tokens - seq.num_output_tokens - 1, self.max_model_len - seq.num_tokens)
                seq.spec_token_ids = [0] * max(n, 0)

    @torch.inference_mode()
    def draft(self, batch: ScheduledBatch) -> None:
        """Runs the truncated model one token at a time over the scheduled sequences with draft slots, writing
        each one's greedy tokens into its spec_token_ids."""
        seqs = [s for s in batch.seqs if s.spec_token_ids]
        for t in range(max((len(s.spec_token_ids) for s in seqs), default=0)):
            active = [s for s in seqs if len(s.spec_token_ids) > t]
            ids = [s.token_ids[-1] if t == 0 else s.spec_token_ids[t - 1] for s in active]
            tokens = self._next_tokens(active, ids, [s.num_tokens - 1 + t for s in active])
            for s, token in zip(active, tokens, strict=True):
                s.spec_token_ids[t] = token

    def _next_tokens(self, seqs: list[Sequence], ids: list[int], positions: list[int]) -> list[int]:
        runner, bs = self.runner, self.runner.block_size
        device = runner.device
        width = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], device=device)
        slots = torch.tensor([s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, positions, strict=True)],
                             device=device)
        meta = AttnMeta.for_paged([1] * len(seqs), [p + 1 for p in positions], slots, tables, block_size=bs)
        pos = torch.tensor(positions, device=device)
        d = self.decoder
        with runner.context():
            x, rope = d.embed(torch.tensor(ids, device=device), pos)
            for i in range(self.num_layers):
                x = d.layers[i](x, rope, meta, runner.kv[i])
            logits = runner.model.logits(d.norm(x), float32=False)
        return logits.argmax(-1).tolist()

