"""Every option under conf/ composes, passes the config checks, and instantiates."""
from __future__ import annotations

import inspect
import re
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from pyro.optim import PyroLRScheduler

from conftest import CONF_DIR, PROJECT_DIR, compose_config
from vae.build import build_likelihood, build_optimizer
from vae.config import ConfigError, check_config

OPTIONS = sorted(
    (path.parent.name, path.stem) for path in CONF_DIR.glob("*/*.yaml") if path.parent.name != "experiment"
)  # (group, option) for every training file: a new file is tested without editing this test
# (conf/experiment/ holds recipes for every entry point: composed below, each with its own; the task
# group of evaluate.py is in tasks/conf/task/, and tests/test_evaluate.py composes those)


def test_every_group_has_options():
    groups = {group for group, _ in OPTIONS}
    assert groups == {"data", "model", "likelihood", "prior", "estimator", "optim", "schedule", "trainer"}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}/{o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(group, option, tmp_path):
    cfg = compose_config(f"{group}={option}")
    check_config(cfg)

    # The dataset's target exists and accepts the config's keys plus root and train.
    dataset_cls = get_class(cfg.data.dataset._target_)
    kwargs = {k: v for k, v in cfg.data.dataset.items() if k != "_target_"}
    inspect.signature(dataset_cls).bind(root=str(tmp_path), train=True, **kwargs)
    if dataset_cls.__module__ == "vae.data":  # file-free datasets are built for real
        dataset = instantiate(cfg.data.dataset, root=str(tmp_path), train=False)
        assert dataset.data.shape == (cfg.data.dataset.num_test, 16, 16) and dataset.data.dtype == torch.uint8
        assert len(dataset.targets) == len(dataset.data) and set(dataset.targets.tolist()) <= set(range(10))

    encoder = instantiate(cfg.model.encoder, image_shape=(1, 28, 28))
    likelihood = instantiate(cfg.likelihood, image_channels=1)
    decoder = instantiate(cfg.model.decoder, image_shape=(1, 28, 28), likelihood=likelihood)
    assert encoder.t_loc.out_features == decoder.latent_dim == cfg.model.latent_dim
    assert decoder.likelihood is likelihood
    optimizer = instantiate(cfg.optim)
    assert optimizer.pt_optim_constructor.__name__ == cfg.optim._target_.rsplit(".", 1)[-1]
    scheduled = build_optimizer(cfg)  # with a schedule: Pyro's wrapper of the same torch optimizer
    assert isinstance(scheduled, PyroLRScheduler) == (group == "schedule")
    assert scheduled.pt_optim_constructor is optimizer.pt_optim_constructor
    elbo = instantiate(cfg.estimator.elbo)
    assert elbo.num_particles == cfg.estimator.elbo.num_particles
    assert isinstance(cfg.estimator.reparameterized, bool)
    assert cfg.trainer.epochs >= 1


LIKELIHOODS = sorted(path.stem for path in (CONF_DIR / "likelihood").glob("*.yaml"))  # a new one: tested too
BAD_VALUES = {  # likelihood key -> (override value, what the refusal says) of values it must refuse
    "scale": [("x", "must be one of"), ("1", "must be one of")],
    "min_scale": [("0", "must be a finite number > 0"), ("-1", "must be a finite number > 0"),
                  ("inf", "must be a finite number > 0"), ("true", "must be a finite number > 0"),
                  ("x", "must be a finite number > 0")],
    "fixed_scale": [("0", "must be a finite number > 0"), ("-1", "must be a finite number > 0"),
                    ("nan", "must be a finite number > 0")],
    "components": [("0", "must be a positive integer"), ("2.5", "must be a positive integer"),
                   ("true", "must be a positive integer")],
    "logit_lambda": [("0", "must be a number between 0 and 0.5"), ("0.5", "must be a number between 0 and 0.5"),
                     ("-1", "must be a number between 0 and 0.5")],
}
GENERIC_BAD_VALUES = [("-1", ""), ("x", "")]  # a key not listed above: refused, whatever it says


def likelihood_keys(option: str) -> list[str]:
    """The keys of conf/likelihood/<option>.yaml besides its `_target_`."""
    return [key for key in compose_config(f"likelihood={option}").likelihood if key != "_target_"]


@pytest.mark.parametrize("option", LIKELIHOODS)
def test_every_likelihood_composes_passes_the_checks_and_refuses_a_bad_value_of_each_key(option):
    """`likelihood=<option>` composes, passes check_config and builds for gray and colour images (the
    Bernoulli: gray only); a bad value of each of its keys stops check_config in one line naming
    likelihood.<key> and the value (the likelihood checks its own keys when it is built)."""
    cfg = compose_config(f"likelihood={option}")
    check_config(cfg)
    assert get_class(cfg.likelihood._target_).__module__ in ("model", "vae.likelihoods")
    for channels in (1, 3):
        if option == "bernoulli" and channels == 3:
            with pytest.raises(ConfigError, match=r"^likelihood=bernoulli with 3-channel images"):
                build_likelihood(cfg.likelihood, channels)
            continue
        likelihood = build_likelihood(cfg.likelihood, channels)
        out = torch.zeros(2, channels * likelihood.params_per_pixel, 4, 4)
        assert likelihood(out).batch_shape == (2, channels, 4, 4)
    for key in likelihood_keys(option):
        for value, says in BAD_VALUES.get(key, GENERIC_BAD_VALUES):
            with pytest.raises(ConfigError) as error:
                check_config(compose_config(f"likelihood={option}", f"likelihood.{key}={value}"))
            message = str(error.value)
            assert message.startswith(f"likelihood.{key}=") and says in message, (key, value, message)
            assert "\n" not in message, message


@pytest.mark.parametrize("option", [o for o in LIKELIHOODS if "fixed_scale" in likelihood_keys(o)])
def test_a_fixed_scale_below_the_floor_is_refused(option):
    """scale=fixed with fixed_scale < min_scale: every scale of the likelihood is kept above the floor."""
    check_config(compose_config(f"likelihood={option}", "likelihood.scale=fixed", "likelihood.fixed_scale=0.01",
                                "likelihood.min_scale=0.001"))
    with pytest.raises(ConfigError, match=r"^likelihood.fixed_scale=0.001: below likelihood.min_scale=0.01"):
        check_config(compose_config(f"likelihood={option}", "likelihood.scale=fixed", "likelihood.fixed_scale=0.001",
                                    "likelihood.min_scale=0.01"))


def test_variants_hold_only_their_difference():
    """Each variant that inherits a sibling overrides only what differs."""
    assert compose_config("estimator=score").estimator.elbo == compose_config("estimator=reparam").estimator.elbo
    assert compose_config("estimator=score").estimator.reparameterized is False
    clipped = compose_config("optim=clipped_adam").optim
    assert clipped.optim_args.lr == compose_config("optim=adam").optim.optim_args.lr
    assert "clip_norm" in clipped.optim_args


def test_data_root_defaults_to_environment(monkeypatch):
    monkeypatch.setenv("VAE_DATA_ROOT", "/somewhere/data")
    assert compose_config().data.root == "/somewhere/data"
    monkeypatch.delenv("VAE_DATA_ROOT")
    assert compose_config().data.root == "data"


RECIPES = sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml"))
PRIMARY = {"train": "config", "evaluate": "evaluate", "variance": "variance", "bench": "bench", "faults": "faults"}


def recipe_command(recipe: str) -> tuple[str, bool]:
    """(the entry point a recipe is for, whether it is a multirun), from its header comment
    "# `python <entry>.py [-m] experiment=<recipe>`", which the docs quote."""
    header = (CONF_DIR / "experiment" / f"{recipe}.yaml").read_text().splitlines()[1]
    match = re.match(r"# `python (\w+)\.py (-m )?experiment=(\w+)`", header)
    assert match and match.group(3) == recipe, f"experiment/{recipe}.yaml: header {header!r}"
    return match.group(1), bool(match.group(2))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_with_its_entry_point(recipe):
    """Each recipe names its command in its header and composes with that entry point's config;
    a multirun recipe holds its sweep, a single run writes to a fixed directory under outputs/."""
    entry, multirun = recipe_command(recipe)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(PRIMARY[entry], overrides=[f"experiment={recipe}"], return_hydra_config=True)
    hydra_cfg = OmegaConf.to_container(cfg.hydra)
    if multirun:
        assert hydra_cfg["sweeper"]["params"] and hydra_cfg["sweep"]["dir"] == f"multirun/experiments/{recipe}"
    else:
        assert hydra_cfg["run"]["dir"] == f"outputs/experiments/{recipe}"
    if entry in ("train", "variance", "bench"):  # evaluation recipes name a run to load, which a test cannot have
        check_config(cfg)


def test_estimators_recipe_sweeps_every_estimator_over_three_seeds():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=estimators"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    # every gradient estimator of the ELBO; iwae trains a different (tighter) bound, compared on its own
    estimators = {path.stem for path in (CONF_DIR / "estimator").glob("*.yaml")} - {"iwae"}
    assert set(params.estimator.split(",")) == estimators and params.seed == "0,1,2"
    assert cfg.trainer.epochs == 3 and cfg.hydra.launcher._target_.endswith("JoblibLauncher")


def test_help_lists_each_entry_points_own_groups():
    """`python train.py --help` lists the training groups; the task group is evaluate.py's alone, and
    evaluate.py's help (its own template: Hydra does not list a searchpath's groups) names every task."""
    def groups(script: str) -> set[str]:
        text = subprocess.run([sys.executable, script, "--help"], cwd=PROJECT_DIR, capture_output=True,
                              text=True, timeout=120, check=True).stdout
        listing = text.split("== Configuration groups ==")[1].split("== Config ==")[0]
        return {line.split(":")[0] for line in listing.splitlines()[2:] if ":" in line}

    assert groups("train.py") == {"data", "estimator", "experiment", "likelihood", "model", "prior", "optim", "schedule",
                                  "trainer"}
    tasks = {path.stem for path in (PROJECT_DIR / "tasks" / "conf" / "task").glob("*.yaml")}
    listing = subprocess.run([sys.executable, "evaluate.py", "--help"], cwd=PROJECT_DIR, capture_output=True,
                             text=True, timeout=120, check=True).stdout
    assert f"task: {', '.join(sorted(tasks))}\n" in listing and "estimator:" not in listing
