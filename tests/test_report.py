"""`neuroal report`: campaigns logged to a SQLite MLflow store by the campaign's own tracking code
(``start_campaign``, ``log_cell``, ``finish_campaign`` called as functions, without Prefect), read
back and rendered; reruns, failed cells, and bad input (exit 2, one line, nothing written)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import yaml
from servers import fixture_prefect_harness  # noqa: F401 - the Prefect server of the nightly gate

from flows.prune_cell import cell_metrics
from neuroal.cli import main
from neuroal.config import CampaignConfig
from tasks.cells import cell_name, model_slug
from tasks.tracking import finish_campaign, flatten, log_cell, start_campaign

MODEL = "tiny-org/tiny-llama"  # a hub-like id: its slash must not reach a file name
TOP_UPS = ["uniform", "owl", "neuroal"]
SPARSITIES = [0.5, 0.7]
# Perplexity on wikipedia by (top-up, sparsity); lee is 1.5x; the dense model's is DENSE_PPL.
PPL = {("uniform", 0.5): 100.0, ("owl", 0.5): 90.0, ("neuroal", 0.5): 87.7,
       ("uniform", 0.7): 1000.0, ("owl", 0.7): 1250.0, ("neuroal", 0.7): 400.0}
ACC = {"uniform": (0.5, 0.4), "owl": (0.45, 0.45), "neuroal": (0.6, 0.5)}  # arc_easy, boolq
DENSE_PPL = 25.4
BLOCKS = 3
MODULES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def full(store, tmp_path_factory) -> str:
    """Experiment ``full``: one finished campaign of the whole grid; returns its parent run id."""
    return log_campaign("full", tmp_path_factory.mktemp("artifacts"))


def campaign_config(experiment: str, limit: int) -> CampaignConfig:
    return CampaignConfig(
        prune={"model": [MODEL], "method": ["wanda"], "top_up": TOP_UPS, "sparsity": SPARSITIES,
               "calib": "lee", "nsamples": 4, "seqlen": 32},
        eval={"ppl": ["wikipedia", "lee"], "tasks": ["arc_easy", "boolq"], "limit": limit, "seqlen": 32},
        campaign={"experiment": experiment, "dvc": False})


def log_campaign(experiment: str, folder: Path, *, limit: int = 40, scale: float = 1.0, only=None,
                 status: str = "FINISHED", scales: dict | None = None, accuracy: dict | None = None,
                 revision: str = "abc123", transformers: str = "5.0.0") -> str:
    """Log a campaign the way flows/campaign.py and flows/prune_cell.py do: the parent run, the
    dense baseline, and a run per cell (``only`` these cell names; the others failed), with every
    perplexity multiplied by ``scale`` (and by ``scales[name]``) and ``accuracy[name]`` added to a
    cell's arc_easy accuracy. Returns the parent run id."""
    config = campaign_config(experiment, limit)
    parent = start_campaign.fn(experiment, config.model_dump(), tags={
        "git_revision": revision, "environment": {"torch": "2.13.0", "transformers": transformers, "device": "cpu"}})
    evaluation = config.eval.model_dump()
    log_cell.fn(parent, f"{model_slug(MODEL)}-dense", params=flatten({"prune": {"model": MODEL}, "eval": evaluation}),
                metrics={"ppl": {"wikipedia": DENSE_PPL, "lee": DENSE_PPL * 1.5},
                         "tasks": {"arc_easy": {"acc": 0.7}, "boolq": {"acc": 0.6}}},
                tags={"kind": "baseline"})
    for cell in config.cells():
        if only is not None and cell_name(cell) not in only:
            continue
        manifest = fake_manifest(cell.top_up, cell.sparsity)
        (folder / "neuroal.json").write_text(json.dumps(manifest))
        ppl = PPL[cell.top_up, cell.sparsity] * scale * (scales or {}).get(cell_name(cell), 1.0)
        shift = (accuracy or {}).get(cell_name(cell), 0.0)
        metrics = {"ppl": {"wikipedia": ppl, "lee": ppl * 1.5},
                   "tasks": {task: {"acc": acc + shift * (task == "arc_easy"), "acc_norm": acc} for task, acc in
                             zip(("arc_easy", "boolq"), ACC[cell.top_up])},
                   "timings": {"load": 1.0, "ppl.wikipedia": 3.0, "ppl.lee": 2.0, "tasks": 5.0},
                   "checkpoint": manifest}
        log_cell.fn(parent, cell_name(cell), params=flatten({"prune": cell.model_dump(), "eval": evaluation}),
                    metrics=cell_metrics(metrics), artifacts=[folder / "neuroal.json"],
                    tags={"kind": "cell", "git_revision": "abc123"})
    finish_campaign.fn(parent, status)
    return parent


