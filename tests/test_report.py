"""report.py and vae/results.py: the numbers each report block computes from fake outputs (medians at
the epoch every seed reached, each seed's value, the worst rise, the failed seeds, the order of the
rows, the spread and the standard errors), checked against the same numbers worked out here from
the fake inputs; one formatting check per table; and `python report.py` filling copies of README.md
and docs/results.md from a fake outputs tree, the README's tables read back cell by cell."""
from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import PROJECT_DIR
from omegaconf import OmegaConf

from report import report
from vae.report.common import NotRun, Outputs, failed_seeds, run_evaluations, sweep_progress
from vae.report.estimators import estimator_numbers
from vae.report.levers import lever_rows
from vae.report.likelihoods import beta_rows, likelihood_rows
from vae.results import BLOCK, fill
from vae.sweeps import nats, plot, read_jobs, summarize


def fake_job(job_dir: Path, overrides: list[str], test_elbos: list[float | None], failed: str | None = None,
             **columns) -> Path:
    """A job directory as train.py leaves it: its overrides and one metrics line per epoch from 0,
    wall time 10 s per epoch; each keyword is a further column, a list (one value per epoch) or one
    value for every epoch; `failed`: the message of a failed.json (the job stopped with an error)."""
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    lines = [{"epoch": e, "test_elbo": v, "wall_time": 10.0 * e} for e, v in enumerate(test_elbos)]
    for key, values in columns.items():
        for e, line in enumerate(lines):
            line[key] = values[e] if isinstance(values, list) else values
    (job_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    if failed is not None:
        (job_dir / "failed.json").write_text(json.dumps({"error": "TrainingDiverged", "message": failed}))
    return job_dir


def outputs(tmp_path: Path, full: bool = False) -> Outputs:
    return Outputs(tmp_path / "outputs", tmp_path / "multirun", tmp_path / "figures", full=full)


def block_of(text: str, name: str) -> str:
    """The contents of the report block NAME in a document."""
    return re.search(rf"<!-- report:{name} -->\n(.*?)<!-- /report:{name} -->", text, re.DOTALL).group(1)


def table_rows(text: str) -> list[list[str]]:
    """The cells of each body row of the first Markdown table in `text`, bold and code marks removed."""
    lines = [line for line in text.splitlines() if line.startswith("| ")][1:]  # past the header
    return [[cell.strip().strip("*`") for cell in line.strip("|").split(" | ")] for line in lines
            if not line.startswith("| ---")]


def numbers(cell: str) -> list[float]:
    """Every number in a cell ("-101.00 / -99.00", "**85.80 ± 0.08**", "90.2%")."""
    return [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?(?:e[+-]\d+)?", cell)]


# --- report.py sweep=...: a multirun over seeds ---------------------------------------------------

def test_report_takes_the_median_mean_and_sample_sd_over_seeds(tmp_path):
    """The sweep table's row: the seeds' median (here the middle seed, not the first), their mean and
    the sample standard deviation (n - 1), at the last epoch every seed reached."""
    elbos = {0: -100.0, 1: -96.0, 2: -110.0}
    for job, seed in (("0", 2), ("1", 0), ("2", 1)):
        fake_job(tmp_path / job, ["estimator=reparam", f"seed={seed}"], [-500, -120, elbos[seed]])
    fake_job(tmp_path / "3", ["estimator=score", "seed=0"], [-500, -200, -150, -140])  # one seed, one epoch further
    rows = {row["configuration"]: row for row in report(tmp_path)}
    reparam, values = rows["estimator=reparam"], [elbos[0], elbos[1], elbos[2]]
    mean = sum(values) / 3
    assert reparam["seeds"] == 3 and reparam["epoch"] == 2 and reparam["test_elbo_seeds"] == values  # seed order
    assert reparam["test_elbo_median"] == -100.0
    assert reparam["test_elbo_mean"] == pytest.approx(mean)
    assert reparam["test_elbo_spread"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 2))
    assert reparam["curve"]["wall_time"] == [0, 10, 20]
    assert rows["estimator=score"]["epoch"] == 3 and rows["estimator=score"]["test_elbo_spread"] == 0
    assert [row["configuration"] for row in json.loads((tmp_path / "report.json").read_text())["configurations"]] == [
        "estimator=reparam", "estimator=score"]  # best median first
    table = (tmp_path / "report.md").read_text()  # the sweep table's format
    assert "| `estimator=reparam` | 3 | 2 | -102.00 ± 7.21 | -100.00 | -100.00 / -96.00 / -110.00 | 20 |" in table
    assert (tmp_path / "report.png").stat().st_size > 0


def test_report_median_and_range_show_the_seeds_that_learn_beside_one_that_diverges(tmp_path):
    fake_job(tmp_path / "10", ["estimator=score_nn_baseline", "seed=2"], [-500, -130, -122])
    fake_job(tmp_path / "9", ["estimator=score_nn_baseline", "seed=0"], [-500, -4e3, -1.3e9])
    fake_job(tmp_path / "more" / "0", ["estimator=score_nn_baseline", "seed=1"], [-500, -127, -115])  # nested
    (row,) = report(tmp_path)
    assert row["seeds"] == 3 and row["test_elbo_seeds"] == [-1.3e9, -115, -122]  # seed order, not directory order
    assert row["test_elbo_median"] == -122
    assert row["curve"]["worst"] == [-500, -4e3, -1.3e9] and row["curve"]["best"] == [-500, -127, -115]
    assert json.loads((tmp_path / "report.json").read_text())["configurations"][0]["test_elbo_median"] == -122
    assert nats(-1.3e9) == "-1.30e+09" and nats(-122) == "-122.00"  # a diverged value in three digits
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


def test_report_of_a_missing_sweep_is_one_line_and_creates_nothing(tmp_path):
    result = subprocess.run([sys.executable, "report.py", f"sweep={tmp_path / 'nowhere'}"], cwd=PROJECT_DIR,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: no such directory: {tmp_path / 'nowhere'}"
    assert not (tmp_path / "nowhere").exists()


# --- the estimators -------------------------------------------------------------------------------

# The fake experiment=estimators/train: {job directory: (estimator, seed, test ELBO per epoch, test KL per
# epoch, failed)}, directories in neither the table's order nor the medians' order.
ESTIMATOR_JOBS = {
    "0": ("score_loo", 0, [-500, -120, -105, -100.4], [2, 20, 22, 23], None),
    "1": ("iwae", 0, [-500, -98], [2, 19], None),  # not in ESTIMATOR_ORDER: last
    "2": ("score", 0, [-500, -900, -400, -300], [2, 30, 31, 32], None),
    "3": ("score", 1, [-500, -2000, -4000], [2, 40, 41], "loss is nan at epoch 3"),  # diverged in epoch 3
    "4": ("score", 2, [-500, -700, -600, -250], [2, 50, 51, 52], None),
    "5": ("reparam", 2, [-500, -108, -103, -96.0], [2, 18, 20, 21], None),
    "6": ("reparam", 0, [-500, -110, -104, -101.0, -90.0], [2, 19, 21, 24, 30], None),  # one epoch further
    "7": ("reparam", 1, [-500, -112, -95.5, -99.0], [2, 20, 22, 25], None),  # its best epoch is not its last
}


def fake_estimators(sweep: Path) -> None:
    for job, (estimator, seed, elbos, kls, failed) in ESTIMATOR_JOBS.items():
        fake_job(sweep / job, [f"estimator={estimator}", f"seed={seed}", "experiment=estimators/train"], elbos, failed,
                 test_kl=kls)


def test_estimator_rows_are_the_seeds_at_the_epoch_all_reached_in_the_estimators_order(tmp_path):
    """Each estimator's row at the last epoch all its seeds reached (a seed that trained further, a
    seed that diverged earlier): the median, mean and sample sd of the seeds' test ELBOs there, each
    seed's best test ELBO up to there and its KL there; a diverged seed counts; rows in ESTIMATOR_ORDER."""
    fake_estimators(tmp_path / "estimators")
    rows = estimator_numbers(read_jobs(tmp_path / "estimators"))
    assert [row["configuration"] for row in rows] == ["estimator=reparam", "estimator=score", "estimator=score_loo",
                                                      "estimator=iwae"]
    for row in rows:
        estimator = row["configuration"].removeprefix("estimator=")
        seeds = sorted((seed, elbos, kls) for name, seed, elbos, kls, _ in ESTIMATOR_JOBS.values() if name == estimator)
        common = min(len(elbos) for _, elbos, _ in seeds) - 1  # epochs count from 0
        at = [elbos[common] for _, elbos, _ in seeds]
        mean = sum(at) / len(at)
        assert row["seeds"] == len(seeds) and row["epoch"] == common
        assert row["test_elbo_seeds"] == at
        assert row["test_elbo_median"] == sorted(at)[len(at) // 2]  # an odd number of seeds each
        assert row["test_elbo_mean"] == pytest.approx(mean)
        assert row["test_elbo_spread"] == pytest.approx(
            math.sqrt(sum((v - mean) ** 2 for v in at) / (len(at) - 1)) if len(at) > 1 else 0.0)
        assert row["test_elbo_best_seeds"] == [max(elbos[:common + 1]) for _, elbos, _ in seeds]
        assert row["test_kl_seeds"] == [kls[common] for _, _, kls in seeds]
    reparam, score = rows[0], rows[1]  # the same, written out
    assert reparam["epoch"] == 3 and reparam["test_elbo_median"] == -99.0  # seed 1's; the mean is -98.67
    assert reparam["test_elbo_best_seeds"] == [-101.0, -95.5, -96.0] and reparam["test_kl_seeds"] == [24, 25, 21]
    assert score["seeds"] == 3 and score["epoch"] == 2 and score["test_elbo_median"] == -600  # with the diverged seed
    assert failed_seeds(tmp_path / "estimators") == {"estimator=score": [1]}


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


def test_a_job_with_a_time_budget_is_done_when_another_epoch_would_not_fit(tmp_path):
    """Epochs of 10 s under a budget of 25 s: after two (20 s) a third would end past it, the job is done;
    after one, a second fits: in progress. A run from before that rule is done once it has reached its budget."""
    sweep = tmp_path / "bound_and_posterior"
    fake_job(sweep / "0", ["estimator=reparam"], [-500, -110, -100], seconds=10.0)  # wall_time 20 s after epoch 2
    fake_job(sweep / "1", ["estimator=iwae"], [-500, -120], seconds=10.0)  # 10 s
    fake_job(sweep / "2", ["estimator=dreg"], [-500, -120, -110, -105])  # 30 s, no seconds recorded
    for job in ("0", "1", "2"):
        OmegaConf.save(OmegaConf.create({"trainer": {"epochs": 1000, "max_minutes": 25 / 60}}), sweep / job / ".hydra" / "config.yaml")
    assert sweep_progress(sweep).strip().startswith("**In progress:** 2 of 3 jobs")


# --- likelihoods of gray levels -------------------------------------------------------------------

# The fake experiment=likelihoods/train: {job: (likelihood, seed, test bits/dim per epoch (None: not
# recorded), failed)}; test KL 30 + seed + epoch, scale at the floor (the Gaussian's) 0.01 (seed + 1) + 0.001 epoch.
LIKELIHOOD_JOBS = {
    "0": ("discretized_logistic_mixture", 0, [5.0, 2.5, 2.2], None),
    "1": ("gaussian", 0, [9.0, 4.1, 3.8, 3.5], None),
    "2": ("gaussian", 1, [9.0, 3.7], "loss is nan at epoch 2"),  # its last common epoch is 1
    "3": ("gaussian", 2, [9.0, 3.95, 3.6, 3.4], None),
    "4": ("discretized_logistic", 0, [5.0, 1.7, 1.52], None),
    "5": ("discretized_logistic", 1, [5.0, 1.6, 1.49], None),
    "6": ("discretized_logistic", 2, [5.0, 1.55, 1.50], None),
    "7": ("bernoulli", 0, None, None),  # no bits/dim: no row
}

# The overrides that name a run's (likelihood, scale): the config group likelihood=, and the string
# options of the runs made before it (model.likelihood, model.scale), which the report reads alike.
LIKELIHOOD_KEYS = {"group": ("likelihood", "likelihood.scale"), "before_the_group": ("model.likelihood", "model.scale")}


@pytest.mark.parametrize("keys", LIKELIHOOD_KEYS)
def test_likelihood_rows_take_the_median_bits_per_dim_at_the_common_epoch_best_first(keys, tmp_path):
    """docs' likelihoods block: one row per (likelihood, scale), its seeds at the last epoch they all
    reached (a diverged seed ends the others' earlier), the median over seeds, each seed's bits/dim,
    KL and share at the scale's floor there, the failed seeds; lowest median first. The same from a
    sweep made before the likelihood group (model.likelihood=..., model.scale=...)."""
    likelihood_key, scale_key = LIKELIHOOD_KEYS[keys]
    sweep, samples = tmp_path / "multirun" / "likelihoods", tmp_path / "multirun" / "likelihoods_samples"
    for job, (name, seed, bits, failed) in LIKELIHOOD_JOBS.items():
        epochs = range(len(bits or [0, 0]))
        columns = {"test_kl": [30.0 + seed + e for e in epochs]}
        if bits is not None:
            columns["test_bits_per_dim"] = bits
        if name == "gaussian":
            columns["test_scale_at_floor"] = [0.01 * (seed + 1) + 0.001 * e for e in epochs]
        fake_job(sweep / job, [f"{likelihood_key}={name}", f"{scale_key}=pixel", f"seed={seed}", "experiment=likelihoods/train"],
                 [-900.0] * len(epochs), failed, **columns)
        if job in ("1", "2", "4"):  # the generate evaluations of some of the runs
            (samples / job).mkdir(parents=True)
            (samples / job / "metrics.json").write_text(json.dumps({"run": str(sweep / job),
                                                                    "sample_confident_share": 0.1 * int(job)}))
            for picture in ("samples.png", "samples_drawn.png"):
                (samples / job / picture).write_bytes(b"png")
    rows = likelihood_rows(read_jobs(sweep), failed_seeds(sweep))
    assert [row["options"][0] for row in rows] == ["discretized_logistic", "discretized_logistic_mixture", "gaussian"]
    for row in rows:
        seeds = sorted((seed, bits, failed) for name, seed, bits, failed in LIKELIHOOD_JOBS.values()
                       if name == row["options"][0])
        common = min(len(bits) for _, bits, _ in seeds) - 1
        at = [bits[common] for _, bits, _ in seeds]
        assert row["options"] == (row["options"][0], "pixel") and row["epoch"] == common and row["bits"] == at
        assert row["median"] == sorted(at)[len(at) // 2]  # an odd number of seeds each
        assert row["kl"] == [30.0 + seed + common for seed, _, _ in seeds]
        assert row["failed"] == [seed for seed, _, failed in seeds if failed]
    discretized, _, gaussian = rows
    assert gaussian["epoch"] == 1 and gaussian["median"] == 3.95 and gaussian["failed"] == [1]  # seed 2's, with seed 1
    assert gaussian["at_floor"] == pytest.approx([0.011, 0.021, 0.031]) and discretized["at_floor"] is None
    assert discretized["median"] == 1.50 and discretized["failed"] == []

    block = fill("<!-- report:likelihoods -->\n<!-- /report:likelihoods -->\n", outputs(tmp_path))  # the format
    assert ("| `gaussian` | `pixel` | 1 | **3.950** | 4.100 / 3.700 / 3.950 | 31.0 / 32.0 / 33.0 | 1.1% / 2.1% / 3.1% "
            "| 10% / 20% | seed 1 |") in block
    assert "![gaussian_pixel: E[x|t]](likelihoods_gaussian_pixel_samples.png)" in block  # seed 0's grids
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        f"likelihoods_{name}_{kind}.png" for name in ("discretized_logistic_pixel", "gaussian_pixel")
        for kind in ("samples", "samples_drawn")]


# The fake experiment=beta_nll/train: {job: (trainer.nll_beta, seed, test bits/dim per epoch, failed)}.
BETA_JOBS = {
    "0": (1, 0, [9.0, 4.3, 4.35, 4.2, 4.25], None),
    "1": (0, 0, [9.0, 4.0, 5.5, 5.0, 5.2, 12.0], None),  # worst rise +1.5 in epoch 2; +6.8 after the common epoch
    "2": (0, 1, [9.0, 4.2, 4.0, 3.9, 3.8], None),  # only falls
    "3": (0, 2, [9.0, 4.5, 4.4, 4.6, 4.1], None),  # worst rise +0.2, not in its last epoch
    "4": (0.5, 0, [9.0, 4.0, 3.6, 3.4, 3.3], None),
    "5": (0.5, 1, [9.0, 4.1, 3.9], "loss is nan at epoch 3"),
}


def test_beta_rows_give_the_median_and_each_seeds_worst_rise_in_the_order_of_beta(tmp_path):
    """docs' beta-NLL blocks: a row per trainer.nll_beta, smallest first; at the last epoch all its
    seeds reached, the median bits/dim and each seed's; each seed's largest rise of bits/dim from one
    epoch to the next up to there (not its last step, not past the common epoch); the failed seeds."""
    sweep = tmp_path / "multirun" / "beta_nll"
    for job, (beta, seed, bits, failed) in BETA_JOBS.items():
        fake_job(sweep / job, [f"trainer.nll_beta={beta}", f"seed={seed}", "experiment=beta_nll/train"],
                 [-900.0] * len(bits), failed, test_bits_per_dim=bits, test_kl=60.0 + seed, test_scale_at_floor=0.1 * seed)
    rows = beta_rows(read_jobs(sweep), failed_seeds(sweep))
    assert [row["beta"] for row in rows] == [0, 0.5, 1]
    for row in rows:
        seeds = sorted((seed, bits, failed) for beta, seed, bits, failed in BETA_JOBS.values() if beta == row["beta"])
        common = min(len(bits) for _, bits, _ in seeds) - 1
        at = [bits[common] for _, bits, _ in seeds]
        assert row["epoch"] == common and row["bits"] == at and row["median"] == pytest.approx(statistics.median(at))
        rises = [max([0.0, *(bits[e] - bits[e - 1] for e in range(2, common + 1))]) for _, bits, _ in seeds]  # from epoch 1
        assert row["largest_rise"] == pytest.approx(rises)
        assert row["kl"] == [60.0 + seed for seed, _, _ in seeds] and row["at_floor"] == [0.1 * seed for seed, _, _ in seeds]
        assert row["failed"] == [seed for seed, _, failed in seeds if failed]
    elbo, half, one = rows
    assert elbo["epoch"] == 4 and elbo["median"] == 4.1 and elbo["largest_rise"] == pytest.approx([1.5, 0.0, 0.2])
    assert half["epoch"] == 2 and half["median"] == pytest.approx(3.75) and half["failed"] == [1]
    assert one["largest_rise"] == pytest.approx([0.05]) and one["failed"] == []


@pytest.mark.parametrize("name, target", [("beta_nll", "both"), ("beta_nll_loc", "loc")])
def test_likelihoods_beta_block_names_the_target_the_samples_and_seed_0s_scales(name, target, tmp_path):
    """The beta-NLL blocks' format: the row names beta (and the target of its weight when not both),
    the seeds' samples' confident shares, seed 0's scales and bits per pixel, and its sample grids."""
    sweep, multirun = tmp_path / "multirun" / name, tmp_path / "multirun"
    jobs = {"0": (0, 0, [9.0, 5.0, 3.5, 6.5]), "1": (0, 1, [9.0, 4.0, 3.8, 3.7]), "2": (0.5, 0, [9.0, 4.0, 3.4, 3.2])}
    for job, (beta, seed, bits) in jobs.items():
        fake_job(sweep / job, [f"trainer.nll_beta={beta}", f"seed={seed}", f"experiment={name}"], [-900] * len(bits),
                 test_bits_per_dim=bits, test_kl=60.0 + seed, test_scale_at_floor=0.1 * seed)
        for kind, metrics in (("samples", {"sample_confident_share": 0.1 * (int(job) + 1)}), ("pixels", {"groups": {
                "background": {"median_scale": 0.0012, "bits_per_pixel": 1.6}, "edge": {"median_scale": 0.16, "bits_per_pixel": 7.7}}})):
            (multirun / f"{name}_{kind}" / job).mkdir(parents=True)
            (multirun / f"{name}_{kind}" / job / "metrics.json").write_text(json.dumps({"run": str(sweep / job), **metrics}))
        for picture in ("samples.png", "samples_drawn.png"):
            (multirun / f"{name}_samples" / job / picture).write_bytes(b"png")
    block = fill(f"<!-- report:{name} -->\n<!-- /report:{name} -->\n", outputs(tmp_path))
    rows = [line for line in block.splitlines() if line.startswith("| `")]
    assert rows[0] == ("| `trainer.nll_beta=0` (the ELBO) | 3 | **5.100** | 6.500 / 3.700 | 60.0 / 61.0 | 0.0% / 10.0% "
                       "| +3.00 / +0.00 | 10% / 20% | 0.0012 / 0.1600 | 1.60 / 7.70 | none |")
    assert rows[1].startswith("| `trainer.nll_beta=0.5`" + (", `nll_beta_target=loc`" if target == "loc" else "") + " | 3 |")
    figure = "gaussian_pixel_beta_0.5" + ("_loc" if target == "loc" else "")
    assert f"![{figure}: E[x|t]](likelihoods_{figure}_samples.png)" in block


def test_an_evaluation_whose_run_is_not_found_is_not_given_a_label(tmp_path):
    """An evaluation names its run by a path relative to where it ran; read from elsewhere, the run's
    overrides (its label and seed) are not found, and the block says so instead of filing it under 'default'."""
    evaluations = tmp_path / "multirun" / "beta_nll_samples" / "0"
    evaluations.mkdir(parents=True)
    (evaluations / "metrics.json").write_text(json.dumps({"run": "multirun/likelihoods_beta/0", "sample_confident_share": 0.2}))
    with pytest.raises(NotRun, match="multirun/likelihoods_beta/0"):
        run_evaluations(evaluations.parent)


@pytest.mark.parametrize("keys", LIKELIHOOD_KEYS)
def test_likelihood_pixels_block_compares_background_and_edges(keys, tmp_path):
    likelihood_key, scale_key = LIKELIHOOD_KEYS[keys]
    run = tmp_path / "multirun" / "likelihoods" / "0"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"{likelihood_key}=gaussian", f"{scale_key}=pixel",
                                                                   "seed=0"]))
    job = tmp_path / "multirun" / "likelihoods_pixels" / "0"
    job.mkdir(parents=True)
    group = lambda share, bits, scale: {"share_of_pixels": share, "bits_per_pixel": bits, "share_of_bits": 0.5,  # noqa: E731
                                        "median_scale": scale, "at_floor": 0.115, "mean_gradient_weight": 1 / scale**2}
    (job / "metrics.json").write_text(json.dumps({"run": str(run), "num_images": 1000, "bits_per_dim": 3.287, "groups": {
        "background": group(0.821, 2.033, 0.001), "edge": group(0.173, 9.035, 0.4), "ink": group(0.006, 9.448, 0.45)}}))
    block = fill("<!-- report:likelihood_pixels -->\n<!-- /report:likelihood_pixels -->\n", outputs(tmp_path))
    assert "background (level 0) is 82.1% of the pixels, edge (1 to 254) 17.3%, ink (255) 0.6%." in block
    (row,) = table_rows(block)
    assert row[:6] == ["gaussian", "pixel", "3.287", "2.03", "9.04", "9.45"] and row[7] == "11.5%"
    assert float(row[8]) == pytest.approx((1 / 0.001**2) / (1 / 0.4**2), rel=1e-3)  # 1/scale^2: background over edge


