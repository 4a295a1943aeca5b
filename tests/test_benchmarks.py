"""Smoke test: the benchmark scripts run and write the JSON they promise (numbers are not asserted here;
speed targets live in the benchmarks themselves)."""

import json

from benchmarks import bench_compare, bench_sample


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
