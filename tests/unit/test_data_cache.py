"""The tokenised-data cache: reused when nothing changed, never when the data, tokenizer or settings did."""

import json

import numpy as np
import pytest

from lmforge.data import build_datasets
from lmforge.data.encode import SampleEncoder
from tests.data_refs import CHATML_WITH_SYSTEM, chat, data_config, tiny_tokenizer, write_jsonl


def setup(tmp_path, **settings):
    path = write_jsonl(tmp_path / "rows.jsonl", [chat("Hi", "Ahoy"), chat("Bye", "Fair winds")])
    return path, data_config(tmp_path, {"path": str(path), "format": "messages"}, **settings)


def no_encoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tokenised again although the cache holds this data")

    monkeypatch.setattr(SampleEncoder, "encode", refuse)


def test_a_second_build_reads_the_cache(tmp_path, monkeypatch):
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    _, cfg = setup(tmp_path)
    first = build_datasets(cfg, tokenizer)
    assert first.report.train.cache.startswith("written ")
    no_encoding(monkeypatch)
    second = build_datasets(cfg, tokenizer)
    assert second.report.train.cache == "hit " + first.report.train.cache.removeprefix("written ")
    a, b = first.train.samples, second.train.samples
    assert np.array_equal(a.tokens.values, b.tokens.values) and np.array_equal(a.trained.values, b.trained.values)
    assert str(a.origins[1]) == str(b.origins[1])
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temporary left


def test_changed_data_is_tokenised_again(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    path, cfg = setup(tmp_path)
    build_datasets(cfg, tokenizer)
    write_jsonl(path, [chat("Hi", "Arr! Ahoy")])
    again = build_datasets(cfg, tokenizer)
    assert again.report.train.cache.startswith("written ") and len(again.train) == 1


def test_a_changed_tokenizer_is_a_miss(tmp_path):
    _, cfg = setup(tmp_path)
    first = build_datasets(cfg, tiny_tokenizer(tmp_path / "tok"))
    # Same vocabulary, other chat template: other tokens.
    other_template = CHATML_WITH_SYSTEM.replace("You are a helpful assistant.", "You are a pirate.")
    changed = build_datasets(cfg, tiny_tokenizer(tmp_path / "tok2", chat_template=other_template))
    assert changed.report.train.cache.startswith("written ")
    assert len(changed.train.samples.tokens.values) != len(first.train.samples.tokens.values)
    # Other tokenizer.json (an extra special token) with the same template: also a miss.
    tok3 = tmp_path / "tok3"
    tiny_tokenizer(tok3)
    data = json.loads((tok3 / "tokenizer.json").read_text())
    data["added_tokens"].append({**data["added_tokens"][-1], "id": len(data["model"]["vocab"]) + 10,
                                 "content": "<|pirate|>"})
    (tok3 / "tokenizer.json").write_text(json.dumps(data))
    from lmforge.tokenizer import Tokenizer

    assert build_datasets(cfg, Tokenizer.from_dir(tok3)).report.train.cache.startswith("written ")
    # The original tokenizer from another directory hits: the content is the key, not the path.
    assert build_datasets(cfg, tiny_tokenizer(tmp_path / "tok4")).report.train.cache.startswith("hit ")


@pytest.mark.parametrize("change", [{"max_seq_len": 40}, {"template": "chatml"}, {"train_on_inputs": True},
                                    {"max_samples": 1}])
def test_settings_that_change_tokens_are_part_of_the_key(tmp_path, change):
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    _, cfg = setup(tmp_path)
    build_datasets(cfg, tokenizer)
    assert build_datasets(cfg.model_copy(update=change), tokenizer).report.train.cache.startswith("written ")


def test_settings_that_do_not_change_tokens_share_the_entry(tmp_path, monkeypatch):
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    _, cfg = setup(tmp_path)
    build_datasets(cfg, tokenizer)
    no_encoding(monkeypatch)
    assert build_datasets(cfg.model_copy(update={"packing": False, "shuffle": False}), tokenizer)


def test_a_damaged_entry_is_rebuilt(tmp_path, caplog):
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    _, cfg = setup(tmp_path)
    first = build_datasets(cfg, tokenizer)
    entry = first.report.train.cache.removeprefix("written ")
    (tmp_path / "cache" / entry.rsplit("/", 1)[-1] / "tokens.values.npy").unlink()
    again = build_datasets(cfg, tokenizer)
    assert again.report.train.cache.startswith("written ") and "unreadable data cache" in caplog.text
    assert np.array_equal(again.train.samples.tokens.values, first.train.samples.tokens.values)


def test_skip_counts_survive_the_cache(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    path = write_jsonl(tmp_path / "rows.jsonl", [chat("Hi", "Ahoy"), {"messages": []}])
    cfg = data_config(tmp_path, {"path": str(path), "format": "messages"})
    first = build_datasets(cfg, tokenizer).report.train
    second = build_datasets(cfg, tokenizer).report.train
    assert second.cache.startswith("hit ")
    assert second.skipped == first.skipped == {"empty conversation": 1}
    assert second.first_skipped == first.first_skipped


def test_preference_pairs_round_trip_through_the_cache(tmp_path, monkeypatch):
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Hi", "chosen": "Ahoy", "rejected": "Hello"},
                                                  {"prompt": "Bye", "chosen": "Fair winds", "rejected": "Ciao"}])
    cfg = data_config(tmp_path, {"path": str(path), "format": "preference"})
    first = build_datasets(cfg, tokenizer).train
    no_encoding(monkeypatch)
    second = build_datasets(cfg, tokenizer)
    assert second.report.train.cache.startswith("hit ")
    for name in ("prompt", "chosen", "chosen_trained", "rejected", "rejected_trained"):
        a, b = getattr(first.pairs, name), getattr(second.train.pairs, name)
        assert np.array_equal(a.values, b.values) and np.array_equal(a.offsets, b.offsets), name
