"""lmforge data preview CONFIG: the first samples as the model will be trained on them, and token statistics."""

import argparse
import os
import sys
from pathlib import Path

from lmforge.errors import LmforgeError

DIM, GREEN, RESET = "\x1b[2m", "\x1b[32m", "\x1b[0m"
OPEN, CLOSE = "⟦", "⟧"  # plain-text marker around untrained text


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="inspect training data: formatted samples, loss masks, token statistics",
                       description="Inspect the training data of a config.")
    commands = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    preview = commands.add_parser(
        "preview", help="print formatted samples with their trained spans, then token statistics",
        description="Tokenise the config's data (only the model's tokenizer is loaded, no weights) and print the "
                    "first N training samples with the trained text marked, then token statistics.")
    preview.add_argument("config", help="training YAML file")
    preview.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (data.max_seq_len=256)")
    preview.add_argument("-n", type=int, default=3, metavar="N", help="samples to print (default 3)")
    preview.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                         help="ANSI colours for trained/untrained text (default: when stdout is a terminal)")
    preview.set_defaults(run=run)
    task = commands.add_parser(
        "task", help="write a built-in prompt task with checkable answers (format: prompt rows for recipe grpo)",
        description="Write problems of a built-in task as format: prompt rows ({\"prompt\": [...], \"answer\": "
                    "...}), drawn from a seeded generator, every problem distinct; --held-out K more go to a second "
                    "file, none of them in the first.")
    task.add_argument("name", choices=["arithmetic"], help="arithmetic: 'What is a + b?' over + - x")
    task.add_argument("out", type=Path, help="JSONL file to write")
    task.add_argument("--count", type=int, default=400, help="problems in OUT (default 400)")
    task.add_argument("--held-out", type=int, default=0, metavar="K", help="problems written to --held-out-file")
    task.add_argument("--held-out-file", type=Path, help="where the K held-out problems go")
    task.add_argument("--seed", type=int, default=0)
    task.add_argument("--max-operand", type=int, default=20, help="operands are drawn from 0..M (default 20)")
    task.add_argument("--operations", default="+-x", help="any of + - x (default +-x)")
    task.set_defaults(run=write_task)


def write_task(args: argparse.Namespace) -> int:
    import json

    from lmforge.data.tasks import TASKS

    if args.count < 1 or args.held_out < 0 or (args.held_out > 0) != (args.held_out_file is not None):
        raise LmforgeError("--count must be positive, and --held-out K > 0 goes with --held-out-file (both or "
                           "neither)")
    try:
        rows = TASKS[args.name](args.count + args.held_out, args.seed, args.max_operand, args.operations)
    except ValueError as e:
        raise LmforgeError(f"lmforge data task {args.name}: {e}") from None
    for path, part in ((args.out, rows[:args.count]), (args.held_out_file, rows[args.count:])):
        if path is not None:
            path.write_text("".join(json.dumps(r) + "\n" for r in part))
            print(f"{path}: {len(part)} {args.name} problems")
    return 0


def run(args: argparse.Namespace) -> int:
    from lmforge.config import load_config
    from lmforge.data import KTODataset, PairDataset, build_datasets
    from lmforge.tokenizer import Tokenizer

    if args.n < 0:
        raise LmforgeError(f"-n must be 0 or more, got {args.n}")
    cfg = load_config(args.config, args.overrides)
    tokenizer = Tokenizer.from_dir(tokenizer_dir(cfg.model.path))
    if cfg.recipe == "grpo":
        return _prompts(cfg, tokenizer, args.n)
    datasets = build_datasets(cfg.data, tokenizer, cfg.seed)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and "NO_COLOR" not in os.environ)
    train = datasets.train
    print("legend: " + (f"{GREEN}trained{RESET} {DIM}not trained{RESET}" if color else
                        f"trained text plain, {OPEN}not trained{CLOSE}"))
    for i in range(min(args.n, len(train))):
        if isinstance(train, PairDataset):
            print(_preference(tokenizer, train.pairs, i, color))
        elif isinstance(train, KTODataset):
            print(_unpaired(tokenizer, train.data, i, color))
        else:
            s = train.samples
            trained = int(s.trained[i].sum())
            print(f"\n── sample {i + 1} ({s.origins[i]}) · {len(s.tokens[i])} tokens, {trained} trained"
                  f"{' · truncated' if s.truncated[i] else ''} ──")
            print(marked(tokenizer, s.tokens[i], s.trained[i], color))
    print()
    print(datasets.report)
    return 0


def _prompts(cfg, tokenizer, n: int) -> int:
    """A grpo config's prompt rows as the engine receives them, with the columns the rewards read."""
    from lmforge.data.prompts import load_prompts

    rows = load_prompts(cfg.data.train, "data.train", cfg.data, tokenizer,
                        cfg.data.max_seq_len - cfg.grpo.max_completion_length, cfg.data.max_samples)
    for row in rows[:n]:
        print(f"\n── prompt ({row.origin}) · {len(row.token_ids)} tokens · columns {row.columns} ──")
        print(tokenizer.decode(row.token_ids, skip_special_tokens=False))
    lengths = sorted(len(r.token_ids) for r in rows)
    print(f"\n{len(rows)} prompts; tokens min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}")
    return 0


def tokenizer_dir(spec: str) -> Path:
    """The model's directory, with only the tokenizer files fetched when it is a Hub id (no weights)."""
    from lmforge.weights.resolve import ALIASES, hub_snapshot, resolve_model

    parts = spec.split("/")
    if not Path(spec).expanduser().exists() and spec not in ALIASES and len(parts) == 2 and all(parts):
        return hub_snapshot(spec, ("*.json", "tokenizer*", "*.jinja"))
    return resolve_model(spec)


def _preference(tokenizer, data, i: int, color: bool) -> str:
    prompt = data.prompt[i]
    parts = [f"\n── pair {i + 1} ({data.origins[i]}) · prompt {len(prompt)} tokens ──",
             marked(tokenizer, prompt, [False] * len(prompt), color)]
    for name, ids, trained in (("chosen", data.chosen[i], data.chosen_trained[i]),
                               ("rejected", data.rejected[i], data.rejected_trained[i])):
        parts += [f"── {name}: {len(ids)} tokens, {int(sum(trained))} trained ──", marked(tokenizer, ids, trained,
                                                                                            color)]
    return "\n".join(parts)


def _unpaired(tokenizer, data, i: int, color: bool) -> str:
    prompt, completion, trained = data.prompt[i], data.completion[i], data.completion_trained[i]
    label = "true (desirable)" if data.desirable[i] else "false (undesirable)"
    return "\n".join([f"\n── row {i + 1} ({data.origins[i]}) · label {label} · prompt {len(prompt)} tokens ──",
                      marked(tokenizer, prompt, [False] * len(prompt), color),
                      f"── completion: {len(completion)} tokens, {int(sum(trained))} trained ──",
                      marked(tokenizer, completion, trained, color)])


def marked(tokenizer, tokens, trained, color: bool) -> str:
    """The sample's text, each run of trained / untrained tokens decoded on its own and marked."""
    out, start = [], 0
    for end in range(1, len(tokens) + 1):
        if end == len(tokens) or bool(trained[end]) != bool(trained[start]):
            text = tokenizer.decode(tokens[start:end], skip_special_tokens=False)
            if color:
                out.append(f"{GREEN if trained[start] else DIM}{text}{RESET}")
            else:
                out.append(text if trained[start] else f"{OPEN}{text}{CLOSE}")
            start = end
    return "".join(out)
