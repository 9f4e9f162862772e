"""A small UCUM unit parser and converter for the units clinical observations use.

Covers metric atoms with SI prefixes (g, m, L, s, mol, Pa, ...), the customary ones hospitals
send ([lb_av], [in_i], [degF], mm[Hg], ...), annotations (``{beats}/min``), products (``.``),
quotients (``/``) and integer exponents (``m2``). Temperatures convert with their offsets.
Mass and substance amount convert through a molar mass when one is given
(``mmol/L`` → ``mg/dL`` for glucose). Anything else raises :class:`UnitError`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass

from twin_pipeline.errors import MappingError


class UnitError(MappingError):
    """A unit that cannot be parsed or converted."""


Dim = tuple[tuple[str, int], ...]  # sorted (base, exponent) pairs

# atom -> (factor to base units, {base: exponent}, metric: may take a prefix)
_ATOMS: dict[str, tuple[float, dict[str, int], bool]] = {
    "g": (1.0, {"M": 1}, True),
    "m": (1.0, {"L": 1}, True),
    "L": (1e-3, {"L": 3}, True),
    "l": (1e-3, {"L": 3}, True),
    "s": (1.0, {"T": 1}, True),
    "min": (60.0, {"T": 1}, False),
    "h": (3600.0, {"T": 1}, False),
    "d": (86400.0, {"T": 1}, False),
    "wk": (604800.0, {"T": 1}, False),
    "mol": (1.0, {"N": 1}, True),
    "eq": (1.0, {"N": 1}, True),
    "Pa": (1.0, {"M": 1, "L": -1, "T": -2}, True),
    "bar": (1e5, {"M": 1, "L": -1, "T": -2}, True),
    "mm[Hg]": (133.322387415, {"M": 1, "L": -1, "T": -2}, False),
    "cm[H2O]": (98.0665, {"M": 1, "L": -1, "T": -2}, False),
    "[psi]": (6894.757293168, {"M": 1, "L": -1, "T": -2}, False),
    "[lb_av]": (453.59237, {"M": 1}, False),
    "[oz_av]": (28.349523125, {"M": 1}, False),
    "[in_i]": (0.0254, {"L": 1}, False),
    "[ft_i]": (0.3048, {"L": 1}, False),
    "%": (0.01, {}, False),
    "1": (1.0, {}, False),
}
_TEMPERATURE = {  # unit -> (scale, offset) to kelvin: K = (v + offset) * scale
    "K": (1.0, 0.0),
    "Cel": (1.0, 273.15),
    "[degF]": (5.0 / 9.0, 459.67),
}
_PREFIXES = {
    "k": 1e3,
    "h": 1e2,
    "da": 1e1,
    "d": 1e-1,
    "c": 1e-2,
    "m": 1e-3,
    "u": 1e-6,
    "n": 1e-9,
    "p": 1e-12,
}
_COMPONENT = re.compile(r"^(?P<atom>.+?)(?P<exp>-?\d+)?$")


@dataclass(frozen=True)
class Unit:
    code: str
    factor: float  # to base units
    dim: Dim
    temperature: tuple[float, float] | None = None  # (scale, offset) for temperatures


def _atom(text: str) -> tuple[float, dict[str, int]]:
    text = re.sub(r"\{[^}]*\}", "", text)  # annotations carry no dimension
    if text in ("", "1"):
        return 1.0, {}
    if text in _ATOMS:
        f, d, _ = _ATOMS[text]
        return f, dict(d)
    for prefix in sorted(_PREFIXES, key=len, reverse=True):
        rest = text[len(prefix) :]
        if text.startswith(prefix) and rest in _ATOMS and _ATOMS[rest][2]:
            f, d, _ = _ATOMS[rest]
            return _PREFIXES[prefix] * f, dict(d)
    raise UnitError(f"unknown UCUM unit atom {text!r}")


def _component(text: str) -> tuple[float, dict[str, int]]:
    if text in _ATOMS or re.fullmatch(r"\{[^}]*\}", text):
        return _atom(text)
    m = _COMPONENT.match(text)
    if not m:
        raise UnitError(f"cannot parse unit component {text!r}")
    atom, exp = m.group("atom"), int(m.group("exp") or 1)
    if m.group("exp") and atom in ("", "1"):
        atom, exp = text, 1
    f, d = _atom(atom)
    return f**exp, {k: v * exp for k, v in d.items()}


@functools.cache
def parse_unit(code: str) -> Unit:
    """Parse a UCUM code (the subset above) into a factor and a dimension."""
    code = code.strip()
    if not code:
        raise UnitError("empty unit")
    if code in _TEMPERATURE:
        return Unit(code, 1.0, (("Θ", 1),), _TEMPERATURE[code])
    factor = 1.0
    dims: dict[str, int] = {}
    parts = code.split("/")
    for i, part in enumerate(parts):
        sign = 1 if i == 0 else -1
        if part == "" and i == 0:
            continue
        if part == "":
            raise UnitError(f"cannot parse unit {code!r}")
        for comp in part.split("."):
            f, d = _component(comp)
            factor *= f**sign
            for k, v in d.items():
                dims[k] = dims.get(k, 0) + sign * v
    return Unit(code, factor, tuple(sorted((k, v) for k, v in dims.items() if v)))


def normalize_unit(unit: str | None, aliases: Mapping[str, str]) -> str | None:
    if unit is None:
        return None
    unit = unit.strip()
    return aliases.get(unit, unit)


def linear_conversion(
    src: str, dst: str, *, molar_mass: float | None = None
) -> tuple[float, float]:
    """Coefficients (a, b) with value_in_dst = a * value_in_src + b."""
    u, v = parse_unit(src), parse_unit(dst)
    if u.temperature or v.temperature:
        if not (u.temperature and v.temperature):
            raise UnitError(f"cannot convert {src} to {dst}")
        (s1, o1), (s2, o2) = u.temperature, v.temperature
        # K = (x + o1) * s1 ; y = K / s2 - o2
        return s1 / s2, o1 * s1 / s2 - o2
    if u.dim == v.dim:
        return u.factor / v.factor, 0.0
    du, dv = dict(u.dim), dict(v.dim)
    if molar_mass:
        # amount of substance (N) <-> mass (M): 1 mol = molar_mass g
        n = du.get("N", 0)
        if n:
            du2 = dict(du)
            du2.pop("N")
            du2["M"] = du2.get("M", 0) + n
            if {k: x for k, x in du2.items() if x} == dv:
                return u.factor * molar_mass**n / v.factor, 0.0
    raise UnitError(f"cannot convert {src} to {dst}: different dimensions")


def convert(value: float, src: str, dst: str, *, molar_mass: float | None = None) -> float:
    a, b = linear_conversion(src, dst, molar_mass=molar_mass)
    return a * value + b
