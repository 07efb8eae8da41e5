"""lmforge env: versions, device and CPU features, and which attention backend will run."""

import argparse
import importlib.metadata
import os
import platform
import sys

import torch


def add_parser(sub) -> None:
    p = sub.add_parser("env", help="show versions, device, CPU features and the attention backend",
                       description="Print what lmforge will run on; paste it into bug reports.")
    p.set_defaults(run=run)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def attention_backend() -> str:
    if torch.cuda.is_available():
        return "torch scaled_dot_product_attention (CUDA: flash / memory-efficient kernels)"
    return "torch scaled_dot_product_attention (CPU flash-attention kernel)"


def run(args: argparse.Namespace) -> int:
    from lmforge import __version__

    flags = cpu_flags()
    features = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    rows = {
        "lmforge": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available",
        "cpu": platform.processor() or platform.machine(),
        "cpu cores": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "cpu features": ", ".join(features) or "none of avx2/avx512/amx",
        "bf16 matmul on cpu": "fast (AVX512-BF16/AMX)" if {"avx512_bf16", "amx_bf16"} & flags else "slow (emulated)",
        "attention backend": attention_backend(),
    }
    for package in ("safetensors", "tokenizers", "gguf", "transformers", "flash-attn", "triton", "torchao"):
        rows[package] = _version(package)
    width = max(map(len, rows))
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
    return 0
