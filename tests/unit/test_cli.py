"""The CLI: every command answers --help; user errors are one line on stderr with exit code 2."""

import json
import subprocess
import sys

import pytest

from lmforge.cli import COMMANDS, main
from tests.tiny import TINY_LLAMA, write_config, write_tiny
from tests.unit.test_gguf_import import hf_weights, write_gguf

NAMES = [m.__name__.rsplit(".", 1)[-1] for m in COMMANDS]


@pytest.mark.parametrize("command", NAMES)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: lmforge " + command in capsys.readouterr().out


def assert_one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    return err


def test_missing_path(capsys, tmp_path):
    assert_one_line_error(capsys, ["info", str(tmp_path / "absent")], "not found")


def test_truncated_safetensors(capsys, tmp_path):
    write_tiny(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert_one_line_error(capsys, ["convert", str(tmp_path), str(tmp_path / "out")], "not a readable safetensors file")


def test_truncated_gguf(capsys, tmp_path):
    gguf = tmp_path / "model.gguf"
    write_gguf(gguf, hf_weights())
    gguf.write_bytes(gguf.read_bytes()[:-300])
    assert_one_line_error(capsys, ["convert", str(gguf), str(tmp_path / "out")], "truncated or corrupt")
    assert not (tmp_path / "out").exists()


def test_unknown_architecture(capsys, tmp_path):
    write_tiny(tmp_path)
    write_config(tmp_path, {**TINY_LLAMA, "architectures": ["BertModel"]})
    assert_one_line_error(capsys, ["info", str(tmp_path)], "unsupported architecture (BertModel)")


def test_config_missing_required_key(capsys, tmp_path):
    write_tiny(tmp_path)
    write_config(tmp_path, {k: v for k, v in TINY_LLAMA.items() if k != "num_attention_heads"})
    assert_one_line_error(capsys, ["info", str(tmp_path)], "lacks the required key 'num_attention_heads'")


def test_unknown_dtype(capsys, tmp_path):
    assert_one_line_error(capsys, ["convert", str(write_tiny(tmp_path)), str(tmp_path / "o"), "--dtype", "fp8"],
                   "unknown dtype 'fp8'")
    assert_one_line_error(capsys, ["generate", "--model", str(tmp_path), "--dtype", "int3", "hi"],
                          "unknown dtype 'int3'")


def test_convert_refuses_to_overwrite(capsys, tmp_path):
    write_tiny(tmp_path / "src")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    assert_one_line_error(capsys, ["convert", str(tmp_path / "src"), str(tmp_path / "dst")], "already exists")
    assert (tmp_path / "dst" / "keep.txt").read_text() == "mine"


def test_convert_hf_to_hf_casts_dtype(capsys, tmp_path):
    write_tiny(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert main(["info", "--json", str(tmp_path / "dst")]) == 0
    facts = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert facts["dtype"] == "bfloat16" and facts["architecture"] == "LlamaForCausalLM"
    assert facts["parameters"] == 2 * 96 * 32 + 2 * (32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64 + 2 * 32) + 32


def test_debug_shows_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lmforge", "--debug", "info", str(tmp_path / "absent")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "not found" in result.stderr.splitlines()[-1]


def test_env_reports_backend(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "attention backend" in out and "cpu features" in out
