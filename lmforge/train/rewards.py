"""Reward functions for online RL (recipe grpo), called as TRL calls them:

    f(prompts=[...], completions=[...], completion_ids=[[...]], **columns) -> list[float | None]

one entry per completion; `columns` holds each other column of the prompt rows as a list (e.g. `answer`), the row
repeated for each of its completions. Completions are strings for string prompts, and [{"role": "assistant",
"content": text}] for message prompts (TRL's conversational format). None marks a completion the function cannot
score; a completion no function scores gets advantage 0.

`grpo.rewards` names built-ins (below) or any callable by import path (`package.module:function`), each with a
weight and keyword arguments bound to it (`args`). A function that raises, or returns the wrong number of values or
a value that is not a number, stops the run with its name and the first row it failed on.
"""

import functools
import importlib
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.config.schema import RewardFunction
from lmforge.errors import LmforgeError

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def completion_text(completion: str | list[dict]) -> str:
    return completion if isinstance(completion, str) else "".join(m.get("content") or "" for m in completion)


def normalised_number(text: str) -> str | None:
    """'1,000' -> '1000', '3.50' -> '3.5', '-0' -> '0', '7.' -> '7'; None when text is not a number."""
    text = text.strip().rstrip(".").replace(",", "")
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return str(int(value)) if value == int(value) else repr(value)


def final_answer(text: str) -> str:
    """The completion's final answer: the content of its last \\boxed{...}, else what follows its last '####', else
    its last number, else the whole text; a number normalised, text lower-cased with spaces collapsed and a final
    full stop dropped."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        found = boxed[-1]
    elif "####" in text:
        found = text.rsplit("####", 1)[1].strip().split("\n")[0]
    else:
        numbers = NUMBER.findall(text)
        found = numbers[-1] if numbers else text
    number = normalised_number(found)
    return number if number is not None else _text(found)


def _text(text: str) -> str:
    return " ".join(text.split()).lower().removesuffix(".")


def exact_answer(completions: list, answer: list, **_) -> list[float]:
    """1.0 where the completion's final answer equals the row's `answer` (numbers compared normalised, text
    case- and space-insensitively), else 0.0."""
    out = []
    for completion, expected in zip(completions, answer, strict=True):
        want = normalised_number(str(expected))
        want = want if want is not None else _text(str(expected))
        out.append(float(final_answer(completion_text(completion)) == want))
    return out


def regex_format(completions: list, pattern: str, search: bool = False, **_) -> list[float]:
    """1.0 where the whole completion (stripped) matches `pattern` (search: anywhere in it), else 0.0. Dot matches
    newlines."""
    compiled = re.compile(pattern, re.DOTALL)
    match = compiled.search if search else compiled.fullmatch
    return [float(match(completion_text(c).strip()) is not None) for c in completions]


def length_penalty(completion_ids: list, max_length: int, buffer: int, **_) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 up to max_length - buffer tokens, falling
    linearly to -1 at max_length, -1 beyond."""
    if not 0 < buffer <= max_length:
        raise ValueError(f"length_penalty needs 0 < buffer <= max_length, got buffer {buffer}, max_length {max_length}")
    free = max_length - buffer
    return [0.0 if len(ids) <= free else max(-1.0, (free - len(ids)) / buffer) for ids in completion_ids]


class RewardModelScorer:
    """A reward model (recipe reward's output, or a transformers sequence-classification directory) as a reward
    function: each prompt + completion, rendered with the reward model's chat template, scored at its last token."""

    def __init__(self, path: str, batch_size: int = 16):
        from lmforge.tokenizer import load_tokenizer
        from lmforge.train.reward import load_reward_model

        self.model = load_reward_model(Path(path), dtype="float32")
        self.tokenizer = load_tokenizer(Path(path))
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list, **_) -> list[float]:
        from lmforge.layers.attention import AttnMeta

        texts = []
        for prompt, completion in zip(prompts, completions, strict=True):
            if isinstance(prompt, str):
                texts.append(self.tokenizer.encode(prompt + completion_text(completion)))
            else:
                text = self.tokenizer.apply_chat_template([*prompt, *completion])
                texts.append(self.tokenizer.encode(text, add_special_tokens=False))
        scores = []
        for start in range(0, len(texts), self.batch_size):
            docs = texts[start:start + self.batch_size]
            lens = [len(d) for d in docs]
            ids = torch.tensor([t for d in docs for t in d])
            positions = torch.cat([torch.arange(n) for n in lens])
            scores += self.model(ids, positions, AttnMeta.for_sequences(lens)).tolist()
        return scores


BUILT_IN: dict[str, Callable] = {"exact_answer": exact_answer, "regex_format": regex_format,
                                 "length_penalty": length_penalty}


