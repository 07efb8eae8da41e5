"""`auto` precision (lmforge/hardware.py): bf16 only where the device computes it natively, float32 elsewhere; a
forced bf16 on a CPU that emulates it is warned about once, with measured speeds."""

import json
import logging

import pytest
import torch

from lmforge import hardware
from lmforge.config import TrainConfig

AVX2_ONLY = frozenset({"fpu", "sse2", "avx", "avx2", "fma"})
AMX = AVX2_ONLY | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


@pytest.fixture
def cpu(monkeypatch):
    def use(flags: frozenset[str]) -> None:
        monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
        hardware.warn_if_emulated.cache_clear()
    yield use
    hardware.warn_if_emulated.cache_clear()


@pytest.mark.parametrize(("flags", "dtype", "precision"), [(AVX2_ONLY, torch.float32, "fp32"),
                                                           (AVX2_ONLY | {"avx512f"}, torch.float32, "fp32"),
                                                           (AVX2_ONLY | {"avx512f", "avx512_bf16"}, torch.bfloat16,
                                                            "bf16-mixed"),
                                                           (AMX, torch.bfloat16, "bf16-mixed")])
def test_auto_is_bf16_only_where_the_cpu_computes_it(cpu, flags, dtype, precision):
    cpu(flags)
    assert hardware.auto_dtype("cpu") == hardware.compute_dtype("auto", "cpu") == dtype
    assert hardware.auto_precision("cpu") == precision
    cfg = TrainConfig(data={"train": [{"path": "x", "format": "text"}]})
    assert cfg.precision == "auto" and cfg.on_device(torch.device("cpu")).precision == precision
    assert ("bfloat16" if dtype == torch.bfloat16 else "float32") in hardware.describe_auto("cpu")


def test_forced_bf16_on_an_emulating_cpu_warns_once_with_measurements(cpu, caplog):
    cpu(AVX2_ONLY)
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        assert hardware.compute_dtype("bfloat16", "cpu") == torch.bfloat16  # the user's choice stands
        hardware.compute_dtype("bfloat16", "cpu")
        TrainConfig(data={"train": [{"path": "x", "format": "text"}]}, precision="bf16-mixed").on_device(
            torch.device("cpu"))
        assert hardware.compute_dtype("float32", "cpu") == torch.float32
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "GFLOP/s" in warnings[0] and "lacks" not in warnings[0], warnings
    assert "no AVX512-BF16 or AMX" in warnings[0]


def test_native_bf16_is_not_warned_about(cpu, caplog):
    cpu(AMX)
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        hardware.compute_dtype("bfloat16", "cpu")
    assert not caplog.records


@pytest.mark.parametrize(("flags", "dtype"), [(AVX2_ONLY, torch.float32), (AMX, torch.bfloat16)])
def test_engine_serves_a_bf16_checkpoint_in_the_cpus_auto_dtype(cpu, tmp_path, flags, dtype):
    from lmforge import LLM
    from tests.unit.tiny_server import tiny_chat_model

    path = tiny_chat_model(tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))  # as most Hub models
    cpu(flags)
    llm = LLM(str(path), kv_cache_memory=0.002, block_size=4, max_model_len=64, enforce_eager=True)
    assert {p.dtype for p in llm.engine.model.parameters()} == {dtype}


def test_max_cpu_isa_hides_what_an_avx2_cpu_lacks(monkeypatch):
    from lmforge import kernels
    from lmforge.errors import LmforgeError

    real = hardware.cpu_flags()
    try:
        monkeypatch.setenv("LMFORGE_MAX_CPU_ISA", "avx2")
        hardware.cpu_flags.cache_clear()
        capped = hardware.cpu_flags()
        assert capped <= real and not any(f.startswith(("avx512", "amx", "avx_vnni")) for f in capped)
        assert {"avx2", "fma"} & real <= capped
        assert hardware.auto_dtype("cpu") == torch.float32
        if {"avx2", "fma"} <= real:
            assert kernels.levels() == ["avx2", "portable"]
        monkeypatch.setenv("LMFORGE_MAX_CPU_ISA", "sse")
        hardware.cpu_flags.cache_clear()
        with pytest.raises(LmforgeError, match="LMFORGE_MAX_CPU_ISA='sse'"):
            hardware.cpu_flags()
    finally:
        monkeypatch.delenv("LMFORGE_MAX_CPU_ISA")
        hardware.cpu_flags.cache_clear()
