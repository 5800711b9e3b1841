"""Chat templates render as `transformers`' `apply_chat_template` renders them, in
a sandbox a hostile template cannot leave, and are found where models keep them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.chat_template import (
    ChatMessage,
    ChatTemplate,
    ChatTemplateError,
    chat_template_for_model,
)

# ChatML as SmolLM2 and Qwen ship it, and a Llama-3 style template with bos_token.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] "
    "+ '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
CONVERSATIONS = [
    [ChatMessage("user", "What is the capital of France?")],
    [
        ChatMessage("system", "Answer in one word."),
        ChatMessage("user", "Capital of Italy?"),
        ChatMessage("assistant", "Rome."),
        ChatMessage("user", "  And of Spain? \n"),
    ],
    [ChatMessage("user", "unicode: naïve café ☕ 日本語 {{ not a tag }}")],
]


@pytest.mark.parametrize("source", [CHATML, LLAMA3], ids=["chatml", "llama3"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_equals_transformers_apply_chat_template(source, add_generation_prompt):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "x": 2}, "x")),
        bos_token="<s>",
        eos_token="</s>",
    )
    hf.chat_template = source
    ours = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    for messages in CONVERSATIONS:
        expected = hf.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
        assert ours.render(messages, add_generation_prompt) == expected


def test_a_template_cannot_reach_python_internals():
    hostile = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError, match="refused"):
        ChatTemplate(hostile).render(CONVERSATIONS[0])


def test_a_template_cannot_mutate_what_it_is_given():
    mutating = "{% set _ = messages.append({'role': 'x', 'content': 'y'}) %}{{ messages|length }}"
    with pytest.raises(ChatTemplateError):
        ChatTemplate(mutating).render(CONVERSATIONS[0])


def test_raise_exception_in_a_template_is_its_message():
    strict = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="system first"):
        ChatTemplate(strict).render(CONVERSATIONS[0])


def test_a_template_that_does_not_compile_says_so():
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_templates_are_found_in_jinja_files_and_tokenizer_configs(tmp_path: Path):
    assert chat_template_for_model("dummy:tiny") is None
    assert chat_template_for_model(str(tmp_path)) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    assert chat_template_for_model(str(tmp_path)) == CHATML
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": LLAMA3}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert chat_template_for_model(str(tmp_path)) == LLAMA3
    (tmp_path / "chat_template.jinja").write_text(CHATML)  # takes precedence
    assert chat_template_for_model(str(tmp_path)) == CHATML
