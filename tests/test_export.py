"""Tests for bonsai_tf.export and the export/predict entry scripts, on a tiny network."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from bonsai_tf import data  # noqa: E402
from bonsai_tf import engine  # noqa: E402
from bonsai_tf import export  # noqa: E402
from bonsai_tf import genotype as genotype_lib  # noqa: E402
from bonsai_tf import network  # noqa: E402
from bonsai_tf import run_dir as rd  # noqa: E402
from helpers import load_script  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (12, 12, 1)
CLASSES = ("low", "mid", "high")
# Removed everywhere; sep/dil 5x5 carry weights, avg_pool none: both kinds must vanish.
REMOVED = ("sep_conv_5x5", "dil_conv_5x5", "avg_pool_3x3")


def _subprocess_env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    return env


def _pruned(g):
    """g without REMOVED and without cell 0's edge x->1 (an edge left empty)."""
    cells = []
    for c, cell in enumerate(g.cells):
        edges = []
        for e in cell.edges:
            ops = tuple((o, w) for o, w in e.ops if o not in REMOVED)
            if c == 0 and (e.src, e.dst) == ("x", 1):
                ops = ()
            edges.append(dataclasses.replace(e, ops=ops))
        cells.append(dataclasses.replace(cell, edges=tuple(edges)))
    return dataclasses.replace(g, cells=tuple(cells)).canonical().validate()


def _splits(seed=0):
    rng = np.random.default_rng(seed)

    def make(n):
        labels = rng.integers(0, 3, n)
        # Brightness depends on the class, so the classes differ in what the model sees.
        # The clipped noise reaches 0 and 255, as natural images do.
        base = (40 + 80 * labels)[:, None, None, None]
        images = np.clip(base + rng.normal(0, 60, (n,) + SHAPE), 0, 255).astype(np.uint8)
        return images, labels.astype(np.int64)

    train, val, test = make(64), make(8), make(96)
    mean, std = data._channel_stats(train[0])
    info = data.DatasetInfo(name="tiny", image_shape=SHAPE, num_classes=3, class_names=CLASSES,
                            mean=mean, std=std, augment="none", source="generated")
    return data.Splits(train=train, val=val, test=test, info=info)


def _train(model, images, labels, steps=8):
    """A few full-batch Adam steps: logits that mean something, batch-norm statistics that fit."""
    opt = keras.optimizers.Adam(0.01)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x, y = tf.constant(images.astype(np.float32)), tf.constant(labels)

    # Eager: tracing the gradient graph would take longer than these few steps.
    def step():
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            loss = loss_fn(y, out[0] if isinstance(out, (list, tuple)) else out)
        opt.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    for _ in range(steps):
        step()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    keras.utils.set_random_seed(0)
    splits = _splits()
    g = genotype_lib.initial("bonsai7", SHAPE, 3, 4, 2, [["n"], ["r"]], 2)
    net = network.Network(g, mean=splits.info.mean, std=splits.info.std)
    pruned = _pruned(g)
    final = net.final(pruned)
    _train(final.model, *splits.train)
    model = network.deployable(final)
    run = str(tmp_path_factory.mktemp("run"))
    engine.save_model(model, os.path.join(run, engine.MODEL_FILE))
    rd.write_json(os.path.join(run, engine.DATASET_FILE), dataclasses.asdict(splits.info))
    rd.write_json(os.path.join(run, "config.json"), {"dataset": "tiny", "seed": 0})
    rd.write_json(os.path.join(run, "genotype.json"), final.genotype.to_dict())
    rd.write_json(os.path.join(run, "metrics.json"), {"test_accuracy": 0.0})
    result = export.export_run(run, splits=splits, representative_count=32)
    return {"run": run, "splits": splits, "result": result, "pruned": final.genotype,
            "model": model}


def test_export_writes_every_artifact(exported):
    run, result = exported["run"], exported["result"]
    for name in (export.SAVED_MODEL_DIR, export.TFLITE_FILE, export.TFLITE_INT8_FILE,
                 export.EXPORT_FILE):
        assert os.path.exists(os.path.join(run, name)), name
    assert not [f for f in os.listdir(run) if f.startswith((".tmp-", ".old-"))]
    with open(os.path.join(run, export.EXPORT_FILE)) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    arts = result["artifacts"]
    assert set(arts) == {"model.keras", "saved_model", "model.tflite", "model_int8.tflite"}
    for name, a in arts.items():
        assert a["size_bytes"] > 0, name
        assert 0.0 <= a["accuracy"] <= 1.0, name
    assert result["test_examples"] == 96
    assert result["class_names"] == list(CLASSES)


