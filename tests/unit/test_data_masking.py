"""Chat templates and loss masks: exactly the assistant replies and their end-of-turn tokens are trained."""

import logging

import pytest

from lmforge.data import IGNORE_INDEX, build_datasets
from lmforge.data.templates import ChatRenderer
from lmforge.errors import LmforgeError
from tests.data_refs import chat, data_config, tiny_tokenizer, trained_text, write_jsonl

CONVERSATION = {"messages": [
    {"role": "system", "content": "Talk like a pirate."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Arr! Paris be the capital."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, matey."},
]}
REPLIES = ["Arr! Paris be the capital.", "Rome, matey."]

# template -> (tokenizer EOS, how each trained reply reads: the reply as the template writes it + end of turn)
CASES = {
    "model": ("<|im_end|>", lambda r: r + "<|im_end|>"),
    "chatml": ("<|im_end|>", lambda r: r + "<|im_end|>"),
    "llama3": ("<|end_of_text|>", lambda r: r + "<|eot_id|>"),
    "mistral": ("</s>", lambda r: " " + r + "</s>"),
    "alpaca": ("</s>", lambda r: r + "</s>"),
}


def build(tmp_path, rows, template="model", tokenizer=None, **settings):
    tokenizer = tokenizer or tiny_tokenizer(tmp_path / "tok")
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    cfg = data_config(tmp_path, {"path": str(path), "format": settings.pop("format", "messages")}, template=template,
                      **settings)
    return build_datasets(cfg, tokenizer), tokenizer


@pytest.mark.parametrize("template", list(CASES))
def test_trained_tokens_are_exactly_the_replies_and_end_of_turn(tmp_path, template):
    eos, reads = CASES[template]
    tokenizer = tiny_tokenizer(tmp_path / "tok", eos_token=eos)
    datasets, _ = build(tmp_path, [CONVERSATION], template, tokenizer)
    samples = datasets.train.samples
    tokens, trained = samples.tokens[0], samples.trained[0]
    assert trained_text(tokenizer, tokens, trained) == [reads(r) for r in REPLIES]
    # The pieces laid end to end are the whole rendering: nothing dropped, nothing added.
    rendered = ChatRenderer(tokenizer, template).render(CONVERSATION["messages"])
    assert tokenizer.decode(tokens, skip_special_tokens=False) == rendered
    # The loss sees the same thing through the labels: each trained token is the label one position earlier.
    labels = samples.labels(0)
    assert [int(t) for t, f in zip(tokens, trained, strict=True) if f] == [int(x) for x in labels if x != IGNORE_INDEX]


def test_text_after_the_end_of_turn_token_is_not_trained(tmp_path):
    datasets, tokenizer = build(tmp_path, [chat("Hi?", "Arr!")])
    tokens, trained = datasets.train.samples.tokens[0], datasets.train.samples.trained[0]
    end = tokenizer.token_to_id("<|im_end|>")
    last_end = max(i for i, t in enumerate(tokens) if t == end)
    assert trained[last_end] and not trained[last_end + 1:].any()
    assert tokenizer.decode(tokens[last_end + 1:]) == "\n"  # ChatML's newline after the turn


def test_alpaca_rows_with_the_alpaca_template_read_as_the_stanford_prompt(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "tok", eos_token="</s>")
    rows = [{"instruction": "Translate to French.", "input": "Hello", "output": "Bonjour"},
            {"instruction": "Name a colour.", "input": "", "output": "Blue"}]
    datasets, _ = build(tmp_path, rows, "alpaca", tokenizer, format="alpaca")
    s = datasets.train.samples
    texts = [tokenizer.decode(s.tokens[i], skip_special_tokens=False) for i in range(2)]
    assert texts[0] == ("Below is an instruction that describes a task, paired with an input that provides further "
                        "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                        "Translate to French.\n\n### Input:\nHello\n\n### Response:\nBonjour</s>\n\n")
    assert texts[1] == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                        "the request.\n\n### Instruction:\nName a colour.\n\n### Response:\nBlue</s>\n\n")
    assert trained_text(tokenizer, s.tokens[0], s.trained[0]) == ["Bonjour</s>"]
    # With a chat template the user message is the instruction, a blank line, then the input.
    datasets, _ = build(tmp_path / "chat", rows, "chatml", tokenizer, format="alpaca")
    assert "<|im_start|>user\nTranslate to French.\n\nHello<|im_end|>" in tokenizer.decode(
        datasets.train.samples.tokens[0], skip_special_tokens=False)


def test_train_on_inputs_trains_every_token_but_the_first(tmp_path):
    datasets, _ = build(tmp_path, [CONVERSATION], train_on_inputs=True)
    trained = datasets.train.samples.trained[0]
    assert not trained[0] and trained[1:].all()


