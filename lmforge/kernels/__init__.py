"""lmforge's CPU kernels, compiled once with the machine's C++ compiler at first use: `cpu_ops` (cpu_ops.cpp and the
sources it lists, sharing cpu_ops.h) and `quant_ops` (quant_ops.cpp), each one extension module.

`cpu_ops()` returns the compiled module, or None when kernels are off or cannot be built; callers then run the
pure-torch code they replace (lmforge/layers), which stays the reference. Under autograd a kernel runs only inside
an autograd Function that supplies its gradient (lmforge/layers/train_kernels.py, the fused loss); elsewhere they
serve inference tensors only (`usable(x)`).

Off: `LMFORGE_KERNELS=0` (or `enforce_eager=True` on the engine, `--enforce-eager` on the CLI). The build goes to
`$LMFORGE_KERNEL_CACHE/<key>` (default ~/.cache/lmforge/kernels, kept apart from LMFORGE_HOME so that a fresh model
home does not rebuild them), where the key covers every source and header, torch's version, the compiler flags
and, for the native build, this CPU's instruction set, so a cached build is never loaded on a machine it was not made
for.

Builds for several instruction-set levels come from the same sources: `native` (-march=native: AVX512-BF16 and AMX
loops where this CPU has them), `avx2` (x86-64-v3: AVX2 + FMA, what most x86 machines of the last decade run) and
`portable` (the compiler's baseline, the path of ARM and other CPUs: plain loops it vectorises). The best level this
CPU runs is used; `LMFORGE_KERNEL_LEVEL=avx2|portable` (or `with kernels.level("avx2")`, which tests use to run every
path this host can execute) picks a lower one. `levels()` lists the distinct builds this CPU can run.
"""

import contextlib
import contextvars
import hashlib
import logging
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from lmforge.hardware import cpu_flags

log = logging.getLogger("lmforge")
_DIR = Path(__file__).parent
# Each extension's sources, compiled into one module; headers (*.h here) are hashed into every build's key.
EXTENSIONS = {
    "cpu_ops": ("cpu_ops.cpp", "linear.cpp", "linear_bf16.cpp", "elementwise.cpp", "paged_attention.cpp",
                "training.cpp", "attention_backward.cpp", "shm_collective.cpp"),
    "quant_ops": ("quant_ops.cpp",),  # weight-only quantised linears (layers/quant_linear.py)
}
# The kernels a step graph (lmforge/engine/cpu_graph.py) records, named once. Each name in GRAPH_RETURNING and
# GRAPH_IN_PLACE is a cpu_ops kernel and a StepGraph method (step_graph.h) taking the kernel's arguments, followed by
# its output for the returning ones.
GRAPH_RETURNING = ("linear_small", "linear", "linear_f32", "vnni_linear", "amx_linear", "rms_norm", "silu_mul")
# write into their arguments: recorded as they are
GRAPH_IN_PLACE = ("rope_", "write_kv", "paged_attention", "shm_all_reduce")
GRAPH_QUERIES = ("amx_available", "vnni_available", "linear_f32_available", "amx_pack", "vnni_pack")  # no step work
GRAPH_QUANT_RETURNING = ("quant_linear",)  # quant_ops' kernels, recorded as StepGraph.external steps of (*args, out)
_state: dict[str, object] = {}  # "ops", "quant": the current level's modules; "level": one `level()` chose
_builds: dict[tuple[str, str], object] = {}  # (extension, level) -> compiled module, or None when its build failed
# Kernels switched off for the current context only (an enforce_eager engine's steps, a test's reference run): a
# context variable, so one engine's switch never reaches another engine or a training loop in another thread.
_off: contextvars.ContextVar[bool] = contextvars.ContextVar("lmforge_kernels_off", default=False)
# Bitwise mode (recipe grpo's bitwise_logprobs): a serving engine's forward and a training forward run the same
# kernels with the same summation order per row (lmforge/layers: the float32 linear kernel, the training kernels'
# norm, rotary and SwiGLU, the paged-attention kernel for attention), so a token's log-prob is the same number in
# both. A context variable, like `_off`, so that it reaches only the run that asked for it.
_bitwise: contextvars.ContextVar[bool] = contextvars.ContextVar("lmforge_kernels_bitwise", default=False)
# A training recipe's no-grad passes (reference and old-policy log-probs) run the training step's own kernels, not
# the inference ones (`training_forward`): the reference then rounds exactly as the policy does, so a LoRA policy
# whose update is still zero equals its reference in bf16 too.
_training: contextvars.ContextVar[bool] = contextvars.ContextVar("lmforge_kernels_training", default=False)
_DTYPES = (torch.float32, torch.bfloat16)
_X86 = platform.machine().lower() in ("x86_64", "amd64")
# Compiler flags per level. -mprefer-vector-width=512: gcc otherwise keeps auto-vectorised loops at 256 bits.
LEVEL_FLAGS = {"native": ["-march=native", "-mprefer-vector-width=512"], "avx2": ["-march=x86-64-v3"], "portable": [],
               # tests only (quant_ops): the AVX2 loops with 256-bit vpdpbusd, as the native build of an AVX-VNNI CPU
               # runs them, in AVX512-VNNI's encoding of the same instruction so that an AVX512 host runs it
               "vnni256": ["-march=x86-64-v3", "-mavx512vnni", "-mavx512vl", "-DLMFORGE_NO_512"]}
