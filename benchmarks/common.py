"""Shared benchmark helpers: timing (warm-up, repeats, median), threads, environment record, matmul peak,
memory readings and JSON output.

Every number a benchmark reports is a median over repeats taken in the same process, and every ratio
(speed-up, fraction of peak) is formed from numbers measured in the same run: the machines these run on
are shared and noisy, so numbers from different runs are not comparable to a few percent.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
MIB = 2**20

T = TypeVar("T")


# Settings ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Repeats:
    """How often a measured call runs: ``warmup`` untimed calls, then ``repeats`` timed ones."""

    warmup: int
    repeats: int

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.repeats < 1:
            raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={self.warmup}, repeats={self.repeats}")


QUICK = Repeats(warmup=1, repeats=2)
FULL = Repeats(warmup=2, repeats=5)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """--quick, --threads, --device, --out: the options every benchmark shares."""
    parser.add_argument("--quick", action="store_true", help="one warm-up and two timed repeats (smoke runs)")
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for the JSON results")


def repeats_for(quick: bool) -> Repeats:
    return QUICK if quick else FULL


def resolve_device(name: str | None) -> torch.device:
    """The requested device, or the accelerator torch sees, or the CPU."""
    if name is None:
        return torch.accelerator.current_accelerator() or torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}: {err}") from None
    if device.type != "cpu" and not torch.accelerator.is_available():
        raise ValueError(f"device {name!r} requested but no accelerator is available")
    return device


def set_threads(threads: int | None) -> int:
    """Pin torch's intra-op thread count (None keeps torch's default); returns the count in effect."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# Timing ------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for queued accelerator work, so wall-clock time covers the kernels (no-op on the CPU)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float, float]:
    """(fn(), wall seconds, CPU seconds of this process), synchronising the device before and after.

    CPU seconds (all threads) exclude the time other processes held the cores: on a shared CPU they are
    the steadier measure of work, wall seconds the honest measure of waiting.
    """
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - wall, time.process_time() - cpu


@dataclass(frozen=True)
class Timing:
    """Wall and CPU seconds of each timed repeat."""

    wall: tuple[float, ...]
    cpu: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.wall or len(self.wall) != len(self.cpu):
            raise ValueError(
                f"a Timing needs >= 1 measurement and as many CPU as wall times, "
                f"got {len(self.wall)} and {len(self.cpu)}"
            )

    @classmethod
    def from_laps(cls, laps: list[tuple[float, float]]) -> Timing:
        """From (wall, CPU) pairs as :func:`timed` returns them."""
        return cls(tuple(w for w, _ in laps), tuple(c for _, c in laps))

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def best(self) -> float:
        return min(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    @property
    def cpu_best(self) -> float:
        return min(self.cpu)

    def to_dict(self) -> dict[str, Any]:
        return {
            "median_s": self.median,
            "best_s": self.best,
            "all_s": list(self.wall),
            "cpu_median_s": self.cpu_median,
            "cpu_all_s": list(self.cpu),
        }


def measure(fn: Callable[[], object], device: torch.device, repeats: Repeats) -> Timing:
    """Time ``fn`` ``repeats.repeats`` times after ``repeats.warmup`` untimed calls."""
    for _ in range(repeats.warmup):
        fn()
        synchronize(device)
    return Timing.from_laps([timed(fn, device)[1:] for _ in range(repeats.repeats)])


@contextmanager
def cpu_usage() -> Iterator[dict[str, float]]:
    """Fills the yielded dict on exit with wall seconds, CPU seconds (this process and its children) and
    their ratio: with 1 thread, a ratio well below 1 means other processes took the core (noisy numbers)."""
    usage: dict[str, float] = {}
    start_wall, start = time.perf_counter(), os.times()
    try:
        yield usage
    finally:
        end = os.times()
        wall = time.perf_counter() - start_wall
        cpu = sum(end[:4]) - sum(start[:4])  # user + system, self + children
        usage.update(wall_s=wall, cpu_s=cpu, cpu_per_wall=cpu / wall if wall > 0 else float("nan"))


# Peak ------------------------------------------------------------------------------------------------------
def matmul_peak(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5
) -> dict[str, Any]:
    """This machine's dense-matmul throughput: best of ``repeats`` square ``size``² products (2·size³ FLOPs).

    The best (not the median) repeat estimates the *peak*: noise from other processes only slows a run.
    ``cpu_gflops`` divides by CPU seconds instead (per core-second of all threads; CPU devices only).
    """
    if size < 1 or repeats < 1:
        raise ValueError(f"size and repeats must be >= 1, got size={size}, repeats={repeats}")
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=generator).to(dtype)
    b = torch.randn(size, size, device=device, generator=generator).to(dtype)
    timing = measure(lambda: a @ b, device, Repeats(warmup=1, repeats=repeats))
    flops = 2 * size**3
    return {
        "size": size,
        "dtype": str(dtype).removeprefix("torch."),
        "repeats": repeats,
        "gflops": flops / timing.best / 1e9,
        "median_gflops": flops / timing.median / 1e9,
        "cpu_gflops": flops / timing.cpu_best / 1e9 if device.type == "cpu" and timing.cpu_best > 0 else None,
    }


