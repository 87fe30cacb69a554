"""QFX's torch fixed-point emulation against hls4ml's C simulation at its learned ap_fixed types, on the 360 held-out
digits (issue 33 item 2), beside RTN at the same weight width (per-channel symmetric weights, activations as the
backend's default ap_fixed<16,6> since RTN learns none): per method and width, top-1 of the torch model and of the
C simulation, the images whose top-1 agrees, and the images whose every logit is identical (the bit-for-bit
claim; tests/test_qfx.py checks 16 images).

Usage: .venv/bin/python benchmarks/qfx_csim_agreement.py [--bits 8 6 4] [--epochs 10] [--threads 1]
       [--model-epochs N: the LeNet's training epochs, default configs/model/lenet_digits.yaml's 30]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bench import models
from bench.hardware.fpga_sim import FpgaSimBackend
from bench.methods.qfx import QFX
from bench.methods.rtn import RTN
from bench.tasks.digits import DigitsTop1

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4])
    ap.add_argument("--epochs", type=int, default=10, help="QFX's QAT epochs (configs/method/qfx.yaml: 10)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model-epochs", type=int, default=None)
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent.parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads: {args.threads}")
    node = OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / "lenet_digits.yaml"))
    node.pop("_target_")
    node["results"] = args.results
    if args.model_epochs is not None:
        node["recipe"]["epochs"] = args.model_epochs
    model = models.load(models.ModelSpec(**node))
    x, y = DigitsTop1().heldout(model)
    backend = FpgaSimBackend(lpf_limit=2)
    with torch.no_grad():
        base = float((model.module(x).argmax(1) == y).float().mean())
    print(f"fp32 LeNet top-1 on {len(y)} held-out digits: {base:.4f}")
    print("method  bits  torch_top1  csim_top1  top1_agree  logits_identical  csim types")
    for bits in args.bits:
        for method in (QFX(bits=bits, epochs=args.epochs), RTN(bits=bits, group_size=-1, symmetric=True)):
            packed = method.compress(models.clone(model), None, None)
            deployed = backend.deploy(packed)
            if deployed is packed:
                print(f"{method.name:6s}  {bits:4d}  C simulation not run: {packed.info.get('csim_not_run')}")
                continue
            with torch.no_grad():
                fq, cs = packed.model(x).float(), deployed.model(x)
            top1 = [float((o.argmax(1) == y).float().mean()) for o in (fq, cs)]
            agree = int((fq.argmax(1) == cs.argmax(1)).sum())
            identical = int((fq == cs).all(1).sum())
            types = getattr(packed.model, "bench_fixed_point", None) or deployed.execution
            print(f"{method.name:6s}  {bits:4d}  {top1[0]:.4f}      {top1[1]:.4f}     {agree}/{len(y)}     "
                  f"{identical}/{len(y)}          {types}")


if __name__ == "__main__":
    main()
