"""A search survives crashes: killed anywhere, the same command resumes it to the same result.

A tiny search runs through train/search.py in subprocesses on generated PNGs (3
classes of 12x12 grey images). BONSAI_TF_FAULT (run_dir.fault_point) SIGKILLs the
process at a named moment. One run directory is killed at every fault point in
turn (each kill resumes the previous one, so the run also survives repeated
crashes), then finished; its metrics and genotype must equal those of an
uninterrupted run exactly (CPU, --deterministic).

The configuration is chosen so that every fault point is reached after a checkpoint
exists: epoch 1 prunes and grows nothing; epoch 2 deadheads and grows; epoch 4 ends
the search; epoch 5 is final training.
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

from bonsai_tf import genotype as G
from bonsai_tf import memory as M
from bonsai_tf import run_dir as rd
from helpers import make_folder

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEARCH = os.path.join(ROOT, "train", "search.py")
KILLED = -signal.SIGKILL
# What differs between two runs of the same computation.
TIMING = {"seconds", "epoch_seconds", "memory_measured_mb", "search_seconds", "total_seconds",
          "step_seconds", "first_step_seconds", "wall_seconds", "val_seconds",
          "bayes_update_seconds", "retrace_seconds", "restructure_seconds", "restructure_share",
          "restructure_seconds_per_change",
          "trainfree_seconds_per_candidate"}


def budget_for_growth(batch=16):
    """A budget that holds one pattern and 60% of a second one: the search grows once."""
    g = G.initial("small", (12, 12, 1), 3, 4, 1, [["n"], ["r"]], 1)
    one, two = M.estimate(g, batch)["mb"], M.estimate(G.grow(g), batch)["mb"]
    return round(one + 0.6 * (two - one), 3)


def search_flags(data, out, **over):
    f = dict(dataset=f"folder:{data}", space="small", scale=4, nodes=1,
             patterns='[["n"],["r"]]', max_patterns=2, epochs=5, search_epochs=4, batch_size=16,
             val_size=20, prune_interval=1, cycle_len=1, lambda_edge=2, lambda_input=2,
             gate_lr=0.02, lr_max=0.05, drop_path=0.1, memory_budget_mb=budget_for_growth(),
             seed=3, output_dir=out)
    f.update(over)
    return ([f"--{k}={v}" for k, v in f.items()]
            + ["--deterministic", "--noexport", "--verbose=0", "--nomeasure_memory"])


def run(args, fault=None, code=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop(rd.FAULT_ENV, None)
    if fault:
        env[rd.FAULT_ENV] = fault
    cmd = [sys.executable, SEARCH] if code is None else [sys.executable, "-c", code]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)


def tail(proc):
    return f"exit {proc.returncode}\n{proc.stderr[-3000:]}"


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def checkpoints(run_dir):
    """{checkpoint dir name: epoch of its state.json} of the complete checkpoints."""
    out = {}
    for name in ("checkpoint", "checkpoint.new", "checkpoint.old"):
        path = os.path.join(run_dir, name, "state.json")
        if os.path.exists(path):
            out[name] = rd.read_json(path)["epoch"]
    return out


def snapshot(run_dir):
    out = {}
    for dirpath, _, files in os.walk(run_dir):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, run_dir)] = hashlib.sha256(f.read()).hexdigest()
    return out


def without_timing(d):
    return {k: v for k, v in d.items() if k not in TIMING and k not in DIAGNOSTIC}


# SpiderNet's per-round scores: the NTK condition number (a ratio of extreme eigenvalues
# of a fresh network's kernel) amplifies the last bits of its sums, which a new process
# may add in another order (seen: 6604.390729 against 6604.390759). Compared to 1e-6;
# the decisions made from them (events, genotype) are compared exactly.
DIAGNOSTIC = {"spider_round"}


def assert_same_diagnostics(g, w):
    for key in DIAGNOSTIC & set(g):
        a, b = g[key], w.get(key)
        assert isinstance(a, dict) and isinstance(b, dict) and sorted(a) == sorted(b), key
        for k in a:
            if isinstance(a[k], float):
                assert a[k] == pytest.approx(b[k], rel=1e-6), (key, k)
            else:
                assert a[k] == b[k], (key, k)


def assert_same_result(run_dir, ref_dir):
    got, want = records(run_dir), records(ref_dir)
    assert [r["epoch"] for r in got] == [1, 2, 3, 4, 5], "every epoch exactly once"
    for g, w in zip(got, want):
        for key in ("val_accuracy", "val_loss", "params", "train_loss", "operations", "events"):
            assert g[key] == w[key], (g["epoch"], key, g[key], w[key])
        assert without_timing(g) == without_timing(w), g["epoch"]
        assert_same_diagnostics(g, w)
    assert without_timing(rd.read_json(os.path.join(run_dir, "metrics.json"))) == \
        without_timing(rd.read_json(os.path.join(ref_dir, "metrics.json")))
    g = G.Genotype.load(os.path.join(run_dir, "genotype.json"))
    w = G.Genotype.load(os.path.join(ref_dir, "genotype.json"))
    assert g.hash() == w.hash()
    assert g.to_dict() == w.to_dict()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run everything is compared with."""
    out = str(tmp_path_factory.mktemp("reference") / "run")
    proc = run(search_flags(data, out))
    assert proc.returncode == 0, tail(proc)
    recs = records(out)
    events = [" ".join(r["events"]) for r in recs]
    # The kill points below are reached only after a checkpoint exists.
    assert "grow" not in events[0] and "deadhead" not in events[0], events
    assert "deadhead: removed" in events[1] and "grow: pattern 2" in events[1], events
    assert "final network" in events[3] and recs[4]["phase"] == "final", events
    return out


