"""`lmforge eval` on a tiny random Llama with SmolLM2's tokenizer: perplexity equals a training run's val_loss and a
hand computation, QA exact match counts against answers built from the engine's own greedy replies, bad input."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from lmforge.cli import main as cli_main
from lmforge.config import load_config
from lmforge.config.schema import LoraConfig
from lmforge.engine.llm import LLM
from lmforge.engine.sampling_params import SamplingParams
from lmforge.errors import LmforgeError
from lmforge.layers.attention import AttnMeta
from lmforge.layers.lora import add_lora
from lmforge.models import build_model
from lmforge.tokenizer import Tokenizer
from lmforge.train.eval_data import infer_format, read_rows
from lmforge.train.qa import contains_answer, exact_match, normalize_answer, parse_qa_row
from lmforge.train.recipes import sft
from lmforge.weights.peft import save_adapter
from tests.tiny import TINY_LLAMA, tiny_model

ROOT = Path(__file__).parents[2]
DEMO = ROOT / "configs" / "data" / "pirate_demo.jsonl"
QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "How many legs does a spider have?",
             "Who wrote Hamlet?", "What is 2 + 2?", "Which planet is largest?", "What do bees make?",
             "What is the opposite of hot?", "Where is the Eiffel Tower?", "What is frozen water called?"]
ENGINE = {"dtype": "float32", "kv_cache_memory": 0.01}



@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_chat_model) -> Path:
    """A short fp32 LoRA run with validation data; returns its run directory (val.jsonl and final/ inside)."""
    run = tmp_path_factory.mktemp("run")
    lines = DEMO.read_text().splitlines()
    (run / "train.jsonl").write_text("\n".join(lines[:16]) + "\n")
    (run / "val.jsonl").write_text("\n".join(lines[16:26]) + "\n")
    cfg = {"model": {"path": str(tiny_chat_model)}, "method": "lora",
           "lora": {"rank": 4, "alpha": 8, "target_modules": "all-linear"},
           "data": {"train": [{"path": str(run / "train.jsonl"), "format": "messages"}],
                    "validation": [{"path": str(run / "val.jsonl"), "format": "messages"}],
                    "max_seq_len": 96, "cache_dir": str(run / "cache")},
           "optimizer": {"lr": 1e-2}, "micro_batch_size": 2, "batch_size": 4, "max_steps": 3,
           "precision": "fp32", "threads": 2, "output_dir": str(run / "out"), "checkpoint": {"every_steps": 0}}
    (run / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    sft.main(load_config(run / "cfg.yaml"))
    return run


def lmforge_eval(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "results.json"
    assert cli_main(["-q", "eval", *args, "--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "0.01",
                     "-o", str(out)]) == 0
    return json.loads(out.read_text())


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- perplexity -------------------------------------------------------------------------------------------------
def test_eval_of_the_final_adapter_equals_the_runs_val_loss(trained, tiny_chat_model, tmp_path):
    records = [json.loads(line) for line in (trained / "out" / "metrics.jsonl").read_text().splitlines()]
    final_val = [r for r in records if "val_loss" in r][-1]
    got = lmforge_eval(tmp_path, str(tiny_chat_model), "--adapter", str(trained / "out" / "final"), "--data",
                       str(trained / "val.jsonl"), "--max-seq-len", "96", "--batch-size", "3")
    assert got["format"] == "messages" and got["samples"] == 10 and got["tokens"] == final_val["val_tokens"]
    assert got["loss"] == pytest.approx(final_val["val_loss"], abs=1e-5)
    base = lmforge_eval(tmp_path, str(tiny_chat_model), "--data", str(trained / "val.jsonl"), "--max-seq-len", "96")
    assert abs(base["loss"] - got["loss"]) > 1e-3  # the adapter was applied


def test_text_perplexity_is_the_token_weighted_mean_of_every_next_token_loss(tiny_chat_model, tmp_path):
    texts = ["Arr, the sea be calm today.", "Ships sail at dawn", "A parrot on the mast sings loudly all night."]
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in texts])
    got = lmforge_eval(tmp_path, str(tiny_chat_model), "--data", str(data))
    tok, model = Tokenizer.from_dir(tiny_chat_model), build_model(tiny_chat_model, "float32")
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor(tok.encode(text) + [tok.eos_token_id])
            logits = model.logits(model(ids, torch.arange(len(ids)), AttnMeta.for_sequences([len(ids)])))
            total += F.cross_entropy(logits[:-1].float(), ids[1:], reduction="sum").item()
            count += len(ids) - 1
    assert got["format"] == "text" and got["tokens"] == count
    assert got["loss"] == pytest.approx(total / count, abs=1e-5)
    assert got["perplexity"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)


def test_max_samples_and_truncated_rows(tiny_chat_model, tmp_path):
    lines = DEMO.read_text().splitlines()[:6]
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(lines) + "\n")
    assert lmforge_eval(tmp_path, str(tiny_chat_model), "--data", str(data), "--max-samples", "4")["samples"] == 4
    # at 8 tokens the system prompt alone fills every sample: nothing is left to score
    assert cli_main(["-q", "eval", str(tiny_chat_model), "--data", str(data), "--max-seq-len", "8"]) == 2


# ---- QA exact match ---------------------------------------------------------------------------------------------
def greedy_chat_replies(model_dir: Path, questions: list[str], max_tokens: int) -> list[str]:
    """The engine's greedy replies through LLM.chat, the path a user of the offline API takes."""
    llm = LLM(str(model_dir), **ENGINE)
    outs = llm.chat([[{"role": "user", "content": q}] for q in questions],
                    SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    return [o.outputs[0].text.strip() for o in outs]


def qa_rows_with_known_scores(replies: list[str]) -> tuple[list[dict], int, int]:
    """Rows whose answer is the reply itself (exact), one word of it (contains only) or absent from it."""
    rows, exact, contains = [], 0, 0
    for i, (question, reply) in enumerate(zip(QUESTIONS, replies, strict=True)):
        words = normalize_answer(reply).split()
        if i % 3 == 0 and words:
            rows.append({"question": question, "answer": reply})
            exact, contains = exact + 1, contains + 1
        elif i % 3 == 1 and len(words) >= 2:
            rows.append({"question": question, "answers": ["zebra crossing", words[-1]]})
            contains += 1
        else:
            rows.append({"question": question, "answer": "quixotic zebra"})
            assert not contains_answer(reply, ["quixotic zebra"])
    assert exact >= 2 and contains - exact >= 2, f"too few usable replies from the random model: {replies}"
    return rows, exact, contains


def test_qa_counts_exact_and_contained_answers(tiny_chat_model, tmp_path, capsys):
    replies = greedy_chat_replies(tiny_chat_model, QUESTIONS, max_tokens=8)
    rows, exact, contains = qa_rows_with_known_scores(replies)
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    got = lmforge_eval(tmp_path, str(tiny_chat_model), "--data", str(data), "--max-tokens", "8")
    qa = got["qa"]
    assert got["format"] == "qa" and qa["total"] == len(rows)
    assert (qa["exact_match_count"], qa["contains_count"]) == (exact, contains)
    assert qa["exact_match"] == pytest.approx(exact / len(rows))
    assert [p["prediction"] for p in qa["predictions"]] == replies
    assert [p["origin"] for p in qa["predictions"]] == [f"{data}:{i}" for i in range(1, len(rows) + 1)]
    out = capsys.readouterr().out
    assert f"exact match {exact}/{len(rows)}" in out and f"contains {contains}/{len(rows)}" in out
    assert f"mismatches ({min(5, len(rows) - exact)} of {len(rows) - exact})" in out
    # the answers' perplexity: the same as the rows written as question/answer chats
    chats = write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": r["question"]},
                      {"role": "assistant", "content": r.get("answer") or r["answers"][0]}]} for r in rows])
    as_chats = lmforge_eval(tmp_path, str(tiny_chat_model), "--data", str(chats))
    assert (got["loss"], got["tokens"]) == (pytest.approx(as_chats["loss"], abs=1e-6), as_chats["tokens"])