def fake_manifest(top_up: str, sparsity: float) -> dict:
    """A ``neuroal.json`` whose allocation differs by top-up: per-module sparsity, NeuroAl's search."""
    spread = {"uniform": 0.0, "owl": -0.05, "neuroal": 0.1}[top_up]
    blocks = [sparsity + spread * (i - 1) for i in range(BLOCKS)]
    manifest = {"source": {"spec": MODEL, "kind": "folder", "digest": "0" * 64}, "method": "wanda", "top_up": top_up,
                "target_sparsity": sparsity, "achieved_sparsity": sparsity + 0.001,
                "module_sparsity": {f"model.layers.{i}.{m}": blocks[i] for i in range(BLOCKS) for m in MODULES},
                "timings": {"load": 0.5, "allocate": 20.0 if top_up == "neuroal" else 2.0, "prune": 10.0},
                "summary": {}, "allocation": {}, "seed": 0, "config": {}, "device": "cpu", "dtype": "float32",
                "versions": {}, "results_version": 3}
    if top_up == "neuroal":
        manifest["summary"] = {"block_lambda": 0.1, "row_lambda": 0.2, "mode": "reference"}
        manifest["allocation"]["neuroal"] = {
            "block_lambda": 0.1, "row_lambda": 0.2, "block_scores": {"0.08": 3.2e-4, "0.1": 3.1e-4, "0.12": 3.3e-4},
            "row_scores": {"0.1": 2.9e-4, "0.2": 2.7e-4}, "block_stopped_early": [0.12], "row_stopped_early": [],
            "row_sparsities": {"model.layers.0.self_attn.q_proj": [sparsity] * 64}}
    return manifest


def table_rows(markdown: str, title: str) -> dict[tuple[str, str], list[str]]:
    """The rows of the table under ``### title``: (method, top-up) -> the cells of each sparsity."""
    section = markdown.split(f"### {title}\n\n", 1)[1].split("\n\n", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()[2:]]
    return {(row[0], row[1]): row[2:] for row in rows}


def run_report(*args) -> int:
    return main(["report", *map(str, args)])


def test_report_lists_every_cell_with_its_change_against_uniform(full, store, tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "stale.png").write_bytes(b"old")  # a previous report is replaced whole
    assert run_report("--experiment", "full", "--out", out) == 0
    assert capsys.readouterr().out.strip() == f"report: {out / 'report.html'}"
    markdown = (out / "report.md").read_text()
    assert f"`{full}` (FINISHED)" in markdown and "`eval.limit=40`" in markdown

    quality = table_rows(markdown, "Perplexity and zero-shot accuracy")
    assert quality[("dense", "")][0] == f"wikipedia {DENSE_PPL:.2f}<br>lee {DENSE_PPL * 1.5:.2f}<br>acc 0.650"
    for (top_up, sparsity), ppl in PPL.items():
        text = quality[("wanda", top_up)][SPARSITIES.index(sparsity)]
        uniform = PPL["uniform", sparsity]
        acc, uniform_acc = sum(ACC[top_up]) / 2, sum(ACC["uniform"]) / 2
        if top_up == "uniform":
            expected = [f"wikipedia {ppl:.2f}", f"lee {ppl * 1.5:.2f}", f"acc {acc:.3f}"]
        else:  # the change written out: (cell - uniform) / uniform, and accuracy in points
            change = f"{(ppl - uniform) / uniform * 100:+.1f}%"
            expected = [f"wikipedia {ppl:.2f} ({change})", f"lee {ppl * 1.5:.2f} ({change})",
                         f"acc {acc:.3f} ({(acc - uniform_acc) * 100:+.1f} pt)"]
        assert text.split("<br>") == expected
    assert quality[("wanda", "neuroal")][0].startswith("wikipedia 87.70 (-12.3%)")
    assert quality[("wanda", "owl")][1].startswith("wikipedia 1250.00 (+25.0%)")

    cost = table_rows(markdown, "Achieved sparsity and time")
    assert set(cost) == {("wanda", t) for t in TOP_UPS}
    assert cost[("wanda", "neuroal")][1] == "70.10% · prune 30.5 s · eval 11.0 s"  # 0.5+20+10; 1+3+2+5
    assert cost[("wanda", "uniform")][0] == "50.10% · prune 12.5 s · eval 11.0 s"

    slug = model_slug(MODEL)
    pngs = {f"{slug}-wanda-{kind}.png" for kind in ("perplexity", "block-sparsity", "neuroal")}
    assert {p.name for p in out.iterdir()} == {"report.md", "report.html", *pngs}
    assert all(f"]({png})" in markdown for png in pngs)
    page = (out / "report.html").read_text()
    assert not re.search(r"https?:|file:|<link|<script|@import|url\(", page)  # self-contained
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == len(pngs) and all(s.startswith("data:image/png;base64,") for s in sources)
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in sources}
    assert embedded == {(out / png).read_bytes() for png in pngs}
    assert "87.70 (<span class=\"better\">-12.3%</span>)" in page

    logged = {Path(a.path).name for a in store.list_artifacts(full, "report")}
    assert {"report.md", "report.html", *pngs} <= logged


