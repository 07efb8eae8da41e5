"""DataConfig -> tokenised train and validation datasets (through the cache) and a report of what happened."""

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from lmforge.config.schema import DataConfig, DataSource
from lmforge.data import cache
from lmforge.data.dataset import (
    KTODataset,
    Origins,
    PairDataset,
    PreferenceDataset,
    Ragged,
    Samples,
    SFTDataset,
    UnpairedPreferences,
    take,
)
from lmforge.data.encode import NOT_MALFORMED, EncodedPair, EncodedUnpaired, SampleEncoder
from lmforge.data.formats import RowFormat
from lmforge.data.report import DataReport, split_report
from lmforge.data.sources import MalformedRow, Origin, open_source
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

CHUNK = 512  # rows tokenised per encode_batch call
SAMPLE_FIELDS = ("tokens", "trained")
PAIR_FIELDS = ("prompt", "chosen", "chosen_trained", "rejected", "rejected_trained")
UNPAIRED_FIELDS = ("prompt", "completion", "completion_trained")
# what each encoded row is collected into, and its fields (an Encoded SFT sample: Samples, SAMPLE_FIELDS)
LAYOUTS = {EncodedPair: (PreferenceDataset, PAIR_FIELDS), EncodedUnpaired: (UnpairedPreferences, UNPAIRED_FIELDS)}
KIND_NAMES = {"preference": "preference sources", "kto": "unpaired (kto) sources", "sft": "SFT sources"}
log = logging.getLogger("lmforge")


@dataclass(frozen=True)
class Datasets:
    train: SFTDataset | PairDataset | KTODataset
    validation: SFTDataset | PairDataset | KTODataset | None
    report: DataReport


@dataclass(frozen=True)
class _Encoded:
    data: Samples | PreferenceDataset | UnpairedPreferences
    skipped: dict[str, int]
    first_skipped: dict[str, str]
    cache: str


def build_datasets(cfg: DataConfig, tokenizer: Tokenizer, seed: int = 0) -> Datasets:
    """Reads, formats, tokenises (or loads from the cache) and lays out the training and validation data.

    Validation comes from cfg.validation's sources, or is cfg.val_fraction of the training samples drawn by `seed`.
    """
    if cfg.validation and cfg.val_fraction:
        raise LmforgeError("data.validation and data.val_fraction both set; give validation files or a fraction")
    kind = _kind(cfg.train, "data.train")
    train = _encode_split("data.train", cfg.train, cfg, tokenizer, cfg.max_samples)
    validation = None
    train_data, val_data = train.data, None
    if cfg.validation:
        if _kind(cfg.validation, "data.validation") != kind:
            raise LmforgeError("data.validation must have the same kind of rows as data.train (preference pairs, "
                               "unpaired kto rows or SFT rows)")
        validation = _encode_split("data.validation", cfg.validation, cfg, tokenizer, None)
        val_data = validation.data
    elif cfg.val_fraction:
        train_data, val_data = _split(train.data, cfg.val_fraction, seed)

    def layout(data):
        layouts = {Samples: SFTDataset, PreferenceDataset: PairDataset, UnpairedPreferences: KTODataset}
        return layouts[type(data)](data, cfg.max_seq_len, cfg.packing)

    train_set, val_set = layout(train_data), None if val_data is None else layout(val_data)
    report = DataReport(
        split_report("train", train_set, train.skipped, train.first_skipped, train.cache),
        None if val_set is None else split_report(
            "validation", val_set, *((validation.skipped, validation.first_skipped, validation.cache)
                                     if validation else ())))
    return Datasets(train_set, val_set, report)


def _kind(sources: list[DataSource], where: str) -> str:
    kinds = {s.format if s.format in ("preference", "kto") else "sft" for s in sources}
    if len(kinds) > 1:
        raise LmforgeError(f"{where} mixes {' with '.join(KIND_NAMES[k] for k in sorted(kinds))}; train them in "
                           "separate runs")
    return kinds.pop()


def _split(data: Samples | PreferenceDataset | UnpairedPreferences, fraction: float, seed: int):
    n = len(data)
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise LmforgeError(f"data.val_fraction {fraction} of {n} samples leaves none to train on; lower it")
    held_out = np.random.default_rng(seed).permutation(n)[:n_val]
    is_val = np.zeros(n, dtype=bool)
    is_val[held_out] = True
    # Each split keeps file order, so previews and evaluation read samples as the files list them.
    return take(data, np.flatnonzero(~is_val)), take(data, np.flatnonzero(is_val))


