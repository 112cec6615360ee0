"""Sweeps: report.py over a multirun, the launcher and sweeper presets, and a submitit job that
continues the checkpoint already in its run directory (what a requeued job finds)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import CONF_DIR, FAST, PROJECT_DIR, compose_config
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from report import report
from train import train
from vae.results import NotRun, Outputs, fill, run_evaluations, sweep_progress
from vae.sweeps import plot, read_jobs, summarize

LAUNCHERS = sorted(path.stem for path in (CONF_DIR / "hydra" / "launcher").glob("*.yaml"))
SWEEPERS = sorted(path.stem for path in (CONF_DIR / "hydra" / "sweeper").glob("*.yaml"))


def fake_job(job_dir, overrides, test_elbos):
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    lines = [{"epoch": e, "test_elbo": v, "wall_time": 10.0 * e} for e, v in enumerate(test_elbos)]
    (job_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))


def test_report_averages_over_seeds(tmp_path):
    fake_job(tmp_path / "0", ["estimator=reparam", "seed=0"], [-500, -110, -100])
    fake_job(tmp_path / "1", ["estimator=reparam", "seed=1"], [-500, -106, -96])
    fake_job(tmp_path / "2", ["estimator=score", "seed=0"], [-500, -200, -150])
    rows = {row["configuration"]: row for row in report(tmp_path)}
    assert rows["estimator=reparam"]["seeds"] == 2 and rows["estimator=score"]["seeds"] == 1
    assert rows["estimator=reparam"]["test_elbo_mean"] == pytest.approx(-98)
    assert rows["estimator=reparam"]["test_elbo_spread"] == pytest.approx(2 * 2**0.5)  # sample sd of -100, -96
    assert rows["estimator=reparam"]["curve"]["wall_time"] == [0, 10, 20]
    table = (tmp_path / "report.md").read_text()
    assert "| `estimator=reparam` | 2 | 2 | -98.00 ± 2.83 | -98.00 | -100.00 / -96.00 | 20 |" in table
    assert (tmp_path / "report.png").stat().st_size > 0


def test_report_median_and_range_show_the_seeds_that_learn_beside_one_that_diverges(tmp_path):
    fake_job(tmp_path / "10", ["estimator=score_nn_baseline", "seed=2"], [-500, -130, -122])
    fake_job(tmp_path / "9", ["estimator=score_nn_baseline", "seed=0"], [-500, -4e3, -1.3e9])
    fake_job(tmp_path / "more" / "0", ["estimator=score_nn_baseline", "seed=1"], [-500, -127, -115])  # nested
    (row,) = report(tmp_path)
    assert row["seeds"] == 3 and row["test_elbo_seeds"] == [-1.3e9, -115, -122]  # seed order, not directory order
    assert row["test_elbo_median"] == -122
    assert row["curve"]["worst"] == [-500, -4e3, -1.3e9] and row["curve"]["best"] == [-500, -127, -115]
    assert "| -122.00 | -1.30e+09 / -115.00 / -122.00 |" in (tmp_path / "report.md").read_text()
    (median_line,) = plot([row]).axes[0].get_lines()
    assert list(median_line.get_ydata()) == [500, 130, 122]  # -ELBO, the median seed at each epoch


def test_report_includes_runs_made_apart_and_refuses_a_missing_directory(tmp_path):
    sweep, more_seeds = tmp_path / "sweep", tmp_path / "later"
    fake_job(sweep / "0", ["estimator=score_loo", "seed=1"], [-500, -110, -100])
    fake_job(more_seeds, ["estimator=score_loo"], [-500, -120, -104])  # a single run, seed 0 by default
    (row,) = report(sweep, include=[more_seeds])
    assert row["seeds"] == 2 and row["test_elbo_seeds"] == [-104, -100]
    assert (sweep / "report.md").is_file() and not (more_seeds / "report.md").exists()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        report(sweep, include=[tmp_path / "nowhere"])


def test_report_plots_a_diverging_run_on_a_log_axis(tmp_path):
    fake_job(tmp_path / "0", ["estimator=reparam", "seed=0"], [-500, -110, -100])
    fake_job(tmp_path / "1", ["estimator=score", "seed=0"], [-500, -2e4, -3e9])
    rows = summarize(read_jobs(tmp_path))
    axis = plot(rows).axes[0]
    assert axis.get_yscale() == "log"
    plotted = {line.get_label(): list(line.get_ydata()) for line in axis.get_lines()}
    assert plotted["estimator=reparam (1 seeds)"] == [500, 110, 100]  # -ELBO
    assert plotted["estimator=score (1 seeds)"] == [500, 2e4, 3e9]
    fake_job(tmp_path / "2", ["estimator=reparam", "data=synthetic", "seed=0"], [-50, 20, 40])  # a density above 1
    assert plot(summarize(read_jobs(tmp_path))).axes[0].get_yscale() == "linear"


@pytest.mark.parametrize("group,option", [("launcher", o) for o in LAUNCHERS] + [("sweeper", o) for o in SWEEPERS])
def test_hydra_presets_compose(group, option):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/{group}={option}"], return_hydra_config=True)
    node = cfg.hydra[group]
    assert node._target_.startswith("hydra_plugins.")
    if option == "slurm":
        assert node.partition and node.gpus_per_node == 1 and node.timeout_min > 0 and node.array_parallelism > 0
    if option == "lr_latent":
        assert node.direction == "maximize" and set(node.params) == {"optim.optim_args.lr", "model.latent_dim"}


def test_report_and_variance_configs_compose():
    assert compose_config(config_name="variance").samples >= 2
    assert compose_config("sweep=somewhere", config_name="report").sweep == "somewhere"


def test_submitit_job_continues_the_checkpoint_in_its_run_directory(tmp_path):
    """A requeued job reruns in the same directory: it must continue, not restart."""
    overrides = [*FAST, "data.subset=64", "estimator=score_avg_baseline"]
    train(compose_config(*overrides, "trainer.epochs=1"), tmp_path / "0")  # the job's first life
    result = subprocess.run(
        [sys.executable, "train.py", "-m", "hydra/launcher=submitit_local", *overrides, "trainer.epochs=2",
         f"hydra.sweep.dir={tmp_path}"], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "0" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


def test_documents_are_filled_from_the_recipes_outputs(tmp_path):
    """`python report.py`: each report block is rewritten from its recipe's outputs, with the
    machine from provenance.jsonl (the commit only outside the README); a block whose recipe has not
    run names the command; a block that does not exist is refused."""
    run = tmp_path / "outputs" / "default"
    run.mkdir(parents=True)
    metrics = [{"epoch": 0, "train_elbo": None, "test_elbo": -515.85, "test_recon": -514.1, "test_kl": 1.8, "wall_time": 0.0},
               {"epoch": 1, "train_elbo": -124.2, "test_elbo": -105.25, "test_recon": -81.7, "test_kl": 23.5,
                "seconds": 60.0, "wall_time": 63.0},
               {"epoch": 2, "train_elbo": -104.0, "test_elbo": -101.01, "test_recon": -78.0, "test_kl": 23.0,
                "seconds": 62.0, "wall_time": 128.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (run / "provenance.jsonl").write_text(json.dumps({"commit": "0123456789abcdef", "uncommitted_changes": False,
                                                      "date": "2026-12-01T00:00:00+00:00", "cpu": "Some CPU", "threads": 2,
                                                      "gpu": None, "torch": "9.9", "pyro": "1.9.2"}) + "\n")
    document = "a\n<!-- report:quickstart -->\nold text\n<!-- /report:quickstart -->\n<!-- report:speed -->\n<!-- /report:speed -->\nb\n"
    out = Outputs(tmp_path / "outputs", tmp_path / "multirun", tmp_path / "figures", full=False)
    filled = fill(document, out)
    assert "old text" not in filled and filled.startswith("a\n") and filled.endswith("b\n")
    assert "**-101.01**" in filled and "-105.25 after the first epoch" in filled and "about 2 minutes (61 s per epoch" in filled
    assert "Some CPU, 2 threads; no GPU; torch 9.9; pyro 1.9.2." in filled and "0123456" not in filled
    assert "_Not run yet: `python bench.py experiment=bench`._" in filled
    docs = fill(document, Outputs(tmp_path / "outputs", tmp_path / "multirun", tmp_path / "figures", full=True))
    assert "commit 0123456; 2026-12-01." in docs
    assert fill(filled, out) == filled  # filling again changes nothing
    with pytest.raises(KeyError, match="nope"):
        fill("<!-- report:nope -->\n<!-- /report:nope -->", out)
    partly = fill(document, out, only=["speed"])  # `python report.py blocks=[speed]`: the others stay as they are
    assert "old text" in partly and "_Not run yet: `python bench.py experiment=bench`._" in partly
    with pytest.raises(KeyError, match=r"blocks=\['nope'\]"):
        fill(document, out, only=["speed", "nope"])


def test_a_diverging_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    """lr=1e6 turns the loss into NaN within the first epoch: that job writes failed.json and the
    multirun still runs the next job to the end, exits 0, and report.py lists the failure."""
    result = subprocess.run(
        [sys.executable, "train.py", "-m", *FAST, "data.subset=128", "trainer.epochs=1", "optim.optim_args.lr=1e6,1e-3",
         f"hydra.sweep.dir={tmp_path}"], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    failure = json.loads((tmp_path / "0" / "failed.json").read_text())
    assert failure["error"] == "TrainingDiverged" and failure["message"].startswith("loss is nan at epoch 1")
    assert not (tmp_path / "1" / "failed.json").exists()
    assert [json.loads(line)["epoch"] for line in (tmp_path / "1" / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    report(tmp_path)
    table = (tmp_path / "report.md").read_text()
    (failed_line,) = [line for line in table.splitlines() if line.startswith("- ")]
    assert "Failed jobs (1)" in table and failed_line.startswith(f"- `{tmp_path / '0'}`")
    assert "optim.optim_args.lr=1000000.0" in failed_line and "seed 0): TrainingDiverged: loss is nan" in failed_line
    assert json.loads((tmp_path / "report.json").read_text())["failed"][0]["job"] == str(tmp_path / "0")


def test_a_diverging_trial_does_not_end_the_optuna_study(tmp_path):
    """The Optuna preset counts a diverged trial as failed (train.main returns None) and goes on to
    its other trials and a best value (max_failure_rate: 1.0)."""
    result = subprocess.run(
        [sys.executable, "train.py", "-m", "hydra/sweeper=lr_latent", "hydra.sweeper.n_trials=3",
         "optim.optim_args.lr=choice(1e6,1e-3)", *FAST, "model.latent_dim=4", "data.subset=128", "trainer.epochs=1",
         f"hydra.sweep.dir={tmp_path}"], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    failed = sorted(path.parent.name for path in tmp_path.glob("*/failed.json"))
    finished = sorted(path.parent.name for path in tmp_path.glob("*/metrics.jsonl")
                      if not (path.parent / "failed.json").exists())
    assert failed and finished and len(failed) + len(finished) == 3, (failed, finished)
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert best["best_params"]["optim.optim_args.lr"] == 1e-3 and best["best_value"] < 0
    output = result.stdout + result.stderr  # Optuna's lines come through Hydra's log, plain
    assert "A new study created in memory with name: lr_latent" in output
    assert "\x1b[" not in output and "setup plugin" not in output


def test_report_of_a_missing_sweep_is_one_line_and_creates_nothing(tmp_path):
    result = subprocess.run([sys.executable, "report.py", f"sweep={tmp_path / 'nowhere'}"], cwd=PROJECT_DIR,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: no such directory: {tmp_path / 'nowhere'}"
    assert not (tmp_path / "nowhere").exists()


def test_report_of_an_unknown_block_is_one_line_and_leaves_the_document_as_it_was(tmp_path):
    document = tmp_path / "results.md"
    document.write_text("<!-- report:speed -->\nold\n<!-- /report:speed -->\n")
    result = subprocess.run([sys.executable, "report.py", "blocks=[speed,nope]", f"documents=[{document}]",
                             f"experiments={tmp_path}", f"sweeps={tmp_path}", f"figures={tmp_path / 'figures'}"],
                            cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: blocks=['nope']: no such block; known: quickstart")
    assert document.read_text() == "<!-- report:speed -->\nold\n<!-- /report:speed -->\n"
    assert not (tmp_path / "figures").exists()


def test_a_sweep_in_progress_says_how_many_jobs_are_done(tmp_path):
    sweep = tmp_path / "estimators"
    fake_job(sweep / "0", ["estimator=reparam", "seed=0"], [-500, -110, -100])
    fake_job(sweep / "1", ["estimator=reparam", "seed=1"], [-500, -106])
    for job in ("0", "1"):
        OmegaConf.save(OmegaConf.create({"trainer": {"epochs": 2}}), sweep / job / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"sweeper": {"params": {"estimator": "reparam,score", "seed": "0,1"}}}}),
                   sweep / "multirun.yaml")
    assert sweep_progress(sweep).strip() == ("**In progress:** 1 of 4 jobs have trained their 2 epochs; each row is "
                                             "shown at the last epoch that all its seeds have reached.")
    (sweep / "multirun.yaml").unlink()
    fake_job(sweep / "1b", ["estimator=reparam", "seed=1"], [-500, -106, -99])  # a finished stand-in
    OmegaConf.save(OmegaConf.create({"trainer": {"epochs": 2}}), sweep / "1b" / ".hydra" / "config.yaml")
    (sweep / "1" / ".hydra" / "config.yaml").unlink()
    assert sweep_progress(sweep) == ""  # every job that exists is done


def test_a_job_with_a_time_budget_is_done_when_it_has_spent_it(tmp_path):
    sweep = tmp_path / "levers"
    fake_job(sweep / "0", ["estimator=reparam"], [-500, -110, -100])  # wall_time 20 s after epoch 2
    fake_job(sweep / "1", ["estimator=iwae"], [-500, -120])  # 10 s
    for job in ("0", "1"):
        OmegaConf.save(OmegaConf.create({"trainer": {"epochs": 1000, "max_minutes": 0.25}}), sweep / job / ".hydra" / "config.yaml")
    assert sweep_progress(sweep).strip().startswith("**In progress:** 1 of 2 jobs")  # 20 s of 15 spent; 10 s not


def test_estimators_table_reads_every_seed_at_the_epoch_all_reached(tmp_path):
    """A seed that trained further than the others (a shortened recipe, a sweep in progress) is shown
    at the common epoch in every column: its test ELBO, its best epoch up to there, its KL there."""
    sweep = tmp_path / "multirun" / "estimators"
    for seed, elbos, kls in ((0, [-500, -110, -100, -90], [2, 20, 24, 40]), (1, [-500, -106, -101], [2, 21, 25])):
        job = sweep / str(seed)
        fake_job(job, ["estimator=reparam", f"seed={seed}"], elbos)
        lines = [{**json.loads(line), "test_kl": kl} for line, kl in zip((job / "metrics.jsonl").read_text().splitlines(), kls)]
        (job / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    (tmp_path / "figures").mkdir()
    text = fill("<!-- report:estimators -->\n<!-- /report:estimators -->",
                Outputs(tmp_path / "outputs", tmp_path / "multirun", tmp_path / "figures", full=False))
    row = next(line for line in text.splitlines() if line.startswith("| `reparam`"))
    assert "| 2 | 2 | **-100.50** |" in row and "| -100.00 / -101.00 | -100.00 / -101.00 | 24.00 / 25.00 |" in row


def test_likelihoods_table_ranks_by_bits_per_dim_with_floor_samples_and_failures(tmp_path):
    """docs' likelihoods block: one row per (likelihood, scale), the seeds at their last common epoch,
    best bits/dim first, the floor share, each seed's confident samples, and the failed seeds."""
    sweep, samples = tmp_path / "multirun" / "likelihoods", tmp_path / "multirun" / "likelihoods_samples"
    jobs = {"0": ("gaussian", "pixel", 0, 3.6, 0.09), "1": ("gaussian", "pixel", 1, 3.9, 0.02),
            "2": ("discretized_logistic", "pixel", 0, 1.52, 0.0), "3": ("discretized_logistic", "pixel", 1, 1.50, 0.0)}
    for job, (name, scale, seed, bits, floor) in jobs.items():
        overrides = [f"model.likelihood={name}", f"model.scale={scale}", f"seed={seed}", "experiment=likelihoods"]
        fake_job(sweep / job, overrides, [-900, -800])
        lines = [json.loads(line) for line in (sweep / job / "metrics.jsonl").read_text().splitlines()]
        for m in lines:
            m.update(test_kl=30.0 + seed, test_bits_per_dim=bits + (1.0 if m["epoch"] == 0 else 0.0), test_scale_at_floor=floor)
        (sweep / job / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
        (samples / job).mkdir(parents=True)
        (samples / job / "metrics.json").write_text(json.dumps({"run": str(sweep / job), "sample_confident_share": 0.1 * (int(job) + 1)}))
        (samples / job / "samples.png").write_bytes(b"png")
        (samples / job / "samples_drawn.png").write_bytes(b"png")
    (sweep / "1" / "failed.json").write_text(json.dumps({"error": "TrainingDiverged", "message": "NaN"}))
    block = fill("<!-- report:likelihoods -->\n<!-- /report:likelihoods -->\n",
                 Outputs(tmp_path / "outputs", tmp_path / "multirun", tmp_path / "figures", full=False))
    assert "![gaussian_pixel: E[x|t]](likelihoods_gaussian_pixel_samples.png)" in block  # seed 0's grids
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        f"likelihoods_{name}_{kind}.png" for name in ("discretized_logistic_pixel", "gaussian_pixel")
        for kind in ("samples", "samples_drawn")]
    rows = [line for line in block.splitlines() if line.startswith("| `")]
    assert rows == ["| `discretized_logistic` | `pixel` | 1 | **1.510** | 1.520 / 1.500 | 30.0 / 31.0 | 0.0% / 0.0% "
                    "| 30% / 40% | none |",
                    "| `gaussian` | `pixel` | 1 | **3.750** | 3.600 / 3.900 | 30.0 / 31.0 | 9.0% / 2.0% | 10% / 20% | seed 1 |"]