@pytest.mark.parametrize("name", ["one_hour_logistic_mixture", "one_hour_gaussian", "one_hour_gaussian_loc"])
def test_one_hour_gray_block_gives_each_seed_and_the_k5000_bits_per_dim(name, tmp_path):
    sweep = tmp_path / "multirun" / name
    for seed, bits in ((0, 1.31), (1, 1.33)):
        fake_job(sweep / str(seed), [f"seed={seed}", f"experiment={name}"], [-900, -800, -790],
                 test_bits_per_dim=[bits + 1, bits + 0.1, bits])
    nll = tmp_path / "outputs" / f"{name}_likelihood"
    nll.mkdir(parents=True)
    (nll / "metrics.json").write_text(json.dumps({"num_particles": 5000, "num_images": 1000, "whole_split_bits_per_dim": 1.2912,
                                                  "whole_split_bits_per_dim_standard_error": 0.0021}))
    out = outputs(tmp_path)
    block = fill(f"<!-- report:{name} -->\n<!-- /report:{name} -->\n", out)
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
    block = fill(f"<!-- report:{name} -->\n<!-- /report:{name} -->\n", out)
    assert "classifier is confident about (p > 0.9), against real test digits | 41% / 96% |" in block
    assert f"![{name}: x ~ p(x|t)]({name}_samples_drawn.png)" in block
    assert (tmp_path / "figures" / f"{name}_samples_drawn.png").read_bytes() == b"png of samples_drawn"


