"""lmforge chat: an interactive conversation using the model's chat template, streamed from the engine."""

import argparse
import sys

from lmforge.cli.engine_args import add_engine_args, add_sampling_args, build_llm, sampling_params

HELP = "commands: /reset clears the conversation, /exit (or Ctrl-D) quits"


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal",
                       description=f"Interactive chat with streaming replies; {HELP}.")
    p.add_argument("--system", default=None, help="a system message that opens the conversation")
    add_engine_args(p)
    add_sampling_args(p, temperature=0.7)
    p.set_defaults(run=run)


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    from lmforge.errors import LmforgeError

    params = sampling_params(args)
    llm = build_llm(args)
    tok = llm.get_tokenizer()
    if tok.chat_template is None:
        raise LmforgeError("this model has no chat template; use `lmforge generate` instead")
    opening = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(opening)
    interactive = sys.stdin.isatty()
    if interactive:
        print(HELP, file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = list(opening)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        while len(ids) + params.max_tokens > llm.engine.max_model_len and len(messages) > len(opening) + 1:
            del messages[len(opening): len(opening) + 2]  # forget the oldest exchange to stay in context
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        pieces = []
        for piece in llm.stream(ids, params):
            _write(piece)
            pieces.append(piece)
        reply = "".join(pieces)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply.strip()})
    return 0
