"""RequestMiddleware: root span, request id, the request line, Server-Timing, budgets, streams."""

from __future__ import annotations

import asyncio
import inspect
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Host, Mount, Route, Router

import rag_instrument as ri
from rag_instrument import _breakdown, _settings
from rag_instrument.testing import Capture, capture
from rag_instrument.web import RequestMiddleware, route_template, server_timing
from support.gc_cycles import library_garbage

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
HEX32 = re.compile(r"[0-9a-f]{32}")
LINE_KEYS = {"timestamp", "level", "event", "logger", "trace_id", "span_id", "context"}


def make_fastapi() -> FastAPI:
    """A FastAPI app without FastAPI's own (newer versions') native tracing."""
    if "telemetry" in inspect.signature(FastAPI).parameters:
        return FastAPI(telemetry={"tracing": False, "metrics": False})  # type: ignore[call-arg]
    return FastAPI()


async def get(app: Any, path: str, **kwargs: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return await client.request(kwargs.pop("method", "GET"), path, **kwargs)


class Driver:
    """Drive an ASGI app by hand: see every message, disconnect on cue."""

    def __init__(self, disconnect_after_chunks: int | None = None) -> None:
        self.messages: list[dict[str, Any]] = []
        self.disconnect_after_chunks = disconnect_after_chunks
        self.on_send: Callable[[dict[str, Any]], None] | None = None

    async def __call__(
        self,
        app: Any,
        path: str = "/",
        method: str = "GET",
        headers: Any = (),
        spec: str = "2.3",
        scheme: str = "http",
        server: Any = ("testserver", 80),
    ) -> list[dict[str, Any]]:
        gone = asyncio.Event()
        delivered = False
        chunks = 0
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": spec},
            "http_version": "1.1",
            "method": method,
            "scheme": scheme,
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(bytes(k), bytes(v)) for k, v in headers],
            "client": ("127.0.0.1", 5000),
            "server": server,
        }

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal chunks
            self.messages.append(message)
            if self.on_send is not None:
                self.on_send(message)
            if message["type"] == "http.response.pathsend":
                gone.set()
            if message["type"] == "http.response.body":
                chunks += 1
                if not message.get("more_body", False):
                    gone.set()  # as servers do once the response is complete
                elif (
                    self.disconnect_after_chunks is not None
                    and chunks >= self.disconnect_after_chunks
                ):
                    gone.set()

        await app(scope, receive, send)
        return self.messages

    def header(self, name: bytes) -> bytes | None:
        start = next(m for m in self.messages if m["type"] == "http.response.start")
        for key, value in start["headers"]:
            if key.lower() == name:
                return bytes(value)
        return None


def request_lines(cap: Capture) -> list[dict[str, Any]]:
    return cap.find_logs("request completed")


def server_span(cap: Capture) -> Any:
    found = [s for s in cap.spans if s.attributes and "http.request.method" in s.attributes]
    assert len(found) == 1, [s.name for s in cap.spans]
    return found[0]


# --- the root span and the request line -------------------------------------------------------


def build_items_app() -> FastAPI:
    app = make_fastapi()
    log = ri.get_logger("app")

    @app.get("/api/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        with ri.stage("retrieval"):
            log.info("looking up", item=item_id)
        return {"id": item_id}

    app.add_middleware(RequestMiddleware)
    return app


@pytest.mark.asyncio
async def test_root_span_is_named_after_the_route_template_not_the_path() -> None:
    app = build_items_app()
    with capture() as cap:
        response = await get(app, "/api/items/12345?x=1", headers={"user-agent": "ua/1"})
    assert response.status_code == 200
    span = server_span(cap)
    assert span.name == "GET /api/items/{item_id}"
    assert span.kind is SpanKind.SERVER
    assert span.parent is None
    attrs = dict(span.attributes or {})
    assert attrs["http.route"] == "/api/items/{item_id}"
    assert attrs["http.request.method"] == "GET"
    assert attrs["http.response.status_code"] == 200
    assert attrs["url.path"] == "/api/items/12345"
    assert attrs["url.query"] == "x=1"
    assert attrs["url.scheme"] == "http"
    assert attrs["server.address"] == "testserver"
    assert attrs["server.port"] == 80  # no port in the Host header: the scheme's
    assert attrs["user_agent.original"] == "ua/1"
    assert attrs["client.address"] == "127.0.0.1"
    assert span.status.status_code is StatusCode.UNSET
    assert "12345" not in span.name
    # The stage inside is a child of the request span.
    stage = cap.span("retrieval")
    assert stage.parent is not None
    assert stage.parent.span_id == span.context.span_id


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("scheme", "headers", "server", "expected"),
    [
        ("https", [(b"host", b"api.example.com")], ("10.0.0.1", 8443), ("api.example.com", 443)),
        ("http", [(b"host", b"api.example.com:8080")], ("10.0.0.1", 80), ("api.example.com", 8080)),
        ("http", [(b"host", b"[::1]")], None, ("[::1]", 80)),
        ("http", [], ("10.0.0.1", 8000), ("10.0.0.1", 8000)),  # HTTP/1.0: no Host header
        ("http", [], None, (None, None)),
    ],
)
async def test_server_address_and_port(
    scheme: str, headers: list[Any], server: Any, expected: tuple[Any, Any]
) -> None:
    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = RequestMiddleware(Starlette(routes=[Route("/x", ok)]))
    with capture() as cap:
        await Driver()(app, "/x", headers=headers, scheme=scheme, server=server)
    attrs = server_span(cap).attributes
    assert (attrs.get("server.address"), attrs.get("server.port")) == expected


@pytest.mark.asyncio
async def test_request_completed_line_has_exactly_the_analyze_shape() -> None:
    app = build_items_app()
    with capture() as cap:
        response = await get(app, "/api/items/7")
    (line,) = request_lines(cap)
    assert set(line) == LINE_KEYS | {"method", "route", "status", "execution_time_ms"}
    assert line["method"] == "GET"
    assert line["route"] == "/api/items/{item_id}"
    assert line["status"] == 200
    assert isinstance(line["execution_time_ms"], float)
    assert line["execution_time_ms"] > 0
    assert line["level"] == "info"
    request_id = response.headers["x-request-id"]
    assert HEX32.fullmatch(request_id)
    assert line["context"] == {"request_id": request_id}
    span = server_span(cap)
    assert line["trace_id"] == format(span.context.trace_id, "032x")
    assert line["span_id"] == format(span.context.span_id, "016x")


@pytest.mark.asyncio
async def test_every_line_of_the_request_carries_the_request_id() -> None:
    app = build_items_app()
    with capture() as cap:
        response = await get(app, "/api/items/7", headers={"X-Request-ID": "req-42"})
    assert response.headers["x-request-id"] == "req-42"
    lines = [line for line in cap.logs if line["logger"] != "httpx"]
    assert {line["event"] for line in lines} == {
        "looking up",
        "retrieval completed",
        "request completed",
    }
    assert all(line["context"]["request_id"] == "req-42" for line in lines)
    assert cap.span("retrieval").attributes["request_id"] == "req-42"
    # ... and nothing stays bound once the request is over.
    assert _bound_now() == {}


def _bound_now() -> dict[str, Any]:
    from rag_instrument._context import bound

    return bound().log


