"""The repository is self-contained: no tracked file names a machine path or a folder outside the repository."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_SLASH = "/"
MACHINE_PATH = re.compile(
    r"(?<![\w.~-])" + _SLASH + r"(?:work|root|home|Users|mnt|scratch)" + _SLASH   # /work/..., /home/... of a machine
    + r"|[A-Za-z]:\\Users\\"                                                        # C:\Users\...
    + r"|\.\." + _SLASH + r"shared\b"                                               # the team's folder beside the repo
)
# /tmp/... is allowed in Markdown examples (a scratch place every Unix has), not in code, notebooks or configuration.
TMP_PATH = re.compile(r"(?<![\w.~-])" + _SLASH + r"tmp" + _SLASH)


def tracked_text_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files cannot be listed")
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    files = []
    for name in filter(None, names):
        path = ROOT / name.decode()
        if path.is_file() and b"\0" not in path.read_bytes()[:8192]:      # text only (binary files have NUL bytes)
            files.append(path)
    return files


def test_no_tracked_file_names_a_machine_path():
    hits = []
    for path in tracked_text_files():
        if path == Path(__file__).resolve():          # this file spells the patterns out
            continue
        text = path.read_text(errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATH.search(line) or (path.suffix != ".md" and TMP_PATH.search(line)):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert hits == [], "\n".join(hits)


def test_the_pattern_finds_machine_paths():
    for bad in ("open('" + "/work/shared/paper.txt')", "see .." + "/shared/DESIGN.md", "x = '/home" + "/me/data'",
                "C:\\" + "Users\\me\\x"):
        assert MACHINE_PATH.search(bad), bad
    for fine in ("DIR/train/*.png", "results/book/demo", "https://github.com/QingchenTang/PBIP", "~/work/x",
                 "parse_label('/data/train/x.png')"):
        assert not MACHINE_PATH.search(fine), fine
    assert TMP_PATH.search("out = '" + "/tmp/x'") and not TMP_PATH.search("tmp_path / 'x'")
