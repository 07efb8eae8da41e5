"""The only place YAML is read: `base:` inheritance, dotted CLI overrides, and validation errors that name the
field path, what was given and what is allowed (with the closest valid key for a typo)."""

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from lmforge.config.schema import TrainConfig
from lmforge.errors import LmforgeError


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Reads a training YAML (following `base:` files, relative to the file naming them), applies `a.b=value`
    overrides, and validates; every problem is one LmforgeError sentence."""
    path = Path(path)
    raw = _read(path, ())
    for item in overrides:
        _apply_override(raw, item)
    return validate(raw, str(path))


def validate(raw: dict, where: str) -> TrainConfig:
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as e:
        raise LmforgeError(f"{where}: {_describe(e.errors()[0], raw)}") from None


def _read(path: Path, chain: tuple[Path, ...]) -> dict:
    resolved = path.resolve()
    if resolved in chain:
        raise LmforgeError(f"{path}: `base:` inheritance loops back to itself ({' -> '.join(map(str, chain))})")
    if not path.is_file():
        raise LmforgeError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise LmforgeError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"{path}: the top level must be a mapping of keys to values, not {type(data).__name__}")
    _anchor_data_paths(data, path.parent)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise LmforgeError(f"{path}: `base` must be a path to another YAML file")
    parent = _read(path.parent / base, (*chain, resolved))
    return _merge(parent, data)


def _anchor_data_paths(data: dict, folder: Path) -> None:
    """A data file named relative to the YAML that names it is found from anywhere; other paths (Hub dataset ids,
    paths relative to the working directory) are left as written."""
    sections = data.get("data")
    if not isinstance(sections, dict):
        return
    for key in ("train", "validation"):
        for source in sections.get(key) or []:
            if isinstance(source, dict) and isinstance(source.get("path"), str):
                candidate = folder / source["path"]
                if not Path(source["path"]).is_absolute() and candidate.exists():
                    source["path"] = str(candidate.resolve())


def _merge(base: dict, child: dict) -> dict:
    """Child values win; mappings merge key by key, everything else (lists included) is replaced."""
    out = dict(base)
    for key, value in child.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise LmforgeError(f"override {item!r} must look like section.key=value (e.g. optimizer.lr=1e-4)")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    node: Any = raw
    parts = key.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):  # data.train.0.path=...: an index into a list
            if not part.isdigit() or int(part) >= len(node):
                raise LmforgeError(f"override {item!r}: {'.'.join(parts[:i])} has {len(node)} entries; "
                                   f"{part!r} is not one of their indices")
            part = int(part)
        elif not isinstance(node, dict):
            raise LmforgeError(f"override {item!r}: {'.'.join(parts[:i])} is a value, not a section")
        elif not last:
            node.setdefault(part, {})
        if last:
            node[part] = value
        else:
            node = node[part]


def _describe(err: dict, raw: dict) -> str:
    loc = [str(p) for p in err["loc"]]
    field = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        known = _known_keys(loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.5)
        if close:
            return f"unknown key {field}; did you mean {'.'.join([*loc[:-1], close[0]])}?"
        return f"unknown key {field}; valid keys here: {', '.join(known)}"
    if err["type"] == "missing":
        return f"{field} is required"
    given = err.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    message = err["msg"].removeprefix("Value error, ")
    return f"{field}: {message}{shown}" if loc else message


def _known_keys(loc: list[str]) -> list[str]:
    """Field names of the section at loc (list indices skipped), for suggestions."""
    model: type[BaseModel] = TrainConfig
    for part in loc:
        if part.isdigit():
            continue
        annotation = model.model_fields[part].annotation
        model = next(t for t in _types(annotation) if isinstance(t, type) and issubclass(t, BaseModel))
    return list(model.model_fields)


def _types(annotation: Any) -> list:
    args = getattr(annotation, "__args__", None)
    return [t for a in args for t in _types(a)] if args else [annotation]


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
