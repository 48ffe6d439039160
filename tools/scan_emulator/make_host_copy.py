"""Host-C++ copies of kernel headers for the emulator.

  python make_host_copy.py <csrc/cuda/scan_kernels.cuh> <output>
      the kernels unchanged, the dynamic shared-memory declarations turned into pointers the emulator sets,
      and the launchers (<<<>>>) cut.
  python make_host_copy.py --launchers <csrc/cuda/scan_flat_kernels.cuh> <output>
      the kernels AND their launchers kept: the `#ifdef __CUDACC__` guard around the launchers opened, every
      `kernel<<<config>>>(args);` turned into `emu::Launch(config).run([&] { kernel(args); });` (the launch runs
      on the emulated grid, fake/cuda_runtime.h) and every static `__shared__ [__align__(n)] T name[...];` into a reference
      to the emulated block's NaN-filled static shared memory (n-byte aligned), so the host logic (grid sizes, the vector-path
      choice, argument checks) is the real source, not a transcription.
"""

import re
import sys

LAUNCHER_MARKER = "// Launchers."
SHARED_DECLARATION = "extern __shared__ float shared[];"
CUDACC_GUARD = "#ifdef __CUDACC__"
# kernel<<<config>>>(args);  (config and args may span lines; kernel may carry template arguments)
LAUNCH = re.compile(r"([\w:]+(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\((.*?)\);", re.DOTALL)
# __shared__ [__align__(n)] T name[...]...;  (the alignment is kept: emu::static_shared aligns the block's memory)
STATIC_SHARED = re.compile(
    r"(?<!extern )__shared__\s+(?:__align__\((\d+)\)\s+)?([\w:<>, ]+?)\s+(\w+)((?:\[[^\]]+\])+)\s*;")


def host_copy(text: str) -> str:
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.strip() == LAUNCHER_MARKER)
    # The dashed rule above the marker and the blank line above that go too; the namespaces close again.
    while start > 0 and (lines[start - 1].startswith("// ---") or not lines[start - 1].strip()):
        start -= 1
    body = "\n".join(lines[:start]).replace(SHARED_DECLARATION, "float* shared = nullptr;")
    return body + "\n\n}  // namespace cuda\n}  // namespace dermomamba\n"


def host_copy_with_launchers(text: str) -> str:
    if text.count(CUDACC_GUARD) != 1:
        raise SystemExit(f"expected exactly one '{CUDACC_GUARD}' (the launchers' guard)")
    text = text.replace(CUDACC_GUARD, "#if 1  // emulator: the launchers run on emulated grids")
    text, launches = LAUNCH.subn(lambda m: f"emu::Launch({m.group(2)}).run([&] {{ {m.group(1)}({m.group(3)}); }});",
                                 text)
    if launches == 0:
        raise SystemExit("no <<<>>> launch found")
    text = STATIC_SHARED.sub(
        lambda m: f"auto& {m.group(3)} = emu::static_shared<{m.group(2)}{m.group(4)}, {m.group(1) or 16}>();", text)
    if "__shared__" in text or "<<<" in text:
        raise SystemExit("a shared-memory declaration or launch the emulator cannot translate is left")
    return text


if __name__ == "__main__":
    args = sys.argv[1:]
    convert = host_copy
    if args and args[0] == "--launchers":
        convert = host_copy_with_launchers
        args = args[1:]
    source, target = args[:2]
    with open(source) as handle:
        text = handle.read()
    with open(target, "w") as handle:
        handle.write(convert(text))
