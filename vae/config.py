"""The checks a config passes before any work starts, and the device it names.

Hydra already refuses an unknown option (`estimator=nope`) and lists the choices; these checks
refuse a value that composes but cannot work, in one line that names the key and the value.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.errors import InstantiationException
from hydra.utils import get_class, get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from pyro.infer import (JitTrace_ELBO, JitTraceEnum_ELBO, JitTraceGraph_ELBO, JitTraceMeanField_ELBO,
                        TraceGraph_ELBO, TraceMeanField_ELBO)

from vae.beta_nll import weighs
from vae.iwae import IWAE_ELBO

POSITIVE_INTS = ("model.latent_dim", "model.hidden_dim", "data.batch_size", "trainer.epochs",
                 "trainer.test_every", "trainer.num_grid_images", "estimator.elbo.num_particles")
JIT_ELBOS = (JitTrace_ELBO, JitTraceGraph_ELBO, JitTraceMeanField_ELBO, JitTraceEnum_ELBO)


class ConfigError(ValueError):
    """A config value that training cannot use."""


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_config(cfg: DictConfig) -> None:
    """Stop before any work, naming the key and the value, when a setting cannot work."""
    for key in POSITIVE_INTS:
        value = OmegaConf.select(cfg, key)
        if not is_int(value) or value <= 0:
            raise ConfigError(f"{key}={value!r}: must be a positive integer")
    if not is_int(cfg.seed) or not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed={cfg.seed!r}: must be an integer from 0 to 2**32 - 1")
    channels = cfg.model.channels
    if not channels or any(not is_int(c) or c <= 0 for c in channels):
        raise ConfigError(f"model.channels={list(channels)!r}: must be a non-empty list of positive integers")
    likelihood = instantiate_checked(cfg.likelihood, "likelihood", image_channels=1)  # its own keys; colour: with the data
    instantiate_checked(cfg.prior, "prior", latent_dim=cfg.model.latent_dim)  # its own keys
    flows = cfg.model.get("flows", 0)
    if not is_int(flows) or flows < 0:
        raise ConfigError(f"model.flows={flows!r}: must be a whole number of flows, 0 for the Gaussian q(t|x)")
    blocks = cfg.model.get("residual_blocks", 0)
    if not is_int(blocks) or blocks < 0:
        raise ConfigError(f"model.residual_blocks={blocks!r}: must be a whole number of blocks per resolution, 0 for none")
    subset = cfg.data.subset
    if subset is not None and (not is_int(subset) or subset <= 0):
        raise ConfigError(f"data.subset={subset!r}: must be null or a positive integer")
    excluded = cfg.data.get("exclude_classes")
    if not OmegaConf.is_list(excluded) or any(not is_int(label) for label in excluded):
        raise ConfigError(f"data.exclude_classes={excluded!r}: must be a list of labels, e.g. [3] or []")
    warmup = cfg.trainer.get("kl_warmup_epochs", 0)
    if not is_int(warmup) or warmup < 0:
        raise ConfigError(f"trainer.kl_warmup_epochs={warmup!r}: must be a whole number of epochs, 0 for no warm-up")
    nll_beta = cfg.trainer.get("nll_beta", 0)
    if not is_number(nll_beta) or not 0 <= nll_beta <= 1:
        raise ConfigError(f"trainer.nll_beta={nll_beta!r}: must be a number from 0 (the ELBO) to 1")
    target = cfg.trainer.get("nll_beta_target", "both")
    if target not in ("both", "loc"):
        raise ConfigError(f"trainer.nll_beta_target={target!r}: must be both (the pixel's log p(x|t) weighed) or loc "
                          "(the mean's gradient only)")
    if nll_beta and not weighs(likelihood):
        raise ConfigError(f"trainer.nll_beta={nll_beta} with likelihood._target_={cfg.likelihood._target_}: the beta-NLL "
                          "weighs the Gaussian's pixels by their scale; use likelihood=gaussian or trainer.nll_beta=0")
    max_minutes = cfg.trainer.get("max_minutes")
    if max_minutes is not None and (not is_number(max_minutes) or not 0 < max_minutes < math.inf):
        raise ConfigError(f"trainer.max_minutes={max_minutes!r}: must be null (no time budget) or > 0")
    t_max = OmegaConf.select(cfg, "schedule.T_max")
    if t_max is not None and (not is_int(t_max) or t_max < cfg.trainer.epochs):
        raise ConfigError(f"schedule.T_max={t_max!r} with trainer.epochs={cfg.trainer.epochs}: the cosine would rise "
                          "again after T_max epochs; set schedule.T_max >= trainer.epochs (its default is trainer.epochs)")
    lr = OmegaConf.select(cfg, "optim.optim_args.lr")
    if not is_number(lr) or not 0 < lr < math.inf:
        raise ConfigError(f"optim.optim_args.lr={lr!r}: the learning rate must be a finite number > 0")
    check_threads(cfg)
    check_estimator(cfg)
    check_device(cfg)


def instantiate_checked(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """`instantiate(node, **kwargs)` for an extension that checks its own keys when it is built (a
    likelihood, ...): the ValueError it raises, which names its key, becomes a ConfigError; a `_target_`
    that cannot be imported is named as `key`._target_."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, ValueError):
            raise ConfigError(str(error.__cause__)) from None
        cause = error.__cause__  # a wrong keyword: TypeError; a target not found: ImportError
        if isinstance(cause, ImportError) or cause is None:
            raise ConfigError(f"{key}._target_={node.get('_target_')}: cannot be imported; give a class as "
                              f"module.Class (conf/{key}/ lists the options)") from error
        raise ConfigError(f"{key}._target_={node.get('_target_')}: {type(cause).__name__}: "
                          f"{str(cause).splitlines()[0] if str(cause) else ''}") from error


