"""``moba-cp sweep SWEEP.yaml``: run every point of an experiment, skip finished ones, collect metrics.

A sweep file::

    name: scaling-small
    kind: scaling            # scaling | granularity | hybrid | retrieval: which chart `moba-cp plot --sweep` draws
    base: recipes/experiments/small-base.yaml
    out_dir: runs/sweeps/scaling-small
    nproc: 1                 # processes per point (torchrun --standalone); the base recipe's tp*cp*dp
    metric: loss             # y value: 'loss' (training), 'valid_loss', 'trailing_loss', 'needle_accuracy', 'answer_loss'
    eval_loss: {seq_len: 2048, last: 256, num_seqs: 4}   # optional: trailing loss after training
    eval_answer_loss: {seq_len: 2048, num_samples: 32, depths: "0,25,50", kinds: "passkey,single"}
                             # optional: loss on answers far from their evidence (experiments/answer_loss.py)
    grid:                    # cartesian product of named override sets (or an explicit `points` list)
      method:
        moba: ["--attention.pattern=moba"]
        full: ["--attention.pattern=full"]
      size:
        s1: ["--model.num_layers=2"]
        s2: ["--model.num_layers=4"]
    common: ["--train.steps=200"]   # optional overrides for every point
    seeds: [1, 2, 3]         # optional: every point once per seed (<name>-seed<N>); charts show mean +- std
    reference: full          # optional: paired differences of every point against this method, per seed

Each point trains into ``out_dir/<point>`` with ``moba-cp train`` (so an interrupted point resumes
from its own checkpoint), optionally evaluates, and writes ``sweep_point.json`` last; a point
with that file is skipped. ``out_dir/results.jsonl`` collects every finished point; with a
``reference``, ``out_dir/paired.md`` / ``paired.json`` hold the paired-seed differences
(:mod:`moba_cp.experiments.paired`). A point's summary records its corpus (name, sizes, the epochs
it drew: the run's ``data.json``, written by training) and, with ``eval_loss``, the held-out set's
size, per-sequence losses and standard error.

A finished point counts only while it matches the sweep: before running, every finished point's
``recipe.yaml`` (what it trained with) is compared with the recipe the sweep gives it now (paths
aside), and the finished points' corpora with each other; a mismatch stops the sweep with the point
and the differing keys named, so a sweep continued across calls, machines or commits never mixes
models, recipes or data. ``collect_results`` refuses points of different corpora the same way.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from moba_cp.config import RecipeConfig, RecipeError, layer_attention_kinds, load_recipe, to_dict
from moba_cp.data.retrieval_docs import KINDS as NEEDLE_KINDS
from moba_cp.data.retrieval_docs import fixed_tokens
from moba_cp.data.tokenizers import build_tokenizer
from moba_cp.eval.needle import HAYSTACKS, parse_kinds, parse_lengths
from moba_cp.experiments.paired import mean_std, method_of, write_paired_report
from moba_cp.train.flops import flops_per_step
from moba_cp.train.run_dir import flatten

__all__ = ["SweepSpec", "SweepPoint", "load_sweep", "run_sweep", "collect_results", "check_finished_points", "SweepError"]

KINDS = ("scaling", "granularity", "hybrid", "retrieval")
METRICS = ("loss", "valid_loss", "trailing_loss", "needle_accuracy", "answer_loss")


class SweepError(ValueError):
    """A malformed sweep file or a failed point; the message names the key or the point."""


@dataclass
class SweepPoint:
    name: str
    overrides: list[str]
    labels: dict[str, str]
    group: str = ""  # the point this is a seed replicate of ("" = itself); charts average a group

    def __post_init__(self):
        self.group = self.group or self.name


@dataclass
class SweepSpec:
    name: str
    kind: str
    base: str
    out_dir: str
    nproc: int
    metric: str
    points: list[SweepPoint]
    eval_loss: dict | None = None
    eval_needle: dict | None = None
    eval_answer_loss: dict | None = None
    reference: str | None = None
    source: dict = field(default_factory=dict)


def load_sweep(path: str | Path, out_dir: str | None = None) -> SweepSpec:
    """Parse and check a sweep file (relative paths are relative to the current directory)."""
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"sweep file {str(p)!r} does not exist.")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise SweepError(f"{p}: the top level must be a mapping.")
    allowed = {"name", "kind", "base", "out_dir", "nproc", "metric", "eval_loss", "eval_needle", "eval_answer_loss",
               "grid", "points", "common", "seeds", "reference"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise SweepError(f"{p}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(allowed))}.")
    for key in ("name", "kind", "base"):
        if key not in data:
            raise SweepError(f"{p}: missing required key {key!r}.")
    if data["kind"] not in KINDS:
        raise SweepError(f"{p}: kind={data['kind']!r}; choose one of {', '.join(KINDS)}.")
    metric = data.get("metric", "loss")
    if metric not in METRICS:
        raise SweepError(f"{p}: metric={metric!r}; choose one of {', '.join(METRICS)}.")
    if metric == "trailing_loss" and not data.get("eval_loss"):
        raise SweepError(f"{p}: metric=trailing_loss needs an eval_loss section (seq_len, last, num_seqs).")
    if metric == "answer_loss" and not data.get("eval_answer_loss"):
        raise SweepError(f"{p}: metric=answer_loss needs an eval_answer_loss section (seq_len, num_samples, depths, "
                         f"kinds).")
    if metric == "needle_accuracy" and (not data.get("eval_needle") or (data["eval_needle"] or {}).get("only")):
        raise SweepError(f"{p}: metric=needle_accuracy needs an eval_needle section that scores every point "
                         f"(no `only`).")
    if not Path(data["base"]).is_file():
        raise SweepError(f"{p}: base recipe {data['base']!r} does not exist.")
    common = [str(x) for x in data.get("common", [])]
    points: list[SweepPoint] = []
    if "grid" in data:
        grid = data["grid"]
        if not isinstance(grid, dict) or not grid:
            raise SweepError(f"{p}: grid must map axis names to {{value_name: [overrides]}}.")
        axes = list(grid)
        for combo in itertools.product(*[list(grid[a].items()) for a in axes]):
            name = "-".join(str(v[0]) for v in combo)
            ovr = common + [str(x) for v in combo for x in v[1]]
            points.append(SweepPoint(name, ovr, {a: str(v[0]) for a, v in zip(axes, combo)}))
    for i, pt in enumerate(data.get("points", []) or []):
        if not isinstance(pt, dict) or "name" not in pt:
            raise SweepError(f"{p}: points[{i}] needs a name (and overrides, labels).")
        points.append(SweepPoint(str(pt["name"]), common + [str(x) for x in pt.get("overrides", [])],
                                 {str(k): str(v) for k, v in (pt.get("labels") or {}).items()}))
    if not points:
        raise SweepError(f"{p}: no points (give a grid or a points list).")
    reference = data.get("reference")
    if reference is not None:
        def method(pt: SweepPoint) -> str:
            return method_of(dict(labels=pt.labels, group=pt.group, name=pt.name))

        methods = sorted({method(pt) for pt in points})
        if not isinstance(reference, str) or reference not in methods:
            raise SweepError(f"{p}: reference={reference!r} is not a method of this sweep; choose one of {methods} "
                             f"(a point's `method` label, else its name).")
        points.sort(key=lambda pt: method(pt) != reference)  # the reference first (stable otherwise)
    seeds = data.get("seeds")
    if seeds is not None:
        if (not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                for x in seeds) or len(set(seeds)) != len(seeds)):
            raise SweepError(f"{p}: seeds={seeds!r}; give a list of distinct integers, e.g. seeds: [1, 2, 3].")
        # Each point becomes one replicate per seed: <name>-seed<N>, averaged again in the charts.
        # Seed-major order (every point of seed 1, the reference first, then of seed 2, ...): a
        # sweep cut short by its deadline has finished whole pairs.
        points = [SweepPoint(f"{pt.name}-seed{sd}", pt.overrides + [f"--train.seed={sd}"],
                             dict(pt.labels, seed=str(sd)), group=pt.name) for sd in seeds for pt in points]
    names = [pt.name for pt in points]
    if len(set(names)) != len(names):
        raise SweepError(f"{p}: duplicate point names {sorted({n for n in names if names.count(n) > 1})}.")
    # Every point's recipe must validate now, not an hour into the sweep.
    for pt in points:
        try:
            load_recipe(data["base"], pt.overrides)
        except RecipeError as e:
            raise SweepError(f"{p}: point {pt.name!r}: {e}") from None
    _check_eval_loss(p, data.get("eval_loss"))
    _check_answer_loss(p, data.get("eval_answer_loss"))
    needle = data.get("eval_needle")
    if needle is not None:
        allowed_n = {"lengths", "depths", "kinds", "n_per_cell", "seed", "haystack", "only"}
        if not isinstance(needle, dict) or set(needle) - allowed_n:
            raise SweepError(f"{p}: eval_needle must be a mapping with keys among {', '.join(sorted(allowed_n))}.")
        if needle.get("haystack", "passkey") not in HAYSTACKS:
            raise SweepError(f"{p}: eval_needle.haystack={needle['haystack']!r} must be one of {', '.join(HAYSTACKS)}.")
        missing = sorted(set(needle.get("only") or []) - set(names) - {pt.group for pt in points})
        if missing:
            raise SweepError(f"{p}: eval_needle.only names unknown point(s) {missing}; points: {names}.")
        _check_needle_lengths(p, needle, load_recipe(data["base"], points[0].overrides))
    return SweepSpec(name=str(data["name"]), kind=data["kind"], base=data["base"],
                     out_dir=out_dir or data.get("out_dir") or f"runs/sweeps/{data['name']}",
                     nproc=int(data.get("nproc", 1)), metric=metric, points=points,
                     eval_loss=data.get("eval_loss"), eval_needle=needle, eval_answer_loss=data.get("eval_answer_loss"),
                     reference=reference, source=data)


def _check_eval_loss(p: Path, e) -> None:
    """``eval_loss: {seq_len, last, num_seqs}``: integers with 1 <= last <= seq_len, num_seqs >= 2."""
    if e is None:
        return
    keys = {"seq_len", "last", "num_seqs"}
    if not isinstance(e, dict) or set(e) - keys or not {"seq_len", "last"} <= set(e):
        raise SweepError(f"{p}: eval_loss must be a mapping with seq_len, last and optionally num_seqs; got {e!r}.")
    vals = {k: e.get(k, 4) for k in keys}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in vals.values()):
        raise SweepError(f"{p}: eval_loss values must be integers; got {e!r}.")
    if not 1 <= vals["last"] <= vals["seq_len"] or vals["num_seqs"] < 2:
        raise SweepError(f"{p}: eval_loss={e!r}: need 1 <= last <= seq_len and num_seqs >= 2 (a standard error "
                         f"needs at least two held-out sequences).")


def _check_answer_loss(p: Path, e) -> None:
    """``eval_answer_loss: {seq_len, num_samples, depths, kinds}`` (the last three optional)."""
    if e is None:
        return
    keys = {"seq_len", "num_samples", "depths", "kinds"}
    if not isinstance(e, dict) or set(e) - keys or "seq_len" not in e:
        raise SweepError(f"{p}: eval_answer_loss must be a mapping with seq_len and optionally num_samples, depths, "
                         f"kinds; got {e!r}.")
    n = e.get("num_samples", 32)
    if not isinstance(e["seq_len"], int) or not isinstance(n, int) or n < 2:
        raise SweepError(f"{p}: eval_answer_loss: seq_len and num_samples must be integers, num_samples >= 2.")
    try:
        depths = [float(x) for x in str(e.get("depths", "0,25,50")).split(",") if x.strip()]
    except ValueError:
        depths = []
    kinds = [k.strip() for k in str(e.get("kinds", "passkey,single")).split(",") if k.strip()]
    if not depths or any(not 0 <= d <= 100 for d in depths) or not kinds or set(kinds) - set(NEEDLE_KINDS):
        raise SweepError(f"{p}: eval_answer_loss: depths are percents in [0, 100] and kinds among "
                         f"{', '.join(NEEDLE_KINDS)}; got {e!r}.")


def _check_needle_lengths(p: Path, needle: dict, cfg) -> None:
    """Every needle length must hold each kind's fixed text; found now, not after the training."""
    try:
        lengths = parse_lengths(str(needle.get("lengths", "4k,8k")))
    except ValueError as e:
        raise SweepError(f"{p}: eval_needle.lengths: {e}") from None
    try:
        kinds = parse_kinds(str(needle.get("kinds", ",".join(NEEDLE_KINDS))))
    except ValueError as e:
        raise SweepError(f"{p}: eval_needle.kinds: {e}") from None
    tok = build_tokenizer(cfg.data.tokenizer)
    for k in kinds:
        need = fixed_tokens(tok, k)
        if min(lengths) <= need:
            raise SweepError(f"{p}: eval_needle.lengths={needle.get('lengths')!r}: a {k!r} sample needs more than "
                             f"{need} tokens of fixed text, so every length must exceed {need}; raise the lengths.")


