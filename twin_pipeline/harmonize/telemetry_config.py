"""The declarative telemetry spec (``assets/telemetry.yaml``): metric vocabulary, units, windows.

Validated with pydantic. Used by the telemetry, HL7 v2 and WFDB readers (to know which metric
codes exist) and by :mod:`twin_pipeline.harmonize.telemetry` (to map codes, convert units and
flag implausible values).
"""

from __future__ import annotations

import functools
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from twin_pipeline.errors import ConfigError
from twin_pipeline.paths import ASSETS_DIR
from twin_pipeline.yamlfiles import safe_load

TELEMETRY_SPEC = ASSETS_DIR / "telemetry.yaml"


class Conversion(BaseModel):
    """canonical = (value + offset) * factor."""

    model_config = ConfigDict(extra="forbid")
    factor: float = 1.0
    offset: float = 0.0


class MetricSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: str = Field(pattern=r"^MDC_[A-Z0-9_]+$")
    mdc_code: int
    loinc: str = Field(pattern=r"^\d{1,7}-\d$")
    display: str
    unit: str
    plausible: tuple[float, float]
    aliases: list[str] = Field(default_factory=list)
    conversions: dict[str, Conversion] = Field(default_factory=dict)

    @field_validator("plausible")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] >= v[1]:
            raise ValueError(f"plausible range {v} is empty")
        return v

    def codes(self) -> set[str]:
        return {self.metric, str(self.mdc_code), self.loinc, *self.aliases}


class TelemetrySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int
    default_timezone: str
    gap_threshold_seconds: float = Field(gt=0)
    late_arrival_window_seconds: float = Field(ge=0)
    units: dict[str, str]
    metrics: list[MetricSpec]
    waveform_summary_metric_prefix: str = "WAVE_"

    @field_validator("default_timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {v!r}") from exc
        return v

    @model_validator(mode="after")
    def _unique_codes(self) -> TelemetrySpec:
        seen: dict[str, str] = {}
        for m in self.metrics:
            for code in m.codes():
                key = code.upper()
                if key in seen and seen[key] != m.metric:
                    raise ValueError(f"code {code!r} maps to both {seen[key]} and {m.metric}")
                seen[key] = m.metric
        return self

    def alias_map(self) -> dict[str, str]:
        """Every accepted code (upper case) -> canonical MDC metric."""
        return {code.upper(): m.metric for m in self.metrics for code in m.codes()}

    def metric(self, code: str) -> MetricSpec | None:
        canonical = self.alias_map().get(code.strip().upper())
        return next((m for m in self.metrics if m.metric == canonical), None)

    def unit_rows(self) -> list[tuple[str, str, float, float]]:
        """(metric, ucum unit as normalized, factor, offset) for every accepted unit per metric."""
        rows: list[tuple[str, str, float, float]] = []
        for m in self.metrics:
            rows.append((m.metric, m.unit, 1.0, 0.0))
            for unit, conv in m.conversions.items():
                rows.append((m.metric, unit, conv.factor, conv.offset))
        return rows


def load_telemetry_spec(path: Path | None = None) -> TelemetrySpec:
    path = path or TELEMETRY_SPEC
    return _load(str(path))


@functools.cache
def _load(path: str) -> TelemetrySpec:
    try:
        doc = safe_load(Path(path).read_text())
        return TelemetrySpec.model_validate(doc)
    except FileNotFoundError as exc:
        raise ConfigError("telemetry spec not found", path=path) from exc
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"invalid telemetry spec: {exc}", path=path) from exc
