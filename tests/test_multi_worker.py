"""--distribute=multi_worker: two local worker processes (TF_CONFIG on 127.0.0.1 ports)
run a tiny search to what one process mirrored over 2 devices finds (both split each
global batch in halves, each half batch-normalised by itself: tests/test_distribute.py);
only the chief writes the run directory; a worker killed mid-epoch ends the run with the
last checkpoint intact, and the same two commands resume it to the same result."""

import os
import subprocess
import sys

import pytest

from bonsai_tf import distribute
from bonsai_tf import genotype as G
from bonsai_tf import run_dir as rd
from test_resume import ROOT, SEARCH, data, records, run, search_flags, tail  # noqa: F401

pytestmark = pytest.mark.slow


def _flags(data, out, **over):
    # no drop path: a worker draws masks for its half of the batch only
    return search_flags(data, out, drop_path=0.0, **over)


def _cluster(args, faults=(None, None), timeout_s="30"):
    """Runs `args` as both workers of a 2-worker cluster; returns both processes."""
    tf_configs = distribute.local_tf_configs(2)
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_CONFIG=tf_configs[index])
        env[distribute.TIMEOUT_ENV] = timeout_s
        env.pop(rd.FAULT_ENV, None)
        if faults[index]:
            env[rd.FAULT_ENV] = faults[index]
        procs.append(subprocess.Popen([sys.executable, SEARCH, "--distribute=multi_worker"]
                                      + list(args), cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One process mirrored over 2 logical devices, uninterrupted."""
    out = str(tmp_path_factory.mktemp("reference") / "run")
    proc = run(["--distribute=mirrored", "--devices=2"] + _flags(data, out))
    assert proc.returncode == 0, tail(proc)
    return out


def test_two_workers_compute_what_one_process_mirrored_does_and_survive_a_kill(
        data, reference, tmp_path):
    out = str(tmp_path / "run")
    # Worker 1 is killed in epoch 3, after the first deadhead and growth (a rebuild on
    # both workers from the chief's decision).
    chief, worker = _cluster(_flags(data, out), faults=(None, "mid_epoch:3"), timeout_s="20")
    assert worker.returncode == -9, tail(worker)
    # The chief's collectives fail instead of hanging; its run directory keeps epoch 2.
    assert chief.returncode != 0, tail(chief)
    assert rd.read_json(os.path.join(out, "checkpoint", "state.json"))["epoch"] == 2
    assert [r["epoch"] for r in records(out)] == [1, 2]
    assert not os.path.exists(os.path.join(out, "metrics.json"))
    # The same two commands resume it from there to the end.
    chief, worker = _cluster(_flags(data, out))
    assert chief.returncode == 0, tail(chief)
    assert worker.returncode == 0, tail(worker)
    assert "training in" in worker.stderr   # a scratch directory of its own
    got, want = records(out), records(reference)
    assert [r["epoch"] for r in got] == [1, 2, 3, 4, 5]
    assert [r["events"] for r in got] == [r["events"] for r in want]
    assert [r["val_accuracy"] for r in got] == pytest.approx([r["val_accuracy"] for r in want],
                                                             abs=1e-5)
    assert G.Genotype.load(os.path.join(out, "genotype.json")).hash() == \
        G.Genotype.load(os.path.join(reference, "genotype.json")).hash()
    assert os.path.exists(os.path.join(out, "metrics.json"))
