"""OpenAI's HTTP API as pydantic models: requests are strict (a wrong type or an unknown field is a 400 naming it),
responses carry exactly the fields OpenAI's clients read, plus vLLM's extras (stop_reason, top_k, ...)."""

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic.json_schema import SkipJsonSchema, WithJsonSchema

from lmforge.serve.field_schemas import (
    CONTENT_SCHEMA,
    LOGIT_BIAS_SCHEMA,
    MESSAGE_SCHEMA,
    PROMPT_SCHEMA,
    RESPONSE_FORMAT_SCHEMA,
    STOP_SCHEMA,
    STRUCTURED_OUTPUTS_SCHEMA,
    TOKEN_ID_SCHEMA,
    TOOL_CHOICE_SCHEMA,
    TOOLS_SCHEMA,
)

MAX_LOGPROBS = 20  # top alternatives per token (OpenAI allows 20 in chat, 5 in completions; vLLM 20 in both)
MAX_LOGIT_BIAS = 100  # OpenAI: each bias in [-100, 100]
INT64 = 2**63
INT32 = 2**31
MAX_STOPS = 1024  # stop strings or ids of one request: each is checked at every step, on the engine's own time

# Fields of OpenAI's API that lmforge does not implement: rejected by name rather than silently ignored.
UNSUPPORTED = {
    "functions": "the legacy functions field is not supported; send tools",
    "function_call": "the legacy function_call field is not supported; send tool_choice",
    "suffix": "suffix (fill-in-the-middle) is not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
}


def _whole_number(v: Any) -> Any:
    """2.0 is the integer 2 (as JSON Schema's "integer" has it: clients and fuzzers send it); 2.5 stays a float."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


# A strict int that also takes a whole-valued float; a bool or a string is still refused.
Int = Annotated[int, BeforeValidator(_whole_number)]


def bounded(**bounds: int) -> Any:
    """Int within bounds (Field's ge, gt, le, lt). Bounds go inside the type: on `Int | None` pydantic's schema
    would name them ge/le rather than JSON Schema's minimum/maximum."""
    return Annotated[int, Field(**bounds), BeforeValidator(_whole_number)]


# A token id; its range (the vocabulary's) is checked later, with an error that names it.
TokenId = Annotated[Int, WithJsonSchema(TOKEN_ID_SCHEMA)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingFields(Strict):
    """What chat and text completions share: the model, sampling, stopping and streaming."""

    model: str | None = None  # None: the first served model (as vLLM)
    n: Int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: bounded(ge=-1, lt=INT32) | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    seed: bounded(ge=-INT64, lt=INT64) | None = None
    stop: Any = Field(None, validate_default=True, json_schema_extra=STOP_SCHEMA)  # normalised to a list
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOPS)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    max_tokens: bounded(ge=1) | None = None
    min_tokens: Int = Field(0, ge=0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    service_tier: str | None = None  # accepted and ignored: there is one tier
    # OpenAI's: token id (as a string) -> bias in [-100, 100]
    logit_bias: dict[str, float] | None = Field(None, json_schema_extra=LOGIT_BIAS_SCHEMA)
    allowed_token_ids: list[TokenId] | None = Field(None, json_schema_extra={"minItems": 1})  # vLLM's: only these
    bad_words: list[str] | None = None  # vLLM's: never generate these words
    prompt_logprobs: bounded(ge=0, le=MAX_LOGPROBS) | None = None  # vLLM's: log-probs of the prompt's tokens
    best_of: Int | None = None
    response_format: dict | None = Field(None, json_schema_extra=RESPONSE_FORMAT_SCHEMA)  # OpenAI's (constraints.py)
    # vLLM's: {"json" | "regex" | "choice" | "grammar" | "json_object": ...}
    structured_outputs: dict | None = Field(None, json_schema_extra=STRUCTURED_OUTPUTS_SCHEMA)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> list[str]:
        if v is None:
            return []
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ValueError("must be a string or a list of strings")
        if not all(v):
            raise ValueError("stop strings must not be empty")
        if len(v) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings are allowed")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[int, float] | None:
        """Keys become token ids; their range is checked against the model's vocabulary later."""
        if v is None:
            return None
        for key, bias in v.items():
            if not re.fullmatch(r"[0-9]{1,19}", key):
                raise ValueError(f"key {key[:40]!r} is not a token id; keys must be token ids written as strings")
            if not (math.isfinite(bias) and abs(bias) <= MAX_LOGIT_BIAS):
                raise ValueError(f"the bias of token {key} is {bias}; biases must lie in "
                                 f"[-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}]")
        return {int(key): bias for key, bias in v.items()}

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None, info) -> int | None:
        if v is not None and v != info.data.get("n", 1):
            raise ValueError("best_of other than n is not supported (lmforge returns every completion it samples)")
        return v

    def combination_error(self) -> tuple[str, str] | None:
        """(param, message) for fields that are valid alone but not together; None when all is well."""
        for name, reason in UNSUPPORTED.items():
            if getattr(self, name, None) not in (None, {}, []):
                return name, f"{reason}; remove '{name}' from the request."
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true."
        if self.prompt_logprobs is not None and self.stream:
            return "prompt_logprobs", "prompt_logprobs are not returned when stream is true (as in vLLM)."
        return None


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    model_config = ConfigDict(json_schema_extra=MESSAGE_SCHEMA)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = Field(None, json_schema_extra=CONTENT_SCHEMA)  # a string or a list of text parts; checked below
    name: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    refusal: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any) -> str | None:
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError("must be a string or a list of content parts")
        texts = []
        for i, part in enumerate(v):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"part {i} has type {kind!r}; this model takes text parts only "
                                 "({'type': 'text', 'text': ...})")
            texts.append(TextPart.model_validate(part).text)
        return "\n".join(texts)  # as vLLM joins text parts

    def template_dict(self) -> dict:
        """The message as the chat template sees it ('developer' is OpenAI's new name for 'system')."""
        message = self.model_dump(exclude_none=True)
        if message["role"] == "developer":
            message["role"] = "system"
        return message


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: bounded(ge=1) | None = None
    logprobs: bool = False
    top_logprobs: bounded(ge=0, le=MAX_LOGPROBS) | None = None
    tools: Any = Field(None, json_schema_extra=TOOLS_SCHEMA)  # checked by serve/tools.py
    tool_choice: Any = Field(None, json_schema_extra=TOOL_CHOICE_SCHEMA)
    parallel_tool_calls: bool | None = None
    # Refused unless null (see UNSUPPORTED), so absent from the schema
    functions: SkipJsonSchema[Any] = None
    function_call: SkipJsonSchema[Any] = None
    audio: SkipJsonSchema[Any] = None
    modalities: SkipJsonSchema[Any] = None
    prediction: SkipJsonSchema[Any] = None
    web_search_options: SkipJsonSchema[Any] = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict | None = None

    def combination_error(self) -> tuple[str, str] | None:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs requires logprobs to be true."
        return super().combination_error()


