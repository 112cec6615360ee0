"""Runs written by earlier versions of the project, read in today's config and parameter names.

A checkpoint saves its resolved config and the param store by name; `.hydra/overrides.yaml` keeps the
command line. As variants moved out of the core into config groups, their keys and parameters moved:

    before the `likelihood` group   model.likelihood=NAME and its options beside it (model.scale,
                                    model.min_scale, model.fixed_scale, model.squeeze, model.components);
                                    a shared scale was the decoder's `raw_scale`
    before the `posterior` group    model.flows=F (F > 0: inverse autoregressive flows), the flows
                                    the encoder's `flows.*`
    before `model=resnet`           model.residual_blocks=R in the plain networks (R = 0: none)
    before recipes by study         experiment=NAME, now experiment=<study>/<step>

`todays_config` converts a saved config, `todays_param` a parameter's name (in the param store and the
optimizer's state), `todays_overrides` a command line; the weights, moments and RNG states are kept,
so an old run resumes exactly (tests/test_old_checkpoints.py).
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from vae.provenance import PROJECT_DIR

CONF_DIR = PROJECT_DIR / "conf"
# Keys added after checkpoints were first written, with the value an older checkpoint implies.
ADDED_KEYS = {"data.exclude_classes": [], "trainer.kl_warmup_epochs": 0, "trainer.nll_beta": 0,
              "trainer.nll_beta_target": "both", "prior._target_": "model.StandardNormal"}
# Classes that moved after checkpoints were first written: key -> {the old _target_: the new one}.
MOVED_TARGETS = {"estimator.baseline_net._target_": {"guide.BaselineNet": "vae.baselines.BaselineNet"}}
# model.<old key> -> likelihood.<its name today>
OLD_LIKELIHOOD_KEYS = {"likelihood": None, "scale": "scale", "min_scale": "min_scale", "fixed_scale": "fixed_scale",
                       "squeeze": "logit_lambda", "components": "components"}
# The start of an old parameter name -> the start of its name today.
RENAMED_PARAMS = {"decoder$$$raw_scale": "decoder$$$likelihood.scale.raw_scale",
                  "encoder$$$flows.": "encoder$$$posterior.flows."}
# Recipes from before conf/experiment/ was grouped by study: experiment=<old name> -> <study>/<step>.
OLD_RECIPES = {
    "default": "default/train", "uses": "default/applications", "estimators": "estimators/train",
    "variance": "estimators/variance", "bench": "speed/bench", "data_parallel": "speed/data_parallel",
    "faults": "reliability/faults", "heldout": "heldout_digit/train", "heldout_anomaly": "heldout_digit/anomaly",
    **{f"{old}{step}": f"{new}/{step.lstrip('_') or 'train'}"
       for old, new, steps in (("one_hour", "one_hour", ("", "_likelihood")),
                               ("one_hour_gaussian", "one_hour_gaussian", ("", "_likelihood", "_samples")),
                               ("one_hour_gaussian_loc", "one_hour_gaussian_loc", ("", "_likelihood", "_samples")),
                               ("one_hour_gray", "one_hour_logistic_mixture", ("", "_likelihood", "_samples")),
                               ("likelihoods", "likelihoods", ("", "_pixels", "_samples")),
                               ("likelihoods_beta", "beta_nll", ("", "_pixels", "_samples")),
                               ("likelihoods_beta_loc", "beta_nll_loc", ("", "_pixels", "_samples")),
                               ("levers", "bound_and_posterior", ("", "_likelihood")),
                               ("levers_training", "depth_latent_warmup", ("", "_likelihood")),
                               ("levers_schedule", "lr_schedule", ("", "_likelihood")),
                               ("levers_bf16", "bf16", ("", "_likelihood")),
                               ("best_one_hour", "best_one_hour", ("", "_likelihood", "_iwae_likelihood")))
       for step in steps},
}
PLAIN_NETWORKS = {"encoder": "guide.Encoder", "decoder": "model.Decoder"}


def option(group: str, name: str) -> DictConfig:
    """conf/<group>/<name>.yaml as it is today."""
    return OmegaConf.load(CONF_DIR / group / f"{name}.yaml")


def todays_param(name: str) -> str:
    for old, new in RENAMED_PARAMS.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


def todays_config(cfg: DictConfig) -> DictConfig:
    """`cfg` (a saved config, changed in place) with every key of ADDED_KEYS it lacks set to the value
    an older run implies, every _target_ of MOVED_TARGETS where its class is now, and the old model.*
    keys of the likelihood, the flows and the residual blocks made into today's groups."""
    for key, value in ADDED_KEYS.items():
        if OmegaConf.select(cfg, key) is None:
            OmegaConf.update(cfg, key, value, force_add=True)
    for key, moved in MOVED_TARGETS.items():
        if OmegaConf.select(cfg, key) in moved:
            OmegaConf.update(cfg, key, moved[OmegaConf.select(cfg, key)])
    if "likelihood" not in cfg:
        cfg.likelihood = likelihood_node(cfg.model)
    flows = cfg.model.pop("flows", 0)
    cfg.model.get("encoder", {}).pop("flows", None)
    if "posterior" not in cfg:
        cfg.posterior = posterior_node(flows)
    if cfg.model.encoder._target_ == PLAIN_NETWORKS["encoder"] and "residual_blocks" in cfg.model:
        blocks = cfg.model.pop("residual_blocks")
        for network in PLAIN_NETWORKS:
            cfg.model[network].pop("residual_blocks", None)
        if blocks:
            resnet = option("model", "resnet")
            cfg.model.residual_blocks = blocks
            for network in PLAIN_NETWORKS:
                cfg.model[network]._target_ = resnet[network]._target_
                cfg.model[network].residual_blocks = blocks
    return cfg


