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
# Not plantable here: dropping the __syncwarp before a window's tile refill ("the previous window's reads of the
# tile are done"). Lane j writes row r's cells only after its shuffle of row r's offset from lane r, which lane r
# posts after its last read of its row, so a machine that runs each lane in program order (this one) cannot
# see the race; on the GPU the compiler may move that read past the shuffle (a shuffle orders no memory), so the
# kernel keeps the __syncwarp. (In the output kernel the __syncwarp before the window's y flush already orders it.)
# (name, old, new[, count]): old must occur exactly `count` times (default once) in the kernel file; all are replaced.
BUGS = [
    ("carry walks reverse directions forward", "const bool forward = direction < 2;",
     "const bool forward = direction < 4;"),
    ("carry counts segments of the row orientation", "const Geometry g = geometry(p.height, p.width, direction);",
     "const Geometry g = geometry(p.height, p.width, 0);"),
    ("reverse scan index one off", "p.length - line_start - q1;", "p.length - line_start - q1 + 1;"),
    ("first chunk boundary rounded down", "int next_chunk = (k.t_first + p.chunk_size - 1) / p.chunk_size;",
     "int next_chunk = k.t_first / p.chunk_size + 1;"),
    ("fp16 / bf16 pair halves swapped", "v[2 * j] = f.x;\n    v[2 * j + 1] = f.y;",
     "v[2 * j] = f.y;\n    v[2 * j + 1] = f.x;"),
    ("y transpose read untransposed", "tile.cell[r][lane].x);", "tile.cell[lane][r].x);"),
    ("no __syncwarp before the window's y flush", "      __syncwarp();\n      const int window = slot + 1;",
     "      const int window = slot + 1;"),
    ("segment decay without softplus", "delta_sum += dt;", "delta_sum += raw + bias;"),
    ("vector path chosen without checking the base pointers", "aligned(p.B) &&\n         aligned(p.C) && ", ""),
    # v6.1: the warp's gathered B / C rows and the row directions' x / delta tile.
    ("no __syncwarp after store_pieces (aggregate)",
     "      __syncwarp();\n      read_row<bc_t>(B_rows, lane, Bv);\n      __syncwarp();",
     "      read_row<bc_t>(B_rows, lane, Bv);\n      __syncwarp();"),
    ("no __syncwarp after store_pieces (output)",
     "      __syncwarp();\n      read_row<bc_t>(B_rows, lane, Bv);\n      read_row<bc_t>(C_rows, lane, Cv);",
     "      read_row<bc_t>(B_rows, lane, Bv);\n      read_row<bc_t>(C_rows, lane, Cv);"),
    ("no __syncwarp after read_row: the next step's store overwrites rows not yet read (output)",
     "      read_row<bc_t>(C_rows, lane, Cv);\n      __syncwarp();", "      read_row<bc_t>(C_rows, lane, Cv);"),
    ("no __syncwarp after fill_row_tile (the v6.1 scalar path as first written)",
     "    tile.cell[r][lane] = make_float2(x, raw);\n  }\n", "    tile.cell[r][lane] = make_float2(x, raw);\n  }\n  return;\n"),
    ("wrong piece loaded in load_pieces", "__ldg(reinterpret_cast<const uint4*>(src) + lane % G::kPieces);",
     "__ldg(reinterpret_cast<const uint4*>(src) + (lane + 1) % G::kPieces);"),
    ("wrong row stored in store_pieces",
     "const int row = pass * G::kRowsPerPass + lane / G::kPieces;\n    *reinterpret_cast",
     "const int row = pass * G::kRowsPerPass + lane % G::kRowsPerPass;\n    *reinterpret_cast"),
    ("store_pieces piece offset 8 bytes, not 16 (a misaligned uint4 shared store)",
     "(lane % G::kPieces) * 16) = piece[pass];", "(lane % G::kPieces) * 8) = piece[pass];"),
    ("row tile read at the step's column, not the lane's row", "const float2 cell = tile.cell[lane][slot];",
     "const float2 cell = tile.cell[slot][lane];", 2),
    ("y written into the next step's tile slot", "tile.cell[lane][slot].x = out;",
     "tile.cell[lane][(slot + 1) % kWindow].x = out;"),
    ("row tile filled at the lane's own offsets (no shuffle of the row's)",
     "const long long u_row = __shfl_sync(kFullMask, static_cast<long long>(u), r);",
     "const long long u_row = __shfl_sync(kFullMask, static_cast<long long>(u), r) * 0 + u;"),
    ("aggregate returns early for idle lanes (a warp-wide gather without them)",
     "  float A2[kStates], h[kStates], Bv[kStates];\n", "  if (!k.active) return;\n  float A2[kStates], h[kStates], Bv[kStates];\n"),
]
# Few, quick cases: lines longer than a segment in both orientations, H != W, chunk boundaries at segment starts,
# the fp16 / bf16 / fp32 vector paths, the scalar path, a window that ends mid-way (65 = 2 x 32 + 1), B / C rows
# 8 bytes off 16 with every stride a multiple of 16 bytes, idle lanes (lines not a multiple of 32), an idle warp.
CASES = [
    (1, 4, 70, 130, 16, 16, f16, "xdbl", True),
    (2, 4, 65, 33, 16, 32, bf16, "permuted", True),
    (1, 5, 40, 97, 13, 64, f32, "contiguous", True),
    (1, 4, 20, 9, 16, 16, f16, "xdbl_dt4", True),
    (1, 3, 45, 100, 16, 32, f32, "permuted", True),  # fp32 vector path (4 pieces a row), an idle warp (dim 3)
]


def build(name, old=None, new=None, count=1):
    """A flat-only library of the kernel with `old` replaced by `new` (None: unmodified)."""
    work = tempfile.mkdtemp()
    for f in os.listdir(SRC):
        if f.endswith((".cuh", ".h")):
            shutil.copy(os.path.join(SRC, f), work)
    if old is not None:
        path = os.path.join(work, FILE)
        text = open(path).read()
        assert text.count(old) == count, f"{name}: pattern found {text.count(old)} times, not {count}"
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
            if "misaligned address" in r.stderr:  # -fsanitize=alignment (build.sh)
                return f"case {case[:6]} {case[7]}: misaligned 16-byte access (UBSan)"
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
    for name, old, new, *count in BUGS:
        lib = build(name, old, new, *count)
        how = caught(lib)
        shutil.rmtree(os.path.dirname(lib), ignore_errors=True)
        print(f"{'caught' if how else 'MISSED'}: {name}" + (f" ({how})" if how else ""), flush=True)
        missed += how is None
    print("MISSED", missed)
    sys.exit(1 if missed else 0)
