"""The latency lookup table: op timings, what a genotype needs, the per-machine cache, prediction.

Only a few tests convert and time TFLite models (tiny shapes, few repeats); the table's
bookkeeping is tested with the measurements replaced by counters.
"""

import dataclasses
import json
import math
import os

import pytest

from bonsai_tf import genotype as G
from bonsai_tf import latency
from bonsai_tf import space as S
from helpers import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = S.space_ops("small")


def tiny(nodes=1, patterns=2, shape=(8, 8, 1), scale=4):
    """8x8x1, scale 4: cell 0 normal at 8x8x4, cell 1 reduction 8x8x8 -> 4x4x8."""
    return G.initial("small", shape, 3, scale, nodes, [["n"], ["r"]], patterns)


def pruned(g, keep):
    """`g` with only the operations keep[(cell, src, dst)] on its edges (others emptied)."""
    cells = []
    for c, cell in enumerate(g.cells):
        edges = tuple(dataclasses.replace(e, ops=tuple(
            (o, w) for o, w in e.ops if o in keep.get((c, e.src, e.dst), ()))) for e in cell.edges)
        cells.append(dataclasses.replace(cell, edges=edges))
    return dataclasses.replace(g, cells=tuple(cells)).canonical().validate()


class Counter:
    """Replaces op_latency and part_latency: fixed figures, calls counted."""

    def __init__(self, monkeypatch, op_ms=1.0, part_ms=0.5, empty_ms=0.25):
        self.calls = []
        self.op_ms, self.part_ms, self.empty_ms = op_ms, part_ms, empty_ms
        monkeypatch.setattr(latency, "op_latency", self.op)
        monkeypatch.setattr(latency, "part_latency", self.part)

    def op(self, op, input_shape, stride, quantized, repeats, threads, warmup=None, rounds=None,
           baseline=False):
        self.calls.append(("op", op, tuple(input_shape), stride, quantized))
        return (self.op_ms, self.empty_ms) if baseline else self.op_ms

    def part(self, part, quantized, repeats, threads, warmup=None, rounds=None, baseline=False):
        self.calls.append(part + (quantized,))
        if part[0] in ("empty", "input"):
            assert not baseline
            return self.empty_ms
        return (self.part_ms, self.empty_ms) if baseline else self.part_ms


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory in place of ~/.cache/bonsai_tf/latency."""
    directory = tmp_path / "cache"
    monkeypatch.setenv(latency.CACHE_ENV, str(directory))
    return directory


# ---- measuring one operation ----------------------------------------------------------------
def test_op_latency_is_a_positive_median_and_a_stride_2_entry_exists_where_needed():
    g = tiny()
    strided = {(op, shape) for op, shape, stride in latency.op_entries(g) if stride == 2}
    # The reduction cell's x and y edges: 8x8x8 in, subsampled to 4x4.
    assert strided == {(op, (8, 8, 8)) for op in SMALL}
    for quantized in (False, True):
        for op, stride in (("sep_conv_3x3", 2), ("max_pool_3x3", 1)):
            ms = latency.op_latency(op, (8, 8, 8), stride, quantized, repeats=15, threads=1,
                                    warmup=3, rounds=1)
            assert math.isfinite(ms) and ms > 0, (op, stride, quantized, ms)
    # With its baseline (the per-invocation cost) timed in turn with it.
    ms, base = latency.op_latency("conv_3x3", (8, 8, 8), 2, False, repeats=15, threads=1,
                                  warmup=3, rounds=2, baseline=True)
    assert math.isfinite(ms) and math.isfinite(base) and 0 < base


def test_op_model_is_the_deployed_operation_and_keeps_its_stride():
    import keras
    model = latency.op_model("dil_conv_3x3", (8, 8, 4), 2)
    # Pixels scaled to activations, the operation, 1-pixel crops of its output and input.
    assert sorted(type(layer).__name__ for layer in model.layers) == sorted([
        "InputLayer", "Rescaling", "Functional", "Cropping2D", "Flatten", "Cropping2D",
        "Flatten", "Concatenate"])
    (op,) = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    kinds = [type(layer).__name__ for layer in op.layers]
    # As network.deployable exports a dilated conv: (ReLU,) dilated depthwise at stride 1,
    # then the stride as a 1x1 subsampling, pointwise, batch norm. The ReLU is a table
    # entry of its own (once per tensor, as in a network).
    assert kinds[1:] == ["DepthwiseConv2D", "AveragePooling2D", "Conv2D",
                         "BatchNormalization"], kinds
    assert latency.starts_with_relu("dil_conv_3x3", 2)
    assert not latency.starts_with_relu("max_pool_3x3", 1)
    pooled = [layer for layer in op.layers if isinstance(layer, keras.layers.AveragePooling2D)]
    assert pooled[0].strides == (2, 2)
    assert tuple(model.inputs[0].shape[1:]) == (8, 8, 4)
    assert tuple(model.outputs[0].shape) == (None, 8)


# ---- what a genotype needs --------------------------------------------------------------------
def test_table_enumerates_exactly_the_operations_shapes_and_strides_the_genotype_uses():
    g = tiny(nodes=2)
    expected = {(op, shape, stride) for op in SMALL for shape, stride in (
        ((8, 8, 4), 1),    # cell 0 (normal, 4 channels): x, y and node 0 -> node 1
        ((8, 8, 8), 2),    # cell 1 (reduction, 8 channels): x and y edges, strided
        ((4, 4, 8), 1))}   # cell 1: node 0 -> node 1, after the reduction
    ops = latency.op_entries(g)
    assert set(ops) == expected and len(ops) == len(expected)

    # A pruned network: only its own operations, or (all_ops) every operation of the
    # space where it has an edge; cell 1 keeps no node-to-node edge (its node 0 is gone).
    p = pruned(g, {(0, "x", 0): ["sep_conv_3x3"], (0, 0, 1): ["identity"],
                   (1, "x", 1): ["max_pool_3x3", "conv_3x3"], (1, "y", 1): ["avg_pool_3x3"]})
    assert set(latency.op_entries(p, all_ops=False)) == {
        ("sep_conv_3x3", (8, 8, 4), 1), ("identity", (8, 8, 4), 1),
        ("max_pool_3x3", (8, 8, 8), 2), ("conv_3x3", (8, 8, 8), 2), ("avg_pool_3x3", (8, 8, 8), 2)}
    assert set(latency.op_entries(p)) == {(op, shape, stride) for op in SMALL for shape, stride
                                          in (((8, 8, 4), 1), ((8, 8, 8), 2))}


def test_fixed_parts_follow_the_network_structure():
    g = tiny(nodes=1)
    parts = {e for e in latency.required(g) if e[0] != "op"}
    assert ("stem", (8, 8, 1), 4, 1) in parts
    assert ("adapt", (8, 8, 4), 8, 1) in parts          # cell 1's x (and y inputs): 4 -> 8
    assert ("head", (4, 4, 8), 3) in parts
    assert ("sum", (8, 8, 8), 2) in parts               # cell 1's y: stem + cell 0
    assert ("bn", (8, 8, 4)) in parts and ("bn", (4, 4, 8)) in parts
    # One ReLU per tensor read both through a ReLU and as it is: with every operation,
    # the stem's output (cell 0's x and y), cell 1's adapted x and its y sum. Cell 0's
    # output is read only through ReLUs (cell 1's adapters): fused, no entry.
    relus = [(label, item) for label, item in latency._walk(latency._with_all_ops(g))
             if item[0] == "relu"]
    assert sorted(label for label, _ in relus) == [
        "relu of cell1 x", "relu of cell1 y", "relu of stem"]
    assert {item for _, item in relus} == {("relu", (8, 8, 4)), ("relu", (8, 8, 8))}
    # Read through ReLUs only (sep_conv on x, dil_conv on y): fused into the stem.
    p = pruned(tiny(nodes=1, patterns=1), {(0, "x", 0): ["sep_conv_3x3"],
                                            (0, "y", 0): ["dil_conv_3x3"]})
    assert not [item for _, item in latency._walk(p) if item[0] == "relu"]
    p = pruned(tiny(nodes=1, patterns=1), {(0, "x", 0): ["sep_conv_3x3", "identity"]})
    assert [label for label, item in latency._walk(p) if item[0] == "relu"] == ["relu of stem"]
    # Each node sums every operation of its two edges (all_ops); 2 terms for pruned networks.
    assert {("sum", (8, 8, 4), 2 * len(SMALL)), ("sum", (8, 8, 4), 2)} <= parts
    # The network's per-invocation cost (raw pixels in); the other entries' baselines are
    # timed with them.
    assert ("input", (8, 8, 1)) in parts and not any(e[0] == "empty" for e in parts)
    assert latency.baseline_of(("stem", (8, 8, 1), 4, 1)) == ("input", (8, 8, 1))
    assert latency.baseline_of(("op", "identity", (8, 8, 4), 1)) == ("empty", (8, 8, 4))


# ---- the per-machine cache ----------------------------------------------------------------
def test_cache_round_trips_and_measures_only_what_is_missing(cache, monkeypatch):
    count = Counter(monkeypatch)
    g = tiny()
    needed = latency.required(g)
    first = latency.load_or_build(g, quantized=(False, True))
    assert len(count.calls) == first.measured == 2 * len(needed)
    assert os.path.dirname(first.path) == str(cache) and os.listdir(cache) == [
        os.path.basename(first.path)]   # written atomically: no temporary file left

    count.calls.clear()
    second = latency.load_or_build(g, quantized=(False, True))
    assert count.calls == [] and second.measured == 0
    assert second.entries == first.entries and second.key == first.key

    # An entry lost from the file is the only one measured again.
    with open(first.path) as f:
        d = json.load(f)
    name = latency.entry_name(("op", "conv_3x3", (8, 8, 8), 2))
    del d["entries"]["int8"][name]
    with open(first.path, "w") as f:
        json.dump(d, f)
    third = latency.load_or_build(g, quantized=(False, True))
    assert count.calls == [("op", "conv_3x3", (8, 8, 8), 2, True)] and third.measured == 1

    count.calls.clear()
    latency.load_or_build(g, quantized=False, rebuild=True)
    assert len(count.calls) == len(needed)


def test_another_cpu_model_or_thread_count_is_another_key(cache, monkeypatch):
    count = Counter(monkeypatch)
    g = tiny(patterns=1)
    monkeypatch.setattr(latency.machine, "cpu_model", lambda: "Test CPU A")
    key_a = latency.cache_key("small", 1)
    table_a = latency.load_or_build(g, quantized=False)
    assert table_a.key == key_a and key_a["cpu"] == "Test CPU A"

    monkeypatch.setattr(latency.machine, "cpu_model", lambda: "Test CPU B")
    key_b = latency.cache_key("small", 1)
    assert key_b != key_a and latency.cache_path("small", 1) != table_a.path
    count.calls.clear()
    table_b = latency.load_or_build(g, quantized=False)
    assert len(count.calls) == len(latency.required(g)) and table_b.path != table_a.path
    # A's file read as B's table is refused, saying which field differs.
    with pytest.raises(latency.LatencyError, match="Test CPU A"):
        latency.load_or_build(g, quantized=False, path=table_a.path)

    assert latency.cache_key("small", 2) != key_b
    assert latency.cache_path("small", 2) != latency.cache_path("small", 1)
    count.calls.clear()
    latency.load_or_build(g, quantized=False, threads=2)
    assert len(count.calls) == len(latency.required(g))
    assert latency.cache_key("bonsai7", 1)["space"] == "bonsai7" != key_b["space"]


def test_default_cache_location_and_its_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv(latency.CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert latency.cache_dir() == os.path.join(str(tmp_path), ".cache", "bonsai_tf", "latency")
    assert latency.cache_path("small").startswith(latency.cache_dir() + os.sep)
    monkeypatch.setenv(latency.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert latency.cache_path("small").startswith(str(tmp_path / "elsewhere") + os.sep)
    assert latency.cache_path("small", directory="/x").startswith("/x/")


def test_a_corrupt_table_is_named_and_rebuild_replaces_it(cache, monkeypatch):
    Counter(monkeypatch)
    g = tiny(patterns=1)
    path = latency.cache_path("small")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(latency.LatencyError, match="not JSON"):
        latency.load_or_build(g, quantized=False)
    table = latency.load_or_build(g, quantized=False, rebuild=True)
    assert latency.LatencyTable.load(path, table.key).entries == table.entries


# ---- prediction -----------------------------------------------------------------------------
def test_predict_is_the_sum_of_entries_without_their_invocation_cost(cache, monkeypatch):
    Counter(monkeypatch, op_ms=1.0, part_ms=0.5, empty_ms=0.25)
    g = tiny(nodes=2)
    table = latency.load_or_build(g, quantized=False)
    labels = [label for label, _ in latency.breakdown(g, table)]
    n_ops = g.canonical().num_ops()
    n_parts = len(labels) - n_ops - 1          # all but the operations and the invocation
    assert latency.predict(g, table) == pytest.approx(0.25 + n_ops * 0.75 + n_parts * 0.25)
    # A pruned network of the same space: its node sums (2 or 3 terms here) come from the
    # measured sums (2 and every operation of the edges) by interpolation.
    p = pruned(g, {(0, "x", 0): ["sep_conv_3x3", "identity"], (0, "y", 1): ["conv_3x3"],
                   (0, 0, 1): ["max_pool_3x3"], (1, "x", 0): ["avg_pool_3x3"],
                   (1, 0, 1): ["dil_conv_3x3"]})
    assert latency.predict(p, table) > 0
    assert len(latency.edge_latencies(p, table)) == p.num_ops()


def test_sums_of_unmeasured_terms_are_interpolated():
    table = latency.LatencyTable(latency.cache_key("small"))
    shape = (4, 4, 8)
    table.set(("empty", shape), False, 0.25, 1)
    table.set(("sum", shape, 2), False, 1.25, 1)
    table.set(("sum", shape, 6), False, 3.25, 1)
    assert table.ms(("sum", shape, 4), False) == pytest.approx(2.0)
    assert table.ms(("sum", shape, 8), False) == pytest.approx(4.0)   # extrapolated
    with pytest.raises(latency.LatencyError, match="int8"):
        table.ms(("sum", shape, 4), True)


@pytest.mark.slow
def test_predict_is_within_its_tolerance_of_the_measured_network(tmp_path):
    """predict / measured within a factor latency.PREDICTION_TOLERANCE (2), float32, batch 1.

    The sum of isolated parts is not the network: the converter fuses across parts (batch
    norms into convolutions, ReLUs into their producers), tensors stay in cache between
    layers, the per-invocation cost is paid once (each entry removes its own, with that
    measurement's noise), and microsecond figures are noisy on a loaded 2-core machine,
    whose load changes the speed of a whole burst of calls by up to 1.8x here. So both
    sides are taken the same way (medians of 100 calls, the lowest of 3 rounds), the
    network before and after the table (the lower kept, as each entry keeps its quietest
    round), and the network is large enough (32x32, 16 and 32 channels) for its
    operations to take tens of microseconds, not the few of an 8x8 one. Measured here
    under load: 0.99-1.35.
    """
    g = pruned(tiny(nodes=2, shape=(32, 32, 1), scale=16),
               {(0, "x", 0): ["sep_conv_3x3", "max_pool_3x3"], (0, "y", 1): ["dil_conv_3x3"],
                (0, 0, 1): ["conv_3x3", "identity"], (1, "x", 0): ["sep_conv_3x3"],
                (1, "y", 0): ["avg_pool_3x3"], (1, 0, 1): ["conv_3x3"]})
    timing = dict(repeats=100, warmup=10, rounds=3)
    before = latency.network_latency(g, False, **timing)
    table = latency.load_or_build(g, quantized=False, all_ops=False, directory=str(tmp_path),
                                  **timing)
    after = latency.network_latency(g, False, **timing)
    predicted, measured = latency.predict(g, table, False), min(before, after)
    tol = latency.PREDICTION_TOLERANCE
    assert 1 / tol <= predicted / measured <= tol, (
        predicted, before, after, latency.breakdown(g, table, False))


# ---- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,received,expected", [
    (dict(op="sep_conv_9x9"), "sep_conv_9x9", "expected one of"),
    (dict(input_shape=(8, 8)), "(8, 8)", "three positive integers"),
    (dict(input_shape=(8, 0, 4)), "(8, 0, 4)", "three positive integers"),
    (dict(stride=3), "stride=3", "expected 1 or 2"),
    (dict(quantized="int8"), "'int8'", "expected True (int8) or False"),
    (dict(repeats=0), "repeats=0", ">= 1"),
    (dict(threads=64), "threads=64", "expected at most"),
])
def test_bad_input_says_what_was_received_and_expected(kwargs, received, expected):
    args = dict(op="sep_conv_3x3", input_shape=(8, 8, 4), stride=1, quantized=False, repeats=3,
                threads=1)
    args.update(kwargs)
    with pytest.raises(latency.LatencyError) as e:
        latency.op_latency(**args)
    assert received in str(e.value) and expected in str(e.value), str(e.value)


def test_bad_tables_and_genotypes_are_refused(tmp_path):
    with pytest.raises(latency.LatencyError, match="expected a genotype.Genotype"):
        latency.required({"space": "small"})
    table = latency.LatencyTable(latency.cache_key("bonsai7"))
    with pytest.raises(latency.LatencyError, match="space 'bonsai7'.*expected a table of"):
        latency.predict(tiny(), table)
    with pytest.raises(latency.LatencyError, match="has no float entry"):
        latency.predict(G.initial("bonsai7", (8, 8, 1), 3, 4, 1, [["n"]], 1), table)
    with pytest.raises(latency.LatencyError, match="unknown search space 'nope'"):
        latency.cache_key("nope")
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(latency.LatencyError, match="not a bonsai-tf/latency table"):
        latency.LatencyTable.load(str(path))


# ---- the command --------------------------------------------------------------------------
def _load_script():
    return load_script("latency_table_script", os.path.join(ROOT, "bench", "latency_table.py"))


def test_latency_table_command_builds_prints_and_writes(tmp_path, monkeypatch, capsys):
    count = Counter(monkeypatch)
    script = _load_script()
    out = tmp_path / "table.json"
    args = ["latency_table.py", "--input_shape=8,8,1", "--scale=4", "--nodes=1",
            "--stem_stride=1", "--max_patterns=2", f"--cache_dir={tmp_path}", "--repeats=3",
            f"--out={out}"]
    assert script.main(args) == 0, capsys.readouterr().err
    g = tiny()
    assert len(count.calls) == 2 * len(latency.required(g))
    result = json.loads(out.read_text())
    assert set(result["networks"]) == {"float", "int8"}
    assert result["networks"]["float"]["predicted_ms"] > 0
    assert "op:conv_3x3:8x8x8:s2" in result["entries"]["int8"]
    assert "predicted" in capsys.readouterr().out

    script.FLAGS.unparse_flags()
    count.calls.clear()
    assert script.main(args + ["--rebuild", "--quantized=float"]) == 0
    assert len(count.calls) == len(latency.required(g))

    for bad, what in (("--input_shape=8,8", "--input_shape=8,8"),
                      ("--quantized=int4", "--quantized=int4"),
                      ("--space=nope", "--space=nope")):
        script.FLAGS.unparse_flags()
        assert script.main(args + [bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and what in err[0], err
