"""lmforge generate PROMPT: stream a continuation (greedy by default) from the command line."""

import argparse
import sys

from lmforge.cli.loading import add_model_args, load


def add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=temperature,
                   help=f"0 is greedy; higher samples more freely (default {temperature})")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 disables (default)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    p.add_argument("--max-model-len", type=int, default=4096, help="KV cache capacity in tokens (default 4096)")


def sampling_params(args: argparse.Namespace):
    from lmforge.engine.sampling_params import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, seed=args.seed, ignore_eos=getattr(args, "ignore_eos", False))


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate a continuation of a prompt",
                       description="Generate text from a prompt, streaming tokens to stdout as they come.")
    p.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    add_model_args(p)
    add_sampling_args(p, temperature=0.0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message with the chat template")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lmforge.engine.simple_generator import SimpleGenerator
    from lmforge.tokenizer import IncrementalDetokenizer

    params = sampling_params(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = load(args)
    if args.chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
    else:
        ids = tokenizer.encode(prompt)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=ids)
    for token in SimpleGenerator(model, args.max_model_len).stream(ids, params, tokenizer.eos_token_ids):
        sys.stdout.write(detok.add(token))
        sys.stdout.flush()
    sys.stdout.write(detok.finish() + "\n")
    return 0
