"""The documentation cannot rot: README.md and docs/*.md are run, parsed and followed.

- Every ```python block runs: each file's blocks in order, in one namespace per file, in a
  temporary working directory that holds `configs/` and `studies/` (as the repository root does)
  and with BITVIT_DATA set to a tiny CIFAR-10-shaped image folder (10 classes of random 32x32
  images, enough for one batch of 128), so that examples which train on CIFAR-10 run in seconds.
  Pages in PREPARED start from a trained run folder, as their text says. A block that cannot run
  in a test (a GPU, torchrun, hours of compute) is marked on the line right before its fence with
  `<!-- not run: REASON -->`, and the reason is required.
- Every ```bash block holds real commands, no placeholders (those belong in ```text synopses):
  each `bitvit ...` or `... -m bitvit ...` line (and a table row whose first cell is a
  `bitvit ...` command) must parse with the command's own parser
  (`bitvit.cli.parse_args`, which is `build_parser()` plus overrides after options), its
  `section.key=value` overrides must load, and the repository paths it names must exist;
  `make X` names a Makefile target and `python benchmarks/X.py` an existing script.
- The ```text synopsis in docs/cli.md names exactly the options each subcommand has; the config
  table there lists exactly the config's keys; docs/layout.md names every module.
- Every relative Markdown link points to an existing file (and heading, for `page.md#anchor`),
  and every repository path written as inline code exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import bitvit.cli
from bitvit.training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python", "bash", "text", "yaml", "json"}  # every fence names one of these
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]
# Pages whose examples start from a trained run folder (their text says "for a run folder
# runs/b158"): the test trains a tiny one there first.
PREPARED = {"docs/deployment.md": "runs/b158", "docs/run-folder.md": "runs/b158"}
TINY = ["model.dim=32", "model.depth=2", "model.heads=4", "model.patch_size=8",
        "quant.method=b158", "train.epochs=1", "train.batch_size=64"]
REPO_PATH = re.compile(r"(benchmarks|configs|docs|results|src|studies|tests)/[\w./=+-]*")
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.*?)\s*-->")


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@dataclass
class Block:
    path: Path
    lang: str
    line: int  # 1-based line of the first line of code
    code: str
    not_run: str | None  # the reason, for a python block marked <!-- not run: REASON -->

    @property
    def where(self) -> str:
        return f"{rel(self.path)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(```+)\s*(\S*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence[1]), None)
        assert end is not None, f"{rel(path)}:{i + 1}: unclosed code fence"
        marker = NOT_RUN.search(lines[i - 1]) if i else None
        found.append(Block(path, fence[2], i + 2, "\n".join(lines[i + 1:end]) + "\n",
                           marker[1] if marker else None))
        i = end + 1
    return found


def prose(path: Path) -> str:
    """The text outside code blocks and inline code spans."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def inline_code(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", text)


def python_docs() -> list[Path]:
    return [p for p in DOCS if any(b.lang == "python" for b in blocks(p))]


# ---------------------------------------------------------------------------------------------
# The pages and their fences
# ---------------------------------------------------------------------------------------------


def test_the_readme_is_a_front_page_and_lists_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, f"README.md does not link {rel(page)}"


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_every_fence_names_its_language_and_not_run_blocks_say_why(path):
    for block in blocks(path):
        assert block.lang in LANGUAGES, (
            f"{block.where}: a code fence needs a language of {sorted(LANGUAGES)}, so that the "
            "test knows whether to run or parse it")
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines, 1):
        if "not run" in line and "<!--" in line:
            marker = NOT_RUN.search(line)
            assert marker and marker[1], f"{rel(path)}:{i}: a not-run marker needs a reason"
            nxt = lines[i] if i < len(lines) else ""
            assert nxt.startswith("```python"), (
                f"{rel(path)}:{i}: a not-run marker goes on the line right before a python fence")


