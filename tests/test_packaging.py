"""The package a lab installs: the wheel's contents and metadata, an install outside the repository, the declared
dependencies against the imports and the pinned set, the shipped third-party files and their checksums.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import pbip_core
from pbip_core.data.manifest import load_manifest, verify_sums

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of this checkout's sources (``pip wheel --no-deps``; setuptools in pip's isolated
    build env). The copy keeps setuptools' build/ folder out of the checkout."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "pbip_core", src / "pbip_core", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out),
                           str(src)], capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = out.glob("pbip_core-*.whl")
    return whl


def _env(**extra: str) -> dict[str, str]:
    """The environment without PYTHONPATH (the tests put the checkout on it; an installed copy must not see it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------------ the wheel
def test_wheel_ships_every_file_of_the_package(wheel):
    """Package data: the manifest, grids, paper numbers, Kather tiles, the official prototype file, ... all of it."""
    names = set(zipfile.ZipFile(wheel).namelist())
    pkg = ROOT / "pbip_core"
    expected = {p.relative_to(ROOT).as_posix() for p in pkg.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert expected - names == set()
    for must in ("pbip_core/data/manifest.yaml", "pbip_core/experiments/paper_results/paper_tables.csv",
                 "pbip_core/data/assets/official/official_bcss_prototypes.pkl",
                 "pbip_core/experiments/grids/book/book-table1.yaml", "pbip_core/data/assets/kather2016/SHA256SUMS"):
        assert must in names
    assert sum(n.endswith(".webp") for n in names) == 180
    assert not any(n.startswith(("tests/", "book/", "docs/")) for n in names)


def test_wheel_metadata(wheel):
    meta = zipfile.ZipFile(wheel).read(f"pbip_core-{pbip_core.__version__}.dist-info/METADATA").decode()
    assert f"Version: {pbip_core.__version__}\n" in meta
    assert "Requires-Python: >=3.11\n" in meta and "License-Expression: MIT\n" in meta
    assert "License-File: LICENSE\n" in meta and "Author: PBIP book contributors\n" in meta
    for extra in ("offline-weights", "book", "test", "hub"):
        assert f"Provides-Extra: {extra}\n" in meta
    assert "https://arxiv.org/abs/2503.12068" in meta and "https://github.com/QingchenTang/PBIP" in meta
    assert "Requires-Dist: torch" in meta and "Requires-Dist: pooch" in meta
    assert f"pbip_core-{pbip_core.__version__}.dist-info/licenses/LICENSE" in zipfile.ZipFile(wheel).namelist()


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repository(wheel, tmp_path):
    """A fresh venv with only the wheel: `pbip --version`, `pbip data list`, `pbip data synth`, from another folder.

    The venv gets its third-party dependencies from this environment's site-packages through a .pth file (installing
    torch & co. again takes minutes); pbip_core itself comes only from the wheel, which is asserted.
    """
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True, env=_env()).stdout.strip())
    # a plain path line: this environment's packages come after the venv's own; its .pth files (e.g. an editable
    # install of pbip_core) are not processed
    (purelib / "deps-from-test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--quiet",
                           str(wheel)], capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    work = tmp_path / "elsewhere"
    work.mkdir()
    pbip = str(env_dir / "bin" / "pbip")

    def run(*args: str) -> str:
        p = subprocess.run(args, cwd=work, capture_output=True, text=True, env=_env(), timeout=300)
        assert p.returncode == 0, f"{args}: {p.stdout}{p.stderr}"
        return p.stdout

    assert run(pbip, "--version").strip() == f"pbip {pbip_core.__version__}"
    listing = run(pbip, "data", "list")
    assert "bcss-wsss" in listing and "kather2016" in listing and "pathmnist-densenet121" in listing
    out = run(pbip, "data", "synth", "--out", "ds", "--n-train", "4", "--n-val", "2", "--n-test", "2", "--size", "32",
              "--workers", "1")
    assert out.startswith("wrote 4 train, 2 val, 2 test tiles") and (work / "ds" / "dataset.yaml").is_file()
    # pbip_core comes from the wheel, and its shipped assets are read from there: the official prototype file
    # loads as a (4 classes, 3 prototypes, 512) bank
    where, shape = run(str(py), "-c", "import pbip_core; from pbip_core.engine.bank import OFFICIAL_PROTOTYPES, "
                       "load_bank; print(pbip_core.__file__); "
                       "print(tuple(load_bank(OFFICIAL_PROTOTYPES).features.shape))").splitlines()
    assert Path(where).is_relative_to(env_dir) and not Path(where).is_relative_to(ROOT), where
    assert shape == "(4, 3, 512)"
    assert not list(work.glob("data")), "nothing is written into the working directory unasked"


