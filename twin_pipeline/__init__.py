"""twin-pipeline: governed data harmonization and provenance for clinical digital twins."""

from __future__ import annotations

__version__ = "0.1.0"