def test_latest_campaign_with_a_failed_cell_then_a_retry(store, tmp_path, capsys):
    grid = [f"{model_slug(MODEL)}-wanda-{t}-s{s:g}" for t in TOP_UPS for s in SPARSITIES]
    failed = grid[-1]  # neuroal at 70%
    log_campaign("reruns", tmp_path, limit=40, scale=1.0)
    # The latest campaign evaluates differently (limit 20): the first campaign's cells are not its own.
    second = log_campaign("reruns", tmp_path, limit=20, scale=2.0, only=set(grid) - {failed}, status="FAILED")
    out = tmp_path / "report"
    assert run_report("--experiment", "reruns", "--out", out) == 0
    quality = table_rows((out / "report.md").read_text(), "Perplexity and zero-shot accuracy")
    assert quality[("wanda", "neuroal")][1] == "failed"
    assert quality[("wanda", "uniform")][0].startswith(f"wikipedia {100.0 * 2:.2f}")
    assert "earlier campaign" not in (out / "report.md").read_text()

    # A retry of the failed cell and of one more: those two come from it, the rest from the second.
    retry = log_campaign("reruns", tmp_path, limit=20, scale=3.0, only={failed, grid[0]})
    assert run_report("--experiment", "reruns", "--out", out) == 0
    markdown = (out / "report.md").read_text()
    quality = table_rows(markdown, "Perplexity and zero-shot accuracy")
    assert quality[("wanda", "neuroal")][1].startswith(f"wikipedia {400.0 * 3:.2f}")
    assert quality[("wanda", "uniform")][0].startswith(f"wikipedia {100.0 * 3:.2f}")
    assert quality[("wanda", "owl")][0].startswith(f"wikipedia {90.0 * 2:.2f} (-40.0%)")  # against the retry's uniform
    assert f"`{retry}` (FINISHED)" in markdown
    assert f"{grid[2]}: run" in markdown and f"of campaign run `{second}`" in markdown
    assert "report: " in capsys.readouterr().out


def test_defaults_come_from_params_yaml(full, tmp_path, monkeypatch, capsys):
    params = campaign_config("full", 40).model_dump()
    params["campaign"]["out"] = "runs/somewhere"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    assert run_report() == 0
    assert (tmp_path / "runs/somewhere/report/report.html").is_file()
    assert capsys.readouterr().out.strip() == "report: runs/somewhere/report/report.html"


