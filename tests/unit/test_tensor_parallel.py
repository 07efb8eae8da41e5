"""Tensor parallelism (lmforge/engine/tensor_parallel.py, tp_workers.py): 2 processes of 1 thread give the greedy
tokens of one process, for each model family (tiny random models, fp32; mixtures of experts too), over shared memory
and over gloo, hold half the weights and KV bytes and read only their slices of the checkpoint, take new weights
(update_weights, sleep / wake; a live model too), join a torchrun launch (one machine, or two "machines" over gloo),
refuse what they do not support with a message, and fail fast, naming the rank, when a worker dies."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from lmforge import LLM, SamplingParams
from lmforge.engine import shm_comm, tensor_parallel, tp_workers
from lmforge.engine.lora_manager import LoRARequest
from lmforge.engine.model_runner import kv_bytes_per_block
from lmforge.engine.tensor_parallel import share
from lmforge.engine.tp_workers import WorkerDied
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from tests.adapters import save_peft_adapter
from tests.tiny import tiny_model, write_tiny
from tests.tokenizer_refs import llama_style_dir
from tests.unit.test_live_engine import BASE, VOCAB, assert_same, snapshot
from tests.unit.test_live_engine import FAMILIES as LIVE_FAMILIES
from tests.unit.test_live_engine import engine as live_engine
from tests.unit.test_live_engine import generate as live_generate

FAMILIES = {  # q/k/v biases (qwen2), per-head norms (qwen3), fused qkv and gate/up (phi3), a shared expert (qwen2moe)
    **{name: LIVE_FAMILIES[name] for name in ("llama", "qwen2", "qwen3", "phi3", "qwen2moe")},
    # 3 KV heads over 2 ranks (2 and 1), a tied vocabulary of odd size (padded to equal slices)
    "llama-uneven": {**BASE, "hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 3,
                     "vocab_size": VOCAB + 1, "tie_word_embeddings": True},
    "mixtral": {**LIVE_FAMILIES["mixtral"], "num_local_experts": 3},  # experts split 2 / 1, the router on both
}
PROMPTS = [[1 + (7 * i + 3 * j) % 500 for j in range(3 + 4 * i)] for i in range(6)]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
ENGINE = dict(dtype="float32", kv_cache_memory=0.004, block_size=4, max_model_len=64)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each rank runs this process's thread count
    yield
    torch.set_num_threads(threads)


def model_dir(tmp_path, config):
    llama_style_dir(tmp_path)
    return str(write_tiny(tmp_path, config))


def greedy(llm: LLM) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_shares_split_as_evenly_as_they_go():
    assert [share(3, r, 2) for r in range(2)] == [(0, 2), (2, 3)]
    assert [share(8, r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [share(5, r, 3) for r in range(3)] == [(0, 2), (2, 4), (4, 5)]


@pytest.mark.parametrize("family", [*FAMILIES, "llama-over-gloo"])
def test_two_ranks_give_one_process_greedy_tokens(tmp_path, family, monkeypatch):
    """Collectives through shared memory where the machine has them, gloo's own for "-over-gloo"."""
    if family.endswith("-over-gloo"):
        monkeypatch.setattr(shm_comm, "usable", lambda: False)
        family = family.removesuffix("-over-gloo")
    path = model_dir(tmp_path, FAMILIES[family])
    one = LLM(path, **ENGINE)
    expected = greedy(one)
    two = LLM(path, **ENGINE, tensor_parallel_size=2)
    try:
        assert (tensor_parallel._comm is not None) == shm_comm.usable()
        assert greedy(two) == expected
        # decode steps replay step graphs that hold the all-reduces (the shared-memory kernel), not over gloo
        graphs = two.engine.runner.graphs
        assert (graphs is not None) == two.engine.tp_workers.graphable
        if family == "llama" and graphs is not None:
            assert graphs.replays > 0 and (one.engine.runner.graphs.eager, graphs.eager) == (set(), set())
        held = two.engine.tp_workers.holdings(two.engine.model, two.engine.runner)
        # each rank read only what it keeps (less where the vocabulary's slice is padded): about half the checkpoint
        assert all(0 < rank["read"] <= rank["weights"] for rank in held)
        assert sum(rank["read"] for rank in held) < 1.3 * one.engine.weight_bytes
        if family == "llama":  # even shares: each rank holds half the weight and KV bytes (norms are replicated)
            blocks = two.engine.runner.kv[0][0].shape[0] / one.engine.runner.kv[0][0].shape[0]
            for rank in held:
                assert rank["read"] == rank["weights"]
                assert 0.49 < rank["weights"] / one.engine.weight_bytes < 0.51
                assert rank["kv"] == held[0]["kv"] and rank["kv"] / blocks * 2 == sum(
                    t.numel() * t.element_size() for layer in one.engine.runner.kv for t in layer)
            half = kv_bytes_per_block(two.engine.model, 4, torch.float32)
            assert half * 2 == kv_bytes_per_block(one.engine.model, 4, torch.float32)
    finally:
        two.engine.shutdown()
    assert all(not p.is_alive() for p in two.engine.tp_workers.procs)


