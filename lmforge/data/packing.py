"""How samples are laid into rows: one sample per row, or packed into rows of at most max_seq_len tokens.

Packing is best-fit decreasing: samples from longest to shortest (ties by index), each into the open row with the
least room that still fits it, else a new row. Deterministic, O(n log max_seq_len), and on typical SFT length
distributions within a few percent of the optimum. Rows are built once per dataset; the loader shuffles rows, and
attention never crosses the samples of a row (each keeps its own cu_seqlens entry).
"""

import bisect
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Rows:
    """Row r holds samples[offsets[r]:offsets[r + 1]] (sample indices, laid end to end in that order)."""

    offsets: np.ndarray  # int64 [num_rows + 1]
    samples: np.ndarray  # int64 [num_samples]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, r: int) -> np.ndarray:
        return self.samples[self.offsets[r] : self.offsets[r + 1]]


def one_per_row(num_samples: int) -> Rows:
    return Rows(np.arange(num_samples + 1, dtype=np.int64), np.arange(num_samples, dtype=np.int64))


def pack(lengths: np.ndarray, max_seq_len: int) -> Rows:
    """Packs samples of the given lengths (each <= max_seq_len) into as few rows as best-fit decreasing finds."""
    if len(lengths) and int(lengths.max()) > max_seq_len:
        raise ValueError(f"a sample of {int(lengths.max())} tokens does not fit a row of {max_seq_len}")
    rows: list[list[int]] = []
    room_sorted: list[int] = []  # distinct free room of the open rows, ascending
    open_rows: dict[int, list[int]] = {}  # free room -> rows with exactly that room
    for i in np.argsort(-lengths, kind="stable").tolist():
        length = int(lengths[i])
        k = bisect.bisect_left(room_sorted, length)
        if k == len(room_sorted):
            r, room = len(rows), max_seq_len
            rows.append([])
        else:
            room = room_sorted[k]
            r = open_rows[room].pop()
            if not open_rows[room]:
                del open_rows[room], room_sorted[k]
        rows[r].append(i)
        room -= length
        if room > 0:
            if room not in open_rows:
                open_rows[room] = []
                bisect.insort(room_sorted, room)
            open_rows[room].append(r)
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    samples = np.array([i for r in rows for i in r], dtype=np.int64)
    return Rows(offsets, samples)


def efficiency(lengths: np.ndarray, rows: Rows, max_seq_len: int) -> float:
    """Real tokens / (rows x max_seq_len): the share of a full-row budget that holds tokens, not emptiness."""
    return float(lengths.sum()) / (len(rows) * max_seq_len) if len(rows) else 0.0
