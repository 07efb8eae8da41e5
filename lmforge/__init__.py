"""lmforge: fine-tune and serve open LLMs from one PyTorch-native model definition."""

__version__ = "0.1.0"

from lmforge.errors import LmforgeError  # noqa: E402


def __getattr__(name: str):
    """LLM / AsyncEngine / SamplingParams import torch and the engine: load them only when asked for."""
    if name == "LLM":
        from lmforge.engine.llm import LLM

        return LLM
    if name == "AsyncEngine":
        from lmforge.engine.async_engine import AsyncEngine

        return AsyncEngine
    if name == "LoRARequest":
        from lmforge.engine.lora_manager import LoRARequest

        return LoRARequest
    if name == "SamplingParams":
        from lmforge.engine.sampling_params import SamplingParams

        return SamplingParams
    if name == "StructuredOutputsParams":
        from lmforge.engine.sampling_params import StructuredOutputsParams

        return StructuredOutputsParams
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")


__all__ = ["AsyncEngine", "LLM", "LmforgeError", "LoRARequest", "SamplingParams", "StructuredOutputsParams",
           "__version__"]
