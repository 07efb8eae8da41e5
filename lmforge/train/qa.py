"""Question answering by exact match: rows {"question", "answer" | "answers"}, greedy answers from the engine,
and SQuAD-style scoring (both texts normalised: lowercase, no punctuation, no articles, single spaces).

Exact match: the normalised prediction equals a normalised answer. Contains: a normalised answer appears in the
normalised prediction as whole words, since chat models wrap the answer in a sentence ("The capital is Paris.")."""

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmforge.data.sources import MalformedRow
from lmforge.data.templates import ChatRenderer
from lmforge.errors import LmforgeError

ARTICLES = re.compile(r"\b(a|an|the)\b")


@dataclass(frozen=True, slots=True)
class QARow:
    question: str
    answers: tuple[str, ...]  # any of them is right; the first is the reference for perplexity

    def messages(self) -> list[dict[str, str]]:
        """The question and its reference answer as a chat: what the answers' perplexity is measured on."""
        return [{"role": "user", "content": self.question}, {"role": "assistant", "content": self.answers[0]}]


@dataclass(frozen=True, slots=True)
class QAResult:
    origin: str  # file:row
    row: QARow
    prediction: str
    exact_match: bool
    contains: bool

    def to_json(self) -> dict[str, Any]:
        return {"origin": self.origin, "question": self.row.question, "answers": list(self.row.answers),
                "prediction": self.prediction, "exact_match": self.exact_match, "contains": self.contains}


def parse_qa_row(record: Any) -> QARow:
    """A QA row from a record: "question" and "answer" (a string) and/or "answers" (a list of strings)."""
    if isinstance(record, MalformedRow):
        raise record
    if not isinstance(record, dict):
        raise MalformedRow("not an object", f"the row is a {type(record).__name__}, not an object of columns")
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise MalformedRow("missing field", f"no 'question' string (columns: {sorted(record)})")
    answers: list[Any] = []
    if "answer" in record:
        answers.append(record["answer"])
    if "answers" in record:
        if not isinstance(record["answers"], list):
            raise MalformedRow("wrong type", f"'answers' must be a list of strings, got "
                                             f"{type(record['answers']).__name__}")
        answers += record["answers"]
    if not answers:
        raise MalformedRow("missing field", f"no 'answer' or 'answers' column (columns: {sorted(record)})")
    for answer in answers:
        if not isinstance(answer, str):
            raise MalformedRow("wrong type", f"answers must be strings, got {type(answer).__name__}")
        if not normalize_answer(answer):  # "The" or "?" normalise to "", which every prediction would contain
            raise MalformedRow("empty answer", f"the answer {answer!r} is empty once normalised")
    return QARow(question, tuple(answers))


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation removed (any Unicode punctuation), articles dropped, whitespace collapsed."""
    text = "".join(c for c in text.lower() if not unicodedata.category(c).startswith("P"))
    return " ".join(ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    predicted = normalize_answer(prediction)
    return any(predicted == normalize_answer(a) for a in answers)


def contains_answer(prediction: str, answers: Sequence[str]) -> bool:
    # Padded with spaces so "4" is not found inside "1945": whole words only.
    predicted = f" {normalize_answer(prediction)} "
    return any(f" {normalize_answer(a)} " in predicted for a in answers)


def question_prompts(renderer: ChatRenderer, rows: Sequence[QARow], origins: Sequence[str],
                     context: int | None) -> list[list[int]]:
    """Each question as one user message in the renderer's template, tokenised as training tokenises prompts (so
    the model sees the prompt it was trained on); a prompt that fills the model's context raises naming its row."""
    prompts = []
    for origin, row in zip(origins, rows, strict=True):
        text = renderer.render([{"role": "user", "content": row.question}], add_generation_prompt=True)
        ids = renderer.tokenizer.encode(text, add_special_tokens=False)
        if context is not None and len(ids) >= context:
            raise LmforgeError(f"{origin}: the question's prompt has {len(ids)} tokens, which leaves no room to answer "
                               f"within the model's {context}-token context")
        prompts.append(ids)
    return prompts


def answer_rows(model, tokenizer, data, template: str, max_tokens: int, kv_cache_memory: float | None = None
                ) -> list[QAResult]:
    """Greedy answers to the QA rows of `data` (an EvalRows) from the engine running this model object (with its
    LoRA layers, unmerged: nothing is written to disk), scored."""
    from lmforge.data.templates import ChatRenderer
    from lmforge.engine.llm import LLM

    origins = [str(o) for o in data.origins]
    context = model.config.get("max_position_embeddings")
    prompts = question_prompts(ChatRenderer(tokenizer, template), data.qa, origins, context)
    # KV room for the longest question and its answer, not the whole context: a small pool then suffices.
    longest = max(len(p) for p in prompts) + max_tokens
    llm = LLM(model=model, tokenizer=tokenizer, kv_cache_memory=kv_cache_memory,
              max_model_len=min(longest, context or longest))
    return score(data.qa, origins, answer_questions(llm, prompts, max_tokens))


def answer_questions(llm, prompts: Sequence[list[int]], max_tokens: int) -> list[str]:
    """Greedy replies of `llm` (an lmforge LLM) to the prompts, up to max_tokens each, without surrounding spaces."""
    from lmforge.engine.sampling_params import SamplingParams

    outputs = llm.generate(list(prompts), SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    return [out.outputs[0].text.strip() for out in outputs]


def score(rows: Sequence[QARow], origins: Sequence[str], predictions: Sequence[str]) -> list[QAResult]:
    return [QAResult(origin, row, prediction, exact_match(prediction, row.answers),
                     contains_answer(prediction, row.answers))
            for origin, row, prediction in zip(origins, rows, predictions, strict=True)]
