"""Runs from before the `likelihood` and `posterior` groups and `model=resnet` load and resume exactly.

Such a run's checkpoint named its likelihood in model.likelihood, its options beside it (model.scale,
model.min_scale, model.fixed_scale, model.squeeze, model.components, and the same under model.decoder),
kept a shared scale as the decoder's own parameter, `decoder$$$raw_scale`, its flows in model.flows
(and model.encoder.flows) as the encoder's `flows.*`, and its residual blocks in model.residual_blocks
of the plain networks (vae/old_runs.py). The old checkpoints
here are made honestly from new ones: a tiny run of today's code, its checkpoint.pt rewritten into
that layout (the networks' weights, the optimizer's moments and the RNG states stay as they are), so
a resume of it must give, number for number, what the run would have given without the stop.
"""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pyro
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from conftest import FAST, compose_config
from train import train
from vae import checkpoint
from vae.checkpoint import CHECKPOINT_NAME
from vae.old_runs import OLD_LIKELIHOOD_KEYS, OLD_RECIPES, RENAMED_PARAMS, todays_overrides
from vae.runs import load_run, resume_command

TIMING = {"seconds", "test_seconds", "wall_time"}
TINY = ["trainer=smoke", *FAST]  # FAST's trainer.epochs=2 over smoke's 1
# Each case: the run's command line before the group, and the same run's command line today.
CASES = {
    "gaussian_shared": (["model.likelihood=gaussian", "model.scale=shared"],
                        ["likelihood=gaussian", "likelihood.scale=shared"]),
    "mixture": (["model.likelihood=discretized_logistic", "model.components=3"],
                ["likelihood=discretized_logistic_mixture", "likelihood.components=3"]),
    "flows": (["model.flows=3"], ["posterior=iaf", "posterior.flows=3"]),
    "residual": (["model.residual_blocks=1"], ["model=resnet"]),
}
# Today's likelihood classes by the name model.likelihood gave them (the mixture: discretized_logistic, K > 1).
OLD_NAMES = {"model.Bernoulli": "bernoulli", "vae.likelihoods.Gaussian": "gaussian",
             "vae.likelihoods.LogitGaussian": "logit_gaussian", "vae.likelihoods.DiscretizedLogistic": "discretized_logistic",
             "vae.likelihoods.DiscretizedLogisticMixture": "discretized_logistic"}


def old_param(name: str) -> str:
    """A parameter's name of today as an old run saved it."""
    for old, new in RENAMED_PARAMS.items():
        if name.startswith(new):
            return old + name[len(new):]
    return name


def old_config(config: dict) -> dict:
    """A saved (resolved) config of today in the layout of before the group: the `likelihood` node
    gone, its name and options in model.<old key> and, resolved, under model.decoder, with the values
    conf/model/conv.yaml gave the options the likelihood does not have."""
    config = json.loads(json.dumps(config))  # a deep copy
    likelihood = config.pop("likelihood")
    old = {"likelihood": OLD_NAMES[likelihood["_target_"]], "scale": likelihood.get("scale", "pixel"),
           "min_scale": likelihood.get("min_scale", 1e-3), "fixed_scale": likelihood.get("fixed_scale", 0.1),
           "squeeze": likelihood.get("logit_lambda", 1e-3), "components": likelihood.get("components", 1)}
    config["model"].update(old)
    config["model"]["decoder"].update(old)  # the old conv.yaml's ${..likelihood} etc., resolved when saved
    posterior = config.pop("posterior")
    config["model"]["flows"] = config["model"]["encoder"]["flows"] = posterior.get("flows", 0)
    blocks = config["model"].get("residual_blocks", 0)
    config["model"]["residual_blocks"] = blocks
    for network, target in (("encoder", "guide.Encoder"), ("decoder", "model.Decoder")):
        config["model"][network].update(_target_=target, residual_blocks=blocks)
    return config


