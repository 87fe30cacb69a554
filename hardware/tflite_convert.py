"""The converter side of `hardware=tflite`, run by the backend as a subprocess inside the LiteRT converter venv
(`.venv-litert`, made by hardware/tflite_setup.sh): it imports only torch, litert_torch and ai_edge_quantizer,
never bench, because that stack pins its own versions.

Protocol (one job directory, written by hardware/tflite.py):
  in   job.json     {"recipe": name, "signature": "serving_default", "calibration": "calib.npy" | null,
                     "threads": n}
       model.pt2    torch.export.save of the packed model, exported at one static input shape
       example.npy  an input of that shape and dtype (litert_torch re-traces the module with it)
       calib.npy    float32 calibration inputs of the same shape, one per row (full_int8 only)
  out  float.tflite the fp32 conversion;  model.tflite  after the recipe (= float.tflite for fp32)
       result.json  {"ok": true, "recipe": <the ai-edge-quantizer recipe as JSON>, "versions": {...},
                     "convert_s", "quantize_s", "float_bytes", "bytes"}  or  {"ok": false, "error": "<one line>"}
Exit status 0 on success, 1 when conversion or quantization failed (result.json says why).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path


def recipe_for(name: str):
    """The ai-edge-quantizer recipe of a bench recipe name (None: no quantization)."""
    from ai_edge_quantizer import recipe, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.qtyping import TFLOperationName

    if name == "fp32":
        return None
    if name == "fp16":  # float casting of the weights to fp16; compute stays fp32
        rm = recipe_manager.RecipeManager()
        rm.add_weight_only_config(regex=".*", operation_name=TFLOperationName.ALL_SUPPORTED, num_bits=16,
                                  algorithm_key=AlgorithmName.FLOAT_CASTING)
        return rm.get_quantization_recipe()
    return {"dynamic_int8": recipe.dynamic_wi8_afp32, "dynamic_int4": recipe.dynamic_wi4_afp32,
            "weight_only_int8": recipe.weight_only_wi8_afp32, "weight_only_int4": recipe.weight_only_wi4_afp32,
            "full_int8": recipe.static_wi8_ai8}[name]()


def convert(job_dir: Path) -> dict:
    import numpy as np
    import torch

    import litert_torch

    job = json.loads((job_dir / "job.json").read_text())
    torch.set_num_threads(int(job.get("threads", 1)))
    module = torch.export.load(str(job_dir / "model.pt2")).module()
    example = torch.from_numpy(np.load(job_dir / "example.npy"))
    t0 = time.perf_counter()
    edge = litert_torch.convert(module, (example,))
    edge.export(str(job_dir / "float.tflite"))
    convert_s = time.perf_counter() - t0
    out = {"convert_s": convert_s, "float_bytes": (job_dir / "float.tflite").stat().st_size}
    rcp = recipe_for(job["recipe"])
    t0 = time.perf_counter()
    if rcp is None:
        (job_dir / "model.tflite").write_bytes((job_dir / "float.tflite").read_bytes())
    else:
        from ai_edge_quantizer import quantizer

        qt = quantizer.Quantizer(str(job_dir / "float.tflite"))
        qt.load_quantization_recipe(rcp)
        calibration = None
        if qt.need_calibration:
            if not job.get("calibration"):
                raise ValueError(f"recipe {job['recipe']} needs calibration data and the job has none")
            rows = np.load(job_dir / job["calibration"])
            from ai_edge_litert.interpreter import Interpreter

            name = Interpreter(str(job_dir / "float.tflite")).get_signature_list()[job["signature"]]["inputs"][0]
            data = {job["signature"]: [{name: r[None]} for r in rows]}
            calibration = qt.calibrate(data, num_threads=int(job.get("threads", 1)))
        result = qt.quantize(calibration, enable_progress_report=False)
        result.export_model(str(job_dir / "model.tflite"), overwrite=True)
    out["quantize_s"] = time.perf_counter() - t0
    out["bytes"] = (job_dir / "model.tflite").stat().st_size
    out["recipe"] = json.loads(json.dumps(rcp, default=str)) if rcp is not None else "none (fp32 conversion)"
    out["versions"] = {p: metadata.version(p) for p in ("litert-torch", "ai-edge-quantizer", "ai-edge-litert",
                                                        "litert-converter", "torch")}
    return out


def main(argv: list[str]) -> int:
    job_dir = Path(argv[1])
    try:
        result = {"ok": True, **convert(job_dir)}
        code = 0
    except Exception as e:  # the backend records the converter's own error as the reason
        last = str(e).strip().splitlines()
        result = {"ok": False, "error": f"{type(e).__name__}: {last[0] if last else ''}"[:500],
                  "traceback": traceback.format_exc()[-4000:]}
        code = 1
    (job_dir / "result.json").write_text(json.dumps(result, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
