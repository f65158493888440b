#!/usr/bin/env python3
"""Times one training step of the original PyTorch BonsaiNet's full supernet on the CPU,
the reference of issue 14's "10x" (README, "Supernet training step").

The reference is RobGeada/bonsai-net-lite at 03c55e06cfa67f49a2a74c1c07b7b4db1af8c3db, not
part of this repository. It runs in its own virtualenv, beside this project's:

    git clone https://github.com/RobGeada/bonsai-net-lite /tmp/bonsai-net-lite
    git -C /tmp/bonsai-net-lite checkout 03c55e06cfa67f49a2a74c1c07b7b4db1af8c3db
    python3 -m venv /tmp/ref-venv
    /tmp/ref-venv/bin/pip install torch numpy      # measured: torch 2.13.0+cpu, numpy 2.4.6
    /tmp/ref-venv/bin/python bench/reference_step.py --reference_dir=/tmp/bonsai-net-lite

then, alternating with it on the same idle machine, this project's side:

    python bench/bench_step.py --scales=16 --shapes=32x32x3 --patterns=2 --steps=8

The reference's files are never edited: this script imports them and, before and while
importing, makes their CUDA calls run on the CPU (apply_cpu_shims and the two patches in
main). Its own training step is timed: `bonsai.trainers.train` (forward with the auxiliary
head, cross-entropy + 0.2 x the auxiliary loss, the edge and input compression losses,
backward, the SGD step, its top-1 count and progress line), on a one-batch loader of random
images and labels, with the optimizer built as `bonsai.trainers.full_train` builds it. What
differs from a GPU run: the drop-path mask is drawn on the CPU, and the GPU operation sizer
(a CUDA subprocess measuring each operation's memory) is replaced by fixed analytic sizes,
which only weight the compression loss. The reference's chatter goes to stderr; the figures
go to stdout as one JSON line and to --out.

argparse, not absl: this runs in the reference's torch-only virtualenv, without this
project's dependencies.
"""
import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time

# This project's machine identity (no TensorFlow import), written beside the figures as
# bench_step.py writes it, so the two sides' files say they ran on one machine.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bonsai_tf import machine  # noqa: E402

REF_COMMIT = "03c55e06cfa67f49a2a74c1c07b7b4db1af8c3db"

# Reference hyper-parameters (test_run.py), except scale (flag) and the fixed pattern count.
PATTERNS = [["n", "na"], ["r"]]   # normal, normal+kept aux head, reduction
NUM_PATTERNS = 2                  # -> 3 cells
NODES = 4
CLASSES = 10
DROP_PROB = 0.3
LR_SCHEDULE = {"lr_max": .01, "T": 600}
PRUNE_RATE = {"edge": .01, "input": .01}   # test_run.py 'prune_rate'
TRIES = 1                                  # full_train: comp_lambda = rate * 2**tries, tries starts at 1
COMP_RATIO = 0.45                          # nas.py aim = sizes[n] * .9; sizes[n] comes from a GPU
                                           # memory search, so a fixed stand-in (value only, not cost)

# Analytic stand-in for the GPU op sizer (bonsai/sizer.py 'o' mode measures CUDA MB per op):
# number of output-sized fp32 activations each op keeps, times the output size in MB.
OP_SIZE_MULT = {
    "Identity": 1.0,        # + 1 for the max-pool when strided
    "Avg_Pool_3x3": 2.0,
    "Max_Pool_3x3": 2.0,
    "Sep_Conv_3x3": 8.0,
    "Sep_Conv_5x5": 8.0,
    "Dil_Conv_3x3": 4.0,
    "Dil_Conv_5x5": 4.0,
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="timed steps after the first")
    p.add_argument("--scale", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--shape", default="32x32x3", help="HxWxC")
    p.add_argument("--reference_dir", required=True,
                   help="a checkout of RobGeada/bonsai-net-lite (the directory holding bonsai/)")
    p.add_argument("--work_dir", default=None,
                   help="where the reference writes its logs/, genotypes/ and pickles/ "
                        "(default: a new temporary directory)")
    p.add_argument("--out", default="bench/results/reference_step.json",
                   help="where to write the figures (JSON)")
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.reference_dir, "bonsai", "net.py")):
        p.error(f"--reference_dir={args.reference_dir!r} holds no bonsai/net.py; expected a "
                f"checkout of RobGeada/bonsai-net-lite at {REF_COMMIT[:7]}")
    return args


