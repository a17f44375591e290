"""Render the executed notebooks of a `make demo` run into a static book (Sphinx + myst-nb + sphinx-book-theme).

    python tools/build_book.py [--run runs/smoke] [--out _book] [--execute] [--jobs auto]

What goes in (nothing is executed unless --execute is given):
- the front page: README.md, then the chapters in the decades' order (0x data ... 9x figures);
- every notebook in nbs/: the executed copy from the run when the notebook is a pipeline stage of it
  (runs/<profile>/<stage>/<notebook>.ipynb, outputs included), otherwise the source notebook without
  outputs (with --execute: run once with papermill at the smoke profile's parameters, standalone, and
  cached in _book/exec/ under a key of the notebook and the package source);
- the run's paper-figure index (runs/<profile>/figures/index.md) with its images and tables;
- on every page: which profile, run folder and git commit produced it.

Writes _book/src/ (the staged Sphinx sources; files are rewritten only when they change, so a rebuild
is incremental), _book/doctrees/ and the site in _book/html/ (open _book/html/index.html).
Sphinx's configuration is book/conf.py. Exit status 2 when the run folder is missing.
"""
from __future__ import annotations

import argparse
import configparser
import copy
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DECADES = {0: "0x · Data", 1: "1x · Tokenizer", 2: "2x · Language model", 3: "3x · Instructions",
           4: "4x · Weights", 5: "5x · Orchestration", 9: "9x · Figures"}
LONG_OUTPUT_LINES = 150  # outputs longer than this are collapsed (shorter long ones scroll, see conf.py)
FIGURES_DOC = "figures/index"


# ----------------------------------------------------------------------------------------------- helpers
def write_if_changed(path: Path, data: bytes | str) -> bool:
    "Write `data` to `path` unless it already holds it (keeps mtimes, so Sphinx rebuilds only what changed)."
    data = data.encode("utf-8") if isinstance(data, str) else data
    if path.exists() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def read_notebook(path: Path) -> dict:
    "A notebook as JSON; retried once, since a colleague's editor may be rewriting the file right now."
    for attempt in range(2):
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if attempt:
                raise SystemExit(f"build_book: {path} is not a readable notebook ({e})") from None
            time.sleep(1.0)
    raise AssertionError


def git_info(folder: Path) -> dict | None:
    "Commit of the checkout holding `folder`, and whether nbs/ or the package differ from it (read-only git)."
    def git(*args):
        return subprocess.run(["git", "--no-optional-locks", "-C", str(folder), *args], capture_output=True,
                              text=True, timeout=30)
    if not folder.is_dir():
        return None
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "nbs", "neurolm_nb")
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = head.stdout.strip()
    return {"commit": commit, "short": commit[:7], "dirty": bool(dirty.stdout.strip())}


def describe_commit(info: dict | None) -> str:
    if not info:
        return "an unknown commit (not a git checkout)"
    return f"commit `{info['short']}`" + (" with uncommitted changes in nbs/ or neurolm_nb/" if info.get("dirty") else "")


def decade_of(stem: str) -> int | None:
    m = re.match(r"(\d)\d", stem)
    return int(m.group(1)) if m else None


def settings_value(key: str, default: str = "") -> str:
    cfg = configparser.ConfigParser(delimiters=["="], interpolation=None)
    cfg.read(ROOT / "settings.ini", encoding="utf-8")
    return cfg["DEFAULT"].get(key, default)


