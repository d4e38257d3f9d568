"""Requests end to end: :class:`RequestMiddleware`, a pure ASGI middleware.

Wrap any ASGI application (FastAPI, Starlette, Quart, a bare ASGI callable)::

    app = FastAPI()
    app.add_middleware(ri.RequestMiddleware)            # or: app = ri.RequestMiddleware(app)

Per HTTP request it opens a root span ``"{method} {route template}"`` (a SERVER span with
the HTTP semantic-convention attributes, continuing an incoming W3C ``traceparent``),
binds a ``request_id`` (the incoming ``X-Request-ID`` if it is a sane one, else a new one)
so every log line of the request carries it, echoes it in the response, adds a
``Server-Timing`` header listing the stages that finished before the response started, and
writes one ``"request completed"`` line with ``method``, ``route``, ``status`` and
``execution_time_ms``. Route budgets (``configure(budgets={"POST /api/search": 2000})``)
log the same ``"budget exceeded"`` warning as stage budgets.

WebSocket and lifespan scopes pass through untouched. The middleware imports no web
framework: the route template is read from the ASGI scope after the application routed
the request (``scope["route"]``, set by Starlette and FastAPI; ``scope["path_template"]``).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry import trace as trace_api
from opentelemetry.trace import SpanKind, Status, StatusCode

from rag_instrument import _breakdown
from rag_instrument import attributes as attr
from rag_instrument._context import (
    Bound,
    BoundScope,
    Frame,
    _make_bound,
    attach_span,
    bound,
    current_span,
    detach_span,
    reset_bound,
    reset_frame,
    set_bound,
    set_frame,
    within_span_limit,
)
from rag_instrument._runtime import get_runtime
from rag_instrument._utils import HTTP_METHODS, internal_error, route_key, user_code_error
from rag_instrument.logs import emit

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from rag_instrument._runtime import Runtime

__all__ = ["ASGIApp", "RequestMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
"""An ASGI 3 application: ``async def app(scope, receive, send)``."""

_KNOWN_METHODS: Final = HTTP_METHODS
# Incoming request ids are echoed in headers and written to every log line: only ids made
# of these characters, at most 128 of them, are trusted (UUIDs, ULIDs, hex, base64, "r-1").
_REQUEST_ID: Final = re.compile(rb"[A-Za-z0-9._:@+=/~-]{1,128}")
_TOKEN_BAD: Final = re.compile(r"[^A-Za-z0-9!#$%&'*+.^_`|~-]")
_REQUEST_DURATION: Final = attr.METRIC_HTTP_SERVER_REQUEST_DURATION
_MAX_EXCLUDED: Final = 1000
_ERROR: Final = Status(StatusCode.ERROR)


def _path_matcher(
    paths: Iterable[str] | None, what: str
) -> tuple[frozenset[str], tuple[str, ...]]:
    if paths is None:  # none, as an empty list
        return frozenset(), ()
    given: Any = paths
    if isinstance(given, str):  # "/health" or "/health,/metrics", as OpenTelemetry's lists
        given = [part.strip() for part in given.split(",") if part.strip()]
    if isinstance(given, bytes) or not isinstance(given, Iterable):
        raise ValueError(  # noqa: TRY004 - configuration errors are ValueErrors here
            f"rag_instrument.RequestMiddleware: {what} must be a list of paths, "
            f"got {paths!r:.80}"
        )
    exact: set[str] = set()
    prefixes: list[str] = []
    for path in given:
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(
                f"rag_instrument.RequestMiddleware: {what} entry {path!r} must be a path "
                "starting with '/' (a trailing '*' matches a prefix)"
            )
        if path.endswith("*"):
            prefixes.append(path[:-1])
        else:
            exact.add(path)
    return frozenset(exact), tuple(prefixes)


def _matches(matcher: tuple[frozenset[str], tuple[str, ...]], path: str) -> bool:
    exact, prefixes = matcher
    return path in exact or (bool(prefixes) and path.startswith(prefixes))


def _path_matches(
    matcher: tuple[frozenset[str], tuple[str, ...]], scope: Scope, root: Any = None
) -> bool:
    """Whether the request's path matches, as the application sees it or as it was sent.

    Under a root path (``uvicorn --root-path /api``, a mount) ``scope["path"]`` holds the
    root path too: ``"/health"`` matches ``"/api/health"`` there, as does the full path.
    """
    path = scope.get("path", "")
    if not isinstance(path, str):
        return False
    if _matches(matcher, path):
        return True
    if root is None:
        root = scope.get("root_path", "")
    if root and isinstance(root, str) and path.startswith(root):
        rest = path[len(root) :]
        if rest[:1] == "/" or not rest:
            return _matches(matcher, rest or "/")
    return False


def route_template(scope: Scope, root_path: str = "") -> str | None:
    """The route template the application matched for this request, or ``None``.

    Read after the application routed the request: Starlette and FastAPI put the matched
    route object in ``scope["route"]`` (its ``path`` is the template, relative to the mount
    point when the route lives in a mounted application); other frameworks may set
    ``scope["path_template"]``. The raw path is never used: it carries ids, and so does
    the mount point when a mount's path has parameters (``/tenants/{tenant}``): then the
    mounts' own templates are read off the application's routes.

    Args:
        scope: the request's ASGI scope.
        root_path: ``scope["root_path"]`` as it was before the application ran (the part of
            the URL that belongs to the server, not to a mount).
    """
    route = scope.get("route")
    found: Any = route if isinstance(route, str) else getattr(route, "path", None)
    if not isinstance(found, str) or not found:
        template = scope.get("path_template")
        return template if isinstance(template, str) and template else None
    path: str = found
    path_format = getattr(route, "path_format", None)
    is_mount = isinstance(path_format, str) and hasattr(route, "routes")
    if is_mount and _routes_within(route):
        # The router inside the mount matched nothing (a 404): no route, not the mount.
        return None
    mounted = scope.get("root_path", "")
    if not isinstance(mounted, str) or not mounted.startswith(root_path):
        return path
    prefix = mounted[len(root_path) :]
    with_ids = False
    if is_mount:
        # A mount matched itself (static files, a non-router sub-application): its own
        # prefix is already in root_path; the template is the mount's format.
        if prefix.endswith(path):
            prefix = prefix[: len(prefix) - len(path)]
        else:
            with_ids = True  # its own path has parameters: what it matched holds ids
        path = str(path_format)
    if prefix and scope.get("path_params"):
        # What the mounts matched may hold ids (theirs, or a host's): their templates.
        templates = _mounts_template(scope, root_path, route)
        if templates is not None:
            prefix = templates
        elif with_ids or _mount_has_parameters(scope, route):
            return None  # not found as routed: no template rather than one with ids
    return prefix + path if prefix else path


def _routes_within(mount: Any) -> bool:
    """Whether ``mount`` holds a Starlette router's routes (which set ``scope["route"]``).

    Directly, or under the ASGI middleware wrapping the mounted application.
    """
    inner: Any = getattr(mount, "routes", None)
    if not inner:
        app: Any = getattr(mount, "app", None)
        for _ in range(16):  # middleware keep what they wrap as .app
            if app is None:
                break
            inner = getattr(app, "routes", None)
            if inner:
                break
            app = getattr(app, "app", None)
    return bool(inner) and any(hasattr(each, "matches") for each in inner)


def _mount_has_parameters(scope: Scope, route: Any) -> bool:
    """Whether a path parameter of the request belongs to a mount, not to ``route``."""
    params = scope.get("path_params")
    if not isinstance(params, dict) or not params:
        return False
    own = getattr(route, "param_convertors", None)
    return any(name not in own for name in params) if isinstance(own, dict) else True


_MOUNT_TAIL: Final = "/{path}"
_MAX_DEPTH: Final = 16

#: Per router (by ``id``, with a weak reference to tell a new router at a reused address):
#: every route under it, by ``id``, with the mounts (and hosts) above it.
_Chains = dict[int, list[tuple[Any, tuple[Any, ...]]]]
_CHAINS: dict[int, tuple[weakref.ref[Any], _Chains]] = {}
_CHAINS_MAX: Final = 256


def _chains_of(router: Any, target: Any) -> list[tuple[Any, tuple[Any, ...]]]:
    """The mount chains from ``router`` down to ``target`` (mapped once per router)."""
    if router is None:
        return []
    entry = _CHAINS.get(id(router))
    chains = entry[1] if entry is not None and entry[0]() is router else None
    found = chains.get(id(target)) if chains is not None else None
    if found is None or found[0][0] is not target:  # first use, or routes added since
        chains = {}
        _map_routes(getattr(router, "routes", None) or (), (), chains, 0)
        if len(_CHAINS) >= _CHAINS_MAX:  # routers of applications gone (tests make many)
            _CHAINS.clear()
        with contextlib.suppress(TypeError):  # a router that takes no weak reference
            _CHAINS[id(router)] = (weakref.ref(router), chains)
        found = chains.get(id(target))
    return [chain for chain in found or () if chain[0] is target]


def _map_routes(routes: Any, above: tuple[Any, ...], chains: _Chains, depth: int) -> None:
    for each in routes:
        chains.setdefault(id(each), []).append((each, above))
        if depth < _MAX_DEPTH and (hasattr(each, "path_regex") or hasattr(each, "host_regex")):
            inner = getattr(each, "routes", None)
            if inner:
                _map_routes(inner, (*above, each), chains, depth + 1)


def _mounts_on_path(router: Any, path: str) -> tuple[Any, ...]:
    """The mounts Starlette's router sends ``path`` through, outermost first.

    At each level the first mount whose pattern matches takes the request, as in
    Starlette's router (a route before it that matched fully would have been the target).
    """
    chain: list[Any] = []
    routes: Any = getattr(router, "routes", None) or ()
    rest = path
    while len(chain) < _MAX_DEPTH:
        for each in routes:
            template = getattr(each, "path_format", None)
            pattern: Any = getattr(each, "path_regex", None)
            if not isinstance(template, str) or not template.endswith(_MOUNT_TAIL):
                continue
            match = pattern.match(rest) if pattern is not None else None
            if match is not None:
                chain.append(each)
                rest = "/" + str(match.groupdict().get("path", ""))
                routes = getattr(each, "routes", None) or ()
                break
        else:
            break
    return tuple(chain)


def _mounts_template(scope: Scope, root_path: str, target: Any) -> str | None:
    """The templates of the mounts between this middleware and ``target``, or ``None``.

    Routes the request's path through the mounts above ``target`` as Starlette's router
    does (each mount's path pattern; a host routes by the host, not the path), keeping
    each mount's template instead of what it matched. Mounts above this middleware (when
    it wraps a mounted application) are left out, as their part of the path is.
    """
    path = scope.get("path")
    if not isinstance(path, str):
        return None
    top = scope.get("app_root_path", root_path)  # the outermost router's root path
    if not isinstance(top, str) or not root_path.startswith(top):
        top = root_path
    if top and path.startswith(top):
        path = path[len(top) :]
    above = len(root_path) - len(top)  # what mounts above this middleware matched
    router = scope.get("router")
    chains = [chain for _, chain in _chains_of(router, target)]
    if not chains:
        # Routes the map cannot reach (FastAPI keeps included routers' routes out of
        # ``routes`` until requested): the mounts the path goes through, in order.
        found = _mounts_on_path(router, path)
        chains = [found] if found else []
    for chain in chains:
        rest, consumed, prefix = path, 0, ""
        for mount in chain:
            pattern: Any = getattr(mount, "path_regex", None)
            if pattern is None:
                continue  # a host
            template = getattr(mount, "path_format", None)
            if not isinstance(template, str) or not template.endswith(_MOUNT_TAIL):
                break
            match = pattern.match(rest)
            if match is None:
                break
            remaining = "/" + str(match.groupdict().get("path", ""))
            consumed += len(rest) - len(remaining)
            rest = remaining
            if consumed > above:
                prefix += template[: -len(_MOUNT_TAIL)]
        else:
            return prefix
    return None


def _token(name: str) -> str:
    """A ``Server-Timing`` metric name: an HTTP token."""
    return _TOKEN_BAD.sub("_", name)[:64] or "stage"


#: The names of the header's totals: a stage of the same name is listed as "<name>-stage".
_TOTAL_NAMES: Final = frozenset({*attr.BREAKDOWN_KINDS, attr.BREAKDOWN_CACHE, "total"})


def server_timing(
    timings: _breakdown.StageTimings | None,
    breakdown: dict[str, dict[str, float]] | None,
    total_ms: float,
) -> str:
    """Render a ``Server-Timing`` header value.

    Each stage once (runs of the same stage summed, ``desc`` says how many), then the
    ``db``, ``llm``, ``vector`` and ``embedding`` totals of the breakdown, the ``cache``
    hits and misses, and ``total``: the time from the request to its response headers.
    A stage named like one of the totals listed (``embedding`` around embedding calls, say)
    is listed as ``embedding-stage``, so that every name in the header is one thing.
    """
    parts: list[str] = []
    if timings is not None:
        # The totals this header lists: a stage of the same name is renamed, not they.
        totals = {"total"}
        if breakdown:
            totals.update(kind for kind in _TOTAL_NAMES if breakdown.get(kind))
        used: set[str] = set()
        for name, (runs, ms) in list(timings.by_name.items()):
            desc = f';desc="{int(runs)} runs"' if runs > 1 else ""
            token = _token(name)
            if token in totals:  # e.g. the EMBEDDING stage around embedding calls
                token += "-stage"
            if token in used:  # "vector search" and "vector/search": two stages, two names
                number = 2
                while f"{token}-{number}" in used:
                    number += 1
                token = f"{token}-{number}"
            used.add(token)
            parts.append(f"{token};dur={ms:.1f}{desc}")
    if breakdown:
        for kind in attr.BREAKDOWN_KINDS:
            values = breakdown.get(kind)
            if values:
                count = int(values["count"])
                calls = "call" if count == 1 else "calls"
                parts.append(f'{kind};dur={values["ms"]:.1f};desc="{count} {calls}"')
        cache = breakdown.get(attr.BREAKDOWN_CACHE)
        if cache:
            hits, misses = int(cache.get("hits", 0)), int(cache.get("misses", 0))
            parts.append(f'cache;desc="hits={hits} misses={misses}"')
    parts.append(f"total;dur={total_ms:.1f}")
    return ", ".join(parts)


# Headers of which the first one counts when a request repeats them; the others' repeated
# values are combined into one comma-separated list, as HTTP reads repeated list headers
# (RFC 9110 5.3): two ``tracestate`` headers are one list, two ``traceparent`` headers (or
# two request ids) an invalid value, so a new trace (a new id) starts, as W3C Trace Context
# requires.
_FIRST_WINS: Final = frozenset({"host", "user-agent"})


def _header_values(scope: Scope, wanted: frozenset[bytes]) -> dict[str, str]:
    found: dict[str, str] = {}
    for item in scope.get("headers") or ():
        try:
            key = bytes(item[0]).lower()
            if key in wanted:
                name = key.decode("latin-1")
                value = bytes(item[1]).decode("latin-1")
                seen = found.get(name)
                if seen is None:
                    found[name] = value
                elif name not in _FIRST_WINS:
                    found[name] = f"{seen},{value}"
        except Exception:  # noqa: S112 - a malformed header never fails the request
            continue
    return found


_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}
#: The scope key a RequestMiddleware sets while it serves the request (see _Request).
_ROUTED: Final = "rag_instrument.request"
# FastAPI's scope key for its request telemetry: present (None included) means "observed
# already", and FastAPI's own tracing leaves the request alone.
_FASTAPI_TELEMETRY: Final = "fastapi.telemetry"


def _carry_down(scope: Scope, span: trace_api.Span, parent: Context | None) -> Any:
    """Put ``span``'s trace context in the request headers the application sees.

    Tracing inside the application (FastAPI's native telemetry, the OpenTelemetry ASGI
    middleware added after this one) takes its parent from the request headers, not from
    the current span: without this, a request would be split into two traces. The
    application sees what it would behind a tracing proxy: this request's span as the
    ``traceparent``, the incoming ``tracestate`` kept when its trace is continued, and the
    ``baggage``.

    The scope is changed in place, so that what the application sets in it (the matched
    route, the path parameters) is seen by the middleware around this one, as without it.
    Returns the headers as they came, for the request's end to put back (``None`` when
    nothing was changed).
    """
    if not span.get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace_api.set_span_in_context(span, parent))
    if not carrier:
        return None
    names = {key.lower().encode("latin-1"): value for key, value in carrier.items()}
    # An incoming tracestate goes with the trace it came with: kept (re-written from the
    # span) when that trace is continued, dropped when a new one started.
    replaced = {*names, b"traceparent", b"tracestate"}
    headers: list[Any] = []
    for item in scope.get("headers") or ():
        try:
            gone = bytes(item[0]).lower() in replaced
        except Exception:  # a malformed item: passed on as it came, as the rest
            gone = False
        if not gone:
            headers.append(item)
    headers.extend((key, value.encode("latin-1")) for key, value in names.items())
    sent = scope.get("headers")
    scope["headers"] = headers
    return sent


class _Request:
    """The state of one HTTP request under the middleware (one per request)."""

    __slots__ = (
        "adopted",
        "body_done",
        "client_headers",
        "disconnected",
        "frame",
        "headers_ms",
        "marked",
        "method",
        "middleware",
        "quiet",
        "receive_inner",
        "request_id",
        "root_path",
        "rt",
        "scope",
        "send_failed",
        "send_inner",
        "span",
        "start_attrs",
        "start_name",
        "start_ns",
        "status",
        "timings",
        "tokens",
    )

    def __init__(
        self,
        middleware: RequestMiddleware,
        scope: Scope,
        rt: Runtime,
        receive: Receive,
        send: Send,
    ) -> None:
        self.receive_inner = receive
        self.send_inner = send
        self.middleware = middleware
        self.scope = scope
        self.rt = rt
        self.start_ns = time.perf_counter_ns()
        self.status: int | None = None
        self.body_done = False
        self.disconnected = False
        self.send_failed = False
        self.headers_ms: float | None = None
        self.tokens: tuple[Any, ...] | None = None
        self.client_headers: Any = None
        self.marked = False
        # FastAPI(root_path=...) sets the scope's root path itself, once past this middleware.
        root_path = middleware.app_root_path or scope.get("root_path", "")
        self.root_path = root_path if isinstance(root_path, str) else ""
        path = scope.get("path", "")
        self.quiet = (
            _path_matches(middleware.quiet, scope, self.root_path)
            if middleware.quiet_any
            else False
        )

        # Methods are case-sensitive (RFC 9110, and Starlette answers "get" with 405): one
        # not in its canonical form is "_OTHER", with the original kept beside it.
        method = scope.get("method", "")
        method = method if isinstance(method, str) else ""
        self.method = method if method in _KNOWN_METHODS else "_OTHER"

        headers = _header_values(scope, middleware.wanted_headers)
        raw_id = headers.get(middleware.request_id_key)
        replaced = False
        if raw_id is not None and _REQUEST_ID.fullmatch(raw_id.encode("latin-1")):
            self.request_id = raw_id
        else:
            replaced = raw_id is not None
            self.request_id = os.urandom(16).hex()

        kind = SpanKind.SERVER
        parent: Context | None = None
        outer = current_span()
        outer_context = outer.get_span_context()
        if not middleware.propagation_keys.isdisjoint(headers):
            # Into the current context: what it holds (suppress_instrumentation()) stays.
            parent = propagate.extract(headers, context=otel_context.get_current())
        #: The server span another instrumentation opened for this request, made ours.
        self.adopted = False
        if outer_context.is_valid and getattr(outer, "kind", None) is SpanKind.SERVER:
            # Another instrumentation in this process (FastAPI's native telemetry, the
            # OpenTelemetry ASGI middleware) already opened the request's server span and
            # continued the incoming trace. Not so when the incoming header names that
            # very span: then the request was sent from inside it (one app calling
            # another in the same process).
            incoming = (
                trace_api.get_current_span(parent).get_span_context()
                if parent is not None
                else None
            )
            if (
                incoming is None
                or incoming.span_id != outer_context.span_id
                or scope.get(_ROUTED) is not None  # this request, routed on by ours
            ):
                # FastAPI's span for this very request (its telemetry in this scope holds
                # it) becomes ours; any other stays the parent of an INTERNAL span (it may
                # be another request's: one app calling another in the same process).
                telemetry = scope.get(_FASTAPI_TELEMETRY)
                self.adopted = getattr(telemetry, "span", None) is outer and outer.is_recording()
                kind, parent = SpanKind.INTERNAL, None
        self.marked = _ROUTED not in scope
        if self.marked:
            # Seen by a RequestMiddleware further in (a mounted app with its own): the
            # same request, not a call from inside this one. Taken out at the end.
            scope[_ROUTED] = True
        sanitizer = rt.sanitizer
        attributes: dict[str, Any] = {
            attr.HTTP_REQUEST_METHOD: self.method,
            attr.URL_SCHEME: str(scope.get("scheme", "http")),
            attr.URL_PATH: sanitizer.text(path) if isinstance(path, str) else "",
        }
        if self.method == "_OTHER" and method:
            attributes[attr.HTTP_REQUEST_METHOD_ORIGINAL] = sanitizer.text(method)
        query = scope.get("query_string")
        if query:
            attributes[attr.URL_QUERY] = sanitizer.text(bytes(query).decode("latin-1"))
        version = scope.get("http_version")
        if isinstance(version, str):
            attributes[attr.NETWORK_PROTOCOL_VERSION] = version
        host = headers.get("host")
        if host:
            name, _, port = host.rpartition(":") if "]" not in host[-1:] else (host, "", "")
            if name and port.isdigit():
                attributes[attr.SERVER_ADDRESS] = sanitizer.text(name)
                attributes[attr.SERVER_PORT] = int(port)
            else:  # no port in Host: the scheme's (RFC 9110, 7.2)
                attributes[attr.SERVER_ADDRESS] = sanitizer.text(host)
                default = _DEFAULT_PORTS.get(attributes[attr.URL_SCHEME])
                if default is not None:
                    attributes[attr.SERVER_PORT] = default
        else:  # no Host header (HTTP/1.0): the address the server listens on
            server = scope.get("server")
            if isinstance(server, (tuple, list)) and len(server) == 2 and server[0]:
                attributes[attr.SERVER_ADDRESS] = sanitizer.text(str(server[0]))
                if isinstance(server[1], int):
                    attributes[attr.SERVER_PORT] = server[1]
        client = scope.get("client")
        if client:  # client.port is opt-in in the semantic conventions: left out
            attributes[attr.CLIENT_ADDRESS] = str(client[0])
        agent = headers.get("user-agent")
        if agent:
            attributes[attr.USER_AGENT_ORIGINAL] = sanitizer.text(agent)
        if replaced:
            attributes[attr.RAG_REQUEST_ID_REPLACED] = True

        # Bind the request id first: the span gets it (and whatever else is bound) too.
        base = bound()
        if replaced or raw_id is None:
            # Our own id (32 hex digits) needs no sanitising: bind it directly.
            log = dict(base.log)
            log["request_id"] = self.request_id
            span_attrs = dict(base.attrs)
            span_attrs["request_id"] = self.request_id
            bound_token = set_bound(Bound(log, span_attrs, BoundScope()))  # a request of its own
        else:
            request_scope = BoundScope()  # a request of its own
            bound_token = set_bound(
                _make_bound(base, {"request_id": self.request_id}, request_scope)
            )
        self.start_name = self.method if self.method != "_OTHER" else "HTTP"
        try:
            extra = bound().attrs
            if extra:
                attributes = within_span_limit(extra, attributes, self.start_name)
            # Every attribute is the sanitiser's or the server's (the scope's scheme,
            # protocol version and client address): the library's light span, whose
            # export skips redaction as long as nobody else adds to it.
            if self.adopted:
                span = outer
                span.set_attributes(attributes)
            else:
                span = rt.start_span(self.start_name, attributes, kind=kind, context=parent)
        except BaseException:
            reset_bound(bound_token)
            raise
        self.span = span
        self.start_attrs = attributes
        try:
            self.client_headers = _carry_down(scope, span, parent)
        except Exception as exc:
            internal_error("RequestMiddleware: trace headers", exc)
        # No owner: the frame would refer back to this object, a reference cycle that only
        # the garbage collector frees (with everything the request held, promoted to the
        # oldest generation while it ran: fuller and more frequent full collections).
        self.frame = frame = Frame("request", None, False, None, span, None)
        frame.start_ns = self.start_ns
        self.timings: _breakdown.StageTimings | None = None
        timings_token = None
        if middleware.server_timing:
            self.timings = _breakdown.StageTimings()
            timings_token = _breakdown.stage_timings.set(self.timings)
        self.tokens = (
            bound_token,
            # An extracted context carries the incoming baggage: the span is set in it.
            attach_span(span)
            if parent is None
            else otel_context.attach(trace_api.set_span_in_context(span, parent)),
            set_frame(frame),
            timings_token,
            parent is None,
        )

    # --- the wrapped receive and send ---------------------------------------------------------

    async def receive(self) -> Message:
        message: Message = await self.receive_inner()
        try:
            if message.get("type") == "http.disconnect" and not self.body_done:
                self.disconnected = True
        except Exception:
            pass
        return message

    async def send(self, message: Message) -> None:
        try:
            kind = message.get("type")
            if kind == "http.response.start":
                message = self._on_response_start(message)
            elif kind == "http.response.pathsend" or (  # pathsend: the whole body at once
                kind == "http.response.body" and not message.get("more_body", False)
            ):
                self.body_done = True
                if self.adopted:  # its owner ends it as this message goes by
                    self._before_owner_ends()
        except Exception as exc:
            internal_error("RequestMiddleware.send", exc)
        try:
            await self.send_inner(message)
        except BaseException:
            # The client went away (uvicorn raises OSError subclasses for ASGI spec 2.4+):
            # the failure belongs to the server and the application, not to us.
            self.send_failed = True
            raise

    def _on_response_start(self, message: Message) -> Message:
        status = message.get("status")
        self.status = status if isinstance(status, int) else None
        elapsed_ms = (time.perf_counter_ns() - self.start_ns) / 1e6
        self.headers_ms = elapsed_ms
        headers = list(message.get("headers") or ())
        key = self.middleware.request_id_key_bytes
        if not any(bytes(k).lower() == key for k, _ in headers):
            headers.append((key, self.request_id.encode("ascii")))
        if self.timings is not None:
            value = server_timing(self.timings, _breakdown.snapshot(self.frame), elapsed_ms)
            headers.append((b"server-timing", value.encode("latin-1", "replace")))
        new = dict(message)
        new["headers"] = headers
        return new

    def _route(self) -> str | None:
        """The request's route template, once routed (``None`` before or without one).

        Sanitised: a mount's prefix comes from the raw path, so it is treated as untrusted.
        """
        route = route_template(self.scope, self.root_path)
        return self.rt.sanitizer.text(route) if route else route

    def _before_owner_ends(self) -> None:
        """Put the request's end on a span another instrumentation ends.

        FastAPI's native telemetry ends its span as the response's last message goes by,
        before the middleware's own end.
        """
        span = self.span
        if not span.is_recording():
            return
        ms = (time.perf_counter_ns() - self.start_ns) / 1e6
        route = self._route()
        attributes: dict[str, Any] = {}
        if route:
            attributes[attr.HTTP_ROUTE] = route
        if self.status is not None:
            attributes[attr.HTTP_RESPONSE_STATUS_CODE] = self.status
        totals = _breakdown.snapshot(self.frame)
        forms = _breakdown.safe_forms(totals) if totals else None
        if forms is not None:
            attributes.update(forms[0])
        if route:
            budget = self.middleware.route_budget(self.rt, f"{self.method} {route}")
            if budget is not None and ms > budget:
                attributes[attr.RAG_BUDGET_EXCEEDED] = True
                attributes[attr.RAG_BUDGET_MS] = budget
            span.update_name(f"{self.start_name} {route}")
        span.set_attributes(attributes)

    # --- the end of the request ---------------------------------------------------------------

    def finish(self, exc: BaseException | None) -> None:
        try:
            self._finish(exc)
        except Exception as end_exc:
            internal_error("RequestMiddleware", end_exc)
        finally:
            self._restore()
            if self.client_headers is not None:  # the server's scope: as the client sent it
                self.scope["headers"] = self.client_headers
            if self.marked:
                self.scope.pop(_ROUTED, None)

    def _restore(self) -> None:
        tokens, self.tokens = self.tokens, None
        if tokens is None:
            return
        bound_token, otel_token, frame_token, timings_token, light = tokens
        # Each on its own: finished in another context than started (not the case under
        # __call__), a failing reset must leave the others to be restored.
        for reset, token in (
            (_breakdown.stage_timings.reset, timings_token),
            (reset_frame, frame_token),
            (detach_span if light else otel_context.detach, otel_token),
            (reset_bound, bound_token),
        ):
            if token is not None:
                try:
                    reset(token)
                except Exception:
                    pass

    def _finish(self, exc: BaseException | None) -> None:
        ms = (time.perf_counter_ns() - self.start_ns) / 1e6
        rt = self.rt
        span = self.span
        cancelled = exc is not None and (
            not isinstance(exc, Exception) or self.disconnected or self.send_failed
        )
        if exc is None and self.disconnected and not self.body_done:
            cancelled = True
        status = self.status
        if status is None:
            # No response started: the server answers 500 for an exception (or for an
            # application that returned without responding); 499 says the client left.
            status = 499 if cancelled else 500
        failed = exc is not None and not cancelled
        route = self._route()
        name = f"{self.method if self.method != '_OTHER' else 'HTTP'} {route}" if route else None
        breakdown = _breakdown.detach(self.frame)
        # The span's attributes and the line's field, made in one pass.
        forms = _breakdown.safe_forms(breakdown) if breakdown else None
        key = f"{self.method} {route}" if route else None
        budget = self.middleware.route_budget(rt, key) if key is not None else None
        exceeded = budget is not None and ms > budget
        end_attrs: dict[str, Any] = {}
        span_status: Status | None = None
        event: tuple[str, dict[str, Any]] | None = None
        try:
            if route:
                end_attrs[attr.HTTP_ROUTE] = route
            if not (cancelled and self.status is None):  # 499 is the line's: none was sent
                end_attrs[attr.HTTP_RESPONSE_STATUS_CODE] = status
            if forms is not None:
                end_attrs.update(forms[0])
            if cancelled:
                end_attrs[attr.RAG_CANCELLED] = True
            elif failed:
                from rag_instrument.stages import _exception_record

                assert exc is not None
                end_attrs[attr.ERROR_TYPE] = type(exc).__qualname__
                span_status, event = _exception_record(exc, rt)
            elif status >= 500:
                end_attrs[attr.ERROR_TYPE] = str(status)
                span_status = _ERROR
            if exceeded:
                end_attrs[attr.RAG_BUDGET_EXCEEDED] = True
                end_attrs[attr.RAG_BUDGET_MS] = budget
        finally:
            try:
                if not self.adopted:
                    rt.end_span(
                        span,
                        (self.start_attrs, self.start_name),
                        end_attrs,
                        span_status,
                        event,
                        name=name,
                    )
                elif span.is_recording():  # its owner ends it, after this
                    if name is not None:
                        span.update_name(name)
                    span.set_attributes(end_attrs)
                    if span_status is not None:
                        span.set_status(span_status)
                    if event is not None:
                        span.add_event(event[0], event[1])
            except Exception as end_exc:
                user_code_error("ending a span", end_exc)
        # The metric's attributes per its semantic conventions: url.scheme required,
        # error.type when the request failed, the protocol version recommended.
        start_attrs = self.start_attrs
        metric_attrs: dict[str, Any] = {
            attr.HTTP_REQUEST_METHOD: self.method,
            attr.URL_SCHEME: start_attrs[attr.URL_SCHEME],
        }
        if not (cancelled and self.status is None):
            metric_attrs[attr.HTTP_RESPONSE_STATUS_CODE] = status
        if route:
            metric_attrs[attr.HTTP_ROUTE] = route
        version = start_attrs.get(attr.NETWORK_PROTOCOL_VERSION)
        if version is not None:
            metric_attrs[attr.NETWORK_PROTOCOL_VERSION] = version
        error_type = end_attrs.get(attr.ERROR_TYPE)
        if error_type is not None:
            metric_attrs[attr.ERROR_TYPE] = error_type
        rt.histogram(_REQUEST_DURATION, "s", "Duration of HTTP server requests.").record(
            ms / 1000.0, metric_attrs
        )
        if rt.log is not None and not (self.quiet and status < 500 and not failed):
            fields: dict[str, Any] = {
                "method": self.method,
                "route": route,
                "status": status,
                "execution_time_ms": round(ms, 3),
            }
            if forms is not None:
                fields["breakdown"] = forms[1]
            level = "error" if failed or status >= 500 else "info"
            if cancelled:
                fields["cancelled"] = True
                level = "warning"
            if exc is not None:
                fields["error_type"] = type(exc).__name__
            emit(
                level,
                attr.EVENT_REQUEST_COMPLETED,
                fields,
                span=span,
                stage="",
                trusted=True,
                rt=rt,
            )
        if exceeded:
            assert budget is not None
            rt.budget_counter.add(1, {attr.HTTP_ROUTE: route or ""})
            if rt.log is not None:
                emit(
                    "warning",
                    "budget exceeded",
                    {
                        "route": key,
                        "budget_ms": budget,
                        "execution_time_ms": round(ms, 3),
                        "largest": _breakdown.largest(breakdown),
                    },
                    span=span,
                    stage="",
                    trusted=True,
                    rt=rt,
                )


class RequestMiddleware:
    """Trace, log and time every HTTP request of an ASGI application.

    Args:
        app: the ASGI application to wrap.
        server_timing: add a ``Server-Timing`` response header listing the stages that
            finished before the response started, the ``db`` / ``llm`` / ``vector`` /
            ``embedding`` totals and cache hits of the request so far, and ``total``.
            It tells clients how long the server's stages took: turn it off for public
            endpoints where that is more than you want to share.
        exclude_paths: paths that are neither traced nor logged (the application still
            serves them). An entry ending in ``*`` matches a prefix (``"/static/*"``).
        quiet_paths: paths that are traced but write no ``"request completed"`` line
            unless they fail with a 5xx status (health checks, metrics scrapes).
        request_id_header: the header the request id is read from and echoed in.

    Raises:
        ValueError: a path does not start with ``/``, or the header name is not a token.

    Example:
        >>> import rag_instrument as ri
        >>> async def app(scope, receive, send): ...
        >>> app = ri.RequestMiddleware(app, quiet_paths=["/health"])
    """

    __slots__ = (
        "_budgets",
        "app",
        "app_root_path",
        "exclude",
        "exclude_any",
        "propagation_keys",
        "quiet",
        "quiet_any",
        "request_id_key",
        "request_id_key_bytes",
        "server_timing",
        "wanted_headers",
    )

    def __init__(
        self,
        app: ASGIApp,
        *,
        server_timing: bool = True,
        exclude_paths: Iterable[str] | None = (),
        quiet_paths: Iterable[str] | None = (),
        request_id_header: str = "x-request-id",
    ) -> None:
        if not callable(app):
            raise TypeError(f"rag_instrument.RequestMiddleware: app {app!r:.80} is not callable")
        if not isinstance(server_timing, bool):
            raise ValueError(  # noqa: TRY004 - configuration errors are ValueErrors here
                f"rag_instrument.RequestMiddleware: server_timing must be True or False, "
                f"got {server_timing!r:.80}"
            )
        if (
            not isinstance(request_id_header, str)
            or not request_id_header
            or _TOKEN_BAD.search(request_id_header)
        ):
            raise ValueError(
                "rag_instrument.RequestMiddleware: request_id_header must be a header name, "
                f"got {request_id_header!r:.80}"
            )
        self.app = app
        root_path = getattr(app, "root_path", None)  # FastAPI's: the app's own root path
        self.app_root_path = root_path if isinstance(root_path, str) else ""
        self.server_timing = server_timing
        self.exclude = _path_matcher(exclude_paths, "exclude_paths")
        self.exclude_any = bool(self.exclude[0] or self.exclude[1])
        self.quiet = _path_matcher(quiet_paths, "quiet_paths")
        self.quiet_any = bool(self.quiet[0] or self.quiet[1])
        self.request_id_key = request_id_header.lower()
        self.request_id_key_bytes = self.request_id_key.encode("ascii")
        self._budgets: tuple[Runtime | None, dict[str, float]] = (None, {})
        self.propagation_keys = frozenset(name.lower() for name in _propagation_fields())
        self.wanted_headers = frozenset(
            {b"host", b"user-agent", self.request_id_key_bytes}
            | {name.encode("latin-1") for name in self.propagation_keys}
        )

    def route_budget(self, rt: Runtime, key: str) -> float | None:
        """The budget of route ``key`` (``"POST /api/search"``) in ``rt``'s settings."""
        cached_rt, budgets = self._budgets
        if cached_rt is not rt:
            budgets = {}
            for name, ms in rt.budgets.items():
                key_of_route = route_key(name)
                if key_of_route is not None:
                    budgets[key_of_route] = ms
            self._budgets = (rt, budgets)
        return budgets.get(key) if budgets else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection (HTTP requests are instrumented, others pass)."""
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        rt = get_runtime()
        if not rt.enabled or scope.get(_ROUTED) is not None:  # under another of ours: passed
            await self.app(scope, receive, send)
            return
        if self.exclude_any and _path_matches(self.exclude, scope, self.app_root_path or None):
            # Not traced at all: FastAPI's own request tracing included.
            scope.setdefault(_FASTAPI_TELEMETRY, None)
            await self.app(scope, receive, send)
            return
        try:
            request = _Request(self, scope, rt, receive, send)
        except Exception as exc:
            internal_error("RequestMiddleware", exc)
            await self.app(scope, receive, send)
            return
        # FastAPI's native request telemetry (FastAPI 0.165+) stands aside for a request
        # this middleware traces, as it does for one it is told to exclude: one span.
        quiet_fastapi = _FASTAPI_TELEMETRY not in scope
        if quiet_fastapi:
            scope[_FASTAPI_TELEMETRY] = None
        try:
            await self.app(scope, request.receive, request.send)
        except BaseException as exc:
            request.finish(exc)
            raise
        finally:
            if quiet_fastapi and scope.get(_FASTAPI_TELEMETRY, 0) is None:
                scope.pop(_FASTAPI_TELEMETRY, None)
        request.finish(None)


def _propagation_fields() -> set[str]:
    try:
        return set(propagate.get_global_textmap().fields)
    except Exception:
        return {"traceparent", "tracestate", "baggage"}
