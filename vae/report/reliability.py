"""Exact resume under SIGKILL and SIGTERM at random moments (`experiment=reliability/faults`).
"""
from __future__ import annotations

from collections.abc import Callable

from vae.report.common import Outputs, copy_figure, provenance_line, read_json, table


def faults(out: Outputs) -> str:
    directory = out.run("reliability_faults")
    result = read_json(directory / "faults.json", "python faults.py experiment=reliability/faults")
    copy_figure(directory / "faults.png", out.figures / "faults.png")
    s = result["summary"]
    rows = [["SIGKILLs / SIGTERMs sent", f"{s['kills']} / {s['terms']}"],
            ["runs continued to the end", f"{s['runs_resumed_to_the_end']} of {s['runs']}"],
            ["runs ending with the uninterrupted run's weights and metrics", f"{s['runs_equal_to_uninterrupted']} of {s['runs']}"],
            ["epochs lost / duplicated in metrics.jsonl", f"{s['epochs_lost']} / {s['epochs_duplicated']}"],
            ["exit codes after SIGTERM", ", ".join(f"{code}: {n}" for code, n in sorted(s["sigterm_exit_codes"].items()))]]
    for key, n in sorted(s["moments"].items()):  # "SIGKILL, training": what the run was doing at the signal
        signal, moment = key.split(", ", 1)
        rows.append([f"{signal}s {'that came after the run had ended' if moment == 'finished first' else 'while ' + moment}", n])
    if "training_seconds" in s:
        rows.append(["the uninterrupted run's training time, s", f"{s['training_seconds']:.1f}"])
    return table(["", "count"], rows) + "\n\n" + provenance_line(out, directory)


BLOCKS: dict[str, Callable[[Outputs], str]] = {
    "faults": faults,
}
