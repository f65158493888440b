import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from bonsai_tf import config as config_lib
from bonsai_tf import engine
from bonsai_tf import genotype as G
from bonsai_tf import memory as M


@pytest.fixture(autouse=True)
def _source_chosen_by_the_code(monkeypatch):
    """These tests force each branch of the source choice themselves: a forced source in
    the environment (CI sets BONSAI_TF_MEMORY_SOURCE=rss for the rest of the suite) would
    decide it for them. The subprocess test sets its own."""
    monkeypatch.delenv(M.SOURCE_ENV, raising=False)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_costs_rank_operations_and_scale_with_batch():
    sep = M.op_cost("sep_conv_5x5", 8, 8, 16, 1)
    pool = M.op_cost("max_pool_3x3", 8, 8, 16, 1)
    ident = M.op_cost("identity", 8, 8, 16, 1)
    assert sep.bytes(64) > pool.bytes(64) >= ident.bytes(64) > 0
    # identity costs its gated output, as the reference measures it (op + pruner output)
    assert ident.activations == 8 * 8 * 16
    assert sep.bytes(128) - sep.bytes(64) == 64 * 4 * sep.activations
    assert sep.params == 2 * (25 * 16 + 16 * 16 + 2 * 16)
    strided = M.op_cost("sep_conv_3x3", 8, 8, 16, 2)
    assert strided.activations < M.op_cost("sep_conv_3x3", 8, 8, 16, 1).activations


def test_estimate_parameters_match_keras():
    from bonsai_tf import network as N
    g = G.initial("bonsai7", (12, 12, 1), 3, 4, 2, [["n"], ["r"]], 2)
    net = N.Network(g, mean=(80.0,), std=(70.0,))
    gates = len(net.gates())
    assert M.estimate(g, 1)["params"] == net.count_params() - gates


# A training step of a small supernet, measured in a fresh process: the allocator
# source needs TensorFlow's oneDNN kernels on, the RSS fallback needs them off (their
# pooling allocator keeps memory across steps, so the process's RSS would not grow).
MEASURE = """
import json, sys
import numpy as np
import tensorflow as tf
sys.path.insert(0, sys.argv[1])
from bonsai_tf import config as config_lib, data as data_lib, engine, memory as M
info = data_lib.DatasetInfo(name="m", image_shape=(24, 24, 1), num_classes=3,
                            class_names=("a", "b", "c"), mean=(80.0,), std=(70.0,), augment="none")
x = np.random.RandomState(0).randint(0, 255, (32, 24, 24, 1)).astype(np.uint8)
y = np.arange(32) % 3
splits = data_lib.Splits(train=(x, y), val=(x, y), test=(x, y), info=info)
cfg = config_lib.RunConfig(scale=8, nodes=2, patterns=(("n",), ("r",)), batch_size=32, epochs=1,
                           search_epochs=1, measure_memory=False, drop_path=0.0)
run = engine.Run(cfg, splits, "/nonexistent", verbose=0)
run.prepare()
xb, yb = tf.constant(x, tf.float32), tf.constant(y, tf.int64)
inputs = {"aim": tf.constant(0.5), "pressure": tf.constant(1.0)}
step = lambda: run.train_step(xb, yb, inputs)["loss"].numpy()
step()
m = M.measure_step_peak(step)
print(json.dumps({"source": m.source, "bytes": m.bytes,
                  "estimate": M.estimate(run.net.genotype, 32)["bytes"]}))
"""


