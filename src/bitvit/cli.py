"""The ``bitvit`` command line: one subcommand per job, each a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import warnings
from typing import TYPE_CHECKING, NoReturn

from bitvit import __version__
from bitvit.files import one_line
from bitvit.nn.methods import ACT_BITS_NAMES, FULL_PRECISION, METHOD_TABLE, WHERE_NAMES

if TYPE_CHECKING:
    from pathlib import Path

    from bitvit.deploy.export import ExportedModel

# bitvit.deploy.auto.ENGINES: the fastest exact one here (auto), the torch engines, ONNX Runtime.
ENGINE_NAMES = ("auto", "int", "fp", "ort")
ENGINE_HELP = ("exported models: auto (default: the fastest engine on this machine that gives "
               "the export's exact function, measured once and cached; $BITVIT_ENGINE "
               "overrides it), int (integer kernels), fp (dequantized fp32) or ort (ONNX "
               "Runtime, CPU: the exact per-token graph, built in memory from a .safetensors "
               "export; the only engine for .onnx files)")

# Nothing here imports torch at module level: --help and --version answer at once, and each
# subcommand imports what it needs when it runs.


class CliError(Exception):
    """Printed as one line on stderr, exit status 2."""


def _one_line_errors() -> tuple[type[BaseException], ...]:
    from bitvit.data import DataError
    from bitvit.deploy.export import ExportError
    from bitvit.deploy.profile_sources import ProfileError
    from bitvit.files import EnvError
    from bitvit.studies.sweep import SweepError
    from bitvit.training.checkpoint import CheckpointError
    from bitvit.training.config import ConfigError
    from bitvit.training.loop import TrainingError
    from bitvit.training.memory import MemoryLimitError
    from bitvit.training.rundir import RunBusyError, RunFolderError

    return (CliError, CheckpointError, ConfigError, DataError, EnvError, ExportError,
            MemoryLimitError, ProfileError, RunBusyError, RunFolderError, SweepError,
            TrainingError)


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
    p.add_argument("--quant", choices=[FULL_PRECISION, *METHOD_TABLE],
                   help="quantization method (quant.method; see docs/methods.md)")
    p.add_argument("--where", choices=WHERE_NAMES, help="which linears to quantize (quant.where)")
    p.add_argument("--act-bits", choices=ACT_BITS_NAMES,
                   help="activation bits (quant.act_bits; default: the method's own)")
    p.add_argument("--epochs", type=int,
                   help="train.epochs; with --resume, extend a run to N epochs")
    p.add_argument("--seed", type=int, help="train.seed: initialisation, data order, dropout")
    p.add_argument("--limit-train", type=int, help="class-balanced subset of N training images")
    p.add_argument("--limit-test", type=int, help="class-balanced subset of N test images")
    p.add_argument("--init-from", metavar="PATH",
                   help="start from a pretrained model, whose architecture the run takes: a "
                   "bitvit checkpoint (e.g. full precision, for QAT), a Hugging Face ViT/DeiT "
                   "folder or a timm .safetensors state dict")
    p.add_argument("--teacher", metavar="PATH",
                   help="distil from this model: a run folder, checkpoint or exported "
                   ".safetensors (train.distill.kind=soft|hard, train.distill.alpha=0.5, "
                   "train.distill.temperature=4); with --resume: where the run's teacher "
                   "is now (its sha256 must match)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last/")
    p.add_argument("--quiet", action="store_true", help="one line per epoch, no progress bars")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    # A resume keeps the run's config.yaml: any option but these would be ignored, so is refused.
    honoured = {"help", "resume", "epochs", "data", "quiet", "teacher"}
    p.set_defaults(func=_train,
                   resume_refuses=[(a.dest, a.option_strings[0], a.default) for a in p._actions
                                   if a.option_strings and a.dest not in honoured])


def _train_overrides(args: argparse.Namespace) -> list[str | tuple[str, object]]:
    """The options as typed (key, value) overrides, then the section.key=value strings (which
    win, coming last)."""
    flags = {"data": "data.path", "quant": "quant.method", "where": "quant.where",
             "epochs": "train.epochs", "seed": "train.seed",
             "limit_train": "data.limit_train", "limit_test": "data.limit_test",
             "init_from": "train.init_from", "teacher": "train.distill.teacher"}
    out: list[str | tuple[str, object]] = [
        (key, getattr(args, flag)) for flag, key in flags.items()
        if getattr(args, flag) is not None]
    if args.act_bits is not None:
        out.append(("quant.act_bits", ACT_BITS_NAMES[args.act_bits]))
    if args.download:
        out.append(("data.download", True))
    return out + list(args.overrides)


def _train(args: argparse.Namespace) -> int:
    from bitvit.deploy.teacher import load_teacher
    from bitvit.training.loop import config_for_resume, train
    from bitvit.training.pretrained import load_run_config

    if args.resume:
        given = [flag for dest, flag, default in args.resume_refuses
                 if getattr(args, dest) != default] + args.overrides[:1]
        if given:
            raise CliError(f"{given[0]} cannot be given with --resume, which continues a run "
                           "with its saved config.yaml; only --epochs N (to extend it), --data P "
                           "(to relocate the data), --teacher PATH (to relocate its teacher) "
                           "and --quiet may be")
        config = config_for_resume(args.resume, args.epochs)
        if args.data:
            config.data.path = args.data
        if args.teacher:
            if config.train.distill.teacher is None:
                raise CliError(f"--teacher: the run in {args.resume} has no teacher; --resume "
                               "continues a run as it started")
            config.train.distill.teacher = args.teacher
    else:
        config = load_run_config(args.config, _train_overrides(args))
    announce = None
    if not (args.resume or args.config or args.quiet):  # a bare `bitvit train`: a long run
        n = config.train.epochs
        announce = (f"bitvit train: no --config: the built-in defaults (configs/paper.yaml's "
                    f"run) with the options given: {n} epoch{'s' * (n != 1)}, quant.method="
                    f"{config.quant.method}")
    result = train(config, out=args.out, resume=args.resume, quiet=args.quiet,
                   command=["bitvit", *sys.argv[1:]], teacher_loader=load_teacher,
                   announce=announce)
    if os.environ.get("RANK", "0") == "0":  # under torchrun: once, not once per process
        print(json.dumps({"run_dir": str(result.run_dir), "status": result.status, **{
            k: int(v) if k == "epoch" else round(v, 6) for k, v in result.final.items()}}))
    return 0


# --- eval ---------------------------------------------------------------------------------------


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a run, checkpoint or exported model on test data")
    p.add_argument("model", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run folder, checkpoint, or exported .safetensors or .onnx model")
    p.add_argument("--data", help="data file or folder (default: the run's own: its data.path, "
                   "else the file its run.json records)")
    p.add_argument("--best", action="store_true", help="use best/ instead of last/")
    p.add_argument("--limit-test", type=int, help="class-balanced subset of N test images")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:N")
    p.add_argument("--engine", choices=ENGINE_NAMES, default="auto", help=ENGINE_HELP)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (fused kernels; eager if compiling fails)")
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from bitvit.deploy.evaluate import evaluate

    print(json.dumps(evaluate(args.model, data=args.data, best=args.best,
                              limit_test=args.limit_test, engine=args.engine,
                              compile=args.compile, device=args.device)))
    return 0


# --- export, predict ---------------------------------------------------------------------------


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
    p.add_argument("--format", choices=("safetensors", "onnx"), default="safetensors",
                   help="safetensors (bitvit's own file, default) or onnx (a graph ONNX "
                        "Runtime runs as it is: int8 codes, fp32 scales and floats)")
    p.add_argument("--act-quant", choices=("token", "tensor"),
                   help="onnx only: 8-bit activations quantized per token (token, default: "
                        "BitNet's exact arithmetic) or per tensor (tensor: ONNX Runtime's "
                        "DynamicQuantizeMatMul, faster, approximate)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from bitvit.deploy.export import check_export_target, export_checkpoint, read_export_metadata
    from bitvit.training.checkpoint import resolve_checkpoint

    src = resolve_checkpoint(args.src, args.best)
    check_export_target(args.out, args.format, src)
    if args.format == "onnx":
        return _run_export_onnx(args, src)
    if args.act_quant is not None:
        raise CliError("--act-quant applies to --format onnx (safetensors exports keep "
                       "BitNet's per-token activations)")
    # From the source as given: a run folder's checkpoint is checked against its config.
    out = export_checkpoint(args.src, args.out, best=args.best, packing=args.packing,
                            float_dtype=args.float_dtype)
    packings = sorted({layer["packing"] for layer in json.loads(
        read_export_metadata(out)["layers"]).values()}) or ["no"]
    size, ref = out.stat().st_size, src.stat().st_size
    print(f"wrote {out}: {size:,} bytes ({'/'.join(packings)} packed codes, {args.float_dtype} "
          f"floats); fp32 checkpoint {src}: {ref:,} bytes ({ref / size:.1f}x larger)")
    return 0


def _run_export_onnx(args: argparse.Namespace, src: Path) -> int:
    from bitvit.deploy.export import ExportError
    from bitvit.deploy.onnx_export import export_onnx
    from bitvit.training.checkpoint import CheckpointError

    given = [flag for flag, on in (("--packing", args.packing != "base3"),
                                   ("--float-dtype", args.float_dtype != "fp16")) if on]
    if given:
        raise CliError(f"{given[0]} applies to --format safetensors (an ONNX export holds int8 "
                       "codes and fp32 floats)")
    act_quant = args.act_quant or "token"
    try:
        out = export_onnx(args.src, args.out, best=args.best, act_quant=act_quant)
    except (CheckpointError, ExportError):
        raise
    except ValueError as e:  # e.g. a layer the graph builder does not know
        raise CliError(f"{args.out}: {e}") from None
    size, ref = out.stat().st_size, src.stat().st_size
    print(f"wrote {out}: {size:,} bytes (ONNX, {act_quant} activation quantization, int8 codes, "
          f"fp32 floats); fp32 checkpoint {src}: {ref:,} bytes ({ref / size:.1f}x larger)")
    return 0


def _add_predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="classify images with an exported model",
        description="Print the top classes with their probabilities for each image, applying "
                    "the preprocessing stored in the model file.")
    p.add_argument("model", metavar="MODEL", help="an exported .safetensors or .onnx file")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="PNG/JPEG files, or folders (all PNG/JPEG files inside, sorted)")
    p.add_argument("--top-k", type=int, default=5, metavar="K",
                   help="classes to show per image (default 5)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line: {file, predictions: [{class, probability}], "
                        "engine, engine_reason}")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:N")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--engine", choices=ENGINE_NAMES, default="auto", help=ENGINE_HELP)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (fused kernels; eager if compiling fails)")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    """Every readable image predicted; each unreadable one (or missing path) said in one line
    on stderr (and, with --json, as {file, error} in its place); exit 2 if any failed."""
    from bitvit.deploy.export import ExportError, image_files

    if args.top_k < 1 or args.batch_size < 1:
        raise CliError("--top-k and --batch-size must be at least 1")
    model = _load_for_inference(args)
    # Files in the order given (folders expanded), each with the error that stops it, if any.
    items: list[tuple[Path | str, str | None]] = []
    for given in args.images:
        try:
            items += [(f, None) for f in image_files([given])]
        except ExportError as e:  # a missing path among several: the others still run
            items.append((given, str(e)))
    failed = 0
    for i in range(0, len(items), args.batch_size):
        failed += _predict_chunk(args, model, items[i:i + args.batch_size])
    if failed:  # the error lines stay the only ones on stderr
        return 2
    print(f"bitvit predict: engine: {model.engine} ({model.engine_reason})", file=sys.stderr)
    return 0


def _predict_chunk(args: argparse.Namespace, model: ExportedModel,
                   chunk: list[tuple[Path | str, str | None]]) -> int:
    """Predict and print one batch of files, in order; return how many could not be read."""
    import torch

    from bitvit.data import DataError

    read, errors = {}, {file: error for file, error in chunk if error is not None}
    for file, error in chunk:
        if error is None:
            try:
                read[file] = model.preprocessing.read_image(file)
            except DataError as e:
                errors[file] = str(e)
    tops = dict(zip(read, model.predict(torch.stack(list(read.values())), args.top_k)
                    if read else [], strict=True))
    for file, _ in chunk:
        if file in errors:
            _unreadable(args, file, errors[file])
        elif args.json:
            print(json.dumps({"file": str(file), "predictions": [
                {"class": c, "probability": round(p, 6)} for c, p in tops[file]],
                "engine": model.engine, "engine_reason": model.engine_reason}))
        else:
            # One line per file, whatever a path or a class name holds (JSON keeps them exact).
            print(one_line(f"{file}: " + ", ".join(f"{c} {p:.3f}" for c, p in tops[file]),
                           limit=10**6))
    return len(errors)


def _unreadable(args: argparse.Namespace, file: Path | str, error: str) -> int:
    """Say that ``file`` could not be read: one line on stderr (and a JSON line); returns 1."""
    print(f"bitvit predict: error: {one_line(error)}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"file": str(file), "error": error}), flush=True)
    return 1


def _load_for_inference(args: argparse.Namespace) -> ExportedModel:
    """An exported model for predict: a .safetensors export on --engine (auto: the fastest
    exact one here), or an .onnx file on ONNX Runtime."""
    from bitvit.deploy.auto import load
    from bitvit.deploy.onnx_runtime import OrtModel

    model = load(args.model, device=args.device, engine=args.engine, compile=args.compile)
    if isinstance(model, OrtModel):
        model.needs_model_info()
    return model


# --- profile ------------------------------------------------------------------------------------


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
    p.add_argument("--quant", metavar="METHOD", choices=[FULL_PRECISION, *METHOD_TABLE],
                   help=f"quantization method ({', '.join([FULL_PRECISION, *METHOD_TABLE])}); "
                   "for a checkpoint: quantize a full-precision one after training")
    p.add_argument("--where", choices=WHERE_NAMES, help="which linears to quantize")
    p.add_argument("--act-bits", choices=ACT_BITS_NAMES, help="activation bits")
    p.add_argument("--best", action="store_true", help="a run folder's best/ checkpoint")
    p.add_argument("--float-precision", choices=("fp32", "fp16"), default="fp32",
                   help="precision of float ops and of the baseline (default fp32)")
    p.add_argument("--ternary-packing", choices=("base3", "2bit"),
                   help="ternary codes 5 per byte (base3, default) or 4 (an export: its own)")
    p.set_defaults(func=_run_profile)


def _run_profile(args: argparse.Namespace) -> int:
    from bitvit.deploy.profile import profile_model
    from bitvit.deploy.profile_sources import load_for_profile

    src = load_for_profile(args.source, args.overrides, args.quant, args.where, args.act_bits,
                           args.best)
    if src.ternary_packing and args.ternary_packing not in (None, src.ternary_packing):
        raise CliError(f"--ternary-packing {args.ternary_packing}: {args.source} packs its "
                       f"codes as {src.ternary_packing}; profile its checkpoint to compare")
    profile = profile_model(src.model, src.config, args.float_precision,
                            src.ternary_packing or args.ternary_packing or "base3",
                            src.weights_source,
                            source=str(args.source), packed_float_dtype=src.float_dtype)
    profile.engine, profile.engine_reason = src.engine, src.engine_reason
    print(profile.to_json() if args.json else profile.format_table())
    return 0


# --- studies: sweep, compare, report --------------------------------------------------------------


def _add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help="train every run of a sweep file (finished runs skipped, others resumed)",
        description="Train one run folder per point of a sweep file's grid (see "
        "bitvit.studies.sweep for the schema). Finished runs are skipped, runs with a last/ "
        "checkpoint resumed, others restarted: stop and restart a sweep at will. Run it from "
        "the repository root (paths in sweep files are relative to the working directory).")
    p.add_argument("sweep", metavar="SWEEP.yaml")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="extra overrides for new runs (e.g. train.device=cuda); a resumed run "
                   "keeps its own config but data.path and train.epochs, and a different value "
                   "of anything else is refused")
    only = p.add_mutually_exclusive_group()  # --sync writes: a dry run writes nothing
    only.add_argument("--dry-run", action="store_true", help="list the runs and what would happen")
    only.add_argument("--sync", action="store_true",
                   help="with a runs_root: only copy the runs' small files into the sweep's out "
                   "folder (to commit them while the sweep trains), train nothing")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="train N runs at once as subprocesses (several runs on one GPU)")
    p.set_defaults(func=_sweep)


def _sweep(args: argparse.Namespace) -> int:
    from bitvit.deploy.teacher import load_teacher
    from bitvit.studies.schedule import run_sweep, sync_results
    from bitvit.studies.sweep import load_sweep

    if args.parallel < 1:
        raise CliError(f"--parallel {args.parallel}: expected 1 or more")
    sweep = load_sweep(args.sweep)
    if args.sync:
        if sweep.runs_root is None:
            raise CliError(f"{args.sweep}: --sync needs a sweep file with runs_root (its run "
                           "folders are already in its out folder)")
        names = sync_results(sweep, args.overrides)
        print(f"copied the small files of {len(names)} run(s) from "
              f"{sweep.runs_root / sweep.out.name} into {sweep.out}")
        return 0
    run_sweep(sweep, args.overrides, parallel=args.parallel, dry_run=args.dry_run,
              argv=["bitvit", "sweep", args.sweep, *args.overrides], teacher_loader=load_teacher)
    return 0


def _add_compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="group runs by seed; table and figure with statistics against fp",
        description="Group runs that differ only by seed; print a Markdown table (mean +- std "
        "over seeds, differences to full precision with 95% CI, Welch p, TOST equivalence) "
        "and, with --out, write compare.md, compare.png (accuracy and loss per epoch) and "
        "compare-dots.png (every seed's headline accuracy).")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run folders, or folders holding run folders")
    p.add_argument("--out", metavar="DIR", help="write compare.md and the figures here")
    p.add_argument("--margin", type=float, default=0.01,
                   help="TOST equivalence margin for accuracies, as a fraction (default 0.01 = "
                   "1 point)")
    p.add_argument("--loss-margin", type=float, default=0.05,
                   help="TOST equivalence margin for losses (default 0.05)")
    p.add_argument("--include-unfinished", action="store_true",
                   help="count unfinished runs at their last epoch (they are marked)")
    p.add_argument("--full-epochs", type=int,
                   help="the full budget, to mark shortened runs (e.g. 100)")
    p.add_argument("--last-k", type=int, default=5, metavar="K",
                   help="headline: the mean over each run's last K epochs (default 5)")
    p.set_defaults(func=_compare)


def _compare(args: argparse.Namespace) -> int:
    from bitvit.studies.report import compare

    _, text = compare(args.runs, out=args.out, margin=args.margin, loss_margin=args.loss_margin,
                      include_unfinished=args.include_unfinished, full_epochs=args.full_epochs,
                      last_k=args.last_k)
    print(text, end="")
    return 0


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="regenerate results/README.md from the run folders",
                       description="Regenerate RESULTS/README.md, and each study's compare.md "
                       "and figures, from the run folders of the sweeps in STUDIES/*.yaml "
                       "(and RESULTS/*/sweep.yaml); grid points without a run are listed as "
                       "not run.")
    p.add_argument("--results", default="results", help="results folder (default: results)")
    p.add_argument("--studies", default="studies", help="sweep files (default: studies)")
    p.add_argument("--margin", type=float, default=0.01,
                   help="TOST equivalence margin for accuracies, as a fraction (default 0.01)")
    p.add_argument("--loss-margin", type=float, default=0.05,
                   help="TOST equivalence margin for losses (default 0.05)")
    p.add_argument("--last-k", type=int, default=5, metavar="K",
                   help="headline: the mean over each run's last K epochs (default 5)")
    p.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from bitvit.studies.report import write_report

    print(write_report(args.results, args.studies, args.margin, args.loss_margin, args.last_k))
    return 0


# --- main ---------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Errors in one line, not after the usage block (subcommands' parsers are _Parsers too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bitvit",
        description="Train, study and deploy ternary and binary Vision Transformers.")
    parser.add_argument("--version", action="version", version=f"bitvit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)
    _add_eval_parser(sub)
    _add_export_parser(sub)
    _add_predict_parser(sub)
    _add_profile_parser(sub)
    _add_sweep_parser(sub)
    _add_compare_parser(sub)
    _add_report_parser(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``section.key=value`` overrides may come anywhere among options:
    argparse stops filling a positional list at the first option, so overrides after one come
    back as unknown arguments, appended to ``overrides`` in order."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    rest = []
    for arg in unknown:
        if hasattr(args, "overrides") and not arg.startswith("-"):
            args.overrides.append(arg)
        else:
            rest.append(arg)
    if rest:  # the subcommand's error, pointing to its own --help
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command in ("train", "sweep"):
        # A polite kill marks the run interrupted. Only for the commands that own run folders:
        # Python runs the handler between bytecodes, so a command stuck in one long native call
        # (an ONNX graph) would never stop; the others' writes are atomic anyway.
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # raises KeyboardInterrupt
    # A background job of a non-interactive shell (`nohup bitvit sweep ... &`) starts with
    # SIGINT ignored, and Python then leaves it so: `kill -INT` would do nothing at all.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from bitvit.files import LogAsNotice, show_warnings_as_lines

    logger, handler = logging.getLogger("bitvit"), LogAsNotice()
    logger.addHandler(handler)
    with warnings.catch_warnings():  # restores the filters and the printer on the way out
        show_warnings_as_lines(f"bitvit {args.command}")
        try:
            return _run(args)
        finally:
            logger.removeHandler(handler)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except _one_line_errors() as e:
        print(f"bitvit {args.command}: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, read-only, no permission: the file and the reason
        from bitvit.files import describe

        print(f"bitvit {args.command}: error: {one_line(describe(e))}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as e:  # an allocation failed anywhere the command runs
        from bitvit.training.memory import is_out_of_memory, out_of_memory

        if not is_out_of_memory(e):
            raise
        print(f"bitvit {args.command}: error: {out_of_memory(e, f'bitvit {args.command} ran')}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bitvit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

