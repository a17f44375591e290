"""The notebooks and the package agree: no outputs in nbs/, `nbdev_export` and `nbdev_clean` change nothing.

Both tools run on temporary copies, so the checks never modify the checkout. To fix a failure run
`make export` (package out of date) or `make clean` (outputs or metadata in notebooks).
"""
import difflib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb"))
LIB = ROOT / "neurolm_nb"


def _nbdev(command: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    "Run an nbdev command in this interpreter (IN_TEST would turn nbdev_export into a no-op)."
    env = {k: v for k, v in os.environ.items() if k != "IN_TEST"}
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    module = {"nbdev_export": "nbdev.doclinks", "nbdev_clean": "nbdev.clean"}[command]
    code = f"from {module} import {command}; {command}({args})"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _py_files(lib: Path) -> dict[str, bytes]:
    return {str(p.relative_to(lib)): p.read_bytes() for p in sorted(lib.rglob("*.py")) if "__pycache__" not in p.parts}


def _first_diff(a: bytes, b: bytes, name: str) -> str:
    lines = difflib.unified_diff(a.decode().splitlines(), b.decode().splitlines(), f"committed/{name}",
                                 f"exported/{name}", lineterm="", n=1)
    return "\n".join(list(lines)[:20])


def test_notebooks_have_no_outputs():
    dirty = []
    for nb in NOTEBOOKS:
        cells = nbformat.read(nb, as_version=4).cells
        bad = [i for i, c in enumerate(cells) if c.cell_type == "code"
               and (c.get("outputs") or c.get("execution_count") is not None)]
        if bad:
            dirty.append(f"{nb.name} (cells {bad})")
    assert not dirty, "notebooks carry outputs or execution counts (run `make clean`): " + ", ".join(dirty)


def test_nbdev_export_changes_nothing(tmp_path):
    "Export every notebook into a copy whose package folder starts empty; the result must be the committed package."
    for name in ("settings.ini", "setup.py", "pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "nbs", tmp_path / "nbs", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    (tmp_path / "neurolm_nb").mkdir()
    shutil.copy(LIB / "__init__.py", tmp_path / "neurolm_nb" / "__init__.py")
    done = _nbdev("nbdev_export", tmp_path)
    assert done.returncode == 0, f"nbdev_export failed:\n{done.stdout}\n{done.stderr}"
    exported, committed = _py_files(tmp_path / "neurolm_nb"), _py_files(LIB)
    problems = []
    for name in sorted(set(exported) | set(committed)):
        if name not in committed:
            problems.append(f"neurolm_nb/{name} is missing (a notebook exports it)")
        elif name not in exported:
            problems.append(f"neurolm_nb/{name} comes from no notebook (stale module, or edited by hand)")
        elif exported[name] != committed[name]:
            problems.append(f"neurolm_nb/{name} differs from its export:\n{_first_diff(committed[name], exported[name], name)}")
    for name in ("pyproject.toml",):
        if (ROOT / name).exists() and (ROOT / name).read_bytes() != (tmp_path / name).read_bytes():
            problems.append(f"nbdev_export rewrites {name}")
    assert not problems, "the package is out of sync with nbs/ (run `make export`):\n" + "\n".join(problems)


def test_nbdev_clean_changes_nothing(tmp_path):
    copies = tmp_path / "nbs"
    copies.mkdir()
    for nb in NOTEBOOKS:
        shutil.copy(nb, copies / nb.name)
    done = _nbdev("nbdev_clean", ROOT, fname=str(copies))  # cwd = the repo, so its settings.ini applies
    assert done.returncode == 0, f"nbdev_clean failed:\n{done.stdout}\n{done.stderr}"
    assert "Failed to clean" not in done.stderr, done.stderr
    changed = [nb.name for nb in NOTEBOOKS if (copies / nb.name).read_bytes() != nb.read_bytes()]
    assert not changed, f"nbdev_clean would change {changed} (run `make clean`)"
