"""Planted bugs in the flat forward (scan_flat_kernels.cuh): each built into its own flat-only library
(build.sh with -DEMU_FLAT_ONLY, seconds each) must fail check_flat.py on at least one of a few cases (or stop
the emulator: a misaligned 16-byte access), so the checks can fail where the kernel could plausibly go wrong.

  python plant_bugs_flat.py
"""
import os, shutil, subprocess, sys, tempfile, torch
import check_flat as F

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "..", "csrc", "cuda")
FILE = "scan_flat_kernels.cuh"
f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
# (name, old, new): old must occur exactly once in the kernel file.
BUGS = [
    ("carry walks reverse directions forward", "const bool forward = direction < 2;",
     "const bool forward = direction < 4;"),
    ("carry counts segments of the row orientation", "const Geometry g = geometry(p.height, p.width, direction);",
     "const Geometry g = geometry(p.height, p.width, 0);"),
    ("reverse scan index one off", "p.length - line_start - q1;", "p.length - line_start - q1 + 1;"),
    ("first chunk boundary rounded down", "int next_chunk = (k.t_first + p.chunk_size - 1) / p.chunk_size;",
     "int next_chunk = k.t_first / p.chunk_size + 1;"),
    ("fp16 / bf16 pair halves swapped", "v[8 * i + 2 * j] = f.x;\n          v[8 * i + 2 * j + 1] = f.y;",
     "v[8 * i + 2 * j] = f.y;\n          v[8 * i + 2 * j + 1] = f.x;"),
    ("transpose read untransposed", "transpose[warp][r][lane]);", "transpose[warp][lane][r]);"),
    ("no __syncwarp before the next window", "      }\n      __syncwarp();\n    }\n  }\n}",
     "      }\n    }\n  }\n}"),
    ("segment decay without softplus", "delta_sum += dt;", "delta_sum += raw + bias;"),
    ("vector path chosen without checking the base pointers", "aligned(p.B) &&\n         aligned(p.C) && ", ""),
]
# Few, quick cases: lines longer than a segment in both orientations, H != W, chunk boundaries at segment starts,
# the fp16 vector path, the scalar path, a window that ends mid-way (65 = 2 x 32 + 1), B / C rows 8 bytes off
# 16 with every stride a multiple of 16 bytes.
CASES = [
    (1, 4, 70, 130, 16, 16, f16, "xdbl", True),
    (2, 4, 65, 33, 16, 32, bf16, "permuted", True),
    (1, 5, 40, 97, 13, 64, f32, "contiguous", True),
    (1, 4, 20, 9, 16, 16, f16, "xdbl_dt4", True),
]


def build(name, old=None, new=None):
    """A flat-only library of the kernel with `old` replaced by `new` (None: unmodified)."""
    work = tempfile.mkdtemp()
    for f in os.listdir(SRC):
        if f.endswith((".cuh", ".h")):
            shutil.copy(os.path.join(SRC, f), work)
    if old is not None:
        path = os.path.join(work, FILE)
        text = open(path).read()
        assert text.count(old) == 1, f"{name}: pattern found {text.count(old)} times"
        open(path, "w").write(text.replace(old, new))
    lib = os.path.join(work, "libflat.so")
    env = dict(os.environ, EMU_CXXFLAGS="-DEMU_FLAT_ONLY")
    subprocess.run(["sh", os.path.join(HERE, "build.sh"), work, lib], check=True, env=env)
    return lib


def caught(lib):
    """Each case in its own process: a planted bug may also stop the emulator (misalignment, exit 4)."""
    for case in CASES:
        code = (f"import sys, torch, check_flat as F; "
                f"sys.exit(0 if F.check_case({case!r}, libpath={lib!r}, verbose=False)[0] else 1)")
        r = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True)
        if r.returncode != 0:
            return f"case {case[:6]} {case[7]}: " + ("check failed" if r.returncode == 1 else
                                                    f"emulator exit {r.returncode}")
    return None


if __name__ == "__main__":
    # The control: the kernel as it is passes every case (else a "caught" below would mean nothing).
    lib = build("unmodified")
    how = caught(lib)
    shutil.rmtree(os.path.dirname(lib), ignore_errors=True)
    if how:
        sys.exit(f"the unmodified kernel fails: {how}")
    print("unmodified kernel: every case passes", flush=True)
    missed = 0
    for name, old, new in BUGS:
        lib = build(name, old, new)
        how = caught(lib)
        shutil.rmtree(os.path.dirname(lib), ignore_errors=True)
        print(f"{'caught' if how else 'MISSED'}: {name}" + (f" ({how})" if how else ""), flush=True)
        missed += how is None
    print("MISSED", missed)
    sys.exit(1 if missed else 0)
