"""Data sources: the same rows read alike from JSONL, JSON, Parquet, CSV and Hugging Face datasets, with origins."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lmforge.data import build_datasets
from lmforge.errors import LmforgeError
from tests.data_refs import chat, data_config, tiny_tokenizer, write_jsonl

ROWS = [{"instruction": "Name a sea.", "input": "", "output": "The Caribbean, matey."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "Arr! Five."},
        {"instruction": "Say hello.", "input": "", "output": "Ahoy!"}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def write(path, kind: str, rows=ROWS):
    if kind == "jsonl":
        write_jsonl(path, rows)
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)  # several row groups
    return path


def build(tmp_path, tokenizer, path, fmt="alpaca", **settings):
    return build_datasets(data_config(tmp_path, {"path": str(path), "format": fmt, **settings.pop("source", {})},
                                      **settings), tokenizer)


def tokens_of(datasets) -> list[list[int]]:
    s = datasets.train.samples
    return [s.tokens[i].tolist() for i in range(len(s))]


@pytest.mark.parametrize("kind", ["json", "csv", "parquet"])
def test_every_file_kind_reads_the_same_samples(tmp_path, tokenizer, kind):
    reference = build(tmp_path / "a", tokenizer, write(tmp_path / "rows.jsonl", "jsonl"))
    other = build(tmp_path / "b", tokenizer, write(tmp_path / f"rows.{kind}", kind))
    assert tokens_of(other) == tokens_of(reference)
    origins = other.train.samples.origins
    assert [str(origins[i]) for i in range(3)] == [f"{tmp_path / f'rows.{kind}'}:{r}" for r in (1, 2, 3)]


def test_jsonl_rows_are_line_numbers(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n\n\n" + json.dumps(ROWS[2]) + "\n")
    datasets = build(tmp_path, tokenizer, path)
    assert datasets.train.samples.origins.rows.tolist() == [1, 2, 5]


def test_a_json_file_holding_json_lines_is_read_as_such(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "rows.json", ROWS)
    assert len(build(tmp_path, tokenizer, path).train) == 3


def test_csv_cells_may_hold_message_lists_as_json(tmp_path, tokenizer):
    rows = [{"messages": json.dumps(chat("Hi", "Ahoy")["messages"])}]
    datasets = build(tmp_path, tokenizer, write(tmp_path / "rows.csv", "csv", rows), "messages")
    assert len(datasets.train) == 1


def test_parquet_with_nested_messages(tmp_path, tokenizer):
    path = write(tmp_path / "rows.parquet", "parquet", [chat("Hi", "Ahoy"), chat("Bye", "Fair winds")])
    assert len(build(tmp_path, tokenizer, path, "messages").train) == 2


def test_a_local_directory_goes_through_datasets_load_dataset(tmp_path, tokenizer):
    folder = tmp_path / "dataset"
    folder.mkdir()
    write(folder / "train.jsonl", "jsonl")
    from_dir = build(tmp_path / "a", tokenizer, folder)
    from_file = build(tmp_path / "b", tokenizer, folder / "train.jsonl")
    assert tokens_of(from_dir) == tokens_of(from_file)
    assert str(from_dir.train.samples.origins[1]) == f"{folder}:2"


def test_a_save_to_disk_directory(tmp_path, tokenizer):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]),
                          "test": datasets.Dataset.from_list(ROWS[2:])}).save_to_disk(str(tmp_path / "saved"))
    train = build(tmp_path / "a", tokenizer, tmp_path / "saved")
    test = build(tmp_path / "b", tokenizer, tmp_path / "saved", source={"split": "test"})
    assert (len(train.train), len(test.train)) == (2, 1)
    with pytest.raises(LmforgeError, match=r"has no split 'validation'; its splits are \['test', 'train'\]"):
        build(tmp_path / "c", tokenizer, tmp_path / "saved", source={"split": "validation"})


def test_an_uncached_hub_dataset_offline_is_one_sentence(tmp_path):
    code = ("from lmforge.config.schema import DataSource\nfrom lmforge.data.sources import open_source\n"
            "open_source(DataSource(path='lmforge-tests/no-such-dataset', format='text'))")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("lmforge.errors.LmforgeError: Hugging Face dataset 'lmforge-tests/no-such-dataset' is "
                           "not in the local datasets cache and the Hub cannot be reached (offline)"), result.stderr


def test_missing_and_unsupported_files(tmp_path, tokenizer):
    with pytest.raises(LmforgeError, match=r"data file .*absent.jsonl does not exist"):
        build(tmp_path, tokenizer, tmp_path / "absent.jsonl")
    (tmp_path / "rows.txt").write_text("hello")
    with pytest.raises(LmforgeError, match=r"rows.txt: data files must end in .jsonl, .json, .parquet, .csv"):
        build(tmp_path, tokenizer, tmp_path / "rows.txt")
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(LmforgeError, match=r"bad.json is not valid JSON"):
        build(tmp_path, tokenizer, tmp_path / "bad.json")


def test_several_sources_are_concatenated_and_max_samples_cuts_the_head(tmp_path, tokenizer):
    a = write(tmp_path / "a.jsonl", "jsonl")
    b = write_jsonl(tmp_path / "b.jsonl", [chat("Hi", "Ahoy"), chat("Bye", "Fair winds")])
    sources = [{"path": str(a), "format": "alpaca"}, {"path": str(b), "format": "messages"}]
    datasets = build_datasets(data_config(tmp_path, *sources), tokenizer)
    origins = datasets.train.samples.origins
    assert [str(origins[i]) for i in range(5)] == [f"{a}:1", f"{a}:2", f"{a}:3", f"{b}:1", f"{b}:2"]
    limited = build_datasets(data_config(tmp_path, *sources, max_samples=4), tokenizer)
    assert len(limited.train) == 4 and str(limited.train.samples.origins[3]) == f"{b}:1"


def test_val_fraction_is_a_deterministic_disjoint_split(tmp_path, tokenizer):
    rows = [chat(f"Question {i}?", f"Answer {i}.") for i in range(40)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)

    def split(seed):
        d = build_datasets(data_config(tmp_path, {"path": str(path), "format": "messages"}, val_fraction=0.25),
                           tokenizer, seed=seed)
        return d.train.samples.origins.rows.tolist(), d.validation.samples.origins.rows.tolist()

    train, val = split(0)
    assert len(val) == 10 and sorted(train + val) == list(range(1, 41)) and not set(train) & set(val)
    assert split(0) == (train, val) and split(1)[1] != val
    assert train == sorted(train)  # file order within a split


def test_validation_files(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [chat("Hi", "Ahoy")])
    val = write_jsonl(tmp_path / "val.jsonl", [chat("Bye", "Fair winds"), chat("Yo", "Ho")])
    cfg = data_config(tmp_path, {"path": str(train), "format": "messages"},
                      validation=[{"path": str(val), "format": "messages"}])
    datasets = build_datasets(cfg, tokenizer)
    assert len(datasets.validation) == 2 and datasets.report.validation.samples == 2
    assert np.array_equal(datasets.validation.samples.origins.rows, [1, 2])