def posterior_node(flows: int) -> DictConfig:
    """The `posterior` node of a run from before the group: the Gaussian, or F = `flows` > 0 flows."""
    if not int(flows):
        return option("posterior", "gaussian")
    node = option("posterior", "iaf")
    node.flows = int(flows)
    return node


def old_likelihood_option(old: dict[str, Any]) -> str:
    """The conf/likelihood/ option of a run from before the group, from its old model.* keys (`old`,
    without the prefix; values as saved or as command-line strings)."""
    name = old.get("likelihood", "bernoulli")  # the first runs had the Bernoulli alone
    mixture = name == "discretized_logistic" and int(old.get("components", 1)) > 1
    return f"{name}_mixture" if mixture else name


def likelihood_node(model_cfg: DictConfig) -> DictConfig:
    """The `likelihood` node of a run from before the group: conf/likelihood/<its model.likelihood>.yaml
    with the values of its old keys, which leave `model_cfg` (and its decoder)."""
    old = {key: model_cfg.pop(key) for key in OLD_LIKELIHOOD_KEYS if key in model_cfg}
    for key in OLD_LIKELIHOOD_KEYS:
        model_cfg.get("decoder", {}).pop(key, None)
    node = option("likelihood", old_likelihood_option(old))
    for key, new_key in OLD_LIKELIHOOD_KEYS.items():
        if new_key in node and key in old:
            node[new_key] = old[key]
    return node


def todays_overrides(overrides: list[str]) -> list[str]:
    """A run's command-line overrides in today's keys, in their order:

    model.likelihood=NAME        likelihood=NAME (discretized_logistic_mixture with model.components > 1),
                                 and model.<option> likelihood.<its new name> where that likelihood has the
                                 option (the old config accepted, and ignored, the options of the others)
    model.flows=F                posterior=iaf (and posterior.flows=F unless F is its default);
                                 F = 0: posterior=gaussian
    model.residual_blocks=R      model=resnet (and model.residual_blocks=R unless R is its default); R = 0: model=conv
    experiment=NAME              experiment=<study>/<step> (OLD_RECIPES)
    """
    pairs = [override.partition("=")[::2] for override in overrides]
    old = {key.removeprefix("model."): value for key, value in pairs
           if key.startswith("model.") and key.removeprefix("model.") in OLD_LIKELIHOOD_KEYS}
    name = old_likelihood_option(old) if old else None
    likelihood_options = option("likelihood", name).keys() if name else ()
    current = []
    for override, (key, value) in zip(overrides, pairs):
        old_key = key.removeprefix("model.") if key.startswith("model.") else None
        if old_key == "likelihood":
            current.append(f"likelihood={name}")
        elif old_key in OLD_LIKELIHOOD_KEYS:
            if OLD_LIKELIHOOD_KEYS[old_key] in likelihood_options:
                current.append(f"likelihood.{OLD_LIKELIHOOD_KEYS[old_key]}={value}")
        elif key == "experiment" and value in OLD_RECIPES:
            current.append(f"experiment={OLD_RECIPES[value]}")
        elif old_key == "flows":
            current += variant(int(value), "posterior=gaussian", "posterior=iaf", "posterior.flows",
                               option("posterior", "iaf").flows)
        elif old_key == "residual_blocks" and "model=resnet" not in overrides:
            current += variant(int(value), "model=conv", "model=resnet", "model.residual_blocks",
                               option("model", "resnet").residual_blocks)
        else:
            current.append(override)
    return current


def variant(count: int, none: str, some: str, key: str, default: int) -> list[str]:
    """The overrides of an old count (of flows, of blocks): `none` for 0, else `some` with `key`=count unless
    that is the option's `default`."""
    return [none] if not count else [some, *([f"{key}={count}"] if count != default else [])]