def make_old(run_dir: Path) -> None:
    """Rewrite `run_dir`'s checkpoint.pt (of today) into the layout of a checkpoint from before the group."""
    path = run_dir / CHECKPOINT_NAME
    contents = torch.load(path, weights_only=False)
    contents["config"] = old_config(contents["config"])
    for key in ("params", "constraints"):
        contents["param_store"][key] = {old_param(name): value for name, value in contents["param_store"][key].items()}
    contents["optimizer"] = {old_param(name): value for name, value in contents["optimizer"].items()}
    torch.save(contents, path)


def write_overrides(run_dir: Path, overrides: list[str]) -> None:
    """The command line's overrides, where Hydra keeps them (.hydra/overrides.yaml)."""
    (run_dir / ".hydra").mkdir(exist_ok=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))


def train_with(overrides: list[str], run_dir: Path) -> None:
    """`python train.py <overrides> hydra.run.dir=<run_dir>`, as train.main runs it (a resumed run
    goes on with its saved config, changed where the command line says), from seed 0."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    train(checkpoint.resumed_config(compose_config(*overrides), overrides, run_dir), run_dir)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(metrics: list[dict]) -> list[dict]:
    return [{key: value for key, value in m.items() if key not in TIMING} for m in metrics]


def epochs(overrides: list[str], count: int) -> list[str]:
    return [o for o in overrides if not o.startswith("trainer.epochs=")] + [f"trainer.epochs={count}"]


@pytest.fixture(scope="module", params=list(CASES))
def runs(request, tmp_path_factory):
    """(case, old run: 2 epochs, its checkpoint rewritten, with its old overrides; the same run as
    today saved it; an uninterrupted 3-epoch run of today's code)."""
    old_overrides, new_overrides = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    new, old, straight = root / "new", root / "old", root / "straight"
    train_with([*TINY, *new_overrides], new)
    assert checkpoint.read(new / CHECKPOINT_NAME)["config"]["likelihood"]  # today's layout
    shutil.copytree(new, old)
    make_old(old)
    write_overrides(old, [*TINY, *old_overrides])  # what train.py's Hydra recorded then
    train_with(epochs([*TINY, *new_overrides], 3), straight)
    yield request.param, old, new, straight
    pyro.clear_param_store()


def test_an_old_checkpoint_is_in_the_old_layout(runs):
    """The rewrite is what an old run saved: no likelihood node, the old keys, the old parameter name."""
    case, old, _, _ = runs
    saved = torch.load(old / CHECKPOINT_NAME, weights_only=False)
    assert "likelihood" not in saved["config"]
    model = saved["config"]["model"]
    assert {"likelihood", "scale", "min_scale", "fixed_scale", "squeeze", "components"} <= set(model)
    for key in ("likelihood", "scale", "min_scale", "fixed_scale", "squeeze", "components"):
        assert model["decoder"][key] == model[key], key
    names = [*saved["param_store"]["params"], *saved["param_store"]["constraints"], *saved["optimizer"]]
    assert not any("likelihood" in name for name in names)
    assert "posterior" not in saved["config"] and model["encoder"]["_target_"] == "guide.Encoder"
    assert not any("posterior" in name for name in names)
    if case == "gaussian_shared":
        assert (model["likelihood"], model["scale"]) == ("gaussian", "shared")
        assert all("decoder$$$raw_scale" in group for group in
                   (saved["param_store"]["params"], saved["param_store"]["constraints"], saved["optimizer"]))
    elif case == "mixture":
        assert (model["likelihood"], model["components"]) == ("discretized_logistic", 3)
    elif case == "flows":
        assert model["flows"] == model["encoder"]["flows"] == 3
        assert any(name.startswith("encoder$$$flows.2.") for name in names)
    else:
        assert model["residual_blocks"] == model["encoder"]["residual_blocks"] == model["decoder"]["residual_blocks"] == 1
        assert any(".residual." in name for name in names)


def test_an_old_checkpoint_reads_as_the_new_one(runs):
    """checkpoint.read and saved_config turn the old layout into today's: the same config (keys and
    values), the same parameter names and values, the same optimizer state."""
    _, old, new, _ = runs
    old_contents, new_contents = checkpoint.read(old / CHECKPOINT_NAME), checkpoint.read(new / CHECKPOINT_NAME)
    assert OmegaConf.to_container(checkpoint.saved_config(old_contents), resolve=True) == \
        OmegaConf.to_container(checkpoint.saved_config(new_contents), resolve=True)
    assert checkpoint.config_differences(checkpoint.saved_config(old_contents), checkpoint.saved_config(new_contents)) == ([], [])
    for key in ("params", "constraints"):
        assert list(old_contents["param_store"][key]) == list(new_contents["param_store"][key])
    for name, value in new_contents["param_store"]["params"].items():
        assert torch.equal(old_contents["param_store"]["params"][name], value), name
    assert list(old_contents["optimizer"]) == list(new_contents["optimizer"])
    for name, state in new_contents["optimizer"].items():
        assert old_contents["optimizer"][name]["param_groups"] == state["param_groups"], name
        for index, moments in state["state"].items():
            for moment, value in moments.items():
                assert torch.equal(torch.as_tensor(old_contents["optimizer"][name]["state"][index][moment]),
                                   torch.as_tensor(value)), (name, moment)


def test_an_old_run_resumes_exactly(runs, tmp_path):
    """Resumed for a third epoch (by `python train.py resume=<run> trainer.epochs=3`, the likelihood
    named nowhere on the command line: the saved config's), the old run logs every number of an
    uninterrupted 3-epoch run of today's code; so does a resume by the command resume_command gives."""
    _, old, _, straight = runs
    for how in ("plain", "resume_command"):
        run = tmp_path / how
        shutil.copytree(old, run)
        if how == "plain":
            overrides = ["trainer.epochs=3", f"resume={run}"]
        else:  # the command that continues the run, its old overrides made today's (resume=<run> last)
            overrides = epochs(shlex.split(resume_command(run))[2:], 3)
        train_with(overrides, run)
        assert [m["epoch"] for m in read_metrics(run)] == [0, 1, 2, 3], how
        assert without_timing(read_metrics(run)) == without_timing(read_metrics(straight)), how
        saved = checkpoint.read(run / CHECKPOINT_NAME)
        assert "likelihood" in saved["config"] and "likelihood" not in saved["config"]["model"], how  # saved anew today
        assert not any(name.startswith(tuple(RENAMED_PARAMS)) for name in saved["param_store"]["params"]), how
        assert "posterior" in saved["config"] and "flows" not in saved["config"]["model"], how


def test_load_run_rebuilds_the_old_runs_networks(runs):
    """vae.runs.load_run on the old run: the likelihood its config named, with its options, a decoder
    whose p(x|t) is the one the run had (the shared scale's trained value included), and the encoder
    with its flows or blocks, weight for weight."""
    case, old, new, _ = runs
    old_run, new_run = load_run(old, "cpu"), load_run(new, "cpu")
    assert type(old_run.decoder.likelihood) is type(new_run.decoder.likelihood)
    assert old_run.cfg.likelihood == new_run.cfg.likelihood and "likelihood" not in old_run.cfg.model
    assert old_run.state == new_run.state
    if case == "gaussian_shared":
        assert old_run.cfg.likelihood.scale == "shared" and old_run.decoder.likelihood.scale.source == "shared"
        raw_scale = old_run.decoder.likelihood.scale.raw_scale
        torch.testing.assert_close(raw_scale, new_run.decoder.likelihood.scale.raw_scale, rtol=0, atol=0)
        assert not torch.equal(raw_scale, torch.zeros_like(raw_scale))  # trained, not the fresh zeros
    elif case == "mixture":
        assert old_run.cfg.likelihood.components == old_run.decoder.likelihood.components == 3
    assert old_run.cfg.posterior == new_run.cfg.posterior and old_run.cfg.model == new_run.cfg.model
    for network in ("encoder", "decoder"):
        old_state, new_state = getattr(old_run, network).state_dict(), getattr(new_run, network).state_dict()
        for (name, value), (new_name, new_value) in zip(old_state.items(), new_state.items(), strict=True):
            assert name == new_name and torch.equal(value, new_value), name
    t = torch.randn(8, old_run.cfg.model.latent_dim, generator=torch.Generator().manual_seed(0))
    x = old_run.split(train=False)[0][:8]
    assert torch.equal(x, new_run.split(train=False)[0][:8])
    with torch.no_grad():
        p_old, p_new = old_run.decoder(t), new_run.decoder(t)
        assert type(p_old.base_dist) is type(p_new.base_dist) and p_old.event_shape == p_new.event_shape
        for attribute in ("loc", "scale", "logits"):
            if hasattr(p_new.base_dist, attribute):
                assert torch.equal(getattr(p_old.base_dist, attribute), getattr(p_new.base_dist, attribute)), attribute
        assert torch.equal(p_old.log_prob(x), p_new.log_prob(x))
        assert torch.equal(p_old.mean, p_new.mean)


@pytest.mark.parametrize("old,new", [
    (["model.likelihood=gaussian", "model.scale=shared", "seed=0"], ["likelihood=gaussian", "likelihood.scale=shared", "seed=0"]),
    (["model.likelihood=discretized_logistic", "model.components=3"],
     ["likelihood=discretized_logistic_mixture", "likelihood.components=3"]),
    (["model.components=4", "model.likelihood=discretized_logistic", "model.min_scale=0.01"],  # the order does not matter
     ["likelihood.components=4", "likelihood=discretized_logistic_mixture", "likelihood.min_scale=0.01"]),
    (["model.likelihood=discretized_logistic", "model.components=1", "model.scale=fixed"],  # K = 1: no mixture
     ["likelihood=discretized_logistic", "likelihood.scale=fixed"]),
    (["model.likelihood=logit_gaussian", "model.squeeze=0.01", "model.scale=fixed", "model.fixed_scale=0.2"],
     ["likelihood=logit_gaussian", "likelihood.logit_lambda=0.01", "likelihood.scale=fixed", "likelihood.fixed_scale=0.2"]),
    (["model.likelihood=gaussian", "model.min_scale=0.01", "model.latent_dim=4"],
     ["likelihood=gaussian", "likelihood.min_scale=0.01", "model.latent_dim=4"]),
    (["model.likelihood=bernoulli", "data=synthetic"], ["likelihood=bernoulli", "data=synthetic"]),
    (["likelihood=gaussian", "likelihood.scale=shared", "model.latent_dim=4"],  # today's: as they are
     ["likelihood=gaussian", "likelihood.scale=shared", "model.latent_dim=4"]),
    ([], []),
    (["model.flows=2", "seed=1"], ["posterior=iaf", "seed=1"]),  # conf/posterior/iaf.yaml's own count
    (["model.flows=3"], ["posterior=iaf", "posterior.flows=3"]),
    (["model.flows=0", "estimator=score"], ["posterior=gaussian", "estimator=score"]),
    (["model.residual_blocks=1", "model.latent_dim=32"], ["model=resnet", "model.latent_dim=32"]),
    (["model.residual_blocks=2"], ["model=resnet", "model.residual_blocks=2"]),
    (["model.residual_blocks=0"], ["model=conv"]),
    (["model=resnet", "model.residual_blocks=2", "posterior=iaf"], ["model=resnet", "model.residual_blocks=2", "posterior=iaf"]),
    (["experiment=levers", "estimator=iwae", "model.flows=2"],  # a job of the old lever sweep
     ["experiment=bound_and_posterior/train", "estimator=iwae", "posterior=iaf"]),
    (["experiment=one_hour_gray"], ["experiment=one_hour_logistic_mixture/train"]),
])
def test_todays_overrides_map_old_overrides_to_todays(old, new):
    assert todays_overrides(old) == new
    assert todays_overrides(new) == new  # today's stay as they are
    compose_config(*FAST, *new)  # they compose


def test_every_old_recipe_name_is_a_recipe_today():
    for old, new in OLD_RECIPES.items():
        assert (checkpoint.CONF_DIR / "experiment" / f"{new}.yaml").is_file(), (old, new)


def test_todays_overrides_compose_the_config_the_old_ones_did():
    """The mapped command line composes the likelihood the old one described."""
    cfg = compose_config(*FAST, *todays_overrides(["model.likelihood=discretized_logistic", "model.components=3",
                                                    "model.min_scale=0.01"]))
    assert cfg.likelihood._target_ == "vae.likelihoods.DiscretizedLogisticMixture"
    assert (cfg.likelihood.components, cfg.likelihood.min_scale) == (3, 0.01)
    cfg = compose_config(*FAST, *todays_overrides(["model.likelihood=logit_gaussian", "model.squeeze=0.01",
                                                    "model.scale=shared"]))
    assert cfg.likelihood._target_ == "vae.likelihoods.LogitGaussian"
    assert (cfg.likelihood.logit_lambda, cfg.likelihood.scale) == (0.01, "shared")


def test_resume_command_of_a_run_with_old_overrides_composes(tmp_path):
    """A run whose .hydra/overrides.yaml holds the old keys (and a resume= of its own, which goes): the
    command resume_command gives names today's, composes, and describes the same run."""
    run = tmp_path / "run"
    run.mkdir()
    write_overrides(run, [*FAST, "model.likelihood=discretized_logistic", "model.components=3", "resume=elsewhere"])
    command = shlex.split(resume_command(run))
    assert command[:2] == ["python", "train.py"] and command[-1] == f"resume={run}"
    assert command[2:-1] == [*FAST, "likelihood=discretized_logistic_mixture", "likelihood.components=3"]
    cfg = compose_config(*command[2:])
    assert cfg.likelihood._target_ == "vae.likelihoods.DiscretizedLogisticMixture" and cfg.likelihood.components == 3
    assert cfg.resume == str(run) and cfg.data.subset == 512 and cfg.model.latent_dim == 4


@pytest.mark.parametrize("old,target,options", [
    (["model.likelihood=gaussian", "model.scale=shared", "model.min_scale=0.01"], "vae.likelihoods.Gaussian",
     {"scale": "shared", "min_scale": 0.01}),
    # K > 1 needed scale=pixel (the old check refused any other), so a command could name it: the mixture's own
    (["model.likelihood=discretized_logistic", "model.scale=pixel", "model.components=3"],
     "vae.likelihoods.DiscretizedLogisticMixture", {"components": 3}),
    # the old config took (and ignored) the options of other likelihoods: they are left out
    (["model.likelihood=gaussian", "model.squeeze=0.01", "model.components=2"], "vae.likelihoods.Gaussian", {"scale": "pixel"}),
    (["model.scale=shared", "model.fixed_scale=0.2"], "model.Bernoulli", {}),
])
def test_resume_command_of_old_overrides_composes_the_runs_likelihood(tmp_path, old, target, options):
    run = tmp_path / "run"
    run.mkdir()
    write_overrides(run, [*FAST, *old])
    command = shlex.split(resume_command(run))
    assert not any(o.split("=")[0].removeprefix("model.") in OLD_LIKELIHOOD_KEYS
                   for o in command[2:] if o.startswith("model."))
    cfg = compose_config(*command[2:])
    assert cfg.likelihood._target_ == target
    assert {key: cfg.likelihood[key] for key in options} == options
