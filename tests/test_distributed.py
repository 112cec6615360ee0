"""Data-parallel training (vae/distributed.py): two gloo processes on their shares of each batch take
the same steps as one process on the whole batch, for each kind of estimator; torchrun trains one
run that one process resumes, and a run of one process resumes on two ranks; a signal to one rank
stops both after the same step, saved."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir

from conftest import FAST, PROJECT_DIR, compose_config, process_starts
from guide import ScoreFunctionNormal
from vae import distributed
from vae.build import build_likelihood, build_networks, build_svi, svi_step
from vae.config import ConfigError
from vae.data import load_training_data, observe_test_set
from vae.distributed import Ranks
from vae.preemption import StopRequest

NUM_IMAGES, STEPS = 63, 3
BATCHES = [slice(0, 24), slice(24, 48), slice(48, 63)]  # the last one splits 8 / 7 between two ranks
ESTIMATORS = {
    "reparam": ["estimator=reparam"],
    "score": ["estimator=score"],
    "nvil": ["estimator=score_nn_baseline", "estimator.baseline.use_decaying_avg_baseline=false"],
    "iwae": ["estimator=iwae"],
}
SGD = ["optim._target_=pyro.optim.SGD", "~optim.optim_args.fused", "optim.optim_args.lr=1e-5"]
# Adam would hide a wrongly scaled gradient (its step is invariant to the gradient's scale): SGD shows it.


@pytest.fixture(autouse=True)
def one_thread():
    """Each process on one thread (two of them share this machine's cores); the suite's own count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def fixed_noise(num_data: int, latent_dim: int) -> Iterator[dict]:
    """Within the block, the Normal's draws give image i always the same eps_i, whichever process
    and batch it is in: t = t_loc + t_scale * eps_i (rsample) and its detached copy (the score
    function); the block's dict takes the step's `index`. The draws are Pyro's again after it."""
    eps = torch.randn(num_data, latent_dim, generator=torch.Generator().manual_seed(1))
    current = {}

    def rsample(self, sample_shape=torch.Size()):
        return self.loc + self.scale * eps[current["index"]].expand(torch.Size(sample_shape) + self.loc.shape)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return rsample(self, sample_shape)

    originals = dist.Normal.rsample, ScoreFunctionNormal.sample
    dist.Normal.rsample, ScoreFunctionNormal.sample = rsample, sample
    try:
        yield current
    finally:
        dist.Normal.rsample, ScoreFunctionNormal.sample = originals


def steps(overrides: list[str], ranks: Ranks, plain_average: bool = False) -> tuple[list[float], dict[str, torch.Tensor]]:
    """STEPS SGD steps of the config on BATCHES (this rank's share of each); the losses (agreed over
    the ranks) and the parameters after them. `plain_average`: each rank's weight 1/R (a mutation)."""
    cfg = compose_config(*FAST, "model.latent_dim=2", *SGD, *overrides)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    images, _ = load_training_data(cfg, torch.device("cpu"))
    likelihood = build_likelihood(cfg.likelihood, images.shape[1])  # the Bernoulli
    x_all = observe_test_set(images[:NUM_IMAGES], likelihood)  # fixed binarization, the same everywhere
    encoder, decoder = build_networks(cfg, tuple(x_all.shape[1:]), torch.device("cpu"))
    svi = build_svi(cfg, encoder, decoder, NUM_IMAGES)
    if ranks.parallel:
        svi.optim = distributed.GradientAveraging(svi.optim)
    losses = []
    with fixed_noise(NUM_IMAGES, 2) as current:
        for step in range(STEPS):
            index, weight = distributed.rank_share(torch.arange(NUM_IMAGES)[BATCHES[step]], ranks)
            current["index"] = index
            if plain_average:
                weight = 1 / ranks.world_size
            if ranks.parallel:
                svi.optim.weight = weight
            loss = svi_step(svi, x_all[index], index)
            losses.append(distributed.combine_step(loss, weight, StopRequest(), ranks)[0])
    return losses, {name: value.detach().clone() for name, value in pyro.get_param_store().items()}


def rank_worker(rank: int, port: int, cases: dict[str, tuple[list[str], bool]], out: str) -> None:
    """Rank `rank` of two: the steps of each case (its overrides, plain_average) in turn, each from its
    own seed and a cleared param store (as in a process of its own); rank 0 saves {case: losses and
    parameters} to `out`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo on the loopback, whatever the host's name resolves to
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        results = {}
        for name, (overrides, plain_average) in cases.items():
            losses, params = steps(overrides, Ranks(rank, 2, rank), plain_average)
            results[name] = {"losses": losses, "params": params}
        if rank == 0:
            torch.save(results, out)
    finally:
        torch_dist.destroy_process_group()
    # Ends here, without the interpreter's teardown: in this suite's process (not on its own, nor in
    # train.py under torchrun, which the tests below run to the end) a spawned rank, its group
    # destroyed, now and then aborted in that teardown ("terminate called without an active
    # exception", no Python frame): a thread that C++ left running, not the steps under test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


PLAIN_AVERAGE = ["reparam", "nvil"]  # the estimators whose two ranks also take plain averages (a mutation)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """{case: the losses and parameters of rank 0 after the steps on two ranks}: each estimator's steps
    ("reparam", ...), and with a plain average of the ranks' gradients ("reparam/plain", ...), all taken by
    one pair of spawned ranks (two processes for all cases, not two for each)."""
    cases = {name: (overrides, False) for name, overrides in ESTIMATORS.items()}
    cases.update({f"{name}/plain": (ESTIMATORS[name], True) for name in PLAIN_AVERAGE})
    out = tmp_path_factory.mktemp("two_ranks") / "two_ranks.pt"
    mp.spawn(rank_worker, args=(free_port(), cases, str(out)), nprocs=2, join=True)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=list(ESTIMATORS))
def test_two_ranks_take_the_steps_of_one_process_on_the_whole_batch(estimator, two_ranks):
    losses, params = steps(ESTIMATORS[estimator], distributed.ALONE)
    parallel = two_ranks[estimator]
    assert parallel["losses"] == pytest.approx(losses, rel=1e-4)
    assert set(parallel["params"]) == set(params)
    for name, value in params.items():
        torch.testing.assert_close(parallel["params"][name], value, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("estimator", PLAIN_AVERAGE)
def test_the_share_weights_matter(estimator, two_ranks):
    """The check above can fail: a plain average of the ranks' gradients (weight 1/2 whatever the
    share; for NVIL's baseline net, 1/4) differs from the one-process step once a batch splits unequally."""
    _, params = steps(ESTIMATORS[estimator], distributed.ALONE)
    parallel = two_ranks[f"{estimator}/plain"]
    assert not all(torch.allclose(parallel["params"][n], v, rtol=1e-4, atol=1e-6) for n, v in params.items())


def torchrun(*args: str) -> subprocess.Popen:
    env = {"GLOO_SOCKET_IFNAME": "lo", **os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", *args], cwd=PROJECT_DIR, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_trains_one_run_that_one_process_resumes(tmp_path):
    run_dir = tmp_path / "run"
    process = torchrun(*FAST, "threads=1", "estimator=score_loo", f"hydra.run.dir={run_dir}")
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    assert [m["epoch"] for m in read_metrics(run_dir)] == [0, 1, 2]  # one line per epoch: rank 0's
    assert output.count("epoch=2 ") == 1, output[-3000:]
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert len(saved["rank_rngs"]) == 2 and not torch.equal(saved["rank_rngs"][0]["torch"], saved["rank_rngs"][1]["torch"])
    provenance = [json.loads(line) for line in (run_dir / "provenance.jsonl").read_text().splitlines()]
    assert provenance[0]["ranks"] == 2
    resumed = subprocess.run([sys.executable, "train.py", *FAST, "threads=1", "estimator=score_loo",
                              "trainer.epochs=3", f"resume={run_dir}"], cwd=PROJECT_DIR, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [m["epoch"] for m in read_metrics(run_dir)] == [0, 1, 2, 3]
    assert process_starts(run_dir) == [(1, 0), (3, 0)]  # the resumed process began after epoch 2
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["run"]  # rank 1 wrote no directory of its own here


def resume_worker(rank: int, port: int, run_dir: str, overrides: list[str], out: str) -> None:
    """Rank `rank` of two: train.train resuming `run_dir`; saved to `out`.<rank>: this rank's parameters
    after it, and its torch RNG state as each epoch began (as restored, for the first)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from train import train

        rng_states, epoch_batches = [], distributed.epoch_batches

        def recording_epoch_batches(*args):
            rng_states.append(torch.get_rng_state())
            return epoch_batches(*args)

        distributed.epoch_batches = recording_epoch_batches  # this spawned process's module only
        pyro.clear_param_store()
        train(compose_config(*FAST, *overrides, f"resume={run_dir}"), Path(run_dir), Ranks(rank, 2, rank))
        params = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
        torch.save({"params": params, "rng_states": rng_states}, f"{out}.{rank}")
    finally:
        torch_dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as rank_worker, without the interpreter's teardown


def test_a_run_of_one_process_resumes_on_two_ranks(tmp_path):
    """README: any number of processes resumes the run. Trained alone for epoch 1, then two ranks
    go on from its checkpoint: both with its weights and optimizer, in step (the same parameters on
    each rank after epoch 2), rank 1 with noise of its own; epochs 0 and 1 stay the alone run's."""
    from train import train

    run_dir, out = tmp_path / "run", tmp_path / "params"
    train(compose_config(*FAST, "threads=1", "trainer.epochs=1"), run_dir)
    alone = read_metrics(run_dir)
    epoch_1 = torch.load(run_dir / "checkpoint.pt", weights_only=False)["param_store"]["params"]
    mp.spawn(resume_worker, args=(free_port(), str(run_dir), ["threads=1", "trainer.epochs=2"], str(out)), nprocs=2,
             join=True)
    assert process_starts(run_dir) == [(1, 0), (2, 0)]  # the two ranks began after epoch 1
    assert [entry["ranks"] for entry in json_lines(run_dir / "provenance.jsonl")] == [1, 2]
    metrics = read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == [0, 1, 2] and metrics[:2] == alone

    params, rng_states = zip(*((saved["params"], saved["rng_states"]) for saved in
                               (torch.load(f"{out}.{rank}", weights_only=False) for rank in (0, 1))))
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert set(params[0]) == set(params[1]) == set(epoch_1)
    for name, value in params[0].items():
        assert torch.equal(params[1][name], value), name  # in step: one model on two ranks
        assert torch.equal(saved["param_store"]["params"][name], value), name  # rank 0's, saved
    assert not all(torch.equal(params[0][name], epoch_1[name]) for name in epoch_1)  # epoch 2 trained
    assert len(rng_states[0]) == len(rng_states[1]) == 1  # epoch 2 only
    assert not torch.equal(rng_states[0][0], rng_states[1][0])  # rank 1 draws noise of its own, not rank 0's
    assert len(saved["rank_rngs"]) == 2


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def rank_pid(ancestor: int, rank: int, timeout: float = 120) -> int:
    """The pid of the torchrun worker with RANK=`rank` that descends from process `ancestor`."""
    def parent(pid: int) -> int:
        status = (Path("/proc") / str(pid) / "status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                if not proc.name.isdigit() or f"RANK={rank}".encode() not in (proc / "environ").read_bytes().split(b"\0"):
                    continue
                pid = int(proc.name)
                while pid > 1 and pid != ancestor:
                    pid = parent(pid)
            except OSError:
                continue
            if pid == ancestor:
                return int(proc.name)
        time.sleep(0.2)
    raise TimeoutError(f"no process with RANK={rank} under {ancestor}")


def long_torchrun(run_dir: Path) -> subprocess.Popen:
    """A 40-epoch torchrun of two ranks, returned once its first epoch is in metrics.jsonl."""
    process = torchrun(*FAST, "threads=1", "trainer.epochs=40", f"hydra.run.dir={run_dir}")
    deadline = time.monotonic() + 300
    while not ((run_dir / "metrics.jsonl").is_file() and len(read_metrics(run_dir)) >= 2):
        assert time.monotonic() < deadline and process.poll() is None, "the run did not reach epoch 1"
        time.sleep(0.2)
    return process


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks' processes through /proc")
def test_a_signal_to_one_rank_stops_both_after_the_same_step_saved(tmp_path):
    run_dir = tmp_path / "run"
    process = long_torchrun(run_dir)
    os.kill(rank_pid(process.pid, 1), signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0 and "SIGTERM: saved" in output, output[-3000:]
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    stopped_at = (saved["epoch"], saved["next_batch"])
    assert stopped_at[0] < 40
    resumed = subprocess.run([sys.executable, "train.py", *FAST, "threads=1", "trainer.epochs=40",
                              f"resume={run_dir}"], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [m["epoch"] for m in read_metrics(run_dir)] == list(range(41))  # each epoch once
    assert process_starts(run_dir) == [(1, 0), stopped_at]  # the resume began at the step both ranks stopped after


def test_what_does_not_train_data_parallel_is_refused():
    ranks = Ranks(0, 2, 0)
    with pytest.raises(ConfigError, match="use_decaying_avg_baseline=true with 2 ranks"):
        distributed.check(compose_config(*FAST, "estimator=score_avg_baseline"), ranks)
    with pytest.raises(ConfigError, match="JIT ELBOs"):
        distributed.check(compose_config(*FAST, "estimator.elbo._target_=pyro.infer.JitTrace_ELBO"), ranks)
    distributed.check(compose_config(*FAST, *ESTIMATORS["nvil"]), ranks)  # NVIL's learned baseline alone trains


def test_a_slurm_job_of_two_tasks_is_two_ranks_of_one_group(monkeypatch):
    """What SLURM gives each task of `hydra/launcher=slurm_ddp` (tasks_per_node = gpus_per_node):
    submitit's TorchDistributedEnvironment turns it into torch.distributed's variables (written into
    a copy of the environment per task, never into this process's)."""
    torch_keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
    tasks = []
    for task in (0, 1):
        environ = {key: value for key, value in os.environ.items() if key not in torch_keys}
        environ.update(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="123", SLURM_NTASKS="2", SLURM_PROCID=str(task),
                       SLURM_LOCALID=str(task), SLURM_JOB_NODELIST="node1", SLURM_NNODES="1")
        monkeypatch.setattr(os, "environ", environ)
        tasks.append((distributed.from_environment(), environ["MASTER_ADDR"], environ["MASTER_PORT"]))
    assert [ranks for ranks, _, _ in tasks] == [Ranks(0, 2, 0), Ranks(1, 2, 1)]
    assert tasks[0][1:] == tasks[1][1:] == ("node1", tasks[0][2])  # one rendezvous for both
    with initialize_config_dir(config_dir=str(PROJECT_DIR / "conf"), version_base="1.3"):
        cfg = compose("config", ["hydra/launcher=slurm_ddp", "hydra.launcher.gpus_per_node=4"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher.tasks_per_node == launcher.gpus_per_node == 4


def test_the_ranks_shares_partition_each_global_batch(monkeypatch):
    """R = 3 ranks of data.batch_size 4: global batches of 12, rank r the r-th part of each; the parts
    cover the batch once and their weights B_r/B sum to 1; a last batch of fewer than R images is left out."""
    monkeypatch.setattr(distributed, "rank0_value", lambda value, ranks: value)  # rank 0's own draw
    data_cfg = compose_config(*FAST, "data.batch_size=4", "data.drop_last=false").data
    batches = distributed.epoch_batches(12 * 3 + 2, data_cfg, Ranks(0, 3, 0))  # 38 images: 12, 12, 12, (2 left out)
    assert [len(b) for b in batches] == [12, 12, 12]
    batches = distributed.epoch_batches(12 * 3 + 5, data_cfg, Ranks(0, 3, 0))
    assert [len(b) for b in batches] == [12, 12, 12, 5]
    shares = [distributed.rank_share(batches[-1], Ranks(r, 3, r)) for r in range(3)]
    assert torch.equal(torch.cat([part for part, _ in shares]), batches[-1])
    assert [len(part) for part, _ in shares] == [2, 2, 1] and sum(w for _, w in shares) == pytest.approx(1.0)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks' processes through /proc")
def test_a_rank_that_dies_ends_the_job_with_a_message_not_a_hang(tmp_path):
    """SIGKILL to rank 1 (no handler can run): torchrun sees the worker die and ends the others at
    once, with the failed rank and its exit code in its message; the last checkpoint stays readable."""
    run_dir = tmp_path / "run"
    process = long_torchrun(run_dir)
    os.kill(rank_pid(process.pid, 1), signal.SIGKILL)
    killed = time.monotonic()
    output, _ = process.communicate(timeout=120)  # not the process group's 10-minute timeout
    assert process.returncode != 0 and time.monotonic() - killed < 60
    assert "rank" in output and ("-9" in output or "SIGKILL" in output), output[-3000:]
    assert "error: rank 0: another rank of this job is gone" in output, output[-3000:]  # the survivor: one line
    assert 'File "' + str(PROJECT_DIR / "train.py") not in output  # no traceback of ours (torchrun prints its own)
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["epoch"] >= 1