def test_ngram_speculation_and_prompt_logprobs_split_over_two_ranks_equal_one_process(tmp_path):
    """N-gram speculation (verification steps of 1 + k tokens, logits at each) and prompt log-probs (logits at every
    prompt position, in chunks, which the workers' head joins) under TP=2 give one process's tokens and log-probs."""
    path = model_dir(tmp_path, FAMILIES["llama-uneven"])
    spec = {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}}
    repeats = [[5, 6, 7, 8] * (2 + i) for i in range(4)]  # prompts an n-gram lookup finds drafts in
    scored = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=3, logprobs=2)
    one = LLM(path, **ENGINE)
    want_tokens = [o.outputs[0].token_ids for o in one.generate(repeats, GREEDY, use_tqdm=False)]
    want_scores = one.generate(PROMPTS, scored, use_tqdm=False)
    two = LLM(path, **ENGINE, tensor_parallel_size=2, **spec)
    try:
        assert [o.outputs[0].token_ids for o in two.generate(repeats, GREEDY, use_tqdm=False)] == want_tokens
        assert two.engine.spec_stats.num_accepted_tokens > 0
        got_scores = two.generate(PROMPTS, scored, use_tqdm=False)
    finally:
        two.engine.shutdown()
    for got, want in zip(got_scores, want_scores, strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert len(got.prompt_logprobs) == len(want.prompt_logprobs) == len(want.prompt_token_ids)
        for g, w in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:], strict=True):
            assert g.keys() == w.keys()
            assert all(abs(g[t].logprob - w[t].logprob) < 1e-5 and g[t].rank == w[t].rank for t in w)


