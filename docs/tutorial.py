# %% [markdown]
# # The VAE step by step, with this project's code
#
# This notebook follows the lecture from the model to its uses. Each step is a short explanation in
# the lecture's symbols, then the code that shows it, and every number and picture below is what the
# cells printed when the notebook was executed: nothing is typed by hand. The code imports the
# project's own functions (`model.py`, `guide.py`, `vae/`, `tasks/`, `variance.py`) and never copies
# them; each section names the file and the function it exercises. The README's table "The model and
# where it lives" maps every equation to its function.
#
# It runs in minutes on one CPU thread, so the data are a small subset and the networks small and
# briefly trained. What full runs give is in [README.md](../README.md): "Install and quickstart" (the
# default run), "Results" (the estimators, the test likelihood, the uses) and
# [docs/results.md](results.md). The notebook is built from `docs/tutorial.py` by
# `python tools/make_tutorial.py`, and `tests/test_tutorial.py` executes it in the test suite.
#
# | step | the lecture | the code |
# | --- | --- | --- |
# | 1 | p(x, t) = p(x\|t) p(t) | `model.py`: `model`, `Decoder`, `StandardNormal` |
# | 2 | the ELBO from Jensen's inequality; its gap KL(q(t\|x) ‖ p(t\|x)) | `vae/elbo.py`: `elbo_parts`; `vae/importance.py`: `iw_estimates` |
# | 3 | amortization: q(t\|x) = N(t_loc(x), diag t_scale(x)^2) | `guide.py`: `Encoder`, `guide`; `tasks/impute.py`: `fit_posterior` |
# | 4 | minibatches: N/B * sum over the batch | `pyro.plate(..., subsample=index)` in `model` and `guide`; `vae/build.py`: `build_svi` |
# | 5 | the score function and its variance | `guide.py`: `ScoreFunctionNormal`; `variance.py`: `gradient_moments`, `measure` |
# | 6 | reparameterization t = t_loc + t_scale * eps | `guide.py`: `guide(reparameterized=True)`; `vae/build.py`: `svi_step` |
# | 7 | the uses | `tasks/generate.py`, `tasks/anomaly.py`, `tasks/impute.py`, `tasks/represent.py` |

# %% [markdown]
# ## 0. Setup: the project, the data, one thread
#
# The project's root goes on `sys.path` so that its modules import as they do for `train.py`. Configs
# are composed from `conf/` by Hydra, as the entry points compose them, with a small network
# (`model.channels`, `model.hidden_dim`, `model.latent_dim`). `threads=1` (`vae.config.use_threads`):
# on a small shared CPU one thread is the fastest, and with the seeds below every number repeats.
#
# The data are MNIST when `VAE_DATA_ROOT` holds it (`vae/data.py: load_split`, the first images of the
# training split); otherwise `data=synthetic`, the file-free disks of `vae.data.SyntheticImages`, and
# the cell says so in one line.

# %%
import copy
import os
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm, imported by a dependency, in a notebook
ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "model.py").is_file() and (p / "vae").is_dir())
sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt
import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from hydra import compose, initialize_config_dir
from pyro.poutine.util import site_is_subsample
from torch import nn
from torch.distributions import kl_divergence
from torchvision.utils import make_grid

from guide import DiagonalNormal, guide, latent_point, posterior
from model import Likelihood, StandardNormal, model
from vae.build import build_networks, build_svi, svi_step
from vae.config import use_threads
from vae.data import DataNotFoundError, epoch_batches, load_split, observe_test_set
from vae.elbo import dataset_elbo, elbo_parts, log_joint
from vae.importance import iw_estimates, log_weights, mean_and_standard_error

plt.rcParams.update({"figure.dpi": 70, "font.size": 9})
SMALL = ["model.channels=[16,32]", "model.hidden_dim=128", "model.latent_dim=8", "optim.optim_args.lr=2e-3",
         "device=cpu", "threads=1", "seed=0"]


