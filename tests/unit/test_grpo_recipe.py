"""The online-RL recipe (`recipe: grpo`) on a tiny random Llama with SmolLM2's tokenizer: runs write TRL's metrics
and completions, the rollouts come from the live weights, a step split over micro-batches equals one batch, a
killed run resumes with the same rewards and losses, and bad configs, rows and reward functions are refused in one
sentence."""

import json
from pathlib import Path

import pytest
import yaml

from lmforge.cli import main as cli_main
from lmforge.config import load_config
from lmforge.data.tasks import arithmetic
from tests.train_refs import metrics


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def make_config(tmp_path, tiny_chat_model):
    write_rows(tmp_path / "train.jsonl", arithmetic(24, seed=0, max_operand=9))
    write_rows(tmp_path / "val.jsonl", arithmetic(6, seed=1, max_operand=9))

    def make(name: str = "run", **overrides) -> Path:
        cfg = {"recipe": "grpo", "model": {"path": str(tiny_chat_model)}, "method": "lora",
               "lora": {"rank": 4, "alpha": 8, "target_modules": "all-linear"},
               "data": {"train": [{"path": "train.jsonl", "format": "prompt"}],
                        "validation": [{"path": "val.jsonl", "format": "prompt"}], "max_seq_len": 96},
               "grpo": {"num_generations": 4, "max_completion_length": 12, "kv_cache_memory": 0.05,
                        "rewards": [{"name": "exact_answer"},
                                    {"name": "length_penalty", "weight": 0.5, "args": {"max_length": 12,
                                                                                       "buffer": 8}}]},
               "micro_batch_size": 4, "batch_size": 8, "max_steps": 4, "threads": 2, "optimizer": {"lr": 1e-2},
               "precision": "fp32", "output_dir": str(tmp_path / name), "eval": {"every_steps": 2}}
        for key, value in overrides.items():
            node = cfg
            *parents, leaf = key.split("__")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return make


def test_a_run_logs_rewards_losses_and_completions(make_config, tmp_path):
    config = make_config("run", grpo__beta=0.04)
    assert cli_main(["train", str(config)]) == 0
    records = metrics(tmp_path / "run")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    first = steps[0]
    for key in ("reward", "reward_std", "rewards/exact_answer/mean", "rewards/length_penalty/mean", "kl",
                "clip_ratio/region_mean", "sampling/logp_diff_mean", "completions/mean_length",
                "rollout/tokens_per_s", "update/tokens_per_s"):
        assert key in first, key
    assert first["sampling/logp_diff_mean"] < 1e-4  # the engine's log-probs are the trainer's
    evals = [r for r in records if "val_reward" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    lines = (tmp_path / "run" / "completions.jsonl").read_text().splitlines()
    assert len(lines) == 8 and set(json.loads(lines[0])) >= {"prompt", "completion", "rewards", "advantage"}
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()


def test_schema_refuses_configs_it_cannot_run(make_config):
    with pytest.raises(Exception, match="multiple of grpo.num_generations"):
        load_config(make_config("a", grpo__rollout_batch_size=10))
    with pytest.raises(Exception, match="format: prompt"):
        load_config(make_config("b", recipe="sft"))
    with pytest.raises(Exception, match="must exceed grpo.max_completion_length"):
        load_config(make_config("c", data__max_seq_len=12))
