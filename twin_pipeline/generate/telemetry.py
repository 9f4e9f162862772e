"""Bedside-monitor readings (IEEE 11073 MDC metrics) for monitored inpatient stays."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from random import Random

from twin_pipeline.generate.ehr import MonitorPlan
from twin_pipeline.generate.vocab import TELEMETRY_METRICS, TZ_OFFSET

#: Physiologically impossible values used for ``impossible_value`` defects.
IMPOSSIBLE = {
    "MDC_PULS_OXIM_SAT_O2": "140",
    "MDC_ECG_HEART_RATE": "900",
    "MDC_RESP_RATE": "-5",
    "MDC_PRESS_BLD_NONINV_SYS": "450",
    "MDC_PRESS_BLD_NONINV_DIA": "-20",
    "MDC_TEMP_BODY": "80.0",
}
BAD_TIMESTAMPS = ("2024-13-45T25:61:00-05:00", "not-a-timestamp", "03/05/2024 10:15 AM", "")

_LIMITS = {
    "MDC_PULS_OXIM_SAT_O2": (82.0, 100.0, 0.6, 0),
    "MDC_ECG_HEART_RATE": (40.0, 170.0, 1.8, 0),
    "MDC_RESP_RATE": (8.0, 40.0, 0.8, 0),
    "MDC_PRESS_BLD_NONINV_SYS": (80.0, 200.0, 5.0, 0),
    "MDC_PRESS_BLD_NONINV_DIA": (40.0, 120.0, 3.5, 0),
    "MDC_TEMP_BODY": (35.0, 40.5, 0.08, 1),
}
_BASE_KEY = {
    "MDC_PULS_OXIM_SAT_O2": "spo2",
    "MDC_ECG_HEART_RATE": "hr",
    "MDC_RESP_RATE": "rr",
    "MDC_PRESS_BLD_NONINV_SYS": "sys",
    "MDC_PRESS_BLD_NONINV_DIA": "dia",
    "MDC_TEMP_BODY": "temp",
}


def readings(rng: Random, plan: MonitorPlan) -> Iterator[tuple[str, str, str, str]]:
    """Yield (metric, value, unit, ts) in time order; values are JSON/CSV number literals."""
    state = {
        m: plan.baseline[_BASE_KEY[m]] + (6.0 if m == "MDC_ECG_HEART_RATE" else 0.0)
        for m, _, _ in TELEMETRY_METRICS
    }
    base = dict(state)
    gap_lo, gap_hi = (plan.gap[0], plan.gap[0] + plan.gap[1]) if plan.gap else (-1, -1)
    for minute in range(plan.minutes):
        if gap_lo <= minute < gap_hi:
            continue
        stamp = (plan.start + timedelta(minutes=minute)).strftime("%Y-%m-%dT%H:%M:")
        for k, (metric, unit, every) in enumerate(TELEMETRY_METRICS):
            if minute % every:
                continue
            lo, hi, step, digits = _LIMITS[metric]
            v = state[metric]
            v += rng.gauss(0.0, step) + 0.1 * (base[metric] - v)
            v = min(hi, max(lo, v))
            state[metric] = v
            value = f"{v:.1f}" if digits else str(round(v))
            yield metric, value, unit, f"{stamp}{2 * k:02d}{TZ_OFFSET}"
