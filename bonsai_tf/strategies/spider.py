"""SpiderNet (Geada & McGough 2022; METHODS.md): a network that grows itself by mutation.

The user gives the number of reductions and the initial channels. The network starts
as `reductions + 1` minimal cells (genotype.spider_initial): each a chain of two
nodes, densely fed by every earlier output, each with an auxiliary head, every edge
holding every operation behind a saw gate. The search runs in rounds:

  train      `round_epochs` epochs; after every batch the gates are clamped to
             +-5x their initial weight and each gate counts whether it is open;
  deadhead   an operation (or cell input) whose gate was open in under
             `spider_deadhead` of the round's batches is removed for good;
  mutate     in every cell, candidate edges are split (genotype.split_edge: a new
             node on edge i -> j, all-operation edges i -> new -> j, the old edge kept
             as a skip) and scored without training against the unsplit network under
             shared initialisation: the NTK condition number on held-out images
             (lower is better) and the linear regions over random inputs (higher is
             better; counted as TE-NAS does, on the network one channel wide on 3x3
             images), as bonsai_tf.trainfree computes them. A candidate is accepted only if its
             regions rise and its condition number does not; the best accepted one
             per cell (the lowest sum of the two ranks) is applied if the grown
             network's training memory fits the budget: measured on one training step
             where the machine reports memory, estimated (memory.estimate) otherwise,
             and the run records which.

Mutated cells are rebuilt keeping every trained weight (layers on renumbered nodes
are rebuilt under their new names with the old weights; their momentum follows).
The search ends after `spider_rounds` rounds (or when the engine's plan ends it).
"""

import dataclasses
import random
import time

import keras
import numpy as np
import tensorflow as tf

from bonsai_tf import genotype as genotype_lib
from bonsai_tf import layers as L
from bonsai_tf import memory as memory_lib
from bonsai_tf import network as network_lib
from bonsai_tf import space as space_lib
from bonsai_tf import trainfree
from bonsai_tf.strategies import base
from bonsai_tf.strategies.bonsai import BudgetError

GATE_CLAMP = 5.0    # gates are clamped to +-5x their initial weight (SpiderNet)
# Linear regions are counted on the network one channel wide on THIN_SIZE x THIN_SIZE
# random images (TE-NAS: 1 channel, 3x3 inputs, 3,000 samples).
THIN_SIZE = 3


