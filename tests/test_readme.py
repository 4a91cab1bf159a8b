"""The README's examples run.

Every command line of the README's ``sh`` blocks is either run here, in README order, in a
scratch project (the embedded model swapped for a tiny one, the placeholders of the
reproduction recipe filled from the campaign run before it), or named in ``ELSEWHERE`` with what
runs it. A new example that is neither fails ``test_every_example_is_run``.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import copy_dvc_stage
from neuroal.checkpoint import read_manifest
from neuroal.cli import main
from servers import fixture_prefect_harness  # noqa: F401 - the Prefect server of the campaigns

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Examples that need more than a scratch project, and what runs them (longest prefix wins).
ELSEWHERE = {
    "make run": "make run itself (the quick start)",
    "make test": ".ci/run",
    "neuroal campaign --dvc-remote": "tests/test_campaign.py::test_checkpoints_go_to_s3_as_lineage_forms (moto S3)",
    "neuroal campaign --executor pool": "tests/test_pool.py (Prefect server, work pool, two workers)",
    "prefect": "tests/test_pool.py: server start, work-pool create, deploy --all, worker start --pool",
    "mlflow server": "tests/servers.py (the fleet's tracking server, artifacts in moto's S3)",
    "export": "tests/test_pool.py (each machine's environment in the fleet test)",
    "deploy/setup.sh": "tests/test_pool.py (the fleet test, as deploy/compose.yaml's setup service)",
    "docker": "no Docker engine here: tests/test_pool.py runs deploy/compose.yaml's commands as processes",
}
BARE_CAMPAIGN = "neuroal campaign"  # the params.yaml grid: make run


def readme_commands() -> list[str]:
    """Every command line of the README's ``sh`` blocks: continuations joined, comments and
    leading environment assignments dropped, spaces normalised."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line)
            line = re.sub(r"^(\s*[A-Z_]+=\S+\s+)+", "", line)
            if line.strip():
                commands.append(" ".join(line.split()))
    return commands


def run_elsewhere(command: str) -> str | None:
    """What runs ``command`` when this module does not, else None."""
    if command == BARE_CAMPAIGN:
        return "make run (the params.yaml grid)"
    prefixes = [p for p in ELSEWHERE if command == p or command.startswith(p + " ")]
    return ELSEWHERE[max(prefixes, key=len)] if prefixes else None


def test_every_example_is_run():
    commands = readme_commands()
    assert len(commands) > 10 and "neuroal report" in commands
    here = [c for c in commands if run_elsewhere(c) is None]
    assert all(c.split()[0] in ("neuroal", "git", "dvc") for c in here), here  # what the scratch run knows


@pytest.mark.slow
def test_examples_run_in_a_scratch_project(prefect_harness, tiny_llama, tmp_path, monkeypatch):
    project = _scratch_project(tmp_path, tiny_llama, monkeypatch)
    values: dict = {}
    for command in (c for c in readme_commands() if run_elsewhere(c) is None):
        argv = [_filled(word, values, tiny_llama) for word in shlex.split(command)]
        if argv[0] == "neuroal":
            assert main(argv[1:]) == 0, command
        else:  # git, dvc: dvc from this environment, which PATH may not name
            program = str(BIN / "dvc") if argv[0] == "dvc" else argv[0]
            subprocess.run([program, *argv[1:]], cwd=project, check=True, capture_output=True)
        if argv[:2] == ["neuroal", "campaign"] and not values:
            values.update(_cell_values(project))
            _delete_local_copies(project, values["cell"])  # so the recipe's `neuroal pull` has work to do

    assert read_manifest(project / "ck")  # pulled back, every weight file matching its digest
    assert read_manifest(project / "ck-again").files == read_manifest(project / "ck").files  # dvc pull + materialize
    again = json.loads((project / "m.json").read_text())
    assert again["ppl"] == values["ppl"]  # the recipe reproduces the MLflow run's numbers
    assert (project / "runs/campaign/report/report.html").is_file()
    assert (project / "runs/smol-wanda-50/neuroal.json").is_file()


def _scratch_project(tmp_path: Path, model: Path, monkeypatch) -> Path:
    """A git repository with the README's params.yaml and dvc.yaml, the tiny model for the real one,
    its campaigns pushing their checkpoints to a local DVC remote."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prune"]["model"] = [str(model)]
    params["campaign"]["dvc_remote"] = str(tmp_path.parent / "dvc-remote")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    copy_dvc_stage(tmp_path)  # the project's stage
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "init"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def _cell_values(project: Path) -> dict:
    """The reproduction recipe's placeholders, from the first cell of the campaign just run."""
    results = json.loads((project / "runs/campaign/results.json").read_text())
    cell = results["cells"][0]
    evaluation = yaml.safe_load((project / "params.yaml").read_text())["eval"]
    metrics = json.loads((project / "runs/campaign/metrics" / f"{Path(cell['checkpoint']).name}.json").read_text())
    return {
        "cell": Path(cell["checkpoint"]).name, "run_id": cell["mlflow_run_id"], "model": cell["model"], "method": cell["method"],
        "top_up": cell["top_up"], "s": str(cell["sparsity"]), "ppl": metrics["ppl"],
        "git_revision": subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True,
                                       text=True, check=True).stdout.strip(),
        "eval.ppl": ",".join(metrics["ppl"]), "eval.tasks": "none", "eval.limit": str(metrics["limit"]),
        "eval.seqlen": str(metrics["seqlen"] or evaluation["seqlen"]),
    }


def _delete_local_copies(project: Path, cell: str) -> None:
    """Delete the cell's checkpoint, its lineage form and DVC's local cache: only the remote has it now."""
    for folder in ("runs/campaign/checkpoints", "runs/campaign/lineage"):
        shutil.rmtree(project / folder / cell)
    shutil.rmtree(project / ".dvc/cache")


def _filled(word: str, values: dict, model: Path) -> str:
    """A README word with the embedded model swapped for the tiny one and ``<placeholders>`` filled."""
    if word == "smollm2-135m":
        return str(model)
    return re.sub(r"<([\w.]+)>", lambda m: values[m.group(1)], word)
