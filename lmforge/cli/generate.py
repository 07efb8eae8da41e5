"""lmforge generate: one prompt streamed to stdout, or a file of prompts run as one batch into JSONL."""

import argparse
import json
import sys
from pathlib import Path

from lmforge.cli.engine_args import add_engine_args, add_sampling_args, build_llm, sampling_params
from lmforge.errors import LmforgeError


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text for a prompt or a file of prompts",
                       description="Generate a continuation of PROMPT, streamed to stdout; or, with --prompts, run a "
                                   "file of prompts (one per line, or JSONL with 'prompt' or 'messages') as one "
                                   "batch and write JSONL results.")
    p.add_argument("prompt", nargs="?", help="the prompt text ('-' reads it from stdin)")
    p.add_argument("--prompts", type=Path, metavar="FILE", help="file of prompts: one per line, or JSONL objects "
                   "with 'prompt' (text) or 'messages' (a chat)")
    p.add_argument("--output", "-o", type=Path, metavar="FILE", help="JSONL results file (default: stdout)")
    p.add_argument("--chat", action="store_true", help="wrap text prompts as a user message with the chat template")
    add_engine_args(p)
    add_sampling_args(p, temperature=0.0)
    p.set_defaults(run=run)


def read_prompts(path: Path) -> list[dict]:
    """Each line: plain text, or a JSON object with 'prompt' or 'messages'. Errors name the line."""
    if not path.is_file():
        raise LmforgeError(f"prompts file {path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LmforgeError(f"{path}:{number}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not ("prompt" in row or "messages" in row):
                raise LmforgeError(f"{path}:{number}: a JSON line needs a 'prompt' string or a 'messages' list")
            rows.append(row)
        else:
            rows.append({"prompt": line})
    if not rows:
        raise LmforgeError(f"prompts file {path} holds no prompts")
    return rows


def to_ids(tokenizer, row: dict, chat: bool) -> list[int]:
    if "messages" in row:
        return tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=True)
    if not isinstance(row["prompt"], str):
        raise LmforgeError("'prompt' must be a string")
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                             add_generation_prompt=True, tokenize=True)
    return tokenizer.encode(row["prompt"])


def run(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.prompts is None):
        raise LmforgeError("give either a PROMPT or --prompts FILE")
    params = sampling_params(args)
    rows = read_prompts(args.prompts) if args.prompts else None
    llm = build_llm(args)
    tok = llm.get_tokenizer()
    if rows is None:
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        for piece in llm.stream(to_ids(tok, {"prompt": prompt}, args.chat), params):
            sys.stdout.write(piece)
        sys.stdout.write("\n")
        return 0
    prompts = [to_ids(tok, row, args.chat) for row in rows]
    outputs = llm.generate(prompts, params)
    out = args.output.open("w", encoding="utf-8") if args.output else sys.stdout
    try:
        for row, result in zip(rows, outputs, strict=True):
            completion = result.outputs[0]
            record = {**row, "text": completion.text, "token_ids": completion.token_ids,
                      "finish_reason": completion.finish_reason, "prompt_tokens": len(result.prompt_token_ids),
                      "completion_tokens": len(completion.token_ids)}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if args.output:
            out.close()
    return 0
