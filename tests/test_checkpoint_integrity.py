"""Checkpoints verified like exports, through the real command line: each checkpoint folder
records the sha256 of its files; resume, eval, export and the sweep check them, fall back to an
intact ``.last.old`` (one line on stderr) or refuse in one line; nothing is deleted. Also: a
run's checkpoint must be of its config's model, a state.pt with code in it never loads (and
torch's warnings never add lines), a garbage metrics.csv names its row, and the temporaries of
killed writers are removed by the next write to the same place."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_16PX, one_line_error

from bitvit.cli import main
from bitvit.training.checkpoint import build_model, save_model, write_checksums
from bitvit.training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
FILES = ("model.safetensors", "state.pt")


@pytest.fixture
def run(tiny_run, tmp_path, monkeypatch) -> Path:
    """A private copy of the shared tiny run."""
    monkeypatch.setenv("BITVIT_CACHE", str(tiny_run["cache"]))
    copy = tmp_path / "run"
    shutil.copytree(tiny_run["run"], copy)
    return copy


def flip_weight_bytes(file: Path) -> None:
    """Flip two bytes inside the tensor data of a safetensors file (its header stays valid)."""
    data = bytearray(file.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]  # u64 header length, the header, the data
    middle = start + (len(data) - start) // 2
    data[middle] ^= 0xFF
    data[middle + 1] ^= 0xFF
    file.write_bytes(bytes(data))


def epoch_of(folder: Path) -> int:
    return torch.load(folder / "state.pt", weights_only=True)["epoch"]


# --- checksums: recorded, verified, fallen back on ------------------------------------------


def test_every_checkpoint_records_the_sha256_of_its_files(tiny_run):
    import hashlib

    for folder in (tiny_run["run"] / "last",):
        recorded = json.loads((folder / "checksums.json").read_text())["sha256"]
        assert recorded == {f: hashlib.sha256((folder / f).read_bytes()).hexdigest()
                            for f in FILES}


def test_flipped_weight_bytes_are_caught_by_resume_eval_and_export(run, tmp_path, capsys):
    flip_weight_bytes(run / "last/model.safetensors")
    before = sorted(p.name for p in run.rglob("*"))
    expected = (f"{run / 'last/model.safetensors'}: does not match the sha256 recorded in "
                f"checksums.json (corrupt); no previous checkpoint {run / '.last.old'} to fall "
                "back to")
    err = one_line_error(capsys, "train", "--resume", str(run), "--epochs", "2", "--quiet")
    assert expected in err and err.endswith("cannot resume")
    assert expected in one_line_error(capsys, "eval", str(run), "--device", "cpu")
    out = tmp_path / "model.safetensors"
    assert expected in one_line_error(capsys, "export", str(run), "--out", str(out))
    assert not out.exists()
    # Refused, not repaired: every file is still there.
    assert sorted(p.name for p in run.rglob("*")) == before


def test_an_intact_last_old_is_used_and_said_in_one_line(run, tmp_path, capsys):
    shutil.copytree(run / "last", run / ".last.old")
    flip_weight_bytes(run / "last/model.safetensors")
    notice = (f"{run / 'last/model.safetensors'}: does not match the sha256 recorded in "
              f"checksums.json (corrupt); using {run / '.last.old'}, the previous checkpoint, "
              "instead")

    for argv in (["eval", str(run), "--device", "cpu"],
                 ["export", str(run), "--out", str(tmp_path / "m.safetensors")]):
        capsys.readouterr()
        assert main(argv) == 0
        captured = capsys.readouterr()
        assert captured.err == f"bitvit {argv[0]}: warning: {notice}\n"
    assert (tmp_path / "m.safetensors").is_file()

    (run / ".last.tmp").mkdir()  # a killed checkpoint write's leftover: the next save clears it
    (run / ".last.tmp/model.safetensors").write_bytes(b"half")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    assert capsys.readouterr().err == f"bitvit train: warning: {notice}\n"
    assert epoch_of(run / "last") == 2 and not (run / ".last.tmp").exists()
    assert [r["epoch"] for r in csv_rows(run)] == ["1", "2"]


def csv_rows(run: Path) -> list[dict[str, str]]:
    import csv

    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_a_last_old_that_is_no_better_is_refused_too(run, capsys):
    shutil.copytree(run / "last", run / ".last.old")
    flip_weight_bytes(run / "last/model.safetensors")
    (run / ".last.old/state.pt").write_bytes(b"garbage")
    err = one_line_error(capsys, "train", "--resume", str(run), "--epochs", "2", "--quiet")
    assert "the previous checkpoint is no better" in err
    assert f"{run / '.last.old/state.pt'}: does not match the sha256" in err
    # eval needs only the weights: .last.old's are intact, so it is used.
    capsys.readouterr()
    assert main(["eval", str(run), "--device", "cpu"]) == 0
    assert "using" in capsys.readouterr().err


def test_checkpoints_written_before_checksums_still_load_silently(run, tmp_path, capsys):
    (run / "last/checksums.json").unlink()
    capsys.readouterr()
    assert main(["eval", str(run), "--device", "cpu"]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "m.safetensors")]) == 0
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert (run / "last/checksums.json").is_file()  # the new checkpoint records them


def test_a_resume_with_another_torch_says_its_epochs_are_not_exact(run, capsys):
    """Exact resume holds for one torch, device and thread count: another is said, once."""
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "torch": "1.0.0"}))
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    assert capsys.readouterr().err == (
        f"bitvit train: resuming {run} with torch 1.0.0 -> {torch.__version__}: the epochs from "
        "here differ from an uninterrupted run's in rounding\n")
    resumed = json.loads((run / "run.json").read_text())
    assert resumed["resumed_from"][-1]["torch"] == "1.0.0"
    assert resumed["torch"] == torch.__version__


def test_resume_changes_names_each_setting_that_breaks_exactness():
    from bitvit.training.record import resume_changes

    now = {"torch": "2.13.0+cpu", "device": "cpu (x86_64, 2 threads)",
           "cpu": "AMD EPYC (AVX-512 VNNI)", "processes": 1}
    assert resume_changes(now, now) == []
    assert resume_changes({}, now) == []  # older run.json files: nothing to compare
    assert resume_changes({**now, "device": "cpu (x86_64, 1 threads)", "processes": 4}, now) == [
        "device cpu (x86_64, 1 threads) -> cpu (x86_64, 2 threads)", "processes 4 -> 1"]
    # Same torch and threads on another CPU: its fp32 kernels round otherwise.
    xeon = "Intel(R) Xeon(R) Platinum 8480+ (AVX-512 VNNI + AMX)"
    assert resume_changes({**now, "cpu": xeon}, now) == [
        f"cpu {xeon} -> AMD EPYC (AVX-512 VNNI)"]


def test_run_json_commit_says_dirty_when_the_source_folder_has_changes(tmp_path):
    import subprocess

    from bitvit.training.record import git_commit

    src = tmp_path / "repo/src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg/f.py").write_text("x = 1\n")
    (tmp_path / "repo/notes.txt").write_text("a\n")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path / "repo"), "-c", "user.name=t", "-c",
                               "user.email=t@t", *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "c")
    head = git("rev-parse", "HEAD")
    assert git_commit(src) == head
    (tmp_path / "repo/notes.txt").write_text("b\n")  # outside the source: still clean
    assert git_commit(src) == head
    (src / "pkg/f.py").write_text("x = 2\n")
    assert git_commit(src) == f"{head}-dirty"
    assert git_commit(tmp_path) is None  # not a git checkout


def test_a_resume_that_fails_to_start_keeps_the_runs_init_from(tmp_path):
    from bitvit.training import rundir
    from bitvit.training.record import failed_start, run_record

    source = {"path": "/models/vit.safetensors", "sha256": "ab" * 32}
    rundir.write_info(tmp_path, {**run_record(torch.device("cpu"), 1, ["bitvit", "train"]),
                                 "status": "interrupted", "init_from": source})
    failed_start(tmp_path, tmp_path, run_record(torch.device("cpu"), 1, ["bitvit", "train"]),
                 "out of memory")
    info = rundir.read_info(tmp_path)
    assert (info["status"], info["init_from"]) == ("failed", source)
    assert info["resumed_from"][-1]["init_from"] == source


def test_run_json_names_the_cpu_and_its_isa():
    from bitvit.nn.kernels import cpu_isa, isa_summary
    from bitvit.training.record import run_record

    info = run_record(torch.device("cpu"), 1, ["bitvit", "train"])
    assert info["cpu"] == f"{cpu_isa()['model_name']} ({isa_summary()})"


def test_a_checkpoint_file_named_without_a_folder_loads(run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(run / "last")  # `bitvit export model.safetensors` from inside last/
    assert main(["export", "model.safetensors", "--out", str(tmp_path / "m.safetensors")]) == 0
    assert main(["eval", "model.safetensors", "--device", "cpu"]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_the_sweep_verifies_checkpoints_it_resumes(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BITVIT_CACHE", str(tiny_run["cache"]))
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({
        "base": str(ROOT / "configs/paper.yaml"), "out": str(tmp_path / "out"),
        "overrides": [*TINY_16PX, "train.epochs=1", f"data.path={tiny_run['images']}"],
        "grid": {"train.seed": [0]}}))
    assert main(["sweep", str(sweep)]) == 0
    flip_weight_bytes(tmp_path / "out/seed=0/last/model.safetensors")
    capsys.readouterr()
    assert main(["sweep", str(sweep), "train.epochs=2"]) == 2
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "does not match the sha256" in captured.out
    assert captured.err == "bitvit sweep: error: 1 run(s) failed: seed=0\n"


# --- the checkpoint against the run's config -------------------------------------------------


def test_eval_refuses_a_last_of_another_model_size(run, tmp_path, capsys):
    other = load_config(None, [*TINY_16PX, "model.dim=64"])
    save_model(run / "last/model.safetensors", build_model(other), other, ["cat", "dog"])
    write_checksums(run / "last", FILES)  # intact, just another model's
    err = one_line_error(capsys, "eval", str(run), "--device", "cpu")
    assert err.endswith(f"{run / 'last/model.safetensors'}: checkpoint is from another model "
                        f"(model.dim=64 in it, 32 in {run / 'config.yaml'})")
    err = one_line_error(capsys, "export", str(run), "--out", str(tmp_path / "m.safetensors"))
    assert "checkpoint is from another model (model.dim=64" in err
    err = one_line_error(capsys, "train", "--resume", str(run), "--epochs", "2", "--quiet")
    assert "checkpoint is from another model (model.dim=64 in it, 32 in the run's" in err


# --- state.pt with code in it: one line, never loaded ------------------------------------------


class RunsCode:
    """Pickles as a call of os.system: what a malicious state.pt holds."""

    def __reduce__(self):
        return (os.system, ("echo PAYLOAD-RAN",))


def test_a_bare_pickle_state_is_refused_in_exactly_one_line(run):
    """In a real process, where torch's UserWarning ("Detected pickle protocol 4") would print
    its own two lines: bitvit refuses the file before any unpickler sees it."""
    (run / "last/state.pt").write_bytes(pickle.dumps({"epoch": RunsCode()}, protocol=4))
    write_checksums(run / "last", FILES)
    done = subprocess.run([sys.executable, "-m", "bitvit", "train", "--resume", str(run),
                           "--epochs", "2", "--quiet"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=120)
    assert done.returncode == 2 and "PAYLOAD-RAN" not in done.stdout
    assert done.stderr == (f"bitvit train: error: {run / 'last/state.pt'}: unreadable training "
                           "state, expected a torch.save file written by bitvit train (not "
                           "torch.save's zip archive: a bare pickle stream; not loaded)\n")


def test_torch_warnings_are_folded_into_the_one_line(run, capsys):
    """A zip whose pickle has protocol 4: torch's safe loader warns, then refuses; the warning
    is part of bitvit's line, not a line of its own."""
    state = torch.load(run / "last/state.pt", weights_only=True)
    torch.save({**state, "epoch": RunsCode()}, run / "last/state.pt", pickle_protocol=4)
    write_checksums(run / "last", FILES)
    err = one_line_error(capsys, "train", "--resume", str(run), "--epochs", "2", "--quiet")
    assert "unreadable training state" in err and "weights_only" not in err
    assert "warning: Detected pickle protocol 4" in err