@pytest.mark.asyncio
async def test_incoming_traceparent_is_continued() -> None:
    app = build_items_app()
    with capture() as cap:
        await get(app, "/api/items/1", headers={"traceparent": TRACEPARENT})
    span = server_span(cap)
    assert format(span.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert span.parent is not None
    assert span.parent.is_remote
    assert format(span.parent.span_id, "016x") == "b7ad6b7169203331"
    assert cap.span("retrieval").context.trace_id == span.context.trace_id


@pytest.mark.parametrize(
    "headers",
    [
        {"traceparent": "00-zzzz-b7ad6b7169203331-01"},
        {"traceparent": "ff-" + "0" * 32 + "-" + "0" * 16 + "-01"},
        {"traceparent": "x" * 100_000},
        {"x-request-id": "r" * 10_000},
        {"x-request-id": "id with spaces"},
        {"x-request-id": '"><script>'},
        {"x-request-id": '\n{"level":"info"}'},
    ],
    ids=["bad-hex", "bad-version", "huge-traceparent", "huge-id", "spaces", "markup", "newline"],
)
@pytest.mark.asyncio
async def test_malformed_headers_never_fail_the_request(headers: dict[str, str]) -> None:
    app = build_items_app()
    with capture() as cap:
        response = await get(app, "/api/items/1", headers=headers)
    assert response.status_code == 200
    assert response.json() == {"id": 1}
    (line,) = request_lines(cap)
    request_id = response.headers["x-request-id"]
    assert HEX32.fullmatch(request_id)
    assert line["context"]["request_id"] == request_id
    span = server_span(cap)
    assert span.parent is None  # an invalid traceparent starts a new trace
    if "x-request-id" in headers:
        assert span.attributes["rag.request_id.replaced"] is True


@pytest.mark.asyncio
async def test_non_ascii_request_id_bytes_are_replaced() -> None:
    app = ri.RequestMiddleware(Starlette(routes=[Route("/", lambda r: PlainTextResponse("ok"))]))
    driver = Driver()
    with capture() as cap:
        await driver(app, headers=[(b"x-request-id", "caf\u00e9-\u2603".encode())])
    assert driver.messages[0]["status"] == 200
    echoed = driver.header(b"x-request-id")
    assert echoed is not None
    assert HEX32.fullmatch(echoed.decode())
    assert request_lines(cap)[0]["context"]["request_id"] == echoed.decode()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    request_id=st.binary(max_size=300),
    traceparent=st.binary(max_size=120),
    method=st.sampled_from([b"GET", b"get", b"BREW", b"P\xc3\xb6ST"]),
)
def test_any_header_bytes_are_served_and_any_echoed_id_is_safe(
    request_id: bytes, traceparent: bytes, method: bytes
) -> None:
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = ri.RequestMiddleware(
        Starlette(routes=[Route("/", endpoint, methods=["GET", "BREW", "POST"])])
    )
    driver = Driver()
    with capture() as cap:
        asyncio.run(
            driver(
                app,
                method=method.decode("latin-1"),
                headers=[(b"x-request-id", request_id), (b"traceparent", traceparent)],
            )
        )
    assert driver.messages[0]["type"] == "http.response.start"
    echoed = driver.header(b"x-request-id")
    assert echoed is not None
    assert re.fullmatch(rb"[A-Za-z0-9._:@+=/~-]{1,128}", echoed)
    assert echoed == request_id or HEX32.fullmatch(echoed.decode())
    (line,) = request_lines(cap)
    assert line["context"]["request_id"] == echoed.decode()
    assert line["method"] in ("GET", "_OTHER")


# --- Server-Timing ---------------------------------------------------------------------------


def build_timed_app(**options: Any) -> Any:
    async def endpoint(request: Request) -> Response:
        with ri.stage("retrieval"):
            _breakdown.record("db", 4.0)
            _breakdown.record("vector", 6.5)
        with ri.stage("retrieval"):
            _breakdown.record("db", 1.0)
            _breakdown.record_cache(hit=True)
        with ri.stage("generation"):
            _breakdown.record("llm", 20.25)
        return PlainTextResponse("ok")

    return ri.RequestMiddleware(Starlette(routes=[Route("/s", endpoint)]), **options)


@pytest.mark.asyncio
async def test_server_timing_lists_stages_and_breakdown_totals() -> None:
    with capture() as cap:
        response = await get(build_timed_app(), "/s")
    header = response.headers["server-timing"]
    entries = {part.split(";")[0]: part for part in (p.strip() for p in header.split(","))}
    assert list(entries) == ["retrieval", "generation", "db", "llm", "vector", "cache", "total"]
    assert 'desc="2 runs"' in entries["retrieval"]
    assert entries["db"] == 'db;dur=5.0;desc="2 calls"'
    assert entries["vector"] == 'vector;dur=6.5;desc="1 call"'
    assert entries["llm"] == 'llm;dur=20.2;desc="1 call"' or "llm;dur=20.3" in entries["llm"]
    assert entries["cache"] == 'cache;desc="hits=1 misses=0"'
    # The stage durations are the ones logged for the stages.
    stage_ms = sum(line["execution_time_ms"] for line in cap.find_logs("retrieval completed"))
    logged = float(re.search(r"dur=([0-9.]+)", entries["retrieval"]).group(1))  # type: ignore[union-attr]
    assert logged == pytest.approx(stage_ms, abs=0.1)
    # The request line carries the whole request's breakdown.
    (line,) = request_lines(cap)
    assert line["breakdown"]["db"] == {"count": 2, "ms": 5.0}
    assert line["breakdown"]["cache"] == {"hits": 1, "misses": 0}


@pytest.mark.asyncio
async def test_server_timing_names_each_thing_once() -> None:
    # An EMBEDDING stage doing embedding calls listed "embedding" twice: the stage and the
    # breakdown's total; a stage called "total" clashed with the request's total.
    async def endpoint(request: Request) -> Response:
        with ri.stage(ri.PipelineStage.EMBEDDING):
            _breakdown.record("embedding", 3.0)
        with ri.stage("total"):
            pass
        return PlainTextResponse("ok")

    async def plain(request: Request) -> Response:
        with ri.stage(ri.PipelineStage.EMBEDDING):  # no embedding total: no clash
            pass
        return PlainTextResponse("ok")

    app = ri.RequestMiddleware(
        Starlette(routes=[Route("/e", endpoint), Route("/p", plain)])
    )
    with capture():
        response = await get(app, "/e")
        alone = await get(app, "/p")
    names = [part.strip().split(";")[0] for part in response.headers["server-timing"].split(",")]
    assert names == ["embedding-stage", "total-stage", "embedding", "total"]
    names = [part.strip().split(";")[0] for part in alone.headers["server-timing"].split(",")]
    assert names == ["embedding", "total"]


@pytest.mark.asyncio
async def test_server_timing_can_be_turned_off() -> None:
    with capture():
        response = await get(build_timed_app(server_timing=False), "/s")
    assert "server-timing" not in response.headers
    assert "x-request-id" in response.headers


def test_server_timing_names_are_http_tokens() -> None:
    timings = _breakdown.StageTimings()
    timings.add('my stage,"x"', 1.0)
    value = server_timing(timings, None, 2.0)
    assert value == "my_stage__x_;dur=1.0, total;dur=2.0"


def test_stage_timings_are_bounded() -> None:
    timings = _breakdown.StageTimings()
    for n in range(100):
        timings.add(f"stage{n}", 1.0)
    assert len(timings.by_name) == 32


# --- budgets ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_route_budget_logs_the_budget_exceeded_line() -> None:
    async def search(request: Request) -> Response:
        with ri.stage("retrieval"):
            _breakdown.record("vector", 3.0)
        return JSONResponse({})

    app = ri.RequestMiddleware(Starlette(routes=[Route("/api/search", search, methods=["POST"])]))
    with capture(budgets={"POST /api/search": 0.0001, "retrieval": 10_000}) as cap:
        await get(app, "/api/search", method="POST")
        await get(app, "/api/search", method="GET")  # 405: another route key, no budget
    (warning,) = cap.find_logs("budget exceeded")
    assert warning["level"] == "warning"
    assert warning["route"] == "POST /api/search"
    assert warning["budget_ms"] == 0.0001
    assert warning["execution_time_ms"] > 0.0001
    assert warning["largest"] == {"kind": "vector", "count": 1, "ms": 3.0}
    assert "pipeline_stage" not in warning["context"]
    spans = [s for s in cap.spans if s.name == "POST /api/search"]
    assert spans[0].attributes["rag.budget.exceeded"] is True
    assert spans[0].attributes["rag.budget.ms"] == 0.0001