def test_qa_with_an_adapter_answers_as_the_merged_model(trained, tiny_chat_model, tmp_path, monkeypatch):
    """The engine answers with the adapter live on the evaluated model: what the merged model answers, and no
    merged copy is written anywhere."""
    import lmforge.weights.hf_dir

    merged = tmp_path / "merged"
    assert cli_main(["-q", "merge", str(tiny_chat_model), str(trained / "out" / "final"), str(merged)]) == 0
    questions = QUESTIONS[:4]
    replies = greedy_chat_replies(merged, questions, max_tokens=6)
    assert replies != greedy_chat_replies(tiny_chat_model, questions, max_tokens=6)
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": q, "answer": "quixotic zebra"} for q in questions])

    def no_copies(*args, **kwargs):
        raise AssertionError("eval --adapter wrote a model directory")

    monkeypatch.setattr(lmforge.weights.hf_dir, "save_model", no_copies)
    got = lmforge_eval(tmp_path, str(tiny_chat_model), "--adapter", str(trained / "out" / "final"), "--data",
                       str(data), "--max-tokens", "6")
    assert [p["prediction"] for p in got["qa"]["predictions"]] == replies


# ---- normalisation and rows -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "normal"), [
    ("Paris", "paris"), ("  The Eiffel   Tower! ", "eiffel tower"), ("An apple a day.", "apple day"),
    ("Don't panic, 1,000 times", "dont panic 1000 times"), ("«¿Qué tal?»", "qué tal"), ("theatre", "theatre"),
    ("A", ""), ("...", ""),
])
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


