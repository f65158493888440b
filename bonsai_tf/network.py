"""The network: a Keras functional model assembled from stem, Bonsai cells and heads.

`Network` owns the layer objects; `model` is rebuilt from them after every
structural change (deadheading, growth). Layers of removed operations are simply
no longer referenced, so their variables leave the model, while every surviving
layer object, and with it its trained weights, is reused.
"""

import dataclasses

import keras

from bonsai_tf import genotype as genotype_lib
from bonsai_tf import layers as L


def make_head(num_classes, cell_index):
    return keras.Sequential([keras.layers.GlobalAveragePooling2D(name="gap"),
                             keras.layers.Dense(num_classes, name="dense")],
                            name=f"head{cell_index}")


class Network:
    """Layers and functional model for one genotype.

    Args:
      genotype: the `genotype.Genotype` to build.
      mean, std: per-channel input statistics in pixel units; the model takes raw
        pixel values (0..255) and normalises them itself.
      with_pruners: search network (gated) or final network (no gates at all).
      drop_path: drop-path rate of non-identity operations while training.
      aux_heads: build auxiliary heads (training only; exported models have none).
      seed: seeds drop-path; None for nondeterministic.
    """

    def __init__(self, genotype, mean=(0.0,), std=(1.0,), with_pruners=True, drop_path=0.0,
                 aux_heads=True, seed=None):
        genotype.validate()
        self.genotype = genotype
        self.mean, self.std = tuple(mean), tuple(std)
        if len(self.mean) != genotype.input_shape[-1]:
            raise ValueError(f"mean has {len(self.mean)} channels, expected "
                             f"{genotype.input_shape[-1]} for input_shape {genotype.input_shape}")
        self.with_pruners, self.drop_path, self.aux_heads, self.seed = (
            with_pruners, drop_path, aux_heads, seed)
        self.normalize = L.Standardize(self.mean, self.std, name="standardize")
        # Explicit inner names keep variable paths (checkpoint keys) stable across processes.
        self.stem = keras.Sequential([
            keras.layers.Conv2D(genotype.scale, 3, strides=genotype.stem_stride, padding="same",
                                use_bias=False, name="conv"),
            L.batch_norm("bn")], name="stem")
        self.cells = []
        self.heads = {}
        self._sync(genotype)

    # ---- structure ------------------------------------------------------------
    def _cell_seed(self, c):
        return None if self.seed is None else self.seed * 7919 + 1000 * c

    def _sync(self, genotype, reuse_from=None):
        old = list(reuse_from if reuse_from is not None else self.cells)
        cells = []
        for c, spec in enumerate(genotype.cells):
            prev = old[c] if c < len(old) else None
            if prev is not None and prev.cell == spec and prev.with_pruners == self.with_pruners:
                cells.append(prev)
            else:
                cells.append(L.BonsaiCell(spec, with_pruners=self.with_pruners,
                                          drop_path=self.drop_path, seed=self._cell_seed(c),
                                          reuse=prev, name=f"cell{c}"))
        self.cells = cells
        self.genotype = genotype
        wanted = [len(cells) - 1] + (genotype_lib.head_cells(genotype) if self.aux_heads else [])
        heads = {}
        for c in wanted:
            key = str(c)
            heads[key] = self.heads.get(key) or make_head(genotype.num_classes, c)
        self.heads = heads
        self.model = self._functional()

    def _functional(self):
        inputs = keras.Input(self.genotype.input_shape, name="image")
        outs = [self.stem(self.normalize(inputs))]
        for cell in self.cells:
            outs.append(cell(outs))
        final = str(len(self.cells) - 1)
        logits = [self.heads[final](outs[-1])]
        for key in sorted((k for k in self.heads if k != final), key=int):
            logits.append(self.heads[key](outs[int(key) + 1]))
        # Always a list of outputs (final first), also with a single head.
        return keras.Model(inputs, logits, name="bonsai")

    def rebuild(self, genotype):
        """Rebuilds for `genotype` (pruned or grown), keeping every surviving layer."""
        self._sync(genotype.validate())
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
        the defaults (no aux heads, no drop-path) it is the deployable network.
        """
        g = (genotype or self.closed_removed()).canonical().validate()
        if len(g.cells) != len(self.cells):
            raise ValueError(f"genotype has {len(g.cells)} cells, this network {len(self.cells)}")
        net = Network.__new__(Network)
        net.genotype, net.mean, net.std = g, self.mean, self.std
        net.with_pruners, net.drop_path, net.aux_heads, net.seed = False, drop_path, aux_heads, self.seed
        net.normalize, net.stem = self.normalize, self.stem
        net.cells = [L.BonsaiCell(spec, with_pruners=False, drop_path=drop_path,
                                  seed=net._cell_seed(c), reuse=self.cells[c], name=f"cell{c}")
                     for c, spec in enumerate(g.cells)]
        wanted = [len(g.cells) - 1] + (genotype_lib.head_cells(g) if aux_heads else [])
        net.heads = {str(c): self.heads.get(str(c)) or make_head(g.num_classes, c) for c in wanted}
        net.model = net._functional()
        return net

    def closed_removed(self):
        """The current genotype without operations and inputs whose gate is closed now."""
        g = self.current_genotype()
        cells = []
        for spec in g.cells:
            edges = tuple(dataclasses.replace(e, ops=tuple((o, w) for o, w in e.ops if w > 0))
                          for e in spec.edges)
            cells.append(dataclasses.replace(spec, edges=edges,
                                             inputs=tuple((j, w) for j, w in spec.inputs if w > 0)))
        return dataclasses.replace(g, cells=tuple(cells)) if self.with_pruners else g

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

    def count_params(self):
        return int(sum(int(v.numpy().size) for v in self.model.trainable_weights))