@pytest.mark.asyncio
async def test_route_budget_key_method_is_case_insensitive() -> None:
    app = ri.RequestMiddleware(Starlette(routes=[Route("/a", lambda r: PlainTextResponse(""))]))
    with capture(budgets={"get /a": 0.0001}) as cap:
        await get(app, "/a")
    assert cap.find_logs("budget exceeded", route="GET /a")


@pytest.mark.asyncio
async def test_route_within_budget_logs_nothing() -> None:
    app = ri.RequestMiddleware(Starlette(routes=[Route("/a", lambda r: PlainTextResponse(""))]))
    with capture(budgets={"GET /a": 60_000}) as cap:
        await get(app, "/a")
    assert not cap.find_logs("budget exceeded")
    assert "rag.budget.exceeded" not in server_span(cap).attributes


def test_route_budgets_are_accepted_by_configure_and_the_environment() -> None:
    settings = _settings.build_settings(
        env={"RAG_INSTRUMENT_BUDGETS": "POST /api/search=2000,retrieval=1500"}
    )
    assert dict(settings.budgets) == {"POST /api/search": 2000.0, "retrieval": 1500.0}
    with pytest.raises(ValueError, match="budgets"):
        ri.configure(budgets={"POST /api/search": -1})


# --- paths left out --------------------------------------------------------------------------


def build_paths_app(**options: Any) -> Any:
    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def boom(request: Request) -> Response:
        return PlainTextResponse("down", status_code=503)

    routes = [Route("/health", ok), Route("/health/deep", boom), Route("/api", ok)]
    routes.append(Route("/static/app.js", ok))
    return ri.RequestMiddleware(Starlette(routes=routes), **options)


@pytest.mark.asyncio
async def test_quiet_paths_are_traced_but_not_logged_unless_they_fail() -> None:
    app = build_paths_app(quiet_paths=["/health*"])
    with capture() as cap:
        await get(app, "/health")
        await get(app, "/health/deep")
        await get(app, "/api")
    assert sorted(s.name for s in cap.spans) == ["GET /api", "GET /health", "GET /health/deep"]
    assert [(line["route"], line["status"]) for line in request_lines(cap)] == [
        ("/health/deep", 503),
        ("/api", 200),
    ]


@pytest.mark.asyncio
async def test_excluded_paths_are_neither_traced_nor_logged() -> None:
    app = build_paths_app(exclude_paths=["/health", "/static/*"])
    with capture() as cap:
        health = await get(app, "/health")
        await get(app, "/static/app.js")
        await get(app, "/api")
    assert health.status_code == 200
    assert "x-request-id" not in health.headers
    assert [s.name for s in cap.spans] == ["GET /api"]
    assert [line["route"] for line in request_lines(cap)] == ["/api"]


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"exclude_paths": ["health"]}, ValueError),
        ({"quiet_paths": [None]}, ValueError),
        ({"exclude_paths": "health"}, ValueError),
        ({"quiet_paths": 42}, ValueError),
        ({"exclude_paths": b"/health"}, ValueError),
        ({"server_timing": "yes"}, ValueError),
        ({"request_id_header": "x request id"}, ValueError),
    ],
)
def test_bad_options_raise_at_construction(options: dict[str, Any], error: type) -> None:
    with pytest.raises(error, match="RequestMiddleware"):
        RequestMiddleware(lambda s, r, se: None, **options)  # type: ignore[arg-type,return-value]


@pytest.mark.asyncio
async def test_paths_given_as_one_string_are_a_comma_separated_list() -> None:
    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/health", ok), Route("/metrics", ok), Route("/api", ok)])
    app = RequestMiddleware(inner, exclude_paths="/health, /metrics")
    with capture() as cap:
        for path in ("/health", "/metrics", "/api"):
            assert (await get(app, path)).status_code == 200
    assert [s.name for s in cap.spans] == ["GET /api"]


@pytest.mark.asyncio
async def test_no_paths_given_as_none_is_none() -> None:
    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/health", ok)])
    app = RequestMiddleware(inner, exclude_paths=None, quiet_paths=None)
    with capture() as cap:
        assert (await get(app, "/health")).status_code == 200
    assert [line["route"] for line in request_lines(cap)] == ["/health"]


# --- routes ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_unmatched_path_names_only_the_method() -> None:
    app = build_items_app()
    with capture() as cap:
        response = await get(app, "/no/such/thing/123")
    assert response.status_code == 404
    span = server_span(cap)
    assert span.name == "GET"
    assert "http.route" not in span.attributes
    (line,) = request_lines(cap)
    assert line["route"] is None
    assert line["status"] == 404
    assert line["level"] == "info"


@pytest.mark.asyncio
async def test_mounted_routes_include_the_mount_prefix() -> None:
    inner = make_fastapi()

    @inner.get("/docs/{doc_id}")
    async def doc(doc_id: str) -> dict[str, str]:
        return {"id": doc_id}

    async def files(scope: Any, receive: Any, send: Any) -> None:
        await PlainTextResponse("file")(scope, receive, send)

    outer = Starlette(routes=[Mount("/v1", app=inner), Mount("/static", app=files)])
    app = ri.RequestMiddleware(outer)
    with capture() as cap:
        assert (await get(app, "/v1/docs/abc")).json() == {"id": "abc"}
        assert (await get(app, "/static/css/x.css")).text == "file"
    assert [line["route"] for line in request_lines(cap)] == [
        "/v1/docs/{doc_id}",
        "/static/{path}",
    ]


@pytest.mark.asyncio
async def test_path_parameters_of_mounts_stay_templates() -> None:
    async def doc(request: Request) -> Response:
        return PlainTextResponse(",".join(request.path_params))

    async def files(scope: Any, receive: Any, send: Any) -> None:
        await PlainTextResponse("file")(scope, receive, send)

    api = make_fastapi()

    @api.get("/items/{item_id}")
    async def item(item_id: str) -> dict[str, str]:
        return {"id": item_id}

    outer = Starlette(
        routes=[
            Mount("/tenants/{tenant}", routes=[Route("/docs/{doc_id}", doc)]),
            Mount("/a", routes=[Mount("/b/{org}", routes=[Route("/c/{cid}", doc)])]),
            Mount("/{tenant}/static", app=files),
            Mount("/{region}/api", app=api),
        ]
    )
    app = ri.RequestMiddleware(outer)
    with capture(budgets={"GET /tenants/{tenant}/docs/{doc_id}": 0.001}) as cap:
        for path in ("/tenants/acme/docs/42", "/tenants/docs/docs/docs", "/a/b/acme/c/7"):
            assert (await get(app, path)).status_code == 200
        assert (await get(app, "/acme/static/x.css")).text == "file"
        assert (await get(app, "/eu/api/items/9")).json() == {"id": "9"}
    # The ids (a tenant, an organisation, a region) never reach the route: one route for
    # every tenant, so budgets and analyze --by route group them.
    assert [line["route"] for line in request_lines(cap)] == [
        "/tenants/{tenant}/docs/{doc_id}",
        "/tenants/{tenant}/docs/{doc_id}",
        "/a/b/{org}/c/{cid}",
        "/{tenant}/static/{path}",
        "/{region}/api/items/{item_id}",
    ]
    assert [s.name for s in cap.spans if s.kind is SpanKind.SERVER][:2] == [
        "GET /tenants/{tenant}/docs/{doc_id}"
    ] * 2
    exceeded = cap.find_logs("budget exceeded", route="GET /tenants/{tenant}/docs/{doc_id}")
    assert len(exceeded) == 2