# --- levers ---------------------------------------------------------------------------------------

def fake_lever_sweep(tmp_path, name, runs, kl, standard_error):
    """multirun/NAME and multirun/NAME_likelihood as `experiment=NAME` leaves them: one job per entry
    of `runs` ({job: (overrides, last test ELBO, test NLL or None: not evaluated)}), each run's test
    KL `kl`; each evaluation also holds a different `nll` and `nll_standard_error` (of the random
    images alone), which the tables do not show."""
    sweep, evaluations = tmp_path / "multirun" / name, tmp_path / "multirun" / f"{name}_likelihood"
    for job, (overrides, elbo, nll) in runs.items():
        fake_job(sweep / job, [*overrides, f"experiment={name}"], [-540.0, elbo], test_kl=kl)
        if nll is not None:
            (evaluations / job).mkdir(parents=True)
            (evaluations / job / "metrics.json").write_text(json.dumps(
                {"run": str(sweep / job), "whole_split_nll": nll, "whole_split_nll_standard_error": standard_error,
                 "nll": nll + 1.0, "nll_standard_error": 10 * standard_error}))


def test_lever_rows_rank_seed_0s_run_by_its_test_nll_and_put_those_not_evaluated_last(tmp_path):
    """Each configuration's seed 0 at its last tested epoch (an epoch without a test is not its last),
    its whole-split NLL and that NLL's standard error; best NLL first, runs not evaluated last."""
    sweep, evaluations = tmp_path / "multirun" / "bound_and_posterior", tmp_path / "multirun" / "bound_and_posterior_likelihood"
    runs = {"0": (["estimator=reparam", "posterior=gaussian", "seed=0"], [-540.0, -96.0, -95.0, None], [2, 24, 25, 26], 86.0),
            "1": (["estimator=reparam", "posterior=gaussian", "seed=1"], [-540.0, -93.0], [2, 20], None),  # seed 1: not shown
            "2": (["estimator=reparam", "posterior=iaf", "seed=0"], [-540.0, -94.0], [2, 27], 85.5),
            "3": (["estimator=iwae", "posterior=gaussian", "seed=0"], [-540.0, -97.0], [2, 28], None),
            "4": (["estimator=iwae", "posterior=iaf", "seed=0"], [-540.0, -93.5], [2, 29], 85.7)}
    for job, (overrides, elbos, kls, nll) in runs.items():
        fake_job(sweep / job, [*overrides, "experiment=bound_and_posterior/train"], elbos, test_kl=kls)
        if nll is not None:
            (evaluations / job).mkdir(parents=True)
            (evaluations / job / "metrics.json").write_text(json.dumps(
                {"run": str(sweep / job), "whole_split_nll": nll, "whole_split_nll_standard_error": nll / 1000,
                 "nll": nll + 1.0, "nll_standard_error": 0.3}))
    rows = lever_rows(read_jobs(sweep), run_evaluations(evaluations))
    jobs = [job for job in sorted(runs, key=lambda job: runs[job][3] or math.inf) if job != "1"]
    assert [row["options"] for row in rows] == [dict(o.split("=") for o in runs[job][0][:2]) for job in jobs]
    for row, job in zip(rows, jobs):
        _, elbos, kls, nll = runs[job]
        last = max(e for e, elbo in enumerate(elbos) if elbo is not None)
        assert (row["epoch"], row["wall_time"], row["test_elbo"], row["test_kl"]) == (last, 10.0 * last, elbos[last], kls[last])
        assert (row["nll"], row["nll_standard_error"]) == ((nll, nll / 1000) if nll is not None else (None, None))
    assert rows[0]["options"] == {"estimator": "reparam", "posterior": "iaf"} and rows[-1]["nll"] is None
    assert rows[2]["epoch"] == 2 and rows[2]["test_elbo"] == -95.0  # seed 0 of the Gaussian, at its last tested epoch