def config(*overrides: str, name: str = "config"):
    """conf/<name>.yaml composed with the small network and the overrides, as Hydra composes it for train.py."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=[*SMALL, *overrides])


def show(ax, images, nrow, title=""):
    """A grid of images (N, C, H, W) in [0, 1] on the axes `ax`."""
    ax.imshow(make_grid(images.detach().cpu(), nrow=nrow, padding=1, pad_value=1).permute(1, 2, 0).numpy())
    ax.set_title(title)
    ax.axis("off")


if os.environ.get("VAE_DATA_ROOT"):
    DATA = ["data=mnist", "data.dataset.download=false", "data.subset=3000"]
else:
    DATA = ["data=synthetic", "data.subset=2000"]
    print("VAE_DATA_ROOT is not set: this runs on data=synthetic (16x16 disks); "
          "export VAE_DATA_ROOT=<the folder holding MNIST/raw> to run it on MNIST digits")
try:
    cfg = config(*DATA)
    train_images, train_labels = load_split(cfg.data, train=True)
except DataNotFoundError as error:
    print(f"{error}\nso this runs on data=synthetic (16x16 disks)")
    DATA = ["data=synthetic", "data.subset=2000"]
    cfg = config(*DATA)
    train_images, train_labels = load_split(cfg.data, train=True)
test_images, test_labels = load_split(cfg.data, train=False)
test_images, test_labels = test_images[:1000], test_labels[:1000]
use_threads(cfg)
N = len(train_images)
image_shape = tuple(train_images.shape[1:])
print(f"data: {cfg.data.dataset._target_}, {N} training images and {len(test_images)} test images of shape "
      f"{image_shape}; torch on {torch.get_num_threads()} thread")

# %% [markdown]
# ## 1. The latent-variable model p(x, t) = p(x|t) p(t)
#
# **Code:** `model.py`: `StandardNormal` (p(t) = N(0, I)), `Decoder` (t -> p(x|t)) with its likelihood
# `Bernoulli` (p(x|t) = prod over pixels of Bernoulli(x | sigmoid(x_logits(t)))), and `model`, the Pyro
# program; `vae/build.py: build_networks` builds the networks from the config; `tasks/generate.py:
# prior_samples` decodes draws of the prior.
#
# To generate an image, draw a code t ~ p(t) and then the pixels x ~ p(x|t). `model` says exactly
# this: site `"t"` is the prior, site `"x"` the likelihood, observed at the data. Its trace lists the
# two sites with their distributions and log-densities; the plate `"data"` spans all N images and
# holds a minibatch of them (step 4).

# %%
pyro.set_rng_seed(cfg.seed)
encoder, decoder = build_networks(cfg, image_shape, torch.device("cpu"))
x_test = observe_test_set(test_images, decoder.likelihood)  # binarized once, with a fixed seed
x_train = observe_test_set(train_images, decoder.likelihood)  # the training set binarized once (steps 4, 5)
untrained_decoder = copy.deepcopy(decoder)
print(f"q(t|x): {type(encoder).__name__}, p(x|t): {type(decoder).__name__} with p(t) = {decoder.prior} and the "
      f"likelihood {decoder.likelihood}; {sum(p.numel() for p in encoder.parameters())} and "
      f"{sum(p.numel() for p in decoder.parameters())} parameters")
index = torch.arange(4)
trace = poutine.trace(model).get_trace(x_test[:4], index, decoder, N)  # one run of the program on 4 images
for name, site in trace.nodes.items():
    if site["type"] == "sample" and not site_is_subsample(site):  # the plate's own site left out
        fn = site["fn"]
        print(f'site "{name}": {type(fn.base_dist).__name__}, batch {tuple(fn.batch_shape)}, '
              f"event {tuple(fn.event_shape)}, value {tuple(site['value'].shape)}, observed {site['is_observed']}")
log_p_x_given_t, log_p_t = log_joint(x_test[:4], trace.nodes["t"]["value"], decoder)  # read off the same model
print("log p(x|t) =", [round(v, 1) for v in log_p_x_given_t.tolist()], " log p(t) =",
      [round(v, 1) for v in log_p_t.tolist()], "(nats, 4 images, the untrained decoder)")

# %% [markdown]
# The decoder is untrained, so its p(x|t) is nothing like the data yet. We fit the model now, to
# compare; what this loop maximizes, and how, is the subject of steps 2 to 6. It is `train.py`'s
# loop without the run around it: `vae/build.py: build_svi` gives `pyro.infer.SVI` on `model` and
# `guide` with the configured ELBO (`Trace_ELBO`, reparameterized), `vae/data.py: epoch_batches` a
# fresh order of the images each epoch, the likelihood's `observe` binarizes each minibatch afresh,
# `svi_step` takes one step, and `vae/elbo.py: dataset_elbo` gives the test ELBO.
#
# Pyro keeps the networks' parameters in its global param store under the names `"encoder"` and
# `"decoder"`, so the store is cleared before each model is fitted.

# %%
def fit(cfg, encoder, decoder, epochs):
    """SVI for `epochs` epochs on the training images; returns the minibatch ELBO estimates, per image,
    and the test ELBO per epoch (epoch 0: before training)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(cfg.seed)
    svi = build_svi(cfg, encoder, decoder, N)
    steps, tests = [], [dataset_elbo(x_test, encoder, decoder)["elbo"]]
    for _ in range(epochs):
        for index in epoch_batches(N, cfg.data.batch_size, cfg.data.drop_last):
            x = decoder.likelihood.observe(train_images[index])  # binarized afresh
            steps.append(-svi_step(svi, x, index) / N)  # the loss is -ELBO of all N images, estimated
        tests.append(dataset_elbo(x_test, encoder, decoder)["elbo"])
    return steps, tests


started = time.perf_counter()
main_steps, main_tests = fit(cfg, encoder, decoder, epochs=8)
print(f"{len(main_tests) - 1} epochs of {N} images in {time.perf_counter() - started:.0f} s: test ELBO "
      + ", ".join(f"{value:.1f}" for value in main_tests) + " nats per image (epoch 0 untrained)")

# %%
from tasks.generate import prior_samples

fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
show(axes[0], prior_samples(untrained_decoder, 36, seed=0), 6, "untrained decoder: E[x|t], t ~ p(t)")
show(axes[1], prior_samples(decoder, 36, seed=0), 6, "trained decoder: the same t")
plt.show()