def apply_cpu_shims(torch):
    """Make the reference's CUDA calls CPU no-ops. Returns a list of what was patched."""
    applied = []

    # .cuda() on tensors (Net.track_params: edge_p_tot, edge_sizes, input_p_tot) and modules.
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    applied.append("torch.Tensor.cuda / torch.nn.Module.cuda -> identity")

    # Memory / sync queries (helpers.mem_stats, cache_stats, clean; called in every forward).
    for name in ("memory_allocated", "memory_cached", "memory_reserved",
                 "max_memory_allocated", "max_memory_cached", "max_memory_reserved"):
        setattr(torch.cuda, name, lambda *a, **k: 0)
    torch.cuda.empty_cache = lambda *a, **k: None
    torch.cuda.synchronize = lambda *a, **k: None
    applied.append("torch.cuda.memory_allocated/memory_cached/memory_reserved/max_* -> 0; "
                   "empty_cache/synchronize -> no-op")

    # ops.drop_path draws its mask with torch.cuda.FloatTensor(n,1,1,1).bernoulli_(keep):
    # give it an uninitialised CPU float tensor of the same size instead (drop_path unchanged).
    def _cpu_float_tensor(*size):
        return torch.empty(*size, dtype=torch.float32)
    torch.cuda.FloatTensor = _cpu_float_tensor
    applied.append("torch.cuda.FloatTensor(*size) -> torch.empty(*size, float32) on CPU "
                   "(drop-path mask drawn on the CPU)")
    return applied


@contextlib.contextmanager
def cuda_tensor_factory_on_cpu(torch):
    """trainers.py builds `dummy_zero = torch.tensor([0.], device='cuda')` at import time."""
    orig = torch.tensor

    def _tensor(*a, **k):
        dev = k.get("device")
        if dev is not None and "cuda" in str(dev):
            k["device"] = "cpu"
        return orig(*a, **k)
    torch.tensor = _tensor
    try:
        yield
    finally:
        torch.tensor = orig


