"""lmforge env: versions, device and CPU features, and which attention backend will run."""

import argparse
import importlib.metadata
import os
import platform
import sys

import torch


def add_parser(sub) -> None:
    p = sub.add_parser("env", help="show versions, device, CPU features and the attention backend",
                       description="Print what lmforge will run on; paste it into bug reports. "
                                   "LMFORGE_MAX_CPU_ISA=avx2 in the environment makes lmforge treat the CPU as an "
                                   "AVX2-only one (no AVX512, AMX or AVX-VNNI); this shows the cap.")
    p.set_defaults(run=run)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def attention_backend() -> str:
    if torch.cuda.is_available():
        return "torch scaled_dot_product_attention (CUDA: flash / memory-efficient kernels)"
    return "torch scaled_dot_product_attention (CPU flash-attention kernel)"


def run(args: argparse.Namespace) -> int:
    from lmforge import __version__
    from lmforge.hardware import cpu_flags, describe_auto, isa_cap

    flags = cpu_flags()
    features = [f for f in ("avx2", "fma", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
                            "amx_tile", "asimddp", "bf16") if f in flags]
    rows = {
        "lmforge": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available",
        "cpu": platform.processor() or platform.machine(),
        "cpu cores": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "cpu features": (", ".join(features) or "none of avx2/avx512/amx/neon dot products")
        + (f" (capped: LMFORGE_MAX_CPU_ISA={cap})" if (cap := isa_cap()) else ""),
        "dtype auto (cpu)": describe_auto("cpu"),
        **({"dtype auto (cuda)": describe_auto("cuda")} if torch.cuda.is_available() else {}),
        "attention backend": attention_backend(),
    }
    for package in ("safetensors", "tokenizers", "gguf", "transformers", "flash-attn", "triton", "torchao"):
        rows[package] = _version(package)
    width = max(map(len, rows))
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
    return 0
