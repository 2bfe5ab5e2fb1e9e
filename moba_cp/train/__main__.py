"""``python -m moba_cp.train RECIPE.yaml [--dry-run] [--a.b=value ...]`` (what torchrun launches):
``moba-cp train``'s arguments, run by :mod:`moba_cp.train.train_command`."""

import sys

from moba_cp.import_notices import hide_megatron_import_notices

hide_megatron_import_notices()  # before the import below reaches Megatron-Core

from moba_cp.train.train_command import main  # noqa: E402 - after the notices are hidden

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
