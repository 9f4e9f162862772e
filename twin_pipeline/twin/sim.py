"""Discrete-event (SimPy) models of an imaging department and of bed capacity.

Each station (a modality's scanners, or the bed pool) is a multi-server queue: arrivals follow
the fitted weekday × hour rate profile (a piecewise-constant Poisson process), service times
come from the fitted distribution, and service starts only inside opening hours (a patient who
arrives while the station is closed waits for it to open). Replications use independent,
seeded random streams; baseline and scenario share them (common random numbers), so their
difference is measured with less noise. :func:`erlang_c_wait` is the analytic M/M/c mean wait.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import simpy

from twin_pipeline.twin.fit import StationParams

MIN_PER_DAY = 1440.0


class CountingEnvironment(simpy.Environment):
    """A SimPy environment that counts the events it processes (for events/s)."""

    def __init__(self) -> None:
        super().__init__()
        self.processed = 0

    def step(self) -> None:
        self.processed += 1
        super().step()


@dataclass
class StationRun:
    """One replication of one station, measured over ``[warmup, horizon)``."""

    arrivals: int
    started: int  # service (scan, bed) began inside the window: the throughput count
    completed: int
    unserved: int  # arrived in the window but still waiting at the horizon
    waits: np.ndarray  # minutes, for patients who arrived in the window and started service
    busy_minutes: float
    capacity_minutes: float  # servers × open minutes in the window
    days: float
    events: int

    @property
    def throughput_per_day(self) -> float:
        """Patients whose service started in the window, per day (history counts starts too)."""
        return self.started / self.days

    @property
    def mean_wait(self) -> float:
        return float(self.waits.mean()) if len(self.waits) else 0.0

    @property
    def p90_wait(self) -> float:
        return float(np.quantile(self.waits, 0.9)) if len(self.waits) else 0.0

    @property
    def utilization(self) -> float:
        return self.busy_minutes / self.capacity_minutes if self.capacity_minutes else 0.0


def _arrival_times(
    params: StationParams,
    horizon_days: float,
    start_weekday: int,
    rng: np.random.Generator,
    demand: float,
) -> np.ndarray:
    n_hours = math.ceil(horizon_days * 24)
    hours = np.arange(n_hours)
    wd = (start_weekday + hours // 24) % 7
    lam = params.rates[wd, hours % 24] * demand
    counts = rng.poisson(lam)
    starts = np.repeat(hours * 60.0, counts)
    times = starts + rng.uniform(0.0, 60.0, len(starts))
    times = np.sort(times)
    return times[times < horizon_days * MIN_PER_DAY]


def _open_minutes(open_hours: tuple[int, int], t0: float, t1: float) -> float:
    """Minutes the station is open within [t0, t1)."""
    o, c = open_hours[0] * 60.0, open_hours[1] * 60.0
    total = 0.0
    day = math.floor(t0 / MIN_PER_DAY)
    while day * MIN_PER_DAY < t1:
        a = max(t0, day * MIN_PER_DAY + o)
        b = min(t1, day * MIN_PER_DAY + c)
        total += max(0.0, b - a)
        day += 1
    return total


def _next_open(t: float, open_hours: tuple[int, int]) -> float:
    """``t`` if the station is open at ``t``, else the next opening time."""
    o, c = open_hours[0] * 60.0, open_hours[1] * 60.0
    day = math.floor(t / MIN_PER_DAY)
    tod = t - day * MIN_PER_DAY
    if o <= tod < c:
        return t
    if tod < o:
        return day * MIN_PER_DAY + o
    return (day + 1) * MIN_PER_DAY + o


def run_station(
    params: StationParams,
    *,
    horizon_days: float,
    warmup_days: float,
    start_weekday: int,
    rng: np.random.Generator,
    demand: float = 1.0,
    service_scale: float = 1.0,
    servers: int | None = None,
    open_hours: tuple[int, int] | None = None,
) -> StationRun:
    """Simulate one replication of one station."""
    servers = servers if servers is not None else params.servers
    hours = open_hours or params.open_hours
    arrivals = _arrival_times(params, horizon_days, start_weekday, rng, demand)
    services = params.service.draw(rng, len(arrivals), service_scale)
    t_lo, t_hi = warmup_days * MIN_PER_DAY, horizon_days * MIN_PER_DAY
    env = CountingEnvironment()
    station = simpy.Resource(env, capacity=servers)
    waits: list[float] = []
    busy = [0.0]
    done = [0]
    started = [0]
    in_service: dict[int, float] = {}
    always_open = hours == (0, 24)

    def patient(arrived: float, service: float) -> Any:
        with station.request() as req:
            yield req
            if not always_open:
                start = _next_open(env.now, hours)
                if start > env.now:
                    yield env.timeout(start - env.now)
            if arrived >= t_lo:
                # Float residue of hour offsets (1e-14 min) is no wait.
                w = env.now - arrived
                waits.append(w if w > 1e-9 else 0.0)
            if env.now >= t_lo:
                started[0] += 1
            s0 = env.now
            in_service[id(req)] = s0
            yield env.timeout(service)
            del in_service[id(req)]
            busy[0] += max(0.0, min(env.now, t_hi) - max(s0, t_lo))
            if t_lo <= env.now < t_hi:
                done[0] += 1

    def source() -> Any:
        for t, s in zip(arrivals, services, strict=True):
            if t > env.now:
                yield env.timeout(t - env.now)
            env.process(patient(float(t), float(s)))

    env.process(source())
    env.run(until=t_hi)
    # Services still running at the horizon count as busy up to it.
    busy[0] += sum(max(0.0, t_hi - max(s0, t_lo)) for s0 in in_service.values())
    in_window = int(np.count_nonzero(arrivals >= t_lo))
    return StationRun(
        arrivals=in_window,
        started=started[0],
        completed=done[0],
        unserved=in_window - len(waits),
        waits=np.asarray(waits),
        busy_minutes=busy[0],
        capacity_minutes=servers * _open_minutes(hours, t_lo, t_hi),
        days=horizon_days - warmup_days,
        events=env.processed,
    )


def stream(seed: int, replication: int, station: str) -> np.random.Generator:
    """The random stream of one station in one replication (same for baseline and scenario)."""
    return np.random.default_rng([seed, replication, zlib.crc32(station.encode())])


@dataclass
class Summary:
    mean: float
    ci_low: float
    ci_high: float
    n: int
    values: list[float] = field(default_factory=list)

    def to_dict(self, digits: int = 6) -> dict[str, Any]:
        """Rounded to significant digits (utilizations of quiet stations are tiny)."""

        def sig(v: float) -> float:
            return float(f"{v:.{digits}g}")

        return {"mean": sig(self.mean), "ci95": [sig(self.ci_low), sig(self.ci_high)], "n": self.n}


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    t2 = t * t
    if t2 < df:  # near the centre: the half-width from the centre, without cancellation
        half = 0.5 * betainc(0.5, df / 2.0, t2 / (df + t2))
        return 0.5 + half if t > 0 else 0.5 - half
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t2))
    return 1.0 - tail if t > 0 else tail


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``scipy.stats.t.ppf``
    to 1e-9 relative, as the tests hold it, without importing scipy.stats: that import alone
    took ~1.8 s of every simulation step). Bisection on :func:`t_cdf`, bracketed by doubling."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0 (got p={p}, df={df})")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def summarize(values: list[float]) -> Summary:
    """Mean and a 95% Student-t confidence interval over replications."""
    arr = np.asarray(values, dtype=float)
    n = len(arr)
    mean = float(arr.mean()) if n else float("nan")
    if n < 2:
        return Summary(mean, mean, mean, n, list(map(float, arr)))
    half = float(t_quantile(0.975, n - 1) * arr.std(ddof=1) / math.sqrt(n))
    # Every metric here (throughput, wait, utilization) is non-negative.
    low = max(mean - half, 0.0) if arr.min() >= 0 else mean - half
    return Summary(mean, low, mean + half, n, list(map(float, arr)))


def erlang_c(c: int, offered: float) -> float:
    """Probability that an arrival waits in an M/M/c queue with offered load ``a = λ/μ``."""
    if offered >= c:
        return 1.0
    term, total = 1.0, 1.0
    for k in range(1, c):
        term *= offered / k
        total += term
    last = term * offered / c * (c / (c - offered))
    return last / (total + last)


def erlang_c_wait(arrival_rate: float, service_mean: float, servers: int) -> float:
    """Mean wait in queue (same time unit as ``service_mean``) of an M/M/c queue.

    ``arrival_rate`` is per that time unit. Infinite if the queue is unstable (ρ >= 1).
    """
    mu = 1.0 / service_mean
    offered = arrival_rate / mu
    if offered >= servers:
        return math.inf
    return erlang_c(servers, offered) / (servers * mu - arrival_rate)
