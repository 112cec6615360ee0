"""vae/elbo.py's `elbo_parts`, which produces every reported test ELBO, against closed forms.

On probabilistic PCA, p(t) = N(0, I), p(x|t) = N(W t + b, sigma^2 I), with a diagonal Gaussian
q(t|x) = N(m, diag s^2), every part of the ELBO has a closed form:

    KL(q(t|x) || p(t))  = 1/2 sum_l (s_l^2 + m_l^2 - 1 - log s_l^2)
    E_q[log p(x|t)]     = -D/2 log(2 pi sigma^2) - (|x - W m - b|^2 + sum_d (W diag(s^2) W^T)_dd) / (2 sigma^2)
    E_q[ELBO]           = log p(x) - KL(q(t|x) || p(t|x)),    p(x) = N(b, W W^T + sigma^2 I),
                          p(t|x) = N(M^-1 W^T (x - b), sigma^2 M^-1),  M = W^T W + sigma^2 I

so the KL must match its formula exactly, and the one-sample recon and ELBO must average to theirs.
"""
from __future__ import annotations

import math

import torch
from test_evaluate import LinearEncoder, LinearGaussianDecoder

from vae.elbo import dataset_elbo, elbo_parts

REPEATS = 4000  # one-sample estimates per image


def ppca_case():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(16, 3, generator=generator)
    decoder = LinearGaussianDecoder(weight, torch.randn(16, generator=generator), sigma=0.5)
    x = decoder(torch.randn(6, 3, generator=generator)).sample()  # (6, 1, 4, 4) from p(x|t)
    return decoder, LinearEncoder(decoder, inflate=2.0), x


def closed_forms(decoder: LinearGaussianDecoder, encoder: LinearEncoder, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each image's KL(q || p(t)), E_q[log p(x|t)], log p(x) and KL(q || p(t|x)), written out."""
    w, b, s2 = decoder.weight.double(), decoder.bias.double(), decoder.sigma**2
    flat = x.flatten(1).double()  # (B, D)
    m, s = (value.double() for value in encoder(x)[:2])  # (B, L) each
    latent, dims = w.shape[1], w.shape[0]
    kl_prior = 0.5 * (s**2 + m**2 - 1 - torch.log(s**2)).sum(1)
    residual = ((flat - m @ w.T - b) ** 2).sum(1)
    spread = (s**2 @ (w**2).T).sum(1)  # sum_d (W diag(s^2) W^T)_dd for each image
    recon = -0.5 * dims * math.log(2 * math.pi * s2) - (residual + spread) / (2 * s2)
    log_px = torch.distributions.MultivariateNormal(b, w @ w.T + s2 * torch.eye(dims, dtype=torch.float64)).log_prob(flat)
    posterior_cov = s2 * torch.linalg.inv(w.T @ w + s2 * torch.eye(latent, dtype=torch.float64))  # the means agree
    kl_posterior = 0.5 * ((s**2 * torch.linalg.inv(posterior_cov).diagonal()).sum(1) - latent
                          + torch.logdet(posterior_cov) - torch.log(s**2).sum(1))
    return {"kl": kl_prior, "recon": recon, "log_px": log_px, "kl_posterior": kl_posterior}


def test_kl_part_is_the_closed_form_kl_of_two_gaussians():
    decoder, encoder, x = ppca_case()
    parts, exact = elbo_parts(x, encoder, decoder), closed_forms(decoder, encoder, x)
    torch.testing.assert_close(parts["kl"].double(), exact["kl"], rtol=1e-5, atol=1e-5)
    assert (exact["kl_posterior"] > 0.1).all()  # q is not the posterior: the ELBO is clearly below log p(x)


def test_one_sample_recon_and_elbo_average_to_their_closed_forms():
    """The mean of many one-sample estimates lands within 4 standard errors of E_q[log p(x|t)] and of
    log p(x) - KL(q || p(t|x)), image by image: an ELBO with the KL's sign flipped, t taken at q's mean
    instead of drawn from q, is many standard errors off."""
    decoder, encoder, x = ppca_case()
    exact = closed_forms(decoder, encoder, x)
    repeated = x.repeat(REPEATS, 1, 1, 1)  # (REPEATS * B, 1, 4, 4): independent draws of t for each copy
    parts = {key: value.double().reshape(REPEATS, len(x)) for key, value in elbo_parts(repeated, encoder, decoder).items()}
    for key, expected in (("recon", exact["recon"]), ("elbo", exact["log_px"] - exact["kl_posterior"])):
        mean, standard_error = parts[key].mean(0), parts[key].std(0) / math.sqrt(REPEATS)
        assert ((mean - expected).abs() < 4 * standard_error).all(), (key, mean, expected, standard_error)
        assert (standard_error < 0.1).all()  # tight enough to tell a real error apart
    assert (exact["log_px"] - exact["kl_posterior"] - exact["recon"] + exact["kl"]).abs().max() < 1e-6  # identity


def test_dataset_elbo_is_the_mean_over_images_of_elbo_parts():
    """dataset_elbo, which train.py logs as test_elbo, averages the per-image parts over every image of
    every chunk (a chunk left out, or a sum over a chunk taken for a mean, shows here) and gives
    bits/dim for a density of dequantized 8-bit pixels as -(ELBO - D ln 256) / (D ln 2)."""
    decoder, encoder, x = ppca_case()
    x = x.repeat(50, 1, 1, 1)  # 300 images, in chunks of 128, 128 and 44
    torch.manual_seed(0)
    means = dataset_elbo(x, encoder, decoder, batch_size=128)
    torch.manual_seed(0)  # the same draws of t, chunk by chunk
    parts = [elbo_parts(chunk, encoder, decoder) for chunk in x.split(128)]
    for key in ("elbo", "recon", "kl"):
        assert math.isclose(means[key], torch.cat([p[key] for p in parts]).double().mean().item(), rel_tol=1e-6), key
    dims = 16
    assert math.isclose(means["bits_per_dim"], -(means["elbo"] - dims * math.log(256)) / (dims * math.log(2)), rel_tol=1e-9)
