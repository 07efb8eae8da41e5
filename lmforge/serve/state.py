"""What every endpoint shares: the engine, the served models, metrics and limits; and Submission, one HTTP
request's engine requests (one per prompt) with their metrics, closed together however the request ends."""

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from lmforge.engine.async_engine import AsyncEngine, QueueFullError, RequestStream
from lmforge.engine.lora_manager import AdapterNotFoundError
from lmforge.engine.outputs import RequestOutput
from lmforge.engine.sampling_params import SamplingParams
from lmforge.serve.errors import APIError, bad_request
from lmforge.serve.metrics import RequestTracker, ServerMetrics
from lmforge.serve.models import ModelRoute, ServedModels
from lmforge.serve.reasoning import ReasoningParser
from lmforge.serve.responses import PromptTokensDetails, Usage
from lmforge.serve.streams import collect, merge, unless_disconnected
from lmforge.serve.tools import ToolParser

log = logging.getLogger("lmforge")

RETRY_AFTER_S = 1


class ShutdownCut(Exception):
    """Ends the streams of requests still in flight when the server stops at --shutdown-timeout."""

    def __init__(self):
        super().__init__("the server is shutting down and cut this request at its --shutdown-timeout")


@dataclass
class Submission:
    request_id: str
    streams: list[RequestStream] = field(default_factory=list)
    trackers: list[RequestTracker] = field(default_factory=list)
    prompt_tokens: int = 0
    closed: bool = False

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        async for i, out in merge(self.streams):
            self.trackers[i].observe(out)
            yield i, out

    async def finals(self) -> list[RequestOutput]:
        return await collect(self.streams, lambda i, out: self.trackers[i].observe(out))

    async def finals_unless_disconnected(self, http) -> list[RequestOutput] | None:
        """The finished outputs, or None when the client left first; the submission is closed either way."""
        try:
            return await unless_disconnected(http, self.finals())
        except ShutdownCut as e:
            raise APIError(503, f"{str(e)[0].upper()}{str(e)[1:]}.", code="server_shutting_down") from None
        finally:
            self.close()

    def usage(self, finals: list[RequestOutput]) -> Usage:
        prompt = self.prompt_tokens
        completion = sum(len(c.token_ids) for out in finals for c in out.outputs)
        cached = sum(out.num_cached_tokens for out in finals)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    def close(self) -> None:
        """Aborts whatever has not finished and records how each completion ended; idempotent."""
        if self.closed:
            return
        self.closed = True
        for stream in self.streams:
            stream.close()
        for tracker in self.trackers:
            tracker.close()
        if self.trackers:  # one structured line per request
            t = self.trackers[0]
            ttft = "-" if t.ttft is None else f"{t.ttft:.3f}"
            log.info("request_id=%s prompt_tokens=%d completion_tokens=%d finish=%s ttft_s=%s e2e_s=%.3f",
                     self.request_id, self.prompt_tokens, sum(sum(t.seen) for t in self.trackers),
                     ",".join(r for t in self.trackers for r in t.finish_reasons), ttft,
                     time.monotonic() - t.arrival)


@dataclass
class ServerState:
    engine: AsyncEngine
    models: ServedModels
    metrics: ServerMetrics
    chat_template: str | None = None  # --chat-template: overrides the model's own
    max_queue: int | None = None  # --max-queue: most sequences waiting beyond the batch's room before a 503
    allow_runtime_lora_updating: bool = False  # /v1/load_lora_adapter and /v1/unload_lora_adapter are served
    allowed_lora_paths: list[str] | None = None  # resolved directories run-time loading is confined to; None: any
    tool_parser: ToolParser | None = None  # --tool-call-parser
    auto_tools: bool = False  # --enable-auto-tool-choice
    reasoning: ReasoningParser | None = None  # --reasoning-parser
    stopping: bool = False  # set when shutdown cuts the requests in flight: new ones are refused

    def __post_init__(self):
        # No text longer than this fits the context, whatever it says: each token covers at most the characters of
        # the longest token in the vocabulary. Longer prompts are refused before any tokenising.
        self.max_prompt_chars = self.max_model_len * self.tokenizer.longest_token_chars()

    async def cut_streams(self) -> None:
        """At --shutdown-timeout: ends every request still in flight with an error (streams send it as their last
        event, then [DONE]) so that none is cut mid-response, and refuses new ones."""
        self.stopping = True
        cut = await self.engine.fail_all(ShutdownCut())
        if cut:
            log.warning("shutdown timeout reached: %d requests in flight were ended with an error", cut)

    @property
    def grammars(self):
        """The engine's grammar compiler (structured output); thread-safe."""
        return self.engine.engine.grammars

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.engine.vocab_size

    async def submit(self, prompts: list[list[int]], params: SamplingParams, request_id: str, route: ModelRoute,
                     arrival: float, prompt_param: str) -> Submission:
        """Hands every prompt to the engine (ids `request_id-i`); all or none: a refusal closes the ones queued."""
        if not self.engine.is_alive or self.stopping:  # a stopped engine would never answer: say so, not hang
            raise APIError(503, "The engine is not running; the server is shutting down or failed.",
                           code="engine_unavailable")
        bad = next((t for t in params.stop_token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise bad_request(f"Token id {bad} is outside the vocabulary [0, {self.vocab_size}).", "stop_token_ids")
        sub = Submission(request_id, prompt_tokens=sum(len(p) for p in prompts))
        try:
            for i, ids in enumerate(prompts):
                rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                sub.streams.append(await self.engine.add_request(ids, params, rid, max_waiting=self.max_queue,
                                                                 lora_request=route.adapter))
                sub.trackers.append(self.metrics.track(len(ids), params.n, arrival))
                if route.adapter is not None:
                    self.metrics.lora_requests.labels(self.metrics.model_name, route.name).inc()
        except QueueFullError as e:
            sub.close()
            self.metrics.rejected.inc()
            raise APIError(503, f"The server is busy: {e}. Retry after {RETRY_AFTER_S}s.", code="server_busy",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except AdapterNotFoundError:  # unloaded after this request was routed to it
            sub.close()
            raise APIError(404, f"The model `{route.name}` does not exist anymore: its LoRA adapter was unloaded.",
                           param="model", code="model_not_found") from None
        except ValueError as e:  # the engine's own checks (they mirror ours; this is the backstop)
            sub.close()
            raise bad_request(f"{e}.", prompt_param) from None
        except BaseException:
            sub.close()
            raise
        return sub
