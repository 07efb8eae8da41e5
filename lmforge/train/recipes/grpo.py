"""Online RL (`recipe: grpo`): GRPO, Dr. GRPO, DAPO, BNPO and RLOO advantages, with rollouts sampled by the
in-process engine from the very model being trained (no copy, no merge, no second server).

Each rollout: the engine wakes (KV pool allocated, derived weights taken from the current parameters, prefix cache
empty), samples grpo.num_generations completions for each of the rollout's prompts (each request seeded from the
run's seed and the rollout's number, so a resumed run samples the same completions), and sleeps again (KV freed for
training). The reward functions score them (train/rewards.py), advantages are normalised per group
(train/grpo.py group_advantages), and the rollout's completions are shuffled and cut into
rollout_batch_size / batch_size optimizer steps, each run num_iterations times. The steps run in SFT's loop
(recipes/sft.py train_step) with this recipe's objective: the policy's log-probs of the completion tokens come from
one flat packed batch per micro-batch, the loss is train/grpo.py grpo_loss over the whole step's denominators.

Log-probs the loss compares with: the sampler's own (the engine returns each sampled token's log-prob), the old
policy's (a no-grad pass right after the rollout when a rollout feeds several updates; otherwise the step's own
forward, detached, which is the same weights) and the reference's (beta > 0: adapters off under LoRA, a frozen copy
in full runs). Their gap, trainer vs sampler, is logged every step (sampling/logp_diff) and corrects the loss
(grpo.importance_sampling_mode).
"""

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge import kernels
from lmforge.config import TrainConfig, dump_config
from lmforge.data import IGNORE_INDEX, Batch
from lmforge.data.prompts import PromptRow, load_prompts
from lmforge.engine.llm import LLM
from lmforge.engine.sampling_params import SamplingParams
from lmforge.errors import LmforgeError
from lmforge.layers.attention import AttnMeta
from lmforge.layers.lora import lora_disabled
from lmforge.models import build_model
from lmforge.train import checkpoint as ckpt
from lmforge.train import dist
from lmforge.train.grpo import DROPPED, Denominators, GRPOSettings, group_advantages, grpo_loss, sampler_correction
from lmforge.train.log import MetricsLog, NoMetrics, require_backends
from lmforge.train.model import build_trainable, gathered_weights, save_trainable
from lmforge.train.optim import build_optimizer, build_scheduler
from lmforge.train.preference import token_logps
from lmforge.train.recipes.sft import _due, _resume_from, _save_model_dir, in_world, train_step
from lmforge.train.rewards import build_rewards, score

log = logging.getLogger("lmforge")
SEED_STRIDE = 1_000_003  # rollout r, prompt i: seed + r * SEED_STRIDE + i * num_generations (+ the sample's index)


def main(cfg: TrainConfig) -> Path:
    """Trains as configured; returns the directory of the final adapter or model."""
    return in_world(cfg, _train_bitwise if cfg.grpo.bitwise_logprobs else _train)


def _train_bitwise(cfg: TrainConfig, world: dist.World, device: torch.device) -> Path:
    """_train with the engine's and the trainer's forwards on the same kernels (kernels.bitwise): the sampler's
    log-probs of its tokens are the trainer's, bit for bit."""
    ops = kernels.available(device)
    if ops is None or not ops.linear_f32_available():
        raise LmforgeError("grpo.bitwise_logprobs runs lmforge's CPU kernels in the engine and in training: it needs "
                           "device cpu with the kernels on (LMFORGE_KERNELS unset, a C++ compiler) and their "
                           "batch-invariant float32 product (an x86-64 CPU with AVX2 and FMA)")
    with kernels.bitwise():
        return _train(cfg, world, device)


def settings_of(cfg: TrainConfig) -> GRPOSettings:
    g = cfg.grpo
    return GRPOSettings(g.loss, g.beta, g.epsilon, g.epsilon_high, g.delta, g.kl_bias_correction,
                        g.importance_sampling_mode, g.importance_sampling_clip_min, g.importance_sampling_clip_max,
                        g.max_completion_length)