# ------------------------------------------------------------------------------------------------ dependencies
def _declared() -> dict[str, list[Requirement]]:
    groups = {"core": [Requirement(r) for r in PROJECT["dependencies"]]}
    for extra, reqs in PROJECT["optional-dependencies"].items():
        groups[extra] = [Requirement(r) for r in reqs]
    return groups


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def test_every_imported_package_is_declared():
    """Each third-party module that pbip_core imports belongs to a distribution named in pyproject.toml."""
    declared = {_norm(r.name) for reqs in _declared().values() for r in reqs}
    dists = md.packages_distributions()
    missing = {}
    for path in (ROOT / "pbip_core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                     else [])
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("pbip_core", "__future__"):
                    continue
                owners = {_norm(d) for d in dists.get(top, [top])}
                if not owners & declared:
                    missing.setdefault(top, path.relative_to(ROOT).as_posix())
    assert missing == {}, f"imported but not declared in pyproject.toml: {missing}"


def test_core_dependencies_are_enough_for_the_command_line_modules():
    """`pbip data ...` needs only the core dependencies: the modules it imports use no book/test package."""
    core = {_norm(r.name) for r in _declared()["core"]}
    extras_only = {_norm(r.name) for g, reqs in _declared().items() if g != "core" for r in reqs} - core
    dists = md.packages_distributions()
    for rel in ("pbip_core/cli/data.py", "pbip_core/data/fetch.py", "pbip_core/data/check.py"):
        tree = ast.parse((ROOT / rel).read_text())
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)) and getattr(node, "level", 0) == 0:
                mod = node.names[0].name if isinstance(node, ast.Import) else node.module
                owners = {_norm(d) for d in dists.get(mod.split(".")[0], [])}
                assert not owners & extras_only, (rel, mod)


def test_pinned_requirements_satisfy_the_declared_ranges():
    """requirements.txt (the tested set) lies inside pyproject's ranges, and pins every declared package."""
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[_norm(req.name)] = spec.version
    for group, reqs in _declared().items():
        for r in reqs:
            if _norm(r.name) == "pbip-core":
                continue
            if _norm(r.name) in ("jupyter-client", "ipython", "sphinx", "requests"):   # pinned through their parents
                continue
            assert _norm(r.name) in pins, f"{group}: {r.name} is not pinned in requirements.txt"
            assert r.specifier.contains(pins[_norm(r.name)], prereleases=True), (group, str(r), pins[_norm(r.name)])
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"


def test_python_version_matches_the_declaration():
    assert PROJECT["requires-python"] == ">=3.11"
    assert sys.version_info >= (3, 11)
    assert "Programming Language :: Python :: 3.11" in PROJECT["classifiers"]


# ------------------------------------------------------------------------------------------------ shipped files
@pytest.mark.parametrize("name", sorted(load_manifest()["shipped"]))
def test_shipped_third_party_files_match_their_checksums(name):
    entry = load_manifest()["shipped"][name]
    folder = ROOT / entry["path"]
    assert (folder / entry["attribution"]).is_file()
    assert verify_sums(folder, entry["sums"], entry["own_files"]) == []
    in_wheel = entry["path"].startswith("pbip_core/")
    assert entry["in_wheel"] == in_wheel


def test_checksum_verification_can_fail(tmp_path):
    (tmp_path / "a.png").write_bytes(b"a")
    (tmp_path / "b.png").write_bytes(b"b")
    (tmp_path / "SHA256SUMS").write_text(f"{'0' * 64}  a.png\n{'1' * 64}  gone.png\n")
    problems = verify_sums(tmp_path)
    assert [p.split(": ", 1)[1].split(" ")[0] for p in problems] == ["not", "sha256", "listed"]
    assert str(tmp_path / "b.png") in problems[0] and str(tmp_path / "a.png") in problems[1]


def test_third_party_notice_lists_every_shipped_folder():
    notice = (ROOT / "docs" / "THIRD_PARTY.md").read_text()
    for entry in load_manifest()["shipped"].values():
        assert f"`{entry['path']}`" in notice and entry["licence"] in notice
    for name in ("LICENSE", "CITATION.cff"):
        assert (ROOT / name).is_file()


# ------------------------------------------------------------------------------------------------ the command line
def test_version_and_help_import_no_command_module():
    """`pbip --version` works with the core dependencies alone and fast: no torch, no book packages imported."""
    code = ("import sys, pbip_core.cli as c\n"
            "try:\n    c.main(['--version'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "print(sorted(m for m in ('torch', 'papermill', 'pbip_core.cli.book') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [f"pbip {pbip_core.__version__}", "[]"]


def test_a_missing_extra_is_a_one_line_error(monkeypatch, capsys):
    import pbip_core.cli as cli

    real = cli.importlib.import_module

    def no_papermill(name, *a, **k):
        if name == "pbip_core.cli.book":
            raise ModuleNotFoundError("No module named 'papermill'", name="papermill")
        return real(name, *a, **k)

    monkeypatch.setattr(cli.importlib, "import_module", no_papermill)
    assert cli.main(["book", "--html-only"]) == 2
    assert capsys.readouterr().err.strip() == ("pbip book: error: needs the optional package 'papermill': "
                                               "pip install 'pbip-core[book]' (or `make setup` in the repository)")
