"""The serving engine's settings (vLLM's engine arguments, the names vLLM gives them), checked when built."""

from dataclasses import dataclass

import torch

from lmforge.engine.speculative import SpeculativeConfig
from lmforge.layers.kv_quant import KV_CACHE_DTYPES

# what a sampled token's log-probs (and its top alternatives) are, as vLLM names the modes: of the raw model
# distribution, or of the one the token was drawn from (constraints, penalties, temperature, top-k/p, min-p applied);
# the *_logits modes report the logits themselves
LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # directory, .gguf, Hub id or alias; None: the default model
    dtype: str = "auto"  # bfloat16 where the device computes it natively, else float32 (lmforge/hardware.py)
    device: str = "cpu"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    kv_cache_memory: float | None = None  # GiB for the KV pool; None: 2 GiB on CPU, on CUDA as below
    # CUDA: the share of the GPU's memory this engine may fill (vLLM's name): the KV pool gets what is left of it
    # after the memory in use (weights, other processes) and one step's activations
    gpu_memory_utilization: float = 0.9
    kv_cache_dtype: str = "auto"  # "auto": the model's dtype; "int8": int8 rows + float32 scales (layers/kv_quant.py)
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"
    seed: int = 0
    enforce_eager: bool = False  # True: no optional fast paths (CPU kernels, step graphs), plain PyTorch only
    # False: decode steps run the CPU kernels eagerly, never recorded: recording one batch size costs about a
    # second, which a workload whose batch shrinks step by step (RL rollouts) never earns back
    step_graphs: bool = True
    enable_lora: bool = False  # serve LoRA adapters (add_lora / lora_request); False: no per-step LoRA work at all
    max_loras: int = 4  # adapters loaded at once: their slots are allocated up front
    max_lora_rank: int = 16  # adapters of lower rank are zero-padded to it
    # vLLM's speculative_config, e.g. {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}
    speculative_config: SpeculativeConfig | dict | None = None
    # weight-only quantised linears (lmforge/weights/quantized.py): "int8", "int4", "gguf" (the .gguf file's own
    # blocks); None: float, except that a .gguf model path means "gguf" and a quantised checkpoint loads as saved
    quantization: str | None = None
    structured_outputs_timeout: float = 10.0  # s a grammar may take to compile before its request is refused
    reasoning_parser: str | None = None  # e.g. "qwen3": structured output starts after the thinking (serve/reasoning)
    logprobs_mode: str = "raw_logprobs"  # one of LOGPROBS_MODES; prompt_logprobs are always raw log-probs
    # processes the model is split over (engine/tensor_parallel.py); each runs torch's thread count of this one
    tensor_parallel_size: int = 1

    def __post_init__(self):
        if self.speculative_config is not None and not isinstance(self.speculative_config, SpeculativeConfig):
            object.__setattr__(self, "speculative_config", SpeculativeConfig.from_dict(self.speculative_config))
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_loras", "max_lora_rank",
                     "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.quantization not in (None, "int8", "int4", "gguf"):
            raise ValueError(f"quantization must be int8, int4, gguf or None, got {self.quantization!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 GiB, got {self.kv_cache_memory}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.tensor_parallel_size > 1:
            spec = self.speculative_config
            refused = [name for name, on in (("a draft model (speculative_config)", spec and spec.method != "ngram"),
                                              ("quantization='gguf'", self.quantization == "gguf")) if on]
            if self.device != "cpu":
                refused.append(f"device {self.device!r}")
            if refused:
                raise ValueError(f"tensor_parallel_size > 1 does not support {', '.join(refused)} yet")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {', '.join(LOGPROBS_MODES)}, got {self.logprobs_mode!r}")


def kv_budget_bytes(config: EngineConfig, device: torch.device, step_bytes: int = 0) -> int:
    """Bytes for the KV pool: kv_cache_memory GiB; else on CUDA gpu_memory_utilization of the device's memory less
    what is in use now (this process's weights, other processes) and `step_bytes` (a step's activations); else 2 GiB
    (CPU)."""
    from lmforge.errors import LmforgeError

    if config.kv_cache_memory is not None:
        return int(config.kv_cache_memory * 2**30)
    if device.type != "cuda":
        return 2 * 2**30
    free, total = torch.cuda.mem_get_info(device)
    budget = int(total * config.gpu_memory_utilization) - (total - free) - step_bytes
    if budget <= 0:
        raise LmforgeError(f"no GPU memory is left for the KV cache: {config.gpu_memory_utilization:.0%} of "
                           f"{total / 2**30:.1f} GiB is {total * config.gpu_memory_utilization / 2**30:.1f} GiB, "
                           f"{(total - free) / 2**30:.1f} GiB are in use and a step needs {step_bytes / 2**30:.2f} "
                           "GiB; raise gpu_memory_utilization, lower max_num_batched_tokens or set kv_cache_memory")
    return budget


def step_activation_bytes(args, config: EngineConfig, dtype: torch.dtype) -> int:
    """A generous bound on one step's activations (what the KV pool must leave free on a GPU): the widest hidden
    states of max_num_batched_tokens tokens a few times over, and float32 logits for max_num_seqs rows."""
    size = torch.finfo(dtype).bits // 8
    widest = max(args.hidden_size * 4, getattr(args, "intermediate_size", 0) * 3)
    return config.max_num_batched_tokens * widest * size * 2 + config.max_num_seqs * args.vocab_size * 4 * 2
