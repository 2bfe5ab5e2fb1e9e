"""What one iteration of each loop of a compiled kernel asks of an SM, read from its SASS text:
instructions by pipe, tensor-core FLOPs, shared-memory (and L1) bytes, and the clocks each of
those needs at Hopper's per-SM rates. The largest is the loop's throughput bound *if* the SM
keeps every pipe fed; latency (too few warps to cover the waits) is not modelled.

Why: sessions without a GPU can still rank tilings of a kernel whose bound is a pipe or shared
memory. Session 20's Nsight Compute profile found the gate's fold bound by the integer ALU pipe
and the d=64 dK/dV step by L1/shared-memory throughput; this reads the same bounds off the SASS
(``kernel_resources.py --loops`` prints them for every kernel of a call).

Counting rules (per iteration of one program of ``warps`` warps; a nested loop's body is counted
in its own row, not in its parent's):
- ``HGMMA.64xNxK``: a warpgroup instruction, issued once per 4 warps: ``2 * 64 * N * K`` FLOPs,
  and it reads its B operand (``N x K``) from shared memory, and its A operand (``64 x K``) too
  unless A is a register (``HGMMA ... Rd, Ra, gdesc[...]``). ``HMMA.MxNxK``: per warp, operands in
  registers.
- ``LDS``/``STS``/``LDL``/``STL``/``LDGSTS``: their width x 32 threads a warp; ``LDSM``/``STSM``
  ``.xN``: N 8x8 16-bit matrices a warp. Local memory (spills) lives in L1, which shares shared
  memory's SRAM and bandwidth, so it is counted with it. TMA copies (``UTMA*``, ``UBLKCP``) move
  bytes the SASS does not show: counted as instructions only.
- An instruction predicated ``@!PT`` never runs (the compiler's padding) and is skipped; other
  predicated ones count as run (an upper bound). A conditional forward branch inside a loop (an
  ``if`` without ``else``, say a mask applied to some tiles only) gets a second row: the iteration
  that takes it, without the instructions it jumps over.
- Pipes (NVIDIA's Nsight Compute names): ``alu`` integer and logic except IMAD/IMUL, compares,
  selects, min/max and fp32->fp16 packing; ``fma`` fp32 arithmetic, IMAD/IMUL (IMAD counted twice:
  it runs on the heavy half of the pipe alone); ``xu`` transcendentals and conversions. The rest
  (uniform datapath, branches, barriers, moves between register files) are counted in ``issue``
  only. The mapping of Hopper's new ``VI*`` opcodes is a best reading, not documented.

Per-SM rates (H100/H200 SXM, per clock): dense bf16/fp16 tensor FLOPs 4096 (989 TFLOP/s at 1.83
GHz over 132 SMs), shared memory 128 bytes, ``alu`` 64 lanes, ``fma`` 128, ``xu`` 16, issue 4 warp
instructions.
"""

from __future__ import annotations

import collections
import dataclasses
import re

TENSOR_FLOPS_PER_CLK = {"BF16": 4096, "F16": 4096, "TF32": 2048, "E4M3": 8192, "E5M2": 8192}
SMEM_BYTES_PER_CLK = 128
LANES_PER_CLK = {"alu": 64, "fma": 128, "xu": 16}
ISSUE_PER_CLK = 4

ALU = {"LOP3", "LOP", "SHF", "SHL", "SHR", "ISETP", "SEL", "FSEL", "IADD3", "IADD", "IABS", "IMNMX", "FMNMX",
       "FSETP", "HSETP2", "PLOP3", "P2R", "R2P", "LEA", "SGXT", "BMSK", "PRMT", "F2FP", "ISCADD", "MOV",
       "VIMNMX", "VIMNMX3", "VIADDMNMX", "FCHK", "CSET", "CSETP", "IMNMX3"}
FMA = {"FFMA", "FADD", "FMUL", "HFMA2", "HADD2", "HMUL2", "IDP", "VIADD", "I2FP", "FSWZADD"}
FMA_HEAVY = {"IMAD", "IMUL", "IMADSP"}
XU = {"MUFU", "I2F", "F2I", "F2F", "FRND", "POPC", "FLO", "BREV"}
LSU_BYTES = {"LDS", "STS", "LDL", "STL", "LDGSTS"}
LOCAL = {"LDL", "STL"}

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4)}
_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


