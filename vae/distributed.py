"""Data-parallel training: R processes ("ranks") train one model, each on its share of every minibatch.

    torchrun --nproc_per_node=R train.py ...          one machine, R processes (GPUs, or CPU with gloo)
    python train.py -m hydra/launcher=slurm_ddp ...  SLURM: one task per GPU (submitit)

The estimator stays the one of a single process. Rank 0 draws each epoch's order of the N images
(its RNG, so that one process trains exactly as before) and hands it to the others; a step takes
the next global batch of B = R x data.batch_size images, and rank r its r-th part, B_r images.
Each rank's model and guide keep the plate's size N, so its loss is N/B_r times the sum over its
B_r images, and the one-process estimate on all B images is the weighted sum

    N/B sum_{i in batch} l_i  =  sum_r (B_r/B) [N/B_r sum_{i in share r} l_i],

so `GradientAveraging` sums the ranks' gradients weighed by B_r/B (exact also when the last batch
is split unequally), in one all-reduce per step. The NVIL baseline network's loss, the square
of N/B_r times a residual per image, carries the plate's factor twice: its weight is (B_r/B)^2.
Each rank draws its own noise t ~ q(t|x) and its own binarization. Only rank 0 tests and writes
(metrics, TensorBoard, images, checkpoints); the checkpoint keeps every rank's RNG.

This mirrors Pyro's `pyro.optim.HorovodOptimizer` (examples/svi_horovod.py) with torch.distributed:
`gloo` on the CPU, `nccl` on GPUs (each rank the GPU of its LOCAL_RANK).
"""
from __future__ import annotations

import hashlib
import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyro
import torch
import torch.distributed as dist
from hydra.utils import get_class
from omegaconf import OmegaConf
from pyro.optim import PyroOptim
from torch import Tensor

from vae.config import JIT_ELBOS, ConfigError
from vae.data import epoch_batches as one_process_epoch_batches
from vae.preemption import StopRequest

TIMEOUT = timedelta(minutes=10)  # a rank that waits longer for the others ends the job


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes that train one model."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    @property
    def writer(self) -> bool:
        """Rank 0 tests, logs and writes the run directory."""
        return self.rank == 0


ALONE = Ranks()


def from_environment() -> Ranks:
    """The ranks that torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or a SLURM job of several tasks
    (through submitit's TorchDistributedEnvironment) gives this process; ALONE otherwise."""
    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return ALONE
    return Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))


def join(device: torch.device, job_dir: Path) -> tuple[Ranks, Path]:
    """Start this process's part: the process group (nccl for CUDA `device`, else gloo), warnings
    only in the log of ranks > 0, and rank 0's job directory for all."""
    ranks = from_environment()
    if not ranks.parallel:
        return ranks, job_dir
    if device.type == "cuda":
        torch.cuda.set_device(local_device(device, ranks))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    if not ranks.writer:
        logging.getLogger().setLevel(logging.WARNING)  # one log line per epoch, rank 0's
    return ranks, Path(rank0_value(str(job_dir), ranks))


def local_device(device: torch.device, ranks: Ranks) -> torch.device:
    """A rank's device: the GPU of its LOCAL_RANK (the only one, where each task sees one), or the CPU."""
    if device.type != "cuda" or not ranks.parallel:
        return device
    return torch.device("cuda", ranks.local_rank if torch.cuda.device_count() > 1 else 0)


def barrier(ranks: Ranks) -> None:
    if ranks.parallel:
        dist.barrier()


def leave(ranks: Ranks) -> None:
    if ranks.parallel and dist.is_initialized():
        dist.destroy_process_group()


def rank0_value(value: Any, ranks: Ranks) -> Any:
    """Rank 0's `value` (any picklable object), on every rank."""
    if not ranks.parallel:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any, ranks: Ranks) -> list[Any] | None:
    """Every rank's `value`, in rank order, on rank 0 (None on the others)."""
    if not ranks.parallel:
        return [value]
    values = [None] * ranks.world_size if ranks.writer else None
    dist.gather_object(value, values, dst=0)
    return values


def rank_seed(seed: int, rank: int, *position: int) -> int:
    """The seed of rank r > 0's noise, from the run's seed (and, on a resume with more ranks than
    were saved, the epoch and batch it resumes at); rank 0 keeps `seed`."""
    if rank == 0 and not position:
        return seed
    key = "/".join(str(part) for part in (seed, rank, *position))
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


def seed_noise(seed: int, ranks: Ranks) -> None:
    """After the networks are built (the same weights on every rank, from `seed`): each rank > 0
    draws its own noise from here on."""
    if ranks.rank > 0:
        pyro.set_rng_seed(rank_seed(seed, ranks.rank))


