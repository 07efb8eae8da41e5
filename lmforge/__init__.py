"""lmforge: fine-tune and serve open LLMs from one PyTorch-native model definition."""

__version__ = "0.1.0"

from lmforge.errors import LmforgeError  # noqa: E402


def __getattr__(name: str):
    """LLM / SamplingParams import torch and the engine: load them only when asked for."""
    if name == "LLM":
        from lmforge.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from lmforge.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")


__all__ = ["LLM", "LmforgeError", "SamplingParams", "__version__"]