# ------------------------------------------------------------------------------------------ the run
class Run:
    "What a `make demo` run folder holds: its record, executed notebooks, stage figures and commit."

    def __init__(self, folder: Path, nbs: list[Path]):
        self.folder = folder
        record_file = folder / "pipeline.json"
        self.record = json.loads(record_file.read_text(encoding="utf-8")) if record_file.exists() else {}
        self.profile = self.record.get("profile") or folder.name
        self.executed: dict[str, Path] = {}   # notebook file name -> executed notebook
        self.stage_of: dict[str, str] = {}
        self.figures: dict[str, list[Path]] = {}
        self.status: dict[str, str] = {}      # notebook file name -> the stage's status in pipeline.json
        for stage, entry in (self.record.get("stages") or {}).items():
            name = Path(entry.get("notebook") or entry.get("executed_notebook") or "").name
            if not name:
                continue
            # Only what lies inside this run folder (it may have been moved or copied since it ran).
            candidates = [folder / stage / name]
            recorded, root = entry.get("executed_notebook"), self.record.get("run_root")
            if recorded and root and Path(recorded).is_relative_to(root):
                candidates.append(folder / Path(recorded).relative_to(root))
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                continue
            self.executed[name], self.stage_of[name] = found, stage
            self.status[name] = entry.get("status") or "unknown"
            self.figures[name] = [found.parent / f for f in entry.get("figures") or []
                                  if str(f).endswith(".png") and (found.parent / f).is_file()]
        known = {nb.name for nb in nbs}
        for found in sorted(folder.glob("*/*.ipynb")):  # a run without (or with an older) pipeline.json
            if found.name in known and found.name not in self.executed:
                self.executed[found.name], self.stage_of[found.name] = found, found.parent.name
                self.status[found.name] = "not recorded"
                self.figures[found.name] = sorted((found.parent / "figures").glob("*.png"))
        self.commit, self.commit_recorded = self._commit()

    def _commit(self) -> tuple[dict | None, bool]:
        rec = self.record
        for value in (rec.get("git"), rec.get("git_commit"), rec.get("commit"), (rec.get("versions") or {}).get("git")):
            if isinstance(value, str) and value:
                return {"commit": value, "short": value[:7], "dirty": False}, True
            if isinstance(value, dict) and value.get("commit"):
                return {"commit": value["commit"], "short": value["commit"][:7],
                        "dirty": bool(value.get("dirty"))}, True
        # pipeline.json does not record a commit (yet): take the checkout that holds the run's notebooks.
        nbs_dir = Path(rec["nbs_dir"]) if rec.get("nbs_dir") else None
        for folder in ([nbs_dir.parent] if nbs_dir else []) + [self.folder]:
            info = git_info(folder)
            if info:
                return info, False
        return None, False

    def commit_text(self) -> str:
        text = describe_commit(self.commit)
        return text if self.commit_recorded else text + " (of the checkout that ran it, read when the book was built)"


# --------------------------------------------------------------------------------------- notebooks
def _text_lines(output: dict) -> int:
    if output.get("output_type") == "stream":
        text = output.get("text", "")
    else:
        text = (output.get("data") or {}).get("text/plain", "")
    return ("".join(text) if isinstance(text, list) else str(text)).count("\n") + 1


def _has_image(nb: dict) -> bool:
    return any(k.startswith("image/") for c in nb.get("cells", []) for o in c.get("outputs", []) or []
               for k in (o.get("data") or {}))


def _markdown_cell(text: str, cell_id: str) -> dict:
    return {"cell_type": "markdown", "id": cell_id, "metadata": {}, "source": text}


def prepare_notebook(nb: dict, banner: str, keep_outputs: bool, gallery: list[tuple[str, str]] = ()) -> dict:
    "The notebook as the book shows it: nbdev-only cells removed, long outputs collapsed, provenance on top."
    nb = copy.deepcopy(nb)
    meta = nb.setdefault("metadata", {})
    meta.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    meta.setdefault("language_info", {"name": "python"})
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        source = "".join(cell.get("source", "")) if isinstance(cell.get("source"), list) else cell.get("source", "")
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        directives = [l for l in source.splitlines() if l.strip()]
        # `#| default_exp` alone, or nbdev's `#| hide`: plumbing of the package, not part of the chapter.
        if (directives and all(l.lstrip().startswith("#|") for l in directives)) or \
                any(re.match(r"\s*#\|\s*hide\s*$", l) for l in directives):
            tags.append("remove-cell")
        if not keep_outputs:
            cell["outputs"], cell["execution_count"] = [], None
        elif sum(_text_lines(o) for o in cell.get("outputs", [])) > LONG_OUTPUT_LINES:
            tags.append("hide-output")
        if not tags:
            cell["metadata"].pop("tags")
    cells = nb.setdefault("cells", [])
    first = cells[0] if cells else None
    first_src = "".join(first["source"]) if first and isinstance(first.get("source"), list) else (first or {}).get("source", "")
    at = 1 if first and first.get("cell_type") == "markdown" and first_src.lstrip().startswith("# ") else 0
    cells.insert(at, _markdown_cell(banner, "book-provenance"))
    if gallery:
        lines = ["## Figures saved by this stage", "",
                 "This executed notebook shows none of its figures inline; these are the files it saved "
                 "under its `figures/` folder.", ""]
        for rel, name in gallery:
            lines += [f":::{{figure}} {rel}", f":alt: {name}", "", f"`{name}`", ":::", ""]
        cells.append(_markdown_cell("\n".join(lines), "book-gallery"))
    return nb