def epoch_batches(num_data: int, data_cfg: Any, ranks: Ranks) -> list[Tensor]:
    """An epoch's global batches of R x data.batch_size indices, in rank 0's random order; a last
    batch of fewer than R images (a rank would have none) is left out of this epoch."""
    batches = None
    if ranks.writer:
        batches = one_process_epoch_batches(num_data, data_cfg.batch_size * ranks.world_size, data_cfg.drop_last)
        if ranks.parallel and len(batches) > 1 and len(batches[-1]) < ranks.world_size:
            batches.pop()
    return rank0_value(batches, ranks)


def rank_share(batch: Tensor, ranks: Ranks) -> tuple[Tensor, float]:
    """This rank's part of a global batch of indices, and its weight B_r/B."""
    if not ranks.parallel:
        return batch, 1.0
    part = batch.tensor_split(ranks.world_size)[ranks.rank]
    return part, len(part) / len(batch)


def combine_step(loss: float, weight: float, stop: StopRequest, ranks: Ranks) -> tuple[float, bool]:
    """(The step's loss of the whole global batch, sum_r (B_r/B) loss_r; whether to stop now), the
    same on every rank: a stop requested on any rank (a signal to one task) is a stop on all, after
    this same step. The loop stops on this answer alone, never on its own signal between steps."""
    if not ranks.parallel:
        return loss, stop.signal_name is not None
    both = torch.tensor([loss * weight, 1.0 if stop.signal_name else 0.0], dtype=torch.float64, device=device_of_group())
    dist.all_reduce(both)
    both = both.cpu()
    if both[1] > 0 and not stop.signal_name:
        stop.signum, stop.signal_name = signal.SIGTERM, "SIGTERM"  # another rank's signal: end as a SIGTERM would
    return both[0].item(), bool(both[1] > 0)


LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Connection refused", "NCCL communicator was aborted")


def lost_peer(error: BaseException) -> bool:
    """Did a collective fail because another rank of the job is gone (killed, crashed)?"""
    return isinstance(error, RuntimeError) and any(sign in str(error) for sign in LOST_PEER)


class LostPeer(RuntimeError):
    """Another rank of this job is gone (killed, crashed): this one cannot go on."""


@contextmanager
def job(device: torch.device, job_dir: Path) -> Iterator[tuple[Ranks, Path]]:
    """This process's part of a job (torchrun, SLURM tasks; alone: ALONE) for the `with` block: its
    ranks and rank 0's job directory (`join`). The process group is left at the end, also after an
    error; an error that says another rank is gone becomes `LostPeer`, in one line (the group is
    not left then: nobody is there to leave it with)."""
    ranks, job_dir = join(device, job_dir)
    try:
        yield ranks, job_dir
    except Exception as error:
        if ranks.parallel and lost_peer(error):
            raise LostPeer(f"rank {ranks.rank}: another rank of this job is gone "
                           f"({str(error).splitlines()[0][:120]})") from error
        leave(ranks)
        raise
    leave(ranks)


def device_of_group() -> torch.device:
    """nccl reduces CUDA tensors, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


class GradientAveraging:
    """A Pyro optimizer that, before its step, replaces each parameter's gradient by the sum over
    ranks of weight_r x gradient_r: one all-reduce of all the gradients, flattened, in the order of
    the parameters' names (the same on every rank). `weight` is this step's B_r/B (set by the
    loop before the step); parameters whose name starts with one of `squared` (the NVIL baseline
    network, "baseline$$$") take weight^2. Everything else (states, schedulers) is `inner`'s."""

    def __init__(self, inner: PyroOptim, squared: tuple[str, ...] = ("baseline$$$",)) -> None:
        self.inner, self.squared, self.weight = inner, squared, 1.0

    def __call__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        name_of = pyro.get_param_store().param_name
        params = sorted(params, key=name_of)  # SVI hands a set: its order differs between processes
        weights = [self.weight**2 if name_of(p).startswith(self.squared) else self.weight for p in params]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([(g * w).reshape(-1) for g, w in zip(grads, weights)])
        dist.all_reduce(flat)
        for p, part in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = part.view_as(p)
        self.inner(params, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


def check(cfg: Any, ranks: Ranks) -> None:
    """What does not train data-parallel, refused in one line before any work."""
    if not ranks.parallel:
        return
    if OmegaConf.select(cfg, "estimator.baseline.use_decaying_avg_baseline"):
        raise ConfigError(f"estimator.baseline.use_decaying_avg_baseline=true with {ranks.world_size} ranks: each rank "
                          "would keep its own average; use estimator=score_loo, or NVIL's learned baseline alone "
                          "(estimator=score_nn_baseline estimator.baseline.use_decaying_avg_baseline=false)")
    if issubclass(get_class(cfg.estimator.elbo._target_), JIT_ELBOS):
        raise ConfigError(f"estimator.elbo._target_={cfg.estimator.elbo._target_} with {ranks.world_size} ranks: "
                          "Pyro's JIT ELBOs are not tested data-parallel; use the Trace ELBO of the same name")
