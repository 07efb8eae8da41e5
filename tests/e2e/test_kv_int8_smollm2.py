"""int8 KV cache on the real SmolLM2-135M-Instruct (fp32 weights): perplexity of a text read through the paged cache,
and greedy generations, against the float32 cache."""

import math

import pytest
import torch

from lmforge import LLM, SamplingParams
from lmforge.engine.model_runner import layer_kv_cache
from lmforge.layers.attention import AttnMeta

pytestmark = pytest.mark.e2e

TEXT = (
    "The tides are the slow rise and fall of the sea along the coast. Twice a day the water climbs the beach, "
    "covers the rocks and fills the harbours, and twice a day it draws back again, leaving wet sand, pools and "
    "stranded seaweed behind. People who live by the sea plan their days around it: fishermen leave on the falling "
    "tide and return on the rising one, and walkers check the tables before they cross to an island that is only "
    "an island for half of the day. The cause is the pull of the Moon, and to a lesser degree of the Sun. The side "
    "of the Earth that faces the Moon is pulled a little more strongly than the Earth's centre, and the far side a "
    "little less, so the oceans bulge on both sides at once. As the Earth turns beneath these two bulges, each coast "
    "passes through them, which is why most places see two high tides and two low tides in a little more than a "
    "day. When the Sun and the Moon line up, at new moon and full moon, their pulls add together and the tides are "
    "unusually large; these are called spring tides, although they have nothing to do with the season. When the "
    "two pull at right angles, the difference between high and low water is smallest, and these are the neap "
    "tides. The shape of the coast matters as much as the sky. In a wide open ocean the water rises by less than a "
    "metre, but in a long funnel-shaped bay it can pile up to more than fifteen metres, rushing in faster than a "
    "person can run."
)
CHUNK = 32  # tokens fed per step: the first 128 positions through the paged kernel, later ones through SDPA


@torch.inference_mode()
def read(llm: LLM, ids: list[int], kv_dtype: torch.dtype) -> torch.Tensor:
    """Log-probabilities [len(ids) - 1, vocab] of each next token, the text fed CHUNK tokens at a time through a
    paged cache of kv_dtype (each chunk attends to the earlier ones as the cache holds them, its own rows too)."""
    runner = llm.engine.runner
    model, bs, a = runner.model, runner.block_size, runner.model.args
    blocks = -(-len(ids) // bs)
    kv = [layer_kv_cache((blocks, bs, a.num_key_value_heads, a.head_dim), kv_dtype, runner.device)
          for _ in range(a.num_hidden_layers)]
    table = torch.arange(blocks)[None]
    tokens = torch.tensor(ids)
    out = []
    for start in range(0, len(ids) - 1, CHUNK):
        end = min(start + CHUNK, len(ids) - 1)
        positions = torch.arange(start, end)
        meta = AttnMeta.for_paged([end - start], [end], positions.clone(), table, block_size=bs)
        out.append(model.logits(model(tokens[start:end], positions, meta, kv)).log_softmax(-1))
    return torch.cat(out)


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    return LLM(str(smollm2_dir), dtype="float32", max_model_len=1024, kv_cache_memory=0.1)


def test_int8_cache_keeps_the_perplexity_of_a_text(llm):
    """Bounds: perplexity within 1 % of the float32 cache's, each token's log-likelihood within 0.05 on average
    (measured: 21.27 -> 21.24, 0.025; a bfloat16 cache, 16 tokens a step: 0.005)."""
    ids = llm.get_tokenizer().encode(TEXT)
    assert len(ids) > 300
    target = torch.tensor(ids[1:])[:, None]
    exact = -read(llm, ids, torch.float32).gather(1, target)[:, 0]
    int8 = -read(llm, ids, torch.int8).gather(1, target)[:, 0]
    ppl_exact, ppl_int8 = math.exp(exact.mean()), math.exp(int8.mean())
    diff = (exact - int8).abs()
    print(f"perplexity over {len(ids)} tokens: float32 KV {ppl_exact:.3f}, int8 KV {ppl_int8:.3f}; per-token "
          f"|d log-likelihood| mean {diff.mean():.4f}, max {diff.max():.4f}")
    assert ppl_exact < 30  # the model reads the text sensibly: a broken cache would not get here
    assert abs(ppl_int8 / ppl_exact - 1) < 0.01
    assert 0 < diff.mean() < 0.05


def test_int8_cache_picks_the_float32_caches_greedy_tokens(llm, smollm2_dir):
    """Greedy chat answers of the float32 engine, read back through each cache: the int8 cache's argmax is the float32
    cache's at >= 95 % of the answer positions. And the int8 engine's own greedy answers start as the float32 ones
    (greedy text diverges for good at the first near-tie, so only the first tokens are bounded)."""
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Tell me about {t}."}],
                                       add_generation_prompt=True, tokenize=True)
               for t in ("the moon", "bread", "jazz")]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    answers = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    same = total = 0
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = prompt + answer
        picks = [read(llm, ids, dtype)[len(prompt) - 1:].argmax(-1) for dtype in (torch.float32, torch.int8)]
        same, total = same + int((picks[0] == picks[1]).sum()), total + len(answer)
    int8_llm = LLM(str(smollm2_dir), dtype="float32", max_model_len=1024, kv_cache_memory=0.1, kv_cache_dtype="int8")
    int8_answers = [o.outputs[0].token_ids for o in int8_llm.generate(prompts, params, use_tqdm=False)]
    first = [next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
             for a, b in zip(answers, int8_answers, strict=True)]
    print(f"int8 KV: argmax as float32 KV at {same} of {total} answer positions; free-running greedy answers equal "
          f"for the first {first} tokens")
    assert same >= 0.95 * total
    assert min(first) >= 4