CPU_KEYED = ("native", "vnni256")  # builds that run only on CPUs with the flags they were made on
# Hidden symbols: the kernels of one level's module never resolve to another's, loaded in the same process.
CFLAGS = ["-O3", "-fopenmp", "-fvisibility=hidden"]


def levels() -> list[str]:
    """The distinct builds this CPU runs, best first: `native` only where it adds to AVX2 (AVX512, or AVX-VNNI's
    integer dot products), `avx2` where the CPU has AVX2 and FMA, `portable` everywhere."""
    flags = cpu_flags()
    avx2 = _X86 and {"avx2", "fma"} <= flags
    found = ["native"] if not avx2 or {"avx512f", "avx_vnni"} & flags else []
    return found + (["avx2"] if avx2 else []) + ["portable"]


def sources(extension: str) -> list[Path]:
    """The files whose text a build of `extension` depends on: its sources, then every header beside them."""
    return [_DIR / name for name in EXTENSIONS[extension]] + sorted(_DIR.glob("*.h"))


def _build_dir(extension: str, level: str) -> tuple[str, Path]:
    machine = " ".join(sorted(cpu_flags())) if level in CPU_KEYED else platform.machine()
    digest = hashlib.sha256()
    for path in sources(extension):  # a file's name and length before its text: no two file sets hash alike
        text = path.read_bytes()
        digest.update(f"{path.name}\0{len(text)}\0".encode() + text)
    digest.update(torch.__version__.encode() + " ".join(CFLAGS + LEVEL_FLAGS[level]).encode() + machine.encode())
    # torch's build.ninja names the sources by absolute path: another checkout sharing the directory would make
    # ninja rebuild it for every switch between the two
    digest.update(str(_DIR.resolve()).encode())
    key = digest.hexdigest()[:16]
    name = f"lmforge_{extension}_{level}_{key}"
    root = Path(os.environ.get("LMFORGE_KERNEL_CACHE") or "~/.cache/lmforge/kernels").expanduser()
    return name, root / name


def enabled() -> bool:
    return os.environ.get("LMFORGE_KERNELS", "1") not in ("0", "false", "no", "off")


def cpu_ops():
    """The compiled kernels of the current level, or None (disabled, or the build failed: logged once with the
    reason)."""
    if "ops" not in _state:
        _state["ops"] = build(_state.get("level") or default_level()) if enabled() else None
    return _state["ops"]


def quant_ops():
    """The compiled quantised-linear kernels (quant_ops.cpp) of the current level, or None, as cpu_ops()."""
    if "quant" not in _state:
        _state["quant"] = build(_state.get("level") or default_level(), "quant_ops") if enabled() else None
    return _state["quant"]


def default_level() -> str:
    """The best level this CPU runs, or the one LMFORGE_KERNEL_LEVEL names (an unknown or unrunnable one is an error:
    a typo must not silently test the wrong path)."""
    found = levels()
    wanted = os.environ.get("LMFORGE_KERNEL_LEVEL", "").strip()
    if not wanted:
        return found[0]
    if wanted == "native" or wanted in found:
        return wanted if wanted in found else found[0]
    from lmforge.errors import LmforgeError

    raise LmforgeError(f"LMFORGE_KERNEL_LEVEL={wanted!r}: this CPU runs the kernel levels {', '.join(found)}")