def test_exact_match_and_contains():
    assert exact_match("The Eiffel Tower.", ["eiffel tower"]) and not exact_match("Paris, France", ["Paris"])
    assert exact_match("8", ["eight", "8"])
    assert contains_answer("The capital of France is Paris.", ["paris"])
    assert contains_answer("It was William Shakespeare!", ["Shakespeare", "Marlowe"])
    assert not contains_answer("It ended in 1945.", ["4"])  # whole words only
    assert not contains_answer("Parisian food", ["Paris"])


def test_parse_qa_row_accepts_answer_and_answers():
    assert parse_qa_row({"question": "Q?", "answer": "a1", "answers": ["a2"]}).answers == ("a1", "a2")
    assert parse_qa_row({"question": "Q?", "answers": ["x", "y"]}).messages()[1] == {"role": "assistant",
                                                                                    "content": "x"}


@pytest.mark.parametrize(("row", "says"), [
    ({"answer": "x"}, "no 'question'"), ({"question": "Q?"}, "no 'answer' or 'answers'"),
    ({"question": "Q?", "answers": "x"}, "must be a list"), ({"question": "Q?", "answer": 3}, "must be strings"),
    ({"question": "Q?", "answer": "The"}, "empty once normalised"),
])
def test_malformed_qa_rows_name_their_line(tmp_path, row, says):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Fine?", "answer": "yes"}, row])
    with pytest.raises(LmforgeError, match=f"qa.jsonl:2: .*{says}"):
        read_rows(data, "qa")


@pytest.mark.parametrize(("row", "fmt"), [
    ({"question": "q", "answers": ["a"]}, "qa"), ({"messages": []}, "messages"), ({"conversations": []}, "sharegpt"),
    ({"instruction": "i", "input": "", "output": "o"}, "alpaca"), ({"text": "t"}, "text"),
])
def test_format_is_inferred_from_the_first_rows_keys(row, fmt):
    assert infer_format(row, "f.jsonl:1") == fmt


# ---- bad input: one line, exit 2 --------------------------------------------------------------------------------
def fails(capsys, *args: str) -> str:
    assert cli_main(["-q", "eval", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_is_one_line_exit_2(tiny_chat_model, tmp_path, capsys):
    model = str(tiny_chat_model)
    assert "missing.jsonl does not exist" in fails(capsys, model, "--data", str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "empty.jsonl holds no rows" in fails(capsys, model, "--data", str(empty))
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "p", "completion": "c"}])
    err = fails(capsys, model, "--data", str(odd))
    assert "odd.jsonl:1: cannot tell the format" in err and "--format" in err
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "i", "output": "o"}, {"instruction": "i"}])
    assert "alpaca.jsonl:2: no 'output' column" in fails(capsys, model, "--data", str(alpaca))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    assert "bad.jsonl:2: not valid JSON" in fails(capsys, model, "--data", str(tmp_path / "bad.jsonl"))
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "hello there"}])
    assert "--batch-size must be at least 1" in fails(capsys, model, "--data", str(text), "--batch-size", "0")
    assert "not found" in fails(capsys, model, "--data", str(text), "--adapter", str(tmp_path / "nope"))
    assert "unknown --device 'gpu'" in fails(capsys, model, "--data", str(text), "--device", "gpu")
    assert "does not exist" in fails(capsys, model, "--data", str(text), "-o", str(tmp_path / "no" / "r.json"))


def test_an_adapter_for_another_model_is_refused(tiny_chat_model, tmp_path, capsys):
    other = tiny_model({**TINY_LLAMA, "hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2})
    add_lora(other, LoraConfig(rank=2))
    save_adapter(other, tmp_path / "adapter", LoraConfig(rank=2), base_model="another-model")
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "hello there"}])
    err = fails(capsys, str(tiny_chat_model), "--data", str(text), "--adapter", str(tmp_path / "adapter"))
    assert "has shape" in err and "another-model" in err
