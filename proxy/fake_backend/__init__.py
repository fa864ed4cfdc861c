"""A fake model server speaking OpenAI's API or another LLM API's, for demos, tests,
benchmarks and checking a proxy.

`canary-proxy fake-backend` runs it (`run_forever`); tests start it in-process with
`FakeBackend(FakeBackendOptions(port=0)).start()`, which returns the bound port.

Endpoints:
    POST /v1/chat/completions   chat completion; `"stream": true` streams SSE, one event
                                per write: role, one per token ("tok0 ", "tok1 ", ...),
                                finish_reason, usage (if `stream_options.include_usage`),
                                `data: [DONE]`
    POST /v1/completions        the same in the legacy text-completion shape
    GET  /v1/models             the one model (`--model`)
    GET  /v1/realtime           a WebSocket (any `--api`), shaped as OpenAI's Realtime API:
                                `session.created` on opening, then one `response.done`
                                per text message, its text as the output; binary
                                messages are echoed. The text `fake.close` makes the
                                server close the session, `fake.reset` reset the TCP
                                connection. The hooks x-fake-status, x-fake-reset and
                                x-fake-latency (and x-fake-only) apply before the 101.
    anything else               404 in OpenAI's error shape; a bad JSON body is a 400
With `--api` (default openai) it speaks another API instead, streamed (one event per
token) or not, each ending as its server ends it (`proxy.fake_backend.apis`):
    --api responses   POST /v1/responses (OpenAI Responses), GET /v1/models
    --api anthropic   POST /v1/messages (Anthropic Messages; errors in its shape)
    --api llamacpp    POST /completion (llama.cpp native), and the OpenAI endpoints
    --api tgi         POST /generate, POST /generate_stream, POST / (TGI; `/` and
                      `/generate` stream with `"stream": true`), POST /v1/chat/completions
    --api ollama      POST /api/chat, POST /api/generate (NDJSON; streamed unless
                      `"stream": false`)
Tokens: `max_completion_tokens` or `max_tokens`, else `--tokens` (16); finish_reason is
"length" when that limit is reached, else "stop". Usage counts the prompt's
whitespace-separated words. Every response carries `x-fake-model: <model>`. With
probability `--error-rate` (drawn once per completion request from
`random.Random(--seed)`) a completion answers 500.

Per-request hooks (request headers; an invalid value answers 400 `bad_fake_hook`):
    x-fake-status: 503          answer that 4xx/5xx status with an OpenAI error body
    x-fake-latency: 1.0         seconds before the response head (overrides --latency)
    x-fake-ttft: 2.5            seconds before the first token (overrides --ttft)
    x-fake-tokens-per-s: 5      token rate (overrides --tokens-per-s; 0 = no delay)
    x-fake-tokens: N            generate N tokens (still capped by the request's max_tokens)
    x-fake-hang: 1              never answer; a client disconnect is counted as cancelled
    x-fake-reset: before-headers   close the connection without answering
    x-fake-reset: after-headers    send a 200 chunked head, then close without a body chunk
    x-fake-cut-after: N         stream: N token events, then close without the terminating
                                chunk or [DONE]; non-streamed: a Content-Length of twice
                                the body, the body, then close
    x-fake-overrun: 1           non-streamed: a Content-Length of half the body, then the whole
                                body in the same write, on a connection kept open (the rest
                                would be read as the next answer by a client that reused the
                                connection), then an empty answer of aiohttp's
    x-fake-no-done: 1           stream: a clean HTTP end, but no finish_reason event and
                                no [DONE] (a truncated stream that looks fine to HTTP);
                                with --api, no end event of that API
    x-fake-stream-error: 1      stream: after the tokens, the API's failure event (an
                                OpenAI `data: {"error": ...}`, Anthropic `event: error`,
                                `response.failed`, ...), then a clean HTTP end
    x-fake-garbage: 1           write bytes that are not HTTP, then close
    x-fake-json-garbage: 1      200 application/json whose body is not JSON
    x-fake-only: m1[,m2]        apply the hooks above only on a server whose --model is
                                listed (to fail one of two backends behind a proxy)
Fault hooks work on any path; when several are sent the first in this order wins:
hang, reset, garbage, status, json-garbage. Timing: latency, then (streams: after the
head) ttft, then 1/tokens-per-s between tokens; a non-streamed answer waits all of it
before its head.

Introspection (never counted nor recorded):
    GET    /fake/requests   the last 200 requests, oldest first: method, path (with query),
                            headers ([name, value] pairs as received), body (text, first
                            64 KiB), received_at (unix seconds)
    DELETE /fake/requests   forget them
    GET    /fake/stats      {requests, completed, aborted, cancelled, in_flight, errors}:
                            completed = fully written, aborted = broken on purpose by a
                            hook, cancelled = the client left first; errors = ended with
                            an error status or a broken response
    GET    /fake/traffic    {stream_bytes_sent}: bytes of token events handed to the
                            socket so far (it stops growing when a reader stops reading)

Log (stderr, `--log-level`, default info): one line per client that sends bad HTTP or
leaves before its answer is whole; never a traceback for those.

Modules: `options` (flags and settings), `plan` (pure: request → what to answer),
`wire` (pure: pre-encoded bodies and SSE events), `journal` (recorded requests,
counters), `server` (the aiohttp low-level server, the only I/O).
"""

from typing import TYPE_CHECKING, Any

from proxy.fake_backend.options import FakeBackendOptions, add_arguments, options_from_args

if TYPE_CHECKING:
    from proxy.fake_backend.server import FakeBackend, run_forever

__all__ = [
    "FakeBackend",
    "FakeBackendOptions",
    "add_arguments",
    "options_from_args",
    "run_forever",
]


def __getattr__(name: str) -> Any:
    # The server (and aiohttp under it) loads only when used: the command line's
    # flags and every other command start without it.
    if name in ("FakeBackend", "run_forever"):
        from proxy.fake_backend import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
