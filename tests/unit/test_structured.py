"""Structured output in the engine: StructuredOutputsParams, the bitmask in the sampler, grammars held in the
scheduler while they compile, and offline generation (a tiny random model with SmolLM2's real tokenizer: whatever
the weights, the grammar alone must make every output valid)."""

import concurrent.futures
import json
import re
import time
from typing import Literal

import pytest
import torch
from pydantic import BaseModel, Field

from lmforge.engine.sampler import SamplingRow, sample
from lmforge.engine.sampling_params import SamplingParams, StructuredOutputsParams
from lmforge.engine.structured import apply_bitmask

xgrammar = pytest.importorskip("xgrammar")


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)
    vaccinated: bool
    tags: list[Literal["small", "loud", "old"]] = Field(max_length=2)


SCHEMA = Pet.model_json_schema()
REGEX = r"[a-z]{3}-[0-9]{2}"
CHOICES = ["alpha", "beta", "gamma delta"]


def test_params_take_exactly_one_constraint():
    assert StructuredOutputsParams(regex="a+").kind == "regex"
    assert StructuredOutputsParams(json='{"type": "integer"}').json == {"type": "integer"}
    assert StructuredOutputsParams(choice=["a", "b"]).choice == ("a", "b")
    for bad in ({}, {"regex": "a", "choice": ["b"]}, {"json": "{not json"}, {"choice": []}, {"choice": [""]},
                {"grammar": ""}):
        with pytest.raises(ValueError, match="StructuredOutputsParams"):
            StructuredOutputsParams(**bad)
    params = SamplingParams(structured_outputs={"choice": ["x"]})  # vLLM also takes the dict
    assert params.structured_outputs == StructuredOutputsParams(choice=["x"])
    assert StructuredOutputsParams(json={"b": 1, "a": 2}).key() == StructuredOutputsParams(json={"a": 2, "b": 1}).key()


def test_bitmask_masks_its_rows_and_everything_past_its_width():
    before = torch.randn(3, 70)
    mask = torch.zeros(3, 2, dtype=torch.int32)  # covers 64 ids: 64..69 are past it and must be disallowed
    mask[1, 0] = (1 << 3) - 2**31  # ids 3 and 31 (the sign bit) allowed
    mask[1, 1] = 1 << 4  # id 36
    for x in (before.clone(), before.double()):  # xgrammar's CPU kernel (float32) and the torch path
        apply_bitmask(x, mask, [1])
        assert torch.equal(x[0].float(), before[0]) and torch.equal(x[2].float(), before[2])
        assert torch.isfinite(x[1]).nonzero()[:, 0].tolist() == [3, 31, 36]
        assert torch.equal(x[1, [3, 31, 36]].float(), before[1, [3, 31, 36]])


def test_sampler_constrains_only_the_masked_rows():
    torch.manual_seed(0)
    logits = torch.randn(4, 64)
    mask = torch.zeros(4, 2, dtype=torch.int32)
    mask[:, 1] = 1 << 5  # only id 37 (rows 0 and 2 are not constrained: their mask is not read)
    rows = [SamplingRow(SamplingParams(temperature=t, seed=s), torch.Generator().manual_seed(s) if s else None, [1],
                        [], frozenset()) for t, s in ((0, None), (0, None), (1.0, 7), (1.0, 7))]
    out = sample(logits, rows, (mask, [1, 3])).token_ids
    assert out[1] == 37 and out[3] == 37
    assert out[0] == int(logits[0].argmax())
    alone = sample(logits[2:3], [SamplingRow(SamplingParams(temperature=1.0, seed=7),
                                             torch.Generator().manual_seed(7), [1], [], frozenset())]).token_ids
    assert out[2] == alone[0]  # a seeded unconstrained row draws the same with a constrained neighbour


class _Pending:
    ready = False


def test_scheduler_passes_over_a_sequence_whose_grammar_is_compiling():
    from lmforge.engine.block_manager import BlockManager
    from lmforge.engine.scheduler import Scheduler
    from lmforge.engine.sequence import Sequence

    scheduler = Scheduler(BlockManager(64, 4, True), max_num_seqs=8, max_num_batched_tokens=64)
    compiling = Sequence("a", [1, 2, 3], SamplingParams())
    compiling.grammar = _Pending()
    plain = Sequence("b", [4, 5, 6], SamplingParams())
    scheduler.add(compiling)
    scheduler.add(plain)
    assert scheduler.schedule().seqs == [plain]
    compiling.grammar.ready = True
    assert scheduler.schedule().seqs == [plain, compiling]


@pytest.fixture(scope="module")
def llm(tiny_chat_model):
    from lmforge.engine.llm import LLM

    return LLM(str(tiny_chat_model), dtype="float32", kv_cache_memory=0.02, max_model_len=256,
               structured_outputs_timeout=30.0)


def _texts(llm, prompts, **params) -> list[str]:
    outs = llm.generate(prompts, SamplingParams(**params), use_tqdm=False)
    return [c.text for o in outs for c in o.outputs]


