"""Remake every table of README.md and docs/results.md: each recipe of conf/experiment/ in turn, then report.py.

    python -m tools.remake                        # every recipe, study by study; run again to continue
    python -m tools.remake --list                 # the commands in order, each marked done, started or to run,
                                                  # and how long a timed study's runs take
    python -m tools.remake --only one_hour,bf16   # the recipes of these studies alone
    python -m tools.remake --done model_levers    # count these studies (or study/step recipes) as remade already

Each recipe runs the command its header names (`# \\`python <entry>.py [-m] experiment=<study>/<step>\\``, the one
the docs quote), a study's `train` step first. Before a recipe runs for the first time, what an earlier run of it
left in its directory (outputs/experiments/<name> or multirun/experiments/<name>) is moved aside to
<directory>.before-remake, never deleted, so that nothing stale is resumed or reported; a recipe stopped midway
(the end of a session, a SIGTERM) continues where it stopped when the tool runs again, as its own command does.
Progress is kept in outputs/remake/progress.json, each command's output in outputs/remake/<study>_<step>.log.
It is many hours of CPU: start it with `setsid nohup python -m tools.remake &` and let nothing else run beside it.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
RECIPES_DIR = PROJECT_DIR / "conf" / "experiment"
HEADER = re.compile(r"# `python (\w+)\.py (-m )?experiment=([\w/]+)`")
PROGRESS = Path("outputs", "remake", "progress.json")
PREPARE = {"image_folder/mnist_png": ["-m", "tools.mnist_as_png", "outputs/mnist_png"]}  # writes the folder it reads


def recipes() -> list[tuple[str, list[str], str]]:
    """(recipe, its command's arguments after `python`, the directory it writes, relative to the project) of every
    recipe, study by study in name order, each study's `train` step first and its other steps in name order."""
    found = []
    for path in RECIPES_DIR.glob("*/*.yaml"):
        recipe = f"{path.parent.name}/{path.stem}"
        match = HEADER.match(path.read_text().splitlines()[1])
        if not match or match.group(3) != recipe:
            raise ValueError(f"conf/experiment/{recipe}.yaml: its second line must name its command, "
                             f"# `python <entry>.py [-m] experiment={recipe}`")
        entry, multirun = match.group(1), bool(match.group(2))
        study, step = path.parent.name, path.stem
        name = study if step == "train" else f"{study}_{step}"
        command = [f"{entry}.py", *(["-m"] if multirun else []), f"experiment={recipe}"]
        found.append((recipe, command, f"{'multirun' if multirun else 'outputs'}/experiments/{name}"))
    return sorted(found, key=lambda item: (item[0].split("/")[0], item[0].split("/")[1] != "train", item[0]))


def time_budget(recipe: str, multirun: bool) -> str:
    """How long a training recipe's runs take at most, from its composed config (trainer.max_minutes, the sweep's
    runs, how many the launcher runs at a time), to fit a timed study into one session on one processor; '' for a
    recipe without a time budget."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with initialize_config_dir(config_dir=str(PROJECT_DIR / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={recipe}"], return_hydra_config=True)
    minutes = cfg.trainer.get("max_minutes")
    if minutes is None:
        return ""
    params = (cfg.hydra.sweeper.get("params") or {}) if multirun else {}
    sweeps = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
    runs = math.prod(len(list(sweep.sweep_string_iterator())) for sweep in sweeps if sweep.is_sweep_override())
    if runs == 1:
        return f"at most {minutes:g} min"
    at_once = min(runs, cfg.hydra.launcher.get("n_jobs") or 1)
    return f"at most {minutes:g} min a run, {runs} runs {at_once} at a time: up to {math.ceil(runs / at_once) * minutes:g} min"


def chosen(names: str | None, every: list[str]) -> set[str]:
    """The recipes a comma-separated list of studies or study/step recipes names; one line if a name is unknown."""
    if not names:
        return set()
    picked = set()
    for name in names.split(","):
        matches = {recipe for recipe in every if recipe == name or recipe.split("/")[0] == name}
        if not matches:
            raise SystemExit(f"error: no recipe or study {name!r} in conf/experiment/ (python -m tools.remake --list)")
        picked |= matches
    return picked


def read_progress(root: Path) -> dict[str, dict[str, str]]:
    """{recipe: {"state": "started" or "done", "at": its time}} of the remake under `root`; {} before the first."""
    progress_file = root / PROGRESS
    return json.loads(progress_file.read_text()) if progress_file.is_file() else {}


def remake(root: Path, only: set[str] | None = None, done: set[str] = frozenset(), run=subprocess.run) -> int:
    """Run every recipe under `root` (or those in `only`) that progress.json does not hold as done, then report.py;
    0, or the exit code of the first command that failed (the recipes after it wait for the next call)."""
    progress_file = root / PROGRESS
    progress_file.parent.mkdir(parents=True, exist_ok=True)
    progress = read_progress(root)

    def mark(recipe: str, state: str) -> None:
        progress[recipe] = {"state": state, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        progress_file.write_text(json.dumps(progress, indent=1, sort_keys=True) + "\n")

    for recipe in sorted(done):
        if progress.get(recipe, {}).get("state") != "done":
            mark(recipe, "done")
    for recipe, command, directory in recipes():
        if (only and recipe not in only) or progress.get(recipe, {}).get("state") == "done":
            continue
        if recipe not in progress:  # its first run in this remake: what an earlier run left goes aside
            if (root / directory).exists():
                aside = root / f"{directory}.before-remake"
                if aside.exists():
                    raise SystemExit(f"error: {aside} is in the way: move or delete it, then run again")
                (root / directory).rename(aside)
            mark(recipe, "started")
        log_file = root / "outputs" / "remake" / f"{recipe.replace('/', '_')}.log"
        steps = [PREPARE[recipe]] if recipe in PREPARE and not (root / PREPARE[recipe][-1]).exists() else []
        for arguments in steps + [command]:
            print(f"{recipe}: python {' '.join(arguments)}   (log: {log_file.relative_to(root)})", flush=True)
            with log_file.open("a") as log:
                code = run([sys.executable, *arguments], cwd=root, stdout=log, stderr=subprocess.STDOUT).returncode
            if code:
                print(f"{recipe} failed (exit {code}): see {log_file}; run `python -m tools.remake` again to retry it")
                return code
        mark(recipe, "done")
    print("python report.py", flush=True)
    return run([sys.executable, "report.py"], cwd=root).returncode


def listing(root: Path, only: set[str] | None = None) -> str:
    """Each recipe's state and command, a training recipe with a time budget followed by how long it takes."""
    progress, lines = read_progress(root), []
    for recipe, command, _ in recipes():
        if only and recipe not in only:
            continue
        budget = time_budget(recipe, "-m" in command) if command[0] == "train.py" else ""
        lines.append(f"{progress.get(recipe, {}).get('state', 'to run'):8} python {' '.join(command)}"
                     + (f"   # {budget}" if budget else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the commands in order and their progress")
    parser.add_argument("--only", help="comma-separated studies or study/step recipes to remake")
    parser.add_argument("--done", help="comma-separated studies or study/step recipes to count as remade")
    args = parser.parse_args(argv)
    every = [recipe for recipe, _, _ in recipes()]
    only, done = chosen(args.only, every) or None, chosen(args.done, every)
    if args.list:
        print(listing(PROJECT_DIR, only))
        return 0
    return remake(PROJECT_DIR, only, done)


if __name__ == "__main__":
    sys.exit(main())
