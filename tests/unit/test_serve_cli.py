"""`lmforge serve` argument handling: what is not built is absent, bad flags are one-line errors (exit 2)."""

import socket

import pytest

from lmforge.cli import main
from tests.unit.tiny_server import tiny_chat_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("tiny_chat"))


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_lora_is_not_offered_until_it_exists(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--lora", "a=/adapters/a"])
    assert info.value.code == 2 and "unrecognized arguments: --lora" in capsys.readouterr().err


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