def _point_summary(spec: SweepSpec, pt: SweepPoint, run_dir: Path) -> dict:
    """What the charts need of a finished point: its labels, compute, attention shape, metrics."""
    cfg = load_recipe(spec.base, pt.overrides)
    vocab = build_tokenizer(cfg.data.tokenizer).vocab_size
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    valid = [r for r in records if "valid_loss" in r]
    tail = [r["loss"] for r in train[-5:]]
    kinds = layer_attention_kinds(cfg.model, cfg.attention)
    n_blocks = cfg.model.seq_length // cfg.moba.block_size
    out = {
        "name": pt.name, "group": pt.group, "labels": pt.labels, "overrides": pt.overrides,
        "train_flops": flops_per_step(cfg, vocab) * cfg.train.steps,
        "loss": sum(tail) / len(tail) if tail else None,
        "valid_loss": valid[-1]["valid_loss"] if valid else None,
        "pattern": cfg.attention.pattern, "full_layers": kinds.count("full"), "num_layers": len(kinds),
        "block_size": cfg.moba.block_size, "topk": cfg.moba.topk, "n_blocks": n_blocks, "key_conv": cfg.moba.key_conv,
        "seq_length": cfg.model.seq_length,
    }
    ev = run_dir / "eval" / "eval_loss.json"
    if ev.is_file():
        e = json.loads(ev.read_text())
        per_seq = [x for x in e.get("per_sequence_trailing", []) if x is not None]
        out["trailing_loss"] = e["trailing_loss"]
        out["trailing_loss_per_seq"] = per_seq  # same held-out sequences for every point: paired per sequence
        out["eval_sequences"], out["eval_tokens"] = e.get("num_sequences"), e.get("trailing_tokens")
        if len(per_seq) > 1:
            out["trailing_loss_se"] = mean_std(per_seq)[1] / len(per_seq) ** 0.5
    al = run_dir / "eval" / "answer_loss.json"
    if al.is_file():
        a = json.loads(al.read_text())
        out["answer_loss"], out["answer_loss_per_seq"], out["answer_loss_se"] = a["answer_loss"], a["per_sample"], a["se"]
        out["answer_samples"], out["answer_tokens"] = a["num_samples"], a["answer_tokens"]
    nd = run_dir / "eval" / "needle.json"
    if nd.is_file():  # exact-match accuracy: mean over kinds, per kind, and per (kind, length, depth) cell
        kinds = json.loads(nd.read_text()).get("kinds", {})
        if kinds:
            out["needle"] = {k: v.get("mean") for k, v in kinds.items()}
            out["needle_accuracy"] = sum(out["needle"].values()) / len(kinds)
            out["needle_accuracy_per_seq"] = [a for v in kinds.values() for row in v.get("accuracy", []) for a in row]
    if valid:
        out["valid_tokens"] = cfg.eval.iters * cfg.train.global_batch_size * cfg.model.seq_length
    # What it trained on (corpus, sizes, epochs drawn): the training run's own record
    rec = run_dir / "data.json"
    try:
        out["data"] = json.loads(rec.read_text())
    except (OSError, ValueError) as e:  # the record must not lose a finished point
        out["data"] = {"error": f"{rec}: {type(e).__name__}: {e}"}
    return out


