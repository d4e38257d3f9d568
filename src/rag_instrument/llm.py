"""LLM providers: an instrumented base class for any model API.

Subclass :class:`LLMProvider`, name the ``system`` and ``model``, implement ``_generate``::

    class Granite(ri.RetryMixin, ri.LLMProvider):
        system = "watsonx"
        model = "ibm/granite-13b-chat-v2"
        timeout = 30.0

        async def _generate(self, prompt: str, **params: Any) -> ri.LLMResult:
            ...

    text = await Granite().generate("Summarise: ...", temperature=0)

Every :meth:`LLMProvider.generate` is one CLIENT span ``"chat {model}"`` with the
OpenTelemetry GenAI attributes, one ``"llm call completed"`` log line, the GenAI duration
and token histograms, and an ``llm`` entry in the enclosing stage's breakdown.

The mixins plug in through one cooperative method, ``_invoke``: ``generate`` opens the
span and calls ``self._invoke(request)``; :class:`~rag_instrument.cache.CacheMixin` answers
from its cache or calls on, :class:`~rag_instrument.retry.RetryMixin` repeats what follows
it, and :class:`LLMProvider` itself makes one attempt (under ``timeout``). List the mixins
before ``LLMProvider`` (cache first), so that a cache hit never retries and every retry
has its own deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import inspect
import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Final

from rag_instrument._genai import GenAICall, start_call
from rag_instrument._pools import LLM_CALLS, worker_pool
from rag_instrument._runtime import get_runtime
from rag_instrument._utils import internal_error

__all__ = ["LLMProvider", "LLMRequest", "LLMResult"]

#: Name prefix of the worker threads that run synchronous ``_generate`` methods.
LLM_THREAD_PREFIX: Final = LLM_CALLS.thread_name_prefix


def llm_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The library's own pool for synchronous ``_generate`` calls (see ``_pools``)."""
    return worker_pool(LLM_CALLS)


