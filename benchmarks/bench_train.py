"""Training throughput, MoBA against full attention, one GPU, in the same run: ``moba-cp train``
at the recipes' shapes, a few steps each, tokens/s (median of the steps after warm-up),
TFLOP/s per GPU (model FLOPs, MoBA's attention counted as the work it does) and peak memory.

Usage (GPU; megatron-core carried as a wheel, see scripts in README):
    PYTHONPATH=$PWD python benchmarks/bench_train.py --out benchmarks/results/train_h200.md
CPU smoke (tiny shapes, gloo, naive kernels; numbers meaningless):
    PYTHONPATH=$PWD python benchmarks/bench_train.py --smoke

Each (setting, attention) pair is one ``python -m moba_cp.train`` process with its own run
directory, checkpoints and evaluation off; full attention is SDPA (cuDNN on an H100/H200).
``--moba-kernel 'bwd.dq_rows=true;bwd.sub_major=true'`` adds MoBA runs with those tiling overrides
(``moba.kernel``; ``;`` separates variants) to each repeat, so kernel options are compared in
training against the default MoBA and full attention of the same call; each variant gets its own row.
Every variant is first checked against each chosen setting's recipe as its runs would check it
(``variant_errors``): one they would refuse stops the call before any process starts.
``--moba-env MOBA_CP_CUDA_GRAPHS=shared`` adds MoBA runs with that environment the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

from moba_cp.config import RecipeError, load_recipe, validate

#: name: (recipe, overrides, steps). The 0.27B model of ``1gpu-32k`` (24 layers, hidden 1024,
#: 16/4 heads, d=64) at 128K and 32K, and a small model (6 layers, hidden 384, 6 heads) at 8K; all
#: with the recipe's ``train.recompute`` (none since session 30; selective before: compare a line's
#: history with ``--both=--train.recompute=selective``). The 32K and 8K lines replay each step from
#: a CUDA graph (``train.cuda_graph=full_iteration``, both attentions, since session 35: on one H100
#: the 8K step went from host-bound 0.93-1.6M to 1.86M tok/s for MoBA and 1.0-1.4M to 1.57M for full
#: attention, 32K +4% for MoBA; compare with ``--both=--train.cuda_graph=none``). 128K block 1024 too
#: since session 36 (one H200, ``train_h200_2026-12-06_session36_128k_graph.md``: the graph fits, MoBA
#: 103.6 GiB allocated / 106.0 reserved against 104.9 eager; tok/s MoBA 1.004x, full 0.996x eager's):
#: the recipe's ``cuda_graph: auto`` is what users get. 128K block 128 stays eager (its graph's
#: memory is not measured).
GRAPHED = ["--train.cuda_graph=full_iteration"]
EAGER = ["--train.cuda_graph=none"]
SETTINGS = {
    "128K block 1024 top-12 (24 layers, hidden 1024)": (
        "recipes/1gpu-32k.yaml",
        ["--model.seq_length=131072", "--moba.block_size=1024", "--moba.topk=12",
         "--train.global_batch_size=1", "--train.micro_batch_size=1", *GRAPHED], 5),
    # FlashMoBA's block and top-k on the same model (the full-attention run is the 128K one above:
    # full attention ignores the moba.* settings, so one process serves both rows of a repeat)
    "128K block 128 top-8 (24 layers, hidden 1024)": (
        "recipes/1gpu-32k.yaml",
        ["--model.seq_length=131072", "--moba.block_size=128", "--moba.topk=8",
         "--train.global_batch_size=1", "--train.micro_batch_size=1", *EAGER], 5),
    "32K block 512 top-3 (24 layers, hidden 1024)": (
        "recipes/1gpu-32k.yaml", ["--train.global_batch_size=2", "--train.micro_batch_size=1", *GRAPHED], 6),
    "8K block 512 top-3 (6 layers, hidden 384, 6 heads)": (
        "recipes/1gpu-32k.yaml",
        ["--model.num_layers=6", "--model.hidden_size=384", "--model.num_attention_heads=6",
         "--model.num_query_groups=6", "--model.seq_length=8192", "--moba.block_size=512", "--moba.topk=3",
         "--train.global_batch_size=8", "--train.micro_batch_size=4", *GRAPHED], 12),
    # The same small model with selective recomputation (the recipes' setting up to session 29): each
    # layer runs the attention forward twice, for MoBA and full attention alike. Eager: a capture
    # cannot hold recomputation's RNG state saves.
    "8K block 512 top-3 (6 layers, hidden 384, 6 heads), selective recomputation": (
        "recipes/1gpu-32k.yaml",
        ["--model.num_layers=6", "--model.hidden_size=384", "--model.num_attention_heads=6",
         "--model.num_query_groups=6", "--model.seq_length=8192", "--moba.block_size=512", "--moba.topk=3",
         "--train.global_batch_size=8", "--train.micro_batch_size=4", "--train.recompute=selective"], 12),
    # The same small model with 16 sequences a micro-batch: at 4 a step is host-bound (session 22's
    # trace: the GPU idle ~half of each step for both attentions, so the attention kernels barely
    # decide it); 4x the tokens per launch shows the kernel-bound ratio. Both attentions run it.
    "8K block 512 top-3 (6 layers, hidden 384, 6 heads), micro-batch 16": (
        "recipes/1gpu-32k.yaml",
        ["--model.num_layers=6", "--model.hidden_size=384", "--model.num_attention_heads=6",
         "--model.num_query_groups=6", "--model.seq_length=8192", "--moba.block_size=512", "--moba.topk=3",
         "--train.global_batch_size=16", "--train.micro_batch_size=16", *GRAPHED], 10),
}
SMOKE = {"smoke": ("recipes/tiny.yaml", ["--parallel.cp=1"], 4)}
#: The caching allocator's setting for every run (MoBA and full alike): the 128K model sits at
#: the H200's memory limit, where fragmentation decides whether a step fits.
ALLOC_CONF = "expandable_segments:True"
COMMON = ["--eval.interval=0", "--checkpoint.save=false", "--logging.interval=1", "--train.warmup_steps=1"]


def run_one(recipe, overrides, steps, pattern, workdir, extra, tag="", env_extra=None):
    run_dir = os.path.join(workdir, f"{pattern}-{abs(hash((recipe, tuple(overrides)))) % 10**8}{tag}")
    cmd = [sys.executable, "-m", "moba_cp.train", recipe, *overrides, *COMMON, *extra,
           f"--train.steps={steps}", f"--attention.pattern={pattern}", f"--logging.dir={run_dir}",
           f"--checkpoint.dir={run_dir}/ckpt"]
    print("+", " ".join(cmd[1:]), flush=True)
    env = dict(os.environ, **(env_extra or {}))
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-1500:]
        print(tail, flush=True)
        return {"error": tail.strip().splitlines()[-1] if tail.strip() else f"exit {proc.returncode}"}
    recs = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl")) if '"tokens_per_s"' in x]
    warm = recs[2:] if len(recs) > 3 else recs[-1:]  # the first steps compile kernels
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in warm),
            "tflops": statistics.median(r["tflops_per_gpu"] for r in warm),
            "mem": max(r["mem_gib"] for r in recs), "steps": len(warm), "loss": recs[-1]["loss"],
            "reserved": max((r["mem_reserved_gib"] for r in recs if r.get("mem_reserved_gib") is not None), default=None),
            "warm_steps": [(r["tokens_per_s"], r["tflops_per_gpu"]) for r in warm]}


def pool(runs: list[dict]) -> dict:
    """One attention's runs of a setting: medians over the warm steps of all of them, the peak
    memory of any, and each run's own median (the spread between processes)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    steps = [s for r in ok for s in r["warm_steps"]]
    return {"tokens_per_s": statistics.median(s[0] for s in steps), "tflops": statistics.median(s[1] for s in steps),
            "mem": max(r["mem"] for r in ok), "per_run": [r["tokens_per_s"] for r in ok],
            "per_run_range": [(min(s[0] for s in r["warm_steps"]), max(s[0] for s in r["warm_steps"])) for r in ok],
            "reserved": max((r["reserved"] for r in ok if r.get("reserved") is not None), default=None),
            **({"error": next(r["error"] for r in runs if "error" in r)} if len(ok) < len(runs) else {})}