def _point_commands(spec: SweepSpec, pt: SweepPoint, launcher: list[str], run_dir: Path) -> list[list[str]]:
    """The commands of one point, in order: train, then the optional loss and needle evaluations."""
    cmds = [[*launcher, "-m", "moba_cp.train", spec.base, *pt.overrides, f"--logging.dir={run_dir}"]]
    # The evaluations read the run dir's recipe.yaml, which already holds the point's overrides.
    if spec.eval_loss:
        e = spec.eval_loss
        cmds.append([*launcher, "-m", "moba_cp.cli", "eval", "loss", str(run_dir), "--seq-len", str(e["seq_len"]),
                     "--last", str(e["last"]), "--num-seqs", str(e.get("num_seqs", 4)), "--out", str(run_dir / "eval")])
    a = spec.eval_answer_loss
    if a:
        cmds.append([*launcher, "-m", "moba_cp.experiments.answer_loss", str(run_dir), "--seq-len", str(a["seq_len"]),
                     "--num-samples", str(a.get("num_samples", 32)), "--depths", str(a.get("depths", "0,25,50")),
                     "--kinds", str(a.get("kinds", "passkey,single")), "--out", str(run_dir / "eval")])
    n = spec.eval_needle
    if n and (not n.get("only") or pt.name in n["only"] or pt.group in n["only"]):
        cmd = [*launcher, "-m", "moba_cp.cli", "eval", "needle", str(run_dir), "--out", str(run_dir / "eval"),
               "--label", pt.name]
        for key, flag in (("lengths", "--lengths"), ("depths", "--depths"), ("kinds", "--kinds"),
                          ("n_per_cell", "--n-per-cell"), ("seed", "--seed"), ("haystack", "--haystack")):
            if key in n:
                cmd += [flag, str(n[key])]
        cmds.append(cmd)
    return cmds