@dataclasses.dataclass(frozen=True, slots=True)
class LLMResult:
    """What a model call produced, with what it cost.

    Args:
        text: the generated text.
        input_tokens: prompt tokens billed, if the API reports them.
        output_tokens: completion tokens billed, if the API reports them.
        finish_reason: why generation stopped (``"stop"``, ``"length"``, ...).
        model: the model that answered (may differ from the one requested).
    """

    text: str
    input_tokens: int | None = None
    output_tokens: int | None = None
    finish_reason: str | None = None
    model: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (the cache's storage form)."""
        return {
            "text": self.text,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "finish_reason": self.finish_reason,
            "model": self.model,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LLMResult:
        """Rebuild a result from :meth:`to_dict` output.

        Raises:
            TypeError: ``data`` does not have the shape of a result.
        """
        text = data.get("text")
        if not isinstance(text, str):
            raise TypeError("an LLMResult needs a str 'text'")
        fields: dict[str, Any] = {}
        for name in ("input_tokens", "output_tokens"):
            value = data.get(name)
            if value is not None and type(value) is not int:
                raise TypeError(f"an LLMResult's {name!r} must be an int or None")
            fields[name] = value
        for name in ("finish_reason", "model"):
            value = data.get(name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"an LLMResult's {name!r} must be a str or None")
            fields[name] = value
        return cls(text, **fields)


@dataclasses.dataclass(slots=True)
class LLMRequest:
    """One ``generate`` call as it travels through the mixins' ``_invoke`` chain.

    Attributes:
        prompt: the prompt.
        params: the keyword arguments for ``_generate``.
        cache: ``False`` when the caller asked to bypass the cache.
        cache_namespace: the call's cache namespace (e.g. a tenant id), if any.
        call: the call's telemetry, or ``None`` when telemetry is disabled.
    """

    prompt: str
    params: dict[str, Any]
    cache: bool = True
    cache_namespace: str | None = None
    call: GenAICall | None = None


def _result_fields(result: object) -> dict[str, Any]:
    if isinstance(result, LLMResult):
        return {
            "response_model": result.model,
            "input_tokens": result.input_tokens,
            "output_tokens": result.output_tokens,
            "finish_reasons": [result.finish_reason] if result.finish_reason else None,
            "output_text": result.text,
        }
    if isinstance(result, str):
        return {"output_text": result}
    return {}


class LLMProvider:
    """Base class of an instrumented model provider.

    Class attributes:
        system: the provider, as ``gen_ai.provider.name`` (``"openai"``, ``"watsonx"``...).
        model: the model requested, as ``gen_ai.request.model``.
        timeout: seconds allowed per attempt, or ``None``; past it the attempt raises
            :class:`TimeoutError` (which :class:`~rag_instrument.retry.RetryMixin` retries).

    ``_generate`` may be ``async def`` or a plain ``def`` (a synchronous vendor SDK): a plain
    one runs in a worker thread of the library's own pool (threads named
    ``rag_instrument-llm_N``), with the caller's context (spans, bound log context, the
    stage's breakdown) carried over, so the event loop keeps running while it waits. Its
    ``timeout`` starts when the thread starts running it, not while it waits for a free
    worker; past it the caller gets :class:`TimeoutError` at once, but the thread stays
    busy until the blocking call returns (give the vendor SDK its own timeout too).
    """

    system: str = "unknown"
    model: str = "unknown"
    timeout: float | None = None

    _rag_sync_generate: ClassVar[bool] = False
    #: ``_invoke`` is this class's own and ``_generate`` is ``async def``: ``generate`` may
    #: await ``_generate`` directly when no ``timeout`` is set (read per call).
    _rag_plain_invoke: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Check ``timeout`` when the class is defined, not at its first call.

        Raises:
            ValueError: ``timeout`` is not ``None`` or a positive number of seconds, or
                ``system`` / ``model`` is not a string.
            TypeError: a mixin (``RetryMixin``, ``CacheMixin``) is listed after
                ``LLMProvider``.
        """
        super().__init_subclass__(**kwargs)
        # A mixin listed after LLMProvider (class P(ri.LLMProvider, ri.RetryMixin)) comes
        # after it in the method order too: its _invoke would never run, and the class
        # would silently neither retry nor cache.
        mro = cls.__mro__
        late = [c for c in mro[mro.index(LLMProvider) + 1 :] if "_invoke" in c.__dict__]
        if late:
            names = ", ".join(c.__name__ for c in late)
            raise TypeError(
                f"{cls.__qualname__}: list {names} before LLMProvider among the class's "
                f"bases (class {cls.__name__}({late[0].__name__}, ..., LLMProvider)): after "
                "it, it is never called"
            )
        timeout = inspect.getattr_static(cls, "timeout", None)
        if isinstance(timeout, property):  # read per call: the value is the application's
            timeout = None
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or math.isnan(timeout)
            or timeout <= 0
        ):
            raise ValueError(
                f"{cls.__qualname__}: timeout must be None or a positive number of seconds, "
                f"got {timeout!r}"
            )
        for name in ("system", "model"):
            value = inspect.getattr_static(cls, name, None)
            # None (set per instance), a string, or a descriptor (property, cached_property).
            if value is not None and not isinstance(value, str) and not hasattr(
                type(value), "__get__"
            ):
                raise ValueError(
                    f"{cls.__qualname__}: {name} must be a string (such as "
                    f"{'openai' if name == 'system' else 'gpt-4o-mini'!r}), got {value!r}"
                )
        cls._rag_sync_generate = not inspect.iscoroutinefunction(cls._generate)
        cls._rag_plain_invoke = cls._invoke is LLMProvider._invoke and not cls._rag_sync_generate

    async def _generate(self, prompt: str, **params: Any) -> str | LLMResult:
        """Call the model; implemented by subclasses.

        Raises:
            NotImplementedError: always, here.
        """
        raise NotImplementedError(f"{type(self).__qualname__} must implement _generate")

    async def generate(
        self,
        prompt: str,
        *,
        cache: bool = True,
        cache_namespace: str | None = None,
        **params: Any,
    ) -> str | LLMResult:
        """Generate a completion for ``prompt``, instrumented.

        Args:
            prompt: the prompt (positional or ``prompt=``).
            cache: ``False`` bypasses :class:`~rag_instrument.cache.CacheMixin`'s cache.
            cache_namespace: keeps cache entries apart (e.g. per tenant); overrides the
                class attribute of the same name.
            **params: passed to ``_generate`` unchanged (``temperature=0``, ...).

        Returns:
            Exactly what ``_generate`` returned (or, on a cache hit, an equal value).

        Raises:
            Exception: whatever ``_generate`` raised, as itself; :class:`TimeoutError`
                past ``timeout``.
        """
        rt = get_runtime()
        if not rt.enabled:
            request = LLMRequest(prompt, params, cache, cache_namespace)
            return await self._invoke(request)  # type: ignore[no-any-return]
        try:
            call = start_call(
                rt,
                operation="chat",
                system=str(self.system),
                model=str(self.model),
                params=params,
                prompt=prompt,
            )
            call.attach()
        except Exception as exc:
            internal_error("starting an llm call", exc)
            request = LLMRequest(prompt, params, cache, cache_namespace)
            return await self._invoke(request)  # type: ignore[no-any-return]
        try:
            result: Any
            if self._rag_plain_invoke and self.timeout is None:  # nothing between: no chain
                result = await self._generate(prompt, **params)
            else:
                request = LLMRequest(prompt, params, cache, cache_namespace, call)
                result = await self._invoke(request)
        except BaseException as exc:
            call.detach()
            call.finish(exc)
            raise
        call.detach()
        if type(result) is LLMResult:
            call.finish(
                None,
                response_model=result.model,
                input_tokens=result.input_tokens,
                output_tokens=result.output_tokens,
                finish_reasons=(result.finish_reason,) if result.finish_reason else None,
                output_text=result.text,
            )
        else:
            call.finish(None, **_result_fields(result))
        return result  # type: ignore[no-any-return]

    async def _invoke(self, request: LLMRequest) -> Any:
        """Make one attempt: ``_generate`` under ``timeout`` (the end of the mixin chain)."""
        if self._rag_sync_generate:
            return await self._invoke_sync(request)
        work = self._generate(request.prompt, **request.params)
        timeout = self.timeout
        if timeout is None:
            return await work
        async with asyncio.timeout(timeout):
            return await work

    async def _invoke_sync(self, request: LLMRequest) -> Any:
        """One attempt of a plain-``def`` ``_generate`` on the library's thread pool."""
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        timeout = self.timeout
        started: asyncio.Future[None] | None = None if timeout is None else loop.create_future()

        def mark_started() -> None:
            if started is not None and not started.done():
                started.set_result(None)

        def work() -> Any:
            if started is not None:
                try:
                    loop.call_soon_threadsafe(mark_started)
                except RuntimeError:
                    pass  # the loop is closed: nobody waits for the result
            return context.run(self._generate, request.prompt, **request.params)

        future = loop.run_in_executor(llm_executor(), work)
        if started is None:
            return await future
        try:
            await started  # queued for a free worker: the attempt's clock has not started
        except BaseException:
            future.cancel()  # still queued: it will not run
            raise
        async with asyncio.timeout(timeout):
            return await future

    async def generate_batch(
        self, prompts: Iterable[str], *, concurrency: int = 8, **params: Any
    ) -> list[str | LLMResult | BaseException]:
        """Generate for many prompts, at most ``concurrency`` calls in flight.

        Args:
            prompts: the prompts.
            concurrency: the largest number of calls running at once (at least 1).
            **params: passed to every :meth:`generate` call.

        Returns:
            One entry per prompt, in input order: the result, or the exception that call
            raised (as ``asyncio.gather(..., return_exceptions=True)`` does).

        Raises:
            ValueError: ``concurrency`` is less than 1.
        """
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(
                f"generate_batch: concurrency must be an integer >= 1, got {concurrency!r}"
            )
        gate = asyncio.Semaphore(concurrency)

        async def one(prompt: str) -> str | LLMResult:
            async with gate:
                return await self.generate(prompt, **params)

        results: list[str | LLMResult | BaseException] = await asyncio.gather(
            *(one(p) for p in prompts), return_exceptions=True
        )
        return results
