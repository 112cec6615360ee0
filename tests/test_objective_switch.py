"""The objective switched inside one run (`trainer.switch_after_minutes` + `trainer.switch_elbo`, vae/runner.py):
after the first epoch that ends past the minute, the epochs train the other objective. Known answers: one run that
switches to the IW bound after epoch 1 is, number for number, the hand procedure it replaces (a run on the ELBO,
then resumed from its epoch-1 checkpoint with estimator=iwae); the epoch of the switch is in the checkpoint, so a
switched run resumes exactly; a half-given or unfit switch is refused in one line."""
from __future__ import annotations

import shutil

import pyro
import pytest
import torch
from conftest import FAST, compose_config, resumed_run, run_numbers, trained_run

from vae.checkpoint import CHECKPOINT_NAME
from vae.config import ConfigError, check_config

SWITCH = ("trainer.switch_after_minutes=0", "trainer.switch_elbo={_target_:vae.iwae.IWAE_ELBO,num_particles:3}")


def test_one_run_that_switches_is_the_fork_it_replaces_and_resumes_exactly(tmp_path):
    from train import train

    switched = trained_run(tmp_path / "switched", *SWITCH, "trainer.epochs=3")
    assert torch.load(switched / CHECKPOINT_NAME, weights_only=False)["switch_epoch"] == 2
    # the hand procedure: one epoch on the ELBO, then the IW bound from its checkpoint
    first = trained_run(tmp_path / "first", "trainer.epochs=1")
    shutil.copytree(first, tmp_path / "fork")
    pyro.clear_param_store()
    train(compose_config(*FAST, "estimator=iwae", "estimator.elbo.num_particles=3", "trainer.epochs=3",
                         f"resume={tmp_path / 'fork'}"), tmp_path / "fork")
    assert run_numbers(switched) == run_numbers(tmp_path / "fork")
    assert run_numbers(switched)[2]["train_elbo"] != run_numbers(trained_run(tmp_path / "elbo", "trainer.epochs=3"))[2]["train_elbo"]
    # stopped after epoch 2 (switched at its start) and resumed: the same run
    assert run_numbers(resumed_run(tmp_path / "parts", *SWITCH, stop_after=2, epochs=3)) == run_numbers(switched)


@pytest.mark.parametrize("overrides,message", [
    (("trainer.switch_after_minutes=40",), "trainer.switch_after_minutes=40 with trainer.switch_elbo=None: give both"),
    (("trainer.switch_elbo={_target_:vae.iwae.IWAE_ELBO}",), "trainer.switch_after_minutes=None with trainer.switch_elbo="),
    (("trainer.switch_after_minutes=-1", SWITCH[1]), "trainer.switch_after_minutes=-1: must be null (no switch) or a number"),
    (("trainer.switch_after_minutes=40", "trainer.switch_elbo={_target_:torch.nn.Linear}"),
     "trainer.switch_elbo._target_=torch.nn.Linear: must be an ELBO class"),
    (("estimator=score", *SWITCH), "trainer.switch_elbo._target_=vae.iwae.IWAE_ELBO with estimator.reparameterized=false"),
    (("trainer.kl_warmup_epochs=2", *SWITCH), "trainer.kl_warmup_epochs=2 with trainer.switch_elbo._target_=vae.iwae"),
])
def test_a_half_given_or_unfit_switch_is_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as refused:
        check_config(compose_config(*FAST, *overrides))
    assert message in str(refused.value) and "\n" not in str(refused.value)
