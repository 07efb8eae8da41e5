"""lmforge: fine-tune and serve open LLMs from one PyTorch-native model definition."""

__version__ = "0.1.0"

from lmforge.errors import LmforgeError  # noqa: E402

__all__ = ["LmforgeError", "__version__"]
