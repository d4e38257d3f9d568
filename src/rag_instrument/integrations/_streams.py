"""Machinery shared by the SDK integrations: patching client instances and wrapping streams.

A client is instrumented by replacing bound methods on its resource objects
(``client.chat.completions.create``) with instance attributes, so the class and every other
client stay untouched, and ``uninstrument_*`` only has to delete those attributes.

A stream (``stream=True``) is not replaced by a proxy: the SDK's own ``Stream`` object is
returned, with its private ``_iterator`` wrapped and ``close`` shadowed on the instance.
``isinstance(x, openai.Stream)``, ``with``/``async with``, ``.response`` and every other
attribute therefore behave exactly as without instrumentation. The call's span ends when
the stream is exhausted, fails, is closed, or is garbage-collected, whichever comes first.
Chunks are inspected one at a time and never kept; text is accumulated only when content
capture is on.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import operator
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, Final

from rag_instrument._genai import GenAICall, Secrets, start_call, usable_secrets
from rag_instrument._runtime import get_runtime
from rag_instrument._utils import internal_error
from rag_instrument.integrations._sdk import Watch

__all__ = [
    "Describe",
    "StreamState",
    "instrument_methods",
    "instrumented",
    "instrumented_already",
    "uninstrument_methods",
]

MARKER: Final = "_rag_instrument_patches"
#: The response cache (a ``CacheSpec``) a client was instrumented with, or ``None``.
CACHE_MARKER: Final = "_rag_instrument_cache"

#: ``describe(kwargs) -> start_call keyword arguments`` (operation, model, params, prompt...).
Describe = Callable[[Mapping[str, Any]], dict[str, Any]]


class StreamState:
    """What one stream has shown so far; subclasses read their SDK's chunk types."""

    __slots__ = (
        "call",
        "capture",
        "context",
        "finish_reasons",
        "input_tokens",
        "output_tokens",
        "response_model",
        "text",
    )

    def __init__(self, call: GenAICall) -> None:
        self.call = call
        call.chunks = 0
        self.capture = call.rt.settings.capture_content
        self.response_model: str | None = None
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.finish_reasons: list[str] = []
        self.text: list[str] | None = [] if self.capture else None
        #: A copy of the context the call was made in (see :meth:`abandoned`).
        self.context: contextvars.Context | None = contextvars.copy_context()

    def read(self, item: Any) -> bool:
        """Take what is useful from one chunk (implemented per SDK).

        Returns whether the chunk carries output (text, a tool call's arguments): the first
        such chunk is the time to first token, not a chunk that only opens the message
        (a role, ``message_start``).
        """
        return True

    def item(self, item: Any) -> None:
        call = self.call
        try:
            call.chunks = (call.chunks or 0) + 1
            if self.read(item) and call.ttft_ms is None:
                call.first_chunk()
        except Exception as exc:
            internal_error("reading a stream chunk", exc)

    def stopped(self, exc: BaseException | None) -> None:
        """The stream stopped: exhausted (``None``), closed early (``GeneratorExit``) or failed.

        Ended in the context the call was made in, wherever it is read to its end: a
        stream returned from a handler is read by the framework (``StreamingResponse``)
        after the handler's ``with ri.request_context(...)`` and stage blocks have ended,
        and its line keeps that request's values and stage all the same.
        """
        if isinstance(exc, GeneratorExit):
            self.abandoned()
            return
        context, self.context = self.context, None
        if exc is None:
            _run_in(context, functools.partial(self.end, completed=True))
        else:
            _run_in(context, functools.partial(self.end, exc))

    def abandoned(self) -> None:
        """End a stream left unfinished, from wherever it is collected.

        The collector (or the event loop's async generator finalizer) runs this in whatever
        context is current then, maybe another request's: the call ends in the context it
        was made in, so its line carries that request's values and stage.
        """
        context, self.context = self.context, None
        _run_in(context, functools.partial(self.end, completed=False))

    def end(self, exc: BaseException | None = None, *, completed: bool = False) -> None:
        self.call.finish(
            exc,
            response_model=self.response_model,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            finish_reasons=self.finish_reasons or None,
            output_text="".join(self.text) if self.text is not None else None,
            completed=completed,
        )


