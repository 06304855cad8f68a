"""Knowledge distillation (train.distill): the losses against hand computations, the teacher's
logits (cached or per batch), exactness (alpha 0, resume), refusals, the command line, sweeps."""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from bitvit.cli import main as cli_main
from bitvit.data import load_data
from bitvit.studies.distillation import (
    compare_settings,
    compare_students,
    distillation_markdown,
)
from bitvit.studies.report import compare_groups
from bitvit.studies.runs import group_runs, load_run
from bitvit.studies.schedule import run_sweep
from bitvit.studies.stats import holm
from bitvit.studies.sweep import experiment_key, load_sweep, plan_sweep, run_name
from bitvit.training import distill
from bitvit.training.checkpoint import build_model, save_model
from bitvit.training.config import ConfigError, load_config, save_config
from bitvit.training.loop import config_for_resume, train
from bitvit.training.losses import Batch, HardDistillation, SoftDistillation
from bitvit.training.rundir import TEACHER_LOGITS

ROOT = Path(__file__).resolve().parents[1]
PAPER = str(ROOT / "configs/paper.yaml")
TINY = ["model.dim=32", "model.depth=2", "model.heads=4", "model.patch_size=8",
        "data.limit_test=200", "train.batch_size=50"]


def tiny(*overrides: str, limit_train: int = 300):
    return load_config(PAPER, [*TINY, f"data.limit_train={limit_train}", *overrides])


def rows(run: Path) -> list[dict[str, str]]:
    """metrics.csv without the wall-clock column."""
    lines = (run / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    return [{k: v for k, v in zip(header, line.split(","), strict=True) if k != "seconds"}
            for line in lines[1:]]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last/model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Killed(BaseException):
    """Stands in for a kill after an epoch (BaseException: nothing in train() catches it)."""


@pytest.fixture(scope="module")
def teacher(real_data, tmp_path_factory) -> Path:
    """A tiny full-precision run folder, one epoch on the students' 300 training images."""
    run = tmp_path_factory.mktemp("teacher") / "fp"
    data = [f"data.path={real_data['BITVIT_DATA']}", f"data.cache_dir={real_data['BITVIT_CACHE']}"]
    train(tiny("train.epochs=1", *data), out=run, quiet=True)
    return run


def fake_teacher(path: Path, *overrides: str) -> Path:
    """An untrained checkpoint file (no training needed to be refused, or described)."""
    config = load_config(PAPER, [*TINY, "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25, 0.25, 0.25]",
                                 *overrides])
    classes = [f"class{i}" for i in range(config.model.num_classes)]
    save_model(path, build_model(config), config, classes)
    return path


# --- the losses ---------------------------------------------------------------------------------

STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 0.0, 1.0], [1.0, 3.0, 1.0]]
LABELS = [1, 2]


def _log_softmax(row: list[float], t: float = 1.0) -> list[float]:
    z = [x / t for x in row]
    log_sum = math.log(sum(math.exp(x) for x in z))
    return [x - log_sum for x in z]


def _ce(rows_: list[list[float]], targets: list[int]) -> float:
    return sum(-_log_softmax(r)[y] for r, y in zip(rows_, targets, strict=True)) / len(rows_)


def _batch() -> Batch:
    return Batch(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor(LABELS),
                 torch.arange(2))


@pytest.mark.parametrize("alpha, temperature", [(0.5, 4.0), (0.3, 2.0), (1.0, 1.0)])
def test_soft_distillation_is_hintons_loss_by_hand(alpha, temperature):
    kl = 0.0
    for s, t in zip(STUDENT, TEACHER, strict=True):
        log_p, log_q = _log_softmax(t, temperature), _log_softmax(s, temperature)
        kl += sum(math.exp(a) * (a - b) for a, b in zip(log_p, log_q, strict=True))
    kl /= len(STUDENT)  # batch mean
    expected = (1 - alpha) * _ce(STUDENT, LABELS) + alpha * temperature ** 2 * kl
    loss = SoftDistillation(lambda batch: torch.tensor(TEACHER), alpha, temperature)
    assert loss(torch.tensor(STUDENT), _batch()).item() == pytest.approx(expected, rel=1e-6)


