"""Smoke test: the benchmark scripts run and write the JSON they promise (numbers are not asserted here;
speed targets live in the benchmarks themselves)."""

import json

from benchmarks import bench_sample


def test_sampling_benchmark_writes_the_table5_split(tmp_path) -> None:
    result = bench_sample.main(["--quick", "--preset", "tiny", "--batch-sizes", "1", "2", "--distilled",
                                "--out", str(tmp_path), "--threads", "1"])
    saved = json.loads((tmp_path / "sample.json").read_text())
    assert len(saved["rows"]) == len(result["rows"]) == 4  # 2 batch sizes × (no CFG, resampling CFG)
    for row in saved["rows"]:
        assert {"ar", "exact", "distilled", "inverse_speedup", "total_speedup"} <= set(row)
        assert row["inverse_speedup"] > 0
