"""Builds the DPO demo pairs: pirate answers (chosen) against SmolLM2-135M-Instruct's own plain answers (rejected).

For every row of pirate_demo.jsonl / pirate_demo_val.jsonl ({"messages": [user, assistant]}) the base model answers
the user question greedily (temperature 0, max_tokens 80) through its chat template, as `lmforge generate --chat`
renders a text prompt. The reply becomes "rejected", the pirate answer "chosen":

    {"prompt": <user question>, "chosen": <pirate answer>, "rejected": <model's plain answer>}

A reply cut by max_tokens is truncated after its last complete sentence (dropped if it has none); an empty reply,
or one that already sounds like a pirate ("arr", "matey", "ahoy", ...), is dropped, since it would not be a
preference against the pirate style. Validation pairs come from the _val file only (held out from training).

Rerun (from the repository root, a few minutes on one core; output is deterministic):

    taskset -c 1 env OMP_NUM_THREADS=1 python configs/data/make_pirate_pairs.py
"""

import json
import re
import sys
from pathlib import Path

from lmforge import LLM, SamplingParams

HERE = Path(__file__).resolve().parent
SPLITS = {"pirate_demo.jsonl": "pirate_pairs.jsonl", "pirate_demo_val.jsonl": "pirate_pairs_val.jsonl"}
MAX_TOKENS = 80
PIRATE = re.compile(r"\b(arr+|matey|mateys|ahoy|avast|yo ho|shiver me|me hearties|landlubber|aye)\b", re.IGNORECASE)
SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
LIST_MARKER = re.compile(r"\n\s*\d+\.$")  # "...\n\n3." ends like a sentence but is an empty list item


def plain_reply(text: str, finish_reason: str) -> str | None:
    """The reply as a rejected answer, or None when it cannot serve as one."""
    text = text.strip()
    if finish_reason == "length":  # cut mid-thought: keep only the complete sentences
        ends = [m.end() for m in SENTENCE_END.finditer(text)]
        text = LIST_MARKER.sub("", text[:ends[-1]]).strip() if ends else ""
    if not text or PIRATE.search(text):
        return None
    return text


def make_split(llm: LLM, source: Path, target: Path) -> tuple[int, int, int]:
    """Writes target's pairs; returns (rows in, pairs out, replies truncated at a sentence)."""
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    questions = [row["messages"][0]["content"] for row in rows]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    outputs = llm.chat([[{"role": "user", "content": q}] for q in questions], params, use_tqdm=False)
    pairs, truncated = [], 0
    for row, question, out in zip(rows, questions, outputs, strict=True):
        completion = out.outputs[0]
        rejected = plain_reply(completion.text, completion.finish_reason)
        if rejected is None:
            continue
        truncated += completion.finish_reason == "length"
        pairs.append({"prompt": question, "chosen": row["messages"][1]["content"], "rejected": rejected})
    target.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    return len(rows), len(pairs), truncated


def main() -> None:
    llm = LLM("smollm2-135m", dtype="float32", seed=0)
    for source, target in SPLITS.items():
        n_in, n_out, truncated = make_split(llm, HERE / source, HERE / target)
        print(f"{target}: {n_out} pairs from {n_in} rows ({n_in - n_out} dropped, {truncated} truncated at a "
              "sentence)", file=sys.stderr)


if __name__ == "__main__":
    main()
