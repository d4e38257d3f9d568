"""Where cache entries live: the in-process :class:`MemoryCache` and :class:`RedisCache`."""

from __future__ import annotations

import math
import re
import threading
import time
import urllib.parse
from collections.abc import MutableMapping
from typing import Any, Final, Protocol

from cachetools import TTLCache

from rag_instrument._sanitize import redact_text
from rag_instrument._utils import renew_after_fork, warn_once
from rag_instrument.cache._keys import NOT_KEPT, keepable

__all__ = ["CacheBackend", "MappingCache", "MemoryCache", "RedisCache"]


class CacheBackend(Protocol):
    """Where entries live: JSON bytes under string keys, with a time to live."""

    def get(self, key: str) -> bytes | None:
        """The stored bytes, or ``None`` (also when the backend is unreachable)."""

    def set(self, key: str, value: bytes, ttl: float | None) -> None:
        """Store ``value`` for ``ttl`` seconds (``None``: the backend's default)."""

    def clear(self) -> None:
        """Drop every entry this backend holds."""


class MappingCache:
    """A cache the application made, as a backend (``backend=TTLCache(...)`` is wrapped).

    Any mutable mapping: a cachetools ``TTLCache`` or ``LRUCache``, say. Entries are its
    values, behind a lock; its own rules (size, time to live) decide what it keeps.
    """

    def __init__(self, mapping: MutableMapping[str, Any]) -> None:
        self.mapping = mapping
        self._lock = threading.Lock()
        renew_after_fork(self)

    def get(self, key: str) -> bytes | None:
        """The stored bytes, or ``None``."""
        with self._lock:
            value = self.mapping.get(key)
        return value if type(value) is bytes else None

    def set(self, key: str, value: bytes, ttl: float | None) -> None:
        """Store ``value`` (the mapping's own time to live applies)."""
        try:
            with self._lock:
                self.mapping[key] = value
        except ValueError:  # cachetools: a value larger than the whole cache is not kept
            pass

    def clear(self) -> None:
        """Drop every entry of the mapping."""
        with self._lock:
            self.mapping.clear()

    def clear_prefix(self, prefix: str) -> None:
        """Drop the entries whose key starts with ``prefix`` (one cache's, when shared)."""
        with self._lock:
            doomed = [k for k in list(self.mapping) if isinstance(k, str) and k.startswith(prefix)]
            for key in doomed:
                self.mapping.pop(key, None)

    def __repr__(self) -> str:
        return f"MappingCache({type(self.mapping).__name__})"


class MemoryCache:
    """The in-process backend: a cachetools ``TTLCache`` behind a lock (thread-safe).

    Args:
        maxsize: the most entries kept (least recently used evicted first).
        ttl: seconds an entry lives.
    """

    def __init__(self, maxsize: int = 1024, ttl: float = 3600.0) -> None:
        # Each entry is (bytes, the decoded value or NOT_KEPT): see lookup().
        self._cache: TTLCache[str, tuple[bytes, Any]] = TTLCache(maxsize=maxsize, ttl=ttl)
        self._lock = threading.Lock()
        renew_after_fork(self)
        self.maxsize = maxsize

    def get(self, key: str) -> bytes | None:
        """The stored bytes, or ``None``."""
        with self._lock:
            try:
                return self._cache[key][0]  # one expiry check, where .get() makes two
            except KeyError:
                return None

    def entry(self, key: str) -> tuple[bytes, Any] | None:
        """The stored bytes and, for an immutable value, the value itself (or ``NOT_KEPT``)."""
        with self._lock:
            try:
                return self._cache[key]
            except KeyError:
                return None

    def set(self, key: str, value: bytes, ttl: float | None) -> None:
        """Store ``value`` (entries share the cache's TTL)."""
        with self._lock:
            self._cache[key] = (value, NOT_KEPT)

    def set_value(self, key: str, data: bytes, value: Any) -> None:
        """Store ``data``, the JSON of ``value``, keeping ``value`` if it is immutable."""
        kept = value if keepable(value) else NOT_KEPT
        with self._lock:
            self._cache[key] = (data, kept)

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._cache.clear()

    def clear_prefix(self, prefix: str) -> None:
        """Drop the entries whose key starts with ``prefix``."""
        with self._lock:
            for key in [k for k in list(self._cache) if k.startswith(prefix)]:
                self._cache.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)