# --- metrics.csv --------------------------------------------------------------------------------


def test_a_garbage_metrics_csv_names_its_file_and_row(run, capsys):
    lines = (run / "metrics.csv").read_text().splitlines()
    fields = lines[1].split(",")
    fields[1] = "abc"
    (run / "metrics.csv").write_text("\n".join([lines[0], ",".join(fields)]) + "\n")
    expected = f"{run / 'metrics.csv'}: row 2: train_loss='abc' is not a number"
    err = one_line_error(capsys, "train", "--resume", str(run), "--epochs", "2", "--quiet")
    assert err.endswith(expected)
    assert one_line_error(capsys, "compare", str(run)).endswith(expected)
    (run / "metrics.csv").write_text(lines[0] + "\n1,2\n")
    err = one_line_error(capsys, "compare", str(run))
    assert f"{run / 'metrics.csv'}: row 2 has 2 fields; the header has" in err
    (run / "metrics.csv").write_bytes(b"\x00" * 100)
    assert str(run / "metrics.csv") in one_line_error(capsys, "compare", str(run))


# --- temporaries of killed writers ----------------------------------------------------------


def test_stale_temporaries_of_a_killed_export_are_removed_by_the_next(run, tmp_path):
    out = tmp_path / "exports/model.safetensors"
    out.parent.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = out.with_name(f".model.safetensors.{gone.pid}.tmp")
    dead.write_bytes(b"half an export")
    alive = out.with_name(f".model.safetensors.{os.getppid()}.tmp")  # a live writer's
    alive.write_bytes(b"being written")
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        # Its pid is alive, but the process started after the temporary was last written:
        # the pid was reused, the writer is dead.
        reused = out.with_name(f".model.safetensors.{sleeper.pid}.tmp")
        reused.write_bytes(b"older than its pid's process")
        an_hour_ago = time.time() - 3600
        os.utime(reused, (an_hour_ago, an_hour_ago))
        assert main(["export", str(run), "--out", str(out)]) == 0
    finally:
        sleeper.kill()
        sleeper.wait()
    assert out.is_file() and alive.is_file()
    assert not dead.exists() and not reused.exists()
