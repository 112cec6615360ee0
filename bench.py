"""Time the project's SVI training step against the same networks in a hand-written PyTorch loss.

    python bench.py                                  # default model and batch (64), device=auto
    python bench.py data.batch_size=128 bench.rounds=50 device=cuda

Configured like training (conf/bench.yaml = conf/config.yaml + a `bench` node), so `model.*`,
`data.*`, `optim.*` and `device` apply to every variant. The variants run round by round, one
block of steps each in turn, so that a slow moment of the machine hits all of them alike:

  (a) raw       the reference: the single-sample reparameterized ELBO written out by hand,
                -N/B * sum_i [log p(x_i|t_i) + log p(t_i) - log q(t_i|x_i)], t = t_loc + t_scale * eps,
                and one torch optimizer of the configured class over all parameters
  (b)...(e)     one SVI step per `bench.variants` entry (estimator and ELBO overrides)
  (f) data      producing one training batch: index the in-memory images, binarize afresh
  (g) eval      images per second of the importance-weighted log p(x) with K particles (one
                chunk of K * B latents), against the decoder's own forward pass over as many latents,
                and the same estimate with `bench.eval_flows` flows in q(t|x) (its own log q(t|x))

Prints a table (median and interquartile range of the time per step; the ratio to (a), median
and IQR over rounds of the ratio within each round) and writes bench.json with every round's time.
"""
from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import hydra
import pyro
import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from vae.build import build_likelihood, build_networks, build_svi, svi_step
from vae.config import ConfigError, check_config, register_resolvers, resolve_device, use_threads
from vae.data import DataNotFoundError, epoch_batches, load_split
from vae.importance import iw_estimates
from vae.provenance import provenance, record_provenance

log = logging.getLogger(__name__)


def raw_step(encoder, decoder, optimizer: torch.optim.Optimizer, x: torch.Tensor, num_data: int) -> float:
    """(a): one gradient step on the reparameterized minibatch ELBO, written out by hand."""
    t_loc, t_scale, _ = encoder(x)  # (B, latent_dim) each
    t = t_loc + t_scale * torch.randn_like(t_scale)  # t ~ q(t|x), reparameterized
    log_p_x = decoder(t).log_prob(x)  # log p(x|t), (B,)
    log_p_t = torch.distributions.Normal(0.0, 1.0).log_prob(t).sum(-1)  # log p(t), (B,)
    log_q_t = torch.distributions.Normal(t_loc, t_scale).log_prob(t).sum(-1)  # log q(t|x), (B,)
    loss = -num_data / len(x) * (log_p_x + log_p_t - log_q_t).sum()  # -ELBO of the dataset
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def networks(cfg: DictConfig, image_shape: tuple[int, ...], device: torch.device, seed: int):
    """Encoder and decoder with the same initial weights for every variant (and its speed options)."""
    torch.manual_seed(seed)
    return build_networks(cfg, image_shape, device, cfg.trainer)


def timed(fn: Callable[[], Any], steps: int, device: torch.device) -> float:
    """Seconds per call of `fn`, over `steps` calls (synchronized on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / steps


def quartiles(values: list[float]) -> list[float]:
    """First quartile, median, third quartile."""
    return statistics.quantiles(values, n=4) if len(values) > 1 else values * 3


def summary(seconds: list[float], raw_seconds: list[float]) -> dict[str, Any]:
    """A variant's seconds per step, one value per round: median and interquartile range, and
    its ratio to the raw step of the same round, median and IQR over rounds. Pairing by round
    cancels the machine's slower and faster minutes, which hit both steps of a round alike."""
    q1, median, q3 = quartiles(seconds)
    ratio_q1, ratio, ratio_q3 = quartiles([mine / raw for mine, raw in zip(seconds, raw_seconds)])
    return {"median_ms": median * 1e3, "iqr_ms": (q3 - q1) * 1e3, "ratio_to_raw": ratio,
            "ratio_iqr": ratio_q3 - ratio_q1, "seconds_per_round": seconds}


