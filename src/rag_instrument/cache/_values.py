"""Cached values that are objects: pydantic models and dataclasses, stored as JSON.

A cache entry holds JSON only, never a pickle. An object is stored as its class's name and
its JSON form (``model_dump(mode="json")`` for a pydantic model, by alias or by field name,
whichever its validation takes back; the fields for a dataclass) and rebuilt on a hit
(``model_validate``, or the dataclass's constructor with its nested dataclasses and models
rebuilt from the field annotations).

An entry names a class, so an entry written by someone else (a shared Redis) could name
any class: a class is rebuilt only if it is *allowed* for this cache, which it is once
this process has stored a value of it, when the cache was told about it up front (an
SDK client's cache knows its response types), or when the cached function's return
annotation names it. An entry naming any other class is a miss.

A dataclass is stored only if rebuilding it from its JSON gives an equal value (a ``set``,
``bytes`` or ``datetime`` field, an ``eq=False`` class... do not); a pydantic model class
is checked once, on the first value stored, for the form that round-trips. Anything else
that is not JSON is refused.
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Final

import orjson

__all__ = [
    "OBJ_PREFIX",
    "RefusedValue",
    "ValueTypes",
    "is_object",
    "returned_classes",
    "type_name",
]

_MODEL: Final = "obj"


class RefusedValue(TypeError):
    """A value that cannot be stored as JSON and rebuilt equal (the message names its type)."""


def type_name(cls: type) -> str:
    """``module:qualname``, as stored in an entry."""
    return f"{cls.__module__}:{cls.__qualname__}"


def _is_model_class(cls: Any) -> bool:
    return isinstance(cls, type) and callable(getattr(cls, "model_validate", None)) and callable(
        getattr(cls, "model_dump", None)
    )


def _is_dataclass_class(cls: Any) -> bool:
    return isinstance(cls, type) and dataclasses.is_dataclass(cls)


def is_object(value: Any) -> bool:
    """Whether ``value`` is a pydantic model or a dataclass instance (stored as ``obj``)."""
    cls = type(value)
    return _is_model_class(cls) or _is_dataclass_class(cls)


#: Per model class, whether it is an OpenAI or Anthropic SDK model (see :func:`_answered`).
_SDK_MODELS: dict[type, bool] = {}
_SDKS: Final = ("openai", "anthropic")


def _answered(model: Any) -> Any:
    """``model`` as the SDK hands out a response: with ``_request_id`` (``None``: no request).

    The SDKs set ``_request_id`` on the response of each HTTP call, and code reads it (their
    documentation shows it); a response rebuilt from the cache had none (AttributeError).
    """
    cls = type(model)
    sdk = _SDK_MODELS.get(cls)
    if sdk is None:
        sdk = _SDK_MODELS[cls] = any(
            base.__name__ == "BaseModel" and base.__module__.partition(".")[0] in _SDKS
            for base in cls.__mro__
        )
    if sdk:
        try:
            model._request_id = None
        except Exception:  # an SDK version without it: the model as it is
            pass
    return model


def _rebuild(hint: Any, data: Any) -> Any:
    """``data`` (decoded JSON) as the annotated type ``hint``, for what can be rebuilt."""
    if data is None:
        return None
    if _is_model_class(hint):
        return hint.model_validate(data)
    if _is_dataclass_class(hint):
        return _dataclass(hint, data)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        candidates = [a for a in args if a is not type(None)]
        if len(candidates) == 1:
            return _rebuild(candidates[0], data)
        return data
    if origin is list and args and isinstance(data, list):
        return [_rebuild(args[0], item) for item in data]
    if origin is tuple and isinstance(data, list):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_rebuild(args[0], item) for item in data)
        if len(args) == len(data):
            return tuple(_rebuild(a, item) for a, item in zip(args, data, strict=True))
        return tuple(data)
    if origin is dict and len(args) == 2 and isinstance(data, dict):
        return {k: _rebuild(args[1], v) for k, v in data.items()}
    return data


def _dataclass(cls: type, data: Any) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{type_name(cls)}: not a dataclass entry")  # noqa: TRY004 - bad data
    hints = typing.get_type_hints(cls)
    init: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name not in data:
            continue
        value = _rebuild(hints.get(field.name, Any), data[field.name])
        (init if field.init else rest)[field.name] = value
    obj = cls(**init)
    for name, value in rest.items():
        object.__setattr__(obj, name, value)
    return obj


#: How an object entry starts (``{"t":"obj","c":"module:Class","v":...}``).
OBJ_PREFIX: Final = b'{"t":"obj","c":"'


def _loads_dict(data: bytes) -> dict[str, Any]:
    envelope = orjson.loads(data)
    if type(envelope) is not dict:
        raise ValueError("not a rag_instrument cache entry")
    return envelope


#: Per model class: whether its JSON is written by alias (``True``) or by field name, the
#: form that validating it gives back an equal model (decided on the first value stored).
_BY_ALIAS: dict[type, bool] = {}


def _by_alias(cls: type, value: Any) -> bool:
    """How ``cls``'s JSON must be written for ``model_validate`` to rebuild ``value``.

    By alias when validation takes aliases (the SDKs' models: ``Field(alias=...)``), by
    field name when an alias is for serialization only.

    Raises:
        RefusedValue: neither form gives back an equal model.
    """
    decided = _BY_ALIAS.get(cls)
    if decided is not None:
        return decided
    for by_alias in (True, False):
        try:
            text = value.model_dump_json(by_alias=by_alias)
            same = cls.model_validate_json(text) == value  # type: ignore[attr-defined]
        except Exception:
            same = False
        if same:
            if len(_BY_ALIAS) < 10_000:  # classes made at run time are not remembered forever
                _BY_ALIAS[cls] = by_alias
            return by_alias
    raise RefusedValue(
        f"{type_name(cls)} is a pydantic model that validating its JSON does not give back "
        "equal (a NaN or infinite float, or an alias validation does not accept?)"
    )


def _nested(value: Any) -> Any:
    cls = type(value)
    if _is_model_class(cls):
        return value.model_dump(mode="json", by_alias=_by_alias(cls, value))
    raise TypeError(f"Type is not JSON serializable: {type(value).__qualname__}")


def returned_classes(func: Any) -> list[type]:
    """The models and dataclasses ``func``'s return annotation names (``A | B | None``).

    An annotation that does not resolve (a name defined nowhere) names none.
    """
    try:  # the return annotation alone: a parameter's may not resolve (TYPE_CHECKING)
        target = inspect.unwrap(func)
        annotation = getattr(target, "__annotations__", {}).get("return")
        if annotation is None:
            return []
        shim = types.SimpleNamespace(
            __annotations__={"return": annotation},
            __globals__=getattr(target, "__globals__", {}),
        )
        hint = typing.get_type_hints(shim)["return"]
    except Exception:
        return []
    found: list[type] = []
    stack: list[Any] = [hint]
    while stack:
        current = stack.pop()
        if isinstance(current, type) and (
            _is_model_class(current) or _is_dataclass_class(current)
        ):
            found.append(current)
        elif typing.get_origin(current) in (typing.Union, types.UnionType):
            stack.extend(typing.get_args(current))
    return found


class ValueTypes:
    """The classes one cache may rebuild, and those it refused (warned about once each).

    ``declared``: called once, when an entry names a class not allowed yet, for the
    classes the cached function declares it returns (an entry another process stored).
    """

    def __init__(
        self, allowed: Iterable[type] = (), declared: Callable[[], Iterable[type]] | None = None
    ) -> None:
        self._lock = threading.Lock()
        self.allowed: dict[str, type] = {type_name(cls): cls for cls in allowed}
        self.refused: set[type] = set()
        self._declared = declared

    def _allowed(self, name: str) -> type | None:
        cls = self.allowed.get(name)
        declared = self._declared
        if cls is None and declared is not None:
            for each in declared():  # threads racing here both allow the same classes
                self.allow(each)
            self._declared = None
            cls = self.allowed.get(name)
        return cls

    def allow(self, cls: type) -> None:
        """Let entries naming ``cls`` be rebuilt."""
        with self._lock:
            self.allowed[type_name(cls)] = cls

    def envelope(self, value: Any) -> dict[str, Any]:
        """The entry for an object value.

        Raises:
            RefusedValue: ``value`` is not a model, nor a dataclass that round-trips.
        """
        cls = type(value)
        name = type_name(cls)
        data: Any
        if _is_model_class(cls):
            # pydantic's own JSON, as is, in the form validating it takes back
            data = orjson.Fragment(value.model_dump_json(by_alias=_by_alias(cls, value)))
        elif _is_dataclass_class(cls):
            try:  # nested dataclasses and models as dicts
                data = orjson.loads(orjson.dumps(value, default=_nested))
            except orjson.JSONEncodeError as exc:
                cause = exc.__cause__
                if isinstance(cause, RefusedValue):
                    raise cause from None
                raise RefusedValue(f"{name} holds a value that is not JSON: {exc}") from None
            try:  # checked on every store (a miss, so after a real call: cheap beside it)
                same = _dataclass(cls, data) == value
            except Exception:
                same = False
            if not same:
                raise RefusedValue(
                    f"{name} is a dataclass that rebuilding from JSON does not give back "
                    "equal (a set, bytes or datetime field, or eq=False?)"
                )
        else:
            raise RefusedValue(f"{name} is neither JSON, a dataclass nor a pydantic model")
        if self.allowed.get(name) is not cls:
            self.allow(cls)
        return {"t": _MODEL, "c": name, "v": data}

    def rebuild_entry(self, data: bytes) -> Any:
        """The object in an entry laid out as :meth:`envelope` writes it (``"v"`` last).

        A model is validated straight from the JSON bytes of ``"v"`` (pydantic's JSON
        validator, no intermediate dicts), which is what a hit costs most.

        Raises:
            ValueError: the entry names a class not allowed here, or does not fit it.
        """
        end = data.find(b'","v":', len(OBJ_PREFIX))
        if end < 0 or not data.endswith(b"}"):
            return self.rebuild(_loads_dict(data))
        name = data[len(OBJ_PREFIX) : end].decode("utf-8", "replace")
        cls = self._allowed(name)
        if cls is None:
            raise ValueError(f"a cache entry names a class not allowed here: {name!r:.200}")
        body = data[end + 6 : -1]
        try:
            if _is_model_class(cls):
                return _answered(cls.model_validate_json(body))  # type: ignore[attr-defined]
            return _dataclass(cls, orjson.loads(body))
        except Exception as exc:  # the type only: a validation message quotes the entry
            raise ValueError(f"a cache entry does not fit {name}: {type(exc).__name__}") from None

    def rebuild(self, envelope: dict[str, Any]) -> Any:
        """The object an ``obj`` entry holds.

        Raises:
            ValueError: the entry names a class this cache may not rebuild, or does not fit it.
        """
        name = envelope.get("c")
        cls = self._allowed(name) if isinstance(name, str) else None
        if cls is None:
            raise ValueError(f"a cache entry names a class not allowed here: {name!r:.200}")
        data = envelope.get("v")
        try:
            if _is_model_class(cls):
                return _answered(cls.model_validate(data))  # type: ignore[attr-defined]
            return _dataclass(cls, data)
        except Exception as exc:  # the type only: a validation message quotes the entry
            raise ValueError(f"a cache entry does not fit {name}: {type(exc).__name__}") from None