def test_hard_distillation_is_deits_loss_by_hand():
    argmax_teacher = [0, 1]
    expected = (_ce(STUDENT, LABELS) + _ce(STUDENT, argmax_teacher)) / 2
    loss = HardDistillation(lambda batch: torch.tensor(TEACHER))  # alpha 0.5: DeiT's
    assert loss(torch.tensor(STUDENT), _batch()).item() == pytest.approx(expected, rel=1e-6)
    weighted = HardDistillation(lambda batch: torch.tensor(TEACHER), alpha=0.2)
    assert weighted(torch.tensor(STUDENT), _batch()).item() == pytest.approx(
        0.8 * _ce(STUDENT, LABELS) + 0.2 * _ce(STUDENT, argmax_teacher), rel=1e-6)


def test_the_distill_section_is_checked_when_the_config_loads(capsys, tmp_path):
    config = load_config(None, ["train.distill.teacher=runs/t", ("train.distill.alpha", 0)])
    assert config.train.distill.teacher == "runs/t" and config.train.distill.alpha == 0.0
    assert config.train.distill.kind == "soft" and config.train.distill.temperature == 4.0
    assert load_config(None).train.distill.teacher is None  # off by default
    for override, message in (("train.distill.kind=medium", "expected one of soft, hard"),
                              ("train.distill.alpha=1.5", "expected a number in [0, 1]"),
                              ("train.distill.teachr=x", "unknown key train.distill.teachr"),
                              ("model.dim.x=1", "model.dim is not a section")):
        capsys.readouterr()
        assert cli_main(["train", "--config", PAPER, "--out", str(tmp_path / "r"), override]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


# --- the teacher in a run -----------------------------------------------------------------------


def test_alpha_zero_is_bit_for_bit_a_run_without_a_teacher(real_env, tmp_path, teacher):
    plain, zero = tmp_path / "plain", tmp_path / "zero"
    train(tiny("quant.method=b158", "train.epochs=2"), out=plain, quiet=True)
    train(tiny("quant.method=b158", "train.epochs=2", f"train.distill.teacher={teacher}",
               "train.distill.alpha=0"), out=zero, quiet=True)
    assert rows(plain) == rows(zero)
    assert_same_weights(plain, zero)
    assert json.loads((zero / "run.json").read_text())["teacher"]["sha256"] == sha256(
        teacher / "last/model.safetensors")


def test_cached_teacher_logits_equal_the_teacher_run_per_batch(real_env, tmp_path, teacher,
                                                               monkeypatch):
    config = tiny("quant.method=b158", f"train.distill.teacher={teacher}")
    splits = load_data(config.data, 32, 3)
    loaded = distill.load_teacher(config)
    cached = distill.set_up(loaded, config, splits, tmp_path, torch.device("cpu"))
    assert isinstance(cached.logits, distill.CachedTeacher) and cached.cache is not None
    per_batch = distill.TeacherOnBatch(loaded)
    order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(1))
    for idx in order.split(50):
        batch = Batch(splits.train.images[idx], splits.train.labels[idx], idx)
        # Equal to fp32 rounding: a batch of other images rounds otherwise on some CPUs (the
        # GEMM's blocking follows the batch on an AMD EPYC Zen 4; not on a Xeon Sapphire Rapids).
        torch.testing.assert_close(cached.logits(batch), per_batch(batch), rtol=1e-5, atol=1e-6)
    # Kept in the run folder and read back, not computed again (a resume, say) ...
    cached.save_cache(tmp_path)
    assert (tmp_path / TEACHER_LOGITS).is_file()
    shard_logits = distill._shard_logits
    monkeypatch.setattr(distill, "_shard_logits", lambda *a: pytest.fail("computed again"))
    again = distill.set_up(loaded, config, splits, tmp_path, torch.device("cpu"))
    assert again.cache["read"] and torch.equal(again.logits.table, cached.logits.table)
    before = (tmp_path / TEACHER_LOGITS).stat().st_mtime_ns
    again.save_cache(tmp_path)  # still there: not written again
    assert (tmp_path / TEACHER_LOGITS).stat().st_mtime_ns == before
    # ... but only for these images: other training images compute (and keep) their own.
    monkeypatch.setattr(distill, "_shard_logits", shard_logits)
    other = tiny("quant.method=b158", f"train.distill.teacher={teacher}", "data.seed=1")
    fresh = distill.set_up(loaded, other, load_data(other.data, 32, 3), tmp_path,
                           torch.device("cpu"))
    assert fresh.cache is not None
    # With augmentation the images change every epoch: the teacher runs on each batch.
    augmented = tiny("quant.method=b158", f"train.distill.teacher={teacher}",
                     "data.horizontal_flip=true")
    assert isinstance(distill.set_up(loaded, augmented, splits, tmp_path,
                                     torch.device("cpu")).logits, distill.TeacherOnBatch)


