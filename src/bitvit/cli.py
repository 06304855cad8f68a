"""The ``bitvit`` command line: one subcommand per job, each a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from bitvit import __version__


class CliError(Exception):
    """Printed as one line on stderr, exit status 2."""


def _one_line_errors() -> tuple[type[BaseException], ...]:
    from bitvit.checkpoint import CheckpointError
    from bitvit.config import ConfigError
    from bitvit.data import DataError
    from bitvit.train import TrainingError

    return CliError, CheckpointError, ConfigError, DataError, TrainingError


# --- train --------------------------------------------------------------------------------------


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a config into a run folder",
                       description="Train a ViT. Overrides: section.key=value "
                       "(e.g. train.lr=3e-4 model.depth=9).")
    p.add_argument("--config", help="YAML config (configs/paper.yaml, configs/strong.yaml, ...)")
    p.add_argument("--data", help="data file or folder (default: $BITVIT_DATA, then "
                   "../shared/data/cifar-10-jpeg.tar.gz)")
    p.add_argument("--download", action="store_true",
                   help="download official CIFAR-10 (python version) into the cache if needed")
    p.add_argument("--out", help="run folder (default: runs/<time>_<method>_s<seed>)")
    p.add_argument("--quant", choices=["fp", "b158", "bitnet", "sign", "xnor"])
    p.add_argument("--where", choices=["all", "mlp", "attn", "none"])
    p.add_argument("--act-bits", choices=["8", "1", "none", "default"])
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--limit-train", type=int, help="class-balanced subset of N training images")
    p.add_argument("--limit-test", type=int, help="class-balanced subset of N test images")
    p.add_argument("--init-from", help="full-precision checkpoint to start from (QAT)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last/")
    p.add_argument("--quiet", action="store_true", help="one line per epoch, no progress bars")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(func=_train)


def _train_overrides(args: argparse.Namespace) -> list[str]:
    flags = {"data": "data.path", "quant": "quant.method", "where": "quant.where",
             "act_bits": "quant.act_bits", "epochs": "train.epochs", "seed": "train.seed",
             "limit_train": "data.limit_train", "limit_test": "data.limit_test",
             "init_from": "train.init_from"}
    out = [f"{key}={json.dumps(getattr(args, flag))}" for flag, key in flags.items()
           if getattr(args, flag) is not None]
    if args.download:
        out.append("data.download=true")
    return out + list(args.overrides)


def _train(args: argparse.Namespace) -> int:
    from bitvit.config import load_config
    from bitvit.train import config_for_resume, train

    if args.resume:
        if args.config or args.overrides or any(
                getattr(args, f) is not None for f in ("quant", "where", "act_bits", "seed")):
            raise CliError("--resume continues a run with its own config.yaml: pass only "
                           "--resume DIR (and --epochs N to extend it, --data P to relocate data)")
        config = config_for_resume(args.resume, args.epochs)
        if args.data:
            config.data.path = args.data
    else:
        config = load_config(args.config, _train_overrides(args))
    result = train(config, out=args.out, resume=args.resume, quiet=args.quiet,
                   command=["bitvit", *sys.argv[1:]])
    final = result.final
    print(json.dumps({"run_dir": str(result.run_dir), "status": result.status,
                      **{k: round(v, 6) for k, v in final.items()}}))
    return 0


# --- eval ---------------------------------------------------------------------------------------


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a run, checkpoint or exported model on test data")
    p.add_argument("model", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--data", help="data file or folder (default: the run's own data.path)")
    p.add_argument("--best", action="store_true", help="use best/ instead of last/")
    p.add_argument("--limit-test", type=int)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from bitvit.checkpoint import load_checkpoint
    from bitvit.data import load_data
    from bitvit.train import evaluate, resolve_device

    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.model, best=args.best)
    model, cfg = ckpt.model.to(device), ckpt.config
    data_cfg = cfg.data
    data_cfg.path = args.data or data_cfg.path
    data_cfg.limit_test = args.limit_test if args.limit_test is not None else data_cfg.limit_test
    data_cfg.val_size = 0  # only the test set is used
    test = load_data(data_cfg, cfg.model.image_size, cfg.model.in_channels).test
    if test.classes != ckpt.classes:
        raise CliError(f"{args.model}: the model's classes ({', '.join(ckpt.classes[:3])}...) "
                       f"differ from the data's ({', '.join(test.classes[:3])}...)")
    result = evaluate(model, test, data_cfg.mean, data_cfg.std, device=device)
    print(json.dumps({"model": str(ckpt.path), **result}))
    return 0


# --- main ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitvit",
        description="Train, study and deploy ternary and binary Vision Transformers.")
    parser.add_argument("--version", action="version", version=f"bitvit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)
    _add_eval_parser(sub)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a polite kill marks the run interrupted
    try:
        return int(args.func(args) or 0)
    except _one_line_errors() as e:
        print(f"bitvit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bitvit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