@dataclass(frozen=True)
class Reward:
    name: str
    weight: float
    fn: Callable[..., list]


def build_rewards(specs: list[RewardFunction]) -> list[Reward]:
    """The configured functions with their arguments bound; a name that does not resolve, or arguments the function
    does not take, fail here with the entry's place (grpo.rewards.N)."""
    rewards = []
    for i, spec in enumerate(specs):
        where = f"grpo.rewards.{i}"
        if spec.name == "reward_model":
            if "path" not in spec.args:
                raise LmforgeError(f"{where}: reward_model needs args.path, the reward model's directory")
            try:
                fn = RewardModelScorer(**spec.args)
            except TypeError as e:
                raise LmforgeError(f"{where}: reward_model takes path and batch_size: {e}") from None
            rewards.append(Reward("reward_model", spec.weight, fn))
            continue
        fn = BUILT_IN.get(spec.name) or _import(spec.name, where)
        _check_args(fn, spec, where, built_in=spec.name in BUILT_IN)
        rewards.append(Reward(spec.name, spec.weight, functools.partial(fn, **spec.args) if spec.args else fn))
    return rewards


def _check_args(fn: Callable, spec: RewardFunction, where: str, built_in: bool) -> None:
    """Arguments the function cannot take fail at load; a built-in's **_ swallows the row's columns, not args."""
    try:
        signature = inspect.signature(fn)
    except ValueError:  # a C function without a signature: its call will say
        return
    named = {n for n, p in signature.parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    unknown = sorted(set(spec.args) - named) if built_in else []
    try:
        signature.bind_partial(**spec.args)
    except TypeError:
        unknown = unknown or sorted(spec.args)
    if unknown:
        takes = sorted(named - {"prompts", "completions", "completion_ids"})
        raise LmforgeError(f"{where}: {spec.name} does not take args {unknown} (it takes {takes})")


def _import(name: str, where: str) -> Callable:
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        raise LmforgeError(f"{where}: {name!r} is neither a built-in reward ({', '.join([*BUILT_IN, 'reward_model'])}) "
                           "nor an import path package.module:function")
    try:
        fn = functools.reduce(getattr, attr.split("."), importlib.import_module(module))
    except (ImportError, AttributeError) as e:
        raise LmforgeError(f"{where}: cannot import {name}: {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise LmforgeError(f"{where}: {name} is a {type(fn).__name__}, not a function")
    return fn


def score(rewards: list[Reward], prompts: list, completions: list, completion_ids: list[list[int]],
          columns: list[dict[str, Any]], origins: list[str]) -> torch.Tensor:
    """[completions, functions] float32 rewards (NaN where a function returned None). columns: each completion's
    row's other fields; origins: each completion's row (file:row) for error messages."""
    names = sorted({k for c in columns for k in c})
    kwargs = {k: [c.get(k) for c in columns] for k in names if k not in ("prompts", "completions", "completion_ids")}
    out = torch.empty(len(completions), len(rewards), dtype=torch.float32)
    for j, reward in enumerate(rewards):
        values = _call(reward, prompts, completions, completion_ids, kwargs, origins)
        for i, value in enumerate(values):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise LmforgeError(f"reward function {reward.name} returned {value!r} (a {type(value).__name__}) for "
                                   f"the completion of {origins[i]}; a reward is a number or None")
            out[i, j] = math.nan if value is None else float(value)
    return out


def _call(reward: Reward, prompts, completions, completion_ids, kwargs, origins) -> list:
    try:
        values = reward.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
    except Exception as e:
        row = _failing_row(reward, prompts, completions, completion_ids, kwargs, origins)
        raise LmforgeError(f"reward function {reward.name} raised {type(e).__name__}: {e}" + row) from e
    if hasattr(values, "tolist"):  # a tensor or array
        values = values.tolist()
    if not isinstance(values, list | tuple) or len(values) != len(completions):
        got = f"{len(values)} values" if isinstance(values, list | tuple) else f"a {type(values).__name__}"
        raise LmforgeError(f"reward function {reward.name} returned {got} for {len(completions)} completions (rows "
                           f"{origins[0]} to {origins[-1]}); it must return one reward per completion")
    return list(values)


def _failing_row(reward: Reward, prompts, completions, completion_ids, kwargs, origins) -> str:
    """' (on the completion of file:row)' for the first completion the function raises on alone, if any."""
    for i in range(len(completions)):
        try:
            reward.fn(prompts=prompts[i:i + 1], completions=completions[i:i + 1],
                      completion_ids=completion_ids[i:i + 1], **{k: v[i:i + 1] for k, v in kwargs.items()})
        except Exception:
            return f" (on the completion of {origins[i]})"
    return f" (on rows {origins[0]} to {origins[-1]})"