def sampling_of(cfg: TrainConfig) -> SamplingParams:
    """The rollouts' sampling: the engine returns each token's log-prob under this processed distribution, and
    the trainer computes its own under the same one."""
    g = cfg.grpo
    return SamplingParams(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, min_p=g.min_p,
                          max_tokens=g.max_completion_length, logprobs=0)


@dataclass
class Sequence:
    """One sampled completion with what the loss needs of it."""

    row: PromptRow
    completion_ids: list[int]
    text: str
    sampled_logps: list[float]
    finish_reason: str
    rewards: list[float] = field(default_factory=list)
    advantage: float = 0.0


@dataclass
class MicroBatch:
    """A flat packed batch of whole sequences (prompt + completion) and per-token tensors over their completion
    tokens, in the order token_logps returns them."""

    sequences: list[Sequence]
    batch: Batch
    seq_tokens: torch.Tensor  # [S] completion tokens per sequence
    seq_index: torch.Tensor  # [N] each completion token's sequence
    advantages: torch.Tensor  # [S]
    sampled: torch.Tensor  # [N] the sampler's log-probs
    old: torch.Tensor | None = None  # [N] the old policy's (None: this step's forward, detached)
    ref: torch.Tensor | None = None  # [N] the reference's

    @property
    def input_ids(self) -> torch.Tensor:  # train_step reads the device from it
        return self.batch.input_ids


def micro_batch(sequences: list[Sequence], device: torch.device) -> MicroBatch:
    """Consecutive completions of one prompt share it: the first holds prompt + completion, each next one only the
    prompt's last token and its completion, attending to the first one's prompt (Batch.prefix_lens), so a group's
    prompt runs through the model once (the same losses and gradients as whole documents)."""
    ids, labels, positions, lens, prefixes, completion = [], [], [], [], [], []
    owner = None
    for s in sequences:
        prompt, done = s.row.token_ids, s.completion_ids
        shared = owner is s.row
        owner = s.row
        start = len(prompt) - 1 if shared else 0
        tokens = prompt[start:] + done
        ids += tokens
        labels += [IGNORE_INDEX] * (len(prompt) - 1 - start) + done + [IGNORE_INDEX]  # position t predicts t + 1
        positions += range(start, start + len(tokens))
        lens.append(len(tokens))
        prefixes.append(start)
        completion.append(len(done))
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    tensor = lambda x, dtype=torch.long: torch.tensor(x, dtype=dtype, device=device)  # noqa: E731
    prefix_lens = tensor(prefixes, torch.int32) if any(prefixes) else None
    batch = Batch(tensor(ids), tensor(positions), cu.to(device), tensor(labels), sum(completion), prefix_lens)
    seq_tokens = tensor(completion)
    return MicroBatch(sequences, batch, seq_tokens,
                      torch.repeat_interleave(torch.arange(len(sequences), device=device), seq_tokens),
                      tensor([s.advantage for s in sequences], torch.float32),
                      tensor([lp for s in sequences for lp in s.sampled_logps], torch.float32))


