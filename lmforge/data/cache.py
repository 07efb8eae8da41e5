"""The tokenised-data cache: one directory of .npy arrays and a meta.json per (data, tokenizer, settings) key.

The key hashes the content of every data file (or the Hugging Face dataset's fingerprint), the tokenizer's
fingerprint (its tokenizer.json as loaded, special tokens and chat templates), the data config fields that change
tokenisation, and CACHE_VERSION; a changed file, tokenizer or setting therefore never meets a stale entry. Entries
are written to a temporary directory and renamed into place, so a reader never sees half of one.
"""

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.config.schema import DataConfig, DataSource
from lmforge.data.dataset import Origins, PreferenceDataset, Ragged, Samples, UnpairedPreferences
from lmforge.weights.resolve import lmforge_home

CACHE_VERSION = 1  # bump when tokenisation or the stored layout changes
KINDS = {"sft": Samples, "preference": PreferenceDataset, "kto": UnpairedPreferences}
log = logging.getLogger("lmforge")


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else lmforge_home() / "data"


def cache_key(sources: list[DataSource], fingerprints: list[str], tokenizer_fingerprint: str, cfg: DataConfig,
              max_samples: int | None) -> str:
    settings = {
        "version": CACHE_VERSION,
        "sources": [{**s.model_dump(), "content": fp} for s, fp in zip(sources, fingerprints, strict=True)],
        "tokenizer": tokenizer_fingerprint,
        "template": cfg.template,
        "train_on_inputs": cfg.train_on_inputs,
        "max_seq_len": cfg.max_seq_len,
        "strict": cfg.strict,
        "max_samples": max_samples,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def load(entry: Path) -> tuple[Samples | PreferenceDataset | UnpairedPreferences, dict] | None:
    """The cached data and its meta, or None when the entry is absent or unreadable (it is then rebuilt)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("version") != CACHE_VERSION:
            return None
        cls = KINDS[meta["kind"]]
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            name = field.name
            if field.type is Ragged:
                values[name] = Ragged(_npy(entry, f"{name}.values"), _npy(entry, f"{name}.offsets"))
            elif field.type is Origins:
                values[name] = Origins(tuple(meta["sources"]), _npy(entry, f"{name}.source_ids"),
                                       _npy(entry, f"{name}.rows"))
            else:
                values[name] = _npy(entry, name)
        return cls(**values), meta
    except (OSError, ValueError, KeyError) as e:
        if (entry / "meta.json").exists():
            log.warning("ignoring the unreadable data cache %s (%s); re-tokenising", entry, e)
        return None


def save(entry: Path, data: Samples | PreferenceDataset | UnpairedPreferences, meta: dict) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        kind = next(k for k, cls in KINDS.items() if isinstance(data, cls))
        for field in dataclasses.fields(data):
            value = getattr(data, field.name)
            if isinstance(value, Ragged):
                np.save(tmp / f"{field.name}.values.npy", value.values)
                np.save(tmp / f"{field.name}.offsets.npy", value.offsets)
            elif isinstance(value, Origins):
                np.save(tmp / f"{field.name}.source_ids.npy", value.source_ids)
                np.save(tmp / f"{field.name}.rows.npy", value.rows)
                meta = {**meta, "sources": list(value.sources)}
            else:
                np.save(tmp / f"{field.name}.npy", value)
        (tmp / "meta.json").write_text(json.dumps({**meta, "version": CACHE_VERSION, "kind": kind}, indent=1))
        try:
            tmp.rename(entry)  # atomic; fails when another process finished the same entry first, which is fine
        except OSError:
            if not (entry / "meta.json").is_file():
                shutil.rmtree(entry, ignore_errors=True)  # a leftover without meta.json: replace it
                tmp.rename(entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _npy(entry: Path, name: str) -> np.ndarray:
    # Memory-mapped: a large dataset is paged in as the loader reads it, not all at once.
    return np.load(entry / f"{name}.npy", mmap_mode="r", allow_pickle=False)
