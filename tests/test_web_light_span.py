"""The request span is the library's light span: one object, the SDK's rules, redaction kept."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from opentelemetry import baggage, trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind
from opentelemetry.util.types import Attributes
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import rag_instrument as ri
from rag_instrument import _runtime
from rag_instrument.exporters import StageSpan
from rag_instrument.testing import capture

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def get(app: Any, path: str, **kwargs: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return await client.get(path, **kwargs)


@pytest.mark.asyncio
async def test_the_request_span_is_the_light_span_the_processors_receive() -> None:
    seen: list[Any] = []

    async def endpoint(request: Request) -> Response:
        seen.append(trace.get_current_span())
        return PlainTextResponse("ok")

    app = ri.RequestMiddleware(Starlette(routes=[Route("/items/{item_id}", endpoint)]))
    with capture() as cap:
        await get(app, "/items/7", headers={"traceparent": TRACEPARENT})
    (span,) = cap.spans
    assert span is seen[0]  # one object from start to export, no copy made at the end
    assert isinstance(span, StageSpan)
    assert span.name == "GET /items/{item_id}"
    assert span.kind is SpanKind.SERVER
    assert span.parent is not None
    assert span.parent.is_remote
    assert span.attributes["http.route"] == "/items/{item_id}"
    assert span.attributes["http.response.status_code"] == 200


@pytest.mark.asyncio
async def test_an_attribute_the_app_sets_on_the_request_span_is_still_redacted() -> None:
    async def endpoint(request: Request) -> Response:
        trace.get_current_span().set_attribute("note", "password=hunter2")
        return PlainTextResponse("ok")

    app = ri.RequestMiddleware(Starlette(routes=[Route("/x", endpoint)]))
    with capture() as cap:
        await get(app, "/x")
    (span,) = cap.spans
    assert "hunter2" not in str(span.attributes["note"])
    assert span.name == "GET /x"


@pytest.mark.asyncio
async def test_incoming_baggage_is_visible_inside_the_request() -> None:
    found: list[object] = []

    async def endpoint(request: Request) -> Response:
        found.append(baggage.get_baggage("tenant"))
        return PlainTextResponse("ok")

    app = ri.RequestMiddleware(Starlette(routes=[Route("/x", endpoint)]))
    with capture():
        await get(app, "/x", headers={"traceparent": TRACEPARENT, "baggage": "tenant=acme"})
        await get(app, "/x")
    assert found == ["acme", None]


class _Recording(Sampler):
    """Samples everything; remembers the parent each decision was asked about."""

    def __init__(self) -> None:
        self.parents: list[Any] = []

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        self.parents.append(trace.get_current_span(parent_context).get_span_context())
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)

    def get_description(self) -> str:
        return "recording"


@pytest.mark.asyncio
async def test_an_applications_sampler_is_asked_with_the_incoming_parent() -> None:
    sampler = _Recording()
    provider = TracerProvider(sampler=sampler)
    ri.configure(exporter="memory", tracer_provider=provider)

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = ri.RequestMiddleware(Starlette(routes=[Route("/x", endpoint)]))
    await get(app, "/x", headers={"traceparent": TRACEPARENT})
    pipelines = _runtime.get_runtime().pipelines
    assert pipelines is not None
    assert pipelines.memory_exporter is not None
    (span,) = pipelines.memory_exporter.get_finished_spans()
    assert format(span.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    (parent,) = sampler.parents
    assert parent.is_remote
    assert format(parent.span_id, "016x") == "b7ad6b7169203331"