def check_device(cfg: DictConfig) -> None:
    """`device`, for every entry point alike: auto, cpu, or a CUDA device this machine has."""
    device = str(cfg.device)
    if device != "auto" and not (device == "cpu" or device.startswith("cuda")):
        raise ConfigError(f"device={device!r}: must be auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r}: CUDA is not available on this machine; use device=cpu or auto")


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity where the system says, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_threads(cfg: DictConfig) -> None:
    """`threads`, for every entry point alike: torch's CPU threads, at most one per available core
    (more only make each step wait for the others)."""
    threads = cfg.get("threads")
    if threads is not None and (not is_int(threads) or threads <= 0):
        raise ConfigError(f"threads={threads!r}: must be null (torch's default) or a positive integer")
    if threads is not None and threads > available_cores():
        raise ConfigError(f"threads={threads}: this process may use {available_cores()} CPU cores; give at most that "
                          "many, or null for torch's default")


def use_threads(cfg: DictConfig) -> None:
    """Run torch on `cfg.threads` CPU threads (null: leave torch's default, one per core)."""
    check_threads(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(cfg.threads)


def check_estimator(cfg: DictConfig) -> None:
    """The ELBO, the estimator and the baselines must fit together (else Pyro fails deep inside,
    or silently ignores the baseline)."""
    target = cfg.estimator.elbo._target_
    try:
        elbo_class = get_class(target)
    except Exception as error:
        raise ConfigError(f"estimator.elbo._target_={target}: cannot be imported ({error})") from error
    score = not cfg.estimator.reparameterized
    if score and issubclass(elbo_class, TraceMeanField_ELBO):
        raise ConfigError(f"estimator.elbo._target_={target} with estimator.reparameterized=false: an "
                          "analytic-KL ELBO needs a reparameterized guide; use estimator=reparam or a Trace ELBO")
    if score and issubclass(elbo_class, IWAE_ELBO):
        raise ConfigError(f"estimator.elbo._target_={target} with estimator.reparameterized=false: the importance-"
                          "weighted bound is trained through reparameterized samples; use estimator=iwae as it is")
    if score and cfg.model.get("flows", 0):
        raise ConfigError(f"model.flows={cfg.model.flows} with estimator.reparameterized=false: a flow posterior "
                          "is trained through reparameterized samples; use estimator=reparam or estimator=iwae")
    for key, reweighs in (("kl_warmup_epochs", "the warm-up weighs the ELBO's KL, a new weight at every step"),
                          ("nll_beta", "the beta-NLL weighs the ELBO's log p(x|t), pixel by pixel")):
        if cfg.trainer.get(key, 0) and issubclass(elbo_class, (IWAE_ELBO, *JIT_ELBOS)):
            raise ConfigError(f"trainer.{key}={cfg.trainer[key]} with estimator.elbo._target_={target}: {reweighs} "
                              "(not inside the IW bound's log-mean-exp, nor in a JIT ELBO's trace, which is compiled "
                              "once); use it with a Trace ELBO, e.g. estimator=reparam")
    baseline_keys = [f"estimator.{key}" for key in ("baseline", "baseline_net") if cfg.estimator.get(key)]
    if baseline_keys and not (score and issubclass(elbo_class, TraceGraph_ELBO)):
        raise ConfigError(f"{' and '.join(baseline_keys)} with estimator.elbo._target_={target}, estimator."
                          f"reparameterized={cfg.estimator.reparameterized}: baselines need TraceGraph_ELBO and "
                          "a score-function guide (reparameterized=false)")
    if cfg.trainer.get("channels_last") and issubclass(elbo_class, JIT_ELBOS):
        raise ConfigError(f"trainer.channels_last=true with estimator.elbo._target_={target}: Pyro's JIT trace "
                          "fails on channels-last weights (it takes them for constants); use one or the other")
    if OmegaConf.select(cfg, "estimator.baseline.use_decaying_avg_baseline") and not cfg.data.drop_last:
        raise ConfigError("estimator.baseline.use_decaying_avg_baseline=true with data.drop_last=false: the "
                          "average has the batch's shape, so every batch must be full (data.drop_last=true)")


def resolve_device(name: str) -> torch.device:
    """`device=auto` is CUDA when there is a GPU, else the CPU; any other name is taken as it is."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resume_directory(resume: str | None, fresh: str) -> str:
    """hydra.run.dir (conf/config.yaml): the directory of the run that `resume` continues in
    place (resume=<run dir> or <run dir>/checkpoint.pt), else `fresh`, a new run's directory.
    Under torchrun, a rank > 0 gets a scratch directory: it trains in rank 0's (vae/distributed.py)."""
    if os.environ.get("TORCHELASTIC_RUN_ID") and os.environ.get("RANK", "0") != "0":
        return str(Path(tempfile.gettempdir()) / f"vae-{os.environ['TORCHELASTIC_RUN_ID']}-rank{os.environ['RANK']}")
    path = Path(str(resume)).expanduser() if resume is not None else None
    if path is not None and path.is_dir():
        return str(path)
    if path is not None and path.name == "checkpoint.pt":
        return str(path.parent)
    return fresh


def resume_subdirectory(resume: str | None, fresh: str, stamp: str, output_dir: str | None = None) -> str:
    """hydra.output_subdir: a run continued in place (resume=<its dir>, or a command whose output
    directory already holds a run's checkpoint.pt: a requeued job, a sweep run again, or a command
    that will be refused) keeps its .hydra/ (its overrides and config) and gets .hydra/resume-<stamp>/
    for this invocation's."""
    in_place = resume_directory(resume, "") != "" or (output_dir is not None and (Path(output_dir) / "checkpoint.pt").is_file())
    return f"{fresh}/resume-{stamp}" if in_place else fresh


def unusable_directory(path: Path) -> str | None:
    """Why `path` cannot be an output directory (a file where a directory must be, a folder this process
    may not write in), or None."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory" if existing != path else "it is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable" if existing != path else "it is not writable"
    return None


class RefuseBeforeWriting(Callback):
    """A Hydra callback: what can be refused from the config alone is refused in one line before Hydra
    makes the output directory, so a refused command leaves nothing behind. An output directory
    (hydra.run.dir, hydra.sweep.dir) that cannot be made or written; and, for a single new run, the
    entry point's own `check` (a function of the config that raises ConfigError), e.g.
    vae.config.check_config. A run that continues (resume=, or a directory holding its checkpoint)
    is checked later, against its saved config; a sweep's jobs each record their own refusal."""

    def __init__(self, check: str | None = None) -> None:
        self.check = get_method(check) if check else None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)  # as run_job will: hydra.run.dir may read ${hydra:...}
        run_dir = Path(str(config.hydra.run.dir))
        self.refuse_unusable("hydra.run.dir", run_dir)
        continues = config.get("resume") is not None or (run_dir / "checkpoint.pt").is_file()
        if self.check is not None and not continues:
            try:
                self.check(config)
            except ConfigError as error:
                sys.exit(f"error: {error}")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.refuse_unusable("hydra.sweep.dir", Path(str(config.hydra.sweep.dir)))

    @staticmethod
    def refuse_unusable(key: str, path: Path) -> None:
        problem = unusable_directory(path.expanduser().absolute())
        if problem is not None:
            sys.exit(f"error: {key}={path}: {problem}; give another directory")


