"""Small pieces the single-op benchmarks share, importable without the dermomamba package (so that a benchmark
can run from a bare checkout on the device): the shapes argument and the commit stamp of a table."""

import os


def parse_shapes(text):
    """'AxB,CxD' -> ((A, B), (C, D)): the --shapes argument of the op benchmarks."""
    return tuple(tuple(int(v) for v in item.split("x")) for item in text.split(","))


def commit():
    """The commit a table is stamped with: common.git_commit (DERMOMAMBA_COMMIT first, then git), or the variable
    alone when common.py cannot import; a failed stamp never stops a benchmark."""
    try:
        from common import git_commit
        return git_commit()
    except Exception as exc:
        return os.environ.get("DERMOMAMBA_COMMIT", f"unknown ({exc})")
