"""The benchmark scripts still run against the library (they are not in the other tests' path).

Tiny configurations only: the figures themselves are the benchmarks' business, not the tests'.
"""

import json
import os
import subprocess
import sys

import pytest

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


def _bench_module(name):
    """A module of bench/ (not a package), imported by name."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))


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


def test_reference_step_refuses_a_directory_without_the_reference(tmp_path):
    # The refusal comes before torch is imported: it holds without the reference's venv.
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "reference_step.py"),
         f"--reference_dir={tmp_path}", f"--out={tmp_path / 'ref.json'}"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"--reference_dir='{tmp_path}' holds no bonsai/net.py" in proc.stderr
    assert "RobGeada/bonsai-net-lite at 03c55e0" in proc.stderr
    assert not (tmp_path / "ref.json").exists()


def test_reference_step_sizes_operations_by_their_output():
    # The stand-in for the reference's GPU sizer: a stored-activation count times the
    # output's MB, a strided identity (a reduction) keeping one more.
    sizer = _bench_module("reference_step").fixed_op_sizer(["Identity", "Sep_Conv_3x3", "Max_Pool_3x3"])
    mb = 64 * 16 * 32 * 32 * 4 / 1024 / 1024
    sizes = sizer([(64, 16, 32, 32, 1), (64, 16, 32, 32, 2)], single=False)
    assert sizes[(64, 16, 32, 32, 1)] == {"Identity": mb, "Sep_Conv_3x3": 8 * mb,
                                          "Max_Pool_3x3": 2 * mb}
    assert sizes[(64, 16, 32, 32, 2)]["Identity"] == 2 * mb / 4
    assert sizer((64, 16, 32, 32, 1)) == {(64, 16, 32, 32, 1): sizes[(64, 16, 32, 32, 1)]}


def test_profile_ops_counts_each_kernel_once_by_its_self_time():
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    profile_ops = _bench_module("profile_ops")
    space = xplane_pb2.XSpace()
    plane = space.planes.add(name="/host:CPU")
    for i, name in enumerate(["step/StatefulPartitionedCall:StatefulPartitionedCall",
                              "cell0/conv/Conv2D:Conv2D", "ExecutorState::Process",
                              "cell0/bn/FusedBatchNormV3:FusedBatchNormV3",
                              "cell1/conv/Conv2D:_MklNativeConv2D"], start=1):
        plane.event_metadata[i].id, plane.event_metadata[i].name = i, name
    ps = 10 ** 12   # picoseconds a second
    # Thread 1: a call of 10 s holding a convolution (3 s), and runtime bookkeeping (2 s)
    # around a batch norm (1.5 s). Thread 2: a oneDNN convolution of 4 s alone.
    one = plane.lines.add(id=1)
    for meta, start, seconds in [(1, 0, 10), (2, 1, 3), (3, 5, 2), (4, 5.25, 1.5)]:
        one.events.add(metadata_id=meta, offset_ps=int(start * ps), duration_ps=int(seconds * ps))
    plane.lines.add(id=2).events.add(metadata_id=5, offset_ps=0, duration_ps=4 * ps)
    space.planes.add(name="/device:GPU:0").lines.add(id=1).events.add(
        metadata_id=2, offset_ps=0, duration_ps=99 * ps)   # not a host plane: not counted
    totals = profile_ops.self_seconds(space)
    # The call keeps 10 - 3 - 1.5 s: the bookkeeping's 0.5 s outside the batch norm is its.
    assert totals == pytest.approx({"StatefulPartitionedCall": 5.5, "Conv2D": 3.0,
                                    "_MklNativeConv2D": 4.0, "FusedBatchNormV3": 1.5})


def test_bench_step_profiles_where_a_step_goes(tmp_path):
    row = _bench_step(tmp_path, "--profile_steps=1")["results"][0]
    shares, seconds = row["profile"]["op_share"], row["profile"]["op_seconds_per_step"]
    assert row["profile"]["steps"] == 1 and set(shares) == set(seconds)
    assert abs(sum(shares.values()) - 1.0) < 1e-9
    assert any("Conv" in kind for kind in shares), sorted(shares)
    assert list(shares.values()) == sorted(shares.values(), reverse=True)