def register_resolvers() -> None:
    """Before @hydra.main of an entry point that composes conf/config.yaml: its hydra.run.dir and
    output_subdir use these."""
    OmegaConf.register_new_resolver("resume_dir", resume_directory, replace=True)
    OmegaConf.register_new_resolver("resume_subdir", resume_subdirectory, replace=True)


def positive_int(value: object) -> bool:
    return is_int(value) and value > 0


# Every option of an evaluation task (tasks/conf/task/*.yaml), by name: what it must be.
TASK_RULES = {
    **{key: (positive_int, "a positive integer") for key in (
        "num_particles", "batch_size", "particles_per_chunk", "steps", "fit_steps", "num_samples", "num_images",
        "num_pairs", "manifold_steps", "max_iter", "num_shown", "scored_samples")},
    **{key: (lambda v: v is None or positive_int(v), "null or a positive integer")
       for key in ("max_images", "whole_split_particles")},
    **{key: (lambda v: v is None or (is_int(v) and v >= 0), "null or an integer >= 0") for key in ("sample_seed",)},
    **{key: (lambda v: is_int(v) and 0 <= v < 2**32, "an integer from 0 to 2**32 - 1") for key in ("seed",)},
    "burn_in": (lambda v: is_int(v) and v >= 0, "an integer >= 0, below task.steps"),
    "classifier_epochs": (lambda v: is_int(v) and v >= 0, "an integer >= 0 (0: no classifier)"),
    "fraction": (lambda v: is_number(v) and 0 < v < 1, "a number between 0 and 1, the share of pixels hidden"),
    "split": (lambda v: v in ("train", "test"), "train or test"),
    "splits": (lambda v: OmegaConf.is_list(v) and len(v) > 0 and set(v) <= {"train", "test"}, "a list of train, test"),
    "masks": (lambda v: OmegaConf.is_list(v) and len(v) > 0 and set(v) <= {"random", "top_half", "bottom_half",
              "centre_square"}, "a list of random, top_half, bottom_half, centre_square"),
    **{key: (lambda v: is_number(v) and 0 < v < math.inf, "a finite number > 0")
       for key in ("fit_lr", "l2", "traversal_radius")},
}


def check_evaluation(cfg: DictConfig) -> None:
    """evaluate.py's config, before any work: the task's options, the device and the threads."""
    check_task(cfg.task)
    check_device(cfg)
    check_threads(cfg)


def check_task(task_cfg: DictConfig) -> None:
    """An evaluation task's options, before the run is loaded: one line naming the key and value."""
    for key, value in task_cfg.items():
        if key in TASK_RULES and not TASK_RULES[key][0](value):
            raise ConfigError(f"task.{key}={value!r}: must be {TASK_RULES[key][1]}")
    if "burn_in" in task_cfg and task_cfg.burn_in >= task_cfg.steps:
        raise ConfigError(f"task.burn_in={task_cfg.burn_in}: must be below task.steps={task_cfg.steps}")
