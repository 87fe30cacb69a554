"""Bit packing of 1..8-bit codes into bytes: the stored form of every low-bit tensor.

Codes are written as a little-endian-in-byte bitstream (numpy packbits, bitorder='little') of `bits` bits
per value, row-major. `packed_nbytes(n, bits) == ceil(n * bits / 8)` exactly: no padding per row.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bench.errors import check_range


def packed_nbytes(n_values: int, bits: int) -> int:
    return math.ceil(n_values * bits / 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    check_range("bits", bits, 1, 8)
    c = codes.detach().reshape(-1).to(torch.uint8).cpu().numpy()
    if c.size and int(c.max()) >= (1 << bits):
        raise ValueError(f"code {int(c.max())} does not fit in {bits} bits")
    if bits == 8:
        return torch.from_numpy(c.copy())
    planes = np.unpackbits(c[:, None], axis=1, bitorder="little")[:, :bits]  # (n, bits), LSB first
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, n_values: int, shape=None) -> torch.Tensor:
    check_range("bits", bits, 1, 8)
    p = packed.detach().reshape(-1).to(torch.uint8).cpu().numpy()
    if bits == 8:
        out = p[:n_values]
    else:
        planes = np.unpackbits(p, bitorder="little")[: n_values * bits].reshape(n_values, bits)
        out = (planes.astype(np.uint8) << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)
    t = torch.from_numpy(np.ascontiguousarray(out))
    return t.reshape(shape) if shape is not None else t
