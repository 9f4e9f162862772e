"""What-if scenario files (``assets/scenarios/*.yaml``), validated with pydantic.

A scenario changes parameters fitted from the twin's history (scanners, staffing, opening hours,
demand, service times, beds, length of stay). The baseline is always the fitted history
itself, so every run compares "as it was" with "what if". ``explicit`` stations replace the
fitted history with textbook queues (used to check the simulator against Erlang C).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from twin_pipeline.errors import ConfigError
from twin_pipeline.paths import ASSETS_DIR
from twin_pipeline.yamlfiles import safe_load

SCENARIOS_DIR = ASSETS_DIR / "scenarios"
Domain = Literal["imaging", "beds"]
DOMAINS: tuple[Domain, ...] = ("imaging", "beds")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Hours(_Strict):
    """Opening hours ``[open, close)`` in whole hours of the local day (0-24)."""

    open: int = Field(ge=0, le=23)
    close: int = Field(ge=1, le=24)

    @model_validator(mode="after")
    def _order(self) -> Hours:
        if self.close <= self.open:
            raise ValueError(f"close ({self.close}) must be after open ({self.open})")
        return self


class DemandShift(_Strict):
    """Move a fraction of a modality's demand from some hours of the day to others (e.g.
    outpatient slots moved to the evening), spread evenly over the target hours."""

    modality: str
    fraction: float = Field(gt=0, le=1)
    from_hours: Hours
    to_hours: Hours


class ImagingChanges(_Strict):
    add_scanners: dict[str, int] = Field(default_factory=dict)
    set_scanners: dict[str, int] = Field(default_factory=dict)
    # Technologists on duty per modality: a scan needs a scanner and a technologist.
    technologists: dict[str, int] = Field(default_factory=dict)
    # Per modality, or "*" for all.
    opening_hours: dict[str, Hours] = Field(default_factory=dict)
    demand_multiplier: float = Field(default=1.0, gt=0)
    modality_demand: dict[str, float] = Field(default_factory=dict)
    service_time_multiplier: dict[str, float] = Field(default_factory=dict)
    shift_demand: list[DemandShift] = Field(default_factory=list)

    @field_validator("set_scanners", "technologists")
    @classmethod
    def _positive(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: n for k, n in v.items() if n < 1}
        if bad:
            raise ValueError(f"counts must be at least 1: {bad}")
        return v


class BedChanges(_Strict):
    add_beds: int = 0
    set_beds: int | None = Field(default=None, ge=1)
    demand_multiplier: float = Field(default=1.0, gt=0)
    los_multiplier: float = Field(default=1.0, gt=0)


class ExplicitStation(_Strict):
    """A textbook queue: Poisson arrivals, ``servers`` servers open around the clock."""

    arrival_rate_per_hour: float = Field(gt=0)
    service_mean_min: float = Field(gt=0)
    servers: int = Field(ge=1)
    distribution: Literal["exponential", "lognormal", "deterministic"] = "exponential"
    lognormal_sigma: float = Field(default=0.5, gt=0)


class FitConfig(_Strict):
    """How history becomes model parameters."""

    # Local time zone for hour-of-day profiles: an IANA name, or "auto" (the UTC offset the
    # imaging series record, else UTC).
    timezone: str = "auto"
    # Minutes added to each study for positioning/room turnover (not visible in series times).
    turnover_minutes: float = Field(default=0.0, ge=0)
    # Per-series minutes when a modality has no multi-series study to measure it from.
    default_series_minutes: float = Field(default=5.0, gt=0)
    service_distribution: Literal["empirical", "lognormal", "exponential"] = "empirical"
    inpatient_classes: list[str] = Field(default_factory=lambda: ["IMP"])


class Scenario(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_\-]*$")
    description: str = ""
    domains: list[Domain] = Field(default_factory=lambda: list(DOMAINS))
    replications: int = Field(default=20, ge=1, le=1000)
    seed: int = 42
    horizon_days: float | None = Field(default=None, gt=0)  # None: the history's length
    warmup_days: float = Field(default=0.0, ge=0)
    fit: FitConfig = Field(default_factory=FitConfig)
    imaging: ImagingChanges = Field(default_factory=ImagingChanges)
    beds: BedChanges = Field(default_factory=BedChanges)
    explicit: dict[str, ExplicitStation] | None = None
    # Explicit stations only: the scenario arm's stations (defaults to the baseline's).
    explicit_scenario: dict[str, ExplicitStation] | None = None

    @model_validator(mode="after")
    def _check(self) -> Scenario:
        if self.explicit is not None and self.horizon_days is None:
            raise ValueError("explicit stations need horizon_days")
        if self.horizon_days is not None and self.warmup_days >= self.horizon_days:
            raise ValueError("warmup_days must be shorter than horizon_days")
        return self


def resolve_scenario_path(path: str | Path) -> Path:
    """A path as given, else relative to ``assets/scenarios/`` (``.yaml`` optional)."""
    p = Path(path)
    for cand in (p, SCENARIOS_DIR / p, SCENARIOS_DIR / f"{p}.yaml"):
        if cand.is_file():
            return cand.resolve()
    raise ConfigError("scenario file not found", path=str(path))


def load_scenario(path: str | Path) -> tuple[Scenario, Path, str]:
    """The validated scenario, its resolved path and the sha256 of its bytes."""
    p = resolve_scenario_path(path)
    raw = p.read_bytes()
    try:
        doc = safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", path=str(p)) from exc
    if not isinstance(doc, dict):
        raise ConfigError("a scenario must be a mapping", path=str(p))
    try:
        sc = Scenario.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise ConfigError(
            f"invalid scenario ({exc.error_count()} error(s)); first at {loc or '<root>'}: "
            f"{first['msg']}",
            path=str(p),
            position=loc or None,
        ) from exc
    return sc, p, hashlib.sha256(raw).hexdigest()
