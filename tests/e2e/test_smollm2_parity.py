"""The real SmolLM2-135M-Instruct, converted by lmforge, against transformers on the same directory (fp32).
Greedy generation parity (32 prompts, 64 tokens) lives in test_engine_smollm2.py."""

import pytest
import torch

from lmforge.layers.attention import AttnMeta
from lmforge.models import build_model
from lmforge.tokenizer import Tokenizer

pytestmark = pytest.mark.e2e

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for sleeping better.",
    "Explain photosynthesis to a ten-year-old.",
    "Translate 'good morning, my friend' into Spanish.",
]


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(smollm2_dir)


def test_chat_prompts_tokenize_identically(smollm2_dir, reference):
    _, ref_tok = reference
    tok = Tokenizer.from_dir(smollm2_dir)
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ref_ids = ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert ids == list(ref_ids)


def test_flat_batch_logits_match_transformers(smollm2_dir, reference):
    ref_model, _ = reference
    ours = build_model(smollm2_dir, dtype="float32", progress=False)
    seqs = [torch.randint(0, 49152, (n,)) for n in (33, 5, 71)]
    with torch.no_grad():
        flat = ours.logits(ours(torch.cat(seqs), torch.cat([torch.arange(len(s)) for s in seqs]),
                                AttnMeta.for_sequences([len(s) for s in seqs])))
        expected = torch.cat([ref_model(s[None]).logits[0] for s in seqs])
    assert (flat - expected).abs().max().item() < 1e-3
