"""lmforge config check | schema: validate a training YAML and print its memory plan, or document every key."""

import argparse
import typing
from pathlib import Path

from pydantic import BaseModel


def add_parser(sub) -> None:
    p = sub.add_parser("config", help="check a training config, or print the config schema",
                       description="`check CONFIG [KEY=VALUE ...]` validates the YAML (nothing is trained, no weights "
                                   "are loaded) and prints the plan: parameters, memory of weights, gradients, "
                                   "optimizer state and activations, the effective batch. `schema` prints every key "
                                   "with its type, default and meaning.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="validate a config and print the plan")
    check.add_argument("config", type=Path)
    check.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    check.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="plan for N training processes (torchrun's world size; default 1)")
    check.set_defaults(run=run_check)
    schema = actions.add_parser("schema", help="print the documented schema")
    schema.set_defaults(run=run_schema)


def run_check(args: argparse.Namespace) -> int:
    import torch

    from lmforge.config import load_config
    from lmforge.errors import LmforgeError
    from lmforge.models.config import read_config
    from lmforge.train.plan import memory_plan
    from lmforge.weights.resolve import resolve_config_dir

    cfg = load_config(args.config, args.overrides)
    print(f"{args.config}: valid")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    cfg = cfg.on_device(torch.device("cuda" if cuda else "cpu"))  # the plan needs precision: auto resolved
    if args.nproc < 1:
        raise LmforgeError(f"--nproc must be at least 1, got {args.nproc}")
    try:
        accumulation = cfg.grad_accumulation(args.nproc)
    except ValueError as e:
        raise LmforgeError(str(e)) from None
    row = cfg.data.max_seq_len * (2 if cfg.recipe in ("dpo", "reward") else 1)  # a row holds whole pairs
    print(f"recipe: {cfg.recipe}; method: {cfg.method}; precision: {cfg.precision}; effective batch: "
          f"{cfg.batch_size} rows of at most {row} tokens = micro-batch {cfg.micro_batch_size} x gradient accumulation "
          f"{accumulation}" + (f" x {args.nproc} processes ({cfg.distributed.strategy}; per-process plan below)"
                               if args.nproc > 1 else ""))
    try:
        hf_config = read_config(resolve_config_dir(cfg.model.path))
    except LmforgeError as e:  # a Hub model not on this machine: the config is still valid, the plan needs its shape
        print(f"memory plan unavailable: {e}")
        return 0
    teacher_config = None
    if cfg.recipe == "distill":
        try:
            teacher_config = read_config(resolve_config_dir(cfg.distill.teacher))
        except LmforgeError as e:
            print(f"memory plan without the teacher: {e}")
    for line in memory_plan(cfg, hf_config, args.nproc, teacher_config).lines():
        print(line)
    return 0


def run_schema(args: argparse.Namespace) -> int:
    from lmforge.config.schema import TrainConfig

    for line in schema_lines(TrainConfig):
        print(line)
    return 0


def schema_lines(model: type[BaseModel], prefix: str = "") -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        section = next((t for t in _types(field.annotation) if isinstance(t, type) and issubclass(t, BaseModel)), None)
        key = f"{prefix}{name}"
        if section is not None:
            lines.append(f"{key}:{'  (list of)' if _is_list(field.annotation) else ''}")
            lines.extend(schema_lines(section, f"{key}{'[].' if _is_list(field.annotation) else '.'}"))
            continue
        default = "required" if field.is_required() else f"default {field.default!r}"
        about = f" — {field.description}" if field.description else ""
        lines.append(f"  {key}: {_type_name(field.annotation)} ({default}){about}")
    return lines


def _types(annotation) -> list:
    args = typing.get_args(annotation)
    return [t for a in args for t in _types(a)] if args else [annotation]


def _is_list(annotation) -> bool:
    return typing.get_origin(annotation) is list


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    args = typing.get_args(annotation)
    if args:
        inner = ", ".join(_type_name(a) for a in args)
        origin = typing.get_origin(annotation)
        return inner.replace(", ", " | ") if origin in (typing.Union, __import__("types").UnionType) \
            else f"{getattr(origin, '__name__', origin)}[{inner}]"
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))
