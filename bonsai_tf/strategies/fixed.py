"""Training a given genotype from scratch, or a random network matched to it (no search)."""

from bonsai_tf import genotype as genotype_lib
from bonsai_tf import memory as memory_lib
from bonsai_tf.strategies import base


def load_genotype(path, info):
    """The genotype in `path`, checked against the data (base.RunInfo)."""
    g = genotype_lib.Genotype.load(path)
    if tuple(g.input_shape) != tuple(info.input_shape) or g.num_classes != info.num_classes:
        raise genotype_lib.GenotypeError(
            f"genotype {path} is for input {tuple(g.input_shape)} with {g.num_classes} "
            f"classes; the dataset has {tuple(info.input_shape)} and {info.num_classes}")
    return g


class Fixed(base.Strategy):
    """Trains `--genotype` from scratch: the standard NAS evaluation protocol."""

    name = "fixed"
    searches = False

    def initial_genotype(self):
        return load_genotype(self.cfg.genotype, self.info)


class Random(Fixed):
    """The random-search baseline of BONSAINET.md section 6, matched to `--genotype`."""

    name = "random"

    def initial_genotype(self):
        found = super().initial_genotype()
        batch = self.cfg.batch_size
        return genotype_lib.random_like(
            found, lambda c, src, op: memory_lib.edge_op_cost(found, c, src, op).bytes(batch),
            seed=self.cfg.seed)
