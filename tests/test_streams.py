"""How each LLM API's stream ends, judged on its last bytes (`proxy.apis.streams`)."""

from __future__ import annotations

import json

import pytest

from proxy.apis.streams import Api, StreamEnd, api_of, stream_end


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/v1/chat/completions", Api.OPENAI),
        ("/openai/deployments/d/chat/completions", Api.OPENAI),
        ("/v1/completions", Api.OPENAI),
        ("/v1/responses", Api.RESPONSES),
        ("/v1/messages", Api.ANTHROPIC),
        ("/completion", Api.LLAMACPP),
        ("/infill", Api.LLAMACPP),
        ("/generate_stream", Api.TGI),
        ("/api/chat", Api.OLLAMA),
        ("/api/generate/", Api.OLLAMA),
        ("/v1/models", Api.UNKNOWN),
        ("/", Api.UNKNOWN),
    ],
)
def test_the_api_of_a_path(path: str, api: Api) -> None:
    assert api_of(path) is api


def sse(event: str | None, data: object) -> bytes:
    line = b"data: " + json.dumps(data).encode() + b"\n\n"
    return b"event: %s\n%s" % (event.encode(), line) if event else line


TOKEN = sse(None, {"choices": [{"delta": {"content": "hi"}, "finish_reason": None}]})
# A model that writes an API's end marker as text never ends its stream: JSON escapes it.
SNEAKY = sse(None, {"content": '"type":"message_stop" "done":true "stop":true [DON'})

CASES = [
    (Api.OPENAI, TOKEN + b"data: [DONE]\n\n", StreamEnd.COMPLETE),
    (Api.OPENAI, TOKEN + sse(None, {"choices": [{"finish_reason": "stop"}]}), StreamEnd.COMPLETE),
    (Api.OPENAI, TOKEN + sse(None, {"error": {"message": "x"}}), StreamEnd.FAILED),
    (Api.OPENAI, sse(None, {"error": {}}) + b"data: [DONE]\n\n", StreamEnd.FAILED),
    (Api.OPENAI, TOKEN + TOKEN, StreamEnd.CUT),
    (Api.OPENAI, b"", StreamEnd.CUT),
    (Api.RESPONSES, sse("response.completed", {"type": "response.completed"}), StreamEnd.COMPLETE),
    (
        Api.RESPONSES,
        sse("response.incomplete", {"type": "response.incomplete"}),
        StreamEnd.COMPLETE,
    ),
    (Api.RESPONSES, sse("response.failed", {"type": "response.failed"}), StreamEnd.FAILED),
    (Api.RESPONSES, sse("error", {"type": "error", "message": "x"}), StreamEnd.FAILED),
    (Api.RESPONSES, sse("response.output_text.delta", {"delta": "x"}), StreamEnd.CUT),
    (Api.ANTHROPIC, sse("message_stop", {"type": "message_stop"}), StreamEnd.COMPLETE),
    (Api.ANTHROPIC, sse("error", {"type": "error", "error": {}}), StreamEnd.FAILED),
    (Api.ANTHROPIC, SNEAKY, StreamEnd.CUT),
    (Api.LLAMACPP, sse(None, {"content": "", "stop": True}), StreamEnd.COMPLETE),
    (Api.LLAMACPP, sse(None, {"content": "x", "stop": False}), StreamEnd.CUT),
    (Api.LLAMACPP, sse(None, {"error": {"code": 500}}), StreamEnd.FAILED),
    (Api.LLAMACPP, SNEAKY, StreamEnd.CUT),
    (Api.TGI, b'data:{"details":{"finish_reason":"length"}}\n\n', StreamEnd.COMPLETE),
    (Api.TGI, b'data:{"token":{"text":"x"},"details":null}\n\n', StreamEnd.CUT),
    (Api.TGI, b'data:{"error":"x","error_type":"generation"}\n\n', StreamEnd.FAILED),
    (Api.OLLAMA, b'{"done":false}\n{"done": true}\n', StreamEnd.COMPLETE),
    (Api.OLLAMA, b'{"done":false}\n', StreamEnd.CUT),
    (Api.OLLAMA, b'{"error":"x"}\n', StreamEnd.FAILED),
    (Api.OLLAMA, SNEAKY, StreamEnd.CUT),
    (Api.UNKNOWN, b"", StreamEnd.COMPLETE),
    (Api.UNKNOWN, TOKEN, StreamEnd.COMPLETE),
]


@pytest.mark.parametrize(("api", "tail", "end"), CASES)
def test_how_a_stream_ended(api: Api, tail: bytes, end: StreamEnd) -> None:
    assert stream_end(api, tail) is end
