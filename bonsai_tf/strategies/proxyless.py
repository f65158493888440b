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

import hashlib
import json
import logging
import time

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


def _alphas_digest(genotype):
    """A digest of the supernet's operations and alphas: a chosen network is reused only
    for the alphas it was chosen from."""
    blob = json.dumps(genotype.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


# The final selection measures at most this many candidate networks: each measurement
# converts and times a whole network (5-7 s for the quick configuration's here); the
# greedy steps between measurements are table predictions, rescaled by the last one.
SELECT_MEASURES = 8


def _log_probs(genotype):
    out = {}
    for c, cell in enumerate(genotype.cells):
        for k, e in enumerate(cell.edges):
            a = np.array([w for _, w in e.ops], np.float64)
            out[(c, k)] = a - np.logaddexp.reduce(a)
    return out


def greedy_path(genotype, predict, down=True, start=None, limit=None):
    """From `start` (a choice; default the argmax of `genotype`, whose operation weights
    are alphas) down to the cheapest one-operation-per-edge network (`down`), or up
    while the predicted latency stays at or under `limit` (None: up to the dearest),
    one switch at a time: each step switches the edge whose cheaper (dearer) operation
    costs the least log-probability per ms saved (added), log p(current) - log p(other)
    over the difference `predict` gives (negative where the other operation is the
    more probable one: those come first).

    Returns [(choice, predicted ms, switch)]: choice[(cell, edge)] indexes the kept
    operation in the edge's `ops`; the first entry is `start` (switch None).
    """
    sign = 1.0 if down else -1.0
    log_p = _log_probs(genotype)
    if start is None:
        start = {key: int(np.argmax(lp)) for key, lp in log_p.items()}
    choice = dict(start)
    predicted = predict(genotype_lib.one_op_per_edge(genotype, choice))
    path = [(dict(choice), predicted, None)]
    while True:
        best = None
        for (c, k), lp in log_p.items():
            here = choice[(c, k)]
            for j in range(len(lp)):
                if j == here:
                    continue
                trial = predict(genotype_lib.one_op_per_edge(genotype, {**choice, (c, k): j}))
                saved = sign * (predicted - trial)
                if saved <= 0 or (limit is not None and trial > limit):
                    continue
                cost = (lp[here] - lp[j]) / saved
                if best is None or cost < best[0]:
                    best = (cost, (c, k), j, saved)
        if best is None:
            return path   # every edge at its cheapest (dearest, or the limit) operation
        _, key, j, saved = best
        e = genotype.cells[key[0]].edges[key[1]]
        switch = {"cell": key[0], "edge": L.edge_name(e.src, e.dst),
                  "from": e.ops[choice[key]][0], "to": e.ops[j][0],
                  "saved_ms": round(float(sign * saved), 5),
                  "log_p_lost": round(float(log_p[key][choice[key]] - log_p[key][j]), 5)}
        choice[key] = j
        predicted -= sign * saved
        path.append((dict(choice), predicted, switch))


def _first_fit(preds, target_ms, scale=1.0):
    """The first step whose rescaled prediction is at or under the target (the last
    step where none is)."""
    return next((k for k, p in enumerate(preds) if scale * p <= target_ms), len(preds) - 1)


def _boundary(preds, target_ms, measure_at, budget, known_under, known_over, scale, rising):
    """The search of one path for the step where the measured latency crosses the target.

    `preds` are the path's predicted latencies, falling (`rising` False: the first step
    measured at or under the target is wanted) or rising (the last one). Each guess is
    the step the table, rescaled by the last measured step's measured/predicted, puts at
    the crossing, kept strictly between the steps known on either side (a guess outside
    moves to the nearest step inside). Returns (the step wanted or None, scale).
    """
    under, over = known_under, known_over
    n = len(preds)

    def crossing(scale):
        if not rising:
            return _first_fit(preds, target_ms, scale)
        fits = [k for k, p in enumerate(preds) if scale * p <= target_ms]
        return fits[-1] if fits else 0
    while budget() > 0:
        if rising:
            lo, hi = (-1 if under is None else under), (n if over is None else over)
        else:
            lo, hi = (-1 if over is None else over), (n if under is None else under)
        if hi - lo <= 1:
            break
        guess = min(max(crossing(scale), lo + 1), hi - 1)
        ms = measure_at(guess)
        if ms <= target_ms:
            under = guess
        else:
            over = guess
        if preds[guess] > 0:
            scale = ms / preds[guess]
    return under, scale


def select_under_target(genotype, target_ms, predict, measure=None,
                        max_measures=SELECT_MEASURES):
    """The final network under a latency target: (genotype, record).

    `genotype` is the supernet's, its operation weights the alphas. The search holds the
    *expected* latency at the target, but the argmax of a distribution that has not
    converged is not that network: in the quick runs of the README it measured 41% above
    a 0.6 ms target and 30% below a 0.3 ms one. A target is a budget, to be met and
    spent (as BonsaiNet's growth fills its memory budget), so:

    1. down: on `greedy_path` down from the argmax (the cheapest ways in probability
       per ms), the first network at or under the target (the argmax itself if it is);
    2. up: from there, `greedy_path` up while the latency stays at or under the target
       (the ways that cost least probability per ms added, which first restores more
       probable operations that the first part switched away), its last such network.

    Without `measure`, "at or under" is the table's prediction. With it (a whole
    network, converted and timed here), the table only guides (`_boundary`): it misses
    how the whole network runs (fusion, caches; -5% to +17% here), so each part is
    searched for its crossing by measuring, at most `max_measures` networks in all. If
    no network of the first part was measured under the target, the one the rescaled
    table puts there is taken, and the record says the target was not met.
    """
    if not target_ms > 0:
        raise ValueError(f"target_ms = {target_ms!r}; expected a latency target > 0 ms")
    measured = []      # {part, switches, predicted_ms, measured_ms} of every network timed
    spent = {"n": 0}

    def budget():
        return max_measures - spent["n"] if measure is not None else 0

    def measurer(part, path):
        cache = {}

        def at(k):
            if k not in cache:
                spent["n"] += 1
                cache[k] = float(measure(genotype_lib.one_op_per_edge(genotype, path[k][0])))
                measured.append({"part": part, "switches": k,
                                 "predicted_ms": round(float(path[k][1]), 5),
                                 "measured_ms": round(cache[k], 5)})
            return cache[k]
        return at, cache

    down = greedy_path(genotype, predict)
    preds = [p for _, p, _ in down]
    final_ms = None
    if measure is None:
        pick, scale, verified = _first_fit(preds, target_ms), 1.0, True
    else:
        at, cache = measurer("down", down)
        pick, scale = _boundary(preds, target_ms, at, budget, None, None, 1.0, rising=False)
        verified = pick is not None
        if verified:
            final_ms = cache[pick]
        else:   # nothing measured under: the table's guess, unverified
            over = max(cache) if cache else -1
            pick = min(max(_first_fit(preds, target_ms, scale), over + 1), len(down) - 1)
    (choice, predicted, _), ups = down[pick], []
    # Up while steps fit; again after each measurement that shows room the rescaled
    # table had not seen (its scale changes with the network measured).
    while verified:
        up = greedy_path(genotype, predict, down=False, start=choice, limit=target_ms / scale)
        if len(up) == 1:
            break
        if measure is None:
            top = len(up) - 1
        else:
            at, cache = measurer("up", up)
            top, scale = _boundary([p for _, p, _ in up], target_ms, at, budget, 0, None,
                                   scale, rising=True)
            final_ms = cache.get(top, final_ms)
        ups += [sw for _, _, sw in up[1:top + 1]]
        choice, predicted, _ = up[top]
        if top == 0 or measure is None or budget() <= 0:
            break
    final = genotype_lib.one_op_per_edge(genotype, choice)
    record = {"target_ms": float(target_ms),
              "argmax_predicted_ms": round(float(preds[0]), 5),
              "argmax_measured_ms": next((m["measured_ms"] for m in measured
                                          if m["part"] == "down" and m["switches"] == 0), None),
              "predicted_ms": round(float(predicted), 5),
              "direction": "+".join(d for d, n in (("down", pick), ("up", len(ups))) if n)
              or "argmax",
              "switches": [sw for _, _, sw in down[1:pick + 1]] + ups,
              "measurements": measured,
              "measured_ms": None if final_ms is None else round(final_ms, 5),
              "met": (final_ms <= target_ms if final_ms is not None
                      else measure is None and predicted <= target_ms)}
    return final, record


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
        self.table = None
        # The final network chosen under the latency target (`select_under_target`) and
        # the alphas it was chosen from: chosen once, checkpointed, reported.
        self.selection = None

    # ---- the hardware term ------------------------------------------------------------
    def _latency_table(self, net):
        """Per-operation latencies of this supernet, from the table measured on this
        machine (measured now where the cache lacks entries: bench/latency_table.py)."""
        from bonsai_tf import latency as latency_lib
        g = net.genotype
        q = self.cfg.latency_int8
        table = self.table = latency_lib.load_or_build(g, quantized=q, log=log.info)
        self.op_ms = latency_lib.edge_latencies(g, table, q)
        # Every final network has one operation per edge: the fixed parts (stem, adapters,
        # sums, head, the call itself) are those of such a network.
        one = genotype_lib.strongest_ops(g)
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
        """The most probable operation of every edge; under a latency target (unless
        `latency_select="argmax"`, the paper's rule), the most probable network found
        at or below the target (`select_under_target`), measured on this machine
        (`latency_select="measured"`) or predicted by the table ("table")."""
        g = net.current_genotype()
        cfg = self.cfg
        if cfg.latency_target_ms <= 0 or cfg.latency_select == "argmax":
            return genotype_lib.strongest_ops(g)
        digest = _alphas_digest(g)
        if self.selection is not None and self.selection["alphas_digest"] == digest:
            return genotype_lib.Genotype.from_dict(self.selection["genotype"])
        from bonsai_tf import latency as latency_lib
        if self.table is None:
            self._latency_table(net)
        q, table = cfg.latency_int8, self.table

        def measure(candidate):
            ms = latency_lib.network_latency(candidate, quantized=q)
            log.info("latency selection: measured %.3f ms (target %.3f ms, predicted %.3f ms)",
                     ms, cfg.latency_target_ms, latency_lib.predict(candidate, table, q))
            return ms
        started = time.time()
        final, record = select_under_target(
            g, cfg.latency_target_ms, lambda c: latency_lib.predict(c, table, q),
            measure if cfg.latency_select == "measured" else None)
        record.update(select=cfg.latency_select, seconds=round(time.time() - started, 2),
                      alphas_digest=digest, genotype=final.to_dict())
        self.selection = record
        log.info("latency selection: %d switch(es) from the argmax, %s", len(record["switches"]),
                 "target met" if record["met"] else "target NOT met (every edge at its cheapest "
                 "operation, or measurements used up)")
        return final

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
        out = {} if self.selection is None else {"latency_selection": self.selection}
        if not self.reinforce:
            return out
        # float32 -> float -> JSON and back is exact: a resumed run goes on with the same b.
        return {**out, "reinforce_baseline": float(self.baseline.numpy()),
                "reinforce_rewards": int(self.rewards_seen.numpy())}

    def load_state(self, state):
        state = dict(state)
        self.selection = state.pop("latency_selection", None)
        if not self.reinforce:
            return super().load_state(state)
        if sorted(state) != sorted(self.STATE_KEYS):
            raise ValueError(f"proxyless strategy state has keys {sorted(state)}; expected "
                             f"{sorted(self.STATE_KEYS)} (proxyless_grad=reinforce)")
        self.baseline.assign(float(state["reinforce_baseline"]))
        self.rewards_seen.assign(float(state["reinforce_rewards"]))

    def summary(self, final):
        if self.selection is None:
            return {}
        return {"latency_selection": {k: v for k, v in self.selection.items()
                                      if k not in ("genotype", "alphas_digest")}}
