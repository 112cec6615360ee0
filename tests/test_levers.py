"""The learning-rate schedule (`schedule=`), a lever of a stronger density model besides the flows
(tests/test_flows.py) and residual blocks (tests/test_resnet.py): it follows its formula epoch by
epoch and survives a stop exactly."""
from __future__ import annotations

import json
import math

import pyro
import pytest
import torch

from conftest import FAST, compose_config, process_starts
from train import train
from vae.checkpoint import CheckpointError
from vae.config import ConfigError, check_config

LR = 1e-3  # conf/optim/adam.yaml


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def params():
    return {name: value.detach().clone() for name, value in pyro.get_param_store().items()}


def run(out_dir, *overrides):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    train(compose_config(*FAST, *overrides), out_dir)
    return params()


def test_cosine_schedule_sets_each_epochs_rate_by_its_formula(tmp_path):
    """lr_e = eta_min + (lr - eta_min) (1 + cos(pi (e - 1) / T_max)) / 2 for epoch e = 1, 2, ...,
    as metrics.jsonl records it; `constant` keeps lr."""
    run(tmp_path / "cosine", "schedule=cosine", "trainer.epochs=3", "schedule.T_max=4", "schedule.eta_min=1e-5")
    rates = [m["lr"] for m in read_metrics(tmp_path / "cosine")[1:]]
    expected = [1e-5 + (LR - 1e-5) * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(3)]
    assert rates == pytest.approx(expected, rel=1e-9) and rates[2] < rates[1] < rates[0] == pytest.approx(LR)
    run(tmp_path / "constant", "schedule=constant", "trainer.epochs=2")
    assert [m["lr"] for m in read_metrics(tmp_path / "constant")[1:]] == [LR, LR]


def test_a_constant_schedule_takes_the_same_steps_as_none(tmp_path):
    plain = run(tmp_path / "plain")
    constant = run(tmp_path / "constant", "schedule=constant")
    assert all(torch.equal(value, constant[name]) for name, value in plain.items())
    cosine = run(tmp_path / "cosine", "schedule=cosine")  # the second epoch's rate is 0: it differs
    assert any(not torch.equal(value, cosine[name]) for name, value in plain.items())


def test_a_scheduled_run_stopped_and_resumed_equals_the_straight_run(tmp_path):
    """The checkpoint holds every scheduler's state with its optimizer's moments, and resume puts
    both back as saved: the parameters and every epoch's rate are those of the straight run."""
    schedule = ["schedule=cosine", "schedule.T_max=3"]
    straight = run(tmp_path / "straight", *schedule, "trainer.epochs=3")
    run(tmp_path / "split", *schedule, "trainer.epochs=1")
    resumed = run(tmp_path / "ignored", *schedule, "trainer.epochs=3", f"resume={tmp_path / 'split'}")
    assert all(torch.equal(value, resumed[name]) for name, value in straight.items())
    assert process_starts(tmp_path / "split") == [(1, 0), (2, 0)]  # resumed after epoch 1, not trained again
    rates = lambda d: [m["lr"] for m in read_metrics(d)[1:]]
    assert rates(tmp_path / "split") == rates(tmp_path / "straight") and len(rates(tmp_path / "split")) == 3


def test_a_schedule_that_would_rise_again_or_a_changed_optimizer_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"schedule.T_max=2 with trainer.epochs=3"):
        check_config(compose_config(*FAST, "schedule=cosine", "schedule.T_max=2", "trainer.epochs=3"))
    run(tmp_path, "schedule=cosine", "schedule.T_max=3", "trainer.epochs=1")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError, match=r"optim.optim_args.lr: 0.001 -> 0.01 \(a run with a schedule keeps"):
        run(tmp_path, "schedule=cosine", "schedule.T_max=3", "trainer.epochs=2", "optim.optim_args.lr=1e-2")
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
