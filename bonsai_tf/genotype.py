"""The genotype: a network of the search space as plain, versioned data.

A genotype lists every cell: its kind, its channels, which earlier outputs feed
its `y` input (each with its input gate's weight) and which operations survive on
which edges (each with its gate weight). A search starts from the full genotype
(every operation on every edge) and ends with what survived, so "the found
network is the search space minus what was pruned". No TensorFlow here.

Cell wiring (see BONSAINET.md section 2): inputs `x` (previous output) and `y`
(gated sum of earlier outputs, 0 = stem, i + 1 = cell i); `nodes` intermediate
nodes; edges from "x" and "y" to every node and from node i to every node j > i;
the cell's output is its last node.
"""

import dataclasses
import hashlib
import json
import random

from bonsai_tf import space as space_lib

FORMAT = "bonsai-tf/genotype"
VERSION = 1
CELL_KINDS = ("normal", "reduction")


class GenotypeError(ValueError):
    """A genotype that is malformed, inconsistent or from an unknown version."""


@dataclasses.dataclass(frozen=True)
class Edge:
    src: object          # "x", "y" or an int node index
    dst: int
    ops: tuple           # ((op name, gate weight), ...) of the surviving operations

    def op_names(self):
        return tuple(name for name, _ in self.ops)


@dataclasses.dataclass(frozen=True)
class Cell:
    kind: str
    channels: int
    nodes: int
    aux: bool            # its auxiliary head is preserved when the network grows
    inputs: tuple        # ((earlier output index, gate weight), ...) feeding `y`
    edges: tuple         # (Edge, ...)

    @property
    def reduction(self):
        return self.kind == "reduction"

    def edge(self, src, dst):
        for e in self.edges:
            if e.src == src and e.dst == dst:
                return e
        return None

    def num_ops(self):
        return sum(len(e.ops) for e in self.edges)


