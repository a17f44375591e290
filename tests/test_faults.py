"""Operator faults of a dataset build (neurolm_nb.shards, nbs/03b_shards.ipynb): a full disk, a read-only or
file-typed output path and a killed build each end with one clear line and leave no staging folder behind.

Real faults only: a real tmpfs that is full or mounted read-only (needs root or CAP_SYS_ADMIN; the test is
skipped with the reason otherwise), a real file in the way, a real SIGKILL of a real build process.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neurolm_nb.core import project_root
from neurolm_nb.datasets import DatasetError
from neurolm_nb.shards import INDEX_FILE, OutputError, build_dataset, remove_stale_builds, samples_dir_for, write_shard

ROOT = project_root(Path(__file__).parent)


def workload_samples() -> Path:
    d = samples_dir_for("workload", ROOT / "data_samples")
    if not d.is_dir():
        pytest.skip("data_samples/eeg is missing: run `python -m neurolm_nb.shards make-samples data_samples`")
    return d


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "2m", read_only: bool = False):
    "A real tmpfs of `size` mounted on `path` (read-only if asked); skips the test where mounting is not allowed."
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True,
                              text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no `mount` command here: the full-disk / read-only tests need it")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True, timeout=30)


def cli_build(raw: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neurolm_nb.shards", "build", "workload", str(raw), str(out), *extra],
                          capture_output=True, text=True, timeout=300)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".building-" in p.name or ".old-" in p.name or p.suffix == ".tmp")


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])  # not -11 (segfault), not a traceback's 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ---------------------------------------------------------------- full disk

def test_full_disk_ends_with_one_line_and_no_staging_folder(tmp_path):
    with tmpfs(tmp_path / "disk", "2m") as disk:
        proc = cli_build(workload_samples(), disk / "out")
        line = assert_one_line_error(proc, "no space left", str(disk / "out"), "MB are free")
        assert "Traceback" not in proc.stderr and "Segmentation" not in proc.stderr, line
        assert sorted(p.name for p in disk.iterdir()) == []  # neither out nor a staging folder
        with pytest.raises(OutputError, match="no space left") as e:  # the library raises the same, errno ENOSPC
            build_dataset("workload", workload_samples(), disk / "out")
        assert e.value.errno == 28 and "\n" not in str(e.value)
        assert sorted(p.name for p in disk.iterdir()) == []


def test_disk_filling_up_mid_write_is_an_error_not_a_crash(tmp_path):
    "With the free-space check switched off, the kernel's own ENOSPC arrives mid-write: h5py must not be the one to see it."
    with tmpfs(tmp_path / "disk", "1m") as disk:
        script = f"""
import numpy as np, neurolm_nb.shards as d
d._SPACE_MARGIN = -10**15  # the pre-check always passes: the write itself meets the full disk
try:
    d.write_shard({str(disk / 'train-00000.h5')!r}, np.ones((40, 19, 800), np.float32), [0] * 40, ['s'] * 40,
                  ['r'] * 40, [0.0] * 40, ['FP1'] * 19, 200.0, 'workload', 'train')
except d.OutputError as e:
    print('OutputError', e.errno, e)
"""
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])  # before: -11, a segmentation fault
        assert proc.stdout.startswith("OutputError 28 cannot write") and "train-00000.h5" in proc.stdout, proc.stdout
        assert "no space left on the device" in proc.stdout
        assert sorted(p.name for p in disk.iterdir()) == []  # the temporary file is gone too


# ---------------------------------------------------------------- read-only and file-typed output paths

def test_read_only_output_ends_with_one_line(tmp_path):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        proc = cli_build(workload_samples(), ro / "out")
        assert_one_line_error(proc, "read-only file system", str(ro / "out"), "choose another out_dir")
        assert sorted(p.name for p in ro.iterdir()) == []
        with pytest.raises(OutputError, match="read-only file system"):
            build_dataset("workload", workload_samples(), ro / "out")


def test_file_typed_output_path_ends_with_one_line(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    for out in (blocker, blocker / "sub" / "out"):
        proc = cli_build(workload_samples(), out)
        assert_one_line_error(proc, f"{blocker} is a file, not a folder")
        with pytest.raises(OutputError, match="is a file, not a folder"):
            build_dataset("workload", workload_samples(), out)
    assert blocker.read_text() == "a file, not a folder"
    assert leftovers(tmp_path) == []


def test_bad_input_on_the_command_line_is_one_line_too(tmp_path):
    proc = cli_build(tmp_path / "nowhere", tmp_path / "out")
    assert_one_line_error(proc, "nowhere", "is not a folder")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "Subject01_1.edf").write_bytes(b"0" * 300)
    assert_one_line_error(cli_build(tmp_path / "broken", tmp_path / "out"), "every one of the 1 workload recordings")
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- killed builds

def test_a_later_build_removes_what_a_killed_build_left(tmp_path):
    raw, out = workload_samples(), tmp_path / "out"
    first = build_dataset("workload", raw, out)
    index = (out / INDEX_FILE).read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "neurolm_nb.shards", "build", "workload", str(raw), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not [p for p in tmp_path.iterdir() if p.name.startswith(".out.building-")]:
            assert proc.poll() is None, "the build ended before it could be killed"
            assert time.time() < deadline, "the build never created its staging folder"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    stale = leftovers(tmp_path)
    assert len(stale) == 1 and stale[0].startswith(".out.building-") and f"-{proc.pid}-" in stale[0]
    assert (out / INDEX_FILE).read_bytes() == index  # the previous build is untouched
    again = build_dataset("workload", raw, out)
    assert again.stale_builds == [f"{stale[0]} removed"]
    assert leftovers(tmp_path) == [] and again.n_built == first.n_built
    assert json.loads((out / "build_report.json").read_text())["stale_builds"] == again.stale_builds


def test_staging_of_a_running_build_is_left_alone_and_an_orphaned_build_is_restored(tmp_path):
    from neurolm_nb.shards import _host
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = tmp_path / f".out.building-{_host()}-{sleeper.pid}-abcdefgh"
        running.mkdir()
        assert remove_stale_builds(tmp_path / "out") == [] and running.exists()  # its process still runs
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_stale_builds(tmp_path / "out") == [f"{running.name} removed"] and not running.exists()
    # killed between the two renames that swap a build in: out is gone, the previous build sits in .old-...
    build_dataset("workload", workload_samples(), tmp_path / "out")
    index = (tmp_path / "out" / INDEX_FILE).read_bytes()
    orphan = tmp_path / f".out.old-{_host()}-{sleeper.pid}-123"
    os.replace(tmp_path / "out", orphan)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "Subject01_1.edf").write_bytes(b"0" * 300)
    with pytest.raises(DatasetError, match="every one"):  # this build fails, but first it puts the old one back
        build_dataset("workload", tmp_path / "broken", tmp_path / "out")
    assert (tmp_path / "out" / INDEX_FILE).read_bytes() == index and leftovers(tmp_path) == []
