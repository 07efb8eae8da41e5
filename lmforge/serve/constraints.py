"""Structured output over HTTP: OpenAI's `response_format` and vLLM's `structured_outputs` request field, turned
into the engine's StructuredOutputsParams and compiled before the request is queued, so a bad schema or grammar is
a 400 naming the field (and a pathological one a 400 after the time limit) rather than a stalled batch."""

import asyncio

from lmforge.engine.sampling_params import CONSTRAINTS, StructuredOutputsParams
from lmforge.engine.structured import timeout_message
from lmforge.serve.errors import bad_request

_OPTIONS = {"disable_any_whitespace", "disable_additional_properties", "disable_fallback", "whitespace_pattern"}


def from_response_format(response_format: dict | None) -> StructuredOutputsParams | None:
    """OpenAI's {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text" and response_format.keys() == {"type"}:
        return None
    if kind == "json_object" and response_format.keys() == {"type"}:
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise bad_request("response_format.json_schema must be an object with a 'schema' object.",
                              "response_format.json_schema")
        extra = sorted(set(response_format) - {"type", "json_schema"}) or \
            sorted(set(spec) - {"name", "schema", "strict", "description"})
        if extra:
            raise bad_request(f"Unrecognized field {extra[0]!r} in response_format.", "response_format")
        return StructuredOutputsParams(json=spec.get("schema", {}))  # no schema: any JSON value (as OpenAI)
    raise bad_request("response_format must be {'type': 'text'}, {'type': 'json_object'} or {'type': "
                      "'json_schema', 'json_schema': {...}}.", "response_format")


def from_structured_outputs(fields: dict | None) -> StructuredOutputsParams | None:
    """vLLM's request field: {"json" | "regex" | "choice" | "grammar" | "json_object": ..., options}."""
    if fields is None:
        return None
    unknown = sorted(set(fields) - set(CONSTRAINTS) - _OPTIONS)
    if unknown:
        raise bad_request(f"Unrecognized field {unknown[0]!r} in structured_outputs; use one of "
                          f"{', '.join(CONSTRAINTS)}.", f"structured_outputs.{unknown[0]}")
    if fields.get("whitespace_pattern") is not None:
        raise bad_request("structured_outputs.whitespace_pattern is not supported by the grammar engine (xgrammar).",
                          "structured_outputs.whitespace_pattern")
    given = {k: v for k, v in fields.items() if k in CONSTRAINTS or k in {"disable_any_whitespace",
                                                                        "disable_additional_properties"}}
    try:
        return StructuredOutputsParams(**given)
    except (TypeError, ValueError) as e:
        raise bad_request(f"{e}.".replace("StructuredOutputsParams", "structured_outputs"),
                          "structured_outputs") from None


def request_constraint(response_format: dict | None, structured_outputs: dict | None
                       ) -> tuple[StructuredOutputsParams | None, str]:
    """The request's constraint and the field it came from (for error messages)."""
    a, b = from_response_format(response_format), from_structured_outputs(structured_outputs)
    if a is not None and b is not None:
        raise bad_request("Set either response_format or structured_outputs, not both.", "structured_outputs")
    if a is not None:
        field = "response_format.json_schema.schema" if a.json is not None else "response_format"
        return a, field
    return b, f"structured_outputs.{b.kind}" if b is not None else "structured_outputs"


async def compile_or_400(grammars, constraint: StructuredOutputsParams, field: str) -> None:
    """Waits (without blocking the event loop) for constraint's grammar; a 400 naming `field` if it cannot be
    compiled, or not within the engine's time limit. The engine then finds it in its cache."""
    try:
        future = grammars.compile(constraint)
    except ValueError as e:  # xgrammar is not installed
        raise bad_request(f"{e}.", field) from None
    result = asyncio.wrap_future(future)
    while True:
        left = grammars.remaining(future)  # None: waiting for a compile thread (not on the clock)
        if left is not None and left <= 0 and not future.done():
            raise bad_request(timeout_message(constraint, grammars.timeout_s).replace(
                f"structured_outputs.{constraint.kind}", field) + ".", field)
        try:
            await asyncio.wait_for(asyncio.shield(result), 0.05 if left is None else max(left, 0.001))
            return
        except TimeoutError:
            continue
        except ValueError as e:
            raise bad_request(f"{e}.".replace(f"structured_outputs.{constraint.kind}", field), field) from None
