"""The online-RL recipe (`recipe: grpo`) on a tiny random Llama with SmolLM2's tokenizer: runs write TRL's metrics
and completions, the rollouts come from the live weights, a step split over micro-batches equals one batch, a
killed run resumes with the same rewards and losses, and bad configs, rows and reward functions are refused in one
sentence."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from lmforge import kernels
from lmforge.cli import main as cli_main
from lmforge.config import load_config
from lmforge.data.prompts import load_prompts
from lmforge.data.tasks import arithmetic
from lmforge.errors import LmforgeError
from lmforge.layers.attention import AttnMeta
from lmforge.train.model import build_trainable
from lmforge.train.preference import token_logps
from lmforge.train.recipes import grpo, sft
from tests.train_refs import metrics, train_until_killed
from tests.unit.test_train_distributed import train_procs
from tests.unit.test_train_step import KeepGrads

SAMPLING = {"grpo__temperature": 0.8, "grpo__top_p": 0.95, "grpo__top_k": 40}  # the processed distribution


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
                                                                                       "buffer": 8}},
                                    {"name": "tests.unit.test_grpo_recipe:small_ids", "weight": 0.3}]},
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


def build(config: Path):
    cfg = load_config(config)
    torch.manual_seed(cfg.seed)
    model, tokenizer, _ = build_trainable(cfg, torch.device("cpu"))
    prompts = load_prompts(cfg.data.train, "data.train", cfg.data, tokenizer, 64)
    return cfg, model, grpo.Rollouts(cfg, model, tokenizer, prompts, sft_world(), torch.device("cpu"), None)


def sft_world():
    from lmforge.train import dist

    return dist.SINGLE


def test_a_run_logs_rewards_losses_and_completions(make_config, tmp_path):
    """Every step's metrics (TRL's names), the held-out reward before training and at each evaluation, the rollouts'
    completions, the adapter; after every weight sync the engine's log-probs of its sampled tokens (under
    temperature, top-p and top-k) are the training forward's."""
    config = make_config("run", grpo__beta=0.04, grpo__rollout_batch_size=16, **SAMPLING)
    assert cli_main(["train", str(config)]) == 0
    records = metrics(tmp_path / "run")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    first = steps[0]
    for key in ("reward", "reward_std", "rewards/exact_answer/mean", "rewards/length_penalty/mean", "kl", "entropy",
                "clip_ratio/region_mean", "sampling/logp_diff_mean", "completions/mean_length",
                "rollout/tokens_per_s", "update/tokens_per_s"):
        assert key in first, key
    assert "reward" in steps[2] and "reward" not in steps[1]  # two steps per rollout
    for r in steps:
        assert r["sampling/logp_diff_mean"] < 1e-4, r  # the engine's log-probs are the trainer's, every step
    evals = [r for r in records if "val_reward" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    lines = (tmp_path / "run" / "completions.jsonl").read_text().splitlines()
    assert len(lines) == 16 and set(json.loads(lines[0])) >= {"prompt", "completion", "rewards", "advantage"}
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()
    assert cli_main(["plot", str(tmp_path / "run")]) == 0  # with its reward panel
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000


def test_schema_refuses_configs_it_cannot_run(make_config):
    with pytest.raises(Exception, match="multiple of grpo.num_generations"):
        load_config(make_config("a", grpo__rollout_batch_size=12))
    with pytest.raises(Exception, match="format: prompt"):
        load_config(make_config("b", recipe="sft"))
    with pytest.raises(Exception, match="must exceed grpo.max_completion_length"):
        load_config(make_config("c", data__max_seq_len=12))
    with pytest.raises(Exception, match="bitwise_logprobs runs float32"):
        load_config(make_config("d", grpo__bitwise_logprobs=True, precision="bf16-mixed"))
    for name, bad in (("e", {"lora__dropout": 0.1}), ("g", {"lora__dora": True})):
        with pytest.raises(Exception, match="bitwise_logprobs needs lora.dropout 0"):
            load_config(make_config(name, grpo__bitwise_logprobs=True, **bad))
    assert load_config(make_config("f", grpo__bitwise_logprobs=True, precision="auto")).on_device(
        torch.device("cpu")).precision == "fp32"


def test_a_rollout_after_a_weight_change_samples_from_the_new_weights(make_config):
    """The engine serves the live parameters: after one layer changes in place, the same seeded requests sample
    other completions, and their log-probs are the changed model's training forward's (processed distribution)."""
    cfg, model, rollouts = build(make_config("live", **SAMPLING))
    rows = rollouts.prompts[:3]
    before = rollouts.sample(rows, [1, 2, 3], 2)
    assert [s.completion_ids for s in rollouts.sample(rows, [1, 2, 3], 2)] == [s.completion_ids for s in before]
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.base_layer.weight.mul_(3.0)
    after = rollouts.sample(rows, [1, 2, 3], 2)
    assert [s.completion_ids for s in after] != [s.completion_ids for s in before]
    micro = grpo.micro_batch(after, torch.device("cpu"))
    b = micro.batch
    with torch.no_grad():
        hidden = model(b.input_ids, b.positions, AttnMeta.for_training(b.cu_seqlens, b.prefix_lens))
        trainer = token_logps(model, hidden, b.labels, rollouts.sampling)
    torch.testing.assert_close(trainer, micro.sampled, atol=1e-4, rtol=0)


def test_bitwise_mode_refuses_kernels_without_the_invariant_product(make_config, tmp_path, capsys):
    """The portable build (ARM and other CPUs) has no batch-invariant float32 product: one sentence, exit 2."""
    with kernels.level("portable"):
        assert cli_main(["train", str(make_config("portable", grpo__bitwise_logprobs=True))]) == 2
    assert "batch-invariant float32 product" in capsys.readouterr().err
    assert not (tmp_path / "portable" / "metrics.jsonl").exists()


@pytest.mark.parametrize("sampling", [{}, SAMPLING])
def test_entropy_is_the_tempered_policys(make_config, sampling):
    """The logged entropy per completion token is that of softmax(logits / temperature) (TRL's), from the fused
    head (temperature 1) and from the chunked processed path alike."""
    cfg, model, rollouts = build(make_config("entropy", **sampling))
    micro = grpo.micro_batch(rollouts.sample(rollouts.prompts[:3], [1, 2, 3], 2), torch.device("cpu"))
    b = micro.batch
    hidden = model(b.input_ids, b.positions, AttnMeta.for_training(b.cu_seqlens, b.prefix_lens))
    entropies = torch.full((len(micro.sampled),), float("nan"))
    token_logps(model, hidden, b.labels, rollouts.sampling, entropies)
    logits = model.logits(hidden[b.labels != -100]).detach() / cfg.grpo.temperature
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropies, expected, atol=1e-5, rtol=1e-5)


