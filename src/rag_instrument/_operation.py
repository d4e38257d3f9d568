"""One timed unit of retrieval work: a span, an entry in the stage's breakdown, and nesting.

``vector_search``, ``embed_in_batches`` and the Milvus integration all report the same way:
a span (current while the work runs, so spans opened inside nest under it), and one
``vector`` or ``embedding`` entry in the enclosing stage's breakdown. Work of the *same*
kind reported inside the operation (an instrumented Milvus client called from a
``@vector_search`` function, an instrumented OpenAI ``embeddings.create`` inside an
embedding batch) is part of it and is not counted a second time; work of other kinds
(a SQL statement, an LLM call) is rolled up into the stage as usual.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace as trace_api
from opentelemetry.trace import Status, StatusCode

from rag_instrument import _breakdown
from rag_instrument import attributes as attr
from rag_instrument._context import Frame, current_frame, reset_frame, set_frame
from rag_instrument._errors import exception_message
from rag_instrument._runtime import instrumentation_suppressed
from rag_instrument._utils import internal_error, user_code_error

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from rag_instrument._runtime import Runtime

__all__ = ["Operation", "finish", "record_error", "start"]


class Operation:
    """An open operation: its span, its breakdown frame and when it started."""

    __slots__ = ("context_token", "frame", "frame_token", "kind", "rt", "span", "start_ns")

    def __init__(self, rt: Runtime, span: Span, kind: str) -> None:
        self.rt = rt
        self.span = span
        self.kind = kind
        self.frame: Frame | None = None
        self.frame_token: Any = None
        self.context_token: Any = None
        self.start_ns = 0


def start(
    rt: Runtime,
    name: str,
    attributes: dict[str, Any],
    kind: str,
    *,
    span_kind: trace_api.SpanKind = trace_api.SpanKind.INTERNAL,
    leaf: bool = False,
) -> Operation | None:
    """Open ``name``'s span and make it current; ``None`` if that failed (a bug of ours).

    ``leaf=True``: the operation opens nothing inside (a client call such as a Milvus
    search): its span is the runtime's cheap leaf span and does not become current.
    """
    try:
        if leaf:
            op = Operation(rt, rt.start_leaf_span(name, span_kind, attributes), kind)
            op.start_ns = time.perf_counter_ns()
            return op
        span = (
            trace_api.INVALID_SPAN
            if instrumentation_suppressed()
            else rt.tracer.start_span(name, kind=span_kind, attributes=attributes)
        )
        op = Operation(rt, span, kind)
        parent = current_frame()
        if parent is not None:
            # Only inside a stage is there a breakdown to protect from double counting.
            frame = Frame(name, parent.stage, False, parent, span, None)  # no cycle: see web
            op.frame = frame
            op.frame_token = set_frame(frame)
        op.context_token = otel_context.attach(trace_api.set_span_in_context(span))
        op.start_ns = time.perf_counter_ns()
        return op
    except Exception as exc:
        internal_error(f"starting {name!r}", exc)
        return None


def finish(op: Operation, exc: BaseException | None) -> float:
    """End ``op`` (with ``exc`` recorded, if any); return its milliseconds. Never raises."""
    ms = (time.perf_counter_ns() - op.start_ns) / 1e6
    try:
        if op.context_token is not None:
            otel_context.detach(op.context_token)
        frame = op.frame
        if frame is not None:
            reset_frame(op.frame_token)
            frame.ended = True
            child = frame.breakdown
            frame.breakdown = None
            if child:
                child.pop(op.kind, None)  # part of this operation: counted once, below
                _breakdown.roll_up(frame, child)
    except Exception:
        # Left in another context than entered (a misused generator): restore nothing
        # rather than someone else's state.
        pass
    try:
        _breakdown.record(op.kind, ms)
        if exc is not None:
            record_error(op.span, exc, op.rt)
    except Exception as error:
        internal_error("finishing a retrieval span", error)
    try:
        op.span.end()
    except Exception as end_exc:  # a span processor we do not own raised
        user_code_error("ending a span", end_exc)
    return ms


def record_error(span: Span, exc: BaseException, rt: Runtime) -> None:
    """Mark ``span`` failed (or cancelled) by ``exc``, with a sanitised message."""
    if not span.is_recording():
        return
    error_type = type(exc).__qualname__
    span.set_attribute(attr.ERROR_TYPE, error_type)
    if not isinstance(exc, Exception):
        span.set_attribute(attr.RAG_CANCELLED, True)
        return
    message = exception_message(exc, rt.sanitizer, rt.settings.capture_content)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {message}"))
    module = type(exc).__module__
    qualname = error_type if module in ("builtins", None) else f"{module}.{error_type}"
    span.add_event(
        "exception",
        {"exception.type": qualname, "exception.message": message, "exception.escaped": True},
    )
