"""The communication-profile dashboard: built from real profiled runs (2 CPU ranks, expert parallelism 2), checked as
HTML, then opened in headless Chromium: no console errors, every plot rendered with data, the tables there, and the
layer selector switches the heatmaps."""

import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from c2r.config_utils import config_from_dict
from c2r.train import RunConfig, train
from profiling.cli import main as profile_cli
from profiling.dashboard import RunData, build_dashboard, load_run, placement_order, write_dashboard
from tests.distributed import run_distributed

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
FIGURES = ("fig-per-layer", "fig-traffic", "fig-coactivation", "fig-load", "fig-steps")
NASTY = '<b>run "A" & </script>'


def tiny_run(out_dir, top_k: int = 2, seed: int = 0) -> dict:
    return {
        "model": {"block_size": 32, "n_layer": 2, "n_head": 2, "d_model": 32,
                  "moe": {"num_experts": 8, "top_k": top_k, "ffn_hidden_size": 32}},
        "train": {"steps": 6, "batch_size": 4, "eval_every": 6, "eval_batches": 1, "ep_size": 2, "seed": seed,
                  "out_dir": str(out_dir)},
        "data": {"max_bytes": 200_000},
        "profile": {"enabled": True},
    }  # fmt: skip


def train_each(rank, world, raws):
    for raw in raws:
        train(config_from_dict(RunConfig, raw))
    return True


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two real profiled runs (before: top-2; after: top-1, another seed), one spawn of 2 CPU ranks."""
    root = tmp_path_factory.mktemp("dashboard_runs")
    paths = {"before": root / "before", "after": root / "after"}
    raws = [tiny_run(paths["before"]), tiny_run(paths["after"], top_k=1, seed=1)]
    run_distributed(train_each, 2, root / "spawn", raws)
    return paths


def without(run: Path, part: str, out: Path) -> Path:
    """A copy of a run whose profile lacks ``part`` ("comm" or "traces")."""
    shutil.copytree(run / "profile", out / "profile")
    shutil.rmtree(out / "profile" / part)
    return out


# ------------------------------------------------------------------------------------------------- HTML, no browser


def test_placement_order_groups_experts_by_rank():
    order, starts = placement_order([1, 0, 1, 0, 2, 2], 6)
    assert order == [1, 3, 0, 2, 4, 5] and starts == [2, 4]
    assert placement_order(None, 3) == ([0, 1, 2], [])


def test_dashboard_is_self_contained_and_escapes_names(runs, tmp_path):
    out = tmp_path / "one.html"
    write_dashboard([str(runs["before"])], str(out), [NASTY])
    page = out.read_text()
    assert "<script src" not in page and 'src="http' not in page  # plotly.js is inline: opens offline
    assert "Plotly.newPlot" in page and len(page) > 1_000_000
    for div in FIGURES:
        assert f'id="{div}"' in page
    assert NASTY not in page and "&lt;b&gt;run &quot;A&quot; &amp; &lt;/script&gt;" in page
    assert page.count("<table") >= 6


def test_compare_shows_changes(runs, tmp_path):
    out = tmp_path / "cmp.html"
    assert profile_cli(["dashboard", str(runs["before"]), str(runs["after"]), "-o", str(out), "--names", "k2,k1"]) == 0
    page = out.read_text()
    assert "k2 vs k1" in page and "change" in page
    # top-1 sends half the copies of top-2: the headline says -50.0%, in green
    assert '<span class="good">-50.0%</span>' in page and "contiguous" in page


def test_missing_comm_or_traces_is_said_not_crashed(runs, tmp_path):
    no_comm = load_run(without(runs["before"], "comm", tmp_path / "no_comm"), "no-comm")
    no_traces = load_run(without(runs["before"], "traces", tmp_path / "no_traces"), "no-traces")
    page = build_dashboard([no_comm])
    assert "no all-to-all records" in page and 'id="fig-traffic"' not in page and 'id="fig-steps"' not in page
    assert 'id="fig-coactivation"' in page and 'id="fig-load"' in page
    page = build_dashboard([no_traces])
    assert "no routing traces" in page and 'id="fig-coactivation"' not in page and 'id="fig-traffic"' in page
    page = build_dashboard([no_comm, no_traces])
    for div in FIGURES:
        assert f'id="{div}"' in page  # each figure has at least one run to draw
    empty = RunData("empty", {**no_comm.summary, "steps": [], "layers": [{"layer": 0, "expert_to_rank": None}]})
    assert "Not shown" in build_dashboard([empty])
    with pytest.raises(ValueError, match="one run, or two"):
        build_dashboard([])


# ------------------------------------------------------------------------------------------------ headless Chromium


def require(module: str):
    """Import a browser-test dependency: skip without it, except under CI=true, where missing it is a failure."""
    if os.environ.get("CI") == "true":
        assert CHROMIUM.exists(), f"{CHROMIUM} missing (apt-get install chromium chromium-driver)"
        return importlib.import_module(module)
    if not CHROMIUM.exists():
        pytest.skip(f"no {CHROMIUM} (apt-get install chromium chromium-driver) for the headless browser test")
    return pytest.importorskip(module, reason="playwright (pip install playwright) drives the headless browser test")


@pytest.fixture(scope="module")
def browser():
    sync_api = require("playwright.sync_api")
    with sync_api.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True,
            viewport={"width": 1500, "height": 1000},
        )  # fmt: skip
        yield context
        context.close()


def open_dashboard(browser, path: Path):
    page = browser.new_page()
    page.set_default_timeout(10_000)
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(path.as_uri())
    page.wait_for_function(f"document.querySelectorAll('.plotly-graph-div .main-svg').length >= {len(FIGURES)}")
    return page, errors


def check_rendered(page, runs: int) -> None:
    plots = page.evaluate(
        """() => [...document.querySelectorAll('.plotly-graph-div')].map(d => ({
            id: d.id, traces: (d.data || []).length, svg: d.querySelectorAll('svg.main-svg').length,
            marks: d.querySelectorAll('.heatmaplayer image, .bars path, .scatterlayer path.js-line').length,
            height: d.getBoundingClientRect().height}))"""
    )
    assert sorted(p["id"] for p in plots) == sorted(FIGURES)
    for plot in plots:
        assert plot["traces"] >= runs and plot["svg"] and plot["marks"] and plot["height"] > 200, plot
    assert page.locator("table.headline tbody tr").count() == 7
    assert page.locator("table.layers tbody tr").count() == 2
    assert page.locator("details table").count() >= 3


def switch_layer(page, div: str, layer: int) -> None:
    page.locator(f"#{div} .updatemenu-header-group").click()
    page.locator(f"#{div} .updatemenu-dropdown-button").nth(layer).click()
    page.wait_for_timeout(300)


def z_of(page, div: str) -> list:
    return page.evaluate(f"() => document.getElementById('{div}').data.map(t => t.z)")


@pytest.mark.parametrize("compare", [False, True], ids=["single", "compare"])
def test_dashboard_renders_in_headless_chromium(runs, browser, tmp_path, compare):
    names = ["before", "after"] if compare else ["before"]
    out = tmp_path / "dashboard.html"
    write_dashboard([str(runs[n]) for n in names], str(out), names)
    page, errors = open_dashboard(browser, out)
    check_rendered(page, len(names))
    for div in ("fig-traffic", "fig-coactivation"):
        before = z_of(page, div)
        switch_layer(page, div, 1)
        after = z_of(page, div)
        assert json.dumps(after) != json.dumps(before), f"{div}: the layer selector changed nothing"
        assert np.asarray(after[0], dtype=float).shape == np.asarray(before[0], dtype=float).shape
    assert "layer 1" in page.locator("#fig-coactivation .updatemenu-header-group").text_content()
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    assert errors == []
    page.close()
