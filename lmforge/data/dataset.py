"""Tokenised datasets as flat numpy arrays: what the cache stores and the loader reads.

`Samples` (SFT): per sample its token ids and a `trained` flag per token (the token is a target of the loss).
`PreferenceDataset`: per pair the prompt ids and the chosen and rejected reply ids with their trained flags.
`SFTDataset` / `PairDataset`: Samples / pairs plus their layout into rows (packing.py), the loader's unit; each
gives the documents (token ids and labels) of a set of rows, which the loader lays end to end into a flat batch.
A pair is two documents, prompt+chosen then the rejected answer, which attends to the chosen document's prompt
(Document.prefix), always in the same row.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from lmforge.data.packing import Rows, efficiency, one_per_row, pack
from lmforge.data.sources import Origin

IGNORE_INDEX = -100  # label of a position whose next token is not trained (cross_entropy's ignore_index)


@dataclass(frozen=True, slots=True)
class Ragged:
    """Variable-length rows in one array: row i is values[offsets[i]:offsets[i + 1]]."""

    values: np.ndarray
    offsets: np.ndarray  # int64 [n + 1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, indices: np.ndarray) -> "Ragged":
        return Ragged.from_arrays([self[i] for i in indices], self.values.dtype)

    @classmethod
    def from_arrays(cls, arrays: list[np.ndarray], dtype: Any) -> "Ragged":
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(a) for a in arrays])
        values = np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype=dtype)
        return cls(values, offsets)


@dataclass(frozen=True, slots=True)
class Origins:
    """Each sample's source (an index into `sources`) and 1-based row in it."""

    sources: tuple[str, ...]
    source_ids: np.ndarray  # int32 [n]
    rows: np.ndarray  # int64 [n]

    def __getitem__(self, i: int) -> Origin:
        return Origin(self.sources[int(self.source_ids[i])], int(self.rows[i]))

    def take(self, indices: np.ndarray) -> "Origins":
        return Origins(self.sources, self.source_ids[indices], self.rows[indices])


@dataclass(frozen=True, slots=True)
class Samples:
    tokens: Ragged  # int32
    trained: Ragged  # bool, same offsets
    truncated: np.ndarray  # bool [n]: the sample was longer than max_seq_len
    origins: Origins

    def __len__(self) -> int:
        return len(self.truncated)

    def labels(self, i: int) -> np.ndarray:
        """int64 labels of sample i: labels[t] is the token to predict at position t, or IGNORE_INDEX."""
        tokens, trained = self.tokens[i], self.trained[i]
        labels = np.full(len(tokens), IGNORE_INDEX, dtype=np.int64)
        labels[:-1] = np.where(trained[1:], tokens[1:], IGNORE_INDEX)
        return labels

    def num_trained(self) -> int:
        # A sample's first token is never trained, so every trained flag is one label.
        return int(self.trained.values.sum())


@dataclass(frozen=True, slots=True)
class PreferenceDataset:
    prompt: Ragged  # int32
    chosen: Ragged  # int32
    chosen_trained: Ragged  # bool
    rejected: Ragged  # int32
    rejected_trained: Ragged  # bool
    truncated: np.ndarray  # bool [n]
    origins: Origins

    def __len__(self) -> int:
        return len(self.truncated)

    def document(self, i: int, chosen: bool) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and labels of pair i's prompt+chosen (or prompt+rejected) document; the prompt is not trained."""
        prompt = self.prompt[i]
        reply, flags = (self.chosen[i], self.chosen_trained[i]) if chosen else (self.rejected[i],
                                                                                 self.rejected_trained[i])
        tokens = np.concatenate([prompt, reply])
        labels = np.full(len(tokens), IGNORE_INDEX, dtype=np.int64)
        labels[len(prompt) - 1:-1] = np.where(flags, reply, IGNORE_INDEX)
        return tokens, labels

    def pair_documents(self, i: int) -> tuple["Document", "Document"]:
        """Pair i as prompt+chosen, then the rejected document sharing that prompt: it holds the prompt's last token
        (whose next token is the rejected answer's first) and the rejected answer, and attends to the rest of the
        prompt in the chosen document first, so the prompt runs through the model once instead of twice."""
        shared = len(self.prompt[i]) - 1
        tokens, labels = self.document(i, chosen=False)
        return Document(*self.document(i, chosen=True)), Document(tokens[shared:], labels[shared:], shared)


class Document(NamedTuple):
    tokens: np.ndarray  # token ids
    labels: np.ndarray  # int64: the token to predict at each position, or IGNORE_INDEX
    prefix: int = 0  # how many first tokens of the previous document it attends to before its own (a shared prompt)


class SFTDataset:
    """Tokenised SFT samples and their rows (packed into max_seq_len, or one sample per row)."""

    def __init__(self, samples: Samples, max_seq_len: int, packing: bool):
        self.samples = samples
        self.max_seq_len = self.row_len = max_seq_len
        self.packing = packing
        self.lengths = samples.tokens.lengths()
        self.rows: Rows = pack(self.lengths, max_seq_len) if packing else one_per_row(len(samples))

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def packing_efficiency(self) -> float:
        return efficiency(self.lengths, self.rows, self.max_seq_len)

    def documents(self, rows: np.ndarray) -> list[Document]:
        samples = [int(s) for r in rows for s in self.rows[int(r)]]
        return [Document(self.samples.tokens[s], self.samples.labels(s)) for s in samples]


