"""The checks a config passes before any work starts, and the device it names.

Hydra already refuses an unknown option (`estimator=nope`) and lists the choices; these checks
refuse a value that composes but cannot work, in one line that names the key and the value.
"""
from __future__ import annotations

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from pyro.infer import (JitTrace_ELBO, JitTraceEnum_ELBO, JitTraceGraph_ELBO, JitTraceMeanField_ELBO,
                        TraceGraph_ELBO, TraceMeanField_ELBO)

from model import LIKELIHOODS

POSITIVE_INTS = ("model.latent_dim", "model.hidden_dim", "data.batch_size", "trainer.epochs",
                 "trainer.test_every", "estimator.elbo.num_particles")
JIT_ELBOS = (JitTrace_ELBO, JitTraceGraph_ELBO, JitTraceMeanField_ELBO, JitTraceEnum_ELBO)


class ConfigError(ValueError):
    """A config value that training cannot use."""


def check_config(cfg: DictConfig) -> None:
    """Stop before any work, naming the key and the value, when a setting cannot work."""
    for key in POSITIVE_INTS:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{key}={value!r}: must be a positive integer")
    channels = cfg.model.channels
    if not channels or any(not isinstance(c, int) or c <= 0 for c in channels):
        raise ConfigError(f"model.channels={list(channels)!r}: must be a non-empty list of positive integers")
    if cfg.model.likelihood not in LIKELIHOODS:
        raise ConfigError(f"model.likelihood={cfg.model.likelihood!r}: must be one of {LIKELIHOODS}")
    if not cfg.model.min_scale > 0:
        raise ConfigError(f"model.min_scale={cfg.model.min_scale!r}: must be > 0")
    subset = cfg.data.subset
    if subset is not None and (not isinstance(subset, int) or subset <= 0):
        raise ConfigError(f"data.subset={subset!r}: must be null or a positive integer")
    max_minutes = cfg.trainer.get("max_minutes")
    if max_minutes is not None and (isinstance(max_minutes, bool) or not isinstance(max_minutes, (int, float))
                                    or not max_minutes > 0):
        raise ConfigError(f"trainer.max_minutes={max_minutes!r}: must be null (no time budget) or > 0")
    lr = OmegaConf.select(cfg, "optim.optim_args.lr")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(f"optim.optim_args.lr={lr!r}: the learning rate must be > 0")
    threads = cfg.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads <= 0):
        raise ConfigError(f"threads={threads!r}: must be null (torch's default) or a positive integer")
    check_estimator(cfg)
    device = str(cfg.device)
    if device != "auto" and not (device == "cpu" or device.startswith("cuda")):
        raise ConfigError(f"device={device!r}: must be auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r}: CUDA is not available on this machine; use device=cpu or auto")


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
