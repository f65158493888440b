"""Every branch that depends on the machine, with both sides forced (issue 7).

CPU features, core counts, oneDNN's default, /proc availability and a full or
read-only disk differ between machines of the same kind; CI runs on one of them.
Here each answer is forced by monkeypatching, so both sides run wherever the suite
does. (Allocator statistics and GPU presence: tests/test_memory.py.)
"""

import errno
import os
import subprocess
import sys

import numpy as np
import pytest

from bonsai_tf import machine
from bonsai_tf import run_dir as rd

INTEL_AVX512 = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512vl avx512_vnni
"""
AMD_AVX2 = """processor\t: 0
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma
"""


@pytest.mark.parametrize("text, model, avx512", [(INTEL_AVX512, "Intel(R) Xeon(R) Platinum 8375C "
                                                  "CPU @ 2.90GHz", True),
                                                 (AMD_AVX2, "AMD EPYC 7B13", False)])
def test_cpu_model_and_features_from_cpuinfo(monkeypatch, text, model, avx512):
    monkeypatch.setattr(machine, "_cpuinfo", lambda: text)
    assert machine.cpu_model() == model
    assert "avx2" in machine.cpu_flags()
    ident = machine.identity()
    assert ident["avx2"] is True and ident["avx512"] is avx512 and ident["cpu"] == model


def test_without_proc_cpuinfo_the_identity_still_forms(monkeypatch):
    monkeypatch.setattr(machine, "_cpuinfo", lambda: "")
    assert machine.cpu_flags() == frozenset()
    assert machine.cpu_model()  # platform's answer, or "unknown"
    ident = machine.identity()
    assert ident["avx2"] is False and ident["avx512"] is False


@pytest.mark.parametrize("cpus, plan", [(1, (1, 1)), (2, (2, 1)), (4, (4, 1)), (8, (0, 0)),
                                        (64, (0, 0))])
def test_thread_plan_by_core_count(cpus, plan):
    assert machine.thread_plan(cpus) == plan


def test_usable_cpus_follows_the_affinity_mask_or_falls_back(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert machine.usable_cpus() == 3
    assert machine.thread_plan() == (3, 1)
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # not Linux
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert machine.usable_cpus() == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert machine.usable_cpus() == 1


ONEDNN = """
import os, sys
sys.path.insert(0, sys.argv[1])
import bonsai_tf  # applies machine.use_onednn_by_default()
print(os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset"))
"""


@pytest.mark.parametrize("given, effective", [(None, "1"), ("0", "0"), ("1", "1")])
def test_onednn_is_on_unless_the_user_chose(given, effective):
    env = dict(os.environ)
    env.pop(machine.ONEDNN_ENV, None)
    if given is not None:
        env[machine.ONEDNN_ENV] = given
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", ONEDNN, root], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == effective


def test_onednn_default_is_not_applied_once_tensorflow_is_loaded(monkeypatch):
    monkeypatch.delenv(machine.ONEDNN_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "tensorflow", object())
    assert machine.use_onednn_by_default() is False
    assert machine.ONEDNN_ENV not in os.environ
    monkeypatch.delitem(sys.modules, "tensorflow")
    assert machine.use_onednn_by_default() is True and os.environ[machine.ONEDNN_ENV] == "1"


def _refusing_disk(monkeypatch, code, only=""):
    """Writes of files whose name contains `only` fail as a full/read-only disk would."""
    import tempfile
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if only in kwargs.get("prefix", ""):
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_disk_that_refuses_the_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch, code):
    """Full, read-only or forbidden, forced whatever the real disk (and as root)."""
    run = str(tmp_path)
    rd.save_checkpoint(run, {"w": np.arange(3.0)}, {"epoch": 1})
    _refusing_disk(monkeypatch, code, only="weights.npz")
    with pytest.raises(rd.RunDirError, match="cannot write") as e:
        rd.save_checkpoint(run, {"w": np.arange(4.0)}, {"epoch": 2})
    assert os.strerror(code) in str(e.value) and "\n" not in str(e.value)
    arrays, state = rd.load_checkpoint(run)
    assert state["epoch"] == 1 and arrays["w"].tolist() == [0.0, 1.0, 2.0]


def test_a_disk_that_refuses_a_record_gives_one_line_and_keeps_the_file(tmp_path, monkeypatch):
    path = str(tmp_path / "metrics.json")
    rd.write_json(path, {"a": 1})
    _refusing_disk(monkeypatch, errno.ENOSPC)
    with pytest.raises(rd.RunDirError, match="free space"):
        rd.write_json(path, {"a": 2})
    assert rd.read_json(path) == {"a": 1}
    assert [f for f in os.listdir(tmp_path)] == ["metrics.json"]


@pytest.mark.parametrize("choice, has_gpu, on", [("auto", False, False), ("auto", True, True),
                                                 ("on", False, True), ("off", True, False)])
def test_graph_optimizer_choice_with_and_without_a_gpu(monkeypatch, choice, has_gpu, on):
    import tensorflow as tf
    assert machine.graph_optimizer_on(choice, has_gpu) is on
    # What the process is told, with the GPU question forced either way.
    monkeypatch.setattr(machine, "gpus", lambda: ["/physical_device:GPU:0"] if has_gpu else [])
    before = tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)
    try:
        assert machine.configure_graph_optimizer(choice) is on
        assert tf.config.optimizer.get_experimental_options()["disable_meta_optimizer"] is (not on)
    finally:
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": before})


def test_graph_optimizer_choice_is_checked():
    with pytest.raises(ValueError, match="'sometimes'.*auto, on, off"):
        machine.graph_optimizer_on("sometimes", False)
