"""Training a given genotype from scratch, or a random network matched to it (no search)."""

from bonsai_tf import genotype as genotype_lib
from bonsai_tf import memory as memory_lib
from bonsai_tf.strategies import base


class Fixed(base.Strategy):
    """Trains `--genotype` from scratch: the standard NAS evaluation protocol."""

    name = "fixed"
    searches = False

    def initial_genotype(self):
        g = genotype_lib.Genotype.load(self.cfg.genotype)
        if tuple(g.input_shape) != tuple(self.info.input_shape) or \
                g.num_classes != self.info.num_classes:
            raise genotype_lib.GenotypeError(
                f"genotype {self.cfg.genotype} is for input {tuple(g.input_shape)} with "
                f"{g.num_classes} classes; the dataset has {tuple(self.info.input_shape)} and "
                f"{self.info.num_classes}")
        return g


class Random(Fixed):
    """The random-search baseline of BONSAINET.md section 6, matched to `--genotype`."""

    name = "random"

    def initial_genotype(self):
        found = super().initial_genotype()
        batch = self.cfg.batch_size
        return genotype_lib.random_like(
            found, lambda c, src, op: memory_lib.edge_op_cost(found, c, src, op).bytes(batch),
            seed=self.cfg.seed)
