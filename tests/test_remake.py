"""tools/remake.py: every recipe's command in study order, what an earlier run left moved aside once (never on a
resume), done recipes skipped, a failure stopping the rest until the next call, then report.py."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import CONF_DIR

from tools import remake


def test_every_recipe_once_each_study_training_first():
    listed = remake.recipes()
    names = [recipe for recipe, _, _ in listed]
    assert sorted(names) == sorted(f"{p.parent.name}/{p.stem}" for p in CONF_DIR.glob("experiment/*/*.yaml"))
    studies = [name.split("/")[0] for name in names]
    assert studies == sorted(studies)  # a study's recipes together
    for study in set(studies):
        steps = [name.split("/")[1] for name in names if name.split("/")[0] == study]
        assert "train" not in steps or steps[0] == "train", f"{study}: {steps}"
    commands = {recipe: (command, directory) for recipe, command, directory in listed}
    assert commands["best_one_hour/iwae"] == (["train.py", "experiment=best_one_hour/iwae"],
                                              "outputs/experiments/best_one_hour_iwae")
    assert commands["model_levers/likelihood"] == (["evaluate.py", "-m", "experiment=model_levers/likelihood"],
                                                   "multirun/experiments/model_levers_likelihood")
    best_one_hour = [n for n in names if n.startswith("best_one_hour/")]
    assert best_one_hour.index("best_one_hour/iwae") < best_one_hour.index("best_one_hour/iwae_likelihood")


class FakeRun:
    """subprocess.run as the tool calls it: records each command, writes into the recipe's directory, and fails
    the command whose recipe is in `failing`."""

    def __init__(self, root: Path, failing: set[str] = frozenset()) -> None:
        self.root, self.failing, self.calls = root, set(failing), []

    def __call__(self, command, cwd, stdout=None, stderr=None):
        arguments = command[1:]
        self.calls.append(" ".join(arguments))
        recipe = next((a.split("=", 1)[1] for a in arguments if a.startswith("experiment=")), None)
        directories = {name: directory for name, _, directory in remake.recipes()}
        if recipe:
            (self.root / directories[recipe]).mkdir(parents=True, exist_ok=True)
            (self.root / directories[recipe] / "new").write_text("")
        elif "tools.mnist_as_png" in arguments:
            (self.root / arguments[-1]).mkdir(parents=True)
        return subprocess.CompletedProcess(command, 1 if recipe in self.failing else 0)


def test_remake_moves_old_outputs_aside_once_resumes_after_a_failure_and_reports(tmp_path):
    only = {"default/train", "default/applications", "image_folder/mnist_png"}
    old = tmp_path / "outputs" / "experiments" / "default"
    old.mkdir(parents=True)
    (old / "checkpoint.pt").write_text("stale")
    run = FakeRun(tmp_path, failing={"default/applications"})
    assert remake.remake(tmp_path, only, run=run) == 1
    assert (tmp_path / "outputs/experiments/default.before-remake/checkpoint.pt").read_text() == "stale"
    assert not (old / "checkpoint.pt").exists() and (old / "new").exists()
    assert run.calls == ["train.py experiment=default/train", "evaluate.py -m experiment=default/applications"]
    progress = json.loads((tmp_path / "outputs/remake/progress.json").read_text())
    assert {k: v["state"] for k, v in progress.items()} == {"default/train": "done", "default/applications": "started"}

    (tmp_path / "multirun/experiments/default_applications/partial").write_text("")  # left by the stopped run
    run = FakeRun(tmp_path)
    assert remake.remake(tmp_path, only, run=run) == 0
    assert run.calls == ["evaluate.py -m experiment=default/applications",  # resumed, not started over
                         "-m tools.mnist_as_png outputs/mnist_png", "train.py experiment=image_folder/mnist_png",
                         "report.py"]
    assert (tmp_path / "multirun/experiments/default_applications/partial").exists()
    assert not (tmp_path / "multirun/experiments/default_applications.before-remake").exists()

    run = FakeRun(tmp_path)
    assert remake.remake(tmp_path, only, run=run) == 0 and run.calls == ["report.py"]  # all done: only the report


def test_recipes_named_done_are_not_run(tmp_path):
    run = FakeRun(tmp_path)
    only = {"default/train", "default/applications"}
    assert remake.remake(tmp_path, only, done={"default/train"}, run=run) == 0
    assert run.calls == ["evaluate.py -m experiment=default/applications", "report.py"]


def test_an_unknown_study_is_one_line():
    with pytest.raises(SystemExit, match="no recipe or study 'one_hours'"):
        remake.main(["--only", "one_hours"])


def test_the_listing_names_each_command_and_its_progress(tmp_path):
    only = {"default/train", "default/applications"}
    assert remake.listing(tmp_path, only).splitlines() == ["to run   python train.py experiment=default/train",
                                                           "to run   python evaluate.py -m experiment=default/applications"]
    remake.remake(tmp_path, {"default/train"}, run=FakeRun(tmp_path))
    assert remake.listing(tmp_path, only).splitlines()[0] == "done     python train.py experiment=default/train"


def test_the_listing_says_how_long_a_timed_study_takes():
    """From the composed recipe: its budget, its sweep's runs (a product of the swept keys) and the launcher's jobs
    at a time; nothing for a recipe without a budget or for an evaluation."""
    assert remake.time_budget("best_hour_seeds/train", multirun=True) == \
        "at most 60 min a run, 3 runs 2 at a time: up to 120 min"
    assert remake.time_budget("depth_latent_warmup/train", multirun=True) == \
        "at most 20 min a run, 8 runs 2 at a time: up to 80 min"  # 2 x 2 x 2 configurations
    assert remake.time_budget("one_hour/train", multirun=False) == "at most 60 min"
    assert remake.time_budget("default/train", multirun=False) == ""
    lines = remake.listing(Path("/nonexistent"), only={"bf16/train", "bf16/likelihood"}).splitlines()
    assert lines == ["to run   python train.py -m experiment=bf16/train   # at most 20 min a run, 2 runs 2 at a time: up to 20 min",
                     "to run   python evaluate.py -m experiment=bf16/likelihood"]