@dataclasses.dataclass(frozen=True)
class Genotype:
    space: str
    input_shape: tuple   # (height, width, channels)
    num_classes: int
    scale: int
    nodes: int
    patterns: tuple      # e.g. (("n", "na"), ("r",))
    cells: tuple         # (Cell, ...)
    stem_stride: int = 1  # 2 halves the resolution in the stem: 4x cheaper cells on CPU
    version: int = VERSION

    # ---- structure -------------------------------------------------------
    def validate(self):
        ops = set(space_lib.space_ops(self.space))
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise GenotypeError(f"input_shape must be (height, width, channels), got {self.input_shape!r}")
        if self.stem_stride not in (1, 2):
            raise GenotypeError(f"stem_stride must be 1 or 2, got {self.stem_stride!r}")
        if self.num_classes < 2:
            raise GenotypeError(f"num_classes must be at least 2, got {self.num_classes}")
        parse_patterns(self.patterns)
        for c, cell in enumerate(self.cells):
            where = f"cell {c}"
            if cell.kind not in CELL_KINDS:
                raise GenotypeError(f"{where}: kind {cell.kind!r}, expected one of {CELL_KINDS}")
            if cell.channels < 1 or cell.nodes < 1:
                raise GenotypeError(f"{where}: channels and nodes must be positive, got "
                                    f"{cell.channels} and {cell.nodes}")
            for j, _ in cell.inputs:
                if not isinstance(j, int) or not 0 <= j <= c:
                    raise GenotypeError(f"{where}: input {j!r} is not an earlier output; "
                                        f"expected an index in [0, {c}]")
            seen = set()
            for e in cell.edges:
                valid_src = e.src in ("x", "y") or (isinstance(e.src, int) and 0 <= e.src < cell.nodes)
                if not valid_src or not isinstance(e.dst, int) or not 0 <= e.dst < cell.nodes or (
                        isinstance(e.src, int) and e.src >= e.dst):
                    raise GenotypeError(f"{where}: edge {e.src!r}->{e.dst!r} is not in a cell of "
                                        f"{cell.nodes} nodes")
                if (e.src, e.dst) in seen:
                    raise GenotypeError(f"{where}: edge {e.src!r}->{e.dst!r} appears twice")
                seen.add((e.src, e.dst))
                for name, _ in e.ops:
                    if name not in ops:
                        raise GenotypeError(f"{where}: unknown operation {name!r} on edge "
                                            f"{e.src!r}->{e.dst!r}; expected one of {sorted(ops)}")
            if not _reaches_output(cell):
                raise GenotypeError(f"{where}: no path of operations from its inputs to its output node")
        return self

    def canonical(self):
        """Removes empty edges, dead nodes and unused inputs (NAS-Bench-101 style)."""
        return dataclasses.replace(self, cells=tuple(_prune_cell(c) for c in self.cells))

    def structure(self):
        """The genotype without gate weights: what identifies the architecture."""
        d = self.to_dict(weights=False)
        return d

    def hash(self):
        blob = json.dumps(self.canonical().structure(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def num_ops(self):
        return sum(c.num_ops() for c in self.cells)

    # ---- serialisation ----------------------------------------------------
    def to_dict(self, weights=True):
        def ops(e):
            return {n: float(w) for n, w in e.ops} if weights else sorted(n for n, _ in e.ops)
        return {
            "format": FORMAT,
            "version": self.version,
            "space": self.space,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "scale": self.scale,
            "stem_stride": self.stem_stride,
            "nodes": self.nodes,
            "patterns": [list(p) for p in self.patterns],
            "cells": [{
                "kind": c.kind, "channels": c.channels, "nodes": c.nodes, "aux": c.aux,
                "inputs": ({str(j): float(w) for j, w in c.inputs} if weights
                           else sorted(j for j, _ in c.inputs)),
                "edges": [{"from": e.src, "to": e.dst, "ops": ops(e)} for e in c.edges],
            } for c in self.cells],
        }

    def to_json(self):
        return json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d):
        try:
            return _from_dict(d)
        except GenotypeError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise GenotypeError(f"malformed genotype: {type(e).__name__}: {e}") from None

    @classmethod
    def from_json(cls, text):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise GenotypeError(f"genotype is not valid JSON ({e}); expected a {FORMAT} document") from None
        return cls.from_dict(d)

    @classmethod
    def load(cls, path):
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise GenotypeError(f"cannot read genotype {path!r}: {e.strerror}") from None
        try:
            return cls.from_json(text)
        except GenotypeError as e:
            raise GenotypeError(f"{path}: {e}") from None


def _check_keys(d, allowed, where):
    if not isinstance(d, dict):
        raise GenotypeError(f"{where}: expected an object, got {type(d).__name__}")
    unknown = set(d) - set(allowed)
    if unknown:
        raise GenotypeError(f"{where}: unknown field(s) {sorted(unknown)}; expected {sorted(allowed)}")
    missing = set(allowed) - set(d)
    if missing:
        raise GenotypeError(f"{where}: missing field(s) {sorted(missing)}")


def _from_dict(d):
    _check_keys(d, ("format", "version", "space", "input_shape", "num_classes", "scale",
                    "stem_stride", "nodes", "patterns", "cells"), "genotype")
    if d["format"] != FORMAT:
        raise GenotypeError(f"format is {d['format']!r}, expected {FORMAT!r}")
    if d["version"] != VERSION:
        raise GenotypeError(f"genotype version {d['version']!r} is not supported; expected {VERSION}")
    cells = []
    for i, c in enumerate(d["cells"]):
        _check_keys(c, ("kind", "channels", "nodes", "aux", "inputs", "edges"), f"cell {i}")
        edges = []
        for e in c["edges"]:
            _check_keys(e, ("from", "to", "ops"), f"cell {i} edge")
            if not isinstance(e["ops"], dict):
                raise GenotypeError(f"cell {i} edge: ops must map names to gate weights, got "
                                    f"{type(e['ops']).__name__}")
            edges.append(Edge(src=e["from"], dst=int(e["to"]),
                              ops=tuple((str(n), float(w)) for n, w in e["ops"].items())))
        if not isinstance(c["inputs"], dict):
            raise GenotypeError(f"cell {i}: inputs must map output indices to gate weights")
        cells.append(Cell(kind=c["kind"], channels=int(c["channels"]), nodes=int(c["nodes"]),
                          aux=bool(c["aux"]),
                          inputs=tuple((int(j), float(w)) for j, w in c["inputs"].items()),
                          edges=tuple(edges)))
    g = Genotype(space=str(d["space"]), input_shape=tuple(int(v) for v in d["input_shape"]),
                 num_classes=int(d["num_classes"]), scale=int(d["scale"]), nodes=int(d["nodes"]),
                 stem_stride=int(d["stem_stride"]),
                 patterns=tuple(tuple(str(x) for x in p) for p in d["patterns"]),
                 cells=tuple(cells))
    try:
        return g.validate()
    except ValueError as e:  # unknown space from space_lib
        raise GenotypeError(str(e)) from None


# ---- patterns ------------------------------------------------------------
def parse_patterns(patterns):
    """Checks a pattern list such as (("n", "na"), ("r",)) and returns it as tuples."""
    if not patterns or not all(isinstance(p, (list, tuple)) and p for p in patterns):
        raise GenotypeError(f"patterns must be a non-empty list of non-empty lists of cell codes, "
                            f"got {patterns!r}")
    for p in patterns:
        for code in p:
            if code not in ("n", "na", "r", "ra"):
                raise GenotypeError(f"unknown cell code {code!r} in patterns {patterns!r}; "
                                    f"expected 'n', 'na', 'r' or 'ra'")
    if patterns[0][0][0] != "n":
        raise GenotypeError(f"the first cell must be normal ('n'), got {patterns[0][0]!r}")
    return tuple(tuple(p) for p in patterns)


def pattern_codes(patterns, index):
    """Cell codes of the pattern number `index` (patterns repeat cyclically)."""
    return patterns[index % len(patterns)]


def max_patterns(patterns, spatial, reduction_target=1):
    """Most patterns whose reductions keep the spatial size >= reduction_target."""
    n, size = 0, spatial
    while n < 64:
        reductions = sum(code[0] == "r" for code in pattern_codes(patterns, n))
        new_size = size
        for _ in range(reductions):
            new_size = (new_size + 1) // 2
        if new_size < reduction_target or (reductions and new_size == size):
            break
        size, n = new_size, n + 1
    return n


def halve(size):
    """Spatial size after one stride-2 step with 'same' padding (a reduction)."""
    return (size + 1) // 2


def subsample_stride(src_hw, dst_hw):
    """The stride that takes an (h, w) map to `dst_hw` as the network's reductions do.

    Reductions halve with 'same' padding (ceil), so k of them take h to
    ceil(h / 2**k); one subsampling with stride 2**k (also 'same') lands on the same
    size. A floor ratio such as 14 // 4 = 3 would not (ceil(14 / 3) = 5).
    """
    (h, w), (dh, dw) = src_hw, dst_hw
    stride = 1
    while (h + stride - 1) // stride > dh or (w + stride - 1) // stride > dw:
        stride *= 2
    if ((h + stride - 1) // stride, (w + stride - 1) // stride) != (dh, dw):
        raise GenotypeError(f"cannot subsample a {h}x{w} map to {dh}x{dw}; expected a size "
                            f"that reductions of {h}x{w} reach")
    return stride


# ---- building genotypes --------------------------------------------------
def edge_keys(nodes):
    keys = []
    for dst in range(nodes):
        keys += [("x", dst), ("y", dst)] + [(src, dst) for src in range(dst)]
    return keys


def full_cell(kind, channels, nodes, ops, num_earlier, aux=False, init_weight=0.1):
    """A cell with every operation on every edge and every earlier output as input."""
    return Cell(kind=kind, channels=channels, nodes=nodes, aux=aux,
                inputs=tuple((j, init_weight) for j in range(num_earlier)),
                edges=tuple(Edge(src, dst, tuple((o, init_weight) for o in ops))
                            for src, dst in edge_keys(nodes)))


def grow(genotype, init_weight=0.1):
    """Appends the next pattern's cells, unpruned, to `genotype`."""
    g = genotype
    ops = space_lib.space_ops(g.space)
    index = num_patterns(g)
    cells = list(g.cells)
    channels = cells[-1].channels if cells else g.scale
    for code in pattern_codes(g.patterns, index):
        kind = "reduction" if code[0] == "r" else "normal"
        if kind == "reduction":
            channels *= 2
        cells.append(full_cell(kind, channels, g.nodes, ops, num_earlier=len(cells) + 1,
                               aux=code.endswith("a"), init_weight=init_weight))
    return dataclasses.replace(g, cells=tuple(cells))


def initial(space, input_shape, num_classes, scale, nodes, patterns, num_patterns_=1,
            init_weight=0.1, stem_stride=1):
    g = Genotype(space=space, input_shape=tuple(input_shape), num_classes=num_classes,
                 scale=scale, nodes=nodes, patterns=parse_patterns(patterns), cells=(),
                 stem_stride=stem_stride)
    space_lib.space_ops(space)
    for _ in range(num_patterns_):
        g = grow(g, init_weight)
    return g.validate()


def minimal_cell(kind, channels, ops, num_earlier, aux=True, init_weight=0.1):
    """SpiderNet's starting cell: its inputs, then a chain of two nodes (x -> 0, y -> 0,
    0 -> 1), every edge with every operation, every earlier output as an input."""
    return Cell(kind=kind, channels=channels, nodes=2, aux=aux,
                inputs=tuple((j, init_weight) for j in range(num_earlier)),
                edges=tuple(Edge(src, dst, tuple((o, init_weight) for o in ops))
                            for src, dst in (("x", 0), ("y", 0), (0, 1))))


def spider_initial(space, input_shape, num_classes, scale, reductions, init_weight=0.1,
                   stem_stride=1):
    """SpiderNet's starting network: `reductions + 1` minimal cells, each after the first
    a reduction (channels doubled), each fed by every earlier output and each its own
    pattern, so that every cell but the last carries an auxiliary head."""
    if isinstance(reductions, bool) or not isinstance(reductions, int) or reductions < 0:
        raise GenotypeError(f"reductions = {reductions!r}; expected an integer >= 0")
    ops = space_lib.space_ops(space)
    cells, channels = [], scale
    for c in range(reductions + 1):
        if c:
            channels *= 2
        cells.append(minimal_cell("reduction" if c else "normal", channels, ops, c + 1,
                                  init_weight=init_weight))
    patterns = (("na",),) + (("ra",),) * reductions
    return Genotype(space=space, input_shape=tuple(input_shape), num_classes=num_classes,
                    scale=scale, nodes=2, patterns=patterns, cells=tuple(cells),
                    stem_stride=stem_stride).validate()


def split_edge(cell, src, dst, ops, init_weight=0.1):
    """SpiderNet's mutation: a new node on edge src -> dst of `cell`.

    The new node takes index `dst` (every node from `dst` on moves up by one), new
    edges src -> new and new -> dst carry every operation of `ops`, and the old edge
    stays as a skip. Returns (the new cell, {old node: new node}); the map lets a
    rebuild hand every surviving layer (and its trained weights) to its new place.
    """
    if cell.edge(src, dst) is None:
        raise GenotypeError(f"cell has no edge {src!r}->{dst!r} to split; expected one of "
                            f"{[(e.src, e.dst) for e in cell.edges]}")
    new = dst

    def moved(n):
        return n if n in ("x", "y") or n < new else n + 1

    node_map = {n: moved(n) for n in range(cell.nodes)}
    fresh = tuple((o, init_weight) for o in ops)
    edges = [dataclasses.replace(e, src=moved(e.src), dst=moved(e.dst)) for e in cell.edges]
    edges += [Edge(src, new, fresh), Edge(new, dst + 1, fresh)]
    order = {k: i for i, k in enumerate(edge_keys(cell.nodes + 1))}
    edges.sort(key=lambda e: order[(e.src, e.dst)])
    out = dataclasses.replace(cell, nodes=cell.nodes + 1, edges=tuple(edges))
    return out, node_map


def num_nodes(cell):
    """Live nodes of a cell: fed from an input and reaching its output."""
    alive, _ = _alive_nodes(cell)
    return len(alive)


def num_patterns(genotype):
    """How many patterns the genotype's cells make up."""
    n, count = 0, 0
    while count < len(genotype.cells):
        count += len(pattern_codes(genotype.patterns, n))
        n += 1
    if count != len(genotype.cells):
        raise GenotypeError(f"{len(genotype.cells)} cells do not make whole patterns of "
                            f"{[list(p) for p in genotype.patterns]}")
    return n


def pattern_ends(genotype):
    """Indices of the last cell of every pattern (where heads sit)."""
    ends, count = [], 0
    for n in range(num_patterns(genotype)):
        count += len(pattern_codes(genotype.patterns, n))
        ends.append(count - 1)
    return ends


def head_cells(genotype):
    """Cells carrying an auxiliary head: preserved pattern ends except the last cell."""
    ends = pattern_ends(genotype)
    return [c for c in ends[:-1] if genotype.cells[c].aux]


# ---- dead-node removal ------------------------------------------------------
def _alive_nodes(cell):
    """Nodes reachable from an input and reaching the output through non-empty edges."""
    edges = [e for e in cell.edges if e.ops and not (e.src == "y" and not cell.inputs)]
    fed = set()
    for dst in range(cell.nodes):
        if any(e.dst == dst and (e.src in ("x", "y") or e.src in fed) for e in edges):
            fed.add(dst)
    useful = {cell.nodes - 1} if cell.nodes - 1 in fed else set()
    for src in reversed(range(cell.nodes)):
        if src in fed and any(e.src == src and e.dst in useful for e in edges):
            useful.add(src)
    return fed & useful, edges


def _reaches_output(cell):
    alive, _ = _alive_nodes(cell)
    return cell.nodes - 1 in alive


def _prune_cell(cell):
    alive, edges = _alive_nodes(cell)
    kept = tuple(e for e in edges if e.dst in alive and (e.src in ("x", "y") or e.src in alive))
    inputs = cell.inputs if any(e.src == "y" for e in kept) else ()
    return dataclasses.replace(cell, edges=kept, inputs=inputs)


# ---- removing operations for good --------------------------------------------
def remove_dead(cell, dead):
    """`cell` without the operations and inputs in `dead`, most closed first.

    dead: [(gate weight, "op", (src, dst, op)), (gate weight, "edge", (src, dst)) or
    (gate weight, "input", j)]. A removal that would leave the cell without a path
    from its inputs to its output is skipped (that gate stays, closed). Returns (cell,
    operations removed, inputs removed); an edge counts its operations.
    """
    ops = inputs = 0
    for _, kind, key in sorted(dead, key=lambda t: t[0]):
        trial = _without(cell, kind, key)
        if _reaches_output(trial):
            if kind == "input":
                inputs += 1
            else:
                ops += cell.num_ops() - trial.num_ops()
            cell = trial
    return cell, ops, inputs


def _without(cell, kind, key):
    if kind == "input":
        return dataclasses.replace(cell, inputs=tuple((j, w) for j, w in cell.inputs if j != key))
    if kind == "edge":
        return dataclasses.replace(cell, edges=tuple(
            dataclasses.replace(e, ops=()) if (e.src, e.dst) == tuple(key) else e
            for e in cell.edges))
    src, dst, op = key
    return dataclasses.replace(cell, edges=tuple(
        dataclasses.replace(e, ops=tuple((o, w) for o, w in e.ops if o != op))
        if (e.src, e.dst) == (src, dst) else e for e in cell.edges))


# ---- reading the found network off the gates ---------------------------------
def strongest_ops(genotype):
    """`genotype` with only the operation of largest weight on every edge (ASAP's and
    ProxylessNAS's final network: the weights are their architecture parameters)."""
    return one_op_per_edge(genotype, {
        (c, k): max(range(len(e.ops)), key=lambda i: e.ops[i][1])
        for c, cell in enumerate(genotype.cells) for k, e in enumerate(cell.edges)})


def one_op_per_edge(genotype, choice):
    """`genotype` with one operation on every edge: choice[(cell index, edge index)] is
    the index of the kept operation in that edge's `ops` (its weight is kept)."""
    missing = [(c, k) for c, cell in enumerate(genotype.cells) for k in range(len(cell.edges))
               if (c, k) not in choice]
    if missing:
        raise GenotypeError(f"no operation chosen for edges {missing[:3]} (cell, edge) of "
                            f"{len(missing)}: expected one per edge")
    cells = tuple(dataclasses.replace(c, edges=tuple(
        dataclasses.replace(e, ops=(e.ops[choice[(i, k)]],)) for k, e in enumerate(c.edges)))
        for i, c in enumerate(genotype.cells))
    return dataclasses.replace(genotype, cells=cells).canonical()


def open_part(cell):
    """`cell` without the operations and inputs whose gate is closed (weight <= 0).

    Where the open part has no path from the cell's inputs to its output, the
    strongest path stays: the path whose weakest gate is strongest (an operation's
    gate on each edge of it, the strongest input gate where it starts at `y`). The
    reference likewise keeps at least one operation per live edge; without this, a
    cell whose gates all closed would leave a network that cannot be built.
    """
    kept = dataclasses.replace(
        cell, inputs=tuple((j, w) for j, w in cell.inputs if w > 0),
        edges=tuple(dataclasses.replace(e, ops=tuple((o, w) for o, w in e.ops if w > 0))
                    for e in cell.edges))
    if _reaches_output(kept):
        return kept
    path = _strongest_path(cell)
    if path is None:
        raise GenotypeError("cell has no path of operations from its inputs to its output; "
                            "expected a connected cell")
    restore = {(e.src, e.dst): max(e.ops, key=lambda o: o[1]) for e in path}
    edges = tuple(dataclasses.replace(e, ops=e.ops + ((restore[(e.src, e.dst)],)
                                                     if (e.src, e.dst) in restore
                                                     and restore[(e.src, e.dst)] not in e.ops
                                                     else ()))
                  for e in kept.edges)
    inputs = kept.inputs
    if path[0].src == "y" and not inputs:
        inputs = (max(cell.inputs, key=lambda t: t[1]),)
    # Keep the order of the space (the same order a fresh build has).
    order = {(e.src, e.dst): [o for o, _ in e.ops] for e in cell.edges}
    edges = tuple(dataclasses.replace(e, ops=tuple(sorted(
        e.ops, key=lambda o: order[(e.src, e.dst)].index(o[0])))) for e in edges)
    inputs = tuple(sorted(inputs))
    out = dataclasses.replace(kept, edges=edges, inputs=inputs)
    assert _reaches_output(out)
    return out


def _strongest_path(cell):
    """The edges of the input-to-output path whose weakest gate weight is largest."""
    best = {}   # node -> (bottleneck weight, [edges])
    y_weight = max((w for _, w in cell.inputs), default=None)
    for dst in range(cell.nodes):
        for e in cell.edges:
            if e.dst != dst or not e.ops:
                continue
            w = max(w for _, w in e.ops)
            if e.src == "x":
                cand = (w, [e])
            elif e.src == "y":
                if y_weight is None:
                    continue
                cand = (min(w, y_weight), [e])
            elif e.src in best:
                cand = (min(w, best[e.src][0]), best[e.src][1] + [e])
            else:
                continue
            if dst not in best or cand[0] > best[dst][0]:
                best[dst] = cand
    return best[cell.nodes - 1][1] if cell.nodes - 1 in best else None


# ---- the random baseline ----------------------------------------------------
RANDOM_TOLERANCE = 0.05   # a random cell's operation memory within 5% of the found cell's
RANDOM_TRIES = 4000


class BaselineError(GenotypeError):
    """No random cell matches the found one within the tolerance."""


def random_like(found, op_cost, seed=0, tolerance=RANDOM_TOLERANCE):
    """A random network matching `found` cell for cell (BONSAINET.md section 6).

    Every cell keeps the found cell's kind, channels and number of inputs; which
    inputs, which edges and which operations survive are drawn at random (nothing
    is copied), such that the cell's surviving operation memory, summed with
    `op_cost(cell index, src, op)` (the run's memory model at its batch size), is
    within `tolerance` of the found cell's. Draws are repeated until one matches;
    `BaselineError` if none does in RANDOM_TRIES.
    """
    rng = random.Random(seed)
    ops = space_lib.space_ops(found.space)
    cells = []
    for c, cell in enumerate(found.cells):
        target = sum(op_cost(c, e.src, o) for e in cell.edges for o in e.op_names())
        n_inputs = len(cell.inputs) if any(e.src == "y" for e in cell.edges) else 0
        best = None
        for _ in range(RANDOM_TRIES):
            cand = _random_cell(cell, c, ops, n_inputs, target, tolerance, op_cost, rng)
            if cand is None:
                continue
            have = sum(op_cost(c, e.src, o) for e in cand.edges for o in e.op_names())
            err = abs(have - target) / target if target else float(have > 0)
            if best is None or err < best[0]:
                best = (err, cand)
            if err <= tolerance:
                break
        if best is None or best[0] > tolerance:
            raise BaselineError(
                f"cell {c}: no random cell of {cell.nodes} nodes with {n_inputs} inputs keeps "
                f"{target:.0f} bytes of operations within {tolerance:.0%} after {RANDOM_TRIES} "
                f"draws (closest: {'none' if best is None else f'{best[0]:.1%} off'}); expected "
                f"a found cell that such a draw can match")
        cells.append(best[1])
    return dataclasses.replace(found, cells=tuple(cells)).validate()


def _random_cell(cell, c, ops, n_inputs, target, tolerance, op_cost, rng):
    """One random draw; None where it cannot be completed.

    First a random chain of nodes from an input to the output node, a random
    operation on each of its edges; then random operations on random edges among
    the chain's nodes (from an input or an earlier chain node to a later one) while
    they fit the memory target. Every operation drawn so stays alive: none is lost
    to dead-node removal.
    """
    srcs = ("x", "y") if n_inputs else ("x",)
    inner = sorted(rng.sample(range(cell.nodes - 1), rng.randint(0, cell.nodes - 1)))
    nodes = inner + [cell.nodes - 1]
    chain = [rng.choice(srcs)] + nodes
    chosen = {}
    have = 0.0
    for src, dst in zip(chain, chain[1:]):
        op = rng.choice(ops)
        chosen.setdefault((src, dst), set()).add(op)
        have += op_cost(c, src, op)
    alive = set(nodes)
    pool = [(src, dst, op) for src, dst in edge_keys(cell.nodes) for op in ops
            if dst in alive and (src in srcs or src in alive)
            and op not in chosen.get((src, dst), ())]
    rng.shuffle(pool)
    for src, dst, op in pool:
        if have >= target * (1 - tolerance):
            break
        if have + op_cost(c, src, op) <= target * (1 + tolerance):
            chosen.setdefault((src, dst), set()).add(op)
            have += op_cost(c, src, op)
    uses_y = any(src == "y" for src, _ in chosen)
    if bool(n_inputs) != uses_y:
        return None  # the found cell has inputs iff it has an edge from y
    inputs = tuple((j, 0.1) for j in sorted(rng.sample(range(c + 1), min(n_inputs, c + 1))))
    edges = tuple(Edge(src, dst, tuple((o, 0.1) for o in ops if o in chosen.get((src, dst), ())))
                  for src, dst in edge_keys(cell.nodes))
    cand = _prune_cell(dataclasses.replace(cell, edges=edges, inputs=inputs))
    if not _reaches_output(cand) or len(cand.inputs) != n_inputs:
        return None
    return cand
