"""lmforge vs Hugging Face Transformers on the same machine, same weights, same run.

Measures (1) prefill throughput: one forward over a batch of sequences, tokens/s; (2) single-sequence
greedy decode with a KV cache (lmforge's SimpleGenerator vs transformers' generate), generated tokens/s
with EOS ignored. Model: SmolLM2-135M-Instruct converted from the embedded GGUF. Prints a table with
the ratio lmforge / transformers. Usage: python benchmarks/forward.py [--threads 2] [--dtype bfloat16]
"""

import argparse
import time

import torch


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    from lmforge.engine.sampling_params import SamplingParams
    from lmforge.engine.simple_generator import SimpleGenerator
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

    prompt = ids[0, :32].tolist()
    gen = SimpleGenerator(ours, max_len=512)
    params = SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True)

    def ours_decode():
        list(gen.stream(prompt, params))

    @torch.inference_mode()
    def ref_decode():
        ref.generate(torch.tensor([prompt]), max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens,
                     do_sample=False)

    rows = []
    for name, mine, theirs, tokens in [
        (f"prefill {b}x{n} tokens/s", ours_prefill, ref_prefill, b * n),
        (f"greedy decode {args.decode_tokens} tok/s", ours_decode, ref_decode, args.decode_tokens),
    ]:
        t_ours, t_ref = best_of(mine, args.repeats), best_of(theirs, args.repeats)
        rows.append((name, tokens / t_ours, tokens / t_ref))

    print(f"SmolLM2-135M-Instruct, {args.dtype}, {args.threads} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, best of {args.repeats}")
    print(f"{'measure':<32} {'lmforge':>10} {'transformers':>13} {'ratio':>7}")
    for name, a, r in rows:
        print(f"{name:<32} {a:>10.1f} {r:>13.1f} {a / r:>7.2f}")


if __name__ == "__main__":
    main()
