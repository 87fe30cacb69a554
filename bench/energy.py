"""Energy with provenance. Every value has a source: `rapl` (measured from /sys/class/powercap),
`nvml` (measured by the GPU driver), `sim:<tool>` (a simulator), or `model:<table>` (an estimate from
operation counts and a cited per-operation energy table); a sum of parts from two sources names both
(`sim:zigzag+model:<table>`). An estimate is never reported as a measurement.
"""

from __future__ import annotations

from pathlib import Path

RAPL_ROOT = Path("/sys/class/powercap")

# Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014, 45 nm, 0.9 V.
# pJ per operation, all read from the paper's table (no sub-8-bit value: none is in the paper, and none is
# used, since every kernel here multiplies at 8 bits or more); a multiply-accumulate is one multiply + one add.
HOROWITZ_45NM_PJ = {"fp32_mult": 3.7, "fp32_add": 0.9, "int8_mult": 0.2, "int8_add": 0.03, "int32_mult": 3.1,
                    "int32_add": 0.1, "dram_read_32bit": 640.0}
HOROWITZ_TABLE = "horowitz_isscc2014_45nm"
# One MAC by the arithmetic that performs it: int8 products are accumulated in int32 (fbgemm, MLAS int8 GEMM).
# "lmul": Luo & Sun's L-Mul (arXiv 2410.00907) replaces the fp multiply by one integer add of the operands' bit
# patterns and keeps the fp32 accumulation (the paper's energy argument); a 32-bit integer add, as the paper's fp32
# emulation does it (a narrower hardware adder would cost less; this table has none between 8 and 32 bits).
MAC_PJ = {"fp32": HOROWITZ_45NM_PJ["fp32_mult"] + HOROWITZ_45NM_PJ["fp32_add"],
          "int8": HOROWITZ_45NM_PJ["int8_mult"] + HOROWITZ_45NM_PJ["int32_add"],
          "lmul": HOROWITZ_45NM_PJ["int32_add"] + HOROWITZ_45NM_PJ["fp32_add"]}


# Per-MAC energy by operand format, for the formats Horowitz's table does not list (minifloats FP8/FP6/FP4, integers
# other than 8 and 32 bits): an estimate fitted to that table's own entries, named as a source of its own so it is
# never mistaken for a measurement or for the paper's numbers.
# - A multiplier's energy grows with the product of its operands' significand widths (an array multiplier has
#   p_a x p_b partial-product cells). Integers: int8 x int8 = 0.2 pJ times (b_a b_b / 64); the law gives int32 x
#   int32 = 3.2 pJ where the table says 3.1. Floats (significand p = mantissa bits + 1, an integer operand's p its
#   width): A + C p_a p_b through the table's fp16 (p = 11: 1.1 pJ) and fp32 (p = 24: 3.7 pJ) multiplies; A (0.41
#   pJ) is what does not shrink with the significand: exponent add, normalisation, rounding.
# - Accumulation as MAC_PJ: integer products in int32 (0.1 pJ), float products in fp32 (0.9 pJ; FP8 tensor cores
#   accumulate at least this wide). So int8 MAC = MAC_PJ["int8"] = 0.3 pJ, fp32 MAC = MAC_PJ["fp32"] = 4.6 pJ,
#   fp16 MAC 2.0 pJ, FP8 E4M3 MAC 1.4 pJ, FP4 E2M1 MAC 1.33 pJ.
WIDTH_FIT_TABLE = "horowitz_isscc2014_45nm_widthfit"
_FP_MULT_C = (HOROWITZ_45NM_PJ["fp32_mult"] - 1.1) / (24**2 - 11**2)  # 1.1 pJ: Horowitz's fp16 multiply
_FP_MULT_A = 1.1 - _FP_MULT_C * 11**2