BITWISE_LEVELS = [level for level in kernels.levels() if level != "portable"]  # those with linear_f32


@pytest.mark.parametrize("level", BITWISE_LEVELS)
@pytest.mark.parametrize("method", ["lora", "full"])
def test_bitwise_mode_gives_the_engine_log_probs_bit_for_bit(make_config, method, level):
    """grpo.bitwise_logprobs at 2 threads, on every kernel level that has the batch-invariant float32 product (an
    AVX512 host runs the AVX2 path too): the engine's log-probs of its sampled tokens (temperature, top-p, top-k)
    equal the training forward's exactly, with autograd recording as in a step, before and after the weights
    change; the gradient through the kernel attention is torch's (1e-5)."""
    torch.set_num_threads(2)
    with kernels.level(level), kernels.bitwise():
        cfg, model, rollouts = build(make_config("bitwise", method=method, grpo__bitwise_logprobs=True, **SAMPLING))
        rows = rollouts.prompts[:4]
        for _ in range(2):  # before and after a change of the weights
            micro = grpo.micro_batch(rollouts.sample(rows, [1, 2, 3, 4], 3), torch.device("cpu"))
            b = micro.batch
            meta = AttnMeta.for_training(b.cu_seqlens, b.prefix_lens)
            trainer = token_logps(model, model(b.input_ids, b.positions, meta), b.labels, rollouts.sampling)
            assert trainer.requires_grad and len(trainer) > 40
            assert torch.equal(trainer, micro.sampled), (trainer - micro.sampled).abs().max()
            params = [p for p in model.parameters() if p.requires_grad]
            grads = torch.autograd.grad(trainer.sum(), params)
            with kernels.disabled():  # torch's attention and products
                eager = token_logps(model, model(b.input_ids, b.positions, meta), b.labels, rollouts.sampling)
                expected = torch.autograd.grad(eager.sum(), params)
            torch.testing.assert_close(trainer, eager, atol=1e-4, rtol=0)
            for got, want in zip(grads, expected, strict=True):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
            with torch.no_grad():  # a step's worth of change to every trained weight
                for p in params:
                    p.add_(torch.randn_like(p) * 0.02)


