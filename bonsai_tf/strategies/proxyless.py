"""ProxylessNAS: binary paths sampled per step, BinaryConnect gradients to the alphas
(Cai, Zhu, Han, ICLR 2019; METHODS.md).

Every edge holds its operations and one architecture weight alpha each; p =
softmax(alpha). Each training step draws, per edge, a pair of operations from p and
makes one of them active with probability p~ = softmax(alpha_pair): only those two are
computed, only the active one reaches the output (`layers.Edge` with mixing "binary").
The gradient to alpha_pair is BinaryConnect's, dL/dalpha_i = sum_j dL/dg_j p~_j
(delta_ij - p~_i) over the pair, which a straight-through gate g_j = [j active] + p~_j -
stop_gradient(p~_j) gives by autodiff. After each alpha step (Adam, on a validation
batch, first-order bi-level) the pair is rescaled so the probabilities of every other
operation stay as they were (`rescale_pair`). Warm-up epochs train the weights alone,
on random paths (all alphas equal). The final network keeps each edge's most probable
operation.

With `proxyless_grad="reinforce"` the alphas learn by REINFORCE instead (the paper's
variant for objectives without a gradient). The policy is the full softmax of each
edge: every step draws one operation a ~ p = softmax(alpha) per edge (Gumbel-max,
`layers.gumbel_max`) and runs it alone, ungated (`layers.Edge` with mixing
"reinforce"). Not the pair of the BinaryConnect variant: REINFORCE needs no second
candidate to compare with, its log p(a) is that of the whole edge, and the score
d log p(a) / d alpha = onehot(a) - p moves every alpha of the edge in a way whose
expectation is the gradient of the expected reward, so there is no pair to rescale
afterwards. The reward is R = -(the sampled network's loss on the architecture batch);
the alpha gradient is -(R - b) * sum over edges of d log p_e(a_e) / d alpha
(`reinforce_surrogate`), b a moving average of earlier rewards
(`REINFORCE_BASELINE_DECAY`), which lowers the variance and, not depending on this
step's draw, leaves the expectation as it is. A latency target keeps its differentiable
term log(E[latency] / target)^2 in the loss: REINFORCE is only for the sampled path,
whose loss has no gradient to the alphas here.
"""

import logging

import numpy as np
import tensorflow as tf

from bonsai_tf import genotype as genotype_lib
from bonsai_tf import layers as L
from bonsai_tf.strategies import base

log = logging.getLogger("bonsai_tf")

# The reward baseline's moving-average decay, b <- 0.9 b + 0.1 R: it follows about the
# last ten architecture steps, so it tracks the reward as the weights improve within an
# epoch while still averaging out single batches.
REINFORCE_BASELINE_DECAY = 0.9


def rescale_pair(old, new, pair):
    """The alphas after a two-path step: the pair's updated values shifted so that the
    pair's total exp(alpha) is what it was, every other alpha as it was (numpy).

    Then p of every operation outside the pair is unchanged, and the pair shares the
    probability it had, in the ratio the step gave it.
    """
    old, new = np.asarray(old, np.float64), np.asarray(new, np.float64)
    pair = list(pair)
    out = old.copy()
    shift = np.logaddexp.reduce(old[pair]) - np.logaddexp.reduce(new[pair])
    out[pair] = new[pair] + shift
    return out


def _rescale_pair_tf(old, new, pair):
    """rescale_pair in TensorFlow, traced into the architecture step."""
    shift = (tf.reduce_logsumexp(tf.gather(old, pair)) -
             tf.reduce_logsumexp(tf.gather(new, pair)))
    in_pair = tf.reduce_sum(tf.one_hot(pair, tf.shape(old)[0]), 0) > 0
    return tf.where(in_pair, new + shift, old)


def binaryconnect_gradient(alphas, dl_dg):
    """dL/dalpha_i = sum_j dL/dg_j p_j (delta_ij - p_i), p = softmax(alphas) (numpy):
    the estimator the two-path gates compute over their pair."""
    a = np.asarray(alphas, np.float64)
    p = np.exp(a - a.max())
    p /= p.sum()
    g = np.asarray(dl_dg, np.float64)
    return p * g - p * np.dot(p, g)