@pytest.mark.asyncio
async def test_a_path_no_route_of_a_mount_matches_is_not_a_route() -> None:
    async def doc(request: Request) -> Response:
        return PlainTextResponse("doc")

    inner = make_fastapi()

    @inner.get("/docs/{doc_id}")
    async def fdoc(doc_id: str) -> dict[str, str]:
        return {"id": doc_id}

    outer = Starlette(
        routes=[
            Mount("/api", routes=[Route("/docs/{doc_id}", doc)]),
            Mount("/{tenant}/v1", app=inner),
        ]
    )
    app = ri.RequestMiddleware(outer)
    with capture() as cap:
        assert (await get(app, "/api/unknown/123")).status_code == 404
        assert (await get(app, "/acme/v1/unknown/123")).status_code == 404
    assert [line["route"] for line in request_lines(cap)] == [None, None]
    assert [s.name for s in cap.spans if s.kind is SpanKind.SERVER] == ["GET", "GET"]


@pytest.mark.asyncio
async def test_mount_templates_under_hosts_nested_apps_and_shared_names() -> None:
    async def doc(request: Request) -> Response:
        return PlainTextResponse("doc")

    class OtherFramework:  # an ASGI app with routes of its own kind (no scope["route"])
        routes = ["/x"]

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await PlainTextResponse("other")(scope, receive, send)

    outer = Starlette(
        routes=[
            Host(
                "{sub}.example.com",
                app=Router(
                    [
                        Mount("/api", routes=[Route("/users/{uid}", doc)]),
                        Mount("/t/{tenant}", routes=[Route("/d/{doc_id}", doc)]),
                    ]
                ),
            ),
            Mount("/same/{tenant}", routes=[Route("/d/{tenant}", doc)]),
            Mount("/other", app=OtherFramework()),
        ]
    )
    app = ri.RequestMiddleware(outer)
    with capture() as cap:
        for host, path in (
            ("acme.example.com", "/api/users/7"),
            ("acme.example.com", "/t/acme/d/9"),
            ("testserver", "/same/acme/d/acme"),
            ("testserver", "/other/anything/1"),
        ):
            assert (await get(app, path, headers={"host": host})).status_code == 200
        outer.router.routes.append(Mount("/late/{tenant}", routes=[Route("/d/{doc_id}", doc)]))
        assert (await get(app, "/late/acme/d/1")).status_code == 200  # added after the first
    assert [line["route"] for line in request_lines(cap)] == [
        "/api/users/{uid}",
        "/t/{tenant}/d/{doc_id}",
        "/same/{tenant}/d/{tenant}",
        "/other/{path}",
        "/late/{tenant}/d/{doc_id}",
    ]


@pytest.mark.asyncio
async def test_a_middleware_on_a_mounted_app_names_routes_from_its_own_mount() -> None:
    inner = make_fastapi()
    tenant_app = make_fastapi()

    @tenant_app.get("/d/{doc}")
    async def doc(doc: str) -> dict[str, str]:
        return {"doc": doc}

    inner.mount("/t/{tenant}", tenant_app)
    inner.add_middleware(ri.RequestMiddleware)
    outer = Starlette(routes=[Mount("/v1", app=inner)])
    with capture() as cap:
        assert (await get(outer, "/v1/t/acme/d/3")).json() == {"doc": "3"}
    assert [line["route"] for line in request_lines(cap)] == ["/t/{tenant}/d/{doc}"]


@pytest.mark.asyncio
async def test_routes_of_an_included_router_in_an_app_mounted_with_parameters() -> None:
    # FastAPI keeps an included router's routes out of the app's route list until a request
    # needs them: the mounts' templates are found by the path the request took.
    router = APIRouter(prefix="/p")

    @router.get("/r/{doc_id}")
    async def read(doc_id: str) -> dict[str, str]:
        return {"id": doc_id}

    sub = make_fastapi()
    sub.include_router(router)
    main = make_fastapi()
    main.mount("/v2/{tenant}", sub)
    app = ri.RequestMiddleware(main)
    with capture(budgets={"GET /v2/{tenant}/p/r/{doc_id}": 0.001}) as cap:
        for tenant in ("acme", "globex"):
            assert (await get(app, f"/v2/{tenant}/p/r/5")).json() == {"id": "5"}
    assert [line["route"] for line in request_lines(cap)] == ["/v2/{tenant}/p/r/{doc_id}"] * 2
    assert len(cap.find_logs("budget exceeded", route="GET /v2/{tenant}/p/r/{doc_id}")) == 2


def test_route_template_reads_other_frameworks_scope_keys() -> None:
    assert route_template({"path_template": "/u/{id}"}) == "/u/{id}"
    assert route_template({"route": "/x/{y}"}) == "/x/{y}"
    assert route_template({"path": "/u/1"}) is None


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_an_exception_is_a_500_on_span_and_line_and_reaches_the_framework_unchanged() -> None:
    original = ValueError("index missing")

    async def broken(request: Request) -> Response:
        with ri.stage("retrieval"):
            pass
        raise original

    app = ri.RequestMiddleware(Starlette(routes=[Route("/b", broken)]))
    with capture() as cap:
        with pytest.raises(ValueError) as raised:
            await get(app, "/b")
        assert raised.value is original
        # ... and a framework that handles it answers 500 as it would without us.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get("/b")
        assert response.status_code == 500
    spans = [s for s in cap.spans if s.name == "GET /b"]
    assert len(spans) == 2
    for span in spans:
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes["http.response.status_code"] == 500
        assert span.attributes["error.type"] == "ValueError"
        assert [event.name for event in span.events] == ["exception"]
    lines = request_lines(cap)
    assert [(line["status"], line["level"], line["error_type"]) for line in lines] == [
        (500, "error", "ValueError")
    ] * 2


@pytest.mark.asyncio
async def test_a_5xx_response_without_exception_is_an_error_span() -> None:
    app = build_paths_app()
    with capture() as cap:
        await get(app, "/health/deep")
    span = server_span(cap)
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "503"
    assert request_lines(cap)[0]["level"] == "error"


@pytest.mark.asyncio
async def test_cancellation_passes_through_and_marks_the_span() -> None:
    started = asyncio.Event()

    async def slow(request: Request) -> Response:
        started.set()
        await asyncio.sleep(3600)
        return PlainTextResponse("never")

    app = ri.RequestMiddleware(Starlette(routes=[Route("/slow", slow)]))
    with capture() as cap:
        task = asyncio.ensure_future(Driver()(app, "/slow"))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    span = server_span(cap)
    assert span.attributes["rag.cancelled"] is True
    assert span.status.status_code is StatusCode.UNSET
    # No status was sent: none on the span or the duration metric; 499 in the line only.
    assert "http.response.status_code" not in span.attributes
    (point,) = cap.metrics()["http.server.request.duration"]
    assert "http.response.status_code" not in point.attributes
    (line,) = request_lines(cap)
    assert (line["status"], line["cancelled"], line["level"]) == (499, True, "warning")


