import json
import os
import re
import subprocess
import sys

import pytest

from bonsai_tf import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records():
    base = {"phase": "search", "cells": 2, "patterns": 1, "target": 0.6, "aim": None,
            "val_loss": 0.9, "train_loss": 1.0, "lr": 0.025, "memory_measured_mb": None,
            "events": []}
    recs = []
    for e in range(1, 7):
        r = dict(base, epoch=e, params=120_000 - 8_000 * e, compression=1.0 - 0.08 * e,
                 val_accuracy=0.5 + 0.06 * e, train_accuracy=0.45 + 0.07 * e,
                 memory_mb=310.0 - 6 * e, seconds=40.0 * e, epoch_seconds=40.0)
        recs.append(r)
    recs[1]["val_accuracy"] = None
    recs[2]["events"] = ["deadhead: removed 12 operations, 1 input"]
    recs[3]["events"] = ["grow: pattern 2, cells 3-4"]
    recs[3]["target"] = 0.45
    recs[3]["memory_measured_mb"] = 290.0
    for r in recs[4:]:
        r["phase"] = "final"
    return recs


GENOTYPE = {
    "format": "bonsai-tf/genotype", "version": 1, "space": "bonsai7",
    "input_shape": [28, 28, 1], "num_classes": 10, "scale": 16, "nodes": 3,
    "patterns": [["n"], ["r"]],
    "cells": [
        {"kind": "normal", "channels": 16, "nodes": 3, "aux": False,
         "inputs": {"0": 0.1},
         "edges": [
             {"from": "x", "to": 0, "ops": {"sep_conv_3x3": 0.12, "identity": 0.05}},
             {"from": "y", "to": 0, "ops": {"max_pool_3x3": 0.1}},
             {"from": 0, "to": 2, "ops": {"dil_conv_3x3": 0.3}},
             {"from": "x", "to": 2, "ops": {"avg_pool_3x3": 0.1}},
             # Node 1 is fed but feeds nothing: dead.
             {"from": "x", "to": 1, "ops": {"sep_conv_5x5": 0.2}},
             {"from": "y", "to": 1, "ops": {}},
         ]},
        {"kind": "reduction", "channels": 32, "nodes": 3, "aux": True,
         "inputs": {"0": 0.1, "1": 0.2},
         "edges": [
             {"from": "x", "to": 0, "ops": {"max_pool_3x3": 0.4, "sep_conv_5x5": 0.2,
                                            "dil_conv_5x5": 0.1}},
             {"from": "y", "to": 1, "ops": {"avg_pool_3x3": 0.3}},
             {"from": 0, "to": 1, "ops": {"identity": 0.2}},
             {"from": 1, "to": 2, "ops": {"sep_conv_3x3": 0.2, "dil_conv_3x3": 0.1}},
             {"from": 0, "to": 2, "ops": {"identity": 0.15}},
             {"from": "y", "to": 2, "ops": {"dil_conv_5x5": 0.12}},
         ]},
    ],
}


