"""What this machine computes natively: CPU instruction sets and whether bf16 arithmetic is real or emulated.

`auto` precision (the engine's and the CLI's `--dtype auto`, training's `precision: auto`) picks bf16 only where the
device computes it natively — CUDA with bf16, x86 CPUs with AVX512-BF16 or AMX — and float32 elsewhere: on an
AVX2-only CPU PyTorch emulates bf16 matrix products, far slower than float32 (forcing bf16 there logs both speeds).
"""

import functools
import logging
import os
import platform
import time
from pathlib import Path

import torch

log = logging.getLogger("lmforge")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo names of the instructions that compute bf16 natively


# LMFORGE_MAX_CPU_ISA=avx2 hides what an AVX2-only x86 CPU lacks (as ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY do for
# oneDNN and ATen): `auto` precision, kernel levels and fast paths then behave as on such a CPU.
ISA_CAPS = {"avx2": ("avx512", "amx", "avx_vnni", "avx_ifma", "avx_ne_convert")}


def isa_cap() -> str:
    """LMFORGE_MAX_CPU_ISA as given ("" when unset)."""
    return os.environ.get("LMFORGE_MAX_CPU_ISA", "").strip().lower()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (x86 `flags`, ARM `Features` in /proc/cpuinfo; empty where there is no such file),
    less those LMFORGE_MAX_CPU_ISA hides."""
    flags: frozenset[str] = frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = frozenset(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    cap = isa_cap()
    if not cap:
        return flags
    if cap not in ISA_CAPS:
        from lmforge.errors import LmforgeError

        raise LmforgeError(f"LMFORGE_MAX_CPU_ISA={cap!r}: known caps are {', '.join(ISA_CAPS)}")
    return frozenset(f for f in flags if not f.startswith(ISA_CAPS[cap]))


def bf16_support(device: torch.device | str = "cpu") -> tuple[bool, str]:
    """(whether `device` computes bf16 natively, the reason in a few words)."""
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        return native, f"{torch.cuda.get_device_name(device)} {'computes' if native else 'lacks'} bf16"
    flags = cpu_flags()
    found = [f.upper().replace("_", "-") for f in BF16_FLAGS if f in flags]
    if found:
        return True, f"the CPU has {' and '.join(found)}"
    return False, f"no AVX512-BF16 or AMX on this {platform.machine()} CPU: bf16 matrix products are emulated"


def auto_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """The compute dtype `auto` means on this device: bfloat16 where native, else float32."""
    return torch.bfloat16 if bf16_support(device)[0] else torch.float32


def auto_precision(device: torch.device | str = "cpu") -> str:
    """Training's `precision: auto`: bf16 autocast where bf16 is native, else float32."""
    return "bf16-mixed" if bf16_support(device)[0] else "fp32"


def describe_auto(device: torch.device | str = "cpu") -> str:
    native, reason = bf16_support(device)
    return f"{'bfloat16' if native else 'float32'} ({reason})"


@functools.cache
def warn_if_emulated(dtype: torch.dtype, device_type: str = "cpu") -> None:
    """One warning, with a measurement, when bf16 is forced on a CPU that emulates it (cached: once per process)."""
    if dtype != torch.bfloat16 or device_type != "cpu" or bf16_support("cpu")[0]:
        return
    bf16, fp32 = matmul_gflops(torch.bfloat16), matmul_gflops(torch.float32)
    log.warning("bfloat16 forced on a CPU without native bf16 (%s): a bf16 matrix product runs at %.1f GFLOP/s here, "
                "float32 at %.1f; dtype auto (float32) would be %.0fx faster for batched work",
                bf16_support("cpu")[1], bf16, fp32, fp32 / max(bf16, 1e-9))


def matmul_gflops(dtype: torch.dtype, size: int = 256) -> float:
    """A square matrix product's speed in this dtype on the CPU, best of three (a few ms in float32)."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def compute_dtype(dtype: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype a model that runs (engine, eval) is built in: `auto` as above, whatever the checkpoint stores
    (as vLLM serves a float32 checkpoint in 16 bits); an explicit choice stands, with the warning above when it is
    bf16 on a CPU that emulates it. Checkpoint writers (convert, merge) keep `auto` = the checkpoint's own."""
    from lmforge.models import resolve_dtype

    device = torch.device(device)
    resolved = auto_dtype(device) if dtype == "auto" else resolve_dtype(dtype, {}, device)
    warn_if_emulated(resolved, device.type)
    return resolved
