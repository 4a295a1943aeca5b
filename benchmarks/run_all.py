"""Run every benchmark, each in its own interpreter, and write results/summary.json and results/summary.md.

    python -m benchmarks.run_all --quick --threads 1            # smoke run (minutes on a busy CPU)
    python -m benchmarks.run_all --threads 2 --checkpoint runs/mnist
    python -m benchmarks.run_all --quick --threads 1 --train-presets tiny --sample-preset tiny \\
        --sample-batches 1 4 --out /tmp/bench                    # seconds: for a test
    python -m benchmarks.run_all --threads 1 --compare-to 0a6217a   # + A/B against an old revision (issue #13)

The sampling benchmark always times the distilled inverse too (``--distilled``): without a trained student
it builds one from the flow, which is enough for timing. ``--compare-to REV_OR_PATH`` adds
benchmarks/bench_compare.py (today's code against that git revision or directory, A/B). The summary is
printed and written as markdown; exits non-zero if any benchmark failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import bench_compare
from benchmarks.bench_sample import BATCHES
from benchmarks.bench_train import PHASES, PRESETS
from benchmarks.common import (
    REPO_ROOT,
    add_common_args,
    environment,
    percent,
    positive_int,
    read_result,
    resolve_device,
    set_threads,
    subprocess_env,
    write_result,
)
from farmer.config import PRESETS as PRESET_CONFIGS

BENCHMARKS = ("train", "sample", "compare")


def bench_command(name: str, args: argparse.Namespace) -> list[str]:
    """The command line of ``benchmarks.bench_NAME`` with the options run_all passes on."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {BENCHMARKS}")
    command = [sys.executable, "-m", f"benchmarks.bench_{name}", "--out", str(args.out)]
    if args.quick:
        command.append("--quick")
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    if args.device is not None:
        command += ["--device", args.device]
    if name == "train":
        command += ["--presets", *args.train_presets] + (["--compile"] if args.compile else [])
    elif name == "compare":
        command += ["--compare-to", args.compare_to, "--batch-sizes", *map(str, args.compare_batches)]
    else:
        command += ["--distilled", "--preset", args.sample_preset, "--batch-sizes", *map(str, args.sample_batches)]
        if args.checkpoint is not None:
            command += ["--checkpoint", str(args.checkpoint)]
    return command