@pytest.mark.parametrize("overrides", [{}, {"grpo__loss": "grpo", "grpo__beta": 0.1, "method": "full"},
                                       {"grpo__loss": "dr_grpo", "grpo__num_iterations": 2},
                                       {"grpo__loss": "bnpo", "grpo__advantage": "rloo"}])
def test_a_step_split_into_micro_batches_equals_one_batch(make_config, overrides):
    cfg, model, rollouts = build(make_config("split", micro_batch_size=2, **overrides))
    steps, _, _ = rollouts.collect(0)
    window = steps[0]
    assert len(window) == 4
    objective = grpo.GRPOObjective(cfg, model)
    with torch.no_grad():  # move off the sampling weights so that ratios, clipping and the KL are not trivial
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    opt = KeepGrads([p for p in model.parameters() if p.requires_grad])
    joined = grpo.micro_batch([s for m in window for s in m.sequences], torch.device("cpu"))
    joined.old = None if window[0].old is None else torch.cat([m.old for m in window])
    joined.ref = None if window[0].ref is None else torch.cat([m.ref for m in window])
    with kernels.bitwise():  # batch-invariant products on every CPU (MKL's are not): only the normalisation differs
        small, _ = sft.train_step(model, window, cfg, opt, None, objective=objective)
        small_grads = opt.seen
        big, _ = sft.train_step(model, [joined], cfg, opt, None, objective=objective)
    assert small.keys() == big.keys()
    for name in small:
        assert small[name] == pytest.approx(big[name], rel=1e-6, abs=1e-6), name
    for a, b in zip(small_grads, opt.seen, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert max(g.abs().max() for g in small_grads) > 0


def test_a_killed_run_resumes_with_the_same_rewards_and_losses(make_config, tmp_path):
    settings = {"max_steps": 8, "eval__every_steps": 0, "checkpoint__every_steps": 2, "lora__dropout": 0.1,
                **SAMPLING}
    grpo.main(load_config(make_config("baseline", **settings)))
    killed = make_config("killed", **settings)
    done = train_until_killed(killed, tmp_path / "killed", 5)
    assert 5 <= done < 8
    grpo.main(load_config(killed))
    want, got = metrics(tmp_path / "baseline"), metrics(tmp_path / "killed")
    assert [r["step"] for r in got if "loss" in r] == list(range(1, 9))
    for a, b in zip([r for r in want if "loss" in r], [r for r in got if "loss" in r], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6) and b["reward"] == a["reward"], a["step"]


def test_two_processes_reach_the_single_process_losses(make_config):
    settings = {"micro_batch_size": 2, "threads": 1, "grpo__beta": 0.05, "grpo__rollout_batch_size": 16,
                "eval__every_steps": 4, **SAMPLING}
    single = load_config(make_config("single", **settings))
    grpo.main(single)
    run = train_procs(make_config("ddp", distributed__strategy="ddp", **settings))
    want, got = metrics(Path(single.output_dir)), metrics(run)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(want, got, strict=True):
        for name, value in a.items():
            if name.startswith(("loss", "reward", "kl", "clip_ratio", "val_", "completions/")):
                assert b[name] == pytest.approx(value, abs=1e-5, rel=1e-5), (a["step"], name)


def small_ids(completion_ids, **_):
    """A reward a random tiny model's completions differ in (exact answers are all 0 for it): the share of token ids
    below 25,000."""
    return [sum(t < 25_000 for t in ids) / len(ids) for ids in completion_ids]


def boom(prompts, completions, answer, **_):
    return [1.0 if a != "7" else 1 / 0 for a in answer]


def short(completions, **_):
    return [1.0] * (len(completions) - 1)


def test_bad_reward_functions_and_rows_stop_the_run_with_their_place(make_config, tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}], "answer": "7"})
                                          + "\n" + (tmp_path / "train.jsonl").read_text())
    config = make_config("bad", grpo__rewards=[{"name": "tests.unit.test_grpo_recipe:boom"}])
    with pytest.raises(LmforgeError, match=r"reward function tests.unit.test_grpo_recipe:boom raised "
                                           r"ZeroDivisionError.*train.jsonl:1\)"):
        grpo.main(load_config(config))
    with pytest.raises(LmforgeError, match=r"short returned \d+ values for \d+ completions \(rows .*val.jsonl:1 to"):
        grpo.main(load_config(make_config("short", grpo__rewards=[{"name": "tests.unit.test_grpo_recipe:short"}])))
    with pytest.raises(LmforgeError, match="grpo.rewards.0: cannot import nowhere:thing"):
        grpo.main(load_config(make_config("missing", grpo__rewards=[{"name": "nowhere:thing"}])))
    with pytest.raises(LmforgeError, match="regex_format does not take args"):
        grpo.main(load_config(make_config("args", grpo__rewards=[{"name": "regex_format", "args": {"x": 1}}])))
    (tmp_path / "train.jsonl").write_text("{\"prompt\": 3}\n" + (tmp_path / "train.jsonl").read_text())
    with pytest.raises(LmforgeError, match=r"train.jsonl:1: .*prompt"):
        grpo.main(load_config(make_config("strict", data__strict=True)))


