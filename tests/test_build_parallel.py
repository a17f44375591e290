"""Builds on every core, on a Dask cluster, and builds that survive being killed (neurolm_nb.shards,
nbs/03b_shards.ipynb, issue 15).

Real processes only: loky worker processes, a real `distributed.LocalCluster` with two worker processes, a real
SIGKILL / SIGINT of a real build process. "The same output" means the same bytes (`build_digest`: every shard,
the index and the manifest byte for byte, the report outside `RUN_FIELDS`), never a tolerance.
"""
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest

from neurolm_nb.core import project_root
from neurolm_nb.datasets import WorkloadSpec
from neurolm_nb.shards import (SAMPLE_FOLDERS, INDEX_FILE, REPORT_FILE, RUN_FIELDS, BuildJournal, ShardWriter, _host,
                               build_dataset, build_digest, plan_build, process_recording, samples_dir_for, worker_pool)

ROOT = project_root(Path(__file__).parent)


def sample_dir(name: str) -> Path:
    d = samples_dir_for(name, ROOT / "data_samples")
    if not d.is_dir():
        pytest.skip("data_samples/eeg is missing: run `python -m neurolm_nb.shards make-samples data_samples`")
    return d


def report_without_run_fields(out: Path) -> dict:
    return {k: v for k, v in json.loads((out / REPORT_FILE).read_text()).items() if k not in (*RUN_FIELDS, "out_dir")}


def staging_folders(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.building-*"))


def cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "neurolm_nb.shards", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kw)


