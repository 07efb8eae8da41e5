"""Structured output: StructuredOutputsParams compiled by xgrammar into per-step token bitmasks for the sampler.

Grammars compile on a small thread pool, once per distinct constraint (cached by its key), off the engine's step
loop: a request waits in the scheduler until its grammar is ready (others keep running), and one whose grammar
fails or is not ready within the time limit is finished with an error instead of stalling anything. Each sequence
(n > 1 included) owns a matcher that advances with its accepted tokens. Sequences under a grammar take no
speculative drafts (a rejected draft would need a matcher rollback; the simplest correct rule is none at all).
With a reasoning parser, the grammar starts after the end-of-thinking token.

xgrammar is imported on first use only: without it lmforge runs, and a constrained request gets a ValueError
saying what to install.
"""

import concurrent.futures
import json
import threading
import time
import weakref
from collections import OrderedDict

import torch

from lmforge.engine.sampling_params import StructuredOutputsParams

INSTALL_HINT = "structured output needs the xgrammar package: pip install 'lmforge[structured]'"
MAX_WHITESPACE = 8  # most whitespace characters between JSON tokens (enough for indented output)
CACHE_SIZE = 256  # compiled grammars kept (least recently used dropped first)
BITS = torch.arange(32, dtype=torch.int32)


def _import_xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    return xgrammar