def test_a_groups_shared_prompt_runs_once_and_changes_nothing(make_config):
    """Completions of one prompt laid out with the prompt once (the rest attend to it) give the log-probs and
    gradients of whole prompt + completion documents."""
    cfg, model, rollouts = build(make_config("shared"))
    sequences = rollouts.sample(rollouts.prompts[:2], [5, 6], 3)
    shared = grpo.micro_batch(sequences, torch.device("cpu"))
    whole = grpo.micro_batch([dataclasses.replace(s, row=dataclasses.replace(s.row)) for s in sequences],
                             torch.device("cpu"))
    assert whole.batch.prefix_lens is None and shared.batch.prefix_lens.tolist().count(0) == 2
    assert shared.batch.num_tokens < whole.batch.num_tokens - 3 * len(sequences[0].row.token_ids)

    def logps_and_grads(micro):
        b = micro.batch
        hidden = model(b.input_ids, b.positions, AttnMeta.for_training(b.cu_seqlens, b.prefix_lens))
        logps = token_logps(model, hidden, b.labels, rollouts.sampling)
        params = [p for p in model.parameters() if p.requires_grad]
        return logps.detach(), torch.autograd.grad((logps * torch.linspace(-1, 1, len(logps))).sum(), params)

    a, grads_a = logps_and_grads(shared)
    b, grads_b = logps_and_grads(whole)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for x, y in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_config_check_plans_the_rollout_kv_pool_and_the_full_reference(make_config, capsys, method):
    from lmforge.models.config import read_config
    from lmforge.train.plan import memory_plan

    path = make_config("plan", method=method, grpo__beta=0.1, grpo__kv_cache_memory=0.25)
    assert cli_main(["config", "check", str(path)]) == 0
    out = capsys.readouterr().out
    cfg = load_config(path)
    plan = memory_plan(cfg, read_config(cfg.model.path))
    assert plan.kv_cache_bytes == 0.25 * 2**30 and "rollout KV cache: 0.25 GiB" in out
    assert plan.reference_bytes == (plan.parameters * 4.0 if method == "full" else 0)
    # the pool and the step's activations take turns
    assert plan.total_bytes == pytest.approx(plan.weight_bytes + plan.grad_bytes + plan.optimizer_bytes
                                             + plan.reference_bytes + max(plan.activation_bytes, plan.kv_cache_bytes))
