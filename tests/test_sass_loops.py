"""benchmarks/sass_loops.py: one loop iteration's demands on an SM, read from SASS text."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import sass_loops  # noqa: E402

# A hand-written kernel in cuobjdump's format: an outer loop [0x0100, 0x0300] holding an inner
# one [0x0180, 0x0220]; an out-of-line retry path after the exit that jumps back into the outer
# loop (crossing it: not a loop); the end-of-kernel self-branch (not a loop); @!PT padding; a
# conditional forward branch in the outer loop's body over a copy and a matrix store (an ``if``).
SASS = """
        Function : _k
        /*0000*/                   MOV R1, c[0x0][0x28] ;                     /* 0x0 */
                                                                              /* 0x0 */
        /*0100*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;   /* 0x0 */
        /*0110*/                   HGMMA.64x64x16.F32.BF16 R56, R168, gdesc[UR8].tnspB, R56 ;   /* 0x0 */
        /*0120*/                   LDS.64 R2, [R3+0x100] ;                    /* 0x0 */
        /*0130*/              @!PT LDS RZ, [RZ] ;                             /* 0x0 */
        /*0140*/                   STL [R1+0x8], R4 ;                         /* 0x0 */
        /*0148*/               @P1 BRA 0x170 ;                                /* 0x0 */
        /*0150*/               @P0 LDGSTS.E.BYPASS.128 [R5+0x800], desc[UR4][R6.64], P1 ;   /* 0x0 */
        /*0160*/                   STSM.16.M88.4 [R209+0x10000], R168 ;       /* 0x0 */
        /*0170*/                   MUFU.EX2 R7, R7 ;                          /* 0x0 */
        /*0180*/                   LOP3.LUT R8, R8, 0xff, RZ, 0xc0, !PT ;     /* 0x0 */
        /*0190*/                   IMAD R9, R9, R10, R11 ;                    /* 0x0 */
        /*01a0*/                   FFMA R12, R12, R13, R14 ;                  /* 0x0 */
        /*01b0*/                   ISETP.GE.AND P0, PT, R9, R15, PT ;         /* 0x0 */
        /*0220*/               @P0 BRA 0x180 ;                                /* 0x0 */
        /*0230*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;              /* 0x0 */
        /*0300*/              @!P2 BRA 0x100 ;                                /* 0x0 */
        /*0310*/                   EXIT ;                                     /* 0x0 */
        /*0320*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P2, [UR4], R0 ;   /* 0x0 */
        /*0330*/                   BRA 0x200 ;                                /* 0x0 */
        /*0340*/                   BRA 0x340;                                 /* 0x0 */
"""


def test_loops_are_the_backward_branches_that_nest_and_the_crossing_one_is_dropped():
    loops = sass_loops.find_loops(sass_loops.parse(SASS))
    assert [(lp.start, lp.end, lp.depth) for lp in loops] == [(0x100, 0x300, 0), (0x180, 0x220, 1)]
    assert loops[0].children == [loops[1]]


def test_an_iteration_counts_each_pipe_and_the_bytes_through_shared_memory():
    instrs = sass_loops.parse(SASS)
    assert [i for i in instrs if i.never] == [i for i in instrs if i.addr == 0x130]
    outer, inner = sass_loops.find_loops(instrs)
    c = sass_loops.body_costs(instrs, outer, warps=8)  # two warpgroups
    # the inner loop's five instructions are not the outer's; the @!PT load never runs
    assert c["counts"] == {"issue": 10, "tensor": 2, "xu": 1}
    # HGMMA 64x32x16 (A and B in shared memory) and 64x64x16 (A in registers), once a warpgroup
    assert c["flops"] == 2 * (2 * 64 * 32 * 16 + 2 * 64 * 64 * 16)
    hgmma = 2 * ((64 * 16 + 32 * 16) * 2 + 64 * 16 * 2)
    lds, ldgsts, stsm = 8 * 32 * 8, 8 * 32 * 16, 8 * 4 * 128  # per warp: 32 x 8 B, 32 x 16 B, four 8x8 matrices
    assert c["smem"] == hgmma + lds + ldgsts + stsm
    assert c["local"] == 8 * 32 * 4  # the spill store goes to L1
    assert c["clk"]["tensor"] == c["flops"] / 4096
    assert c["clk"]["smem"] == (c["smem"] + c["local"]) / 128
    assert c["clk"]["xu"] == 256 / 16 and c["clk"]["issue"] == 10 * 8 / 4
    assert c["bound"] == "smem"
    i = sass_loops.body_costs(instrs, inner, warps=4)
    # LOP3 and ISETP on the ALU pipe; IMAD counts twice on the FMA pipe (its heavy half alone), FFMA once
    assert i["counts"] == {"issue": 5, "alu": 2, "fma": 3}
    assert i["clk"]["alu"] == 2 * 128 / 64 and i["clk"]["fma"] == 3 * 128 / 128
    assert i["flops"] == 0 and i["smem"] == 0


def test_a_taken_forward_branch_leaves_out_what_it_jumps_over():
    instrs = sass_loops.parse(SASS)
    outer, inner = sass_loops.find_loops(instrs)
    (addr, target, taken), = sass_loops.skipped_paths(instrs, outer, warps=8)
    assert (addr, target) == (0x148, 0x170)
    full = sass_loops.body_costs(instrs, outer, warps=8)
    # the LDGSTS and the STSM are skipped; the branch itself and the rest still run
    assert taken["counts"]["issue"] == full["counts"]["issue"] - 2
    assert taken["smem"] == full["smem"] - 8 * 32 * 16 - 8 * 4 * 128 and taken["local"] == full["local"]
    assert sass_loops.skipped_paths(instrs, inner, warps=4) == []  # its only branch goes back


def test_rows_name_the_span_depth_and_bound():
    rows = sass_loops.format_rows("_k", sass_loops.loop_report(SASS, 8))
    assert len(rows) == 3
    assert rows[0].startswith("_k") and "0x00100-0x00300 d0" in rows[0] and rows[0].endswith("-> smem")
    assert "branch 0x00148 -> 0x00170 taken:     8 ins" in rows[1]
    assert "0x00180-0x00220 d1" in rows[2]


@pytest.mark.parametrize("opcode,bytes_", [("LDS.U8", 32), ("LDS", 128), ("STS.128", 512), ("LDL.64", 256),
                                           ("LDSM.16.MT88.2", 256)])
def test_widths_of_shared_and_local_accesses(opcode, bytes_):
    assert sass_loops._mem_bytes(sass_loops.Instr(0, opcode, "R0, [R1]", False)) == bytes_
