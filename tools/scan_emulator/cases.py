import sys, time, torch
from check import check_case
f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
# (batch, dim, H, W, N, chunk, dtype, layout, softplus)
CASES = [
    (1, 8, 70, 73, 16, 16, f32, "contiguous", True),     # 20 tiles: two milestones, chunk 16 (4 per sub-chunk)
    (2, 5, 33, 40, 16, 7, f32, "permuted", True),        # odd dim (idle slot), odd chunk, permuted strides
    (1, 16, 23, 29, 20, 64, f32, "contiguous", True),    # N 20 (32-lane groups), one sub-chunk per tile
    (2, 8, 31, 26, 16, 128, f32, "wrapper", True),       # DermoMamba's chunk and B / C layout, tile of 512
    (1, 8, 64, 48, 16, 128, bf16, "wrapper", True),      # bf16, 6 tiles of 512
    (1, 40, 20, 30, 16, 32, f32, "contiguous", True),    # two channel blocks (32 + 8)
    (1, 3, 8, 5, 5, 8, f32, "contiguous", False),        # batch 1, N 5, no softplus, one tile
    (2, 9, 5, 7, 16, 1000, f16, "contiguous", True),     # chunk >= L, fp16
    (1, 8, 1, 300, 16, 16, f32, "contiguous", True),     # H = 1
    (1, 8, 300, 1, 16, 16, f32, "permuted", True),       # W = 1
    (1, 16, 40, 60, 16, 40, f16, "wrapper", True),       # d 16: 2 sub-chunks per tile; fp16
]
if __name__ == "__main__":
    which = [int(a) for a in sys.argv[1:]] or range(len(CASES))
    fails = 0
    for i in which:
        ok, _, _ = check_case(CASES[i])
        fails += not ok
    print("FAILS", fails)
