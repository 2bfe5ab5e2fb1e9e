"""``python -m moba_cp.train RECIPE.yaml [--dry-run] [--a.b=value ...]`` (what torchrun launches)."""

import sys

from moba_cp.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
