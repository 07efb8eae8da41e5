"""Chat templates: output equal to transformers' apply_chat_template, and one-sentence errors for bad input."""

import datetime
import json
import shutil

import pytest

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer, render_chat_template
from tests.tokenizer_refs import hf_tokenizer, llama_style_dir

pytest.importorskip("transformers")  # the reference for every comparison here

# Hand-written in the style of Llama 3.1's template: system block with tools as indented JSON, header tokens.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "You may call these functions:\\n\\n" }}
    {%- for tool in tools %}
        {{- tool | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role == 'assistant' and message.tool_calls is defined %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
        {%- for call in message.tool_calls %}
            {{- '{"name": "' + call.function.name + '", "parameters": ' + call.function.arguments | tojson + '}' }}
            {%- if not loop.last %}{{ "\\n" }}{% endif %}
        {%- endfor %}
        {{- '<|eot_id|>' }}
    {%- elif message.role == 'tool' %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content | tojson + '<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim }}
        {{- '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Hand-written ChatML with tools, reasoning, a namespace, loop controls and raise_exception.
CHATML_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
    {{- "# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" + (tool | tojson) }}{%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_role=none) %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}{{ raise_exception('System message must come first') }}{% endif %}
        {%- continue %}
    {%- endif %}
    {%- if ns.last_role == message.role %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}
    {%- set ns.last_role = message.role %}
    {{- '<|im_start|>' + message.role + '\\n' }}
    {%- if message.reasoning_content is defined %}
        {{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}
    {%- endif %}
    {%- if message.content is defined %}{{- message.content }}{%- endif %}
    {%- for call in message.tool_calls | default([]) %}
        {{- '\\n<tool_call>\\n' + call.function | tojson + '\\n</tool_call>' }}
    {%- endfor %}
    {{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}
"""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city — «quoted» & <escaped>?",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "e.g. Zürich or 東京"}},
            "required": ["city"],
        },
    },
}

CHATS = {
    "multi_turn": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Hi! Où est la gare? 🚉"},
        {"role": "assistant", "content": "  Tout droit.  "},
        {"role": "user", "content": "日本語で説明してください。\n\tThanks."},
    ],
    "single_user": [{"role": "user", "content": "What is 2 + 2?"}],
    "tool_call": [
        {"role": "user", "content": "Weather in Zürich?"},
        {
            "role": "assistant",
            "content": None,  # OpenAI clients send null content next to tool_calls
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}],
        },
        {"role": "tool", "content": "12°C, light rain"},
        {"role": "assistant", "content": "It is 12°C with light rain."},
    ],
    "reasoning": [
        {"role": "user", "content": "Is 91 prime?"},
        {"role": "assistant", "reasoning_content": "91 = 7 * 13.", "content": "No: 7 × 13."},
        {"role": "user", "content": "And 97?"},
    ],
}


@pytest.fixture(scope="module")
def smollm2(smollm2_tokenizer_dir):
    return Tokenizer.from_dir(smollm2_tokenizer_dir), hf_tokenizer(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def handwritten(tmp_path_factory, smollm2_tokenizer_dir):
    """Llama-3-style template on the Llama-style tokenizer (header tokens registered as special), ChatML on SmolLM2."""
    extra = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    llama = llama_style_dir(
        tmp_path_factory.mktemp("llama3"), chat_template=LLAMA3_TEMPLATE, additional_special_tokens=extra
    )
    chatml = tmp_path_factory.mktemp("chatml")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # not chat_template.jinja, which would take priority
        shutil.copy(smollm2_tokenizer_dir / name, chatml / name)
    config = json.loads((chatml / "tokenizer_config.json").read_text())
    (chatml / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML_TEMPLATE}))
    return {
        name: (Tokenizer.from_dir(path), hf_tokenizer(path)) for name, path in [("llama3", llama), ("chatml", chatml)]
    }


def _hf_render(hf, chat, **kwargs):
    text = hf.apply_chat_template(chat, tokenize=False, **kwargs)
    ids = hf.apply_chat_template(chat, tokenize=True, return_dict=False, **kwargs)
    return text, ids


def assert_same_render(ours, hf, chat, **kwargs):
    text, ids = _hf_render(hf, chat, **kwargs)
    assert ours.apply_chat_template(chat, **kwargs) == text
    assert ours.apply_chat_template(chat, tokenize=True, **kwargs) == ids


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("chat", ["multi_turn", "single_user"])
def test_smollm2_template_matches_transformers(smollm2, chat, add_generation_prompt):
    ours, hf = smollm2
    assert ours.chat_template == hf.chat_template
    assert_same_render(ours, hf, CHATS[chat], add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("chat", sorted(CHATS))
@pytest.mark.parametrize("template", ["llama3", "chatml"])
def test_handwritten_templates_match_transformers(handwritten, template, chat, add_generation_prompt):
    ours, hf = handwritten[template]
    assert_same_render(ours, hf, CHATS[chat], add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("template", ["llama3", "chatml"])
def test_tools_match_transformers(handwritten, template):
    ours, hf = handwritten[template]
    for chat in ("tool_call", "multi_turn"):
        assert_same_render(ours, hf, CHATS[chat], tools=[WEATHER_TOOL], add_generation_prompt=True)
    text = ours.apply_chat_template(CHATS["tool_call"], tools=[WEATHER_TOOL])
    assert "Zürich or 東京" in text and "«quoted» & <escaped>" in text  # tojson keeps non-ASCII and HTML characters


def test_template_kwargs_reach_the_template(handwritten):
    ours, hf = handwritten["chatml"]
    assert_same_render(ours, hf, CHATS["single_user"], add_generation_prompt=True, enable_thinking=False)
    assert ours.apply_chat_template(CHATS["single_user"], True, enable_thinking=False).endswith("</think>\n\n")


@pytest.mark.parametrize(
    "chat, message",
    [
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "Conversation roles must alternate"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "System message must come first"),
    ],
)
def test_raise_exception_becomes_lmforge_error(handwritten, chat, message):
    ours, hf = handwritten["chatml"]
    with pytest.raises(LmforgeError, match=f"the chat template rejected the conversation: {message}"):
        ours.apply_chat_template(chat)
    with pytest.raises(Exception, match=message):  # transformers raises jinja2's TemplateError
        hf.apply_chat_template(chat, tokenize=False)


def test_named_templates_pick_tool_use_like_transformers(tmp_path):
    named = [{"name": "default", "template": "D:{{ messages[0].content }}"}, {"name": "tool_use", "template": "T"}]
    path = llama_style_dir(tmp_path, chat_template=named)
    ours, hf = Tokenizer.from_dir(path), hf_tokenizer(path)
    chat = CHATS["single_user"]
    assert ours.chat_template == "D:{{ messages[0].content }}"
    assert ours.apply_chat_template(chat) == hf.apply_chat_template(chat, tokenize=False) == "D:What is 2 + 2?"
    assert ours.apply_chat_template(chat, tools=[WEATHER_TOOL]) == "T"
    assert hf.apply_chat_template(chat, tools=[WEATHER_TOOL], tokenize=False) == "T"
    assert ours.apply_chat_template(chat, chat_template="tool_use") == "T"


def test_chat_template_jinja_takes_priority(tmp_path):
    path = llama_style_dir(tmp_path, chat_template="from config")
    assert Tokenizer.from_dir(path).chat_template == "from config"
    (path / "chat_template.jinja").write_text("from file {{ bos_token }}")
    ours = Tokenizer.from_dir(path)
    assert (
        ours.apply_chat_template(CHATS["single_user"])
        == "from file <s>"
        == hf_tokenizer(path).apply_chat_template(CHATS["single_user"], tokenize=False)
    )


def test_no_chat_template_is_a_clear_error(tmp_path):
    ours = Tokenizer.from_dir(llama_style_dir(tmp_path))
    assert ours.chat_template is None
    with pytest.raises(LmforgeError, match="has no chat template .* add a chat_template.jinja"):
        ours.apply_chat_template(CHATS["single_user"])


@pytest.mark.parametrize(
    "messages, problem",
    [
        ("hello", "messages must be a list"),
        ([], "messages is empty"),
        (["hello"], r"messages\[0\] must be a dict"),
        ([object()], r"messages\[0\] must be a dict with 'role' and 'content', got object"),
        ([{"content": "hi"}], r"messages\[0\] has no 'role'"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant"}], r"messages\[1\] \(role 'assistant'\) has no"),
        ([{"role": "user", "content": None}], r"messages\[0\] \(role 'user'\) has no 'content'"),
    ],
)
def test_malformed_messages(messages, problem):
    with pytest.raises(LmforgeError, match=problem):
        render_chat_template("{{ messages }}", messages)


def test_bad_tools_and_bad_templates():
    chat = CHATS["single_user"]
    with pytest.raises(LmforgeError, match="tools must be a list of JSON-schema objects"):
        render_chat_template("x", chat, tools=["get_weather"])
    with pytest.raises(LmforgeError, match=r"not valid Jinja \(line 1"):
        render_chat_template("{% for m in messages %}", chat)
    with pytest.raises(LmforgeError, match="failed to render"):
        render_chat_template("{{ messages[0].content + 1 }}", chat)


def test_sandbox_blocks_escapes():
    chat = CHATS["single_user"]
    with pytest.raises(LmforgeError, match="failed to render"):
        render_chat_template("{{ messages.append(1) }}", chat)  # immutable sandbox: no mutation of inputs
    with pytest.raises(LmforgeError, match="failed to render"):
        render_chat_template("{{ messages.__class__.__mro__[1].__subclasses__() }}", chat)
    with pytest.raises(LmforgeError, match="underscore attribute"):
        render_chat_template("{% set ns = namespace() %}{% set ns._x = 1 %}", chat)


def test_helpers_behave_like_transformers():
    chat = [{"role": "user", "content": "hi"}]
    template = (
        "{{ strftime_now('%Y') }}|{{ {'k': 'é<>'} | tojson }}|{{ [1, 2] | tojson(indent=2) }}|"
        "{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}|{{ dict(a=1) }}|"
        "{% generation %}kept{% endgeneration %}"
    )
    year = str(datetime.datetime.now().year)
    assert render_chat_template(template, chat) in {
        f'{y}|{{"k": "é<>"}}|[\n  1,\n  2\n]|01|{{\'a\': 1}}|kept' for y in (year, str(int(year) + 1))
    }