def fixed_op_sizer(commons):
    def op_sizer(dims, single=True):
        if single:
            dims = [dims]
        sizes = {}
        for dim in dims:
            b, c, h, w, s = dim
            mb = b * c * (h // s) * (w // s) * 4 / 1024 / 1024
            per_op = {}
            for op in commons:
                mult = OP_SIZE_MULT[op] + (1.0 if op == "Identity" and s != 1 else 0.0)
                per_op[op] = mult * mb
            sizes[dim] = per_op
        return sizes
    return op_sizer


class OneBatchLoader:
    """Stands in for model.data[0]: one (data, target) batch; len() and .dataset as trainers.train uses."""

    class _DS:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    def __init__(self, x, y):
        self.x, self.y = x, y
        self.dataset = self._DS(x.shape[0])

    def __iter__(self):
        yield self.x, self.y

    def __len__(self):
        return 1


def main():
    args = parse_args()
    h, w, c = (int(v) for v in args.shape.lower().split("x"))

    import numpy as np
    import torch
    torch.set_num_threads(2)
    torch.manual_seed(0)
    np.random.seed(0)

    shims = apply_cpu_shims(torch)

    out_path = os.path.abspath(args.out)
    # The reference writes logs/, genotypes/, pickles/ relative to the working directory,
    # and would reuse a stale op_sizes.pkl from an earlier run.
    work = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="reference_step_"))
    for d in ("logs", "genotypes", "pickles"):
        os.makedirs(os.path.join(work, d), exist_ok=True)
    stale = os.path.join(work, "pickles", "op_sizes.pkl")
    if os.path.exists(stale):
        os.remove(stale)
    sys.path.insert(0, os.path.abspath(args.reference_dir))
    os.chdir(work)

    out = sys.stderr
    with contextlib.redirect_stdout(out):
        import bonsai.helpers as helpers
        import bonsai.ops as ops
        import bonsai.net as net_mod
        with cuda_tensor_factory_on_cpu(torch):
            import bonsai.trainers as trainers
        shims.append("torch.tensor(device='cuda') -> device='cpu' while importing bonsai.trainers "
                     "(module-level dummy_zero)")

        # GPU op sizer (subprocess running bonsai/sizer.py on CUDA) -> fixed analytic sizes.
        helpers.op_sizer = fixed_op_sizer(ops.commons)
        shims.append("bonsai.helpers.op_sizer -> fixed analytic sizes (only weight the compression loss)")
        # Net.__init__ evaluates namer() (reads bonsai/names.txt, not in the repo) even when
        # model_id is given.
        net_mod.namer = lambda: "ref cpu bench"
        shims.append("bonsai.net.namer -> constant id (bonsai/names.txt is not in the repository)")

        dim = torch.Size([args.batch, c, h, w])   # what load_data returns: a batch's shape
        model = net_mod.Net(dim=dim,
                            classes=CLASSES,
                            scale=args.scale,
                            patterns=PATTERNS,
                            num_patterns=NUM_PATTERNS,
                            nodes=NODES,
                            random_ops=None,
                            prune=True,
                            model_id="ref_cpu_bench",
                            drop_prob=DROP_PROB,
                            lr_schedule=LR_SCHEDULE)
        print(str(model))

        # Optimizer and criterion exactly as trainers.full_train builds them.
        params = [{'params': list(p), 'lr': model.lr_schedulers[k].lr, 'key': k}
                  for k, p in model.pattern_params.items()]
        optimizer = torch.optim.SGD(params, momentum=.9, weight_decay=3e-4)
        criterion = torch.nn.CrossEntropyLoss()
        model.jn_print, model.log_print = trainers.jn_print, trainers.log_print
        comp_lambda = {k: v * 2 ** TRIES for k, v in PRUNE_RATE.items()}

        x = torch.randn(args.batch, c, h, w)
        y = torch.randint(0, CLASSES, (args.batch,))
        model.data = (OneBatchLoader(x, y), None)
        device = torch.device("cpu")

        n_ops = sum(len(edge.ops) for cell in model.cells for edge in cell.edges.values())
        n_edge_pruners = sum(1 for cell in model.cells for edge in cell.edges.values()
                             for op in edge.ops if getattr(op, "pruner", None) is not None)
        n_input_pruners = sum(len(cell.input_handler.pruners) for cell in model.cells)
        n_params = int(helpers.general_num_params(model))
        n_params_all = int(sum(p.numel() for p in model.parameters()))
        n_opt_params = int(sum(p.numel() for g in optimizer.param_groups for p in g['params']))

        def step():
            t0 = time.perf_counter()
            trainers.train(model, device, criterion=criterion, optimizer=optimizer, epoch=1,
                           comp_lambda=comp_lambda, comp_ratio=COMP_RATIO)
            return time.perf_counter() - t0

        first = step()
        times = [step() for _ in range(args.steps)]

    med = statistics.median(times) if times else first
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "reference": "RobGeada/bonsai-net-lite@" + REF_COMMIT,
        "first_step_seconds": round(first, 4),
        "median_step_seconds": round(med, 4),
        "step_seconds": [round(t, 4) for t in times],
        "images_per_second": round(args.batch / med, 3),
        "params": n_params,
        "params_all": n_params_all,
        "params_in_optimizer": n_opt_params,
        "operations": n_ops,
        "edge_pruners": n_edge_pruners,
        "input_pruners": n_input_pruners,
        "cells": len(model.cells),
        "batch": args.batch,
        "scale": args.scale,
        "shape": args.shape,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "peak_rss_kb": rss_kb,
        "peak_rss_mb": round(rss_kb / 1024, 1),
        "shims": shims,
        "machine": machine.identity(),
    }
    print(json.dumps(result), flush=True)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
