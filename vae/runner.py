"""Everything around train.py's loop, so that the loop reads as the algorithm: for each epoch, for each
minibatch, an SVI step; then test and save.

A `Runner` is entered once per training process. It owns this process's place in a data-parallel job
(vae/distributed.py: its share of each minibatch, the gradient averaging, the agreement on each step's
loss and on a stop), the run's directory and its records (vae/logbook.py), the checkpoint it resumes
from and the ones it writes (vae/checkpoint.py: `RunState`, where in which epoch the run stands), the
signals that ask it to stop after a step (vae/preemption.py), the time budget (`trainer.max_minutes`: an
epoch starts only if, as long as the last, it ends within it),
the KL warm-up's weight, the switch of objective (`trainer.switch_after_minutes`: after the first epoch that
ends past that minute, the epochs train `trainer.switch_elbo`, e.g. the IW bound, the epoch of the switch
saved in the checkpoint) and divergence (a NaN loss ends the run, its last good checkpoint kept).

    with Runner(cfg, out_dir, ranks) as run:
        ... load the data, build the networks and SVI ...
        run.start(svi, encoder=encoder, decoder=decoder)    # a resumed run gets its state back
        for epoch in run.epochs(test):                       # the untrained model tested first
            for index in run.minibatches():                  # this process's share of each one
                run.step(x(index), index)                    # svi.step
            run.end_epoch(test)                              # the metrics line, the test when due, save

A stop request (SIGTERM, SIGINT, SIGUSR2 of a preempted job) ends the current step, saves it, prints
the command that continues the run and leaves the `with` block; `run.result` says it was interrupted.
"""
from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pyro
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pyro.infer import SVI
from tqdm import tqdm

from vae import checkpoint, distributed
from vae.build import learning_rate, step_schedule, svi_step
from vae.checkpoint import RunState
from vae.config import resolve_device, use_threads
from vae.distributed import ALONE, Ranks
from vae.logbook import Logbook
from vae.preemption import stop_on_signals
from vae.runs import resume_command

log = logging.getLogger(__name__)


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite."""


class Interrupted(Exception):
    """A stop was requested: the step is saved and the run leaves its `with` block."""


def another_epoch_fits(wall_time: float, last_epoch_seconds: float, budget_seconds: float) -> bool:
    """The time budget's rule: after `wall_time` seconds, an epoch as long as the last ends within the budget."""
    return wall_time + last_epoch_seconds <= budget_seconds