def run_setting(recipe: str, overrides: list[str], steps: int, variants: list[str], repeats: int,
                full_runs: dict, run) -> tuple[list[tuple[str, str, list[str], dict | None]], dict]:
    """One setting's runs: MoBA, its variants, then full attention, alternately per repeat;
    ``run(overrides, pattern, tag)`` runs one process (``env=`` too for a variant ``env:NAME=VALUE``,
    which sets that environment variable instead of a ``moba.kernel`` override). Full attention
    reads no ``moba.*`` setting, so settings that differ only there share its run: ``full_runs``
    maps (recipe, the other overrides, steps, repeat) to it across settings. Returns the kinds
    and each one's pooled runs."""
    def variant(v: str) -> tuple:  # (label, pattern, overrides, environment or None)
        if v.startswith("env:"):
            return f"moba {v}", "moba", [], dict(kv.split("=", 1) for kv in v[len("env:"):].split(","))
        return f"moba {v}", "moba", [f"--moba.kernel={v}"], None

    # ``both:OVERRIDES`` variants run MoBA and full attention with those overrides, after the default pair
    both = [(f"{pat} {v}", pat, v[len("both:"):].split(), None) for v in variants if v.startswith("both:")
            for pat in ("moba", "full")]
    kinds = ([("moba", "moba", [], None)] + [variant(v) for v in variants if not v.startswith("both:")]
             + [("full", "full", [], None)] + both)
    runs = {kind[0]: [] for kind in kinds}
    for rep in range(repeats):
        for i, (label, pat, more, env) in enumerate(kinds):
            key = (recipe, tuple(o for o in overrides + more if not o.startswith("--moba.")), steps, rep)
            if pat == "full" and key in full_runs:
                runs[label].append(full_runs[key])
                continue
            runs[label].append(run(overrides + more, pat, f"{rep}-{i}", **({"env": env} if env else {})))
            if pat == "full":
                full_runs[key] = runs[label][-1]
    return kinds, {label: pool(rs) for label, rs in runs.items()}


