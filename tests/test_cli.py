"""The entry scripts: bad input gives one line on stderr, exit status 2, nothing lost."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEARCH = os.path.join(ROOT, "train", "search.py")
TRAIN = os.path.join(ROOT, "train", "train.py")


def run(script, *args, cwd=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=300)


def assert_usage_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.parametrize("args, fragments", [
    (["--dataset=not_a_dataset"], ["not_a_dataset"]),
    (["--dataset=folder:/no/such/folder"], ["/no/such/folder"]),
    (["--patterns=[[\"n\"],"], ["--patterns", "expected"]),
    (["--patterns=[[\"q\"]]"], ["unknown cell code 'q'"]),
    (["--flagfile=/no/such.flags"], ["/no/such.flags"]),
    (["--scale=0"], ["scale = 0", "expected >= 1"]),
    (["--batch_size=many"], ["batch_size"]),
    (["--drop_path=1.5"], ["drop_path = 1.5", "[0, 1)"]),
    (["--strategy=fixed"], ["genotype"]),
    (["--memory_budget_mb=0.5", "--dataset=fashion_mnist", "--val_size=100"],
     ["too small for one pattern", "0.5"]),
    (["--fashion_mnist"], ["fashion_mnist"]),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, fragments):
    out = tmp_path / "run"
    proc = run(SEARCH, f"--output_dir={out}", "--verbose=0", *args)
    assert_usage_error(proc, *fragments)


def test_missing_data_files_are_named(tmp_path):
    proc = run(SEARCH, f"--output_dir={tmp_path / 'run'}", f"--data_dir={tmp_path}",
               "--dataset=cifar10")
    assert_usage_error(proc, str(tmp_path))


def test_foreign_run_directory_is_refused_and_kept(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    config = {"dataset": "fashion_mnist", "scale": 99}
    (out / "config.json").write_text(json.dumps(config))
    (out / "genotype.json").write_text("{}")
    proc = run(SEARCH, f"--output_dir={out}", "--scale=8")
    assert_usage_error(proc, "different configuration", "--overwrite")
    assert json.loads((out / "config.json").read_text()) == config
    assert (out / "genotype.json").read_text() == "{}"


def test_non_run_directory_is_refused(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    proc = run(SEARCH, f"--output_dir={tmp_path}")
    assert_usage_error(proc, "not a bonsai-tf run directory")
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_bad_genotype_for_train(tmp_path):
    g = tmp_path / "g.json"
    g.write_text('{"format": "bonsai-tf/genotype", "version": 1')
    proc = run(TRAIN, f"--genotype={g}", f"--output_dir={tmp_path / 'run'}")
    assert_usage_error(proc, "g.json", "not valid JSON")