class CompletionRequest(SamplingFields):
    # a string, a list of strings, a list of token ids or a list of such lists; checked below
    prompt: Any = Field(json_schema_extra=PROMPT_SCHEMA)
    logprobs: bounded(ge=0, le=MAX_LOGPROBS) | None = None
    max_tokens: bounded(ge=0) | None = None  # 0 only with echo: the prompt scored, nothing generated (vLLM)
    echo: bool = False
    suffix: SkipJsonSchema[Any] = None  # refused unless null
    add_special_tokens: bool = True

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> list[str | list[int]]:
        """Normalised to a list of prompts, each a string or a list of token ids."""
        def token_list(x) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(v, list):  # token ids written as whole floats (2.0) are ids
            v = [[_whole_number(t) for t in p] if isinstance(p, list) else _whole_number(p) for p in v]
        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and v and token_list(v):
            return [v]
        if isinstance(v, list) and v and all(isinstance(p, str) or (token_list(p) and p) for p in v):
            return v
        if v == [] or (isinstance(v, list) and any(p == [] for p in v)):
            raise ValueError("must not be empty")
        raise ValueError("must be a string, a list of strings, a list of token ids or a list of token-id lists")

    def combination_error(self) -> tuple[str, str] | None:
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens", "max_tokens 0 is only allowed with echo true (to score the prompt alone)."
        return super().combination_error()


def _one_of_prompt_or_messages(schema: dict) -> None:
    """The schema of a tokenize request: exactly one of `prompt` and `messages` (null is accepted as absent)."""
    schema["oneOf"] = [{"required": ["prompt"]}, {"required": ["messages"]}]
    for name in ("prompt", "messages"):  # the non-null branch
        schema["properties"][name] = {**schema["properties"][name]["anyOf"][0], "minItems": 1}
    schema["properties"]["prompt"].pop("minItems")


class TokenizeRequest(Strict):
    model_config = ConfigDict(json_schema_extra=_one_of_prompt_or_messages)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (the template adds them)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict | None = None


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[TokenId]


class LoadLoRAAdapterRequest(Strict):
    """POST /v1/load_lora_adapter, as vLLM's: serve the PEFT adapter at lora_path under the model name lora_name."""

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(Strict):
    lora_name: str = Field(min_length=1)
    lora_int_id: Int | None = None  # vLLM's alternative key; accepted, the name decides
