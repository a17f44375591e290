"""Every notebook in nbs/ runs top to bottom under papermill, and keeps its `parameters` cell.

Notebooks are collected when the tests are collected, so a new notebook is tested without touching this
file. Each runs the way `neurolm_nb.pipeline` would run it: working folder nbs/, kernel python3, the
smoke profile's parameters (those the notebook declares), `out_dir` a temporary folder and
`run_root=None` (standalone).
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from neurolm_nb.pipeline import STAGES, load_profile, notebook_parameters, resolve_parameters, run_notebook

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb"))
SLOW: set[str] = set()  # notebook file names that take over a minute on one CPU core
STAGE_OF = {nb: stage for stage, nb in STAGES.items()}
REQUIRED = ("out_dir", "run_root", "seed")  # the contract every notebook's parameters cell keeps


def _param(nb: Path):
    marks = [pytest.mark.notebook] + ([pytest.mark.slow] if nb.name in SLOW else [])
    return pytest.param(nb, id=nb.stem, marks=marks)


def _parameter_cells(nb: Path) -> list:
    cells = nbformat.read(nb, as_version=4).cells
    return [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]


def test_notebooks_were_found():
    assert NOTEBOOKS, f"no notebooks in {ROOT / 'nbs'}"


@pytest.mark.parametrize("notebook", [_param(nb) for nb in NOTEBOOKS])
def test_notebook_has_parameters_cell(notebook):
    cells = _parameter_cells(notebook)
    assert len(cells) == 1, f"{notebook.name} has {len(cells)} cells tagged 'parameters' (needs exactly one)"
    declared = notebook_parameters(notebook)
    missing = [k for k in REQUIRED if k not in declared]
    assert not missing, f"{notebook.name}: the parameters cell lacks {missing} (it declares {sorted(declared)})"
    assert "#| export" not in cells[0].source, f"{notebook.name}: the parameters cell must not be exported"


@pytest.mark.parametrize("notebook", [_param(nb) for nb in NOTEBOOKS])
def test_notebook_runs_under_papermill(notebook, tmp_path):
    smoke = load_profile("smoke")
    stage = STAGE_OF.get(notebook.name)
    out = tmp_path / "out"
    params = resolve_parameters(notebook, smoke, stage if stage in smoke["stages"] else None, out_dir=out)
    run_notebook(notebook, tmp_path / notebook.name, params, kernel="python3", cwd=notebook.parent,
                 stage=stage, timeout=900)
    executed = nbformat.read(tmp_path / notebook.name, as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    # every figure a notebook saves is also shown in it (save_fig displays the PNG it wrote)
    saved = sorted(out.rglob("figures/*.png")) if out.exists() else []
    shown = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
             if "image/png" in o.get("data", {})]
    assert len(shown) >= len(saved), f"{notebook.name} saved {len(saved)} figures but shows {len(shown)}"
    if stage is not None:  # stage notebooks leave their record behind
        for name in ("metrics.json", "config.json"):
            assert (out / name).exists(), f"stage {stage!r} ({notebook.name}) did not write {name} to out_dir"
            json.loads((out / name).read_text())


def test_parameters_tag_survives_nbdev_clean(tmp_path):
    "nbdev_clean, run with this project's settings.ini, keeps papermill's tag (and would drop it without them)."
    from nbdev.clean import clean_nb
    source = next((nb for nb in NOTEBOOKS if _parameter_cells(nb)), None)
    if source is None:
        pytest.skip("no notebook with a parameters cell yet")
    copy = tmp_path / "nbs" / source.name
    copy.parent.mkdir()
    shutil.copy(source, copy)
    nb = json.loads(copy.read_text())
    for cell in nb["cells"]:  # give the copy the metadata Jupyter adds, so cleaning has work to do
        cell["metadata"]["collapsed"] = False
    copy.write_text(json.dumps(nb, indent=1))
    done = subprocess.run([sys.executable, "-c", "from nbdev.clean import nbdev_clean; nbdev_clean(fname=%r)" % str(copy)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    cleaned = json.loads(copy.read_text())
    assert not any("collapsed" in c["metadata"] for c in cleaned["cells"]), "nbdev_clean did not run on the copy"
    assert _parameter_cells(copy), f"nbdev_clean removed the 'parameters' tag from {source.name}"
    # the control: without allowed_cell_metadata_keys the tag would be gone
    bare = json.loads(source.read_text())
    clean_nb(bare, allowed_cell_metadata_keys=[])
    assert not any("parameters" in c["metadata"].get("tags", []) for c in bare["cells"])


MAX_EXPORTED_CELL = 40   # lines of one exported cell (issue #11: "about 40 lines at most")
MAX_EXPORTED_RUN = 50    # lines of exported code in a row before a demo cell runs something


def _is_export(src: str) -> bool:
    return any(line.replace(" ", "").startswith("#|export") for line in src.splitlines()[:3])


@pytest.mark.parametrize("notebook", [pytest.param(nb, id=nb.stem) for nb in NOTEBOOKS])
def test_notebook_reads_in_short_steps(notebook):
    "Exported cells stay short, and a demo (a non-exported code cell) follows every few of them."
    run, worst_cell, worst_run = 0, (0, -1), (0, -1)
    for i, cell in enumerate(nbformat.read(notebook, as_version=4).cells):
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        if _is_export(cell.source):
            n = len(cell.source.strip().splitlines())
            worst_cell, run = max(worst_cell, (n, i)), run + n
            worst_run = max(worst_run, (run, i))
        else:
            run = 0
    assert worst_cell[0] <= MAX_EXPORTED_CELL, f"{notebook.name}: exported cell {worst_cell[1]} has {worst_cell[0]} lines"
    assert worst_run[0] <= MAX_EXPORTED_RUN, (f"{notebook.name}: {worst_run[0]} lines of exported code in a row "
                                              f"up to cell {worst_run[1]} with no demo between")


@pytest.mark.parametrize("notebook", [pytest.param(nb, id=nb.stem) for nb in NOTEBOOKS])
def test_notebook_cites_only_what_a_reader_has(notebook):
    "Quirk codes and sections point into the repository (chapter 41) or the papers, never to files outside it."
    text = notebook.read_text()
    for outside in ("reference/neurolm.md", "reference/labram.md", "README §", "reference §"):
        assert outside not in text, f"{notebook.name} cites {outside!r}, which is not in the repository"


def test_every_cited_quirk_is_in_the_glossary():
    "A quirk code a chapter cites (quirk N4, (L5)) has an entry in 41_quirks."
    import re
    defined = set(re.findall(r"\b([NL]\d{1,2})\b", (ROOT / "nbs" / "41_quirks.ipynb").read_text()))
    cited = {}
    for nb in NOTEBOOKS:
        for code in re.findall(r"\bquirks? ([NL]\d{1,2})\b|\(([NL]\d{1,2})\)", nb.read_text()):
            cited.setdefault("".join(code), nb.name)
    missing = {c: where for c, where in cited.items() if c not in defined}
    assert cited and not missing, f"quirk codes cited but not in 41_quirks: {missing}"
