"""Writes a host-C++ copy of csrc/cuda/scan_kernels.cuh for the emulator: the kernels unchanged, the dynamic
shared-memory declarations turned into pointers the emulator sets, and the launchers (<<<>>>) cut.

  python make_host_copy.py <csrc/cuda/scan_kernels.cuh> <output>
"""

import sys

LAUNCHER_MARKER = "// Launchers."
SHARED_DECLARATION = "extern __shared__ float shared[];"


def host_copy(text: str) -> str:
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.strip() == LAUNCHER_MARKER)
    # The dashed rule above the marker and the blank line above that go too; the namespaces close again.
    while start > 0 and (lines[start - 1].startswith("// ---") or not lines[start - 1].strip()):
        start -= 1
    body = "\n".join(lines[:start]).replace(SHARED_DECLARATION, "float* shared = nullptr;")
    return body + "\n\n}  // namespace cuda\n}  // namespace dermomamba\n"


if __name__ == "__main__":
    source, target = sys.argv[1:3]
    with open(source) as handle:
        text = handle.read()
    with open(target, "w") as handle:
        handle.write(host_copy(text))