def execute_cached(nb_path: Path, cache: Path) -> Path:
    "Run a notebook that is not a stage with papermill once (smoke parameters, standalone); cached by content."
    sys.path.insert(0, str(ROOT))
    from neurolm_nb.pipeline import load_profile, resolve_parameters, run_notebook
    digest = hashlib.sha256(nb_path.read_bytes())
    for py in sorted((ROOT / "neurolm_nb").glob("*.py")):
        digest.update(py.read_bytes())
    target = cache / f"{nb_path.stem}-{digest.hexdigest()[:12]}.ipynb"
    if target.exists():
        return target
    work = cache / f".{nb_path.stem}-work"
    shutil.rmtree(work, ignore_errors=True)
    params = resolve_parameters(nb_path, load_profile("smoke"), None, out_dir=work / "out")
    print(f"build_book: executing {nb_path.name} with papermill (cached in {cache})", flush=True)
    seconds = run_notebook(nb_path, work / nb_path.name, params, kernel="python3", cwd=nb_path.parent, timeout=900)
    print(f"build_book:   {nb_path.name} took {seconds:.0f} s", flush=True)
    for old in cache.glob(f"{nb_path.stem}-*.ipynb"):
        old.unlink()
    os.replace(work / nb_path.name, target)
    shutil.rmtree(work, ignore_errors=True)
    return target


# ------------------------------------------------------------------------------------------- pages
def front_page(readme: str, chapters: list[tuple[str, str]], about: str) -> str:
    "README.md, an 'about this book' note under its title, and the table of contents by decade."
    git_url = settings_value("git_url").rstrip("/")
    branch = settings_value("branch", "main")
    stems = {stem for stem, _ in chapters}

    def relink(m):  # README links to files of the repository that are not pages of the book
        target = m.group(2)
        if re.match(r"[a-z]+:|#", target):
            return m.group(0)
        path, _, frag = target.partition("#")
        stem = Path(path).stem
        if path.startswith("nbs/") and path.endswith(".ipynb") and stem in stems:
            return f"{m.group(1)}({stem}.ipynb{'#' + frag if frag else ''})"
        return f"{m.group(1)}({git_url}/blob/{branch}/{target})" if git_url else m.group(0)

    text = re.sub(r"(\]\s?)\(([^)\s]+)\)", relink, readme)
    lines = text.splitlines()
    title = next((i for i, l in enumerate(lines) if l.startswith("# ")), None)
    at = title + 1 if title is not None else 0
    lines[at:at] = ["", about, ""]
    out = ["\n".join(lines), "", "## Chapters", ""]
    groups: dict[int | None, list[str]] = {}
    for stem, _ in chapters:
        groups.setdefault(decade_of(stem), []).append(stem)
    for decade in sorted(groups, key=lambda d: (d is None, d if d is not None else 0)):
        docs = groups[decade]
        caption = DECADES.get(decade, f"{decade}x · Other" if decade is not None else "Other")
        out += ["```{toctree}", f":caption: {caption}", ":maxdepth: 1", ""] + docs
        if decade == 9:
            out.append(FIGURES_DOC)
        out += ["```", ""]
    if 9 not in groups:
        out += ["```{toctree}", f":caption: {DECADES[9]}", ":maxdepth: 1", "", FIGURES_DOC, "```", ""]
    return "\n".join(out) + "\n"


def figures_pages(run: Run, src: Path, about: str) -> dict[Path, bytes | str]:
    "The run's figure index (figures/index.md), its tables as pages, its images shown as a gallery."
    folder = run.folder / "figures"
    index = folder / "index.md"
    files: dict[Path, bytes | str] = {}
    if not index.is_file():
        files[src / "figures" / "index.md"] = (
            "# Figures and tables of the run\n\n" + about + "\n\n"
            f"The run folder `{run.folder}` has no `figures/index.md`: its `figures` stage did not run. "
            f"Run `make demo` (or the `figures` stage of profile `{run.profile}`) and build the book again.\n")
        return files
    text = index.read_text(encoding="utf-8")
    lines = text.splitlines()
    title = next((i for i, l in enumerate(lines) if l.startswith("# ")), None)
    at = title + 1 if title is not None else 0
    lines[at:at] = ["", about, ""]
    linked = set(re.findall(r"\]\(([^)\s#]+)\)", text))
    pngs = sorted(p.name for p in folder.glob("*.png"))
    gallery = ["", "## Gallery", ""]
    for name in pngs:
        gallery += [f":::{{figure}} {name}", f":alt: {name}", f":name: fig-{Path(name).stem}", "",
                    f"`{name}`", ":::", ""]
    files[src / "figures" / "index.md"] = "\n".join(lines + (gallery if pngs else [])) + "\n"
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name == "index.md":
            continue
        if path.suffix == ".md":  # a table of the run: its own page, reached from the index
            files[src / "figures" / path.name] = "---\norphan: true\n---\n\n" + path.read_text(encoding="utf-8")
        elif path.suffix in (".png", ".svg", ".csv", ".json", ".pdf") or path.name in linked:
            files[src / "figures" / path.name] = path.read_bytes()
    return files


