"""The rule of every key of a training config (conf/config.yaml and its groups), in one table.

`RULES` maps each key, as its dotted path, to what its value must be:

- a `Check`: a test of the value, what a refusal says ("<key>=<value>: <says>") and values it refuses
  (override strings, which tests/test_config.py tries for every key of every option);
- a `Mirror`: an interpolation that hands a key of `model` to a network's constructor
  (`model.encoder.latent_dim: ${..latent_dim}`), checked by that key's rule;
- an `Elsewhere`: not a value this table checks, and what checks it (the `likelihood` and `prior`
  classes check their own keys when they are built; `device` and `threads` have checks of their
  own, shared with evaluate.py; ...).

vae.config.check_config refuses the first key whose value breaks its rule. tests/test_config.py
flattens every option of every group and fails on a key that no rule covers (`unruled`), so a new
option's key cannot arrive unchecked: it comes with its rule here.
"""
from __future__ import annotations

import math
import pydoc
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

GROUPS = ("data", "model", "likelihood", "prior", "posterior", "estimator", "optim", "schedule", "trainer")
TOP_LEVEL = ("seed", "device", "threads", "resume")  # conf/config.yaml's own keys (an entry point may add more)


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(value: object) -> bool:
    return is_number(value) and math.isfinite(value)


def is_list(value: object) -> bool:
    return OmegaConf.is_list(value) or isinstance(value, (list, tuple))


def is_positive_int(value: object) -> bool:
    return is_int(value) and value > 0


def is_positive_ints(value: object) -> bool:
    """A non-empty list of positive integers (layer widths, hidden units)."""
    return is_list(value) and len(value) > 0 and all(is_positive_int(v) for v in value)


@dataclass(frozen=True)
class Check:
    """`test(value)`: the value can work; `says`: the refusal's end, after "<key>=<value>: "; `bad`:
    values it refuses, as they are written in an override (tests/test_config.py tries each)."""
    test: Callable[[Any], bool]
    says: str
    bad: tuple[str, ...]


@dataclass(frozen=True)
class Mirror:
    """`${..name}`: a network's argument that copies the key `source`, and is checked by its rule (a
    resumed run's saved config holds the copies as values; vae/build.py checks that the networks' latent
    dimensions agree)."""
    source: str

    @property
    def says(self) -> str:
        return RULES[self.source].says


@dataclass(frozen=True)
class Elsewhere:
    """Not a value this table checks: `why` says what checks it."""
    why: str


Rule = Check | Mirror | Elsewhere


def positive_int(says: str = "must be a positive integer") -> Check:
    return Check(is_positive_int, says, ("0", "-1", "1.5", "true", "x"))


def whole(says: str) -> Check:
    return Check(lambda v: is_int(v) and v >= 0, says, ("-1", "1.5", "true", "x"))


def boolean(says: str = "must be true or false") -> Check:
    return Check(lambda v: isinstance(v, bool), says, ("maybe", "1", "null"))


def optional_boolean(says: str) -> Check:
    return Check(lambda v: v is None or isinstance(v, bool), says, ("maybe", "1"))


def between(low: float, high: float, says: str, bad: tuple[str, ...], low_open: bool = False,
            high_open: bool = False) -> Check:
    """A finite number from `low` to `high` (math.inf: no bound), each end included unless open."""
    def test(v: object) -> bool:
        return (is_finite(v) and (low < v if low_open else low <= v)
                and (v < high if high_open else v <= high))
    return Check(test, says, bad)


def path(says: str) -> Check:
    return Check(lambda v: isinstance(v, str) and v != "", says, ("5", "''", "null"))


def locate(name: str) -> Any:
    """The object that the dotted `name` names (module.Class), or None; quietly (Hydra's get_object logs
    an error before it raises, a second line for a refusal that must be one)."""
    try:
        return pydoc.locate(name)
    except pydoc.ErrorDuringImport:
        return None


def targets(cfg: DictConfig, key: str, kind: type) -> bool:
    """Whether `key`._target_ of the config names `kind` or a subclass of it: how an extension's `refuses`
    asks what another group holds (vae/priors.py, vae/dreg.py, vae/hierarchy.py)."""
    target = locate(str(OmegaConf.select(cfg, f"{key}._target_")))
    return isinstance(target, type) and issubclass(target, kind)


