"""Built-in reward functions, the arithmetic task and the reward-function plumbing of recipe grpo."""

import json

import pytest
import torch

from lmforge.cli import main as cli_main
from lmforge.config.schema import RewardFunction
from lmforge.data.tasks import arithmetic
from lmforge.errors import LmforgeError
from lmforge.train.rewards import (
    build_rewards,
    exact_answer,
    final_answer,
    length_penalty,
    normalised_number,
    regex_format,
    score,
)


@pytest.mark.parametrize(("text", "want"), [
    ("12", "12"), ("1,000", "1000"), ("3.50", "3.5"), ("-0", "0"), ("7.", "7"), ("x", None), ("inf", None)])
def test_numbers_are_normalised(text, want):
    assert normalised_number(text) == want


@pytest.mark.parametrize(("text", "want"), [
    ("5 + 3 = 8", "8"), ("The answer is 1,024.", "1024"), ("so \\boxed{42} and 7 more", "42"),
    ("work 3 4\n#### 12\nthanks 99", "12"), ("No number.", "no number"), ("#### Paris", "paris"), ("-4", "-4")])
def test_final_answer_takes_boxed_then_hashes_then_the_last_number(text, want):
    assert final_answer(text) == want


def test_exact_answer_on_strings_and_messages():
    completions = ["12 - 5 = 7", [{"role": "assistant", "content": "It is 7.0"}], "8", "Paris", "7 or 8"]
    assert exact_answer(completions, ["7", "7", "7", "paris", "7"]) == [1.0, 1.0, 0.0, 1.0, 0.0]


def test_regex_format_and_length_penalty():
    assert regex_format(["42", " 42 \n", "x42", "4\n2"], pattern=r"\d+") == [1.0, 1.0, 0.0, 0.0]
    assert regex_format(["x42"], pattern=r"\d+", search=True) == [1.0]
    ids = [[0] * n for n in (4, 6, 7, 8, 10)]
    assert length_penalty(ids, max_length=8, buffer=2) == [0.0, 0.0, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="buffer"):
        length_penalty(ids, max_length=8, buffer=0)


def test_arithmetic_rows_are_distinct_seeded_and_correct():
    rows = arithmetic(150, seed=3, max_operand=12, operations="+-")
    assert rows == arithmetic(150, seed=3, max_operand=12, operations="+-")
    questions = [r["prompt"][0]["content"] for r in rows]
    assert len(set(questions)) == 150
    for question, row in zip(questions, rows, strict=True):
        a, op, b = question.removeprefix("What is ").split("?")[0].split()
        assert int(row["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
    with pytest.raises(ValueError, match="raise max_operand"):
        arithmetic(100, max_operand=5, operations="+")


def test_the_task_command_writes_disjoint_files(tmp_path):
    out, held = tmp_path / "t.jsonl", tmp_path / "v.jsonl"
    assert cli_main(["data", "task", "arithmetic", str(out), "--count", "30", "--held-out", "10", "--held-out-file",
                     str(held), "--max-operand", "9"]) == 0
    train = [json.loads(line)["prompt"][0]["content"] for line in out.read_text().splitlines()]
    val = [json.loads(line)["prompt"][0]["content"] for line in held.read_text().splitlines()]
    assert len(train) == 30 and len(val) == 10 and not set(train) & set(val)
    assert cli_main(["data", "task", "arithmetic", str(out), "--count", "30", "--held-out", "3"]) == 2


def weird(completions, **_):
    return ["high"] * len(completions)


def test_score_weighs_nothing_twice_and_names_bad_values():
    rewards = build_rewards([RewardFunction(name="exact_answer"),
                             RewardFunction(name="regex_format", weight=0.5, args={"pattern": r"\d+"})])
    table = score(rewards, ["q1", "q2"], ["3", "is 4"], [[1], [2, 3]], [{"answer": "3"}, {"answer": "5"}],
                  ["f:1", "f:2"])
    assert torch.equal(table, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    bad = build_rewards([RewardFunction(name="tests.unit.test_rewards:weird")])
    with pytest.raises(LmforgeError, match=r"weird returned 'high' \(a str\) for the completion of f:1"):
        score(bad, ["q"], ["c"], [[1]], [{}], ["f:1"])
    with pytest.raises(LmforgeError, match="neither a built-in"):
        build_rewards([RewardFunction(name="no_such_reward")])