# Memory ----------------------------------------------------------------------------------------------------
def current_rss_bytes() -> int | None:
    """Resident set size now (Linux /proc), or None where /proc is missing."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far.

    Linux: VmHWM of /proc/self/status, the high-water mark of this process's own memory map. Not
    ru_maxrss: Linux carries ru_maxrss over fork and exec, so a subprocess would inherit its parent's peak.
    Elsewhere ru_maxrss (bytes on macOS, KiB on other systems).
    """
    try:
        match = re.search(r"^VmHWM:\s*(\d+)\s*kB", Path("/proc/self/status").read_text(), flags=re.MULTILINE)
    except OSError:
        match = None
    if match:
        return int(match.group(1)) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset this process's resident high-water mark to its current RSS (Linux ≥ 4.0: "5" to clear_refs), so that
    :func:`peak_rss_bytes` afterwards measures only the work that follows. False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@contextmanager
def peak_rss_delta() -> Iterator[dict[str, int | None]]:
    """``with peak_rss_delta() as mem: work()`` fills ``mem["peak_delta_bytes"]``: the process's peak resident
    memory during the block above its resident memory at entry (the allocator's and the kernel's view, not
    tracemalloc's Python-only one). None where the high-water mark cannot be reset."""
    reading: dict[str, int | None] = {"peak_delta_bytes": None}
    resettable = reset_peak_rss()
    start = current_rss_bytes()
    yield reading
    if resettable and start is not None:
        reading["peak_delta_bytes"] = peak_rss_bytes() - start


# Environment -----------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else whatever ``platform`` knows."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    match = re.search(r"^model name\s*:\s*(.+)$", text, flags=re.MULTILINE)
    return match.group(1).strip() if match else (platform.processor() or platform.machine() or "unknown")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: versions, threads, CPU, device, and how busy the machine was."""
    env: dict[str, Any] = {
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": _git_commit(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "device": str(device),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def subprocess_env() -> dict[str, str]:
    """This environment with the repository root on PYTHONPATH, so ``python -m benchmarks.X`` runs anywhere."""
    paths = [str(REPO_ROOT), os.environ.get("PYTHONPATH")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))


# Output ----------------------------------------------------------------------------------------------------
def write_result(name: str, data: dict[str, Any], out_dir: Path = RESULTS_DIR) -> Path:
    """Write ``data`` as ``out_dir/NAME.json`` (pretty, keys sorted) and return the path."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"result name must be a plain file name (letters, digits, _ . -), got {name!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def save_benchmark(name: str, args: Any, device: Any, repeats: Repeats, usage: dict[str, Any],
                   **fields: Any) -> dict[str, Any]:
    """The record every benchmark writes (environment, repeats, CPU usage, then its own fields), saved as JSON."""
    result = {
        "name": name,
        "environment": environment(device),
        "quick": args.quick,
        "repeats": {"warmup": repeats.warmup, "repeats": repeats.repeats},
        "cpu_usage": usage,
        **fields,
    }
    print(f"wrote {write_result(name, result, args.out)}")
    return result


def percent(fraction: float | None) -> str:
    """0.123 -> "12.3%"; None (not measured) -> "n/a"."""
    return "n/a" if fraction is None else f"{100 * fraction:.1f}%"


def read_result(path: Path) -> dict[str, Any]:
    """A result JSON written by :func:`write_result`, with a clear error if it is missing or corrupt."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"benchmark result not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"benchmark result {path} is not valid JSON: {err}") from None
