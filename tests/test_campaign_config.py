"""params.yaml: the grid, flag overrides under the same key paths, and bad input refused before
any work starts (one line, exit code 2, nothing written)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from neuroal.cli import main
from neuroal.config import load_campaign
from neuroal.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_are_the_default_campaign_quick_and_full():
    quick, full = load_campaign(REPO / "params.yaml"), load_campaign(REPO / "params-full.yaml")
    for config in (quick, full):  # the same grid, both against the dense model, with both metrics
        cells = [(c.model, c.method, c.top_up, c.sparsity) for c in config.cells()]
        assert cells == [("smollm2-135m", "wanda", t, s) for t in ("uniform", "owl", "neuroal") for s in (0.5, 0.7)]
        assert config.campaign.baseline and config.eval.tasks == ["arc_easy", "boolq"] and config.eval.ppl
    assert {c.nsamples for c in full.cells()} == {32} and full.eval.limit == 40
    assert {c.nsamples for c in quick.cells()} == {12} and quick.eval.limit == 12
    assert full.campaign.out != quick.campaign.out and full.campaign.experiment != quick.campaign.experiment


def test_zoo_params_cover_four_models_three_allocators_two_sparsities():
    config = load_campaign(REPO / "params-zoo.yaml")
    models = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
    assert [(c.model, c.top_up, c.sparsity) for c in config.cells()] == [
        (m, t, s) for m in models for t in ("uniform", "owl", "neuroal") for s in (0.5, 0.7)]
    assert "python-stdlib" in config.eval.ppl
    coder = load_campaign(REPO / "params-zoo.yaml", **{"prune.calib": "python-stdlib"})
    assert {c.calib for c in coder.cells()} == {"python-stdlib"}


def test_overrides_use_the_params_key_paths():
    config = load_campaign(REPO / "params.yaml", **{"prune.top_up": ["uniform"], "prune.sparsity": [0.6],
                                                     "eval.limit": 5, "campaign.executor": "pool"})
    assert [(c.top_up, c.sparsity) for c in config.cells()] == [("uniform", 0.6)]
    assert config.eval.limit == 5 and config.campaign.executor == "pool"


@pytest.mark.parametrize(
    ("params", "needle"),
    [({"prune": {"model": "m", "method": "wanda", "top_up": "uniform", "sparsity": 0.5, "nsample": 4}}, "nsample"),
     ({"prune": {"model": "m", "method": "wanda", "top_up": "uniform", "sparsity": [0.5, 1.5]}}, "sparsity"),
     ({"prune": {"model": "m", "method": "pruneall", "top_up": "uniform", "sparsity": 0.5}}, "method: Input should be"),
     ({"prune": {"model": "m", "method": [], "top_up": "uniform", "sparsity": 0.5}}, "prune.method"),
     ({"prune": {"model": "m", "method": "wanda", "sparsity": 0.5}, "campaign": {"executer": "pool"}}, "executer")],
    ids=["typo-in-prune", "sparsity-out-of-range", "unknown-method", "empty-axis", "typo-in-campaign"],
)
def test_bad_params_are_refused_with_the_key_named(tmp_path, params, needle):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(UserError, match=needle):
        load_campaign(path)


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["--sparsities", "0.5,2"], "sparsity"), (["--sparsities", "half"], "--sparsities"),
     (["--params", "missing.yaml"], "missing.yaml"), (["--models", "/nowhere/model"], "does not exist")],
)
def test_campaign_bad_input_is_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys, args, needle):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    assert main(["campaign", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no runs/, no mlflow.db


def test_temporary_prefect_server_gets_time_to_start_and_a_user_value_wins(tmp_path):
    """Set before Prefect is imported (it reads its settings once): checked in fresh processes."""
    import subprocess
    import sys

    code = ("from flows.cli import _prepare_temporary_server; _prepare_temporary_server(); "
            "from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as limit; "
            "print(limit.value())")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    run = lambda extra: subprocess.run([sys.executable, "-c", code], env={**env, **extra}, cwd=REPO,  # noqa: E731
                                       capture_output=True, text=True, check=True).stdout.strip()
    assert run({"PREFECT_HOME": str(tmp_path)}) == "120"
    assert run({"PREFECT_HOME": str(tmp_path), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}) == "300"


def test_a_temporary_server_that_does_not_start_is_one_line(tmp_path, monkeypatch, capsys, tiny_llama):
    import flows.campaign
    from flows.cli import _NO_TEMPORARY_SERVER

    def no_server(*_args, **_kwargs):
        raise RuntimeError(f"{_NO_TEMPORARY_SERVER}. stdout: ...\nmany lines")

    monkeypatch.setattr(flows.campaign, "campaign", no_server)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    assert main(["campaign", "--models", str(tiny_llama), "--top-ups", "uniform"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "PREFECT_API_URL" in err and "did not start" in err