# %% [markdown]
# Both panels decode the same draws of t ~ p(t) (`prior_samples` with the same seed) and show
# E[x|t], the Bernoulli probabilities. The untrained decoder maps every t to a grey blur; the trained
# one to images like the data. How far a full run gets: README.md, "Install and quickstart"
# (`docs/samples.png`).

# %% [markdown]
# ## 2. The ELBO from Jensen's inequality, and its gap
#
# **Code:** `vae/importance.py: log_weights` (log w = log p(x, t) - log q(t|x) for draws t ~ q(t|x))
# and `iw_estimates` (the K-sample bound), `vae/elbo.py: elbo_parts` (the per-image ELBO as the project
# reports it), `guide.py: posterior, DiagonalNormal`, `model.py: StandardNormal, Likelihood`.
#
# log p(x) = log ∫ p(x|t) p(t) dt is an integral over every code t: intractable for a neural decoder.
# For any density q(t|x),
#
#     log p(x) = log E_q[p(x, t) / q(t|x)]  >=  E_q[log p(x, t) - log q(t|x)]  =  ELBO(q)
#
# by Jensen's inequality (log is concave), and the gap is exactly a KL divergence:
#
#     log p(x) - ELBO(q) = KL(q(t|x) ‖ p(t|x))   >= 0,   zero only at q(t|x) = p(t|x).
#
# To see the gap we need a model whose log p(x) and p(t|x) are known: probabilistic PCA, the linear
# Gaussian model the tests use (`tests/test_elbo.py`). p(t) = N(0, I), p(x|t) = N(W t + b, sigma^2 I),
# so p(x) = N(b, W W^T + sigma^2 I) and p(t|x) = N(M^-1 W^T (x - b), sigma^2 M^-1) with
# M = W^T W + sigma^2 I. With orthogonal columns in W, M is diagonal, so p(t|x) is itself a
# diagonal Gaussian: the guide's family holds the true posterior.
#
# The linear decoder below has the interface of `model.Decoder` (a `likelihood` and a `prior`), so the
# project's `model`, `elbo_parts` and `iw_estimates` take it as they take the CNN; the guide is a
# family of diagonal Gaussians q_lam(t|x) walking from the prior (lam = 0: q knows nothing of x) to the
# true posterior (lam = 1): t_loc = lam * E[t|x], log t_scale = lam * log sd(t|x).

# %%
class FixedScaleGaussian(Likelihood):
    """p(x|t) per pixel = N(x | out, sigma^2): the linear Gaussian model's likelihood (model.Likelihood)."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, out):
        return dist.Normal(out, torch.full_like(out, self.sigma))


class PPCADecoder(nn.Module):
    """t (..., L) -> p(x|t) = N(W t + b, sigma^2 I) over (1, 4, 4) images, with model.Decoder's interface."""

    def __init__(self, weight, bias, sigma):
        super().__init__()
        self.latent_dim, self.image_shape = weight.shape[1], (1, 4, 4)
        self.weight, self.bias, self.sigma = weight, bias, sigma
        self.likelihood, self.prior = FixedScaleGaussian(sigma), StandardNormal(self.latent_dim)

    def forward(self, t):
        x_loc = (t @ self.weight.T + self.bias).reshape(*t.shape[:-1], *self.image_shape)
        return self.likelihood(x_loc).to_event(3)

    def exact(self, x):
        """log p(x) (B,) and p(t|x), the true posterior (batch (B,), event (L,)), in closed form."""
        w, s2, flat = self.weight, self.sigma**2, x.flatten(1)
        log_px = dist.MultivariateNormal(self.bias, w @ w.T + s2 * torch.eye(len(self.bias))).log_prob(flat)
        m = w.T @ w + s2 * torch.eye(self.latent_dim)  # diagonal: orthogonal columns
        post_loc = (flat - self.bias) @ torch.linalg.solve(m, w.T).T
        post_scale = (s2 * torch.linalg.inv(m)).diagonal().sqrt().expand_as(post_loc)
        return log_px, dist.Normal(post_loc, post_scale).to_event(1)


class PathEncoder(nn.Module):
    """q_lam(t|x): t_loc = lam * E[t|x], t_scale = sd(t|x)^lam; (t_loc, t_scale, h) as guide.Encoder returns."""

    def __init__(self, decoder, lam):
        super().__init__()
        self.decoder, self.lam = decoder, lam
        self.posterior = DiagonalNormal(decoder.latent_dim, decoder.latent_dim)  # q(t|x) is the Gaussian itself

    def forward(self, x):
        p_t_x = self.decoder.exact(x)[1].base_dist
        return self.lam * p_t_x.loc, p_t_x.scale**self.lam, p_t_x.loc


generator = torch.Generator().manual_seed(0)
basis, _ = torch.linalg.qr(torch.randn(16, 2, generator=generator))  # orthonormal columns
ppca = PPCADecoder(basis * torch.tensor([3.0, 1.5]), torch.randn(16, generator=generator), sigma=0.5)
x_ppca = ppca(torch.randn(5, 2, generator=generator)).sample()  # 5 images (1, 4, 4) drawn from the model
log_px, true_posterior = ppca.exact(x_ppca)