class PairDataset:
    """Tokenised preference pairs and their rows. A pair's two documents share its row and its prompt
    (PreferenceDataset.pair_documents); packed rows hold at most 2 x max_seq_len tokens (one pair of the longest
    samples), so micro_batch_size counts rows of that size, or pairs
    without packing."""

    def __init__(self, pairs: PreferenceDataset, max_seq_len: int, packing: bool):
        self.pairs = pairs
        self.row_len = 2 * max_seq_len
        self.packing = packing
        self.lengths = pairs.prompt.lengths() + 1 + pairs.chosen.lengths() + pairs.rejected.lengths()  # shared prompt
        self.rows: Rows = pack(self.lengths, self.row_len) if packing else one_per_row(len(pairs))

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def packing_efficiency(self) -> float:
        return efficiency(self.lengths, self.rows, self.row_len)

    def documents(self, rows: np.ndarray) -> list[Document]:
        pairs = [int(p) for r in rows for p in self.rows[int(r)]]
        return [document for p in pairs for document in self.pairs.pair_documents(p)]


def take(data: Samples | PreferenceDataset, indices: np.ndarray) -> Samples | PreferenceDataset:
    """The samples at `indices`, in that order (for the validation split)."""
    values = {}
    for field in dataclasses.fields(data):
        value = getattr(data, field.name)
        values[field.name] = value.take(indices) if isinstance(value, (Ragged, Origins)) else value[indices]
    return type(data)(**values)


@dataclass(frozen=True, slots=True)
class UnpairedPreferences:
    """Tokenised unpaired preference rows (`format: kto`): per row the prompt ids, the completion ids with their
    trained flags, and whether the completion is desirable (the row's label)."""

    prompt: Ragged  # int32
    completion: Ragged  # int32
    completion_trained: Ragged  # bool
    desirable: np.ndarray  # bool [n]
    truncated: np.ndarray  # bool [n]
    origins: Origins

    def __len__(self) -> int:
        return len(self.truncated)

    def document(self, i: int, completion_of: int, max_seq_len: int) -> Document:
        """Token ids and labels of row i's prompt followed by row `completion_of`'s completion (cut to fit
        max_seq_len after row i's prompt); the prompt is not trained."""
        prompt = self.prompt[i]
        room = max_seq_len - len(prompt)
        reply, flags = self.completion[completion_of][:room], self.completion_trained[completion_of][:room]
        tokens = np.concatenate([prompt, reply])
        labels = np.full(len(tokens), IGNORE_INDEX, dtype=np.int64)
        labels[len(prompt) - 1:-1] = np.where(flags, reply, IGNORE_INDEX)
        return Document(tokens, labels)


class KTODataset:
    """Unpaired preference rows and their layout for KTO. Row i is two documents in the same packed row: its
    prompt + completion (the trained document) and its KL document, the same prompt with the completion of row
    kl_partners[i] (see kl_partners). TRL's collator shifts completions by one within each shuffled batch; here the
    mismatch is fixed once for the dataset, so that it does not depend on batching, ranks or resumption. Packed rows
    hold at most 2 x max_seq_len tokens, as PairDataset's."""

    def __init__(self, rows: UnpairedPreferences, max_seq_len: int, packing: bool):
        self.data = rows
        self.max_seq_len = max_seq_len
        self.row_len = 2 * max_seq_len
        self.packing = packing
        self.kl_partners = kl_partners(rows.prompt)
        prompt, completion = rows.prompt.lengths(), rows.completion.lengths()
        kl_completion = np.minimum(completion[self.kl_partners], max_seq_len - prompt)
        self.lengths = 2 * prompt + completion + kl_completion
        self.rows: Rows = pack(self.lengths, self.row_len) if packing else one_per_row(len(rows))

    def __len__(self) -> int:
        return len(self.data)

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def packing_efficiency(self) -> float:
        return efficiency(self.lengths, self.rows, self.row_len)

    def samples(self, rows: np.ndarray) -> list[int]:
        """The dataset rows (samples) in the given layout rows, in batch order."""
        return [int(s) for r in rows for s in self.rows[int(r)]]

    def documents(self, rows: np.ndarray) -> list[Document]:
        return [self.data.document(s, other, self.max_seq_len) for s in self.samples(rows)
                for other in (s, int(self.kl_partners[s]))]

    def desirable(self, rows: np.ndarray) -> np.ndarray:
        """Each sample's label, in the order documents() lays the samples out."""
        return self.data.desirable[self.samples(rows)].astype(bool)


KL_SEARCH = 64  # rows looked back for a different prompt before settling for the previous row


def kl_partners(prompts: Ragged) -> np.ndarray:
    """For each row, the row whose completion its KL document takes: the previous row in a fixed shuffled order of
    the rows (seed 0) whose prompt differs from the row's own. Shuffled, because a file's neighbours often share
    their prompt (unpaired rows made from pairs: the chosen row, then the rejected one), which would make the KL
    document a matched one; the previous row outright when none of the KL_SEARCH rows before it has another prompt
    (a single row is its own partner)."""
    n = len(prompts)
    order = np.random.default_rng(0).permutation(n)
    partners = np.empty(n, dtype=np.int64)
    for k, i in enumerate(order):
        partners[i] = order[(k - 1) % n]
        for back in range(1, min(KL_SEARCH, n - 1) + 1):
            j = order[(k - back) % n]
            if not np.array_equal(prompts[i], prompts[j]):
                partners[i] = j
                break
    return partners