# ---------------------------------------------------------------------------------------------
# Python blocks run
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A CIFAR-10-shaped image folder: the ten classes, 13 training and 2 test images each."""
    root = tmp_path_factory.mktemp("docs-data") / "cifar-10-tiny"
    rng = np.random.default_rng(0)
    for split, n in (("train", 13), ("test", 2)):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def docs_env(tiny_data, tmp_path_factory) -> dict[str, str]:
    return {"BITVIT_DATA": str(tiny_data),
            "BITVIT_CACHE": str(tmp_path_factory.mktemp("docs-cache")),
            "BITVIT_RUNS_ROOT": str(tmp_path_factory.mktemp("docs-runs-root"))}


@pytest.fixture(scope="session")
def tiny_run(docs_env, tmp_path_factory) -> Path:
    """A one-epoch b158 run of a small ViT on the tiny data."""
    from bitvit.training.loop import train

    out = tmp_path_factory.mktemp("docs-run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in docs_env.items():
            mp.setenv(key, value)
        train(load_config(ROOT / "configs/paper.yaml", TINY), out=out, quiet=True)
    return out


@pytest.mark.parametrize("path", python_docs(), ids=rel)
def test_python_examples_run(path, docs_env, request, tmp_path, monkeypatch):
    for key, value in docs_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("BITVIT_ENGINE", raising=False)  # the examples run as a user's: auto
    for name in ("configs", "studies"):
        (tmp_path / name).symlink_to(ROOT / name)
    if rel(path) in PREPARED:
        shutil.copytree(request.getfixturevalue("tiny_run"), tmp_path / PREPARED[rel(path)])
    monkeypatch.chdir(tmp_path)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    namespace: dict = {"__name__": "__docs__"}
    try:
        for block in blocks(path):
            if block.lang != "python" or block.not_run:
                continue
            # Padded so that a traceback names the page's own line numbers.
            code = compile("\n" * (block.line - 1) + block.code, str(path), "exec")
            exec(code, namespace)  # noqa: S102 - the documentation's own examples
    finally:
        for s, handler in handlers.items():  # bitvit.cli.main installs its own
            signal.signal(s, handler)


# ---------------------------------------------------------------------------------------------
# Bash blocks parse
# ---------------------------------------------------------------------------------------------


def bash_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(page:line, tokens) for every command of every bash block, comments and `VAR=value`
    prefixes removed, continued lines joined."""
    out = []
    for block in (b for b in blocks(path) if b.lang == "bash"):
        lines, start, pending = block.code.splitlines(), 0, ""
        for i, line in enumerate(lines):
            if not pending:
                start = i
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            tokens, pending = shlex.split(pending + line, comments=True), ""
            while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):
                tokens.pop(0)
            if tokens:
                out.append((f"{rel(path)}:{block.line + start}", tokens))
    # A table whose first column is a command (the README's command line at a glance).
    for i, line in enumerate(path.read_text().splitlines(), 1):
        cell = re.match(r"\| `(bitvit [^`]*)` \|", line)
        if cell:
            out.append((f"{rel(path)}:{i}", shlex.split(cell[1])))
    return out


def bitvit_argv(tokens: list[str]) -> list[str] | None:
    if tokens[0] == "bitvit":
        return tokens[1:]
    for i in range(len(tokens) - 1):
        if tokens[i] == "-m" and tokens[i + 1] == "bitvit":
            return tokens[i + 2:]
    return None


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_.-]+):(?!=)", text, flags=re.M))


def parse(where: str, argv: list[str], capsys) -> argparse.Namespace | None:
    try:
        return bitvit.cli.parse_args(argv)
    except SystemExit as e:
        if e.code not in (0, None):  # --help and --version exit 0
            pytest.fail(f"{where}: `bitvit {shlex.join(argv)}` does not parse: "
                        f"{capsys.readouterr().err.strip().splitlines()[-1]}")
        return None


def check_overrides(where: str, args: argparse.Namespace) -> None:
    """The section.key=value overrides (and a YAML config) load as the command would load them."""
    config = None
    if args.command == "train" and not args.resume:
        config = args.config
    elif args.command == "profile" and str(args.source).endswith((".yaml", ".yml")):
        config = args.source
    overrides = list(getattr(args, "overrides", []))
    if config is None and not overrides:
        return
    try:
        load_config(ROOT / config if config else None, overrides)
    except Exception as e:  # noqa: BLE001 - any refusal fails the page with its line
        pytest.fail(f"{where}: {' '.join(overrides)}: {e}")


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_bash_commands_are_real(path, capsys):
    targets = make_targets()
    for where, tokens in bash_commands(path):
        for token in tokens:
            for value in (token, token.partition("=")[2]):
                if REPO_PATH.fullmatch(value):
                    assert (ROOT / value).exists(), f"{where}: {value} does not exist"
        argv = bitvit_argv(tokens)
        if argv is not None:
            args = parse(where, argv, capsys)
            if args is not None:
                check_overrides(where, args)
        elif tokens[0] == "make":
            for target in (t for t in tokens[1:] if "=" not in t and not t.startswith("-")):
                assert target in targets, f"{where}: no Makefile target {target!r}"
        elif tokens[0] in ("python", "python3") and tokens[1].endswith(".py"):
            assert (ROOT / tokens[1]).is_file(), f"{where}: no script {tokens[1]}"


