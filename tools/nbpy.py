"""Author notebooks as plain text: convert between `.ipynb` and a percent-format `.py` file.

Developer convenience only (not part of the package). The `.ipynb` in `nbs/` stays the source
of truth; this tool just makes writing and reviewing long notebooks easier.

    python tools/nbpy.py to-nb  draft.py  nbs/02_eeg_io.ipynb
    python tools/nbpy.py to-py  nbs/02_eeg_io.ipynb  draft.py

Format: a line `# %% [markdown]` starts a markdown cell (its lines are written as-is, no `# `
prefix); `# %%` starts a code cell; `# %% tags=["parameters"]` adds cell tags.
"""
import json
import re
import sys

import nbformat

HEADER = re.compile(r'^# %%(?P<md> \[markdown\])?(?:\s+tags=(?P<tags>\[.*\]))?\s*$')


def py_to_nb(text: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}}
    cur = None
    for line in text.splitlines():
        m = HEADER.match(line)
        if m:
            if cur is not None:
                nb.cells.append(cur)
            src_kind = "markdown" if m.group("md") else "code"
            cur = nbformat.v4.new_markdown_cell("") if src_kind == "markdown" else nbformat.v4.new_code_cell("")
            cur.lines = []
            if m.group("tags"):
                cur.metadata["tags"] = json.loads(m.group("tags"))
            continue
        if cur is None:  # text before the first marker is ignored (a file docstring, say)
            continue
        cur.lines.append(line)
    if cur is not None:
        nb.cells.append(cur)
    for c in nb.cells:
        lines = c.pop("lines")
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        c.source = "\n".join(lines)
    for i, c in enumerate(nb.cells):
        c.id = f"c{i:03d}"
    return nb


def nb_to_py(nb) -> str:
    out = []
    for c in nb.cells:
        tags = c.get("metadata", {}).get("tags")
        head = "# %% [markdown]" if c.cell_type == "markdown" else "# %%"
        if tags:
            head += " tags=" + json.dumps(tags)
        out += [head, c.source, ""]
    return "\n".join(out)


if __name__ == "__main__":
    cmd, src, dst = sys.argv[1:4]
    if cmd == "to-nb":
        nbformat.write(py_to_nb(open(src, encoding="utf-8").read()), dst)
    elif cmd == "to-py":
        open(dst, "w", encoding="utf-8").write(nb_to_py(nbformat.read(src, as_version=4)))
    else:
        sys.exit(f"unknown command {cmd!r}: use to-nb or to-py")
