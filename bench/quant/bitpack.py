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


# Grids whose level count is not a power of two pack several codes into one base-`levels` number:
# 3 levels (ternary): 5 codes in 8 bits (3^5 = 243), 1.6 bits each; 5 levels: 3 codes in 7 bits (125), 2.33.
BASE_PACKING = {3: (5, 8), 5: (3, 7)}


def pack_levels(codes: torch.Tensor, levels: int) -> torch.Tensor:
    """Codes in [0, levels): base-`levels` groups for 3 and 5 levels, else ceil(log2 levels) bits each."""
    if levels not in BASE_PACKING:
        return pack_bits(codes, math.ceil(math.log2(levels)))
    per, bits = BASE_PACKING[levels]
    flat = codes.reshape(-1).to(torch.int64)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % per)]).reshape(-1, per)
    weights = levels ** torch.arange(per)
    return pack_bits((flat * weights).sum(dim=1), bits)


def unpack_levels(packed: torch.Tensor, levels: int, n_values: int, shape=None) -> torch.Tensor:
    if levels not in BASE_PACKING:
        return unpack_bits(packed, math.ceil(math.log2(levels)), n_values, shape)
    per, bits = BASE_PACKING[levels]
    v = unpack_bits(packed, bits, math.ceil(n_values / per)).to(torch.int64)
    digits = torch.stack([(v // levels**i) % levels for i in range(per)], dim=1).reshape(-1)[:n_values]
    t = digits.to(torch.uint8)
    return t.reshape(shape) if shape is not None else t
