"""lmforge vs Hugging Face Transformers on the same machine, same weights, same run.

Measures prefill throughput of the model code alone: one forward over a batch of sequences, tokens/s.
(Generation with a KV cache is measured against transformers and vLLM by benchmarks/engine.py.)
Model: SmolLM2-135M-Instruct converted from the embedded GGUF. Prints a table with
the ratio lmforge / transformers. Usage: python benchmarks/forward.py [--threads 2] [--dtype bfloat16]
"""

import argparse

import common
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    from lmforge.layers.attention import AttnMeta
    from lmforge.models import build_model
    from lmforge.weights.resolve import resolve_model

    model_dir = resolve_model("smollm2-135m", progress=False)
    dtype = getattr(torch, args.dtype)
    ours = build_model(model_dir, dtype=dtype, progress=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()

    b, n = args.batch, args.prompt_len
    ids = torch.randint(100, 40000, (b, n))
    flat_pos = torch.arange(n).repeat(b)
    meta = AttnMeta.for_sequences([n] * b)

    @torch.inference_mode()
    def ours_prefill():
        ours.logits(ours(ids.flatten(), flat_pos, meta)[n - 1 :: n])

    @torch.inference_mode()
    def ref_prefill():
        ref(ids, logits_to_keep=1)

    t_ours, t_ref = common.best_of(ours_prefill, args.repeats), common.best_of(ref_prefill, args.repeats)
    rows = [(f"prefill {b}x{n} tokens/s", b * n / t_ours, b * n / t_ref)]

    print(f"SmolLM2-135M-Instruct, {args.dtype}, {args.threads} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, best of {args.repeats}")
    common.print_table(["measure", "lmforge", "transformers", "ratio"],
                       [[name, f"{a:.1f}", f"{r:.1f}", f"{a / r:.2f}"] for name, a, r in rows])


if __name__ == "__main__":
    main()
