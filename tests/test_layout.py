"""Modules that each do one job, the config checked once, a command line that starts fast."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bitvit.nn.model import VisionTransformer, ViTConfig
from bitvit.training.config import ConfigError, load_config, save_config

SRC = Path(__file__).resolve().parents[1] / "src" / "bitvit"


# Each part of the package and its layer: a part imports only parts of lower layers (peers of one
# layer never import each other). The root package is the lazy facade and gives __version__.
LAYERS = {"files": 0, "system": 0, "nn": 1, "data": 1, "training": 2, "deploy": 3, "studies": 3,
          "cli": 4, "__main__": 5}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(module: Path) -> set[str]:
    """Every bitvit module a file imports, at any level (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            # `from bitvit.training import rundir` imports the submodule bitvit.training.rundir
            names.update(f"{node.module}.{a.name}" for a in node.names
                         if (SRC.parent / node.module.replace(".", "/") / f"{a.name}.py").exists())
    return {n for n in names if n == "bitvit" or n.startswith("bitvit.")}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name}
            for name, path in modules.items()}


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else "bitvit"


def test_every_part_of_the_package_is_in_a_layer_and_says_what_it_is_for():
    parts = {_part(_module_name(p)) for p in SRC.rglob("*.py")} - {"bitvit"}
    assert parts == set(LAYERS)
    for package in (p for p in SRC.iterdir() if (p / "__init__.py").exists()):
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        assert doc and "Layer" in doc and "May import" in doc, package.name


def test_no_part_imports_a_higher_layer_or_a_peer():
    upward = []
    for module, imported in _graph().items():
        part = _part(module)
        for target in imported - {"bitvit"}:
            other = _part(target)
            if part != other and part != "bitvit" and not LAYERS[other] < LAYERS[part]:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_the_root_package_is_imported_below_the_top_only_for_its_version():
    for path in SRC.rglob("*.py"):
        if _part(_module_name(path)) in ("bitvit", "cli", "__main__"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "bitvit":
                assert [a.name for a in node.names if a.name != "__version__"] == [] or all(
                    (SRC / f"{a.name}.py").exists() for a in node.names), path


def test_there_is_no_import_cycle_between_modules():
    graph, state, cycles = _graph(), {}, []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module] - {"bitvit"}):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*stack[stack.index(target):], target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_training_does_not_load_exports_or_engines():
    """Loading exported files and engines is bitvit.deploy's job, above training."""
    code = ("import sys, bitvit.training.loop; "
            "print(sorted(m for m in sys.modules if m.startswith(('bitvit.deploy', "
            "'bitvit.studies'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_command_line_parser_does_not_import_torch():
    code = ("import sys, bitvit, bitvit.cli; p = bitvit.cli.build_parser(); "
            "[p.parse_args(a.split()) for a in ('train --act-bits 8', 'eval r', 'predict m i', "
            "'profile c.yaml', 'sweep s.yaml', 'export r --out m', 'compare r', 'report')]; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    for args in (["--version"], ["train", "--help"], ["report", "--help"]):
        run = subprocess.run([sys.executable, "-X", "importtime", "-m", "bitvit", *args],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert " torch" not in run.stderr, args  # -X importtime lists every module imported


def test_the_package_names_still_load_lazily():
    import bitvit
    import bitvit.deploy.evaluate
    import bitvit.training.loop

    assert callable(bitvit.train) and bitvit.train.__name__ == "train"
    assert callable(bitvit.evaluate) and bitvit.evaluate.__module__ == "bitvit.deploy.evaluate"
    assert bitvit.VisionTransformer is VisionTransformer
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        bitvit.nothing  # noqa: B018


def test_weight_decay_groups_come_from_the_model():
    model = VisionTransformer(ViTConfig(image_size=8, patch_size=4, dim=16, depth=1, heads=2,
                                        num_classes=3))
    decay, no_decay = model.param_groups(0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} >= {"pos_embed", "cls_token",
                                                           "blocks.0.norm1.weight", "head.bias"}
    assert {names[id(p)] for p in decay["params"]} == {
        n for n, p in model.named_parameters() if p.ndim >= 2 and n not in ("pos_embed",
                                                                             "cls_token")}
    assert "blocks.0.mlp.fc1.weight" in {names[id(p)] for p in decay["params"]}


@pytest.mark.parametrize("override, message", [
    ("data.val_size=-1", "data.val_size=-1: expected an integer >= 0"),
    ("data.crop_padding=-3", "data.crop_padding=-3: expected an integer >= 0"),
    ("data.limit_train=0", "data.limit_train=0: expected null or an integer >= 1"),
    ("data.limit_test=-5", "data.limit_test=-5: expected null or an integer >= 1"),
    ("data.seed=-1", "data.seed=-1: expected an integer >= 0"),
    ("data.download_md5=abc", "data.download_md5='abc': expected null or 32 hex digits"),
    ("train.min_lr=0.1", "train.min_lr=0.1: expected at most train.lr=0.001"),
    ("quant.method=ternary", "quant.method='ternary': expected one of fp, b158"),
    ("quant.where=head", "quant.where='head': expected one of all, mlp, attn, none"),
    ("quant.act_bits=4", "quant.act_bits=4: expected 8, 1, null, none or default"),
    ("data.std=[1, 1]", "data.std has 2 entries but the model has 3 channel"),
])
def test_every_key_is_checked_when_the_config_loads(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("method, given, stored", [
    ("b158", "default", 8), ("sign", "default", None), ("fp", "default", None),
    ("xnor", "8", 8), ("bitnet", "none", None), ("sign", 1, 1), ("b158", None, None),
])
def test_act_bits_are_resolved_once_and_saved_as_numbers(tmp_path, method, given, stored):
    config = load_config(None, [("quant.method", method), ("quant.act_bits", given)])
    assert config.quant.act_bits == stored
    save_config(config, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["quant"]["act_bits"] == stored
    # An older config.yaml that says 'default' or '8' still reads, as the number it means.
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"quant": {"method": method, "act_bits": given}}))
    assert load_config(old).quant.act_bits == stored


def test_act_bits_flag_reaches_the_config_as_a_number(monkeypatch, tmp_path):
    from bitvit import cli

    seen = {}
    train_module = importlib.import_module("bitvit.training.loop")
    monkeypatch.setattr(train_module, "train", lambda config, **kw: seen.setdefault("c", config))
    with pytest.raises(AttributeError):  # the fake train returns a config, not a RunResult
        cli.main(["train", "--quant", "sign", "--act-bits", "8", "--out", str(tmp_path / "r")])
    assert seen["c"].quant.act_bits == 8
    args = cli.parse_args(["train", "--act-bits", "none", "quant.where=mlp"])
    assert cli._train_overrides(args) == [("quant.act_bits", None), "quant.where=mlp"]
    assert json.dumps(torch.__version__)  # torch is imported here: the other tests check without


def test_functions_and_modules_stay_small_enough_to_read():
    """No function in src/ over 80 lines, no module over 600: split them when they grow."""
    long = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        if len(text.splitlines()) > 600:
            long.append(f"{path.relative_to(SRC)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}: {lines}")
    assert long == []


def test_a_float_key_takes_exponent_notation_without_a_dot():
    """YAML 1.1 reads 3e-4 as a string; `bitvit train --help` suggests train.lr=3e-4."""
    assert load_config(None, ["train.lr=3e-4"]).train.lr == 3e-4
    assert load_config(None, ["train.min_lr=1E-6"]).train.min_lr == 1e-6
    with pytest.raises(ConfigError, match="train.lr='abc': expected float"):
        load_config(None, ["train.lr=abc"])
