"""Instrument an OpenAI client instance: chat completions (streams included) and embeddings.

::

    client = ri.instrument_openai(openai.AsyncOpenAI())
    reply = await client.chat.completions.create(model="gpt-4o-mini", messages=[...])

Each call becomes one GenAI span (``chat gpt-4o-mini``, ``embeddings text-embedding-3-small``)
with token usage, one log line and the GenAI metrics; chat calls count as ``llm`` and
embeddings as ``embedding`` in the enclosing stage's breakdown. With ``stream=True`` the
SDK's own ``Stream`` is returned; its span lasts until the stream is exhausted, closed or
collected, and records the time to the first chunk (pass
``stream_options={"include_usage": True}`` to get token usage on streams).

Copies made with ``client.with_options(...)`` / ``client.copy(...)`` are instrumented too;
:func:`uninstrument_openai` undoes the original client only (copies already made stay
instrumented). The client's own ``api_key`` is scrubbed, as a literal, from everything
recorded for its calls, whatever its shape (Azure keys are plain hex).

The SDK's own retries (``max_retries``) are recorded attempt by attempt on the call's span
(``"retry"`` events, ``rag.retry.attempts``, ``"retrying"`` lines: see
:mod:`rag_instrument.integrations._sdk`), through the ``send`` method of the client's
``httpx`` client, which the SDK keeps in its private attribute ``_client``; a client
without it is instrumented all the same, without per-attempt records.

``client.chat.completions.with_raw_response.create(...)`` calls get token usage (read from
the body the SDK has already read); ``with_streaming_response`` calls get their span,
duration, log line and errors but no usage (their body is the caller's to read, after the
span has ended).

With ``cache=ri.CacheSpec(...)`` (or ``cache=True``), ``chat.completions.create`` and
``embeddings.create`` are answered from a response cache (see
:mod:`rag_instrument.integrations._cache`); streams never are.

Supported: ``openai>=1.40`` (sync ``OpenAI`` and async ``AsyncOpenAI`` clients, and their
Azure variants); per-attempt retries and the cache are tested with ``openai`` 3.57.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

try:
    import openai
except ImportError as _exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "rag_instrument.integrations.openai needs 'openai': pip install 'rag_instrument[openai]'"
    ) from _exc

from rag_instrument import attributes as attr
from rag_instrument._genai import GenAICall
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
    text_of,
    uninstrument_methods,
)

__all__ = ["instrument_openai", "uninstrument_openai"]

C = TypeVar("C")
SYSTEM = "openai"


def _describe_chat(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    materialize_messages(kwargs)
    return {
        "operation": "chat",
        "model": str(kwargs.get("model") or "unknown"),
        "params": kwargs,
        # Built only if captured: each message with its role.
        "prompt": functools.partial(role_texts, kwargs.get("messages")),
    }


def _describe_embeddings(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "operation": "embeddings",
        "model": str(kwargs.get("model") or "unknown"),
        "params": {},
        "prompt": functools.partial(text_of, kwargs.get("input")),
        "breakdown_kind": attr.BREAKDOWN_EMBEDDING,
        "span_kind": attr.SpanKind.EMBEDDING,
    }


def _usage(result: Any) -> tuple[int | None, int | None]:
    usage = getattr(result, "usage", None)
    if usage is None:
        return None, None
    return getattr(usage, "prompt_tokens", None), getattr(usage, "completion_tokens", None)


def _finish_chat(call: GenAICall, result: Any) -> None:
    result = raw_body(result) or result
    choices = getattr(result, "choices", None) or ()
    input_tokens, output_tokens = _usage(result)
    reasons = []
    for choice in choices:  # a loop, not a comprehension: no frame of its own (3.11)
        reason = getattr(choice, "finish_reason", None)
        if reason:
            reasons.append(str(reason))
    text = None
    if call.rt.settings.capture_content and choices:
        text = getattr(getattr(choices[0], "message", None), "content", None)
    call.finish(
        None,
        response_model=getattr(result, "model", None),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        finish_reasons=reasons,
        output_text=text if isinstance(text, str) else None,
    )


def _finish_embeddings(call: GenAICall, result: Any) -> None:
    result = raw_body(result) or result
    input_tokens, _ = _usage(result)
    call.finish(None, response_model=getattr(result, "model", None), input_tokens=input_tokens)


class _ChatStream(StreamState):
    """Reads ``ChatCompletionChunk`` objects."""

    __slots__ = ()

    def read(self, item: Any) -> bool:
        model = getattr(item, "model", None)
        if model:
            self.response_model = model
        usage = getattr(item, "usage", None)
        if usage is not None:
            self.input_tokens = getattr(usage, "prompt_tokens", None)
            self.output_tokens = getattr(usage, "completion_tokens", None)
        output = False
        for choice in getattr(item, "choices", None) or ():
            reason = getattr(choice, "finish_reason", None)
            if reason:
                self.finish_reasons.append(str(reason))
            delta = getattr(choice, "delta", None)
            content = getattr(delta, "content", None)
            if isinstance(content, str) and content:
                output = True
                if self.text is not None:
                    self.text.append(content)
            elif (
                getattr(delta, "tool_calls", None)
                or getattr(delta, "function_call", None)
                or getattr(delta, "refusal", None)
            ):
                output = True
        return output


@functools.cache
def _error_names() -> Callable[[int], str]:
    return status_error_names(openai)


def _not_a_tool_call(result: Any) -> bool:
    """Whether a chat completion may be cached: not when it asks for a tool."""
    for choice in getattr(result, "choices", None) or ():
        if getattr(choice, "finish_reason", None) in TOOL_CALL_REASONS:
            return False
        message = getattr(choice, "message", None)
        if getattr(message, "tool_calls", None) or getattr(message, "function_call", None):
            return False
    return True


def _chat_tokens(result: Any) -> int:
    usage = getattr(result, "usage", None)
    return int(getattr(usage, "total_tokens", 0) or 0)


def instrument_openai(client: C, *, cache: CacheSpec | bool | object | None = None) -> C:
    """Instrument an ``openai.OpenAI`` or ``openai.AsyncOpenAI`` client in place.

    Instrumenting twice does nothing the second time (but asking for a cache a client
    instrumented without one raises); undo with :func:`uninstrument_openai`.

    Args:
        client: the client.
        cache: a :class:`~rag_instrument.cache.CacheSpec` (or ``True`` for the defaults)
            answers ``chat.completions.create`` and ``embeddings.create`` from a response
            cache; ``None`` (the default) caches nothing.
            A class or object with ``CacheMixin``'s ``cache_*`` attributes (a
            ``CacheMixin`` provider class) gives the same settings.

    Returns:
        The same client, for chaining.

    Raises:
        TypeError: ``client`` is not an OpenAI client.
        ValueError: ``cache`` is none of these; or the client is instrumented already,
            without a cache, and ``cache`` asks for one (uninstrument it first).
    """
    if not isinstance(client, openai.OpenAI | openai.AsyncOpenAI):
        raise TypeError(f"instrument_openai expects an OpenAI client, got {type(client).__name__}")
    spec = cache_spec(cache)
    if instrumented_already(client, cache, "openai"):
        return client
    is_async = isinstance(client, openai.AsyncOpenAI)
    streams = (openai.Stream, openai.AsyncStream)
    secrets = client_secrets(client)
    names = _error_names()
    watch_http_client(client, is_async)

    def cached(original: Any, operation: str, result_type: type) -> Any:
        if spec is None:
            return original
        scope = {"sdk": SYSTEM, "operation": operation, "base_url": str(client.base_url)}
        return cached_method(
            original,
            spec=spec,
            is_async=is_async,
            scope=scope,
            result_type=result_type,
            tokens=_chat_tokens,
            keep=_not_a_tool_call,
        )

    def chat(original: Any, *, cache_it: bool = True) -> Any:
        inner = cached(original, "chat", openai.types.chat.ChatCompletion) if cache_it else original
        return instrumented(
            inner,
            system=SYSTEM,
            describe=_describe_chat,
            on_result=_finish_chat,
            stream_types=streams,
            make_state=_ChatStream,
            is_async=is_async,
            secrets=secrets,
            http=("openai.chat", names),
        )

    def embeddings(original: Any) -> Any:
        inner = cached(original, "embeddings", openai.types.CreateEmbeddingResponse)
        return instrumented(
            inner,
            system=SYSTEM,
            describe=_describe_embeddings,
            on_result=_finish_embeddings,
            is_async=is_async,
            secrets=secrets,
            http=("openai.embeddings", names),
        )

    # Structured output (chat.completions.parse) posts to the same endpoint without going
    # through create(): traced the same way, never cached (its parsed value is an object of
    # the caller's class).
    parse = functools.partial(chat, cache_it=False)

    targets: list[tuple[Any, str, Callable[[Callable[..., Any]], Callable[..., Any]]]] = [
        (client.chat.completions, "create", chat),
        (client.embeddings, "create", embeddings),
    ]
    if callable(getattr(client.chat.completions, "parse", None)):
        targets.append((client.chat.completions, "parse", parse))
    instrument_methods(
        client,
        targets,
        instrument=functools.partial(instrument_openai, cache=spec),
        cache=spec,
    )
    return client


def uninstrument_openai(client: Any) -> None:
    """Restore a client instrumented by :func:`instrument_openai` (no-op otherwise)."""
    uninstrument_methods(client)