# ---------------------------------------------------------------------------------------------
# The reference tables match the code
# ---------------------------------------------------------------------------------------------


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = bitvit.cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_the_synopsis_names_every_option_of_every_subcommand():
    synopsis = next(b for b in blocks(ROOT / "docs/cli.md") if b.lang == "text").code
    named: dict[str, set[str]] = {}
    command = None
    for line in synopsis.splitlines():
        if line.startswith("bitvit "):
            command = line.split()[1]
            if command.startswith("-"):
                command = None
                continue
            named.setdefault(command, set())
        if command:
            named[command].update(re.findall(r"--[a-z][a-z0-9-]*", line))
    parsers = subparsers()
    assert set(named) == set(parsers)
    for command, parser in parsers.items():
        options = {o for a in parser._actions for o in a.option_strings
                   if o.startswith("--") and o != "--help"}
        assert named[command] == options, command


def test_every_option_of_every_subcommand_has_help():
    for command, parser in subparsers().items():
        silent = [a.option_strings[0] for a in parser._actions
                  if a.option_strings and not a.help and "--help" not in a.option_strings]
        assert not silent, f"bitvit {command}: no help for {', '.join(silent)}"


def test_the_config_table_lists_every_key():
    text = (ROOT / "docs/cli.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    listed = {key for row in rows
              for key in re.findall(r"`(\w+(?:\.\w+)+)`", row.split("|")[1])}
    assert listed == set(_keys(load_config()))


def _keys(section: object, prefix: str = "") -> list[str]:
    """Every leaf key of a config, nested sections (train.distill) spelled out."""
    keys = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        name = f"{prefix}{f.name}"
        keys += _keys(value, f"{name}.") if dataclasses.is_dataclass(value) else [name]
    return keys


def test_the_python_page_names_every_public_name():
    import bitvit

    text = (ROOT / "docs/python.md").read_text()
    missing = [name for name in bitvit.__all__ if name != "__version__" and f"`{name}" not in text]
    assert not missing, f"docs/python.md does not name {missing}"


def test_the_layout_page_names_every_module():
    text = (ROOT / "docs/layout.md").read_text()
    src = ROOT / "src" / "bitvit"
    for module in src.rglob("*.py"):
        assert f"`{module.name}`" in text or f"{rel(module)[len('src/bitvit/'):]}" in text, (
            f"docs/layout.md does not name {rel(module)}")
    for package in (p for p in src.iterdir() if (p / "__init__.py").exists()):
        assert f"`bitvit.{package.name}`" in text, package.name
        # The layers table's row lists exactly the subpackage's modules.
        row = next(line for line in text.splitlines() if f"| `bitvit.{package.name}` |" in line)
        listed = set(re.findall(r"`(\w+\.py)`", row.split("|")[3]))
        assert listed == {m.name for m in package.glob("*.py")} - {"__init__.py"}, package.name


# ---------------------------------------------------------------------------------------------
# Links and paths
# ---------------------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    for heading in re.findall(r"^#+\s+(.*)$", text, flags=re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_relative_links_point_to_existing_files(path):
    links = re.findall(r"\]\(([^)\s]+)\)", prose(path))
    assert links or path.name != "README.md"
    for link in links:
        if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        assert file.exists(), f"{rel(path)}: link {link} points to nothing"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{rel(path)}: link {link}: no such heading"


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_repository_paths_in_inline_code_exist(path):
    for code in inline_code(path):
        if REPO_PATH.fullmatch(code):  # from the root, or a module path in the package
            assert (ROOT / code).exists() or (ROOT / "src/bitvit" / code).exists(), (
                f"{rel(path)}: `{code}` does not exist")