pyro.set_rng_seed(0)
rows = []
for lam in torch.linspace(0, 1, 6).tolist():
    q = PathEncoder(ppca, lam)
    log_w = log_weights(x_ppca, q, ppca, num_particles=4000)["log_w"].double()  # log p(x, t_k) - log q(t_k|x), (K, B)
    parts = elbo_parts(x_ppca.repeat(4000, 1, 1, 1), q, ppca)  # recon - KL(q || p(t)), one t per copy of each image
    q_t, _ = posterior(x_ppca, q)  # q(t|x), read off guide.guide
    rows.append((lam, log_px.mean().item(), log_w.mean().item(), kl_divergence(q_t, true_posterior).mean().item(),
                 log_w.std(0).mean().item(), parts["elbo"].double().mean().item()))
print(" lam   log p(x)   ELBO = E_q[log w]   log p(x) - ELBO   KL(q || p(t|x))   sd of log w   elbo_parts")
for lam, lp, elbo, kl, sd, parts_elbo in rows:
    print(f"{lam:4.1f}  {lp:9.3f}  {elbo:17.3f}  {round(lp - elbo, 3) + 0.0:16.3f}  {kl:16.3f}  "
          f"{sd:12.3f}  {parts_elbo:11.3f}")

fig, ax = plt.subplots(figsize=(4.5, 3))
ax.plot([r[0] for r in rows], [r[1] - r[2] for r in rows], "o", label="log p(x) - ELBO (Monte Carlo)")
ax.plot([r[0] for r in rows], [r[3] for r in rows], "-", label="KL(q || p(t|x)) (closed form)")
ax.set(xlabel="lam: q from the prior (0) to the true posterior (1)", ylabel="nats per image", title="the gap")
ax.legend()
plt.show()

# %% [markdown]
# Each row is the mean over the five images, the ELBO the mean of log w = log p(x, t) - log q(t|x)
# over draws t ~ q(t|x) (`vae/importance.py: log_weights`). The gap log p(x) - ELBO, measured by Monte
# Carlo, matches KL(q ‖ p(t|x)) in closed form, and both go to zero as q reaches the true posterior.
# At lam = 1 every draw's log w is log p(x) itself: with q = p(t|x) the ratio p(x, t) / q(t|x) = p(x)
# does not depend on t, so the estimate has no noise at all. The last column is the same ELBO in the
# form the project reports, E_q[log p(x|t)] - KL(q(t|x) ‖ p(t)) with the KL exact (`elbo_parts`).
#
# Jensen's bound tightens when the average moves inside the log: log (1/K) sum_k p(x, t_k)/q(t_k|x)
# with K draws is still below log p(x) in expectation and climbs to it as K grows (the importance-
# weighted bound, `vae/importance.py: iw_estimates`, which the likelihood task uses). Here with the
# worst q of the walk, the prior, each K's bound averaged over many independent estimates (one
# estimate with a large K can land above log p(x): it is below only in expectation):

# %%
pyro.set_rng_seed(0)
repeats = 100  # independent estimates of each image's bound: their mean is its expectation
for k in (1, 10, 100, 1000):
    bound = iw_estimates(x_ppca.repeat(repeats, 1, 1, 1), PathEncoder(ppca, 0.0), ppca, num_particles=k)["log_px"]
    mean, standard_error = mean_and_standard_error(bound.reshape(repeats, len(x_ppca)).mean(1))  # over repeats
    print(f"K = {k:4d}: IW bound {mean:8.3f} ± {standard_error:.3f}   (log p(x) = {log_px.mean().item():.3f})")

# %% [markdown]
# ## 3. Amortization: one encoder for every image
#
# **Code:** `guide.py: Encoder` (x -> t_loc, t_scale), `guide` and `posterior`; `tasks/impute.py:
# fit_posterior` (a Gaussian r_i(t) = N(t_loc_i, diag t_scale_i^2) per image, fitted by SVI);
# `vae/elbo.py: dataset_elbo`.
#
# The ELBO is maximized over q for every image. Without amortization each image i gets its own
# (t_loc_i, t_scale_i), fitted by SVI with the decoder fixed: 2 * latent_dim numbers per image, and an
# optimization for every new image. The amortized guide learns instead one map x -> (t_loc(x),
# t_scale(x)), the `Encoder`, trained with the decoder: a new image costs one forward pass. The price
# is the amortization gap: one network may reach a lower ELBO on an image than that image's own
# optimum.
#
# Below, on a small set of test images and with the decoder trained in step 1: the encoder's ELBO,
# against per-image Gaussians fitted by `fit_posterior` from the prior (N(0, I)) for more and more
# steps, and from the encoder's own q(t|x) (semi-amortized: what `tasks/impute.py` does).

# %%
from tasks.impute import fit_posterior


class PerImageGaussian(nn.Module):
    """A guide with one Gaussian N(t_loc_i, diag t_scale_i^2) per image of a fixed set: guide.Encoder's outputs."""

    def __init__(self, t_loc, t_scale):
        super().__init__()
        self.t_loc, self.t_scale = t_loc, t_scale
        self.posterior = DiagonalNormal(t_loc.shape[1], t_loc.shape[1])

    def forward(self, x):
        return self.t_loc, self.t_scale, self.t_loc


