"""Training YAML: inheritance, overrides, and a matrix of bad configs that each give one clear sentence."""

from pathlib import Path

import pytest
import yaml

from lmforge.cli import main as cli_main
from lmforge.config import dump_config, load_config
from lmforge.errors import LmforgeError

CONFIGS = Path(__file__).parents[2] / "configs"
MINIMAL = {"data": {"train": [{"path": "rows.jsonl", "format": "alpaca"}]}}


def write(tmp_path: Path, data, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["optimizer.lr=1e-4", "lora.rank=4", "method=full",
                                                 "lora.target_modules=[q_proj, v_proj]", "max_grad_norm=null"])
    assert cfg.optimizer.lr == 1e-4 and cfg.lora.rank == 4 and cfg.method == "full"
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.max_grad_norm is None
    assert cfg.grad_accumulation() == cfg.batch_size // cfg.micro_batch_size
    assert cfg.grad_accumulation(2) == cfg.batch_size // (2 * cfg.micro_batch_size)
    assert load_config(write(tmp_path, yaml.safe_load(dump_config(cfg)), "again.yaml")) == cfg  # round trip


def test_base_inheritance_merges_sections_and_anchors_data_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "rows.jsonl").write_text("")
    write(tmp_path, {**MINIMAL, "optimizer": {"lr": 1e-3, "weight_decay": 0.1}, "seed": 7}, "base.yaml")
    child = write(tmp_path / "sub", {"base": "../base.yaml", "optimizer": {"lr": 5e-5}}, "child.yaml")
    cfg = load_config(child)
    assert cfg.optimizer.lr == 5e-5 and cfg.optimizer.weight_decay == 0.1 and cfg.seed == 7
    assert cfg.data.train[0].path == str(tmp_path / "rows.jsonl")  # relative to base.yaml, which names it


def test_data_source_override_by_index(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["data.train.0.format=messages"])
    assert cfg.data.train[0].format == "messages"


BAD = [
    ({**MINIMAL, "optimizer": {"lrr": 1}}, (), "unknown key optimizer.lrr; did you mean optimizer.lr?"),
    ({**MINIMAL, "lora": {"rnak": 8}}, (), "did you mean lora.rank?"),
    ({**MINIMAL, "epoch": 3}, (), "did you mean epochs?"),
    ({**MINIMAL, "zzz": 3}, (), "unknown key zzz; valid keys here: recipe, preference, reward, distill, grpo, model"),
    ({"data": {"train": [{"path": "x", "format": "alpaca", "formt": 1}]}}, (), "data.train.0.formt; did you mean"),
    ({}, (), "data is required"),
    ({"data": {"train": []}}, (), "data.train: List should have at least 1 item"),
    ({"data": {"train": [{"format": "alpaca"}]}}, (), "data.train.0.path is required"),
    (MINIMAL, ("method=qlorax",), "method: Input should be 'full', 'lora' or 'qlora' (got 'qlorax')"),
    (MINIMAL, ("lora.rank=0",), "lora.rank: Input should be greater than or equal to 1 (got 0)"),
    (MINIMAL, ("optimizer.lr=-1",), "optimizer.lr: Input should be greater than 0"),
    (MINIMAL, ("data.train.0.format=csvish",), "data.train.0.format: Input should be 'alpaca'"),
    (MINIMAL, ("batch_size=6",), "batch_size (6) must be a multiple of micro_batch_size (4)"),
    (MINIMAL, ("eval.every_steps=often",), "eval.every_steps: Input should be a valid integer"),
    (MINIMAL, ("precision=bf17",), "precision: Input should be 'auto', 'bf16-mixed', 'fp16-mixed' or 'fp32'"),
    (MINIMAL, ("lora.dropout=1.5",), "lora.dropout: Input should be less than 1"),
    (MINIMAL, ("data.train.4.path=x",), "data.train has 1 entries; '4' is not one of their indices"),
    (MINIMAL, ("lr",), "override 'lr' must look like section.key=value"),
    ({**MINIMAL, "seed": 1}, ("seed.x=1",), "seed is a value, not a section"),
    ("data: [unclosed", (), "not valid YAML at line 1"),
    ("- a\n- b\n", (), "the top level must be a mapping"),
    ({**MINIMAL, "base": "missing.yaml"}, (), "missing.yaml does not exist"),
    ({**MINIMAL, "base": "cfg.yaml"}, (), "`base:` inheritance loops back to itself"),
]


@pytest.mark.parametrize(("data", "overrides", "message"), BAD, ids=[m[:40] for _, _, m in BAD])
def test_bad_config_gives_one_sentence(tmp_path, data, overrides, message):
    with pytest.raises(LmforgeError) as e:
        load_config(write(tmp_path, data), overrides)
    text = str(e.value)
    assert message in text and "\n" not in text


def test_missing_file(tmp_path):
    with pytest.raises(LmforgeError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.data.train and cfg.output_dir.startswith("runs/")


def test_shipped_recipes_cover_the_issue():
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert {"smollm2-135m-lora-cpu", "smollm2-135m-full-cpu", "llama-3.1-8b-lora", "llama-3.1-8b-qlora",
            "qwen2.5-7b-lora", "mistral-7b-qlora"} <= names


def test_cli_config_check_and_schema(tmp_path, capsys, monkeypatch):
    from tests.tiny import write_tiny

    model = write_tiny(tmp_path / "tiny")
    cfg = write(tmp_path, {**MINIMAL, "model": {"path": str(model)}, "method": "lora"})
    assert cli_main(["config", "check", str(cfg), "lora.rank=4"]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "gradient accumulation 2" in out and "parameters:" in out and "optimizer state" in out
    assert cli_main(["config", "schema"]) == 0
    out = capsys.readouterr().out
    assert "  optimizer.lr: float (default 0.0002) — peak learning rate" in out and "data.train[].format" in out
    assert cli_main(["config", "check", str(write(tmp_path, {"data": 1}, "bad.yaml"))]) == 2
    assert "bad.yaml: data: Input should be" in capsys.readouterr().err


def test_cli_config_check_offline_hub_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = write(tmp_path, {**MINIMAL, "model": {"path": "meta-llama/Llama-3.1-8B-Instruct"}})
    assert cli_main(["config", "check", str(cfg)]) == 0
    assert "memory plan unavailable" in capsys.readouterr().out