def test_artifacts_agree_with_keras(exported):
    run, splits, arts = exported["run"], exported["splits"], exported["result"]["artifacts"]
    test_x, test_y = splits.test
    reloaded = export.load_keras_model(os.path.join(run, "model.keras"))
    reference = export.keras_probabilities(reloaded, test_x)
    np.testing.assert_allclose(reference, export.keras_probabilities(exported["model"], test_x),
                               atol=1e-6)
    # Non-trivial outputs: not saturated, and not all one class.
    assert reference.max() < 0.999 and len(np.unique(reference.argmax(-1))) > 1
    assert arts["model.keras"]["accuracy"] > 0.5  # learnt something (chance: 1/3)
    assert arts["model.keras"]["accuracy"] == pytest.approx(
        np.mean(reference.argmax(-1) == test_y))

    for name in ("saved_model", "model.tflite"):
        assert arts[name]["top1_agreement"] == 1.0, name
        assert arts[name]["max_abs_diff"] < 1e-4, name
        assert arts[name]["accuracy"] == arts["model.keras"]["accuracy"], name
    int8 = arts["model_int8.tflite"]
    assert int8["top1_agreement"] >= 0.8
    assert int8["max_abs_diff"] < 0.5
    assert int8["raw_pixel_input"] and int8["input_dtype"] == "uint8"
    # per-tensor is chosen only when it keeps the validation accuracy, and the file on
    # disk is the chosen candidate
    cands = int8["candidates"]
    assert set(cands) == {"per-channel", "per-tensor"}
    assert int8["size_bytes"] == cands[int8["quantization"]]["size_bytes"]
    assert cands["per-tensor"]["size_bytes"] < cands["per-channel"]["size_bytes"]
    if int8["quantization"] == "per-tensor":
        assert cands["per-tensor"]["val_accuracy"] >= cands["per-channel"]["val_accuracy"] - 0.0025

    # The figures match what the files on disk compute.
    lite = export.TFLiteClassifier(os.path.join(run, "model.tflite"), batch_size=40)
    np.testing.assert_allclose(lite(test_x), reference, atol=1e-4)
    q = export.TFLiteClassifier(os.path.join(run, "model_int8.tflite"), batch_size=40)
    agree = np.mean(q(test_x).argmax(-1) == reference.argmax(-1))
    assert agree == pytest.approx(int8["top1_agreement"])


def test_int8_model_is_integer_only(exported):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=os.path.join(exported["run"], "model_int8.tflite"))
    (inp,), (out,) = it.get_input_details(), it.get_output_details()
    assert inp["dtype"] == np.uint8 and out["dtype"] == np.float32
    float_tensors = [t["name"] for t in it.get_tensor_details()
                     if t["dtype"] == np.float32 and t["index"] != out["index"]]
    assert not float_tensors, float_tensors


def test_saved_model_loads_with_tensorflow_alone(exported, tmp_path):
    run, splits = exported["run"], exported["splits"]
    test_x = splits.test[0]
    np.save(tmp_path / "x.npy", test_x)
    code = (
        "import sys\n"
        # Not even importable here (it may be pip-installed): the graph must stand on
        # TensorFlow alone.
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'bonsai_tf':\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import numpy as np, tensorflow as tf\n"
        f"m = tf.saved_model.load({os.path.join(run, 'saved_model')!r})\n"
        "fn = m.signatures['serving_default']\n"
        "spec = fn.structured_input_signature[1]['images']\n"
        "assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, 12, 12, 1], spec\n"
        "x = np.load('x.npy')\n"
        "out = fn(images=tf.constant(x))\n"
        "np.save('p.npy', out['probabilities'].numpy())\n"
        "one = fn(images=tf.constant(x[:1]))['logits'].numpy()\n"
        "assert one.shape == (1, 3), one.shape\n"
        "print(sum(int(np.prod(v.shape)) for v in m.model_variables))\n"
        "print(sorted(m for m in sys.modules if m.startswith('bonsai_tf')))\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *_, size, modules = proc.stdout.strip().splitlines()
    assert modules == "[]"
    # It holds exactly the final network's variables (weights and batch-norm statistics).
    assert int(size) == sum(int(np.prod(v.shape)) for v in exported["model"].weights)
    reference = export.keras_probabilities(exported["model"], test_x)
    probabilities = np.load(tmp_path / "p.npy")
    np.testing.assert_allclose(probabilities, reference, atol=1e-5)
    assert np.array_equal(probabilities.argmax(-1), reference.argmax(-1))


def test_pruned_operations_are_not_exported(exported):
    run, pruned = exported["run"], exported["pruned"]
    model = export.load_keras_model(os.path.join(run, "model.keras"))
    described = json.dumps(model.get_config()) + " ".join(v.path for v in model.weights)
    for op in REMOVED:
        assert op not in described, op
    layers = model.get_config()["layers"]
    # cell0's edge x->1 lost all its operations, so the edge itself is gone.
    assert not any(layer["name"].startswith("cell0_e_x_1_") for layer in layers)
    assert any(layer["name"].startswith("cell0_e_x_0_") for layer in layers)
    assert "sep_conv_3x3" in described  # kept operations are there
    # Plain Keras layers only: no pruners, nothing that needs bonsai_tf to load.
    assert {layer["module"] for layer in layers} == {"keras.layers"}
    assert not any("SawGate" in layer["class_name"] for layer in layers)
    fresh = network.Network(pruned, mean=(100.0,), std=(50.0,), with_pruners=False,
                            aux_heads=False)
    assert exported["result"]["params"] == fresh.count_params()
    full = network.Network(genotype_lib.initial("bonsai7", SHAPE, 3, 4, 2, [["n"], ["r"]], 2),
                           with_pruners=False, aux_heads=False)
    assert fresh.count_params() < full.count_params()


def test_save_dir_atomically_replaces_and_keeps_on_failure(tmp_path):
    target = tmp_path / "sm"

    def write(text):
        def go(d):
            with open(os.path.join(d, "f"), "w") as f:
                f.write(text)
        return go

    export._save_dir_atomically(write("one"), str(target))
    export._save_dir_atomically(write("two"), str(target))
    assert (target / "f").read_text() == "two"

    def fail(d):
        write("half")(d)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        export._save_dir_atomically(fail, str(target))
    assert (target / "f").read_text() == "two"
    assert sorted(os.listdir(tmp_path)) == ["sm"]


def test_export_model_rejects_mismatched_data(exported):
    splits = exported["splits"]
    info = dataclasses.replace(splits.info, image_shape=(28, 28, 1))
    with pytest.raises(export.ExportError, match=r"\(12, 12, 1\).*expected \(28, 28, 1\)"):
        export.export_model(exported["model"], dataclasses.replace(splits, info=info),
                            "/nonexistent")
    info = dataclasses.replace(splits.info, num_classes=10)
    with pytest.raises(export.ExportError, match="expected \\(batch, 10\\)"):
        export.export_model(exported["model"], dataclasses.replace(splits, info=info),
                            "/nonexistent")


def test_export_run_rejects_unfinished_runs(tmp_path):
    with pytest.raises(export.ExportError, match="not a directory"):
        export.export_run(str(tmp_path / "missing"))
    (tmp_path / "model.keras").write_bytes(b"")
    with pytest.raises(export.ExportError, match="lacks metrics.json"):
        export.export_run(str(tmp_path))


@pytest.mark.parametrize("make", ["missing", "unfinished"])
def test_cli_rejects_bad_run_dir(tmp_path, make):
    run = tmp_path / "run"
    if make == "unfinished":
        run.mkdir()
        (run / "config.json").write_text("{}")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "export", "export.py"),
                           f"--run_dir={run}"], cwd=tmp_path, env=_subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert str(run) in lines[0] and "expected" in lines[0]
    assert "Traceback" not in proc.stderr


