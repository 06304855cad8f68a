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
    _add_profile_parser(sub)
    return parser


def _add_profile_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile", help="parameters, bits, bytes, MACs and energy per layer of a model",
        description="Profile one image's inference: per layer and in total, parameters, "
        "bits per weight, bytes on disk and in memory, MACs split into multiplies, additions "
        "and zero-weight no-ops, and BitNet's arithmetic energy estimate.")
    p.add_argument("source", metavar="MODEL_OR_CONFIG",
                   help="a YAML config, a run or checkpoint folder, or a model .safetensors file")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides (YAML configs only)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--quant", metavar="METHOD",
                   help="quantization method (fp, b158, bitnet, sign, xnor); for a checkpoint: "
                   "quantize a full-precision one after training")
    p.add_argument("--where", help="which linears to quantize: all, mlp, attn, none")
    p.add_argument("--act-bits", help="activation bits: 8, 1, none or default")
    p.add_argument("--best", action="store_true", help="a run folder's best/ checkpoint")
    p.add_argument("--float-precision", choices=("fp32", "fp16"), default="fp32",
                   help="precision of float ops and of the baseline (default fp32)")
    p.add_argument("--ternary-packing", choices=("base3", "2bit"), default="base3",
                   help="packed ternary codes: 5 per byte (base3, default) or 4 per byte")
    p.set_defaults(func=_run_profile)


def _run_profile(args: argparse.Namespace) -> int:
    from bitvit.checkpoint import CheckpointError
    from bitvit.config import ConfigError
    from bitvit.profile import load_for_profile, profile_model

    try:
        model, config, weights_source = load_for_profile(
            args.source, args.overrides, args.quant, args.where, args.act_bits, args.best)
        profile = profile_model(model, config, args.float_precision, args.ternary_packing,
                                weights_source, source=str(args.source))
    except (ConfigError, CheckpointError, ValueError) as e:
        print(f"bitvit profile: error: {e}", file=sys.stderr)
        return 2
    print(profile.to_json() if args.json else profile.format_table())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
