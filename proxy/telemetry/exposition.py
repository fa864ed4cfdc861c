"""One Prometheus text exposition from several workers' own. Pure.

`run --workers N` answers `/metrics` for all its workers at once. Counters and
histograms of different processes cannot be told apart once summed (a restarted
worker's counters start again from zero), so each worker's samples keep their own
series, marked with a `worker` label, and each family is declared once. Queries sum
them (`sum without (worker) (...)`), as they would sum the pods of a Deployment.

Rules:
1. The input is what `proxy.telemetry.metrics` writes: every family's `# HELP` and `# TYPE`
   lines come before its samples, and a family's samples are contiguous.
2. A family's description and type are the first worker's; its samples are every
   worker's, in worker order.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["merge_expositions"]


def merge_expositions(expositions: Iterable[tuple[str, str]]) -> str:
    """Merge `(worker label, exposition text)` pairs into one exposition."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for worker, text in expositions:
        family = ""
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    declared = headers.setdefault(family, [])
                    if len(declared) < 2 and line not in declared:
                        declared.append(line)
                    samples.setdefault(family, [])
                continue
            samples.setdefault(family, []).append(_labelled(line, worker))
    lines: list[str] = []
    for family, family_samples in samples.items():
        lines.extend(headers.get(family, ()))
        lines.extend(family_samples)
    lines.append("")
    return "\n".join(lines)


def _labelled(sample: str, worker: str) -> str:
    """A sample line with `worker="..."` first among its labels."""
    label = f'worker="{worker}"'
    brace = sample.find("{")
    space = sample.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        rest = sample[brace + 1 :]
        return f"{sample[:brace]}{{{label}{'' if rest.startswith('}') else ','}{rest}"
    return f"{sample[:space]}{{{label}}}{sample[space:]}"