def test_predict_prints_labels(exported, tmp_path):
    run = exported["run"]
    # A colour image of another size: predict converts it to the model's 12x12 grey.
    bright = np.full((20, 16, 3), 230, np.uint8)
    Image.fromarray(bright).save(tmp_path / "bright.png")
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(tmp_path / "dark.png")
    images = [str(tmp_path / "bright.png"), str(tmp_path / "dark.png")]
    proc = subprocess.run([sys.executable, os.path.join(REPO, "export", "predict.py"),
                           f"--model={os.path.join(run, 'model.tflite')}", *images],
                          cwd=tmp_path, env=_subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    expected = export.keras_probabilities(exported["model"], np.stack(
        [np.full(SHAPE, 230, np.uint8), np.zeros(SHAPE, np.uint8)]))
    for line, path, p in zip(lines, images, expected):
        got_path, label, prob = line.split("\t")
        assert got_path == path
        assert label == CLASSES[int(p.argmax())]
        assert float(prob) == pytest.approx(p.max(), abs=1e-3)


def test_predict_rejects_bad_input(exported, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    for args, what in (([f"--model={tmp_path / 'none.tflite'}", "x.png"], "none.tflite"),
                       ([f"--model={os.path.join(exported['run'], 'model.tflite')}",
                         str(tmp_path / "broken.png")], "broken.png")):
        proc = subprocess.run([sys.executable, os.path.join(REPO, "export", "predict.py"), *args],
                              cwd=tmp_path, env=_subprocess_env(), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2, (proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and what in lines[0], proc.stderr


def test_cli_exports_a_run_from_its_config(exported, tmp_path, capsys):
    # A folder data set: export reloads it from config.json, as after a real run.
    rng = np.random.default_rng(1)
    root = tmp_path / "images"
    for k, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True)
        for i in range(10):
            pixels = np.clip(40 + 80 * k + rng.normal(0, 60, SHAPE[:2]), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / cls / f"{i}.png")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model.keras", "metrics.json"):
        (run / name).write_bytes(open(os.path.join(exported["run"], name), "rb").read())
    rd.write_json(str(run / "config.json"), {"dataset": f"folder:{root}", "data_dir": "",
                                             "val_size": 4, "seed": 0, "image_size": []})
    cli = load_script("export_cli", os.path.join(REPO, "export", "export.py"))
    status = cli.main(["export.py", f"--run_dir={run}", "--representative_count=8"])
    captured = capsys.readouterr()
    out = captured.out
    assert status == 0, (out, captured.err)
    with open(run / "export.json") as f:
        result = json.load(f)
    assert result["test_examples"] == 6  # the folder loader holds out 20% per class
    assert result["representative"]["count"] == 8
    assert result["artifacts"]["model.tflite"]["top1_agreement"] == 1.0
    assert "model_int8.tflite" in out and "export.json" in out
    assert os.path.isfile(run / "dataset.json")  # written for predict.py's labels