def _glob_escape(text: str) -> str:
    """``text``, to be matched literally by Redis's glob-style ``MATCH`` (escaped)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


_REDIS_SCHEMES: Final = ("redis", "rediss", "unix")


def _check_redis_url(url: object) -> None:
    """Reject what ``redis.Redis.from_url`` would only reject at the first call."""
    accepted = "a URL such as redis://host:6379/0, rediss://... or unix:///path"
    if not isinstance(url, str):
        raise TypeError(f"RedisCache: url must be a string ({accepted}), got {type(url).__name__}")
    shown = redact_text(url)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in _REDIS_SCHEMES or "://" not in url:
        raise ValueError(f"RedisCache: {shown!r} is not a Redis URL; expected {accepted}")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"RedisCache: {shown!r} names no socket path; expected {accepted}")
        return
    try:
        port = parts.port
    except ValueError:
        raise ValueError(
            f"RedisCache: {shown!r} has a port that is not a number from 1 to 65535"
        ) from None
    if port == 0 or not parts.hostname:
        raise ValueError(f"RedisCache: {shown!r} needs a host and a port from 1 to 65535")
    if not _HOSTNAME.fullmatch(parts.hostname):
        raise ValueError(f"RedisCache: {shown!r}: {parts.hostname!r} is not a host name")
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ValueError(f"RedisCache: {shown!r}: the database {database!r} is not a number")
    query = urllib.parse.parse_qs(parts.query)
    for reqs in query.get("ssl_cert_reqs", ()):
        if reqs.lower() not in ("none", "optional", "required"):
            raise ValueError(
                f"RedisCache: {shown!r}: ssl_cert_reqs must be none, optional or required"
            )
    try:
        from redis.connection import parse_url
    except ImportError:  # the constructor names the extra
        return
    try:
        parse_url(url)  # type: ignore[no-untyped-call]  # redis-py reads the query, no connection
    except ValueError as exc:
        raise ValueError(f"RedisCache: {shown!r}: {redact_text(str(exc))}") from None


#: A DNS name, an IPv4 address or an IPv6 one (urlsplit drops its brackets).
_HOSTNAME: Final = re.compile(r"[A-Za-z0-9_.-]+|[0-9A-Fa-f:.]+(?:%[\w.-]+)?")


class RedisCache:
    """A Redis backend shared by processes and hosts (extra ``redis``).

    Entries expire on the server (``SET ... PX``). An unreachable or failing Redis turns
    into cache misses and a warning at most once per 20 s: never a failed call. After an
    error or a timeout the backend is skipped for ``cooldown_s`` (every lookup a miss,
    every store dropped), so that a stalled server does not cost each call its timeout;
    then it is tried again.

    Args:
        url: ``redis://host:port/db``.
        prefix: prepended to every key, to share a database safely.
        timeout_s: connect and command timeout, seconds.
        cooldown_s: seconds the backend is skipped after a failure.

    Raises:
        ValueError: ``url`` is not a Redis URL (``redis://``, ``rediss://`` or
            ``unix://``; ``"localhost:6379"`` lacks the scheme), its port is not a number
            from 1 to 65535, its database is not a whole number, a timeout is not
            positive. At construction, not at the first call.
        TypeError: ``url`` or ``prefix`` is not a string.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        prefix: str = "rag:",
        *,
        timeout_s: float = 0.5,
        cooldown_s: float = 5.0,
    ) -> None:
        _check_redis_url(url)
        if not isinstance(prefix, str):
            raise ValueError(  # noqa: TRY004 - configuration errors are ValueErrors here
                f"RedisCache: prefix must be a string, got {type(prefix).__name__}"
            )
        for name, value in (("timeout_s", timeout_s), ("cooldown_s", cooldown_s)):
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
                or (name == "timeout_s" and value == 0)
            ):
                raise ValueError(f"RedisCache: {name} must be a positive number, got {value!r}")
        self.url = url
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.cooldown_s = cooldown_s
        self._client: Any = None
        self._lock = threading.Lock()
        renew_after_fork(self)
        self._down_until = 0.0

    def __repr__(self) -> str:
        return f"RedisCache({redact_text(self.url)!r}, prefix={self.prefix!r})"

    def _redis(self) -> Any:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    try:
                        import redis
                    except ImportError:
                        raise ImportError(
                            "RedisCache needs 'redis': pip install 'rag_instrument[redis]'"
                        ) from None
                    self._client = redis.Redis.from_url(
                        self.url,
                        socket_timeout=self.timeout_s,
                        socket_connect_timeout=self.timeout_s,
                    )
                client = self._client
        return client

    def _cooling_down(self) -> bool:
        return self._down_until > 0.0 and time.monotonic() < self._down_until

    def _unavailable(self, exc: Exception) -> None:
        self._down_until = time.monotonic() + self.cooldown_s
        warn_once.warning(
            f"rag_instrument: Redis cache at {redact_text(self.url)} unavailable "
            f"({type(exc).__name__}); serving without the cache"
        )

    def get(self, key: str) -> bytes | None:
        """The stored bytes, or ``None`` (missing, or Redis unavailable)."""
        if self._cooling_down():
            return None
        client = self._redis()
        try:
            value = client.get(self.prefix + key)
        except Exception as exc:
            self._unavailable(exc)
            return None
        return value if isinstance(value, bytes) else None

    def set(self, key: str, value: bytes, ttl: float | None) -> None:
        """Store ``value`` with a server-side expiry of ``ttl`` seconds."""
        if self._cooling_down():
            return
        client = self._redis()
        try:
            if ttl is not None and ttl > 0:
                client.set(self.prefix + key, value, px=max(int(ttl * 1000), 1))
            else:
                client.set(self.prefix + key, value)
        except Exception as exc:
            self._unavailable(exc)

    def clear(self) -> None:
        """Delete every key under ``prefix``."""
        self.clear_prefix("")

    def clear_prefix(self, prefix: str) -> None:
        """Delete the keys under ``self.prefix + prefix`` (one cache's, of those sharing it)."""
        client = self._redis()
        pattern = _glob_escape(self.prefix + prefix) + "*"
        try:
            keys = list(client.scan_iter(match=pattern, count=500))
            for start in range(0, len(keys), 500):
                client.delete(*keys[start : start + 500])
        except Exception as exc:
            self._unavailable(exc)

    def close(self) -> None:
        """Close the connection pool."""
        client, self._client = self._client, None
        if client is not None:
            client.close()