# -------------------------------------------------------------------------------------------- build
def build(run_dir: Path, out: Path, execute: bool = False, jobs: str = "auto", quiet: bool = False) -> dict:
    started = time.perf_counter()
    nbs = sorted((ROOT / "nbs").glob("*.ipynb"))
    if not run_dir.is_dir():
        raise FileNotFoundError(run_dir)
    run = Run(run_dir, nbs)
    here = git_info(ROOT)
    src, html_dir, doctrees = out / "src", out / "html", out / "doctrees"
    built = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    finished = run.record.get("finished") or "unknown"
    status = run.record.get("status") or "unknown"

    files: dict[Path, bytes | str] = {}
    chapters: list[tuple[str, str]] = []   # (doc name, how it was rendered)
    executed_here: dict[Path, Path] = {}
    if execute:  # two kernels at a time (each its own process): the 2-core budget of a CI machine
        from concurrent.futures import ThreadPoolExecutor
        todo = [p for p in nbs if p.name not in run.executed]
        with ThreadPoolExecutor(max_workers=2) as pool:
            executed_here = dict(zip(todo, pool.map(lambda p: execute_cached(p, out / "exec"), todo)))
    for nb_path in nbs:
        stem = nb_path.stem
        if nb_path.name in run.executed:
            executed = run.executed[nb_path.name]
            stage = run.stage_of[nb_path.name]
            nb = read_notebook(executed)
            banner = (f":::{{note}}\n:class: neurolm-provenance\nExecuted by `make demo`: profile "
                      f"**`{run.profile}`**, stage `{stage}` (status {run.status[nb_path.name]}), {run.commit_text()}; "
                      f"run finished {finished}. Executed notebook: `{executed}`.\n:::")
            gallery = []
            if not _has_image(nb):
                for fig in run.figures.get(nb_path.name, []):
                    rel = Path("_run") / stage / fig.relative_to(executed.parent)
                    files[src / rel] = fig.read_bytes()
                    gallery.append((rel.as_posix(), fig.relative_to(executed.parent).as_posix()))
            files[src / f"{stem}.ipynb"] = json.dumps(prepare_notebook(nb, banner, True, gallery), indent=1)
            chapters.append((stem, "executed"))
        elif execute:
            executed = executed_here[nb_path]
            banner = (f":::{{note}}\n:class: neurolm-provenance\nRun `{run.profile}` holds no executed copy: executed for "
                      f"the book with papermill (smoke parameters, standalone) from `nbs/{nb_path.name}` at "
                      f"{describe_commit(here)}.\n:::")
            files[src / f"{stem}.ipynb"] = json.dumps(prepare_notebook(read_notebook(executed), banner, True), indent=1)
            chapters.append((stem, "executed for the book"))
        else:
            why = ("not a pipeline stage" if nb_path.name not in _stage_notebooks(run)
                   else f"a stage that run `{run.profile}` did not execute")
            banner = (f":::{{note}}\n:class: neurolm-provenance\nSource notebook `nbs/{nb_path.name}` at "
                      f"{describe_commit(here)}, shown without outputs: it is {why}, so run `{run.profile}` "
                      f"holds no executed copy. Run it in `make lab`, or build with `make book BOOK_EXECUTE=1`.\n:::")
            files[src / f"{stem}.ipynb"] = json.dumps(prepare_notebook(read_notebook(nb_path), banner, False), indent=1)
            chapters.append((stem, "source"))

    about_run = (f"run **`{run.profile}`** (`{run.folder}`), {run.commit_text()}; "
                 f"finished {finished}, status {status}.")
    n_run = sum(1 for _, how in chapters if how == "executed")
    n_book = sum(1 for _, how in chapters if how == "executed for the book")
    rest = (f"{n_book} more were executed for the book with papermill from nbs/ at {describe_commit(here)}; "
            if n_book else "")
    about = (f":::{{note}}\n:class: neurolm-provenance\nThis book renders {about_run} {n_run} of its "
             f"{len(chapters)} chapters are that run's executed notebooks (figures and outputs included); {rest}"
             f"the others are source notebooks from nbs/ at {describe_commit(here)}, shown without outputs "
             f"(not stages of the run). Built {built} by `make book`.\n:::")
    files[src / "index.md"] = front_page((ROOT / "README.md").read_text(encoding="utf-8"), chapters, about)
    files.update(figures_pages(run, src, f":::{{note}}\n:class: neurolm-provenance\nFrom {about_run}\n:::"))

    commit = run.commit["short"] if run.commit else "unknown"
    meta = {
        "title": f"neurolm_nb · {run.profile}",
        "announcement": html.escape(f"Run {run.profile} · commit {commit}"
                                    + ("+changes" if run.commit and run.commit.get("dirty") else "")
                                    + f" · {run.folder.name if run.folder.name != run.profile else 'runs/' + run.profile}"),
        "footer": html.escape(f"Rendered from run {run.profile} ({run.folder}) at commit {commit}; "
                              f"pages from nbs/ at commit {here['short'] if here else 'unknown'}."),
    }
    files[out / "book_meta.json"] = json.dumps(meta, indent=1, sort_keys=True)

    changed = sum(write_if_changed(p, d) for p, d in files.items())
    wanted = {p.resolve() for p in files}
    for stale in [p for p in src.rglob("*") if p.is_file() and p.resolve() not in wanted]:
        stale.unlink()  # a notebook renamed or removed since the last build
    staged_s = time.perf_counter() - started

    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-c", str(ROOT / "book"), str(src), str(html_dir),
           "-d", str(doctrees), "-j", str(jobs), "--keep-going", "-q"]
    env = {**os.environ, "NEUROLM_BOOK_META": str(out / "book_meta.json"), "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    proc = subprocess.run(cmd, env=env)
    if proc.returncode:
        raise SystemExit(f"build_book: sphinx-build failed (exit {proc.returncode}): {' '.join(cmd)}")
    seconds = time.perf_counter() - started
    pages = sorted(p for p in html_dir.rglob("*.html") if "_static" not in p.parts)
    images = [p for p in html_dir.rglob("*") if p.suffix.lower() in (".png", ".svg", ".jpg", ".jpeg", ".gif")
              and "_static" not in p.parts]
    size = sum(p.stat().st_size for p in html_dir.rglob("*") if p.is_file())
    summary = {"site": str(html_dir), "run": str(run.folder), "profile": run.profile,
               "commit": run.commit["commit"] if run.commit else None, "seconds": round(seconds, 1),
               "staging_seconds": round(staged_s, 1), "files_rewritten": changed, "pages": len(pages),
               "images": len(images), "bytes": size,
               "chapters": {stem: how for stem, how in chapters}}
    (out / "build.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    if not quiet:
        kinds = {how: sum(1 for _, h in chapters if h == how) for _, how in chapters}
        print(f"book: {len(pages)} pages, {len(images)} image files, {size / 1e6:.1f} MB in {html_dir} "
              f"({seconds:.0f} s; chapters: " + ", ".join(f"{n} {how}" for how, n in kinds.items())
              + f"; run {run.folder})")
        print(f"open {html_dir / 'index.html'}")
    return summary


def _stage_notebooks(run: Run) -> set[str]:
    "File names of the pipeline's stage notebooks (read from the package without importing it)."
    pipeline = ROOT / "neurolm_nb" / "pipeline.py"
    names = set(run.stage_of)
    if pipeline.exists():
        block = re.search(r"^STAGES[^=]*=\s*\{(.*?)^\}", pipeline.read_text(encoding="utf-8"), re.S | re.M)
        if block:
            names |= set(re.findall(r":\s*\"([^\"]+\.ipynb)\"", block.group(1)))
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/smoke", help="run folder of `make demo` (default runs/smoke)")
    ap.add_argument("--out", default="_book", help="output folder (default _book; the site is <out>/html)")
    ap.add_argument("--execute", action="store_true",
                    help="execute notebooks that are not stages of the run with papermill (cached in <out>/exec)")
    ap.add_argument("--jobs", default="auto", help="sphinx-build -j (default auto)")
    args = ap.parse_args(argv)
    run_dir = (ROOT / args.run) if not Path(args.run).is_absolute() else Path(args.run)
    out = (ROOT / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    if not run_dir.is_dir():
        print(f"build_book: no run folder {args.run}: run `make demo` first "
              f"(or point BOOK_RUN=runs/<profile> at a finished run)", file=sys.stderr)
        return 2
    build(run_dir.resolve(), out.resolve(), execute=args.execute, jobs=args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
