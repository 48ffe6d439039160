"""Host-C++ copies of the CBAM kernel sources for the emulator: the kernels unchanged, the launch code
(<<<>>>, cudaLaunchCooperativeKernel) cut, dynamic shared memory a pointer the emulator sets.

  python make_host_copy.py <csrc/cuda folder> <output folder>
"""

import os
import shutil
import sys

SHARED_DECLARATION = "extern __shared__ float shared[];"
# (file, the section heading that starts the launch code, the namespaces left open there)
CUTS = {
    "cbam_passes.cuh": ("// sequences", ["cbam", "cuda", "dermomamba"]),
    "cbam_small.cu": ("// launch", ["cbam_small", "cuda", "dermomamba"]),
}
COPIED = ["cbam_params.h", "cbam_common.cuh", "dtype_convert.cuh"]


def cut(text: str, heading: str, namespaces) -> str:
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.strip() == heading)
    while start > 0 and (lines[start - 1].startswith("// ---") or not lines[start - 1].strip()):
        start -= 1
    body = "\n".join(lines[:start])
    return body + "\n" + "".join(f"}}  // namespace {n}\n" for n in namespaces)


def main(source: str, target: str) -> None:
    os.makedirs(target, exist_ok=True)
    for name in COPIED:
        shutil.copy(os.path.join(source, name), os.path.join(target, name))
    for name, (heading, namespaces) in CUTS.items():
        with open(os.path.join(source, name)) as handle:
            text = cut(handle.read(), heading, namespaces)
        assert SHARED_DECLARATION in text or name != "cbam_small.cu"
        text = text.replace(SHARED_DECLARATION, "float* shared = emu_dynamic_shared();")
        out_name = "cbam_small_host.cuh" if name == "cbam_small.cu" else name
        with open(os.path.join(target, out_name), "w") as handle:
            if name == "cbam_small.cu":
                handle.write("float* emu_dynamic_shared();\n")
            handle.write(text)


if __name__ == "__main__":
    main(*sys.argv[1:3])