@pytest.mark.parametrize("case", ["unknown-experiment", "no-campaign", "out-under-a-file", "out-is-a-file", "no-store"])
def test_bad_input_is_one_line_exit_2_nothing_written(full, store, tmp_path, monkeypatch, capsys, case):
    experiment, out, needle = "full", tmp_path / "report", None
    if case == "unknown-experiment":
        experiment, needle = "nonexistent", "'nonexistent' does not exist"
    elif case == "no-campaign":
        experiment, needle = "empty", "has no campaign run"
        if store.get_experiment_by_name("empty") is None:
            store.create_experiment("empty")
    elif case == "out-under-a-file":
        (tmp_path / "file.txt").write_text("x")
        out, needle = tmp_path / "file.txt" / "report", "cannot write the report"
    elif case == "out-is-a-file":
        out, needle = tmp_path / "file.txt", "not a folder"
        out.write_text("x")
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'nowhere.db'}")
        needle = "no MLflow store"
    before = sorted(tmp_path.iterdir())
    assert run_report("--experiment", experiment, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err
    assert sorted(tmp_path.iterdir()) == before  # no report, no temporary folder, no new store


@pytest.fixture(scope="module")
def trend(store, tmp_path_factory) -> dict:
    """Experiment ``trend``: three campaigns; the third, after a transformers upgrade, has a cell
    whose perplexity rose 12%, one whose arc_easy accuracy fell 8 points, and one that failed."""
    folder = tmp_path_factory.mktemp("trend")
    grid = [cell_name(c) for c in campaign_config("trend", 40).cells()]
    worse, duller, failed = grid[0], grid[1], grid[4]
    log_campaign("trend", folder)
    log_campaign("trend", folder, scales={worse: 1.01}, revision="def456")
    last = log_campaign("trend", folder, scales={worse: 1.01 * 1.12}, accuracy={duller: -0.08},
                        only=set(grid) - {failed}, status="FAILED", revision="fed789", transformers="5.1.0")
    return {"worse": worse, "duller": duller, "failed": failed, "last": last}


def test_history_shows_the_trend_and_the_gate_names_every_regression(trend, store, tmp_path, capsys):
    out = tmp_path / "report"
    assert run_report("--experiment", "trend", "--out", out, "--history", 3, "--fail-on-regression", 5) == 3
    captured = capsys.readouterr()
    line = captured.err.strip()
    assert "\n" not in line and line.startswith(f"neuroal: 4 regression(s) in campaign {trend['last']}: ")
    assert f"{trend['worse']} ppl wikipedia " in line and "(+12.0%)" in line
    assert f"{trend['worse']} ppl lee " in line
    assert f"{trend['duller']} arc_easy acc 0.500 -> 0.420 (-8.0 pt)" in line and f"{trend['failed']} failed" in line
    assert "boolq" not in line  # unchanged
    markdown = (out / "report.md").read_text()
    history = markdown.split("## History", 1)[1]
    assert "git `def456` -> `fed789`; transformers 5.0.0 -> 5.1.0." in history
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]]
            for r in history.splitlines() if r.startswith(f"| {model_slug(MODEL)}")}
    assert rows[trend["worse"]][0] == f"{PPL['uniform', 0.5] * 1.01:.2f} → {PPL['uniform', 0.5] * 1.01 * 1.12:.2f} (+12.0%)"
    assert rows[trend["failed"]] == ["failed"] * 3
    assert rows[trend["duller"]][2].endswith("(-4.0 pt)")  # the mean over the two tasks
    assert rows[f"{model_slug(MODEL)}-dense"][0].endswith("(+0.0%)")
    figure = f"{model_slug(MODEL)}-history.png"
    assert f"]({figure})" in history and (out / figure).read_bytes().startswith(b"\x89PNG")
    assert 'class="worse">+12.0%' in (out / "report.html").read_text()

    # A looser gate passes the perplexity and accuracy changes, never the failed cell.
    assert run_report("--experiment", "trend", "--out", out, "--fail-on-regression", 20) == 3
    assert capsys.readouterr().err.strip().endswith(f": {trend['failed']} failed")
    # A history without regressions (the first two campaigns: +1%) passes; no history, no section.
    log_campaign("clean", tmp_path)
    log_campaign("clean", tmp_path, scales={trend["worse"]: 1.01})
    assert run_report("--experiment", "clean", "--out", out, "--fail-on-regression", 5) == 0
    assert run_report("--experiment", "clean", "--out", out, "--history", 0) == 0
    assert "## History" not in (out / "report.md").read_text()


def test_the_nightly_gate_fails_its_flow_run_tags_both_runs_and_publishes(trend, store, tmp_path, prefect_harness):
    import mlflow
    from prefect import flow, get_client

    from flows.nightly import REPORT_ARTIFACT, RESULTS_ARTIFACT, report_and_gate

    @flow
    def nightly_tail():
        report_and_gate("trend", tmp_path / "report", 5.0, 3)

    state = nightly_tail(return_state=True)
    assert state.is_failed() and "4 regression(s)" in state.message and trend["failed"] in state.message
    assert trend["worse"] in mlflow.MlflowClient().get_run(trend["last"]).data.tags["regression"]
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        assert "regression" in run.tags
        artifacts = {a.key: a for a in client.read_artifacts() if a.flow_run_id == run.id and a.key}
    assert set(artifacts) == {RESULTS_ARTIFACT, REPORT_ARTIFACT}
    rows = json.loads(artifacts[RESULTS_ARTIFACT].data)
    assert {r["cell"]: r["status"] for r in rows}[trend["failed"]] == "failed" and len(rows) == 7
    assert trend["last"] in artifacts[REPORT_ARTIFACT].data and "**regression**" in artifacts[REPORT_ARTIFACT].data

