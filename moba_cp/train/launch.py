"""torchrun with moba_cp's checks first and readable endings (what ``launch/*.sh`` run).

    python -m moba_cp.train.launch [torchrun options] -m moba_cp.train RECIPE [--a.b=value ...]
    python -m moba_cp.train.launch [torchrun options] -m moba_cp.cli eval needle RUN_DIR ...

Takes exactly torchrun's arguments (``torch.distributed.run``) and adds:

- **checks before any worker starts** (training only): the recipe for this world size
  (``nnodes x nproc_per_node``) and device, data paths, tokenizer, kernel limits and the run
  directory (:func:`moba_cp.train.preflight.preflight`). A bad input is printed once, with its fix,
  and nothing is spawned (exit 2); a finished run says so and exits 0.
- **no launcher tracebacks**: a requested stop (Ctrl-C, SIGTERM) ends after the workers saved,
  with exit code ``128 + signal``; failed workers end in one line naming the first failing rank
  and its exit code (their own message is printed above it), instead of torchrun's
  ``ChildFailedError`` report.
- a longer grace period for workers that save on a stop (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``,
  default 300 s instead of 30 s), and ``OMP_NUM_THREADS`` split between the local workers.
"""

from __future__ import annotations

import os
import sys

from moba_cp.import_notices import hide_megatron_import_notices

hide_megatron_import_notices()  # before the imports below reach Megatron-Core

# (the imports below follow that call: a warnings filter set after the import comes too late)
import psutil  # noqa: E402
import torch  # noqa: E402
from torch.distributed.elastic.multiprocessing.api import SignalException  # noqa: E402
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # noqa: E402
from torch.distributed.run import get_args_parser, run  # noqa: E402

from moba_cp.config import load_recipe  # noqa: E402
from moba_cp.train.preflight import complete_message, preflight  # noqa: E402
from moba_cp.train.train_command import build_train_parser  # noqa: E402
from moba_cp.train.user_errors import user_errors  # noqa: E402

__all__ = ["main"]


def _world_size(nnodes: str, nproc_per_node: str) -> int | None:
    """``nnodes x nproc_per_node`` when both are fixed numbers (not ``1:4`` or ``gpu``)."""
    try:
        return int(nnodes) * int(nproc_per_node)
    except ValueError:
        return None


def _train_args(args) -> list[str] | None:
    """The ``moba-cp train`` arguments of a torchrun command line, or None for other programs."""
    script_args = list(args.training_script_args)
    if args.module and args.training_script == "moba_cp.train":
        return script_args
    if args.module and args.training_script == "moba_cp.cli" and script_args[:1] == ["train"]:
        return script_args[1:]
    return None


def check_before_spawn(args) -> int | None:
    """Run the training checks for a parsed torchrun command; an exit code to stop with, or None."""
    train_args = _train_args(args)
    if train_args is None:
        return None
    parsed, overrides = build_train_parser().parse_known_args(train_args)  # exactly what the workers parse
    if parsed.dry_run:
        return None  # the workers plan it (and print it) themselves
    try:
        cfg = load_recipe(parsed.recipe, overrides)
        _, state = preflight(cfg, _world_size(args.nnodes, args.nproc_per_node),
                             "cuda" if torch.cuda.is_available() else "cpu")
    except user_errors() as e:
        print(f"moba-cp train: {e}", file=sys.stderr, flush=True)
        return 2
    if state.complete:
        print(complete_message(cfg, state), flush=True)
        return 0
    return None


def _end_remaining_workers(sig) -> None:
    """After torchrun's agent was interrupted: workers still running got a second signal while
    they saved (a second Ctrl-C). Pass it on, so they abort as they would under a terminal,
    and kill whatever is left (e.g. Megatron's writer service) after a few seconds."""
    procs = [p for p in psutil.Process().children(recursive=True) if p.is_running()]
    if not procs:
        return
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    rc = check_before_spawn(args)
    if rc is not None:
        return rc
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300")
    try:
        local = int(args.nproc_per_node)
    except ValueError:
        local = 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // local)))
    try:
        run(args)
    except SignalException as e:  # the workers stopped (and saved) on it and said so
        _end_remaining_workers(e.sigval)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        how = f"exit code {code}" if code >= 0 else f"signal {-code}"
        print(f"moba-cp: {len(e.failures)} worker process(es) failed, first rank {rank} ({how}); "
              f"its message is above.", file=sys.stderr, flush=True)
        return code if code > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