class GRPOObjective:
    """train_step's objective over one optimizer step of a rollout (see the module doc)."""

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module):
        self.settings = settings_of(cfg)
        self.model = model
        self.sampling = sampling_of(cfg)
        self.rollout_tokens_per_step = 1.0  # set per rollout (dapo's denominator)

    def totals(self, window: list[MicroBatch]) -> list[float]:
        return [sum(len(m.seq_tokens) for m in window), sum(m.batch.num_trained_tokens for m in window)]

    def loss(self, runner, micro: MicroBatch, totals: list[float]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = micro.batch
        hidden = runner(batch.input_ids, batch.positions, AttnMeta.for_training(batch.cu_seqlens, batch.prefix_lens))
        entropies = torch.empty(len(micro.sampled))
        logps = token_logps(self.model, hidden, batch.labels, self.sampling, entropies)
        old = micro.old if micro.old is not None else logps.detach()
        correction = sampler_correction(self.settings, old, micro.sampled, micro.seq_index, len(micro.seq_tokens))
        step = Denominators(int(totals[0]), int(totals[1]), self.rollout_tokens_per_step)
        out = grpo_loss(self.settings, logps, micro.seq_index, micro.seq_tokens, micro.advantages, step,
                        old_logps=micro.old, ref_logps=micro.ref, correction=correction)
        stats = {name: float(value) for name, value in out.sums.items()}
        stats["loss"] = out.loss.item()
        both = (old > DROPPED) & (micro.sampled > DROPPED)  # the trainer and the sampler both kept the token
        stats["logp_diff"] = float(((old - micro.sampled).abs() * both).sum())
        stats["entropy"] = float(entropies.sum())
        return out.loss, stats

    def summary(self, sums: dict[str, float], totals: list[float]) -> dict[str, float]:
        tokens = max(sums.get("tokens", 0.0), 1.0)
        out = {"loss": sums["loss"], "tokens": int(totals[1]), "sampling/logp_diff_mean": sums["logp_diff"] / tokens,
               "sampling/dropped_ratio": sums["dropped"] / tokens, "entropy": sums["entropy"] / tokens}
        for name in ("low", "high", "region"):
            out[f"clip_ratio/{name}_mean"] = sums[f"clipped_{name}"] / tokens
        if "kl" in sums:
            out["kl"] = sums["kl"] / tokens
        return out


class Rollouts:
    """Samples, scores and lays out one rollout at a time on this rank."""

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, tokenizer, prompts: list[PromptRow],
                 world: dist.World, device: torch.device, reference: torch.nn.Module | None):
        g = cfg.grpo
        self.cfg, self.model, self.prompts, self.world, self.device = cfg, model, prompts, world, device
        self.reference = reference
        self.group = g.num_generations
        self.rollout = g.rollout_batch_size or cfg.batch_size
        self.prompts_per_rollout = self.rollout // self.group
        self.prompts_per_step = cfg.batch_size // self.group
        if self.prompts_per_step % world.size:
            raise LmforgeError(f"batch_size / grpo.num_generations = {self.prompts_per_step} prompts per optimizer "
                               f"step do not split over {world.size} processes (each rank trains whole groups)")
        if self.prompts_per_rollout > len(prompts):
            raise LmforgeError(f"a rollout takes {self.prompts_per_rollout} prompts; data.train has {len(prompts)}")
        self.steps = self.rollout // cfg.batch_size  # optimizer steps per pass over a rollout
        self.sampling = sampling_of(cfg)
        self.rewards = build_rewards(g.rewards)
        self.llm = LLM(model=model, tokenizer=tokenizer, kv_cache_memory=g.kv_cache_memory,
                       max_model_len=cfg.data.max_seq_len, seed=cfg.seed, device=device.type,
                       logprobs_mode="processed_logprobs", step_graphs=False)  # batches shrink step by step
        self.llm.engine.sleep()
        self.per_epoch = len(prompts) // self.prompts_per_rollout

    def prompt_indices(self, number: int) -> list[list[int]]:
        """Rollout `number`'s prompts on this rank, per optimizer step: epoch e's seeded order cut into rollouts (a
        short tail is dropped), each rollout into steps of batch_size / num_generations prompts, each step's prompts
        split over the ranks. The steps see the same groups in one process or several."""
        epoch, index = divmod(number, self.per_epoch)
        order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
        chosen = order[index * self.prompts_per_rollout:(index + 1) * self.prompts_per_rollout].tolist()
        per_step, rank, size = self.prompts_per_step, self.world.rank, self.world.size
        return [chosen[start:start + per_step][rank::size] for start in range(0, len(chosen), per_step)]

    def sample(self, rows: list[PromptRow], seeds: list[int], n: int) -> list[Sequence]:
        params = [dataclasses.replace(self.sampling, n=n, seed=seed) for seed in seeds]
        engine = self.llm.engine
        engine.wake()
        try:
            outputs = self.llm.generate([{"prompt_token_ids": r.token_ids} for r in rows], params, use_tqdm=False)
        finally:
            engine.sleep()
        sequences = []
        for row, out in zip(rows, outputs, strict=True):
            for c in out.outputs:
                logps = [next(iter(step.values())).logprob for step in c.logprobs]
                sequences.append(Sequence(row, list(c.token_ids), c.text, logps, c.finish_reason))
        return sequences

    def score(self, sequences: list[Sequence]) -> torch.Tensor:
        """[sequences, functions] rewards; each sequence's weighted sum stored on it."""
        completions = [s.text if isinstance(s.row.prompt, str) else [{"role": "assistant", "content": s.text}]
                       for s in sequences]
        table = score(self.rewards, [s.row.prompt for s in sequences], completions,
                      [s.completion_ids for s in sequences], [s.row.columns for s in sequences],
                      [str(s.row.origin) for s in sequences])
        for s, values in zip(sequences, table.tolist(), strict=True):
            s.rewards = values
        return table

    def collect(self, number: int) -> tuple[list[list[MicroBatch]], dict[str, float], list[Sequence]]:
        """Rollout `number`: this rank's micro-batches of each optimizer step, the rollout's metrics (over all
        ranks) and its sequences."""
        started = time.perf_counter()
        per_step = self.prompt_indices(number)
        indices = [i for step in per_step for i in step]
        seeds = [self.cfg.seed + number * SEED_STRIDE + i * self.group for i in indices]
        sequences = self.sample([self.prompts[i] for i in indices], seeds, self.group)
        sampled_at = time.perf_counter()
        table = self.score(sequences)
        weights = torch.tensor([r.weight for r in self.rewards])
        unscorable = table.isnan().all(1)
        totals = (table.nan_to_num(0.0) * weights).sum(1).masked_fill(unscorable, float("nan"))
        advantages = group_advantages(totals, self.group, self.cfg.grpo.advantage, self._scale())
        for s, a in zip(sequences, advantages.tolist(), strict=True):
            s.advantage = a
        metrics = self._metrics(sequences, table, totals, sampled_at - started)
        size, micro = len(per_step[0]) * self.group, self.cfg.micro_batch_size  # this rank's sequences per step
        steps = [[micro_batch(sequences[start + m:start + m + micro], self.device) for m in range(0, size, micro)]
                 for start in range(0, len(sequences), size)]
        self._prepare(steps)
        metrics["rollout/seconds"] = time.perf_counter() - started
        return steps, metrics, sequences

    def _scale(self) -> str:
        scale = self.cfg.grpo.scale_rewards
        if scale == "batch" and self.world.size > 1:
            raise LmforgeError("grpo.scale_rewards: batch is not supported over several processes yet; use group")
        return scale

    @torch.no_grad()
    @kernels.training_forward()  # the policy's step kernels: the same weights give the same log-probs
    def _prepare(self, steps: list[list[MicroBatch]]) -> None:
        """The old policy's log-probs (when a rollout feeds several updates) and the reference's (beta > 0)."""
        several = self.steps * self.cfg.grpo.num_iterations > 1
        for micro in (m for step in steps for m in step):
            b = micro.batch
            meta = AttnMeta.for_training(b.cu_seqlens, b.prefix_lens)
            if several:
                micro.old = token_logps(self.model, self.model(b.input_ids, b.positions, meta), b.labels,
                                        self.sampling)
            if self.cfg.grpo.beta:
                if self.reference is not None:
                    hidden = self.reference(b.input_ids, b.positions, meta)
                    micro.ref = token_logps(self.reference, hidden, b.labels, self.sampling)
                else:
                    with lora_disabled(self.model):
                        hidden = self.model(b.input_ids, b.positions, meta)
                        micro.ref = token_logps(self.model, hidden, b.labels, self.sampling)

    def _metrics(self, sequences: list[Sequence], table: torch.Tensor, totals: torch.Tensor,
                 seconds: float) -> dict[str, float]:
        """Means over every rank's completions: reward, its std, each function's, completion lengths."""
        lengths = [len(s.completion_ids) for s in sequences]
        sums = [float(totals.nansum()), float((totals.nan_to_num(0.0) ** 2).sum()), float((~totals.isnan()).sum()),
                float(sum(lengths)), float(sum(s.finish_reason == "length" for s in sequences)), float(len(lengths))]
        for j in range(table.shape[1]):
            column = table[:, j]
            sums += [float(column.nansum()), float((~column.isnan()).sum())]
        sums = dist.all_sum(sums, self.world, self.device)
        reward_sum, reward_sq, scored, tokens, truncated, count = sums[:6]
        mean = reward_sum / max(scored, 1)
        out = {"reward": mean, "reward_std": max(reward_sq / max(scored, 1) - mean * mean, 0.0) ** 0.5,
               "completions/mean_length": tokens / max(count, 1),
               "completions/clipped_ratio": truncated / max(count, 1),
               "rollout/tokens_per_s": tokens / max(seconds, 1e-9)}
        for j, reward in enumerate(self.rewards):
            total, n = sums[6 + 2 * j:8 + 2 * j]
            out[f"rewards/{reward.name}/mean"] = total / max(n, 1)
        return out

    def evaluate(self, rows: list[PromptRow]) -> dict[str, float]:
        """Held-out prompts: one completion each at the rollout temperature, seeded; the mean reward per function
        and in all (val_reward)."""
        mine = list(range(self.world.rank, len(rows), self.world.size))
        sequences = self.sample([rows[i] for i in mine], [self.cfg.seed + i for i in mine], 1)
        table = self.score(sequences)
        weights = torch.tensor([r.weight for r in self.rewards])
        sums = [float((table.nan_to_num(0.0) * weights).sum()), float(len(sequences))]
        sums += [float(table[:, j].nansum()) for j in range(table.shape[1])]
        sums = dist.all_sum(sums, self.world, self.device)
        n = max(sums[1], 1)
        out = {"val_reward": sums[0] / n}
        out.update({f"val_rewards/{r.name}": sums[2 + j] / n for j, r in enumerate(self.rewards)})
        return out


