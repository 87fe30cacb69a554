"""A line per decoder block for the block-wise calibration passes (gptq and the other quantize_blockwise
users, awq, abq, baq, llm_fp4): at the default budget they run from minutes to hours and would otherwise
print nothing until they end."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator


def each_block(label: str, n_blocks: int) -> Iterator[int]:
    """range(n_blocks); after each block, one stderr line with the time so far and a linear estimate of the rest."""
    start = time.perf_counter()
    for b in range(n_blocks):
        yield b
        spent = time.perf_counter() - start
        left = spent / (b + 1) * (n_blocks - b - 1)
        print(f"bench: {label}: block {b + 1}/{n_blocks} done, {spent:.0f} s so far, about {left:.0f} s left",
              file=sys.stderr, flush=True)