@pytest.mark.parametrize("config_given", [False, True])
def test_interrupted_and_resumed_distillation_equals_uninterrupted(real_env, tmp_path, teacher,
                                                                   monkeypatch, config_given):
    # Augmentation and dropout: the teacher runs per batch on the augmented images.
    config = tiny("quant.method=b158", "train.epochs=3", "model.dropout=0.1",
                  "data.random_crop=true", "data.horizontal_flip=true",
                  f"train.distill.teacher={teacher}", "train.distill.alpha=0.7")
    full, killed = tmp_path / "full", tmp_path / "killed"
    train(config, out=full, quiet=True)

    loop = importlib.import_module("bitvit.training.loop")
    record = loop._record_epoch

    def record_then_die(s, row, epoch, quiet):
        record(s, row, epoch, quiet)
        if epoch == 2:
            raise Killed

    monkeypatch.setattr(loop, "_record_epoch", record_then_die)
    with pytest.raises(Killed):
        train(config, out=killed, quiet=True)
    monkeypatch.setattr(loop, "_record_epoch", record)
    # The resumed run reads the teacher's test accuracy from its config.yaml, and checks the
    # teacher against its recorded sha256 even when the API is given the starting config.
    monkeypatch.setattr(distill, "_test_accuracy", lambda *a: pytest.fail("measured again"))
    other = fake_teacher(tmp_path / "other.safetensors")
    swapped = replace(config, train=replace(config.train, distill=replace(
        config.train.distill, teacher=str(other))))
    with pytest.raises(ConfigError, match="the teacher changed"):
        train(swapped, resume=killed, quiet=True)
    result = train(config if config_given else config_for_resume(killed), resume=killed,
                   quiet=True)
    assert result.status == "finished"
    assert rows(full) == rows(killed) and len(rows(full)) == 3
    assert_same_weights(full, killed)
    saved = yaml.safe_load((killed / "config.yaml").read_text())["train"]["distill"]
    assert saved["teacher_sha256"] == sha256(teacher / "last/model.safetensors")
    assert "per batch" in json.loads((killed / "run.json").read_text())["teacher"]["logits"]


