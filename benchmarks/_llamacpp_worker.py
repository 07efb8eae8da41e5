"""Runs single-stream benchmark tasks on llama.cpp (llama-cpp-python); started by benchmarks/quantized.py with the
Python of llama-cpp-python's own virtual environment.

Not for direct use: reads one JSON job on stdin, writes one line "LLAMACPP_RESULT <json>" on stdout.
Job: {"gguf": path, "threads": int, "n_ctx": int,
      "tasks": [{"name": str, "max_tokens": int, "prompt_sets": [[[token ids], ...], ...]}]}
Each prompt set is one timed call; its prompts run one after another (llama-cpp-python has no batching across
sequences). Before every prompt the context is reset, so no call reuses the KV cache of the one before it. Decoding
is greedy (top-k 1, temperature 0) and runs exactly max_tokens tokens: the end-of-sequence token is not checked.
Result: {"version": str, "load_seconds": s, "system_info": str, "tasks": {name: [{"seconds", "tokens",
"token_ids"}, ...]}}.
"""

import json
import sys
import time


def main() -> None:
    job = json.load(sys.stdin)
    import llama_cpp

    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=job["n_ctx"], n_threads=job["threads"],
                          n_threads_batch=job["threads"], n_batch=512, seed=0, verbose=False)
    result = {"version": llama_cpp.__version__, "load_seconds": time.perf_counter() - start,
              "system_info": llama_cpp.llama_print_system_info().decode(), "tasks": {}}
    for task in job["tasks"]:
        runs = []
        for prompts in task["prompt_sets"]:
            token_ids, seconds = [], 0.0
            for prompt in prompts:
                llm.reset()
                out = []
                begin = time.perf_counter()
                for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                          reset=True):
                    out.append(token)
                    if len(out) == task["max_tokens"]:
                        break
                seconds += time.perf_counter() - begin
                token_ids.append(out)
            runs.append({"seconds": seconds, "tokens": sum(map(len, token_ids)), "token_ids": token_ids})
        result["tasks"][task["name"]] = runs
    print("LLAMACPP_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