def test_levers_table_says_which_runs_are_not_evaluated(tmp_path):
    """The levers table's format: a row per run, best NLL first, the runs not evaluated saying so. The
    jobs here have the overrides of a sweep from before the posterior group (model.flows=F): they are
    read in today's options (vae/old_runs.py)."""
    fake_lever_sweep(tmp_path, "bound_and_posterior", {"0": (["estimator=reparam", "model.flows=0"], -95.0, 86.0),
                                          "1": (["estimator=reparam", "model.flows=2"], -94.0, 85.5),
                                          "2": (["estimator=iwae", "model.flows=0"], -97.0, None)}, 25.0, 0.05)
    block = fill("<!-- report:bound_and_posterior -->\n<!-- /report:bound_and_posterior -->\n", outputs(tmp_path))
    rows = [line for line in block.splitlines() if line.startswith("| `")]
    assert rows[0] == "| `reparam` | `iaf` | 1 | 0 min 10 s | -94.00 | 25.0 | **85.50 ± 0.05** |"
    assert rows[2].startswith("| `iwae` | `gaussian` | 1 |")
    assert "not evaluated yet: `python evaluate.py -m experiment=bound_and_posterior/likelihood`" in rows[2]


def test_the_pixel_costs_block_sets_each_models_bits_at_t_loc_against_its_elbos_reconstruction(tmp_path):
    """Seed 0 of each one-hour likelihood: its pixels evaluation and its last tested epoch; the reconstruction
    term is test bits/dim minus the KL in bits/dim (KL nats / (D ln 2)), the cost of a draw its excess over
    the bits at t_loc. Checked as numbers, row by row, in the order of the studies."""
    studies = {"one_hour_gaussian": ({"_target_": "vae.likelihoods.Gaussian"}, {"nll_beta": 0.25, "nll_beta_target": "both"},
                                     2.799, 0.137, 2.134, {"bits_per_pixel": 0.88, "at_floor": 0.62}),
               "one_hour_gaussian_loc": ({"_target_": "vae.likelihoods.Gaussian"}, {"nll_beta": 0.5, "nll_beta_target": "loc"},
                                         2.780, 0.119, 2.478, {"bits_per_pixel": 1.21, "at_floor": 0.0}),
               "one_hour_logistic_mixture": ({"_target_": "vae.likelihoods.DiscretizedLogisticMixture", "components": 5},
                                             {"nll_beta": 0}, 1.273, 0.072, 1.150, {"bits_per_pixel": 0.02})}
    out = outputs(tmp_path)
    empty = "<!-- report:pixel_costs -->\n<!-- /report:pixel_costs -->\n"
    for name, (likelihood, trainer, bits, kl_bits, pixel_bits, background) in studies.items():
        run = fake_job(out.sweep(name) / "0", ["seed=0"], [-900.0, -850.0, None],
                       test_bits_per_dim=[bits + 1, bits, None], test_kl=kl_bits * 784 * math.log(2))
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"likelihood": likelihood, "trainer": trainer}))
        assert f"_Not run yet: `python evaluate.py experiment={name}/pixels`._" in fill(empty, out)
        out.run(f"{name}_pixels").mkdir(parents=True)
        (out.run(f"{name}_pixels") / "metrics.json").write_text(json.dumps(
            {"dims_per_image": 784, "bits_per_dim": pixel_bits, "groups": {"background": background}}))
    rows = table_rows(fill(empty, out))
    assert [row[0].replace("`", "") for row in rows] == ["Gaussian, beta 0.25, both", "Gaussian, beta 0.5, loc", "5 discretized logistics"]
    for row, (likelihood, trainer, bits, kl_bits, pixel_bits, background) in zip(rows, studies.values(), strict=True):
        assert float(row[1]) == pixel_bits
        assert [float(v) for v in row[3].replace("=", "-").split(" - ")] == pytest.approx([bits, kl_bits, bits - kl_bits],
                                                                                             abs=6e-4)
        assert float(row[4]) == pytest.approx(bits - kl_bits - pixel_bits, abs=6e-3)
        assert row[2] == (f"{background['bits_per_pixel']:.2f}, {background['at_floor']:.0%}" if "at_floor" in background
                          else "")


