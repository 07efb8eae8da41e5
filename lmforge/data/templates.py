"""Prompt formats (DataConfig.template) and where their assistant turns lie in the rendered text.

"model" is the tokenizer's own chat template; chatml, llama3, mistral and alpaca are written here as Jinja and run
through the same sandboxed renderer (Tokenizer.apply_chat_template), so every template is found by one mechanism:
the conversation is rendered incrementally. The prompt of assistant turn i is the rendering of messages[:i] with
the generation prompt; the turn ends where the rendering of messages[:i + 1] ends. Both must be text prefixes of
the whole conversation's rendering, or the template does not write conversations incrementally (it rewrites earlier
turns, as some reasoning templates do) and its spans cannot be found: that is an error, not a guess.
"""

from dataclasses import dataclass

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

CHATML = r"""
{%- for message in messages -%}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""

LLAMA3 = r"""
{{- bos_token -}}
{%- for message in messages -%}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' + (message.content | trim) + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}
"""

# Mistral's [INST] format; a system message is folded into the first user turn, as Mistral's templates do.
MISTRAL = r"""
{{- bos_token -}}
{%- for message in messages -%}
{%- if message.role == 'user' -%}
{{- '[INST] ' -}}
{%- if loop.index0 == 1 and messages[0].role == 'system' -%}{{- messages[0].content + '\n\n' -}}{%- endif -%}
{{- message.content + ' [/INST]' -}}
{%- elif message.role == 'assistant' -%}
{{- ' ' + message.content + eos_token -}}
{%- endif -%}
{%- endfor -%}
"""

# The Stanford Alpaca prompt; rows of the alpaca format carry instruction and input separately for it.
ALPACA = r"""
{{- bos_token -}}
{%- if messages[0].role == 'system' -%}
{{- messages[0].content + '\n\n' -}}
{%- elif messages[0].input -%}
{{- 'Below is an instruction that describes a task, paired with an input that provides further context. '
    'Write a response that appropriately completes the request.\n\n' -}}
{%- else -%}
{{- 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if message.role == 'user' -%}
{{- '### Instruction:\n' + (message.instruction if message.instruction is defined else message.content) + '\n\n' -}}
{%- if message.input -%}{{- '### Input:\n' + message.input + '\n\n' -}}{%- endif -%}
{%- elif message.role == 'assistant' -%}
{{- '### Response:\n' + message.content + eos_token + '\n\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '### Response:\n' -}}{%- endif -%}
"""


@dataclass(frozen=True, slots=True)
class NamedTemplate:
    jinja: str
    end_of_turn: str | None  # the token closing an assistant turn; None: the tokenizer's EOS


NAMED = {
    "chatml": NamedTemplate(CHATML, "<|im_end|>"),
    "llama3": NamedTemplate(LLAMA3, "<|eot_id|>"),
    "mistral": NamedTemplate(MISTRAL, None),
    "alpaca": NamedTemplate(ALPACA, None),
}


class ChatRenderer:
    """Renders conversations in one template and finds the character spans of their assistant turns."""

    def __init__(self, tokenizer: Tokenizer, template: str):
        self.tokenizer = tokenizer
        self.name = template
        self.variables: dict[str, str] = {}
        if template == "model":
            self.jinja = None
            if not tokenizer.chat_templates:
                raise LmforgeError(f"{tokenizer.name} has no chat template for data.template: model; set data.template "
                                   "to chatml, llama3, mistral or alpaca, or add a chat_template.jinja to the model")
            # The template's end of turn is a token generation stops at (generation_config's eos ids).
            self.end_of_turn_ids = frozenset(tokenizer.eos_token_ids)
            self.end_of_turn_text = ", ".join(tokenizer.decode([i], False) for i in sorted(tokenizer.eos_token_ids))
            return
        named = NAMED[template]
        self.jinja = named.jinja
        end = named.end_of_turn or tokenizer.eos_token
        self.end_of_turn_text = end or "(no EOS token)"
        token_id = tokenizer.token_to_id(end) if end else None
        self.end_of_turn_ids = frozenset() if token_id is None else frozenset([token_id])
        if template == "alpaca" and not tokenizer.add_bos_token:
            self.variables["bos_token"] = ""  # a plain-text prompt starts with BOS only where plain text does
        if named.end_of_turn is None and end is None:
            self.variables["eos_token"] = ""

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt, chat_template=self.jinja,
                                                  **self.variables)

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The whole rendering and, per assistant turn, its [start, end) characters in it (after its prompt)."""
        full = self.render(messages)
        spans: list[tuple[int, int]] = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            upto = full if i == len(messages) - 1 else self.render(messages[: i + 1])
            previous_end = spans[-1][1] if spans else 0
            if not (full.startswith(upto) and upto.startswith(prompt) and len(prompt) >= previous_end):
                raise TemplateNotIncremental(i)
            spans.append((len(prompt), len(upto)))
        return full, spans


class TemplateNotIncremental(Exception):
    def __init__(self, turn: int):
        super().__init__(turn)
        self.turn = turn

    def error(self, template: str, origin: str) -> LmforgeError:
        return LmforgeError(
            f"{origin}: the {template!r} template does not write this conversation incrementally (its rendering up "
            f"to message {self.turn} is not a prefix of the whole conversation), so the assistant turns to train "
            "cannot be found; set data.template to one of chatml, llama3, mistral, alpaca")
