"""AsyncEngine: LLMEngine for servers. The model steps on a thread of its own, so the event loop stays free.

Everything that touches LLMEngine (adding, aborting, stepping) runs on that thread, between steps; callers
hand it commands through a queue and get results back as futures, and each request's outputs flow back
into an asyncio.Queue on the caller's loop.
"""

import asyncio
import concurrent.futures
import gc
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

import torch

from lmforge.engine.config import EngineConfig
from lmforge.engine.llm_engine import LLMEngine
from lmforge.engine.lora_manager import LoadedAdapter, LoRARequest
from lmforge.engine.outputs import EngineStats, RequestOutput
from lmforge.engine.sampling_params import SamplingParams
from lmforge.engine.tp_workers import WorkerDied

log = logging.getLogger("lmforge")


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, **engine_args):
        config = config or EngineConfig(**engine_args)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self.fatal: Exception | None = None  # what stopped the engine for good (a tensor-parallel worker died)
        built: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(config, torch.get_num_threads(), built),
                                        name="lmforge-engine", daemon=True)
        self._thread.start()
        self.engine: LLMEngine = built.result()  # a loading error is raised here, in the caller

    # ---- the engine thread ---------------------------------------------------------------------------------
    def _run(self, config: EngineConfig, threads: int, built: concurrent.futures.Future) -> None:
        """Builds the engine on this thread, then steps it. Loading here too keeps torch's OpenMP work on one
        thread: a second thread that has run parallel ops leaves more OpenMP threads than cores, and libgomp then
        stops spinning between ops and decode slows down sharply on a small CPU (docs/benchmarks.md, issue 4)."""
        torch.set_num_threads(threads)  # the caller's setting; OpenMP's is per thread
        try:
            engine = LLMEngine.from_config(config)
        except BaseException as e:
            built.set_exception(e)
            return
        # What exists now (torch, the model, the tokenizer) lives as long as the server: out of the cyclic
        # collector's reach, so that its full passes stop rescanning it while requests allocate (vLLM does the same)
        gc.collect()
        gc.freeze()
        built.set_result(engine)
        self.engine = engine
        try:
            self._loop()
        finally:
            engine.shutdown()  # tensor-parallel workers stop with the thread that steps them
            gc.unfreeze()  # collectable again at exit (extensions such as xgrammar's check for leaks then)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def _loop(self) -> None:
        while not self._stopping:
            while not self._commands.empty():
                fn, future = self._commands.get()
                try:
                    future.set_result(fn())
                except Exception as e:  # the caller gets the error (e.g. a ValueError naming a field)
                    future.set_exception(e)
            if not self.engine.has_unfinished_requests():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except WorkerDied as e:  # the model is gone with the process: nothing more can be served
                log.error("%s", e)
                self.fatal = e
                self._fail_in_flight(e)
                return
            except Exception as e:  # fail the requests in flight, keep the engine serving new ones
                log.exception("engine step failed; aborting the requests in flight")
                self._fail_in_flight(e)
                continue
            for out in outputs:
                self._deliver(out.request_id, out)
            if not outputs and not self.engine.has_running_requests():  # only waiters (grammars compiling): no spin
                self._wake.wait(0.005)
                self._wake.clear()

    def _fail_in_flight(self, error: Exception) -> int:
        """Aborts every request in flight, each stream ending with `error`; returns how many there were."""
        request_ids = list(self.engine.requests)
        for request_id in request_ids:
            self.engine.abort(request_id)
            self._deliver(request_id, error)
        return len(request_ids)

    def _deliver(self, request_id: str, item: RequestOutput | Exception) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, q = stream
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _call(self, fn: Callable) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, future))
        self._wake.set()
        return future

    # ---- the caller's side ---------------------------------------------------------------------------------
    async def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                          priority: int = 0, max_waiting: int | None = None,
                          lora_request: LoRARequest | None = None) -> "RequestStream":
        """Queues a request (with a loaded LoRA adapter, when lora_request names one) and returns its output stream
        once the engine has accepted it.

        Raises ValueError for invalid input and QueueFullError when `max_waiting` sequences already wait that the
        batch has no room for: sequences beyond the free places of `max_num_seqs` (checked on the engine thread, so
        concurrent callers cannot overshoot). The caller must iterate the stream to its end or close() it; closing
        early aborts the request and frees its blocks."""
        if self._stopping:
            raise RuntimeError("the engine is shut down")
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)

        def admit() -> None:
            if max_waiting is not None:
                beyond = self.engine.num_waiting_beyond_batch()  # waiting sequences the next steps cannot take in
                if beyond >= max_waiting:
                    raise QueueFullError(beyond, max_waiting)
            self.engine.add_request(request_id, prompt, params, priority, lora_request=lora_request)

        try:
            await asyncio.wrap_future(self._call(admit))
        except BaseException:  # rejected, or the caller was cancelled while the add was queued
            self._streams.pop(request_id, None)
            self._call(lambda: self.engine.abort(request_id))
            raise
        return RequestStream(self, request_id, q)

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                       priority: int = 0, lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Streams RequestOutputs (cumulative text plus `new_text` deltas) until the request finishes.
        Invalid input raises ValueError before anything is queued; leaving the loop early aborts the request."""
        stream = await self.add_request(prompt, params, request_id, priority, lora_request=lora_request)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    async def abort(self, request_id: str) -> None:
        out = await asyncio.wrap_future(self._call(lambda: self.engine.abort(request_id)))
        if out is not None:
            self._deliver(request_id, out)

    async def fail_all(self, error: Exception) -> int:
        """Aborts every request in flight, each stream ending with `error` (a server cutting them at shutdown);
        returns how many there were."""
        return await self.run(lambda: self._fail_in_flight(error))

    async def add_lora(self, lora_request: LoRARequest) -> LoadedAdapter:
        """Loads an adapter between two steps (LmforgeError, nothing loaded, when it does not fit the model)."""
        return await self.run(lambda: self.engine.add_lora(lora_request))

    async def remove_lora(self, name: str) -> LoadedAdapter:
        """Unloads an adapter between two steps; AdapterInUseError while requests that use it are in flight."""
        return await self.run(lambda: self.engine.remove_lora(name))

    async def stats(self) -> list[EngineStats]:
        """The engine's stats, one per replica (one here; DataParallelEngine's has one each)."""
        return [await self.run(self.engine.stats)]

    async def run(self, fn: Callable):
        """Runs fn() on the engine thread between steps (for stats, cache resets, adapter changes)."""
        return await asyncio.wrap_future(self._call(fn))

    @property
    def is_alive(self) -> bool:
        """False once shut down or if the engine thread died: a server's health check reports it."""
        return self._thread.is_alive() and not self._stopping

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)


class QueueFullError(Exception):
    """add_request(max_waiting=...) refused a request: too many sequences already wait for a slot."""

    def __init__(self, waiting: int, limit: int):
        super().__init__(f"{waiting} sequences are waiting beyond the batch's free places (limit {limit})")
        self.waiting = waiting
        self.limit = limit


class RequestStream:
    """One request's outputs, in order, on the caller's event loop; close() aborts it if it has not finished."""

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue):
        self.engine = engine
        self.request_id = request_id
        self._queue = queue
        self.finished = False
        self.last: RequestOutput | None = None

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:  # cancelled while waiting (a client went away): abort rather than leak the request
            self.close()
            raise
        if isinstance(item, Exception):
            self.close()
            raise item
        self.last = item
        if item.finished:
            self.finished = True
            self.engine._streams.pop(self.request_id, None)
        return item

    def close(self) -> None:
        """Idempotent; safe from any coroutine on the caller's loop, whether or not the stream was iterated."""
        self.engine._streams.pop(self.request_id, None)
        if not self.finished:
            self.finished = True
            self.engine._call(lambda: self.engine.engine.abort(self.request_id))
