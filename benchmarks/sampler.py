"""The sampler's cost per decode step: ms per `sample` call for N rows x 49152 vocab (SmolLM2's), best of R.

Cases: all-greedy (the single-argmax fast path); all rows sampled at temperature 0.8, unseeded, with no cut
(full-vocabulary race); with top_p 0.9; with top_k 50 + top_p 0.9; and with top_p 0.9 on seeded rows (one
generator per row). Logits are LLM-like: per row a shuffled Zipf(1.5) log-probability profile plus noise, so a
0.9 nucleus holds some tens of tokens (as real models usually do). The "flat" line uses N(0, 3^2) logits, whose
0.9 nucleus spans thousands of tokens: the worst case, where every row falls back to a full sort.
Usage: python benchmarks/sampler.py [--threads 2] [--device cpu] [--repeats 5]
"""

import argparse

import common
import torch

from lmforge.engine.sampler import SamplingRow, sample
from lmforge.engine.sampling_params import SamplingParams

VOCAB = 49152


def zipf_logits(n: int, device: str) -> torch.Tensor:
    ranks = torch.arange(1, VOCAB + 1, dtype=torch.float32)
    profile = -1.5 * ranks.log()
    rows = [profile[torch.randperm(VOCAB)] for _ in range(n)]
    return (torch.stack(rows) + 0.1 * torch.randn(n, VOCAB)).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = {
        "greedy": (SamplingParams(temperature=0), False, False),
        "T=0.8": (SamplingParams(temperature=0.8), False, False),
        "T=0.8 top_p=0.9": (SamplingParams(temperature=0.8, top_p=0.9), False, False),
        "T=0.8 top_k=50 top_p=0.9": (SamplingParams(temperature=0.8, top_k=50, top_p=0.9), False, False),
        "T=0.8 top_p=0.9 seeded": (SamplingParams(temperature=0.8, top_p=0.9), True, False),
        "T=0.8 top_p=0.9 flat": (SamplingParams(temperature=0.8, top_p=0.9), False, True),
    }
    sizes = [1, 64, 256]
    print(f"sampler ms/call, vocab {VOCAB}, device {args.device}, torch {torch.__version__}, "
          f"{args.threads} threads, best of {args.repeats}")
    print(f"{'case':<28}" + "".join(f"{f'N={n}':>10}" for n in sizes))
    for name, (params, seeded, flat) in cases.items():
        cells = []
        for n in sizes:
            logits = 3 * torch.randn(n, VOCAB, device=args.device) if flat else zipf_logits(n, args.device)
            gens = [torch.Generator(args.device).manual_seed(i) if seeded else None for i in range(n)]
            rows = [SamplingRow(params, g, [1, 2, 3], [], frozenset({0})) for g in gens]

            def step(logits=logits, rows=rows):
                sample(logits, rows)
                if args.device != "cpu":
                    torch.cuda.synchronize()

            cells.append(1e3 * common.best_of(step, args.repeats))
        print(f"{name:<28}" + "".join(f"{c:>10.2f}" for c in cells))


if __name__ == "__main__":
    main()
