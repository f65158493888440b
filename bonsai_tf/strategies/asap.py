"""ASAP: Architecture Search, Anneal and Prune (Noy et al., AISTATS 2020; METHODS.md).

Each edge mixes its operations with softmax(alpha / tau); tau anneals every epoch,
tau = tau0 * beta^epoch. While tau >= 1 only the weights train (the grace period);
after it, the alphas step on validation batches (first-order bi-level) between
weight steps on training batches. At the start of every epoch an operation whose
annealed weight is below threshold / (operations on its edge) is removed for good
and the model is rebuilt without it; the softmax renormalises over the rest. The
search ends when every edge holds one operation, so it converges to one network
without a final discrete cut. Cells have no input gates: y sums every earlier
output.
"""

import dataclasses
import math

import numpy as np

from bonsai_tf import genotype as genotype_lib
from bonsai_tf import layers as L
from bonsai_tf.strategies import base


def temperature(epoch, tau0, beta):
    """tau at the start of `epoch` (0-based)."""
    return tau0 * beta ** epoch


def mixing_weights(alphas, tau):
    """softmax(alpha / tau) over one edge's operations (numpy)."""
    z = np.asarray(alphas, np.float64) / tau
    z = np.exp(z - z.max())
    return z / z.sum()


def prune_edge(ops, tau, threshold):
    """The (op, alpha) pairs of one edge that survive: weight >= threshold / len(ops).

    The strongest operation always survives, so an edge is never emptied.
    """
    if len(ops) <= 1:
        return tuple(ops)
    w = mixing_weights([a for _, a in ops], tau)
    bar = threshold / len(ops)
    best = int(np.argmax(w))
    return tuple(o for k, o in enumerate(ops) if w[k] >= bar or k == best)


class ASAP(base.Strategy):
    name = "asap"
    arch = "softmax"
    bilevel = True

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.epoch = 0      # the epoch whose temperature is in effect

    def tau(self, epoch=None):
        return temperature(self.epoch if epoch is None else epoch, self.cfg.asap_tau0,
                           self.cfg.asap_beta)

    # ---- structure ---------------------------------------------------------------
    def initial_genotype(self):
        cfg, info = self.cfg, self.info
        n = max(1, info.max_patterns)
        g = genotype_lib.initial(cfg.space, info.input_shape, info.num_classes, cfg.scale,
                                 cfg.nodes, cfg.patterns, n, 0.0, stem_stride=cfg.stem_stride)
        # alpha ~ 1e-3 N(0, 1): from the run's seed, so a run is repeatable.
        rng = np.random.RandomState(cfg.seed)
        cells = tuple(dataclasses.replace(c, edges=tuple(
            dataclasses.replace(e, ops=tuple((o, float(1e-3 * rng.randn())) for o, _ in e.ops))
            for e in c.edges)) for c in g.cells)
        return dataclasses.replace(g, cells=cells)

    def final_genotype(self, net):
        """The strongest operation of every edge (the only one, once the search converged)."""
        return genotype_lib.strongest_ops(net.current_genotype())

    # ---- the training step -----------------------------------------------------------
    def arch_variables(self, net):
        return [p.w for _, _, _, p in net.gates()]

    def arch_trainable(self, epoch):
        return self.tau(epoch) < 1.0

    # ---- between epochs -------------------------------------------------------------
    def begin(self, net, fresh):
        # A run resumed in its final phase has a plain network: nothing mixes any more.
        if net.temperature is not None:
            net.set_temperature(self.tau())

    def before_epoch(self, epoch, net):
        self.epoch = epoch
        tau = self.tau()
        change = base.Change(temperature=tau)
        g = net.current_genotype()
        removed = 0
        cells = []
        for cell in g.cells:
            edges = []
            for e in cell.edges:
                kept = prune_edge(e.ops, tau, self.cfg.asap_threshold)
                removed += len(e.ops) - len(kept)
                edges.append(dataclasses.replace(e, ops=kept))
            cells.append(dataclasses.replace(cell, edges=tuple(edges)))
        if removed:
            change.genotype = dataclasses.replace(g, cells=tuple(cells)).canonical()
            change.events.append(f"prune: removed {removed} operations at tau {tau:.3f}")
        return change

    def search_done(self, net):
        return all(len(e.ops) <= 1 for c in net.genotype.cells for e in c.edges)

    def record(self, net):
        g = net.current_genotype()
        weights = {}
        for c, cell in enumerate(g.cells):
            for e in cell.edges:
                w = mixing_weights([a for _, a in e.ops], self.tau())
                weights[f"{c}/{L.edge_name(e.src, e.dst)}"] = {
                    o: round(float(x), 5) for (o, _), x in zip(e.ops, w)}
        most = max((len(e.ops) for c in g.cells for e in c.edges), default=0)
        return {"tau": self.tau(), "ops_per_edge_max": most,
                "arch_training": self.arch_trainable(self.epoch), "mixing_weights": weights}

    # ---- checkpoints ----------------------------------------------------------------
    def state(self):
        return {"epoch": self.epoch}

    def load_state(self, state):
        self.epoch = int(state["epoch"])
        if not math.isfinite(self.tau()):
            raise ValueError(f"asap state epoch {self.epoch} gives no finite temperature")