def reinforce_surrogate(alphas, index, advantage):
    """-sum over draws of advantage * log softmax(alphas)[index] (TF): a loss whose
    gradient to the alphas is REINFORCE's estimate of -d E[R] / d alpha,
    -(R - b) * (onehot(index) - softmax(alphas)), for the draws `index` of
    softmax(alphas) with advantages R - b (no gradient flows into the advantages).

    alphas: (K,); index and advantage: scalars (one edge's draw in a step), or (N,)
    each (N draws: their sum).
    """
    log_p = tf.nn.log_softmax(alphas)
    return -tf.reduce_sum(tf.stop_gradient(advantage) * tf.gather(log_p, index))


def expected_latency(edges, fixed_ms):
    """E[latency] = fixed_ms + sum over edges of sum_j softmax(alpha)_j * latency_j (TF).

    edges: [(alpha variables, latencies in ms)], one per edge.
    """
    total = tf.constant(float(fixed_ms))
    for alphas, ms in edges:
        p = tf.nn.softmax(tf.stack([a.value for a in alphas]))
        total = total + tf.reduce_sum(p * tf.constant(ms, tf.float32))
    return total


def latency_penalty(expected_ms, target_ms, weight):
    """weight * log(E / target)^2: symmetric, so the search aims at the target from either side."""
    return weight * tf.square(tf.math.log(expected_ms / target_ms))


