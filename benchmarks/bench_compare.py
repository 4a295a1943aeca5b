"""Speed of today's code against an older revision (issue #13), measured A/B in one run.

Two long-lived worker processes (benchmarks/ab_worker.py), one importing this tree and one an older tree
(a git revision, extracted with ``git archive``, or a directory), each build the same workloads; every timed
call alternates between them (A B, then B A), so load from other processes lands on both sides alike.
Ratios are old / new medians: above 1 means today's code is faster.

Workloads: the ``mnist`` model (the shipped checkpoint with its trained student) and the TARFlow-sized
config (28×28×1, p = 4, 4 flow blocks × 4 layers, width 128; random weights, untrained student). Full
sampling = AR prior + flow inverse, at each batch size, without and with resampling CFG, with the exact,
Jacobi, auto (today's default: exact or Jacobi by batch size) and distilled inverses (a side without one is left
out), with each side's Jacobi sweeps per block; the train step at batch 64 (``--no-train`` leaves it out).

    python -m benchmarks.bench_compare --compare-to 0a6217a --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO_ROOT,
    add_common_args,
    cpu_usage,
    positive_int,
    repeats_for,
    resolve_device,
    save_benchmark,
    set_threads,
)
from farmer.pretrained import DEFAULT_SHIPPED, SHIPPED_DIR

WORKER = Path(__file__).resolve().parent / "ab_worker.py"
MODELS = ("mnist", "tarflow")
BATCHES = (1, 100)
INVERSES = ("exact", "jacobi", "auto", "distilled")
TRAIN_BATCH = 64
DEFAULT_CHECKPOINT = SHIPPED_DIR / DEFAULT_SHIPPED


@contextmanager
def baseline_tree(rev_or_path: str) -> Iterator[Path]:
    """A directory holding the old ``farmer`` package: ``rev_or_path`` itself if it is one, else that git
    revision of this repository extracted to a temporary directory (read-only for the repository)."""
    path = Path(rev_or_path)
    if (path / "farmer" / "__init__.py").is_file():
        yield path.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="farmer-baseline-") as tmp:
        archive = subprocess.run(["git", "archive", "--format=tar", rev_or_path, "farmer"], cwd=REPO_ROOT,
                                 capture_output=True, check=False)
        if archive.returncode != 0:
            raise ValueError(f"{rev_or_path!r} is neither a farmer tree nor a git revision: "
                             f"{archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        yield Path(tmp)


class Side:
    """One worker process, importing ``farmer`` from ``tree``."""

    def __init__(self, name: str, tree: Path, threads: int, checkpoint: Path) -> None:
        self.name = name
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), str(threads), str(checkpoint)], cwd=tree, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**_clean_env(), "PYTHONPATH": str(tree)})
        self.tree = self._read()["ready"]

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker exited (code {self.process.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait()


def _clean_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def ab(sides: tuple[Side, Side], request: dict[str, Any], warmup: int, repeats: int) -> list[dict[str, Any]]:
    """``repeats`` replies per side after ``warmup`` untimed calls each, alternating A B / B A."""
    for _ in range(warmup):
        for side in sides:
            side.call(request)
    replies: list[dict[str, Any]] = [{"old": None, "new": None} for _ in range(repeats)]
    for r in range(repeats):
        for side in sides if r % 2 == 0 else sides[::-1]:
            replies[r][side.name] = side.call(request)
    return replies


def summarise(replies: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    """Per key (sampling totals: AR + inverse) and clock: each side's median and the old/new ratio of the
    medians; today's inverses also against the old exact one (the old tree may lack Jacobi)."""
    def series(side: str, clock: str, key: str) -> list[float]:
        rows = [r[side][clock] for r in replies]
        if key in ("ar", "train"):
            return [row[key] for row in rows]
        return [row["ar"] + row[key] for row in rows if key in row]

    out: dict[str, Any] = {}
    for key in keys:
        entry: dict[str, Any] = {}
        for clock, suffix in (("wall", ""), ("cpu", "_cpu")):
            old, new = series("old", clock, key), series("new", clock, key)
            entry[f"old{suffix}_s"] = statistics.median(old) if old else None
            entry[f"new{suffix}_s"] = statistics.median(new) if new else None
            if old and new:
                entry[f"speedup{suffix}"] = entry[f"old{suffix}_s"] / entry[f"new{suffix}_s"]
        out[key] = entry
    old_exact = out.get("exact", {})
    for key in keys:
        for suffix in ("", "_cpu"):
            if key not in ("ar", "train") and old_exact.get(f"old{suffix}_s") and out[key][f"new{suffix}_s"]:
                out[key][f"speedup_vs_old_exact{suffix}"] = old_exact[f"old{suffix}_s"] / out[key][f"new{suffix}_s"]
    return out


