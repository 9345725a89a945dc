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
from profiling.compare import choose_windows
from profiling.dashboard import (
    RunData,
    build_dashboard,
    change,
    fig_coactivation,
    is_multi_node,
    load_run,
    load_runs,
    node_matrices,
    placement_order,
    traffic_matrices,
    write_dashboard,
)
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
    """Three real profiled runs (before: top-2; after: top-1, another seed; nodes: per-node dispatch over 2 virtual
    nodes of 1 rank), one spawn of 2 CPU ranks."""
    root = tmp_path_factory.mktemp("dashboard_runs")
    paths = {"before": root / "before", "after": root / "after", "nodes": root / "nodes"}
    nodes = tiny_run(paths["nodes"])
    nodes["train"].update(dispatch="per-node", gpus_per_node=1)
    raws = [tiny_run(paths["before"]), tiny_run(paths["after"], top_k=1, seed=1), nodes]
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


def relabelled(run: Path, out: Path, keep_steps, shift: int = 0, repeat: int = 1) -> Path:
    """A copy of a run whose all-to-all records keep only ``keep_steps``, moved by ``shift`` steps and written
    ``repeat`` times over consecutive step ranges (a continuation, or a longer run with the same routing)."""
    shutil.copytree(run / "profile", out / "profile")
    for path in (out / "profile" / "comm").glob("comm-rank*.jsonl"):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        kept = [r for r in records if r["step"] in keep_steps]
        span = max(keep_steps) + 1
        lines = [json.dumps({**r, "step": r["step"] + shift + i * span}) for i in range(repeat) for r in kept]
        path.write_text("\n".join(lines) + "\n")
    return out


def test_profile_records_the_hidden_size_and_dtype_the_dispatcher_sends(runs):
    """c2r-place evaluate reads these to count bytes for the traced model (d_model 32, fp32 on CPU)."""
    header = json.loads((runs["before"] / "profile" / "traces" / "header.json").read_text())
    info = json.loads((runs["before"] / "profile" / "profile.json").read_text())
    assert header["hidden_size"] == info["hidden_size"] == 32 and header["dtype"] == info["dtype"] == "fp32"
    record = json.loads((runs["before"] / "profile" / "comm" / "comm-rank000.jsonl").read_text().splitlines()[0])
    assert record["bytes_per_copy"] == 32 * 4


def test_choose_windows_takes_the_last_steps_both_runs_have():
    assert choose_windows(list(range(300)), list(range(300, 400))) == (list(range(200, 300)), list(range(300, 400)))
    assert choose_windows([0, 1, 2], [0, 1, 2, 3], window=2) == ([1, 2], [2, 3])
    assert choose_windows([0, 1], [], None) == ([], [])
    with pytest.raises(ValueError, match="--window"):
        choose_windows([0], [0], window=0)


def test_different_models_are_said_loudly_and_not_headlined(runs, tmp_path):
    out = tmp_path / "cmp.html"
    assert profile_cli(["dashboard", str(runs["before"]), str(runs["after"]), "-o", str(out), "--names", "k2,k1"]) == 0
    page = out.read_text()
    assert "k2 vs k1" in page and "change" in page and "contiguous" in page
    # top-2 against top-1 is another model: the warning names it, and no change is headlined (it would read -50%)
    assert 'id="not-comparable"' in page and "top_k 2 in k2, 1 in k1" in page
    assert '<span class="good">' not in page and "not compared: different models" in page
    _, comparison = load_runs([str(runs["before"]), str(runs["after"])], ["k2", "k1"])
    assert not comparison.comparable and not comparison.same_model
    assert comparison.windows == (list(range(6)), list(range(6)))


def test_the_same_setting_over_the_same_steps_compares(runs, tmp_path):
    twin = relabelled(runs["before"], tmp_path / "twin", range(6))
    data, comparison = load_runs([str(runs["before"]), str(twin)], ["a", "b"])
    assert comparison.comparable and comparison.reasons == [] and comparison.windows[0] == list(range(6))
    page = build_dashboard(data, comparison)
    assert 'id="not-comparable"' not in page and "Compared like with like" in page and "steps 0–5 of both" in page
    assert page.count('<span class="same">+0.0%</span>') >= 5  # the headline's per-token rows, ms included
    assert change(2.0, 1.0) == '<span class="good">-50.0%</span>'  # lower is better: green
    assert change(2.0, 3.0) == '<span class="bad">+50.0%</span>'


