"""Specs are read with libyaml's loader: the same documents as PyYAML's pure-Python one."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from twin_pipeline.yamlfiles import SAFE_LOADER, safe_load

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted(
    p
    for folder in ("assets", "expectations", "policies")
    for p in (ROOT / folder).rglob("*")
    if p.suffix in (".yaml", ".yml")
)


def test_libyaml_is_used_and_every_spec_is_covered() -> None:
    assert SAFE_LOADER is yaml.CSafeLoader  # the wheel PyYAML ships has it
    assert len(SPECS) >= 10


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(ROOT)))
def test_same_document_as_pure_python_safe_load(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert safe_load(text) == yaml.load(text, Loader=yaml.SafeLoader)


def test_unsafe_tags_are_refused_and_errors_keep_their_type() -> None:
    with pytest.raises(yaml.constructor.ConstructorError):
        safe_load("!!python/object/apply:os.system ['true']")
    with pytest.raises(yaml.YAMLError):
        safe_load("a: [1, 2\nb: 3")
    text = b"when: 2024-03-05\nn: 1.5e3\nno: off\nx: 0o17\ny: '012'"
    assert safe_load(text) == yaml.load(text, Loader=yaml.SafeLoader)
