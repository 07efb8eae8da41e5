"""From a validated API request to what the engine takes: prompt token ids and SamplingParams.

Every refusal is a 400 naming the request field, raised before anything reaches the engine.
"""

from lmforge.engine.sampling_params import SamplingParams, StructuredOutputsParams
from lmforge.errors import LmforgeError
from lmforge.serve.errors import bad_request
from lmforge.serve.protocol import ChatMessage, CompletionRequest, SamplingFields
from lmforge.serve.tools import template_messages
from lmforge.tokenizer import Tokenizer

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
_TEMPLATE_OWN_ARGS = {"messages", "add_generation_prompt", "tools", "tokenize", "documents", "chat_template"}


def chat_prompt(tokenizer: Tokenizer, messages: list[ChatMessage], chat_template: str | None,
                add_generation_prompt: bool, template_kwargs: dict | None, tools: list | None = None) -> list[int]:
    """The conversation (and the request's tools) rendered by the chat template (the server's --chat-template,
    else the model's)."""
    kwargs = dict(template_kwargs or {})
    clash = sorted(_TEMPLATE_OWN_ARGS & kwargs.keys())
    if clash:
        raise bad_request(f"chat_template_kwargs must not set {clash[0]!r}; it is a request field of its own.",
                          "chat_template_kwargs")
    try:
        return tokenizer.apply_chat_template(template_messages([m.template_dict() for m in messages]),
                                             add_generation_prompt, tokenize=True, chat_template=chat_template,
                                             tools=tools or None, **kwargs)
    except LmforgeError as e:
        raise bad_request(f"{e}.".replace("..", "."), "messages") from None


def completion_prompt(tokenizer: Tokenizer, prompt: str | list[int], add_special_tokens: bool, vocab_size: int,
                      param: str) -> tuple[str, list[int]]:
    """(prompt text, token ids) for one prompt of /v1/completions; token-id prompts are decoded for echo."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        if not ids:
            raise bad_request("The prompt is empty; send at least one token.", param)
        return prompt, ids
    check_token_ids(prompt, vocab_size, param)
    return tokenizer.decode(prompt, skip_special_tokens=False), list(prompt)


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"Token id {ids[bad]} at position {bad} is outside the vocabulary [0, {vocab_size}).", param)


def resolve_max_tokens(requested: int | None, requested_param: str, prompt_len: int, max_model_len: int,
                       default: int | None, prompt_param: str) -> int:
    """How many tokens to generate, or a 400 when the prompt and the request do not fit in the context."""
    room = max_model_len - prompt_len
    if room < 1:
        raise bad_request(f"This model's maximum context length is {max_model_len} tokens, and the prompt alone "
                          f"has {prompt_len} tokens. Please shorten the prompt.", prompt_param)
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise bad_request(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                          f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the "
                          f"completion). Please reduce the length of the prompt or completion.", requested_param)
    return requested


def sampling_params(req: SamplingFields, max_tokens: int, logprobs: int | None, vocab_size: int,
                    prompt_logprobs: int | None = None,
                    constraint: StructuredOutputsParams | None = None) -> SamplingParams:
    """SamplingParams for a request; fields the request left out keep the engine's (= vLLM's) defaults. Token ids
    the request names (logit_bias, allowed_token_ids) are checked against the model's vocab_size."""
    if req.min_tokens > max_tokens:
        raise bad_request(f"min_tokens ({req.min_tokens}) must not exceed the tokens to generate ({max_tokens}).",
                          "min_tokens")
    optional = {name: getattr(req, name) for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                                                      "frequency_penalty", "repetition_penalty")}
    try:
        params = SamplingParams(
            n=req.n, seed=req.seed, max_tokens=max_tokens, min_tokens=req.min_tokens, stop=tuple(req.stop),
            stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos, logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens, include_stop_str_in_output=req.include_stop_str_in_output,
            structured_outputs=constraint, prompt_logprobs=prompt_logprobs, logit_bias=req.logit_bias,
            allowed_token_ids=req.allowed_token_ids, bad_words=tuple(req.bad_words or ()),
            **{k: v for k, v in optional.items() if v is not None})
        params.check_token_ids(vocab_size)
        return params
    except ValueError as e:  # "SamplingParams.<field> must ..." : the field is the request's field
        message = str(e)
        field = message.split(" ", 1)[0].removeprefix("SamplingParams.")
        raise bad_request(message.removeprefix("SamplingParams.") + ".", field) from None


def check_prompt_size(prompt: str | list[int] | list[ChatMessage], max_chars: int, max_model_len: int,
                      param: str) -> None:
    """A 400 for a prompt that cannot fit the context, decided before any tokenising (which would hold up the server
    for seconds on megabytes of text): text beyond `max_chars` characters (see ServerState.max_prompt_chars), token
    ids beyond max_model_len. Conversations count the characters of their messages."""
    if prompt and isinstance(prompt[0], ChatMessage):
        chars = sum(len(m.content or "") + len(m.reasoning_content or "") + len(m.name or "")
                    + len(str(m.tool_calls or "")) for m in prompt)
    elif isinstance(prompt, str):
        chars = len(prompt)
    else:
        if len(prompt) > max_model_len:
            raise bad_request(f"This model's maximum context length is {max_model_len} tokens, and the prompt alone "
                              f"has {len(prompt)} tokens. Please shorten the prompt.", param)
        return
    if chars > max_chars:
        raise bad_request(f"The prompt has {chars} characters; no text of more than {max_chars} characters fits "
                          f"this model's maximum context length of {max_model_len} tokens. Please shorten the prompt.",
                          param)


def check_completion_prompts(req: CompletionRequest, max_chars: int, max_model_len: int) -> None:
    many = len(req.prompt) > 1
    for i, prompt in enumerate(req.prompt):
        check_prompt_size(prompt, max_chars, max_model_len, f"prompt[{i}]" if many else "prompt")
