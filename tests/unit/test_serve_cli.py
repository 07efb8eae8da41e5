"""`lmforge serve` argument handling: bad flags and unfit adapters are one-line errors (exit 2)."""

import socket

import pytest

from lmforge.cli import main
from tests.adapters import save_peft_adapter
from tests.unit.tiny_server import tiny_chat_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("tiny_chat"))


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_lora_flags_are_checked_before_the_model_loads(capsys, model_dir, tmp_path):
    save_peft_adapter(model_dir, tmp_path / "a", r=4, target_modules=["q_proj"])
    capsys.readouterr()  # transformers' loading bar
    a = f"a={tmp_path / 'a'}"
    assert "--lora expects NAME=PATH, got 'a'" in one_line_error(capsys, ["serve", "--lora", "a"])
    assert f"adapter directory {tmp_path / 'none'} not found" in \
        one_line_error(capsys, ["serve", "--lora", f"x={tmp_path / 'none'}"])
    assert "the name 'a' is already served" in one_line_error(capsys, ["serve", "--lora-modules", a, a])
    assert "the name 'm' is already served" in one_line_error(capsys, ["serve", "--served-model-name", "m",
                                                                       "--lora", f"m={tmp_path / 'a'}"])
    assert "2 --lora adapters exceed --max-loras 1" in \
        one_line_error(capsys, ["serve", "--lora", a, "--lora", f"b={tmp_path / 'a'}", "--max-loras", "1"])


def test_an_adapter_that_does_not_fit_the_model_stops_the_start(capsys, model_dir, tmp_path):
    save_peft_adapter(model_dir, tmp_path / "big", r=16, target_modules=["q_proj"])
    capsys.readouterr()
    err = one_line_error(capsys, ["serve", str(model_dir), "--dtype", "float32", "--lora", f"big={tmp_path / 'big'}",
                                  "--max-lora-rank", "8"])
    assert "r = 16 exceeds the engine's max_lora_rank=8; raise --max-lora-rank" in err


def test_bad_chat_template_is_named(capsys, model_dir):
    err = one_line_error(capsys, ["serve", str(model_dir), "--dtype", "float32", "--chat-template", "no_such"])
    assert "--chat-template 'no_such' is not a file" in err
    err = one_line_error(capsys, ["serve", str(model_dir), "--dtype", "float32", "--chat-template", "{% if %}"])
    assert "not valid Jinja" in err


def test_busy_port_is_a_one_line_error(capsys, model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = one_line_error(capsys, ["serve", str(model_dir), "--dtype", "float32", "--port", str(port)])
    assert f"cannot listen on 127.0.0.1:{port}" in err


def test_negative_limits_are_refused(capsys):
    assert "--max-queue must be >= 0" in one_line_error(capsys, ["serve", "--max-queue", "-1"])


def test_hardening_flags_are_checked(capsys, tmp_path):
    assert "--header-timeout must be > 0" in one_line_error(capsys, ["serve", "--header-timeout", "0"])
    assert "--body-timeout must be > 0" in one_line_error(capsys, ["serve", "--body-timeout", "-1"])
    err = one_line_error(capsys, ["serve", "--allowed-lora-paths", str(tmp_path)])
    assert "--allowed-lora-paths confines run-time LoRA loading, which is off" in err
    err = one_line_error(capsys, ["serve", "--allow-runtime-lora-updating", "--allowed-lora-paths",
                                  str(tmp_path / "none")])
    assert f"--allowed-lora-paths {tmp_path / 'none'}: not a directory" in err


def test_an_adapter_with_nan_weights_stops_the_start(capsys, model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    save_peft_adapter(model_dir, tmp_path / "nan", r=4, target_modules=["q_proj"])
    capsys.readouterr()
    weights = tmp_path / "nan" / "adapter_model.safetensors"
    tensors = load_file(weights)
    next(iter(tensors.values())).fill_(float("inf"))
    save_file(tensors, weights)
    err = one_line_error(capsys, ["serve", str(model_dir), "--dtype", "float32", "--lora", f"nan={tmp_path / 'nan'}"])
    assert "holds NaN or infinite values; the adapter is damaged" in err


def test_tool_and_reasoning_flags_are_checked(capsys, model_dir):
    assert "--enable-auto-tool-choice needs --tool-call-parser" in \
        one_line_error(capsys, ["serve", "--enable-auto-tool-choice"])
    # the tiny model's tokenizer has no <think> / </think> tokens: a reasoning parser does not fit it
    err = one_line_error(capsys, ["serve", str(model_dir), "--dtype", "float32", "--reasoning-parser", "qwen3"])
    assert "--reasoning-parser qwen3: this model's tokenizer has no <think> / </think> tokens" in err


def test_replicas_of_a_split_model_are_refused_before_the_model_loads(capsys):
    assert "--data-parallel-size with --tensor-parallel-size > 1 is not supported yet" in \
        one_line_error(capsys, ["serve", "--data-parallel-size", "2", "--tensor-parallel-size", "2"])