def _mem(r: dict) -> str:
    """Peak allocated GiB, and reserved after a slash where the runs reported it (CUDA): the
    reserved peak also counts the caching allocator's free blocks, CUDA graphs' pools among them."""
    if r.get("mem") is None:
        return "-"
    return f"{r['mem']:.1f}" + (f" / {r['reserved']:.1f}" if r.get("reserved") is not None else "")


#: Student's t, two-sided 95%, by degrees of freedom (1-10; 1.96 beyond)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def pair_interval(ratios: list[float]) -> tuple[float, float, float] | None:
    """Mean of the per-pair MoBA/full ratios and its 95% confidence interval (Student's t over the
    pairs: each pair is one MoBA and one full-attention process run back to back, so the pairs are
    the independent samples of the ratio); None for fewer than two pairs."""
    if len(ratios) < 2:
        return None
    mean = statistics.fmean(ratios)
    half = _T95.get(len(ratios) - 1, 1.96) * statistics.stdev(ratios) / len(ratios) ** 0.5
    return mean, mean - half, mean + half


def _row(name: str, m: dict, fl: dict, label: str) -> str:
    """One table row: a MoBA run set (``label``) against the full-attention runs of the same call."""
    ratios = [a / b for a, b in zip(m.get("per_run", []), fl.get("per_run", [])) if a and b]
    pairs = [f"{a / b:.2f}" if a and b else "-" for a, b in zip(m.get("per_run", []), fl.get("per_run", []))]
    f = lambda x, spec: format(x, spec) if x is not None else "-"  # noqa: E731
    ratio = m.get("tokens_per_s") and fl.get("tokens_per_s") and m["tokens_per_s"] / fl["tokens_per_s"]
    ci = pair_interval(ratios)
    row = (f"| {name} | {f(m.get('tokens_per_s'), ',.0f')} | {f(fl.get('tokens_per_s'), ',.0f')} | "
           f"{f(ratio, '.2f')} | {f(m.get('tflops'), '.0f')} | {f(fl.get('tflops'), '.0f')} | "
           f"{_mem(m)} | {_mem(fl)} | {', '.join(pairs) or '-'} | "
           f"{f'{ci[0]:.2f} [{ci[1]:.2f}, {ci[2]:.2f}]' if ci else '-'} |")
    for who, res in ((label, m), ("full", fl)):
        if "error" in res:
            row += f" {who} failed: {res['error'][:200]}"
    return row


