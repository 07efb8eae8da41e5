"""lmforge eval MODEL --data FILE: perplexity over a dataset's trained tokens, and exact match on question answering."""

import argparse
import json
import logging
from pathlib import Path

from lmforge.errors import LmforgeError

# As lmforge.train.eval_data and DataConfig.template say; not imported from there, so building the parser stays cheap.
FORMATS = ("auto", "alpaca", "messages", "sharegpt", "text", "qa", "preference")
TEMPLATES = ("model", "chatml", "llama3", "mistral", "alpaca")
SHOWN_MISMATCHES = 5
log = logging.getLogger("lmforge")


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, QA exact match or preference accuracy of a model on a dataset",
                       description="Token-weighted loss and perplexity over the tokens a training run on FILE would "
                                   "train (the responses of chat formats), so a run's val_loss is reproduced on its "
                                   "final model. QA rows ({\"question\", \"answer\"} or \"answers\": [...]) are also "
                                   "answered greedily through the chat template and scored by exact match and by "
                                   "whether the answer appears in the reply (SQuAD normalisation). Preference rows "
                                   "({\"prompt\", \"chosen\", \"rejected\"}) are scored by preference accuracy: the "
                                   "share of pairs whose chosen answer has the higher implicit reward (log-prob of "
                                   "the model minus that of the reference: the base under --adapter, or "
                                   "--reference), as TRL's rewards/accuracies; a reward model (a sequence-"
                                   "classification directory, as recipe: reward saves it) scores both answers "
                                   "itself, and its accuracy is the share where the chosen one scores higher.")
    p.add_argument("model", help="model: an HF directory, .gguf file, alias or Hub id")
    p.add_argument("--data", required=True, metavar="FILE", help="a .jsonl/.json/.parquet/.csv file of rows")
    p.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter directory to apply to the model")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="row format (default auto: from the first row's keys); qa rows hold question and answer(s), "
                        "preference rows prompt, chosen and rejected")
    p.add_argument("--reference", metavar="MODEL",
                   help="preference rows: the reference model of the implicit reward (default: the base model with "
                        "--adapter; else none, and the reward is the answer's mean token log-prob)")
    p.add_argument("--template", choices=TEMPLATES, default="model",
                   help="prompt format, as data.template in training (default: the model's chat template)")
    p.add_argument("--max-seq-len", type=int, default=2048,
                   help="tokens per sample, longer ones truncated as training truncates them (default 2048; use the "
                        "run's data.max_seq_len to reproduce its val_loss)")
    p.add_argument("--train-on-inputs", action="store_true", help="score prompt tokens too (as data.train_on_inputs)")
    p.add_argument("--batch-size", type=int, default=4, help="packed rows of --max-seq-len tokens per forward")
    p.add_argument("--dtype", default="auto", help="weight and compute dtype: auto (bfloat16 where the device "
                   "computes it natively, else float32), float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda[:N]")
    p.add_argument("--quantization", choices=("int8", "int4", "gguf"), default=None,
                   help="score the model with weight-only quantised linears, as the engine serves them (gguf: the "
                   ".gguf model's own blocks, the default for a .gguf path)")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N rows")
    p.add_argument("--max-tokens", type=int, default=32, help="most tokens of a QA answer (default 32)")
    p.add_argument("--kv-cache-memory", type=float, default=None, metavar="GIB",
                   help="KV cache of the engine answering QA rows (default: the engine's)")
    p.add_argument("--output", "-o", type=Path, metavar="FILE", help="write the results (QA: every prediction) as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import contextlib

    from lmforge.data import Loader
    from lmforge.hardware import compute_dtype
    from lmforge.models import resolve_dtype
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.eval_data import encode_rows, read_rows
    from lmforge.train.evaluate import evaluate, load_evaluated_model
    from lmforge.train.qa import answer_rows
    from lmforge.weights.peft import read_adapter_config
    from lmforge.weights.resolve import resolve_model

    _check_arguments(args)
    resolve_dtype(args.dtype, {})  # reject a bad --dtype before any slow work
    device = _device(args.device)
    if args.adapter:
        read_adapter_config(args.adapter)  # a wrong adapter directory fails before the model loads
    data = read_rows(args.data, args.format, args.max_samples)
    if args.reference and data.format != "preference":
        raise LmforgeError(f"--reference applies to preference rows; {data.source} holds {data.format} rows")
    model_dir = resolve_model(args.model)
    reward_model = _is_reward_model(model_dir)
    if reward_model:
        _check_reward_arguments(args, data)
    tokenizer = Tokenizer.from_dir(model_dir)
    encoded = encode_rows(data, tokenizer, args.template, args.max_seq_len, args.train_on_inputs)
    if reward_model:
        return _write(args.output, _reward_accuracy(args, model_dir, encoded, data, device))
    log.info("loading %s%s", model_dir, f" with adapter {args.adapter}" if args.adapter else "")
    model = load_evaluated_model(args.model, model_dir, args.adapter, compute_dtype(args.dtype, device), device,
                                 args.quantization)
    if data.format == "preference":
        results = _preference_accuracy(args, model, encoded, data, compute_dtype(args.dtype, device), device)
        return _write(args.output, results)
    # weights are in the compute dtype (--dtype): no autocast
    loss = evaluate(model, Loader(encoded.dataset, args.batch_size, shuffle=False), device, contextlib.nullcontext)
    samples = len(encoded.dataset)
    results = {"model": str(args.model), "adapter": args.adapter, "data": data.source, "format": data.format,
               "template": args.template, "max_seq_len": args.max_seq_len, "loss": loss["val_loss"],
               "perplexity": loss["val_ppl"], "tokens": loss["val_tokens"], "samples": samples,
               "skipped": encoded.skipped}
    print(f"{data.source} ({data.format}): loss {loss['val_loss']:.4f}  perplexity {loss['val_ppl']:.3f}  "
          f"tokens {loss['val_tokens']}  samples {samples}")
    if encoded.skipped:
        print(f"skipped {encoded.skipped} rows with nothing to score (first: {encoded.first_skipped})")
    if data.qa is not None:
        scored = answer_rows(model, tokenizer, data, args.template, args.max_tokens, args.kv_cache_memory)
        results["qa"] = _report_qa(scored, args.max_tokens)
    return _write(args.output, results)


def _write(output: Path | None, results: dict) -> int:
    if output:
        output.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {output}")
    return 0


def _preference_accuracy(args: argparse.Namespace, model, encoded, data, dtype, device) -> dict:
    """Preference accuracy and mean reward margin over every pair (train/evaluate.py pair_rewards)."""
    from lmforge.data import Loader
    from lmforge.train.evaluate import load_evaluated_model, pair_rewards
    from lmforge.weights.resolve import resolve_model

    reference, named = None, "none (mean token log-prob)"
    if args.reference:
        reference = load_evaluated_model(args.reference, resolve_model(args.reference), None, dtype, device)
        if reference.config.get("vocab_size") != model.config.get("vocab_size"):
            raise LmforgeError(f"--reference {args.reference} has another vocabulary than {args.model}")
        named = args.reference
    elif args.adapter:
        reference, named = "adapters-off", f"{args.model} (the adapter's base)"
    chosen, rejected = pair_rewards(model, Loader(encoded.dataset, args.batch_size, shuffle=False), device, reference)
    return {"model": str(args.model), "adapter": args.adapter, "reference": named,
            **_pair_summary(data, encoded, chosen, rejected, f"reference: {named}"),
            "margins": [round(float(m), 6) for m in chosen - rejected]}


def _reward_accuracy(args: argparse.Namespace, model_dir: Path, encoded, data, device) -> dict:
    """A reward model's pairwise accuracy: the share of pairs whose chosen answer it scores higher (TRL's accuracy)."""
    import torch

    from lmforge.data import Loader
    from lmforge.hardware import compute_dtype
    from lmforge.layers.attention import AttnMeta
    from lmforge.train.reward import load_reward_model

    log.info("loading reward model %s", model_dir)
    model = load_reward_model(model_dir, compute_dtype(args.dtype, device), device)
    chosen, rejected = [], []
    with torch.no_grad():
        for batch in Loader(encoded.dataset, args.batch_size, shuffle=False):
            batch = batch.to(device)
            scores = model(batch.input_ids, batch.positions, AttnMeta.for_training(batch.cu_seqlens, batch.prefix_lens))
            chosen.append(scores[0::2])
            rejected.append(scores[1::2])
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    return {"model": str(args.model), "reward_model": True,
            **_pair_summary(data, encoded, chosen, rejected, f"reward model: {args.model}"),
            "chosen_rewards": [round(float(r), 6) for r in chosen],
            "rejected_rewards": [round(float(r), 6) for r in rejected]}


def _pair_summary(data, encoded, chosen, rejected, scored_by: str) -> dict:
    """Prints and returns the accuracy (chosen rewarded above rejected) and mean margin over every pair."""
    wins, n = int((chosen > rejected).sum()), len(chosen)
    margin = float((chosen - rejected).mean())
    print(f"{data.source} (preference): accuracy {wins}/{n} ({wins / n:.1%})  mean margin {margin:.4f}  {scored_by}")
    if encoded.skipped:
        print(f"skipped {encoded.skipped} pairs with nothing to score (first: {encoded.first_skipped})")
    return {"data": data.source, "format": "preference", "preference_accuracy": wins / n, "correct": wins,
            "pairs": n, "mean_margin": margin, "skipped": encoded.skipped}


def _is_reward_model(model_dir: Path) -> bool:
    """An HF directory of a sequence-classification (reward) model, as recipe: reward saves them."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return False
    archs = json.loads(config.read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def _check_reward_arguments(args: argparse.Namespace, data) -> None:
    if data.format != "preference":
        raise LmforgeError(f"{args.model} is a reward model: it scores preference rows (prompt, chosen, rejected), "
                           f"but {data.source} holds {data.format} rows")
    for flag, value in (("--adapter", args.adapter), ("--reference", args.reference),
                        ("--quantization", args.quantization)):
        if value:
            raise LmforgeError(f"{flag} does not apply to {args.model}, a reward model (its adapter is merged in)")


def _report_qa(scored: list, max_tokens: int) -> dict:
    n = len(scored)
    exact, contains = sum(r.exact_match for r in scored), sum(r.contains for r in scored)
    print(f"exact match {exact}/{n} ({exact / n:.1%})  contains {contains}/{n} ({contains / n:.1%})")
    misses = [r for r in scored if not r.exact_match]
    if misses:
        print(f"mismatches ({min(len(misses), SHOWN_MISMATCHES)} of {len(misses)}):")
        for r in misses[:SHOWN_MISMATCHES]:
            print(f"  {r.origin}: expected {r.row.answers[0]!r}, got {_clip(r.prediction)!r}"
                  f"{' (contains it)' if r.contains else ''}")
    return {"exact_match": exact / n, "contains": contains / n, "exact_match_count": exact,
            "contains_count": contains, "total": n, "max_tokens": max_tokens,
            "predictions": [r.to_json() for r in scored]}


def _check_arguments(args: argparse.Namespace) -> None:
    if args.output and not args.output.parent.is_dir():  # found out now, not after the whole evaluation
        raise LmforgeError(f"--output {args.output}: directory {args.output.parent} does not exist")
    for flag, value, least in (("--max-seq-len", args.max_seq_len, 8), ("--batch-size", args.batch_size, 1),
                               ("--max-samples", args.max_samples, 1), ("--max-tokens", args.max_tokens, 1)):
        if value is not None and value < least:
            raise LmforgeError(f"{flag} must be at least {least}, got {value}")


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LmforgeError(f"unknown --device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmforgeError("--device cuda, but torch sees no CUDA device")
    return device


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"
