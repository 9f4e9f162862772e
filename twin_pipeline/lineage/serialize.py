"""Registry of PROV export formats, keyed by format name.

Each serializer writes a :class:`prov.model.ProvDocument` to text; formats that ``prov`` can
read back (json, xml, ttl) also have a reader, used by tests and by ``twin lineage export`` to
check what it wrote.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import prov.model as pm

from twin_pipeline.errors import ConfigError


@dataclass(frozen=True)
class Serializer:
    name: str
    suffix: str
    media_type: str
    write: Callable[[pm.ProvDocument], str]
    read: Callable[[str], pm.ProvDocument] | None = None


SERIALIZERS: dict[str, Serializer] = {}


def register(serializer: Serializer) -> Serializer:
    SERIALIZERS[serializer.name] = serializer
    return serializer


def _writer(fmt: str, **kw: Any) -> Callable[[pm.ProvDocument], str]:
    def write(doc: pm.ProvDocument) -> str:
        return str(doc.serialize(format=fmt, **kw))

    return write


def _reader(fmt: str, **kw: str) -> Callable[[str], pm.ProvDocument]:
    def read(text: str) -> pm.ProvDocument:
        doc: pm.ProvDocument = pm.ProvDocument.deserialize(content=text, format=fmt, **kw)
        return doc

    return read


register(
    Serializer("json", ".json", "application/json", _writer("json", indent=2), _reader("json"))
)
register(Serializer("provn", ".provn", "text/provenance-notation", _writer("provn")))
register(
    Serializer(
        "ttl",
        ".ttl",
        "text/turtle",
        _writer("rdf", rdf_format="turtle"),
        _reader("rdf", rdf_format="turtle"),
    )
)
register(Serializer("xml", ".xml", "application/xml", _writer("xml"), _reader("xml")))


def get(name: str) -> Serializer:
    try:
        return SERIALIZERS[name]
    except KeyError:
        raise ConfigError(
            f"unknown PROV format {name!r}; choose one of {', '.join(sorted(SERIALIZERS))}"
        ) from None


def serialize(doc: pm.ProvDocument, fmt: str) -> str:
    return get(fmt).write(doc)