# (fault point, epoch the process resumes from (None: it starts over), checkpoints it leaves)
CHAIN = [
    ("checkpoint", None, {"checkpoint.new": 1}),  # first checkpoint written, none in place
    ("mid_epoch:2", None, {"checkpoint": 1}),     # an unswapped checkpoint.new is not trusted
    ("rebuild", 1, {"checkpoint": 1}),            # epoch 2's deadhead and growth, rebuilt
    ("checkpoint", 1, {"checkpoint": 1, "checkpoint.new": 2}),
    ("checkpoint_swap", 1, {"checkpoint.old": 1, "checkpoint.new": 2}),
    ("mid_epoch:5", 1, {"checkpoint": 4}),        # resumed from checkpoint.old; final phase
    (None, 4, {"checkpoint": 5}),                 # no fault: finishes
]


def test_killed_at_every_fault_point_resumes_to_the_same_result(data, reference, tmp_path):
    out = str(tmp_path / "run")
    args = search_flags(data, out)
    for step, (fault, resumes_from, left) in enumerate(CHAIN):
        proc = run(args, fault=fault)
        where = f"step {step}, fault {fault}: {tail(proc)}"
        assert proc.returncode == (KILLED if fault else 0), where
        assert "Traceback" not in proc.stderr, where
        if resumes_from is None:
            assert "resuming" not in proc.stderr, where
        else:
            assert f"resuming {out} at epoch {resumes_from} " in proc.stderr, where
        assert checkpoints(out) == left, where
        if fault == "rebuild":
            # killed right after growing: genotype.json already has the grown network
            assert len(G.Genotype.load(os.path.join(out, "genotype.json")).cells) == 2, where
            assert len(rd.read_json(os.path.join(out, "checkpoint", "state.json"))
                       ["genotype"]["cells"]) == 1, where
    assert os.path.exists(os.path.join(out, "metrics.json"))
    with open(os.path.join(out, "log.txt")) as f:
        assert f.read().count("resuming") == 5
    assert_same_result(out, reference)


