"""The ``bitvit`` command line: one subcommand per job, each a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys

from bitvit import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitvit", description="Train, study and deploy ternary and binary Vision Transformers.")
    parser.add_argument("--version", action="version", version=f"bitvit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_export_parser(sub)
    _add_predict_parser(sub)
    return parser


def _fail(command: str, error: Exception) -> int:
    print(f"bitvit {command}: error: {error}", file=sys.stderr)
    return 1


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a trained model as a small inference file",
        description="Write a run's model as one safetensors file holding only what inference "
                    "needs: packed low-bit codes, fp32 scales, the other parameters in fp16 "
                    "(or fp32), the config, class names and preprocessing.")
    p.add_argument("src", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run folder, a checkpoint folder or a model.safetensors file")
    p.add_argument("--out", required=True, metavar="MODEL.safetensors", help="file to write")
    p.add_argument("--best", action="store_true",
                   help="export RUN/best (best validation accuracy) instead of RUN/last")
    p.add_argument("--packing", choices=("base3", "2bit"), default="base3",
                   help="ternary codes: base3 = 5 per byte (1.6 bits), 2bit = 4 per byte "
                        "(binary codes always take 1 bit)")
    p.add_argument("--float-dtype", choices=("fp16", "fp32"), default="fp16",
                   help="dtype of the parameters that are not quantized (default fp16)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from bitvit.checkpoint import CheckpointError, resolve_checkpoint
    from bitvit.export import export_checkpoint

    try:
        src = resolve_checkpoint(args.src, args.best)
        out = export_checkpoint(src, args.out, packing=args.packing,
                                float_dtype=args.float_dtype)
    except (CheckpointError, ValueError, OSError) as e:
        return _fail("export", e)
    size, ref = out.stat().st_size, src.stat().st_size
    print(f"wrote {out}: {size:,} bytes ({args.packing} ternary packing, {args.float_dtype} "
          f"floats); fp32 checkpoint {src}: {ref:,} bytes ({ref / size:.1f}x larger)")
    return 0


def _add_predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="classify images with an exported model",
        description="Print the top classes with their probabilities for each image, applying "
                    "the preprocessing stored in the model file.")
    p.add_argument("model", metavar="MODEL", help="an exported .safetensors file")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="PNG/JPEG files, or folders (all PNG/JPEG files inside, sorted)")
    p.add_argument("--top-k", type=int, default=5, metavar="K",
                   help="classes to show per image (default 5)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line: {file, predictions: [{class, probability}]}")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    import json

    import torch

    from bitvit.export import ExportError, image_files, load

    if args.top_k < 1 or args.batch_size < 1:
        return _fail("predict", ValueError("--top-k and --batch-size must be at least 1"))
    try:
        model = load(args.model, device=args.device)
        files = image_files(args.images)
        for i in range(0, len(files), args.batch_size):
            chunk = files[i:i + args.batch_size]
            images = torch.stack([model.preprocessing.read_image(f) for f in chunk])
            for file, top in zip(chunk, model.predict(images, args.top_k), strict=True):
                if args.json:
                    print(json.dumps({"file": str(file), "predictions": [
                        {"class": c, "probability": round(p, 6)} for c, p in top]}))
                else:
                    print(f"{file}: " + ", ".join(f"{c} {p:.3f}" for c, p in top))
    except (ExportError, RuntimeError) as e:
        return _fail("predict", e)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
