"""Single-stream speed with and without n-gram speculative decoding, on an input-grounded workload.

Usage: python benchmarks/speculative.py [--num-prompts 20] [--max-tokens 160] [--threads 2]
       [--num-speculative-tokens 4] [--prompt-lookup-max 4] [--prompt-lookup-min 1]
About two to three minutes on the 2-core CI machine.

Setup. SmolLM2-135M-Instruct as a Hugging Face directory (`resolve_model("smollm2-135m")`, as in
benchmarks/engine.py), loaded in float32 on `--threads` CPU threads (torch.set_num_threads in this process), twice:
`LLM(...)` without speculation and `LLM(..., speculative_config={"method": "ngram", "num_speculative_tokens": k,
"prompt_lookup_max": .., "prompt_lookup_min": ..})`, both with the default fast paths (CPU kernels, step graphs:
plain decode steps and, once a shape recurs, speculative steps replay graphs). Workload: `--num-prompts` chat
prompts (the chat template applied by lmforge's tokenizer, token ids built once and given to both engines) each
asking the model to repeat a paragraph with one word replaced by another; the output copies most of its input,
which is what n-gram prompt lookup exploits (as in editing and retrieval-grounded answers). Decoding is greedy
(temperature 0), up to `--max-tokens` tokens, stopping at EOS, so both engines must produce the same tokens: the
script checks every prompt's output token for token and fails if any differs.

Measured: one request at a time (single stream), each a `generate` call; tokens/s = generated tokens of all
prompts / the sum of their wall times (prefill included: the same prompts in both runs). A token is one generated
token id; prompt tokens are never counted. One warm-up call per engine is not timed. Printed: tokens/s for both,
the speed-up, the steps per generated token, and the acceptance rate (accepted draft tokens / draft tokens scored).
The machine may be shared with other processes: the ratio, measured back to back, is the number that matters.
"""

import argparse
import os
import time

import torch

PARAGRAPHS = [
    "The old lighthouse stood on a rocky island at the mouth of the harbor. Every evening the keeper climbed the "
    "spiral stairs, lit the great lamp and watched the fishing boats return through the narrow channel.",
    "Honeybees communicate the location of flowers through a waggle dance. The angle of the dance tells the other "
    "bees the direction of the food, and its length tells them how far away the flowers are.",
    "The library opened its doors at nine every morning. Students filled the long wooden tables, reading quietly "
    "while the librarian sorted the returned books onto a small cart by the window.",
    "A glacier forms when more snow falls in winter than melts in summer. Over many years the snow is pressed into "
    "ice, and the heavy ice slowly flows downhill, carving deep valleys into the mountains.",
    "The baker woke before dawn to prepare the dough. By the time the sun rose, the shop smelled of fresh bread, and "
    "a line of neighbors waited patiently outside the green door.",
]
CHANGES = [("old", "new"), ("the", "a"), ("and", "or"), ("long", "short")]


def prompts(tokenizer, count: int) -> list[list[int]]:
    out = []
    for i in range(count):
        paragraph = PARAGRAPHS[i % len(PARAGRAPHS)]
        old, new = CHANGES[(i // len(PARAGRAPHS)) % len(CHANGES)]
        if f" {old} " not in paragraph:
            old, new = "the", "that"
        text = (f"Repeat the following paragraph exactly, but replace the first \"{old}\" with \"{new}\". Write only "
                f"the paragraph.\n\n{paragraph}")
        out.append(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=True))
    return out


def run(llm, batch: list[list[int]], params) -> tuple[list[list[int]], float]:
    llm.generate([batch[0]], params, use_tqdm=False)  # warm-up
    outputs, seconds = [], 0.0
    for prompt in batch:
        t0 = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        seconds += time.perf_counter() - t0
        outputs.append(out.outputs[0].token_ids)
    return outputs, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-prompts", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--prompt-lookup-max", type=int, default=4)
    p.add_argument("--prompt-lookup-min", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from lmforge import LLM, SamplingParams
    from lmforge.weights.resolve import resolve_model

    model = str(resolve_model("smollm2-135m", progress=False))
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    spec = {"method": "ngram", "num_speculative_tokens": args.num_speculative_tokens,
            "prompt_lookup_max": args.prompt_lookup_max, "prompt_lookup_min": args.prompt_lookup_min}
    results = {}
    for name, config in (("off", None), ("ngram", spec)):
        llm = LLM(model, dtype="float32", max_model_len=1024, kv_cache_memory=0.5, speculative_config=config)
        batch = prompts(llm.get_tokenizer(), args.num_prompts)
        steps = llm.engine.num_steps
        outputs, seconds = run(llm, batch, params)
        tokens = sum(len(o) for o in outputs)
        results[name] = (outputs, seconds, tokens, llm.engine.num_steps - steps, llm.engine.spec_stats)
        del llm
    (base, t_off, n_off, s_off, _), (got, t_on, n_on, s_on, stats) = results["off"], results["ngram"]
    same = sum(a == b for a, b in zip(base, got, strict=True))
    print(f"SmolLM2-135M-Instruct fp32, {args.threads} threads, {args.num_prompts} prompts one at a time, greedy, "
          f"<= {args.max_tokens} tokens; cpu count {os.cpu_count()}")
    print("| speculation | tokens | seconds | tokens/s | steps per token |")
    print("|---|---|---|---|---|")
    print(f"| off | {n_off} | {t_off:.1f} | {n_off / t_off:.1f} | {s_off / n_off:.2f} |")
    print(f"| ngram k={args.num_speculative_tokens} (lookup {args.prompt_lookup_min}-{args.prompt_lookup_max}) | "
          f"{n_on} | {t_on:.1f} | {n_on / t_on:.1f} | {s_on / n_on:.2f} |")
    print(f"speed-up {t_off / n_off * n_on / t_on:.2f}x; acceptance rate {stats.acceptance_rate:.3f} "
          f"({stats.num_accepted_tokens} of {stats.num_draft_tokens} draft tokens, {stats.num_drafts} drafts; "
          f"accepted per position {stats.accepted_per_pos}); identical outputs {same}/{len(base)}")
    if same != len(base):
        raise SystemExit("speculative decoding changed a greedy output")


if __name__ == "__main__":
    main()