def bench(cfg: DictConfig, variant_configs: dict[str, DictConfig]) -> dict[str, Any]:
    """Run every variant round by round; return the timings and the machine they ran on."""
    check_config(cfg)
    use_threads(cfg)
    for key, least in (("rounds", 1), ("steps_per_round", 1), ("warmup_rounds", 0), ("eval_images", 1),
                       ("eval_particles", 1), ("eval_flows", 0)):
        value = cfg.bench[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(f"bench.{key}={value!r}: must be an integer >= {least}")
    device = resolve_device(cfg.device)
    images, _ = load_split(cfg.data, train=True)  # (N, C, H, W) in [0, 1]
    images = images.to(device)
    num_data, image_shape = len(images), tuple(images.shape[1:])
    batch_size, steps = cfg.data.batch_size, cfg.bench.steps_per_round
    batches = epoch_batches(num_data, batch_size, drop_last=True)
    observe = build_likelihood(cfg.likelihood, image_shape[0]).observe  # binarize (or dequantize)
    x = observe(images[batches[0].to(device)])  # one fixed minibatch
    index = batches[0].to(device)

    # (a) the hand-written reference, with the configured optimizer class over all parameters
    raw_encoder, raw_decoder = networks(cfg, image_shape, device, cfg.seed)
    optim = instantiate(cfg.optim)
    raw_optimizer = optim.pt_optim_constructor([*raw_encoder.parameters(), *raw_decoder.parameters()],
                                               **optim.pt_optim_args)
    steps_to_time = {"raw": partial(raw_step, raw_encoder, raw_decoder, raw_optimizer, x, num_data)}

    # (b)-(e) SVI steps, each with its own networks and its own param store scope
    scopes = {}
    for name, variant_cfg in variant_configs.items():
        check_config(variant_cfg)
        encoder, decoder = networks(variant_cfg, image_shape, device, cfg.seed)
        with pyro.get_param_store().scope() as scopes[name]:
            svi = build_svi(variant_cfg, encoder, decoder, num_data)
        steps_to_time[name] = partial(svi_step, svi, x, index)

    # (f) one training batch: index the in-memory images and binarize them afresh
    next_batch = iter(batches * (1 + (cfg.bench.rounds + cfg.bench.warmup_rounds) * steps // len(batches)))
    steps_to_time["data"] = lambda: observe(images[next(next_batch).to(device)])

    # (g) the importance-weighted log p(x) with K particles against the bare decoder on K * B latents,
    # and with q(t|x) followed by `eval_flows` inverse autoregressive flows (the same decoder)
    x_eval, num_particles, flows = x[: cfg.bench.eval_images], cfg.bench.eval_particles, cfg.bench.eval_flows
    t_eval = torch.randn(num_particles * len(x_eval), cfg.model.latent_dim, device=device)
    steps_to_time["eval_iw"] = partial(iw_estimates, x_eval, raw_encoder, raw_decoder, num_particles, num_particles)
    steps_to_time["eval_decoder"] = partial(torch.no_grad()(raw_decoder), t_eval)
    if flows:
        flow_cfg = cfg.copy()
        with open_dict(flow_cfg):  # conf/posterior/iaf.yaml with `flows` flows, whatever cfg's posterior
            flow_cfg.posterior = OmegaConf.merge(OmegaConf.load(Path(__file__).parent / "conf/posterior/iaf.yaml"),
                                                 {"flows": flows})
        flow_encoder, _ = networks(flow_cfg, image_shape, device, cfg.seed)
        steps_to_time["eval_iw_flows"] = partial(iw_estimates, x_eval, flow_encoder, raw_decoder, num_particles,
                                                 num_particles)

    # Every variant runs with the checks a training step has after the epoch's first (train.py)
    seconds: dict[str, list[float]] = {name: [] for name in steps_to_time}
    for round_number in range(cfg.bench.warmup_rounds + cfg.bench.rounds):
        for name, step in steps_to_time.items():
            with pyro.get_param_store().scope(scopes.get(name)), pyro.validation_enabled(cfg.trainer.check_every_step):
                duration = timed(step, steps, device)
            if round_number >= cfg.bench.warmup_rounds:
                seconds[name].append(duration)
    results = {name: summary(values, seconds["raw"]) for name, values in seconds.items()}
    iw_seconds, decoder_seconds = statistics.median(seconds["eval_iw"]), statistics.median(seconds["eval_decoder"])
    evaluation = {"images": len(x_eval), "particles": num_particles,
                  "iw_images_per_second": len(x_eval) / iw_seconds,
                  "decoder_images_per_second": len(x_eval) / decoder_seconds,  # K latents make one image
                  "iw_throughput_fraction_of_decoder": statistics.median(  # paired by round, as the ratios
                      decoder / iw for decoder, iw in zip(seconds["eval_decoder"], seconds["eval_iw"]))}
    if flows:  # the time per image with the flows over the configured q(t|x)'s, paired by round
        evaluation.update(flows=flows, flow_iw_images_per_second=len(x_eval) / statistics.median(seconds["eval_iw_flows"]),
                          flow_time_ratio=statistics.median(
                              with_flows / iw for with_flows, iw in zip(seconds["eval_iw_flows"], seconds["eval_iw"])))
    return {"machine": provenance(device), "batch_size": batch_size, "steps_per_round": steps,
            "rounds": cfg.bench.rounds, "results": results, "evaluation": evaluation,
            "data_fraction_of_step": results["data"]["ratio_to_raw"]}


def table(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"{m['cpu']}, {m['threads']} threads, device {m['device']}{' (' + m['gpu'] + ')' if m['gpu'] else ''}, "
             f"torch {m['torch']}, pyro {m['pyro']}; batch {report['batch_size']}, "
             f"{report['rounds']} rounds x {report['steps_per_round']} steps",
             f"{'variant':<24}{'median ms':>10}{'IQR ms':>9}{'/ raw':>8}{'IQR':>7}"]
    for name, r in report["results"].items():
        lines.append(f"{name:<24}{r['median_ms']:>10.2f}{r['iqr_ms']:>9.2f}{r['ratio_to_raw']:>8.3f}"
                     f"{r['ratio_iqr']:>7.3f}")
    e = report["evaluation"]
    lines += [f"(f) a training batch costs {report['data_fraction_of_step']:.1%} of a raw step",
              f"(g) IW log p(x), K={e['particles']}: {e['iw_images_per_second']:.2f} images/s, "
              f"{e['iw_throughput_fraction_of_decoder']:.1%} of the bare decoder's "
              f"{e['decoder_images_per_second']:.2f} images/s"]
    if "flows" in e:
        lines.append(f"(g) with {e['flows']} flows in q(t|x): {e['flow_iw_images_per_second']:.2f} images/s, "
                     f"{e['flow_time_ratio']:.2f}x the time per image")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    overrides = list(HydraConfig.get().overrides.task)
    variant_configs = {name: compose(config_name="bench", overrides=overrides + list(extra))
                       for name, extra in cfg.bench.variants.items() if extra is not None}  # null: left out
    try:
        report = bench(cfg, variant_configs)
    except (ConfigError, DataNotFoundError) as error:
        sys.exit(f"error: {error}")
    print(table(report))
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    record_provenance(out_dir, report["machine"]["device"])
    out_file = out_dir / "bench.json"
    out_file.write_text(json.dumps(report, indent=2))
    log.info(f"wrote {out_file}")


if __name__ == "__main__":
    register_resolvers()  # conf/config.yaml's hydra.run.dir
    main()
