"""The checks a config passes before any work starts, and the device it names.

Hydra already refuses an unknown option (`estimator=nope`) and lists the choices; these checks
refuse a value that composes but cannot work, in one line that names the key and the value.
"""
from __future__ import annotations

import inspect
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
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from pyro.infer import (ELBO, JitTrace_ELBO, JitTraceEnum_ELBO, JitTraceGraph_ELBO, JitTraceMeanField_ELBO,
                        TraceGraph_ELBO, TraceMeanField_ELBO)

from vae.beta_nll import weighs
from vae.iwae import IWAE_ELBO
from vae.rules import is_int, is_number, is_positive_int, locate, refusal  # is_int, is_number: for the entry points' own checks too

JIT_ELBOS = (JitTrace_ELBO, JitTraceGraph_ELBO, JitTraceMeanField_ELBO, JitTraceEnum_ELBO)

# The config nodes whose class may say what else in the config it cannot work with: a classmethod
# `refuses(cfg) -> str | None` (vae/dreg.py, vae/priors.py), asked by check_config before any work.
EXTENSIONS = ("likelihood", "prior", "posterior", "estimator.elbo")
CHECKPOINT_NAME = "checkpoint.pt"  # a run directory's latest checkpoint (vae/checkpoint.py writes it)


class ConfigError(ValueError):
    """A config value that training cannot use."""


def check_config(cfg: DictConfig) -> None:
    """Stop before any work, naming the key and the value, when a setting cannot work: every key by its
    rule (vae/rules.py), the likelihood, prior and posterior by their own classes (their keys, and what else
    in the config they refuse), then the keys that must fit together."""
    problem = refusal(cfg)
    if problem is not None:
        raise ConfigError(problem)
    channels = OmegaConf.select(cfg, "data.dataset.channels", default=1)  # a dataset that says; else: with the data
    likelihood = instantiate_checked(cfg.likelihood, "likelihood", image_channels=channels)  # its own keys
    instantiate_checked(cfg.prior, "prior", latent_dim=cfg.model.latent_dim)  # its own keys
    posterior = instantiate_checked(cfg.posterior, "posterior", latent_dim=cfg.model.latent_dim,
                                    context_dim=cfg.model.hidden_dim)
    if posterior.reparameterized_only and not cfg.estimator.reparameterized:
        raise ConfigError(f"posterior._target_={cfg.posterior._target_} with estimator.reparameterized=false: "
                          f"{posterior.reparameterized_only}")
    for key in EXTENSIONS:  # each extension's class may refuse the rest of the config, in its own words
        refuses = getattr(locate(str(OmegaConf.select(cfg, f"{key}._target_"))), "refuses", None)
        problem = refuses(cfg) if callable(refuses) else None
        if problem is not None:
            raise ConfigError(problem)
    check_arguments(cfg)
    nll_beta = cfg.trainer.get("nll_beta", 0)
    if nll_beta and not weighs(likelihood):
        raise ConfigError(f"trainer.nll_beta={nll_beta} with likelihood._target_={cfg.likelihood._target_}: the beta-NLL "
                          "weighs the Gaussian's pixels by their scale; use likelihood=gaussian or trainer.nll_beta=0")
    t_max = OmegaConf.select(cfg, "schedule.T_max")
    if t_max is not None and t_max < cfg.trainer.epochs:
        raise ConfigError(f"schedule.T_max={t_max!r} with trainer.epochs={cfg.trainer.epochs}: the cosine would rise "
                          "again after T_max epochs; set schedule.T_max >= trainer.epochs (its default is trainer.epochs)")
    lr, eta_min = cfg.optim.optim_args.lr, OmegaConf.select(cfg, "schedule.eta_min")
    if eta_min is not None and eta_min > lr:
        raise ConfigError(f"schedule.eta_min={eta_min!r} with optim.optim_args.lr={lr!r}: the cosine falls from the "
                          "learning rate to eta_min; give an eta_min at most optim.optim_args.lr")
    check_image_size(cfg)
    check_threads(cfg)
    check_estimator(cfg)
    check_device(cfg)


