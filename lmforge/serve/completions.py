"""POST /v1/completions: a string, a list of strings, token ids or a list of those; each prompt gets n
completions, choice index = prompt index * n + completion index (as OpenAI numbers them)."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmforge.engine.outputs import CompletionOutput, RequestOutput
from lmforge.serve.constraints import compile_or_400, request_constraint
from lmforge.serve.errors import APIError, bad_request
from lmforge.serve.inputs import DEFAULT_COMPLETION_MAX_TOKENS, completion_prompt, resolve_max_tokens, sampling_params
from lmforge.serve.logprobs import completion_logprobs
from lmforge.serve.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from lmforge.serve.state import ServerState, Submission
from lmforge.serve.streams import DONE, EventStream, sse


async def create_completion(state: ServerState, req: CompletionRequest, http: Request, arrival: float) -> Response:
    route = state.models.resolve(req.model)
    if (problem := req.combination_error()) is not None:
        raise bad_request(problem[1], problem[0])
    many = len(req.prompt) > 1
    prompts = await asyncio.to_thread(lambda: [  # tokenised off the event loop
        completion_prompt(state.tokenizer, p, req.add_special_tokens, state.vocab_size,
                          f"prompt[{i}]" if many else "prompt") for i, p in enumerate(req.prompt)])
    max_tokens = min(resolve_max_tokens(req.max_tokens, "max_tokens", len(ids), state.max_model_len,
                                        DEFAULT_COMPLETION_MAX_TOKENS, f"prompt[{i}]" if many else "prompt")
                     for i, (_, ids) in enumerate(prompts))
    constraint, field = request_constraint(req.response_format, req.structured_outputs)
    params = sampling_params(req, max_tokens, req.logprobs, constraint)
    if constraint is not None:
        await compile_or_400(state.grammars, constraint, field)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    sub = await state.submit([ids for _, ids in prompts], params, request_id, route, arrival, "prompt")
    echoes = [text if req.echo else "" for text, _ in prompts]
    if req.stream:
        return EventStream(_events(sub, req, request_id, route.name, echoes), sub.close)
    finals = await sub.finals_unless_disconnected(http)
    if finals is None:  # the client left; nobody reads this
        return Response(status_code=499)
    choices = [_choice(p * req.n + c.index, echoes[p] + c.text, c, req, len(echoes[p]))
               for p, out in enumerate(finals) for c in out.outputs]
    body = CompletionResponse(id=request_id, model=route.name, choices=choices, usage=sub.usage(finals))
    return JSONResponse(body.model_dump(mode="json"))


def _choice(index: int, text: str, c: CompletionOutput, req: CompletionRequest, offset: int) -> CompletionChoice:
    logprobs = None if req.logprobs is None else completion_logprobs(c.logprobs or [], req.logprobs, offset)
    return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=c.finish_reason,
                            stop_reason=c.stop_reason)


async def _events(sub: Submission, req: CompletionRequest, request_id: str, model: str,
                  echoes: list[str]) -> AsyncIterator[str]:
    created, n = int(time.time()), req.n

    def chunk(choices: list[CompletionChoice], usage=None) -> str:
        return sse(CompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage))

    sent_logprobs = [0] * (n * len(echoes))
    offsets = [len(echoes[i // n]) for i in range(n * len(echoes))]  # text_offset of the next token
    done = [False] * (n * len(echoes))
    finals: list[RequestOutput | None] = [None] * len(echoes)
    try:
        for index in range(n * len(echoes)):
            if echoes[index // n]:
                yield chunk([CompletionChoice(index=index, text=echoes[index // n])])
        async for p, out in sub.outputs():
            finals[p] = out
            for c in out.outputs:
                index = p * n + c.index
                if done[index]:
                    continue
                text, finished = out.new_text[c.index], c.finish_reason is not None
                logprobs = None
                if req.logprobs is not None and (text or finished) and len(c.logprobs or []) > sent_logprobs[index]:
                    logprobs = completion_logprobs(c.logprobs[sent_logprobs[index]:], req.logprobs, offsets[index])
                    sent_logprobs[index] = len(c.logprobs)
                    offsets[index] += sum(len(t) for t in logprobs.tokens)
                if text or logprobs is not None:
                    yield chunk([CompletionChoice(index=index, text=text, logprobs=logprobs)])
                if finished:
                    done[index] = True
                    yield chunk([CompletionChoice(index=index, text="", finish_reason=c.finish_reason,
                                                  stop_reason=c.stop_reason)])
        if req.stream_options is not None and req.stream_options.include_usage:
            yield chunk([], sub.usage([f for f in finals if f is not None]))
    except Exception as e:  # the engine failed mid-stream: tell the client in-band, as vLLM does
        yield sse(APIError(500, f"Generation failed: {e}").body())
    finally:
        sub.close()
    yield DONE