def wait_for_records(parent: Path, name: str, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while sum(len(list(s.glob("journal/0*.json"))) for s in staging_folders(parent, name)) < n:
        assert proc.poll() is None, f"the build ended before {n} recordings were journalled: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"the build did not journal {n} recordings in {timeout} s"
        time.sleep(0.005)


def gone(pids: list[int], timeout: float = 60) -> bool:
    "Whether every process exited (a zombie that nobody reaps counts as exited) within `timeout`."
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return True
        time.sleep(0.1)
    return False


# ---------------------------------------------------------------- every core

@pytest.mark.parametrize("name", sorted(SAMPLE_FOLDERS))  # every dataset with a sample layout
def test_two_workers_build_the_same_bytes_as_one(name, tmp_path):
    raw = sample_dir(name)
    one = build_dataset(name, raw, tmp_path / "one", workers=1, shard_mb=0.3)   # small shards: written mid-build
    two = build_dataset(name, raw, tmp_path / "two", workers=2, shard_mb=0.3)
    assert build_digest(tmp_path / "one") == build_digest(tmp_path / "two")
    assert report_without_run_fields(tmp_path / "one") == report_without_run_fields(tmp_path / "two")
    assert (one.backend, one.workers) == ("in-process", 1)
    assert (two.backend, two.workers) == (("loky", 2) if one.n_found > 1 else ("in-process", 1))
    assert len(one.shards) >= 3 and one.eeg_hours == two.eeg_hours > 0


def test_real_eegmat_on_two_workers_equals_one_worker(eegmat_dir, tmp_path):
    one = build_dataset("workload", eegmat_dir, tmp_path / "one", workers=1, shard_mb=8)
    two = build_dataset("workload", eegmat_dir, tmp_path / "two", workers=2, shard_mb=8)
    assert build_digest(tmp_path / "one") == build_digest(tmp_path / "two")
    assert one.n_built == two.n_built == 40 and len(one.shards) > 3
    # EEG hours from the EDF headers: data records x record duration (about 20 subjects x (3 + 1) minutes)
    heads = [p.read_bytes()[:256] for p in sorted(eegmat_dir.glob("Subject*_*.edf"))]
    assert one.eeg_hours == round(sum(int(h[236:244]) * float(h[244:252]) for h in heads) / 3600, 6)
    assert 1.3 < one.eeg_hours < 1.4
    for r in (one, two):
        saved = json.loads((Path(r.out_dir) / REPORT_FILE).read_text())
        assert saved["eeg_hours_per_s"] == r.eeg_hours_per_s > 0 and saved["workers"] == r.workers
        assert saved["peak_rss_mb"]["parent"] > 50 and saved["peak_rss_mb"]["workers"] > 50
    assert two.workers == 2 and two.backend == "loky"
    # a worker process holds one recording, not the dataset: far below the parent, which holds torch and MNE too
    assert two.peak_rss_mb["workers"] < 1500


def test_default_workers_are_every_core_for_real_work_and_one_for_a_few_mb(eegmat_dir, tmp_path):
    from neurolm_nb.shards import default_workers, usable_cores
    entries = WorkloadSpec().discover(eegmat_dir)[0]
    assert default_workers(entries) == usable_cores() == len(os.sched_getaffinity(0))  # 99 MB of EDF
    assert default_workers(WorkloadSpec().discover(sample_dir("workload"))[0]) == 1     # 3 MB: here is faster
    r = build_dataset("workload", eegmat_dir, tmp_path / "out", max_files=12)            # ~30 MB
    assert r.workers == min(usable_cores(), 12) and r.backend == ("loky" if usable_cores() > 1 else "in-process")


def test_worker_processes_never_import_numba_and_the_modules_import_lean():
    with worker_pool(2) as pool:
        pids = {pool.submit(os.getpid).result() for _ in range(4)}
        in_worker = pool.submit(eval, "__import__('sys').modules.get('numba', 'absent')").result()
    assert os.getpid() not in pids and in_worker is None  # blocked before MNE could import it
    probe = ("import sys, neurolm_nb.shards, neurolm_nb.datasets, neurolm_nb.io; "
             "print(sorted(m for m in ('umap', 'numba', 'llvmlite', 'pynndescent', 'mne') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# ---------------------------------------------------------------- every machine

def test_dask_local_cluster_builds_the_same_bytes_as_one_worker(tmp_path):
    distributed = pytest.importorskip("distributed")
    raw = sample_dir("pretrain")  # 26 recordings of six layouts
    build_dataset("pretrain", raw, tmp_path / "one", workers=1, shard_mb=0.3)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            by_client = build_dataset("pretrain", raw, tmp_path / "client", scheduler=client, shard_mb=0.3)
            assert client.status == "running"  # a Client we were given stays open
        by_address = build_dataset("pretrain", raw, tmp_path / "address", scheduler=cluster.scheduler_address, shard_mb=0.3)
    for out, r in (("client", by_client), ("address", by_address)):
        assert build_digest(tmp_path / out) == build_digest(tmp_path / "one"), out
        assert r.backend.startswith("dask tcp://") and r.workers == 2


# ---------------------------------------------------------------- resumable

def test_sigkill_mid_build_then_rerun_gives_the_same_bytes_and_reuses_the_journal(eegmat_dir, tmp_path):
    reference = build_dataset("workload", eegmat_dir, tmp_path / "reference", workers=1, shard_mb=4, max_files=24)
    out = tmp_path / "out"
    victim = cli("build", "workload", str(eegmat_dir), str(out), "--workers", "2", "--shard-mb", "4", "--max-files", "24")
    try:
        wait_for_records(tmp_path, "out", 8, victim)
        workers = [c.pid for c in psutil.Process(victim.pid).children(recursive=True)]
        victim.send_signal(signal.SIGKILL)
    finally:
        victim.wait(timeout=60)
        victim.stderr.close()
    assert victim.returncode == -signal.SIGKILL
    [staging] = staging_folders(tmp_path, "out")
    assert f"-{victim.pid}-" in staging.name and not out.exists()
    done = BuildJournal.count(staging, plan_build("workload", eegmat_dir, out, shard_mb=4, max_files=24).key)
    assert 8 <= done < 24, done
    assert (staging / "journal" / "writer.json").exists()  # shards had been written: the writer checkpoint too
    assert workers and gone(workers), "the killed build's worker processes outlived it"
    again = build_dataset("workload", eegmat_dir, out, workers=2, shard_mb=4, max_files=24)
    assert build_digest(out) == build_digest(tmp_path / "reference")
    assert again.reused >= done and again.resumed_from == staging.name and again.stale_builds == []
    saved = json.loads((out / REPORT_FILE).read_text())
    assert saved["reused"] == again.reused and saved["resumed_from"] == staging.name
    assert staging_folders(tmp_path, "out") == [] and not (out / "journal").exists() and not (out / "parts").exists()
    assert reference.reused == 0 and reference.resumed_from is None


def test_ctrl_c_keeps_the_journal_and_the_next_build_continues(eegmat_dir, tmp_path):
    out = tmp_path / "out"
    # A shell that starts jobs in the background (CI's may) passes SIGINT on as ignored, and Python then
    # installs no KeyboardInterrupt handler: give the build the default disposition, as a terminal would.
    victim = cli("build", "workload", str(eegmat_dir), str(out), "--workers", "1", "--max-files", "16",
                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for_records(tmp_path, "out", 3, victim)
        victim.send_signal(signal.SIGINT)
        _, err = victim.communicate(timeout=120)
    finally:
        victim.kill()
    assert victim.returncode != 0 and "interrupted (KeyboardInterrupt)" in err, err[-2000:]
    [staging] = staging_folders(tmp_path, "out")
    again = build_dataset("workload", eegmat_dir, out, workers=1, max_files=16)
    build_dataset("workload", eegmat_dir, tmp_path / "fresh", workers=1, max_files=16)
    assert again.reused >= 3 and again.resumed_from == staging.name
    assert build_digest(out) == build_digest(tmp_path / "fresh")


def test_a_journal_of_other_inputs_is_removed_not_resumed(tmp_path):
    raw, out = sample_dir("workload"), tmp_path / "out"
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    entries = WorkloadSpec().discover(raw)[0]
    for seed, tag in ((1, "aaaa1111"), (0, "bbbb2222")):  # a dead build with seed 1, and one of these very inputs
        journal = BuildJournal(tmp_path / f".out.building-{_host()}-{ended.pid}-{tag}",
                               plan_build("workload", raw, out, seed=seed).key).start()
        for i in range(3):
            journal.record(i, process_recording(WorkloadSpec(), entries[i]))
    r = build_dataset("workload", raw, out, seed=0, workers=1)
    assert r.resumed_from == f".out.building-{_host()}-{ended.pid}-bbbb2222" and r.reused == 3
    assert r.stale_builds == [f".out.building-{_host()}-{ended.pid}-aaaa1111 removed"]
    fresh = build_dataset("workload", raw, tmp_path / "fresh", seed=0, workers=1)
    assert build_digest(out) == build_digest(tmp_path / "fresh") and fresh.reused == 0
    # resume=False: a journal of the same inputs is not used (and, its process being dead, it is cleaned up)
    journal = BuildJournal(tmp_path / f".out.building-{_host()}-{ended.pid}-cccc3333", plan_build("workload", raw, out).key).start()
    journal.record(0, process_recording(WorkloadSpec(), entries[0]))
    again = build_dataset("workload", raw, out, workers=1, resume=False)
    assert again.reused == 0 and again.stale_builds == [f".out.building-{_host()}-{ended.pid}-cccc3333 removed"]


# ---------------------------------------------------------------- bounded memory, visible progress, measured

def test_shard_writer_keeps_waiting_windows_on_disk(tmp_path):
    parts, rng = tmp_path / "parts", np.random.default_rng(0)
    parts.mkdir()
    blocks = [rng.normal(size=(16, 19, 800)).astype(np.float32) for _ in range(20)]  # 20 x 0.97 MB
    for i, b in enumerate(blocks):
        np.save(parts / f"{i}.npy", b)
    writer = ShardWriter(tmp_path, "toy", 200.0, shard_mb=64)  # everything waits for one shard
    tracemalloc.start()
    for i in range(20):
        writer.add("train", ["FP1"] * 19, parts / f"{i}.npy", [0] * 16, "s", f"r{i}", np.arange(16.0))
    _, waiting_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    writer.close()
    _, close_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    data = sum(b.nbytes for b in blocks)
    assert waiting_peak < 0.05 * data, (waiting_peak, data)   # 19.5 MB of windows wait, on disk
    assert close_peak < 1.3 * data, (close_peak, data)        # one shard image + one recording, not 3 copies
    with h5py.File(tmp_path / "train-00000.h5") as f:
        assert f["x"][:].tobytes() == np.concatenate(blocks).tobytes()


def test_progress_bar_shows_eeg_hours_rate_and_time_left(tmp_path, capsys):
    r = build_dataset("workload", sample_dir("workload"), tmp_path / "out", workers=1, progress=True)
    err = capsys.readouterr().err
    assert "workload:" in err and "EEG h" in err and "h/s" in err and "6/6 recordings" in err and "<00:00" in err, err
    assert abs(r.eeg_hours - 6 * 61 / 3600) < 1e-6
    build_dataset("workload", sample_dir("workload"), tmp_path / "quiet", workers=1, progress=False)
    assert capsys.readouterr().err == ""


def test_command_line_workers_flag_and_bench(tmp_path):
    raw = sample_dir("workload")
    done = subprocess.run([sys.executable, "-m", "neurolm_nb.shards", "build", "workload", str(raw), str(tmp_path / "out"),
                           "--workers", "2", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert (saved["workers"], saved["backend"]) == (2, "loky") and (tmp_path / "out" / INDEX_FILE).exists()
    bench = subprocess.run([sys.executable, "-m", "neurolm_nb.shards", "bench", "workload", str(raw), "--workers", "1", "2",
                            "--repeat", "1", "--json", str(tmp_path / "bench.json")], capture_output=True, text=True, timeout=600)
    assert bench.returncode == 0, bench.stderr[-2000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["same_output"] is True and result["files"] == 6 and set(result["scaling"]) == {"1", "2"}
    assert result["scaling"]["1"] == 1.0 and all(v > 0 for v in result["eeg_hours_per_s"].values())
    assert "same output for every worker count: True" in bench.stdout


# --- against the official recipe (neurolm_nb.build_bench, nbs/53_build_bench.ipynb) ------------------------------

def test_official_recipe_reproduces_the_fixture_windows(eegmat_dir):
    from neurolm_nb.build_bench import fixture_check_fresh
    from neurolm_nb.core import shared_dir
    from neurolm_nb.testing import TOLERANCES
    fixture = (shared_dir() or Path("/nonexistent")) / "fixtures" / "official" / "workload_windows.safetensors"
    if not fixture.exists() or not (eegmat_dir / "Subject02_1.edf").exists():
        pytest.skip("needs ../shared (the fixture and the real Subject02 EDF files)")
    diff = fixture_check_fresh(eegmat_dir, fixture)  # a fresh process: see the notebook
    assert set(diff) == {"Subject02_1", "Subject02_2"} and max(diff.values()) <= TOLERANCES["uV"].atol


def test_official_recipe_writes_one_pickle_per_window(tmp_path):
    import pickle
    from neurolm_nb.build_bench import OFFICIAL_NAMES, official_recipe
    edf = sorted(sample_dir("workload").glob("Subject*_2.edf"))[0]
    got = official_recipe([edf], tmp_path, keep=True, verbose="ERROR")
    files = sorted(tmp_path.glob("*.pkl"))
    assert len(files) == 29 and got[edf.stem].shape == (29, 19, 800)
    first = pickle.loads((tmp_path / f"{edf.stem}-0.pkl").read_bytes())
    assert first["ch_names"] == OFFICIAL_NAMES and first["y"] == 1 and first["X"].dtype == np.float64
    np.testing.assert_array_equal(first["X"], got[edf.stem][0])


def test_build_bench_command_prints_the_whole_table(tmp_path):
    "The single benchmark command, on 2 sample files, one round: every row and ratio of the report is there."
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "neurolm_nb.build_bench", "--eegmat", str(sample_dir("workload")),
                           "--max-files", "2", "--repeat", "1", "--loader-workers", "0", "--batch-size", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=project_root())
    assert proc.returncode == 0, proc.stderr[-3000:]
    for needed in ("official prepare_workload.py", "ours, build_dataset workers=1", "ours, build_dataset workers=2",
                   "scaling vs 1 worker", "speed vs the official recipe", "largest process", "num_workers=0",
                   "samples/s of NeuroLM-B stage 2"):
        assert needed in proc.stdout, needed
    result = json.loads(out.read_text())
    assert [(r["kind"], r["workers"]) for r in result["runs"]] == [("official", 1), ("ours", 1), ("ours", 2)]
    assert all(r["files"] == 2 and r["eeg_hours_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in result["runs"])
    assert result["runs"][2]["children_peak_rss_mb"] > 0  # the two loky workers' peaks are measured


def test_a_two_worker_build_leaves_joblib_usable_in_the_same_process(tmp_path):
    "The build's worker pool is its own: a later joblib n_jobs=2 call (as MNE makes) still works beside it."
    from joblib import Parallel, delayed
    def workers():  # loky worker processes (not the resource trackers, which outlive every pool by design)
        return [c for c in psutil.Process().children(recursive=True) if c.is_running()
                and c.status() != psutil.STATUS_ZOMBIE and "popen_loky" in " ".join(c.cmdline())]
    report = build_dataset("workload", samples_dir_for("workload"), tmp_path / "w", workers=2)
    assert report.backend == "loky"
    assert Parallel(n_jobs=2)(delayed(pow)(i, 2) for i in range(4)) == [0, 1, 4, 9]
    build_dataset("workload", samples_dir_for("workload"), tmp_path / "again", workers=2)  # and the next build too
    assert build_digest(tmp_path / "w") == build_digest(tmp_path / "again")
