"""lmforge eval MODEL --data FILE: perplexity over a dataset's trained tokens, and exact match on question answering."""

import argparse
import json
import logging
import tempfile
from pathlib import Path

from lmforge.errors import LmforgeError

# As lmforge.train.eval_data and DataConfig.template say; not imported from there, so building the parser stays cheap.
FORMATS = ("auto", "alpaca", "messages", "sharegpt", "text", "qa")
TEMPLATES = ("model", "chatml", "llama3", "mistral", "alpaca")
SHOWN_MISMATCHES = 5
log = logging.getLogger("lmforge")


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity (and QA exact match) of a model on a dataset",
                       description="Token-weighted loss and perplexity over the tokens a training run on FILE would "
                                   "train (the responses of chat formats), so a run's val_loss is reproduced on its "
                                   "final model. QA rows ({\"question\", \"answer\"} or \"answers\": [...]) are also "
                                   "answered greedily through the chat template and scored by exact match and by "
                                   "whether the answer appears in the reply (SQuAD normalisation).")
    p.add_argument("model", help="model: an HF directory, .gguf file, alias or Hub id")
    p.add_argument("--data", required=True, metavar="FILE", help="a .jsonl/.json/.parquet/.csv file of rows")
    p.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter directory to apply to the model")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="row format (default auto: from the first row's keys); qa rows hold question and answer(s)")
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
    from lmforge.data import Loader
    from lmforge.hardware import compute_dtype
    from lmforge.models import resolve_dtype
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.eval_data import encode_rows, read_rows
    from lmforge.train.evaluate import evaluate
    from lmforge.weights.peft import load_adapter, read_adapter_config
    from lmforge.weights.quantized import load_for_serving
    from lmforge.weights.resolve import resolve_model

    _check_arguments(args)
    resolve_dtype(args.dtype, {})  # reject a bad --dtype before any slow work
    device = _device(args.device)
    if args.adapter:
        read_adapter_config(args.adapter)  # a wrong adapter directory fails before the model loads
    data = read_rows(args.data, args.format, args.max_samples)
    model_dir = resolve_model(args.model)
    tokenizer = Tokenizer.from_dir(model_dir)
    encoded = encode_rows(data, tokenizer, args.template, args.max_seq_len, args.train_on_inputs)
    log.info("loading %s%s", model_dir, f" with adapter {args.adapter}" if args.adapter else "")
    model, _ = load_for_serving(args.model, model_dir, args.quantization, compute_dtype(args.dtype, device),
                                str(device))
    if args.adapter:
        load_adapter(model, args.adapter)
    batches = Loader(encoded.dataset, args.batch_size, shuffle=False)
    loss = evaluate(model, batches, device, _no_autocast)
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
        results["qa"] = _report_qa(_answer(model, model_dir, tokenizer, data, args, device), args.max_tokens)
    if args.output:
        args.output.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {args.output}")
    return 0


def _answer(model, model_dir: Path, tokenizer, data, args: argparse.Namespace, device) -> list:
    """Greedy answers from the engine to every QA row, scored; the model's memory goes to the engine."""
    import torch

    from lmforge.data.templates import ChatRenderer
    from lmforge.engine.llm import LLM
    from lmforge.train.qa import answer_questions, question_prompts, score

    origins = [str(o) for o in data.origins]
    context = model.config.get("max_position_embeddings")
    prompts = question_prompts(ChatRenderer(tokenizer, args.template), data.qa, origins, context)
    # KV room for the longest question and its answer, not the whole context: a small pool then suffices.
    longest = max(len(p) for p in prompts) + args.max_tokens
    with tempfile.TemporaryDirectory(prefix="lmforge-eval-") as tmp:
        # The engine builds its model from a directory: an adapter is merged and written there for it.
        engine_dir = _write_merged(model, model_dir, Path(tmp)) if args.adapter else model_dir
        model.to("meta")  # frees the weights before the engine loads its own copy (and sizes its KV cache)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        llm = LLM(str(engine_dir), dtype=args.dtype, device=str(device), kv_cache_memory=args.kv_cache_memory,
                  max_model_len=min(longest, context or longest))
    return score(data.qa, origins, answer_questions(llm, prompts, args.max_tokens))


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


def _write_merged(model, model_dir: Path, out: Path) -> Path:
    from lmforge.weights.hf_dir import save_model
    from lmforge.weights.peft import merge_adapter

    _, config = merge_adapter(model, model.config)
    save_model(model, config, out, source_dir=model_dir)
    return out


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


def _no_autocast():
    import contextlib

    return contextlib.nullcontext()  # weights are in the compute dtype (--dtype): nothing to cast


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"
