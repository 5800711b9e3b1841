from model.tokenizer import ByteTokenizer, IncrementalDetokenizer
from protos import generator_pb2 as pb
from router.responses import ResponseEmitter


def emitter(stop=(), logprobs=False) -> ResponseEmitter:
    sampling = pb.SamplingParams(stop=list(stop), logprobs=logprobs)
    return ResponseEmitter("r1", sampling, 7, IncrementalDetokenizer(ByteTokenizer()))


def ids(text: str) -> list[int]:
    return list(text.encode())


def test_stop_string_is_cut_and_usage_counts_sent_tokens():
    e = emitter(stop=["END"])
    first = e.add(ids("ab"), [0.0, 0.0])
    second = e.add(ids("cEN"), [0.0] * 3)
    third = e.add(ids("Dxy"), [0.0] * 3)
    assert (first.text, second.text, third.text) == ("ab", "c", "")
    assert e.is_stopped
    last = e.finish(third, pb.FINISH_REASON_STOP)
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (7, 8)
    assert list(last.logprobs) == []  # not asked for


def test_held_back_text_and_half_characters_are_flushed_at_the_end():
    e = emitter(stop=["zz"], logprobs=True)
    message = e.add(ids("héz")[:-2], [-0.5, -0.25])  # "h" and half of "é"
    # Tokens are sent at once; text waits until no character is cut in half.
    assert message.text == "" and list(message.logprobs) == [-0.5, -0.25]
    message = e.add(ids("éz")[1:], [-1.0, -1.0])  # the rest of "é", then "z"
    assert message.text == "hé"  # "z" could start "zz": held back
    last = e.finish(None, pb.FINISH_REASON_LENGTH)
    assert last.text == "z" and last.usage.completion_tokens == 4