def _run_in(context: contextvars.Context | None, end: Callable[[], None]) -> None:
    """Run ``end`` in ``context`` (where a call was made), or here if that cannot be."""
    if context is None:
        end()
        return
    try:
        context.run(end)
    except RuntimeError:  # that context is running right now: end it here
        end()


def _iterate(inner: Iterator[Any], state: StreamState) -> Iterator[Any]:
    try:
        for item in inner:
            state.item(item)
            yield item
    except BaseException as exc:  # GeneratorExit included: closed early
        state.stopped(exc)
        raise
    state.stopped(None)


async def _aiterate(inner: AsyncIterator[Any], state: StreamState) -> AsyncIterator[Any]:
    try:
        async for item in inner:
            state.item(item)
            yield item
    except BaseException as exc:  # GeneratorExit included: closed early
        state.stopped(exc)
        raise
    state.stopped(None)


def _wrap_stream(stream: Any, state: StreamState) -> None:
    """Wrap the SDK stream's ``_iterator`` and shadow its ``close`` (sync or async)."""
    ref = weakref.ref(stream)
    original_close = type(stream).close
    close: Callable[[], Any]
    if inspect.iscoroutinefunction(original_close):
        stream._iterator = _aiterate(stream._iterator, state)

        async def aclose() -> None:
            state.abandoned()  # ended in the context the call was made in
            target = ref()
            if target is not None:
                await original_close(target)

        close = aclose
    else:
        stream._iterator = _iterate(stream._iterator, state)

        def sync_close() -> None:
            state.abandoned()  # ended in the context the call was made in
            target = ref()
            if target is not None:
                original_close(target)

        close = sync_close
    stream.close = close
    weakref.finalize(stream, state.abandoned)


#: The header the SDKs (Stainless-made, both) set on ``with_raw_response`` ("true") and
#: ``with_streaming_response`` ("stream") calls.
_RAW_RESPONSE_HEADER: Final = "X-Stainless-Raw-Response"


def _raw_stream(kwargs: Mapping[str, Any]) -> bool:
    """Whether a call asked for a stream whose raw response comes back to be parsed.

    ``with_streaming_response`` calls are not: their body is the caller's to read (the
    span ends when the call returns, as documented).
    """
    if kwargs.get("stream") is not True:
        return False
    headers = kwargs.get("extra_headers")
    mode = headers.get(_RAW_RESPONSE_HEADER) if isinstance(headers, Mapping) else None
    return mode != "stream"


def _unread_raw(result: Any) -> bool:
    """Whether ``result`` is a ``with_raw_response`` result whose body is still unread.

    That is a streamed call's (``stream=True``): its stream comes from ``parse()``.
    """
    if not callable(getattr(type(result), "parse", None)):
        return False
    http = getattr(result, "http_response", None)
    return http is not None and getattr(http, "is_closed", True) is False


def _wrap_raw_stream(
    result: Any,
    call: GenAICall,
    make_state: Callable[[GenAICall], StreamState],
    stream_types: tuple[type, ...],
) -> None:
    """A raw streamed response: the call goes on in the stream ``parse()`` returns.

    A response never parsed into a stream ends the call when it is collected.
    """
    original = type(result).parse
    ref = weakref.ref(result)
    wrapped = [False]
    # Where the call was made: a response never parsed ends there when collected, wherever
    # the collector runs (another request's code), as an abandoned stream does.
    context = contextvars.copy_context()

    def take(parsed: Any) -> Any:
        if not wrapped[0] and isinstance(parsed, stream_types):
            wrapped[0] = True
            try:
                _wrap_stream(parsed, make_state(call))
            except Exception as exc:
                internal_error("wrapping a stream", exc)
                call.finish(None)
        return parsed

    def never_parsed() -> None:
        if not wrapped[0]:  # the body may have been read another way: nothing said of it
            _run_in(context, call.finish)

    parse: Callable[..., Any]
    if inspect.iscoroutinefunction(original):

        async def async_parse(*args: Any, **kwargs: Any) -> Any:
            return take(await original(ref(), *args, **kwargs))

        parse = async_parse
    else:

        def sync_parse(*args: Any, **kwargs: Any) -> Any:
            return take(original(ref(), *args, **kwargs))

        parse = sync_parse
    result.parse = functools.wraps(original)(parse)
    weakref.finalize(result, never_parsed)


