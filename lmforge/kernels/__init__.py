"""lmforge's CPU inference kernels (cpu_ops.cpp), compiled once with the machine's C++ compiler at first use.

`cpu_ops()` returns the compiled module, or None when kernels are off or cannot be built; callers then run the
pure-torch code they replace (lmforge/layers), which stays the reference. Under autograd a kernel runs only inside
an autograd Function that supplies its gradient (lmforge/layers/train_kernels.py, the fused loss); elsewhere they
serve inference tensors only (`usable(x)`).

Off: `LMFORGE_KERNELS=0` (or `enforce_eager=True` on the engine, `--enforce-eager` on the CLI). The build goes to
`$LMFORGE_KERNEL_CACHE/<key>` (default ~/.cache/lmforge/kernels, kept apart from LMFORGE_HOME so that a fresh model
home does not rebuild them), where the key covers the source, torch's version and this CPU's instruction set (the
code is built with -march=native), so a cached build is never loaded on a machine it was not made for.
"""

import contextlib
import hashlib
import logging
import os
import platform
import time
from pathlib import Path

import torch

log = logging.getLogger("lmforge")
SOURCE = Path(__file__).with_name("cpu_ops.cpp")
QUANT_SOURCE = Path(__file__).with_name("quant_ops.cpp")  # weight-only quantised linears (layers/quant_linear.py)
_state: dict[str, object] = {}
_DTYPES = (torch.float32, torch.bfloat16)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build_dir(source: Path = SOURCE) -> tuple[str, Path]:
    key = hashlib.sha256(source.read_bytes() + torch.__version__.encode() + _cpu_flags().encode()).hexdigest()[:16]
    name = f"lmforge_{source.stem}_{key}"
    root = Path(os.environ.get("LMFORGE_KERNEL_CACHE") or "~/.cache/lmforge/kernels").expanduser()
    return name, root / name


def enabled() -> bool:
    return os.environ.get("LMFORGE_KERNELS", "1") not in ("0", "false", "no", "off")


def cpu_ops():
    """The compiled kernels, or None (disabled, or the build failed: logged once with the reason)."""
    if "ops" in _state:
        return _state["ops"]
    ops = None
    if enabled():
        try:
            ops = _load()
        except Exception as e:  # no compiler, no headers, ...: the pure-torch path still works
            log.warning("CPU kernels unavailable, running the pure-torch path (%s: %s)", type(e).__name__,
                        str(e).strip().splitlines()[-1] if str(e).strip() else "")
    _state["ops"] = ops
    return ops


def quant_ops():
    """The compiled quantised-linear kernels (quant_ops.cpp), or None, as cpu_ops(); built on first use."""
    if "quant" in _state:
        return _state["quant"]
    ops = None
    if enabled():
        try:
            ops = _load(QUANT_SOURCE)
        except Exception as e:
            log.warning("quantised kernels unavailable, running the pure-torch path (%s: %s)", type(e).__name__,
                        str(e).strip().splitlines()[-1] if str(e).strip() else "")
    _state["quant"] = ops
    return ops


def _load(source: Path = SOURCE):
    from torch.utils.cpp_extension import load

    name, build_dir = _build_dir(source)
    build_dir.mkdir(parents=True, exist_ok=True)
    fresh = not any(build_dir.glob("*.so"))
    if fresh:
        log.info("compiling lmforge CPU kernels (%s) into %s (once per machine, about a minute)", source.name,
                 build_dir)
    start = time.perf_counter()
    flags = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"]
    ops = load(name=name, sources=[str(source)], build_directory=str(build_dir), extra_cflags=flags,
               extra_ldflags=["-fopenmp"], verbose=False)
    log.info("CPU kernels (%s) %s in %.1fs", source.name, "compiled" if fresh else "loaded",
             time.perf_counter() - start)
    return ops


@contextlib.contextmanager
def disabled():
    """Inside, every caller takes its pure-torch path (tests compare the two; enforce_eager)."""
    outer = _state.get("off", False)
    _state["off"] = True
    try:
        yield
    finally:
        _state["off"] = outer


def available(device: torch.device):
    """The kernels when they serve tensors on this device (the CPU, kernels on and built), else None."""
    if _state.get("off") or device.type != "cpu":
        return None
    return cpu_ops()


def usable(x: torch.Tensor, *params: torch.Tensor):
    """The kernels when they apply to x (CPU, float32/bfloat16) and autograd is not watching x or params.
    Called for every op of a decode step: written to cost well under a microsecond (x.is_cpu, not x.device)."""
    if not x.is_cpu or x.dtype not in _DTYPES or _state.get("off"):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return None
    return cpu_ops()