def build(level: str, extension: str = "cpu_ops"):
    """The extension (a key of EXTENSIONS) compiled for `level` (cached per level and machine), or None when the
    build fails (logged)."""
    if (extension, level) not in _builds:
        try:
            module = _load(extension, level)
        except Exception as e:  # no compiler, no headers, ...: the pure-torch path still works
            log.warning("CPU kernels (%s, %s) unavailable, running the pure-torch path (%s: %s)", extension, level,
                        type(e).__name__, str(e).strip().splitlines()[-1] if str(e).strip() else "")
            module = None
        _builds[extension, level] = module
    return _builds[extension, level]


def prebuild(jobs: int = 2) -> None:
    """Compiles every (extension, level) this CPU runs that is not cached yet, `jobs` at a time, each in a child
    process (a cold test session needs four builds). A failed build is left for `build` to report when it is asked
    for."""
    missing = [(extension, lvl) for lvl in levels() for extension in EXTENSIONS
               if not any(_build_dir(extension, lvl)[1].glob("*.so"))]
    code = "import sys; from lmforge import kernels; kernels.build(sys.argv[1], sys.argv[2])"

    def run(job: tuple[str, str]) -> None:
        subprocess.run([sys.executable, "-c", code, job[1], job[0]], capture_output=True)

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(run, missing))


def _load(extension: str, level: str):
    from torch.utils.cpp_extension import load

    name, build_dir = _build_dir(extension, level)
    build_dir.mkdir(parents=True, exist_ok=True)
    fresh = not any(build_dir.glob("*.so"))
    if fresh:
        log.info("compiling lmforge CPU kernels (%s, %s) into %s (once per machine, a minute or two)", extension,
                 level, build_dir)
    start = time.perf_counter()
    ops = load(name=name, sources=[str(_DIR / source) for source in EXTENSIONS[extension]],
               build_directory=str(build_dir),
               extra_cflags=[*CFLAGS, *LEVEL_FLAGS[level]], extra_ldflags=["-fopenmp"], verbose=False)
    log.info("CPU kernels (%s, %s) %s in %.1fs", extension, level, "compiled" if fresh else "loaded",
             time.perf_counter() - start)
    return ops


@contextlib.contextmanager
def level(name: str):
    """Inside, the kernels of another level, built when first asked for (tests run every level this CPU can
    execute; benchmarks compare them)."""
    if name not in levels():
        raise ValueError(f"kernel level {name!r} does not run on this CPU (it runs {', '.join(levels())})")
    saved = {key: _state.pop(key) for key in ("level", "ops", "quant") if key in _state}
    _state["level"] = name
    try:
        yield cpu_ops()
    finally:
        for key in ("level", "ops", "quant"):
            _state.pop(key, None)
        _state.update(saved)


@contextlib.contextmanager
def _switched_on(flag: contextvars.ContextVar[bool]):
    token = flag.set(True)
    try:
        yield
    finally:
        flag.reset(token)


def disabled():
    """Inside (this thread or task only), every caller takes its pure-torch path (tests compare the two;
    enforce_eager)."""
    return _switched_on(_off)


def bitwise():
    """Inside (this thread or task only), inference and training forwards share their kernels (see `_bitwise`)."""
    return _switched_on(_bitwise)


def in_bitwise() -> bool:
    """Whether `bitwise()` is in effect here."""
    return _bitwise.get()


def training_forward():
    """Inside (this thread or task only), forwards take the kernels a training step's forward takes, with or
    without autograd recording (see `_training`); also a decorator."""
    return _switched_on(_training)


def in_training_forward() -> bool:
    """Whether training's kernels serve no-grad calls here: `training_forward()` or `bitwise()`."""
    return _training.get() or _bitwise.get()


def switched_off() -> bool:
    """Whether kernels are off here: `disabled()` is in effect in this context."""
    return _off.get()


def available(device: torch.device):
    """The kernels when they serve tensors on this device (the CPU, kernels on and built), else None."""
    if _off.get() or device.type != "cpu":
        return None
    return cpu_ops()


def usable(x: torch.Tensor, *params: torch.Tensor):
    """The kernels when they apply to x (CPU, float32/bfloat16) and autograd is not watching x or params.
    Called for every op of a decode step: written to cost well under a microsecond (x.is_cpu, not x.device)."""
    if not x.is_cpu or x.dtype not in _DTYPES or _off.get() or _training.get():
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return None
    return cpu_ops()
