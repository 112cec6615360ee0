"""Tables and figures from results: `python report.py` writes docs/results.md and the README's
result tables from the outputs of the recipes in conf/experiment/ (see vae/results.py);
`python report.py blocks=[best_one_hour]` fills only the blocks named;
`python report.py sweep=multirun/<date>/<time>` reports one multirun over seeds, with
`include=[<run or multirun dir>,...]` to add jobs run apart (e.g. more seeds, later).

Sweep mode: every job directory under `sweep` (at any depth) holds `metrics.jsonl` (one line per
epoch) and `.hydra/overrides.yaml`; per configuration, over its seeds (vae/sweeps.py), the final
test ELBO as mean ± standard deviation, median and each seed's value (nats per image), in
`report.md` and `report.json`, and `report.png`, the test ELBO against epoch and against wall
time, the median over seeds with a band from the worst seed to the best. All three are written
into `sweep`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from vae.results import UnknownBlock, write_results
from vae.sweeps import plot, read_failures, read_jobs, summarize, write_table


def report(sweep: str | Path, include: list[str | Path] = ()) -> list[dict[str, Any]]:
    """Read every job under `sweep` and under each directory of `include` (runs or sweeps made
    apart, e.g. more seeds of one estimator); write report.md, report.json and report.png into `sweep`."""
    sweep = Path(sweep)
    directories = [sweep, *(Path(d) for d in include)]
    missing = [str(d) for d in directories if not d.is_dir()]
    if missing:
        raise FileNotFoundError(f"no such directory: {', '.join(missing)}")
    rows, failures = summarize(read_jobs(*directories)), read_failures(*directories)
    if not rows and not failures:
        raise FileNotFoundError(f"no job with a tested epoch under {sweep} (looked for */metrics.jsonl)")
    write_table(rows, sweep / "report.md", failures)
    (sweep / "report.json").write_text(json.dumps({"configurations": rows, "failed": failures}, indent=2) + "\n")
    if rows:
        plot(rows).savefig(sweep / "report.png", dpi=120)
    return rows


@hydra.main(version_base="1.3", config_path="conf", config_name="report")
def main(cfg: DictConfig) -> None:
    try:
        if cfg.sweep is None:
            only = None if cfg.blocks is None else list(cfg.blocks)
            for path in write_results(Path(cfg.experiments), Path(cfg.sweeps), [Path(p) for p in cfg.documents],
                                      Path(cfg.figures), only):
                print(f"wrote {path}")
            return
        report(cfg.sweep, cfg.include)
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
    except UnknownBlock as error:  # a block name that vae/results.py does not know
        sys.exit(f"error: {error.args[0]}")
    print(Path(cfg.sweep, "report.md").read_text(), end="")


if __name__ == "__main__":
    main()