def _run(cmd: list[str], log: Path, env: dict | None = None, procs: dict | None = None) -> None:
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        # Own process group: a deadline stops the whole torchrun tree with one signal.
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        if procs is not None:
            procs[proc.pid] = proc  # live children by pid, so a deadline can stop them
        try:
            rc = proc.wait()
        finally:
            if procs is not None:
                procs.pop(proc.pid, None)
    if rc != 0:
        raise SweepError(f"command failed with exit code {rc}: {' '.join(cmd)} (log: {log})")


def _finish_point(spec: SweepSpec, pt: SweepPoint, run_dir: Path) -> dict:
    summary = _point_summary(spec, pt, run_dir)
    tmp = run_dir / "sweep_point.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(run_dir / "sweep_point.json")  # written last: the point counts as finished
    return summary


def point_cost(spec: SweepSpec, pt: SweepPoint) -> float:
    """Training FLOPs of a point: what the parallel scheduler balances and predicts time from."""
    cfg = load_recipe(spec.base, pt.overrides)
    return float(flops_per_step(cfg, build_tokenizer(cfg.data.tokenizer).vocab_size) * cfg.train.steps)


def _with_extra(spec: SweepSpec, extra: list[str]) -> SweepSpec:
    """The spec with command-line overrides appended to every point (they win over the file's)."""
    if not extra:
        return spec
    points = [replace(pt, overrides=pt.overrides + list(extra)) for pt in spec.points]  # keeps group, labels
    for pt in points:
        try:
            cfg = load_recipe(spec.base, pt.overrides)
        except RecipeError as e:
            raise SweepError(f"sweep {spec.name!r}, point {pt.name!r} with {' '.join(extra)}: {e}") from None
        if (spec.eval_loss or spec.eval_needle or spec.eval_answer_loss) and not cfg.checkpoint.save:
            raise SweepError(f"sweep {spec.name!r} evaluates checkpoints (eval_loss/eval_needle/eval_answer_loss), but "
                             f"checkpoint.save=false; drop that override.")
    return SweepSpec(**{**spec.__dict__, "points": points})