class GrammarCompiler:
    """Compiles constraints for one tokenizer and vocabulary width (the model's logits width: ids past the
    tokenizer's vocabulary are never allowed) on `workers` threads, caching results by constraint."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: frozenset[int], timeout_s: float = 10.0,
                 workers: int = 2):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.timeout_s = timeout_s
        # at most `workers` compiles at once; one past its time limit gives its slot up (its C++ compile cannot be
        # stopped and finishes on its own daemon thread), so a pathological schema never stalls the next ones
        self._slots = threading.Semaphore(workers)
        self._holding: set[concurrent.futures.Future] = set()
        self._cache: OrderedDict[str, concurrent.futures.Future] = OrderedDict()
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()
        self._xgr_compiler = None
        self._started: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # future -> when its compile began

    def compile(self, params: StructuredOutputsParams) -> concurrent.futures.Future:
        """A future of the compiled grammar; its exception is a ValueError naming the constraint's field."""
        _import_xgrammar()
        key = params.key()
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = concurrent.futures.Future()
            threading.Thread(target=self._run, args=(params, future), name="lmforge-grammar", daemon=True).start()
            self._cache[key] = future
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return future

    def remaining(self, future: concurrent.futures.Future) -> float | None:
        """Seconds left of the compile's time limit; None while it waits for a thread (the limit is on compiling,
        not on queueing behind other schemas)."""
        started = self._started.get(future)
        if started is None:
            return None
        left = self.timeout_s - (time.monotonic() - started)
        if left <= 0 and not future.done():
            self._release(future)
        return left

    def wait(self, params: StructuredOutputsParams) -> None:
        """Blocks until params' grammar is compiled; ValueError if it cannot be, or not within the time limit."""
        future = self.compile(params)
        while True:
            left = self.remaining(future)
            if left is not None and left <= 0 and not future.done():
                raise ValueError(timeout_message(params, self.timeout_s))
            try:
                future.result(0.05 if left is None else max(left, 0.001))
                return
            except concurrent.futures.TimeoutError:
                continue

    def _run(self, params: StructuredOutputsParams, future: concurrent.futures.Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            compiler = self._compiler(_import_xgrammar())  # the one-time tokenizer table is not on the clock
            self._slots.acquire()
            with self._lock:
                self._holding.add(future)
            self._started[future] = time.monotonic()
            future.set_result(self._compile(compiler, params))
        except BaseException as e:
            future.set_exception(e)
        finally:
            self._release(future)

    def _release(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            if future not in self._holding:
                return
            self._holding.discard(future)
        self._slots.release()

    def _compile(self, compiler, params: StructuredOutputsParams):
        kind, field = params.kind, f"structured_outputs.{params.kind}"
        try:
            if kind in ("json", "json_object"):  # json_object: any JSON object, as OpenAI's (and vLLM's) mode
                schema = params.json if kind == "json" else {"type": "object"}
                schema = schema if isinstance(schema, dict) else {} if schema else {"not": {}}
                compact = params.disable_any_whitespace
                # whitespace is bounded: a small model under "any whitespace" can otherwise pad until max_tokens
                return compiler.compile_json_schema(json.dumps(schema), any_whitespace=not compact,
                                                    max_whitespace_cnt=None if compact else MAX_WHITESPACE)
            if kind == "regex":
                return compiler.compile_regex(params.regex)
            if kind == "choice":
                return compiler.compile_grammar("root ::= " + " | ".join(_ebnf_string(c) for c in params.choice))
            return compiler.compile_grammar(params.grammar)
        except Exception as e:  # xgrammar reports bad schemas, regexes and grammars as RuntimeError / ValueError
            what = {"json": "JSON schema", "regex": "regex", "grammar": "grammar", "choice": "choice list",
                    "json_object": "JSON grammar"}[kind]
            detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise ValueError(f"{field} is not a {what} the grammar engine can compile: {detail}") from None

    def _compiler(self, xgr):
        with self._build_lock:  # not self._lock: compile() must not wait for this (about a second, once)
            if self._xgr_compiler is None:
                from transformers import PreTrainedTokenizerFast  # xgrammar's own dependency

                hf = PreTrainedTokenizerFast(tokenizer_object=self.tokenizer.backend)
                info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids or None)
                # our cache holds the futures; xgrammar's own would hold every grammar twice
                self._xgr_compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
            return self._xgr_compiler



def timeout_message(params: StructuredOutputsParams, timeout_s: float) -> str:
    return (f"structured_outputs.{params.kind} took longer than {timeout_s:g}s to compile; simplify it "
            "(e.g. fewer nested anyOf/oneOf alternatives)")


def _ebnf_string(text: str) -> str:
    """A GBNF string literal: JSON's escapes are GBNF's."""
    return json.dumps(text)


class SequenceGrammar:
    """One sequence's grammar state. `start_token_id`: with a reasoning parser, the token that ends the thinking;
    the grammar applies to what follows it."""

    __slots__ = ("params", "future", "compiler", "matcher", "start_token_id", "active")

    def __init__(self, params: StructuredOutputsParams, future: concurrent.futures.Future, compiler: GrammarCompiler,
                 start_token_id: int | None = None):
        self.params = params
        self.future = future
        self.compiler = compiler
        self.matcher = None
        self.start_token_id = start_token_id
        self.active = start_token_id is None

    @property
    def ready(self) -> bool:
        return self.future.done() and self.future.exception() is None

    def error(self) -> str | None:
        """Why this grammar will never be ready (failed, or past the time limit); None while it may yet be."""
        if self.future.done():
            e = self.future.exception()
            return None if e is None else str(e)
        left = self.compiler.remaining(self.future)
        return timeout_message(self.params, self.compiler.timeout_s) if left is not None and left <= 0 else None

    def fill(self, bitmask: torch.Tensor, row: int) -> bool:
        """Writes the allowed next tokens into bitmask[row]; False when the grammar does not constrain this step."""
        if not self.active:
            return False
        if self.matcher is None:
            self.matcher = _import_xgrammar().GrammarMatcher(self.future.result())
        self.matcher.fill_next_token_bitmask(bitmask, row)
        return True

    def accept(self, token: int) -> bool:
        """Advances with a sampled token; False when nothing can follow it: the grammar refused it, or it was the
        stop token that ends the grammar (with ignore_eos the sequence would otherwise go on unconstrained)."""
        if not self.active:
            self.active = token == self.start_token_id
            return True
        if self.matcher is None:  # activated but no mask filled yet
            self.matcher = _import_xgrammar().GrammarMatcher(self.future.result())
        return self.matcher.accept_token(token) and not self.matcher.is_terminated()


def grammar_start(prompt_ids: list[int], think_ids: tuple[int, int] | None) -> int | None:
    """The token after which a grammar starts: the end of the thinking (with a reasoning parser), unless the prompt
    already closed it (a template that turned thinking off); None: from the first token."""
    if think_ids is None:
        return None
    last = next((t for t in reversed(prompt_ids) if t in think_ids), None)
    return None if last == think_ids[1] else think_ids[1]


def failed_grammars(waiting: list) -> list[tuple[object, str]]:
    """(sequence, reason) for the waiting sequences whose grammar will never be ready."""
    return [(seq, reason) for seq in waiting if seq.grammar is not None and not seq.grammar.ready
            and (reason := seq.grammar.error()) is not None]


def batch_bitmask(grammars: list[SequenceGrammar | None], vocab_size: int) -> tuple[torch.Tensor, list[int]] | None:
    """The packed allowed-token bitmask [rows, ceil(V / 32)] int32 (row i for grammars[i]; all ones where no
    grammar) and the rows an active grammar constrains; None when no row is constrained this step."""
    rows = [i for i, g in enumerate(grammars) if g is not None and g.active]
    if not rows:
        return None
    mask = torch.full((len(grammars), (vocab_size + 31) // 32), -1, dtype=torch.int32)
    rows = [i for i in rows if grammars[i].fill(mask, i)]
    return (mask, rows) if rows else None


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """In place: in the given rows, tokens the bitmask (row i for logits row i) does not allow become -inf; columns
    past the bitmask (a logits width beyond the grammar's vocabulary) too."""
    v, covered = logits.shape[1], bitmask.shape[1] * 32
    if covered < v:
        logits[rows, covered:] = float("-inf")
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous():
        xgr = _import_xgrammar()  # its CPU kernel: several times faster than unpacking the bits in torch
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=min(v, covered), indices=rows)
        return
    m = bitmask[rows].to(logits.device)
    allowed = ((m[:, :, None] >> BITS.to(logits.device)) & 1).bool().flatten(1)[:, :v]
    logits[rows, :allowed.shape[1]] = logits[rows, :allowed.shape[1]].masked_fill(~allowed, float("-inf"))
