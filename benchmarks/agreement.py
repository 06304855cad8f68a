"""Agreement of the integer path with the fake-quant model on a test set.

Loads a trained quantized checkpoint, converts it once for inference, and compares the same
weights under ``engine="fp"`` (fake quant: what training evaluated) and ``engine="int"``:
accuracy of each, their difference, argmax agreement and logit differences. The issue's bar:
|accuracy difference| <= 0.0005 and argmax agreement >= 99.9% on the CIFAR-10 test set.

    python benchmarks/agreement.py RUN_OR_MODEL [--data PATH] [--limit N] [--best]
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from bitvit.checkpoint import load_checkpoint
from bitvit.data import load_data, normalize
from bitvit.engine import agreement, convert_for_inference, set_engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="run folder, checkpoint folder or model.safetensors")
    ap.add_argument("--best", action="store_true", help="use RUN/best instead of RUN/last")
    ap.add_argument("--data", default=None, help="data path (default: the checkpoint config's)")
    ap.add_argument("--limit", type=int, default=None, help="first N test images only")
    ap.add_argument("--batch-size", type=int, default=500)
    args = ap.parse_args()

    ckpt = load_checkpoint(args.checkpoint, best=args.best)
    data_cfg = copy.deepcopy(ckpt.config.data)
    if args.data is not None:
        data_cfg.path = args.data
    data_cfg.limit_test = args.limit
    m = ckpt.config.model
    test = load_data(data_cfg, m.image_size, m.in_channels).test
    images = normalize(test.images, data_cfg.mean, data_cfg.std)

    fp_model = convert_for_inference(ckpt.model.eval(), engine="fp")
    int_model = set_engine(copy.deepcopy(fp_model), "int")
    with torch.inference_mode():
        stats = agreement(fp_model, int_model, images, test.labels, args.batch_size)
    print(f"{ckpt.path}: {int(stats['n'])} test images")
    print(f"  accuracy fake-quant (fp engine) {stats['accuracy_a']:.4f}, "
          f"int engine {stats['accuracy_b']:.4f}, difference {stats['accuracy_diff']:+.4f}")
    print(f"  argmax agreement {stats['argmax_agreement']:.4%}, max |logit diff| "
          f"{stats['max_abs_logit_diff']:.2e}, mean {stats['mean_abs_logit_diff']:.2e}")
    print(json.dumps({"checkpoint": str(ckpt.path), **stats}))


if __name__ == "__main__":
    main()