# Where a run wrote its files: a sweep folder may be moved or copied (e.g. into docs/results/)
# and continued there, so these may differ between a finished point and the sweep now.
_PATH_KEYS = frozenset({"logging.dir", "checkpoint.dir", "checkpoint.load"})


def _corpus(row: dict) -> str | None:
    data = row.get("data")
    return data.get("corpus") if isinstance(data, dict) else None


def _corpus_errors(rows: list[dict]) -> list[str]:
    by_corpus: dict[str, list[str]] = {}
    for r in rows:
        if _corpus(r):
            by_corpus.setdefault(_corpus(r), []).append(r.get("name", "?"))
    if len(by_corpus) < 2:
        return []
    return ["the finished points trained on different corpora: "
            + "; ".join(f"{c}: {', '.join(sorted(names))}" for c, names in sorted(by_corpus.items()))]


def finished_point_errors(spec: SweepSpec, out: Path) -> list[str]:
    """Why finished points under ``out`` may not count for ``spec``: one line per mismatch (empty if none).

    A point's ``recipe.yaml`` must equal the recipe the sweep resolves for it now (base recipe, the
    point's overrides and seed, the command line's extra overrides), except the paths in ``_PATH_KEYS``;
    an option absent from an older ``recipe.yaml`` counts as its default; the finished points'
    ``data.json`` corpora must agree.
    """
    errors, rows = [], []
    defaults = flatten(to_dict(RecipeConfig()))
    for pt in spec.points:
        run_dir = out / pt.name
        if not (run_dir / "sweep_point.json").is_file():
            continue
        recipe_file = run_dir / "recipe.yaml"
        if not recipe_file.is_file():
            errors.append(f"{pt.name}: finished (sweep_point.json) but has no recipe.yaml, so what it trained with is unknown")
            continue
        recorded = flatten(yaml.safe_load(recipe_file.read_text()) or {})
        expected = flatten(to_dict(load_recipe(spec.base, pt.overrides)))
        # An option added after the point ran is absent from its recipe; it ran as the option's default.
        recorded.update({k: v for k, v in defaults.items() if k not in recorded})
        diffs = [f"{k}={recorded.get(k, '<absent>')!r} (the sweep now gives {expected.get(k, '<absent>')!r})"
                 for k in sorted(set(recorded) | set(expected))
                 if k not in _PATH_KEYS and recorded.get(k, KeyError) != expected.get(k, KeyError)]
        if diffs:
            errors.append(f"{pt.name}: trained with " + ", ".join(diffs[:4]) + (f" and {len(diffs) - 4} more" if len(diffs) > 4 else ""))
        try:
            rows.append({"name": pt.name, "data": json.loads((run_dir / "data.json").read_text())})
        except (OSError, ValueError):
            pass  # no record of its corpus (older runs): nothing to compare
    return errors + _corpus_errors(rows)