def check_image_size(cfg: DictConfig) -> None:
    """A dataset that sets its images' side (`data.dataset.image_size`) gives one the networks can take:
    each of the len(model.channels) stride-2 layers halves it (model.check_image_shape, once the data is in)."""
    size, layers = OmegaConf.select(cfg, "data.dataset.image_size"), len(cfg.model.channels)
    if size is not None and size % 2**layers:
        fitting = max(2**layers, round(size / 2**layers) * 2**layers)
        raise ConfigError(f"data.dataset.image_size={size} with model.channels={list(cfg.model.channels)}: each of the "
                          f"{layers} stride-2 layers halves the image, so its side must be divisible by {2**layers}, "
                          f"e.g. data.dataset.image_size={fitting}")


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


def objective_refusal(cfg: DictConfig, key: str, elbo_class: type, remedy: str) -> str | None:
    """Why the objective `key` (estimator.elbo, or trainer.switch_elbo that the run switches to) cannot train
    with the estimator and the trainer's reweighings, else None; `remedy`: what to do with a score-function
    guide under the IW bound."""
    target = f"{key}._target_={OmegaConf.select(cfg, f'{key}._target_')}"
    score = not cfg.estimator.reparameterized
    if score and issubclass(elbo_class, TraceMeanField_ELBO):
        return (f"{target} with estimator.reparameterized=false: an analytic-KL ELBO needs a reparameterized guide; "
                "use estimator=reparam or a Trace ELBO")
    if score and issubclass(elbo_class, IWAE_ELBO):
        return (f"{target} with estimator.reparameterized=false: the importance-weighted bound is trained through "
                f"reparameterized samples; {remedy}")
    for trainer_key, reweighs in (("kl_warmup_epochs", "the warm-up weighs the ELBO's KL, a new weight at every step"),
                                  ("nll_beta", "the beta-NLL weighs the ELBO's log p(x|t), pixel by pixel")):
        if cfg.trainer.get(trainer_key, 0) and issubclass(elbo_class, (IWAE_ELBO, *JIT_ELBOS)):
            return (f"trainer.{trainer_key}={cfg.trainer[trainer_key]} with {target}: {reweighs} (not inside the IW "
                    "bound's log-mean-exp, nor in a JIT ELBO's trace, which is compiled once); use it with a Trace "
                    "ELBO, e.g. estimator=reparam")
    return None


def check_switch(cfg: DictConfig) -> None:
    """trainer.switch_after_minutes and trainer.switch_elbo come together, and the objective switched to
    is an ELBO class that the estimator can train (vae/runner.py switches)."""
    minutes, elbo = cfg.trainer.get("switch_after_minutes"), cfg.trainer.get("switch_elbo")
    if (minutes is None) != (elbo is None):
        raise ConfigError(f"trainer.switch_after_minutes={minutes} with trainer.switch_elbo={elbo}: give both (when to "
                          "switch, and to which objective, e.g. {_target_: vae.iwae.IWAE_ELBO, num_particles: 5}) or neither")
    if elbo is None:
        return
    target = OmegaConf.select(cfg, "trainer.switch_elbo._target_")
    elbo_class = locate(str(target))
    if not (isinstance(elbo_class, type) and issubclass(elbo_class, ELBO)):
        raise ConfigError(f"trainer.switch_elbo._target_={target}: must be an ELBO class, module.Class (e.g. vae.iwae.IWAE_ELBO)")
    problem = objective_refusal(cfg, "trainer.switch_elbo", elbo_class, "use estimator=reparam")
    if problem is not None:
        raise ConfigError(problem)


def check_estimator(cfg: DictConfig) -> None:
    """The ELBO, the estimator and the baselines must fit together (else Pyro fails deep inside,
    or silently ignores the baseline)."""
    target = cfg.estimator.elbo._target_
    elbo_class = locate(str(target))
    if not isinstance(elbo_class, type):
        raise ConfigError(f"estimator.elbo._target_={target}: cannot be imported; give an ELBO class as module.Class")
    problem = objective_refusal(cfg, "estimator.elbo", elbo_class, "use estimator=iwae as it is")
    if problem is not None:
        raise ConfigError(problem)
    check_switch(cfg)
    score = not cfg.estimator.reparameterized
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