@dataclasses.dataclass(frozen=True)
class Instr:
    addr: int
    opcode: str  # the full opcode with its modifiers, e.g. "HGMMA.64x32x16.F32.BF16"
    operands: str
    never: bool  # predicated @!PT: the compiler's padding, never executed
    predicated: bool = False  # runs under a predicate (@P0, @!P1, ...): a conditional branch if a BRA

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


@dataclasses.dataclass
class Loop:
    start: int  # the branch target (first instruction of the body)
    end: int  # the address of the backward branch (last instruction of the body)
    depth: int = 0  # 0 for an outermost loop
    children: list = dataclasses.field(default_factory=list)


def parse(sass: str) -> list[Instr]:
    """The instructions of one kernel's ``cuobjdump -sass`` text, in address order."""
    out = []
    for line in sass.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        text = m.group(2)
        never = text.startswith("@!PT ")
        predicated = re.match(r"^@!?U?P[0-9]+\s", text) is not None
        text = re.sub(r"^@!?U?P[T0-9]+\s+", "", text)
        opcode, _, operands = text.partition(" ")
        out.append(Instr(int(m.group(1), 16), opcode, operands.strip(), never, predicated))
    return out


def find_loops(instrs: list[Instr]) -> list[Loop]:
    """Every loop, outermost first: a branch back to an earlier address closes a body
    ``[target, branch]`` (a branch to itself, the end-of-kernel trap, is not a loop). A backward
    branch whose span crosses an earlier loop's without nesting is code the compiler placed out of
    line (a barrier's retry path after the kernel's end) jumping back into the middle: dropped."""
    branches = []
    for ins in instrs:
        if ins.base != "BRA":
            continue
        m = re.search(r"0x([0-9a-f]+)", ins.operands)
        if m and int(m.group(1), 16) < ins.addr:
            branches.append(Loop(int(m.group(1), 16), ins.addr))
    loops: list[Loop] = []
    for lp in sorted(branches, key=lambda lp: lp.end):
        if not any(p.start < lp.start <= p.end < lp.end or lp.start < p.start <= lp.end < p.end for p in loops):
            loops.append(lp)
    loops.sort(key=lambda lp: (lp.start, -lp.end))
    for i, lp in enumerate(loops):
        parents = [p for p in loops[:i] if p.start <= lp.start and lp.end <= p.end and p is not lp]
        if parents:
            parent = max(parents, key=lambda p: p.depth)
            lp.depth = parent.depth + 1
            parent.children.append(lp)
    return loops


def _mem_bytes(ins: Instr) -> int:
    """Shared-memory/L1 bytes a warp moves with one LDS/STS/LDL/STL/LDGSTS/LDSM/STSM."""
    mods = ins.opcode.split(".")[1:]
    if ins.base in ("LDSM", "STSM"):
        n = next((int(m) for m in mods if m in ("1", "2", "4")), 1)
        return n * 128
    width = 4
    for m in mods:
        width = _WIDTH.get(m, width)
    return 32 * width


def _hgmma(ins: Instr) -> tuple[int, int, str]:
    """(FLOPs, shared-memory bytes, input type) of one warpgroup HGMMA."""
    mods = ins.opcode.split(".")
    m, n, k = (int(x) for x in mods[1].split("x"))
    dtype = mods[-1]
    esize = {"BF16": 2, "F16": 2, "TF32": 4, "E4M3": 1, "E5M2": 1}.get(dtype, 2)
    ops = [o.strip() for o in ins.operands.split(",")]
    a_in_regs = len(ops) > 1 and re.fullmatch(r"R\d+", ops[1]) is not None
    return 2 * m * n * k, n * k * esize + (0 if a_in_regs else m * k * esize), dtype


