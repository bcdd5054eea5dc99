"""The benchmark scripts run end to end at a tiny size and print consistent results (their speed is not tested:
ratios are measured on purpose-sized runs and recorded in docs/performance.md)."""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_runs_on_cpu_and_profiles(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu
    res = gpu.main(["--quick", "--channels", "8", "--size", "16", "--batch", "2", "--train-batch", "2", "--nfe", "3",
                    "--reps", "1", "--profile", str(tmp_path / "prof"), "--json", str(tmp_path / "r.json")])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT ") and json.loads(last[7:]) == json.loads((tmp_path / "r.json").read_text())
    assert res["pairs_speedup"] == res["pairs_per_s_ours"] / res["pairs_per_s_plain"] > 0
    assert res["mfu"] is None and res["peak_mem_GB"] is None and res["cuda_graph"] is False  # a CPU run
    assert 0 < res["sampler_rel_err_vs_fp32"] < 3e-2  # bf16 velocity, fp32 state
    for which in ("ours", "plain"):
        p = res["profile"][which]
        assert abs(p["matmul_conv"] + p["attention"] + p["other"] - 1) < 1e-3 and p["matmul_conv"] > 0.2
        assert 0 < p["busy"] <= 1.05 and p["top"]
        assert "Self CPU" in (tmp_path / "prof" / f"profile_{which}.txt").read_text()


def test_overhead_benchmark_smoke(tmp_path, capsys, monkeypatch):
    """benchmarks/overhead.py (issue 17) at its --smoke size (seconds; no pipeline subprocesses): the RESULT line
    parses and carries the ratios the issue asks for."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import overhead
    res = overhead.main(["--smoke", "--threads", "1", "--json", str(tmp_path / "r.json")])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT ") and json.loads(last[7:]) == json.loads((tmp_path / "r.json").read_text()) == res
    for key in ("train_vs_plain_mem", "train_vs_plain_pairs", "sim_vs_plain"):
        assert res[key] > 0, key
    for key in ("mlp", "unet"):
        assert res[f"train_vs_plain_mem_{key}"] > 0 and res[f"sim_vs_plain_{key}"] > 0
    assert "flow_vs_local" in res and res["flow_vs_local"] is None  # the flow part is skipped in --smoke


def test_sharing_benchmark_smoke(tmp_path, capsys, monkeypatch):
    """benchmarks/sharing.py (issue 27) at its --smoke size: a tiny toy2d run alone, then two started together,
    each a real subprocess; the RESULT line parses and carries per-run rates, their ratio to the ideal and the
    threads the core share chose (alone: one count, torch's default; never more than the cores)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import sharing
    res = sharing.main(["--smoke", "--json", str(tmp_path / "r.json")])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT ") and json.loads(last[7:]) == json.loads((tmp_path / "r.json").read_text()) == res
    solo, two = res["share_toy2d_solo"], res["share_toy2d_k2"]
    assert solo["teacher_steps_per_s"] > 0 and solo["pairs_per_s"] > 0 and len(solo["threads"]) == 1
    assert len(two["teacher_steps_per_s"]) == len(two["pairs_per_s"]) == len(two["wall_s"]) == 2
    for key in ("teacher_vs_ideal", "pairs_vs_ideal", "wall_vs_solo"):
        assert two[key] > 0, key
    assert two["threads"] and max(two["threads"] + solo["threads"]) <= res["cores"]
