"""Tests of `neurolm_nb.core` (nbs/00_core.ipynb) for operator-grade runs: checkpoints never run code from a
file (`weights_only=True`), random-generator snapshots are plain data that restore exactly, demo folders start
empty, and a child process dies with its parent (or exits at once when the parent is already gone)."""
import io
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from neurolm_nb.core import (PARENT_PID_ENV, UnsafeCheckpointError, fresh_dir, load_checkpoint, rng_state,
                             save_checkpoint, seed_everything, set_rng_state)
from neurolm_nb.neurolm import load_neurolm
from neurolm_nb.vq import load_tokenizer


class MakesAMarker:
    "Unpickling this calls os.system (touch MARKER): the classic crafted-checkpoint attack."
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture
def crafted(tmp_path) -> tuple[Path, Path]:
    "A checkpoint shaped like ours (format, config, model) that would create `marker` when unpickled."
    marker = tmp_path / "marker"
    path = tmp_path / "crafted.pt"
    save_checkpoint({"format": "neurolm_nb.neurolm/1", "config": {}, "model": {"w": torch.zeros(2)},
                     "payload": MakesAMarker(marker)}, path)
    return path, marker


def test_the_crafted_file_really_runs_code_when_fully_unpickled(crafted):
    "The control: without weights_only the file does run its code, so the refusals below mean something."
    path, marker = crafted
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("loader", [load_checkpoint, load_tokenizer, load_neurolm],
                         ids=["core.load_checkpoint", "vq.load_tokenizer", "model.load_neurolm"])
def test_a_crafted_checkpoint_is_refused_and_runs_nothing(crafted, loader):
    path, marker = crafted
    with pytest.raises(UnsafeCheckpointError) as info:
        loader(path)
    message = str(info.value)
    assert str(path) in message
    assert "posix.system" in message  # what the file asked for
    assert "neurolm_nb.convert.read_checkpoint(path, trusted=True)" in message
    assert not marker.exists()


def test_a_truncated_checkpoint_is_named(tmp_path):
    path = save_checkpoint({"w": torch.arange(1000)}, tmp_path / "ok.pt")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RuntimeError, match="ok.pt could not be read"):
        load_checkpoint(path)


def _draws() -> tuple:
    return (random.random(), np.random.rand(), np.random.randn(), torch.rand(3).tolist())


def test_rng_snapshot_is_plain_data_and_restores_exactly():
    seed_everything(11)
    np.random.randn()  # leaves a cached Gaussian in NumPy's state: it must come back too
    snap = rng_state()
    expected = _draws()
    buf = io.BytesIO()
    torch.save({"rng": [snap, snap]}, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["rng"][1]
    seed_everything(99)
    set_rng_state(loaded)
    assert _draws() == expected


def test_rng_snapshots_of_older_checkpoints_still_restore():
    "Before weights_only, the NumPy state was stored as NumPy returns it (a uint32 array)."
    seed_everything(3)
    old = {**rng_state(), "numpy": np.random.get_state()}
    expected = _draws()
    set_rng_state(old)
    assert _draws() == expected


def test_fresh_dir_empties_and_refuses_roots(tmp_path):
    d = fresh_dir(tmp_path / "demo")
    (d / "sub").mkdir()
    (d / "sub" / "old.pt").write_bytes(b"x")
    assert list(fresh_dir(tmp_path / "demo").iterdir()) == []
    for bad in ("/", Path.home()):
        with pytest.raises(ValueError, match="refuses"):
            fresh_dir(bad)


def test_a_child_whose_parent_is_already_gone_exits_at_once():
    code = "from neurolm_nb.core import die_with_parent; die_with_parent(); print('alive')"
    gone = subprocess.run([sys.executable, "-c", code], env={**os.environ, PARENT_PID_ENV: "1"},
                          capture_output=True, text=True, timeout=120)
    assert (gone.returncode, gone.stdout) == (1, "")
    assert "its parent 1 is gone" in gone.stderr
    ok = subprocess.run([sys.executable, "-c", code], env={**os.environ, PARENT_PID_ENV: str(os.getpid())},
                        capture_output=True, text=True, timeout=120)
    assert (ok.returncode, ok.stdout) == (0, "alive\n"), ok.stderr


def test_publish_folder_swaps_in_the_new_folder_and_leaves_nothing_behind(tmp_path):
    from neurolm_nb.core import publish_folder
    target = tmp_path / "built"
    for text in ("old", "new"):
        staging = tmp_path / f".built.building-{text}"
        staging.mkdir()
        (staging / "x.txt").write_text(text)
        assert publish_folder(staging, target) == target
        assert not staging.exists()
    assert (target / "x.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["built"]  # the parked old copy is gone


def test_launch_files_refuse_missing_parts_and_unknown_keys(tmp_path):
    from dataclasses import dataclass
    from neurolm_nb.core import read_launch_config, write_launch_config

    @dataclass
    class A:
        x: int = 1

    path = write_launch_config(tmp_path / "l.json", setup=A(2), train=A())
    assert read_launch_config(path, setup=A, train=A) == (A(2), A())
    with pytest.raises(KeyError, match=r"holds exactly \['setup'\], found \['setup', 'train'\]"):
        read_launch_config(path, setup=A)
    path.write_text('{"setup": {"x": 1, "y": 2}, "train": {}}')
    with pytest.raises(KeyError, match=r"setup has unknown keys \['y'\]"):
        read_launch_config(path, setup=A, train=A)


def test_one_main_guard_convention_and_in_notebook_outside_a_kernel():
    "Every entry point is guarded the same way, and in_notebook() is False in a script even with IPython imported."
    import re
    import subprocess
    import sys
    from pathlib import Path
    pkg = Path(__file__).resolve().parent.parent / "neurolm_nb"
    guards = {p.name: re.findall(r"^if __name__ == .*$", p.read_text(), re.M) for p in pkg.glob("*.py")}
    used = {g for gs in guards.values() for g in gs}
    assert used == {'if __name__ == "__main__" and not in_notebook():'}, guards
    code = "import IPython; from neurolm_nb.core import in_notebook; print(in_notebook())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
