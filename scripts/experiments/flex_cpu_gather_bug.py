"""Minimal repro (torch 2.13.0+cpu): Inductor's CPU FlexAttention kernel evaluates a mask_mod that gathers rows of
a 2-D table and then selects a column (`table[q][..., 0]`) wrongly inside partial blocks; indexing the column
directly (`table[q, 0]`) or a 1-D table per column is right. Eager FlexAttention and SDPA agree with each other.
svdexport/models/sparse_attention.py uses 1-D tables for this reason.

    .venv/bin/python scripts/experiments/flex_cpu_gather_bug.py
"""

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

N, BS = 64, 16
nb = N // BS
table = (torch.arange(N) // 8).to(torch.int32)[:, None].repeat(1, 3)  # a coordinate per token, 3 columns
col = table[:, 0].contiguous()
every = (torch.full((1, 1, nb), nb, dtype=torch.int32), torch.arange(nb, dtype=torch.int32).expand(1, 1, nb, nb).contiguous())
q, k, v = (torch.randn(1, 1, N, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
for name, mm in (("gather then select", lambda b, h, qi, ki: ((table[qi][..., 0] - table[ki][..., 0]).abs() <= 1) & (ki < 59)),
                 ("column index", lambda b, h, qi, ki: ((table[qi, 0] - table[ki, 0]).abs() <= 1) & (ki < 59)),
                 ("1-D table", lambda b, h, qi, ki: ((col[qi] - col[ki]).abs() <= 1) & (ki < 59))):
    mask = BlockMask.from_kv_blocks(*every, BLOCK_SIZE=BS, mask_mod=mm, seq_lengths=(N, N))  # every block partial
    i = torch.arange(N)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mm(0, 0, i[:, None], i[None, :]))
    torch._dynamo.reset()
    out = torch.compile(flex_attention)(q, k, v, block_mask=mask)
    print(f"{name:20s} compiled vs SDPA max |diff| {(out - ref).abs().max().item():.2e}")
