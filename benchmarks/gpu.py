"""The GPU benchmark of issue 23, one run on one GPU (benchmarks/gpu.sh runs it after tests/gpu/):

    python benchmarks/gpu.py [--models smollm2,llama1b] [--num-prompts 256] [--max-tokens 128] [--out FILE]
                             [--train-steps 8] [--device cuda] [--small]

Models have the shapes of SmolLM2-135M and Llama-3.2-1B with seeded random weights (tests/gpu/random_models.py; the
GPU machine has no network), bf16. Rows:
- offline throughput: --num-prompts prompts of 32-48 tokens x --max-tokens tokens (greedy, EOS ignored), output
  tokens/s: lmforge's engine (CUDA graphs for decode steps) vs transformers' batched `generate` (batches of 64,
  left-padded). vLLM cannot be installed on the GPU machine here (no network; its wheel is far over what travels),
  so its row is absent unless `vllm` imports there.
- single-stream decode of 256 tokens: tokens/s, and the share of the memory-bandwidth bound (weight bytes x tokens/s
  over the device-to-device copy bandwidth measured in the same run).
- LoRA SFT (rank 16, every linear, 8 rows of 512 tokens per step, no packing, AdamW): trained tokens/s and MFU,
  lmforge (`lmforge train`) vs transformers + PEFT (a plain loop, same rows). MFU = 4 x parameters x tokens/s
  (forward 2N, input gradients 2N; the frozen weights get none; attention's own FLOPs left out) over the bf16 matrix
  product rate measured in the same run (8192^3), printed beside the datasheet's.
--small (with --device cpu) is a dry run of the script's code on tiny shapes.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.gpu.random_models import LLAMA_1B, SMOLLM2_135M, write_random  # noqa: E402

TINY = {**SMOLLM2_135M, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int = 1) -> float:
    """Best wall time of `repeats` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def device_rates(device: str, small: bool) -> dict:
    """The bf16 matrix product rate (TFLOP/s) and device-to-device copy bandwidth (GB/s, bytes read + written)."""
    n = 512 if small else 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    seconds = timed(lambda: [a @ b for _ in range(10)], device) / 10
    x = torch.empty(2**28 if not small else 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    copy = timed(lambda: [y.copy_(x) for _ in range(10)], device) / 10
    return {"matmul_tflops": 2 * n**3 / seconds / 1e12, "copy_gbs": 2 * x.numel() / copy / 1e9}


def prompts(n: int, vocab: int) -> list[list[int]]:
    return [[3 + (37 * i + 11 * j) % (vocab - 3) for j in range(32 + i % 17)] for i in range(n)]


def lmforge_rows(path: Path, args, rates: dict) -> dict:
    from lmforge import LLM, SamplingParams
    from lmforge.weights.quantized import weight_bytes

    llm = LLM(str(path), device=args.device, dtype="bfloat16", max_model_len=512, max_num_seqs=256)
    ps = prompts(args.num_prompts, llm.engine.vocab_size)
    many = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    seconds = timed(lambda: llm.generate(ps, many, use_tqdm=False), args.device)
    one = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    single = timed(lambda: llm.generate(ps[:1], one, use_tqdm=False), args.device, repeats=2)
    decode = 256 / single
    return {"throughput": len(ps) * args.max_tokens / seconds, "decode": decode,
            "bandwidth_share": weight_bytes(llm.engine.model) * decode / (rates["copy_gbs"] * 1e9)}


def transformers_rows(path: Path, args) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).to(args.device).eval()
    ps = prompts(args.num_prompts, model.config.vocab_size)

    def generate(batch: list[list[int]], new: int) -> None:
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=args.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=args.device)
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=0)

    seconds = timed(lambda: [generate(ps[i: i + 64], args.max_tokens) for i in range(0, len(ps), 64)], args.device)
    single = timed(lambda: generate(ps[:1], 256), args.device, repeats=2)
    return {"throughput": len(ps) * args.max_tokens / seconds, "decode": 256 / single}


def train_data(folder: Path, vocab: int, rows: int, length: int) -> Path:
    """rows of `length` word tokens ("t123 t45 ..."): the same token ids for lmforge (format: text) and the PEFT
    loop (the word-level tokenizer maps each word to its id)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (rows, length), generator=gen)
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(f"t{i}" for i in row.tolist())}) + "\n" for row in ids))
    return path


def lmforge_train(path: Path, data: Path, args, folder: Path) -> float:
    import yaml

    run = folder / "lmforge-run"
    cfg = {"model": {"path": str(path)}, "method": "lora", "device": "cuda" if args.device.startswith("cuda") else
           "cpu", "precision": "bf16-mixed" if args.device.startswith("cuda") else "fp32",
           "lora": {"rank": 16, "alpha": 32, "target_modules": "all-linear"},
           "data": {"train": [{"path": str(data), "format": "text"}], "max_seq_len": args.seq_len, "packing": False,
                    "cache_dir": str(folder / "cache")},
           "micro_batch_size": 8, "batch_size": 8, "max_steps": args.train_steps, "eval": {"every_steps": 0},
           "optimizer": {"lr": 1e-4}, "output_dir": str(run)}
    config = folder / "lmforge.yaml"
    config.write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, "-m", "lmforge", "-q", "train", str(config)], check=True, cwd=ROOT)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in steps if "tokens_per_s" in r][2:]  # past the warm-up steps
    return statistics.median(rates)


def peft_train(path: Path, data: Path, args) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(args.device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rows = [[1] + [int(w[1:]) for w in json.loads(line)["text"].split()][: args.seq_len - 1]
            for line in data.read_text().splitlines()]
    times, tokens = [], 0
    for step in range(args.train_steps):
        batch = torch.tensor(rows[step * 8 % len(rows):][:8], device=args.device)
        sync(args.device)
        start = time.perf_counter()
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(args.device)
        times.append(time.perf_counter() - start)
        tokens = batch.numel()
    return tokens / statistics.median(times[2:])


def llama_params(config: dict) -> int:
    """Parameters of a Llama of this shape (tied embeddings counted once)."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return config["num_hidden_layers"] * per_layer + v * h * (1 if config["tie_word_embeddings"] else 2) + h


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,llama1b")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes: a dry run of this script's code")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.small:
        args.num_prompts, args.max_tokens, args.train_steps, args.seq_len = 4, 8, 4, 64
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    rates = device_rates(args.device, args.small)
    print(f"{name}: bf16 matmul {rates['matmul_tflops']:.0f} TFLOP/s, copy {rates['copy_gbs']:.0f} GB/s", flush=True)
    results = {"device": name, **rates, "models": {}}
    shapes = {"smollm2": SMOLLM2_135M, "llama1b": LLAMA_1B}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            folder = Path(tmp) / model
            config = TINY if args.small else shapes[model]
            path = write_random(folder / "model", config)
            params = llama_params(config)
            row = {"params": params, "lmforge": lmforge_rows(path, args, rates),
                   "transformers": transformers_rows(path, args)}
            data = train_data(folder, config["vocab_size"], 8 * args.train_steps, args.seq_len - 1)
            trained = {"lmforge": lmforge_train(path, data, args, folder), "transformers": peft_train(path, data, args)}
            for system, tokens_s in trained.items():
                row[system]["train_tokens_s"] = tokens_s
                row[system]["mfu"] = 4 * params * tokens_s / (rates["matmul_tflops"] * 1e12)
            row["ratio"] = {k: row["lmforge"][k] / row["transformers"][k]
                            for k in ("throughput", "decode", "train_tokens_s")}
            results["models"][model] = row
            print(f"{model} ({params / 1e6:.0f}M parameters): {json.dumps(row)}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