def test_scratch_vs_continuation_windows_and_per_token_numbers(runs, tmp_path):
    """before: steps 0-5 from scratch; cont: 3 steps continued from step 300 with the same routing. Default window:
    the last 3 steps of each, not like with like (different points of training): traffic per token is compared,
    all-to-all time only side by side."""
    cont = relabelled(runs["before"], tmp_path / "cont", range(3, 6), shift=297)
    data, comparison = load_runs([str(runs["before"]), str(cont)], ["scratch", "cont"])
    assert comparison.windows == ([3, 4, 5], [300, 301, 302]) and comparison.same_model and not comparison.comparable
    assert any("from scratch" in r and "continuation" in r and "from step 300" in r for r in comparison.reasons)
    assert any("different points of training" in r for r in comparison.reasons)
    assert data[0].window == [3, 4, 5] and data[0].summary["profiled_steps"] == list(range(6))
    page = build_dashboard(data, comparison)
    assert 'id="not-comparable"' in page and "not compared: windows differ" in page
    assert page.count('<span class="same">+0.0%</span>') >= 3  # copies per token: same routing, per token
    # the same run written twice over (12 steps): totals double, per-token numbers do not
    double = relabelled(runs["before"], tmp_path / "double", range(6), repeat=2)
    data, comparison = load_runs([str(runs["before"]), str(double)], ["once", "twice"], window=12)
    assert len(data[0].window) == 6 and len(data[1].window) == 12 and "unequal windows" in comparison.reasons[0]
    for layer in range(2):
        raw = [np.asarray(run.layer(layer)["copies_rank_to_rank"]) for run in data]
        np.testing.assert_array_equal(raw[1], 2 * raw[0])
        per_token = [traffic_matrices(run, layer)[0] for run in data]
        np.testing.assert_allclose(per_token[1], per_token[0])
        assert per_token[0].sum() == pytest.approx(data[0].layer(layer)["copies_per_token"])
        per_step = [traffic_matrices(run, layer, per="step")[0] for run in data]
        np.testing.assert_allclose(per_step[1], per_step[0])
        assert data[1].rank_load(layer) == pytest.approx(data[0].rank_load(layer))


def test_coactivation_panels_share_one_colour_scale(runs):
    data, _ = load_runs([str(runs["before"]), str(runs["after"])])
    fig = fig_coactivation(data).to_plotly_json()
    heatmaps = [t for t in fig["data"] if t["type"] == "heatmap"]
    assert len(heatmaps) == 2 and {t["coloraxis"] for t in heatmaps} == {"coloraxis"}
    scale = fig["layout"]["coloraxis"]
    assert scale["cmin"] == 0 and "coloraxis2" not in fig["layout"]
    # per 1000 tokens, the top of the scale is the largest cell of either run, every layer
    values = [v for t in heatmaps for row in t["z"] for v in row if v is not None]
    assert 0 < max(values) <= scale["cmax"] <= 1000
    assert scale["colorbar"]["title"]["text"] == "per 1000 tokens"


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
    # a run without expert parallelism (no placement, no all-to-all): the load figure has the expert panel alone
    # (it failed in plotly's make_subplots: two column widths for one column)
    one_rank = RunData(
        "ep1", {**no_comm.summary, "layers": [{**e, "expert_to_rank": None} for e in no_comm.summary["layers"]]}
    )
    assert 'id="fig-load"' in build_dashboard([one_rank])
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


def test_node_to_node_view_of_a_two_node_run(runs, browser, tmp_path):
    """Per-node dispatch over 2 virtual nodes: the node x node figure and the inter/intra table are there, the
    inter-node copies in the figure (off the diagonal) equal what the dispatcher counted, and it renders cleanly.
    Single-node runs (the other tests) show no node section."""
    run = load_run(runs["nodes"], "nodes")
    for index, entry in enumerate(run.layers):
        copies, _ = node_matrices(run, index)
        assert copies.shape == (2, 2)
        off_diagonal = copies.sum() - np.trace(copies)
        assert off_diagonal == pytest.approx(entry["inter_node_copies_per_token"])
        # per-node dispatch: one network copy per token and remote node (1 rank per node: no forwarding)
        assert entry["inter_node_copies_per_token"] == pytest.approx(entry["remote_nodes_per_token"])
    assert not is_multi_node(load_run(runs["before"], "before"))
    out = tmp_path / "nodes.html"
    write_dashboard([str(runs["before"]), str(runs["nodes"])], str(out), ["one node", "two nodes"])
    text = out.read_text()
    assert "Node-to-node traffic" in text and "inter-node copies / token" in text
    page, errors = open_dashboard(browser, out)
    page.wait_for_function("document.querySelectorAll('#fig-nodes .main-svg').length > 0")
    plot = page.evaluate(
        """() => { const d = document.getElementById('fig-nodes');
                   return {traces: d.data.length, marks: d.querySelectorAll('.heatmaplayer image').length,
                           height: d.getBoundingClientRect().height, z: d.data[1].z}; }"""
    )
    assert plot["traces"] == 2 and plot["marks"] >= 1 and plot["height"] > 200
    assert np.asarray(plot["z"], dtype=float).shape == (2, 2)
    assert "one node: no inter-node traffic" in page.locator("#fig-nodes").text_content()
    assert page.locator("table.nodes tbody tr").count() == len(run.layers)
    assert errors == []
    page.close()
