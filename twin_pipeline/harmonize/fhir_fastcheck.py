"""Full FHIR model validation at a fraction of the cost: shape once, primitives in bulk.

Validating a resource with the ``fhir.resources`` models costs ~125 µs, most of it in the
models' per-element Python validators (null complex elements, choice ``[x]`` elements,
required primitives, resource type). Those checks depend only on the resource's *shape*: which
keys are present where, array lengths, JSON types, nulls and ``resourceType`` values. What is
left depends on the primitive values, and each of those is checked by its own field type
(``Annotated[date, Date()]``, ``Annotated[str, Id()]``, ...).

So: the first resource of every exact shape is validated by the model (the authority). If it
passes, the field type of each primitive leaf is looked up in the model classes and one
shape's leaves are grouped by field type, each group validated by one shared
``TypeAdapter(list[<type>])``. Every later resource of that shape is validated by running those
adapters over its leaves — the same annotations, the same validators, a few calls into
pydantic-core. A resource whose leaves fail
goes back to the full model, which decides and names the error. Shapes the lookup cannot
follow (contained resources, anything unexpected) always use the full model.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_TOKENS = {str: "s", int: "i", float: "f", bool: "b", type(None): "n"}
_MAX_SHAPES = 50_000


def shape(resource: dict[str, Any]) -> tuple[str, list[Any]]:
    """The exact shape signature of a resource and its primitive leaves in walk order."""
    sig: list[str] = []
    leaves: list[Any] = []
    tokens = _TOKENS

    def walk(node: Any) -> None:
        t = type(node)
        if t is dict:
            sig.append("{")
            for k, v in node.items():
                sig.append(k)
                if k == "resourceType":
                    sig.append(f"={v}")
                    continue
                walk(v)
            sig.append("}")
        elif t is list:
            sig.append("[")
            for v in node:
                walk(v)
            sig.append("]")
        else:
            sig.append(tokens.get(t, "?"))
            leaves.append(node)

    walk(resource)
    return "\x1f".join(sig), leaves


def _unwrap(ann: Any) -> tuple[Any, bool]:
    """Strip Optional; return (inner annotation, is_list)."""
    is_list = False
    while True:
        origin = typing.get_origin(ann)
        if origin is typing.Union or origin is types.UnionType:
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            if len(args) != 1:
                return ann, is_list
            ann = args[0]
            continue
        if origin in (list, typing.List):  # noqa: UP006 - typing.List appears in annotations
            if is_list:
                return ann, is_list
            is_list = True
            ann = typing.get_args(ann)[0]
            continue
        return ann, is_list


def _model_of(ann: Any) -> Any | None:
    getter = getattr(ann, "get_model_klass", None)
    if getter is None:
        return None
    try:
        cls = getter()
    except (ImportError, AttributeError, ValueError):
        return None
    if getattr(cls, "__resource_type__", "") in ("Resource", "DomainResource"):
        return None  # the concrete class depends on the data: leave it to the model
    return cls


def _primitive_ann(ann: Any) -> Any:
    """The annotation used to validate one primitive leaf (Optional, list element)."""
    inner, _ = _unwrap(ann)
    return typing.Optional[inner]  # noqa: UP045 - a runtime annotation object


def leaf_types(resource: dict[str, Any], cls: Any) -> list[Any] | None:
    """Field annotations of the leaves of ``resource`` in :func:`shape` order, or None."""
    out: list[Any] = []

    def walk_model(node: dict[str, Any], model: Any) -> bool:
        aliases = _aliases(model)
        for k, v in node.items():
            if k == "resourceType":
                continue
            field = aliases.get(k)
            if field is None:
                return False
            if not walk_value(v, field.annotation):
                return False
        return True

    def walk_value(v: Any, ann: Any) -> bool:
        inner, is_list = _unwrap(ann)
        if isinstance(v, list):
            if not is_list:
                return False
            return all(walk_value(x, inner) for x in v)
        if isinstance(v, dict):
            model = _model_of(inner)
            return model is not None and walk_model(v, model)
        if _model_of(inner) is not None:
            return False
        # fhir_comments is str | list[str]; other primitives carry Annotated markers
        out.append(_primitive_ann(inner))
        return True

    return out if walk_model(resource, cls) else None


_ALIAS_CACHE: dict[Any, dict[str, Any]] = {}


def _aliases(model: Any) -> dict[str, Any]:
    got = _ALIAS_CACHE.get(model)
    if got is None:
        got = {(f.alias or name): f for name, f in model.model_fields.items()}
        _ALIAS_CACHE[model] = got
    return got


@dataclass
class _Shape:
    check: Callable[[tuple[Any, ...]], None] | None  # None: always the full model


class FastValidator:
    """Validates resources exactly as ``model_validate`` would, shape by shape.

    ``full(resource)`` is the authority: it returns None when valid or a ``(rule, reason)``.
    """

    def __init__(self, full: Callable[[dict[str, Any]], tuple[str, str] | None]):
        self.full = full
        self.shapes: dict[str, _Shape] = {}
        self.enabled = True
        self.stats = {"shapes": 0, "fast": 0, "full": 0}

    def validate(
        self, resource: dict[str, Any], model: Any, extra: Callable[[dict[str, Any]], Any]
    ) -> tuple[str, str] | None:
        """``extra`` runs the checks outside the model (required bindings) on fast passes."""
        sig, leaves = shape(resource)
        known = self.shapes.get(sig)
        if known is not None and known.check is not None:
            try:
                known.check(tuple(leaves))
            except (ValueError, TypeError):  # pydantic.ValidationError is a ValueError
                pass
            else:
                self.stats["fast"] += 1
                verdict: tuple[str, str] | None = extra(resource)
                return verdict
        self.stats["full"] += 1
        verdict = self.full(resource)
        if known is None and len(self.shapes) < _MAX_SHAPES:
            self.shapes[sig] = self._compile(resource, model) if verdict is None else _Shape(None)
            self.stats["shapes"] += 1
        elif known is not None and known.check is None and verdict is None:
            # a shape first seen invalid (for a value) can still be compiled from a valid one
            self.shapes[sig] = self._compile(resource, model)
        return verdict

    @staticmethod
    def _compile(resource: dict[str, Any], model: Any) -> _Shape:
        types = leaf_types(resource, model)
        if types is None:
            return _Shape(None)
        groups: dict[str, tuple[Any, list[int]]] = {}
        for i, ann in enumerate(types):
            key = repr(ann)
            if key not in groups:
                adapter = _list_adapter(key, ann, model)
                if adapter is None:
                    return _Shape(None)
                groups[key] = (adapter, [])
            groups[key][1].append(i)
        plan = [(a.validate_python, idx) for a, idx in groups.values()]

        def check(leaves: tuple[Any, ...]) -> None:
            for validate, idx in plan:
                validate([leaves[i] for i in idx])

        return _Shape(check)


_ADAPTERS: dict[str, Any] = {}


def _list_adapter(key: str, ann: Any, model: Any) -> Any | None:
    """One ``TypeAdapter(list[ann])`` per primitive annotation, shared by every shape."""
    got = _ADAPTERS.get(key)
    if got is None:
        from pydantic import ConfigDict, TypeAdapter

        keep = ("strict", "str_strip_whitespace")
        config = ConfigDict(**{k: v for k, v in model.model_config.items() if k in keep})  # type: ignore[typeddict-item]
        try:
            got = TypeAdapter(list[ann], config=config)  # type: ignore[valid-type]
        except Exception:  # pragma: no cover - an annotation pydantic cannot adapt
            return None
        _ADAPTERS[key] = got
    return got
