"""`ResponseEmitter`: text, stop strings, finish-reason precedence and usage."""

from model.sampling_params import FinishReason, SamplingParams
from model.tokenizer import ByteTokenizer, IncrementalDetokenizer
from protos import generator_pb2 as pb
from router.responses import ResponseEmitter, TokenChunk


def emitter(stop=(), logprobs=False) -> ResponseEmitter:
    sampling = SamplingParams(stop=tuple(stop), logprobs=logprobs)
    return ResponseEmitter("r1", sampling, 7, IncrementalDetokenizer(ByteTokenizer()))


def chunk(text_bytes: list[int], logprobs=None, finish=None) -> TokenChunk:
    return TokenChunk(text_bytes, logprobs or [0.0] * len(text_bytes), finish)


def ids(text: str) -> list[int]:
    return list(text.encode())


def test_stop_string_is_cut_and_usage_counts_sent_tokens():
    e = emitter(stop=["END"])
    first = e.add(chunk(ids("ab")))
    second = e.add(chunk(ids("cEN")))
    assert not e.is_finished
    last = e.add(chunk(ids("Dxy")))
    assert (first.text, second.text, last.text) == ("ab", "c", "")
    assert e.finish_reason is FinishReason.STOP
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (7, 8)
    assert list(last.logprobs) == []  # not asked for


def test_held_back_text_and_half_characters_are_flushed_at_the_end():
    e = emitter(stop=["zz"], logprobs=True)
    message = e.add(chunk(ids("héz")[:-2], [-0.5, -0.25]))  # "h" and half of "é"
    # Tokens are sent at once; text waits until no character is cut in half.
    assert message.text == "" and list(message.logprobs) == [-0.5, -0.25]
    message = e.add(chunk(ids("éz")[1:], [-1.0, -1.0]))  # the rest of "é", then "z"
    assert message.text == "hé"  # "z" could start "zz": held back
    last = e.add(TokenChunk([], [], FinishReason.LENGTH))
    assert last.text == "z" and last.usage.completion_tokens == 4
    assert last.finish_reason == pb.FINISH_REASON_LENGTH


def test_a_stop_string_wins_over_length_on_the_same_token():
    # max_tokens reached by the very token that completes the stop string: STOP, as
    # the decode loop reports it, whichever worker sampled the token.
    e = emitter(stop=["b"])
    last = e.add(chunk(ids("ab"), finish=FinishReason.LENGTH))
    assert e.finish_reason is FinishReason.STOP
    assert (last.text, last.finish_reason) == ("a", pb.FINISH_REASON_STOP)


def test_no_message_while_text_is_held_and_no_tokens_came():
    e = emitter(stop=["zz"])
    assert e.add(TokenChunk([], [])) is None
    assert e.add(chunk(ids("z"))).text == ""  # tokens are sent, text held
