"""A local fake OpenAI / Anthropic HTTP server for tests (standard library only).

Every request is recorded in ``server.requests`` and answered by the next response
scripted with :meth:`FakeLLMServer.enqueue` (FIFO), else by a successful completion.
"""

from __future__ import annotations

import contextlib
import hashlib
import http
import json
import re
import socket
import struct
import sys
import threading
import time
import uuid
from base64 import b64encode
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

DEFAULT_REPLY = "Hello from the fake model."
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error"}
_ERROR_TYPES |= {404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error"}
_ERROR_TYPES |= {500: "api_error", 503: "overloaded_error", 529: "overloaded_error"}
_Frame = tuple[bytes, str]  # (one encoded SSE event, "pre" | "text" | "post")


@dataclass(frozen=True)
class RecordedRequest:
    """One request as it reached the server.

    Attributes:
        method: HTTP method, e.g. ``"POST"``.
        path: Request path with any query string, e.g. ``"/v1/chat/completions"``.
        headers: Request headers with lower-cased names (``"authorization"``, ...).
        body: Raw request body.
        json: Parsed JSON body, or ``None`` if empty or not JSON.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any


@dataclass(frozen=True)
class ScriptedResponse:
    """A queued behaviour for one request; see :meth:`FakeLLMServer.enqueue`."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    hang_s: float = 0.0
    malformed: bool = False
    stream_error_after: int | None = None
    text: str | None = None
    usage: dict[str, int] | None = None


def _sse(event: str | None, data: Any) -> bytes:
    """Encodes one server-sent event (``event:`` line only if named)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


def _event(kind: str, **fields: Any) -> bytes:
    """Encodes one Anthropic-style event, whose ``type`` repeats the event name."""
    return _sse(kind, {"type": kind, **fields})


def _text_of(value: Any) -> str:
    """Concatenates the text in message content: strings, parts, blocks, messages."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(_text_of(item) for item in value)
    if isinstance(value, dict):
        return _text_of(value.get("text", value.get("content", "")))
    return ""


def _tokens(text: str) -> int:
    """Counts fake tokens: whitespace-separated words, at least one."""
    return max(1, len(text.split()))


def _chunks(text: str) -> list[str]:
    """Splits text into streamed pieces (words with trailing spaces; joined == text)."""
    return re.findall(r"\S+\s*|\s+", text)


def _embedding(text: str, dim: int) -> list[float]:
    """Derives a deterministic, float32-exact vector in [-1, 1) from ``text``."""
    raw = b"".join(hashlib.sha256(f"{i}:{text}".encode()).digest() for i in range(dim // 8 + 1))
    floats = [i / 2**31 - 1.0 for i in struct.unpack(f"<{dim}I", raw[: 4 * dim])]
    return list(struct.unpack(f"<{dim}f", struct.pack(f"<{dim}f", *floats)))


class _HTTPServer(ThreadingHTTPServer):
    """Threading HTTP server that tracks its connections and never prints errors."""

    daemon_threads = True

    def __init__(self, fake: FakeLLMServer) -> None:
        self.fake = fake
        self.connections: dict[socket.socket, threading.Thread] = {}
        self.conn_lock = threading.Condition()  # notified when a connection is forgotten
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serves the connection in a daemon thread that stop() can find and join."""
        args = (request, client_address)
        thread = threading.Thread(target=self.process_request_thread, args=args, daemon=True)
        with self.conn_lock:
            self.connections[request] = thread
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        """Forgets the connection, then closes it."""
        super().shutdown_request(request)
        with self.conn_lock:
            self.connections.pop(request, None)
            self.conn_lock.notify_all()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignores disconnects (OSError); records other exceptions in ``fake.errors``."""
        exc = sys.exc_info()[1]
        if exc is not None and not isinstance(exc, OSError):
            self.fake.errors.append(exc)


class _Handler(BaseHTTPRequestHandler):
    """Serves the OpenAI and Anthropic endpoints."""

    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        """Keeps the access and error log quiet."""

    def do_POST(self) -> None:
        """Records the request and answers it (GET is routed here too, to a 404)."""
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            payload: Any = json.loads(raw) if raw else None
        except ValueError:
            payload = None
        headers = {k.lower(): v for k, v in self.headers.items()}
        script = fake._record(RecordedRequest(self.command, self.path, headers, raw, payload))
        route = self.path.split("?", 1)[0].rstrip("/")
        anthropic = route == "/v1/messages"
        body: dict[str, Any] = payload if isinstance(payload, dict) else {}
        stream = bool(body.get("stream"))
        if script.hang_s > 0 and fake._stop.wait(script.hang_s):
            self.close_connection = True  # server stopping: drop the request
        elif script.status != 200:
            self._send_error(anthropic, script)
        elif script.malformed and stream:
            broken = b'data: {"type": "broken", "index": [\n\n'
            broken = b"event: content_block_delta\n" + broken if anthropic else broken
            self._send_stream([(broken, "text")], script)
        elif script.malformed:
            self._send_json(200, b'{"id": "broken", "choices": [', script.headers)
        elif script.body is not None:
            self._send_json(200, script.body, script.headers)
        elif self.command == "POST" and route == "/v1/chat/completions":
            self._chat(body, script, stream)
        elif self.command == "POST" and route == "/v1/messages":
            self._messages(body, script, stream)
        elif self.command == "POST" and route == "/v1/embeddings":
            self._embeddings(body, script)
        else:
            self._send_error(anthropic, ScriptedResponse(404, script.headers))

    do_GET = do_POST

    def _send_json(self, status: int, data: Any, headers: dict[str, str]) -> None:
        """Sends ``data`` (bytes/str raw, anything else as JSON) with a Content-Length."""
        raw = data.encode() if isinstance(data, str) else data
        raw = raw if isinstance(raw, bytes) else json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.send_header("x-request-id", f"req_{uuid.uuid4().hex[:16]}")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(raw)

    def _send_error(self, anthropic: bool, script: ScriptedResponse) -> None:
        """Sends ``script.body`` or a default error in the API's own error shape."""
        status, body = script.status, script.body
        if body is None:
            kind = _ERROR_TYPES.get(
                status, "api_error" if status >= 500 else "invalid_request_error"
            )
            phrase = http.HTTPStatus(status).phrase if status in set(http.HTTPStatus) else "Error"
            message = f"Fake error {status}: {phrase}"
            if anthropic:
                body = {"type": "error", "error": {"type": kind, "message": message}}
            else:
                kind = "server_error" if status >= 500 else kind
                body = {"error": {"message": message, "type": kind, "param": None, "code": kind}}
        self._send_json(status, body, script.headers)

    def _send_stream(self, frames: list[_Frame], script: ScriptedResponse) -> None:
        """Streams SSE frames chunk-encoded; may stop abruptly after N text frames."""
        fake = self.server.fake
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in script.headers.items():
            self.send_header(name, value)
        self.end_headers()
        abort_after, sent_text = script.stream_error_after, 0
        for frame, kind in frames:
            if abort_after is not None and kind != "pre" and sent_text >= abort_after:
                self.close_connection = True  # no terminating chunk: the client sees a cut
                return
            if kind == "text" and fake.chunk_delay_s > 0 and fake._stop.wait(fake.chunk_delay_s):
                self.close_connection = True
                return
            self.wfile.write(f"{len(frame):X}\r\n".encode() + frame + b"\r\n")
            sent_text += kind == "text"
        self.wfile.write(b"0\r\n\r\n")

    def _chat(self, body: dict[str, Any], script: ScriptedResponse, stream: bool) -> None:
        """Answers ``POST /v1/chat/completions``, as JSON or as chunk SSE."""
        text = self.server.fake.reply_text if script.text is None else script.text
        p, c = _tokens(_text_of(body.get("messages") or [])), _tokens(text)
        usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time())}
        base |= {"model": str(body.get("model") or "fake-model"), "system_fingerprint": None}
        if not stream:
            message = {"role": "assistant", "content": text, "refusal": None}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
            data = {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            self._send_json(200, data, script.headers)
            return
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            data: dict[str, Any] = {**base, "object": "chat.completion.chunk", "choices": [choice]}
            return _sse(None, {**data, "usage": None} if include_usage else data)

        frames: list[_Frame] = [(chunk({"role": "assistant", "content": ""}), "pre")]
        frames += [(chunk({"content": part}), "text") for part in _chunks(text)]
        frames.append((chunk({}, "stop"), "post"))
        if include_usage:
            final = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
            frames.append((_sse(None, final), "post"))
        self._send_stream([*frames, (b"data: [DONE]\n\n", "post")], script)

    def _messages(self, body: dict[str, Any], script: ScriptedResponse, stream: bool) -> None:
        """Answers ``POST /v1/messages``, as JSON or as the Messages SSE event sequence."""
        text = self.server.fake.reply_text if script.text is None else script.text
        prompt = _text_of(body.get("system") or "") + " " + _text_of(body.get("messages") or [])
        c = _tokens(text)
        usage = {"input_tokens": _tokens(prompt), "output_tokens": c, **(script.usage or {})}
        c = usage["output_tokens"]
        message: dict[str, Any] = {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": str(body.get("model") or "fake-model"),
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
        if not stream:
            self._send_json(200, message, script.headers)
            return
        start = {**message, "content": [], "stop_reason": None}
        start["usage"] = {**usage, "output_tokens": 1}
        block = {"type": "text", "text": ""}
        frames: list[_Frame] = [
            (_event("message_start", message=start), "pre"),
            (_event("content_block_start", index=0, content_block=block), "pre"),
            (_event("ping"), "pre"),
        ]
        for part in _chunks(text):
            delta = {"type": "text_delta", "text": part}
            frames.append((_event("content_block_delta", index=0, delta=delta), "text"))
        end = {"stop_reason": "end_turn", "stop_sequence": None}
        frames += [
            (_event("content_block_stop", index=0), "post"),
            (_event("message_delta", delta=end, usage={"output_tokens": c}), "post"),
            (_event("message_stop"), "post"),
        ]
        self._send_stream(frames, script)

    def _embeddings(self, body: dict[str, Any], script: ScriptedResponse) -> None:
        """Answers ``POST /v1/embeddings`` (float lists, or base64 float32 on request)."""
        items = body.get("input", "")
        items = items if isinstance(items, list) else [items]
        if items and all(isinstance(i, int) for i in items):
            items = [items]  # one pre-tokenized input
        texts = [i if isinstance(i, str) else json.dumps(i) for i in items]
        dim = int(body.get("dimensions") or self.server.fake.embedding_dim)
        as_b64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(texts):
            vector = _embedding(text, dim)
            value: Any = b64encode(struct.pack(f"<{dim}f", *vector)).decode() if as_b64 else vector
            data.append({"object": "embedding", "index": index, "embedding": value})
        tokens = sum(_tokens(t) for t in texts)
        model = str(body.get("model") or "fake-embedding")
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        self._send_json(
            200, {"object": "list", "data": data, "model": model, "usage": usage}, script.headers
        )


class FakeLLMServer:
    """Fake OpenAI + Anthropic HTTP API on ``127.0.0.1``, bound to an ephemeral port.

    The port is bound on construction; serving runs between start() and stop(), or
    inside ``with FakeLLMServer() as server:``. A server is single-use.

    Attributes:
        reply_text: Text of every successful completion; may be changed at any time.
        chunk_delay_s: Sleep before each streamed text chunk; may be changed at any time.
        embedding_dim: Embedding length when a request gives no ``dimensions``.
        port: The bound port.
        base_url: ``http://127.0.0.1:PORT``.
        openai_base_url: ``base_url + "/v1"``, for ``openai.OpenAI(base_url=...)``.
        anthropic_base_url: ``base_url``, for ``anthropic.Anthropic(base_url=...)``.
        errors: Unexpected (non-disconnect) exceptions raised in request handlers.
    """

    def __init__(
        self, *, reply_text: str = DEFAULT_REPLY, chunk_delay_s: float = 0.0, embedding_dim: int = 8
    ) -> None:
        """Binds the port without serving yet.

        Args:
            reply_text: Text of every successful completion.
            chunk_delay_s: Delay before each streamed text chunk, in seconds.
            embedding_dim: Default embedding vector length.
        """
        self.reply_text = reply_text
        self.chunk_delay_s = chunk_delay_s
        self.embedding_dim = embedding_dim
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._queue: deque[ScriptedResponse] = deque()
        self._stop = threading.Event()
        self._httpd = _HTTPServer(self)
        self._thread: threading.Thread | None = None
        self.port = int(self._httpd.server_address[1])
        self.base_url = self.anthropic_base_url = f"http://127.0.0.1:{self.port}"
        self.openai_base_url = f"{self.base_url}/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received since the last reset(), oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def pending(self) -> int:
        """How many scripted responses are still queued."""
        with self._lock:
            return len(self._queue)

    def enqueue(
        self,
        status: int = 200,
        *,
        headers: dict[str, str] | None = None,
        body: Any = None,
        hang_s: float = 0.0,
        malformed: bool = False,
        stream_error_after: int | None = None,
        text: str | None = None,
        usage: dict[str, int] | None = None,
        times: int = 1,
    ) -> None:
        """Queues a scripted response for the next request(s), first in first out.

        Args:
            status: HTTP status; non-200 sends an error in the API's error JSON shape.
            headers: Extra response headers, e.g. ``{"Retry-After": "0"}``.
            body: Body replacing the default one (str/bytes sent raw, else as JSON).
            hang_s: Wait this long before answering (stop() cuts the wait short).
            malformed: Answer 200 with invalid JSON (an invalid SSE event if streaming).
            stream_error_after: Stream this many text chunks, then cut the connection.
            text: Reply text for this response instead of ``reply_text``.
            usage: Anthropic usage fields to report (e.g. ``cache_read_input_tokens``).
            times: Queue the same script this many times.
        """
        script = ScriptedResponse(
            status, dict(headers or {}), body, hang_s, malformed, stream_error_after, text, usage
        )
        with self._lock:
            self._queue.extend([script] * times)

    def reset(self) -> None:
        """Clears the scripted queue, the recorded requests and the errors."""
        with self._lock:
            self._queue.clear()
            self._requests.clear()
            self.errors.clear()

    def start(self) -> Self:
        """Serves in a daemon thread.

        Returns:
            This server.

        Raises:
            RuntimeError: If the server was already started (servers are single-use).
        """
        if self._thread is not None or self._stop.is_set():
            raise RuntimeError("FakeLLMServer is single-use and already started")
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Waits until every connection has been served and closed; ``False`` on timeout."""
        httpd = self._httpd
        with httpd.conn_lock:
            return httpd.conn_lock.wait_for(lambda: not httpd.connections, timeout)

    def stop(self) -> None:
        """Stops serving, cuts open connections, joins every thread, closes the port."""
        if self._stop.is_set():
            return
        self._stop.set()  # wakes handlers that hang or delay chunks
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        with self._httpd.conn_lock:
            connections = list(self._httpd.connections.items())
        for sock, _ in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for _, thread in connections:
            thread.join(timeout=5)
        self._httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _record(self, request: RecordedRequest) -> ScriptedResponse:
        """Records a request and pops the script that answers it."""
        with self._lock:
            self._requests.append(request)
            return self._queue.popleft() if self._queue else ScriptedResponse()