class ProxylessNAS(base.Strategy):
    name = "proxyless"
    arch = "binary"
    bilevel = True

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.op_ms = None        # {(cell, src, dst, op): ms} from the latency table
        self.fixed_ms = None     # the rest of a one-operation-per-edge network
        self.reinforce = cfg.proxyless_grad == "reinforce"
        self.arch = "reinforce" if self.reinforce else "binary"
        # REINFORCE's baseline and the number of rewards it has seen: variables, so the
        # traced architecture step updates them; checkpointed through state().
        self.baseline = tf.Variable(0.0, trainable=False, name="reinforce_baseline")
        self.rewards_seen = tf.Variable(0.0, trainable=False, name="reinforce_rewards")

    # ---- the hardware term ------------------------------------------------------------
    def _latency_table(self, net):
        """Per-operation latencies of this supernet, from the table measured on this
        machine (measured now where the cache lacks entries: bench/latency_table.py)."""
        from bonsai_tf import latency as latency_lib
        g = net.genotype
        q = self.cfg.latency_int8
        table = latency_lib.load_or_build(g, quantized=q, log=log.info)
        self.op_ms = latency_lib.edge_latencies(g, table, q)
        # Every final network has one operation per edge: the fixed parts (stem, adapters,
        # sums, head, the call itself) are those of such a network.
        one = self.final_genotype(net)
        self.fixed_ms = (latency_lib.predict(one, table, q) -
                         sum(latency_lib.edge_latencies(one, table, q).values()))

    def latency_edges(self, net):
        edges = []
        for c, cell in enumerate(net.cells):
            for e in cell.cell.edges:
                layer = cell.edges[L.edge_name(e.src, e.dst)]
                edges.append(([p.w for p in layer.pruners],
                              [self.op_ms[(c, e.src, e.dst, op)] for op in layer.op_names]))
        return edges

    def loss(self, net):
        cfg = self.cfg
        if cfg.latency_target_ms <= 0 or cfg.latency_weight <= 0:
            return None
        if self.op_ms is None:
            self._latency_table(net)
        edges, fixed, target, w = (self.latency_edges(net), self.fixed_ms,
                                   cfg.latency_target_ms, cfg.latency_weight)

        def latency_term(inputs):
            return latency_penalty(expected_latency(edges, fixed), target, w)
        return latency_term

    # ---- structure ---------------------------------------------------------------
    def initial_genotype(self):
        cfg, info = self.cfg, self.info
        # alpha = 0 everywhere: the warm-up draws paths uniformly.
        return genotype_lib.initial(cfg.space, info.input_shape, info.num_classes, cfg.scale,
                                    cfg.nodes, cfg.patterns, max(1, info.max_patterns), 0.0,
                                    stem_stride=cfg.stem_stride)

    def final_genotype(self, net):
        """The most probable operation of every edge."""
        return genotype_lib.strongest_ops(net.current_genotype())

    # ---- the training step -----------------------------------------------------------
    def arch_variables(self, net):
        return [p.w for _, _, _, p in net.gates()]

    def arch_trainable(self, epoch):
        return epoch >= self.cfg.proxyless_warmup_epochs

    def arch_loss(self, net):
        """REINFORCE's surrogate over every sampled edge, from the network's loss on the
        architecture batch; it also moves the baseline on by this step's reward."""
        edges = [edge for cell in net.cells for edge in cell.edges.values()
                 if getattr(edge, "reinforce", False)]
        if not self.reinforce or not edges:
            return None
        baseline, seen, decay = self.baseline, self.rewards_seen, REINFORCE_BASELINE_DECAY

        def reinforce_term(net_loss, inputs):
            reward = -tf.stop_gradient(net_loss)
            # The first reward is its own baseline (advantage 0): from b = 0 the first
            # advantages would be the whole loss, a large push against every drawn
            # operation that only the drift of the baseline would undo.
            b = tf.where(seen > 0, baseline.read_value(), reward)
            advantage = reward - b
            term = tf.add_n([reinforce_surrogate(edge.alphas(), edge.last_path.value,
                                                 advantage) for edge in edges])
            # After the advantage: b must not depend on this step's draw (unbiasedness).
            baseline.assign(decay * b + (1.0 - decay) * reward)
            seen.assign_add(1.0)
            return term
        return reinforce_term

    def after_arch_step(self, net, arch_vars):
        if self.reinforce:
            return None   # the full softmax is the policy: no pair to rescale
        index = {v.path: i for i, v in enumerate(arch_vars)}
        edges = [(edge, [index[p.w.path] for p in edge.pruners])
                 for cell in net.cells for edge in cell.edges.values()
                 if getattr(edge, "binary", False)]
        if not edges:
            return None

        def rescale(old):
            for edge, ids in edges:
                before = tf.stack([old[i] for i in ids])
                after = _rescale_pair_tf(before, edge.alphas(), edge.last_pair.value)
                for k, p in enumerate(edge.pruners):
                    p.w.assign(after[k])
        return rescale

    # ---- records ---------------------------------------------------------------------
    def record(self, net):
        if not net.with_pruners:
            return {}
        g = net.current_genotype()
        probs, strongest = {}, []
        for c, cell in enumerate(g.cells):
            for e in cell.edges:
                a = np.array([w for _, w in e.ops], np.float64)
                p = np.exp(a - a.max())
                p /= p.sum()
                probs[f"{c}/{L.edge_name(e.src, e.dst)}"] = {
                    o: round(float(x), 5) for (o, _), x in zip(e.ops, p)}
                strongest.append(float(p.max()))
        # The same key ASAP writes: the report draws it as alphas.png.
        out = {"mixing_weights": probs,
               "strongest_mean": float(np.mean(strongest)) if strongest else None}
        if self.op_ms is not None:
            out["expected_latency_ms"] = float(expected_latency(self.latency_edges(net),
                                                                self.fixed_ms))
        if self.reinforce:
            out["reward_baseline"] = float(self.baseline.numpy())
        return out

    # ---- checkpoints ----------------------------------------------------------------
    STATE_KEYS = ("reinforce_baseline", "reinforce_rewards")

    def state(self):
        if not self.reinforce:
            return {}
        # float32 -> float -> JSON and back is exact: a resumed run goes on with the same b.
        return {"reinforce_baseline": float(self.baseline.numpy()),
                "reinforce_rewards": int(self.rewards_seen.numpy())}

    def load_state(self, state):
        if not self.reinforce:
            return super().load_state(state)
        if sorted(state) != sorted(self.STATE_KEYS):
            raise ValueError(f"proxyless strategy state has keys {sorted(state)}; expected "
                             f"{sorted(self.STATE_KEYS)} (proxyless_grad=reinforce)")
        self.baseline.assign(float(state["reinforce_baseline"]))
        self.rewards_seen.assign(float(state["reinforce_rewards"]))
