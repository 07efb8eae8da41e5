"""POST /v1/completions: a string, a list of strings, token ids or a list of those; each prompt gets n
completions, choice index = prompt index * n + completion index (as OpenAI numbers them)."""

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmforge.engine.outputs import CompletionOutput, RequestOutput
from lmforge.serve.constraints import compile_or_400, request_constraint
from lmforge.serve.errors import APIError, bad_request
from lmforge.serve.inputs import DEFAULT_COMPLETION_MAX_TOKENS, completion_prompt, resolve_max_tokens, sampling_params
from lmforge.serve.logprobs import completion_logprobs, echo_logprobs, prompt_logprobs_json
from lmforge.serve.protocol import CompletionRequest
from lmforge.serve.responses import CompletionChoice, CompletionLogprobs, CompletionResponse
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
    # echo with logprobs scores the prompt too (vLLM: prompt_logprobs defaults to logprobs then); max_tokens 0
    # generates one token that nobody sees, as vLLM does
    prompt_logprobs = req.prompt_logprobs if req.prompt_logprobs is not None else (req.logprobs if req.echo else None)
    params = sampling_params(req, max(max_tokens, 1), req.logprobs, state.vocab_size, prompt_logprobs, constraint)
    if constraint is not None:
        await compile_or_400(state.grammars, constraint, field)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    sub = await state.submit([ids for _, ids in prompts], params, request_id, route, arrival, "prompt")
    echoes = [(text, ids) if req.echo else None for text, ids in prompts]
    if req.stream:
        return EventStream(_events(sub, req, request_id, route.name, echoes, state.tokenizer), sub.close)
    finals = await sub.finals_unless_disconnected(http)
    if finals is None:  # the client left; nobody reads this
        return Response(status_code=499)
    if req.max_tokens == 0:
        finals = [_prompt_only(out) for out in finals]
    choices = [_choice(p * req.n + c.index, c.text, c, req, echoes[p], out.prompt_logprobs, state.tokenizer)
               for p, out in enumerate(finals) for c in out.outputs]
    body = CompletionResponse(id=request_id, model=route.name, choices=choices, usage=sub.usage(finals))
    return JSONResponse(body.model_dump(mode="json"))


def _prompt_only(out: RequestOutput) -> RequestOutput:
    """max_tokens 0: the output without the token generated to get there (its text, log-probs and count)."""
    outputs = [dataclasses.replace(c, text="", token_ids=[], logprobs=None if c.logprobs is None else [],
                                   cumulative_logprob=None if c.logprobs is None else 0.0,
                                   finish_reason=c.finish_reason and "length", stop_reason=None) for c in out.outputs]
    return dataclasses.replace(out, outputs=outputs, new_text=[""] * len(outputs))


def _choice(index: int, text: str, c: CompletionOutput, req: CompletionRequest, echo: tuple[str, list[int]] | None,
            prompt_logprobs: list | None, tokenizer) -> CompletionChoice:
    """A whole choice: the echoed prompt (if echo) and the completion, with OpenAI's logprobs over both."""
    logprobs = None
    if req.logprobs is not None:
        logprobs = _echo_logprobs(echo, prompt_logprobs, c.logprobs or [], req.logprobs, tokenizer) if echo \
            else completion_logprobs(c.logprobs or [], req.logprobs, 0)
    return CompletionChoice(index=index, text=(echo[0] if echo else "") + text, logprobs=logprobs,
                            finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                            prompt_logprobs=None if req.prompt_logprobs is None or prompt_logprobs is None
                            else prompt_logprobs_json(prompt_logprobs))


def _echo_logprobs(echo: tuple[str, list[int]], prompt_logprobs: list | None, generated: list, top_k: int,
                   tokenizer) -> CompletionLogprobs:
    first = tokenizer.decode([echo[1][0]], skip_special_tokens=False)
    return echo_logprobs(first, prompt_logprobs or [None], generated, top_k)


async def _events(sub: Submission, req: CompletionRequest, request_id: str, model: str,
                  echoes: list[tuple[str, list[int]] | None], tokenizer) -> AsyncIterator[str]:
    """Each choice's echo (with the prompt's logprobs: sent once the prefill has scored them), then its deltas."""
    created, n = int(time.time()), req.n

    def chunk(choices: list[CompletionChoice], usage=None) -> str:
        return sse(CompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage))

    total = n * len(echoes)
    sent_logprobs = [0] * total
    offsets = [0] * total  # text_offset of the next token
    echoed = [echoes[i // n] is None for i in range(total)]
    done = [False] * total
    pending = [""] * total  # text that waits for its choice's echo
    finals: list[RequestOutput | None] = [None] * len(echoes)
    scored = req.echo and req.logprobs is not None  # the echo waits for the prompt's logprobs
    try:
        async for p, out in sub.outputs():
            if req.max_tokens == 0:
                out = _prompt_only(out)
            finals[p] = out
            for c in out.outputs:
                index = p * n + c.index
                if done[index]:
                    continue
                text, finished = pending[index] + out.new_text[c.index], c.finish_reason is not None
                pending[index] = ""
                if not echoed[index]:
                    if scored and out.prompt_logprobs is None:  # a sibling ran ahead of the sequence scoring it
                        pending[index] = text
                        continue
                    echo_text, logprobs = echoes[p][0], None
                    if scored:
                        logprobs = _echo_logprobs(echoes[p], out.prompt_logprobs, [], req.logprobs, tokenizer)
                        offsets[index] = sum(len(t) for t in logprobs.tokens)
                    else:
                        offsets[index] = len(echo_text)
                    echoed[index] = True
                    yield chunk([CompletionChoice(index=index, text=echo_text, logprobs=logprobs)])
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