def test_same_seed_same_search(data, reference, tmp_path):
    out = str(tmp_path / "run")
    proc = run(search_flags(data, out))
    assert proc.returncode == 0, tail(proc)
    assert_same_result(out, reference)


# Runs the CLI with a learning rate of 1e30 from the second epoch on: real divergence
# after one good epoch (the flags cannot change mid-run).
DIVERGE = f"""
import sys
sys.path.insert(0, {os.path.join(ROOT, "train")!r})
import runner
from bonsai_tf import engine
set_lrs = engine.Run._set_lrs
def diverging(self, epoch):
    set_lrs(self, epoch)
    if epoch >= 1:
        for name in self.opt.lrs:
            self.opt.set_lr(name, 1e30)
engine.Run._set_lrs = diverging
sys.exit(runner.main(sys.argv))
"""


def test_non_finite_loss_stops_with_one_line_and_keeps_the_checkpoint(data, reference, tmp_path):
    out = str(tmp_path / "run")
    args = search_flags(data, out)
    proc = run(args, code=DIVERGE)
    assert proc.returncode == 2, tail(proc)
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, tail(proc)
    for fragment in ("training loss became", "at epoch 2", "expected a finite loss",
                     "--lr_max", "last good checkpoint"):
        assert fragment in lines[0], lines[0]
    assert checkpoints(out) == {"checkpoint": 1}
    arrays, state = rd.load_checkpoint(out)
    assert state["epoch"] == 1 and arrays
    assert all(np.isfinite(v).all() for v in arrays.values() if v.dtype.kind == "f")
    assert [r["epoch"] for r in records(out)] == [1]
    assert not os.path.exists(os.path.join(out, "metrics.json"))
    # The kept checkpoint is good: the same command without the divergence resumes from
    # it and ends where the uninterrupted run did.
    proc = run(args)
    assert proc.returncode == 0, tail(proc)
    assert f"resuming {out} at epoch 1 " in proc.stderr
    assert_same_result(out, reference)