def importable(says: str = "cannot be imported; give a class as module.Class") -> Check:
    return Check(lambda v: isinstance(v, str) and callable(locate(v)), says, ("vae.nope.Nope", "5"))


def exactly(expected: object, says: str, bad: tuple[str, ...]) -> Check:
    return Check(lambda v: type(v) is type(expected) and v == expected, says, bad)


SEED = Check(lambda v: is_int(v) and 0 <= v < 2**32, "must be an integer from 0 to 2**32 - 1",
             ("-1", "4294967296", "1.5", "true"))
BETAS = Check(lambda v: is_list(v) and len(v) == 2 and all(is_finite(b) and 0 <= b < 1 for b in v),
              "must be two numbers in [0, 1), the decay rates of Adam's moment estimates, e.g. [0.9,0.999]",
              ("0.9", "[0.9]", "[0.9,1.5]", "[0.9,nan]"))
NETWORK_KEYS = ("latent_dim", "channels", "hidden_dim", "residual_blocks")  # model.* the networks take

RULES: dict[str, Rule] = {
    # conf/config.yaml
    "seed": SEED,
    "device": Elsewhere("vae.config.check_device: auto, cpu, or a CUDA device this machine has"),
    "threads": Elsewhere("vae.config.check_threads: null or at most one per available core"),
    "resume": Elsewhere("null or a run directory or checkpoint: vae/checkpoint.py refuses a path with no checkpoint"),
    # data (conf/data/)
    "data.dataset._target_": importable(),
    "data.dataset.download": boolean("must be true (fetched into data.root when missing) or false"),
    "data.dataset.num_train": positive_int(),
    "data.dataset.num_test": positive_int(),
    "data.dataset.channels": Check(lambda v: is_int(v) and v in (1, 3), "must be 1 (gray, L) or 3 (colour, RGB)",
                                   ("2", "0", "true", "x")),
    "data.dataset.image_size": positive_int("must be a positive integer, the side of the square images in pixels"),
    "data.dataset.test_fraction": between(0, 1, "must be a number in (0, 1), the share of images held out for testing",
                                          ("0", "1", "-0.1", "1.5", "nan", "true", "x"), low_open=True, high_open=True),
    "data.dataset.split_seed": SEED,
    "data.dataset.cache_dir": Check(lambda v: v is None or (isinstance(v, str) and v != ""),
                                    "must be null (decode every run) or the folder of the decoded images' cache",
                                    ("''", "5", "true")),
    "data.dataset.attribute": Check(lambda v: v is None or (isinstance(v, str) and v != ""),
                                    "must be null (no labels) or one of CelebA's 40 attributes, e.g. Smiling",
                                    ("''", "5", "true")),
    "data.root": path("must be a folder, the path that holds the dataset's files"),
    "data.files": path("must be the folder of the dataset's files under data.root"),
    "data.subset": Check(lambda v: v is None or (is_int(v) and v > 0), "must be null or a positive integer",
                         ("0", "-1", "1.5", "true")),
    "data.exclude_classes": Check(lambda v: OmegaConf.is_list(v) and all(is_int(label) for label in v),
                                  "must be a list of labels, e.g. [3] or []", ("3", "[a]", "[1.5]", "[true]")),
    "data.batch_size": positive_int(),
    "data.drop_last": boolean("must be true (every batch full) or false"),
    # model (conf/model/)
    "model.latent_dim": positive_int(),
    "model.channels": Check(lambda v: OmegaConf.is_list(v) and len(v) > 0 and all(is_int(c) and c > 0 for c in v),
                            "must be a non-empty list of positive integers", ("[]", "[0]", "[8,x]", "8", "[true]")),
    "model.hidden_dim": positive_int(),
    "model.residual_blocks": positive_int("must be a positive number of blocks per resolution (model=conv for none)"),
    "model.encoder._target_": importable(),
    "model.decoder._target_": importable(),
    **{f"model.{net}.{key}": Mirror(f"model.{key}") for net in ("encoder", "decoder") for key in NETWORK_KEYS},
    # p(x|t), p(t) and q(t|x): their classes check their own keys when built (vae/likelihoods.py, priors.py, flows.py)
    "likelihood.*": Elsewhere("the likelihood's class, when it is built (vae.config.instantiate_checked)"),
    "prior.*": Elsewhere("the prior's class, when it is built (vae.config.instantiate_checked)"),
    "posterior.*": Elsewhere("the posterior's class, when it is built (vae.config.instantiate_checked)"),
    "posterior.*.*": Elsewhere("the posterior's class, which builds the posterior it holds (vae/hierarchy.py)"),
    # estimator (conf/estimator/)
    "estimator.reparameterized": boolean("must be true (reparameterized samples) or false (the score function)"),
    "estimator.elbo._target_": Elsewhere("vae.config.check_estimator: importable, and fits the estimator"),
    "estimator.elbo.num_particles": positive_int(),
    "estimator.baseline.use_decaying_avg_baseline": boolean(),
    "estimator.baseline.baseline_beta": between(0, 1, "must be a number in [0, 1), the decay of the average baseline",
                                                ("1", "5", "-0.1", "nan", "true"), high_open=True),
    "estimator.baseline_net._target_": importable(),
    "estimator.baseline_net.hidden_dim": positive_int(),
    # optim (conf/optim/): a Pyro optimizer and the arguments of its torch optimizer
    "optim._target_": importable(),
    "optim._convert_": exactly("all", "must be all (Pyro wants a plain dict of optim_args)", ("none", "true")),
    "optim.optim_args.lr": between(0, math.inf, "the learning rate must be a finite number > 0",
                                   ("0", "-1e-3", "inf", "nan", "true", "x"), low_open=True),
    "optim.optim_args.betas": BETAS,
    "optim.optim_args.eps": between(0, math.inf, "must be a finite number > 0", ("0", "-1", "nan", "true"),
                                    low_open=True),
    "optim.optim_args.weight_decay": between(0, math.inf, "must be a finite number >= 0", ("-1", "inf", "true")),
    "optim.optim_args.amsgrad": boolean(),
    "optim.optim_args.maximize": exactly(False, "must be false (the loss, -ELBO, is minimized)", ("true", "0")),
    "optim.optim_args.foreach": optional_boolean("must be null (torch's choice), true or false"),
    "optim.optim_args.fused": optional_boolean("must be null (torch's choice), true (one fused kernel) or false"),
    "optim.optim_args.decoupled_weight_decay": boolean(),
    "optim.optim_args.clip_norm": between(0, math.inf, "must be a finite number > 0, the bound of each gradient",
                                          ("0", "-1", "inf", "nan", "true"), low_open=True),
    "optim.optim_args.lrd": between(0, 1, "must be a number in (0, 1], the learning rate's decay per step",
                                    ("0", "1.5", "-1", "nan", "true"), low_open=True),
    "optim.optim_args.centered_variance": boolean(),
    # schedule (conf/schedule/): a torch scheduler and its arguments
    "schedule._target_": importable(),
    "schedule._partial_": exactly(True, "must be true (the optimizer is Pyro's to give)", ("false", "1")),
    "schedule.T_max": positive_int("must be a positive integer, the epochs of the half cosine"),
    "schedule.eta_min": between(0, math.inf, "must be a finite number >= 0, the last epoch's learning rate",
                                ("-1", "nan", "inf", "true", "x")),
    "schedule.factor": between(0, 1, "must be a number in (0, 1], the learning rate's share for total_iters epochs",
                               ("0", "-3", "1.5", "nan", "true"), low_open=True),
    "schedule.total_iters": whole("must be a whole number of epochs"),
    "schedule.last_epoch": exactly(-1, "must be -1 (a resumed run's scheduler comes back from its checkpoint)",
                                   ("0", "x")),
    # trainer (conf/trainer/)
    "trainer.epochs": positive_int(),
    "trainer.max_minutes": Check(lambda v: v is None or (is_finite(v) and v > 0),
                                 "must be null (no time budget) or > 0", ("0", "-1", "inf", "nan", "true")),
    "trainer.test_every": positive_int(),
    "trainer.kl_warmup_epochs": whole("must be a whole number of epochs, 0 for no warm-up"),
    "trainer.nll_beta": between(0, 1, "must be a number from 0 (the ELBO) to 1", ("-0.5", "1.5", "nan", "true")),
    "trainer.nll_beta_target": Check(lambda v: v in ("both", "loc") and isinstance(v, str),
                                     "must be both (the pixel's log p(x|t) weighed) or loc (the mean's gradient only)",
                                     ("scale", "1", "true")),
    "trainer.num_grid_images": positive_int(),
    "trainer.keep_checkpoints": boolean(),
    "trainer.check_every_step": boolean(),
    "trainer.channels_last": boolean(),
    "trainer.bf16": boolean(),
    "trainer.compile": boolean(),
    "trainer.switch_after_minutes": Check(lambda v: v is None or (is_finite(v) and v >= 0),
                                          "must be null (no switch) or a number of minutes >= 0", ("-1", "inf", "nan", "true")),
    "trainer.switch_elbo": Elsewhere("vae.config.check_estimator: null, or an ELBO with trainer.switch_after_minutes"),
    "trainer.switch_elbo.*": Elsewhere("vae.config.check_estimator: the ELBO's class and its arguments"),
}
# Keys every training config holds: an absent one is refused as None.
REQUIRED = ("seed", "data.batch_size", "data.exclude_classes", "model.latent_dim", "model.channels", "model.hidden_dim",
            "estimator.elbo.num_particles", "optim.optim_args.lr", "trainer.epochs", "trainer.test_every",
            "trainer.num_grid_images")