BUILT = ("data.dataset", "model.encoder", "model.decoder", "estimator.elbo", "estimator.baseline_net", "schedule")


def arguments(target: Any) -> set[str] | None:
    """The keyword arguments `target` takes, or None when it takes any (**kwargs, or no signature)."""
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_arguments(cfg: DictConfig) -> None:
    """Each key of an object built from its `_target_` (and each of `optim.optim_args`, the torch
    optimizer's) is an argument of its class, else the build would fail with a TypeError once the run
    has begun: e.g. `optim=clipped_adam +optim.optim_args.fused=true`. A `_target_` that cannot be
    imported is left to its own check (the table of vae/rules.py; estimator.elbo: check_estimator)."""
    optimizer = instantiate_checked(cfg.optim, "optim")  # Pyro's wrapper, not yet a torch optimizer
    built = [("optim.optim_args", cfg.optim.optim_args, optimizer.pt_optim_constructor)]
    for key in BUILT:
        node = OmegaConf.select(cfg, key)
        if node is None:
            continue
        target = locate(str(node.get("_target_")))
        if target is not None:  # else refused by its own check (estimator.elbo: check_estimator, after this)
            built.append((key, node, target))
    for key, node, target in built:
        takes = arguments(target)
        for name, value in node.items():
            if takes is not None and not name.startswith("_") and name not in takes:
                raise ConfigError(f"{key}.{name}={value!r}: not an argument of {target.__module__}.{target.__name__}; "
                                  f"it takes {', '.join(sorted(takes - {'self', 'params', 'optimizer'}))}")


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
    if path is not None and path.name == CHECKPOINT_NAME:
        return str(path.parent)
    return fresh


def resume_subdirectory(resume: str | None, fresh: str, stamp: str, output_dir: str | None = None) -> str:
    """hydra.output_subdir: a run continued in place (resume=<its dir>, or a command whose output
    directory already holds a run's checkpoint.pt: a requeued job, a sweep run again, or a command
    that will be refused) keeps its .hydra/ (its overrides and config) and gets .hydra/resume-<stamp>/
    for this invocation's."""
    in_place = resume_directory(resume, "") != "" or (output_dir is not None and (Path(output_dir) / CHECKPOINT_NAME).is_file())
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
        continues = config.get("resume") is not None or (run_dir / CHECKPOINT_NAME).is_file()
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


def bfloat16_units(device: str, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether `device` computes in bfloat16 natively: a CUDA device that supports it, or a CPU whose flags
    (/proc/cpuinfo) name AMX or AVX-512 bfloat16 units. `${bf16_units:${device}}` in a recipe sets
    trainer.bf16 by it: the step is faster there and 2.4 times slower where bfloat16 is emulated
    (docs/results.md, "Speed" and "bf16"); a run keeps what it was given when it resumes elsewhere."""
    resolved = resolve_device(str(device))
    if resolved.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    flags = set(Path(cpuinfo).read_text().split()) if Path(cpuinfo).is_file() else set()
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def register_resolvers() -> None:
    """Before @hydra.main of an entry point that composes conf/config.yaml: its hydra.run.dir and
    output_subdir use these, and a recipe's trainer.bf16 may follow the processor (`bf16_units`)."""
    OmegaConf.register_new_resolver("resume_dir", resume_directory, replace=True)
    OmegaConf.register_new_resolver("resume_subdir", resume_subdirectory, replace=True)
    OmegaConf.register_new_resolver("bf16_units", bfloat16_units, replace=True)


# Every option of an evaluation task (tasks/conf/task/*.yaml), by name: what it must be.
TASK_RULES = {
    **{key: (is_positive_int, "a positive integer") for key in (
        "num_particles", "batch_size", "particles_per_chunk", "steps", "fit_steps", "num_samples", "num_images",
        "num_pairs", "manifold_steps", "max_iter", "num_shown", "scored_samples")},
    **{key: (lambda v: v is None or is_positive_int(v), "null or a positive integer")
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
