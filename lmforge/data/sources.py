"""Where training rows come from: local .jsonl/.json/.parquet/.csv files, or Hugging Face datasets.

`open_source(DataSource)` returns a source with a `name` (how errors refer to it), a `fingerprint()` (a hash of its
content, for the tokenised-data cache) and `rows()`, which yields `(row, record)` with 1-based row numbers: the line
number in a .jsonl file, the record's index elsewhere. A row that cannot even be decoded (a bad JSON line) is yielded
as a `MalformedRow`, so the caller counts or rejects it like any other bad row; problems with the whole file raise.
"""

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config.schema import DataSource
from lmforge.errors import LmforgeError

FILE_KINDS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class MalformedRow(Exception):
    """A row that cannot become a sample; `reason` is the short key the report counts it under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a sample came from: a file (or dataset id) and its 1-based row."""

    source: str
    row: int

    def __str__(self) -> str:
        return f"{self.source}:{self.row}"


class LocalFile:
    def __init__(self, path: Path):
        self.path = path
        self.name = str(path)
        self.kind = FILE_KINDS[path.suffix.lower()]

    def fingerprint(self) -> str:
        return _file_sha256(self.path)

    def rows(self) -> Iterator[tuple[int, Any]]:
        try:
            yield from {"jsonl": self._jsonl, "json": self._json, "parquet": self._parquet, "csv": self._csv}[
                self.kind]()
        except UnicodeDecodeError as e:
            raise LmforgeError(f"{self.path} is not UTF-8 text ({e.reason} at byte {e.start}); re-save it as "
                               "UTF-8") from None

    def _jsonl(self) -> Iterator[tuple[int, Any]]:
        with self.path.open(encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if line.strip():
                    yield line_number, _json_line(line)

    def _json(self) -> Iterator[tuple[int, Any]]:
        text = self.path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # JSON Lines saved as .json: several documents, one per line
                yield from self._jsonl()
                return
            raise LmforgeError(f"{self.path} is not valid JSON (line {e.lineno}: {e.msg})") from None
        if not isinstance(data, list):
            raise LmforgeError(f"{self.path} must hold a JSON list of records (or one JSON object per line), "
                               f"not a {type(data).__name__}")
        yield from enumerate(data, 1)

    def _parquet(self) -> Iterator[tuple[int, Any]]:
        import pyarrow
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(self.path)
        except (pyarrow.ArrowException, OSError) as e:
            raise LmforgeError(f"{self.path} is not a readable Parquet file ({e})") from None
        row = 0
        for batch in table.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield row, record

    def _csv(self) -> Iterator[tuple[int, Any]]:
        with self.path.open(encoding="utf-8", newline="") as f:
            yield from enumerate(csv.DictReader(f), 1)


class HubDataset:
    """A dataset loaded by `datasets`: a Hub id, a local directory of data files, or a save_to_disk directory."""

    def __init__(self, source: DataSource, directory: Path | None = None):
        self.name = source.path if source.split == "train" else f"{source.path}[{source.split}]"
        self.directory = directory
        self.dataset = _load_hf(source)

    def fingerprint(self) -> str:
        if self.directory is None:
            return self.dataset._fingerprint  # datasets' own hash of the prepared data (Hub revision and files)
        # datasets' fingerprint of local files follows their paths and times; the cache wants their content.
        digest = hashlib.sha256()
        for file in sorted(p for p in self.directory.rglob("*") if p.is_file() and ".cache" not in p.parts):
            digest.update(f"{file.relative_to(self.directory)}\0{_file_sha256(file)}\0".encode())
        return digest.hexdigest()

    def rows(self) -> Iterator[tuple[int, Any]]:
        yield from enumerate(self.dataset, 1)


def open_source(source: DataSource) -> LocalFile | HubDataset:
    path = Path(source.path).expanduser()
    if path.suffix.lower() in FILE_KINDS:
        if not path.is_file():
            raise LmforgeError(f"data file {path} does not exist (relative paths are read from the current "
                               "directory)")
        return LocalFile(path)
    if path.is_dir():
        return HubDataset(source, directory=path)
    if path.exists():
        raise LmforgeError(f"{path}: data files must end in {', '.join(FILE_KINDS)}")
    return HubDataset(source)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _load_hf(source: DataSource):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    where = f"Hugging Face dataset {source.path!r}" + (f" (subset {source.subset!r})" if source.subset else "")
    path = Path(source.path).expanduser()
    try:
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if source.split not in loaded:
                    raise LmforgeError(f"{where} has no split {source.split!r}; its splits are {sorted(loaded)}")
                loaded = loaded[source.split]
            return loaded
        return datasets.load_dataset(source.path, source.subset, split=source.split)
    except LmforgeError:
        raise
    except DatasetNotFoundError:
        raise LmforgeError(f"{where} was not found on the Hub (or is gated or private: set HF_TOKEN); check the id, "
                           "or point data path at a local .jsonl/.json/.parquet/.csv file") from None
    except ConnectionError:
        raise LmforgeError(f"{where} is not in the local datasets cache and the Hub cannot be reached (offline); "
                           "download it once with network access, or point data path at a local "
                           ".jsonl/.json/.parquet/.csv file") from None
    except ValueError as e:
        if "split" in str(e).lower():
            raise LmforgeError(f"{where}: {e}; set the data source's split") from None
        if "config" in str(e).lower():
            raise LmforgeError(f"{where}: {e}; set the data source's subset") from None
        raise LmforgeError(f"{where} could not be loaded ({e})") from None
    except (FileNotFoundError, OSError) as e:
        raise LmforgeError(f"{where} could not be loaded ({type(e).__name__}: {e})") from None


def _json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return MalformedRow("invalid JSON", f"not valid JSON ({e.msg} at column {e.colno})")