@pytest.mark.parametrize("overrides, message", [
    (["model.num_classes=5"], "has 5 classes but the student has 10 classes "
                              "(model.num_classes=10)"),
    (["model.image_size=16"], "takes 16x16 images but the student takes 32x32 images "
                              "(model.image_size=32)"),
])
def test_a_teacher_that_does_not_fit_is_refused_in_one_line(real_env, tmp_path, capsys,
                                                            overrides, message):
    wrong = fake_teacher(tmp_path / "wrong.safetensors", *overrides)
    out = tmp_path / "student"
    capsys.readouterr()
    assert cli_main(["train", "--config", PAPER, "--quant", "b158", "--epochs", "1", "--quiet",
                     "--limit-train", "300", *TINY, "--teacher", str(wrong),
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bitvit train: error: train.distill.teacher")
    assert message in err and str(wrong) in err
    assert not out.exists()


def test_a_quantized_teacher_is_allowed_and_said_to_be(tmp_path):
    ternary = fake_teacher(tmp_path / "b158.safetensors", "quant.method=b158",
                           "model.num_classes=10")
    loaded = distill.load_teacher(load_config(PAPER, [*TINY, f"train.distill.teacher={ternary}"]))
    assert loaded.quantization == "b158 all act8" and loaded.format == "checkpoint"
    assert loaded.sha256 == sha256(ternary) and not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_an_export_needs_the_loader_from_above(real_env, tmp_path, teacher):
    exported = tmp_path / "teacher.safetensors"
    assert cli_main(["export", str(teacher), "--out", str(exported)]) == 0
    with pytest.raises(ConfigError, match="an exported model.*teacher_loader=bitvit.load_teacher"):
        train(tiny(f"train.distill.teacher={exported}"), out=tmp_path / "r", quiet=True)
    assert not (tmp_path / "r").exists()


def test_bitvit_train_teacher_end_to_end(real_env, tmp_path, teacher, capsys):
    base = ["train", "--config", PAPER, "--quant", "b158", "--epochs", "1", "--quiet",
            "--limit-train", "300", *TINY]
    soft, hard, plain = tmp_path / "soft", tmp_path / "hard", tmp_path / "plain"
    assert cli_main([*base, "--teacher", str(teacher), "--out", str(soft)]) == 0
    info = json.loads((soft / "run.json").read_text())["teacher"]
    teacher_file = teacher / "last/model.safetensors"
    teacher_acc = float(rows(teacher)[-1]["test_acc"])  # the same test split as the student's
    assert info["sha256"] == sha256(teacher_file) and info["file"] == str(teacher_file)
    assert info["test_acc"] == teacher_acc and info["format"] == "checkpoint"
    assert info["quantized"] is False and info["path"] == str(teacher)
    saved = load_config(soft / "config.yaml").train.distill
    assert (saved.teacher, saved.kind, saved.alpha, saved.temperature) == (str(teacher), "soft",
                                                                          0.5, 4.0)
    assert saved.teacher_sha256 == info["sha256"] and saved.teacher_test_acc == teacher_acc
    assert (soft / TEACHER_LOGITS).is_file()

    # An exported (fp16) model as the teacher, hard distillation.
    exported = tmp_path / "teacher.safetensors"
    assert cli_main(["export", str(teacher), "--out", str(exported)]) == 0
    assert cli_main([*base, "--teacher", str(exported), "train.distill.kind=hard",
                     "--out", str(hard)]) == 0
    info = json.loads((hard / "run.json").read_text())["teacher"]
    assert info["format"] == "export" and info["sha256"] == sha256(exported)
    assert info["test_acc"] == pytest.approx(teacher_acc, abs=0.02)

    # compare/report group runs by their distillation settings.
    assert cli_main([*base, "--out", str(plain)]) == 0
    labels = {g.label for g in group_runs([load_run(r) for r in (soft, hard, plain)])}
    assert labels == {"b158", f"kd=soft teacher={sha256(teacher_file)[:8]}",
                      f"kd=hard teacher={sha256(exported)[:8]}"}

    # A resume finds the teacher where it is now, and refuses another teacher.
    moved = tmp_path / "moved-teacher"
    shutil.copytree(teacher, moved)
    assert cli_main(["train", "--resume", str(soft), "--epochs", "2", "--quiet",
                     "--teacher", str(moved)]) == 0
    assert load_config(soft / "config.yaml").train.distill.teacher == str(moved)
    capsys.readouterr()
    assert cli_main(["train", "--resume", str(soft), "--epochs", "3", "--quiet",
                     "--teacher", str(exported)]) == 2
    err = capsys.readouterr().err
    assert "the teacher changed" in err and err.count("\n") == 1


# --- sweeps -------------------------------------------------------------------------------------


def test_sweeps_take_nested_keys_and_know_a_teacher_by_its_sha256(tmp_path, monkeypatch):
    point = {"quant.method": "b158", "train.distill.teacher": "results/t/seed=0",
             "train.distill.kind": "soft", "train.seed": 0}
    assert run_name(point) == "method=b158_teacher=results-t-seed-0_kind=soft_seed=0"
    recorded = load_config(None, ["train.distill.teacher=/elsewhere/t",
                                  f"train.distill.teacher_sha256={'a' * 64}",
                                  "train.distill.teacher_test_acc=0.5"]).to_dict()
    key = experiment_key(recorded)
    assert key["train.distill.teacher_sha256"] == "a" * 64 and "train.distill.teacher" not in key
    # Without a teacher the section says nothing (as in run folders from before it).
    assert not any(k.startswith("train.distill") for k in experiment_key(load_config().to_dict()))
    # A run folder that recorded its teacher is the experiment its sweep planned; resumed, it is
    # told where the teacher is now.
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "base": PAPER, "out": str(tmp_path / "out"), "overrides": ["train.epochs=2"],
        "runs": [{"train.distill.teacher": "results/t"}]}))
    sweep = load_sweep(sweep_file)
    run = tmp_path / "out" / "teacher=results-t"
    run.mkdir(parents=True)
    save_config(load_config(PAPER, ["train.epochs=2", *(f"train.distill.{k}={v}" for k, v in
                                                        recorded["train"]["distill"].items())]),
                run / "config.yaml")
    (run / "metrics.csv").write_text("epoch,test_acc\n1,0.5\n")
    (run / "run.json").write_text(json.dumps({"status": "interrupted"}))
    (run / "last").mkdir()
    for name in ("model.safetensors", "state.pt"):
        (run / "last" / name).write_bytes(b"x")
    [planned_run] = plan_sweep(sweep)
    assert planned_run.state == "resume"
    assert planned_run.command[-2:] == ["--teacher", "results/t"]


