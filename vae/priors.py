"""Learned priors p(t): the prior as a distribution with parameters, trained with the decoder.

    mixture   p(t) = sum_k w_k N(t | mu_k, diag sigma_k^2)     (`prior=mixture`, K = `prior.components`)
    vamp      p(t) = (1/K) sum_k q(t | u_k)                     (`prior=vamp`, K = `prior.components`)

The weights (as logits), the means and the scales (as logs) of the K components are parameters of
the decoder (`pyro.module("decoder", ...)` registers them with its layers), so SVI fits the prior to
the codes the encoder gives, the aggregate posterior q(t) = (1/N) sum_i q(t|x_i) that maximizes the
ELBO (Hoffman & Johnson 2016); Tomczak & Welling (2018) use it as the baseline of the VampPrior.
KL(q(t|x) || p(t)) then has no closed form: Trace_ELBO estimates it with the same sample t as always,
vae/elbo.py by log q(t|x) - log p(t) at that t, and the IW bound, the anomaly scores and the
generation task read log p(t) and draws of t off this prior. With K = 1 the component starts at
N(0, I), the lecture's prior, and the first step is the standard model's exactly.

The VampPrior (Tomczak & Welling 2018) mixes the encoder's own posteriors at K learned pseudo-inputs
u_k, images that are parameters of the prior; its gradient reaches the pseudo-inputs and the encoder.
"""
from __future__ import annotations

import pyro.distributions as dist
import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.nn import functional as F

from guide import DiagonalNormal
from model import Prior
from vae.rules import is_positive_int, targets


class GaussianMixture(Prior):
    """p(t) = sum_k softmax(logits)_k N(t | locs_k, diag exp(log_scales_k)^2), K = `components`.
    The means start at `init_spread` times standard normal draws (K > 1; one component starts at 0), the
    scales at 1, the weights equal."""

    def __init__(self, latent_dim: int, components: int = 10, init_spread: float = 1.0) -> None:
        super().__init__(latent_dim)
        if not is_positive_int(components):
            raise ValueError(f"prior.components={components!r}: must be a positive integer")
        if isinstance(init_spread, bool) or not isinstance(init_spread, (int, float)) or not 0 <= init_spread < float("inf"):
            raise ValueError(f"prior.init_spread={init_spread!r}: must be a finite number >= 0")
        self.components = components
        self.logits = nn.Parameter(torch.zeros(components))  # (K,)
        locs = init_spread * torch.randn(components, latent_dim) if components > 1 else torch.zeros(1, latent_dim)
        self.locs = nn.Parameter(locs)  # (K, latent_dim)
        self.log_scales = nn.Parameter(torch.zeros(components, latent_dim))  # (K, latent_dim)

    def forward(self, num_images: int, like: Tensor) -> dist.MixtureSameFamily:
        mixture = dist.Categorical(logits=self.logits.to(like.dtype))
        component = dist.Normal(self.locs.to(like.dtype), self.log_scales.exp().to(like.dtype)).to_event(1)
        return dist.MixtureSameFamily(mixture, component).expand(torch.Size([num_images]))

    @torch.no_grad()
    def draw(self, num: int, generator: torch.Generator) -> Tensor:
        """A component k ~ Categorical(w) for each draw, then t = mu_k + sigma_k * eps, on the CPU."""
        weights = F.softmax(self.logits, dim=0).cpu()
        k = torch.multinomial(weights, num, replacement=True, generator=generator)  # (num,)
        eps = torch.randn(num, self.latent_dim, generator=generator)
        return self.locs.cpu()[k] + self.log_scales.exp().cpu()[k] * eps