def mac_pj(w_kind: str, w_significand: int, a_kind: str, a_significand: int) -> float:
    """Estimated pJ of one multiply-accumulate of a weight and an activation (kind "int" with its bit-width, or
    "float" with its significand bits = mantissa + 1), by the width fit above (source `model:WIDTH_FIT_TABLE`)."""
    for kind, p in ((w_kind, w_significand), (a_kind, a_significand)):
        if kind not in ("int", "float") or p < 1:
            raise ValueError(f"operand ({kind}, {p}) is not an int width or a float significand width")
    if w_kind == a_kind == "int":
        return HOROWITZ_45NM_PJ["int8_mult"] * w_significand * a_significand / 64 + HOROWITZ_45NM_PJ["int32_add"]
    return _FP_MULT_A + _FP_MULT_C * w_significand * a_significand + HOROWITZ_45NM_PJ["fp32_add"]


class RaplMeter:
    """Package energy from intel-rapl (or amd via the same powercap interface), if readable."""

    def __init__(self):
        self.zones = sorted(p for p in RAPL_ROOT.glob("intel-rapl:*") if (p / "energy_uj").is_file()
                            and ":" not in p.name.split("intel-rapl:")[1]) if RAPL_ROOT.is_dir() else []
        self.readable = False
        if self.zones:
            try:
                self._read()
                self.readable = True
            except OSError:
                self.readable = False

    def _read(self) -> list[int]:
        return [int((z / "energy_uj").read_text()) for z in self.zones]

    def start(self) -> "RaplMeter":
        """Begin a measured interval (nothing to do when RAPL is not readable)."""
        if self.readable:
            self._t0 = self._read()
        return self

    def stop_joules(self) -> float:
        t1 = self._read()
        total = 0
        for z, a, b in zip(self.zones, self._t0, t1):
            if b < a:  # counter wrapped
                b += int((z / "max_energy_range_uj").read_text())
            total += b - a
        return total / 1e6


def estimate_joules(macs: dict[str, float], weight_bytes: float) -> float:
    """Op-count estimate: MACs by arithmetic ({"fp32": n, "int8": n}) at MAC_PJ plus one DRAM read per 32 bits
    of weights."""
    pj = sum(n * MAC_PJ[kind] for kind, n in macs.items())
    pj += (weight_bytes / 4) * HOROWITZ_45NM_PJ["dram_read_32bit"]
    return pj * 1e-12


def estimate_dense_joules(macs: float, weight_bytes: float) -> float:
    """Op-count estimate: MACs at fp32 multiply+add energy plus one DRAM read per 32 bits of weights."""
    return estimate_joules({"fp32": macs}, weight_bytes)


def record(metrics: dict, tags: dict, quantity: str, rapl: RaplMeter, measured, estimate) -> None:
    """Store one energy value under its source's name: `measured(joules)` converts the RAPL joules of the
    interval begun by `rapl.start()` into the quantity when RAPL is readable; otherwise `estimate()` gives the
    op-count estimate, labelled `model:<table>` (both callables, so only the applicable one runs)."""
    if rapl.readable:
        source, value = "rapl", measured(rapl.stop_joules())
    else:
        source, value = f"model:{HOROWITZ_TABLE}", estimate()
    tags["energy_source"] = source
    metrics[metric_name(quantity, source)] = value


def metric_name(quantity: str, source: str) -> str:
    """The source is part of the metric's name (MLflow names allow no ':' and no '+'), e.g.
    `energy.prefill_j_per_token.model-horowitz_isscc2014_45nm` or `energy.prefill_j_per_token.rapl`. A value
    summed from two sources names both, "+"-joined (`sim:zigzag+model:<table>` -> `sim-zigzag_and_model-<table>`)."""
    parts = (source or "").split("+")
    if not all(p.split(":")[0] in ("rapl", "nvml", "sim", "model") for p in parts):
        raise ValueError(f"energy source {source!r} is not one of rapl, nvml, sim:<tool>, model:<table> "
                         "(or several, '+'-joined)")
    return f"energy.{quantity}.{'_and_'.join(p.replace(':', '-') for p in parts)}"


def source_of(suffix: str) -> str:
    """The source a metric-name suffix spells (metric_name's inverse): sim-zigzag_and_model-x -> sim:zigzag+model:x."""
    return "+".join(part.replace("-", ":", 1) for part in suffix.split("_and_"))