encoder.eval()  # evaluation from here: nothing the networks compute changes, and Pyro warns
decoder.eval()  # of parameters frozen (as fit_posterior freezes the decoder's) in a module in training mode
x_small = x_test[:64]
observed = torch.ones_like(x_small, dtype=torch.bool)  # every pixel observed: fit_posterior fits p(t|x)
L = decoder.latent_dim


def mean_elbo(guide_net):
    pyro.set_rng_seed(0)
    return sum(dataset_elbo(x_small, guide_net, decoder)["elbo"] for _ in range(10)) / 10  # 10 draws of t


started = time.perf_counter()
with torch.no_grad():
    encoder(x_small)
encoder_seconds = time.perf_counter() - started
results = [("encoder q(t|x) (amortized)", encoder_seconds, sum(p.numel() for p in encoder.parameters()),
            mean_elbo(encoder))]
from_prior = PerImageGaussian(torch.zeros(len(x_small), L), torch.ones(len(x_small), L))
results.append(("q = p(t), no fitting", 0.0, 0, mean_elbo(from_prior)))
for steps in (20, 80, 240):
    pyro.set_rng_seed(0)
    started = time.perf_counter()
    r = fit_posterior(x_small, observed, from_prior, decoder, fill_value=0.0, steps=steps).base_dist
    results.append((f"per image, {steps} SVI steps from p(t)", time.perf_counter() - started,
                    r.loc.numel() * 2, mean_elbo(PerImageGaussian(r.loc, r.scale))))
pyro.set_rng_seed(0)
started = time.perf_counter()
r = fit_posterior(x_small, observed, encoder, decoder, fill_value=0.0, steps=20).base_dist
results.append(("per image, 20 steps from q(t|x)", time.perf_counter() - started, r.loc.numel() * 2,
                mean_elbo(PerImageGaussian(r.loc, r.scale))))
print(f"{len(x_small)} test images, latent_dim {L}")
print(f"{'guide':36s} {'seconds':>8s} {'parameters':>11s} {'ELBO (nats per image)':>22s}")
for name, seconds, params, elbo in results:
    print(f"{name:36s} {seconds:8.3f} {params:11d} {elbo:22.2f}")

# %% [markdown]
# The encoder infers q(t|x) for all the images in one pass, with parameters that do not grow with the
# data; the per-image Gaussians need many SVI steps (each a decoder pass over the images) to catch up
# with it, and their parameters grow with every image. Where they end above the encoder, the difference
# is the amortization gap; starting them from the encoder's q(t|x) closes most of it in a few steps.

# %% [markdown]
# ## 4. Minibatches: the N/B scaling is unbiased
#
# **Code:** `pyro.plate("data", size=num_data, subsample=index)` in `model.py: model` and `guide.py:
# guide`; `vae/build.py: build_svi` (its `SVI.evaluate_loss` gives -ELBO without a step).
#
# The ELBO of the dataset is a sum over all N images, ELBO = sum_i ELBO(x_i). One step sees a minibatch
# of B images, drawn at random, and estimates the sum by N/B * sum_{i in batch} ELBO(x_i): each image
# is in the batch with probability B/N, so the expectation is the full sum. In Pyro the plate does it:
# it spans all N images (`size=N`), is told which B it holds (`subsample=index`), and scales every
# log-density inside it by N/B.

# %%
svi = build_svi(cfg, encoder, decoder, N)
index = torch.randperm(N, generator=torch.Generator().manual_seed(0))[:32]
trace = poutine.trace(model).get_trace(x_train[index], index, decoder, N)
print(f'N = {N}, B = {len(index)}: the plate scales sites "t" and "x" by {trace.nodes["t"]["scale"]:.4g} '
      f'and {trace.nodes["x"]["scale"]:.4g}; N/B = {N / len(index):.4g}')

pyro.set_rng_seed(0)
full = torch.tensor([-svi.evaluate_loss(x_train, torch.arange(N)) / N for _ in range(3)])  # all N images at once
print(f"full-data ELBO, all {N} images per estimate: {full.mean():.3f} nats per image "
      f"(3 estimates, sd {full.std():.3f}: the noise of t ~ q(t|x))")
minibatch = {}
generator = torch.Generator().manual_seed(1)
for batch_size in (8, 64):
    estimates = []
    for _ in range(200):
        index = torch.randperm(N, generator=generator)[:batch_size]
        estimates.append(-svi.evaluate_loss(x_train[index], index) / N)
    minibatch[batch_size] = torch.tensor(estimates)
    mean, standard_error = mean_and_standard_error(minibatch[batch_size])
    print(f"B = {batch_size:2d}: mean of {len(estimates)} minibatch estimates {mean:.3f} ± {standard_error:.3f} "
          f"(standard error), {(mean - full.mean()) / standard_error:+.2f} standard errors from the full-data ELBO; "
          f"one estimate's sd {minibatch[batch_size].std():.2f}")

fig, ax = plt.subplots(figsize=(5, 3))
for batch_size, estimates in minibatch.items():
    ax.hist(estimates.numpy(), bins=40, alpha=0.6, density=True, label=f"N/B * sum over B = {batch_size}")
ax.axvline(full.mean().item(), color="k", label="full-data ELBO")
ax.set(xlabel="ELBO estimate, nats per image", ylabel="density", title="minibatch estimates of the ELBO")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# The minibatch estimates scatter around the full-data ELBO, and their mean lands on it within a
# couple of its standard errors, for either batch size: unbiased. A larger batch only narrows the
# scatter.
# `tests/test_model_guide.py` checks the scale and the average over a partition exactly.

