"""The staged backward over cases.py's 11 shapes, atomic and deterministic modes (same inputs and references
for both), against the CPU op and float64.

  python cases_bwd.py [case indices]
"""
import sys
from cases import CASES
import check_bwd as EB

if __name__ == "__main__":
    which = [int(a) for a in sys.argv[1:]] or range(len(CASES))
    fails = 0
    for i in which:
        case = CASES[i]
        inputs = EB.make_inputs(case)
        refs = EB.references(*inputs, case[-1])
        for deterministic in (False, True):
            ok, _, _ = EB.check_case(case, deterministic, seed=i * 2 + deterministic, refs=refs, inputs=inputs)
            fails += not ok
    print("FAILS", fails)