def test_text_format_trains_everything_and_ends_in_eos(tmp_path):
    datasets, tokenizer = build(tmp_path, [{"text": "Arr! The sea be calm."}], format="text")
    tokens, trained = datasets.train.samples.tokens[0], datasets.train.samples.trained[0]
    assert tokens[-1] == tokenizer.eos_token_id and not trained[0] and trained[1:].all()
    assert tokenizer.decode(tokens[:-1]) == "Arr! The sea be calm."


def test_a_template_without_end_of_turn_warns_once(tmp_path, caplog):
    plain = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
             "{% if add_generation_prompt %}assistant: {% endif %}")
    tokenizer = tiny_tokenizer(tmp_path / "tok", chat_template=plain)
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        datasets, _ = build(tmp_path, [chat("Hi?", "Arr!"), chat("Bye?", "Ahoy!")], tokenizer=tokenizer)
    warnings = [r for r in caplog.records if "end-of-turn" in r.getMessage()]
    assert len(warnings) == 1
    s = datasets.train.samples
    assert trained_text(tokenizer, s.tokens[0], s.trained[0]) == ["Arr!\n"]


def test_a_template_that_rewrites_earlier_turns_is_an_error(tmp_path):
    rewriting = ("{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}<|im_end|>{% endfor %}"
                 "{% if add_generation_prompt %}A: {% endif %}")
    tokenizer = tiny_tokenizer(tmp_path / "tok", chat_template=rewriting)
    with pytest.raises(LmforgeError, match=r"data.jsonl:1: the 'model' template does not write this conversation "
                                           "incrementally"):
        build(tmp_path, [chat("Hi?", "Arr!")], tokenizer=tokenizer)


def test_rows_the_template_rejects_are_skipped_with_their_row(tmp_path):
    strict_roles = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                    "{% endif %}{{ m['content'] }}<|im_end|>{% endfor %}")
    tokenizer = tiny_tokenizer(tmp_path / "tok", chat_template=strict_roles)
    datasets, _ = build(tmp_path, [chat("Hi?", "Arr!"), CONVERSATION], tokenizer=tokenizer)
    report = datasets.report.train
    assert report.samples == 1 and report.skipped == {"template rejected": 1}
    assert report.first_skipped["template rejected"].startswith(f"{tmp_path / 'data.jsonl'}:2: ")


def test_truncation_keeps_the_head_and_skips_samples_with_nothing_trained(tmp_path):
    long_reply = chat("Hi?", "Arr! " + "the sea be calm " * 20)
    long_prompt = chat("What is the capital of France? " * 10, "Paris.")
    datasets, tokenizer = build(tmp_path, [long_reply, long_prompt], max_seq_len=40, strict=True)
    s = datasets.train.samples
    assert len(s) == 1 and len(s.tokens[0]) == 40 and s.truncated[0]
    assert datasets.report.train.truncated == 1
    assert datasets.report.train.skipped == {"nothing trained after truncation": 1}  # even when strict


def test_preference_pairs_hold_prompt_and_both_replies(tmp_path):
    row = {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Berlin."}
    datasets, tokenizer = build(tmp_path, [row, {"prompt": "Hi", "chosen": "Ahoy"}], format="preference")
    pairs = datasets.train.pairs
    assert len(pairs) == 1 and datasets.report.train.skipped == {"missing field": 1}
    prompt = tokenizer.decode(pairs.prompt[0], skip_special_tokens=False)
    assert prompt == tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                                   add_generation_prompt=True)
    assert trained_text(tokenizer, pairs.chosen[0], pairs.chosen_trained[0]) == ["Paris.<|im_end|>"]
    assert trained_text(tokenizer, pairs.rejected[0], pairs.rejected_trained[0]) == ["Berlin.<|im_end|>"]
    assert tokenizer.decode(pairs.chosen[0], skip_special_tokens=False) == "Paris.<|im_end|>\n"


def test_preference_with_message_lists(tmp_path):
    row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Italy?"}],
           "chosen": [{"role": "assistant", "content": "Rome."}],
           "rejected": {"role": "assistant", "content": "Milan."}}
    datasets, tokenizer = build(tmp_path, [row], format="preference")
    pairs = datasets.train.pairs
    assert "Be brief." in tokenizer.decode(pairs.prompt[0], skip_special_tokens=False)
    assert trained_text(tokenizer, pairs.rejected[0], pairs.rejected_trained[0]) == ["Milan.<|im_end|>"]
    assert datasets.report.train.trained_tokens == int(pairs.chosen_trained[0].sum() + pairs.rejected_trained[0].sum())


def test_chat_rows_without_a_chat_template_say_what_to_set(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "tok", chat_template=None)
    with pytest.raises(LmforgeError, match="has no chat template for data.template: model; set data.template to "
                                           "chatml"):
        build(tmp_path, [chat("Hi?", "Arr!")], tokenizer=tokenizer)
    # Text rows need no chat template at all.
    assert len(build(tmp_path / "text", [{"text": "Arr!"}], tokenizer=tokenizer, format="text")[0].train) == 1