def rule_for(key: str) -> Rule | None:
    """The rule of a dotted key: its own entry, else a pattern's (`*` stands for one key), else None."""
    if key in RULES:
        return RULES[key]
    for pattern, rule in RULES.items():
        if "*" in pattern and re.fullmatch(re.escape(pattern).replace(r"\*", r"[^.]+"), key):
            return rule
    return None


def leaves(cfg: DictConfig) -> Iterator[tuple[str, bool]]:
    """(dotted key, whether it is an interpolation) of every value of the training config: the keys of
    conf/config.yaml and of each group's nodes, a list being one value."""
    def walk(node: DictConfig, prefix: str) -> Iterator[tuple[str, bool]]:
        for key in node.keys():
            child = node._get_node(key)
            if OmegaConf.is_dict(child) and not child._is_none():
                yield from walk(child, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", OmegaConf.is_interpolation(node, key)

    for key in TOP_LEVEL:
        if key in cfg:
            yield key, OmegaConf.is_interpolation(cfg, key)
    for group in GROUPS:
        node = cfg._get_node(group) if group in cfg else None
        if node is not None and OmegaConf.is_dict(node) and not node._is_none():
            yield from walk(node, f"{group}.")


def unruled(cfg: DictConfig) -> list[str]:
    """The keys of `cfg` that no rule covers (tests/test_config.py: none, for every option of every group)."""
    return [key for key, _ in leaves(cfg) if rule_for(key) is None]


def refusal(cfg: DictConfig) -> str | None:
    """The first key whose value breaks its rule, as "<key>=<value>: <what it must be>", or None.
    Plain values come before interpolations, so `trainer.epochs=0` is blamed and not the
    `schedule.T_max` that copies it. A key no rule covers is left alone here (see `unruled`)."""
    present = list(leaves(cfg))
    keys = [key for key, linked in present if not linked] + [key for key, linked in present if linked]
    keys += [key for key in REQUIRED if key not in keys]  # absent: refused as None
    for key in keys:
        rule = rule_for(key)
        if isinstance(rule, Elsewhere) or rule is None:
            continue
        try:
            value = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
        except Exception as error:  # noqa: BLE001 - an interpolation that cannot be resolved
            return f"{key}: {str(error).splitlines()[0]}"
        if isinstance(rule, Mirror):
            rule = RULES[rule.source]
        if not rule.test(value):
            return f"{key}={value!r}: {rule.says}"
    return None
