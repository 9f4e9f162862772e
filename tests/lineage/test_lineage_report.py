"""The auditor report: self-contained HTML, rendered by headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.lineage.conftest import Built
from twin_pipeline.cli import main
from twin_pipeline.lineage.report import COLORS

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's chromium, installed on first use (CI runs as root with Debian's registry)."""
    if not CHROMIUM.exists():
        if shutil.which("apt-get") is None:
            pytest.fail("chromium is missing and apt-get is not available to install it")
        env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
        if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=False)
            out = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                pytest.fail(f"could not install chromium: {out.stderr[-2000:]}")
    return CHROMIUM


def _render(chromium: Path, page: Path, tmp: Path) -> tuple[Path, str]:
    shot = tmp / "report.png"
    args = [
        str(chromium),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        "--window-size=1400,900",
        f"--screenshot={shot}",
        "--dump-dom",
        page.as_uri(),
    ]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return shot, out.stdout


def _hex_rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def test_report_is_self_contained(built_copy: Built, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    assert main(["lineage", "report", "-o", str(page)]) == 0
    text = page.read_text()
    assert "<svg" in text and "Verified:" in text
    assert not re.search(r"""(src|href)=["']https?://""", text), "report must not load anything"
    assert "<script" not in text
    for needle in ("raw.lt_observation", "deid.lt_observation", "rita", "broken_json"):
        assert needle in text


@pytest.mark.browser
def test_report_renders_in_chromium(built_copy: Built, tmp_path: Path, chromium: Path) -> None:
    import matplotlib.image as mpimg

    page = tmp_path / "report.html"
    assert main(["lineage", "report", "-o", str(page)]) == 0
    shot, dom = _render(chromium, page, tmp_path)

    # DOM: the graph was parsed and has nodes for sources, assets and tables, joined by edges
    assert 'id="lineage-graph"' in dom
    for kind in ("source", "asset", "table", "validation"):
        assert re.search(rf'<g class="node node-{kind}"', dom), kind
    assert len(re.findall(r'<path class="edge"', dom)) >= 6
    assert 'data-id="table:deid.lt_observation"' in dom
    assert 'data-id="asset:raw/lineage_test_obs"' in dom

    # screenshot: not blank, and the node colours of the graph are on screen
    img = mpimg.imread(str(shot))
    rgb = (img[..., :3] * 255).round().astype(np.int32)
    colours = np.unique(rgb.reshape(-1, 3), axis=0)
    assert len(colours) > 20, "screenshot looks blank"
    flat = rgb.reshape(-1, 3)
    for kind in ("source", "asset", "table"):
        fill = np.array(_hex_rgb(COLORS[kind][0]))
        hits = int((np.abs(flat - fill).sum(axis=1) <= 6).sum())
        assert hits > 500, f"{kind} nodes not visible in the screenshot ({hits} pixels)"


def test_report_summarises_expectation_suites(built_copy: Built, tmp_path: Path) -> None:
    from twin_pipeline.lineage.report import build_report
    from twin_pipeline.store import Store

    with Store.open(built_copy.settings) as store:
        store.con.execute(
            """CREATE TABLE governance.validation_result AS SELECT * FROM (VALUES
            ('r1', 'obs', 'harmonized.obs', 'value_not_null', 'error', FALSE, 3, 3, TIMESTAMPTZ '2026-01-01'),
            ('r2', 'obs', 'harmonized.obs', 'value_not_null', 'error', TRUE, 0, 0, TIMESTAMPTZ '2026-01-02'),
            ('r2', 'obs', 'harmonized.obs', 'unit_known', 'warning', FALSE, 2, 0, TIMESTAMPTZ '2026-01-02'),
            ('r2', 'pat', 'harmonized.pat', 'id_unique', 'error', TRUE, 0, 0, TIMESTAMPTZ '2026-01-02')
            ) AS t(run_id, suite, table_name, expectation, severity, passed, failed_rows,
                   quarantined_rows, created_at)"""
        )
        page = build_report(store)
    section = page[page.index("governance.validation_result (") : page.index("Access log")]
    cells = re.findall(r"<td>([^<]*)</td>", section)
    # latest outcome per expectation: value_not_null now passes, unit_known fails as a warning
    assert cells[:8] == ["obs", "harmonized.obs", "2", "1", "0", "1", "2", "0"]
    failed = section[section.index("Failed expectations") :]
    assert "unit_known" in failed and "value_not_null" not in failed
