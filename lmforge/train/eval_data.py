"""The rows of an evaluation file and their tokens for perplexity, masked exactly as training masks them.

Rows are read with the data pipeline's sources and formats and tokenised by its SampleEncoder, so a sample's trained
tokens here are its trained tokens in a run on the same file: evaluating the final model gives the run's val_loss.
Unlike training, a malformed row is an error (a score over silently fewer rows would mislead); a row with nothing
left to score within max_seq_len is skipped and counted, as training skips it.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.config.schema import DataConfig, DataSource
from lmforge.data import PairDataset, SFTDataset
from lmforge.data.dataset import Origins, PreferenceDataset, Ragged, Samples
from lmforge.data.encode import NOT_MALFORMED, Encoded, EncodedPair, SampleEncoder
from lmforge.data.formats import Chat, Preference, RowFormat, Text
from lmforge.data.sources import MalformedRow, Origin, open_source
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.train.qa import QARow, parse_qa_row

FORMATS = ("auto", "alpaca", "messages", "sharegpt", "text", "qa", "preference")
CHUNK = 512  # rows per encode_batch call


@dataclass(frozen=True)
class EvalRows:
    source: str  # how errors and results name the file
    format: str  # resolved: never "auto"
    origins: list[Origin]
    rows: list[Chat | Text | Preference]  # what is scored (a QA row as question + reference answer)
    qa: list[QARow] | None  # the QA rows themselves, for exact match


@dataclass(frozen=True)
class EvalSamples:
    dataset: SFTDataset | PairDataset
    skipped: int  # rows with no token left to score within max_seq_len
    first_skipped: str | None  # "file:row: why"


def infer_format(record: object, where: str) -> str:
    """The format a row's keys say: question + answer(s) -> qa, prompt + chosen + rejected -> preference,
    messages, conversations -> sharegpt, instruction + output -> alpaca, text."""
    keys = set(record) if isinstance(record, dict) else set()
    if "question" in keys and keys & {"answer", "answers"}:
        return "qa"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "preference"
    for key, fmt in (("messages", "messages"), ("conversations", "sharegpt"), ("text", "text")):
        if key in keys:
            return fmt
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion", "label"} <= keys:
        raise LmforgeError(f"{where}: unpaired (kto) rows (prompt, completion, label) are not scored by lmforge eval; "
                           "a KTO run's validation metrics (val_rewards/...) score them")
    what = f"keys {sorted(keys)}" if isinstance(record, dict) else f"a {type(record).__name__}, not an object"
    raise LmforgeError(f"{where}: cannot tell the format from the first row ({what}); pass --format alpaca "
                       "(instruction/output), messages, sharegpt (conversations), text or qa (question/answer)")


def read_rows(path: str | Path, fmt: str = "auto", max_samples: int | None = None) -> EvalRows:
    """Every row of the file (the first max_samples), parsed; the first malformed row raises naming file:row."""
    if fmt not in FORMATS:
        raise LmforgeError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path).expanduser()
    if not path.exists():
        raise LmforgeError(f"data file {path} does not exist")
    # open_source reads only the path; the row format is applied below, once it is known.
    source = open_source(DataSource(path=str(path), format="text"))
    origins: list[Origin] = []
    rows: list[Chat | Text] = []
    qa: list[QARow] = []
    parser = None
    for number, record in source.rows():
        origin = Origin(source.name, number)
        if max_samples is not None and len(rows) >= max_samples:
            break
        if parser is None:
            if isinstance(record, MalformedRow):
                raise LmforgeError(f"{origin}: {record.detail}")
            fmt = infer_format(record, str(origin)) if fmt == "auto" else fmt
            parser = None if fmt == "qa" else RowFormat(DataSource(path=str(path), format=fmt), "--data")
        try:
            if parser is None:
                qa.append(parse_qa_row(record))
                rows.append(Chat(qa[-1].messages()))
            else:
                rows.append(parser.parse(record))
        except MalformedRow as bad:
            raise LmforgeError(f"{origin}: {bad.detail} (every row is evaluated: fix or remove it)") from None
        origins.append(origin)
    if not rows:
        raise LmforgeError(f"{source.name} holds no rows to evaluate")
    return EvalRows(source.name, fmt, origins, rows, qa if fmt == "qa" else None)


def encode_rows(data: EvalRows, tokenizer: Tokenizer, template: str = "model", max_seq_len: int = 2048,
                train_on_inputs: bool = False) -> EvalSamples:
    """Tokens and trained flags of every row, laid out (packed) into rows of max_seq_len (pairs: 2 x max_seq_len)."""
    cfg = DataConfig(train=[DataSource(path=data.source, format="text")], template=template,
                     train_on_inputs=train_on_inputs, max_seq_len=max_seq_len)
    encoder = SampleEncoder(tokenizer, cfg)
    kept: list[tuple[Origin, Encoded | EncodedPair]] = []
    skipped, first_skipped = 0, None
    for start in range(0, len(data.rows), CHUNK):
        origins = data.origins[start:start + CHUNK]
        results = encoder.encode([(str(o), r) for o, r in zip(origins, data.rows[start:start + CHUNK], strict=True)])
        for origin, result in zip(origins, results, strict=True):
            if not isinstance(result, MalformedRow):
                kept.append((origin, result))
            elif result.reason in NOT_MALFORMED:
                skipped += 1
                first_skipped = first_skipped or f"{origin}: {result.detail}"
            else:
                raise LmforgeError(f"{origin}: {result.detail}")
    if not kept:
        raise LmforgeError(f"no row of {data.source} has a token to score within --max-seq-len {max_seq_len} "
                           f"(first: {first_skipped})")
    origins = Origins((data.source,), np.zeros(len(kept), dtype=np.int32),
                      np.array([o.row for o, _ in kept], dtype=np.int64))
    if data.format == "preference":
        return EvalSamples(PairDataset(_pairs([e for _, e in kept], origins), max_seq_len, packing=True), skipped,
                           first_skipped)
    samples = Samples(
        tokens=Ragged.from_arrays([np.array(e.tokens, dtype=np.int32) for _, e in kept], np.int32),
        trained=Ragged.from_arrays([np.array(e.trained, dtype=bool) for _, e in kept], bool),
        truncated=np.array([e.truncated for _, e in kept], dtype=bool), origins=origins)
    return EvalSamples(SFTDataset(samples, max_seq_len, packing=True), skipped, first_skipped)


def _pairs(encoded: list[EncodedPair], origins: Origins) -> PreferenceDataset:
    def ragged(name: str, dtype) -> Ragged:
        return Ragged.from_arrays([np.array(getattr(e, name), dtype=dtype) for e in encoded], dtype)

    return PreferenceDataset(ragged("prompt", np.int32), ragged("chosen", np.int32), ragged("chosen_trained", bool),
                             ragged("rejected", np.int32), ragged("rejected_trained", bool),
                             np.array([e.truncated for e in encoded], dtype=bool), origins)
