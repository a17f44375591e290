"""The build path stays light: no PyTorch, numba or matplotlib in a build process or its workers (issue 15,
"peak memory of the Workload build <= the official recipe's"; neurolm_nb.shards, nbs/03b_shards.ipynb).

Everything runs in fresh interpreters (a test process has torch loaded already) on real EEGMAT recordings, with
real loky worker processes. The worker check asks the builder's own executor, the one the build just used, what
its processes hold.
"""
import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "numba", "matplotlib", "sklearn", "umap")

# A build of the first two EEGMAT files with workers=1, then workers=2, in this fresh process; then each worker of
# the 2-worker executor the build used reports its pid and which HEAVY modules it holds (a blocked module, a None
# entry in sys.modules, is not loaded). One JSON line.
PROBE = r"""
import json, sys, time
from pathlib import Path
HEAVY = %r
loaded = lambda: sorted(m for m in HEAVY if sys.modules.get(m) is not None)
import neurolm_nb.shards as shards
out = {"after_import": loaded()}
raw, dest = Path(sys.argv[1]), Path(sys.argv[2])
for w in (1, 2):
    r = shards.build_dataset("workload", raw, dest / f"w{w}", max_files=2, workers=w, progress=False)
    out[f"build_{w}"] = {"loaded": loaded(), "backend": r.backend, "n_windows": sum(r.windows.values()), "peak_rss_mb": r.peak_rss_mb}
def report():
    import os, sys, time
    time.sleep(0.2)  # keep this worker busy so that the other one takes the next task
    return os.getpid(), sorted(m for m in %r if sys.modules.get(m) is not None), "mne" in sys.modules
pool = shards._BUILDER_POOLS[2]
out["workers"] = [f.result() for f in [pool.submit(report) for _ in range(6)]]
out["main_pid"] = __import__("os").getpid()
wd = shards.WindowDataset(dest / "w1", "train")  # indexing a built dataset: still no torch
out["dataset"] = {"n": len(wd), "loaded": loaded()}
item = wd[0]  # reading an item imports torch and returns tensors
out["item"] = {"loaded": loaded(), "x": [type(item["x"]).__name__, str(item["x"].dtype), list(item["x"].shape)],
               "label": str(item["label"].dtype), "channel_index": str(item["channel_index"].dtype)}
print(json.dumps(out))
""" % (HEAVY, HEAVY)


@pytest.fixture(scope="module")
def probe(eegmat_dir, tmp_path_factory):
    dest = tmp_path_factory.mktemp("lean_build")
    proc = subprocess.run([sys.executable, "-c", PROBE, str(eegmat_dir), str(dest)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_the_builder_loads_none_of_torch_numba_matplotlib(probe):
    assert probe["after_import"] == []


@pytest.mark.parametrize("workers", [1, 2])
def test_a_real_build_leaves_the_build_process_lean(probe, workers):
    run = probe[f"build_{workers}"]
    assert run["backend"] == ("in-process" if workers == 1 else "loky")
    assert run["n_windows"] > 0  # it did build something
    assert run["loaded"] == [], f"the build process imported {run['loaded']}"
    assert run["peak_rss_mb"]["parent"] > 0


def test_the_build_workers_hold_no_torch_numba_matplotlib(probe):
    pids = {pid for pid, _, _ in probe["workers"]}
    assert len(pids) == 2 and probe["main_pid"] not in pids  # both workers of the 2-worker executor answered
    for pid, loaded, has_mne in probe["workers"]:
        assert has_mne, f"worker {pid} never read a recording (no MNE loaded): not the build's worker"
        assert loaded == [], f"build worker {pid} imported {loaded}"


def test_numba_stays_importable_after_an_in_process_build(eegmat_dir, tmp_path):
    "The in-process build hides numba from MNE only while MNE loads its helper: the user's own `import numba` works."
    pytest.importorskip("numba")
    code = ("import sys; from neurolm_nb.shards import build_dataset; "
            "build_dataset('workload', sys.argv[1], sys.argv[2], max_files=1, workers=1, progress=False); "
            "import mne._numba, numba; print(numba.__version__, mne._numba.has_numba)")
    proc = subprocess.run([sys.executable, "-c", code, str(eegmat_dir), str(tmp_path / "one")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    version, has_numba = proc.stdout.split()[-2:]
    assert version[0].isdigit() and has_numba == "False"


def test_window_dataset_needs_torch_only_to_read_an_item(probe):
    assert probe["dataset"]["n"] > 0 and probe["dataset"]["loaded"] == []
    assert "torch" in probe["item"]["loaded"]
    assert probe["item"]["x"] == ["Tensor", "torch.float32", [19, 800]]
    assert (probe["item"]["label"], probe["item"]["channel_index"]) == ("torch.int64", "torch.int64")
