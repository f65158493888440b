"""The network: stem, Bonsai cells and heads, and the Keras model that runs them.

`Network` owns the layer objects. Its `model` is a small Keras model that runs
them in order; after a structural change (deadheading, growth) a new one is made
over the surviving layers, so layers of removed operations are no longer
referenced and their variables leave the model, while every surviving layer
object, and with it its trained weights, is reused. Every layer is built from the
shapes the genotype implies, without a symbolic or eager pass, so a rebuild costs
next to nothing and no variable is ever created inside a traced step.

`deployable(net)` turns a network without pruners into a functional model of
plain Keras layers (Conv2D, DepthwiseConv2D, BatchNormalization, ...) with the
same weights: what is saved as model.keras and exported, loadable with Keras alone.
"""

import dataclasses

import keras

from bonsai_tf import genotype as genotype_lib
from bonsai_tf import layers as L
from bonsai_tf import memory as memory_lib


def make_head(num_classes, cell_index):
    return L.Head(num_classes, name=f"head{cell_index}")


class BonsaiModel(keras.Model):
    """Runs normalisation, stem, cells and heads; returns [final logits, aux logits...]."""

    def __init__(self, normalize, stem, cells, heads, **kwargs):
        super().__init__(name="bonsai", **kwargs)
        self.normalize, self.stem = normalize, stem
        self.cells = list(cells)
        self.head_cells = [c for c, _ in heads]
        self.heads = [h for _, h in heads]
        self.built = True  # every layer was built from shapes (Network._build)

    def call(self, inputs, training=None):
        outs = [self.stem(self.normalize(inputs), training=training)]
        for cell in self.cells:
            outs.append(cell(outs, training=training))
        return [head(outs[c + 1]) for c, head in zip(self.head_cells, self.heads)]


