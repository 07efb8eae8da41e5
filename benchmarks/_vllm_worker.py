"""Runs benchmark tasks on vLLM's offline API; started by benchmarks/engine.py with vLLM's own Python.

Not for direct use: reads one JSON job on stdin, writes one line "VLLM_RESULT <json>" on stdout (vLLM's logs go to
the same streams). Lives in a separate process so that the lmforge process never imports vllm.

Job: {"model": dir, "dtype": "bfloat16", "max_model_len": int,
      "tasks": [{"name": str, "prefix_caching": bool, "max_tokens": int, "prompt_sets": [[[token ids], ...], ...],
                 "schemas": [JSON schema or null per prompt] (optional: structured output)}]}
Each prompt set is one timed `llm.generate` call (the first one of a task is the warm-up). One LLM is built per
prefix-caching setting; its load time is reported but not part of any measurement.
Result: {"version": str, "load_seconds": {setting: s}, "tasks": {name: [{"seconds", "tokens", "token_ids"}, ...]}}.
"""

import gc
import json
import sys
import time


def main() -> None:
    job = json.load(sys.stdin)
    import vllm
    from vllm import LLM, SamplingParams

    result = {"version": vllm.__version__, "load_seconds": {}, "tasks": {}}
    for caching in (False, True):
        tasks = [t for t in job["tasks"] if t["prefix_caching"] == caching]
        if not tasks:
            continue
        start = time.perf_counter()
        llm = LLM(job["model"], dtype=job["dtype"], max_model_len=job["max_model_len"],
                  enable_prefix_caching=caching, seed=0)
        result["load_seconds"][f"prefix_caching={caching}"] = time.perf_counter() - start
        for task in tasks:
            params = SamplingParams(temperature=0, max_tokens=task["max_tokens"], ignore_eos=True)
            # one JSON schema (or null) per prompt: structured output (benchmarks/structured.py)
            if task.get("schemas"):
                from vllm.sampling_params import StructuredOutputsParams

                params = [params if s is None else SamplingParams(
                    temperature=0, max_tokens=task["max_tokens"], ignore_eos=True,
                    structured_outputs=StructuredOutputsParams(json=s)) for s in task["schemas"]]
            runs = []
            for prompts in task["prompt_sets"]:
                inputs = [{"prompt_token_ids": ids} for ids in prompts]
                start = time.perf_counter()
                outs = llm.generate(inputs, params, use_tqdm=False)
                seconds = time.perf_counter() - start
                token_ids = [list(o.outputs[0].token_ids) for o in outs]
                runs.append({"seconds": seconds, "tokens": sum(map(len, token_ids)), "token_ids": token_ids})
            for run in runs[:-1]:  # the caller compares only the last run's outputs
                run["token_ids"] = None
            result["tasks"][task["name"]] = runs
        del llm
        gc.collect()
    print("VLLM_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":  # vLLM starts its engine core with multiprocessing spawn, which re-imports this file
    main()
