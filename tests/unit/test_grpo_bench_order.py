"""benchmarks/grpo.py gives TRL the prompts in the order lmforge's recipe trains them: its own computation of that
order must equal the recipe's Rollouts.prompt_indices (one process, one optimizer step per rollout, several epochs)."""

import sys
from pathlib import Path
from types import SimpleNamespace

from lmforge.train.recipes.grpo import Rollouts

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import grpo  # noqa: E402


def test_benchmark_order_is_the_recipes():
    rows, steps = 105, 30  # 13 rollouts per epoch: three epochs, a dropped tail each
    rollouts = SimpleNamespace(per_epoch=rows // grpo.PROMPTS_PER_STEP, prompts=[None] * rows,
                               prompts_per_rollout=grpo.PROMPTS_PER_STEP, prompts_per_step=grpo.PROMPTS_PER_STEP,
                               cfg=SimpleNamespace(seed=grpo.SEED), world=SimpleNamespace(rank=0, size=1))
    recipe = [Rollouts.prompt_indices(rollouts, r)[0] for r in range(steps)]
    assert grpo.lmforge_order(steps, rows) == recipe
    assert recipe[0] != recipe[13] and sorted(recipe[0]) != list(range(8))  # shuffled, and anew per epoch
