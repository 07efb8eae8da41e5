"""POST /v1/chat/completions: one conversation, n completions, whole or streamed as OpenAI streams them
(a role delta per choice, content / reasoning_content / tool_calls deltas, a finish chunk per choice, an optional
usage chunk, `data: [DONE]`). Structured output, tools and reasoning are read from the text here, per choice."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmforge.engine.outputs import RequestOutput
from lmforge.serve.constraints import compile_or_400, request_constraint
from lmforge.serve.errors import APIError, bad_request
from lmforge.serve.inputs import chat_prompt, resolve_max_tokens, sampling_params
from lmforge.serve.logprobs import chat_logprobs, prompt_logprobs_json
from lmforge.serve.protocol import ChatCompletionRequest
from lmforge.serve.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    Delta,
)
from lmforge.serve.state import ServerState, Submission
from lmforge.serve.streams import DONE, EventStream, sse
from lmforge.serve.tools import ToolPlan, ToolStream, plan_tools


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest, http: Request,
                                 arrival: float) -> Response:
    route = state.models.resolve(req.model)
    if (problem := req.combination_error()) is not None:
        raise bad_request(problem[1], problem[0])
    plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls,
                      state.auto_tools and state.tool_parser is not None)
    constraint, field = request_constraint(req.response_format, req.structured_outputs)
    if plan.constraint is not None:
        if constraint is not None:
            raise bad_request(f"tool_choice {plan.mode!r} generates under the tools' schema; it cannot be combined "
                              f"with {field.split('.')[0]}.", "tool_choice")
        constraint, field = plan.constraint, "tool_choice" if plan.mode == "required" else "tools"
    ids = await asyncio.to_thread(chat_prompt, state.tokenizer, req.messages, state.chat_template,  # off the loop
                                  req.add_generation_prompt, req.chat_template_kwargs, plan.tools)
    limit_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(req.max_completion_tokens or req.max_tokens, limit_param, len(ids),
                                    state.max_model_len, None, "messages")
    params = sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None, state.vocab_size,
                             req.prompt_logprobs, constraint)
    if constraint is not None:
        await compile_or_400(state.grammars, constraint, field)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    sub = await state.submit([ids], params, request_id, route, arrival, "messages")
    if req.stream:
        return EventStream(_events(sub, req, request_id, route.name, plan, state), sub.close)
    finals = await sub.finals_unless_disconnected(http)
    if finals is None:  # the client left; nobody reads this
        return Response(status_code=499)
    return JSONResponse(_response(finals[0], req, request_id, route.name, sub, plan, state).model_dump(mode="json"))


def _response(out: RequestOutput, req: ChatCompletionRequest, request_id: str, model: str, sub: Submission,
              plan: ToolPlan, state: ServerState) -> ChatCompletionResponse:
    choices = []
    for c in out.outputs:
        reasoning, content = state.reasoning.split(c.text) if state.reasoning is not None else (None, c.text)
        content, calls = plan.calls(content or "", state.tool_parser)
        message = AssistantMessage(content=content, reasoning_content=reasoning,
                                   tool_calls=[call.to_dict() for call in calls])
        choices.append(ChatChoice(index=c.index, message=message, finish_reason=_finish(c.finish_reason, plan, calls),
                                  stop_reason=c.stop_reason,
                                  logprobs=chat_logprobs(c.logprobs, req.top_logprobs or 0) if req.logprobs else None))
    prompt_logprobs = None if req.prompt_logprobs is None else prompt_logprobs_json(out.prompt_logprobs or [None])
    return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=sub.usage([out]),
                                  prompt_logprobs=prompt_logprobs)


def _finish(reason: str | None, plan: ToolPlan, calls) -> str | None:
    """OpenAI's finish_reason: "tool_calls" when the model chose to call (not for a function the request named)."""
    return "tool_calls" if reason == "stop" and calls and plan.mode != "named" else reason


async def _events(sub: Submission, req: ChatCompletionRequest, request_id: str, model: str, plan: ToolPlan,
                  state: ServerState) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: list[ChatChunkChoice], usage=None) -> str:
        return sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=usage))

    n, top = req.n, req.top_logprobs or 0
    sent_logprobs, done = [0] * n, [False] * n
    thinking = [state.reasoning.stream() if state.reasoning is not None else None for _ in range(n)]
    tools = [ToolStream(plan, state.tool_parser) for _ in range(n)]
    last: RequestOutput | None = None
    try:
        for i in range(n):
            yield chunk([ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
        async for _, out in sub.outputs():
            last = out
            for i, c in enumerate(out.outputs):
                if done[i]:
                    continue
                text, finished = out.new_text[i], c.finish_reason is not None
                logprobs = None
                if req.logprobs and (text or finished) and c.logprobs and len(c.logprobs) > sent_logprobs[i]:
                    logprobs = chat_logprobs(c.logprobs[sent_logprobs[i]:], top)
                    sent_logprobs[i] = len(c.logprobs)
                reasoning = ""
                if thinking[i] is not None:
                    reasoning, text = thinking[i].feed(text, finished)
                text, calls = tools[i].feed(text, finished)
                if text or reasoning or calls or logprobs is not None:
                    delta = Delta(content=text if text or not (reasoning or calls) else None,
                                  reasoning_content=reasoning or None, tool_calls=calls or None)
                    yield chunk([ChatChunkChoice(index=i, delta=delta, logprobs=logprobs)])
                if finished:
                    done[i] = True
                    reason = "tool_calls" if c.finish_reason == "stop" and tools[i].num_calls and \
                        plan.mode != "named" else c.finish_reason
                    yield chunk([ChatChunkChoice(index=i, delta=Delta(), finish_reason=reason,
                                                 stop_reason=c.stop_reason)])
        if req.stream_options is not None and req.stream_options.include_usage and last is not None:
            yield chunk([], sub.usage([last]))
    except Exception as e:  # the engine failed mid-stream: tell the client in-band, as vLLM does
        yield sse(APIError(500, f"Generation failed: {e}").body())
    finally:
        sub.close()
    yield DONE
