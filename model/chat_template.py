"""Chat templates: where a model's template comes from, and rendering it safely.

A template is Jinja2 source, as Hugging Face and llama.cpp ship it. It is rendered
in Jinja2's immutable sandbox, with the globals `transformers` gives templates
(`raise_exception`, `strftime_now`, `bos_token`, `eos_token`) and the same
environment options (`trim_blocks`, `lstrip_blocks`, loop controls), so a template
renders here exactly as `apply_chat_template` renders it, and a hostile template
can neither reach Python objects nor change state.

This module must not import torch: the router renders templates.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


class ChatTemplateError(ValueError):
    """A template that cannot be rendered for these messages; the message says why."""


@dataclass(frozen=True)
class ChatMessage:
    role: str
    """"system", "user", "assistant" (or whatever roles the template knows)."""
    content: str


def chat_template_for_model(spec: str) -> str | None:
    """The chat template of a model spec, without loading weights: a GGUF file's
    `tokenizer.chat_template`, a directory's
    `chat_template.jinja`, else its `tokenizer_config.json`'s `chat_template` (a
    string, or a list of named templates of which "default" is taken). None when
    the model has none (the `dummy:*` presets have none)."""
    from model.gguf import gguf_chat_template, is_gguf_spec

    if spec.startswith("dummy:"):
        return None
    if is_gguf_spec(spec):
        return gguf_chat_template(spec)
    path = Path(spec)
    if not path.is_dir():
        return None
    jinja = path / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text()
    config_path = path / TOKENIZER_CONFIG_FILE
    if not config_path.is_file():
        return None
    template = json.loads(config_path.read_text()).get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class ChatTemplate:
    """A compiled template. `render` is safe to call for untrusted messages."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # transformers' own `tojson`: no HTML escaping, unlike Jinja's.
            return json.dumps(
                value,
                ensure_ascii=ensure_ascii,
                indent=indent,
                separators=separators,
                sort_keys=sort_keys,
            )

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateError as err:
            raise ChatTemplateError(f"the model's chat template does not compile: {err}") from err
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages`. Raises ChatTemplateError (e.g. the template
        refuses a role order) with the template's own message."""
        import jinja2

        try:
            return self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.exceptions.TemplateError as err:  # SecurityError is one too
            raise ChatTemplateError(f"the chat template refused these messages: {err}") from err