class SpiderNet(base.Strategy):
    name = "spider"
    arch = "saw"

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.clamp = GATE_CLAMP * cfg.init_weight
        self.rounds = 0             # rounds completed
        self.mutations = 0          # edge splits applied
        self.scored = 0             # candidates scored
        self.score_seconds = 0.0    # seconds spent scoring them (both networks' metrics)
        self.memory = None          # the last memory check: {"mb", "source", "budget_mb"}
        self.last_round = None      # what the last round did (for metrics.jsonl)

    # ---- structure ---------------------------------------------------------------
    def initial_genotype(self):
        cfg, info = self.cfg, self.info
        g = genotype_lib.spider_initial(cfg.space, info.input_shape, info.num_classes, cfg.scale,
                                        cfg.reductions, cfg.init_weight, cfg.stem_stride)
        if cfg.memory_budget_mb > 0:
            need = memory_lib.estimate(g, cfg.batch_size)["mb"]
            if need > cfg.memory_budget_mb:
                raise BudgetError(
                    f"memory_budget_mb = {cfg.memory_budget_mb:g} is too small for SpiderNet's "
                    f"starting network: expected at least {need:.1f} MB at batch "
                    f"{cfg.batch_size} (scale {cfg.scale}, reductions {cfg.reductions})")
        return g

    def final_genotype(self, net):
        return net.closed_removed().canonical()

    def arch_variables(self, net):
        return [p.w for _, _, _, p in net.gates()]

    def after_train_step(self, net):
        gates = [p for _, _, _, p in net.gates()]
        c = self.clamp

        def clamp_and_count():
            # The optimizer's raw momentum kernel ignores Keras constraints: clamp here.
            for p in gates:
                w = tf.clip_by_value(p.w.value, -c, c)
                p.w.assign(w)
                p.open_records.assign_add(tf.cast(w > 0.0, tf.float32))
                p.records.assign_add(1.0)
        return clamp_and_count

    def search_done(self, net):
        return self.rounds >= self.cfg.spider_rounds

    # ---- between epochs -------------------------------------------------------------
    def after_epoch(self, epoch, net):
        cfg = self.cfg
        change = base.Change()
        if epoch % cfg.round_epochs:
            self.last_round = None
            return change
        self.rounds += 1
        g = net.current_genotype()
        new, removed_ops, removed_inputs = self._deadhead(net, g)
        round_info = {"round": self.rounds, "removed_operations": removed_ops,
                      "removed_inputs": removed_inputs}
        if removed_ops or removed_inputs:
            change.events.append(f"deadhead: removed {removed_ops} operations"
                                 + (f", {removed_inputs} inputs" if removed_inputs else ""))
        node_maps = {}
        if self.rounds < cfg.spider_rounds:  # the last round's split would go untrained
            new, node_maps, events, info = self._mutate(new, net, epoch)
            change.events += events
            round_info.update(info)
        self.last_round = round_info
        if new.structure() != g.structure():
            change.genotype, change.node_maps = new, node_maps or None
            # New layers draw their initial weights from a seed fixed by the epoch, so a
            # resumed run grows exactly the layers an uninterrupted one would.
            keras.utils.set_random_seed(cfg.seed * 1000 + epoch)
        return change

    def _deadhead(self, net, g):
        """`g` without the operations and inputs open in under `spider_deadhead` of the
        batches since the last round; the counts restart for every gate."""
        cells, ops, inputs = [], 0, 0
        for spec, cell in zip(g.cells, net.cells):
            dead = []
            for e in spec.edges:
                edge = cell.edges[L.edge_name(e.src, e.dst)]
                for (op, _), p in zip(e.ops, edge.pruners):
                    share = _open_share(p)
                    if share is not None and share < self.cfg.spider_deadhead:
                        dead.append((share, "op", (e.src, e.dst, op)))
            for j, _ in spec.inputs:
                p = cell.y_gates.get(str(j))
                share = _open_share(p) if p is not None else None
                if share is not None and share < self.cfg.spider_deadhead:
                    dead.append((share, "input", j))
            spec, o, i = genotype_lib.remove_dead(spec, dead)
            cells.append(spec)
            ops, inputs = ops + o, inputs + i
        for _, _, _, p in net.gates():
            p.reset_records()
        return dataclasses.replace(g, cells=tuple(cells)).canonical(), ops, inputs

    # ---- mutation ---------------------------------------------------------------------
    def _mutate(self, g, net, epoch):
        cfg = self.cfg
        ops = space_lib.space_ops(cfg.space)
        rng = random.Random(cfg.seed * 7919 + epoch)
        ntk_x, regions_x, batch = self._score_inputs(net, epoch)
        seed = cfg.seed * 1000 + 700 + epoch
        base_cond, base_regions, _ = self._scores(net, g, None, ntk_x, regions_x, seed)
        best, tried, accepted = {}, 0, 0
        for c, cell in enumerate(g.cells):
            edges = [e for e in cell.edges if e.ops]
            if cfg.spider_candidates and len(edges) > cfg.spider_candidates:
                edges = rng.sample(edges, cfg.spider_candidates)
            scored = []
            for e in edges:
                spec, node_map = genotype_lib.split_edge(cell, e.src, e.dst, ops, cfg.init_weight)
                cand = _with_cell(g, c, spec)
                cond, regions, seconds = self._scores(net, g, (cand, {c: node_map}), ntk_x,
                                                      regions_x, seed)
                tried += 1
                if regions > base_regions and cond <= base_cond:
                    scored.append({"edge": (e.src, e.dst), "cell": spec, "map": node_map,
                                   "cond": cond, "regions": regions})
            accepted += len(scored)
            if scored:
                best[c] = _best(scored)
        info = {"base_condition": _finite(base_cond), "base_regions": base_regions,
                "candidates": tried, "accepted": accepted}
        chosen, events = self._fit_budget(g, best, net, batch)
        new, node_maps = g, {}
        for c in chosen:
            new = _with_cell(new, c, best[c]["cell"])
            node_maps[c] = best[c]["map"]
            src, dst = best[c]["edge"]
            events.append(f"mutate: cell {c} split edge {src}->{dst} (regions "
                          f"{base_regions}->{best[c]['regions']}, NTK condition "
                          f"{base_cond:.3g}->{best[c]['cond']:.3g})")
        self.mutations += len(chosen)
        info["mutations"] = len(chosen)
        return new, node_maps, events, info

    def _score_inputs(self, net, epoch):
        """Held-out images for the NTK, random ones (pixel units, the data's mean and
        spread) for the linear regions, and one held-out batch for the memory check."""
        cfg = self.cfg
        need = max(cfg.spider_ntk_batch, cfg.batch_size)
        batches, have = [], 0
        while have < need:
            batches = self.batches(len(batches) + 1, epoch)
            have = sum(int(b[1].shape[0]) for b in batches)
        x = tf.concat([b[0] for b in batches], 0)
        y = tf.concat([b[1] for b in batches], 0)
        rng = np.random.default_rng(cfg.seed * 7919 + epoch)
        shape = (cfg.spider_regions_batch,) + tuple(_thin_input(self.info.input_shape))
        noise = rng.standard_normal(shape).astype("float32")
        regions_x = noise * np.asarray(net.std, "float32") + np.asarray(net.mean, "float32")
        return x[:cfg.spider_ntk_batch], regions_x, (x[:cfg.batch_size], y[:cfg.batch_size])

    def _scores(self, net, g, candidate, ntk_x, regions_x, seed):
        """(NTK condition number, linear regions, seconds) of `g` at initialisation, or of
        `candidate` = (genotype, node_maps) grown from it: the same seed builds `g`, so
        every layer they share starts from the same weights."""
        started = time.time()

        def build(thin):
            keras.utils.set_random_seed(seed)
            built = network_lib.Network(_thin(g) if thin else g, net.mean, net.std,
                                        with_pruners=False, aux_heads=False)
            if candidate is not None:
                keras.utils.set_random_seed(seed + 1)
                grown, node_maps = candidate
                built.rebuild(_thin(grown) if thin else grown, node_maps)
            return built.model
        cond = trainfree.ntk_condition_number(build(False), ntk_x)
        regions = trainfree.linear_regions(build(True), regions_x)
        seconds = time.time() - started
        if candidate is not None:
            self.scored += 1
            self.score_seconds += seconds
        return cond, regions, seconds

    def _fit_budget(self, g, best, net, batch):
        """The cells whose best split is applied: all of them if the network grown by all
        fits the budget, else as many as fit, taken in cell order."""
        budget = self.cfg.memory_budget_mb
        if not best or budget <= 0:
            return sorted(best), []
        events, chosen = [], []
        trial = g
        every = g
        for c in sorted(best):
            every = _with_cell(every, c, best[c]["cell"])
        mb, source = self._training_memory(every, net, batch)
        if mb <= budget:
            self.memory = {"mb": mb, "source": source, "budget_mb": budget}
            return sorted(best), events
        for c in sorted(best):
            grown = _with_cell(trial, c, best[c]["cell"])
            mb, source = self._training_memory(grown, net, batch)
            self.memory = {"mb": mb, "source": source, "budget_mb": budget}
            if mb <= budget:
                chosen.append(c)
                trial = grown
            else:
                events.append(f"mutation of cell {c} postponed: the grown network needs "
                              f"{mb:.0f} MB ({source}), the budget is {budget:g} MB")
        return chosen, events

    def _training_memory(self, g, net, batch):
        """(MB, source) of one training step of `g` at the run's batch size: the peak
        measured by memory.measure_step_peak where the machine reports one ("allocator"
        or "rss"), else memory.estimate ("estimate")."""
        cfg = self.cfg
        if cfg.measure_memory:
            x, y = batch
            grown = network_lib.Network(g, net.mean, net.std, with_pruners=True,
                                        aux_heads=True)
            model, variables = grown.model, grown.model.trainable_variables

            def step(x, y):
                with tf.GradientTape() as tape:
                    outs = model(x, training=True)
                    loss = tf.add_n([tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                        y, o, from_logits=True)) for o in outs])
                return tape.gradient(loss, variables)
            step = tf.function(step, autograph=False)
            step(x, y)  # traced: the measured call runs the graph only
            measured = memory_lib.measure_step_peak(lambda: step(x, y))
            # A peak of 0 is no measurement: some builds' CPU allocator counts nothing
            # of a step's tensors (seen on tiny networks here).
            if measured.bytes:
                return measured.mb, measured.source
        return memory_lib.estimate(g, cfg.batch_size)["mb"], "estimate"

    # ---- records ----------------------------------------------------------------------
    def record(self, net):
        cells = net.genotype.cells
        r = {"nodes": sum(genotype_lib.num_nodes(c) for c in cells),
             "edges": sum(1 for c in cells for e in c.edges if e.ops),
             "rounds": self.rounds, "mutations": self.mutations,
             "trainfree_seconds_per_candidate": (self.score_seconds / self.scored
                                                 if self.scored else None)}
        if self.memory is not None:
            r["spider_memory_mb"] = self.memory["mb"]
            r["spider_memory_source"] = self.memory["source"]
        if self.last_round is not None:
            r["spider_round"] = self.last_round
        return r

    def summary(self, final):
        return {"rounds": self.rounds, "mutations": self.mutations,
                "candidates_scored": self.scored,
                "trainfree_seconds_per_candidate": (self.score_seconds / self.scored
                                                    if self.scored else None),
                "spider_memory_check": self.memory}

    # ---- checkpoints ----------------------------------------------------------------
    def state(self):
        return {"rounds": self.rounds, "mutations": self.mutations, "scored": self.scored,
                "score_seconds": self.score_seconds, "memory": self.memory,
                "last_round": self.last_round}

    def load_state(self, state):
        self.rounds = int(state["rounds"])
        self.mutations = int(state["mutations"])
        self.scored = int(state["scored"])
        self.score_seconds = float(state["score_seconds"])
        self.memory = state["memory"]
        self.last_round = state["last_round"]


