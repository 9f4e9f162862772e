"""Identifier values the text engine must find in a note: no Presidio import here, so the
deny-lists (and the text cache's digests of them) are built without loading the engine."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DenyTerms:
    """Identifier values known from the structured record (one patient, or the staff list)."""

    names: tuple[str, ...] = ()
    numbers: tuple[tuple[str, str], ...] = ()  # (entity, value) matched on digits
    literals: tuple[tuple[str, str], ...] = ()  # (entity, value) matched case-insensitively

    def is_empty(self) -> bool:
        return not (self.names or self.numbers or self.literals)
