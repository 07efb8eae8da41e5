"""Flags shared by the commands that run the serving engine (generate, chat, serve)."""

import argparse
import dataclasses
import json

from lmforge.engine.config import LOGPROBS_MODES
from lmforge.errors import LmforgeError
from lmforge.layers.kv_quant import KV_CACHE_DTYPES
from lmforge.weights.resolve import DEFAULT_MODEL


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"model directory, .gguf file, Hub id (org/name) or alias (default: {DEFAULT_MODEL})")
    g.add_argument("--dtype", default="auto", help="weight and compute dtype: auto (bfloat16 where the device "
                   "computes it natively, else float32; `lmforge env` says which), float32, bfloat16 or float16")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + completion in tokens (default: the model's context length)")
    g.add_argument("--kv-cache-memory", type=float, default=None, metavar="GIB",
                   help="memory for the paged KV cache in GiB (default 2 on CPU; on CUDA what "
                   "--gpu-memory-utilization leaves)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9, metavar="FRACTION",
                   help="CUDA: the share of the GPU's memory the engine may fill; the KV cache gets what the weights, "
                   "other processes and a step's activations leave of it (default 0.9)")
    g.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="what the KV cache stores: auto (the model's dtype) or int8 (a float32 scale per token and "
                   "kv head: about 2x the tokens of a bfloat16 cache, 3.8x of a float32 one, in the same memory)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one step (default 256)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one step; longer prompts are prefilled in chunks (default 2048)")
    g.add_argument("--no-prefix-caching", action="store_true", help="do not share KV blocks between prompts")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    g.add_argument("--quantization", choices=("int8", "int4", "gguf"), default=None,
                   help="weight-only quantised linears served by CPU integer kernels: int8 (per channel), int4 "
                   "(groups of 32), gguf (the .gguf model's own Q8_0/Q4_0/Q4_1/Q4_K blocks; the default for a .gguf "
                   "path). Default: float, or as a quantised checkpoint was saved")
    g.add_argument("--enforce-eager", action="store_true",
                   help="no optional fast paths (lmforge's CPU kernels, step graphs): the plain PyTorch code only")
    g.add_argument("--logprobs-mode", choices=LOGPROBS_MODES, default="raw_logprobs",
                   help="what returned logprobs are: raw_logprobs (the model's distribution, the default), "
                   "processed_logprobs (the distribution each token was sampled from: penalties, temperature, "
                   "top-k/top-p/min-p applied), or the logits themselves (raw_logits, processed_logits)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="split the model over N processes on this machine (gloo), each running as many threads as "
                   "this one (default 1; not yet with LoRA, quantization, speculation or prompt logprobs)")
    g.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, as vLLM spells it: \'{"method": "ngram", "num_speculative_tokens": 4, '
                   '"prompt_lookup_max": 4, "prompt_lookup_min": 1}\' (n-gram prompt lookup; default off)')


def add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    g.add_argument("--temperature", type=float, default=temperature,
                   help=f"0 is greedy; higher samples more freely (default {temperature})")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 disables (default)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1)")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable); never printed")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def engine_config(args: argparse.Namespace):
    from lmforge.engine.config import EngineConfig
    from lmforge.models import resolve_dtype

    resolve_dtype(args.dtype, {})  # reject a bad --dtype before any slow work
    spec = None
    if args.speculative_config is not None:
        try:
            spec = json.loads(args.speculative_config)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"--speculative-config is not valid JSON ({e.msg} at character {e.pos})") from None
    return EngineConfig(model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                        kv_cache_memory=args.kv_cache_memory, kv_cache_dtype=args.kv_cache_dtype,
                        gpu_memory_utilization=args.gpu_memory_utilization,
                        max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens,
                        enable_prefix_caching=not args.no_prefix_caching, enforce_eager=args.enforce_eager,
                        speculative_config=spec, quantization=args.quantization, logprobs_mode=args.logprobs_mode,
                        tensor_parallel_size=args.tensor_parallel_size)


def build_llm(args: argparse.Namespace):
    from lmforge.engine.llm import LLM

    return LLM(**dataclasses.asdict(engine_config(args)))


def sampling_params(args: argparse.Namespace):
    from lmforge.engine.sampling_params import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens, seed=args.seed,
                          stop=tuple(args.stop), ignore_eos=args.ignore_eos)
