"""Hugging Face model directories: stream tensors in (safetensors, sharded, or .bin), write them back."""

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from lmforge.errors import LmforgeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Files of a model directory that are not weights and travel with it on convert/save.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")


def weight_files(model_dir: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = model_dir / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise LmforgeError(f"{index} is not a valid shard index ({e})") from None
            missing = [n for n in names if not (model_dir / n).is_file()]
            if missing:
                raise LmforgeError(f"{index} names shard {missing[0]}, which is not in {model_dir}")
            return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise LmforgeError(f"{model_dir} holds no weights (*.safetensors or pytorch_model*.bin)")
    return files


def iter_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) one at a time, so a load never holds more than one checkpoint tensor extra."""
    for name, entry in iter_entries(model_dir):
        yield name, entry[...]


def iter_entries(model_dir: Path) -> Iterator[tuple[str, object]]:
    """Yields (name, tensor or safetensors slice) one at a time, to be indexed (`x[...]`: all of it, `x[lo:hi]`:
    only those rows are read from the file) before the next."""
    for file in weight_files(model_dir):
        if file.suffix == ".safetensors":
            try:
                with safe_open(file, framework="pt") as f:
                    names = list(f.keys())
                for name in names:  # a handle per tensor: a handle keeps every page it has read mapped (RSS)
                    with safe_open(file, framework="pt") as f:
                        yield name, f.get_slice(name)
            except SafetensorError as e:
                raise LmforgeError(f"{file} is not a readable safetensors file ({e}); "
                                   "re-download or re-convert it") from None
        else:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError for damaged files
                raise LmforgeError(f"{file} is not a readable PyTorch checkpoint ({e})") from None
            yield from state.items()


def load_weights(model: nn.Module, model_dir: Path, progress: bool = True, shares: dict | None = None) -> int:
    """Copies every checkpoint tensor into the model's parameters (casting to their dtype); all must match.
    shares (a tensor-parallel rank's model: engine/tensor_parallel.py `Shares`): the part of each checkpoint tensor
    the model holds, and under which name; only those parts are read from safetensors files. Returns the bytes
    read."""
    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())
    if shares is None:
        aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - set(targets)  # tied weights
        shares = {n: (n, None) for n in targets} | dict.fromkeys(aliases)
    seen, read = set(), 0
    # disable=None: tqdm draws no bar when stderr is not a terminal
    bar = tqdm(desc=f"loading {model_dir.name}", unit=" tensors", total=len(targets),
               disable=None if progress else True)
    for name, tensor in iter_entries(model_dir):
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name not in shares:
            raise LmforgeError(f"{model_dir}: checkpoint tensor {name!r} has no place in the model; "
                               "is config.json from the same model?")
        if shares[name] is None or shares[name][0] in seen:  # a tied name, or a tensor this rank holds none of
            continue
        held, part = shares[name]
        shape = tuple(tensor.get_shape() if hasattr(tensor, "get_shape") else tensor.shape)
        want = part.full if part is not None else tuple(targets[held].shape)
        if shape != want:
            raise LmforgeError(f"{model_dir}: tensor {name!r} has shape {shape}, config.json implies {want}")
        value = part.take(tensor) if part is not None else tensor[...]
        with torch.no_grad():
            targets[held].copy_(value)
        read += value.numel() * value.element_size()
        seen.add(held)
        bar.update()
    bar.close()
    missing = sorted(set(targets) - seen)
    if missing:
        raise LmforgeError(f"{model_dir}: checkpoint lacks {len(missing)} tensor(s), first {missing[0]!r}")
    return read


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, size = [{}], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def save_weights(model: nn.Module, out_dir: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    state = {n: p.detach().contiguous() for n, p in model.named_parameters()}  # tied weights once, as HF does
    state.update({n: b.detach().contiguous() for n, b in model.named_buffers()})
    save_state_dict(state, out_dir, max_shard_bytes)


def save_state_dict(state: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes model.safetensors, or model-0000i-of-0000n.safetensors + index above max_shard_bytes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], out_dir / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(tqdm(shards, desc="saving shards", disable=None), start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out_dir / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_model(model: nn.Module, config: dict, out_dir: Path, source_dir: Path | None = None,
               max_shard_bytes: int = 5 * 2**30) -> None:
    """A complete HF directory: weights, config.json (dtype updated) and the source's tokenizer files."""
    out_dir = Path(out_dir)
    save_weights(model, out_dir, max_shard_bytes)
    write_side_files(config, out_dir, next(model.parameters()).dtype, source_dir)


def write_side_files(config: dict, out_dir: Path, dtype: torch.dtype, source_dir: Path | None = None) -> None:
    """config.json (with the weights' dtype) and the source directory's tokenizer files, beside saved weights."""
    config = {**config, "torch_dtype": str(dtype).removeprefix("torch.")}
    config.pop("dtype", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if source_dir is not None and Path(source_dir).resolve() != out_dir.resolve():
        for name in SIDE_FILES:
            if (Path(source_dir) / name).is_file():
                shutil.copy2(Path(source_dir) / name, out_dir / name)
