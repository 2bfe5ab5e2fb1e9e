"""Megatron-Core warns when it is imported that Transformer Engine and Apex are absent (moba_cp
needs neither) and about one deprecated option. The command-line entry points (``cli.py``,
``train/__main__.py``, ``train/launch.py``) hide exactly these notices; they call
:func:`hide_megatron_import_notices` before their imports reach Megatron-Core, since a filter
set after the import comes too late. Library users keep Python's default warnings."""

from __future__ import annotations

import warnings

__all__ = ["MEGATRON_IMPORT_NOTICES", "hide_megatron_import_notices"]

MEGATRON_IMPORT_NOTICES = ("Transformer Engine and Apex are not installed", "Apex is not installed",
                           "full scope is deprecated")


def hide_megatron_import_notices() -> None:
    for message in MEGATRON_IMPORT_NOTICES:
        warnings.filterwarnings("ignore", message=message)
