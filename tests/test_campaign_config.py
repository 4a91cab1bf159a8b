"""params.yaml: the grid, flag overrides under the same key paths, and bad input refused before
any work starts (one line, exit code 2, nothing written)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from neuroal.cli import main
from neuroal.config import GRID_AXES, CampaignConfig, PruneConfig, PruneGrid, load_campaign
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


def test_temporary_prefect_server_gets_time_to_start_and_a_user_value_wins(tmp_path, processes):
    """Set before Prefect is imported (it reads its settings once): checked in fresh processes."""
    import sys

    code = ("from flows.cli import _prepare_temporary_server; _prepare_temporary_server(); "
            "from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as limit; "
            "print(limit.value())")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    run = lambda extra: processes.run([sys.executable, "-c", code], env={**env, **extra}, cwd=REPO,  # noqa: E731
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


# ---------------------------------------------------------------------------------------------
# The typed grid (PruneGrid, derived from PruneConfig) and the flags derived from it.

GRID = {"model": "m", "method": "wanda", "top_up": "uniform", "sparsity": 0.5, "calib": "lee", "nsamples": 4}


def _params(tmp_path: Path, **prune) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"prune": {**GRID, **prune}, "campaign": {"experiment": "typed", "dvc": False}}))
    return path


def test_a_single_value_is_a_one_element_list_and_every_setting_is_typed(tmp_path):
    config = load_campaign(_params(tmp_path, top_up=["owl", "neuroal"]))
    assert config.prune.model == ["m"] and config.prune.sparsity == [0.5] and config.prune.top_up == ["owl", "neuroal"]
    assert config.prune.seed == 0 and config.prune.neuroal_mode == "reference"  # PruneConfig's defaults
    assert config.models() == ["m"] and [c.top_up for c in config.cells()] == ["owl", "neuroal"]
    defaulted = CampaignConfig(prune={"model": "m", "method": "wanda", "sparsity": 0.5})  # a dict, as tests build it
    assert defaulted.prune.top_up == ["uniform"] and defaulted.cells()[0] == PruneConfig(model="m", method="wanda",
                                                                                          sparsity=0.5)


def test_the_grid_has_every_field_of_prune_config():
    """A new cell setting or allocator option is a grid setting with no edit of the grid."""
    assert list(PruneGrid.model_fields) == list(PruneConfig.model_fields)
    for name, info in PruneConfig.model_fields.items():
        if name not in GRID_AXES:
            assert PruneGrid.model_fields[name].annotation == info.annotation
            assert PruneGrid.model_fields[name].default == info.default


def test_the_dumped_grid_round_trips_and_logs_under_the_key_paths(tmp_path):
    """What the campaign logs (campaign.json, flattened MLflow params) reads back as the same config."""
    from tasks.tracking import flatten

    config = load_campaign(_params(tmp_path, sparsity=[0.5, 0.7], owl_lam=0.1))
    assert CampaignConfig.model_validate(config.model_dump()) == config
    params = flatten(config.model_dump())
    assert params["prune.sparsity"] == "0.5,0.7" and params["prune.model"] == "m" and params["prune.owl_lam"] == 0.1
    cell = flatten({"prune": config.cells()[0].model_dump()})  # what a cell run logs: the same shared settings
    assert all(cell[k] == v for k, v in params.items() if k.startswith("prune.") and k.split(".")[1] not in GRID_AXES)


@pytest.mark.parametrize(("prune", "needle"), [
    ({"nsample": 4}, "prune.nsample: Extra inputs are not permitted"),
    ({"owl_lambda": 0.1}, "prune.owl_lambda"),
    ({"sparsity": []}, "prune.sparsity needs at least one value"),
    ({"model": None}, "prune.model needs at least one value"),
    ({"top_up": ["owl", "magic"]}, "prune.top_up: Input should be"),
    ({"owl_lam": 0.9}, "prune.owl_lam: Input should be less than 0.5"),
], ids=["unknown-key", "unknown-allocator-option", "empty-axis", "null-axis", "bad-axis-item", "bad-option"])
def test_bad_grid_is_one_line(tmp_path, prune, needle):
    with pytest.raises(UserError) as raised:
        load_campaign(_params(tmp_path, **prune))
    assert len(str(raised.value).splitlines()) == 1 and needle in str(raised.value)


class _Stop(UserError):
    """Raised by the stand-in of check_campaign: the flags were parsed, no flow runs."""


@pytest.fixture
def checked(monkeypatch) -> list:
    """The configs that `neuroal campaign` would check and run; it stops before the flow."""
    import flows.cli

    seen = []

    def stop(config):
        seen.append(config)
        raise _Stop("stopped before the flow")

    monkeypatch.setattr(flows.cli, "check_campaign", stop)
    return seen


def test_flags_reach_every_cell(tmp_path, monkeypatch, checked, capsys):
    monkeypatch.chdir(tmp_path)
    params = _params(tmp_path)
    flags = ["--models", "a,b", "--top-ups", "owl,neuroal", "--sparsities", "0.5,0.6", "--seed", "7",
             "--structure", "2:4", "--neuroal-mode", "dense", "--owl-lam", "0.1", "--atp-beta", "0.01",
             "--trust-remote-code", "--tasks", "none", "--eval-seqlen", "64", "--no-baseline", "--refresh", "allocate"]
    assert main(["campaign", "--params", str(params), *flags]) == 2
    assert "stopped before the flow" in capsys.readouterr().err
    (config,) = checked
    cells = config.cells()
    assert [(c.model, c.top_up, c.sparsity) for c in cells] == [
        (m, t, s) for m in ("a", "b") for t in ("owl", "neuroal") for s in (0.5, 0.6)]
    assert all(c.seed == 7 and c.structure == "2:4" and c.neuroal_mode == "dense" and c.owl_lam == 0.1
               and c.atp_beta == 0.01 and c.trust_remote_code and c.calib == "lee" and c.nsamples == 4 for c in cells)
    assert config.eval.tasks == [] and config.eval.seqlen == 64 and config.prune.seqlen == 2048
    assert not config.campaign.baseline and config.campaign.refresh == ["allocate"] and not config.campaign.dvc


@pytest.mark.parametrize(("args", "needle"), [
    (["--seed", "x"], "--seed 'x' is not a valid value for prune.seed"),
    (["--neuroal-mode", "fast"], "--neuroal-mode 'fast' is not a valid value for prune.neuroal_mode"),
    (["--owl-lam", "0.9"], "--owl-lam '0.9' is not a valid value for prune.owl_lam"),
    (["--sparsities", "0.5,2"], "--sparsities '0.5,2' is not a valid value for prune.sparsity"),
    (["--methods", ","], "--methods ',' is not a valid value for prune.method"),
    (["--eval-seqlen", "0"], "--eval-seqlen '0' is not a valid value for eval.seqlen"),
    (["--nsamples", "0"], "--nsamples '0' is not a valid value for prune.nsamples"),
], ids=["seed", "allocator-choice", "allocator-range", "axis-item", "empty-axis", "eval", "nsamples"])
def test_a_bad_flag_is_one_line_exit_2(tmp_path, monkeypatch, checked, capsys, args, needle):
    monkeypatch.chdir(tmp_path)
    code = main(["campaign", "--params", str(_params(tmp_path)), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not checked  # refused before the campaign's checks


def test_every_setting_has_a_campaign_flag_listed_in_help(capsys):
    from flows.cli import campaign_flags

    keys = {spec.key for spec in campaign_flags().values()}
    for section, info in CampaignConfig.model_fields.items():
        assert {f"{section}.{name}" for name in info.annotation.model_fields} <= keys
    with pytest.raises(SystemExit) as done:
        main(["campaign", "--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0
    for flag in ("--models", "--methods", "--top-ups", "--sparsities", "--seed", "--structure", "--calib", "--nsamples",
                 "--neuroal-mode", "--owl-lam", "--ppl", "--tasks", "--limit", "--experiment", "--out", "--executor",
                 "--dvc-remote", "--artifact-location", "--refresh", "--no-dvc", *campaign_flags()):
        assert flag in text, flag
