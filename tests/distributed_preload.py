"""Imported once by the fork server of :mod:`tests.distributed_harness`; every worker process is
forked from it with these modules already loaded.

A freshly spawned worker spent ~9 s of CPU importing torch and Megatron-Core (most of it
``torch._dynamo``/``torch._inductor``, pulled in by Megatron's ``torch.compile``-decorated fused
kernels) before its test did anything; a forked one starts in well under a second. Only imports
belong here: no process group, no compat switch-on, no tensor work (module state must be what a
fresh import leaves, as in a spawned process).
"""

from moba_cp.import_notices import hide_megatron_import_notices

hide_megatron_import_notices()  # once here, instead of in the captured stderr of every worker

import pytest  # noqa: E402,F401 - every test module imports it
import torch  # noqa: E402,F401
import torch.distributed  # noqa: E402,F401

import moba_cp  # noqa: E402,F401
import moba_cp.parallel  # noqa: E402,F401
import moba_cp.megatron.model  # noqa: E402,F401
import moba_cp.megatron.parallel_init  # noqa: E402,F401
import moba_cp.train.loop  # noqa: E402,F401
import moba_cp.eval.model_runner  # noqa: E402,F401
import moba_cp.cli  # noqa: E402,F401 - every command, for run_cli
import tests.distributed_harness  # noqa: E402,F401 - every worker's entry point
import tests.megatron_util  # noqa: E402,F401