def _encode_split(where: str, sources: list[DataSource], cfg: DataConfig, tokenizer: Tokenizer,
                  limit: int | None) -> _Encoded:
    opened = [open_source(s) for s in sources]
    key = cache.cache_key(sources, [o.fingerprint() for o in opened], tokenizer.fingerprint(), cfg, limit)
    entry = cache.cache_root(cfg) / key
    hit = cache.load(entry)
    if hit is not None:
        data, meta = hit
        log.info("%s: %d tokenised samples from the cache %s", where, len(data), entry)
        return _Encoded(data, meta["skipped"], meta["first_skipped"], f"hit {entry}")
    collector = _Collector(cfg.strict)
    encoder = SampleEncoder(tokenizer, cfg)
    for index, (source, opened_source) in enumerate(zip(sources, opened, strict=True)):
        if limit is not None and collector.kept >= limit:
            break
        log.info("%s: tokenising %s", where, opened_source.name)
        row_format = RowFormat(source, f"{where}[{index}]")
        pending: list[tuple[Origin, object]] = []
        for row, record in opened_source.rows():
            origin = Origin(opened_source.name, row)
            try:
                pending.append((origin, row_format.parse(record)))
            except MalformedRow as bad:
                collector.skip(origin, bad)
                continue
            if len(pending) >= CHUNK or (limit is not None and collector.kept + len(pending) >= limit):
                collector.add(index, pending, encoder.encode([(str(o), r) for o, r in pending]))
                pending = []
                if limit is not None and collector.kept >= limit:
                    break
        collector.add(index, pending, encoder.encode([(str(o), r) for o, r in pending]))
    if not collector.kept:
        skipped = "; ".join(f"{n} {reason} (first: {collector.first[reason]})"
                            for reason, n in collector.skipped.items())
        raise LmforgeError(f"{where} has no usable samples ({', '.join(o.name for o in opened)}): "
                           f"{skipped or 'the data is empty'}")
    data = collector.result([o.name for o in opened], limit)
    meta = {"skipped": dict(collector.skipped), "first_skipped": collector.first}
    cache.save(entry, data, meta)
    log.info("%s: %d samples tokenised, cached in %s", where, len(data), entry)
    return _Encoded(data, meta["skipped"], meta["first_skipped"], f"written {entry}")


class _Collector:
    """Gathers encoded samples in order, as compact arrays, and counts skipped rows (in strict mode: fails on the
    first malformed one)."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.arrays: dict[str, list[np.ndarray]] = defaultdict(list)  # field of Encoded / EncodedPair -> per sample
        self.truncated: list[bool] = []
        self.desirable: list[bool] = []  # unpaired rows' labels
        self.kind: type = Samples
        self.source_ids: list[int] = []
        self.rows: list[int] = []
        self.skipped: Counter[str] = Counter()
        self.first: dict[str, str] = {}

    @property
    def kept(self) -> int:
        return len(self.truncated)

    def skip(self, origin: Origin, bad: MalformedRow) -> None:
        if self.strict and bad.reason not in NOT_MALFORMED:
            raise LmforgeError(f"{origin}: {bad.detail} (data.strict is on: fix the row, or set data.strict: false "
                               "to skip and count malformed rows)")
        self.skipped[bad.reason] += 1
        self.first.setdefault(bad.reason, f"{origin}: {bad.detail}")

    def add(self, source_id: int, pending: list[tuple[Origin, object]], results: list) -> None:
        for (origin, _), result in zip(pending, results, strict=True):
            if isinstance(result, MalformedRow):
                self.skip(origin, result)
                continue
            self.kind, fields = LAYOUTS.get(type(result), (Samples, SAMPLE_FIELDS))
            for name in fields:
                values = getattr(result, name)
                self.arrays[name].append(np.array(values, dtype=bool if name.endswith("trained") else np.int32))
            if isinstance(result, EncodedUnpaired):
                self.desirable.append(result.desirable)
            self.truncated.append(result.truncated)
            self.source_ids.append(source_id)
            self.rows.append(origin.row)

    def result(self, names: list[str], limit: int | None) -> Samples | PreferenceDataset | UnpairedPreferences:
        n = self.kept if limit is None else min(limit, self.kept)
        origins = Origins(tuple(names), np.array(self.source_ids[:n], dtype=np.int32),
                          np.array(self.rows[:n], dtype=np.int64))
        fields = {name: Ragged.from_arrays(arrays[:n], arrays[0].dtype) for name, arrays in self.arrays.items()}
        if self.kind is UnpairedPreferences:
            fields["desirable"] = np.array(self.desirable[:n], dtype=bool)
        return self.kind(**fields, truncated=np.array(self.truncated[:n], dtype=bool), origins=origins)