def runs_line(name: str, kinds: list, r: dict) -> str:
    """Each process's median tokens/s with the range over its warm steps, per kind in run order:
    a pair's ratio that moves with its processes' medians while each process's steps agree says
    the scatter is between processes (host speed, placement), not within a run."""
    def k(x):
        return f"{x / 1e6:.3g}M" if x >= 1e6 else f"{x / 1e3:.4g}K"
    parts = []
    for label, *_ in kinds:
        res = r.get(label, {})
        runs = [f"{k(m)} [{k(lo)}-{k(hi)}]" for m, (lo, hi) in zip(res.get("per_run", []), res.get("per_run_range", []))]
        if runs:
            parts.append(f"{label}: {', '.join(runs)}")
    return f"- {name}, each run's median tok/s [its warm steps' range]: " + "; ".join(parts)


def both_effect(name: str, overrides: str, r: dict) -> str:
    """One line under the table: each attention's tokens/s with ``--both`` overrides over its default
    runs' in the same call (e.g. below 1 for ``--model.fused_ops=torch``: what the fused ops save)."""
    def ratio(a: dict, b: dict) -> str:
        return f"{a['tokens_per_s'] / b['tokens_per_s']:.3f}x" if a.get("tokens_per_s") and b.get("tokens_per_s") else "-"
    return (f"- {name}, both attentions with `{overrides}` against their default runs (tokens/s): "
            f"MoBA {ratio(r[f'moba both:{overrides}'], r['moba'])}, full {ratio(r[f'full both:{overrides}'], r['full'])}")


def select_settings(settings: dict, only: str, error=None) -> dict:
    """The settings ``--only`` names: ``;``-separated patterns, each a whole setting name (that one
    setting) or else a prefix (every setting it starts). Setting names hold commas, which is why
    commas do not separate. A pattern that matches nothing is an error (``error``, else ValueError)."""
    pats = [p.strip() for p in only.split(";") if p.strip()]
    if not pats:
        return dict(settings)
    chosen = set()
    for p in pats:
        hit = [p] if p in settings else [n for n in settings if n.startswith(p)]
        if not hit:
            msg = (f"--only {p!r} names no setting (nor the start of one). Settings: "
                   + "; ".join(settings) + ". Separate several with ';'.")
            if error is None:
                raise ValueError(msg)
            error(msg)
        chosen.update(hit)
    return {n: v for n, v in settings.items() if n in chosen}