def check_finished_points(spec: SweepSpec) -> None:
    """Raise SweepError if a finished point of ``spec`` would mix another recipe or corpus into its results."""
    out = Path(spec.out_dir)
    errors = finished_point_errors(spec, out) if out.is_dir() else []
    if errors:
        raise SweepError(
            f"sweep {spec.name!r}: {len(errors)} finished point(s) in {out} do not match this sweep, so their results "
            "would mix with the new points':\n  " + "\n  ".join(errors)
            + f"\nFix: move those point folders out of {out} (they then run again), or run the sweep file and "
            "overrides they ran with.")


def run_sweep(spec: SweepSpec, *, dry_run: bool = False, print_fn=print, extra: list[str] | None = None) -> list[dict]:
    """Run the unfinished points in order, one after another; returns every finished point's summary."""
    spec = _with_extra(spec, extra or [])
    out = Path(spec.out_dir)
    check_finished_points(spec)
    if not dry_run:
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.yaml").write_text(yaml.safe_dump(dict(spec.source, out_dir=str(out)), sort_keys=False))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(spec.nproc)]
    todo = [pt for pt in spec.points if not (out / pt.name / "sweep_point.json").is_file()]
    print_fn(f"sweep {spec.name!r}: {len(spec.points)} points, {len(spec.points) - len(todo)} already finished, "
             f"{len(todo)} to run -> {out}")
    t_start = time.time()
    for i, pt in enumerate(todo):
        run_dir = out / pt.name
        cmds = _point_commands(spec, pt, launcher, run_dir)
        if dry_run:
            for cmd in cmds:
                print_fn("  would run: " + " ".join(cmd))
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        print_fn(f"[{i + 1}/{len(todo)}] {pt.name}: training ({run_dir}/sweep.log)")
        for cmd in cmds:
            _run(cmd, run_dir / "sweep.log")
        summary = _finish_point(spec, pt, run_dir)
        elapsed = time.time() - t_start
        eta = elapsed / (i + 1) * (len(todo) - i - 1)
        print_fn(f"[{i + 1}/{len(todo)}] {pt.name}: {spec.metric}={summary.get(spec.metric)} "
                 f"in {time.time() - t0:.0f}s; sweep ETA {eta / 60:.1f} min")
    rows = collect_results(out) if out.is_dir() else []
    if rows and spec.reference:
        print_fn((out / "paired.md").read_text().rstrip())
    return rows


def collect_results(out_dir: str | Path) -> list[dict]:
    """Finished points' summaries (``out_dir/*/sweep_point.json``); also writes ``results.jsonl``, and
    ``paired.md`` / ``paired.json`` when the sweep (``out_dir/sweep.yaml``) names a ``reference``."""
    out = Path(out_dir)
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*/sweep_point.json"))]
    mixed = _corpus_errors(rows)
    if mixed:
        raise SweepError(f"{out}: {mixed[0]}; results of different data are not compared. Fix: rerun the points "
                         "of one corpus (move the others out of the folder).")
    with open(out / "results.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    spec_file = out / "sweep.yaml"
    spec = yaml.safe_load(spec_file.read_text()) if spec_file.is_file() else None
    if isinstance(spec, dict) and spec.get("reference"):
        write_paired_report(out, rows, spec.get("metric", "loss"), spec["reference"], also=METRICS)
    return rows
