"""The DPO demo pairs (configs/data/pirate_pairs*.jsonl): valid preference rows, chosen = the demo's pirate answer
to that very question, rejected = a plain answer, and the validation pairs held out from training."""

import importlib.util
import json
from pathlib import Path

import pytest

from lmforge.config.schema import DataSource
from lmforge.data.formats import Preference, RowFormat

DATA = Path(__file__).resolve().parents[2] / "configs" / "data"
SPLITS = {"pirate_pairs.jsonl": "pirate_demo.jsonl", "pirate_pairs_val.jsonl": "pirate_demo_val.jsonl"}


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def generator():
    """configs/data/make_pirate_pairs.py, for its pirate-word pattern (one definition for the data and the test)."""
    spec = importlib.util.spec_from_file_location("make_pirate_pairs", DATA / "make_pirate_pairs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("pairs_name", SPLITS)
def test_pairs_are_preference_rows_against_their_own_demo_split(pairs_name):
    pairs, demo = rows(pairs_name), rows(SPLITS[pairs_name])
    answers = {(r["messages"][0]["content"], r["messages"][1]["content"]) for r in demo}
    fmt = RowFormat(DataSource(path=pairs_name, format="preference"), f"data.train[0] ({pairs_name})")
    pirate = generator().PIRATE
    assert len(pairs) >= 0.9 * len(demo)  # only a few replies were dropped when the data was made
    for i, pair in enumerate(pairs, 1):
        assert set(pair) == {"prompt", "chosen", "rejected"}, f"{pairs_name}:{i}"
        assert isinstance(fmt.parse(pair), Preference)
        assert (pair["prompt"], pair["chosen"]) in answers, f"{pairs_name}:{i}: chosen is not the demo's answer"
        assert pair["rejected"] == pair["rejected"].strip() and pair["rejected"], f"{pairs_name}:{i}"
        assert not pirate.search(pair["rejected"]), f"{pairs_name}:{i}: the plain answer sounds like a pirate"
        assert pirate.search(pair["chosen"]), f"{pairs_name}:{i}: the chosen answer is not pirate-style"


def test_validation_pairs_are_held_out():
    train = {p["prompt"] for p in rows("pirate_pairs.jsonl")}
    val = {p["prompt"] for p in rows("pirate_pairs_val.jsonl")}
    assert val and not train & val


def test_a_reply_cut_by_max_tokens_keeps_its_full_sentences_only():
    plain_reply = generator().plain_reply
    assert plain_reply("Oslo is the capital. It has a port and", "length") == "Oslo is the capital."
    assert plain_reply("Drink water.\n\n3.", "length") == "Drink water."
    assert plain_reply("The answer is 4 and", "length") is None
    assert plain_reply("  The answer is 4  ", "stop") == "The answer is 4"
    assert plain_reply("Arr, the answer be 4.", "stop") is None
