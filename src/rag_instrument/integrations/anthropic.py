"""Instrument an Anthropic client instance: ``messages.create``, streams included.

::

    client = ri.instrument_anthropic(anthropic.AsyncAnthropic())
    message = await client.messages.create(model="claude-sonnet-4-5", max_tokens=512,
                                           messages=[{"role": "user", "content": "..."}])

Each call becomes one GenAI span (``chat claude-sonnet-4-5``) with token usage, one log line
and the GenAI metrics, and counts as ``llm`` in the enclosing stage's breakdown. With
``stream=True`` the SDK's own ``Stream`` is returned; its span lasts until the stream is
exhausted, closed or collected, and records the time to the first event and the usage the
``message_start`` / ``message_delta`` events carry.

Copies made with ``client.with_options(...)`` / ``client.copy(...)`` are instrumented too,
and the client's own ``api_key`` / ``auth_token`` are scrubbed, as literals, from everything
recorded for its calls.

The ``messages.stream()`` helper is traced too: the manager it returns stays the SDK's
``MessageStreamManager`` (its class is swapped for a subclass whose ``__enter__`` /
``__aenter__`` is the traced request), and the span lasts from ``with`` to the end of the
stream, with time to first token and usage. ``with_raw_response`` calls get token usage.

The SDK's own retries are recorded attempt by attempt (see
:mod:`rag_instrument.integrations._sdk`; the ``httpx`` client is the SDK's private
``_client`` attribute). With ``cache=ri.CacheSpec(...)`` (or ``cache=True``),
``messages.create`` is answered from a response cache; streams never are.

Supported: ``anthropic>=0.34``; per-attempt retries, the stream helper and the cache are
tested with ``anthropic`` 2.15.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

try:
    import anthropic
except ImportError as _exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "rag_instrument.integrations.anthropic needs 'anthropic': "
        "pip install 'rag_instrument[anthropic]'"
    ) from _exc

from rag_instrument._genai import GenAICall
from rag_instrument._utils import internal_error
from rag_instrument.cache import TOOL_CALL_REASONS, CacheSpec
from rag_instrument.integrations._cache import cache_spec, cached_method
from rag_instrument.integrations._sdk import (
    raw_body,
    status_error_names,
    watch_http_client,
)
from rag_instrument.integrations._streams import (
    StreamState,
    client_secrets,
    instrument_methods,
    instrumented,
    instrumented_already,
    materialize_messages,
    role_texts,
    uninstrument_methods,
)

__all__ = ["instrument_anthropic", "uninstrument_anthropic"]

C = TypeVar("C")
SYSTEM = "anthropic"


def _describe(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    materialize_messages(kwargs)
    return {
        "operation": "chat",
        "model": str(kwargs.get("model") or "unknown"),
        "params": kwargs,
        # Built only when content capture is on: the system prompt, then each message.
        "prompt": functools.partial(role_texts, kwargs.get("messages"), kwargs.get("system")),
    }


def _finish(call: GenAICall, result: Any) -> None:
    result = raw_body(result) or result
    usage = getattr(result, "usage", None)
    reason = getattr(result, "stop_reason", None)
    text = None
    if call.rt.settings.capture_content:
        parts = [getattr(b, "text", None) for b in getattr(result, "content", None) or ()]
        text = "".join(p for p in parts if isinstance(p, str))
    call.finish(
        None,
        response_model=getattr(result, "model", None),
        input_tokens=_input_tokens(usage),
        output_tokens=getattr(usage, "output_tokens", None),
        finish_reasons=[str(reason)] if reason else None,
        output_text=text,
    )


class _MessageStream(StreamState):
    """Reads raw Messages stream events."""

    __slots__ = ()

    def read(self, item: Any) -> bool:
        kind = getattr(item, "type", None)
        if kind == "message_start":
            message = getattr(item, "message", None)
            self.response_model = getattr(message, "model", None) or self.response_model
            usage = getattr(message, "usage", None)
            self.input_tokens = _input_tokens(usage)
        elif kind == "message_delta":
            usage = getattr(item, "usage", None)
            if getattr(usage, "input_tokens", None) is not None:  # newer APIs: final counts
                self.input_tokens = _input_tokens(usage)
            output = getattr(usage, "output_tokens", None)
            if output is not None:
                self.output_tokens = output
            reason = getattr(getattr(item, "delta", None), "stop_reason", None)
            if reason:
                self.finish_reasons.append(str(reason))
        elif kind == "content_block_delta":  # text, a tool's input, thinking: output
            if self.text is not None:
                text = getattr(getattr(item, "delta", None), "text", None)
                if isinstance(text, str):
                    self.text.append(text)
            return True
        return False


@functools.cache
def _error_names() -> Callable[[int], str]:
    return status_error_names(anthropic)


@functools.cache
def _traced_manager(base: Any) -> type:
    """A subclass of the SDK's (async) ``MessageStreamManager`` whose entry is a traced call.

    ``messages.stream()`` returns a manager that sends the request only on ``with`` /
    ``async with``; the instance's class is swapped for this subclass, so it stays an
    instance of the SDK's class with all of its behaviour, and entering it goes through
    the function set by :func:`_instrument_stream_helper`.
    """

    def __enter__(self: Any) -> Any:
        enter = self.__dict__.pop("_rag_instrument_enter", None)
        if enter is None:
            return base.__enter__(self)
        return enter()

    async def __aenter__(self: Any) -> Any:
        enter = self.__dict__.pop("_rag_instrument_enter", None)
        if enter is None:
            return await base.__aenter__(self)
        return await enter()

    namespace: dict[str, Any] = {"__module__": __name__, "__qualname__": base.__qualname__}
    if hasattr(base, "__aenter__"):
        namespace["__aenter__"] = __aenter__
    else:
        namespace["__enter__"] = __enter__
    return type(base.__name__, (base,), namespace)


def _stream_helper(
    original: Callable[..., Any],
    *,
    is_async: bool,
    secrets: Callable[[], tuple[str, ...]],
    names: Callable[[int], str],
) -> Callable[..., Any]:
    from anthropic.lib.streaming import AsyncMessageStream, MessageStream

    @functools.wraps(original)
    def stream(*args: Any, **kwargs: Any) -> Any:
        manager = original(*args, **kwargs)
        try:
            base: Any = type(manager)
            enter = base.__aenter__ if is_async else base.__enter__
            manager._rag_instrument_enter = instrumented(
                functools.partial(enter, manager),
                system=SYSTEM,
                describe=lambda _: _describe(kwargs),
                on_result=_finish,
                stream_types=(MessageStream, AsyncMessageStream),
                make_state=_MessageStream,
                is_async=is_async,
                secrets=secrets,
                http=("anthropic.chat", names),
            )
            manager.__class__ = _traced_manager(base)
        except Exception as exc:
            internal_error("instrumenting a messages.stream() manager", exc)
        return manager

    return stream


#: The usage fields that count input tokens: the new ones, and those read from or written
#: to Anthropic's prompt cache (the GenAI conventions count them all as input tokens).
_INPUT_FIELDS: Final = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


def _input_tokens(usage: Any) -> int | None:
    """All the input tokens of ``usage`` (``None`` when it reports none)."""
    total: int | None = None
    for name in _INPUT_FIELDS:
        value = getattr(usage, name, None)
        if type(value) is int:
            total = value if total is None else total + value
    return total


def _not_a_tool_call(result: Any) -> bool:
    """Whether a message may be cached: not when it asks for a tool."""
    if getattr(result, "stop_reason", None) in TOOL_CALL_REASONS:
        return False
    return all(getattr(b, "type", None) != "tool_use" for b in getattr(result, "content", ()) or ())


def _message_tokens(result: Any) -> int:
    usage = getattr(result, "usage", None)
    output = getattr(usage, "output_tokens", None)
    return (_input_tokens(usage) or 0) + (output if type(output) is int else 0)


def instrument_anthropic(client: C, *, cache: CacheSpec | bool | object | None = None) -> C:
    """Instrument an ``anthropic.Anthropic`` or ``anthropic.AsyncAnthropic`` client in place.

    Instrumenting twice does nothing the second time (but asking for a cache a client
    instrumented without one raises); undo with
    :func:`uninstrument_anthropic`.

    Args:
        client: the client.
        cache: a :class:`~rag_instrument.cache.CacheSpec` (or ``True`` for the defaults)
            answers ``messages.create`` from a response cache; ``None`` (the default)
            caches nothing.
            A class or object with ``CacheMixin``'s ``cache_*`` attributes (a
            ``CacheMixin`` provider class) gives the same settings.

    Returns:
        The same client, for chaining.

    Raises:
        TypeError: ``client`` is not an Anthropic client.
        ValueError: ``cache`` is none of these; or the client is instrumented already,
            without a cache, and ``cache`` asks for one (uninstrument it first).
    """
    if not isinstance(client, anthropic.Anthropic | anthropic.AsyncAnthropic):
        raise TypeError(
            f"instrument_anthropic expects an Anthropic client, got {type(client).__name__}"
        )
    spec = cache_spec(cache)
    if instrumented_already(client, cache, "anthropic"):
        return client
    is_async = isinstance(client, anthropic.AsyncAnthropic)
    streams = (anthropic.Stream, anthropic.AsyncStream)
    secrets = client_secrets(client, ("api_key", "auth_token"))
    names = _error_names()
    watch_http_client(client, is_async)

    def messages(original: Any, *, cache_it: bool = True) -> Any:
        inner = original
        if spec is not None and cache_it:
            scope = {"sdk": SYSTEM, "operation": "chat", "base_url": str(client.base_url)}
            inner = cached_method(
                original,
                spec=spec,
                is_async=is_async,
                scope=scope,
                result_type=anthropic.types.Message,
                tokens=_message_tokens,
                keep=_not_a_tool_call,
            )
        return instrumented(
            inner,
            system=SYSTEM,
            describe=_describe,
            on_result=_finish,
            stream_types=streams,
            make_state=_MessageStream,
            is_async=is_async,
            secrets=secrets,
            http=("anthropic.chat", names),
        )

    def stream_helper(original: Any) -> Any:
        return _stream_helper(original, is_async=is_async, secrets=secrets, names=names)

    # Structured output (messages.parse) posts to the same endpoint without going through
    # create(): traced the same way, never cached (its parsed value is an object of the
    # caller's class).
    parse = functools.partial(messages, cache_it=False)

    targets: list[tuple[Any, str, Callable[[Callable[..., Any]], Callable[..., Any]]]] = [
        (client.messages, "create", messages),
        (client.messages, "stream", stream_helper),
    ]
    if callable(getattr(client.messages, "parse", None)):
        targets.append((client.messages, "parse", parse))
    instrument_methods(
        client,
        targets,
        instrument=functools.partial(instrument_anthropic, cache=spec),
        cache=spec,
    )
    return client


def uninstrument_anthropic(client: Any) -> None:
    """Restore a client instrumented by :func:`instrument_anthropic` (no-op otherwise)."""
    uninstrument_methods(client)