def _start(
    system: str,
    describe: Describe,
    kwargs: Mapping[str, Any],
    secrets: Callable[[], tuple[str, ...]] | None,
    http: Watch | None,
) -> GenAICall | None:
    rt = get_runtime()
    if not rt.enabled:
        return None
    try:
        found = secrets() if secrets is not None else ()
        call = start_call(rt, system=system, secrets=found, **describe(kwargs))
        call.http = http
        call.attach()
    except Exception as exc:
        internal_error("starting an llm call", exc)
        return None
    return call


def instrumented(
    original: Callable[..., Any],
    *,
    system: str,
    describe: Describe,
    on_result: Callable[[GenAICall, Any], None],
    stream_types: tuple[type, ...] = (),
    make_state: Callable[[GenAICall], StreamState] | None = None,
    is_async: bool | None = None,
    secrets: Callable[[], tuple[str, ...]] | None = None,
    http: Watch | None = None,
) -> Callable[..., Any]:
    """Wrap one SDK method (sync or async) so that each call is a GenAI call.

    Args:
        original: the bound method.
        system: ``gen_ai.provider.name``.
        describe: the span's description from the call's keyword arguments.
        on_result: finishes the call from a non-stream response.
        stream_types: the SDK's stream classes (sync and async).
        make_state: the stream state for a streamed response.
        is_async: whether ``original`` returns an awaitable (the SDKs' async methods are
            plain functions behind their decorators, so the caller says so).
        secrets: returns the client's credentials, read at each call, to be scrubbed
            literally from everything recorded for it (see :func:`client_secrets`).
        http: the ``"retrying"`` line's target and the SDK's status -> error name: each
            HTTP attempt the call makes through a client watched by
            :func:`~rag_instrument.integrations._sdk.watch_http_client` is recorded.
    """

    # The decisions, shared by the sync and the async method below.
    def failed(call: GenAICall, exc: BaseException) -> None:
        call.detach()
        call.finish(exc)

    def finish(call: GenAICall, result: Any, streamed: bool) -> None:
        call.detach()
        if stream_types and make_state is not None:
            try:
                if isinstance(result, stream_types):
                    _wrap_stream(result, make_state(call))
                    return
                if streamed and _unread_raw(result):  # with_raw_response(stream=True)
                    _wrap_raw_stream(result, call, make_state, stream_types)
                    return
            except Exception as exc:
                internal_error("wrapping a stream", exc)
                call.finish(None)
                return
        try:
            on_result(call, result)
        except Exception as exc:
            internal_error("reading a response", exc)
            call.finish(None)

    if is_async is None:
        is_async = inspect.iscoroutinefunction(original)
    if is_async:

        @functools.wraps(original)
        async def async_method(*args: Any, **kwargs: Any) -> Any:
            call = _start(system, describe, kwargs, secrets, http)
            if call is None:
                return await original(*args, **kwargs)
            try:
                result = await original(*args, **kwargs)
            except BaseException as exc:
                failed(call, exc)
                raise
            finish(call, result, _raw_stream(kwargs))
            return result

        return async_method

    @functools.wraps(original)
    def method(*args: Any, **kwargs: Any) -> Any:
        call = _start(system, describe, kwargs, secrets, http)
        if call is None:
            return original(*args, **kwargs)
        try:
            result = original(*args, **kwargs)
        except BaseException as exc:
            failed(call, exc)
            raise
        finish(call, result, _raw_stream(kwargs))
        return result

    return method


def client_secrets(
    client: Any, names: tuple[str, ...] = ("api_key",)
) -> Callable[[], tuple[str, ...]]:
    """A function returning the client's credentials (read at call time, weakly held).

    Those long enough to scrub literally, as :class:`~rag_instrument._genai.Secrets`: each
    call takes them without checking them again.
    """
    ref = weakref.ref(client)
    # The values last read and what they gave, replaced whole: the same keys (the usual
    # case) give the same tuple back, without building one per call.
    memo: list[tuple[object, Secrets]] = [(object(), Secrets())]
    # One C call for the usual client (its value, or a tuple of values for several names).
    get = operator.attrgetter(*names)
    several = len(names) > 1

    def read() -> tuple[str, ...]:
        target = ref()
        if target is None:
            return ()
        values: Any
        try:
            values = get(target)
        except AttributeError:  # a client without one of them
            values = tuple(getattr(target, name, None) for name in names) if several else None
        last_values, last_found = memo[0]
        if values == last_values:  # str values: equal is the same key
            return last_found
        found = usable_secrets(values if several else (values,))
        memo[0] = (values, found)
        return found

    return read


