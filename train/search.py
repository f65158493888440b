"""Architecture search (BonsaiNet by default) on an image-classification dataset.

    python train/search.py --flagfile=train/configs/fmnist_quick.flags
    python train/search.py --flagfile=train/configs/c10.flags --data_dir=~/tensorflow_datasets

Writes --output_dir: config.json, checkpoints, genotype.json after every structural
change, metrics.jsonl/metrics.json, TensorBoard events, report.md with plots, and
the exported SavedModel/TFLite models. Run the same command again to resume.
Flags on the command line override the --flagfile's wherever they stand.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import runner  # noqa: E402

if __name__ == "__main__":
    sys.exit(runner.main(sys.argv))