class Network:
    """Layers and model for one genotype.

    Args:
      genotype: the `genotype.Genotype` to build.
      mean, std: per-channel input statistics in pixel units; the model takes raw
        pixel values (0..255) and normalises them itself.
      with_pruners: search network (gated) or final network (no gates at all).
      drop_path: drop-path rate of non-identity operations while training.
      aux_heads: build auxiliary heads (training only; exported models have none).
      seed: seeds drop-path; None for nondeterministic.
      mixing: what the per-operation parameters of a search network are: "saw" gates
        (BonsaiNet, with input gates too) or "softmax" logits (ASAP).
    """

    def __init__(self, genotype, mean=(0.0,), std=(1.0,), with_pruners=True, drop_path=0.0,
                 aux_heads=True, seed=None, mixing="saw"):
        genotype.validate()
        self.mixing = mixing
        # The softmax temperature of `mixing="softmax"` (ASAP), read by every edge; set
        # between epochs by the strategy. Not a model weight: it follows from the epoch.
        self.temperature = _tf_variable(1.0, "temperature") if mixing == "softmax" else None
        self.genotype = genotype
        self.mean, self.std = tuple(mean), tuple(std)
        if len(self.mean) != genotype.input_shape[-1]:
            raise ValueError(f"mean has {len(self.mean)} channels, expected "
                             f"{genotype.input_shape[-1]} for input_shape {genotype.input_shape}")
        self.with_pruners, self.drop_path, self.aux_heads, self.seed = (
            with_pruners, drop_path, aux_heads, seed)
        self.normalize = L.Standardize(self.mean, self.std, name="standardize")
        self.stem = L.Stem(genotype.scale, genotype.stem_stride, name="stem")
        self.cells = []
        self.heads = {}
        self._sync(genotype)

    # ---- structure ------------------------------------------------------------
    def _cell_seed(self, c):
        return None if self.seed is None else self.seed * 7919 + 1000 * c

    def _sync(self, genotype, reuse_from=None, node_maps=None):
        old = list(reuse_from if reuse_from is not None else self.cells)
        node_maps = node_maps or {}
        cells = []
        for c, spec in enumerate(genotype.cells):
            prev = old[c] if c < len(old) else None
            if prev is not None and prev.cell == spec and prev.with_pruners == self.with_pruners \
                    and c not in node_maps:
                cells.append(prev)
            else:
                cells.append(L.BonsaiCell(spec, with_pruners=self.with_pruners,
                                          drop_path=self.drop_path, seed=self._cell_seed(c),
                                          reuse=prev, name=f"cell{c}", mixing=self.mixing,
                                          temperature=self.temperature,
                                          node_map=node_maps.get(c)))
        self.cells = cells
        self.genotype = genotype
        wanted = [len(cells) - 1] + (genotype_lib.head_cells(genotype) if self.aux_heads else [])
        self.heads = {str(c): self.heads.get(str(c)) or make_head(genotype.num_classes, c)
                      for c in wanted}
        self._build()
        # Variables that moved to a new path (renumbered nodes), for the optimizers.
        kept = {id(cell) for cell in old}
        self.moved = {k: v for cell in cells if id(cell) not in kept
                      for k, v in cell.moved.items()}

    def take_moved(self):
        """{new variable path: old path} of the last rebuild's moved variables, once."""
        moved, self.moved = getattr(self, "moved", {}), {}
        return moved

    def _build(self):
        """Builds every unbuilt layer from the shapes the genotype implies."""
        g = self.genotype
        if not self.stem.built:
            self.stem.build((None,) + tuple(g.input_shape))
        shapes = [(None,) + tuple(memory_lib.stem_shape(g))]
        for spec, cell in zip(g.cells, self.cells):
            if not cell.built:
                cell.build(shapes)
            h, w = shapes[-1][1:3]
            if spec.reduction:
                h, w = genotype_lib.halve(h), genotype_lib.halve(w)
            shapes.append((None, h, w, spec.channels))
        for key, head in self.heads.items():
            if not head.built:
                head.build(shapes[int(key) + 1])
        final = str(len(self.cells) - 1)
        order = [final] + sorted((k for k in self.heads if k != final), key=int)
        self.model = BonsaiModel(self.normalize, self.stem, self.cells,
                                 [(int(k), self.heads[k]) for k in order])

    def rebuild(self, genotype, node_maps=None):
        """Rebuilds for `genotype` (pruned, grown or mutated), keeping every surviving layer.

        node_maps: {cell index: {old node: new node}} where nodes were renumbered
        (genotype.split_edge); a moved layer is rebuilt under its new name with the
        old one's weights, and `take_moved()` then tells which variables moved where.
        """
        self._sync(genotype.validate(), node_maps=node_maps)
        return self.model

    # ---- pruners -----------------------------------------------------------------
    def gates(self):
        """[(cell index, kind, key, SawGate)] for every live pruner, in a fixed order."""
        out = []
        for c, cell in enumerate(self.cells):
            for kind, key, p in cell.gates():
                out.append((c, kind, key, p))
        return out

    def current_genotype(self):
        """The genotype with gate weights read back from the pruners."""
        cells = []
        for cell in self.cells:
            spec = cell.cell
            edges = []
            for e in spec.edges:
                layer = cell.edges[L.edge_name(e.src, e.dst)]
                weights = {op: float(p.w.numpy()) if p is not None else w
                           for (op, w), p in zip(e.ops, layer.pruners)}
                edges.append(dataclasses.replace(e, ops=tuple((op, weights[op]) for op, _ in e.ops)))
            inputs = tuple((j, float(cell.y_gates[str(j)].w.numpy()) if str(j) in cell.y_gates else w)
                           for j, w in spec.inputs)
            cells.append(dataclasses.replace(spec, edges=tuple(edges), inputs=inputs))
        return dataclasses.replace(self.genotype, cells=tuple(cells))

    def final(self, genotype=None, aux_heads=False, drop_path=0.0):
        """The network without pruners: open gates folded (= 1), closed ones removed.

        It shares the trained layers of this network, so no weights are copied. With
        the defaults (no aux heads, no drop-path) it is the network to deploy.
        """
        g = (genotype or self.closed_removed()).canonical().validate()
        if len(g.cells) != len(self.cells):
            raise ValueError(f"genotype has {len(g.cells)} cells, this network {len(self.cells)}")
        net = Network.__new__(Network)
        net.genotype, net.mean, net.std = g, self.mean, self.std
        net.mixing, net.temperature = "saw", None
        net.with_pruners, net.drop_path, net.aux_heads, net.seed = False, drop_path, aux_heads, self.seed
        net.normalize, net.stem = self.normalize, self.stem
        net.cells = [L.BonsaiCell(spec, with_pruners=False, drop_path=drop_path,
                                  seed=net._cell_seed(c), reuse=self.cells[c], name=f"cell{c}")
                     for c, spec in enumerate(g.cells)]
        wanted = [len(g.cells) - 1] + (genotype_lib.head_cells(g) if aux_heads else [])
        net.heads = {str(c): self.heads.get(str(c)) or make_head(g.num_classes, c) for c in wanted}
        net._build()
        return net

    def closed_removed(self):
        """The current genotype without operations and inputs whose gate is closed now.

        Where that would leave a cell without a path from its inputs to its output,
        the strongest path of closed gates stays (genotype.keep_strongest_path), so
        the final network always builds.
        """
        g = self.current_genotype()
        if not self.with_pruners:
            return g
        return dataclasses.replace(g, cells=tuple(genotype_lib.open_part(c) for c in g.cells))

    def set_temperature(self, value):
        if self.temperature is None:
            raise ValueError(f"a network with mixing={self.mixing!r} has no temperature")
        self.temperature.assign(float(value))

    def reseed(self, epoch):
        """Puts every drop-path generator in a state fixed by (seed, epoch).

        Generator states are not model weights, so a resumed run re-derives them
        here at each epoch start and draws the same masks as an uninterrupted one.
        """
        base = 0 if self.seed is None else self.seed
        k = 0
        for cell in self.cells:
            for edge in cell.edges.values():
                for drop in edge.drops:
                    if drop is not None:
                        drop.seed_generator.state.assign([base * 7919 + k, epoch])
                        k += 1
                if getattr(edge, "sampler", None) is not None:   # ProxylessNAS's path draws
                    edge.sampler.state.assign([base * 7919 + 100003 + k, epoch])
                    k += 1

    def count_params(self):
        return int(sum(int(v.numpy().size) for v in self.model.trainable_weights))


