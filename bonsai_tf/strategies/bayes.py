"""BayesNAS: hierarchical relevance priors on switches, Laplace updates (Zhou et al., ICML 2019).

METHODS.md has the method; the authors' code (BayesNAS/BayesNAS on GitHub) fixed the
details this module follows:

- Every edge carries a *parent* switch that multiplies the whole edge, and each of its
  operations a *child* switch: edge output = s_edge * sum_k s_k * op_k(x). Switches are
  real numbers starting at 1 (`layers.Edge` with mixing "switch").
- A *group* is one switch position (edge, or edge and operation) in every cell of one
  kind (normal or reduction): its cells share one relevance gamma and one weight omega.
- The loss adds, per group, lambda * omega * ||s_group||_2 (lambda of edges for parent
  groups, of operations for child groups): an iteratively reweighted group lasso.
- After every epoch, one Laplace update per group, with H the diagonal of the NLL's
  Hessian in each switch and H~ = H / lambda:
      C = (1/gamma + H~)^-1,  omega = sqrt(sum_cells |1/gamma - C/gamma^2|),
      gamma = ||s_group||_2 / omega,
  and then, for a child, gamma <- (1/gamma + 1/gamma_parent)^-1: an operation can only
  stay relevant while its edge does.
- A group whose gamma collapses (below `bayes_threshold`) is pruned, edges first, in
  every cell of its kind, and the model is rebuilt without it as deadheading does. A
  removal that would cut a cell's last path from its inputs to its output is skipped.

How the Hessian diagonal is computed (`hessian_diagonal`): nested `tf.GradientTape`s
give Hessian-vector products Hz exactly (double backprop). The exact diagonal needs one
product per switch, H e_i, and a supernet has hundreds of switches, so a search uses
Hutchinson's estimator instead: diag(H) = E[z * Hz] for Rademacher z, one probe per
held-out batch. It is unbiased, costs one product per batch whatever the number of
switches, and averages over the batches as the Laplace update wants (the expected
curvature over the data). Its variance comes from the off-diagonal terms. The Laplace
approximation needs a positive precision, and an estimate can come out negative (noise,
or a saddle of the NLL away from a minimum): the update takes |H|, as saddle-free Newton
does, rather than 0, which would give the group omega = 0 (no penalty) and an infinite
gamma whatever its switches do. `method="exact"` runs the unit vectors instead (tests,
small models). The authors back-propagated a layer-wise diagonal approximation by hand for
their one network; double backprop works on any cell of the registry.
"""

import dataclasses
import math
import time

import numpy as np
import tensorflow as tf

from bonsai_tf import genotype as genotype_lib
from bonsai_tf import layers as L
from bonsai_tf import memory as memory_lib
from bonsai_tf.strategies import base
from bonsai_tf.strategies import fixed

GAMMA_MIN, GAMMA_MAX = 1e-12, 1e12   # keeps 1/gamma and ||s||/omega finite
HESSIAN_METHODS = ("hutchinson", "exact")


# ---- the formulas (numpy) ------------------------------------------------------------
def laplace_update(gamma, hessian, switches, lam):
    """One Laplace update of one group: returns (new gamma, omega, C per cell).

    gamma: the group's relevance before the update (shared by its cells); hessian and
    switches: one value per cell; lam: the group's lambda.
    """
    gamma = float(np.clip(gamma, GAMMA_MIN, GAMMA_MAX))
    h = np.abs(np.asarray(hessian, np.float64)) / lam
    c = 1.0 / (1.0 / gamma + h)
    omega = math.sqrt(float(np.sum(np.abs(1.0 / gamma - c / gamma ** 2))))
    norm = float(np.linalg.norm(np.asarray(switches, np.float64)))
    new = norm / omega if omega > 0 else GAMMA_MAX
    return float(np.clip(new, GAMMA_MIN, GAMMA_MAX)), omega, c


def combine(gamma_child, gamma_parent):
    """The hierarchical prior: (1/gamma_child + 1/gamma_parent)^-1."""
    return 1.0 / (1.0 / gamma_child + 1.0 / gamma_parent)


