"""Bad input through the entry scripts: exit status 2, one `error:` line, nothing lost.

Every case checks that the one error line names what was received and what was
expected, that no traceback is printed, and that a run directory given with
--output_dir is left as it was (log.txt may only grow: a failed attempt is logged).

Flags, the configuration, --genotype files and the run directory are checked before
TensorFlow is imported, so most cases take a fraction of a second; the ones that
need the data or a real checkpoint are marked slow.

Unreadable files in a folder dataset are not an error: they are skipped, counted
(dataset.json `skipped_files`, a warning and the dataset line of log.txt) and the
run proceeds.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from bonsai_tf import config as C
from bonsai_tf import genotype as G
from bonsai_tf import run_dir as rd
from helpers import make_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEARCH = os.path.join(ROOT, "train", "search.py")
TRAIN = os.path.join(ROOT, "train", "train.py")

# A tiny search (as in test_resume.py, without growth).
BASE = dict(space="small", scale=4, nodes=1, patterns='[["n"],["r"]]', max_patterns=2, epochs=5,
            search_epochs=4, batch_size=16, val_size=20, prune_interval=1, cycle_len=1,
            lambda_edge=2, lambda_input=2, gate_lr=0.02, lr_max=0.05, drop_path=0.1,
            memory_budget_mb=0, seed=3)
SWITCHES = ["--deterministic", "--noexport", "--verbose=0", "--nomeasure_memory"]


def flags(data, out, **over):
    f = dict(BASE, dataset=f"folder:{data}", output_dir=out)
    f.update(over)
    return [f"--{k}={v}" for k, v in f.items()] + SWITCHES


def config_for(data):
    """The RunConfig that flags(data, ...) gives (what the CLI writes as config.json)."""
    kw = dict(BASE, patterns=json.loads(BASE["patterns"]))
    return C.RunConfig(dataset=f"folder:{data}", deterministic=True, measure_memory=False, **kw)


def run(script, args, fault=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop(rd.FAULT_ENV, None)
    if fault:
        env[rd.FAULT_ENV] = fault
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def assert_error(proc, *fragments, says_expected=True):
    """Exit 2, no traceback, one error line with every fragment (and "expected")."""
    where = f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 2, where
    assert "Traceback" not in proc.stderr, where
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, where
    if says_expected:
        assert "expected" in lines[0], lines[0]
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def snapshot(run_dir):
    """{relative path: sha256} of every file; log.txt by its content (it may grow)."""
    out = {}
    for dirpath, _, files in os.walk(run_dir):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                blob = f.read()
            rel = os.path.relpath(path, run_dir)
            out[rel] = blob if rel == "log.txt" else hashlib.sha256(blob).hexdigest()
    return out


def assert_intact(run_dir, before):
    after = snapshot(run_dir)
    log_before, log_after = before.get("log.txt"), after.pop("log.txt", None)
    assert log_after is None or log_after.startswith(log_before or b"")
    assert after == {k: v for k, v in before.items() if k != "log.txt"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture
def fake_run(data, tmp_path):
    """A run directory of flags(data, ...) (config.json exactly as the CLI writes it)."""
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    rd.write_json(str(out / "config.json"), config_for(data).to_dict())
    g = G.initial("small", (12, 12, 1), 3, 4, 1, [["n"], ["r"]], 1)
    (out / "genotype.json").write_text(g.to_json())
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (out / "log.txt").write_text("12:00:00 epoch 1/5\n")
    (out / "checkpoint" / "state.json").write_text('{"epoch": 1, "version": 1}\n')
    np.savez(str(out / "checkpoint" / "weights.npz"), w=np.ones(3))
    return str(out)


# ---- flags: out of range, wrong type, unknown ------------------------------------------
# One case per numeric RunConfig field at least; the fragments name what was received.
FLAG_CASES = [
    (["--scale=0"], ["scale = 0", ">= 1"]),
    (["--nodes=0"], ["nodes = 0", "[1, 16]"]),
    (["--nodes=17"], ["nodes = 17", "[1, 16]"]),
    (["--stem_stride=3"], ["stem_stride = 3", "1 or 2"]),
    (["--max_patterns=-1"], ["max_patterns = -1", ">= 0"]),
    (["--reduction_target=0"], ["reduction_target = 0", ">= 1"]),
    (["--init_weight=0"], ["init_weight = 0.0", "> 0"]),
    (["--epochs=0"], ["epochs = 0", ">= 1"]),
    (["--search_epochs=6"], ["search_epochs = 6", "[0, epochs=5]"]),
    (["--search_epochs=-1"], ["search_epochs = -1", "[0, epochs=5]"]),
    (["--batch_size=0"], ["batch_size = 0", ">= 1"]),
    (["--lr_max=0"], ["lr_max = 0.0", "> 0"]),
    (["--lr_max=-1"], ["lr_max = -1.0", "> 0"]),
    (["--lr_min=1"], ["lr_min = 1.0", "[0, lr_max=0.05]"]),
    (["--gate_lr=-0.1"], ["gate_lr = -0.1", ">= 0"]),
    (["--momentum=1"], ["momentum = 1.0", "[0, 1)"]),
    (["--momentum=-0.5"], ["momentum = -0.5", "[0, 1)"]),
    (["--weight_decay=-1"], ["weight_decay = -1.0", ">= 0"]),
    (["--drop_path=1"], ["drop_path = 1.0", "[0, 1)"]),
    (["--aux_weight=-1"], ["aux_weight = -1.0", ">= 0"]),
    (["--label_smoothing=1"], ["label_smoothing = 1.0", "[0, 1)"]),
    (["--lambda_edge=-1"], ["lambda_edge = -1.0", ">= 0"]),
    (["--lambda_input=-2"], ["lambda_input = -2.0", ">= 0"]),
    (["--prune_interval=0"], ["prune_interval = 0", ">= 1"]),
    (["--cycle_len=0"], ["cycle_len = 0", ">= 1"]),
    (["--settle_epochs=-1"], ["settle_epochs = -1", ">= 0"]),
    (["--final_probe_steps=-1"], ["final_probe_steps = -1", ">= 0"]),
    (["--final_with_val", "--val_size=0"], ["final_with_val = True", "with val_size=0"]),
    (["--memory_budget_mb=-1"], ["memory_budget_mb = -1.0", ">= 0"]),
    (["--arch_lr=0"], ["arch_lr = 0.0", "> 0"]),
    (["--asap_tau0=0"], ["asap_tau0 = 0.0", "> 0"]),
    (["--asap_beta=1.5"], ["asap_beta = 1.5", "in (0, 1]"]),
    (["--asap_threshold=1"], ["asap_threshold = 1.0", "in [0, 1)"]),
    (["--bayes_lambda_edge=0"], ["bayes_lambda_edge = 0.0", "> 0"]),
    (["--bayes_lambda_op=-1"], ["bayes_lambda_op = -1.0", "> 0"]),
    (["--bayes_threshold=-0.5"], ["bayes_threshold = -0.5", ">= 0"]),
    (["--bayes_hessian_batches=0"], ["bayes_hessian_batches = 0", ">= 1"]),
    (["--bayes_warmup_epochs=-1"], ["bayes_warmup_epochs = -1", ">= 0"]),
    (["--proxyless_warmup_epochs=-1"], ["proxyless_warmup_epochs = -1", ">= 0"]),
    (["--proxyless_grad=darts"], ["--proxyless_grad=darts", "binaryconnect|reinforce"]),
    (["--latency_target_ms=-2"], ["latency_target_ms = -2.0", ">= 0"]),
    (["--latency_weight=-1"], ["latency_weight = -1.0", ">= 0"]),
    (["--latency_select=fastest"], ["--latency_select=fastest", "measured|table|argmax"]),
    (["--devices=-1"], ["devices = -1", ">= 0"]),
    (["--distribute=ring"], ["--distribute=ring", "none|mirrored|multi_worker"]),
    (["--strategy=proxyless", "--val_size=0"], ["val_size = 0", "with strategy=proxyless"]),
    (["--reductions=-1"], ["reductions = -1", "[0, 8]"]),
    (["--reductions=9"], ["reductions = 9", "[0, 8]"]),
    (["--round_epochs=0"], ["round_epochs = 0", ">= 1"]),
    (["--spider_rounds=0"], ["spider_rounds = 0", ">= 1"]),
    (["--spider_deadhead=1"], ["spider_deadhead = 1.0", "in [0, 1)"]),
    (["--spider_candidates=-1"], ["spider_candidates = -1", ">= 0"]),
    (["--spider_ntk_batch=1"], ["spider_ntk_batch = 1", ">= 2"]),
    (["--spider_regions_batch=0"], ["spider_regions_batch = 0", ">= 1"]),
    (["--time_budget_minutes=-5"], ["time_budget_minutes = -5.0", ">= 0"]),
    (["--search_fraction=1"], ["search_fraction = 1.0", "in (0, 1)"]),
    (["--strategy=asap", "--val_size=0"], ["val_size = 0", "with strategy=asap"]),
    (["--threads=two"], ["--threads='two'", "auto or INTER,INTRA"]),
    (["--val_size=-1"], ["val_size = -1", ">= 0"]),
    (["--val_size=1.5"], ["val_size = 1.5", "a fraction in (0, 1)"]),
    (["--val_size=-0.1"], ["val_size = -0.1", "a count >= 0"]),
    (["--val_size=inf"], ["val_size = inf", "a fraction in (0, 1)"]),
    (["--train_subset=-1"], ["train_subset = -1", ">= 0"]),
    (["--final_subset=-1"], ["final_subset = -1", ">= 0"]),
    (["--steps_per_epoch=-1"], ["steps_per_epoch = -1", ">= 0"]),
    (["--seed=-1"], ["seed = -1", ">= 0"]),
    (["--image_size=0,12"], ["image_size = (0, 12)", "(height, width) of positive ints"]),
    (["--image_size=12"], ["image_size = (12,)", "(height, width)"]),
    (["--image_size=a,b"], ["--image_size='a,b'", "H,W"]),
    (["--space=huge"], ["space = 'huge'", "one of"]),
    (["--augment=rotate"], ["augment = 'rotate'", "crop_flip"]),
    (['--patterns=[["r"]]'], ["first cell must be normal ('n')", "got 'r'"]),
    (['--patterns=[["n","x"]]'], ["unknown cell code 'x'", "'n', 'na', 'r' or 'ra'"]),
    (["--patterns=notjson"], ["--patterns='notjson'", "not JSON"]),
    # wrong type
    (["--scale=abc"], ["--scale=abc", "an integer"]),
    (["--epochs=1.5"], ["--epochs=1.5", "an integer"]),
    (["--seed="], ["--seed=", "an integer"]),
    (["--lr_max=fast"], ["--lr_max=fast", "a number"]),
    (["--val_size=tenth"], ["--val_size='tenth'", "not a number", "(e.g. 0.1)"]),
    (["--verbose=3"], ["--verbose=3", "0, 1 or 2"]),
    (["--memory_budget_mb=lots"], ["--memory_budget_mb=lots", "a number"]),
    (["--deterministic=maybe"], ["--deterministic=maybe", "true or false"]),
    (["--strategy=greedy"], ["--strategy=greedy", "bonsai|asap|bayes|proxyless|spider|random|fixed"]),
    (["--graph_optimizer=maybe"], ["--graph_optimizer=maybe", "auto|on|off"]),
    (["--mixed_precision=fp8"], ["--mixed_precision=fp8", "none|mixed_float16|mixed_bfloat16"]),
    # not flags of ours
    (["--scael=3"], ["scael", "Did you mean: scale"]),
    (["extra"], ["unexpected arguments ['extra']", "only --flags"]),
]


# Messages (absl's, genotype.py's) that name the expectation in other words, which
# the fragments of these cases check: "Did you mean", "must be", "should be one of".
OTHER_WORDS = {"--scael=3", '--patterns=[["r"]]', "--strategy=greedy", "--proxyless_grad=darts",
               "--latency_select=fastest", "--distribute=ring",
               "--graph_optimizer=maybe", "--mixed_precision=fp8"}


def _case_id(case):
    return " ".join(case[0])[:40]


@pytest.mark.parametrize("args, fragments", FLAG_CASES, ids=[_case_id(c) for c in FLAG_CASES])
def test_bad_flag(data, fake_run, args, fragments):
    before = snapshot(fake_run)
    proc = run(SEARCH, flags(data, fake_run) + args)
    assert_error(proc, *fragments, says_expected=args[0] not in OTHER_WORDS)
    assert_intact(fake_run, before)


def test_every_numeric_field_has_a_range_case():
    numeric = {f for f, v in C.RunConfig().to_dict().items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    covered = {a[2:].split("=")[0] for args, _ in FLAG_CASES for a in args if a.startswith("--")}
    assert numeric - covered == set()
    assert "image_size" in covered


def test_val_size_is_a_count_or_a_fraction():
    assert C.RunConfig(val_size=0.1).val_size == 0.1
    assert C.RunConfig(val_size=5000).val_size == 5000
    whole = C.RunConfig(val_size=5000.0).val_size  # as a float flag or JSON gives it
    assert whole == 5000 and isinstance(whole, int)
    assert C.RunConfig(val_size=0.0).val_size == 0
    assert C.RunConfig.from_dict(C.RunConfig(val_size=0.1).to_dict()).val_size == 0.1
    for bad in (1.5, 1.0 + 1e-9, -1, -0.5, float("nan"), float("inf"), "0.1", True, None):
        with pytest.raises(C.ConfigError, match="val_size = .*expected a count >= 0 .* or a "
                                                "fraction in \\(0, 1\\)"):
            C.RunConfig(val_size=bad)


def test_search_epochs_are_ignored_without_a_search():
    # The quick flagfile's search_epochs=5 with a retraining's shorter --epochs=2.
    for strategy in ("fixed", "random"):
        cfg = C.RunConfig(strategy=strategy, genotype="g.json", epochs=2, search_epochs=5)
        assert cfg.search_epochs == 0 and cfg.resolved_search_epochs == 0
    with pytest.raises(C.ConfigError, match="search_epochs = 5; expected in \\[0, epochs=2\\]"):
        C.RunConfig(strategy="bonsai", epochs=2, search_epochs=5)


def test_augment_policies_agree_with_the_data_module():
    from bonsai_tf import data as data_lib  # imports TensorFlow
    assert C.AUGMENT == ("",) + tuple(data_lib.AUGMENT_POLICIES)


# ---- genotype files (train.py --genotype) ----------------------------------------------
def _genotype_dict():
    return G.initial("small", (12, 12, 1), 3, 4, 1, [["n"], ["r"]], 1).to_dict()


def _unknown_op(d):
    d["cells"][0]["edges"][0]["ops"]["conv_9x9"] = 0.1


def _unknown_field(d):
    d["comment"] = "hand-edited"


def _wrong_version(d):
    d["version"] = 2


def _missing_node(d):
    d["cells"][0]["edges"][0]["to"] = 5


GENOTYPE_CASES = {
    "unknown operation": (_unknown_op, ["g.json", "unknown operation 'conv_9x9'",
                                        "expected one of"]),
    "unknown field": (_unknown_field, ["g.json", "unknown field(s) ['comment']"]),
    "wrong version": (_wrong_version, ["g.json", "genotype version 2 is not supported",
                                       "expected 1"]),
    "edge to a missing node": (_missing_node, ["g.json", "edge 'x'->5",
                                               "is not in a cell of 1 nodes"]),
    "truncated": (None, ["g.json", "not valid JSON", "expected a bonsai-tf/genotype document"]),
    "missing file": (None, ["g.json", "cannot read genotype", "No such file"]),
}


@pytest.mark.parametrize("case", list(GENOTYPE_CASES))
def test_bad_genotype(data, fake_run, tmp_path, case):
    edit, fragments = GENOTYPE_CASES[case]
    path = tmp_path / "g.json"
    d = _genotype_dict()
    if edit is not None:
        edit(d)
        path.write_text(json.dumps(d, indent=1))
    elif case == "truncated":
        text = G.Genotype.from_dict(d).to_json()
        path.write_text(text[:len(text) // 2])
    before = snapshot(fake_run)
    proc = run(TRAIN, flags(data, fake_run) + [f"--genotype={path}"])
    # genotype.py says "is not in a cell of 1 nodes" and names the OS error for these two
    assert_error(proc, *fragments, says_expected=case not in ("edge to a missing node",
                                                              "missing file"))
    assert_intact(fake_run, before)
    assert G.Genotype.from_dict(_genotype_dict())  # the unedited one is valid


# ---- run directories -------------------------------------------------------------------
def test_run_directory_of_another_configuration_is_refused(data, fake_run):
    before = snapshot(fake_run)
    proc = run(SEARCH, flags(data, fake_run, seed=4))
    assert_error(proc, "different configuration", "differs in: seed", "--overwrite")
    assert_intact(fake_run, before)


def test_corrupt_config_json_is_refused(data, fake_run):
    with open(os.path.join(fake_run, "config.json"), "w") as f:
        f.write('{"dataset": ')
    before = snapshot(fake_run)
    proc = run(SEARCH, flags(data, fake_run))
    assert_error(proc, "config.json is unreadable or corrupt", "--overwrite")
    assert_intact(fake_run, before)


def test_output_dir_under_a_regular_file(data, tmp_path):
    blocker = tmp_path / "somefile"
    blocker.write_text("not a directory")
    proc = run(SEARCH, flags(data, str(blocker / "run")))
    assert_error(proc, f"cannot create --output_dir={blocker / 'run'}", "Not a directory")
    proc = run(SEARCH, flags(data, str(blocker)))
    assert_error(proc, f"cannot create --output_dir={blocker}", "File exists")
    assert blocker.read_text() == "not a directory"


def test_output_dir_that_is_not_a_run_directory(data, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    before = snapshot(str(tmp_path))
    proc = run(SEARCH, flags(data, str(tmp_path)))
    assert_error(proc, "not a bonsai-tf run directory", "new or empty directory")
    assert_intact(str(tmp_path), before)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 500 directory anyway; "
                    "test_output_dir_under_a_regular_file covers an output dir that cannot be made")
def test_unwritable_output_dir(data, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        proc = run(SEARCH, flags(data, str(locked)))
        assert_error(proc, "not writable", str(locked))
        proc = run(SEARCH, flags(data, str(locked / "run")))
        assert_error(proc, "cannot create --output_dir", "Permission denied")
    finally:
        locked.chmod(0o700)


# ---- checkpoints and data (TensorFlow) -------------------------------------------------
@pytest.fixture(scope="module")
def epoch1_run(data, tmp_path_factory):
    """A real run directory killed in epoch 2: its checkpoint holds epoch 1."""
    out = str(tmp_path_factory.mktemp("epoch1") / "run")
    proc = run(SEARCH, flags(data, out), fault="mid_epoch:2")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert rd.read_json(os.path.join(out, "checkpoint", "state.json"))["epoch"] == 1
    return out


def _truncate_weights(path):
    with open(os.path.join(path, "weights.npz"), "r+b") as f:
        f.truncate(os.path.getsize(f.name) // 2)


def _garble_state(path):
    with open(os.path.join(path, "state.json"), "r+b") as f:
        f.seek(10)
        f.write(b"\x00garbage\xff")


def _edit_state(**changes):
    def edit(path):
        state = rd.read_json(os.path.join(path, "state.json"))
        state.update(changes)
        rd.write_json(os.path.join(path, "state.json"), state)
    return edit


CHECKPOINT_CASES = {
    "truncated weights.npz": (_truncate_weights, ["is corrupt", "File is not a zip file"]),
    "garbled state.json": (_garble_state, ["is corrupt", "state.json"]),
    "state.json with an unknown field": (_edit_state(bogus=1), [
        "malformed state.json", "bogus"]),
    "state.json of another version": (_edit_state(version=99), [
        "checkpoint state version 99", "expected 2"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_corrupt_checkpoint_is_reported_and_kept(data, epoch1_run, tmp_path, case):
    edit, fragments = CHECKPOINT_CASES[case]
    out = str(tmp_path / "run")
    shutil.copytree(epoch1_run, out)
    edit(os.path.join(out, "checkpoint"))
    before = snapshot(out)
    proc = run(SEARCH, flags(data, out))  # the same command: it would resume
    line = assert_error(proc, *fragments)
    assert "--overwrite" in line and ("remove" in line or "resume it with" in line), line
    assert_intact(out, before)


@pytest.mark.slow
def test_images_of_mixed_sizes_are_refused_until_resized(data, tmp_path):
    from PIL import Image
    mixed = tmp_path / "mixed"
    shutil.copytree(data, mixed)
    Image.fromarray(np.zeros((14, 14), np.uint8)).save(mixed / "c1" / "odd.png")
    out = tmp_path / "run"
    proc = run(SEARCH, flags(mixed, str(out)))
    # data.py's message names both sizes and the remedy (image_size), not "expected"
    assert_error(proc, "images differ in size", "12x12", "14x14", "odd.png", "image_size",
                 says_expected=False)
    # Nothing was claimed, so the corrected command (other flags) is not refused.
    assert not out.exists() or os.listdir(out) == []
    proc = run(SEARCH, flags(mixed, str(out), image_size="12,12"), fault="mid_epoch:1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert rd.read_json(str(out / "config.json"))["image_size"] == [12, 12]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mistyped dataset", "val_size larger than the data",
                                  "genotype of other images", "data_dir without the files"])
def test_bad_input_creates_no_output_dir(data, tmp_path, case):
    out = tmp_path / "new" / "run"
    genotype = tmp_path / "g.json"
    genotype.write_text(G.initial("small", (28, 28, 1), 10, 4, 1, [["n"], ["r"]], 1).to_json())
    empty = tmp_path / "empty"
    empty.mkdir()
    script, over, fragments = {
        "mistyped dataset": (SEARCH, dict(dataset="fashon_mnist"), ["'fashon_mnist'"]),
        # 96 training images once the folder's test split is held out
        "val_size larger than the data": (SEARCH, dict(val_size=500), [
            "val_size=500 is too large", "fewer than its 96 training examples"]),
        "genotype of other images": (TRAIN, dict(genotype=genotype), [
            "g.json", "(28, 28, 1) with 10 classes", "(12, 12, 1) with 3 classes"]),
        "data_dir without the files": (SEARCH, dict(dataset="fashion_mnist", data_dir=empty), [
            f"no Fashion-MNIST files in data_dir {empty}", "train-images-idx3-ubyte.gz"]),
    }[case]
    proc = run(script, flags(data, str(out), **over))
    assert_error(proc, *fragments)
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_dataset_with_one_class_is_refused(data, tmp_path):
    one = tmp_path / "one"
    shutil.copytree(os.path.join(data, "c0"), one / "c0")
    proc = run(SEARCH, flags(one, str(tmp_path / "run")))
    assert_error(proc, "at least 2 classes", "got 1", says_expected=False)


@pytest.mark.slow
def test_batch_larger_than_the_training_set_is_refused(data, tmp_path):
    # 120 images: 24 held out for test, --val_size=20: 76 left for training
    proc = run(SEARCH, flags(data, str(tmp_path / "run"), batch_size=100))
    assert_error(proc, "--batch_size=100", "76 training examples", "at most 76")


@pytest.mark.slow
def test_unreadable_files_are_skipped_and_counted(tmp_path):
    """Broken files are skipped with a warning; here also a constant (blue) channel."""
    folder = make_folder(tmp_path / "data", rgb=True)
    with open(os.path.join(folder, "c1", "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really")
    open(os.path.join(folder, "c2", "empty.jpg"), "wb").close()
    out = str(tmp_path / "run")
    proc = run(SEARCH, flags(folder, out, epochs=1, search_epochs=1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "skipped 2 unreadable" in proc.stderr
    info = rd.read_json(os.path.join(out, "dataset.json"))
    assert info["skipped_files"] == 2 and info["image_shape"] == [12, 12, 3]
    assert info["std"][2] == 0.0  # the constant channel does not stop the run
    with open(os.path.join(out, "log.txt")) as f:
        assert "2 unreadable file(s) skipped" in f.read()
    metrics = rd.read_json(os.path.join(out, "metrics.json"))
    assert np.isfinite(metrics["test_loss"])
