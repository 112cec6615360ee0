"""The one place the networks, the ELBO and SVI are built from a config, and the step that drives SVI.

Training, evaluation (`vae.runs`), the benchmark and the variance tool all build through here.
The trainer's speed options change how the networks run, never what they compute or what their
parameters are called, so a checkpoint made with one setting loads with any other:

    trainer.channels_last   conv weights stored as NHWC
    trainer.bf16            each layer block under torch.autocast(bfloat16), its output cast back to
                            float32, so t_loc, t_scale, the likelihood's parameters, every log-density,
                            the ELBO, the parameters and the optimizer's state stay float32
    trainer.compile         torch.compile of each network's layer blocks, in place
"""
from __future__ import annotations

import functools
import logging
import warnings
from functools import partial

import pyro
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pyro.infer import SVI
from pyro.optim import PyroLRScheduler, PyroOptim
from torch import Tensor, nn

from guide import Encoder, Posterior, guide
from model import Decoder, Likelihood, Prior, model
from vae.baselines import with_baselines
from vae.beta_nll import beta_nll
from vae.config import JIT_ELBOS, ConfigError, arguments, instantiate_checked
from vae.rules import locate

log = logging.getLogger(__name__)


def build_likelihood(likelihood_cfg: DictConfig, image_channels: int) -> Likelihood:
    """p(x|t)'s distribution per pixel, `likelihood_cfg` (`_target_` + its keys) for images of
    `image_channels` channels; a key it refuses is a ConfigError, in its own words."""
    return instantiate_checked(likelihood_cfg, "likelihood", image_channels=image_channels)


def build_networks(cfg: DictConfig, image_shape: tuple[int, ...], device: torch.device,
                   trainer_cfg: DictConfig | None = None) -> tuple[Encoder, Decoder]:
    """The encoder with its posterior and the decoder with its likelihood and prior, of `cfg.model`,
    `cfg.posterior`, `cfg.likelihood` and `cfg.prior` (`_target_` + arguments), on `device`, with the speed
    options of `trainer_cfg` when given (training, the bench, the variance tool; never evaluation): these
    apply to the networks' layers, not to the posterior's, the likelihood's or the prior's distributions."""
    latent_dims = {key: OmegaConf.select(cfg, key) for key in ("model.latent_dim", "model.encoder.latent_dim",
                                                                 "model.decoder.latent_dim")}
    if len(set(latent_dims.values())) > 1:
        raise ConfigError(f"{' and '.join(f'{k}={v}' for k, v in latent_dims.items())}: the encoder's t is the "
                          "decoder's and the prior's; set model.latent_dim alone")
    posterior = partial(instantiate_checked, cfg.posterior, "posterior")  # the encoder builds it after its layers
    encoder = instantiate(cfg.model.encoder, image_shape=image_shape, posterior=posterior).to(device)
    likelihood = build_likelihood(cfg.likelihood, image_shape[0])
    takes = arguments(locate(str(cfg.prior.get("_target_")))) or set()  # a prior built on the encoder (VampPrior)
    offered = {"encoder": encoder, "image_shape": image_shape}  # gets them; held outside its module tree
    prior = instantiate_checked(cfg.prior, "prior", latent_dim=cfg.model.latent_dim,
                                **{key: value for key, value in offered.items() if key in takes})
    decoder = instantiate(cfg.model.decoder, image_shape=image_shape, likelihood=likelihood, prior=prior).to(device)
    if trainer_cfg is not None:
        log.info("speed options: " + ", ".join(f"trainer.{key}={bool(trainer_cfg.get(key))}"
                                                for key in ("bf16", "channels_last", "compile")))
    for network in (encoder, decoder):
        layers = [block for block in network.children() if not isinstance(block, (Likelihood, Prior, Posterior))]
        if trainer_cfg is not None and trainer_cfg.get("bf16"):
            for block in layers:  # the float32 maps to t_scale, the likelihood's parameters... follow them
                run_in_bfloat16(block, device.type)
        if trainer_cfg is not None and trainer_cfg.get("channels_last"):
            network.to(memory_format=torch.channels_last)
        if trainer_cfg is not None and trainer_cfg.get("compile"):
            for block in layers:
                block.compile()
    return encoder, decoder