def _train(cfg: TrainConfig, world: dist.World, device: torch.device) -> Path:
    run_dir = Path(cfg.output_dir)
    g = cfg.grpo
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    require_backends(cfg.logging.backends if world.is_main else [])
    model, tokenizer, model_dir = build_trainable(cfg, device)
    max_prompt = cfg.data.max_seq_len - g.max_completion_length
    prompts = load_prompts(cfg.data.train, "data.train", cfg.data, tokenizer, max_prompt, cfg.data.max_samples)
    held_out = (load_prompts(cfg.data.validation, "data.validation", cfg.data, tokenizer, max_prompt)
                if cfg.data.validation else None)
    reference = None
    if g.beta and cfg.method == "full":
        dtype = torch.bfloat16 if cfg.precision == "bf16-mixed" else torch.float32
        reference = build_model(model_dir, dtype, device).eval().requires_grad_(False)
    rollouts = Rollouts(cfg, model, tokenizer, prompts, world, device, reference)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    runner, strategy = dist.wrap(model, cfg, world, device)
    updates = rollouts.steps * g.num_iterations  # optimizer steps per rollout
    total_steps = cfg.max_steps or cfg.epochs * rollouts.per_epoch * updates
    log.info("grpo: %d prompts x %d completions per rollout, %d optimizer step%s of %d completions per rollout "
             "(%d pass%s); %d optimizer steps", rollouts.prompts_per_rollout, g.num_generations, updates,
             "s" * (updates > 1), cfg.batch_size, g.num_iterations, "es" * (g.num_iterations > 1), total_steps)
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.scheduler, total_steps)
    objective = GRPOObjective(cfg, model)
    state = {"step": 0}
    if (resume := _resume_from(cfg, run_dir)) is not None:
        saved = ckpt.load_trainer_state(resume)
        ckpt.load_training_state(resume, model, optimizer)
        scheduler.load_state_dict(saved["scheduler"])
        ckpt.set_rng_state(saved["rng"])
        state = saved["progress"]
        log.info("resumed from %s at step %d", resume, state["step"])

    def save_model(out: Path) -> None:
        weights = gathered_weights(model, cfg)
        if world.is_main:
            save_trainable(weights, cfg, model_dir, model.config, out, model)

    def trainer_state() -> dict:
        return {"scheduler": scheduler.state_dict(), "rng": ckpt.rng_state(), "progress": dict(state)}

    metrics = (MetricsLog(run_dir, cfg.logging.backends, cfg.logging.project, cfg.model_dump(mode="json"),
                          total_steps, state["step"]) if world.is_main else NoMetrics())
    runner.train()
    steps: list = []
    rollout_metrics: dict = {}
    try:
        if held_out is not None and state["step"] == 0:
            _evaluate(rollouts, held_out, 0, metrics)
        while state["step"] < total_steps:
            number, within = divmod(state["step"], updates)
            if within == 0:
                steps, rollout_metrics, sequences = rollouts.collect(number)
                tokens = dist.all_sum([sum(m.batch.num_trained_tokens for s in steps for m in s)], world, device)[0]
                objective.rollout_tokens_per_step = tokens / rollouts.steps
                if world.is_main and g.log_completions_every and number % g.log_completions_every == 0:
                    _write_completions(run_dir, number, sequences, rollouts.rewards)
            started = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            result, grad_norm = train_step(model, steps[within % rollouts.steps], cfg, optimizer, None, world,
                                           strategy, runner, objective)
            scheduler.step()
            state["step"] += 1
            step, seconds = state["step"], time.perf_counter() - started
            loss, tokens = result.pop("loss"), result.pop("tokens")
            record = {"loss": loss, "lr": lr, "tokens": tokens, "seconds": seconds, "update/tokens_per_s":
                      tokens / seconds, **({"grad_norm": grad_norm} if grad_norm is not None else {}), **result}
            if within == 0:
                record.update(rollout_metrics)
            if step % cfg.logging.every_steps == 0 or step == total_steps:
                metrics.write(step, record)
            metrics.progress(step, loss, lr, tokens / seconds)
            if held_out is not None and (_due(step, cfg.eval.every_steps) or step == total_steps):
                _evaluate(rollouts, held_out, step, metrics)
            every = cfg.checkpoint.every_steps  # a checkpoint falling due within a rollout waits for its end
            if every and step % updates == 0 and step // every > (step - updates) // every and step < total_steps:
                ckpt.save_checkpoint(run_dir, step, save_model, model, optimizer, trainer_state(),
                                     cfg.checkpoint.keep_last, world.is_main, lambda: dist.barrier(world))
    finally:
        metrics.close()
    final = _save_model_dir(run_dir / "final", save_model, world)
    log.info("run directory: %s; final %s: %s", run_dir, "model" if cfg.method == "full" else "adapter", final)
    return final


def _evaluate(rollouts: Rollouts, held_out: list[PromptRow], step: int, metrics) -> None:
    result = rollouts.evaluate(held_out)
    log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
    metrics.write(step, result)


def _write_completions(run_dir: Path, number: int, sequences: list[Sequence], rewards) -> None:
    names = [r.name for r in rewards]
    with (run_dir / "completions.jsonl").open("a") as f:
        for s in sequences:
            f.write(json.dumps({"rollout": number, "row": str(s.row.origin), "prompt": s.row.prompt,
                                "completion": s.text, "finish_reason": s.finish_reason,
                                "rewards": {n: None if v != v else v for n, v in zip(names, s.rewards, strict=True)},
                                "advantage": s.advantage}) + "\n")
