"""Fit simulation parameters from the twin's own history.

Imaging, per modality: arrival rate per weekday and hour of day (study start times), service
time per study (span of its series times plus one typical series, plus optional turnover),
opening hours (the hours studies started in), scanners (distinct scanners seen in the series,
else ImagingModality twins). Beds: admission rate per weekday and hour (inpatient encounter
starts), length of stay (encounter periods), beds (Bed twins on units that took inpatients).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from twin_pipeline.store import Store
from twin_pipeline.twin.graph import EDGE_TABLE, NODE_TABLE
from twin_pipeline.twin.scenario import FitConfig


@dataclass
class ServiceDist:
    """Service time in minutes: resampled history, or a lognormal/exponential fitted to it."""

    kind: str  # empirical | lognormal | exponential | deterministic
    mean: float
    samples: np.ndarray = field(default_factory=lambda: np.empty(0))
    mu: float = 0.0
    sigma: float = 0.0

    def draw(self, rng: np.random.Generator, n: int, scale: float = 1.0) -> np.ndarray:
        if n == 0:
            return np.empty(0)
        if self.kind == "empirical":
            out = rng.choice(self.samples, n)
        elif self.kind == "lognormal":
            out = rng.lognormal(self.mu, self.sigma, n)
        elif self.kind == "exponential":
            out = rng.exponential(self.mean, n)
        else:
            out = np.full(n, self.mean)
        return np.asarray(out * scale, dtype=float)

    @classmethod
    def from_samples(cls, samples: np.ndarray, kind: str) -> ServiceDist:
        samples = np.asarray(samples, dtype=float)
        samples = samples[samples > 0]
        mean = float(samples.mean())
        logs = np.log(samples)
        sigma = float(logs.std()) if len(samples) > 1 else 0.0
        # Lognormal by moments of the logs, shifted so its mean equals the sample mean.
        mu = math.log(mean) - sigma**2 / 2
        return cls(kind=kind, mean=mean, samples=samples, mu=mu, sigma=sigma)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "mean_min": round(self.mean, 3)}
        if len(self.samples):
            d["n"] = len(self.samples)
            d["p50_min"] = round(float(np.median(self.samples)), 3)
            d["p90_min"] = round(float(np.quantile(self.samples, 0.9)), 3)
        if self.kind == "lognormal":
            d.update(mu=round(self.mu, 4), sigma=round(self.sigma, 4))
        return d


@dataclass
class StationParams:
    """One queueing station: a modality's scanners or the hospital's beds."""

    name: str
    rates: np.ndarray  # (7, 24): expected arrivals in that weekday-hour
    service: ServiceDist  # minutes
    servers: int
    open_hours: tuple[int, int] = (0, 24)
    historical_count: int = 0
    servers_source: str = ""

    def arrivals_per_day(self) -> float:
        return float(self.rates.sum() / 7.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "servers": self.servers,
            "servers_source": self.servers_source,
            "open_hours": list(self.open_hours),
            "arrivals_per_day": round(self.arrivals_per_day(), 4),
            "service": self.service.to_dict(),
            "historical_count": self.historical_count,
        }


@dataclass
class History:
    """What was fitted, and the window it was fitted on."""

    first_day: date | None
    days: int
    timezone: str
    imaging: dict[str, StationParams] = field(default_factory=dict)
    beds: StationParams | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def start_weekday(self) -> int:
        return self.first_day.weekday() if self.first_day else 0

    def imaging_historical_per_day(self) -> dict[str, float]:
        return (
            {m: p.historical_count / self.days for m, p in self.imaging.items()}
            if self.days
            else {}
        )

    def beds_historical_per_day(self) -> float | None:
        if self.beds is None or not self.days:
            return None
        return self.beds.historical_count / self.days


def _window(times: list[datetime]) -> tuple[date, int]:
    first = min(times).date()
    last = max(times).date()
    return first, (last - first).days + 1


def _rates(times: list[datetime], first: date, days: int) -> np.ndarray:
    """Arrivals per (weekday, hour), divided by how often that weekday occurs in the window."""
    counts = np.zeros((7, 24))
    for t in times:
        counts[t.weekday(), t.hour] += 1
    occurs = np.zeros(7)
    for d in range(days):
        occurs[(first + timedelta(days=d)).weekday()] += 1
    with np.errstate(divide="ignore", invalid="ignore"):
        rates = np.where(occurs[:, None] > 0, counts / np.maximum(occurs[:, None], 1), 0.0)
    return rates


def _local(ts: Any, tz: tzinfo) -> datetime | None:
    if ts is None:
        return None
    if isinstance(ts, str):
        ts = datetime.fromisoformat(ts)
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(tz)


def resolve_timezone(store: Store, name: str) -> tzinfo:
    """``auto``: the most common UTC offset recorded with the imaging series (DICOM
    TimezoneOffsetFromUTC), else UTC; otherwise an IANA zone name."""
    if name != "auto":
        return ZoneInfo(name)
    row = store.con.execute(
        f"SELECT mode(props->>'timezone_offset') FROM {NODE_TABLE} "
        "WHERE twin_type = 'ImagingStudy' AND (props->>'timezone_offset') IS NOT NULL"
    ).fetchone()
    m = re.fullmatch(r"([+-])(\d{2}):?(\d{2})", str(row[0]) if row and row[0] else "")
    if not m:
        return UTC
    sign = -1 if m[1] == "-" else 1
    return timezone(sign * timedelta(hours=int(m[2]), minutes=int(m[3])))


def _stations(by_mod: dict[str, set[str]]) -> list[list[str]]:
    """Modalities acquired on a shared scanner (e.g. CR and DX on one X-ray room) form one
    station: they compete for the same machines."""
    groups: list[tuple[set[str], set[str]]] = []  # (modalities, serials)
    for mod in sorted(by_mod):
        mods, serials = {mod}, set(by_mod[mod])
        for g in [g for g in groups if g[1] & serials]:
            groups.remove(g)
            mods |= g[0]
            serials |= g[1]
        groups.append((mods, serials))
    return sorted(sorted(g[0]) for g in groups)


def fit_imaging(
    store: Store, cfg: FitConfig, tz: tzinfo = UTC
) -> tuple[dict[str, StationParams], list[datetime], list[str]]:
    notes: list[str] = []
    rows = store.con.execute(
        f"""
        SELECT props->>'modality',
               TRY_CAST(props->>'started' AS TIMESTAMPTZ),
               TRY_CAST(props->>'series_first' AS TIMESTAMP),
               TRY_CAST(props->>'series_last' AS TIMESTAMP),
               TRY_CAST(props->>'series_count' AS BIGINT),
               props->>'scanner_serial'
        FROM {NODE_TABLE} WHERE twin_type = 'ImagingStudy'
        """
    ).fetchall()
    by_mod: dict[str, list[tuple[Any, ...]]] = {}
    for r in rows:
        start = r[1]
        if r[0] is None or start is None:
            continue
        by_mod.setdefault(str(r[0]).upper(), []).append((_local(start, tz), *r[2:]))
    if not by_mod:
        return {}, [], ["no ImagingStudy twins with a modality and start time: imaging not fitted"]
    scanner_nodes = dict(
        store.con.execute(
            f"SELECT upper(props->>'modality'), count(*) FROM {NODE_TABLE} "
            "WHERE twin_type = 'ImagingModality' GROUP BY 1"
        ).fetchall()
    )
    all_times = [r[0] for rs in by_mod.values() for r in rs]
    first, days = _window(all_times)
    durations: dict[str, list[float]] = {}
    for mod, rs in by_mod.items():
        # Series times give each study's span; one more typical series closes it.
        gaps = [
            (r[2] - r[1]).total_seconds() / 60 / (r[3] - 1)
            for r in rs
            if r[1] is not None and r[2] is not None and r[3] and r[3] > 1 and r[2] > r[1]
        ]
        per_series = float(np.median(gaps)) if gaps else cfg.default_series_minutes
        if not gaps:
            notes.append(f"{mod}: no multi-series study; per-series time {per_series} min assumed")
        durations[mod] = [
            ((r[2] - r[1]).total_seconds() / 60 if r[1] is not None and r[2] is not None else 0.0)
            + per_series
            + cfg.turnover_minutes
            for r in rs
        ]
    serials = {mod: {str(r[4]) for r in rs if r[4]} for mod, rs in by_mod.items()}
    out: dict[str, StationParams] = {}
    for group in _stations(serials):
        name = "+".join(group)
        times = [r[0] for m in group for r in by_mod[m]]
        group_serials = set().union(*(serials[m] for m in group))
        if group_serials:
            servers, src = len(group_serials), "distinct scanners in the series"
        elif any(scanner_nodes.get(m) for m in group):
            servers = sum(int(scanner_nodes.get(m) or 0) for m in group)
            src = "ImagingModality twins"
        else:
            servers, src = 1, "assumed (no scanner data)"
        hours = [t.hour for t in times]
        out[name] = StationParams(
            name=name,
            rates=_rates(times, first, days),
            service=ServiceDist.from_samples(
                np.array([d for m in group for d in durations[m]]), cfg.service_distribution
            ),
            servers=servers,
            open_hours=(min(hours), max(hours) + 1),
            historical_count=len(times),
            servers_source=src,
        )
    return out, all_times, notes


def fit_beds(
    store: Store, cfg: FitConfig, tz: tzinfo = UTC
) -> tuple[StationParams | None, list[datetime], list[str]]:
    classes = [c.upper() for c in cfg.inpatient_classes]
    rows = store.con.execute(
        f"""
        SELECT node_id, TRY_CAST(props->>'period_start' AS TIMESTAMPTZ),
               TRY_CAST(props->>'length_of_stay_h' AS DOUBLE)
        FROM {NODE_TABLE}
        WHERE twin_type = 'Encounter' AND list_contains(?, upper(props->>'class_code'))
        """,
        [classes],
    ).fetchall()
    stays: list[tuple[datetime, float]] = []
    for r in rows:
        t = _local(r[1], tz)
        if t is not None and r[2] and r[2] > 0:
            stays.append((t, float(r[2])))
    if not stays:
        return (
            None,
            [],
            [f"no inpatient encounters (classes {classes}) with a period: beds not fitted"],
        )
    times = [s[0] for s in stays]
    first, days = _window(times)
    row = store.con.execute(
        f"""
        SELECT count(DISTINCT b.node_id) FROM {NODE_TABLE} b
        JOIN {EDGE_TABLE} bp ON bp.src = b.node_id AND bp.rel = 'part_of'
        WHERE b.twin_type = 'Bed' AND bp.dst IN (
            SELECT p.dst FROM {NODE_TABLE} e
            JOIN {EDGE_TABLE} l ON l.src = e.node_id AND l.rel = 'located_at'
            JOIN {EDGE_TABLE} p ON p.src = l.dst AND p.rel = 'part_of'
            WHERE e.twin_type = 'Encounter' AND list_contains(?, upper(e.props->>'class_code')))
        """,
        [classes],
    ).fetchone()
    notes: list[str] = []
    beds = int(row[0]) if row and row[0] else 0
    src = "Bed twins on units that took inpatients"
    if not beds:
        # Peak concurrent occupancy is a lower bound on the beds there were.
        ev = sorted(
            [(s[0], 1) for s in stays] + [(s[0] + timedelta(hours=s[1]), -1) for s in stays]
        )
        occ = peak = 0
        for _, d in ev:
            occ += d
            peak = max(peak, occ)
        beds, src = max(peak, 1), "peak concurrent occupancy (no Bed twins)"
        notes.append(f"beds: {src}")
    los_min = np.array([s[1] * 60 for s in stays])
    return (
        StationParams(
            name="beds",
            rates=_rates(times, first, days),
            service=ServiceDist.from_samples(los_min, cfg.service_distribution),
            servers=beds,
            open_hours=(0, 24),
            historical_count=len(times),
            servers_source=src,
        ),
        times,
        notes,
    )


def fit_history(store: Store, cfg: FitConfig, domains: list[str]) -> History:
    """Fit every requested domain; imaging and beds share one history window per domain."""
    imaging: dict[str, StationParams] = {}
    beds = None
    notes: list[str] = []
    times: list[datetime] = []
    tz = resolve_timezone(store, cfg.timezone)
    if "imaging" in domains:
        imaging, t_img, n = fit_imaging(store, cfg, tz)
        notes += n
        times += t_img
    img_window = _window(times) if times else None
    bed_window = None
    if "beds" in domains:
        beds, t_bed, n = fit_beds(store, cfg, tz)
        notes += n
        if t_bed:
            bed_window = _window(t_bed)
    window = img_window or bed_window
    hist = History(
        first_day=window[0] if window else None,
        days=window[1] if window else 0,
        timezone=str(tz),
        imaging=imaging,
        beds=beds,
        notes=notes,
    )
    if beds is not None and bed_window and img_window and bed_window != img_window:
        # Rates are per weekday-hour, so the simulated window only needs the same length to
        # reproduce counts; rescale bed counts to the imaging window for comparison.
        beds.historical_count = round(beds.historical_count * img_window[1] / bed_window[1])
        notes.append(
            f"beds fitted on {bed_window[1]} days from {bed_window[0]}; historical admissions "
            f"scaled to the {img_window[1]}-day imaging window"
        )
    return hist