def test_the_kd_study_plans_its_teacher_and_students(monkeypatch):
    monkeypatch.chdir(ROOT)  # sweep files name paths from the repository root
    teacher_sweep = load_sweep("studies/kd-cpu-teacher.yaml")
    [teacher_dir] = [teacher_sweep.run_dir(n) for n in teacher_sweep.run_dirs()]
    strong = "results/study1-full/method=fp_seed=0"  # study 1's fp, 100 epochs, full data
    lines: list[str] = []
    plan = run_sweep(load_sweep("studies/kd-cpu.yaml"), dry_run=True, log=lines.append)
    assert len(plan) == 48 and lines[-1].startswith("48 runs")  # 16 arms x 3 seeds
    students = {}
    for r in plan:
        c = r.config
        assert (c.train.epochs, c.data.limit_train, c.train.lr) == (10, 10000, 0.0003)
        d = c.train.distill
        teacher = {None: None, str(teacher_dir): "own", strong: "strong"}[d.teacher]
        students.setdefault((c.quant.method, c.quant.where, c.quant.act_bits,
                             teacher and f"{teacher} {d.kind}"), []).append(c.train.seed)
    assert all(seeds == [0, 1, 2] for seeds in students.values())
    arms = {("b158", "all", 8), ("bitnet", "all", 8), ("xnor", "all", None),
            ("sign", "all", None), ("sign", "attn", None)}
    assert set(students) == ({(*a, None) for a in arms} | {(*a, "own soft") for a in arms}
                             | {(*a, "strong soft") for a in arms}
                             | {("b158", "all", 8, "own hard")})
    [teacher_run] = plan_sweep(teacher_sweep)
    t = teacher_run.config
    assert (t.quant.method, t.train.lr, t.train.epochs, t.data.limit_train) == (
        "fp", 0.0001, 10, 10000)  # fp's chosen rate in results/lr-cpu


# --- the report ---------------------------------------------------------------------------------


def _kd_run(run_dir: Path, method: str, accs: list[float], seed: int,
            distill_overrides: tuple[str, ...] = ()) -> Path:
    from test_studies import fake_run

    return fake_run(run_dir, [f"quant.method={method}", f"train.seed={seed}", *distill_overrides],
                    [a + seed / 1000 for a in accs])