class VampPrior(Prior):
    """The VampPrior (Tomczak & Welling 2018): p(t) = (1/K) sum_k q(t | u_k), K = `components`, a mixture of
    the encoder's own Gaussians q(t|u_k) = N(t_loc(u_k), diag t_scale(u_k)^2) at K learned pseudo-inputs u_k.

    The pseudo-inputs are parameters of the prior (so of the decoder, `pyro.module("decoder", ...)`), images
    u_k = sigmoid(w_k) (K, C, H, W): a sigmoid keeps them inside (0, 1), the data's range, and, unlike the
    paper's hardtanh, never stops their gradient (a hardtanh pixel pushed past 0 or 1 is stuck there; Adam's
    step on w is about the learning rate however small the sigmoid's slope). They start as the paper's, at
    u = `init_mean` + `init_std` * N(0, 1) per pixel (0.05, 0.01: nearly blank, slightly different images).
    log p(t) is differentiated with respect to the pseudo-inputs and the encoder's weights, as in the paper.

    The encoder is the guide's own network, held outside the module tree (`self.encoder` is a property
    reading a plain tuple): it is registered once, as `encoder`, never a second time under decoder$$$prior...
    (its weights under two names in the param store and in every checkpoint, a tensor each once loaded back).
    vae/build.py hands over the encoder and the image shape (`encoder`, `image_shape`); vae.config.check_config
    builds the prior with `latent_dim` alone, to check its keys. q(t|u_k) must be the encoder's Gaussian: a flow
    posterior (`posterior=iaf`) is refused when the networks are built, and `refuses(cfg)` gives the same line
    from the config alone."""

    def __init__(self, latent_dim: int, components: int = 50, init_mean: float = 0.05, init_std: float = 0.01,
                 encoder: nn.Module | None = None, image_shape: tuple[int, int, int] | None = None) -> None:
        super().__init__(latent_dim)
        if not is_positive_int(components):
            raise ValueError(f"prior.components={components!r}: must be a positive integer")
        if isinstance(init_mean, bool) or not isinstance(init_mean, (int, float)) or not 0 < init_mean < 1:
            raise ValueError(f"prior.init_mean={init_mean!r}: must be a number between 0 and 1 (exclusive), an "
                             "intensity the sigmoid can give")
        if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or not 0 <= init_std < float("inf"):
            raise ValueError(f"prior.init_std={init_std!r}: must be a finite number >= 0")
        if encoder is not None and not isinstance(getattr(encoder, "posterior", None), DiagonalNormal):
            posterior = type(getattr(encoder, "posterior", None))
            raise ValueError(self.posterior_refusal(f"{posterior.__module__}.{posterior.__name__}"))
        self.components = components
        self._encoder = (encoder,)  # a tuple: no submodule, so no second registration of its parameters
        self.image_shape = tuple(int(side) for side in image_shape) if image_shape is not None else None
        if self.image_shape is not None:
            u = (init_mean + init_std * torch.randn(components, *self.image_shape)).clamp(1e-4, 1 - 1e-4)
            self.pseudo_logits = nn.Parameter(torch.logit(u))  # (K, C, H, W), u_k = sigmoid of it

    @staticmethod
    def posterior_refusal(target: str) -> str:
        return (f"prior=vamp with posterior._target_={target}: the VampPrior mixes the encoder's Gaussians q(t|u_k), "
                "and a flow's q(t|u_k) at any t would need its flows inverted, one pass per latent dimension for every "
                "image and component; use posterior=gaussian")

    @classmethod
    def refuses(cls, cfg: DictConfig) -> str | None:
        """Why the training config `cfg` cannot use this prior (a posterior other than the encoder's Gaussian), or
        None: the same refusal as building the networks gives, from the config alone."""
        return None if targets(cfg, "posterior", DiagonalNormal) else cls.posterior_refusal(cfg.posterior._target_)

    @property
    def encoder(self) -> nn.Module:
        if self._encoder[0] is None or self.image_shape is None:
            raise RuntimeError("VampPrior built without its encoder and image shape (vae.config.check_config builds "
                               "it to check its keys); vae/build.py: build_networks hands them over")
        return self._encoder[0]

    def pseudo_inputs(self) -> Tensor:
        """The K pseudo-inputs u_k in (0, 1), (K, C, H, W)."""
        return torch.sigmoid(self.pseudo_logits)

    def components_of(self) -> tuple[Tensor, Tensor]:
        """(t_loc, t_scale) of q(t|u_k) for all k in one encoder pass, (K, latent_dim) each."""
        t_loc, t_scale, _ = self.encoder(self.pseudo_inputs())
        return t_loc, t_scale

    def forward(self, num_images: int, like: Tensor) -> dist.MixtureSameFamily:
        t_loc, t_scale = self.components_of()
        t_loc, t_scale = t_loc.to(like.device, like.dtype), t_scale.to(like.device, like.dtype)
        mixture = dist.Categorical(logits=t_loc.new_zeros(self.components))  # uniform 1/K
        component = dist.Normal(t_loc, t_scale).to_event(1)
        return dist.MixtureSameFamily(mixture, component).expand(torch.Size([num_images]))

    @torch.no_grad()
    def draw(self, num: int, generator: torch.Generator) -> Tensor:
        """A component k uniform for each draw, then t = t_loc(u_k) + t_scale(u_k) * eps, on the CPU."""
        t_loc, t_scale = (value.cpu() for value in self.components_of())
        k = torch.randint(self.components, (num,), generator=generator)  # (num,)
        eps = torch.randn(num, self.latent_dim, generator=generator)
        return t_loc[k] + t_scale[k] * eps
