"""lmforge data preview: formatted samples with their trained text marked, then the token statistics."""

import re

import yaml

from lmforge.cli import main
from tests.data_refs import chat, tiny_tokenizer_dir, write_jsonl


def write_config(tmp_path, data_file="rows.jsonl") -> str:
    model = tiny_tokenizer_dir(tmp_path / "model")  # a tokenizer is all preview loads
    write_jsonl(tmp_path / "rows.jsonl", [chat("Hi?", "Arr! Ahoy."), chat("Bye?", "Fair winds."), {"messages": []}])
    config = {"model": {"path": str(model)},
              "data": {"train": [{"path": data_file, "format": "messages"}], "cache_dir": str(tmp_path / "cache")}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_preview_marks_untrained_text_and_prints_statistics(tmp_path, capsys):
    assert main(["data", "preview", write_config(tmp_path), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "legend: trained text plain, ⟦not trained⟧" in out
    assert f"── sample 1 ({tmp_path / 'rows.jsonl'}:1)" in out and "sample 2" not in out
    # The prompt is inside the markers, the reply and its end-of-turn token outside, the newline after it inside.
    assert "<|im_start|>assistant\n⟧Arr! Ahoy.<|im_end|>⟦\n⟧" in out
    assert out.count("⟦") == out.count("⟧") == 3  # the legend's and the sample's two untrained runs
    assert re.search(r"train: 2 samples, \d+ tokens, \d+ trained \(\d+\.\d%\), 0 truncated; lengths p50 \d+", out)
    assert "packing efficiency" in out and "1 empty conversation (first: " in out


def test_preview_overrides_and_colours(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["data", "preview", config, "--color", "always"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[32mArr! Ahoy.<|im_end|>\x1b[0m" in out and "⟦" not in out
    assert "You are a helpful assistant." in out  # the model's template writes a default system message
    assert main(["data", "preview", config, "data.template=chatml"]) == 0
    assert "You are a helpful assistant." not in capsys.readouterr().out


def test_preview_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "preview", write_config(tmp_path, data_file="absent.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "absent.jsonl does not exist" in err