def test_the_report_compares_each_student_with_its_twin_and_its_teacher(tmp_path):
    teacher = _kd_run(tmp_path / "teacher", "fp", [0.40, 0.50, 0.50, 0.50, 0.50, 0.50], 0)
    sha = "ab" * 32
    kd = [f"train.distill.teacher={teacher}", f"train.distill.teacher_sha256={sha}",
          "train.distill.teacher_test_acc=0.5"]
    runs = []
    for seed in (0, 1, 2):
        # sign alone: 0.20 on the last 5 epochs; with a soft teacher 0.41: (0.41 - 0.2) / (0.5
        # - 0.2) = 70% of the gap closed; with a hard one 0.38. b158 with a teacher beats it.
        for name, method, acc, extra in (
                ("sign", "sign", 0.20, ()), ("sign-kd", "sign", 0.41, ("train.distill.kind=soft",)),
                ("sign-hard", "sign", 0.38, ("train.distill.kind=hard",)),
                ("b158", "b158", 0.49, ()), ("b158-kd", "b158", 0.53, ())):
            distill_overrides = tuple(kd) + extra if "kd" in name or "hard" in name else ()
            runs.append(load_run(_kd_run(tmp_path / f"{name}-{seed}", method,
                                         [0.1] + [acc] * 5, seed, distill_overrides)))
    groups = compare_groups(group_runs(runs))
    students = compare_students(groups)
    by_label = {s.group.label: s for s in students}
    assert set(by_label) == {"b158 act8 kd=soft", "sign act-fp kd=soft", "sign act-fp kd=hard"}
    soft = by_label["sign act-fp kd=soft"]
    assert soft.twin.label == "sign act-fp" and soft.effect.diff == pytest.approx(0.21)
    assert soft.effect.significant and soft.effect.family == 3
    # The teacher's headline is its run folder's last 5 epochs, as the students' is.
    assert soft.teacher.value == pytest.approx(0.50)
    assert soft.gap_closed() == pytest.approx((0.411 - 0.201) / (0.5 - 0.201))  # ~70%
    b158 = by_label["b158 act8 kd=soft"]
    assert b158.gap_closed() == pytest.approx((0.531 - 0.491) / (0.5 - 0.491))
    assert b158.above_p < 0.05 and soft.above_p > 0.5
    assert [s.above_adjusted for s in students] == pytest.approx(holm([s.above_p
                                                                       for s in students]))
    [pair] = compare_settings(groups)
    assert pair.setting == "kd" and pair.key == "train.distill.kind"
    assert {pair.first.label, pair.second.label} == {"sign act-fp kd=soft", "sign act-fp kd=hard"}
    assert abs(pair.difference.diff) == pytest.approx(0.03) and pair.difference.family == 1
    text = "\n".join(distillation_markdown(students, compare_settings(groups)))
    assert ("| sign act-fp kd=soft | 41.10 ± 0.10 | 20.10 ± 0.10 | 50.00 | 70% | 0 of 3 | "
            "0 of 18 |") in text
    assert "| b158 act8 kd=soft | 53.10 ± 0.10 | 49.10 ± 0.10 | 50.00 |" in text
    assert "3 of 3 | 15 of 18 |" in text
    # One seed a side: no test yet, and the tables say so instead of counting zero tests.
    one = compare_groups(group_runs([r for r in runs if r.seed == 0]))
    early = "\n".join(distillation_markdown(compare_students(one), compare_settings(one)))
    assert "not yet" in early and "over the 0" not in early
    # A run folder at the teacher's path that is another run (here: extended, ending at 0.6)
    # is not the teacher the students learned from: their record stands in, and says so.
    _kd_run(teacher, "fp", [0.40, 0.50, 0.50, 0.50, 0.50, 0.60], 0)
    moved = compare_students(groups)[0]
    assert moved.teacher.value == 0.5 and "another run" in moved.teacher.source
    # Without the teacher's run folder the students' recorded accuracy stands in, and says so.
    shutil.rmtree(teacher)
    alone = compare_students(groups)[0]
    assert alone.teacher.value == 0.5 and "recorded" in alone.teacher.source


