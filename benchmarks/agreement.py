"""Agreement of the integer path with the fake-quant model on a test set.

Loads a trained quantized checkpoint and compares, on its test set, fake-quant models
(dequantized codes, `engine="fp"`: what training evaluated) with the integer engine:
- the checkpoint's fp32 weights: fake quant vs integer engine;
- the exported file as users get it (`bitvit export` defaults: base-3 codes, fp16 for the other
  parameters) and the same export with fp32 parameters, each loaded with `bitvit.load` both
  ways: integer engine vs the same file's fake quant (same weights: the integer path alone), and
  integer engine vs the checkpoint's fp32 fake quant (the integer path plus export rounding).
With onnxruntime installed, also bitvit's ONNX export (`bitvit export --format onnx`), run by
ONNX Runtime, against `bitvit eval` of the safetensors export (fp32 parameters, integer engine),
per token (exact BitNet activations) and per tensor (`--act-quant tensor`, approximate).
Reports accuracy of each, the difference, argmax agreement and logit differences. The issue's
bar: |accuracy difference| <= 0.0005 and argmax agreement >= 99.9% on the CIFAR-10 test set.

    python benchmarks/agreement.py RUN_OR_MODEL [--data PATH] [--limit N] [--best]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

from bitvit.data import load_data, normalize
from bitvit.deploy.engine import agreement, convert_for_inference, set_engine
from bitvit.deploy.export import export_model, load
from bitvit.training.checkpoint import CheckpointError, load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="run folder, checkpoint folder or model.safetensors")
    ap.add_argument("--best", action="store_true", help="use RUN/best instead of RUN/last")
    ap.add_argument("--data", default=None, help="data path (default: the checkpoint config's)")
    ap.add_argument("--limit", type=int, default=None, help="first N test images only")
    ap.add_argument("--batch-size", type=int, default=500)
    args = ap.parse_args()

    try:
        ckpt = load_checkpoint(args.checkpoint, best=args.best)
    except CheckpointError as e:
        print(f"agreement.py: {e}", file=sys.stderr)
        sys.exit(2)
    data_cfg = copy.deepcopy(ckpt.config.data)
    if args.data is not None:
        data_cfg.path = args.data
    data_cfg.limit_test = args.limit
    m = ckpt.config.model
    test = load_data(data_cfg, m.image_size, m.in_channels).test
    images = normalize(test.images, data_cfg.mean, data_cfg.std)

    fp_model = convert_for_inference(copy.deepcopy(ckpt.model).eval(), engine="fp")
    # name -> (reference, candidate)
    pairs = {"checkpoint fp32 weights: int engine vs fake quant":
             (fp_model, set_engine(copy.deepcopy(fp_model), "int"))}
    with tempfile.TemporaryDirectory() as tmp:
        for float_dtype in ("fp16", "fp32"):
            path = Path(tmp) / f"model-{float_dtype}.safetensors"
            export_model(ckpt.model, ckpt.config, ckpt.classes, path, float_dtype=float_dtype)
            exported_int = load(path, engine="int")
            pairs[f"exported ({float_dtype} params): int engine vs its own fake quant"] = (
                load(path, engine="fp"), exported_int)
            pairs[f"exported ({float_dtype} params): int engine vs checkpoint fake quant"] = (
                fp_model, exported_int)
        try:
            from bitvit.deploy.onnx_export import export_onnx
            from bitvit.deploy.onnx_runtime import load_onnx
        except ImportError:
            export_onnx = None
        if export_onnx is not None:
            for act_quant in ("token", "tensor"):
                onnx_path = Path(tmp) / f"model-{act_quant}.onnx"
                export_onnx(ckpt.path, onnx_path, act_quant=act_quant)
                pairs[f"onnx ({act_quant} activations) by ONNX Runtime vs exported int engine "
                      f"(fp32 params)"] = (exported_int, load_onnx(onnx_path))
    print(f"{ckpt.path}: {len(test.labels)} test images")
    results = {}
    with torch.inference_mode():
        for name, (reference, model) in pairs.items():
            stats = agreement(reference, model, images, test.labels, args.batch_size)
            results[name] = stats
            print(f"  {name}: accuracy {stats['accuracy_b']:.4f} vs {stats['accuracy_a']:.4f}, "
                  f"difference {-stats['accuracy_diff']:+.4f}, argmax agreement "
                  f"{stats['argmax_agreement']:.4%}, max |logit diff| "
                  f"{stats['max_abs_logit_diff']:.2e}, mean {stats['mean_abs_logit_diff']:.2e}")
    print(json.dumps({"checkpoint": str(ckpt.path), "results": results}))


if __name__ == "__main__":
    main()
