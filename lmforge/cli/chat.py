"""lmforge chat: an interactive conversation using the model's chat template, streamed."""

import argparse
import sys

from lmforge.cli.generate import add_sampling_args, sampling_params
from lmforge.cli.loading import add_model_args, load

HELP = "commands: /reset clears the conversation, /exit (or Ctrl-D) quits"


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal",
                       description=f"Interactive chat with streaming replies; {HELP}.")
    add_model_args(p)
    add_sampling_args(p, temperature=0.7)
    p.add_argument("--system", default=None, help="a system message that opens the conversation")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lmforge.engine.simple_generator import SimpleGenerator
    from lmforge.errors import LmforgeError
    from lmforge.tokenizer import IncrementalDetokenizer

    params = sampling_params(args)
    model, tokenizer = load(args)
    if tokenizer.chat_template is None:
        raise LmforgeError("this model has no chat template; use `lmforge generate` instead")
    generator = SimpleGenerator(model, args.max_model_len)
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
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        while len(ids) + params.max_tokens > args.max_model_len and len(messages) > len(opening) + 1:
            del messages[len(opening): len(opening) + 2]  # forget the oldest exchange to stay in context
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        detok = IncrementalDetokenizer(tokenizer, prompt_ids=ids)
        for token in generator.stream(ids, params, tokenizer.eos_token_ids):
            sys.stdout.write(detok.add(token))
            sys.stdout.flush()
        sys.stdout.write(detok.finish() + "\n")
        messages.append({"role": "assistant", "content": detok.text.strip()})
