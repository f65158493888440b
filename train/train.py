"""Trains a genotype from scratch (the standard NAS evaluation protocol).

    python train/train.py --genotype=runs/fashion_mnist-bonsai/genotype.json \
        --flagfile=train/configs/fmnist_quick.flags --output_dir=runs/fmnist-retrain

Same run-directory layout, metrics and exports as train/search.py. With
--strategy=random it trains the random baseline matched to --genotype instead.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import runner  # noqa: E402

if __name__ == "__main__":
    argv = list(sys.argv)
    if "--strategy=random" not in argv[1:]:
        argv.append("--strategy=fixed")  # last on the line, so a flagfile's strategy yields
    sys.exit(runner.main(argv))
