"""Tests for bonsai_tf.data: every source, the splits, and the tf.data pipelines."""

import gzip
import io
import logging
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from bonsai_tf import data
from bonsai_tf.data import DataError


# ------------------------------------------------------------------- helpers

def _idx_bytes(array):
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def _write_fashion(directory, n_train=60, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for base, array in arrays.items():
        with gzip.open(os.path.join(directory, base + ".gz"), "wb") as f:
            f.write(_idx_bytes(array))
    return arrays


def _png(path, size=(8, 8), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    h, w = size
    channels = {"L": None, "RGB": 3, "RGBA": 4}[mode]
    shape = (h, w) if channels is None else (h, w, channels)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def _image_folder(root, classes=("cat", "dog"), per_class=5, mode="RGB", size=(8, 8)):
    for c, cls in enumerate(classes):
        for i in range(per_class):
            _png(os.path.join(root, cls, f"{i}.png"), size, mode, seed=10 * c + i)
    return root


def _epochs(ds, n):
    out = []
    for _ in range(n):
        xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
        out.append((np.concatenate(xs), np.concatenate(ys)))
    return out


# ------------------------------------------------------------- Fashion-MNIST

def test_fashion_mnist_from_debian_files():
    if not os.path.isdir(data.FASHION_MNIST_DIR):
        pytest.skip("dataset-fashion-mnist is not installed")
    splits = data.load_dataset("fashion_mnist", val_size=5000)
    (tx, ty), (vx, vy), (sx, sy) = splits.train, splits.val, splits.test
    assert tx.shape == (55000, 28, 28, 1) and vx.shape == (5000, 28, 28, 1)
    assert sx.shape == (10000, 28, 28, 1) and sy.shape == (10000,)
    assert tx.dtype == vx.dtype == sx.dtype == np.uint8
    assert ty.dtype == vy.dtype == sy.dtype == np.int64
    assert len(tx) + len(vx) == 60000
    info = splits.info
    assert info.num_classes == 10 and info.class_names[0] == "T-shirt/top"
    assert info.image_shape == (28, 28, 1) and info.augment == "crop_flip"
    assert set(np.unique(ty)) == set(range(10))
    # Known Fashion-MNIST statistics, to within what a 5000-example holdout moves them.
    assert abs(info.mean[0] - 72.94) < 1.0 and abs(info.std[0] - 90.02) < 1.0
    # Val must be disjoint from train: no val image occurs among the train images.
    train_rows = {row.tobytes() for row in tx.reshape(len(tx), -1)}
    overlap = sum(row.tobytes() in train_rows for row in vx.reshape(len(vx), -1))
    # Fashion-MNIST has few if any exact duplicates; a leak would give thousands.
    assert overlap < 20
    assert len(np.unique(np.concatenate([ty, vy]))) == 10


def test_fashion_mnist_from_data_dir_and_splits(tmp_path):
    arrays = _write_fashion(tmp_path)
    splits = data.load_dataset("fashion_mnist", str(tmp_path), val_size=10, seed=3)
    assert splits.train[0].shape == (50, 28, 28, 1) and splits.val[0].shape == (10, 28, 28, 1)
    np.testing.assert_array_equal(splits.test[0][..., 0], arrays["t10k-images-idx3-ubyte"])
    assert str(tmp_path) in splits.info.source
    # Train and val partition the original training set exactly.
    original = {r.tobytes() for r in arrays["train-images-idx3-ubyte"].astype(np.uint8)}
    got = [r.tobytes() for r in np.concatenate([splits.train[0], splits.val[0]])[..., 0]]
    assert len(got) == len(set(got)) == 60 and set(got) == original
    expected_mean = splits.train[0].astype(np.float64).mean()
    assert splits.info.mean[0] == pytest.approx(expected_mean)
    assert splits.info.std[0] == pytest.approx(splits.train[0].astype(np.float64).std())


def test_seeded_splits_reproducible_and_seed_dependent(tmp_path):
    _write_fashion(tmp_path)
    a = data.load_dataset("fashion_mnist", str(tmp_path), val_size=10, train_subset=20, seed=1)
    b = data.load_dataset("fashion_mnist", str(tmp_path), val_size=10, train_subset=20, seed=1)
    c = data.load_dataset("fashion_mnist", str(tmp_path), val_size=10, train_subset=20, seed=2)
    assert a.train[0].shape[0] == 20 and a.val[0].shape[0] == 10
    np.testing.assert_array_equal(a.train[0], b.train[0])
    np.testing.assert_array_equal(a.val[1], b.val[1])
    assert not np.array_equal(a.val[0], c.val[0])
    assert not np.array_equal(a.train[0], c.train[0])


def test_val_size_zero_and_invalid_sizes(tmp_path):
    _write_fashion(tmp_path)
    s = data.load_dataset("fashion_mnist", str(tmp_path), val_size=0)
    assert s.val[0].shape == (0, 28, 28, 1) and s.val[1].shape == (0,)
    assert s.val[1].dtype == np.int64 and len(s.train[0]) == 60
    with pytest.raises(DataError, match="val_size=60"):
        data.load_dataset("fashion_mnist", str(tmp_path), val_size=60)
    with pytest.raises(DataError, match="train_subset=51"):
        data.load_dataset("fashion_mnist", str(tmp_path), val_size=10, train_subset=51)
    with pytest.raises(DataError, match="val_size=-1"):
        data.load_dataset("fashion_mnist", str(tmp_path), val_size=-1)


def test_val_size_as_a_count_or_a_fraction(tmp_path):
    _write_fashion(tmp_path)  # 60 training examples
    count = data.load_dataset("fashion_mnist", str(tmp_path), val_size=6, seed=1)
    fraction = data.load_dataset("fashion_mnist", str(tmp_path), val_size=0.1, seed=1)
    whole = data.load_dataset("fashion_mnist", str(tmp_path), val_size=6.0, seed=1)
    for s in (fraction, whole):
        assert len(s.val[1]) == 6 and len(s.train[1]) == 54
        np.testing.assert_array_equal(s.val[0], count.val[0])  # the same seeded split
    assert len(data.load_dataset("fashion_mnist", str(tmp_path), val_size=0.25).val[1]) == 15
    assert len(data.load_dataset("fashion_mnist", str(tmp_path), val_size=0.001).val[1]) == 1
    for bad in (1.5, -0.1, 1.0 + 1e-9, float("nan"), "0.1", True, -3):
        with pytest.raises(DataError, match="count >= 0 .* or a fraction in \\(0, 1\\)"):
            data.load_dataset("fashion_mnist", str(tmp_path), val_size=bad)
    with pytest.raises(DataError, match=r"val_size=0.999 \(60 of 60 examples\) is too large"):
        data.load_dataset("fashion_mnist", str(tmp_path), val_size=0.999)
    with pytest.raises(DataError, match="val_size=600 is too large .* fewer than its 60"):
        data.load_dataset("fashion_mnist", str(tmp_path), val_size=600)


def test_fashion_mnist_image_size(tmp_path):
    _write_fashion(tmp_path)
    s = data.load_dataset("fashion_mnist", str(tmp_path), val_size=5, image_size=(16, 12))
    assert s.train[0].shape[1:] == (16, 12, 1) and s.test[0].shape[1:] == (16, 12, 1)
    assert s.info.image_shape == (16, 12, 1)


@pytest.mark.parametrize("how", ["short_payload", "cut_gzip", "bad_magic"])
def test_corrupt_idx_file(tmp_path, how):
    _write_fashion(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    if how == "cut_gzip":
        raw = path.read_bytes()
        path.write_bytes(raw[:len(raw) // 2])
    else:
        payload = gzip.decompress(path.read_bytes())
        payload = payload[:-100] if how == "short_payload" else b"\0\0\x09\x03" + payload[4:]
        path.write_bytes(gzip.compress(payload))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        data.load_dataset("fashion_mnist", str(tmp_path), val_size=5)


def test_fashion_mnist_missing_everywhere(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        data.load_dataset("fashion_mnist")
    with pytest.raises(DataError, match="no Fashion-MNIST files in data_dir"):
        data.load_dataset("fashion_mnist", str(tmp_path))


def test_explicit_data_dir_without_files_is_refused_not_replaced(tmp_path, monkeypatch):
    system = tmp_path / "system"
    system.mkdir()
    _write_fashion(system)
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(system))
    empty = tmp_path / "typo"
    empty.mkdir()
    with pytest.raises(DataError) as e:
        data.load_dataset("fashion_mnist", str(empty), val_size=5)
    message = str(e.value)
    assert str(empty) in message and "\n" not in message
    assert "train-images-idx3-ubyte.gz" in message and "t10k-labels-idx1-ubyte.gz" in message
    # Without data_dir the system copy is read, and the source names its directory
    # and files (dataset.json's `source`, logged by the runner).
    source = data.load_dataset("fashion_mnist", val_size=5).info.source
    assert str(system) in source and "t10k-images-idx3-ubyte.gz" in source


def test_missing_data_dir():
    with pytest.raises(DataError, match="not a directory"):
        data.load_dataset("fashion_mnist", "/nonexistent/bonsai")


# -------------------------------------------------------------------- CIFAR

def _cifar_pickle(obj):
    # Protocol 2 is what the official (python 2) pickles use.
    return pickle.dumps(obj, protocol=2)


def _write_fake_cifar10(path, per_batch=6, n_test=8):
    rng = np.random.default_rng(0)
    members = {}
    truth = []
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        members[f"data_batch_{i}"] = {b"data": x, b"labels": y, b"batch_label": b"b"}
        truth.append(x)
    x = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    members["test_batch"] = {b"data": x, b"labels": list(range(n_test))}
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog",
             b"horse", b"ship", b"truck"]
    members["batches.meta"] = {b"label_names": names, b"num_vis": 3072}
    with tarfile.open(path, "w:gz") as tar:
        for member, obj in members.items():
            raw = _cifar_pickle(obj)
            ti = tarfile.TarInfo(f"cifar-10-batches-py/{member}")
            ti.size = len(raw)
            tar.addfile(ti, io.BytesIO(raw))
    return np.concatenate(truth), x


def test_cifar10_python_archive(tmp_path):
    train_raw, test_raw = _write_fake_cifar10(tmp_path / "cifar-10-python.tar.gz")
    s = data.load_dataset("cifar10", str(tmp_path), val_size=5)
    assert s.train[0].shape == (25, 32, 32, 3) and s.val[0].shape == (5, 32, 32, 3)
    assert s.test[0].shape == (8, 32, 32, 3) and s.test[0].dtype == np.uint8
    assert s.info.class_names[1] == "automobile" and s.info.num_classes == 10
    assert s.info.augment == "crop_flip_cutout" and "archive" in s.info.source
    # Channel-first planes must become channels-last pixels.
    expected = test_raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(s.test[0], expected)
    np.testing.assert_array_equal(s.test[1], np.arange(8))


def test_cifar100_extracted_folder(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for member, n in (("train", 12), ("test", 4)):
        obj = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
               b"fine_labels": [i % 100 for i in range(n)], b"coarse_labels": [0] * n}
        (folder / member).write_bytes(_cifar_pickle(obj))
    (folder / "meta").write_bytes(_cifar_pickle(
        {b"fine_label_names": [f"c{i}".encode() for i in range(100)]}))
    s = data.load_dataset("cifar100", str(tmp_path), val_size=2)
    assert s.info.num_classes == 100 and s.train[0].shape == (10, 32, 32, 3)
    assert "folder" in s.info.source


def test_cifar_archive_rejects_foreign_pickle_and_truncation(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    _write_fake_cifar10(path)
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        data.load_dataset("cifar10", str(tmp_path), val_size=1)

    evil = tmp_path / "evil"
    (evil / "cifar-10-batches-py").mkdir(parents=True)
    (evil / "cifar-10-batches-py" / "data_batch_1").write_bytes(
        pickle.dumps({b"data": os.getcwd}))
    with pytest.raises(DataError, match="refusing"):
        data.load_dataset("cifar10", str(evil), val_size=1)


# ------------------------------------------------------------------- folders

def test_folder_rgb_with_corrupt_file(tmp_path, caplog):
    root = _image_folder(tmp_path / "imgs", classes=("b_dog", "a_cat"), per_class=10)
    (root / "a_cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "b_dog" / "notes.txt").write_text("hello")
    (root / "b_dog" / ".DS_Store").write_bytes(b"\0\0")
    with caplog.at_level(logging.WARNING):
        s = data.load_dataset(f"folder:{root}", val_size=2)
    assert s.info.class_names == ("a_cat", "b_dog")
    assert s.info.skipped_files == 2
    assert "skipped 2" in caplog.text and "broken.png" in caplog.text
    assert s.info.image_shape == (8, 8, 3) and s.info.augment == "crop_flip"
    # 20% of each class (2 of 10) held out as test, stratified.
    assert s.test[0].shape == (4, 8, 8, 3) and sorted(s.test[1]) == [0, 0, 1, 1]
    assert len(s.train[0]) + len(s.val[0]) == 16
    # The test split does not depend on the search seed.
    s2 = data.load_dataset(f"folder:{root}", val_size=2, seed=5)
    np.testing.assert_array_equal(s.test[0], s2.test[0])


def test_folder_grey_and_mixed_channels(tmp_path):
    grey = _image_folder(tmp_path / "grey", mode="L")
    s = data.load_dataset(f"folder:{grey}", val_size=1)
    assert s.info.image_shape == (8, 8, 1) and len(s.info.mean) == 1

    mixed = _image_folder(tmp_path / "mixed", mode="L")
    _png(str(mixed / "cat" / "colour.png"), mode="RGBA", seed=99)
    s = data.load_dataset(f"folder:{mixed}", val_size=1)
    assert s.info.image_shape == (8, 8, 3) and len(s.info.std) == 3
    everything = np.concatenate([s.train[0], s.val[0], s.test[0]])
    grey_like = (everything[..., 0] == everything[..., 1]).all(axis=(1, 2))
    assert grey_like.sum() == 10  # the grey images were replicated across channels


def test_folder_mixed_sizes(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    _png(str(root / "dog" / "big.png"), size=(10, 12))
    with pytest.raises(DataError, match=r"big\.png is 10x12.*image_size"):
        data.load_dataset(f"folder:{root}", val_size=1)
    s = data.load_dataset(f"folder:{root}", val_size=1, image_size=(6, 7))
    assert s.info.image_shape == (6, 7, 3)
    assert s.train[0].shape[1:] == (6, 7, 3) and s.test[0].shape[1:] == (6, 7, 3)


def test_folder_train_test_layout(tmp_path):
    _image_folder(tmp_path / "ds" / "train", per_class=6)
    _image_folder(tmp_path / "ds" / "test", per_class=2)
    s = data.load_dataset(f"folder:{tmp_path / 'ds'}", val_size=2)
    assert len(s.test[0]) == 4 and len(s.train[0]) == 10
    assert s.info.class_names == ("cat", "dog") and "train/" in s.info.source


def test_folder_errors(tmp_path):
    one = _image_folder(tmp_path / "one", classes=("only",))
    with pytest.raises(DataError, match="at least 2 classes, got 1"):
        data.load_dataset(f"folder:{one}", val_size=1)
    with pytest.raises(DataError, match="does not exist"):
        data.load_dataset(f"folder:{tmp_path / 'missing'}", val_size=1)
    junk = tmp_path / "junk"
    for cls in ("a", "b"):
        (junk / cls).mkdir(parents=True)
        (junk / cls / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="no readable images"):
        data.load_dataset(f"folder:{junk}", val_size=1)
    with pytest.raises(DataError, match="val_size=5000"):
        data.load_dataset(f"folder:{_image_folder(tmp_path / 'small')}")


# ---------------------------------------------------------------------- TFDS

def test_tfds_mocked_mnist(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        s = data.load_dataset("mnist", str(tmp_path), val_size=2)
    assert s.train[0].shape == (10, 28, 28, 1) and s.train[0].dtype == np.uint8
    assert s.test[0].shape == (12, 28, 28, 1) and s.test[1].dtype == np.int64
    assert s.info.num_classes == 10 and s.info.augment == "crop"
    assert s.info.class_names == tuple(str(i) for i in range(10))
    assert "TFDS mnist" in s.info.source


def test_tfds_errors(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError, match="unknown dataset 'no_such_dataset_xyz'"):
        data.load_dataset("no_such_dataset_xyz", str(tmp_path))
    with pytest.raises(DataError, match=r"not prepared.*tfds build mnist"):
        data.load_dataset("mnist", str(tmp_path))
    with pytest.raises(DataError, match="image-classification"):
        data.load_dataset("imdb_reviews", str(tmp_path))
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz"):
        data.load_dataset("cifar10", str(tmp_path))


# ------------------------------------------------------------------ pipelines

def _toy(n=20, h=12, w=12, c=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(1, 256, (n, h, w, c), dtype=np.uint8), np.arange(n, dtype=np.int64)


def test_make_dataset_eval_shapes_and_order():
    x, y = _toy(n=10)
    ds = data.make_dataset(x, y, batch_size=4, training=False, augment="crop_flip")
    batches = list(ds)
    assert [int(b[0].shape[0]) for b in batches] == [4, 4, 2]
    bx, by = batches[0]
    assert bx.dtype.name == "float32" and by.dtype.name == "int64"
    np.testing.assert_array_equal(bx.numpy(), x[:4].astype(np.float32))  # no aug, no shuffle
    dropped = data.make_dataset(x, y, batch_size=4, training=False, drop_remainder=True)
    assert len(list(dropped)) == 2


@pytest.mark.parametrize("training", [True, False])
def test_make_dataset_runs_without_autotuning(training):
    # Autotuning's model thread made deleting an epoch's iterator wait for up to 41 s
    # (data.make_dataset); every pipeline the engine iterates must have it off.
    x, y = _toy(n=10)
    ds = data.make_dataset(x, y, batch_size=4, training=training, augment="crop_flip", seed=1)
    assert ds.options().autotune.enabled is False
    assert sum(int(b[0].shape[0]) for b in ds) == 10


def test_make_dataset_shuffle_deterministic():
    x, y = _toy(n=30)
    run1 = _epochs(data.make_dataset(x, y, batch_size=8, training=True, seed=7), 2)
    run2 = _epochs(data.make_dataset(x, y, batch_size=8, training=True, seed=7), 2)
    other = _epochs(data.make_dataset(x, y, batch_size=8, training=True, seed=8), 1)
    for (_, a), (_, b) in zip(run1, run2):
        np.testing.assert_array_equal(a, b)
    assert sorted(run1[0][1]) == list(range(30))
    # one seeded order per dataset (the engine makes one per epoch, seeded by the epoch)
    np.testing.assert_array_equal(run1[0][1], run1[1][1])
    assert not np.array_equal(run1[0][1], other[0][1])
    assert not np.array_equal(run1[0][1], np.arange(30))
    # Without augmentation the pixels are untouched, just reordered.
    np.testing.assert_array_equal(run1[0][0], x[run1[0][1]].astype(np.float32))


@pytest.mark.parametrize("policy", ["crop", "crop_flip", "crop_flip_cutout"])
def test_augmentation_is_a_translation(policy):
    x, y = _toy(n=16, h=16, w=16)
    pad = data.crop_padding(16, 16)
    (ax, ay), = _epochs(data.make_dataset(x, y, batch_size=5, training=True,
                                          augment=policy, seed=3), 1)
    assert ax.shape == x.shape and ax.dtype == np.float32
    assert not np.array_equal(ax, x[ay].astype(np.float32))
    flips = 0
    padded = np.pad(x, [(0, 0), (pad, pad), (pad, pad), (0, 0)]).astype(np.float32)
    for img, label in zip(ax, ay):
        # Every output must be some crop of the padded original (maybe mirrored), up to
        # the cutout hole of zeros.
        keep = img != 0 if policy == "crop_flip_cutout" else np.ones_like(img, bool)
        found = False
        for flip in (False, True):
            src = padded[label][:, ::-1] if flip else padded[label]
            for dy in range(2 * pad + 1):
                for dx in range(2 * pad + 1):
                    crop = src[dy:dy + 16, dx:dx + 16]
                    if np.array_equal(crop[keep], img[keep]):
                        found, flips = True, flips + (flip and policy != "crop")
                        break
                if found:
                    break
            if found:
                break
        assert found, f"{policy}: example {label} is not a crop of its source"
    if policy == "crop":
        assert flips == 0


def test_cutout_makes_holes_and_crop_padding_sizes():
    x, y = _toy(n=64, h=32, w=32)
    (ax, _), = _epochs(data.make_dataset(x, y, batch_size=64, training=True,
                                         augment="crop_flip_cutout", seed=0), 1)
    # Toy pixels are >= 1 and pad-4 crops only zero the outer 4 px, so zeros in the
    # centre come from cutout; a 16x16 hole centred anywhere always reaches the centre.
    with_hole = (ax[:, 4:-4, 4:-4] == 0).any(axis=(1, 2, 3))
    assert 16 < with_hole.sum() < 48  # p = 0.5 of 64
    sides = []
    for img in ax[with_hole]:
        hole = (img[4:-4, 4:-4] == 0).all(axis=-1)
        rows, cols = np.flatnonzero(hole.any(1)), np.flatnonzero(hole.any(0))
        box = hole[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        assert box.all(), "the hole must be one solid rectangle"
        sides += list(box.shape)
    assert max(sides) == 16  # holes are 16x16, clipped only at the borders
    assert data.crop_padding(32, 32) == 4 and data.crop_padding(28, 28) == 2
    assert data.cutout_size(32, 32) == 16


def test_augmentation_deterministic_per_seed_and_epoch():
    x, y = _toy(n=12)

    def run(seed):
        return _epochs(data.make_dataset(x, y, batch_size=4, training=True,
                                         augment="crop_flip_cutout", seed=seed), 2)
    a, b, c = run(11), run(11), run(12)
    for (ax, ay), (bx, by) in zip(a, b):
        np.testing.assert_array_equal(ax, bx)
        np.testing.assert_array_equal(ay, by)
    assert not np.array_equal(a[0][0], c[0][0])
    # Second epoch draws fresh augmentations for the same images.
    order0, order1 = np.argsort(a[0][1]), np.argsort(a[1][1])
    assert not np.array_equal(a[0][0][order0], a[1][0][order1])


def test_make_dataset_validation():
    x, y = _toy(n=4)
    with pytest.raises(DataError, match="unknown augment policy 'mixup'"):
        data.make_dataset(x, y, batch_size=2, training=True, augment="mixup")
    with pytest.raises(DataError, match="batch_size=0"):
        data.make_dataset(x, y, batch_size=0, training=True)
    with pytest.raises(DataError, match="uint8"):
        data.make_dataset(x.astype(np.float32), y, batch_size=2, training=False)
    with pytest.raises(DataError, match="one label per image"):
        data.make_dataset(x, y[:3], batch_size=2, training=False)


def test_representative_images(tmp_path):
    _write_fashion(tmp_path)
    s = data.load_dataset("fashion_mnist", str(tmp_path), val_size=10)
    r = data.representative_images(s, count=20, seed=1)
    assert r.shape == (20, 28, 28, 1) and r.dtype == np.uint8
    np.testing.assert_array_equal(r, data.representative_images(s, count=20, seed=1))
    assert len(data.representative_images(s, count=1000)) == 50
    with pytest.raises(DataError):
        data.representative_images(s, count=0)


def test_unknown_names():
    with pytest.raises(DataError, match="expected fashion_mnist"):
        data.load_dataset("")
    with pytest.raises(DataError, match="image_size"):
        data.load_dataset("fashion_mnist", image_size=(0, 3))
