"""The real SmolLM2-135M-Instruct, converted by lmforge: greedy continuations equal transformers' (fp32)."""

import pytest
import torch

from lmforge.engine.sampling_params import SamplingParams
from lmforge.engine.simple_generator import SimpleGenerator
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
    model.generation_config.eos_token_id = None  # run past EOS, like ignore_eos (min_new_tokens would ban EOS)
    return model, transformers.AutoTokenizer.from_pretrained(smollm2_dir)


def test_greedy_64_tokens_match_transformers(smollm2_dir, reference):
    ref_model, ref_tok = reference
    ours = build_model(smollm2_dir, dtype="float32", progress=False)
    tok = Tokenizer.from_dir(smollm2_dir)
    generator = SimpleGenerator(ours, max_len=512)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ref_ids = ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert ids == list(ref_ids)
        got = list(generator.stream(ids, params))
        with torch.no_grad():
            out = ref_model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                                     pad_token_id=0)
        expected = out[0, len(ids):].tolist()
        assert got == expected, f"greedy continuation differs for {prompt!r}"


def test_prompt_logits_match_transformers(smollm2_dir, reference):
    from lmforge.layers.attention import AttnMeta

    ref_model, _ = reference
    ours = build_model(smollm2_dir, dtype="float32", progress=False)
    seqs = [torch.randint(0, 49152, (n,)) for n in (33, 5, 71)]
    with torch.no_grad():
        flat = ours.logits(ours(torch.cat(seqs), torch.cat([torch.arange(len(s)) for s in seqs]),
                                AttnMeta.for_sequences([len(s) for s in seqs])))
        expected = torch.cat([ref_model(s[None]).logits[0] for s in seqs])
    assert (flat - expected).abs().max().item() < 1e-3
