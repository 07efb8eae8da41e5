"""Directories that appear whole: written under a temporary name beside the target, then renamed into place, so a
crash or kill midway never leaves a half-written directory under the target's name.

    with atomic_dir(out) as tmp:
        save_file(state, tmp / "model.safetensors")
    # here out holds the new files; had the block raised, out would be as before
"""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

Existing = Literal["replace", "update", "keep"]


def staging_dir(target: Path, shared: bool = False) -> Path:
    """The temporary directory beside target. Per process unless shared: the ranks of one distributed run write
    into one (and a name without the process id is what they can all compute)."""
    target = Path(target)
    return target.with_name(f".{target.name}.tmp" if shared else f".{target.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_dir(target: Path, existing: Existing = "replace", durable: bool = False, shared: bool = False,
               keep_on_error: bool = False) -> Iterator[Path]:
    """Yields an empty temporary directory; when the block ends without an exception its content becomes target.

    existing: what an existing target becomes. "replace": the new directory takes its place whole. "update": the
    new files replace theirs one by one (each atomically) and the target's other files stay. "keep": the existing
    target wins (another process finished the same work first) and the new directory is dropped.
    durable: fsync every file before the rename that makes it visible (checkpoints that must survive power loss).
    keep_on_error: leave the temporary directory behind when the block raises (for inspection, as a kill would);
    by default it is removed. The next write of the same target starts from an empty one either way.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(target, shared)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        if not keep_on_error:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if durable:
            _fsync_files(tmp)
        _publish(tmp, target, existing)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, target: Path, existing: Existing) -> None:
    if not target.exists():
        try:
            tmp.rename(target)
            return
        except OSError:  # another process published the same target in between
            if not target.exists():
                raise
    if existing == "keep":
        return
    if existing == "update":
        for path in tmp.iterdir():
            os.replace(path, target / path.name)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_files(folder: Path) -> None:
    for path in (p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