def _write_run(run, records, metrics=True, genotype=True, export=True):
    run.mkdir(exist_ok=True)
    (run / "config.json").write_text(json.dumps(
        {"dataset": "fashion_mnist", "strategy": "bonsai", "space": "bonsai7", "scale": 16}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if metrics:
        (run / "metrics.json").write_text(json.dumps({
            "test_accuracy": 0.8731, "params": 72_000, "search_seconds": 160.0,
            "total_seconds": 3725.5, "genotype_hash": "3f2a9c0d11b4e5f6", "cells": 2,
            "compression": 0.52}))
    if genotype:
        (run / "genotype.json").write_text(json.dumps(GENOTYPE))
    if export:
        (run / "export.json").write_text(json.dumps({"artifacts": {
            "saved_model": {"size_bytes": 912_345, "accuracy": 0.8731},
            "model.tflite": {"size_bytes": 301_002, "accuracy": 0.8731, "max_abs_diff": 2.1e-6,
                             "top1_agreement": 1.0},
            "model_int8.tflite": {"size_bytes": 91_004, "accuracy": 0.8702,
                                  "top1_agreement": 0.992}}}))
    return run


def _assert_png(path):
    assert os.path.isfile(path), path
    with open(path, "rb") as f:
        data = f.read()
    assert data.startswith(PNG_MAGIC), path
    assert len(data) > 2000, (path, len(data))


def _referenced_pngs(text):
    return re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)


def test_full_run(tmp_path):
    run = _write_run(tmp_path / "fmnist_bonsai_s0", _records())
    path = report.write_report(str(run))
    assert path == str(run / "report.md")
    text = (run / "report.md").read_text()

    assert text.startswith("# Run report: fmnist_bonsai_s0")
    assert "0.8731" in text
    assert "3f2a9c0d11b4e5f6" in text
    assert "fashion_mnist" in text and "bonsai" in text
    assert "0.86 (epoch 6)" in text                     # best val accuracy
    assert "- epoch 3: deadhead: removed 12 operations, 1 input" in text
    assert "- epoch 4: grow: pattern 2, cells 3-4" in text
    assert "y = stem (0.1) + c0 (0.2)" in text
    assert "Dead nodes (no path from an input to the output): 1." in text
    assert "| model_int8.tflite | 91,004 | 0.8702 | – | 0.992 |" in text

    pngs = _referenced_pngs(text)
    for name in ("accuracy.png", "compression.png", "params.png", "memory.png",
                 "cell_00.png", "cell_01.png"):
        assert name in pngs
    assert len([p for p in pngs if p.startswith("cell_")]) == len(GENOTYPE["cells"])
    for p in pngs:
        _assert_png(run / p)

    # Rewriting over an existing report works and gives the same text.
    report.write_report(str(run))
    assert (run / "report.md").read_text() == text


def test_run_in_progress_with_one_epoch(tmp_path):
    run = _write_run(tmp_path / "running", _records()[:1], metrics=False, genotype=False,
                     export=False)
    text = open(report.write_report(str(run))).read()
    assert "In progress" in text
    assert "No genotype.json yet." in text
    assert "## Export" not in text
    pngs = _referenced_pngs(text)
    assert len(pngs) == 4
    for p in pngs:
        _assert_png(run / p)


def test_missing_keys_and_bad_lines(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    lines = [json.dumps({"epoch": 1}), json.dumps({}),
             json.dumps({"epoch": 3, "val_accuracy": None, "events": None, "params": "n/a",
                         "phase": "final", "compression": float("nan")}),
             "[1, 2]", '{"epoch": 4, "val_acc']          # a half-written last line
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "metrics.json").write_text("{not json")
    (run / "genotype.json").write_text(json.dumps({"cells": [
        {"edges": [{"from": "x", "to": 0, "ops": {"conv_3x3": 1.0}}, {"bad": 1}, "junk"]},
        "junk"]}))
    (run / "export.json").write_text(json.dumps({"artifacts": {"m": "junk"}}))
    text = open(report.write_report(str(run))).read()
    assert "## Summary" in text and "### Cell 1" in text
    for p in _referenced_pngs(text):
        _assert_png(run / p)


def test_empty_run_dir_and_missing_dir(tmp_path):
    text = open(report.write_report(str(tmp_path))).read()
    assert "No epochs recorded yet." in text
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report.write_report(str(tmp_path / "nope"))


def test_plot_metrics_writes_four_plots(tmp_path):
    paths = report.plot_metrics(_records(), str(tmp_path))
    assert [os.path.basename(p) for p in paths] == [
        "accuracy.png", "compression.png", "params.png", "memory.png"]
    for p in paths:
        _assert_png(p)


def test_asap_records_add_the_mixing_weights_plot(tmp_path):
    recs = _records()
    for i, r in enumerate(recs[:3]):
        r["tau"], r["operations"] = 1.6 * 0.75 ** i, 12 - 3 * i
        r["mixing_weights"] = {"c0:x->0": {"identity": 0.2 + 0.3 * i, "sep_conv_3x3": 0.8 - 0.3 * i},
                               "c0:y->0": {"max_pool_3x3": 1.0}}
    paths = report.plot_metrics(recs, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == [
        "accuracy.png", "compression.png", "params.png", "alphas.png", "memory.png"]
    top, bottom = report.metric_figures(recs)["alphas"].axes[:2]
    # One line per edge, over the epochs (event markers are vertical lines of 2 points).
    strongest = [list(l.get_ydata()) for l in top.get_lines() if len(l.get_ydata()) == len(recs)]
    assert len(strongest) == 2
    assert [0.8, 0.5, 0.8] == [round(y, 6) for y in strongest[0][:3]]
    assert strongest[1][:3] == [1.0, 1.0, 1.0] and all(y != y for y in strongest[0][3:])
    _assert_png(os.path.join(tmp_path, "alphas.png"))


def test_draw_cell_without_y_and_with_string_indices(tmp_path):
    cell = {"kind": "normal", "channels": 8, "nodes": 4, "inputs": {},
            "edges": [{"from": "y", "to": 0, "ops": {"identity": 0.2}},
                      {"from": "x", "to": "0", "ops": ["sep_conv_3x3"]},
                      {"from": "0", "to": 3, "ops": {"conv_1x1": 0.1, "zero": 0.0}},
                      {"from": 1, "to": 2, "ops": {"sep_conv_5x5": 0.1}}]}
    path = report.draw_cell(cell, str(tmp_path / "sub" / "c.png"), "Cell 7: normal")
    _assert_png(path)
    assert report._alive(4, report._cell_edges(cell), False) == {0, 3}


def test_report_does_not_import_tensorflow():
    code = ("import sys, bonsai_tf.report; "
            "sys.exit(int('tensorflow' in sys.modules or 'matplotlib.pyplot' in sys.modules))")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def _axes(fig):
    (ax,) = fig.axes
    return ax


def _line(ax, label):
    lines = [l for l in ax.get_lines() if l.get_label() == label]
    assert len(lines) == 1, [l.get_label() for l in ax.get_lines()]
    return lines[0]


def _legend_labels(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_compression_plot_draws_target_and_aim_as_recorded_steps():
    recs = _records()
    for r, target, aim in zip(recs, [0.6, 0.6, 0.6, 0.45, None, None],
                              [0.54, 0.54, 0.54, 0.405, None, None]):
        r["target"], r["aim"] = target, aim
    ax = _axes(report.metric_figures(recs)["compression"])
    for label, want in (("growth threshold (target)", [0.6, 0.6, 0.6, 0.45]),
                        ("aim", [0.54, 0.54, 0.54, 0.405])):
        line = _line(ax, label)
        assert line.get_drawstyle() == "steps-post"
        ys = list(line.get_ydata())
        assert ys[:4] == want and all(y != y for y in ys[4:])  # NaN: no threshold in final
    # No constant line across the plot: every line follows the epochs.
    assert all(len(set(l.get_xdata())) > 1 for l in ax.get_lines()
               if l.get_gid() is None or not str(l.get_gid()).startswith("event:"))


def test_memory_plot_draws_the_budget_when_there_is_one():
    ax = _axes(report.metric_figures(_records(), memory_budget_mb=320.0)["memory"])
    budget = _line(ax, "budget (320 MB)")
    assert list(budget.get_ydata()) == [320.0, 320.0]
    assert "budget (320 MB)" in _legend_labels(ax)
    for none in (0, None, "n/a"):
        ax = _axes(report.metric_figures(_records(), memory_budget_mb=none)["memory"])
        assert not [l for l in ax.get_lines() if "budget" in l.get_label()]


def test_budget_comes_from_config_json(tmp_path, monkeypatch):
    run = _write_run(tmp_path / "run", _records())
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(dict(config, memory_budget_mb=230)))
    seen = []
    real = report.metric_figures
    monkeypatch.setattr(report, "metric_figures",
                        lambda records, budget=None, threshold=None:
                        seen.append(budget) or real(records, budget, threshold))
    report.write_report(str(run))
    assert seen == [230]


def test_each_event_kind_has_its_own_colour_line_style_and_legend_entry():
    recs = _records()
    recs[0]["events"] = ["compression cycle 1: pressure x2"]
    recs[1]["events"] = ["compression cycle 2: pressure x4", "something new: hello"]
    recs[4]["events"] = ["final network: search finished, 30 operations kept"]
    ax = _axes(report.metric_figures(recs)["accuracy"])
    styles = {}
    for line in ax.get_lines():
        gid = str(line.get_gid())
        if gid.startswith("event:"):
            # The dash pattern as drawn: custom patterns all report linestyle "--".
            dashes = line._unscaled_dash_pattern[1]
            styles.setdefault(gid[6:], set()).add((line.get_color(), tuple(dashes or ())))
    assert set(styles) == {"deadhead", "grow", "final", "cycle", "other"}
    assert all(len(s) == 1 for s in styles.values())           # one style per kind
    pairs = [next(iter(s)) for s in styles.values()]
    assert len({c for c, _ in pairs}) == 5 and len({ls for _, ls in pairs}) == 5
    labels = _legend_labels(ax)
    for label in ("deadhead", "grow", "final network", "compression cycle", "other event"):
        assert labels.count(label) == 1, labels                  # two cycles, one entry
    # Only the kinds present get an entry.
    only = _records()
    ax = _axes(report.metric_figures(only)["params"])
    kinds = [l for l in _legend_labels(ax) if l in ("final network", "compression cycle")]
    assert kinds == []


def test_a_latency_selection_is_reported(tmp_path):
    run = _write_run(tmp_path / "proxyless", _records()[:2] + [
        {"epoch": 3, "expected_latency_ms": 0.601}])
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["latency_selection"] = {
        "target_ms": 0.6, "select": "measured", "argmax_predicted_ms": 0.7426,
        "argmax_measured_ms": 0.836, "predicted_ms": 0.5658, "measured_ms": 0.5903,
        "direction": "down", "met": True, "seconds": 31.8,
        "measurements": [{"switches": 0}, {"switches": 5}],
        "switches": [{"cell": 1, "edge": "x->0", "from": "conv_3x3", "to": "max_pool_3x3",
                      "saved_ms": 0.1, "log_p_lost": 0.2}]}
    (run / "metrics.json").write_text(json.dumps(metrics))
    text = open(report.write_report(str(run))).read()
    assert "## Latency target" in text and "expected latency at its end 0.601 ms" in text
    assert "| argmax of the alphas | 0.7426 | 0.836 |" in text
    assert "| final network | 0.5658 | 0.5903 |" in text
    assert "| 1 | x->0 | conv_3x3 | max_pool_3x3 | 0.1 | 0.2 |" in text
    assert "Target met; 2 network(s) measured in 31.8 s." in text
    metrics["latency_selection"]["met"] = False
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert "Target **not met**" in open(report.write_report(str(run))).read()
    # runs of other strategies have no such section
    assert "## Latency target" not in open(report.write_report(
        str(_write_run(tmp_path / "bonsai", _records())))).read()


def test_restructuring_row_gives_the_cost_of_one_change_when_recorded():
    metrics = {"restructure_seconds": 12.0, "restructure_share": 0.2, "restructures": 6,
               "restructure_seconds_per_change": 2.0}
    assert report._restructure(metrics).endswith("(20.0%: rebuilds and retracing, 6 changes, "
                                                  "2.0 s each)")
    # Runs that recorded no count (older ones, or no change at all) keep the share alone.
    for count, each in ((None, None), (0, None)):
        row = report._restructure(dict(metrics, restructures=count,
                                       restructure_seconds_per_change=each))
        assert row.endswith("(20.0%: rebuilds and retracing)")
    assert report._restructure({"restructure_seconds": None}) == "–"
