"""The CUDA path on an NVIDIA GPU (issue 23), run by benchmarks/gpu.sh on a lent GPU machine; skipped where torch sees
no GPU (tests/unit/test_cuda_paths.py checks the same code's logic on the CPU). Models have SmolLM2-135M's shape with
seeded random weights (tests/gpu/random_models.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge import LLM, SamplingParams
from tests.gpu.random_models import SMOLLM2_135M, write_random

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (benchmarks/gpu.sh)")
ROOT = Path(__file__).parents[2]
PROMPTS = [[3 + (37 * i + 11 * j) % 49000 for j in range(8 + i)] for i in range(32)]


@pytest.fixture(scope="module")
def smol(tmp_path_factory) -> Path:
    # std 0.1: decisive logits (at HF's 0.02 a random model's top tokens nearly tie)
    return write_random(tmp_path_factory.mktemp("smol"), {**SMOLLM2_135M, "torch_dtype": "float32"}, std=0.1)


def greedy(llm: LLM, max_tokens: int = 32) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def test_greedy_tokens_equal_transformers_on_the_gpu(smol):
    """32 prompts x 32 tokens in fp32: lmforge's engine on CUDA (CUDA graphs on) gives transformers' greedy tokens;
    where they part, transformers' own top two logits were within 1e-3 (a near-tie that float rounding decides)."""
    from transformers import AutoModelForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    llm = LLM(str(smol), device="cuda", dtype="float32", max_model_len=256, max_num_seqs=32)
    assert llm.engine.runner.kv[0][0].device.type == "cuda" and llm.engine.runner.cuda_graphs is not None
    got = greedy(llm)
    assert llm.engine.runner.cuda_graphs.replays, "no decode step was replayed from a CUDA graph"
    del llm
    hf = AutoModelForCausalLM.from_pretrained(str(smol), dtype=torch.float32).cuda().eval()
    parted = 0
    for prompt, tokens in zip(PROMPTS, got, strict=True):
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                               min_new_tokens=32)[0, len(prompt):].tolist()
        if want != tokens:
            at = next(i for i, (a, b) in enumerate(zip(want, tokens, strict=True)) if a != b)
            with torch.no_grad():
                logits = hf(torch.tensor([prompt + want[:at]], device="cuda")).logits[0, -1].float()
            gap = (logits[want[at]] - logits[tokens[at]]).item()
            assert gap < 1e-3, f"prompt {PROMPTS.index(prompt)} parts at token {at} where HF's logits differ by {gap}"
            parted += 1
    assert parted <= 2, f"{parted} of 32 prompts part from transformers at near-ties"


def test_cuda_graph_replays_are_bit_identical_to_eager_steps(smol):
    """Every captured graph, replayed over a step's inputs, gives the eager forward's hidden states bit for bit; and
    greedy tokens with graphs equal those of enforce_eager (which runs another attention path)."""
    llm = LLM(str(smol), device="cuda", dtype="float32", max_model_len=256, max_num_seqs=32)
    with_graphs = greedy(llm)
    graphs = llm.engine.runner.cuda_graphs
    assert len(graphs.replays) >= 3
    with torch.inference_mode(), llm.engine.runner.context():
        for (b, width), replay in graphs.replays.items():
            replayed = replay().clone()
            assert torch.equal(replayed, graphs.forward(b, width)), (b, width)
    eager = LLM(str(smol), device="cuda", dtype="float32", max_model_len=256, max_num_seqs=32, enforce_eager=True)
    assert eager.engine.runner.cuda_graphs is None
    assert greedy(eager) == with_graphs


