"""`ChatPrompts`: the served model's chat template, compiled once per router, turning
a request's `messages` into prompt text.

Templates carry their own BOS (`{{ bos_token }}`), so the text is tokenized
without one (`request.prepare` does that). A model without a template, or one
whose template does not compile, still serves `prompt` and `prompt_token_ids`;
only requests with `messages` are refused, with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from model.chat_template import (
    ChatMessage,
    ChatTemplate,
    ChatTemplateError,
    chat_template_for_model,
)
from model.tokenizer import Tokenizer
from protos import generator_pb2 as pb
from router.validation import InvalidRequest

log = logging.getLogger(__name__)


class ChatPrompts:
    """Renders messages with one compiled template; `render` is safe for untrusted
    messages (the template runs in Jinja2's immutable sandbox)."""

    def __init__(self, template: ChatTemplate | None, why_none: str = "") -> None:
        self.template = template
        self.why_none = why_none
        """Why there is no template, for the client (set when `template` is None)."""

    @classmethod
    def for_model(cls, spec: str, tokenizer: Tokenizer | None) -> ChatPrompts:
        """The template of model `spec` (its directory's `chat_template.jinja` or
        `tokenizer_config.json`), with the tokenizer's BOS and EOS strings."""
        source = chat_template_for_model(spec)
        if source is None:
            return cls(
                None,
                f"messages need a chat template, and model {spec} has none "
                "(chat_template.jinja or tokenizer_config.json's chat_template): "
                "send prompt or prompt_token_ids",
            )
        bos = tokenizer.special_token_text(tokenizer.bos_token_id) if tokenizer else ""
        eos = tokenizer.special_token_text(tokenizer.eos_token_id) if tokenizer else ""
        try:
            return cls(ChatTemplate(source, bos_token=bos, eos_token=eos))
        except ChatTemplateError as err:
            log.warning("%s; requests with messages will be refused", err)
            return cls(None, f"messages cannot be rendered: {err}; send prompt or prompt_token_ids")

    def render(self, messages: Sequence[pb.ChatMessage], add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages`. Raises InvalidRequest when the model has no
        template or the template refuses the messages."""
        if self.template is None:
            raise InvalidRequest(self.why_none)
        turns = [ChatMessage(role=m.role, content=m.content) for m in messages]
        try:
            return self.template.render(turns, add_generation_prompt=add_generation_prompt)
        except ChatTemplateError as err:
            raise InvalidRequest(f"messages: {err}") from None
