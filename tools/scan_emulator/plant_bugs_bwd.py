"""Plants deliberate bugs in copies of the staged backward's source, builds each into its own emulator
library and runs the backward checks on them: each bug must make checks fail (or deadlock).

  python plant_bugs_bwd.py [case indices of cases.py]     (default: 0 2 3 5 6 10)
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
    which = [int(a) for a in sys.argv[1:]] or [0, 2, 3, 5, 6, 10]
    prepared = []
    for i in which:
        inputs = EB.make_inputs(CASES[i])
        prepared.append((CASES[i], inputs, EB.references(*inputs, CASES[i][-1])))
    # Each check runs in a child process (a planted deadlock exits it; fork would inherit torch's
    # thread pools, which can hang a forked child): the prepared inputs go through a file.
    task_file = os.path.join(tempfile.mkdtemp(), "tasks.pt")
    torch.save(prepared, task_file)
    for name, (file, old, new) in BUGS.items():
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
