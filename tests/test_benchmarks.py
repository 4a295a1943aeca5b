"""Smoke test: the benchmark scripts run and write the JSON they promise (numbers are not asserted here;
speed targets live in the benchmarks themselves)."""

import json

import torch

import farmer.train
from benchmarks import ab_worker, bench_compare, bench_sample, bench_train
from benchmarks.common import Repeats
from farmer.config import FarmerConfig


def test_sampling_benchmark_writes_the_table5_split(tmp_path) -> None:
    result = bench_sample.main(["--quick", "--preset", "tiny", "--batch-sizes", "1", "2", "--distilled",
                                "--out", str(tmp_path), "--threads", "1"])
    saved = json.loads((tmp_path / "sample.json").read_text())
    assert len(saved["rows"]) == len(result["rows"]) == 4  # 2 batch sizes × (no CFG, resampling CFG)
    for row in saved["rows"]:
        assert {"ar", "exact", "distilled", "inverse_speedup", "total_speedup"} <= set(row)
        assert row["inverse_speedup"] > 0


def test_compare_ratios_are_old_over_new_medians_of_totals() -> None:
    def reply(ar: float, exact: float, **more: float) -> dict:
        times = {"ar": ar, "exact": exact, **more}
        return {"wall": times, "cpu": {k: v / 2 for k, v in times.items()}}

    replies = [{"old": reply(1.0, 3.0), "new": reply(0.5, 1.0, jacobi=0.5)},
               {"old": reply(2.0, 4.0), "new": reply(0.5, 1.5, jacobi=0.5)},
               {"old": reply(9.0, 9.0), "new": reply(0.5, 2.0, jacobi=0.5)}]
    out = bench_compare.summarise(replies, ["ar", "exact", "jacobi"])
    assert out["ar"]["old_s"] == 2.0 and out["ar"]["speedup"] == 4.0
    assert out["exact"]["old_s"] == 6.0 and out["exact"]["new_s"] == 2.0 and out["exact"]["speedup"] == 3.0
    assert out["exact"]["speedup_cpu"] == 3.0
    assert out["jacobi"]["old_s"] is None and "speedup" not in out["jacobi"]
    assert out["jacobi"]["speedup_vs_old_exact"] == 6.0  # old exact total / new Jacobi total


def test_compare_benchmark_runs_both_sides(tmp_path) -> None:
    # This tree against itself (a directory): the workers answer, alternate and the table is written.
    result = bench_compare.main(["--quick", "--compare-to", str(bench_compare.REPO_ROOT), "--models", "mnist",
                                 "--batch-sizes", "1", "--train-batch", "2", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "compare.json").read_text())
    kinds = [(row["kind"], row.get("cfg")) for row in saved["rows"]]
    assert kinds == [("sample", False), ("sample", True), ("train", None)] == \
        [(row["kind"], row.get("cfg")) for row in result["rows"]]
    assert all(len(sweeps) == 4 for sweeps in (row["jacobi_sweeps"] for row in saved["rows"][:2]))
    assert "| mnist | 1 | none |" in "\n".join(bench_compare.markdown(saved))


def test_train_benchmarks_time_the_trainers_own_step(monkeypatch) -> None:
    calls = []
    real_step = farmer.train.train_step

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_step(*args, **kwargs)

    workload = bench_train.build_workload("tiny", 2, torch.device("cpu"))
    ema_before = [p.clone() for p in workload.ema.parameters()]
    monkeypatch.setattr(bench_train, "train_step", spy)
    workload.run("train")()
    assert len(calls) == 1 and calls[0]["ema"] is workload.ema and calls[0]["loss"] is workload.loss
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, workload.ema.parameters(), strict=True))

    config = FarmerConfig.preset("tiny")
    monkeypatch.setattr(farmer.train, "train_step", spy)
    ab_worker.train_step(config, 2)()
    assert len(calls) == 2
    # An old tree without farmer.train.train_step (the A/B baseline) times its own loop body instead.
    monkeypatch.delattr(farmer.train, "train_step")
    ab_worker.train_step(config, 2)()
    assert len(calls) == 2


def test_the_compiled_train_step_is_timed_against_the_eager_one(monkeypatch) -> None:
    # The plumbing of --compile (torch.compile itself replaced by a recorder: tests/test_train.py checks that the
    # compiled loss equals the eager one).
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or module)
    workload = bench_train.build_workload("tiny", 2, torch.device("cpu"))
    loss_module = workload.loss
    result = bench_train.time_compiled_train_step(workload, torch.device("cpu"), Repeats(0, 2), 1.0)
    assert compiled == [loss_module]
    assert result["compile_s"] > 0 and result["median_s"] > 0
    assert result["speedup"] == 1.0 / result["median_s"]
    assert result["images_per_s"] == 2 / result["median_s"]