def _thin_input(shape):
    return (min(shape[0], THIN_SIZE), min(shape[1], THIN_SIZE), shape[2])


def _thin(g):
    """`g` one channel wide at the stem (channels divided by the scale) on tiny images:
    TE-NAS counts linear regions on such a network. At full width every random input
    falls in a region of its own, and the count is the batch size whatever the network."""
    cells = tuple(dataclasses.replace(c, channels=max(1, c.channels // g.scale))
                  for c in g.cells)
    return dataclasses.replace(g, input_shape=_thin_input(g.input_shape), scale=1, cells=cells)


def _open_share(p):
    records = float(p.records.numpy())
    return float(p.open_records.numpy()) / records if records > 0 else None


def _with_cell(g, c, spec):
    cells = list(g.cells)
    cells[c] = spec
    return dataclasses.replace(g, cells=tuple(cells))


def _best(scored):
    """The candidate of the lowest rank sum: condition number ascending, regions descending."""
    by_cond = sorted(range(len(scored)), key=lambda i: scored[i]["cond"])
    by_regions = sorted(range(len(scored)), key=lambda i: -scored[i]["regions"])
    rank = {i: by_cond.index(i) + by_regions.index(i) for i in range(len(scored))}
    return scored[min(rank, key=lambda i: (rank[i], scored[i]["cond"]))]


def _finite(v):
    return v if np.isfinite(v) else None