def run_benchmark(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one benchmark (its output streams through) and return its JSON, or the failure."""
    path = Path(args.out) / f"{name}.json"
    path.unlink(missing_ok=True)  # a failed run must not leave an older result looking current
    start = time.perf_counter()
    done = subprocess.run(bench_command(name, args), cwd=REPO_ROOT, env=subprocess_env(), check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"ok": False, "returncode": done.returncode, "wall_s": wall}
    return {"ok": True, "wall_s": wall, "result": read_result(path)}


# Markdown -----------------------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _train_section(result: dict[str, Any]) -> list[str]:
    peak = result["matmul_peak"]
    header = [
        "preset",
        "params",
        "batch",
        "precision",
        "pass",
        "images/s",
        "ms/call",
        "GFLOP/call",
        "GFLOP/s",
        "of peak",
        "of peak (CPU time)",
        "peak mem MiB (+call)",
    ]
    rows = []
    for r in result["presets"]:
        for phase in PHASES:
            p, memory = r[phase], r[phase]["memory"]
            rows.append([
                r["preset"], f"{r['parameters'] / 1e6:.2f}M", str(r["batch"]), r["precision"], phase,
                f"{p['images_per_s']:.1f}", f"{p['median_s'] * 1e3:.1f}", f"{p['flops'] / 1e9:.2f}",
                f"{p['achieved_gflops']:.1f}", percent(p["fraction_of_peak"]), percent(p["fraction_of_peak_cpu_time"]),
                f"{memory['peak_mib']:.0f} (+{memory['peak_delta_mib'] or 0:.0f})",
            ])  # fmt: skip
        if "train_compiled" in r:
            c, flops = r["train_compiled"], r["train"]["flops"]
            rows.append([
                r["preset"], f"{r['parameters'] / 1e6:.2f}M", str(r["batch"]), r["precision"],
                f"train, compiled ({c['speedup']:.2f}× eager; {c['compile_s']:.0f} s to compile)",
                f"{c['images_per_s']:.1f}", f"{c['median_s'] * 1e3:.1f}", f"{flops / 1e9:.2f}",
                f"{flops / c['median_s'] / 1e9:.1f}", percent(flops / c["median_s"] / 1e9 / peak["gflops"]), "—", "—",
            ])  # fmt: skip
    return [
        "## Training step and likelihood pass",
        "",
        "train = forward + backward + gradient clipping + AdamW step + EMA update (no data loading); log_prob = "
        "exact likelihood, no grad; compiled = the train step with the loss module under torch.compile "
        "(`--compile`). FLOPs from torch.utils.flop_counter (matmuls and attention, counted "
        f"non-causal). Peak: best {peak['size']}² {peak['dtype']} matmul in the same run, "
        f"**{peak['gflops']:.1f} GFLOP/s** wall"
        + (f", {peak['cpu_gflops']:.1f} GFLOP per CPU-second" if peak["cpu_gflops"] else "")
        + ". Memory: peak RSS (accelerators: peak allocated) of a fresh process running the call; in "
        "brackets the rise over the state just before it.",
        "",
        *_table(header, rows),
    ]


def _sample_section(result: dict[str, Any]) -> list[str]:
    model = result["model"]
    rows, speedups = [], []
    for r in result["rows"]:
        for name in ("exact", "distilled"):
            if name in r:
                s = r[name]
                rows.append([
                    str(r["batch"]), r["guidance"], name, f"{r['ar']['median_s']:.3f}",
                    f"{s['inverse']['median_s']:.3f}", f"{s['total_median_s']:.3f}",
                    f"{s['per_image_s'] * 1e3:.1f}", f"{s['images_per_s']:.2f}",
                ])  # fmt: skip
        if "inverse_speedup" in r:
            speedups.append(
                [str(r["batch"]), r["guidance"], f"{r['inverse_speedup']:.1f}×", f"{r['total_speedup']:.2f}×"]
            )
    lines = [
        "## Sampling (layout of the paper's Table 5)",
        "",
        f"Model: {model['source']}, {model['parameters'] / 1e6:.2f}M parameters; distilled inverse: "
        f"{model['student'] or 'none'}. Medians in seconds; the distilled inverse decodes the same latents as "
        "the exact one; total = AR + inverse.",
        "",
        *_table(["batch", "CFG", "inverse", "AR s", "AF inverse s", "total s", "per image ms", "images/s"], rows),
    ]
    if speedups:
        lines += [
            "",
            "Distilled vs exact inverse, medians of per-repeat ratios (paper, ImageNet-256 on GPU: 22× for the "
            "inverse, ~4× in total):",
            "",
            *_table(["batch", "CFG", "inverse speed-up", "total speed-up"], speedups),
        ]
    return lines


SECTIONS = {"train": _train_section, "sample": _sample_section, "compare": bench_compare.markdown}


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as markdown: an environment line, then one section (tables) per benchmark."""
    env = summary["environment"]
    lines = [
        "# farmer benchmarks",
        "",
        f"torch {env['torch']} · {env['threads']} thread(s) · {env['cpu_model']} ({env['cpu_capability']}, "
        f"{env['cpu_count']} logical CPUs) · device {env.get('device_name', env['device'])} · commit "
        f"{env['git_commit']} · {env['time_utc']} · {'quick' if summary['quick'] else 'full'} run, "
        f"{summary['wall_s']:.0f} s · load average {env['load_average_1m']}",
        "",
    ]
    for name, entry in summary["benchmarks"].items():
        if not entry["ok"]:
            lines += [f"## {name}: FAILED (exit {entry['returncode']})", ""]
            continue
        usage = entry["result"]["cpu_usage"]
        lines += [
            *SECTIONS[name](entry["result"]),
            "",
            f"CPU seconds / wall seconds over this benchmark: {usage['cpu_per_wall']:.2f} (with one thread, "
            "well below 1 means other processes shared the core and wall times are inflated).",
            "",
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="checkpoint to sample from (default: random init)"
    )
    parser.add_argument("--train-presets", nargs="+", default=list(PRESETS), help="presets for bench_train")
    parser.add_argument("--compile", action="store_true", help="bench_train also times the compiled train step")
    parser.add_argument("--sample-preset", default="mnist", help="preset for bench_sample without --checkpoint")
    parser.add_argument("--sample-batches", type=positive_int, nargs="+", default=list(BATCHES))
    parser.add_argument("--compare-to", default=None, help="git revision or directory to compare against, A/B")
    parser.add_argument("--compare-batches", type=positive_int, nargs="+", default=list(bench_compare.BATCHES))
    args = parser.parse_args(argv)
    if args.checkpoint is not None and not args.checkpoint.exists():
        parser.error(f"checkpoint not found: {args.checkpoint}")
    for preset in [*args.train_presets, args.sample_preset]:
        if preset not in PRESET_CONFIGS:
            parser.error(f"unknown preset {preset!r}; choose from {', '.join(PRESET_CONFIGS)}")
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    device = resolve_device(args.device)
    start = time.perf_counter()
    names = [name for name in BENCHMARKS if name != "compare" or args.compare_to is not None]
    benchmarks = {name: run_benchmark(name, args) for name in names}
    summary = {
        "environment": environment(device),
        "quick": args.quick,
        "wall_s": time.perf_counter() - start,
        "benchmarks": benchmarks,
    }
    print(f"wrote {write_result('summary', summary, args.out)}")
    markdown = args.out / "summary.md"
    markdown.write_text(summary_markdown(summary))
    print(summary_markdown(summary))
    print(f"wrote {markdown}")
    failed = [name for name, entry in benchmarks.items() if not entry["ok"]]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