@pytest.mark.parametrize("name, target", [("likelihoods_beta", "both"), ("likelihoods_beta_loc", "loc")])
def test_likelihoods_beta_block_orders_by_beta_with_the_worst_rise_samples_and_scales(name, target, tmp_path):
    """docs' beta-NLL block: a row per trainer.nll_beta in its order (0 is the ELBO), each seed's bits/dim,
    the largest rise of bits/dim in one epoch (training going backwards), the confident samples, seed 0's scales."""
    sweep, multirun = tmp_path / "multirun" / name, tmp_path / "multirun"
    jobs = {"0": (0, 0, [9.0, 5.0, 3.5, 6.5]), "1": (0, 1, [9.0, 4.0, 3.8, 3.7]), "2": (0.5, 0, [9.0, 4.0, 3.4, 3.2])}
    for job, (beta, seed, bits) in jobs.items():
        fake_job(sweep / job, [f"trainer.nll_beta={beta}", f"seed={seed}", f"experiment={name}"], [-900] * len(bits))
        lines = [json.loads(line) for line in (sweep / job / "metrics.jsonl").read_text().splitlines()]
        for m, b in zip(lines, bits):
            m.update(test_kl=60.0 + seed, test_bits_per_dim=b, test_scale_at_floor=0.1 * seed)
        (sweep / job / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
        for kind, metrics in (("samples", {"sample_confident_share": 0.1 * (int(job) + 1)}), ("pixels", {"groups": {
                "background": {"median_scale": 0.0012, "bits_per_pixel": 1.6}, "edge": {"median_scale": 0.16, "bits_per_pixel": 7.7}}})):
            (multirun / f"{name}_{kind}" / job).mkdir(parents=True)
            (multirun / f"{name}_{kind}" / job / "metrics.json").write_text(json.dumps({"run": str(sweep / job), **metrics}))
        for picture in ("samples.png", "samples_drawn.png"):
            (multirun / f"{name}_samples" / job / picture).write_bytes(b"png")
    block = fill(f"<!-- report:{name} -->\n<!-- /report:{name} -->\n",
                 Outputs(tmp_path / "outputs", multirun, tmp_path / "figures", full=False))
    rows = [line for line in block.splitlines() if line.startswith("| `")]
    assert rows == ["| `trainer.nll_beta=0` (the ELBO) | 3 | **5.100** | 6.500 / 3.700 | 60.0 / 61.0 | 0.0% / 10.0% "
                    "| +3.00 / +0.00 | 10% / 20% | 0.0012 / 0.1600 | 1.60 / 7.70 | none |",
                    "| `trainer.nll_beta=0.5`" + (", `nll_beta_target=loc`" if target == "loc" else "") + " | 3 | **3.200** | 3.200 | 60.0 | 0.0% | +0.00 | 30% | 0.0012 / 0.1600 "
                    "| 1.60 / 7.70 | none |"]
    figure = "gaussian_pixel_beta_0.5" + ("_loc" if target == "loc" else "")
    assert f"![{figure}: E[x|t]](likelihoods_{figure}_samples.png)" in block


def test_an_evaluation_whose_run_is_not_found_is_not_given_a_label(tmp_path):
    """An evaluation names its run by a path relative to where it ran; read from elsewhere, the run's
    overrides (its label and seed) are not found, and the block says so instead of filing it under 'default'."""
    evaluations = tmp_path / "multirun" / "likelihoods_beta_samples" / "0"
    evaluations.mkdir(parents=True)
    (evaluations / "metrics.json").write_text(json.dumps({"run": "multirun/likelihoods_beta/0", "sample_confident_share": 0.2}))
    with pytest.raises(NotRun, match="multirun/likelihoods_beta/0"):
        run_evaluations(evaluations.parent)


def test_generation_block_gives_the_classifiers_judgement_of_the_samples(tmp_path):
    directory = tmp_path / "multirun" / "uses" / "generate"
    directory.mkdir(parents=True)
    (directory / "samples.png").write_bytes(b"")
    (directory / "metrics.json").write_text(json.dumps({
        "classifier_test_accuracy": 0.983, "test_confident_share": 0.957, "scored_samples": 1000,
        "sample_confident_share": 0.49, "sample_confident_classes": [51, 31, 36, 51, 32, 44, 26, 64, 89, 66],
        "confidence_threshold": 0.9}))
    block = fill("<!-- report:generation -->\n<!-- /report:generation -->\n",
                 Outputs(tmp_path / "outputs", tmp_path / "multirun", tmp_path / "figures", full=False))
    assert ("A small digit classifier (test accuracy 98.3%) is confident (p > 0.9) on **49.0%** of 1,000 decoded prior "
            "samples, against 95.7% of the real test digits; the confident samples fall in 10 of the 10 classes "
            "(from 26 to 89 samples each).") in block


def test_likelihood_pixels_block_compares_background_and_edges(tmp_path):
    run = tmp_path / "multirun" / "likelihoods" / "0"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model.likelihood=gaussian", "model.scale=pixel",
                                                                   "seed=0"]))
    job = tmp_path / "multirun" / "likelihoods_pixels" / "0"
    job.mkdir(parents=True)
    group = lambda share, bits, scale: {"share_of_pixels": share, "bits_per_pixel": bits, "share_of_bits": 0.5,  # noqa: E731
                                        "median_scale": scale, "at_floor": 0.115, "mean_gradient_weight": 1 / scale**2}
    (job / "metrics.json").write_text(json.dumps({"run": str(run), "num_images": 1000, "bits_per_dim": 3.287, "groups": {
        "background": group(0.821, 2.033, 0.001), "edge": group(0.173, 9.035, 0.4), "ink": group(0.006, 9.448, 0.45)}}))
    block = fill("<!-- report:likelihood_pixels -->\n<!-- /report:likelihood_pixels -->\n",
                 Outputs(tmp_path / "outputs", tmp_path / "multirun", tmp_path / "figures", full=False))
    assert "background (level 0) is 82.1% of the pixels, edge (1 to 254) 17.3%, ink (255) 0.6%." in block
    assert "| `gaussian` | `pixel` | 3.287 | 2.03 | 9.04 | 9.45 | 0.0010 / 0.4000 | 11.5% | 1.6e+05 |" in block


