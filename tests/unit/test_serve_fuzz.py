"""Schemathesis fuzzes the live server from its own /openapi.json (issue 17): every operation, requests that fit
the schema and requests that break it, a bounded and repeatable number of each. No answer may be a 5xx, carry a
status the schema does not document, or have a content type or body other than the schema says."""

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from lmforge import AsyncEngine  # noqa: E402
from lmforge.serve.openai_api import create_app  # noqa: E402
from tests.unit.tiny_server import LiveApp, tiny_chat_model  # noqa: E402

KEY = "sk-fuzz"
EXAMPLES = 25  # per operation and generation mode: bounded, and (derandomized) the same every run
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Every operation the app serves with all its optional routes on; the test checks the schema lists exactly these.
OPERATIONS = [
    ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
    ("GET", "/v1/models/{name}"), ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter"),
    ("GET", "/health"), ("GET", "/version"), ("GET", "/metrics"), ("POST", "/tokenize"), ("POST", "/detokenize"),
    ("GET", "/tokenizer_info"),
]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "adapters").mkdir()
    engine = AsyncEngine(model=str(tiny_chat_model(root / "model")), dtype="float32", kv_cache_memory=0.002,
                         block_size=4, enable_lora=True, max_loras=1, max_lora_rank=8)
    # Every optional route on, so the fuzzer sees them all; adapters load from an empty root only.
    app = create_app(engine, ["tiny"], api_key=KEY, allow_runtime_lora_updating=True,
                     allowed_lora_paths=[str(root / "adapters")], enable_tokenizer_info_endpoint=True)
    with LiveApp(app) as server:
        yield server
    engine.shutdown()


@pytest.fixture(scope="module")
def api(live):
    return schemathesis.openapi.from_url(live.url + "/openapi.json")


def test_the_schema_lists_every_operation(api):
    served = {(op.ok().method.upper(), op.ok().path) for op in api.get_all_operations()}
    assert served == set(OPERATIONS)


# Negative cases only where there is input to break (a body or a path parameter).
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST" or "{" in p]


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_every_generated_request_is_answered_as_the_schema_says(api, live, method, path, mode):
    operation = api[path][method]

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def answered_as_documented(case):
        case.call_and_validate(base_url=live.url, checks=CHECKS, headers={"Authorization": f"Bearer {KEY}"},
                               timeout=60)

    answered_as_documented()