# ---- the Hessian diagonal (TensorFlow) --------------------------------------------------
def hessian_vector_product(loss_fn, variables):
    """A tf.function (x, y, z) -> H z, with H the Hessian of loss_fn(x, y) in `variables`.

    variables: scalar variables; z: a float32 vector with one entry per variable.
    """
    def hvp(x, y, z):
        vectors = tf.unstack(z, num=len(variables))
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = loss_fn(x, y)
            grads = inner.gradient(loss, variables,
                                   unconnected_gradients=tf.UnconnectedGradients.ZERO)
            gz = tf.add_n([tf.reduce_sum(g * tf.cast(v, g.dtype)) for g, v in zip(grads, vectors)])
        hz = outer.gradient(gz, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return tf.stack([tf.cast(tf.reshape(h, ()), tf.float64) for h in hz])
    # No autograph: the function has no Python control flow on tensors to convert.
    return tf.function(hvp, reduce_retracing=True, autograph=False)


def hessian_diagonal(loss_fn, variables, batches, method="hutchinson", seed=0, hvp=None):
    """The diagonal of the Hessian of the mean of loss_fn over `batches` in `variables`.

    method "exact": H e_i for every i on every batch (n products per batch);
    "hutchinson": z * Hz for one Rademacher z per batch (see the module docstring).
    Returns a float64 numpy vector (not clipped: callers decide what a negative means).
    """
    if method not in HESSIAN_METHODS:
        raise ValueError(f"method = {method!r}; expected one of {HESSIAN_METHODS}")
    batches = list(batches)
    if not batches:
        raise ValueError("no batches to estimate the Hessian on; expected at least one")
    n = len(variables)
    hvp = hvp or hessian_vector_product(loss_fn, variables)
    rng = np.random.RandomState(seed)
    total = np.zeros(n)
    for x, y in batches:
        if method == "exact":
            for i in range(n):
                total[i] += float(hvp(x, y, tf.one_hot(i, n, dtype=tf.float32))[i])
        else:
            z = rng.choice([-1.0, 1.0], size=n).astype(np.float32)
            total += z * hvp(x, y, tf.constant(z)).numpy()
    return total / len(batches)


# ---- pruning ----------------------------------------------------------------------------
def prune_cell(cell, dead_edges, dead_ops):
    """`cell` without the edges in dead_edges, then the operations in dead_ops.

    dead_edges: [(gamma, (src, dst))], dead_ops: [(gamma, (src, dst, op))]; each list is
    removed weakest first, edges before operations. A removal that would leave the cell
    without a path from its inputs to its output is skipped. Returns (cell, edges
    removed, operations removed besides those of removed edges).
    """
    before = len([e for e in cell.edges if e.ops])
    cell, _, _ = genotype_lib.remove_dead(cell, [(g, "edge", k) for g, k in dead_edges])
    edges_gone = before - len([e for e in cell.edges if e.ops])
    cell, ops, _ = genotype_lib.remove_dead(cell, [(g, "op", k) for g, k in dead_ops])
    return cell, edges_gone, ops


def group_key(kind, src, dst, op=None):
    """Group name: one switch position in every cell of one kind."""
    key = f"{kind}/{L.edge_name(src, dst)}"
    return key if op is None else f"{key}/{op}"


class BayesNAS(base.Strategy):
    name = "bayes"
    arch = "switch"
    bilevel = False   # the switches train with the weights, on the training split

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.gamma = {}      # group -> relevance
        self.omega = {}      # group -> group-lasso weight
        self.hessian = {}    # group -> mean H over its cells at the last update
        self.updates = 0
        self.pruned = {"edges": 0, "operations": 0}
        self._omega_var = None
        self._omega_keys = ()
        self._hvp = None
        self.update_seconds = None
        self.given = None    # a given network's size (--genotype): what compression starts from

    # ---- structure ---------------------------------------------------------------
    def initial_genotype(self):
        cfg, info = self.cfg, self.info
        if cfg.genotype:
            # Structured sparsity: compress a given network by pruning its operations
            # and edges (the paper's CNN compression use).
            g = fixed.load_genotype(cfg.genotype, info)
        else:
            g = genotype_lib.initial(cfg.space, info.input_shape, info.num_classes, cfg.scale,
                                     cfg.nodes, cfg.patterns, max(1, info.max_patterns), 1.0,
                                     stem_stride=cfg.stem_stride)
        cells = tuple(dataclasses.replace(c, edges=tuple(
            dataclasses.replace(e, ops=tuple((o, 1.0) for o, _ in e.ops)) for e in c.edges))
            for c in g.cells)
        return dataclasses.replace(g, cells=cells)

    def final_genotype(self, net):
        return net.current_genotype().canonical()

    # ---- the groups -------------------------------------------------------------------
    def groups(self, net):
        """{group: [(kind 'edge' or 'op', lambda, switch variable), ...]} in a fixed order."""
        out = {}
        for spec, cell in zip(net.genotype.cells, net.cells):
            for e in spec.edges:
                edge = cell.edges[L.edge_name(e.src, e.dst)]
                if edge.parent is not None:
                    out.setdefault(group_key(spec.kind, e.src, e.dst), []).append(
                        ("edge", self.cfg.bayes_lambda_edge, edge.parent.w))
                for op, p in zip(edge.op_names, edge.pruners):
                    out.setdefault(group_key(spec.kind, e.src, e.dst, op), []).append(
                        ("op", self.cfg.bayes_lambda_op, p.w))
        return out

    def _defaults(self, groups):
        # Every group starts at gamma = omega = 1 (the authors drew them uniformly in
        # (0, 1); a constant keeps a run repeatable). The first update, after the
        # warm-up epoch, replaces both with values from the data.
        for k in groups:
            self.gamma.setdefault(k, 1.0)
            self.omega.setdefault(k, 1.0)

    # ---- the training step -----------------------------------------------------------
    def arch_variables(self, net):
        return [p.w for _, _, _, p in net.gates()]

    def arch_trainable(self, epoch):
        return epoch >= self.cfg.bayes_warmup_epochs

    def loss(self, net):
        """sum over groups of lambda * omega * ||s_group||_2, on the stacked switches."""
        groups = self.groups(net)
        self._defaults(groups)
        keys = sorted(groups)
        variables, segments, lams = [], [], []
        for i, k in enumerate(keys):
            for _, lam, v in groups[k]:
                variables.append(v)
                segments.append(i)
            lams.append(groups[k][0][1])
        self._omega_keys = tuple(keys)
        # omega changes after every update without a rebuild: a variable the traced
        # step reads, assigned between epochs.
        self._omega_var = tf.Variable([self.omega[k] for k in keys], dtype=tf.float32,
                                      trainable=False, name="bayes_omega")
        omega, seg = self._omega_var, tf.constant(segments, tf.int32)
        lam_vec, n = tf.constant(lams, tf.float32), len(keys)

        def group_lasso(inputs):
            s = tf.stack([v.value for v in variables])
            sq = tf.math.unsorted_segment_sum(tf.square(s), seg, n)
            # +eps: the norm's gradient is NaN at 0, where a collapsed group sits.
            return tf.reduce_sum(lam_vec * omega * tf.sqrt(sq + 1e-12))
        return group_lasso

    # ---- between epochs -------------------------------------------------------------
    def begin(self, net, fresh):
        self._hvp = None   # the variables changed: trace the Hessian products again
        if fresh and self.cfg.genotype:
            g = net.genotype
            self.given = {"operations": g.num_ops(),
                          "params": memory_lib.estimate(g, 1)["params"]}
        if net.with_pruners:
            self._defaults(self.groups(net))

    def _nll(self, net):
        model = net.model

        def nll(x, y):
            outs = model(x, training=False)
            logits = outs[0] if isinstance(outs, (list, tuple)) else outs
            return tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
                y, logits, from_logits=True))
        return nll

    def update(self, net, epoch):
        """One Laplace update of every group from held-out batches; returns the Hessians."""
        cfg = self.cfg
        groups = self.groups(net)
        self._defaults(groups)
        keys = sorted(groups)
        variables = [v for k in keys for _, _, v in groups[k]]
        if self._hvp is None:
            self._hvp = hessian_vector_product(self._nll(net), variables)
        batches = self.batches(cfg.bayes_hessian_batches, epoch)
        diag = hessian_diagonal(None, variables, batches, cfg.bayes_hessian,
                                seed=cfg.seed * 1000 + epoch, hvp=self._hvp)
        values = np.array([float(v.numpy()) for v in variables])
        offsets = np.cumsum([0] + [len(groups[k]) for k in keys])
        parents, new_gamma, new_omega = {}, {}, {}
        # Parents first: a child's prior combines with its edge's new gamma.
        for k in sorted(keys, key=lambda k: k.count("/")):
            at, n = offsets[keys.index(k)], len(groups[k])
            h, s = diag[at:at + n], values[at:at + n]
            lam = groups[k][0][1]
            gamma, omega, _ = laplace_update(self.gamma[k], h, s, lam)
            if groups[k][0][0] == "edge":
                parents[k] = gamma
            else:
                parent = parents.get(k.rsplit("/", 1)[0])
                if parent is not None:
                    gamma = combine(gamma, parent)
            new_gamma[k], new_omega[k] = gamma, omega
            self.hessian[k] = float(np.mean(h))
        self.gamma.update(new_gamma)
        self.omega.update(new_omega)
        self.updates += 1
        if self._omega_var is not None and self._omega_keys:
            self._omega_var.assign([self.omega.get(k, 1.0) for k in self._omega_keys])

    def after_epoch(self, epoch, net):
        started = time.time()
        self.update(net, epoch)
        self.update_seconds = time.time() - started
        change = base.Change()
        g = net.current_genotype()
        bar = self.cfg.bayes_threshold
        cells, edges_gone, ops_gone = [], 0, 0
        for cell in g.cells:
            dead_edges = [(self.gamma[group_key(cell.kind, e.src, e.dst)], (e.src, e.dst))
                          for e in cell.edges
                          if self.gamma.get(group_key(cell.kind, e.src, e.dst), math.inf) < bar]
            dead_ops = [(self.gamma[group_key(cell.kind, e.src, e.dst, o)], (e.src, e.dst, o))
                        for e in cell.edges for o, _ in e.ops
                        if self.gamma.get(group_key(cell.kind, e.src, e.dst, o), math.inf) < bar]
            cell, a, b = prune_cell(cell, dead_edges, dead_ops)
            cells.append(cell)
            edges_gone, ops_gone = edges_gone + a, ops_gone + b
        if edges_gone or ops_gone:
            new = dataclasses.replace(g, cells=tuple(cells)).canonical()
            lost_edges = sum(len(c.edges) for c in g.cells) - sum(len(c.edges) for c in new.cells)
            self.pruned["edges"] += lost_edges
            self.pruned["operations"] += g.num_ops() - new.num_ops()
            change.genotype = new
            change.events.append(
                f"prune: {lost_edges} edges and {g.num_ops() - new.num_ops()} operations "
                f"({edges_gone} edges and {ops_gone} operations had gamma below {bar:g}; the "
                f"rest were cut off with them)")
        return change

    def record(self, net):
        if not net.with_pruners:
            return {"bayes_updates": self.updates}
        live = self.groups(net)
        gammas = {k: round(self.gamma[k], 6) for k in sorted(live) if k in self.gamma}
        return {"bayes_updates": self.updates, "bayes_update_seconds": self.update_seconds,
                "gammas": gammas,
                "gamma_min": min(gammas.values()) if gammas else None,
                "pruned_edges": self.pruned["edges"],
                "pruned_operations": self.pruned["operations"]}

    def summary(self, final):
        if self.given is None:
            return {}
        g = final.genotype
        # Both sizes from the same analytical count, so the ratio compares like with like.
        return {"compression_of_given": {
            "operations": [self.given["operations"], g.num_ops()],
            "params": [self.given["params"], memory_lib.estimate(g, 1)["params"]]}}

    # ---- checkpoints ----------------------------------------------------------------
    def state(self):
        return {"gamma": self.gamma, "omega": self.omega, "hessian": self.hessian,
                "updates": self.updates, "pruned": self.pruned, "given": self.given}

    def load_state(self, state):
        self.gamma = {k: float(v) for k, v in state["gamma"].items()}
        self.omega = {k: float(v) for k, v in state["omega"].items()}
        self.hessian = {k: float(v) for k, v in state["hessian"].items()}
        self.updates = int(state["updates"])
        self.pruned = {k: int(v) for k, v in state["pruned"].items()}
        self.given = state.get("given")
