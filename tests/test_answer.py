"""What the proxy reads from the last bytes of an answer."""

from __future__ import annotations

import json

from proxy.apis.answer import read_facts, request_model

CHUNK = b'data: {"model":"m1","choices":[{"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
FINISH = b'data: {"model":"m1","choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'
USAGE = b'data: {"model":"m1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":9}}\n\n'
DONE = b"data: [DONE]\n\n"


def test_facts_of_a_stream_tail() -> None:
    facts = read_facts(CHUNK + FINISH + USAGE + DONE)
    assert (facts.input_tokens, facts.output_tokens) == (3, 9)
    assert facts.finish_reasons == ("stop",)
    assert facts.model == "m1"


def test_facts_of_a_json_answer() -> None:
    body = json.dumps(
        {
            "id": "x",
            "model": "llama-3.1-8b",
            "choices": [
                {
                    "index": 0,
                    "message": {"content": 'say "model":"fake"'},
                    "finish_reason": "length",
                },
                {"index": 1, "message": {"content": "b"}, "finish_reason": "stop"},
            ],
            "usage": {
                "prompt_tokens": 12,
                "completion_tokens": 34,
                "completion_tokens_details": {"reasoning_tokens": 5},
                "prompt_tokens_details": {"cached_tokens": 2},
            },
        }
    ).encode()
    facts = read_facts(body)
    assert (facts.input_tokens, facts.output_tokens) == (12, 34)
    assert facts.finish_reasons == ("length", "stop")
    assert facts.model == "llama-3.1-8b"


def test_usage_only_reads_the_usage_and_nothing_else() -> None:
    facts = read_facts(CHUNK + FINISH + USAGE + DONE, usage_only=True)
    assert (facts.input_tokens, facts.output_tokens) == (3, 9)
    assert (facts.finish_reasons, facts.model) == ((), None)


def test_the_last_usage_is_the_last_that_has_a_value() -> None:
    """Found from the end: a later key without a number does not hide an earlier one."""
    tail = USAGE + b'data: {"model":null,"usage":{"prompt_tokens":null}}\n\n' + DONE
    facts = read_facts(tail)
    assert (facts.input_tokens, facts.output_tokens, facts.model) == (3, 9, "m1")
    later = USAGE.replace(b":3", b":30").replace(b":9,", b":90,").replace(b":9}", b":90}")
    assert (read_facts(USAGE + later).input_tokens, read_facts(USAGE + later).output_tokens) == (
        30,
        90,
    )


def test_the_usage_at_the_end_of_a_long_answer() -> None:
    vectors = [{"index": i, "embedding": [0.125] * 1536} for i in range(4)]
    body = json.dumps(
        {"data": vectors, "model": "embed-v2", "usage": {"prompt_tokens": 40, "total_tokens": 40}}
    ).encode()
    facts = read_facts(body)
    assert (facts.input_tokens, facts.output_tokens, facts.model) == (40, None, "embed-v2")


def test_an_answer_that_says_nothing_has_no_facts() -> None:
    facts = read_facts(b"<html>oops</html>")
    assert (facts.input_tokens, facts.output_tokens, facts.finish_reasons, facts.model) == (
        None,
        None,
        (),
        None,
    )


def test_request_model_and_stream_from_a_raw_body() -> None:
    body = json.dumps(
        {"model": "llama-3-8b", "stream": True, "messages": [{"content": '"model":"x"'}]}
    ).encode()
    assert request_model(body) == ("llama-3-8b", True)
    assert request_model(b'{"messages": []}') == (None, False)
