"""What the Triton scan compiles to on a Hopper GPU, without one: SASS instructions per state
update in the scan's inner loop, registers, shuffles and barriers, per launch shape.

Triton compiles for a named target without a device (ptxas and nvdisasm ship with it), so this
runs on any machine with Triton. A proxy for speed, not a timing: the scan is bound by issue
slots (and the MUFU unit: one exp2 per update), so fewer instructions per update is faster
at equal occupancy. Time on a GPU with bench_mamba.py --sweep.

    python bench/scan_sass.py                       # the configured shape
    python bench/scan_sass.py --block-e 32 64 128 --warps 1 2 4
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from univ import scan  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
HALF = {"x_ptr", "dt_ptr", "z_ptr", "B_ptr", "C_ptr", "y_ptr", "D_ptr", "bias_ptr"}  # a bf16 model, as in the study


def compile_scan(output: bool, block_e: int, warps: int, stages: int, chunk: int, n: int, arch: int):
    kernel = scan._scan_chunk_kernel
    consts = dict(N=n, N_P2=triton.next_power_of_2(n), HAS_Z=True, STORE_H=False, OUTPUT=output, CHUNK=chunk,
                  BLOCK_E=block_e, STAGES=stages)
    sig = {}
    for p in kernel.params:
        if p.name in consts:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*bf16" if p.name in HALF else ("*i32" if p.name == "slot_ptr" else "*fp32")
        else:
            sig[p.name] = "i32"
    # What the launcher specialises at the study's shapes: every pointer 16-byte aligned and
    # every size and stride a multiple of 16 (T 1024, E 1536, x_proj width 80), P aside.
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params)
             if sig[p.name] != "constexpr" and p.name != "P"}
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def loop_stats(cubin: bytes) -> tuple[Counter, int]:
    """Opcode counts of the longest loop body (a label to a later branch back to it), and registers."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([BIN / "nvdisasm", "-c", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([BIN / "cuobjdump", "-res-usage", f.name], capture_output=True, text=True).stdout
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    best = (0, 0)
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > best[1] - best[0]:
            best = (labels[m.group(1)], i)
    ops = Counter()
    for line in lines[best[0]:best[1] + 1]:
        m = re.match(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            ops[m.group(1)] += 1
    regs = re.search(r"REG:(\d+)", usage)
    return ops, int(regs.group(1)) if regs else -1


def main():
    cfg = scan.SCAN_CONFIG
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-e", type=int, nargs="+", default=[cfg["block_e"]])
    ap.add_argument("--warps", type=int, nargs="+", default=[cfg["num_warps"]])
    ap.add_argument("--stages", type=int, default=cfg["stages"])
    ap.add_argument("--chunk", type=int, default=cfg["chunk"])
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--arch", type=int, default=90,
                    help="compute capability x 10 (90: H100/H200; 80, 89 work too, newer SASS is not parsed)")
    args = ap.parse_args()
    print(f"triton {triton.__version__}, sm_{args.arch}, d_state {args.d_state}, bf16 inputs, stages {args.stages}")
    print(f"{'pass':7} {'block_e':>7} {'warps':>5} {'regs':>4} {'loop':>5} {'per update':>10} "
          f"{'MUFU':>5} {'SHFL':>5} {'BAR':>4}  top opcodes")
    for block_e in args.block_e:
        for warps in args.warps:
            for output in (False, True):
                try:
                    k = compile_scan(output, block_e, warps, args.stages, args.chunk, args.d_state, args.arch)
                except Exception as e:  # a shape the compiler rejects
                    print(f"{'y' if output else 'states'}: block_e {block_e} warps {warps}: {type(e).__name__}")
                    continue
                ops, regs = loop_stats(k.asm["cubin"])
                updates = triton.next_power_of_2(args.d_state) * block_e / (32 * warps)  # per thread per step
                total = sum(ops.values())
                top = ", ".join(f"{o} {c}" for o, c in ops.most_common(6))
                print(f"{'y' if output else 'states':7} {block_e:7} {warps:5} {regs:4} {total:5} "
                      f"{total / updates:10.2f} {ops['MUFU']:5} {ops['SHFL']:5} {ops['BAR']:4}  {top}")


if __name__ == "__main__":
    main()