@pytest.mark.parametrize("name", ["one_hour_gray", "one_hour_gaussian", "one_hour_gaussian_loc"])
def test_one_hour_gray_block_gives_each_seed_and_the_k5000_bits_per_dim(name, tmp_path):
    sweep = tmp_path / "multirun" / name
    for seed, bits in ((0, 1.31), (1, 1.33)):
        fake_job(sweep / str(seed), [f"seed={seed}", f"experiment={name}"], [-900, -800, -790])
        lines = [json.loads(line) for line in (sweep / str(seed) / "metrics.jsonl").read_text().splitlines()]
        for m in lines:
            m["test_bits_per_dim"] = bits + {0: 1, 1: 0.1, 2: 0}[m["epoch"]]
        (sweep / str(seed) / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    nll = tmp_path / "outputs" / f"{name}_likelihood"
    nll.mkdir(parents=True)
    (nll / "metrics.json").write_text(json.dumps({"num_particles": 5000, "num_images": 1000, "whole_split_bits_per_dim": 1.2912,
                                                  "whole_split_bits_per_dim_standard_error": 0.0021}))
    outputs = Outputs(tmp_path / "outputs", tmp_path / "multirun", tmp_path / "figures", full=False)
    block = fill(f"<!-- report:{name} -->\n<!-- /report:{name} -->\n", outputs)
    assert "| test bits/dim, ELBO after each seed's last epoch (2 / 2 epochs, 0 min 20 s / 0 min 20 s) | 1.310 / 1.330 |" in block
    assert "| seed 0's test bits/dim (ELBO) after epochs 1 / 2 | 1.410 / 1.310 |" in block
    assert "| seeds that failed or diverged | none |" in block
    assert "1,000 random images | **1.291 ± 0.002** |" in block and "| RealNVP (Dinh et al. 2017), test bits/dim | 1.06 |" in block
    assert "confident" not in block  # no samples evaluated yet

    samples = tmp_path / "outputs" / f"{name}_samples"
    samples.mkdir(parents=True)
    (samples / "metrics.json").write_text(json.dumps({"confidence_threshold": 0.9, "sample_confident_share": 0.414,
                                                      "test_confident_share": 0.957}))
    for kind in ("samples", "samples_drawn"):
        (samples / f"{kind}.png").write_bytes(b"png of " + kind.encode())
    block = fill(f"<!-- report:{name} -->\n<!-- /report:{name} -->\n", outputs)
    assert "classifier is confident about (p > 0.9), against real test digits | 41% / 96% |" in block
    assert f"![{name}: x ~ p(x|t)]({name}_samples_drawn.png)" in block
    assert (tmp_path / "figures" / f"{name}_samples_drawn.png").read_bytes() == b"png of samples_drawn"


def test_levers_table_ranks_the_runs_by_their_test_nll_and_says_which_are_not_evaluated(tmp_path):
    sweep, evaluations = tmp_path / "multirun" / "levers", tmp_path / "multirun" / "levers_likelihood"
    runs = {"0": ("reparam", 0, -95.0, 86.0), "1": ("reparam", 2, -94.0, 85.5), "2": ("iwae", 0, -97.0, None)}
    for job, (estimator, flows, elbo, nll) in runs.items():
        fake_job(sweep / job, [f"estimator={estimator}", f"model.flows={flows}", "experiment=levers"], [-540.0, elbo])
        lines = [{**json.loads(line), "test_kl": 25.0} for line in (sweep / job / "metrics.jsonl").read_text().splitlines()]
        (sweep / job / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
        if nll is not None:
            (evaluations / job).mkdir(parents=True)
            (evaluations / job / "metrics.json").write_text(json.dumps(
                {"run": str(sweep / job), "whole_split_nll": nll, "whole_split_nll_standard_error": 0.05}))
    block = fill("<!-- report:levers -->\n<!-- /report:levers -->\n",
                 Outputs(tmp_path / "outputs", tmp_path / "multirun", tmp_path / "figures", full=False))
    rows = [line for line in block.splitlines() if line.startswith("| `")]
    assert rows[:2] == ["| `reparam` | 2 | 1 | 0 min 10 s | -94.00 | 25.0 | **85.50 ± 0.05** |",
                        "| `reparam` | 0 | 1 | 0 min 10 s | -95.00 | 25.0 | **86.00 ± 0.05** |"]
    assert rows[2].startswith("| `iwae` | 0 | 1 |") and "not evaluated yet" in rows[2]


def fake_lever_sweep(tmp_path, name, runs, kl, standard_error):
    """multirun/NAME and multirun/NAME_likelihood as `experiment=NAME` leaves them: one job per entry
    of `runs` ({job: (overrides, last test ELBO, test NLL)}), each run's test KL `kl`."""
    sweep, evaluations = tmp_path / "multirun" / name, tmp_path / "multirun" / f"{name}_likelihood"
    for job, (overrides, elbo, nll) in runs.items():
        fake_job(sweep / job, [*overrides, f"experiment={name}"], [-540.0, elbo])
        lines = [{**json.loads(line), "test_kl": kl} for line in (sweep / job / "metrics.jsonl").read_text().splitlines()]
        (sweep / job / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
        (evaluations / job).mkdir(parents=True)
        (evaluations / job / "metrics.json").write_text(json.dumps(
            {"run": str(sweep / job), "whole_split_nll": nll, "whole_split_nll_standard_error": standard_error}))


def test_lever_tables_name_each_runs_options_and_the_best_one_hour_block_its_nll(tmp_path):
    fake_lever_sweep(tmp_path, "levers_training", {
        "0": (["model.residual_blocks=0", "model.latent_dim=16"], -93.0, 87.0),
        "1": (["model.residual_blocks=1", "model.latent_dim=32", "trainer.kl_warmup_epochs=3"], -92.0, 86.2)}, 25.0, 0.05)
    out = Outputs(tmp_path / "outputs", tmp_path / "multirun", tmp_path / "figures", full=False)
    block = fill("<!-- report:levers_training -->\n<!-- /report:levers_training -->\n", out)
    rows = [line for line in block.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert rows == ["| 1 | 32 | 3 | 1 | 0 min 10 s | -92.00 | 25.0 | **86.20 ± 0.05** |",
                    "| 0 | 16 | 0 | 1 | 0 min 10 s | -93.00 | 25.0 | **87.00 ± 0.05** |"]
    assert "_Not run yet: `python train.py -m experiment=levers_bf16`._" in fill(
        "<!-- report:levers_bf16 -->\n<!-- /report:levers_bf16 -->\n", out)
    assert "_Not run yet: `python train.py -m experiment=levers_schedule`._" in fill(
        "<!-- report:levers_schedule -->\n<!-- /report:levers_schedule -->\n", out)
    assert "_Not run yet: `python train.py experiment=best_one_hour`._" in fill(
        "<!-- report:best_one_hour -->\n<!-- /report:best_one_hour -->\n", out)
    fake_job(out.run("best_one_hour"), ["experiment=best_one_hour"], [-540.0, -90.5])
    (out.run("best_one_hour_likelihood")).mkdir(parents=True)
    (out.run("best_one_hour_likelihood") / "metrics.json").write_text(json.dumps(
        {"num_particles": 5000, "num_images": 1000, "whole_split_nll": 84.321, "whole_split_nll_standard_error": 0.04,
         "nll": 84.2, "nll_standard_error": 0.3, "whole_split_particles": 100, "whole_split_images": 10000,
         "whole_split_elbo": -88.0, "whole_split_nll_with_whole_split_particles": 85.1}))
    block = fill("<!-- report:best_one_hour -->\n<!-- /report:best_one_hour -->\n", out)
    assert "| ELBO after epoch 1 (0 min 10 s of training), one t per image | -90.50 |" in block
    assert "| **NLL, IW bound with K=100 on every image** | **85.10** |" in block
    assert "1,000 random images | **84.32 ± 0.04** |" in block and "| IWAE, two stochastic layers, k=50 (Burda et al. 2016) | 82.90 |" in block


def test_the_bf16_lever_table_names_each_runs_layers(tmp_path):
    fake_lever_sweep(tmp_path, "levers_bf16", {"0": (["trainer.bf16=false"], -91.0, 85.9),
                                               "1": (["trainer.bf16=true"], -90.5, 85.6)}, 26.0, 0.09)
    out = Outputs(tmp_path / "outputs", tmp_path / "multirun", tmp_path / "figures", full=False)
    block = fill("<!-- report:levers_bf16 -->\n<!-- /report:levers_bf16 -->\n", out)
    assert "| bfloat16 layers (`trainer.bf16`) | epochs in the budget |" in block
    rows = [line for line in block.splitlines() if line.startswith("| `")]
    assert rows == ["| `true` | 1 | 0 min 10 s | -90.50 | 26.0 | **85.60 ± 0.09** |",
                    "| `false` | 1 | 0 min 10 s | -91.00 | 26.0 | **85.90 ± 0.09** |"]


def test_the_best_one_hour_iwae_block_sets_the_two_forks_side_by_side(tmp_path):
    out = Outputs(tmp_path / "outputs", tmp_path / "multirun", tmp_path / "figures", full=False)
    empty = "<!-- report:best_one_hour_iwae -->\n<!-- /report:best_one_hour_iwae -->\n"
    assert "_Not run yet: `python train.py experiment=best_one_hour`._" in fill(empty, out)
    for name, elbos, nll in (("best_one_hour", [-540.0, -88.4], 83.51), ("best_one_hour_iwae", [-540.0, -89.0, -89.2], 82.87)):
        fake_job(out.run(name), ["experiment=best_one_hour"], elbos)
        (out.run(f"{name}_likelihood")).mkdir(parents=True)
        (out.run(f"{name}_likelihood") / "metrics.json").write_text(json.dumps(
            {"num_particles": 5000, "num_images": 1000, "whole_split_nll": nll, "whole_split_nll_standard_error": 0.06,
             "whole_split_particles": 100, "whole_split_images": 10000, "whole_split_nll_with_whole_split_particles": nll + 0.7}))
        if name == "best_one_hour":
            assert "_Not run yet: `python train.py resume=outputs/experiments/best_one_hour_iwae estimator=iwae" in fill(empty, out)
    block = fill(empty, out)
    assert "| last 20 minutes trained | on the ELBO | on the IW bound, K=5 |" in block
    assert "| epochs | 1 | 2 |" in block and "| test ELBO after the last epoch (nats) | -88.40 | -89.20 |" in block
    assert "| NLL, IW bound with K=100 on every image | **84.21** | **83.57** |" in block
    assert "1,000 random images | **83.51 ± 0.06** | **82.87 ± 0.06** |" in block


def test_the_data_parallel_block_sets_the_two_runs_side_by_side(tmp_path):
    out = Outputs(tmp_path / "outputs", tmp_path / "multirun", tmp_path / "figures", full=False)
    empty = "<!-- report:data_parallel -->\n<!-- /report:data_parallel -->\n"
    assert "_Not run yet: `python train.py experiment=data_parallel`._" in fill(empty, out)
    for name, seconds in (("data_parallel", [41.0, 39.7]), ("data_parallel_2ranks", [52.9, 49.6])):
        run = out.run(name)
        run.mkdir(parents=True)
        lines = [{"epoch": 0, "test_elbo": -540.0}] + [{"epoch": e + 1, "seconds": s, "test_elbo": -101.0 - e}
                                                     for e, s in enumerate(seconds)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    block = fill(empty, out)
    assert "| 1 process, 2 threads | 41.0 / 39.7 | -102.00 |" in block
    assert "| 2 ranks (torchrun), 1 thread each | 52.9 / 49.6 | -102.00 |" in block
