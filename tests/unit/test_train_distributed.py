"""Distributed training on CPU: 2 processes with gloo under torchrun (the real launcher, through `lmforge train
--nproc 2`), on a tiny random Llama with SmolLM2's tokenizer and the bundled demo chats.

The reference for every multi-process run is a single-process run with the same global batch: each optimizer step
sees the same rows, so the losses agree to float32 rounding (the sums are only grouped differently)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.train import checkpoint as ckpt
from lmforge.train.dist import SINGLE, World, world_from_env
from lmforge.train.recipes import sft
from tests.train_refs import ROOT, config_maker, losses, metrics

STEPS = 10


@pytest.fixture(scope="module")
def make_config(tmp_path_factory, tiny_chat_model):
    """One sample per row (no packing): 64 rows, 16 steps of 4 per epoch; 7 validation rows, uneven over 2 ranks."""
    return config_maker(tmp_path_factory.mktemp("dist"), tiny_chat_model, slice(0, 64), slice(64, 71),
                        data__packing=False, micro_batch_size=1, batch_size=4, max_steps=STEPS, threads=1,
                        checkpoint__every_steps=5, checkpoint__keep_last=2, eval__every_steps=5)


def run_procs(config: Path, *overrides: str, nproc: int = 2, env: dict | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *(env or {}).pop("PYTHONPATH", [])]),
           **(env or {})}
    return subprocess.run([sys.executable, "-m", "lmforge", "train", str(config), *overrides, "--nproc",
                           str(nproc)], env=env, capture_output=True, text=True, timeout=timeout)


def train_procs(config: Path, *overrides: str, nproc: int = 2) -> Path:
    done = run_procs(config, *overrides, nproc=nproc)
    assert done.returncode == 0, done.stderr[-4000:]
    return Path(load_config(config, list(overrides)).output_dir)


def val_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in metrics(run_dir) if "val_loss" in r}


@pytest.fixture(scope="module")
def single(make_config):
    """The single-process references: full fine-tuning, LoRA and QLoRA."""
    runs = {}
    for method in ("full", "lora", "qlora"):
        cfg = load_config(make_config(f"single-{method}", method=method))
        sft.main(cfg)
        runs[method] = Path(cfg.output_dir)
    return runs


# DDP with full fine-tuning runs in the DPO test below (its reference copy on every rank), FSDP with LoRA in the
# CPU-offload test: those two combinations are left out here. `auto` chooses DDP for this model, and says why.
@pytest.mark.parametrize(("strategy", "shard", "method"), [("auto", "full", "lora"), ("fsdp", "full", "full"),
                                                           ("fsdp", "grad_op", "full"), ("fsdp", "grad_op", "lora")])
def test_two_processes_reach_the_single_process_losses(make_config, single, method, strategy, shard):
    config = make_config(f"{strategy}-{shard}-{method}", method=method, distributed__strategy=strategy,
                         distributed__shard=shard)
    done = run_procs(config)
    assert done.returncode == 0, done.stderr[-4000:]
    run = Path(load_config(config).output_dir)
    ref, got = losses(single[method]), losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == pytest.approx(ref, abs=1e-5)
    assert val_losses(run) == pytest.approx(val_losses(single[method]), abs=1e-5)  # every row once, over 2 ranks
    memory = json.loads((run / "memory.json").read_text())
    assert memory["strategy"] == ("ddp" if strategy == "auto" else strategy)
    if strategy == "auto":
        assert "distributed.strategy auto chose ddp" in done.stderr
        assert "micro-batch 1 x gradient accumulation 2 x 2 processes (ddp" in done.stderr
    if (strategy, shard) == ("fsdp", "full"):  # each rank holds half the parameters and half the optimizer state
        alone = json.loads((single[method] / "memory.json").read_text())["ranks"]
        assert len(alone) == 1 and len(memory["ranks"]) == 2
        for key in ("weight_bytes", "optimizer_bytes"):
            for rank in memory["ranks"]:
                assert rank[key] / alone[0][key] == pytest.approx(0.5, abs=0.02), (key, rank, alone)
    reference = single[method] / "final"
    for name in ("model.safetensors",) if method == "full" else ("adapter_model.safetensors",):
        from safetensors.torch import load_file

        want, have = load_file(reference / name), load_file(run / "final" / name)
        assert sorted(have) == sorted(want)
        for key in want:
            torch.testing.assert_close(have[key], want[key], atol=1e-4, rtol=0, msg=key)
    if method == "lora":  # PEFT reads the consolidated adapter
        config = json.loads((run / "final" / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 4


@pytest.mark.parametrize(("method", "strategy", "offload"), [("qlora", "ddp", False), ("qlora", "fsdp", False),
                                                          ("lora", "fsdp", True), ("full", "fsdp", True)])
def test_qlora_and_cpu_offload_reach_the_single_process_losses(make_config, single, method, strategy, offload):
    run = train_procs(make_config(f"{strategy}-{method}-offload{offload}", method=method, eval__every_steps=0,
                                  distributed__strategy=strategy, distributed__cpu_offload=offload))
    assert losses(run) == pytest.approx(losses(single[method]), abs=1e-5)
    if strategy == "fsdp":  # the NF4 codes and scales of QLoRA's base are sharded too
        alone = json.loads((single[method] / "memory.json").read_text())["ranks"][0]
        for rank in json.loads((run / "memory.json").read_text())["ranks"]:
            assert rank["weight_bytes"] / alone["weight_bytes"] == pytest.approx(0.5, abs=0.02), (rank, alone)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_checkpoint_of_two_processes_resumes_in_one_and_the_other_way(make_config, single, method):
    ref = losses(single[method])
    two = train_procs(make_config(f"two-to-one-{method}", method=method, distributed__strategy="fsdp"))
    checkpoint = ckpt.checkpoints(two)[-1]
    assert checkpoint.name == "step-000005" and (checkpoint / ckpt.STATE_DIR).is_dir()
    one = load_config(make_config(f"one-from-two-{method}", method=method, checkpoint__resume=str(checkpoint)))
    sft.main(one)
    got = losses(Path(one.output_dir))
    assert sorted(got) == list(range(6, STEPS + 1)) and got == pytest.approx({s: ref[s] for s in got}, abs=1e-5)
    start = single[method] / "checkpoints" / "step-000005"
    back = train_procs(make_config(f"two-from-one-{method}", method=method, distributed__strategy="fsdp",
                                   checkpoint__resume=str(start)))
    got = losses(back)
    assert sorted(got) == list(range(6, STEPS + 1)) and got == pytest.approx({s: ref[s] for s in got}, abs=1e-5)


def test_activation_checkpointing_under_fsdp_gives_the_same_losses(make_config, single):
    run = train_procs(make_config("fsdp-ac", method="full", distributed__strategy="fsdp",
                                  activation_checkpointing=True, activation_checkpointing_every=2))
    assert losses(run) == pytest.approx(losses(single["full"]), abs=1e-5)


FAULT = '''
import os
from lmforge.train.recipes import sft

step = sft.train_step
calls = []

def failing_step(*args, **kwargs):
    calls.append(1)
    if os.environ.get("RANK") == "1" and len(calls) == 3:
        raise RuntimeError("injected failure in rank 1 at step 3")
    return step(*args, **kwargs)

sft.train_step = failing_step
'''


def test_an_exception_in_one_rank_stops_the_job_with_its_message(make_config, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(FAULT)  # imported by every Python process started below
    path = make_config("fault", max_steps=50, checkpoint__every_steps=2)
    started = time.monotonic()
    done = run_procs(path, env={"PYTHONPATH": [str(tmp_path)]}, timeout=120)
    assert done.returncode != 0
    assert "injected failure in rank 1 at step 3" in done.stdout + done.stderr
    assert "rank 1 failed first (exit code 1)" in done.stderr
    assert time.monotonic() - started < 60
    run = Path(load_config(path).output_dir)
    assert [p.name for p in ckpt.checkpoints(run)] == ["step-000002"]  # the last complete checkpoint stays valid
    sft.main(load_config(path, ["max_steps=4"]))  # and resumes
    assert sorted(losses(run)) == [1, 2, 3, 4]


def test_the_world_comes_from_torchrun_or_slurm():
    assert world_from_env({}) == SINGLE
    assert world_from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) == \
        World(1, 4, 1, 2)
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "2(x2)",
             "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    assert world_from_env(slurm) == World(3, 4, 1, 2)
    assert world_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == SINGLE  # a plain sbatch job
    with pytest.raises(LmforgeError, match="MASTER_ADDR and MASTER_PORT is not set"):
        world_from_env({k: v for k, v in slurm.items() if not k.startswith("MASTER")})
    with pytest.raises(LmforgeError, match="RANK=4 is not within WORLD_SIZE=4"):
        world_from_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_a_batch_that_does_not_split_over_the_processes_fails_before_they_start(make_config, capsys):
    from lmforge.cli import main as cli_main

    assert cli_main(["train", str(make_config("uneven", batch_size=6, micro_batch_size=2)), "--nproc", "2"]) == 2
    assert "batch_size (6) must be a multiple of micro_batch_size x processes (2 x 2)" in capsys.readouterr().err


def test_config_check_plans_per_process(make_config, capsys, tmp_path):
    """The plan of a Llama-3.1-8B-shaped model (its config.json alone: the plan loads no weights)."""
    from lmforge.cli import main as cli_main

    shape = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
             "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
             "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(shape))

    def plan(*args: str) -> dict[str, str]:
        config = make_config("plan", method="full")
        assert cli_main(["config", "check", str(config), f"model.path={tmp_path}", *args]) == 0
        lines = capsys.readouterr().out.splitlines()
        return {line.split(":")[0]: line for line in lines if ":" in line}

    alone, ddp, fsdp = plan(), plan("distributed.strategy=ddp", "--nproc", "2"), plan(
        "distributed.strategy=fsdp", "--nproc", "2")
    assert "gradient accumulation 2 x 2 processes (fsdp; per-process plan below)" in fsdp["recipe"]
    assert ddp["weights"] == alone["weights"]

    def gib(line: str) -> float:
        return float(line.split(": ")[1].split()[0])

    for key in ("weights", "gradients", "optimizer state"):
        assert gib(alone[key]) > 10 and gib(fsdp[key]) == pytest.approx(gib(alone[key]) / 2, abs=0.006), key


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_dpo_in_two_processes_reaches_the_single_process_losses(tmp_path, tiny_chat_model, strategy):
    """Full-parameter DPO (reference log-probs precomputed, each rank computing a share): per-pair terms and metrics
    summed over both ranks' pairs give the single process's losses and validation metrics."""
    make = config_maker(tmp_path, tiny_chat_model, slice(0, 32), slice(32, 37), pairs=True, method="full",
                        data__packing=False, micro_batch_size=1, batch_size=4, max_steps=4, threads=1,
                        eval__every_steps=4, optimizer__lr=1e-3, preference__rpo_alpha=0.5)
    assert_two_processes_match_one(make, strategy, ("loss", "rewards/", "logps/", "val_"))


def assert_two_processes_match_one(make, strategy: str, prefixes: tuple[str, ...]) -> None:
    """A 4-step run with validation at the end, in one process and in two under `strategy`: every logged metric
    whose name starts with one of `prefixes` agrees within 1e-5."""
    cfg = load_config(make("single"))
    sft.main(cfg)
    run = train_procs(make(strategy, distributed__strategy=strategy))
    want, got = metrics(Path(cfg.output_dir)), metrics(run)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4, 4]
    for a, b in zip(want, got, strict=True):
        for name, value in a.items():
            if name.startswith(prefixes):
                assert b[name] == pytest.approx(value, abs=1e-5, rel=1e-5), (a["step"], name)
