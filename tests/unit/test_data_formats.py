"""Row formats: each one's columns, field and role overrides, and malformed rows counted or refused with file:row."""

import pytest

from lmforge.data import build_datasets
from lmforge.errors import LmforgeError
from tests.data_refs import chat, data_config, tiny_tokenizer, trained_text, write_jsonl


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def build(tmp_path, tokenizer, rows, fmt="messages", **source):
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    strict = source.pop("strict", False)
    return build_datasets(data_config(tmp_path, {"path": str(path), "format": fmt, **source}, strict=strict),
                          tokenizer)


def rendered(tokenizer, datasets, i=0) -> str:
    return tokenizer.decode(datasets.train.samples.tokens[i], skip_special_tokens=False)


def replies(tokenizer, datasets, i=0) -> list[str]:
    s = datasets.train.samples
    return trained_text(tokenizer, s.tokens[i], s.trained[i])


def test_alpaca(tmp_path, tokenizer):
    rows = [{"instruction": "Say hi.", "output": "Ahoy!"}, {"instruction": "Add.", "input": "2+2", "output": "4"}]
    datasets = build(tmp_path, tokenizer, rows, "alpaca")
    assert "<|im_start|>user\nSay hi.<|im_end|>" in rendered(tokenizer, datasets, 0)
    assert "<|im_start|>user\nAdd.\n\n2+2<|im_end|>" in rendered(tokenizer, datasets, 1)
    assert replies(tokenizer, datasets, 1) == ["4<|im_end|>"]


def test_messages_and_field_override(tmp_path, tokenizer):
    row = {"dialogue": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy"}]}
    datasets = build(tmp_path, tokenizer, [row], field="dialogue")
    assert replies(tokenizer, datasets) == ["Ahoy<|im_end|>"]


def test_sharegpt_roles_and_extra_role_names(tmp_path, tokenizer):
    rows = [{"conversations": [{"from": "system", "value": "Be a pirate."}, {"from": "human", "value": "Hi"},
                               {"from": "gpt", "value": "Arr!"}]},
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Ahoy!"}]}]
    datasets = build(tmp_path, tokenizer, rows, "sharegpt", roles={"bot": "assistant"})
    assert rendered(tokenizer, datasets, 0).startswith("<|im_start|>system\nBe a pirate.<|im_end|>\n<|im_start|>user")
    assert replies(tokenizer, datasets, 0) == ["Arr!<|im_end|>"]
    assert replies(tokenizer, datasets, 1) == ["Ahoy!<|im_end|>"]


def test_text_with_field(tmp_path, tokenizer):
    datasets = build(tmp_path, tokenizer, [{"body": "Arr! The sea be calm."}], "text", field="body")
    assert rendered(tokenizer, datasets).startswith("Arr! The sea be calm.")


def test_malformed_rows_are_counted_per_reason_with_their_first_row(tmp_path, tokenizer):
    rows = [
        chat("Hi", "Ahoy"),                                                            # 1 fine
        {"text": "no messages column"},                                                # 2 missing field
        {"messages": "not a list"},                                                    # 3 wrong type
        {"messages": []},                                                              # 4 empty conversation
        {"messages": [{"role": "pirate", "content": "Arr"}]},                          # 5 unknown role
        {"messages": [{"role": "user", "content": "Hi"}]},                             # 6 no assistant turn
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},  # 7 wrong type
        ["not", "an", "object"],                                                       # 8 not an object
        {"messages": [{"role": "assistant", "content": "Arr"}]},                       # 9 assistant first
        chat("Bye", "Fair winds"),                                                     # 10 fine
    ]
    path = tmp_path / "data.jsonl"
    write_jsonl(path, rows)
    path.write_text(path.read_text() + "{broken json\n")                              # 11 invalid JSON
    datasets = build_datasets(data_config(tmp_path, {"path": str(path), "format": "messages"}), tokenizer)
    report = datasets.report.train
    assert report.samples == 2
    assert [int(r) for r in datasets.train.samples.origins.rows] == [1, 10]
    assert report.skipped == {"missing field": 1, "wrong type": 2, "empty conversation": 1, "unknown role": 1,
                              "no assistant turn": 1, "not an object": 1, "assistant before any prompt": 1,
                              "invalid JSON": 1}
    first = report.first_skipped
    assert first["wrong type"].startswith(f"{path}:3: ") and first["unknown role"].startswith(f"{path}:5: ")
    assert first["invalid JSON"].startswith(f"{path}:11: ")
    assert "skipped 9 rows" in str(datasets.report) and f"{path}:6" in str(datasets.report)


def test_strict_mode_refuses_the_first_malformed_row(tmp_path, tokenizer):
    rows = [chat("Hi", "Ahoy"), {"messages": [{"role": "user", "content": "Hi"}]}, {"messages": []}]
    with pytest.raises(LmforgeError, match=r"data.jsonl:2: 'messages' has no assistant message") as info:
        build(tmp_path, tokenizer, rows, strict=True)
    assert "\n" not in str(info.value)


def test_alpaca_missing_output_names_the_row(tmp_path, tokenizer):
    rows = [{"instruction": "Say hi.", "output": "Ahoy!"}, {"instruction": "Say bye."}]
    with pytest.raises(LmforgeError, match=r"data.jsonl:2: no 'output' column"):
        build(tmp_path, tokenizer, rows, "alpaca", strict=True)


def test_preference_rows_are_validated(tmp_path, tokenizer):
    rows = [{"prompt": "Hi", "chosen": "Ahoy", "rejected": "Hello"},
            {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}], "chosen": "a",
             "rejected": "b"},
            {"prompt": "Hi", "chosen": {"role": "user", "content": "a"}, "rejected": "b"},
            {"prompt": "Hi", "chosen": "", "rejected": "b"}]
    datasets = build(tmp_path, tokenizer, rows, "preference")
    assert len(datasets.train) == 1
    assert datasets.report.train.skipped == {"prompt not ending in a user turn": 1, "wrong type": 1, "empty text": 1}


def test_an_all_bad_file_is_one_error_that_says_why(tmp_path, tokenizer):
    with pytest.raises(LmforgeError, match=r"data.train has no usable samples .*2 missing field \(first: .*:1: no "
                                           r"'messages' column"):
        build(tmp_path, tokenizer, [{"text": "a"}, {"text": "b"}])


@pytest.mark.parametrize(("source", "match"), [
    ({"format": "alpaca", "field": "x"}, r"data.train\[0\].field applies to the messages, sharegpt, text formats"),
    ({"format": "sharegpt", "roles": {"bot": "captain"}}, r"data.train\[0\].roles maps onto system, user, assistant"),
])
def test_bad_source_settings(tmp_path, tokenizer, source, match):
    with pytest.raises(LmforgeError, match=match):
        build(tmp_path, tokenizer, [chat("Hi", "Ahoy")], **source)


def test_mixing_preference_and_sft_sources_is_refused(tmp_path, tokenizer):
    path = str(write_jsonl(tmp_path / "data.jsonl", [chat("Hi", "Ahoy")]))
    cfg = data_config(tmp_path, {"path": path, "format": "messages"}, {"path": path, "format": "preference"})
    with pytest.raises(LmforgeError, match="mixes preference sources with SFT sources"):
        build_datasets(cfg, tokenizer)