def test_every_constraint_holds_on_a_random_model(llm):
    prompts = ["Give me a pet:", "Hello", "1 2 3"]
    for text in _texts(llm, prompts, n=2, temperature=1.0, seed=3, max_tokens=120,
                       structured_outputs=StructuredOutputsParams(json=SCHEMA)):
        Pet.model_validate_json(text)  # the reference: pydantic's own validation of its own schema
    for text in _texts(llm, prompts, temperature=1.0, max_tokens=20,
                       structured_outputs=StructuredOutputsParams(regex=REGEX)):
        assert re.fullmatch(REGEX, text), text
    for text in _texts(llm, prompts, temperature=1.0, max_tokens=20,
                       structured_outputs=StructuredOutputsParams(choice=CHOICES)):
        assert text in CHOICES
    grammar = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    for text in _texts(llm, prompts, temperature=0.0, max_tokens=40,
                       structured_outputs=StructuredOutputsParams(grammar=grammar)):
        assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", text) or len(text) >= 20, text


def test_unconstrained_requests_are_unchanged_by_constrained_neighbours(llm):
    prompts = ["The weather today", "Once upon a time", "def f(x):"]
    plain = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
             SamplingParams(temperature=0.9, seed=11, max_tokens=12, ignore_eos=True),
             SamplingParams(temperature=0.7, top_p=0.9, seed=5, max_tokens=12, ignore_eos=True)]
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, plain, use_tqdm=False)]
    constrained = SamplingParams(temperature=0.8, seed=1, max_tokens=30,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA))
    mixed = llm.generate(["a", *prompts, "b"], [constrained, *plain, constrained], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[1:4]] == alone


def test_bad_constraints_are_value_errors_naming_the_field(llm):
    cases = [({"json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}, "structured_outputs.json"),
             ({"regex": "a(b"}, "structured_outputs.regex"),
             ({"grammar": "root ::= missing_rule"}, "structured_outputs.grammar")]
    for fields, field in cases:
        with pytest.raises(ValueError, match=re.escape(field)):
            llm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(**fields)), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_a_grammar_past_the_time_limit_is_refused_and_the_engine_keeps_serving(llm):
    grammars = llm.engine.grammars
    limit, compile_, slow_ = grammars.timeout_s, grammars.compile, grammars._compile
    grammars.timeout_s = 0.05
    # on a fast CPU this schema compiles within the limit: make the compile itself slow, so the limit decides
    grammars._compile = lambda *args: time.sleep(1) or slow_(*args)
    try:
        schema = {"type": "object", "properties": {f"k{i}": {"type": "string", "maxLength": 7 + i} for i in range(30)}}
        with pytest.raises(ValueError, match="took longer than"):
            llm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(json=schema)), use_tqdm=False)
        # added to the engine directly (nobody waits), a grammar that never comes is finished as aborted in time
        stuck = concurrent.futures.Future()  # a compile that began 1 s ago and never ends
        grammars._started[stuck] = time.monotonic() - 1
        grammars.compile = lambda params: stuck
        llm.engine.add_request("direct", "x", SamplingParams(structured_outputs=StructuredOutputsParams(regex="a")))
        time.sleep(0.01)
        outs = llm.engine.step()
        assert [(o.request_id, o.outputs[0].finish_reason) for o in outs] == [("direct", "abort")]
    finally:
        grammars.timeout_s = limit
        grammars.compile = compile_
        grammars._compile = slow_
    # the timed-out compiles gave their slots up: the next constraint compiles and holds
    assert re.fullmatch(REGEX, _texts(llm, "y", max_tokens=20, structured_outputs=StructuredOutputsParams(
        regex=REGEX))[0])


def test_json_object_and_no_drafts_for_constrained_rows(tiny_chat_model):
    from lmforge.engine.llm import LLM

    spec = LLM(str(tiny_chat_model), dtype="float32", kv_cache_memory=0.02, max_model_len=256,
               speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2})
    texts = _texts(spec, ["alpha beta alpha beta", "gamma gamma"], temperature=0, max_tokens=20,
                   structured_outputs=StructuredOutputsParams(choice=CHOICES))
    assert all(t in CHOICES for t in texts)
    text = _texts(spec, "{", temperature=0, max_tokens=60,
                  structured_outputs=StructuredOutputsParams(json_object=True))[0]
    assert text.startswith("{")
    try:
        assert isinstance(json.loads(text), dict)
    except ValueError:
        assert len(spec.get_tokenizer().encode(text, add_special_tokens=False)) >= 60  # cut by max_tokens only


def test_grammar_starts_after_the_thinking(llm):
    from lmforge.engine.structured import SequenceGrammar, grammar_start

    start, end = 5, 7  # <think>, </think>
    assert grammar_start([1, 2, 3], None) is None  # no reasoning parser: from the first token
    assert grammar_start([5, 9, 7, 1], (start, end)) is None  # the prompt closed the thinking (thinking off)
    assert grammar_start([1, 5, 2], (start, end)) == end  # the template opened it
    assert grammar_start([1, 2], (start, end)) == end  # the model may open it
    params = StructuredOutputsParams(regex="ab")
    grammars = llm.engine.grammars
    grammars.wait(params)
    g = SequenceGrammar(params, grammars.compile(params), grammars, start_token_id=end)
    mask = torch.full((1, (grammars.vocab_size + 31) // 32), -1, dtype=torch.int32)
    assert not g.fill(mask, 0) and (mask == -1).all()  # thinking: unconstrained
    assert g.accept(3) and g.accept(start) and not g.active
    assert g.accept(end) and g.active
    assert g.fill(mask, 0) and (mask != -1).any()  # the answer is constrained