def run_in_bfloat16(block: nn.Module, device_type: str) -> None:
    """`block` runs under bfloat16 autocast from now on, and hands on its output as float32."""
    forward = block.forward

    @functools.wraps(forward)
    def forward_in_bfloat16(*args, **kwargs) -> Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return forward(*args, **kwargs).float()

    block.forward = forward_in_bfloat16


def build_svi(cfg: DictConfig, encoder: Encoder, decoder: Decoder, num_data: int) -> SVI:
    """SVI on the configured ELBO and optimizer, for `model` and `guide` over `num_data` images; with
    `trainer.nll_beta` > 0 the model's site "x" is scored by the beta-NLL (vae/beta_nll.py), for training.

    A score-function estimator may add `estimator.baseline` (Pyro's baseline options for site
    "t") and `estimator.baseline_net` (a network b(x), built here and trained with the guide), which
    vae/baselines.py hands to the guide's site "t"."""
    baseline_net = None
    if cfg.estimator.get("baseline_net") is not None:
        baseline_net = instantiate(cfg.estimator.baseline_net, image_shape=decoder.image_shape)
        baseline_net = baseline_net.to(next(decoder.parameters()).device)
    baseline = cfg.estimator.get("baseline")
    elbo = instantiate(cfg.estimator.elbo)
    if isinstance(elbo, JIT_ELBOS):  # Pyro's JIT ELBOs call torch.jit.trace, which warns on every run
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.trace` is deprecated", category=FutureWarning)
    trainer = cfg.get("trainer") or {}
    return SVI(
        beta_nll(partial(model, decoder=decoder, num_data=num_data), trainer.get("nll_beta", 0),
                 trainer.get("nll_beta_target", "both")),
        with_baselines(partial(guide, encoder=encoder, num_data=num_data, reparameterized=cfg.estimator.reparameterized),
                       num_data, OmegaConf.to_container(baseline) if baseline else None, baseline_net),
        build_optimizer(cfg),
        loss=elbo,
    )


def build_optimizer(cfg: DictConfig) -> PyroOptim:
    """The configured Pyro optimizer (`cfg.optim`); with `cfg.schedule` (a torch LR scheduler as
    `_partial_`), Pyro's PyroLRScheduler around the same torch optimizer and arguments, which
    `step_schedule` steps after every epoch."""
    optimizer = instantiate(cfg.optim)
    if cfg.get("schedule") is None:
        return optimizer
    scheduler = instantiate(cfg.schedule)  # functools.partial(scheduler class, **its arguments)
    return PyroLRScheduler(scheduler.func, {"optimizer": optimizer.pt_optim_constructor,
                                            "optim_args": optimizer.pt_optim_args, **scheduler.keywords},
                           optimizer.pt_clip_args)


def learning_rate(optimizer: PyroOptim) -> float | None:
    """The learning rate the optimizer steps with now (None before its first step)."""
    optimizer = getattr(optimizer, "inner", optimizer)  # data-parallel: vae.distributed.GradientAveraging's
    for torch_optimizer in optimizer.optim_objs.values():  # one per parameter, all at the same rate
        scheduled = isinstance(optimizer, PyroLRScheduler)
        return (torch_optimizer.optimizer if scheduled else torch_optimizer).param_groups[0]["lr"]
    return None


def step_schedule(optimizer: PyroOptim) -> None:
    """An epoch is over: the scheduler of every parameter takes its step (no schedule: nothing)."""
    optimizer = getattr(optimizer, "inner", optimizer)
    if isinstance(optimizer, PyroLRScheduler):
        optimizer.step()


def svi_step(svi: SVI, x: Tensor, index: Tensor, **kwargs) -> float:
    """One SVI step on the minibatch `x` at positions `index`; returns the loss, -ELBO estimate
    (`kwargs`, e.g. the warm-up's `kl_weight`, go to model and guide).

    `svi.step` traces guide and model, backpropagates the loss, steps the optimizer of every
    parameter and then zeroes the gradients by writing zero tensors into `.grad`
    (pyro.infer.util.zero_grads), so the next backward pass would add its gradients into them.
    Setting `.grad` to None instead, as torch's `optimizer.zero_grad()` does by default, lets it
    write them directly: the same numbers, without an addition over every parameter.
    """
    loss = svi.step(x, index, **kwargs)  # -ELBO of the whole dataset, estimated on this batch
    for value in pyro.get_param_store().values():
        value.unconstrained().grad = None
    return loss