@pytest.mark.parametrize("family", ["llama-uneven", "phi3"])
def test_lora_adapters_split_over_two_ranks_give_one_process_tokens(tmp_path, family):
    """Two PEFT adapters (rank 4 on q/v or Phi-3's fused q/k/v; rank 8 rsLoRA on every linear) served to a mixed
    batch: each rank keeps its rows of B (column-parallel products) or columns of A (row-parallel ones, summed by
    their all-reduce), and TP=2 gives one process's greedy tokens, also after an adapter is unloaded and loaded
    again. An adapter that does not fit is refused on every rank and the engine serves on."""
    pytest.importorskip("peft")
    path = model_dir(tmp_path, {**FAMILIES[family], "pad_token_id": 0})  # transformers' Phi-3 default is 32000
    cls, few = ("Phi3ForCausalLM", ["qkv_proj"]) if family == "phi3" else ("LlamaForCausalLM", ["q_proj", "v_proj"])
    save_peft_adapter(path, tmp_path / "a", cls, r=4, lora_alpha=8, target_modules=few)
    save_peft_adapter(path, tmp_path / "b", cls, seed=2, r=8, lora_alpha=4, target_modules="all-linear",
                      use_rslora=True)
    a, b = LoRARequest("a", 1, str(tmp_path / "a")), LoRARequest("b", 2, str(tmp_path / "b"))
    which = [None, a, b, a, None, b]
    engine = dict(ENGINE, enable_lora=True, max_loras=2, max_lora_rank=8)
    one = LLM(path, **engine)
    expected = [o.outputs[0].token_ids for o in one.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=which)]
    assert expected[1] != greedy(one)[1]  # the adapters change the outputs
    two = LLM(path, **engine, tensor_parallel_size=2)
    try:
        got = two.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=which)
        assert [o.outputs[0].token_ids for o in got] == expected
        two.remove_lora("a")
        two.add_lora(a)
        got = two.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=which)
        assert [o.outputs[0].token_ids for o in got] == expected
        save_peft_adapter(path, tmp_path / "wide", cls, r=16, lora_alpha=16, target_modules=few)
        wide = LoRARequest("wide", 3, str(tmp_path / "wide"))
        with pytest.raises(LmforgeError, match="max_loras=2 adapters are already loaded"):
            two.add_lora(wide)
        two.remove_lora("b")
        with pytest.raises(LmforgeError, match="exceeds the engine's max_lora_rank=8"):
            two.add_lora(wide)
        two.add_lora(b)
        assert [o.outputs[0].token_ids for o in two.generate(PROMPTS, GREEDY, use_tqdm=False,
                                                              lora_request=which)] == expected
    finally:
        two.engine.shutdown()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantised_shares_give_one_process_quantised_tokens(tmp_path, method):
    """quantization int8 / int4 quantises each rank's float share after the split: with shares whose input spans
    fall on the 32-value quantisation blocks (o: 2 heads x 16, down: 64 features) every block is the one-process
    model's, and TP=2 gives its greedy tokens; each rank holds half the quantised bytes."""
    config = {**BASE, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}
    path = model_dir(tmp_path, config)
    one = LLM(path, **ENGINE, quantization=method)
    two = LLM(path, **ENGINE, quantization=method, tensor_parallel_size=2)
    try:
        assert two.engine.quantization == method
        assert greedy(two) == greedy(one)
        held = two.engine.tp_workers.holdings(two.engine.model, two.engine.runner)
        assert all(0.45 < rank["weights"] / one.engine.weight_bytes < 0.56 for rank in held), held
    finally:
        two.engine.shutdown()


def test_what_is_not_supported_is_refused_with_a_message(tmp_path):
    path = model_dir(tmp_path, BASE)
    for extra in ({"quantization": "gguf"}, {"speculative_config": {"model": "self", "num_speculative_tokens": 2}}):
        with pytest.raises(ValueError, match="tensor_parallel_size > 1 does not support"):
            LLM(path, **ENGINE, tensor_parallel_size=2, **extra)
    with pytest.raises(LmforgeError, match="exceeds the model's 2 KV heads"):
        LLM(path, **ENGINE, tensor_parallel_size=3)
    llm = LLM(path, **ENGINE, tensor_parallel_size=2)
    try:
        with pytest.raises(RuntimeError, match="PEFT adapter directory is not supported with tensor_parallel_size"):
            llm.engine.update_weights(str(tmp_path))
        with pytest.raises(KeyError, match="no tensor 'model.nothing'"):
            llm.engine.update_weights({"model.nothing": torch.zeros(1)})
        with pytest.raises(ValueError, match="'model.norm.weight' has shape \\(3,\\)"):
            llm.engine.update_weights({"model.norm.weight": torch.zeros(3)})
        assert greedy(llm)  # still serving after the refusals
    finally:
        llm.engine.shutdown()


class DiesOnArrival:
    """Unpickled in a worker process (its start arguments), it ends that process at once with exit code 3."""

    def __reduce__(self):
        return os._exit, (3,)


def test_a_worker_that_dies_while_starting_fails_the_start_at_once():
    start = time.monotonic()
    with pytest.raises(WorkerDied, match=r"rank 1 \(exit code 3\) died while starting"):
        tp_workers.Workers.start(DiesOnArrival(), 2)
    assert time.monotonic() - start < 20  # not gloo's 120 s timeout