@pytest.mark.parametrize("onednn, source", [("1", "allocator"), ("0", "rss")])
def test_estimate_agrees_with_a_measured_step(onednn, source):
    """The analytical model against a real train step, from each measurement source."""
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn, TF_CPP_MIN_LOG_LEVEL="3")
    env[M.SOURCE_ENV] = source
    proc = subprocess.run([sys.executable, "-c", MEASURE, ROOT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if source == "allocator" and result["source"] != "allocator":
        pytest.skip("TensorFlow reports no allocator statistics here even with oneDNN on; "
                    "the rss case measures this machine")
    assert result["source"] == source
    est, peak = result["estimate"], result["bytes"]
    assert 0.6 * peak <= est <= 1.6 * peak, (est / 2**20, peak / 2**20)


class _Steps:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1


def test_without_allocator_statistics_the_step_runs_and_rss_measures(monkeypatch):
    """The branch of an AVX2-only CPU with oneDNN off, forced on any machine."""
    monkeypatch.setattr(M, "allocator_stats_device", lambda device=None: None)
    monkeypatch.setattr(M, "rss_supported", lambda: True)
    monkeypatch.setattr(M, "_trim_heap", lambda: None)
    status = iter(["VmRSS: 1000 kB", "VmHWM: 5000 kB"])
    monkeypatch.setattr(M, "_status_kb", lambda field: int(next(status).split()[1]))
    written = []

    class FakeFile:
        def __init__(self, path, mode="r"):
            assert path == M._CLEAR_REFS and mode == "w"

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def write(self, text):
            written.append(text)
    monkeypatch.setattr("builtins.open", FakeFile)
    step = _Steps()
    m = M.measure_step_peak(step)
    assert step.calls == 1 and written == ["5"]
    assert m.source == "rss" and m.bytes == 4000 * 1024


def test_with_nothing_to_measure_the_step_still_runs(monkeypatch):
    monkeypatch.setattr(M, "allocator_stats_device", lambda device=None: None)
    monkeypatch.setattr(M, "rss_supported", lambda: False)
    step = _Steps()
    m = M.measure_step_peak(step)
    assert step.calls == 1 and m == M.StepMemory(None, "none") and m.mb is None
    step = _Steps()
    assert M.measure_step_peak(step, source="allocator").source == "none" and step.calls == 1


def test_a_clear_refs_that_cannot_be_written_gives_no_figure(monkeypatch):
    monkeypatch.setattr(M, "allocator_stats_device", lambda device=None: None)
    monkeypatch.setattr(M, "rss_supported", lambda: True)
    monkeypatch.setattr(M, "_status_kb", lambda field: 1000)

    def refuse(*a, **k):
        raise PermissionError("clear_refs")
    monkeypatch.setattr("builtins.open", refuse)
    step = _Steps()
    assert M.measure_step_peak(step) == M.StepMemory(None, "none") and step.calls == 1


@pytest.mark.parametrize("gpu", [False, True])
def test_allocator_statistics_where_the_device_reports_them(monkeypatch, gpu):
    """The branch of a machine whose allocator reports statistics (and of one with a GPU)."""
    asked = []
    level = {"current": 100, "peak": 100}

    def reset(device):
        asked.append(device)
        level["peak"] = level["current"]

    def info(device):
        asked.append(device)
        return dict(level)

    def step():
        level["peak"] = 900
    monkeypatch.setattr(tf.config.experimental, "reset_memory_stats", reset)
    monkeypatch.setattr(tf.config.experimental, "get_memory_info", info)
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: ["gpu"] if gpu and kind == "GPU" else [])
    m = M.measure_step_peak(step)
    assert m == M.StepMemory(800, "allocator")
    assert set(asked) == {"GPU:0" if gpu else "CPU:0"}
    with pytest.raises(ValueError, match="memory source 'disk'; expected one of"):
        M.measure_step_peak(step, source="disk")


def test_a_run_records_which_source_measured_its_memory(tiny_splits, tmp_path, monkeypatch):
    """The crash of issue 7: allocator statistics off, memory measured, the run goes on."""
    monkeypatch.setattr(M, "allocator_stats_device", lambda device=None: None)
    cfg = config_lib.RunConfig(scale=4, nodes=2, patterns=(("n",), ("r",)), batch_size=32,
                               epochs=2, search_epochs=1, steps_per_epoch=3, val_size=0,
                               measure_memory=True, memory_budget_mb=0)
    metrics = engine.Run(cfg, tiny_splits, str(tmp_path), verbose=0).run()
    expected = "rss" if M.rss_supported() else "none"
    assert metrics["memory_measured_source"] == expected
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["memory_measured_source"] for r in records] == [expected, expected]
    assert all(r["train_loss"] > 0 for r in records)


def test_budget_sizing():
    g = G.initial("bonsai7", (28, 28, 1), 10, 16, 2, [["n"], ["r"]], 1, stem_stride=2)
    one = M.estimate(g, 64)["bytes"]
    two = M.estimate(G.grow(g), 64)["bytes"]
    first, ratios = M.size_budget(g, (one + two) / 2, 64, 3, 7)
    assert first == 1
    assert 1 / 7 <= ratios[1] < 1.0
    # the keep ratio is the largest that fits: a bit more does not
    first, big = M.size_budget(g, 10 * two, 64, 3, 7)
    assert first == 3 and big[1] == 1.0
    assert M.size_budget(g, one / 2, 64, 3, 7)[0] == 0