def instrumented_already(client: Any, cache: object, sdk: str) -> bool:
    """Whether ``client`` is instrumented already (then instrumenting it again does nothing).

    A client instrumented with a cache keeps that one, whatever ``cache`` says now (a
    function that instruments the same client on every call keeps working).

    Raises:
        ValueError: it is, without a response cache, and ``cache`` asks for one: going on
            silently would cache nothing.
    """
    if getattr(client, MARKER, None) is None:
        return False
    if cache is None or cache is False or getattr(client, CACHE_MARKER, None) is not None:
        return True
    raise ValueError(
        f"this {sdk} client is already instrumented without a response cache: call "
        f"ri.uninstrument_{sdk}(client) first, then instrument it with cache={cache!r:.200}"
    )


def instrument_methods(
    client: Any,
    targets: list[tuple[Any, str, Callable[[Callable[..., Any]], Callable[..., Any]]]],
    instrument: Callable[[Any], Any] | None = None,
    cache: object = None,
) -> bool:
    """Patch ``name`` on each resource object; ``False`` if the client already was.

    With ``instrument``, the client's ``copy`` and ``with_options`` (an alias of ``copy``
    in both SDKs, looked up on the class, so both are patched) are patched too, so that
    the copies they return are instrumented by ``instrument(copy)``. ``cache``: the
    response cache the client is instrumented with (see :func:`instrumented_already`).
    """
    if getattr(client, MARKER, None) is not None:
        return False
    patched: list[tuple[Any, str]] = []
    for resource, name, wrap in targets:
        original = getattr(resource, name)
        setattr(resource, name, wrap(original))
        patched.append((resource, name))
    if instrument is not None:
        for name in ("copy", "with_options"):
            original = getattr(client, name, None)
            if callable(original):
                setattr(client, name, _instrumenting_copy(original, instrument))
                patched.append((client, name))
    setattr(client, CACHE_MARKER, cache)
    setattr(client, MARKER, patched)
    return True


def _instrumenting_copy(
    original: Callable[..., Any], instrument: Callable[[Any], Any]
) -> Callable[..., Any]:
    @functools.wraps(original)
    def copy(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        try:
            instrument(result)
        except Exception as exc:
            internal_error("instrumenting a client copy", exc)
        return result

    return copy


def uninstrument_methods(client: Any) -> bool:
    """Undo :func:`instrument_methods`; ``False`` if the client was not instrumented."""
    patched = getattr(client, MARKER, None)
    if patched is None:
        return False
    for resource, name in patched:
        resource.__dict__.pop(name, None)
    delattr(client, MARKER)
    client.__dict__.pop(CACHE_MARKER, None)
    return True


def role_texts(messages: Any, system: Any = None) -> list[tuple[str, str]]:
    """Chat messages as ``(role, text)`` pairs, for ``gen_ai.input.messages``.

    ``system``: a separate system prompt (Anthropic's ``system=``), first. A message
    without a role is the user's.
    """
    out: list[tuple[str, str]] = []
    text = text_of(system)
    if text:
        out.append(("system", text))
    if isinstance(messages, str):
        return [*out, ("user", messages)]
    for message in messages if isinstance(messages, list | tuple) else ():
        role = message.get("role") if isinstance(message, Mapping) else None
        out.append((role if isinstance(role, str) and role else "user", text_of(message)))
    return out


def materialize_messages(kwargs: Any, name: str = "messages") -> None:
    """Turn a one-shot iterable of messages (a generator) into a list, in place.

    The SDK reads it once; so would the capture of its text: a list serves both.
    """
    messages = kwargs.get(name) if isinstance(kwargs, dict) else None
    if messages is None or isinstance(messages, list | tuple | str | bytes | Mapping):
        return
    try:
        kwargs[name] = list(messages)
    except TypeError:  # not iterable: the SDK says what it thinks of it
        return


def text_of(value: Any) -> str:
    """The text in chat messages: strings, content parts and message lists."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return text_of(value.get("content") or value.get("text") or "")
    if isinstance(value, list | tuple):
        return "\n".join(t for t in (text_of(v) for v in value) if t)
    return ""