def body_costs(instrs: list[Instr], loop: Loop, warps: int) -> dict:
    """One iteration of ``loop`` (its nested loops excluded) for a program of ``warps`` warps."""
    skip = [(c.start, c.end) for c in loop.children]
    counts: collections.Counter = collections.Counter()
    flops = {}
    smem = local = 0
    for ins in instrs:
        if not loop.start <= ins.addr <= loop.end or ins.never:
            continue
        if any(lo <= ins.addr <= hi for lo, hi in skip):
            continue
        b = ins.base
        counts["issue"] += 1
        if b == "HGMMA":
            f, by, dtype = _hgmma(ins)
            flops[dtype] = flops.get(dtype, 0) + f * (warps // 4)
            smem += by * (warps // 4)
            counts["tensor"] += 1
        elif b == "HMMA":
            m, n, k = _HMMA_SHAPES.get(ins.opcode.split(".")[1], (16, 8, 16))
            dtype = ins.opcode.split(".")[-1]
            flops[dtype] = flops.get(dtype, 0) + 2 * m * n * k * warps
            counts["tensor"] += 1
        elif b in ALU:
            counts["alu"] += 1
        elif b in FMA:
            counts["fma"] += 1
        elif b in FMA_HEAVY:
            counts["fma"] += 2
        elif b in XU:
            counts["xu"] += 1
        if b in LSU_BYTES or b in ("LDSM", "STSM"):
            by = _mem_bytes(ins) * warps
            if b in LOCAL:
                local += by
            else:
                smem += by
        if b.startswith("UTMA") or b == "UBLKCP":
            counts["tma"] += 1
    threads = 32 * warps
    clk = {
        "tensor": sum(f / TENSOR_FLOPS_PER_CLK.get(d, 4096) for d, f in flops.items()),
        "smem": (smem + local) / SMEM_BYTES_PER_CLK,
        "alu": counts["alu"] * threads / LANES_PER_CLK["alu"],
        "fma": counts["fma"] * threads / LANES_PER_CLK["fma"],
        "xu": counts["xu"] * threads / LANES_PER_CLK["xu"],
        "issue": counts["issue"] * warps / ISSUE_PER_CLK,
    }
    return {"counts": dict(counts), "flops": sum(flops.values()), "smem": smem, "local": local, "clk": clk,
            "bound": max(clk, key=clk.get)}


def skipped_paths(instrs: list[Instr], loop: Loop, warps: int) -> list[tuple[int, int, dict]]:
    """For each conditional forward branch in ``loop``'s own body (not its nested loops') that
    lands inside the body: ``(branch address, target, one iteration's costs when it is taken)``,
    i.e. with the instructions it jumps over left out. An ``if`` without ``else`` compiles to such a
    branch around its body, so this is the iteration that skips the ``if`` (say, a mask)."""
    out = []
    for ins in instrs:
        if ins.base != "BRA" or not ins.predicated or not loop.start <= ins.addr < loop.end:
            continue
        if any(c.start <= ins.addr <= c.end for c in loop.children):
            continue
        m = re.search(r"0x([0-9a-f]+)", ins.operands)
        target = int(m.group(1), 16) if m else -1
        if not ins.addr < target <= loop.end:
            continue
        inner = [i.addr for i in instrs if ins.addr < i.addr < target]
        if not inner:
            continue
        skip = Loop(inner[0], inner[-1])
        view = Loop(loop.start, loop.end, loop.depth, [*loop.children, skip])
        out.append((ins.addr, target, body_costs(instrs, view, warps)))
    return out


def loop_report(sass: str, warps: int) -> list[tuple[Loop, dict]]:
    """``(loop, body_costs)`` for every loop of one kernel's SASS, outermost first; each costs dict
    also lists, under ``"skips"``, :func:`skipped_paths` of that loop."""
    instrs = parse(sass)
    report = []
    for lp in find_loops(instrs):
        costs = body_costs(instrs, lp, warps)
        costs["skips"] = skipped_paths(instrs, lp, warps)
        report.append((lp, costs))
    return report


def format_rows(name: str, report: list[tuple[Loop, dict]]) -> list[str]:
    """One line per loop: its span and depth, instructions, FLOPs, bytes, clocks by pipe."""
    rows = []
    for lp, c in report:
        k = c["counts"]
        clk = " ".join(f"{p} {v:7.0f}" for p, v in c["clk"].items())
        rows.append(f"{name:26s} {lp.start:#07x}-{lp.end:#07x} d{lp.depth} {k.get('issue', 0):5d} ins "
                    f"{k.get('tensor', 0):3d} mma {c['flops'] / 1e6:6.2f} MFLOP {c['smem'] / 1024:6.1f}+"
                    f"{c['local'] / 1024:4.1f} KB | clk: {clk} -> {c['bound']}")
        for addr, target, s in c.get("skips", ()):
            if s["counts"].get("issue", 0) == k.get("issue", 0):
                continue
            sclk = " ".join(f"{p} {v:7.0f}" for p, v in s["clk"].items())
            rows.append(f"{'':26s}   branch {addr:#07x} -> {target:#07x} taken: {s['counts'].get('issue', 0):5d} ins "
                        f"| clk: {sclk} -> {s['bound']}")
    return rows
