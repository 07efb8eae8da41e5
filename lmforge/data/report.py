"""What the data pipeline did, per split: samples, tokens, trained tokens, truncation, skipped rows, packing."""

from dataclasses import dataclass, field

import numpy as np

from lmforge.data.dataset import KTODataset, PairDataset, SFTDataset

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class SplitReport:
    name: str
    samples: int
    tokens: int
    trained_tokens: int
    truncated: int
    lengths: dict[str, int]  # p50, p90, p99, max of sample lengths in tokens
    rows: int | None = None
    packing_efficiency: float | None = None  # real tokens / (rows x row length)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    first_skipped: dict[str, str] = field(default_factory=dict)  # reason -> "file:row: what was wrong"
    cache: str = ""

    @property
    def trained_fraction(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    def lines(self) -> list[str]:
        lengths = ", ".join(f"{k} {v}" for k, v in self.lengths.items())
        out = [f"{self.name}: {self.samples:,} samples, {self.tokens:,} tokens, {self.trained_tokens:,} trained "
               f"({self.trained_fraction:.1%}), {self.truncated:,} truncated; lengths {lengths}"]
        if self.rows is not None:
            out.append(f"  {self.rows:,} rows, packing efficiency {self.packing_efficiency:.1%}")
        if self.skipped:
            out.append(f"  skipped {sum(self.skipped.values()):,} rows:")
            out += [f"    {n:,} {reason} (first: {self.first_skipped[reason]})" for reason, n in self.skipped.items()]
        if self.cache:
            out.append(f"  cache: {self.cache}")
        return out


@dataclass(frozen=True)
class DataReport:
    train: SplitReport
    validation: SplitReport | None

    def lines(self) -> list[str]:
        return self.train.lines() + (self.validation.lines() if self.validation else [])

    def __str__(self) -> str:
        return "\n".join(self.lines())


def split_report(name: str, data: SFTDataset | PairDataset | KTODataset, skipped: dict[str, int] | None = None,
                 first_skipped: dict[str, str] | None = None, cache: str = "") -> SplitReport:
    if isinstance(data, SFTDataset):
        samples = data.samples
        lengths = data.lengths
        tokens, trained = int(lengths.sum()), samples.num_trained()
        truncated = int(np.sum(samples.truncated))
    elif isinstance(data, KTODataset):  # an unpaired row counts its trained document and its KL document
        rows = data.data
        trained_docs = rows.prompt.lengths() + rows.completion.lengths()
        lengths = np.concatenate([trained_docs, data.lengths - trained_docs])
        tokens = int(lengths.sum())
        trained = int(rows.completion_trained.values.sum())
        truncated = int(np.sum(rows.truncated))
    else:  # a preference pair counts both of its documents: prompt + chosen and prompt + rejected
        pairs = data.pairs
        prompt = pairs.prompt.lengths()
        lengths = np.concatenate([prompt + pairs.chosen.lengths(), prompt + pairs.rejected.lengths()])
        tokens = int(lengths.sum())
        trained = int(pairs.chosen_trained.values.sum() + pairs.rejected_trained.values.sum())
        truncated = int(np.sum(pairs.truncated))
    rows, packing = data.num_rows, data.packing_efficiency()
    stats = {f"p{p}": int(np.percentile(lengths, p, method="nearest")) for p in PERCENTILES} if len(lengths) else {}
    stats["max"] = int(lengths.max()) if len(lengths) else 0
    return SplitReport(name, len(data), tokens, trained, truncated, stats, rows, packing, dict(skipped or {}),
                       dict(first_skipped or {}), cache)
