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
``TypeAdapter(list[<type>])``. Later resources of that shape are validated in batches by
running those adapters over their leaves — the same annotations, the same validators — once
per field type and batch, and only over values not already known valid for that field type
(a primitive's verdict depends on its type and value alone, and most values repeat: systems,
codes, units, references). A resource whose leaves fail goes back to the full model, which
decides and names the error. Shapes the lookup cannot follow (contained resources, anything
unexpected) always use the full model.
"""

from __future__ import annotations

import operator
import re
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


def import_element_models(models: typing.Iterable[Any]) -> int:
    """Import the model of every element reachable from ``models`` (the models import their
    data types lazily, at the first resource using each: ~0.3 s spread over a first load).
    Returns how many models were reached."""
    seen: set[Any] = set()
    todo = list(models)
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for field in _aliases(model).values():
            inner, _ = _unwrap(field.annotation)
            sub = _model_of(inner)
            if sub is not None and sub not in seen:
                todo.append(sub)
    return len(seen)


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


#: (validate list of values, leaf indexes, cache of values known valid) per annotation group
_Plan = list[tuple[Callable[[list[Any]], Any], list[int], set[Any]]]


@dataclass
class _Shape:
    plan: _Plan | None  # None: always the full model


Verdict = tuple[str, str] | None


class FastValidator:
    """Validates resources exactly as ``model_validate`` would, shape by shape.

    ``full(resource)`` is the authority: it returns None when valid or a ``(rule, reason)``.
    Resources are validated in batches (:meth:`validate_many`): the leaves of every resource
    of one shape are checked together, one adapter call per field type, and only values not
    already known valid for that field type are sent (a primitive's verdict depends on its
    type and value alone; a batch of resources repeats most values: systems, codes, units).
    """

    def __init__(self, full: Callable[[dict[str, Any]], Verdict]):
        self.full = full
        self.shapes: dict[str, _Shape] = {}
        self.enabled = True
        self.stats = {"shapes": 0, "fast": 0, "full": 0}

    def validate(
        self, resource: dict[str, Any], model: Any, extra: Callable[[dict[str, Any]], Any]
    ) -> Verdict:
        """``extra`` runs the checks outside the model (required bindings) on fast passes."""
        return self.validate_many([resource], lambda _: model, extra)[0]

    def validate_many(
        self,
        resources: list[dict[str, Any]],
        model_of: Callable[[dict[str, Any]], Any],
        extra: Callable[[dict[str, Any]], Any],
    ) -> list[Verdict]:
        """Verdicts of ``resources`` (in order), same as ``full`` on each of them."""
        out: list[Verdict] = [None] * len(resources)
        pending: dict[str, list[tuple[int, list[Any]]]] = {}
        shapes = self.shapes
        for i, res in enumerate(resources):
            sig, leaves = shape(res)
            known = shapes.get(sig)
            if known is not None and known.plan is not None:
                got = pending.get(sig)
                if got is None:
                    pending[sig] = [(i, leaves)]
                else:
                    got.append((i, leaves))
                continue
            out[i] = self._full(res, sig, known, model_of)
        for sig, items in pending.items():
            plan = shapes[sig].plan
            assert plan is not None
            bad = _failing(plan, items)
            for k, (i, _) in enumerate(items):
                if k in bad:  # a leaf failed: the model decides and names the error
                    self.stats["full"] += 1
                    out[i] = self.full(resources[i])
                else:
                    self.stats["fast"] += 1
                    out[i] = extra(resources[i])
        return out

    def _full(
        self,
        resource: dict[str, Any],
        sig: str,
        known: _Shape | None,
        model_of: Callable[[dict[str, Any]], Any],
    ) -> Verdict:
        self.stats["full"] += 1
        verdict = self.full(resource)
        if known is None and len(self.shapes) < _MAX_SHAPES:
            self.shapes[sig] = (
                self._compile(resource, model_of(resource)) if verdict is None else _Shape(None)
            )
            self.stats["shapes"] += 1
        elif known is not None and known.plan is None and verdict is None:
            # a shape first seen invalid (for a value) can still be compiled from a valid one
            self.shapes[sig] = self._compile(resource, model_of(resource))
        return verdict

    @staticmethod
    def _compile(resource: dict[str, Any], model: Any) -> _Shape:
        types = leaf_types(resource, model)
        if types is None:
            return _Shape(None)
        groups: dict[str, tuple[Any, list[int], set[Any]]] = {}
        for i, ann in enumerate(types):
            key = repr(ann)
            if key not in groups:
                adapter = _list_adapter(key, ann, model)
                if adapter is None:
                    return _Shape(None)
                groups[key] = (adapter.validate_python, [], _VALID.setdefault(key, set()))
            groups[key][1].append(i)
        return _Shape(list(groups.values()))


# Values remembered per field type, and their length: the ones that repeat (systems, codes,
# units, references) are short; long ones (attachments, narrative) would only take memory.
_MAX_VALID = 20_000
_MAX_VALID_LEN = 128


def _failing(plan: _Plan, items: typing.Sequence[tuple[int, typing.Sequence[Any]]]) -> set[int]:
    """Positions in ``items`` with a leaf its field type rejects. Each distinct value not
    known valid is validated once, all of a field type in one call."""
    bad: set[int] = set()
    for validate, idx, valid in plan:
        if len(idx) == 1:
            j = idx[0]
            flat = [leaves[j] for _, leaves in items]
        else:
            flat = [leaves[j] for _, leaves in items for j in idx]
        # only strings are remembered, so a number or boolean (1 == True) is never "known"
        if valid.issuperset(flat):
            continue
        novel: dict[Any, list[int]] = {}
        for k, (_, leaves) in enumerate(items):
            for j in idx:
                v = leaves[j]
                key = v if type(v) is str else (type(v), v)  # 1 == True: keep types apart
                if key not in valid:
                    got = novel.get(key)
                    if got is None:
                        novel[key] = [k]
                    else:
                        got.append(k)
        if not novel:
            continue
        keys = list(novel)
        values = [k if type(k) is str else k[1] for k in keys]
        rejected: set[int] = set()
        try:
            validate(values)
        except (ValueError, TypeError) as exc:  # pydantic.ValidationError is a ValueError
            errors = getattr(exc, "errors", None)
            locs = [e.get("loc", ()) for e in errors()] if callable(errors) else []
            if locs and all(loc and isinstance(loc[0], int) for loc in locs):
                rejected = {int(loc[0]) for loc in locs}
            else:  # cannot tell which value failed: every resource with a new value goes back
                rejected = set(range(len(keys)))
        if len(valid) > _MAX_VALID:
            valid.clear()
        for n, key in enumerate(keys):
            if n in rejected:
                bad.update(novel[key])
            elif type(key) is str and len(key) <= _MAX_VALID_LEN:
                valid.add(key)
    return bad


_VALID: dict[str, set[Any]] = {}
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


# -- straight from the text ------------------------------------------------------------------

_LIT = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null")
# Runs of characters that can make a literal, found fast (the first character is a set); each
# must then be exactly a JSON literal (_LIT), or the parser decides.
_TOKEN = re.compile(r"[-0-9tfn][-+.0-9a-zA-Z]*")
_MAX_CANDIDATES = 16  # text shapes per skeleton


def _literal(text: str) -> Any:
    if text == "null":
        return None
    if text == "true":
        return True
    if text == "false":
        return False
    if "." in text or "e" in text or "E" in text:
        return float(text)
    return int(text)


def _getter(idx: list[int]) -> Callable[[list[str]], tuple[str, ...]]:
    """``itemgetter`` that always returns a tuple."""
    if not idx:
        return lambda _: ()
    if len(idx) == 1:
        i = idx[0]
        return lambda s: (s[i],)
    return operator.itemgetter(*idx)


@dataclass
class _TextShape:
    resource_type: str
    fixed: Callable[[list[str]], tuple[str, ...]]  # keys and resourceType values ...
    expected: tuple[str, ...]  # ... must read exactly these
    values: Callable[[list[str]], tuple[str, ...]]  # the string leaves
    plan: _Plan | None  # over string leaves + literal leaves (in that order); None: never fast
    meta: tuple[int | None, int | None, int | None]  # id, meta.versionId, meta.lastUpdated
    bound: tuple[tuple[str, int], ...]  # top-level elements with a required binding


class TextShapes:
    """The same verdicts as :class:`FastValidator`, read straight from the JSON text.

    For text without escapes or control characters, ``text.split('"')`` cuts a valid JSON
    document into the structure between strings (even parts) and the strings (odd parts), at
    the speed of a memory scan. The structure, with its number/true/false/null literals replaced
    by one token and their kinds listed, is the *skeleton*; a skeleton seen in a document the
    model accepted, with the same object keys and ``resourceType`` values at the same places,
    is that document's exact shape. Any text with that skeleton and those keys is therefore a
    valid JSON document of that shape (strings without quote, backslash or control character
    and literals matching JSON's grammar are valid JSON values), so it needs neither parsing
    nor a walk: its leaves are validated in bulk by the field-type adapters of
    :class:`FastValidator` and its id and ``meta`` read from known places. Anything else —
    unseen skeleton, a leaf that fails, escapes — goes the parser-and-model way (``None``).
    A skeleton is learnt (:meth:`learn`) from a document the model accepted, only if the text
    and the parsed document agree leaf for leaf (duplicate keys, whitespace before a colon and
    contained resources never compile).
    """

    def __init__(self) -> None:
        self.shapes: dict[str, list[_TextShape]] = {}
        self.stats = {"text_shapes": 0, "text_fast": 0}

    @staticmethod
    def _cut(text: str) -> tuple[list[str], str, list[str]] | None:
        """(parts, skeleton, literals) of ``text``, or None when only a parser can tell."""
        if "\\" in text or not text.isprintable():  # escapes, control characters
            return None
        parts = text.split('"')
        if not len(parts) & 1:
            return None
        skel = "\x00".join(parts[0::2])
        lits = _TOKEN.findall(skel)
        if lits:
            for x in lits:
                # long literals (int() refuses over 4,300 digits) are the parser's to judge
                if len(x) > 64 or _LIT.fullmatch(x) is None:
                    return None
            kinds = "".join(
                "n" if x == "null" else "b" if x[0] in "tf" else "f" if _is_float(x) else "i"
                for x in lits
            )
            skel = _TOKEN.sub("\x02", skel) + "\x01" + kinds
        return parts, skel, lits

    def check_many(
        self,
        texts: typing.Sequence[str],
        extra: Callable[[dict[str, Any]], Any],
        skeletons: list[str | None] | None = None,
    ) -> list[tuple[Verdict, tuple[Any, Any, Any, Any]] | None]:
        """Per text: ``(verdict, (type, id, versionId, lastUpdated))``, or None: parse it.
        ``skeletons`` (same length) receives the skeleton of each text that had none known."""
        out: list[tuple[Verdict, tuple[Any, Any, Any, Any]] | None] = [None] * len(texts)
        pending: dict[int, tuple[_TextShape, list[tuple[int, tuple[Any, ...]]]]] = {}
        shapes = self.shapes
        for n, text in enumerate(texts):
            cut = self._cut(text)
            if cut is None:
                continue
            parts, skel, lits = cut
            candidates = shapes.get(skel)
            if candidates is None:
                if skeletons is not None:
                    skeletons[n] = skel
                continue
            strs = parts[1::2]
            for c in candidates:
                if c.fixed(strs) == c.expected:
                    if c.plan is None:
                        break
                    leaves = c.values(strs)
                    if lits:
                        leaves += tuple(_literal(x) for x in lits)
                    got = pending.get(id(c))
                    if got is None:
                        pending[id(c)] = (c, [(n, leaves)])
                    else:
                        got[1].append((n, leaves))
                    break
        for c, items in pending.values():
            assert c.plan is not None
            bad = _failing(c.plan, items)
            i_id, i_vid, i_lu = c.meta
            for k, (n, leaves) in enumerate(items):
                if k in bad:
                    continue  # the parser and the model decide
                self.stats["text_fast"] += 1
                verdict = None
                if c.bound:
                    mini = {"resourceType": c.resource_type}
                    mini.update((name, leaves[i]) for name, i in c.bound)
                    verdict = extra(mini)
                out[n] = (
                    verdict,
                    (
                        c.resource_type,
                        leaves[i_id] if i_id is not None else None,
                        leaves[i_vid] if i_vid is not None else None,
                        leaves[i_lu] if i_lu is not None else None,
                    ),
                )
        return out

    def learn(
        self, text: str, resource: dict[str, Any], model: Any, bound: typing.Collection[str]
    ) -> None:
        """Compile the text shape of ``text``, a document ``model`` accepted (parsed:
        ``resource``); ``bound``: top-level elements with a required binding."""
        if len(self.shapes) >= _MAX_SHAPES:
            return
        cut = self._cut(text)
        if cut is None:
            return
        parts, skel, lits = cut
        candidates = self.shapes.setdefault(skel, [])
        strs = parts[1::2]
        if len(candidates) >= _MAX_CANDIDATES or any(
            c.fixed(strs) == c.expected for c in candidates
        ):
            return
        compiled = _compile_text(parts, lits, resource, model, bound)
        candidates.append(compiled)
        self.stats["text_shapes"] += compiled.plan is not None


def _is_float(lit: str) -> bool:
    return "." in lit or "e" in lit or "E" in lit


def _compile_text(
    parts: list[str],
    lits: list[str],
    resource: dict[str, Any],
    model: Any,
    bound: typing.Collection[str],
) -> _TextShape:
    strs = parts[1::2]
    segs = parts[0::2]
    is_key = [seg.startswith(":") for seg in segs[1:]]
    # the parsed document, walked in order: keys, resourceType values, other leaves
    keys: list[str] = []
    rtypes: list[str] = []
    leaves: list[Any] = []

    def walk(node: Any) -> None:
        if type(node) is dict:
            for k, v in node.items():
                keys.append(k)
                if k == "resourceType":
                    rtypes.append(v)
                    continue
                walk(v)
        elif type(node) is list:
            for v in node:
                walk(v)
        else:
            leaves.append(node)

    walk(resource)
    # the text, in the same order
    t_keys = [s for s, k in zip(strs, is_key, strict=True) if k]
    fixed_idx: list[int] = []
    value_idx: list[int] = []
    prev_key: str | None = None
    for i, (s, k) in enumerate(zip(strs, is_key, strict=True)):
        if k:
            fixed_idx.append(i)
            prev_key = s
        elif prev_key == "resourceType" and segs[i] == ":":
            fixed_idx.append(i)  # the resourceType value right after its key
            prev_key = None
        else:
            value_idx.append(i)
            prev_key = None
    fixed, expected = _getter(fixed_idx), tuple(strs[i] for i in fixed_idx)
    never = _TextShape("", fixed, expected, _getter([]), None, (None, None, None), ())
    rtype = resource.get("resourceType")
    if (
        not isinstance(rtype, str)
        or len(rtypes) != 1
        or ("meta" in resource and (type(resource["meta"]) is not dict))
    ):
        return never
    str_leaves = [v for v in leaves if type(v) is str]
    lit_leaves = [v for v in leaves if type(v) is not str]
    lit_values = [_literal(x) for x in lits]
    if (
        t_keys != keys
        or [strs[i] for i in fixed_idx if not is_key[i]] != rtypes
        or [strs[i] for i in value_idx] != str_leaves
        or len(lit_values) != len(lit_leaves)
        or any(
            type(a) is not type(b) or a != b for a, b in zip(lit_values, lit_leaves, strict=True)
        )
    ):
        return never  # text and document disagree (duplicate keys, spacing, ...)
    types = leaf_types(resource, model)
    if types is None or len(types) != len(leaves):
        return never
    # leaf j of the walk -> its place in (string leaves + literal leaves)
    where: list[int] = []
    n_str = n_lit = 0
    for v in leaves:
        if type(v) is str:
            where.append(n_str)
            n_str += 1
        else:
            where.append(len(str_leaves) + n_lit)
            n_lit += 1
    groups: dict[str, tuple[Any, list[int], set[Any]]] = {}
    for j, ann in enumerate(types):
        key = repr(ann)
        if key not in groups:
            adapter = _list_adapter(key, ann, model)
            if adapter is None:
                return never
            groups[key] = (adapter.validate_python, [], _VALID.setdefault(key, set()))
        groups[key][1].append(where[j])
    # top-level leaves read without parsing: id, meta.versionId, meta.lastUpdated, bindings
    top: dict[str, int] = {}
    meta: dict[str, int] = {}
    at = 0
    for name, v in resource.items():
        if name == "resourceType":
            continue
        start = at
        at += _count_leaves(v)
        if type(v) not in (dict, list):
            top[name] = where[start]
        elif name == "meta" and type(v) is dict:
            m = start
            for mk, mv in v.items():
                if type(mv) not in (dict, list):
                    meta[mk] = where[m]
                m += _count_leaves(mv)
    return _TextShape(
        resource_type=rtype,
        fixed=fixed,
        expected=expected,
        values=_getter(value_idx),
        plan=list(groups.values()),
        meta=(top.get("id"), meta.get("versionId"), meta.get("lastUpdated")),
        bound=tuple((name, top[name]) for name in bound if name in top),
    )


def _count_leaves(node: Any) -> int:
    if type(node) is dict:
        return sum(_count_leaves(v) for k, v in node.items() if k != "resourceType")
    if type(node) is list:
        return sum(_count_leaves(v) for v in node)
    return 1