def test_a_relative_teacher_path_is_found_wherever_compare_runs(tmp_path, monkeypatch):
    # The committed studies record the teacher relative to the repository they ran in.
    repo = tmp_path / "repo"
    _kd_run(repo / "results/teacher", "fp", [0.40, 0.42, 0.44, 0.46, 0.48, 0.50], 0)
    kd = ["train.distill.teacher=results/teacher", f"train.distill.teacher_sha256={'ab' * 32}",
          "train.distill.teacher_test_acc=0.5"]
    runs = [load_run(_kd_run(repo / f"results/kd/{name}-{seed}", "b158", [0.4] * 6, seed,
                             kd if name == "kd" else ()))
            for name in ("kd", "plain") for seed in (0, 1)]
    for cwd in (repo, tmp_path):
        monkeypatch.chdir(cwd)
        [student] = compare_students(compare_groups(group_runs(runs)))
        assert student.teacher.value == pytest.approx(0.46)  # its folder's last 5 epochs
        assert "run folder" in student.teacher.source


def test_students_are_compared_on_one_distillation_setting_at_a_time(tmp_path):
    """Two teachers: the kinds are compared under the same teacher and the teachers under the
    same kind, each setting its own Holm family; a pair that differs in both is never made."""
    weak = _kd_run(tmp_path / "weak", "fp", [0.42] * 6, 0)
    strong = _kd_run(tmp_path / "strong", "fp", [0.52] * 6, 0)
    teachers = {t: [f"train.distill.teacher={path}", f"train.distill.teacher_sha256={c * 64}"]
                for t, path, c in (("weak", weak, "a"), ("strong", strong, "b"))}
    arms = (("sign", "sign", 0.20, ()), ("b158", "b158", 0.49, ()),
            ("sign-weak-soft", "sign", 0.21, (*teachers["weak"], "train.distill.kind=soft")),
            ("sign-weak-hard", "sign", 0.22, (*teachers["weak"], "train.distill.kind=hard")),
            ("sign-strong-soft", "sign", 0.30, (*teachers["strong"], "train.distill.kind=soft")),
            ("b158-weak-soft", "b158", 0.50, (*teachers["weak"], "train.distill.kind=soft")),
            ("b158-strong-soft", "b158", 0.53, (*teachers["strong"], "train.distill.kind=soft")))
    runs = [load_run(_kd_run(tmp_path / f"{name}-{seed}", method, [0.1] + [acc] * 5, seed, kd))
            for seed in (0, 1, 2) for name, method, acc, kd in arms]
    groups = compare_groups(group_runs(runs))
    pairs = compare_settings(groups)
    named = {(p.setting, p.first.label, p.second.label): p.difference for p in pairs}
    assert set(named) == {
        ("kd", "sign act-fp kd=hard teacher=aaaaaaaa", "sign act-fp kd=soft teacher=aaaaaaaa"),
        ("teacher", "b158 act8 kd=soft teacher=aaaaaaaa", "b158 act8 kd=soft teacher=bbbbbbbb"),
        ("teacher", "sign act-fp kd=soft teacher=aaaaaaaa",
         "sign act-fp kd=soft teacher=bbbbbbbb")}
    assert sorted(d.family for d in named.values()) == [1, 2, 2]
    teacher = {p.first.label.split()[0]: p.difference for p in pairs if p.setting == "teacher"}
    assert abs(teacher["sign"].diff) == pytest.approx(0.09)
    assert abs(teacher["b158"].diff) == pytest.approx(0.03)
    # Holm within the teachers' family only.
    raw = sorted(d.p_value for d in teacher.values())
    assert sorted(d.p_adjusted for d in teacher.values()) == pytest.approx(holm(raw))
    text = "\n".join(distillation_markdown(compare_students(groups), pairs))
    assert "`train.distill.kind` (kd)" in text
    assert "`train.distill.teacher_sha256` (teacher)" in text
    assert "over the 2 pairs of this table" in text and "over the 1 pair of this table" in text
    # Each student's own teacher is the one it is held against.
    by_label = {s.group.label: s for s in compare_students(groups)}
    assert by_label["sign act-fp kd=soft teacher=bbbbbbbb"].teacher.value == pytest.approx(0.52)
    assert by_label["sign act-fp kd=soft teacher=aaaaaaaa"].teacher.value == pytest.approx(0.42)


