"""The console summary printed at the end of a run: baseline vs compressed, storage, latency, energy."""

from __future__ import annotations

from bench import energy, record
from bench.packed import EXECUTION_EMULATED_PREFIX
from bench.record import CellResult, fmt


_ENERGY_UNITS = {"prefill_j_per_token": "J/token", "j_per_image": "J/image"}


def _energy(metrics: dict) -> tuple[str, str]:
    """(value with unit, source) of the run's energy figure: per prefill token (LMs) or per image."""
    for k, v in metrics.items():
        _, quantity, source = k.split(".", 2) if k.startswith(f"{record.ENERGY}.") else ("", "", "")
        if quantity in _ENERGY_UNITS:
            return f"{fmt(v)} {_ENERGY_UNITS[quantity]}", energy.source_of(source)
    return "-", "-"


def _latency(metrics: dict) -> str:
    """Median latency of the backend's main workload: the prefill (LMs) or one forward pass (images)."""
    key = next((k for k in metrics if k.startswith(f"{record.LATENCY}.") and k.endswith(".p50_s")
                and k != record.DECODE_P50_S), None)
    return f"{fmt(metrics[key] * 1e3)} ms" if key else "-"


def rows(results: list[CellResult]) -> list[list[str]]:
    out = []
    for r in results:
        metric = record.primary_metric(r.tags) or "-"
        e_val, e_src = _energy(r.metrics)
        decode = r.metrics.get(record.DECODE_P50_S)
        out.append([r.method + (" (reused)" if r.reused else ""), metric, fmt(r.metrics.get(metric)),
                    fmt(r.metrics.get(record.BITS_PER_WEIGHT)),
                    fmt(r.metrics.get(record.ARTIFACT_BYTES, 0) / 1e6) + " MB", _latency(r.metrics),
                    f"{fmt(decode * 1e3)} ms" if decode is not None else "-",
                    e_val, e_src, r.tags.get(record.EXECUTION, "-")])
    return out


def _interval(metrics: dict, name: str) -> str:
    lo, hi = metrics.get(name + record.CI95_LOW_SUFFIX), metrics.get(name + record.CI95_HIGH_SUFFIX)
    return f" [{fmt(lo)}, {fmt(hi)}]" if lo is not None and hi is not None else ""


def print_summary(base: CellResult | None, result: CellResult) -> None:
    results = [r for r in (base, result) if r is not None]
    header = ["method", "metric", "value", "bits/weight", "artifact", "latency p50", "decode/token",
              "energy", "energy source", "execution"]
    print()
    print(record.table(header, rows(results)))
    t = result.timings
    split = ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in t.items() if k.endswith("_s"))
    print(f"\nwall time: {split}")
    t = result.tags
    prec = t.get(record.PRECISION, "fp32")
    kernel = t.get(f"{record.PRECISION_PREFIX}bf16_matmul")
    threads = t.get(f"{record.HARDWARE_PREFIX}threads", "?")
    compress = t.get(record.COMPRESS_PRECISION, prec)
    computed = prec  # only where calibration or training ran is its precision worth a word
    if compress != prec and record.CALIB_SHA256 in t:
        computed = f"{prec} (calibration and training {compress})"
    print(f"model {t.get(record.MODEL)} | hardware {t.get(record.HARDWARE)} ({threads} threads) | compute {computed}"
          f"{f' ({kernel})' if kernel else ''} | mlflow run {result.run_id}")
    print(f"reproduce: {t.get(record.COMMAND, '-')}")
    vs_base = [n for n in result.metrics if "_vs_base." in n and record.direction_tag(n) in t]  # task order
    if vs_base:  # e.g. KL divergence from the base model, which ties in perplexity can hide
        shown = [f"{n} {fmt(result.metrics.get(n))}{_interval(result.metrics, n)}" for n in vs_base]
        print("against the base model: " + "; ".join(shown))
    for key, value in result.metrics.items():  # a backend with real kernels re-evaluated the task on them
        if key.endswith(record.DEPLOYED_SUFFIX):
            name = key[:-len(record.DEPLOYED_SUFFIX)]
            diff = next((v for k, v in result.metrics.items() if k.startswith(f"{key}_minus_")), None)
            print(f"deployed ({t.get(record.DEPLOYED_EXECUTION)}): {name} = {fmt(value)}; torch "
                  f"{t.get(record.EXECUTION)}: {fmt(result.metrics.get(name))}; difference {fmt(diff)}")
    if t.get(record.TRAIN_CONVERGED) == "false":
        print(f"training did not converge: {t.get(record.TRAIN_VERDICT)} (criterion: {t.get(record.TRAIN_CRITERION)})")
    if t.get(record.EXECUTION, "").startswith(EXECUTION_EMULATED_PREFIX):
        print(f"note: {t[record.EXECUTION]} is an emulation in fp32 torch code: accuracy is that arithmetic's, "
              "latency and measured energy are the emulation's, never its hardware's")
    if t.get(record.EXECUTION) == "fake-quant" and record.DEPLOYED_EXECUTION not in t:
        print(f"note: latency/energy are for fake-quant execution ({prec} matmuls on dequantized weights); "
              "accuracy is real, speed is not that of a low-bit kernel")