# %% [markdown]
# ## 5. The score function (log-derivative trick) and its variance
#
# **Code:** `guide.py: guide(reparameterized=False)` and `ScoreFunctionNormal` (a Normal that tells
# Pyro it cannot be reparameterized); `variance.py: gradient_moments, summarize, measure`; the
# baselines in `vae/baselines.py` and `vae/leave_one_out.py: LeaveOneOut_ELBO`; the estimators are the
# config group `estimator` (conf/estimator/).
#
# The encoder's gradient of E_q[f(t)], f(t) = log p(x, t) - log q(t|x), needs the derivative of an
# expectation under a distribution that depends on the parameters phi. Since grad q = q grad log q,
#
#     grad_phi E_q[f(t)] = E_q[f(t) grad_phi log q(t|x)]
#
# (f's own dependence on phi, through -log q, adds E_q[-grad_phi log q] = 0), which needs only samples
# of t and log q: no gradient through t. Unbiased, but f(t) is the whole ELBO
# of the image, many nats, multiplied into a noisy direction: a high variance. Any b that does not
# depend on t can be subtracted, (f(t) - b) grad log q, keeping the mean (E_q[b grad log q] = 0) and
# cutting the variance: a decaying average of f (`score_avg_baseline`), a learned b(x)
# (`score_nn_baseline`, NVIL), or the mean of the other particles of the same image
# (`score_loo`, leave-one-out over K draws).
#
# Single-sample gradients of both estimators, on the same trained model and the same fixed minibatch:
# each draw is one training step's gradient of -ELBO / N. `variance.py: gradient_moments` takes the
# draws and gives each coordinate's mean and variance; the draws of one coordinate are kept for the
# plot (variance.py returns only the moments).

# %%
from variance import gradient_moments, measure, summarize

x_fixed, index_fixed = x_train[:16], torch.arange(16)