def run(args: argparse.Namespace, old_tree: Path) -> dict[str, Any]:
    repeats = repeats_for(args.quick)
    sides = (Side("old", old_tree, args.threads, args.checkpoint), Side("new", REPO_ROOT, args.threads,
                                                                         args.checkpoint))
    rows = []
    try:
        print(f"old: {sides[0].tree}\nnew: {sides[1].tree}")
        for model in args.models:
            for batch in args.batch_sizes:
                for cfg in (False, True):
                    request = {"op": "sample", "model": model, "batch": batch, "cfg": cfg}
                    replies = ab(sides, request, repeats.warmup, repeats.repeats)
                    row = {"kind": "sample", "model": model, "batch": batch, "cfg": cfg,
                           **summarise(replies, ["ar", *INVERSES]),
                           "jacobi_sweeps": replies[-1]["new"].get("sweeps"),
                           "old_jacobi_sweeps": replies[-1]["old"].get("sweeps")}
                    rows.append(row)
                    print(format_row(row), flush=True)
            if args.no_train:
                continue
            request = {"op": "train", "model": model, "batch": args.train_batch}
            row = {"kind": "train", "model": model, "batch": args.train_batch,
                   **summarise(ab(sides, request, repeats.warmup, repeats.repeats), ["train"])}
            rows.append(row)
            print(format_row(row), flush=True)
    finally:
        for side in sides:
            side.close()
    return {"old_tree": sides[0].tree, "rows": rows}


def _cell(entry: dict[str, Any], field: str = "speedup") -> str:
    """"wall× / CPU×" of a ratio field ("—" where a side lacks it)."""
    wall, cpu = entry.get(field), entry.get(f"{field}_cpu")
    return "—" if wall is None else f"{wall:.2f}× / {cpu:.2f}×"


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return "—" if numerator is None or denominator is None else f"{numerator / denominator:.2f}×"


def _old_new(entry: dict[str, Any]) -> str:
    return f"{_seconds(entry['old_s'])} → {_seconds(entry['new_s'])}"


def _sweeps(sweeps: list[int] | None) -> str:
    return ",".join(map(str, sweeps)) if sweeps else "—"


def format_row(row: dict[str, Any]) -> str:
    head = f"{row['model']:>7} {row['kind']:>6} batch {row['batch']:>3}"
    if row["kind"] == "train":
        return f"{head}: train step old {_seconds(row['train']['old_s'])} s, new " \
               f"{_seconds(row['train']['new_s'])} s, {_cell(row['train'])} (wall / CPU)"
    parts = [f"{head} cfg {'yes' if row['cfg'] else 'no ':>3}: AR {_cell(row['ar'])}"]
    for key in INVERSES:
        entry = row[key]
        if entry["new_s"] is not None:
            ratio = _cell(entry) if entry["old_s"] is not None else \
                f"{_cell(entry, 'speedup_vs_old_exact')} vs old exact"
            parts.append(f"{key} {_seconds(entry['old_s'])} -> {_seconds(entry['new_s'])} s ({ratio})")
    return " | ".join(parts)


def markdown(result: dict[str, Any]) -> list[str]:
    """The comparison as markdown tables (benchmarks/run_all.py prints them)."""
    header = ["model", "batch", "CFG", "exact: old → new s", "exact ×", "Jacobi: old → new s", "Jacobi ×",
              "auto: new s", "auto × vs old exact", "distilled: old → new s", "distilled ×",
              "Jacobi sweeps/block old → new"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    train = []
    for row in result["rows"]:
        if row["kind"] == "train":
            t = row["train"]
            train.append(f"| {row['model']} | {row['batch']} | {_seconds(t['old_s'])} → {_seconds(t['new_s'])} | "
                         f"{_cell(t)} |")
            continue
        cells = [row["model"], str(row["batch"]), "w = 2.5" if row["cfg"] else "none"]
        for key in ("exact", "jacobi"):
            cells += [_old_new(row[key]), _cell(row[key])]
        cells += [_seconds(row["auto"]["new_s"]), _cell(row["auto"], "speedup_vs_old_exact"),
                  _old_new(row["distilled"]), _cell(row["distilled"]),
                  f"{_sweeps(row.get('old_jacobi_sweeps'))} → {_sweeps(row['jacobi_sweeps'])}"]
        lines.append("| " + " | ".join(cells) + " |")
    return [
        f"## Against {result['compare_to']} (A/B in one run)",
        "",
        "Full sampling = AR prior + inverse; wall-clock medians in seconds; × = old / new median, by wall "
        "clock / by CPU time of the process (the steadier one on a shared machine). auto (today's default) is "
        "compared with the old exact one (the old default).",
        "",
        *lines,
        "",
        "| model | batch | train step old → new s | × |",
        "|---:|---:|---:|---:|",
        *train,
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--compare-to", default="0a6217a", help="git revision or directory of the old tree")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="the mnist model to sample")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=list(BATCHES))
    parser.add_argument("--train-batch", type=positive_int, default=TRAIN_BATCH)
    parser.add_argument("--no-train", action="store_true", help="time sampling only")
    args = parser.parse_args(argv)
    args.threads = args.threads or 1
    args.checkpoint = args.checkpoint.resolve()
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)
    device = resolve_device(args.device)
    if device.type != "cpu":
        raise SystemExit("bench_compare times the CPU only")
    with cpu_usage() as usage, baseline_tree(args.compare_to) as old_tree:
        result = run(args, old_tree)
    result["compare_to"] = args.compare_to
    print("\n".join(markdown(result)))
    return save_benchmark("compare", args, device, repeats_for(args.quick), usage, **result)


if __name__ == "__main__":
    main()