class Runner:
    """The run around the loop: see the module's docstring."""

    def __init__(self, cfg: DictConfig, out_dir: str | Path, ranks: Ranks = ALONE) -> None:
        distributed.check(cfg, ranks)
        self.cfg, self.ranks = cfg, ranks
        self.device = distributed.local_device(resolve_device(cfg.device), ranks)
        use_threads(cfg)
        self.resume_from = checkpoint.to_resume(cfg, Path(out_dir))
        self.out_dir = checkpoint.run_directory(self.resume_from, Path(out_dir))
        self.checkpoint_file = self.out_dir / checkpoint.CHECKPOINT_NAME
        self.metrics: dict[str, Any] = {}
        self.interrupted: int | None = None
        self.stack = ExitStack()

    def __enter__(self) -> Runner:
        self.logbook = self.stack.enter_context(Logbook(self.out_dir, writes=self.ranks.writer))  # the directory is ours
        self.stop = self.stack.enter_context(stop_on_signals())
        self.saved = checkpoint.load(self.resume_from, self.cfg) if self.resume_from else None
        distributed.barrier(self.ranks)  # every rank has read the checkpoint before rank 0 writes one
        return self

    def __exit__(self, kind: Any, error: BaseException | None, trace: Any) -> bool:
        handled = self.stack.__exit__(kind, error, trace)
        return bool(handled) or isinstance(error, Interrupted)

    @property
    def result(self) -> dict[str, Any]:
        """The last epoch's metrics (ELBOs in nats per image), the run directory, and the signal that
        interrupted it, if one did."""
        interrupted = {"interrupted": self.interrupted} if self.interrupted is not None else {}
        return {**self.metrics, **interrupted, "run_dir": str(self.out_dir)}

    def start(self, svi: SVI, num_data: int, **networks: torch.nn.Module) -> None:
        """Training begins: data-parallel, the ranks' gradients are averaged and each draws its own
        noise; a resumed run gets its weights, optimizer and RNG states and its place back; the run's
        provenance line is written."""
        cfg, ranks = self.cfg, self.ranks
        if ranks.parallel:  # the gradient of the global batch, summed over the ranks' shares
            svi.optim = distributed.GradientAveraging(svi.optim)
        distributed.seed_noise(cfg.seed, ranks)  # the same weights on every rank, each its own noise
        self.svi, self.num_data = svi, num_data
        switch_elbo = cfg.trainer.get("switch_elbo")  # the objective after trainer.switch_after_minutes, if any
        self.objectives = [(svi.loss, svi.loss_and_grads)]
        if switch_elbo is not None:
            elbo = instantiate(switch_elbo)
            self.objectives.append((elbo.loss, elbo.loss_and_grads))
        saved = self.saved
        self.state = checkpoint.restore(saved, svi.optim, cfg, self.device, ranks, **networks) if saved else RunState()
        self.state.run_id = self.state.run_id or distributed.rank0_value(uuid.uuid4().hex, ranks)  # from its start
        if saved:
            log.info(f"resuming {self.resume_from} {self.state.position(cfg.trainer.epochs)}")
        self.metrics = self.logbook.start(self.state.epoch if saved else 0, self.device,
                                          self.resume_from.parent if saved else None, epoch=self.state.epoch,
                                          ranks=ranks.world_size, run_id=self.state.run_id,
                                          batch=self.state.batch_in_epoch)  # where it begins
        max_minutes = cfg.trainer.max_minutes
        self.budget_seconds = 60.0 * max_minutes if max_minutes is not None else math.inf
        self.out_of_time = not another_epoch_fits(  # a resumed run whose budget is spent (the same state on every rank)
            self.state.wall_time, self.state.last_epoch_seconds, self.budget_seconds)

    def save(self) -> None:
        checkpoint.save(self.checkpoint_file, self.state, self.svi.optim, self.cfg,
                        keep_copy=self.cfg.trainer.keep_checkpoints, ranks=self.ranks)

    def epochs(self, test: Callable[[int], dict[str, float]]) -> Iterator[int]:
        """Each epoch to train, from where the run stands, until trainer.epochs or the time budget are
        spent; a new run first tests and saves the untrained model (epoch 0 of every curve)."""
        state = self.state
        if not self.saved:
            if self.ranks.writer:
                self.logbook.record({"epoch": 0, "train_elbo": None, **test(0), "wall_time": 0.0})
            self.save()
        while state.epoch <= self.cfg.trainer.epochs and not self.out_of_time:
            if state.batches is None:  # a new epoch: a fresh order of the images
                state.start_epoch(distributed.epoch_batches(self.num_data, self.cfg.data, self.ranks))
            switched = state.switch_epoch is not None and state.epoch >= state.switch_epoch
            self.svi.loss, self.svi.loss_and_grads = self.objectives[switched]  # trainer.switch_elbo from then on
            self.started = time.perf_counter()
            yield state.epoch

    def minibatches(self) -> Iterator[torch.Tensor]:
        """This epoch's minibatches from `state.next_batch` on, each as the indices (B,) of this process's
        share of it, on the device; `step` must follow each. After a step during which a stop was
        requested (on any rank), the run is saved there and interrupted."""
        state = self.state
        with tqdm(total=len(state.batches), initial=state.next_batch, desc=f"epoch {state.epoch}", unit="batch",
                  disable=None, leave=False) as bar:
            while state.next_batch < len(state.batches):
                index, self.weight = distributed.rank_share(state.batches[state.next_batch], self.ranks)  # all B, or B_r
                if self.ranks.parallel:
                    self.svi.optim.weight = self.weight  # B_r/B: the ranks' gradients add up to the batch's
                yield index.to(self.device)
                bar.update()
                bar.set_postfix(loss_per_image=f"{self.loss / self.num_data:.2f}", refresh=False)
                if self.stopping:
                    self.interrupt()

    def step(self, x: torch.Tensor, index: torch.Tensor) -> None:
        """One SVI step on the minibatch `x` at positions `index` (the warm-up's kl_weight given to model
        and guide), with Pyro's and torch's checks on every step or on the epoch's first; its loss, of
        the whole minibatch, is added to the epoch's."""
        state, cfg, ranks = self.state, self.cfg, self.ranks
        batches = len(state.batches)
        objective = {}
        warmup_steps = cfg.trainer.get("kl_warmup_epochs", 0) * batches
        if warmup_steps:  # beta = this step's number / warm-up steps, up to 1: -(recon - beta KL)
            objective["kl_weight"] = min(1.0, ((state.epoch - 1) * batches + state.next_batch + 1) / warmup_steps)
        try:
            with pyro.validation_enabled(cfg.trainer.check_every_step or state.next_batch == 0):
                loss = svi_step(self.svi, x, index, **objective)  # -ELBO (or -objective) of the dataset, from this batch
        except ValueError as error:  # torch's check of a distribution's parameters: NaN outputs
            if "found invalid values" not in str(error):
                raise
            loss = math.nan  # diverged, seen by the check before the loss
            if ranks.parallel:  # the other ranks wait for this one's gradients: end the job
                raise TrainingDiverged(f"invalid values at epoch {state.epoch}, step {state.next_batch + 1} "
                                       f"on rank {ranks.rank}; the last good checkpoint {self.checkpoint_file} is kept")
        loss, self.stopping = distributed.combine_step(loss, self.weight, self.stop, ranks)  # a stop on any rank: on all
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"loss is {loss} at epoch {state.epoch}, step {state.next_batch + 1} of {batches}; "
                f"the last good checkpoint {self.checkpoint_file} is kept. Try a lower learning rate "
                f"(optim.optim_args.lr={cfg.optim.optim_args.lr} now) or optim=clipped_adam"
            )
        self.loss = loss
        state.loss_sum += loss
        state.next_batch += 1

    def interrupt(self) -> None:
        """Stopped after a step (every rank after the same one): save it, say how to continue, hand the
        signal on (submitit: requeue into this run directory) and leave the run."""
        self.state.epoch_seconds += time.perf_counter() - self.started
        self.save()
        log.warning(f"{self.stop.signal_name}: saved {self.checkpoint_file} at epoch {self.state.epoch}, "
                    f"batch {self.state.next_batch}. Continue with:\n  {resume_command(self.out_dir)}")
        self.stop.call_previous_handler()
        self.interrupted = self.stop.signum
        raise Interrupted(self.stop.signal_name)

    def end_epoch(self, test: Callable[[int], dict[str, float]]) -> None:
        """The epoch's line of metrics.jsonl (its mean train ELBO per image, seconds, learning rate; the
        test ELBO of `test`, by rank 0, every trainer.test_every epochs, after the last and when the time
        budget is spent), then the schedule's step and the checkpoint that ends it."""
        state, cfg, ranks, epoch = self.state, self.cfg, self.ranks, self.state.epoch
        seconds = state.epoch_seconds + time.perf_counter() - self.started
        metrics = {"epoch": epoch, "train_elbo": -state.loss_sum / (len(state.batches) * self.num_data),
                   "seconds": seconds, "lr": learning_rate(self.svi.optim)}
        state.last_epoch_seconds = seconds
        self.out_of_time = distributed.rank0_value(  # rank 0's clock
            not another_epoch_fits(state.wall_time + seconds, seconds, self.budget_seconds), ranks)
        if self.out_of_time:
            log.info(f"trainer.max_minutes={cfg.trainer.max_minutes}: another epoch of {seconds:.0f} s would end past "
                     f"the time budget; epoch {epoch} is the last")
        minutes = cfg.trainer.get("switch_after_minutes")
        if minutes is not None and state.switch_epoch is None and distributed.rank0_value(
                state.wall_time + seconds >= 60 * minutes, ranks):  # rank 0's clock, as the budget's
            state.switch_epoch = epoch + 1  # saved with this epoch's checkpoint
            log.info(f"trainer.switch_after_minutes={minutes}: epochs from {epoch + 1} on train "
                     f"{cfg.trainer.switch_elbo._target_}")
        if ranks.writer and (epoch % cfg.trainer.test_every == 0 or epoch == cfg.trainer.epochs or self.out_of_time):
            metrics.update(test(epoch))  # rank 0 tests and writes
        else:
            metrics.update(test_elbo=None, test_recon=None, test_kl=None)
        state.wall_time += time.perf_counter() - self.started + state.epoch_seconds
        metrics["wall_time"] = state.wall_time
        self.logbook.record(metrics)  # first the epoch's line, then the checkpoint that ends it
        self.metrics = metrics
        state.end_epoch()
        step_schedule(self.svi.optim)  # schedule=...: the next epoch's learning rate
        self.save()