def _tf_variable(value, name):
    import tensorflow as tf
    return tf.Variable(value, trainable=False, name=name, dtype="float32")


# ---- the deployable model: plain Keras layers ------------------------------------
def deployable(net):
    """A functional model of built-in Keras layers computing `net`'s final logits.

    `net` must have no pruners (Network.final()). Takes raw pixels (float), like
    net.model; batch norms run in inference mode. Loads with `keras.models.load_model`
    alone, converts to TFLite and serves without bonsai_tf.
    """
    if net.with_pruners:
        raise ValueError("deployable() takes a network without pruners: call final() first")
    # The deployable model computes in float32 whatever policy the run trained under:
    # its layers are made under the float32 policy, then the run's policy is restored.
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        return _deployable(net)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def _deployable(net):
    layers_ = keras.layers
    g = net.genotype
    names = set()

    def name(n):
        assert n not in names, n
        names.add(n)
        return n

    def bn(x, bn_vars, n):
        layer = layers_.BatchNormalization(momentum=L.BN_MOMENTUM, epsilon=L.BN_EPSILON, name=name(n))
        y = layer(x)
        layer.set_weights([v.numpy() for v in (bn_vars.gamma, bn_vars.beta, bn_vars.moving_mean,
                                                 bn_vars.moving_variance)])
        return y

    def conv(x, kernel, stride, padding, n):
        layer = layers_.Conv2D(kernel.shape[-1], kernel.shape[:2], strides=stride, padding=padding,
                               use_bias=False, name=name(n))
        y = layer(x)
        layer.set_weights([kernel.numpy()])
        return y

    def sub(x, stride, n):
        return x if stride == 1 else layers_.AveragePooling2D(1, stride, "same", name=name(n))(x)

    def adapt(x, a, n):
        # As layers.ReLUConvBN: the stride is a subsampling before a stride-1 1x1 conv.
        x = sub(layers_.ReLU(name=name(n + "_relu"))(x), a.stride, n + "_sub")
        return bn(conv(x, a.kernel, 1, "valid", n + "_conv"), a.bn, n + "_bn")

    def add(terms, n):
        return terms[0] if len(terms) == 1 else layers_.Add(name=name(n))(terms)

    def operation(x, op, n):
        if op.stride > 1 and op.strided_step is None:
            x = sub(x, op.stride, n + "_sub")  # as layers.Operation: a recipe without a spatial step
        for i, step in enumerate(op.recipe):
            kind, p = step[0], f"{n}_{step[0]}{i}"
            s = op.stride if i == op.strided_step else 1
            if kind == "relu":
                x = layers_.ReLU(name=name(p))(x)
            elif kind == "relu6":
                x = layers_.ReLU(max_value=6.0, name=name(p))(x)  # tf.nn.relu6; TFLite RELU6
            elif kind == "bn":
                x = bn(x, op.bns[i], p)
            elif kind in ("pw", "expand", "project"):
                # A 1x1 Conv2D whose filters are the kernel's: e x C for expand, C for project.
                x = conv(x, op.kernels[i], 1, "valid", p)
            elif kind == "conv":
                x = conv(x, op.kernels[i], s, "same", p)
            elif kind == "dw":
                d = step[2]
                layer = layers_.DepthwiseConv2D(step[1], strides=1 if d > 1 else s, padding="same",
                                                dilation_rate=d, use_bias=False, name=name(p))
                x = layer(x)
                layer.set_weights([op.kernels[i].numpy()])
                if d > 1:
                    x = sub(x, s, p + "_sub")
            elif kind == "maxpool":
                x = layers_.MaxPooling2D(step[1], s, "same", name=name(p))(x)
            elif kind == "avgpool":
                x = layers_.AveragePooling2D(step[1], s, "same", name=name(p))(x)
            elif kind == "identity":
                x = sub(x, s, p)
            elif kind == "zero":
                x = layers_.Rescaling(0.0, name=name(p))(sub(x, s, p + "_sub"))
            else:
                raise ValueError(f"deployable() has no layer for step {step!r} of {op.op!r}")
        return x

    inputs = keras.Input(tuple(g.input_shape), name="image")
    x = layers_.Normalization(mean=list(net.mean), variance=[s * s for s in net.std],
                              name=name("standardize"))(inputs)
    x = conv(x, net.stem.kernel, g.stem_stride, "same", "stem_conv")
    outs = [bn(x, net.stem.bn, "stem_bn")]
    for c, (spec, cell) in enumerate(zip(g.cells, net.cells)):
        p = f"cell{c}"
        values = {}
        if cell.has_x:
            x = outs[-1]
            if cell.x_adapt is not None:
                x = adapt(x, cell.x_adapt, p + "_x")
            values["x"] = x
        if cell.input_ids:
            ys = []
            for j in cell.input_ids:
                t, a = outs[j], cell.y_adapt.get(str(j))
                if isinstance(a, L.ReLUConvBN):
                    t = adapt(t, a, f"{p}_y{j}")
                elif a is not None:
                    t = sub(t, a.stride, f"{p}_y{j}_sub")
                ys.append(t)
            values["y"] = add(ys, p + "_y")
        for dst in range(spec.nodes):
            terms = []
            for e in spec.edges:
                if e.dst == dst and e.src in values:
                    edge = cell.edges[L.edge_name(e.src, e.dst)]
                    for op in edge.operations:
                        terms.append(operation(values[e.src], op, f"{p}_{edge.name}_{op.op}"))
            if terms:
                values[dst] = out = bn(add(terms, f"{p}_n{dst}_sum"), cell.node_bn[str(dst)].bn,
                                       f"{p}_n{dst}_bn")
        outs.append(out)
    head = net.heads[str(len(net.cells) - 1)]
    pooled = layers_.GlobalAveragePooling2D(name=name("head_gap"))(outs[-1])
    dense = layers_.Dense(g.num_classes, name=name("head_dense"))
    logits = dense(pooled)
    dense.set_weights([head.kernel.numpy(), head.bias.numpy()])
    return keras.Model(inputs, logits, name="bonsai_final")
