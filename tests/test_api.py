"""The Python entry point bonsai_tf.search, on images in memory."""

import os
import subprocess
import sys

import numpy as np
import pytest

import bonsai_tf
from bonsai_tf import api
from bonsai_tf import data as data_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def images(n=120, size=12, seed=0):
    """Class k = a bright quadrant k on noise (as tests/helpers.make_folder)."""
    rng = np.random.RandomState(seed)
    y = np.arange(n) % 3
    x = rng.randint(0, 60, (n, size, size)).astype(np.uint8)
    for i, label in enumerate(y):
        r, c = divmod(int(label), 2)
        x[i, r * 6:(r + 1) * 6, c * 6:(c + 1) * 6] += 150
    return x, y


def test_quick_preset_is_the_quick_flagfile():
    flags = {}
    with open(os.path.join(ROOT, "train", "configs", "fmnist_quick.flags")) as f:
        for line in f:
            if line.startswith("--"):
                k, _, v = line[2:].strip().partition("=")
                if not _:  # a bare boolean flag: --name or --noname
                    k, v = (k[2:], "false") if k.startswith("no") and k[2:] in api.QUICK \
                        else (k, "true")
                flags[k] = v
    for key, value in api.QUICK.items():
        assert key in flags, key
        want = flags[key]
        got = value
        if isinstance(got, bool):
            assert want.lower() == str(got).lower(), key
        elif key == "patterns":
            import json
            assert [list(p) for p in got] == json.loads(want), key
        elif isinstance(got, float):
            assert got == float(want), key
        else:
            assert str(got) == want, key


def test_from_arrays_splits_and_refuses_bad_input():
    x, y = images()
    s = data_lib.from_arrays(x, y, val_size=0.1)
    assert s.info.image_shape == (12, 12, 1) and s.info.num_classes == 3
    assert len(s.train[1]) + len(s.val[1]) + len(s.test[1]) == 120 and len(s.test[1]) > 0
    with pytest.raises(data_lib.DataError, match=r"expected pixels 0..255"):
        data_lib.from_arrays(x.astype(np.float32) * 10, y)
    with pytest.raises(data_lib.DataError, match="expected 120 integer labels"):
        data_lib.from_arrays(x, y[:10])
    with pytest.raises(data_lib.DataError, match="expected both or neither"):
        data_lib.from_arrays(x, y, x_test=x)


@pytest.mark.slow
def test_search_returns_a_plain_keras_model_and_the_genotype(tmp_path):
    x, y = images()
    result = bonsai_tf.search(x, y, minutes=0, epochs=3, search_epochs=2, scale=4, nodes=1,
                              batch_size=16, memory_budget_mb=0, train_subset=0,
                              output_dir=str(tmp_path / "run"), export=False, verbose=0)
    assert 0.0 <= result.metrics["test_accuracy"] <= 1.0
    assert result.genotype.hash() == result.metrics["genotype_hash"]
    logits = result.model.predict(x[:5, :, :, None].astype(np.float32), verbose=0)
    assert logits.shape == (5, 3)
    assert os.path.exists(os.path.join(result.run_dir, "report.md"))
    # model.keras loads in a fresh process with Keras alone (nothing of bonsai_tf)
    code = ("import sys, keras; m = keras.models.load_model(sys.argv[1], compile=False); "
            "assert 'bonsai_tf' not in sys.modules; print(m.output_shape)")
    proc = subprocess.run([sys.executable, "-c", code, os.path.join(result.run_dir, "model.keras")],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(None, 3)" in proc.stdout
    # the same call again: the finished run is read back, not redone
    again = bonsai_tf.search(x, y, minutes=0, epochs=3, search_epochs=2, scale=4, nodes=1,
                             batch_size=16, memory_budget_mb=0, train_subset=0,
                             output_dir=result.run_dir, export=False, verbose=0)
    assert again.metrics == result.metrics
    with pytest.raises(Exception, match="holds a run of other arguments"):
        bonsai_tf.search(x, y, minutes=0, epochs=3, search_epochs=2, scale=8, nodes=1,
                         batch_size=16, output_dir=result.run_dir, export=False, verbose=0)