def test_a_dead_worker_fails_the_next_step_naming_its_rank(tmp_path):
    llm = LLM(model_dir(tmp_path, BASE), **ENGINE, tensor_parallel_size=2)
    worker = llm.engine.tp_workers.procs[0]
    worker.kill()
    worker.join()
    with pytest.raises(WorkerDied, match=r"rank 1 \(exit code -9\) died"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    llm.engine.shutdown()  # returns at once: nobody left to tell


def other_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """A full state dict of new values (what a trainer's optimizer steps would produce)."""
    torch.manual_seed(seed)
    return {name: p.detach() + 0.05 * torch.randn_like(p) for name, p in tiny_model(config).named_parameters()}


@pytest.mark.parametrize("family", ["llama-uneven", "mixtral"])
def test_new_weights_reach_every_rank_through_update_weights_and_sleep(tmp_path, family):
    """update_weights(state dict) cuts each rank its slices: TP=2 then gives TP=1's greedy tokens for the same new
    weights, also after sleep() / wake()."""
    config = FAMILIES[family]
    path = model_dir(tmp_path, config)
    weights = other_weights(config, seed=5)
    one = LLM(path, **ENGINE)
    one.engine.update_weights(weights)
    expected = greedy(one)
    two = LLM(path, **ENGINE, tensor_parallel_size=2)
    try:
        before = greedy(two)
        assert two.engine.update_weights(weights) == 1
        assert greedy(two) == expected != before
        two.engine.sleep()
        two.engine.wake()
        assert greedy(two) == expected
    finally:
        two.engine.shutdown()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_dir(llama_style_dir(tmp_path_factory.mktemp("tokenizer")))


def test_a_live_model_split_over_two_ranks_follows_its_weights(tokenizer):
    """LLMEngine(live model, tensor_parallel_size=2) serves copies of its weights split over the ranks: the live
    model stays as it was, the outputs equal the live engine's (TP=1) before and after optimizer-like changes, which
    reach the ranks through update_weights() and through wake()."""
    config = FAMILIES["qwen2"]
    model = tiny_model(config)
    model.config = config
    before = snapshot(model)
    two = live_engine(model, tokenizer, tensor_parallel_size=2)
    try:
        assert_same(before, snapshot(model))
        one = live_engine(model, tokenizer)
        assert live_generate(two) == live_generate(one)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        one.update_weights()
        two.update_weights()
        expected = live_generate(one, prefix="b")
        assert live_generate(two, prefix="b") == expected
        two.sleep()
        with torch.no_grad():
            down = model.model.layers[1].mlp.down_proj.weight
            down.add_(0.3 * torch.randn_like(down))
        two.wake()
        one.update_weights()
        assert live_generate(two, prefix="c") == live_generate(one, prefix="c") != expected
    finally:
        two.shutdown()


def launch(how: str, command: list[str], env: dict, port: int) -> list[subprocess.Popen]:
    """`command` (an lmforge one) started as 2 ranks: one torchrun on this machine, two torchruns standing for two
    machines (one rank each), or two processes with the environment srun gives tasks on two machines."""
    def start(prefix: list[str], extra: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen([*prefix, "-m", "lmforge", *command], env={**env, **(extra or {})},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    run = [sys.executable, "-m", "torch.distributed.run"]
    if how == "torchrun":
        return [start([*run, "--standalone", "--nproc-per-node", "2"])]
    if how == "torchrun-2-machines":
        return [start([*run, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                       f"127.0.0.1:{port}", "--rdzv-id", "tp-test"]) for _ in range(2)]
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_LOCALID": "0", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(port)}
    return [start([sys.executable], {**slurm, "SLURM_PROCID": str(rank)}) for rank in range(2)]


@pytest.mark.parametrize("how", ["torchrun", "torchrun-2-machines", "srun-2-machines"])
def test_ranks_of_a_launch_give_one_process_greedy_tokens(tmp_path, how):
    """Every process runs the same `lmforge generate -tp 2`: rank 0 writes the results, equal to a single process's,
    the others serve it and every process exits 0. On one machine the collectives go through shared memory; across
    "machines" (LOCAL_WORLD_SIZE 1) through gloo."""
    path = model_dir(tmp_path, FAMILIES["llama"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"{w} of the {v}\n" for w, v in zip("one two three four five".split(),
                                                                      "day night river hill sea".split(), strict=True)))
    common = ["generate", "--model", path, "--prompts", str(prompts), "--max-tokens", "12", "--temperature", "0",
              "--ignore-eos", "--dtype", "float32", "--kv-cache-memory", "0.004", "--max-model-len", "64", "-o"]
    single, out = tmp_path / "single.jsonl", tmp_path / "tp.jsonl"
    subprocess.run([sys.executable, "-m", "lmforge", *common, str(single)], env=env, check=True, capture_output=True)
    procs = launch(how, [*common, str(out), "--tensor-parallel-size", "2"], env, tp_workers.free_port())
    logs = [p.communicate(timeout=240)[0] for p in procs]
    tails = "\n\n".join(f"--- process {i} (exit {p.returncode}):\n{log[-4000:]}"
                        for i, (p, log) in enumerate(zip(procs, logs, strict=True)))
    assert [p.returncode for p in procs] == [0] * len(procs), tails  # a message string: pytest shows it whole
    assert any("on several machines" in log for log in logs) == how.endswith("machines"), tails
    texts = [[json.loads(line)["text"] for line in f.read_text().splitlines()] for f in (single, out)]
    assert len(texts[0]) == 5 and texts[1] == texts[0]


def descendants(pid: int) -> list[int]:
    kids = [int(k) for task in Path(f"/proc/{pid}/task").iterdir() for k in (task / "children").read_text().split()]
    return kids + [d for k in kids for d in descendants(k)]


@pytest.mark.parametrize("launcher", ["lmforge", "torchrun"])
def test_a_server_split_over_two_ranks_answers_and_sigterm_stops_every_rank(tmp_path, launcher):
    """`lmforge serve -tp 2` (workers of its own) or torchrun's two ranks each running `lmforge serve -tp 2`: the
    completions equal one process's greedy tokens; SIGTERM to the command stops every rank's process."""
    path = model_dir(tmp_path, FAMILIES["llama"])
    one = LLM(path, dtype="float32", kv_cache_memory=0.004, max_model_len=64)  # the server's defaults
    expected = [o.outputs[0].text for o in one.generate(PROMPTS[:3], GREEDY, use_tqdm=False)]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] \
        if launcher == "torchrun" else [sys.executable]
    proc = subprocess.Popen([*launch, "-m", "lmforge", "serve", path, "--port", "0", "--dtype", "float32",
                             "--kv-cache-memory", "0.004", "--max-model-len", "64", "--tensor-parallel-size", "2",
                             "--no-access-log"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        log = []
        while not (port := re.search(r"on http://127\.0\.0\.1:(\d+)/v1", log[-1] if log else "")):
            line = proc.stdout.readline()
            assert line, "".join(log)
            log.append(line)
        url = f"http://127.0.0.1:{port.group(1)}/v1/completions"
        got = [httpx.post(url, json={"model": path, "prompt": prompt, "max_tokens": 16, "temperature": 0,
                                     "ignore_eos": True}, timeout=60).json() for prompt in PROMPTS[:3]]
        assert [g["choices"][0]["text"] for g in got] == expected, got
        ranks = descendants(proc.pid)
        assert ranks  # the worker (lmforge's own), or both ranks (torchrun's)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        if launcher == "lmforge":
            assert proc.returncode == 0, proc.stdout.read()
        deadline = time.monotonic() + 10
        while (alive := [pid for pid in ranks if tp_workers.pid_alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive
    finally:
        if proc.poll() is None:
            proc.kill()