def test_other_configuration_is_refused_unless_overwrite(data, reference, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(reference, out)
    before = snapshot(out)
    proc = run(search_flags(data, out, seed=4))
    assert proc.returncode == 2, tail(proc)
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, tail(proc)
    for fragment in ("different configuration", "differs in: seed", "--overwrite"):
        assert fragment in lines[0], lines[0]
    assert snapshot(out) == before

    proc = run(search_flags(data, out, seed=4, epochs=2, search_epochs=1) + ["--overwrite"])
    assert proc.returncode == 0, tail(proc)
    assert "resuming" not in proc.stderr
    config = rd.read_json(os.path.join(out, "config.json"))
    assert (config["seed"], config["epochs"]) == (4, 2)
    assert [r["epoch"] for r in records(out)] == [1, 2]
    assert checkpoints(out) == {"checkpoint": 2}
    assert os.path.exists(os.path.join(out, "metrics.json"))


# ASAP keeps more state than BonsaiNet: the alphas, their Adam slots and the annealed
# temperature. tau = 1.2 * 0.5^epoch, so the alphas learn from epoch 2 on, and
# operations go at the start of epochs 2-4 (each a rebuild).
def asap_flags(data, out):
    return search_flags(data, out, strategy="asap", memory_budget_mb=0, asap_tau0=1.2,
                        asap_beta=0.5, asap_threshold=0.6, arch_lr=0.05, max_patterns=1)


def assert_chain_resumes(flags, data, tmp_path, pruned, chain):
    """A reference run that prunes (`pruned` in its events), then the same command
    killed at each (fault, epoch it must resume from) of `chain` in turn: the last
    one, without a fault, must end exactly as the reference did."""
    ref = str(tmp_path / "reference")
    proc = run(flags(data, ref))
    assert proc.returncode == 0, tail(proc)
    events = " ".join(e for r in records(ref) for e in r["events"])
    assert pruned in events, events  # the kills land after real pruning
    out = str(tmp_path / "run")
    args = flags(data, out)
    for fault, resumes_from in chain:
        proc = run(args, fault=fault)
        where = f"fault {fault}: {tail(proc)}"
        assert proc.returncode == (KILLED if fault else 0), where
        assert "Traceback" not in proc.stderr, where
        if resumes_from is not None:
            assert f"resuming {out} at epoch {resumes_from} " in proc.stderr, where
    assert_same_result(out, ref)


def test_asap_killed_mid_search_resumes_to_the_same_result(data, tmp_path):
    assert_chain_resumes(asap_flags, data, tmp_path, "removed",
                         [("mid_epoch:3", None), ("mid_epoch:3", 2), ("rebuild", 2),
                          ("mid_epoch:5", None), (None, 4)])


# BayesNAS keeps gamma, omega and the Hessians in its state and the switches (and the
# parent switches of edges) in the model; its Laplace update draws held-out batches
# and Hutchinson probes from seeds fixed by the epoch. Epoch 1 is the warm-up; the
# update after epoch 2 prunes an edge and operations (a rebuild).
def bayes_flags(data, out):
    return search_flags(data, out, strategy="bayes", memory_budget_mb=0, max_patterns=1,
                        bayes_lambda_edge=0.5, bayes_lambda_op=0.5, bayes_threshold=0.9,
                        bayes_hessian_batches=2, gate_lr=0.2)


def test_bayes_killed_mid_search_resumes_to_the_same_result(data, tmp_path):
    # Killed before the first pruning, at its rebuild, after it, and then left to finish.
    assert_chain_resumes(bayes_flags, data, tmp_path, "prune:",
                         [("mid_epoch:2", None), ("rebuild", 1), ("mid_epoch:4", 1), (None, 3)])


# ProxylessNAS keeps its alphas in the model, their Adam slots in the architecture
# optimizer, and draws its paths from per-edge generators reseeded per epoch; with
# REINFORCE also the reward baseline (strategy state). Epoch 1 is the warm-up, epochs
# 2-4 step the alphas, and the search ends after epoch 4 with each edge's argmax.
def proxyless_flags(grad):
    def flags(data, out):
        return search_flags(data, out, strategy="proxyless", memory_budget_mb=0,
                            max_patterns=1, arch_lr=0.05, proxyless_warmup_epochs=1,
                            proxyless_grad=grad)
    return flags


@pytest.mark.parametrize("grad", ["binaryconnect", "reinforce"])
def test_proxyless_killed_mid_search_resumes_to_the_same_result(data, tmp_path, grad):
    # Killed in the first alpha-stepping epoch, in the next one, in final training, and
    # then left to finish; nothing is pruned, so the reference need only end its search.
    assert_chain_resumes(proxyless_flags(grad), data, tmp_path, "final network",
                         [("mid_epoch:2", None), ("mid_epoch:3", 1), ("mid_epoch:5", 2),
                          (None, 4)])


# SpiderNet grows by edge splits that renumber nodes: the layers on moved nodes are
# rebuilt under new names (their checkpoint keys change) and keep their weights and
# momentum; the gates' per-batch open counts are model weights, the round counter
# strategy state. Rounds of 2 epochs: after epochs 2 and 4 a deadhead and splits (each
# a rebuild), the search ends after epoch 4 (2 rounds), epoch 5 is final training.
def spider_flags(data, out):
    return search_flags(data, out, strategy="spider", memory_budget_mb=0, reductions=1,
                        round_epochs=2, spider_rounds=2, spider_candidates=2, aux_weight=0.4,
                        drop_path=0.0)


def test_spider_killed_mid_search_resumes_to_the_same_result(data, tmp_path):
    # Killed before the first split, at its rebuild, in final training (after the
    # checkpoints of the split network), and then left to finish.
    assert_chain_resumes(spider_flags, data, tmp_path, "mutate: cell",
                         [("mid_epoch:2", None), ("rebuild", 1), ("mid_epoch:5", 1),
                          (None, 4)])