def test_lever_tables_name_each_runs_options_and_the_best_one_hour_block_its_nll(tmp_path):
    """levers_training (jobs of a sweep from before model=resnet, read in today's options): a column per
    option, its default where the run left it out; best_one_hour:
    the K=100 bound on every image and the whole-split NLL with its standard error (not the random
    images' own)."""
    fake_lever_sweep(tmp_path, "depth_latent_warmup", {
        "0": (["model.residual_blocks=0", "model.latent_dim=16"], -93.0, 87.0),
        "1": (["model.residual_blocks=1", "model.latent_dim=32", "trainer.kl_warmup_epochs=3"], -92.0, 86.2)}, 25.0, 0.05)
    out = outputs(tmp_path)
    block = fill("<!-- report:depth_latent_warmup -->\n<!-- /report:depth_latent_warmup -->\n", out)
    assert "| networks | latent dim | KL warm-up epochs | epochs in the budget |" in block
    assert [row[:3] for row in table_rows(block)] == [["resnet", "32", "3"], ["conv", "16", "0"]]
    for missing, command in (("bf16", "python train.py -m experiment=bf16/train"),
                             ("lr_schedule", "python train.py -m experiment=lr_schedule/train"),
                             ("best_one_hour", "python train.py experiment=best_one_hour/train")):
        assert f"_Not run yet: `{command}`._" in fill(f"<!-- report:{missing} -->\n<!-- /report:{missing} -->\n", out)
    fake_job(out.run("best_one_hour"), ["experiment=best_one_hour/train"], [-540.0, -90.5])
    (out.run("best_one_hour_likelihood")).mkdir(parents=True)
    (out.run("best_one_hour_likelihood") / "metrics.json").write_text(json.dumps(
        {"num_particles": 5000, "num_images": 1000, "whole_split_nll": 84.321, "whole_split_nll_standard_error": 0.04,
         "nll": 84.2, "nll_standard_error": 0.3, "whole_split_particles": 100, "whole_split_images": 10000,
         "whole_split_elbo": -88.0, "whole_split_nll_with_whole_split_particles": 85.1}))
    block = fill("<!-- report:best_one_hour -->\n<!-- /report:best_one_hour -->\n", out)
    assert "| ELBO after epoch 1 (0 min 10 s of training), one t per image | -90.50 |" in block
    assert "| **NLL, IW bound with K=100 on every image** | **85.10** |" in block
    assert "1,000 random images | **84.32 ± 0.04** |" in block and "random images alone | 84.20 ± 0.30 |" in block
    assert "| IWAE, two stochastic layers, k=50 (Burda et al. 2016) | 82.90 |" in block


def test_the_bf16_lever_table_names_each_runs_layers(tmp_path):
    fake_lever_sweep(tmp_path, "bf16", {"0": (["trainer.bf16=false"], -91.0, 85.9),
                                               "1": (["trainer.bf16=true"], -90.5, 85.6)}, 26.0, 0.09)
    block = fill("<!-- report:bf16 -->\n<!-- /report:bf16 -->\n", outputs(tmp_path))
    assert "| bfloat16 layers (`trainer.bf16`) | epochs in the budget |" in block
    assert [row[0] for row in table_rows(block)] == ["true", "false"]


def test_the_model_levers_table_names_each_arm_best_nll_first(tmp_path):
    fake_lever_sweep(tmp_path, "model_levers", {"0": (["+experiment/model_levers/arm=best"], -91.0, 85.9),
                                                "1": (["+experiment/model_levers/arm=two_layer"], -90.5, 85.4),
                                                "2": (["+experiment/model_levers/arm=dreg"], -95.5, 88.4)}, 26.0, 0.09)
    block = fill("<!-- report:model_levers -->\n<!-- /report:model_levers -->\n", outputs(tmp_path))
    assert "| lever (conf/experiment/model_levers/arm/) | epochs in the budget |" in block
    assert [row[0] for row in table_rows(block)] == ["two_layer", "best", "dreg"]  # table_rows strips the backticks
    assert [row[-1] for row in table_rows(block)] == ["85.40 ± 0.09", "85.90 ± 0.09", "88.40 ± 0.09"]


def test_the_throughput_block_sets_each_speed_option_against_float32_fastest_first(tmp_path):
    out = outputs(tmp_path)
    out.run("speed_throughput").mkdir(parents=True)
    (out.run("speed_throughput") / "bench.json").write_text(json.dumps({
        "batch_size": 64, "rounds": 20, "steps_per_round": 5, "results": {
            name: {"median_ms": ms, "iqr_ms": 1.0, "ratio_to_raw": ratio, "ratio_iqr": 0.01} for name, (ms, ratio) in {
                "raw": (40.0, 1.0), "reparam": (48.0, 1.2), "reparam_bf16": (39.0, 0.96), "reparam_compile": (50.0, 1.26),
                "reparam_channels_last": (49.0, 1.2), "data": (0.3, 0.01)}.items()}}))
    block = fill("<!-- report:throughput -->\n<!-- /report:throughput -->\n", out)
    assert [row for row in table_rows(block)] == [["trainer.bf16", "39.0", "0.80"], ["float32 (none)", "48.0", "1.00"],
                                                  ["trainer.channels_last", "49.0", "1.00"], ["trainer.compile", "50.0", "1.05"]]
    assert "_Not run yet: `python bench.py experiment=speed/throughput`._" in fill(
        "<!-- report:throughput -->\n<!-- /report:throughput -->\n", outputs(tmp_path / "none"))


def test_the_best_hour_seeds_block_gives_each_seed_then_their_mean_and_sd(tmp_path):
    """Three seeds of one command: each seed's NLL in seed order, the mean and the sample sd over the seeds,
    how many are below the two-layer IWAE's 82.90; a seed not evaluated yet says so and is left out of the mean."""
    out = outputs(tmp_path)
    sweep, evaluations = tmp_path / "multirun" / "best_hour_seeds", tmp_path / "multirun" / "best_hour_seeds_likelihood"
    for seed, nll in enumerate((82.7, 83.1, None)):
        run = fake_job(sweep / str(seed), ["experiment=best_hour_seeds/train", f"seed={seed}"], [-540.0, -88.0 - seed])
        if nll is not None:
            (evaluations / str(seed)).mkdir(parents=True)
            (evaluations / str(seed) / "metrics.json").write_text(json.dumps(
                {"run": str(run), "whole_split_nll": nll, "whole_split_nll_standard_error": 0.1}))
    rows = table_rows(fill("<!-- report:best_hour_seeds -->\n<!-- /report:best_hour_seeds -->\n", out))
    assert [row[0] for row in rows[:3]] == ["seed 0", "seed 1", "seed 2"]
    assert [row[-1] for row in rows[:2]] == ["82.70 ± 0.10", "83.10 ± 0.10"]
    assert "not evaluated yet" in rows[2][-1]
    assert rows[3][0] == "mean ± sd over 2 seeds (1 of them below 82.90)" and rows[3][-1] == "82.90 ± 0.28"
    assert rows[-1] == ["IWAE, two stochastic layers, k=50 (Burda et al. 2016)", "", "", "", "82.90"]


