"""The benchmark scripts still run against the library (they are not in the other tests' path).

Tiny configurations only: the figures themselves are the benchmarks' business, not the tests'.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_step(tmp_path, *flags):
    """bench/bench_step.py on a tiny supernet with `flags`; its output JSON."""
    out = tmp_path / "step.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "bench_step.py"), "--scales=4",
         "--shapes=8x8x1", "--patterns=1", "--nodes=1", "--space=small",
         '--pattern_spec=[["n"],["r"]]', "--batch=4", "--steps=1", f"--out={out}", *flags],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_bench_step_times_a_tiny_supernet_and_writes_its_figures(tmp_path):
    result = _bench_step(tmp_path, "--graph_optimizer=on", "--strategies=bonsai,proxyless")
    bonsai, proxyless = result["results"]
    assert [bonsai["strategy"], proxyless["strategy"]] == ["bonsai", "proxyless"]
    for row in (bonsai, proxyless):   # the same supernet, stepped two ways
        assert row["cells"] == 1 and row["operations"] > 0 and row["seconds_per_step"] > 0
        assert row["first_step_seconds"] > 0 and row["graph_optimizer_on"] is True
    assert proxyless["operations"] == bonsai["operations"]
    assert result["machine"]["usable_cpus"] >= 1


def test_bench_step_times_two_devices_and_two_worker_processes(tmp_path):
    # One process; 2 logical devices mirrored; 2 local processes under multi_worker (the
    # chief's figures, each worker on its share of the cores). Never both at once.
    one, workers, devices = _bench_step(tmp_path, "--devices=1,2", "--workers=1,2")["results"]
    assert [(r["devices"], r["workers"]) for r in (one, workers, devices)] == \
        [(1, 1), (1, 2), (2, 1)]
    for r in (workers, devices):
        assert r["operations"] == one["operations"] and r["seconds_per_step"] > 0
        assert r["images_per_second"] == r["batch"] / r["seconds_per_step"] == \
            one["batch"] / r["seconds_per_step"]   # the same global batch
    assert workers["threads_per_worker"] >= 1


def _bench_change(tmp_path, *flags):
    """bench/bench_change.py with `flags`; (returncode, stderr, its output JSON or None)."""
    out = tmp_path / "change.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "bench_change.py"), "--repeats=2",
         "--batch=4", "--val_batch=4", f"--out={out}", *flags],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    return proc.returncode, proc.stderr, json.loads(out.read_text()) if out.exists() else None


TINY = ("--shape=8x8x1", "--scale=4", "--nodes=1", "--patterns=2", "--stem_stride=1")


def _check_parts(r, repeats=2):
    assert r["phase"] == "search" and len(r["rows"]) == repeats
    m = r["median"]
    for part in ("rebuild", "train_trace", "train_first_call", "train_call", "eval_trace",
                 "eval_first_call", "eval_call"):
        assert m[part] > 0, part
    assert m["train_graph_ops"] > 0
    assert r["change_seconds"] >= m["rebuild"] + m["train_trace"] + m["eval_trace"]
    assert r["machine"]["calibration_images_per_second"] > 0


def test_bench_change_times_every_part_of_a_rebuild(tmp_path):
    code, err, r = _bench_change(tmp_path, *TINY)
    assert code == 0, err[-3000:]
    _check_parts(r)
    assert r["cells"] == 2 and r["source"]["synthetic"]["patterns"] == 2


def test_bench_change_times_a_run_directory_and_says_what_is_missing(tmp_path):
    from bonsai_tf import config as config_lib
    from bonsai_tf import genotype as genotype_lib
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    code, err, _ = _bench_change(tmp_path, f"--run_dir={run_dir}")
    assert code != 0 and "config.json" in err and "genotype.json" in err, err[-2000:]
    spec = (("n",), ("r",))
    g = genotype_lib.grow(genotype_lib.initial("small", (8, 8, 1), 10, 4, 1, spec, 1))
    cfg = config_lib.RunConfig(scale=4, nodes=1, space="small", patterns=spec, batch_size=4,
                               time_budget_minutes=1.0)
    (run_dir / "config.json").write_text(cfg.to_json())
    (run_dir / "genotype.json").write_text(g.to_json())
    code, err, r = _bench_change(tmp_path, f"--run_dir={run_dir}")
    assert code == 0, err[-3000:]
    _check_parts(r)
    assert r["operations"] == g.num_ops() and r["source"]["run_dir"] == str(run_dir)
