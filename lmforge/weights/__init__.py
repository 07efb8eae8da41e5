"""Checkpoints in and out: HF safetensors directories, GGUF import, model name resolution."""