def test_the_readmes_best_hour_lines_lead_with_the_mean_over_seeds(tmp_path):
    """best_hour_seeds_short: the mean ± sd over the evaluated seeds first, then each seed with its epochs in
    seed order (one not evaluated says so), then the two-layer IWAE; with one seed evaluated, no mean."""
    out = outputs(tmp_path)
    sweep, evaluations = tmp_path / "multirun" / "best_hour_seeds", tmp_path / "multirun" / "best_hour_seeds_likelihood"
    empty = "<!-- report:best_hour_seeds_short -->\n<!-- /report:best_hour_seeds_short -->\n"
    for seed, nll in enumerate((82.4, 82.2, 83.0)):
        run = fake_job(sweep / str(seed), ["experiment=best_hour_seeds/train", f"seed={seed}"],
                       [-540.0] + [None] * (95 + seed) + [-88.0])
        if seed < 2:
            (evaluations / str(seed)).mkdir(parents=True, exist_ok=True)
            (evaluations / str(seed) / "metrics.json").write_text(json.dumps(
                {"run": str(run), "whole_split_nll": nll, "whole_split_nll_standard_error": 0.1}))
        if seed == 0:  # one seed evaluated: its row, no mean
            assert [row[0] for row in table_rows(fill(empty, out))] == [
                "seed 0 (96 epochs)", "IWAE, two stochastic layers, k=50 (Burda et al. 2016)"]
    rows = table_rows(fill(empty, out))
    assert rows[0] == ["mean ± sd over 2 seeds (2 of them below 82.90)", "82.30 ± 0.14"]
    assert [row[0] for row in rows[1:4]] == ["seed 0 (96 epochs)", "seed 1 (97 epochs)", "seed 2 (98 epochs)"]
    assert [row[1] for row in rows[1:3]] == ["82.40 ± 0.10", "82.20 ± 0.10"] and "not evaluated yet" in rows[3][1]
    assert rows[4] == ["IWAE, two stochastic layers, k=50 (Burda et al. 2016)", "82.90"]
    labels = [row[0] for row in table_rows(block_of((PROJECT_DIR / "README.md").read_text(), "best_hour_seeds_short"))]
    assert labels[-1] == "IWAE, two stochastic layers, k=50 (Burda et al. 2016)"  # the README's block, from the runs
    assert all(re.fullmatch(r"seed \d \(\d+ epochs\)", label) for label in labels[-4:-1])
    assert len(labels) == 4 or labels[0].startswith("mean ± sd over ")


def test_the_best_one_hour_iwae_block_sets_the_two_forks_side_by_side(tmp_path):
    out = outputs(tmp_path)
    empty = "<!-- report:best_one_hour_iwae -->\n<!-- /report:best_one_hour_iwae -->\n"
    assert "_Not run yet: `python train.py experiment=best_one_hour/train`._" in fill(empty, out)
    for name, elbos, nll in (("best_one_hour", [-540.0, -88.4], 83.51), ("best_one_hour_iwae", [-540.0, -89.0, -89.2], 82.87)):
        fake_job(out.run(name), [f"experiment=best_one_hour/{'train' if name == 'best_one_hour' else 'iwae'}"], elbos)
        (out.run(f"{name}_likelihood")).mkdir(parents=True)
        (out.run(f"{name}_likelihood") / "metrics.json").write_text(json.dumps(
            {"num_particles": 5000, "num_images": 1000, "whole_split_nll": nll, "whole_split_nll_standard_error": 0.06,
             "whole_split_particles": 100, "whole_split_images": 10000, "whole_split_nll_with_whole_split_particles": nll + 0.7}))
        if name == "best_one_hour":
            assert "_Not run yet: `python train.py experiment=best_one_hour/iwae`._" in fill(empty, out)
    block = fill(empty, out)
    assert "| last 20 minutes trained | on the ELBO | on the IW bound, K=5 |" in block
    assert "| epochs | 1 | 2 |" in block and "| test ELBO after the last epoch (nats) | -88.40 | -89.20 |" in block
    assert "| NLL, IW bound with K=100 on every image | **84.21** | **83.57** |" in block
    assert "1,000 random images | **83.51 ± 0.06** | **82.87 ± 0.06** |" in block


