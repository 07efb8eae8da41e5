"""Tokenizer (tokenizer.json via `tokenizers`), chat templates (sandboxed Jinja) and the streaming detokenizer."""

from lmforge.tokenizer.chat_template import render_chat_template
from lmforge.tokenizer.detokenizer import IncrementalDetokenizer
from lmforge.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "Tokenizer", "render_chat_template"]
