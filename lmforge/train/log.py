"""Metrics of a run: metrics.jsonl always, a live progress line, and optional TensorBoard / W&B / MLflow sinks."""

import importlib.util
import json
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from lmforge.errors import LmforgeError

log = logging.getLogger("lmforge")


class MetricsLog:
    """`write(step, metrics)` appends one JSON line (flushed, so a killed run keeps what it logged) and forwards
    the numbers to the configured backends; `progress(...)` updates the bar."""

    def __init__(self, run_dir: Path, backends: list[str], project: str, config: dict, total_steps: int,
                 start_step: int = 0):
        path = Path(run_dir) / "metrics.jsonl"
        _drop_records_after(path, start_step)  # a resumed run rewrites the steps after its checkpoint
        self.file = open(path, "a")
        self.sinks = [_open_backend(name, Path(run_dir), project, config) for name in backends]
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not sys.stderr.isatty())
        self.started = time.monotonic()

    def write(self, step: int, metrics: dict) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        for sink in self.sinks:
            sink(step, numbers)

    def progress(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        text = f"loss {loss:.4f} lr {lr:.2e} {tokens_per_s:.0f} tok/s"
        if self.bar.disable:  # not a terminal (CI, a log file): a plain line instead of a redrawn bar
            done = step - self.bar.n
            elapsed = time.monotonic() - self.started
            eta = elapsed / max(1, step - self.bar.n) * (self.bar.total - step) if done else 0.0
            log.info("step %d/%d %s eta %s", step, self.bar.total, text, _clock(eta))
            return
        self.bar.set_postfix_str(text, refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()
        self.file.close()


def _drop_records_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(f"{line}\n" for line in kept))


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


BACKEND_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def require_backends(names: list[str]) -> None:
    """Fails before any slow work when a configured metrics backend is not installed."""
    for name in names:
        module = BACKEND_MODULES[name]
        try:
            found = importlib.util.find_spec(module) is not None
        except ValueError:  # a module already imported without a spec (replaced in sys.modules)
            found = sys.modules.get(module) is not None
        if not found or (module in sys.modules and sys.modules[module] is None):
            raise LmforgeError(f"logging.backends lists {name}, whose package is not installed; install it with: "
                               f"pip install 'lmforge[{name}]'")


def _open_backend(name: str, run_dir: Path, project: str, config: dict):
    try:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(run_dir / "tensorboard"))
            return lambda step, m: [writer.add_scalar(k, v, step) for k, v in m.items()] and writer.flush()
        if name == "wandb":
            import wandb

            run = wandb.init(project=project, dir=str(run_dir), config=config)
            return lambda step, m: run.log(m, step=step)
        if name == "mlflow":
            import mlflow

            mlflow.set_experiment(project)
            mlflow.start_run()
            mlflow.log_params({k: str(v)[:250] for k, v in _flat(config).items()})
            return lambda step, m: mlflow.log_metrics(m, step=step)
    except ImportError as e:
        raise LmforgeError(f"logging.backends lists {name}, whose package is not installed ({e.name}); install "
                           f"it with: pip install 'lmforge[{name}]'") from None
    raise LmforgeError(f"unknown logging backend {name!r}")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class NoMetrics:
    """What ranks other than 0 log: nothing (rank 0 writes the metrics, averaged over ranks first)."""

    def write(self, step: int, metrics: dict) -> None:
        pass

    def progress(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        pass

    def close(self) -> None:
        pass