# --- pass-through ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["websocket", "lifespan"])
@pytest.mark.asyncio
async def test_websocket_and_lifespan_scopes_pass_through_untouched(kind: str) -> None:
    seen: list[tuple[Any, Any, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    async def receive() -> dict[str, Any]:
        return {}

    async def send(message: Any) -> None:
        return None

    scope = {"type": kind, "path": "/ws"}
    with capture() as cap:
        await RequestMiddleware(app)(scope, receive, send)
    assert seen == [(scope, receive, send)]
    assert seen[0][0] == {"type": kind, "path": "/ws"}
    assert cap.spans == []
    assert cap.logs == []


@pytest.mark.asyncio
async def test_disabled_library_passes_requests_through() -> None:
    app = build_items_app()
    with capture(enabled=False) as cap:
        response = await get(app, "/api/items/1")
    assert response.status_code == 200
    assert "x-request-id" not in response.headers
    assert cap.spans == []


@pytest.mark.asyncio
async def test_concurrent_requests_keep_their_own_ids_and_traces() -> None:
    log = ri.get_logger("app")

    async def endpoint(request: Request) -> Response:
        with ri.stage("retrieval"):
            await asyncio.sleep(0)
            log.info("inside", marker=request.headers["x-request-id"])
        return PlainTextResponse("ok")

    app = ri.RequestMiddleware(Starlette(routes=[Route("/", endpoint)]))
    transport = httpx.ASGITransport(app=app)
    with capture() as cap:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await asyncio.gather(
                *(client.get("/", headers={"x-request-id": f"r-{n}"}) for n in range(50))
            )
    inside = cap.find_logs("inside")
    assert len(inside) == 50
    traces: dict[str, str] = {}
    for line in request_lines(cap):
        traces[line["context"]["request_id"]] = line["trace_id"]
    assert len(set(traces.values())) == 50
    for line in inside:
        assert line["context"]["request_id"] == line["marker"]
        assert line["trace_id"] == traces[line["marker"]]


@pytest.mark.asyncio
async def test_sync_endpoints_in_the_thread_pool_share_the_request() -> None:
    app = make_fastapi()

    @app.get("/sync")
    def sync_endpoint() -> dict[str, bool]:
        with ri.stage("retrieval"):
            _breakdown.record("db", 2.0)
        return {"ok": True}

    app.add_middleware(RequestMiddleware)
    with capture() as cap:
        response = await get(app, "/sync")
    stage = cap.span("retrieval")
    assert stage.context.trace_id == server_span(cap).context.trace_id
    assert (
        cap.find_logs("retrieval completed")[0]["context"]["request_id"]
        == response.headers["x-request-id"]
    )
    assert "db;dur=2.0" in response.headers["server-timing"]


@pytest.mark.asyncio
async def test_under_another_server_span_ours_is_its_child_in_the_same_trace() -> None:
    outer_tracer = trace.get_tracer("outer")
    app = build_items_app()

    async def outer(scope: Any, receive: Any, send: Any) -> None:
        with ri.get_runtime().tracer.start_as_current_span("outer", kind=SpanKind.SERVER):
            await app(scope, receive, send)

    del outer_tracer
    with capture() as cap:
        await get(outer, "/api/items/1", headers={"traceparent": TRACEPARENT})
    ours = server_span(cap)
    outer_span = cap.span("outer")
    assert ours.kind is SpanKind.INTERNAL
    assert ours.parent is not None
    assert ours.parent.span_id == outer_span.context.span_id
    assert ours.context.trace_id == outer_span.context.trace_id


@pytest.mark.asyncio
async def test_the_incoming_trace_is_continued_under_a_span_that_is_no_server_span() -> None:
    # A test's own span, a stage, a client span: none of them is this request's server
    # span, so the traceparent the request came with is continued, as a SERVER span.
    app = build_items_app()
    with capture() as cap:
        with ri.stage("caller"):
            await get(app, "/api/items/1", headers={"traceparent": TRACEPARENT})
        with ri.stage("caller without header"):
            await get(app, "/api/items/2")
    first, second = (s for s in cap.spans if s.name == "GET /api/items/{item_id}")
    assert first.kind is SpanKind.SERVER
    assert format(first.context.trace_id, "032x") == TRACEPARENT.split("-")[1]
    assert first.parent is not None
    assert format(first.parent.span_id, "016x") == TRACEPARENT.split("-")[2]
    caller = cap.span("caller without header")
    assert second.kind is SpanKind.SERVER
    assert second.parent is not None
    assert second.parent.span_id == caller.context.span_id


@pytest.mark.asyncio
async def test_an_app_calling_another_in_process_from_its_request_span() -> None:
    # App A's endpoint calls app B through httpx's ASGI transport (same task, so A's request
    # span is current in B's middleware): B's request is a server span of its own, a child
    # of A's, since the header it came with names A's span.
    callee = build_items_app()

    async def call(request: Request) -> Response:
        transport = httpx.ASGITransport(app=callee)
        async with httpx.AsyncClient(transport=transport, base_url="http://b") as client:
            answer = await client.get("/api/items/3", headers=ri.inject_headers({}))
        return PlainTextResponse(answer.text)

    caller = ri.RequestMiddleware(Starlette(routes=[Route("/call", call)]))
    with capture() as cap:
        assert (await get(caller, "/call")).status_code == 200
    a = server_span_named(cap, "GET /call", our=True)
    b = server_span_named(cap, "GET /api/items/{item_id}", our=True)
    assert a.kind is SpanKind.SERVER
    assert b.kind is SpanKind.SERVER
    assert b.parent is not None
    assert b.parent.span_id == a.context.span_id
    assert b.context.trace_id == a.context.trace_id


# --- streaming -------------------------------------------------------------------------------


async def tokens(n: int) -> AsyncIterator[bytes]:
    for i in range(n):
        with ri.stage("generation"):
            await asyncio.sleep(0)
        yield f"t{i} ".encode()


@pytest.mark.asyncio
async def test_streaming_span_lasts_until_the_last_chunk_and_stages_share_its_trace() -> None:
    async def stream(request: Request) -> Response:
        with ri.stage("retrieval"):
            pass
        return StreamingResponse(tokens(3))

    app = ri.RequestMiddleware(Starlette(routes=[Route("/stream", stream)]))
    driver = Driver()
    open_at_last_chunk: list[bool] = []
    with capture() as cap:

        def watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                open_at_last_chunk.append(not [s for s in cap.spans if s.name == "GET /stream"])

        driver.on_send = watch
        await driver(app, "/stream")
    assert open_at_last_chunk == [True]
    body = b"".join(m.get("body", b"") for m in driver.messages[1:])
    assert body == b"t0 t1 t2 "
    request_span = server_span(cap)
    generations = [s for s in cap.spans if s.name == "generation"]
    assert len(generations) == 3
    for span in generations:
        assert span.context.trace_id == request_span.context.trace_id
        assert span.parent is not None
        assert span.parent.span_id == request_span.context.span_id
        assert span.end_time <= request_span.end_time
    # Server-Timing can only list what finished before the headers: retrieval, not generation.
    header = driver.header(b"server-timing")
    assert header is not None
    assert b"retrieval;dur=" in header
    assert b"generation" not in header
    (line,) = request_lines(cap)
    assert line["status"] == 200
    assert "cancelled" not in line


@pytest.mark.parametrize("spec", ["2.3", "2.4"])
@pytest.mark.asyncio
async def test_client_disconnect_mid_stream_ends_the_span_cancelled(spec: str) -> None:
    async def forever() -> AsyncIterator[bytes]:
        n = 0
        while True:
            with ri.stage("generation"):
                await asyncio.sleep(0)
            yield b"x"
            n += 1

    async def stream(request: Request) -> Response:
        return StreamingResponse(forever())

    app = ri.RequestMiddleware(Starlette(routes=[Route("/stream", stream)]))
    driver = Driver(disconnect_after_chunks=2)
    if spec == "2.4":
        # ASGI 2.4 servers raise OSError from send() once the client is gone.
        sent = 0

        def fail_after_two(message: dict[str, Any]) -> None:
            nonlocal sent
            if message["type"] == "http.response.body":
                sent += 1
                if sent > 2:
                    raise OSError("client disconnected")

        driver.on_send = fail_after_two
    with capture() as cap:
        if spec == "2.4":
            from starlette.requests import ClientDisconnect

            with pytest.raises(ClientDisconnect):  # what Starlette makes of the OSError
                await driver(app, "/stream", spec=spec)
        else:
            await driver(app, "/stream", spec=spec)
    span = server_span(cap)
    assert span.attributes["rag.cancelled"] is True
    assert span.status.status_code is StatusCode.UNSET
    (line,) = request_lines(cap)
    assert line["cancelled"] is True
    assert line["status"] == 200
    assert all(s.context.trace_id == span.context.trace_id for s in cap.spans)


@pytest.mark.asyncio
async def test_stage_decorating_an_endpoint_that_returns_a_stream_ends_too_early() -> None:
    """The pitfall: the stage ends when the response object is returned, not when it is sent.

    The stages opened by the body iterator still belong to the request's trace (children of
    the request span, not of the finished stage); docs/web.md shows the right pattern.
    """

    @ri.stage("search")
    async def search(request: Request) -> Response:
        return StreamingResponse(tokens(2))

    app = ri.RequestMiddleware(Starlette(routes=[Route("/search", search)]))
    with capture() as cap:
        await Driver()(app, "/search")
    request_span = server_span(cap)
    search_span = cap.span("search")
    generations = [s for s in cap.spans if s.name == "generation"]
    assert len(generations) == 2
    assert all(search_span.end_time <= g.start_time for g in generations)
    for g in generations:
        assert g.context.trace_id == request_span.context.trace_id
        assert g.parent is not None
        assert g.parent.span_id == request_span.context.span_id


@pytest.mark.asyncio
async def test_the_right_pattern_keeps_the_stage_open_for_the_whole_stream() -> None:
    @ri.stage("search")
    async def answer(question: str) -> AsyncIterator[bytes]:
        with ri.stage("retrieval"):
            pass
        async for token in tokens(2):
            yield token

    async def search(request: Request) -> Response:
        return StreamingResponse(answer("q"))

    app = ri.RequestMiddleware(Starlette(routes=[Route("/search", search)]))
    with capture() as cap:
        await Driver()(app, "/search")
    search_span = cap.span("search")
    generations = [s for s in cap.spans if s.name == "generation"]
    assert all(g.parent.span_id == search_span.context.span_id for g in generations)  # type: ignore[union-attr]
    assert all(g.end_time <= search_span.end_time for g in generations)
    assert search_span.parent.span_id == server_span(cap).context.span_id  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_pathsend_completes_the_response() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.pathsend", "path": "/etc/hostname"})
        assert (await receive())["type"] == "http.disconnect"  # the response is complete

    with capture() as cap:
        await Driver()(RequestMiddleware(app))
    span = server_span(cap)
    assert span.attributes["http.response.status_code"] == 200
    assert "rag.cancelled" not in span.attributes
    assert "cancelled" not in request_lines(cap)[0]


@pytest.mark.asyncio
async def test_a_custom_request_id_header_is_read_and_echoed() -> None:
    app = ri.RequestMiddleware(
        Starlette(routes=[Route("/", lambda r: PlainTextResponse("ok"))]),
        request_id_header="X-Correlation-ID",
    )
    with capture() as cap:
        response = await get(app, "/", headers={"x-correlation-id": "c-9"})
    assert response.headers["x-correlation-id"] == "c-9"
    assert "x-request-id" not in response.headers
    assert request_lines(cap)[0]["context"]["request_id"] == "c-9"


@pytest.mark.asyncio
async def test_a_failure_inside_the_middleware_never_fails_the_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import rag_instrument.web as web

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("propagator bug")

    monkeypatch.setenv("RAG_INSTRUMENT_RAISE_INTERNAL_ERRORS", "0")
    monkeypatch.setattr(web.propagate, "extract", broken)
    app = build_items_app()
    with capture() as cap:
        response = await get(app, "/api/items/3", headers={"traceparent": TRACEPARENT})
    assert response.status_code == 200
    assert response.json() == {"id": 3}
    assert request_lines(cap) == []  # the request was served untraced
    assert _bound_now() == {}


# --- under a real server ---------------------------------------------------------------------


class UvicornThread:
    """uvicorn serving ``app`` on 127.0.0.1 and an ephemeral port, in a thread."""

    def __init__(self, app: Any) -> None:
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        assert wait_for(lambda: self.server.started)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def wait_for(condition: Callable[[], object], timeout: float = 20.0) -> bool:
    """Wait until ``condition()`` is true (a generous bound: CI machines are loaded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.asyncio
async def test_under_uvicorn_a_client_leaving_mid_stream_cancels_the_request_span() -> None:
    async def endless() -> AsyncIterator[bytes]:
        while True:
            with ri.stage("generation"):
                await asyncio.sleep(0.005)  # a model producing tokens
            yield b"token "

    async def stream(request: Request) -> Response:
        return StreamingResponse(endless())

    app = ri.RequestMiddleware(Starlette(routes=[Route("/stream", stream)]))
    with capture() as cap, UvicornThread(app) as server:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            async with client.stream("GET", "/stream") as response:
                assert response.status_code == 200
                async for _chunk in response.aiter_bytes():
                    break
        # Leaving the block closed the connection mid-stream.
        assert wait_for(lambda: request_lines(cap))
    (line,) = request_lines(cap)
    assert line["cancelled"] is True
    assert line["status"] == 200
    assert line["route"] == "/stream"
    span = server_span(cap)
    assert span.attributes["rag.cancelled"] is True
    generations = [s for s in cap.spans if s.name == "generation"]
    assert generations
    assert all(g.context.trace_id == span.context.trace_id for g in generations)


@pytest.mark.asyncio
async def test_with_fastapis_own_tracing_on_there_is_one_request_span() -> None:
    # Newer FastAPI versions trace natively when a provider is installed: added inside the
    # app (add_middleware) or around it, the request still has one span, ours.
    def build() -> FastAPI:
        app = FastAPI()

        @app.get("/x/{n}")
        async def endpoint(n: int) -> dict[str, int]:
            with ri.stage("retrieval"):
                pass
            return {"n": n}

        return app

    inside = build()
    inside.add_middleware(RequestMiddleware)
    for app in (inside, RequestMiddleware(build())):
        with capture() as cap:
            response = await get(app, "/x/1", headers={"traceparent": TRACEPARENT})
        assert {format(s.context.trace_id, "032x") for s in cap.spans} == {
            "0af7651916cd43dd8448eb211c80319c"
        }
        (request_span,) = [s for s in cap.spans if s.name == "GET /x/{n}"]
        assert request_span.kind is SpanKind.SERVER
        assert request_span.parent is not None
        assert format(request_span.parent.span_id, "016x") == TRACEPARENT.split("-")[2]
        assert request_span.attributes["request_id"] == response.headers["x-request-id"]
        assert request_span.attributes["http.response.status_code"] == 200
        by_id = {s.context.span_id: s for s in cap.spans}
        ancestors, current = [], cap.span("retrieval")
        while current.parent is not None and current.parent.span_id in by_id:
            current = by_id[current.parent.span_id]
            ancestors.append(current)
        assert request_span in ancestors
        (line,) = request_lines(cap)
        assert line["span_id"] == format(request_span.context.span_id, "016x")
        assert line["route"] == "/x/{n}"


def server_span_named(cap: Capture, name: str, *, our: bool) -> Any:
    """Our request span: the one carrying the bound request id."""
    found = [s for s in cap.spans if s.name == name and ("request_id" in s.attributes) is our]
    assert len(found) == 1, [(s.name, dict(s.attributes)) for s in cap.spans]
    return found[0]


# --- memory ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_request_leaves_nothing_for_the_garbage_collector() -> None:
    # A reference cycle through the request's state kept everything the request held alive
    # until a collection (found under load: full collections came more often and took longer).
    async def search(request: Request) -> Response:
        with ri.stage("retrieval"):
            pass
        return JSONResponse({"ok": True})

    async def stream(request: Request) -> Response:
        return StreamingResponse(tokens(2))

    async def fail(request: Request) -> Response:
        raise RuntimeError("boom")

    routes = [Route("/search", search), Route("/stream", stream), Route("/fail", fail)]
    app = ri.RequestMiddleware(Starlette(routes=routes))
    await get(app, "/search")  # first use: the library's caches are filled here
    with capture(), library_garbage() as garbage:
        for _ in range(3):
            assert (await get(app, "/search")).status_code == 200
            assert (await get(app, "/stream")).text == "t0 t1 "
            with pytest.raises(RuntimeError):
                await get(app, "/fail")
    assert garbage == []


# --- review of 2026-12-04, night ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_wrapping_a_natively_traced_fastapi_app_keeps_one_trace() -> None:
    # app = ri.RequestMiddleware(FastAPI()): FastAPI's native tracing takes its parent from
    # the request headers, so without our traceparent in them it started a second trace.
    inner = FastAPI()

    @inner.get("/items/{i}")
    async def item(i: int) -> dict[str, int]:
        with ri.stage("retrieval"):
            pass
        return {"i": i}

    app = RequestMiddleware(inner)
    for headers in ({}, {"traceparent": TRACEPARENT, "tracestate": "v=1"}):
        with capture() as cap:
            await get(app, "/items/3", headers=headers)
        assert len({s.context.trace_id for s in cap.spans}) == 1, [s.name for s in cap.spans]
        ours = server_span_named(cap, "GET /items/{i}", our=True)
        assert ours.kind is SpanKind.SERVER
        if headers:
            assert format(ours.context.trace_id, "032x") == TRACEPARENT.split("-")[1]
            assert ours.parent.span_id == int(TRACEPARENT.split("-")[2], 16)
        lines = {line["event"]: line["trace_id"] for line in cap.logs}
        assert lines["request completed"] == lines["retrieval completed"]


@pytest.mark.asyncio
async def test_the_application_sees_the_request_span_as_its_traceparent() -> None:
    seen: dict[str, str] = {}

    async def echo(request: Request) -> Response:
        seen.update(request.headers)
        return PlainTextResponse("ok")

    app = RequestMiddleware(Starlette(routes=[Route("/e", echo)]))
    with capture() as cap:
        await get(app, "/e", headers={"traceparent": TRACEPARENT, "tracestate": "v=1"})
    span = server_span(cap)
    ctx = span.context
    assert seen["traceparent"] == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-01"
    assert seen["tracestate"] == "v=1"


@pytest.mark.asyncio
@pytest.mark.parametrize("root_path", ["", "/api"])
async def test_quiet_and_excluded_paths_match_under_a_root_path(root_path: str) -> None:
    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/health", ok), Route("/metrics", ok), Route("/a", ok)])
    app = RequestMiddleware(inner, quiet_paths=["/health"], exclude_paths=["/metrics"])
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    with capture() as cap:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for path in ("/health", "/metrics", "/a"):
                assert (await client.get(root_path + path)).status_code == 200
    assert sorted(s.name for s in cap.spans) == ["GET /a", "GET /health"]
    assert [line["route"] for line in request_lines(cap)] == ["/a"]


@pytest.mark.asyncio
@pytest.mark.parametrize("sent", ["/api", ""])
async def test_fastapis_own_root_path_names_routes_and_matches_paths_the_same(sent: str) -> None:
    fastapi_app = make_fastapi()
    fastapi_app.root_path = "/api"  # as FastAPI(root_path="/api") does (now deprecated)

    @fastapi_app.get("/items/{i}")
    async def item(i: int) -> dict[str, int]:
        return {"i": i}

    @fastapi_app.get("/health")
    async def health() -> dict[str, str]:
        return {"ok": "yes"}

    @fastapi_app.get("/metrics")
    async def metrics() -> dict[str, str]:
        return {"ok": "yes"}

    app = RequestMiddleware(fastapi_app, quiet_paths=["/health"], exclude_paths=["/metrics"])
    with capture() as cap:
        for path in ("/items/3", "/health", "/metrics"):
            assert (await get(app, sent + path)).status_code == 200
    assert sorted(s.name for s in cap.spans) == ["GET /health", "GET /items/{i}"]
    assert [line["route"] for line in request_lines(cap)] == ["/items/{i}"]


def test_server_timing_gives_stages_whose_names_clash_names_of_their_own() -> None:
    timings = _breakdown.StageTimings()
    for name in ("vector search", "vector_search", "vector/search", "résumé", "r_sum_"):
        timings.add(name, 1.0)
    value = server_timing(timings, None, 5.0)
    names = [part.split(";")[0] for part in value.split(", ")]
    assert len(names) == len(set(names)) == 6, value
    assert names[:3] == ["vector_search", "vector_search-2", "vector_search-3"]


@pytest.mark.asyncio
async def test_repeated_trace_headers_are_read_as_http_lists() -> None:
    other = "00-11111111111111111111111111111111-2222222222222222-01"
    with capture() as cap:
        await get(
            build_items_app(),
            "/api/items/1",
            headers=[("traceparent", TRACEPARENT), ("traceparent", other)],
        )
    trace_ids = {format(s.context.trace_id, "032x") for s in cap.spans}
    assert trace_ids.isdisjoint({TRACEPARENT.split("-")[1], other.split("-")[1]})
    with capture() as cap:
        await get(
            build_items_app(),
            "/api/items/1",
            headers=[("traceparent", TRACEPARENT), ("tracestate", "a=1"), ("tracestate", "b=2")],
        )
    span = server_span(cap)
    assert span.context.trace_state.to_header() == "a=1,b=2"


@pytest.mark.asyncio
async def test_a_method_not_in_canonical_case_is_other() -> None:
    app = build_paths_app()
    driver = Driver()
    with capture() as cap:
        messages = await driver(app, "/api", method="get")  # httpx would send "GET"
    assert messages[0]["status"] == 405  # Starlette reads methods case-sensitively too
    span = server_span(cap)
    assert span.attributes["http.request.method"] == "_OTHER"
    assert span.attributes["http.request.method_original"] == "get"


@pytest.mark.asyncio
async def test_request_duration_points_carry_scheme_protocol_and_error_type() -> None:
    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def boom(request: Request) -> Response:
        raise RuntimeError("boom")

    app = RequestMiddleware(Starlette(routes=[Route("/ok", ok), Route("/boom", boom)]))
    with capture() as cap:
        await get(app, "/ok")
        with pytest.raises(RuntimeError):
            await get(app, "/boom")
        points = {
            p.attributes["http.route"]: dict(p.attributes)
            for p in cap.metrics()["http.server.request.duration"]
        }
    assert points["/ok"]["url.scheme"] == "http"
    assert points["/ok"]["network.protocol.version"] == "1.1"
    assert "error.type" not in points["/ok"]
    assert points["/boom"]["error.type"] == "RuntimeError"


@pytest.mark.asyncio
async def test_a_stream_collected_after_its_request_logs_with_the_request_id() -> None:
    # ASGI 2.4: the server's send raises once the client is gone, and Starlette leaves the
    # body iterator to the collector: its stage ends after the request, elsewhere.
    async def stream_tokens() -> AsyncIterator[bytes]:
        with ri.stage("generation"):
            for _ in range(100):
                await asyncio.sleep(0)
                yield b"x"

    async def stream(request: Request) -> Response:
        return StreamingResponse(stream_tokens())

    app = RequestMiddleware(Starlette(routes=[Route("/s", stream)]))
    sent = 0

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}  # pragma: no cover

    async def send(message: dict[str, Any]) -> None:
        nonlocal sent
        sent += 1
        if sent > 3:
            raise OSError("client went away")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/s",
        "raw_path": b"/s",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"x-request-id", b"req-42")],
        "client": ("127.0.0.1", 1),
        "server": ("s", 80),
    }

    async def main() -> None:
        with pytest.raises(Exception):  # whatever Starlette makes of the failed send
            await app(scope, receive, send)

    with capture() as cap:
        await asyncio.get_running_loop().run_in_executor(None, asyncio.run, main())
    line = cap.find_logs("generation cancelled")[0]
    assert line["context"] == {"pipeline_stage": "generation", "request_id": "req-42"}


@pytest.mark.asyncio
async def test_a_middleware_around_ours_sees_what_the_application_set_in_the_scope() -> None:
    # A metrics middleware outside ours reads the route the framework matched, as it would
    # without ours in between; the headers it sees are the client's once the app is done.
    seen: dict[str, Any] = {}
    app = build_items_app()  # under RequestMiddleware

    async def outer(scope: Any, receive: Any, send: Any) -> None:
        await app(scope, receive, send)
        seen["route"] = getattr(scope.get("route"), "path", None)
        seen["path_params"] = scope.get("path_params")
        seen["headers"] = scope["headers"]

    with capture():
        await get(outer, "/api/items/7", headers={"traceparent": TRACEPARENT})
    assert seen["route"] == "/api/items/{item_id}"
    assert seen["path_params"] == {"item_id": "7"}
    assert (b"traceparent", TRACEPARENT.encode()) in seen["headers"]


@pytest.mark.asyncio
async def test_the_servers_scope_is_not_changed_and_a_discarded_tracestate_is_dropped() -> None:
    seen: dict[str, str | None] = {}

    async def echo(request: Request) -> Response:
        seen["traceparent"] = request.headers.get("traceparent")
        seen["tracestate"] = request.headers.get("tracestate")
        return PlainTextResponse("ok")

    app = RequestMiddleware(Starlette(routes=[Route("/e", echo)]))
    driver = Driver()
    headers = [(b"traceparent", TRACEPARENT.encode()), (b"tracestate", b"v=1")]
    original = list(headers)
    scopes: list[dict[str, Any]] = []

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        scopes.append(scope)
        await app(scope, receive, send)

    with capture():
        await driver(recording, "/e", headers=headers)
    assert scopes[0]["headers"] == original  # the server's scope: as the client sent it
    assert seen["tracestate"] == "v=1"  # the trace is continued: its state goes with it
    # A malformed traceparent starts a new trace: the old state does not go with it.
    with capture():
        await Driver()(app, "/e", headers=[(b"traceparent", b"00-zz"), (b"tracestate", b"v=1")])
    assert seen["tracestate"] is None
    assert seen["traceparent"] is not None


@pytest.mark.asyncio
async def test_suppressed_instrumentation_stays_suppressed_under_an_incoming_trace() -> None:
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    async def handler(request: Request) -> Response:
        with ri.stage("inside"):
            pass
        return PlainTextResponse("ok")

    app = RequestMiddleware(Starlette(routes=[Route("/s", handler)]))
    with capture() as cap, suppress_instrumentation():
        await Driver()(app, "/s", headers=[(b"traceparent", TRACEPARENT.encode())])
    assert cap.spans == []


@pytest.mark.asyncio
async def test_a_bad_baggage_header_does_not_add_a_line_per_request() -> None:
    # The propagator warns about each malformed baggage entry: a client could add log
    # lines at will. The same warning is written once per window.
    app = build_items_app()
    with capture() as cap:
        for n in range(5):
            response = await get(app, f"/api/items/{n}", headers={"baggage": "k=v\x7f; bad entry"})
            assert response.status_code == 200
    warnings = [line for line in cap.logs if line["logger"].startswith("opentelemetry.")]
    assert len(warnings) == 1, warnings
    assert len(request_lines(cap)) == 5


@pytest.mark.asyncio
async def test_a_middleware_inside_another_is_the_same_request() -> None:
    # A mounted app with a RequestMiddleware of its own, under the outer app's: one
    # request, though the inner one sees the outer's traceparent.
    async def hello(request: Request) -> Response:
        return PlainTextResponse("hi")

    inner = RequestMiddleware(Starlette(routes=[Route("/hello", hello)]))
    outer = RequestMiddleware(Starlette(routes=[Mount("/sub", app=inner)]))
    seen: list[dict[str, Any]] = []

    async def server(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope)
        await outer(scope, receive, send)

    with capture() as cap:
        assert (await get(server, "/sub/hello")).text == "hi"
    # One span and one line, with the whole route: the inner middleware stands aside.
    (span,) = cap.spans
    assert span.kind is SpanKind.SERVER
    assert span.name == "GET /sub/hello"
    (line,) = request_lines(cap)
    assert line["route"] == "/sub/hello"
    assert "rag_instrument.request" not in seen[0]  # taken out at the end


@pytest.mark.asyncio
async def test_a_404_inside_a_mounted_app_wrapped_in_middleware_has_no_route() -> None:
    from starlette.middleware.cors import CORSMiddleware

    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    inner = CORSMiddleware(Starlette(routes=[Route("/x/{k}", ok)]), allow_origins=["*"])
    app = RequestMiddleware(Starlette(routes=[Mount("/cors", app=inner)]))
    with capture() as cap:
        assert (await get(app, "/cors/x/1")).status_code == 200
        assert (await get(app, "/cors/nope")).status_code == 404
    assert [s.name for s in cap.spans] == ["GET /cors/x/{k}", "GET"]
    assert [line["route"] for line in request_lines(cap)] == ["/cors/x/{k}", None]


@pytest.mark.asyncio
async def test_an_excluded_path_of_a_wrapped_fastapi_app_has_no_span_at_all() -> None:
    inner = FastAPI()  # traces natively once a provider is installed

    @inner.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    app = RequestMiddleware(inner, exclude_paths=["/health"])
    with capture() as cap:
        assert (await get(app, "/health")).status_code == 200
    assert [s.kind for s in cap.spans if s.kind is SpanKind.SERVER] == []
    assert request_lines(cap) == []


@pytest.mark.asyncio
async def test_an_app_calling_another_in_process_keeps_its_own_request_span() -> None:
    # B is called from inside A's request, without a traceparent header: B's request span
    # is B's own (under A's), A's span keeps A's path and status.
    async def b_endpoint(request: Request) -> Response:
        return PlainTextResponse("b", status_code=503)

    app_b = RequestMiddleware(Starlette(routes=[Route("/b/{n}", b_endpoint)]))

    async def a_endpoint(request: Request) -> Response:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app_b), base_url="http://b"
        ) as client:
            answer = await client.get("/b/1")
        return PlainTextResponse(answer.text)

    app_a = RequestMiddleware(Starlette(routes=[Route("/a", a_endpoint)]))
    with capture() as cap:
        assert (await get(app_a, "/a")).status_code == 200
    span_a = cap.span("GET /a")
    span_b = cap.span("GET /b/{n}")
    assert span_a.attributes["url.path"] == "/a"
    assert span_a.attributes["http.response.status_code"] == 200
    assert span_a.status.status_code is StatusCode.UNSET
    assert span_b.parent is not None
    assert span_b.parent.span_id == span_a.context.span_id
    assert span_b.attributes["http.response.status_code"] == 503
    lines = request_lines(cap)
    assert len({line["span_id"] for line in lines}) == 2
