"""`messages` on the router's request path without sockets: `prepare` renders them
with the model's chat template (`ChatPrompts`, compiled once) and tokenizes the
text without an extra BOS; every refusal is an InvalidRequest that says what to
change."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.tokenizer import ByteTokenizer
from protos import generator_pb2 as pb
from router.chat_prompt import ChatPrompts
from router.cluster import ClusterModel
from router.request import prepare
from router.validation import InvalidRequest, RequestLimits

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MODEL = ClusterModel("m", b"f" * 16, block_size=4, vocab_size=259, max_context_len=512)
TOKENIZER = ByteTokenizer()


def chat_request(*turns: tuple[str, str], **fields) -> pb.GenerateRequest:
    messages = [pb.ChatMessage(role=role, content=content) for role, content in turns]
    return pb.GenerateRequest(messages=messages, **fields)


def model_dir(tmp_path: Path, template: str | None) -> str:
    if template is not None:
        (tmp_path / "chat_template.jinja").write_text(template)
    return str(tmp_path)


def test_messages_are_rendered_with_the_template_and_tokenized_without_bos(tmp_path):
    chat = ChatPrompts.for_model(model_dir(tmp_path, CHATML), TOKENIZER)
    req = prepare(
        chat_request(("system", "Be brief."), ("user", "Hi")),
        RequestLimits(),
        MODEL,
        TOKENIZER,
        chat,
    )
    text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    text += "<|im_start|>assistant\n"
    assert req.prompt_token_ids == list(text.encode())  # no BOS (256) in front
    # The same text as a prompt gets the tokenizer's BOS.
    as_prompt = prepare(pb.GenerateRequest(prompt=text), RequestLimits(), MODEL, TOKENIZER, chat)
    assert as_prompt.prompt_token_ids == [ByteTokenizer.BOS_ID, *text.encode()]


def test_add_generation_prompt_false_leaves_the_assistant_cue_out(tmp_path):
    chat = ChatPrompts.for_model(model_dir(tmp_path, CHATML), TOKENIZER)
    request = chat_request(("user", "Hi"), add_generation_prompt=False)
    req = prepare(request, RequestLimits(), MODEL, TOKENIZER, chat)
    assert bytes(req.prompt_token_ids).decode() == "<|im_start|>user\nHi<|im_end|>\n"


def test_bos_and_eos_strings_come_from_the_tokenizer(tmp_path):
    class Named(ByteTokenizer):
        def special_token_text(self, token_id):
            return {self.BOS_ID: "<s>", self.EOS_ID: "</s>"}.get(token_id, "")

    template = "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"
    chat = ChatPrompts.for_model(model_dir(tmp_path, template), Named())
    assert chat.render([pb.ChatMessage(role="user", content="x")]) == "<s>x</s>"


def test_a_model_without_a_template_refuses_messages_and_serves_prompts(tmp_path):
    chat = ChatPrompts.for_model(model_dir(tmp_path, None), TOKENIZER)
    with pytest.raises(
        InvalidRequest, match=r"messages need a chat template, and model .* has none"
    ):
        prepare(chat_request(("user", "Hi")), RequestLimits(), MODEL, TOKENIZER, chat)
    req = prepare(pb.GenerateRequest(prompt="Hi"), RequestLimits(), MODEL, TOKENIZER, chat)
    assert req.prompt_token_ids == [ByteTokenizer.BOS_ID, *b"Hi"]
    assert ChatPrompts.for_model("dummy:tiny", TOKENIZER).template is None


def test_a_template_that_refuses_the_messages_is_an_invalid_request(tmp_path):
    template = (
        "{% if messages[0].role != 'user' %}{{ raise_exception('the first turn must be the "
        "user') }}{% endif %}{{ messages[0].content }}"
    )
    chat = ChatPrompts.for_model(model_dir(tmp_path, template), TOKENIZER)
    with pytest.raises(InvalidRequest, match=r"messages: .*the first turn must be the user"):
        prepare(chat_request(("assistant", "Hi")), RequestLimits(), MODEL, TOKENIZER, chat)


def test_a_template_that_does_not_compile_refuses_only_messages(tmp_path):
    chat = ChatPrompts.for_model(model_dir(tmp_path, "{% for %}"), TOKENIZER)
    assert chat.template is None
    with pytest.raises(InvalidRequest, match=r"messages cannot be rendered: .*does not compile"):
        prepare(chat_request(("user", "Hi")), RequestLimits(), MODEL, TOKENIZER, chat)


def test_a_template_that_changes_state_is_refused_by_the_sandbox(tmp_path):
    template = "{{ messages.append({'role': 'user', 'content': 'injected'}) }}"
    chat = ChatPrompts.for_model(model_dir(tmp_path, template), TOKENIZER)
    with pytest.raises(InvalidRequest, match="messages: the chat template refused these messages"):
        prepare(chat_request(("user", "Hi")), RequestLimits(), MODEL, TOKENIZER, chat)


def test_the_rendered_prompt_must_fit_the_context(tmp_path):
    chat = ChatPrompts.for_model(model_dir(tmp_path, CHATML), TOKENIZER)
    small = ClusterModel("m", b"f" * 16, block_size=4, vocab_size=259, max_context_len=40)
    with pytest.raises(
        InvalidRequest, match=r"messages has 58 tokens and sampling\.max_tokens is 16"
    ):
        sampling = pb.SamplingParams(max_tokens=16)
        request = chat_request(("user", "Hi there"), sampling=sampling)
        prepare(request, RequestLimits(), small, TOKENIZER, chat)
    with pytest.raises(InvalidRequest, match=r"messages has 58 tokens and sampling\.max_tokens"):
        prepare(chat_request(("user", "Hi there")), RequestLimits(), small, TOKENIZER, chat)


def test_an_answer_without_max_tokens_may_run_to_the_end_of_the_context(tmp_path):
    """Unset max_tokens: 16 for a prompt, but a chat answer runs to its end-of-turn,
    so it may take the rest of the context, within the server's limit."""
    chat = ChatPrompts.for_model(model_dir(tmp_path, CHATML), TOKENIZER)
    roomy = ClusterModel("m", b"f" * 16, block_size=4, vocab_size=259, max_context_len=100)
    prepared = prepare(chat_request(("user", "Hi")), RequestLimits(), roomy, TOKENIZER, chat)
    assert prepared.sampling.max_tokens == 100 - len(prepared.prompt_token_ids)
    capped = prepare(
        chat_request(("user", "Hi")), RequestLimits(max_tokens=20), roomy, TOKENIZER, chat
    )
    assert capped.sampling.max_tokens == 20
    sampling = pb.SamplingParams(max_tokens=5)
    chosen = prepare(
        chat_request(("user", "Hi"), sampling=sampling), RequestLimits(), roomy, TOKENIZER, chat
    )
    assert chosen.sampling.max_tokens == 5
    prompt = prepare(pb.GenerateRequest(prompt="Hi"), RequestLimits(), roomy, TOKENIZER, chat)
    assert prompt.sampling.max_tokens == 16


def test_messages_need_a_tokenizer(tmp_path):
    chat = ChatPrompts.for_model(model_dir(tmp_path, CHATML), None)
    with pytest.raises(InvalidRequest, match="send prompt_token_ids instead of messages"):
        prepare(chat_request(("user", "Hi")), RequestLimits(), MODEL, None, chat)