def single_sample_gradients(estimator, samples=100):
    """`samples` draws of the encoder's gradient of -ELBO / N by `estimator`, and variance.py's summary."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    svi = build_svi(config(*DATA, f"estimator={estimator}"), encoder, decoder, N)
    draws = []

    def draw():
        encoder.zero_grad()
        decoder.zero_grad()
        svi.loss_and_grads(svi.model, svi.guide, x_fixed, index_fixed)  # one estimate, no step
        draws.append(torch.cat([p.grad.flatten() for p in encoder.parameters()]) / N)
        return draws[-1]

    mean, variance = gradient_moments(draw, samples)
    return torch.stack(draws), summarize(mean, variance)


gradients = {name: single_sample_gradients(name) for name in ("reparam", "score")}
for name, (draws, summary) in gradients.items():
    print(f"{name:8s} encoder gradient: mean per-coordinate variance {summary['variance']:.3g}, "
          f"signal-to-noise ratio {summary['snr']:.3g}")
coordinate = gradients["reparam"][0].var(0).argmax()  # the coordinate the reparameterized gradient varies most in
fig, ax = plt.subplots(figsize=(5, 3))
for name, (draws, _) in gradients.items():
    ax.hist(draws[:, coordinate].numpy(), bins=30, alpha=0.6, density=True, label=name)
ax.set(xlabel=f"one encoder coordinate's gradient (parameter {coordinate.item()})", ylabel="density",
       yscale="log", title="single-sample gradients, one draw of t each")
ax.legend()
plt.show()

# %% [markdown]
# Both histograms centre on the same mean gradient (`tests/test_estimators.py` checks it within
# Monte-Carlo error), but the score function's draws spread far wider. `variance.py: measure` does the
# same for every estimator of the config group, baselines fitted first on random minibatches with the
# networks frozen, and reports the encoder's and the decoder's mean per-coordinate variance and its
# ratio to the reparameterized one (the command line `python variance.py` writes the same as JSON).

# %%
with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
    estimators = {name: compose("config", overrides=[f"estimator={name}"]).estimator
                  for name in ("reparam", "score", "score_avg_baseline", "score_nn_baseline", "score_loo")}
cfg_variance = config(*DATA, "samples=50", "batch_size=16", "baseline_warmup_steps=50", name="variance")
measured = measure(cfg_variance, copy.deepcopy(encoder), copy.deepcopy(decoder), x_train, estimators)
print(f"{'estimator':20s} {'encoder variance':>17s} {'/ reparam':>10s} {'decoder variance':>17s} "
      f"{'particles':>9s} {'seconds':>8s}")
for name, result in measured.items():
    print(f"{name:20s} {result['encoder']['variance']:17.3g} {result['encoder']['ratio_to_reparam']:10.3g} "
          f"{result['decoder']['variance']:17.3g} {result['particles']:9d} {result['seconds']:8.1f}")
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.bar(list(measured), [r["encoder"]["variance"] for r in measured.values()])
ax.set(yscale="log", ylabel="mean per-coordinate variance", title="encoder gradient, one minibatch")
ax.tick_params(axis="x", labelsize=8, labelrotation=15)
plt.show()

# %% [markdown]
# The baselines remove part of the score function's variance, and the leave-one-out estimator, with
# its K particles per image, most of it: read each ratio against 1, the reparameterized gradient's.
# The decoder's gradient, grad log p(x|t) at the drawn t, is the same whichever way q's gradient is
# estimated: its variance changes only with the number of particles. The same measured over a full
# training run: docs/results.md, "Gradient variance per estimator"; what each estimator then reaches:
# README.md, "The estimators".

# %% [markdown]
# ## 6. The reparameterization trick: t = t_loc + t_scale * eps
#
# **Code:** `guide.py: guide(reparameterized=True)` (a `dist.Normal`, whose `rsample` Pyro uses);
# `vae/build.py: build_svi`, `svi_step`; the estimator options `reparam` and `score`.
#
# Write the sample as a deterministic function of phi and of noise that does not depend on phi:
# t = t_loc(x) + t_scale(x) * eps, eps ~ N(0, I). Then
#
#     grad_phi E_q[f(t)] = E_eps[grad_phi f(t_loc + t_scale * eps)]
#
# and the gradient flows through t into the encoder, carrying the slope of log p(x, t) at t instead of
# the size of f(t). First the trick inside the guide: with `reparameterized=True` the sample t is a
# function of t_loc and t_scale with dt/dt_loc = 1 and dt/dt_scale = eps; with the score function t
# is a constant to autograd.

# %%
pyro.set_rng_seed(0)
x_four = x_test[:4]
for reparameterized in (True, False):
    site = poutine.trace(guide).get_trace(x_four, torch.arange(4), encoder, N,
                                          reparameterized=reparameterized).nodes["t"]
    t, q_t = site["value"], site["fn"].base_dist  # t ~ q(t|x) and q's Normal(t_loc, t_scale)
    print(f"reparameterized={reparameterized}: q is {type(q_t).__name__}, t.requires_grad = {t.requires_grad}")
    if t.requires_grad:
        eps = (t - q_t.loc) / q_t.scale  # the noise behind this draw
        d_loc, d_scale = torch.autograd.grad(t[0, 0], (q_t.loc, q_t.scale))
        print(f"  t[0,0] = {t[0, 0]:.4f} = t_loc + t_scale * eps = {q_t.loc[0, 0]:.4f} + {q_t.scale[0, 0]:.4f} * "
              f"{eps[0, 0]:.4f};  dt/dt_loc = {d_loc[0, 0]:.4f}, dt/dt_scale = {d_scale[0, 0]:.4f} = eps")

# %% [markdown]
# Now a few epochs of training with each estimator, from the same initial weights and the same
# minibatches: `estimator=reparam` against `estimator=score`, nothing else changed. The networks here
# have a 2-dimensional latent, so that step 7 can draw the latent space of the reparameterized one.

# %%
cfg_2d = {name: config(*DATA, "model.latent_dim=2", f"estimator={name}") for name in ("reparam", "score")}
pyro.set_rng_seed(0)
initial = build_networks(cfg_2d["reparam"], image_shape, torch.device("cpu"))
runs = {}
for name, cfg_run in cfg_2d.items():
    encoder_2d, decoder_2d = copy.deepcopy(initial)
    started = time.perf_counter()
    steps, tests = fit(cfg_run, encoder_2d, decoder_2d, epochs=4)
    runs[name] = {"steps": steps, "tests": tests, "networks": (encoder_2d, decoder_2d)}
    print(f"estimator={name:8s} {time.perf_counter() - started:5.1f} s, test ELBO per epoch: "
          + ", ".join(f"{value:.1f}" for value in tests))

fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
floor = min(runs["reparam"]["tests"]) - 150
for name, run in runs.items():
    smooth = np.convolve(run["steps"], np.ones(10) / 10, mode="valid")  # the mean of 10 steps
    axes[0].plot(smooth, label=name)
    axes[1].plot(run["tests"], "o-", label=name)
axes[0].set(xlabel="step", ylabel="minibatch ELBO, nats per image", title="training (mean of 10 steps)",
            ylim=(floor, None))
axes[1].set(xlabel="epoch", ylabel="test ELBO, nats per image", title="test ELBO", ylim=(floor, None))
axes[1].legend()
plt.show()

# %% [markdown]
# With the same model, data and optimizer, the reparameterized gradient climbs steadily; the score
# function's, unbiased but noisy, climbs slower and less steadily (the plots' lower edge is set from
# the reparameterized run, so a score-function run that falls far runs off it). Each estimator on all
# of MNIST, over several seeds: README.md, "The estimators" (and its "Known limits").

# %% [markdown]
# ## 7. The uses of the density model
#
# **Code:** `tasks/generate.py: prior_samples, interpolate, normal_quantile_grid`; `guide.py:
# latent_point` (t_loc(x), one code per image); `tasks/anomaly.py: scores, auroc`; `tasks/impute.py:
# make_mask, impute_one_pass, impute_fitted_importance, missing_pixel_errors`; `tasks/represent.py:
# latent_means`. The model is step 1's; the latent picture is step 6's 2-d reparameterized model. The
# command line runs each as `python evaluate.py run=<dir> task=<name>`.
#
# **Samples, reconstructions, an interpolation.** Samples decode t ~ p(t). A reconstruction decodes the
# code of an image, t_loc(x); an interpolation decodes the codes on the line between two images'
# codes, t = (1 - a) t_loc(x_a) + a t_loc(x_b).

# %%
from tasks.generate import interpolate

with torch.no_grad():
    reconstructions = decoder(latent_point(x_test[:10], encoder)).mean
    line = interpolate(encoder, decoder, x_test[10:13], x_test[13:16], steps=10)  # (3 pairs, 10 steps, C, H, W)
fig, axes = plt.subplots(1, 3, figsize=(12, 2.6), gridspec_kw={"width_ratios": [1, 2, 2]})
show(axes[0], prior_samples(decoder, 16, seed=1), 4, "samples E[x|t], t ~ p(t)")
show(axes[1], torch.cat([x_test[:10], reconstructions]), 10, "test images x (top), E[x|t_loc(x)] (bottom)")
show(axes[2], line.flatten(0, 1), 10, "interpolations from t_loc(x_a) to t_loc(x_b)")
plt.show()

# %% [markdown]
# **Anomalies.** An image the model finds unlikely has a low ELBO: -ELBO(x) is an anomaly score. The
# test images against images of uniform noise, observed by the same likelihood rule; AUROC is the
# chance that a random noise image scores above a random test image.

# %%
from tasks.anomaly import auroc, scores

pyro.set_rng_seed(0)
generator = torch.Generator().manual_seed(0)
noise = decoder.likelihood.observe(torch.rand(x_test[:500].shape, generator=generator), generator)
score = {name: scores(x, encoder, decoder, num_particles=20)["neg_elbo"]
         for name, x in (("test images", x_test[:500]), ("uniform noise", noise))}
print(f"-ELBO AUROC, test images against noise: {auroc(score['test images'], score['uniform noise']):.3f}")
fig, ax = plt.subplots(figsize=(5, 3))
bins = np.histogram_bin_edges(torch.cat(list(score.values())).numpy(), bins=60)
for name, values in score.items():
    ax.hist(values.numpy(), bins=bins, alpha=0.6, label=name)
ax.set(xlabel="-ELBO(x), nats (larger = more anomalous)", ylabel="images", title="anomaly scores")
ax.legend()
plt.show()

# %% [markdown]
# **Missing pixels.** The model scores the observed pixels alone, log p(x_o|t) (`model(..., mask=)`).
# The bottom half of each image is hidden and filled with E[x_m|...]: one encoder and decoder pass on
# the image with its hole filled by the training mean (`impute_one_pass`), or importance sampling from
# a Gaussian per image fitted to p(t|x_o) by SVI (`impute_fitted_importance`), against the mean image.
# The errors are on the missing pixels only.

# %%
from tasks.impute import fill, impute_fitted_importance, impute_one_pass, make_mask, missing_pixel_errors

pyro.set_rng_seed(0)
x_hole = x_test[:100]
mask = make_mask("bottom_half", tuple(x_hole.shape))
mean_image = train_images.mean(0)
filled = {"mean image": mean_image.expand_as(x_hole),
          "one pass": impute_one_pass(x_hole, mask, encoder, decoder, mean_image),
          "fitted importance": impute_fitted_importance(x_hole, mask, encoder, decoder, mean_image,
                                                        num_particles=100, steps=100)[0]}
for name, prediction in filled.items():
    errors = missing_pixel_errors(prediction, x_hole, mask)
    print(f"{name:18s} missing-pixel MSE {errors['mse']:.4f}, BCE {errors['bce']:.4f}")
rows = [fill(x_hole, mask, 0.5)] + [fill(x_hole, mask, p) for p in filled.values()] + [x_hole]
fig, ax = plt.subplots(figsize=(6, 4.2))
show(ax, torch.cat([row[:10] for row in rows]), 10,
     "rows: input (missing = grey), " + ", ".join(filled) + ", truth")
plt.show()

# %% [markdown]
# **The latent space in two dimensions.** With latent_dim = 2 (step 6's reparameterized model) the codes
# can be drawn: left, t_loc(x) of the test images coloured by their label (no label was used in
# training); right, E[x|t] on a grid of t at the standard normal's quantiles, so that the grid covers
# the prior's mass evenly.

# %%
from tasks.generate import normal_quantile_grid
from tasks.represent import latent_means

encoder_2d, decoder_2d = runs["reparam"]["networks"]
codes, _ = latent_means(encoder_2d, x_test)
with torch.no_grad():
    manifold = decoder_2d(normal_quantile_grid(12)).mean
fig, axes = plt.subplots(1, 2, figsize=(9, 4))
points = axes[0].scatter(codes[:, 0], codes[:, 1], c=test_labels, cmap="tab10", s=4)
fig.colorbar(points, ax=axes[0], label="label")
axes[0].set(xlabel="t_1 (t_loc(x))", ylabel="t_2", title="test images in the latent plane")
show(axes[1], manifold, 12, "E[x|t] on a grid of t (quantiles of N(0, 1))")
plt.show()

# %% [markdown]
# These are the uses the project measures on full runs with `python evaluate.py` (tasks `generate`,
# `anomaly`, `impute`, `represent`, `likelihood`): README.md, "What the density model is for", and
# docs/results.md, "Generation, representation, anomalies, missing data".
