"""BonsaiNet (../shared/BONSAINET.md): saw-gate pruning, deadheading and growth under a budget."""

import dataclasses
import logging

import keras
import tensorflow as tf

from bonsai_tf import genotype as genotype_lib
from bonsai_tf import layers as L
from bonsai_tf import memory as memory_lib
from bonsai_tf import space as space_lib
from bonsai_tf.strategies import base

log = logging.getLogger("bonsai_tf")

# aim = e_c * 0.9 when e_c > AIM_SWITCH, else e_c * 0.66 (BONSAINET.md section 5)
GROW_AIM_HIGH = 0.9
GROW_AIM_LOW = 0.66
AIM_SWITCH = 0.35


class BudgetError(ValueError):
    """The memory budget cannot hold even the smallest network."""


class BonsaiNet(base.Strategy):
    name = "bonsai"
    arch = "saw"

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.ratios = {}        # pattern count -> e_c(n)
        self.built_bytes = {}   # cell -> operation memory it was built with
        self.cycles = 0         # k: compression cycles so far
        self.cycle_start = 0    # epoch at which the current cycle began
        self.last_deadhead = 0
        self.quiet_epochs = 0   # epochs ended since the last growth or removal

    # ---- structure ---------------------------------------------------------------
    def initial_genotype(self):
        cfg, info = self.cfg, self.info
        start = genotype_lib.initial(cfg.space, info.input_shape, info.num_classes, cfg.scale,
                                     cfg.nodes, cfg.patterns, 1, cfg.init_weight,
                                     stem_stride=cfg.stem_stride)
        n = 1
        if cfg.memory_budget_mb > 0:
            n, ratios = memory_lib.size_budget(start, cfg.memory_budget_mb * 2**20,
                                               cfg.batch_size, info.max_patterns,
                                               len(space_lib.space_ops(cfg.space)))
            if n == 0:
                need = memory_lib.estimate(start, cfg.batch_size)["mb"]
                raise BudgetError(
                    f"memory_budget_mb = {cfg.memory_budget_mb:g} is too small for one pattern "
                    f"of cells: expected at least {need:.1f} MB at batch {cfg.batch_size} "
                    f"(scale {cfg.scale}, nodes {cfg.nodes})")
            self.ratios = {str(k): v for k, v in ratios.items()}
            # Growth from k patterns needs e_c(k): it stops at the first count without one.
            last = n
            while last in ratios:
                last += 1
            plan = ", ".join(f"e_c({k}) = {v:.3f}" for k, v in sorted(ratios.items()))
            log.info("memory budget %g MB: %d pattern(s) to start, growth planned up to %d "
                     "of the pattern cap's %d%s", cfg.memory_budget_mb, n, last,
                     info.max_patterns, f" ({plan})" if plan else "")
        g = start
        while genotype_lib.num_patterns(g) < n:
            g = genotype_lib.grow(g, cfg.init_weight)
        self._note_built(g)
        return g

    def _note_built(self, g):
        costs = memory_lib.cell_op_bytes(g, self.cfg.batch_size)
        for c in range(len(g.cells)):
            self.built_bytes.setdefault(str(c), float(sum(costs[c].values())))

    def begin(self, net, fresh):
        # Cells are costed as first built (setdefault): also a genotype given to
        # Run.prepare (benchmarks) rather than made by initial_genotype.
        self._note_built(net.genotype)

    def final_genotype(self, net):
        return net.closed_removed().canonical()

    # ---- compression (BONSAINET.md section 3) -----------------------------------------
    def _patterns(self, net):
        return genotype_lib.num_patterns(net.genotype)

    def target(self, net):
        return self.ratios.get(str(self._patterns(net)))

    def compress_target(self, net):
        """The keep ratio the compression works towards: e_c(n), or at the pattern cap
        (nothing to grow into) the smallest one the budget plan ever asked for; None
        without a budget."""
        target = self.target(net)
        if target is None and self.ratios:
            target = min(self.ratios.values())
        return target

    def aim(self, net):
        target = self.compress_target(net)
        if target is None:
            return None
        return target * (GROW_AIM_HIGH if target > AIM_SWITCH else GROW_AIM_LOW)

    def grows_further(self, net):
        """Whether growth may still come: below the pattern cap, and the budget's plan
        has an e_c for this pattern count. Without one (a budget that holds fewer
        patterns than the cap, or no budget) nothing is ever grown past this count."""
        return self._patterns(net) < self.info.max_patterns and self.target(net) is not None

    def _why_grown_out(self, net):
        """Why growth is over, for the settled event."""
        n = self._patterns(net)
        if n >= self.info.max_patterns:
            return "at the pattern cap"
        if self.ratios:
            return (f"at the budget's last pattern ({n} of the cap's {self.info.max_patterns}: "
                    f"memory_budget_mb = {self.cfg.memory_budget_mb:g} plans no growth past it)")
        return f"without a memory budget nothing grows ({n} of {self.info.max_patterns} patterns)"

    def settled(self, net):
        """Whether growth is over (at the pattern cap, or at the last pattern count the
        budget plans for), the hard compression is at or below its target, and no
        operation or input has left for `settle_epochs` epochs: the architecture is
        found, and further search epochs would only train weights on the search subset
        at a pressure that has nothing left to do. (A budget that held two patterns of a
        cap of three once kept a search going for its whole share of the time: run
        s24m115, README.)"""
        wait = self.cfg.settle_epochs
        if wait <= 0 or self.grows_further(net):
            return False
        target = self.compress_target(net)
        if target is not None and self.compression(net) > target:
            return False
        return self.quiet_epochs >= wait

    def search_done(self, net):
        return self.settled(net)

    def compression(self, net):
        """Hard compression: memory of the operations still in the network over all built.

        Operations leave only by deadheading (removed for good), so a gate that closes
        and reopens between two end-of-epoch snapshots does not move it: growth is
        triggered by what was really removed, as the method has it.
        """
        return self._compression_of(net.genotype)

    def open_compression(self, net):
        """Memory of the operations whose gate is open now, over all built."""
        return self._compression_of(net.current_genotype(), gated=net.with_pruners)

    def _compression_of(self, g, gated=False):
        costs = memory_lib.cell_op_bytes(g, self.cfg.batch_size)
        alive = sum(costs[c][(e.src, e.dst, op)] for c, cell in enumerate(g.cells)
                    for e in cell.edges for op, w in e.ops if w > 0 or not gated)
        built = sum(self.built_bytes.values())
        return alive / built if built else 1.0

    def fits_budget(self, g):
        """Whether `g` trains within the memory budget (the analytical model)."""
        budget = self.cfg.memory_budget_mb
        return budget <= 0 or memory_lib.estimate(g, self.cfg.batch_size)["mb"] <= budget

    def step_inputs(self, net):
        return {"aim": self.aim(net) or 1.0, "pressure": 2.0 ** self.cycles}

    def arch_variables(self, net):
        return [p.w for _, _, _, p in net.gates()]

    def loss(self, net):
        """Memory-weighted gate compression plus input compression, per cell."""
        cfg = self.cfg
        # The step is compiled before begin() on a fresh build: a genotype handed to
        # Run.prepare (benchmarks) has cells not yet costed. setdefault keeps the rest.
        self._note_built(net.genotype)
        costs = memory_lib.cell_op_bytes(net.genotype, cfg.batch_size)
        op_terms, in_terms = [], []
        for c, cell in enumerate(net.cells):
            ops, ins = [], []
            for kind, key, p in cell.gates():
                if kind == "op":
                    src, dst = _edge_src_dst(cell, key[0])
                    ops.append((p, costs[c][(src, dst, key[1])]))
                else:
                    ins.append(p)
            if ops:
                op_terms.append((ops, self.built_bytes[str(c)]))
            if ins:
                in_terms.append((ins, float(c + 1)))
        lam_e, lam_i = cfg.lambda_edge, cfg.lambda_input

        def gate_vector(pruners):
            return L.saw_gate_value(tf.stack([p.w.value for p in pruners]))

        def compression(inputs):
            # Gates of a cell are evaluated on their stacked weights: a few graph ops
            # per cell instead of a few per gate.
            aim, pressure = inputs["aim"], inputs["pressure"]
            terms = []
            if op_terms:
                soft = tf.stack([tf.reduce_sum(gate_vector([p for p, _ in ops])
                                               * tf.constant([m / built for _, m in ops]))
                                 for ops, built in op_terms])
                terms.append(lam_e * pressure * _safe_norm(aim - soft))
            if in_terms:
                ratio = tf.stack([tf.reduce_sum(gate_vector(ps)) / n for ps, n in in_terms])
                target = tf.constant([1.0 / n for _, n in in_terms])
                terms.append(lam_i * pressure * _safe_norm(target - ratio))
            return tf.add_n(terms) if terms else tf.constant(0.0)
        return compression

    # ---- between epochs -------------------------------------------------------------
    def after_epoch(self, epoch, net):
        cfg = self.cfg
        for _, _, _, p in net.gates():
            p.record()
        change = base.Change()
        self.quiet_epochs += 1
        g = net.current_genotype()
        if epoch - self.last_deadhead >= cfg.prune_interval:
            dead = self._deadhead(net, g)
            self.last_deadhead = epoch
            if dead is not None:
                g, msg = dead
                change.genotype = g
                change.events.append(msg)
                self.quiet_epochs = 0
        target = self.target(net)
        grown = None
        if self.grows_further(net) and self._compression_of(g) < target:
            grown = genotype_lib.grow(g, cfg.init_weight)
            if not self.fits_budget(grown):
                # e_c(n) plans with the expected memory of a random choice; the real
                # survivors may cost more. The budget is a limit, not a plan.
                change.events.append(f"growth postponed: {len(grown.cells)} cells would need "
                                     f"{memory_lib.estimate(grown, cfg.batch_size)['mb']:.0f} MB")
                grown = None
        if grown is not None:
            p = genotype_lib.num_patterns(grown) - 1
            self._note_built(grown)
            # New cells draw their initial weights from a seed fixed by the epoch, so a
            # resumed run grows exactly the cells an uninterrupted one would.
            keras.utils.set_random_seed(cfg.seed * 1000 + epoch)
            change.genotype, change.new_pattern = grown, p
            change.events.append(f"grow: pattern {p + 1}, cells {len(g.cells)}-{len(grown.cells) - 1}")
            self.cycles, self.cycle_start = 0, epoch
            self.quiet_epochs = 0
        elif epoch - self.cycle_start >= cfg.cycle_len:
            self.cycle_start = epoch
            # Only a cycle that ended short of the target doubles the pressure
            # (BONSAINET.md section 3). Doubling past it, at the pattern cap, grew the
            # compression term to thousands of times the classification loss while
            # nothing was left to remove (run h16a, README).
            target = self.compress_target(net)
            if target is None or self._compression_of(g) > target:
                self.cycles += 1
                change.events.append(f"compression cycle {self.cycles}: "
                                     f"pressure x{2 ** self.cycles}")
        if change.genotype is None and self.settled(net):
            change.events.append(f"settled: {self._why_grown_out(net)}, compression at its target "
                                 f"and no removal for {self.quiet_epochs} epochs")
        return change

    def _deadhead(self, net, g):
        """Removes, for good, every operation and input whose gate stayed closed."""
        cells = []
        removed_ops = removed_inputs = 0
        for spec, cell in zip(g.cells, net.cells):
            dead = []
            for e in spec.edges:
                edge = cell.edges[L.edge_name(e.src, e.dst)]
                for (op, w), p in zip(e.ops, edge.pruners):
                    if _closed_since_deadhead(p):
                        dead.append((w, "op", (e.src, e.dst, op)))
            for j, w in spec.inputs:
                p = cell.y_gates.get(str(j))
                if p is not None and _closed_since_deadhead(p):
                    dead.append((w, "input", j))
            spec, ops, inputs = genotype_lib.remove_dead(spec, dead)
            removed_ops += ops
            removed_inputs += inputs
            cells.append(spec)
        new = dataclasses.replace(g, cells=tuple(cells)).canonical()
        for _, _, _, p in net.gates():
            p.reset_records()
        if new.num_ops() == g.num_ops() and not removed_inputs:
            return None
        lost = g.num_ops() - new.num_ops()
        return new, (f"deadhead: removed {lost} operations"
                     + (f", {removed_inputs} inputs" if removed_inputs else ""))

    def record(self, net):
        search = net.with_pruners
        return {"compression": self.compression(net),
                "open_compression": self.open_compression(net),
                "target": self.target(net) if search else None,
                "aim": self.aim(net) if search else None, "cycles": self.cycles}

    # ---- checkpoints ----------------------------------------------------------------
    def state(self):
        return {"ratios": self.ratios, "built_bytes": self.built_bytes, "cycles": self.cycles,
                "cycle_start": self.cycle_start, "last_deadhead": self.last_deadhead,
                "quiet_epochs": self.quiet_epochs}

    def load_state(self, state):
        self.ratios = dict(state["ratios"])
        self.built_bytes = dict(state["built_bytes"])
        self.cycles = int(state["cycles"])
        self.cycle_start = int(state["cycle_start"])
        self.last_deadhead = int(state["last_deadhead"])
        # Checkpoints from before settling was tracked count from their next epoch.
        self.quiet_epochs = int(state.get("quiet_epochs", 0))


def _closed_since_deadhead(p):
    return float(p.records.numpy()) > 0 and float(p.open_records.numpy()) == 0


def _safe_norm(v):
    # tf.norm's gradient is NaN at 0, which a cell with one input reaches at once.
    return tf.sqrt(tf.reduce_sum(tf.square(v)) + 1e-12)


def _edge_src_dst(cell, key):
    for e in cell.cell.edges:
        if L.edge_name(e.src, e.dst) == key:
            return e.src, e.dst
    raise KeyError(key)