@pytest.mark.parametrize("prefixed", [False, True])
def test_packed_training_attention_on_the_gpu_equals_sdpa_with_gradients(prefixed):
    """FlexAttention over packed documents (shared prompts too) against the per-document SDPA path, forward and the
    gradients of q, k and v, fp32."""
    from lmforge.layers import flex
    from lmforge.layers.attention import AttnMeta, attention

    torch.manual_seed(0)
    cu = torch.tensor([0, 60, 100, 130, 180], device="cuda")
    prefixes = torch.tensor([0, 30, 50, 0], device="cuda") if prefixed else None
    q, k, v = (torch.randn(180, h, 64, device="cuda") for h in (8, 2, 2))
    grad = torch.randn(180, 8, 64, device="cuda")

    def run(devices):
        flex.DEVICES = devices
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        meta = AttnMeta.for_training(cu, prefixes)
        out = attention(*leaves, meta, None, 0.125, None)
        out.backward(grad)
        return meta.flex, out.detach(), [t.grad for t in leaves]

    try:
        no, want, want_grads = run(())
        docs, got, got_grads = run(("cuda",))
    finally:
        flex.DEVICES = ("cuda",)
    assert no is None and docs is not None
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4)


def test_the_kv_pool_is_on_the_gpu_within_gpu_memory_utilization(smol):
    llm = LLM(str(smol), device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3)
    pool = sum(t.numel() * t.element_size() for layer in llm.engine.runner.kv for t in layer)
    free, total = torch.cuda.mem_get_info()
    assert llm.engine.runner.kv[0][0].is_cuda
    assert torch.cuda.memory_allocated() <= 0.3 * total and pool > 0.1 * total


def train_losses(tmp_path: Path, name: str, nproc: int = 1, **overrides) -> list[float]:
    """LoRA SFT of the tiny chat model over 24 demo rows, 6 steps; in this process, or `--nproc` processes."""
    from lmforge.config import load_config
    from lmforge.train.recipes import sft
    from tests.train_refs import config_maker, losses
    from tests.unit.tiny_server import tiny_chat_model

    model = tmp_path / "model"
    if not model.is_dir():
        tiny_chat_model(model)
    make = config_maker(tmp_path, model, slice(0, 24), slice(24, 28), **{"micro_batch_size": 2, "batch_size": 4,
                        "max_steps": 6, "eval__every_steps": 0, **overrides})
    config = make(name)
    if nproc == 1:
        sft.main(load_config(config))
    else:
        subprocess.run([sys.executable, "-m", "lmforge", "train", str(config), "--nproc", str(nproc)], check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    return list(losses(tmp_path / name).values())


def test_training_losses_on_the_gpu_equal_the_cpu_reference(tmp_path):
    """LoRA SFT, 6 steps of the same rows: CUDA fp32 within 1e-4 of CPU fp32 at every step; CUDA bf16-mixed within
    bf16's tolerance (2e-2)."""
    cpu = train_losses(tmp_path, "cpu", device="cpu", precision="fp32")
    cuda = train_losses(tmp_path, "cuda", device="cuda", precision="fp32")
    bf16 = train_losses(tmp_path, "bf16", device="cuda", precision="bf16-mixed")
    assert len(cpu) == len(cuda) == len(bf16) == 6
    assert max(abs(a - b) / abs(a) for a, b in zip(cpu, cuda, strict=True)) < 1e-4, (cpu, cuda)
    assert max(abs(a - b) for a, b in zip(cpu, bf16, strict=True)) < 2e-2, (cpu, bf16)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_distributed_training_over_nccl_reaches_the_single_gpu_losses(tmp_path, strategy):
    """Two processes, one GPU each (`lmforge train --nproc 2`: torchrun, NCCL): the losses of one process within
    1e-4 (fp32), as tests/unit/test_train_distributed.py checks over gloo."""
    gpus = torch.cuda.device_count()
    if gpus < 2:
        pytest.skip(f"{gpus} GPU: NCCL needs one GPU per rank, and two ranks to mean anything")
    common = dict(device="cuda", precision="fp32", data__packing=False, micro_batch_size=1)
    single = train_losses(tmp_path, "single", **common)
    several = train_losses(tmp_path, strategy, nproc=2, distributed__strategy=strategy, **common)
    assert max(abs(a - b) / abs(a) for a, b in zip(single, several, strict=True)) < 1e-4, (single, several)
