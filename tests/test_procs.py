"""Process lifetime under `launch_torchrun`, with real processes and real signals (no mocks):
killing the launcher kills torchrun's agent and every worker; a rank stopped with SIGSTOP is named and the
run killed within `hang_timeout_s`; a worker entry point whose parent is already gone exits at once.

Every process a test starts carries a unique NEUROLM_TEST_MARK in its environment; the `mark` fixture
kills whatever still carries it when the test ends, pass or fail."""
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from neurolm_nb.core import PARENT_PID_ENV
from neurolm_nb.training import HEARTBEAT_ENV, HungRankError, launch_torchrun, proc_stat, process_env, read_metrics

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux")
MARK = "NEUROLM_TEST_MARK"
DEMO = ["neurolm_nb.training", "--demo", "--no-progress", "--device", "cpu", "--steps", "100000",
        "--n-samples", "256", "--batch-size", "8"]


def marked(mark: str) -> list[int]:
    "Live processes (zombies excluded) started with NEUROLM_TEST_MARK=mark."
    return sorted(int(p) for p in os.listdir("/proc")
                  if p.isdigit() and int(p) != os.getpid() and proc_stat(int(p)) is not None
                  and process_env(int(p), MARK) == mark)


def wait_until(condition, timeout_s: float, what: str, poll_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(poll_s)


@pytest.fixture
def mark():
    "A unique mark for this test's processes; afterwards every process still carrying it is killed."
    value = uuid.uuid4().hex
    yield value
    for pid in marked(value):
        for sig in (signal.SIGCONT, signal.SIGKILL):  # SIGCONT first: a stopped process still dies, but be tidy
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def rows(out: Path) -> int:
    return len(read_metrics(out / "metrics.jsonl"))


def workers_of(agent: int) -> dict[int, int]:
    "rank -> pid of the agent's worker children."
    found = {}
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        st = proc_stat(pid)
        if st is not None and st[1] == agent and process_env(pid, "RANK") is not None:
            found[int(process_env(pid, "RANK"))] = pid
    return found


def test_killing_the_launcher_kills_the_agent_and_every_worker(tmp_path, mark):
    out = tmp_path / "run"
    code = ("import sys; from neurolm_nb.training import launch_torchrun; "
            "launch_torchrun(2, sys.argv[2:] + ['--out-dir', sys.argv[1]])")
    launcher = subprocess.Popen([sys.executable, "-c", code, str(out), *DEMO, "--step-delay", "0.2"],
                                env={**os.environ, MARK: mark}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    beat_dir = None
    try:
        wait_until(lambda: rows(out) >= 2 or launcher.poll() is not None, 120, "two logged updates")
        assert launcher.poll() is None, "the launcher ended on its own"
        agents = [p for p in marked(mark) if proc_stat(p) and proc_stat(p)[1] == launcher.pid]
        assert len(agents) == 1, agents
        workers = workers_of(agents[0])
        assert sorted(workers) == [0, 1], workers
        run = [agents[0], *workers.values()]
        beat_dir = process_env(agents[0], HEARTBEAT_ENV)  # the killed launcher cannot remove it itself
        launcher.kill()  # SIGKILL: the launcher cannot clean up anything itself
        launcher.wait(timeout=30)
        t0 = time.monotonic()
        wait_until(lambda: all(proc_stat(p) is None for p in run), 15,
                   "the agent and both workers to die with the launcher")
        print(f"agent and workers gone {time.monotonic() - t0:.1f} s after the launcher's SIGKILL")
        assert marked(mark) == []
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=30)
        if beat_dir and Path(beat_dir).name.startswith("neurolm_heartbeats_"):
            shutil.rmtree(beat_dir, ignore_errors=True)


def test_a_stopped_rank_is_named_and_the_run_killed(tmp_path, mark):
    out, hang_s = tmp_path / "run", 12.0
    stopped: dict = {}

    def stop_rank_1():
        try:
            wait_until(lambda: rows(out) >= 3, 90, "three logged updates")
            rank1 = [p for p in marked(mark) if process_env(p, "RANK") == "1"]
            os.kill(rank1[0], signal.SIGSTOP)
            stopped.update(pid=rank1[0], at=time.monotonic())
        except BaseException as e:  # reported by the main thread
            stopped["error"] = e

    helper = threading.Thread(target=stop_rank_1, daemon=True)
    helper.start()
    t0 = time.monotonic()
    with pytest.raises(HungRankError) as info:
        launch_torchrun(2, [*DEMO, "--step-delay", "0.05", "--out-dir", out], env={MARK: mark},
                        hang_timeout_s=hang_s, timeout_s=150)
    elapsed = time.monotonic() - t0
    helper.join(timeout=10)
    assert "error" not in stopped, stopped.get("error")
    err = info.value
    assert (err.rank, err.pid) == (1, stopped["pid"])
    assert hang_s <= err.silent_s < hang_s + 10
    message = str(err)
    assert f"rank 1 (pid {stopped['pid']}) made no progress for" in message and "SIGSTOP" in message
    assert f"hang_timeout_s = {hang_s:g} s" in message
    detected = time.monotonic() - stopped["at"]
    assert detected < hang_s + 10, f"found {detected:.1f} s after the SIGSTOP"
    assert elapsed < 55, f"the test took {elapsed:.0f} s"
    wait_until(lambda: marked(mark) == [], 10, "every process of the run to be gone")


@pytest.mark.parametrize("module,args", [("neurolm_nb.training", ["--demo"]), ("neurolm_nb.pretrain", ["--config", "x.json"]),
                                         ("neurolm_nb.instruction_tuning", ["--config", "x.json"]),
                                         ("neurolm_nb.tokenizer_stage", ["--config", "x.json"])])
def test_a_worker_whose_agent_is_already_gone_exits_at_once(module, args, mark):
    "As if the agent died between starting the worker and the worker arming PR_SET_PDEATHSIG."
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, MARK: mark, PARENT_PID_ENV: "1"})
    assert done.returncode == 1, done.stderr[-2000:]
    assert "its parent 1 is gone" in done.stderr
    assert "Traceback" not in done.stderr  # it stopped before doing anything
