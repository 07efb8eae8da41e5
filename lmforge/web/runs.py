"""Training runs as the dashboard sees them: directories written by `lmforge train` (config.yaml, metrics.jsonl,
checkpoints/step-N, best/, final/), read while a run may still be writing them. No torch: the dashboard starts in
a second and runs beside a training process without competing for its memory.

A run is any directory under the runs root (the root itself, or up to two levels below it) that holds
metrics.jsonl or config.yaml. Its name is its path relative to the root ("." for the root itself).
"""

import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

MARKERS = ("metrics.jsonl", "config.yaml")
MAX_DEPTH = 2
STEP_DIR = re.compile(r"step-(\d+)")  # as lmforge.train.checkpoint names them
# A run without final/ counts as running while metrics.jsonl was written within this many seconds, or within ten of
# its logging intervals when steps are slower than that: a killed run turns "stopped" instead of running for ever.
RUNNING_GRACE_S = 120.0


@dataclass(frozen=True, slots=True)
class MetricsChunk:
    records: list[dict]
    offset: int  # byte offset to ask for next time: the end of the last complete line read
    reset: bool  # the file is shorter than the offset asked for (a resumed run rewrote it): records start at 0


def read_metrics(path: Path, offset: int = 0) -> MetricsChunk:
    """The records of metrics.jsonl from byte `offset` on. A line the writer has not finished yet (no newline) is
    left for the next read; a line that is not JSON is skipped rather than hiding the rest of the run."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return MetricsChunk([], 0, offset > 0)
    reset = offset > len(data)
    start = 0 if reset else offset
    end = data.rfind(b"\n", start) + 1  # 0 when no complete line follows `start`
    if end <= start:
        return MetricsChunk([], start, reset)
    records = []
    for line in data[start:end].splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append({k: _finite(v) for k, v in record.items()})
    return MetricsChunk(records, end, reset)


def _finite(value):
    """NaN and infinities (a diverged run writes them; JSON has no such numbers) as the strings "NaN", "Infinity",
    "-Infinity", which the page shows as they are and leaves out of its curves."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def find_runs(root: Path) -> dict[str, Path]:
    """Run directories under `root` by name, sorted by name."""
    found = {}
    level = [root]
    for _ in range(MAX_DEPTH + 1):
        below = []
        for folder in level:
            if any((folder / marker).is_file() for marker in MARKERS):
                name = folder.relative_to(root).as_posix()
                found[name] = folder
                continue  # a run's own subdirectories (checkpoints, best, final) are not runs
            below.extend(sorted(p for p in _subdirs(folder)))
        level = below
    return dict(sorted(found.items()))


def _subdirs(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:  # unreadable or removed while listing
        return []


def read_config(run: Path) -> tuple[str, dict]:
    """config.yaml's text (the resolved config the run trains with) and its parsed form ({} if unreadable)."""
    try:
        text = (run / "config.yaml").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):  # absent, unreadable, or not text
        return "", {}
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        parsed = None
    return text, parsed if isinstance(parsed, dict) else {}


def checkpoints(run: Path) -> list[dict]:
    """Periodic checkpoints (checkpoints/step-N) then best/ and final/, each with its path and time written."""
    folder = run / "checkpoints"
    steps = sorted((int(m.group(1)), p) for p in _subdirs(folder) if (m := STEP_DIR.fullmatch(p.name)))
    found = [*steps, *((None, run / name) for name in ("best", "final"))]
    out = []
    for step, path in found:
        try:
            written = path.stat().st_mtime
        except FileNotFoundError:  # not written, or rotated away (keep_last) or replaced since the listing
            continue
        out.append({"name": path.name, "step": step, "path": str(path), "written": written})
    return out


@dataclass(frozen=True, slots=True)
class RunSummary:
    name: str
    path: str
    recipe: str | None
    method: str | None
    model: str | None
    status: str  # "finished" (final/ written), "running" (metrics written lately) or "stopped"
    updated: float | None  # when metrics.jsonl (or config.yaml) was last written, Unix seconds
    step: int | None
    loss: float | None  # the last training loss logged
    val_loss: float | None  # the last validation loss logged
    best_val_loss: float | None
    tokens_per_s: float | None

    def to_json(self) -> dict:
        return asdict(self)


class RecordCache:
    """metrics.jsonl's records per file, parsed again only when the file changed (size or modification time): every
    open dashboard page asks for every run's summary at each poll."""

    def __init__(self):
        self.entries: dict[Path, tuple[tuple[int, int], list[dict]]] = {}

    def records(self, path: Path) -> list[dict]:
        try:
            stat = path.stat()
        except FileNotFoundError:
            return []
        key = (stat.st_mtime_ns, stat.st_size)
        cached = self.entries.get(path)
        if cached is None or cached[0] != key:
            cached = self.entries[path] = (key, read_metrics(path).records)
        return cached[1]


def summarize(name: str, run: Path, now: float | None = None, cache: RecordCache | None = None) -> RunSummary:
    _, config = read_config(run)
    path = run / "metrics.jsonl"
    records = cache.records(path) if cache is not None else read_metrics(path).records
    train = [r for r in records if "loss" in r]
    val = [r["val_loss"] for r in records if isinstance(r.get("val_loss"), int | float)]
    model = config.get("model", {}).get("path") if isinstance(config.get("model"), dict) else None
    updated = _last_written(run)
    return RunSummary(name=name, path=str(run), recipe=config.get("recipe"), method=config.get("method"),
                      model=model, status=_status(run, config, train, updated, now), updated=updated,
                      step=max((r["step"] for r in records), default=None),
                      loss=train[-1]["loss"] if train else None, val_loss=val[-1] if val else None,
                      best_val_loss=min(val) if val else None,
                      tokens_per_s=train[-1].get("tokens_per_s") if train else None)


def _last_written(run: Path) -> float | None:
    times = []
    for marker in MARKERS:
        try:
            times.append((run / marker).stat().st_mtime)
        except FileNotFoundError:
            pass
    return max(times, default=None)


def _status(run: Path, config: dict, train: list[dict], updated: float | None, now: float | None) -> str:
    if (run / "final").is_dir():
        return "finished"
    if updated is None:
        return "stopped"
    every = config.get("logging", {}).get("every_steps", 1) if isinstance(config.get("logging"), dict) else 1
    step_s = train[-1].get("seconds", 0.0) if train else 0.0
    grace = max(RUNNING_GRACE_S, 10 * step_s * (every if isinstance(every, int) else 1))
    return "running" if (time.time() if now is None else now) - updated < grace else "stopped"
