"""``moba-cp analyze selection``: what CP traffic a trained MoBA model's block selection implies.

For every MoBA layer, on held-out sequences, the blocks each query (token x head) selects are
recorded (the layer's own gate, RoPE applied, as the layer computes it), and then, for each
simulated CP size ``cp`` (Megatron's zigzag layout: rank ``r`` holds chunks ``r`` and
``2cp-1-r``), per rank:

- the union of *remote* blocks its queries select, as a fraction of all remote blocks and of the
  remote blocks in its causal past (blocks before its last query's block), per block and per
  (block, KV head) (a selection by query head ``h`` needs KV head ``h // (Hq/Hkv)``);
- the bytes each comm type (``ring`` with that union, ``a2a``, ``a2a+ring``) would move per
  layer and rank (:func:`moba_cp.parallel.traffic.comm_traffic`).

And, independent of cp, the distance profile of the selections that are not the own block:
previous block, <= 4 blocks back, the first block, and a histogram of ``own - selected``.

And, for each query-tile size ``R`` (``--tile-rows``), what a query-major kernel (one program per
``R`` consecutive queries of one head, walking the union of the past blocks its rows selected,
with per-row masks) would compute against the per-row selection: ``work_ratio`` = sum over tiles
of ``R x |union|`` over the rows' own past selections (>= 1; the per-row work is MoBA's required
work beside the own block), and ``union_fraction`` = the unions' size over the past blocks of each
tile's last row (what dense causal attention would walk). A small ratio on a trained model is
what would make such a kernel pay for short sequences (no gather index, partials or merge).

Output: ``OUT/selection.json`` and ``OUT/selection.png``. Runs like ``moba-cp eval`` (torchrun with
``tp`` processes; the analysis itself runs at cp=1, heads split over TP ranks and combined).
``moba-cp train RECIPE --dry-run --selection OUT/selection.json`` then plans with the measured union.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from moba_cp.data.datasets import heldout_sequences
from moba_cp.eval.model_runner import load_eval_model, resolve_checkpoint
from moba_cp.eval.plots import pyplot, save_figure
from moba_cp.megatron.core_attention import MoBACoreAttention
from moba_cp.ops.moba.api import select_blocks
from moba_cp.parallel.traffic import candidate_comms, comm_traffic
from moba_cp.parallel.zigzag import chunk_owner
from moba_cp.train.distributed import shutdown_distributed

__all__ = ["run", "selection_counts", "layer_report", "SELECTION_FILE"]

SELECTION_FILE = "selection.json"
_HIST_EDGES = [1, 2, 3, 4, 5, 9, 17, 33, 65, 129, 257, 513, 1025, 1 << 30]  # bins [e_i, e_{i+1})


def _bin_names() -> list[str]:
    out = []
    for lo, hi in zip(_HIST_EDGES[:-1], _HIST_EDGES[1:]):
        out.append(str(lo) if hi == lo + 1 else (f"{lo}-{hi - 1}" if hi < (1 << 30) else f">={lo}"))
    return out


def _parse_cps(text: str) -> list[int]:
    try:
        cps = sorted({int(x) for x in str(text).split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--cp {text!r}: expected comma-separated integers, e.g. 2,4,8,16") from None
    if not cps or min(cps) < 2:
        raise ValueError(f"--cp {text!r}: CP sizes must be >= 2")
    return cps


# --------------------------------------------------------------------------------------------
# Counting (pure torch, one sequence, one layer)
# --------------------------------------------------------------------------------------------
def tile_union_counts(sel: torch.Tensor, *, block_size: int, rows: int) -> dict:
    """Query tiles of ``rows`` consecutive positions, per head, of one document's selection
    ``sel [S, Hq, W]`` (``-1`` = none): ``{"tile_work": sum of rows x |union of past selected
    blocks|, "row_work": sum of each row's past selections, "union": sum of |union|, "avail":
    sum of the past blocks of each tile's last row}`` (over tiles and heads; ints)."""
    s, hq, w = sel.shape
    sel = sel.long().cpu()
    pos = torch.arange(s)
    own = (pos // block_size)[:, None, None].expand(s, hq, w)
    past = (sel >= 0) & (sel != own)
    n_tiles = -(-s // rows)
    tile = (pos // rows)[:, None, None].expand(s, hq, w)[past]
    head = torch.arange(hq)[None, :, None].expand(s, hq, w)[past]
    hit = torch.zeros(n_tiles, hq, -(-s // block_size), dtype=torch.bool)
    hit[tile, head, sel[past]] = True
    union = hit.sum(-1)  # [tiles, Hq]
    tile_rows = torch.bincount(pos // rows, minlength=n_tiles)
    last_row = torch.clamp((torch.arange(n_tiles) + 1) * rows, max=s) - 1
    return {"tile_work": int((union * tile_rows[:, None]).sum()), "row_work": int(past.sum()),
            "union": int(union.sum()), "avail": int((last_row // block_size).sum()) * hq}


def selection_counts(sel: torch.Tensor, *, block_size: int, hkv: int, cps: list[int],
                     tile_rows: tuple[int, ...] = ()) -> dict:
    """Raw counts of one layer's selection of one sequence.

    Args:
        sel: ``[S, Hq, W]`` int block ids (``-1`` = none), one document, positions ``0..S-1``.
        hkv: KV heads of these query heads.
        tile_rows: query-tile sizes for :func:`tile_union_counts`.
    Returns:
        ``{"hist": LongTensor[bins], "prev", "within4", "first", "n": int, "cp": {cp: {"hit":
        Bool[cp, NB], "hit_kv": Bool[cp, NB, Hkv], "remote": Bool[cp, NB], "past": Bool[cp, NB]}},
        "tiles": {rows: tile_union_counts(...)}}`` (``cp`` sizes whose chunks would not hold whole
        blocks are left out).
    """
    s, hq, w = sel.shape
    sel = sel.long().cpu()
    nb = -(-s // block_size)
    own = (torch.arange(s) // block_size)[:, None, None].expand(s, hq, w)
    past = (sel >= 0) & (sel != own)
    dist_ = (own - sel)[past]
    edges = torch.tensor(_HIST_EDGES)
    hist = torch.bincount(torch.bucketize(dist_, edges, right=True) - 1, minlength=len(_HIST_EDGES) - 1)
    out = {"hist": hist, "prev": int((dist_ == 1).sum()), "within4": int((dist_ <= 4).sum()),
           "first": int((sel[past] == 0).sum()), "n": int(dist_.numel()), "cp": {},
           "tiles": {r: tile_union_counts(sel, block_size=block_size, rows=r) for r in tile_rows}}
    valid = sel >= 0
    head_kv = (torch.arange(hq) // (hq // hkv))[None, :, None].expand(s, hq, w)
    for cp in cps:
        if s % (2 * cp * block_size):
            continue
        chunk = s // (2 * cp)
        tok_rank = torch.tensor([chunk_owner(c, cp) for c in range(2 * cp)]).repeat_interleave(chunk)
        blk_rank = torch.tensor([chunk_owner(c, cp) for c in range(2 * cp)]).repeat_interleave(chunk // block_size)
        r_of = tok_rank[:, None, None].expand(s, hq, w)[valid]
        g_of, h_of = sel[valid], head_kv[valid]
        hit = torch.zeros(cp, nb, dtype=torch.bool)
        hit[r_of, g_of] = True
        hit_kv = torch.zeros(cp, nb, hkv, dtype=torch.bool)
        hit_kv[r_of, g_of, h_of] = True
        remote = blk_rank[None, :] != torch.arange(cp)[:, None]
        # rank r's last token ends chunk 2cp-1-r: position (2cp-r)*chunk - 1
        last_block = torch.tensor([((2 * cp - r) * chunk - 1) // block_size for r in range(cp)])
        past_blocks = remote & (torch.arange(nb)[None, :] < last_block[:, None])
        out["cp"][cp] = {"hit": hit & remote, "hit_kv": hit_kv & remote[:, :, None], "remote": remote,
                         "past": past_blocks}
    return out


def _parse_tile_rows(text: str) -> tuple[int, ...]:
    """``--tile-rows`` ("64,128"; "" for none) -> sizes, each a power of two >= 16."""
    try:
        rows = tuple(sorted({int(x) for x in str(text or "").split(",") if x.strip()}))
    except ValueError:
        raise ValueError(f"--tile-rows {text!r}: expected comma-separated integers, e.g. 64,128") from None
    bad = [r for r in rows if r < 16 or r & (r - 1)]
    if bad:
        raise ValueError(f"--tile-rows {text!r}: {bad} are not powers of two >= 16 (kernel row tiles), e.g. 64,128")
    return rows


def _frac(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per rank ``a.sum / b.sum`` (rows = ranks)."""
    num = a.flatten(1).sum(1).double()
    den = b.flatten(1).sum(1).double().clamp(min=1)
    return (num / den).tolist()


def layer_report(counts: list[dict], *, shape: dict) -> dict:
    """One layer's JSON entry from its per-sequence :func:`selection_counts` (fractions averaged
    over sequences). ``shape``: ``seq_len, hq, hkv, head_dim, elem_bytes`` for the byte counts."""
    hkv = shape["hkv"]
    n = sum(c["n"] for c in counts)
    hist = sum(c["hist"] for c in counts)
    rep = {
        "distance": {
            "selections": n,
            "previous_block": sum(c["prev"] for c in counts) / max(n, 1),
            "within_4_blocks": sum(c["within4"] for c in counts) / max(n, 1),
            "first_block": sum(c["first"] for c in counts) / max(n, 1),
            "histogram": dict(zip(_bin_names(), [int(x) for x in hist])),
        },
        "cp": {},
        "query_tiles": {},
    }
    for r in counts[0].get("tiles", {}):
        tot = {key: sum(c["tiles"][r][key] for c in counts) for key in counts[0]["tiles"][r]}
        rep["query_tiles"][str(r)] = {"work_ratio": tot["tile_work"] / max(tot["row_work"], 1),
                                      "union_fraction": tot["union"] / max(tot["avail"], 1), **tot}
    for cp in counts[0]["cp"]:
        per_seq = [c["cp"][cp] for c in counts]
        cols = {"union_fraction": [], "union_causal_fraction": [], "kv_union_fraction": [],
                "kv_union_causal_fraction": []}
        for x in per_seq:
            kv = lambda m: m[:, :, None].expand(-1, -1, hkv)  # noqa: E731
            cols["union_fraction"].append(_frac(x["hit"], x["remote"]))
            cols["union_causal_fraction"].append(_frac(x["hit"], x["past"]))
            cols["kv_union_fraction"].append(_frac(x["hit_kv"], kv(x["remote"])))
            cols["kv_union_causal_fraction"].append(_frac(x["hit_kv"], kv(x["past"])))
        entry = {}
        for name, rows in cols.items():
            per_rank = torch.tensor(rows, dtype=torch.float64).mean(0).tolist()
            entry[f"{name}_per_rank"] = per_rank
            entry[f"{name}_mean"] = sum(per_rank) / len(per_rank)
            entry[f"{name}_max"] = max(per_rank)
        rep["cp"][str(cp)] = entry
    _add_bytes(rep["cp"], shape)
    return rep


def _add_bytes(per_cp: dict, shape: dict) -> None:
    """Bytes per comm type at each cp: the ring with the layer's largest per-rank causal union
    (measured at the ring's own size, cp / a2a_size, when that size was analysed)."""
    hq, hkv = shape["hq"], shape["hkv"]
    rest = {k: v for k, v in shape.items() if k not in ("hq", "hkv")}
    for cp_text, entry in per_cp.items():
        cp = int(cp_text)
        entry["bytes_per_rank"] = {}
        for comm, a in candidate_comms(cp, hq, hkv):
            ring_cp = cp // (a or (cp if comm == "a2a" else 1))
            union = per_cp.get(str(ring_cp), entry)["union_causal_fraction_max"]
            t = comm_traffic(comm, cp=cp, hq=hq, hkv=hkv, union=union, a2a_size=a, **rest)
            entry["bytes_per_rank"][t.name] = {"fwd": t.fwd, "bwd": t.bwd, "total": t.total, "ring_union": union}


# --------------------------------------------------------------------------------------------
# Driving a checkpoint
# --------------------------------------------------------------------------------------------
class _Recorder:
    """Forward pre-hooks on the MoBA core attentions: each call's selection -> counts."""

    def __init__(self, model, cps, tile_rows=()):
        self.layers = [m for m in model.modules() if isinstance(m, MoBACoreAttention)]
        self.cps = cps
        self.tile_rows = tuple(tile_rows)
        self.counts: dict[int, list[dict]] = {m.layer_number: [] for m in self.layers}
        self.handles = [m.register_forward_pre_hook(self._hook) for m in self.layers]

    def _hook(self, module, args):
        query, key = args[0], args[1]  # [s, b, h, d] (RoPE applied)
        for b in range(query.shape[1]):
            sel = select_blocks(query[:, b].contiguous(), key[:, b].contiguous(), block_size=module.moba_block_size,
                                topk=module.moba_topk, backend=module.moba_backend)
            self.counts[module.layer_number].append(
                selection_counts(sel, block_size=module.moba_block_size, hkv=key.shape[2], cps=self.cps,
                                 tile_rows=self.tile_rows))

    def close(self):
        for h in self.handles:
            h.remove()


def _combine_tp(counts: dict[int, list[dict]], tp_group) -> None:
    """Under tensor parallelism each rank saw its own heads: OR the block hits, stack KV heads, sum counts."""
    world = dist.get_world_size(tp_group)
    for per_seq in counts.values():
        for c in per_seq:
            for key in ("prev", "within4", "first", "n"):
                t = torch.tensor([c[key]], dtype=torch.long)
                dist.all_reduce(t, group=tp_group)
                c[key] = int(t)
            dist.all_reduce(c["hist"], group=tp_group)
            for tiles in c.get("tiles", {}).values():  # sums over heads: each rank counted its own
                for key in tiles:
                    t = torch.tensor([tiles[key]], dtype=torch.long)
                    dist.all_reduce(t, group=tp_group)
                    tiles[key] = int(t)
            for x in c["cp"].values():
                hit = x["hit"].to(torch.uint8)
                dist.all_reduce(hit, op=dist.ReduceOp.MAX, group=tp_group)
                x["hit"] = hit.bool()
                parts = [torch.empty_like(x["hit_kv"], dtype=torch.uint8) for _ in range(world)]
                dist.all_gather(parts, x["hit_kv"].to(torch.uint8), group=tp_group)
                x["hit_kv"] = torch.cat(parts, dim=2).bool()


def plot_selection(report: dict, out_path: str) -> str:
    """Three panels: causal union per layer and cp; distance histogram; bytes per comm type vs cp."""
    plt = pyplot()
    layers = report["layers"]
    cps = [int(c) for c in layers[0]["cp"]] if layers else []
    fig, ax = plt.subplots(1, 3, figsize=(17, 4.5))
    for cp in cps:
        ax[0].plot([lay["layer"] for lay in layers], [lay["cp"][str(cp)]["union_causal_fraction_mean"] for lay in layers],
                   marker="o", label=f"cp={cp} (block)")
        ax[0].plot([lay["layer"] for lay in layers],
                   [lay["cp"][str(cp)]["kv_union_causal_fraction_mean"] for lay in layers], ls="--", alpha=0.6,
                   label=f"cp={cp} (block x KV head)")
    ax[0].set(xlabel="layer", ylabel="selected / causal-past remote blocks", ylim=(0, 1.05),
              title="Union of remote blocks a rank selects (mean over ranks)")
    ax[0].legend(fontsize=7)
    names = _bin_names()
    hist = [sum(lay["distance"]["histogram"][n] for lay in layers) for n in names]
    ax[1].bar(range(len(names)), hist)
    ax[1].set_xticks(range(len(names)), names, rotation=45, fontsize=7)
    ax[1].set(yscale="log", xlabel="blocks back (own block excluded)", ylabel="selections",
              title="Distance of selections (all layers)")
    comms = sorted({c for lay in layers for e in lay["cp"].values() for c in e["bytes_per_rank"]})
    for comm in comms:
        xs, ys = [], []
        for cp in cps:
            vals = [lay["cp"][str(cp)]["bytes_per_rank"][comm]["total"] for lay in layers
                    if comm in lay["cp"][str(cp)]["bytes_per_rank"]]
            if vals:
                xs.append(cp)
                ys.append(sum(vals) / len(vals) / 2**20)
        ax[2].plot(xs, ys, marker="o", label=comm)
    ax[2].set(xscale="log", yscale="log", xlabel="cp", ylabel="MiB per layer per rank (fwd+bwd)",
              title="CP traffic per comm type (measured union)")
    ax[2].legend(fontsize=7)
    return save_figure(fig, out_path)


def run(args) -> int:
    """The ``analyze selection`` command (every TP rank calls it; rank 0 writes)."""
    cps = _parse_cps(args.cp)
    tile_rows = _parse_tile_rows(getattr(args, "tile_rows", ""))
    em = load_eval_model(args.checkpoint, args.seq_len, list(args.overrides) + ["--parallel.cp=1"])
    try:
        cfg = em.cfg
        seqs = heldout_sequences(cfg.data, seq_length=args.seq_len, num_sequences=args.num_seqs,
                                 tokenizer=em.tokenizer, builtin_budget_bytes=cfg.data.builtin_budget_bytes)
        rec = _Recorder(em.model, cps, tile_rows)
        if not rec.layers:
            raise ValueError("the model has no MoBA layer (attention.pattern=full): nothing to analyse")
        for i, x in enumerate(seqs):
            em.loss_fn(x[:-1], x[1:])
            if em.env.is_main:
                print(f"analyze selection: sequence {i + 1}/{len(seqs)} done", flush=True)
        rec.close()
        if em.env.tp > 1:
            _combine_tp(rec.counts, parallel_state.get_tensor_model_parallel_group())
        m = cfg.model
        hkv = m.num_query_groups
        skipped = [cp for cp in cps if args.seq_len % (2 * cp * cfg.moba.block_size)]
        shape = dict(seq_len=args.seq_len, hq=m.num_attention_heads, hkv=hkv,
                     head_dim=m.hidden_size // m.num_attention_heads, elem_bytes=2)
        report = {
            "checkpoint": str(resolve_checkpoint(args.checkpoint)[0]), "recipe": cfg.name, "seq_len": args.seq_len,
            "num_seqs": len(seqs), "block_size": cfg.moba.block_size, "topk": cfg.moba.topk,
            "heads": m.num_attention_heads, "kv_heads": hkv, "cps": [c for c in cps if c not in skipped],
            "skipped_cps": {str(c): f"S={args.seq_len} is not a multiple of 2*cp*block_size={2 * c * cfg.moba.block_size}"
                            for c in skipped},
            "bytes_assume": "bf16, the model's heads at tp=1, all CP ranks on one node (see "
                            "moba_cp.parallel.traffic); the ring uses the layer's largest per-rank causal union",
            "layers": [dict(layer=ln, **layer_report(c, shape=shape))
                       for ln, c in sorted(rec.counts.items())],
        }
        if em.env.is_main:
            out = Path(args.out or Path(args.checkpoint) / "analysis")
            out.mkdir(parents=True, exist_ok=True)
            (out / SELECTION_FILE).write_text(json.dumps(report, indent=1))
            png = plot_selection(report, str(out / "selection.png"))
            for lay in report["layers"]:
                fr = " ".join(f"cp{cp}={lay['cp'][str(cp)]['union_causal_fraction_mean']:.0%}" for cp in report["cps"])
                print(f"  layer {lay['layer']:>3}: causal-past union {fr}; previous block "
                      f"{lay['distance']['previous_block']:.0%}, <=4 back {lay['distance']['within_4_blocks']:.0%}, "
                      f"first block {lay['distance']['first_block']:.0%}")
                for r, t in lay["query_tiles"].items():
                    print(f"             {r}-row query tiles: union {t['union_fraction']:.0%} of the past blocks, "
                          f"{t['work_ratio']:.2f}x the per-row selections' work")
            print(f"analyze selection: wrote {out / SELECTION_FILE} and {png}")
    finally:
        shutdown_distributed()
    return 0
