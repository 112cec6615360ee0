"""Speed: the SVI step against a hand-written one (`experiment=speed/bench`), the speed options on the
strongest configuration (`speed/throughput`) and data-parallel training (`speed/data_parallel`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vae.report.common import Outputs, provenance_line, read_json, read_jsonl, table
from vae.sweeps import nats


def data_parallel(out: Outputs) -> str:
    """One process against two ranks on the same global batch: each epoch's seconds, the test ELBO."""
    runs = {"1 process, 2 threads": (out.run("speed_data_parallel"), "python train.py experiment=speed/data_parallel"),
            "2 ranks (torchrun), 1 thread each": (out.run("speed_data_parallel_2ranks"), "torchrun --standalone "
                "--nproc_per_node=2 train.py experiment=speed/data_parallel hydra.run.dir=outputs/experiments/speed_data_parallel_2ranks")}
    metrics = {name: read_jsonl(run / "metrics.jsonl", command) for name, (run, command) in runs.items()}
    rows = [[name, " / ".join(f"{m['seconds']:.1f}" for m in lines[1:]), nats(lines[-1]["test_elbo"])]
            for name, lines in metrics.items()]
    return (table(["training", "seconds per epoch", f"test ELBO after epoch {metrics[next(iter(metrics))][-1]['epoch']}"],
                  rows) + "\n\n" + provenance_line(out, *(run for run, _ in runs.values())))


def bench_report(out: Outputs) -> dict[str, Any]:
    return read_json(out.run("speed_bench") / "bench.json", "python bench.py experiment=speed/bench")


def speed(out: Outputs) -> str:
    report = bench_report(out)
    rows = [[f"`{name}`", f"{r['median_ms']:.2f}", f"{r['iqr_ms']:.2f}", f"{r['ratio_to_raw']:.3f}", f"{r['ratio_iqr']:.3f}"]
            for name, r in report["results"].items()]
    e = report["evaluation"]
    return (f"Batch {report['batch_size']}, {report['rounds']} rounds of {report['steps_per_round']} steps per variant.\n\n"
            + table(["variant", "median ms per step", "IQR ms", "ratio to `raw`, median over rounds", "IQR"], rows)
            + f"\n\nProducing one training batch costs {report['data_fraction_of_step']:.1%} of a raw step; the IW "
            f"estimate of log p(x) (K={e['particles']}) runs at {e['iw_throughput_fraction_of_decoder']:.1%} of the "
            f"bare decoder's throughput" + (f"; with {e['flows']} inverse autoregressive flows in q(t|x) it takes "
                                            f"{e['flow_time_ratio']:.2f}x the time per image of the Gaussian q(t|x)"
                                            if "flows" in e else "")
            + ".\n\n" + provenance_line(out, out.run("speed_bench")))


def speed_short(out: Outputs) -> str:
    results = bench_report(out)["results"]
    rows = [[f"`{name}`", f"{results[name]['median_ms']:.1f}", f"{results[name]['ratio_to_raw']:.2f}"]
            for name in ("raw", "reparam", "reparam_jit", "reparam_bf16", "score", "score_loo") if name in results]
    return (table(["one training step (batch " + str(bench_report(out)["batch_size"]) + ")", "ms", "/ raw"], rows)
            + "\n\n" + provenance_line(out, out.run("speed_bench")))


SPEED_OPTIONS = {"reparam": "float32 (none)", "reparam_bf16": "`trainer.bf16`", "reparam_channels_last": "`trainer.channels_last`",
                 "reparam_compile": "`trainer.compile`"}


def throughput(out: Outputs) -> str:
    """The speed options of vae/build.py on the strongest configuration, each step's time against float32's
    (the medians of the per-round ratios to `raw`, divided), fastest first."""
    report = read_json(out.run("speed_throughput") / "bench.json", "python bench.py experiment=speed/throughput")
    results = {name: r for name, r in report["results"].items() if name in SPEED_OPTIONS}
    base = results["reparam"]["ratio_to_raw"]
    rows = [[SPEED_OPTIONS[name], f"{r['median_ms']:.1f}", f"{r['ratio_to_raw'] / base:.2f}"]
            for name, r in sorted(results.items(), key=lambda item: item[1]["ratio_to_raw"])]
    return (f"Batch {report['batch_size']}, {report['rounds']} rounds of {report['steps_per_round']} steps per option.\n\n"
            + table(["speed option", "median ms per step", "time per step / float32's"], rows)
            + "\n\n" + provenance_line(out, out.run("speed_throughput")))


BLOCKS: dict[str, Callable[[Outputs], str]] = {
    "speed": speed,
    "speed_short": speed_short,
    "throughput": throughput,
    "data_parallel": data_parallel,
}
