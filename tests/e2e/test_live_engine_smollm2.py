"""The engine on a trainer's live model, SmolLM2-135M-Instruct in fp32, one process: LoRA training, update_weights(),
greedy answers equal to a fresh engine on the merged model written by `lmforge merge`, and a training run the engine
did not disturb."""

import subprocess
import sys

import pytest
import torch

from lmforge import SamplingParams
from lmforge.config.schema import LoraConfig
from lmforge.data.dataset import IGNORE_INDEX
from lmforge.engine.config import EngineConfig
from lmforge.engine.llm import LLM
from lmforge.engine.llm_engine import LLMEngine
from lmforge.layers.attention import AttnMeta
from lmforge.layers.lora import add_lora
from lmforge.models import build_model
from lmforge.tokenizer import Tokenizer
from lmforge.train.loss import token_loss_sum
from lmforge.weights.peft import save_adapter

pytestmark = pytest.mark.e2e
LORA = LoraConfig(rank=8, alpha=16, target_modules="all-linear")
ANSWERS = ["Arr, the sea be calling me, matey!", "Ahoy! Me treasure be buried on yonder isle.",
           "Shiver me timbers, that be a fine ship!", "Aye, we sail at dawn with the tide."]
QUESTIONS = ["What is the capital of France?", "How do plants make food?", "Name a primary colour.",
             "What is 12 times 3?", "Who wrote Hamlet?", "Why is the sky blue?", "What is water made of?",
             "How many legs has a spider?", "What is the largest planet?", "What do bees make?",
             "Where do penguins live?", "What is the boiling point of water?"]
GREEDY = SamplingParams(temperature=0, max_tokens=24)


def build(smollm2_dir):
    torch.manual_seed(0)  # LoRA's A matrices
    model = build_model(smollm2_dir, dtype="float32", progress=False)
    add_lora(model, LORA)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)


def batches(tokenizer) -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """One packed batch per answer: each question answered in pirate talk, every token trained."""
    out = []
    for answer in ANSWERS:
        chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": answer}] for q in QUESTIONS[:4]]
        seqs = [tokenizer.apply_chat_template(chat, tokenize=True) for chat in chats]
        ids = torch.tensor(sum(seqs, []))
        labels = torch.cat([torch.tensor(s[1:] + [IGNORE_INDEX]) for s in seqs])
        out.append((ids, labels, [len(s) for s in seqs]))
    return out


def train(model, optimizer, data, steps: int, start: int) -> list[float]:
    losses = []
    for step in range(start, start + steps):
        ids, labels, lens = data[step % len(data)]
        positions = torch.cat([torch.arange(n) for n in lens])
        hidden = model(ids, positions, AttnMeta.for_sequences(lens))
        loss = token_loss_sum(model, hidden, labels) / int((labels != IGNORE_INDEX).sum())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def answers(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"q{engine.weight_version}-{i}", prompt, GREEDY)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: list(o.outputs[0].token_ids) for o in engine.step() if o.finished})
    return [done[f"q{engine.weight_version}-{i}"] for i in range(len(prompts))]


def test_an_engine_on_the_live_lora_model_answers_as_the_merged_model_and_leaves_training_alone(smollm2_dir,
                                                                                                  tmp_path):
    tokenizer = Tokenizer.from_dir(smollm2_dir)
    data = batches(tokenizer)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True) for q in QUESTIONS]

    model, optimizer = build(smollm2_dir)
    engine = LLMEngine(model, tokenizer, EngineConfig(max_model_len=256, kv_cache_memory=0.1))
    before = answers(engine, prompts)
    losses = train(model, optimizer, data, 5, 0)
    engine.update_weights()
    live = answers(engine, prompts)
    assert live != before  # the engine follows the trained adapter
    adapter = save_adapter(model, tmp_path / "adapter", LORA, str(smollm2_dir))
    losses += train(model, optimizer, data, 5, 5)

    model_alone, optimizer_alone = build(smollm2_dir)
    alone = train(model_alone, optimizer_alone, data, 10, 0)
    assert losses == pytest.approx(alone, abs=1e-6, rel=0)
    assert losses[-1] < losses[0]

    # the adapter after 5 steps, merged by the CLI and served fresh from disk
    merged = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-m", "lmforge", "merge", str(smollm2_dir), str(adapter), str(merged)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    fresh = LLM(str(merged), dtype="float32", max_model_len=256, kv_cache_memory=0.1)
    assert [list(o.outputs[0].token_ids) for o in fresh.generate(prompts, GREEDY, use_tqdm=False)] == live