def test_the_data_parallel_block_sets_the_two_runs_side_by_side(tmp_path):
    out = outputs(tmp_path)
    empty = "<!-- report:data_parallel -->\n<!-- /report:data_parallel -->\n"
    assert "_Not run yet: `python train.py experiment=speed/data_parallel`._" in fill(empty, out)
    for name, seconds in (("speed_data_parallel", [41.0, 39.7]), ("speed_data_parallel_2ranks", [52.9, 49.6])):
        run = out.run(name)
        run.mkdir(parents=True)
        lines = [{"epoch": 0, "test_elbo": -540.0}] + [{"epoch": e + 1, "seconds": s, "test_elbo": -101.0 - e}
                                                     for e, s in enumerate(seconds)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    block = fill(empty, out)
    assert "| 1 process, 2 threads | 41.0 / 39.7 | -102.00 |" in block
    assert "| 2 ranks (torchrun), 1 thread each | 52.9 / 49.6 | -102.00 |" in block


# --- what the density model is for ----------------------------------------------------------------

def test_generation_block_gives_the_classifiers_judgement_of_the_samples(tmp_path):
    directory = tmp_path / "multirun" / "default_applications" / "generate"
    directory.mkdir(parents=True)
    (directory / "samples.png").write_bytes(b"")
    (directory / "metrics.json").write_text(json.dumps({
        "classifier_test_accuracy": 0.983, "test_confident_share": 0.957, "scored_samples": 1000,
        "sample_confident_share": 0.49, "sample_confident_classes": [51, 31, 36, 51, 32, 44, 0, 64, 89, 66],
        "confidence_threshold": 0.9}))
    block = fill("<!-- report:generation -->\n<!-- /report:generation -->\n", outputs(tmp_path))
    assert ("A small digit classifier (test accuracy 98.3%) is confident (p > 0.9) on **49.0%** of 1,000 decoded prior "
            "samples, against 95.7% of the real test digits; the confident samples fall in 9 of the 10 classes "
            "(from 0 to 89 samples each).") in block


# --- the documents --------------------------------------------------------------------------------

PROVENANCE = {"commit": "0123456789abcdef", "uncommitted_changes": False, "date": "2026-12-01T00:00:00+00:00",
              "cpu": "Some CPU", "threads": 2, "gpu": None, "torch": "9.9", "pyro": "1.9.2"}


def test_documents_are_filled_from_the_recipes_outputs(tmp_path):
    """`python report.py`: each report block is rewritten from its recipe's outputs, with the
    machine from provenance.jsonl (the commit only outside the README); an empty block whose recipe has not
    run names the command; a block that does not exist is refused."""
    run = tmp_path / "outputs" / "default"
    run.mkdir(parents=True)
    metrics = [{"epoch": 0, "train_elbo": None, "test_elbo": -515.85, "test_recon": -514.1, "test_kl": 1.8, "wall_time": 0.0},
               {"epoch": 1, "train_elbo": -124.2, "test_elbo": -105.25, "test_recon": -81.7, "test_kl": 23.5,
                "seconds": 60.0, "wall_time": 63.0},
               {"epoch": 2, "train_elbo": -104.0, "test_elbo": -101.01, "test_recon": -78.0, "test_kl": 23.0,
                "seconds": 62.0, "wall_time": 128.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (run / "provenance.jsonl").write_text(json.dumps(PROVENANCE) + "\n")
    document = "a\n<!-- report:quickstart -->\nold text\n<!-- /report:quickstart -->\n<!-- report:speed -->\n<!-- /report:speed -->\nb\n"
    out = outputs(tmp_path)
    filled = fill(document, out)
    assert "old text" not in filled and filled.startswith("a\n") and filled.endswith("b\n")
    assert "**-101.01**" in filled and "-105.25 after the first epoch" in filled and "about 2 minutes (61 s per epoch" in filled
    assert "Some CPU, 2 threads; no GPU; torch 9.9; pyro 1.9.2." in filled and "0123456" not in filled
    assert "_Not run yet: `python bench.py experiment=speed/bench`._" in filled
    assert "commit 0123456; 2026-12-01." in fill(document, outputs(tmp_path, full=True))
    assert fill(filled, out) == filled  # filling again changes nothing
    with pytest.raises(KeyError, match="nope"):
        fill("<!-- report:nope -->\n<!-- /report:nope -->", out)
    partly = fill(document, out, only=["speed"])  # `python report.py blocks=[speed]`: the others stay as they are
    assert "old text" in partly and "_Not run yet: `python bench.py experiment=speed/bench`._" in partly
    with pytest.raises(KeyError, match=r"blocks=\['nope'\]"):
        fill(document, out, only=["speed", "nope"])


def test_a_table_whose_outputs_are_not_here_is_kept_and_an_empty_block_names_its_command(tmp_path):
    """A clone without the outputs (or a remake half done) runs report.py: the tables it brings stay,
    word for word; only an empty block, or one that already says so, says the recipe has not run."""
    out, command = outputs(tmp_path), "_Not run yet: `python bench.py experiment=speed/bench`._"
    table = "| variant | s |\n| --- | --- |\n| float32 | 1.0 |\n\nMeasured on Some CPU.\n"
    kept = f"a\n<!-- report:speed -->\n{table}<!-- /report:speed -->\nb\n"
    assert fill(kept, out) == kept
    for body in ("", "\n", f"{command}\n"):
        assert fill(f"<!-- report:speed -->\n{body}<!-- /report:speed -->", out) == \
            f"<!-- report:speed -->\n{command}\n<!-- /report:speed -->"


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


def detection(anomalies: str, auroc: float, n: int = 1000) -> dict:
    """One row of task=anomaly's detection table: -ELBO's AUROC `auroc`, the other scores' fixed."""
    return {"anomalies": anomalies, "n": n, "neg_elbo": {"auroc": auroc, "auprc": auroc / 2},
            **{score: {"auroc": 0.5, "auprc": 0.25} for score in ("kl", "neg_recon", "iw_nll")}}


# What the README's tables are made of, in the fake outputs tree below.
DEFAULT_SECONDS = [3.0, 60.0, 71.0, 63.0, 58.0]  # epoch 0 (testing only), then epochs 1 to 4: median 61.5, mean 63
DEFAULT_ELBOS = [-515.85, -105.5, -99.0, -96.0, -94.25]
ONE_HOUR_NLL = {"num_particles": 5000, "num_images": 1000, "whole_split_nll": 85.804,
                "whole_split_nll_standard_error": 0.081, "nll": 85.93, "nll_standard_error": 0.31,
                "whole_split_particles": 100, "whole_split_images": 10000,
                "whole_split_elbo": -90.0, "whole_split_nll_with_whole_split_particles": 86.3}
IMPUTATION = {"random": {"mean_image": 0.071, "nearest_neighbour": 0.057, "fitted_importance": 0.040},  # NN the better
              "top_half": {"mean_image": 0.077, "nearest_neighbour": 0.090, "fitted_importance": 0.055}}  # the mean image
HELDOUT = {"0": (7, 0.55), "1": (2, 0.91)}  # evaluation directory: (the held-out digit, its -ELBO AUROC)
BENCH = {"score_loo": (293.54, 4.891), "raw": (60.84, 1.0), "score_avg_baseline": (70.0, 1.15),  # not in the README
         "reparam": (65.23, 1.092), "score": (65.31, 1.073)}  # bench.json's order is not the table's


def fake_readme_outputs(experiments: Path, sweeps: Path) -> None:
    """The outputs the README's blocks read: the default run, experiment=estimators/train, one_hour and its
    likelihood, the uses (and heldout_anomaly) evaluations, and bench.json."""
    default = fake_job(experiments / "default", ["experiment=default/train"], DEFAULT_ELBOS, seconds=DEFAULT_SECONDS,
                       test_recon=[e - 20 for e in DEFAULT_ELBOS], test_kl=20.0,
                       train_elbo=[None, -124.2, -104.0, -98.0, -95.5])
    (default / "provenance.jsonl").write_text(json.dumps(PROVENANCE) + "\n")
    fake_estimators(sweeps / "estimators")
    fake_job(experiments / "one_hour", ["experiment=one_hour/train"], [-540.0, -100.0, -95.0, -93.1],
             wall_time=[0, 1200.4, 2400.9, 3560.2])  # 59 min 20 s
    (experiments / "one_hour_likelihood").mkdir(parents=True)
    (experiments / "one_hour_likelihood" / "metrics.json").write_text(json.dumps(ONE_HOUR_NLL))
    uses = {"represent": {"linear_probe_accuracy": 0.9023},
            "anomaly": {"detection": [detection("noise", 0.998), detection("inverted", 0.951)],
                        "mean_scores": {name: {score: 1.0 for score in ("neg_elbo", "kl", "neg_recon", "iw_nll")}
                                        for name in ("normal", "noise", "inverted")}},
            "impute": {"num_images": 1000, "rows": {name: [] for name in ("masked", "truth", *IMPUTATION["random"])},
                       "errors": {kind: {name: {"mse": mse} for name, mse in errors.items()}
                                  for kind, errors in IMPUTATION.items()}},
            "generate": {"classifier_test_accuracy": 0.983, "test_confident_share": 0.957, "scored_samples": 1000,
                         "sample_confident_share": 0.479, "sample_confident_classes": [5] * 10, "confidence_threshold": 0.9}}
    for task, metrics in uses.items():
        (sweeps / "default_applications" / task).mkdir(parents=True)
        (sweeps / "default_applications" / task / "metrics.json").write_text(json.dumps(metrics))
    (sweeps / "default_applications" / "generate" / "samples.png").write_bytes(b"png")
    for job, (digit, auroc) in HELDOUT.items():
        run = fake_job(sweeps / "heldout_digit" / str(digit), [f"data.exclude_classes=[{digit}]"], [-540.0, -101.0])
        (sweeps / "heldout_digit_anomaly" / job).mkdir(parents=True)
        (sweeps / "heldout_digit_anomaly" / job / "metrics.json").write_text(json.dumps({"run": str(run), "detection": [
            detection(f"held-out class [{digit}]", auroc, 980), detection("noise", 0.99), detection("inverted", 0.97)]}))
    (experiments / "speed_bench").mkdir(parents=True)
    (experiments / "speed_bench" / "bench.json").write_text(json.dumps({
        "batch_size": 128, "rounds": 5, "steps_per_round": 20, "data_fraction_of_step": 0.012,
        "evaluation": {"particles": 1000, "iw_throughput_fraction_of_decoder": 0.4},
        "results": {name: {"median_ms": ms, "iqr_ms": 1.0, "ratio_to_raw": ratio, "ratio_iqr": 0.01}
                    for name, (ms, ratio) in BENCH.items()}}))


def test_report_py_fills_the_readmes_four_tables_from_the_recipes_outputs(tmp_path):
    """`python report.py` on a fake outputs tree fills copies of README.md and docs/results.md: the
    quickstart line and the README's four tables hold the numbers of the fake outputs (medians over
    seeds at the epoch all reached, in the estimators' order; the whole-split NLL and its standard
    error; the better imputation baseline; the held-out digits in order; the bench's variants in the
    table's order); the text outside the blocks is left as it was; docs/ gets the commit and the figure."""
    experiments, sweeps = tmp_path / "outputs" / "experiments", tmp_path / "multirun" / "experiments"
    fake_readme_outputs(experiments, sweeps)
    readme, results = tmp_path / "README.md", tmp_path / "docs" / "results.md"
    results.parent.mkdir()
    originals = {readme: (PROJECT_DIR / "README.md").read_text(), results: (PROJECT_DIR / "docs" / "results.md").read_text()}
    for document, text in originals.items():
        document.write_text(text)
    result = subprocess.run([sys.executable, "report.py", f"documents=[{readme},{results}]", f"experiments={experiments}",
                             f"sweeps={sweeps}", f"figures={tmp_path / 'figures'}"],
                            cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"wrote {readme}", f"wrote {results}"]
    for document, text in originals.items():  # only the blocks' contents changed
        assert BLOCK.sub(r"\g<start>\g<end>", document.read_text()) == BLOCK.sub(r"\g<start>\g<end>", text)
    text = readme.read_text()

    quickstart = block_of(text, "quickstart")
    (epochs, minutes, seconds, count, last, first, untrained) = re.match(
        r"(\d+) epochs of MNIST take about (\d+) minutes \((\d+) s per epoch, the median of the (\d+)\) and end at a test "
        r"ELBO of \*\*(\S+)\*\* nats per image \((\S+) after the first epoch, (\S+) untrained\)", quickstart).groups()
    median = statistics.median(DEFAULT_SECONDS[1:])  # the trained epochs only
    assert (int(epochs), int(count), int(seconds), int(minutes)) == (4, 4, round(median), round(4 * median / 60))
    assert [float(last), float(first), float(untrained)] == [DEFAULT_ELBOS[-1], DEFAULT_ELBOS[1], DEFAULT_ELBOS[0]]
    assert quickstart.endswith("Measured on Some CPU, 2 threads; no GPU; torch 9.9; pyro 1.9.2.\n")

    estimators = table_rows(block_of(text, "estimators_short"))
    assert [row[0] for row in estimators] == ["reparam", "score", "score_loo", "iwae"]
    for row in estimators:
        seeds = sorted((seed, elbos) for name, seed, elbos, _, _ in ESTIMATOR_JOBS.values() if name == row[0])
        common = min(len(elbos) for _, elbos in seeds) - 1
        at = [elbos[common] for _, elbos in seeds]
        assert int(row[1]) == common and numbers(row[3]) == pytest.approx(at, abs=0.005)
        assert float(row[2]) == pytest.approx(sorted(at)[len(at) // 2], abs=0.005)
    assert "| `reparam` | 3 | **-99.00** | -101.00 / -99.00 / -96.00 |" in text  # the format

    (this_model, *anchors) = table_rows(block_of(text, "likelihood_short"))
    assert this_model[0] == "this model, 59 min 20 s of training (3 epochs)"
    assert numbers(this_model[1]) == pytest.approx(
        [ONE_HOUR_NLL["whole_split_nll"], ONE_HOUR_NLL["whole_split_nll_standard_error"]], abs=0.005)  # not nll's own
    assert [float(row[1]) for row in anchors] == [86.76, 84.78, 82.90]

    uses = {row[0]: row[1] for row in table_rows(block_of(text, "applications_short"))}
    assert list(uses) == ["generation: prior samples a digit classifier is confident about (p > 0.9)",
                          "representation: a linear probe on t_loc(x)", "anomalies: a digit left out of training",
                          "anomalies: uniform noise, inverted digits",
                          "missing data: fitted importance sampling against the better baseline, MSE"]
    assert numbers(uses["representation: a linear probe on t_loc(x)"]) == [90.2]
    assert uses["anomalies: a digit left out of training"] == "-ELBO AUROC " + ", ".join(
        f"{digit}: {auroc:.2f}" for digit, auroc in sorted(HELDOUT.values()))
    assert numbers(uses["anomalies: uniform noise, inverted digits"]) == [1.00, 0.95]
    imputation = uses["missing data: fitted importance sampling against the better baseline, MSE"]
    assert re.findall(r"(?:^|; )([a-z ]+) \*\*", imputation) == [kind.replace("_", " ") for kind in IMPUTATION]
    assert numbers(imputation) == pytest.approx([v for errors in IMPUTATION.values() for v in (
        errors["fitted_importance"], min(errors["mean_image"], errors["nearest_neighbour"]))])
    assert numbers(uses["generation: prior samples a digit classifier is confident about (p > 0.9)"]) == [47.9, 95.7]

    speed = table_rows(block_of(text, "speed_short"))
    shown = [name for name in ("raw", "reparam", "reparam_jit", "reparam_bf16", "score", "score_loo") if name in BENCH]
    assert [row[0] for row in speed] == shown
    assert [float(cell) for row in speed for cell in row[1:]] == pytest.approx(
        [value for name in shown for value in BENCH[name]], abs=0.05)
    assert "| one training step (batch 128) | ms | / raw |" in text and "| `reparam` | 65.2 | 1.09 |" in text

    docs = results.read_text()  # the estimators' full table, once formatted, with the failed seed and the figure
    assert ("| `reparam` | 3 | 3 | **-99.00** | -98.67 ± 2.52 | -101.00 / -99.00 / -96.00 | -101.00 / -95.50 / -96.00 "
            "| 24.00 / 25.00 / 21.00 | 30 |") in block_of(docs, "estimators")
    assert "Failed: `estimator=score` seed 1: loss is nan at epoch 3" in block_of(docs, "estimators")
    assert "commit 0123456; 2026-12-01." in block_of(docs, "training")
    assert block_of(docs, "faults") == block_of(originals[results], "faults")  # no outputs here: its table stays
    assert (tmp_path / "figures" / "estimators.png").stat().st_size > 0


# The decimals the prose of README.md and docs/ may hold outside the generated blocks: literature anchors,
# mathematical constants, settings and goals, none of them a measurement of this project's runs (a measured
# number typed by hand goes stale when its recipe is re-run; it belongs in a block that report.py writes).
PROSE_DECIMALS = {
    "1.06": "RealNVP's bits/dim (Dinh et al. 2017)", "1.05": "Glow's bits/dim (Kingma & Dhariwal 2018)",
    "82.90": "the two-layer IWAE's NLL (Burda et al. 2016)",
    "0.25": "(1/2) log2(pi e / 6) bits, and the beta-NLL's beta", "0.0011": "1/(256 sqrt 12)",
    "0.33": "a chance AUPRC, the anomalies' share", "1.3": "the gray-level goal in bits/dim",
    "0.9": "the classifier's confidence threshold", "0.1": "likelihood.fixed_scale", "0.001": "likelihood.min_scale",
    "0.5": "a beta", "58.5": "trainer.max_minutes of a recipe", "1e-3": "the learning rate",
}


def prose_decimals(text: str) -> list[tuple[int, str]]:
    """(line, number) of every decimal in `text` outside the generated blocks and the 4-space command lines."""
    found, inside = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if re.match(r"<!-- /?report:", line):
            inside = not line.startswith("<!-- /")
        elif not inside and not line.startswith("    "):
            found += [(number, value) for value in re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])|\b\d+e-\d+\b", line)]
    return found


@pytest.mark.parametrize("document", ["README.md", "docs/results.md", "docs/data.md"])
def test_no_measured_number_is_typed_into_the_prose(document):
    """Every decimal outside the generated blocks is a constant named in PROSE_DECIMALS."""
    typed = [f"{document}:{line}: {value}" for line, value in prose_decimals((PROJECT_DIR / document).read_text())
             if value not in PROSE_DECIMALS]
    assert not typed, f"numbers typed into the prose, outside the blocks report.py writes: {typed}"


def test_the_prose_check_sees_a_typed_number_and_skips_blocks_and_commands():
    text = ("The run reaches 83.31 nats.\n<!-- report:x -->\n| 84.12 |\n<!-- /report:x -->\n"
            "    python train.py trainer.max_minutes=12.5\nRealNVP 1.06, lr 1e-3.\n")
    assert prose_decimals(text) == [(1, "83.31"), (6, "1.06"), (6, "1e-3")]