def test_a_dry_run_names_a_missing_teacher_and_the_runs_that_need_it(tmp_path):
    sweep_file = tmp_path / "kd.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "base": str(Path("configs/paper.yaml").resolve()), "out": str(tmp_path / "out"),
        "overrides": [f"train.distill.teacher={tmp_path / 'no-teacher'}"],
        "grid": {"quant.method": ["b158", "bitnet"], "train.seed": [0, 1]}}))
    lines: list[str] = []
    run_sweep(load_sweep(sweep_file), dry_run=True, log=lines.append)
    assert lines[-1] == (f"MISSING   teacher {tmp_path / 'no-teacher'}: the 4 run(s) distilled "
                         "from it fail until it exists (train or copy it first)")
    (tmp_path / "no-teacher").mkdir()
    lines.clear()
    run_sweep(load_sweep(sweep_file), dry_run=True, log=lines.append)
    assert not any(line.startswith("MISSING") for line in lines)


def test_a_teacher_logits_cache_of_another_shape_or_type_is_not_read(tmp_path, monkeypatch):
    """The cache's header is checked before its table is read: another shape or dtype (a
    sparse file may claim any size) is computed again, never loaded."""
    from safetensors.torch import save_file

    from bitvit.training import distill

    key = {"teacher": "abc"}
    path = tmp_path / "teacher-logits.safetensors"
    save_file({"logits": torch.zeros(4, 3)}, str(path), metadata=key)
    assert distill._read_cache(path, key, (4, 3)).shape == (4, 3)
    assert distill._read_cache(path, {"teacher": "other"}, (4, 3)) is None
    read = []
    real_open = distill.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def __getattr__(self, name):
            if name == "get_tensor":
                read.append(name)
            return getattr(self.inner, name)

    monkeypatch.setattr(distill, "safe_open", Spy)
    assert distill._read_cache(path, key, (5, 3)) is None
    save_file({"logits": torch.zeros(4, 3, dtype=torch.float16)}, str(path), metadata=key)
    assert distill._read_cache(path, key, (4, 3)) is None
    assert read == []  # neither table was read


def test_torchrun_with_a_test_split_smaller_than_the_processes(real_env, tmp_path, teacher):
    """Two processes, one test image: the second process's share of the test split is empty.
    Its evaluation and the teacher's test accuracy still join the sums (they failed before)."""
    import subprocess
    import sys

    out = tmp_path / "student"
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "bitvit", "train", "--config", PAPER, "--quant", "b158", "--epochs", "1",
            "--quiet", "--limit-train", "100", *TINY, "data.limit_test=1",
            "--teacher", str(teacher), "--out", str(out)]
    res = subprocess.run([sys.executable, *args], env={**real_env, "OMP_NUM_THREADS": "1"},
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    [row] = rows(out)
    assert row["test_acc"] in {"0", "0.0", "1", "1.0"}
    info = json.loads((out / "run.json").read_text())
    assert info["processes"] == 2 and info["teacher"]["test_acc"] in {0.0, 1.0}


def test_a_logits_table_read_from_a_folder_moved_aside_is_written_again(tmp_path):
    # A run killed in epoch 1 restarts aside: the table it read went with the old files.
    table = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    key = {"teacher_sha256": "ab" * 32, "data_sha256": "cd" * 32}
    run = tmp_path / "run"
    run.mkdir()
    read = distill.Distillation(None, 0.5, distill.CachedTeacher(table),  # type: ignore[arg-type]
                                {"table": table, "key": key, "read": True})
    read.save_cache(run)
    assert torch.equal(load_file(str(run / TEACHER_LOGITS))["logits"], table)
    before = (run / TEACHER_LOGITS).stat().st_mtime_ns
    again = distill.Distillation(None, 0.5, distill.CachedTeacher(table),  # type: ignore[arg-type]
                                 {"table": table, "key": key, "read": True})
    again.save_cache(run)  # still there: not rewritten
    assert (run / TEACHER_LOGITS).stat().st_mtime_ns == before
