"""Tiny random Hugging Face models, saved to disk, and the comparison both parity suites use."""

import torch
import transformers

from lmforge.layers.attention import AttnMeta
from lmforge.models import build_model

SEQ_LENS = (7, 1, 13, 4)


def save_tiny(config_cls_name: str, model_cls_name: str, tmp_path, **overrides):
    config = getattr(transformers, config_cls_name)(**overrides)
    torch.manual_seed(0)
    ref = getattr(transformers, model_cls_name)(config).eval().float()
    with torch.no_grad():  # HF initialises norms to one and biases to zero; perturb them so they are tested
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp_path)
    return ref


def max_logit_diff(ref, tmp_path, vocab: int, seq_lens=SEQ_LENS) -> float:
    """lmforge on one flat batch of several sequences vs transformers on each sequence alone."""
    ours = build_model(tmp_path, dtype="float32", progress=False)
    seqs = [torch.randint(0, vocab, (n,)) for n in seq_lens]
    ids = torch.cat(seqs)
    positions = torch.cat([torch.arange(n) for n in seq_lens])
    with torch.no_grad():
        flat = ours.logits(ours(ids, positions, AttnMeta.for_sequences(list(seq_lens))))
        expected = torch.cat([ref(s[None]).logits[0].float() for s in seqs])
    return (flat - expected).abs().max().item()
