"""Plants deliberate bugs in copies of the staged backward's source, builds each into its own emulator
library and runs the backward checks on them: each bug must make checks fail (or deadlock).

  python plant_bugs_bwd.py [case indices of cases.py]     (default: 0 2 3 5 6 10)
  python plant_bugs_bwd.py --lean [case indices]           (bugs in the lean variants' code, run with
                                                            DERMOMAMBA_STAGED_BWD_VARIANT=lean; default 0 3 5 9)
"""
import os, shutil, subprocess, sys, tempfile
import torch
from cases import CASES
import check_bwd as EB

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "..", "csrc", "cuda")
BWD = "scan_staged_bwd_kernels.cuh"
FWD = "scan_staged_kernels.cuh"

# name: (file, original text, planted text)
BUGS = {
    "lookback skips the nearest tile's map": (
        BWD, "for (int j = w.milestone_before + 1; j < reverse; ++j) {",
        "for (int j = w.milestone_before + 1; j < reverse - 1; ++j) {"),
    "writers' fence dropped": (
        FWD, "__device__ __forceinline__ void publish_flag(int* flag) {\n  __threadfence();",
        "__device__ __forceinline__ void publish_flag(int* flag) {\n"),
    "tile edge: rightmost sub-chunk left out of the tile's map": (
        BWD, "    for (int s = l.subs - 1; s >= 0; --s) {\n      const float2 a = sh.fwd.agg[(s * l.slots + slot) * G + n];\n      tile_state",
        "    for (int s = l.subs - 2; s >= 0; --s) {\n      const float2 a = sh.fwd.agg[(s * l.slots + slot) * G + n];\n      tile_state"),
    "milestone off by one": (
        BWD, "w.milestone_before = (reverse / kMilestoneSpan) * kMilestoneSpan - 1;",
        "w.milestone_before = (reverse / kMilestoneSpan) * kMilestoneSpan - 2;"),
    "block edge: last position of a block left out of dB / dC": (
        BWD, "if (j >= b.end - b.t0) continue;", "if (j >= b.end - b.t0 - 1) continue;"),
    "barrier before the dB / dC reducers dropped": (
        BWD, "    }\n    __syncthreads();\n    // dB / dC of every sub-chunk's block k",
        "    }\n    // dB / dC of every sub-chunk's block k"),
    "softplus slope dropped": (
        BWD, "const float slope = p.delta_softplus ? -expm1f(-s.x) : 1.f;", "const float slope = 1.f;"),
}

# Bugs in the lean variants' own code (scan_staged_bwd_kernels.cuh, kLean paths), checked with
# DERMOMAMBA_STAGED_BWD_VARIANT=lean on shapes where the lean kernel runs (N <= 16, chunk a multiple of 16).
LEAN_BUGS = {
    "lean: dB / dC pair sum drops the partner channel": (
        BWD, "row[j] = odd_slot ? partner + term_C : term_B + partner;", "row[j] = odd_slot ? term_C : term_B;"),
    "lean: parked h_{t-1} read from the neighbouring position": (
        BWD, "const float h_prev = j < kHalf ? row[j] : h_hi[j - kHalf];",
        "const float h_prev = j < kHalf ? row[j ^ 1] : h_hi[j - kHalf];"),
    "lean: reducer skips the last channel pair": (
        BWD, "for (int q = 0; q < w.block_channels; q += 2) {", "for (int q = 0; q + 2 < w.block_channels; q += 2) {"),
    "lean: butterfly's first round keeps the wrong half": (
        BWD, "v_du[j] = (upper ? du_hi[j] : du) + __shfl_xor_sync(kFullMask, upper ? du : du_hi[j], kHalf);",
        "v_du[j] = (upper ? du : du_hi[j]) + __shfl_xor_sync(kFullMask, upper ? du_hi[j] : du, kHalf);"),
}
LEAN_VARIABLE = "DERMOMAMBA_STAGED_BWD_VARIANT"


def build(name, file, old, new):
    work = tempfile.mkdtemp()
    for f in os.listdir(SRC):
        if f.endswith((".cuh", ".h")):
            shutil.copy(os.path.join(SRC, f), work)
    path = os.path.join(work, file)
    text = open(path).read()
    assert text.count(old) == 1, f"{name}: pattern not found once"
    open(path, "w").write(text.replace(old, new))
    lib = os.path.join(work, "libemu.so")
    subprocess.run(["sh", os.path.join(HERE, "build.sh"), work, lib], check=True)
    return lib


def run_one(task_file, lib, index, deterministic, seed):
    """One check in this (fresh) process: a planted deadlock exits it with code 3."""
    case, inputs, refs = torch.load(task_file, weights_only=False)[index]
    ok, _, _ = EB.check_case(case, deterministic, seed=seed, libpath=lib, refs=refs, inputs=inputs, verbose=False)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        task_file, lib, index, deterministic, seed = sys.argv[2:7]
        run_one(task_file, lib, int(index), deterministic == "1", int(seed))
    lean = sys.argv[1:2] == ["--lean"]
    if lean:
        os.environ[LEAN_VARIABLE] = "lean"  # read by the emulated layout in this process and its children
    which = [int(a) for a in sys.argv[1 + lean:]] or ([0, 3, 5, 9] if lean else [0, 2, 3, 5, 6, 10])
    prepared = []
    for i in which:
        inputs = EB.make_inputs(CASES[i])
        prepared.append((CASES[i], inputs, EB.references(*inputs, CASES[i][-1])))
    # Each check runs in a child process (a planted deadlock exits it; fork would inherit torch's
    # thread pools, which can hang a forked child): the prepared inputs go through a file.
    task_file = os.path.join(tempfile.mkdtemp(), "tasks.pt")
    torch.save(prepared, task_file)
    for name, (file, old, new) in (LEAN_BUGS if lean else BUGS).items():
        lib = build(name, file, old, new)
        fails = runs = 0
        for index in range(len(prepared)):
            for deterministic in (False, True):
                code = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", task_file, lib, str(index),
                                       str(int(deterministic)), str(runs + 7)], cwd=HERE,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
                runs += 1
                fails += code != 0
        print(f"{name}: {fails}/{runs} checks fail", flush=True)
