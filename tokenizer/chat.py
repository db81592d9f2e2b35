"""Chat templates: the model's own Jinja template, or a built-in one chosen by the vocabulary.

The model's template (tokenizer.chat_template) is rendered the way Hugging Face renders
it: a jinja2 ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the
loopcontrols extension, the {% generation %} block, and the raise_exception and
strftime_now helpers; bos_token and eos_token are variables.

When the model has no template, or its template does not compile or cannot render a
one-message conversation, a built-in one is used: Llama 3 if the vocabulary has
<|eot_id|>, ChatML if <|im_start|>, Zephyr (TinyLlama) if <|user|>, else Llama 2.
The built-ins are the published templates of those models, verbatim in effect.
"""
from __future__ import annotations

import datetime
import json
import logging
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dllama_node.common.errors import UsageError

log = logging.getLogger(__name__)

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

ZEPHYR = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# name -> (template, default bos_token, default eos_token)
BUILTINS: Dict[str, tuple] = {
    "llama2": (LLAMA2, "<s>", "</s>"),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    "zephyr": (ZEPHYR, "<s>", "</s>"),
    "chatml": (CHATML, "", "<|im_end|>"),
}


class TemplateRaised(Exception):
    """The template called raise_exception(): the conversation does not suit it."""


class _GenerationBlock(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}: Hugging Face marks assistant text with it;
    for rendering it is just its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str):
    raise TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None,
            separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _environment()


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise UsageError(f"chat message {i}: expected a dict with 'role' and 'content', "
                             f"found {m!r}")
        out.append(dict(m))
    return out


class ChatTemplate:
    """One chat format: render(messages) gives the prompt text, specials spelled out.

    `name` is "model" for the model's own template, else the built-in's name.
    `fallback` is used when the model's template fails for reasons other than
    raise_exception (an undefined variable, a type error inside the template).
    """

    def __init__(self, source: str, name: str, bos_token: str = "", eos_token: str = "",
                 fallback: Optional["ChatTemplate"] = None):
        self.source = source
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.fallback = fallback
        self._template = _ENV.from_string(source)   # jinja2.TemplateSyntaxError if broken

    def render(self, messages: Sequence[Mapping[str, Any]],
               add_generation_prompt: bool = True) -> str:
        """The prompt for `messages` ([{"role": ..., "content": ...}, ...]).

        Raises UsageError when the template rejects the conversation (for example roles
        that do not alternate user/assistant in Llama 2's format).
        """
        msgs = _check_messages(messages)
        try:
            return self._template.render(messages=msgs,
                                         add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateRaised as e:
            raise UsageError(f"chat template {self.name}: {e}") from None
        except Exception as e:  # noqa: BLE001 - any failure inside a foreign template
            if self.fallback is None:
                raise UsageError(f"chat template {self.name} failed: "
                                 f"{type(e).__name__}: {e}") from None
            log.warning("chat template %s failed (%s: %s); using the built-in %s template",
                        self.name, type(e).__name__, e, self.fallback.name)
            return self.fallback.render(msgs, add_generation_prompt)

    def __repr__(self) -> str:
        return f"<ChatTemplate {self.name}>"


def chat_template_by_name(name: str, bos_token: Optional[str] = None,
                          eos_token: Optional[str] = None) -> ChatTemplate:
    """A built-in template ("llama2", "llama3", "zephyr", "chatml"), as --chat-template
    picks it. bos_token/eos_token default to the format's usual spellings."""
    key = name.strip().lower()
    if key not in BUILTINS:
        raise UsageError(f"chat template {name!r} is unknown: expected one of "
                         + ", ".join(BUILTINS))
    source, bos, eos = BUILTINS[key]
    return ChatTemplate(source, key, bos if bos_token is None else bos_token,
                        eos if eos_token is None else eos_token)


def builtin_name_for_vocab(special_texts: Iterable[str]) -> str:
    """The built-in format a vocabulary's special tokens point to."""
    specials = set(special_texts)
    if "<|eot_id|>" in specials:
        return "llama3"
    if "<|im_start|>" in specials:
        return "chatml"
    if "<|user|>" in specials:
        return "zephyr"
    return "llama2"


def template_for_vocab(model_template: Optional[str], special_texts: Iterable[str],
                       bos_token: str, eos_token: str) -> ChatTemplate:
    """The model's template when it works, else the built-in the vocabulary points to."""
    name = builtin_name_for_vocab(special_texts)
    builtin = chat_template_by_name(name, bos_token, eos_token)
    if not model_template:
        log.info("the model has no chat template: using the built-in %s template", name)
        return builtin
    try:
        template = ChatTemplate(model_template, "model", bos_token, eos_token, fallback=builtin)
        template._template.render(messages=[{"role": "user", "content": "Hi"}],
                                  add_generation_prompt=True,
                                  bos_token=bos_token, eos_token=eos_token)
    except Exception as e:  # noqa: BLE001 - any failure of a foreign template
        log.warning("the model's chat template does not work (%s: %s): using the built-in "
                    "%s template", type(e).__name__, e, name)
        return builtin
    return template
