r"""Trains a genotype from scratch (the standard NAS evaluation protocol).

    python train/train.py --genotype=runs/fashion_mnist-bonsai/genotype.json \
        --flagfile=train/configs/fmnist_quick.flags --output_dir=runs/fmnist-retrain

Same run-directory layout, metrics and exports as train/search.py. With
--strategy=random it trains the random baseline matched to --genotype instead.
Flags on the command line override the --flagfile's wherever they stand; the
flagfile's search settings (--strategy=bonsai, --search_epochs) are ignored.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import runner  # noqa: E402

if __name__ == "__main__":
    # fixed unless the command line says random: between the flagfiles and the explicit
    # flags, so a flagfile's --strategy=bonsai (a search configuration) yields to it.
    sys.exit(runner.main(sys.argv, implied=["--strategy=fixed"], strategies=("fixed", "random")))
