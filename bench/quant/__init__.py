"""Shared quantization machinery: quantizers and bit packing. Plug-ins use these; they never copy them."""

from bench.quant.integer import IntQuantized, n_groups, quantize_rtn, resolve_group_size
from bench.quant.bitpack import pack_bits, pack_levels, packed_nbytes, unpack_bits, unpack_levels

__all__ = ["IntQuantized", "n_groups", "quantize_rtn", "resolve_group_size", "pack_bits", "packed_nbytes",
           "unpack_bits", "pack_levels", "unpack_levels"]