def variant_errors(settings: dict, variants: list[str], extra: list[str], device: str) -> list[str]:
    """Each ``moba.kernel`` variant checked against each setting's recipe as its process would
    check it (``load_recipe`` + ``validate`` on ``device``), before any process starts: a variant
    the runs would refuse is found in seconds, not after the runs before it (a 128K call spends
    minutes on them; session 47 lost its A/B that way)."""
    errs = []
    for name, (recipe, overrides, _steps) in settings.items():
        for v in variants:
            if v.startswith(("env:", "both:")):
                continue
            try:
                validate(load_recipe(recipe, [*overrides, *COMMON, *extra, "--attention.pattern=moba",
                                              f"--moba.kernel={v}"]), world_size=1, device=device)
            except RecipeError as e:
                errs.append(f"--moba-kernel {v!r} on {name!r}: {e}")
    return errs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the markdown table here (rows added as they finish)")
    ap.add_argument("--only", default="",
                    help="';'-separated setting names or name prefixes to run (a whole name runs that setting alone; "
                         "names hold commas, so commas do not separate)")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke: the tiny recipe, 4 steps")
    ap.add_argument("--extra", default="",
                    help="more overrides for every run (space separated; write --extra=..., since they start with '--'), "
                         "e.g. --extra=--model.num_layers=12")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run MoBA and full attention alternately this many times each (MoBA, full, MoBA, ...): "
                         "medians over all their warm steps, and each pair's ratio in the last column")
    ap.add_argument("--moba-kernel", default="",
                    help="';'-separated moba.kernel overrides: each adds a MoBA variant run per repeat and a row")
    ap.add_argument("--moba-env", default="",
                    help="';'-separated NAME=VALUE[,NAME=VALUE] environments, e.g. MOBA_CP_CUDA_GRAPHS=shared: each "
                         "adds a MoBA variant run per repeat (with those variables set) and a row")
    ap.add_argument("--both", default="",
                    help="';'-separated override sets (space-separated within one; write --both=..., since the sets start with "
                         "'--'), e.g. --both=--model.fused_ops=torch: "
                         "each adds a MoBA and a full-attention run per repeat with those overrides, a row comparing "
                         "them, and a line with each attention's speed against its default run")
    ap.add_argument("--keep-runs", default=None,
                    help="put the runs' directories here and keep them (with --extra=--logging.profile=[A,B], "
                         "their profiles); default: a temporary directory")
    ap.add_argument("--commit", default="", help="the commit measured (default: git rev-parse; a copied tree's .git may be stale)")
    args = ap.parse_args()
    settings = SMOKE if args.smoke else SETTINGS
    extra = args.extra.split()
    variants = [v.strip() for v in args.moba_kernel.split(";") if v.strip()]
    for v in (v.strip() for v in args.moba_env.split(";") if v.strip()):
        if not all("=" in kv and kv.split("=", 1)[0] for kv in v.split(",")):
            ap.error(f"--moba-env {v!r}: give NAME=VALUE pairs separated by commas, e.g. MOBA_CP_CUDA_GRAPHS=shared")
        variants.append(f"env:{v}")
    variants += [f"both:{v.strip()}" for v in args.both.split(";") if v.strip()]
    chosen = select_settings(settings, args.only, ap.error)
    errs = variant_errors(chosen, variants, extra, "cuda" if torch.cuda.is_available() else "cpu")
    if errs:
        ap.error("a MoBA variant would be refused by its runs (nothing was run):\n  " + "\n  ".join(errs))
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True).stdout.strip()
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    head = [f"# Training throughput, MoBA vs full attention ({dev}, {datetime.date.today()}, commit {commit or '?'})",
            "", f"Command: `python benchmarks/bench_train.py {' '.join(sys.argv[1:])}`; every run adds "
            f"`{' '.join(COMMON + extra)}`, with PYTORCH_CUDA_ALLOC_CONF="
            f"{os.environ.get('PYTORCH_CUDA_ALLOC_CONF', ALLOC_CONF)}"
            + "".join(f", {k}={os.environ[k]}" for k in ("MOBA_CP_FAST_LAUNCH", "MOBA_CP_CUDA_GRAPHS") if k in os.environ)
            + f". Median tokens/s over the steps after the first two"
            f" of {args.repeats} process(es) per attention, run alternately; 'per pair' is each MoBA/full pair's "
            f"ratio of medians, and the last column their mean with a 95% interval (Student's t over the pairs, 2 or "
            f"more). Settings that differ only in moba.* share their full-attention runs.", "",
            "| setting | MoBA tok/s | full tok/s | MoBA / full | MoBA TFLOP/s/GPU | full TFLOP/s/GPU "
            "| MoBA peak GiB (allocated / reserved) | full peak GiB (allocated / reserved) | per pair "
            "| pairs' mean [95% CI] |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    lines, notes = list(head), []
    full_runs = {}  # (recipe, overrides other than moba.*, steps, repeat) -> that full-attention run
    if args.keep_runs:
        os.makedirs(args.keep_runs, exist_ok=True)
    with (contextlib.nullcontext(args.keep_runs) if args.keep_runs else tempfile.TemporaryDirectory()) as work:
        for name, (recipe, overrides, steps) in chosen.items():
            kinds, r = run_setting(recipe, overrides, steps, variants, args.repeats, full_runs,
                                   lambda o, pat, tag, env=None: run_one(recipe, o, steps, pat, work, extra,
                                                                         tag=tag, env_extra=env))
            for label, pat, *_ in kinds:
                if pat != "moba":
                    continue
                variant = label[len("moba "):]
                if variant.startswith("both:"):
                    row = _row(f"{name}, both attentions {variant[5:]}", r[label], r[f"full {variant}"], label)
                else:
                    row = _row(name if label == "moba" else f"{name}, {variant[4:]}" if variant.startswith("env:")
                               else f"{name}, moba.kernel={variant}", r[label], r["full"], label)
                lines.append(row)
                print(row, flush=True)
            note = runs_line(name, kinds, r)
            notes.append(note)
            print(note, flush=True)
            for label, pat, *_ in kinds:
                if pat == "moba" and label.startswith("moba both:"):
                    note = both_effect(name, label[len("moba both:"):], r)
                    notes.append(note)
                    print(note, flush=True)
            if args.out:
                with open(args.out, "w") as fh:
                    fh.write("\n".join(lines + ([""] + notes if notes else [])) + "\n")


if __name__ == "__main__":
    main()
