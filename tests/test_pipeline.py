"""The papermill runner (`neurolm_nb.pipeline`): profiles, parameter checks, runs, failures, command line.

Real kernels and real papermill throughout. Most runs use tiny stand-in notebooks written to a
temporary `nbs/` (they start in about a second); one test runs the first real data stage of the smoke
profile.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neurolm_nb.core import load_json
from neurolm_nb.pipeline import (STAGES, ProfileError, StageError, expand_placeholders, list_stages,
                                 load_profile, profile_names, resolve_parameters, run_notebook, run_pipeline,
                                 write_notebook)

NBS = Path(__file__).resolve().parent.parent / "nbs"
PARAMS = "#parameters\nout_dir = None\nrun_root = None\nseed = 0\nsteps = 1"
WRITE_OUTPUTS = (  # plain matplotlib and json: these kernels should start fast (no torch import)
    "import json, matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\nfrom pathlib import Path\n"
    "(Path(out_dir) / 'figures').mkdir(parents=True, exist_ok=True)\n"
    "fig, ax = plt.subplots(); ax.plot(range(steps)); fig.savefig(Path(out_dir) / 'figures' / 'curve.png'); plt.close(fig)\n"
    "(Path(out_dir) / 'metrics.json').write_text(json.dumps({'steps': steps, 'seed': seed}))\n"
    "(Path(out_dir) / 'config.json').write_text(json.dumps({'run_root': run_root}))"
)


@pytest.fixture
def toy_nbs(tmp_path):
    "A temporary nbs/ whose first two registered stages are tiny notebooks that plot and write metrics."
    d = tmp_path / "nbs"
    first, second = list(STAGES)[:2]
    write_notebook(d / STAGES[first], [PARAMS, WRITE_OUTPUTS])
    write_notebook(d / STAGES[second], [PARAMS, "import json\nfrom pathlib import Path\n"
                                        f"prev = json.loads((Path(run_root) / {first!r} / 'metrics.json').read_text())\n"
                                        "assert prev['steps'] == steps, prev", WRITE_OUTPUTS])
    return d


def toy_profile(**stage_params):
    first, second = list(STAGES)[:2]
    return {"name": "toy", "params": {"seed": 3},
            "stages": {first: stage_params.get(first, {}), second: stage_params.get(second, {})}}


def test_registry_order_and_profiles_load(profiles_dir):
    assert list(STAGES)[:5] == ["eeg_io", "datasets", "patching", "targets", "training"]
    assert STAGES["eeg_io"] == "02_eeg_io.ipynb" and STAGES["training"] == "06_training.ipynb"
    names = profile_names(profiles_dir)
    assert {"smoke", "paper-b", "paper-l", "paper-xl"} <= set(names)
    for name in names:
        prof = load_profile(profiles_dir / f"{name}.yaml")
        assert prof["name"] == name and prof["description"]
    smoke = load_profile("smoke")
    assert list(smoke["stages"]) == [s for s in STAGES if s in smoke["stages"]]  # written in pipeline order
    assert {"eeg_io", "datasets", "patching", "targets", "training"} <= set(smoke["stages"])
    for paper in ("paper-b", "paper-l", "paper-xl"):
        prof = load_profile(paper)
        stages = {**prof["stages"], **prof.get("pending", {})}
        assert {"datasets", "tokenizer", "pretrain", "instruct"} <= set(stages)
        # the original hyperparameters (reference/neurolm.md §2-§4)
        assert stages["tokenizer"]["lr"] == pytest.approx(5e-5) and stages["tokenizer"]["epochs"] == 50
        assert stages["pretrain"]["lr"] == pytest.approx(6e-4) and stages["pretrain"]["betas"] == [0.9, 0.95]
        assert stages["pretrain"]["batch_size"] == 60 and stages["pretrain"]["text_batch"] == 4
        # every runnable stage's keys are parameters its notebook declares
        for stage in prof["stages"]:
            resolve_parameters(NBS / STAGES[stage], prof, stage=stage, out_dir="/tmp/x", run_root="/tmp")
    assert load_profile("paper-xl")["stages"]["pretrain"]["gpt"] == "gpt2-xl"
    assert load_profile("paper-l")["stages"]["pretrain"]["gpt"] == "gpt2-medium"


def test_bad_profiles_are_refused_before_running(tmp_path):
    with pytest.raises(ProfileError, match="warp_drive"):
        load_profile({"stages": {"warp_drive": {}}})
    with pytest.raises(ProfileError, match="out_dir"):
        load_profile({"stages": {"eeg_io": {"out_dir": "/elsewhere"}}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [eeg_io]\n")
    with pytest.raises(ProfileError, match="bad.yaml"):
        load_profile(bad)
    with pytest.raises(ProfileError, match="available"):
        load_profile("no-such-profile")


def test_pending_stages_do_not_run(tmp_path):
    later = {"name": "later", "description": "a stage whose notebook does not exist yet",
             "stages": {}, "pending": {"future_stage": {"epochs": 5}}}
    with pytest.raises(ProfileError, match="no runnable stages"):
        run_pipeline(later, runs_dir=tmp_path)
    with pytest.raises(ProfileError, match="pending"):
        run_pipeline({**later, "stages": {"eeg_io": {}}}, stages="future_stage", runs_dir=tmp_path)
    assert not (tmp_path / "later").exists()
    assert {r["status"] for r in list_stages(later)} == {"pending"}


def test_parameters_are_filtered_and_checked(toy_nbs, tmp_path):
    first = list(STAGES)[0]
    nb = toy_nbs / STAGES[first]
    prof = load_profile({**toy_profile(**{first: {"steps": 4}}), "params": {"seed": 3, "device": "cpu"}})
    got = resolve_parameters(nb, prof, first, out_dir=tmp_path / "o", run_root=tmp_path)
    assert got == {"seed": 3, "steps": 4, "out_dir": str((tmp_path / "o").resolve()), "run_root": str(tmp_path.resolve())}
    typo = load_profile(toy_profile(**{first: {"stepz": 4}}))
    with pytest.raises(ProfileError) as info:
        resolve_parameters(nb, typo, first, out_dir=tmp_path)
    msg = str(info.value)
    assert "stepz" in msg and STAGES[first] in msg and "out_dir, run_root, seed, steps" in msg
    # a stage notebook that cannot be told where to write is refused
    write_notebook(tmp_path / "nowhere.ipynb", ["#parameters\nseed = 0", "pass"])
    with pytest.raises(ProfileError, match="out_dir"):
        resolve_parameters(tmp_path / "nowhere.ipynb", typo, first, out_dir=tmp_path)


def test_placeholders():
    assert expand_placeholders({"a": ["${root}/x", 1]}, {"root": "/r"}) == {"a": ["/r/x", 1]}
    with pytest.raises(ProfileError, match="NEUROLM_SHARED"):
        expand_placeholders("${shared}/data", {"shared": None})
    with pytest.raises(ProfileError, match="nope"):
        expand_placeholders("${nope}", {"root": "/r"})


def test_unknown_parameter_stops_before_any_kernel(toy_nbs, tmp_path):
    first = list(STAGES)[0]
    second = list(STAGES)[1]
    prof = toy_profile(**{second: {"learning_rat": 0.1}})  # the typo is in the *last* stage
    with pytest.raises(ProfileError, match="learning_rat"):
        run_pipeline(prof, runs_dir=tmp_path / "runs", nbs_dir=toy_nbs, verbose=False)
    assert not (tmp_path / "runs" / "toy" / first).exists()  # nothing ran


def test_toy_pipeline_runs_stages_in_order(toy_nbs, tmp_path):
    first, second = list(STAGES)[:2]
    runs = tmp_path / "runs"
    rec = run_pipeline(toy_profile(**{first: {"steps": 5}, second: {"steps": 5}}),
                       stages=f"{second},{first}", runs_dir=runs, nbs_dir=toy_nbs, verbose=False)
    assert rec["status"] == "ok" and list(rec["stages"]) == [first, second]  # pipeline order, not asked order
    for stage in (first, second):
        out = runs / "toy" / stage
        assert (out / STAGES[stage]).exists()                      # the executed notebook
        assert (out / "figures" / "curve.png").stat().st_size > 0  # its figure
        assert load_json(out / "metrics.json") == {"seed": 3, "steps": 5}
        assert load_json(out / "config.json") == {"run_root": str((runs / "toy").resolve())}
        assert rec["stages"][stage]["figures"] == ["figures/curve.png"]
        assert rec["stages"][stage]["wall_s"] > 0
    saved = load_json(runs / "toy" / "pipeline.json")
    assert saved["status"] == "ok" and saved["stages"][second]["parameters"]["steps"] == 5
    assert list(saved["stages"]) == [first, second]  # the file keeps pipeline order too
    assert saved["git"] is None                       # these toy notebooks are in no git checkout
    assert (runs / "toy" / "profile.yaml").exists()
    # rerunning one stage keeps the record of the other
    run_pipeline(toy_profile(**{first: {"steps": 5}}), stages=first, runs_dir=runs, nbs_dir=toy_nbs, verbose=False)
    assert set(load_json(runs / "toy" / "pipeline.json")["stages"]) == {first, second}


def test_failing_cell_is_named(tmp_path):
    nbs = tmp_path / "nbs"
    write_notebook(nbs / STAGES["eeg_io"], [PARAMS, "x = 1", "raise ValueError('channel FP9 is not in the vocabulary')"])
    with pytest.raises(StageError) as info:
        run_pipeline("smoke", stages="eeg_io", runs_dir=tmp_path / "runs", nbs_dir=nbs, verbose=False)
    err = info.value
    msg = str(err)
    executed = tmp_path / "runs" / "smoke" / "eeg_io" / STAGES["eeg_io"]
    assert "stage 'eeg_io'" in msg and STAGES["eeg_io"] in msg and "cell 2" in msg
    assert "ValueError: channel FP9 is not in the vocabulary" in msg and str(executed) in msg
    assert "raise ValueError" in msg  # the failing cell's first line
    assert (err.stage, err.cell_index, err.ename) == ("eeg_io", 2, "ValueError")
    assert executed.exists()  # the executed notebook, up to the failure, is kept for reading
    rec = load_json(tmp_path / "runs" / "smoke" / "pipeline.json")
    assert rec["status"] == "failed" and "cell 2" in rec["stages"]["eeg_io"]["error"]


def test_a_successful_stage_prints_no_kernel_noise(tmp_path, capfd):
    "ipykernel's own log (a TCP notice; 'KeyboardInterrupt caught in kernel' from the SIGINT jupyter_client sends"
    " before every shutdown) never reaches the terminal of a run whose cells all succeed."
    first, nbs = list(STAGES)[0], tmp_path / "nbs"
    write_notebook(nbs / STAGES[first], [PARAMS, "k = get_ipython().kernel\n"
                   "k.log.error('KeyboardInterrupt caught in kernel.')  # what ipykernel logs for that SIGINT\n"
                   "k.log.warning('Kernel is running over TCP without encryption.')"])
    rec = run_pipeline(toy_profile(), stages=first, runs_dir=tmp_path / "runs", nbs_dir=nbs, verbose=False)
    assert rec["status"] == "ok"
    out, err = capfd.readouterr()
    noise = [line for line in (out + err).splitlines() if "IPKernelApp" in line or "KeyboardInterrupt" in line]
    assert not noise, noise


def test_command_line(toy_nbs, tmp_path):
    first, second = list(STAGES)[:2]
    prof = tmp_path / "mine.yaml"
    prof.write_text(f"description: two toy stages\nparams: {{seed: 1}}\nstages:\n  {first}: {{steps: 2}}\n  {second}: {{steps: 2}}\n")
    cli = [sys.executable, "-m", "neurolm_nb.pipeline", "--profile", str(prof), "--nbs-dir", str(toy_nbs),
           "--runs-dir", str(tmp_path / "runs")]
    listed = subprocess.run(cli + ["--list"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert first in listed.stdout and "ready" in listed.stdout
    done = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pipeline 'mine': ok" in done.stdout and "curve.png" in done.stdout
    assert load_json(tmp_path / "runs" / "mine" / "pipeline.json")["status"] == "ok"
    bad = subprocess.run(cli[:4] + ["no-such-profile"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no-such-profile" in bad.stderr
    write_notebook(toy_nbs / STAGES[first], [PARAMS, "1 / 0"])
    failed = subprocess.run(cli + ["--stages", first], capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1 and "ZeroDivisionError" in failed.stderr and "cell 1" in failed.stderr


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "neurolm-nb"
    if not script.exists():
        pytest.skip(f"{script} not found: the package was not installed with pip into this environment")
    out = subprocess.run([str(script), "--list", "--profile", "smoke"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "eeg_io" in out.stdout


@pytest.mark.slow
def test_smoke_pipeline_end_to_end(tmp_path):
    """The real thing: every smoke stage, in order, into a temporary runs/ folder, ending in the results table.

    With NEUROLM_SMOKE_RUNS_DIR set (CI sets it to the runs/ folder `make demo` has just filled) the same command
    runs into that folder instead: the stages done there with the same parameters and notebooks are skipped, any
    other stage runs, and every check below then applies to what `make demo` produced, without running it twice."""
    smoke = load_profile("smoke")
    assert list(smoke["stages"]) == list(STAGES), "the smoke profile runs every registered stage"
    runs_dir = Path(os.environ.get("NEUROLM_SMOKE_RUNS_DIR") or tmp_path)
    rec = run_pipeline("smoke", runs_dir=runs_dir, verbose=False)
    run = runs_dir / "smoke"
    assert rec["status"] == "ok", {k: v["status"] for k, v in rec["stages"].items()}
    record = load_json(run / "pipeline.json")
    if (NBS.parent / ".git").exists():                # which commit produced the run (the book shows it)
        assert len(record["git"]["commit"]) == 40
    for stage, notebook in STAGES.items():
        out = run / stage
        assert rec["stages"][stage]["status"] == "ok"
        assert (out / "metrics.json").exists() and (out / "config.json").exists(), stage
        assert record["stages"][stage]["parameters"]["out_dir"] == str(out.resolve())
        executed = json.loads((out / notebook).read_text())
        assert any("injected-parameters" in c["metadata"].get("tags", []) for c in executed["cells"]), stage
        assert not any(o.get("output_type") == "error" for c in executed["cells"] for o in c.get("outputs", []))
    # each stage read its predecessors' outputs, not its own stand-ins
    assert (run / "tokenizer" / "tokenizer.pt").exists() and (run / "pretrain" / "neurolm.pt").exists()
    assert (run / "instruct" / "neurolm.pt").exists()
    # the results table: every task, the paper's numbers beside this run's, both evaluations
    table = (run / "evaluation" / "results.md").read_text()
    for task in ("TUAB", "TUEV", "SEED", "HMC", "Workload", "TUSL"):
        assert f"| {task} |" in table, task
    assert "0.6172" in table  # the paper's Workload balanced accuracy
    metrics = load_json(run / "evaluation" / "metrics.json")["tasks"]["workload"]
    assert 0.0 <= metrics["corrected"]["balanced_accuracy"] <= 1.0
    assert 0.0 < metrics["baseline"]["band power + LR"]["balanced_accuracy"] <= 1.0  # the floor on the same split
    assert (run / "labram" / "predictions" / "test.npz").exists() and (run / "labram" / "labram.pt").exists()
    assert "LaBraM" in table and "not run: the labram stage saved no predictions" not in table
    index = (run / "figures" / "index.md").read_text()
    assert "Nothing is missing" in index and (run / "figures" / "results.md").exists()
    before = (run / "evaluation" / "metrics.json").read_bytes()
    again = run_pipeline("smoke", runs_dir=runs_dir, verbose=False)   # the same command again: nothing redone
    assert again["skipped"] == list(STAGES) and (run / "evaluation" / "metrics.json").read_bytes() == before


# ---------------------------------------------------------------- operator faults: real processes, real signals
TRAINING_STAGE = (  # a real training stage: train() with checkpoints in out_dir, slowed down so it can be killed
    "import json, os, time, torch\nfrom pathlib import Path\n"
    "from neurolm_nb.training import TrainConfig, train\n"
    "Path(out_dir).mkdir(parents=True, exist_ok=True)\n"
    "(Path(out_dir) / 'kernel.pid').write_text(str(os.getpid()))\n"
    "import tempfile; scratch = tempfile.mkdtemp(prefix='neurolm_toy_scratch_')  # lands in the run's .tmp\n"
    "torch.manual_seed(0)\n"
    "data = [(torch.randn(4), torch.randn(1)) for _ in range(64)]\n"
    "model = torch.nn.Linear(4, 1)\n"
    "def loss_fn(m, batch):\n"
    "    time.sleep(delay)\n"
    "    x, y = batch\n"
    "    return torch.nn.functional.mse_loss(m(x), y)\n"
    "res = train(model, data, loss_fn, TrainConfig(max_steps=steps, batch_size=8, lr=0.05, warmup_steps=0, seed=seed,\n"
    "            out_dir=str(Path(out_dir) / 'train'), ckpt_every=2, progress=False))\n"
    "(Path(out_dir) / 'metrics.json').write_text(json.dumps({'weight': model.weight.tolist(), 'steps': steps}))\n"
    "(Path(out_dir) / 'resumed_from.txt').write_text(str(res.resumed_from))"
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait(predicate, timeout: float, what: str):
    import time
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux-only")
def test_kill_9_of_the_runner_then_rerun_resumes_to_the_same_result(tmp_path):
    import os
    import signal
    first = list(STAGES)[0]
    nbs = tmp_path / "nbs"
    write_notebook(nbs / STAGES[first], ["#parameters\nout_dir = None\nrun_root = None\nseed = 0\nsteps = 12\n"
                                         "delay = 0.0", TRAINING_STAGE])
    prof = tmp_path / "toy.yaml"
    prof.write_text(f"params: {{seed: 0}}\nstages:\n  {first}: {{steps: 12, delay: 0.5}}\n")
    cli = [sys.executable, "-m", "neurolm_nb.pipeline", "--profile", str(prof), "--nbs-dir", str(nbs),
           "--runs-dir", str(tmp_path / "runs")]
    run = tmp_path / "runs" / "toy"
    runner = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kernel = None
    try:
        _wait(lambda: any((run / first / "train" / "checkpoints").glob("step_*.pt")), 120, "a first checkpoint")
        kernel = int((run / first / "kernel.pid").read_text())
        assert _alive(kernel)
        runner.kill()                                                      # SIGKILL: no clean-up code runs
        runner.wait(timeout=30)
        _wait(lambda: not _alive(kernel), 15, f"the stage kernel (pid {kernel}) to die with the runner")
    finally:
        if runner.poll() is None:
            runner.kill()
        if kernel and _alive(kernel):
            os.kill(kernel, signal.SIGKILL)
    from neurolm_nb.pipeline import read_record
    assert read_record(run)["stages"][first]["status"] == "interrupted"   # the record tells the truth
    assert list((run / ".tmp" / first).glob("neurolm_toy_scratch_*"))     # the killed kernel's scratch, in the run
    done = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (run / ".tmp").exists()                                     # cleaned at start and after the stage
    assert "step_" in (run / first / "resumed_from.txt").read_text()      # resumed from a checkpoint, not step 0
    # the same stage, uninterrupted, in another run folder: the same final weights
    clean = subprocess.run(cli[:-1] + [str(tmp_path / "clean")], capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    assert (tmp_path / "clean" / "toy" / first / "resumed_from.txt").read_text() == "None"
    assert load_json(run / first / "metrics.json") == load_json(tmp_path / "clean" / "toy" / first / "metrics.json")
    again = subprocess.run(cli, capture_output=True, text=True, timeout=120)   # done: skipped, not redone
    assert again.returncode == 0 and "skipped" in again.stdout


def test_wrong_types_and_missing_upstream_stop_before_any_kernel(tmp_path):
    first = list(STAGES)[0]
    bad = {"name": "typed", "params": {"seed": "zero"}, "stages": {first: {}}}
    with pytest.raises(ProfileError, match=rf"{STAGES[first]} \(stage '{first}'\): parameter 'seed' = 'zero'"):
        run_pipeline(bad, runs_dir=tmp_path, verbose=False)
    with pytest.raises(ProfileError, match=r"stage 'pretrain' needs tokenizer/tokenizer.pt.*run --stages tokenizer,pretrain"):
        run_pipeline("smoke", stages="pretrain", runs_dir=tmp_path, verbose=False)
    with pytest.raises(ProfileError, match="instruct/neurolm.pt"):
        run_pipeline("smoke", stages="evaluation", runs_dir=tmp_path, verbose=False)
    with pytest.raises(ProfileError, match=r"stage 'labram' needs datasets/pretrain/index.json"):
        run_pipeline("workload", stages="labram", runs_dir=tmp_path, verbose=False)   # whole recordings never built
    for section, message in [({"max_files": "two"}, "parameter 'max_files' = 'two'"),
                             ({"build_options": {"workload": {"window_s": "four"}}}, "WorkloadSpec.window_s = 'four'")]:
        with pytest.raises(ProfileError, match=message):
            run_pipeline({"name": "typed", "stages": {"eeg_io": {}, "datasets": section}}, runs_dir=tmp_path, verbose=False)
    assert not (tmp_path / "typed").exists() and not (tmp_path / "smoke" / "pretrain").exists()


def test_a_second_runner_on_the_same_folder_is_refused(tmp_path):
    "Two real processes: the second runner sees the first one's lock and stops with exit 2."
    first = list(STAGES)[0]
    nbs = tmp_path / "nbs"
    write_notebook(nbs / STAGES[first], ["#parameters\nout_dir = None\nrun_root = None\nseed = 0",
                                         "import time, pathlib\npathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)\n"
                                         "(pathlib.Path(out_dir) / 'started').write_text('1')\ntime.sleep(60)"])
    prof = tmp_path / "toy.yaml"
    prof.write_text(f"stages:\n  {first}: {{}}\n")
    cli = [sys.executable, "-m", "neurolm_nb.pipeline", "--profile", str(prof), "--nbs-dir", str(nbs),
           "--runs-dir", str(tmp_path / "runs")]
    runner = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: (tmp_path / "runs" / "toy" / first / "started").exists(), 120, "the first runner's stage")
        second = subprocess.run(cli, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "in use by a runner" in second.stderr
    finally:
        runner.terminate()                                                  # SIGTERM: recorded as interrupted
        runner.wait(timeout=60)
    assert load_json(tmp_path / "runs" / "toy" / "pipeline.json")["stages"][first]["status"] == "interrupted"


TRAIN_TOY = (  # a 'trained' stage: its metrics say which seed and run root it got
    "import json\nfrom pathlib import Path\n"
    "(Path(out_dir) / 'metrics.json').write_text(json.dumps({'seed': seed, 'run_root': run_root}))"
)


def _seeded_nbs(tmp_path):
    "Toy eeg_io, datasets (declares datasets/build_options), tokenizer (seeded) and evaluation (declares seeds)."
    d = tmp_path / "nbs"
    write_notebook(d / STAGES["eeg_io"], [PARAMS, WRITE_OUTPUTS])
    write_notebook(d / STAGES["datasets"], [PARAMS + "\ndatasets = ['workload']\nbuild_options = {}",
                                            WRITE_OUTPUTS + "\n(Path(out_dir) / 'options.json').write_text(json.dumps(build_options))"])
    write_notebook(d / STAGES["tokenizer"], [PARAMS, TRAIN_TOY])
    write_notebook(d / STAGES["evaluation"], [
        PARAMS + "\nseeds = None\ncheckpoint = None",
        "import json\nfrom pathlib import Path\n"
        "got = [json.loads((Path(run_root) / f'seed{k}' / 'tokenizer' / 'metrics.json').read_text())['seed'] for k in seeds]\n"
        "(Path(out_dir) / 'metrics.json').write_text(json.dumps({'seeds': seeds, 'got': got}))"])
    return d


def test_seeds_run_trained_stages_once_per_seed(tmp_path):
    from neurolm_nb.pipeline import STAGE_INPUTS, missing_inputs, seed_list
    d, runs = _seeded_nbs(tmp_path), tmp_path / "runs"
    prof = {"name": "seeded", "params": {"seed": 5, "seeds": [0, 1, 2]},
            "stages": {"eeg_io": {}, "datasets": {}, "tokenizer": {}}}
    rec = run_pipeline(prof, runs_dir=runs, nbs_dir=d, verbose=False)
    root = runs / "seeded"
    assert list(rec["stages"]) == ["eeg_io", "datasets", "tokenizer/seed0", "tokenizer/seed1", "tokenizer/seed2"]
    assert rec["seeds"] == [0, 1, 2] and load_json(root / "pipeline.json")["seeds"] == [0, 1, 2]
    assert load_json(root / "datasets" / "metrics.json")["seed"] == 5           # data stages: once, the global seed
    for k in (0, 1, 2):
        assert load_json(root / f"seed{k}" / "tokenizer" / "metrics.json") == {"seed": k, "run_root": str(root / f"seed{k}")}
        assert (root / f"seed{k}" / "datasets" / "metrics.json").exists()      # the shared datasets, seen from the seed
        assert rec["stages"][f"tokenizer/seed{k}"]["parameters"]["seed"] == k
    assert not (root / "tokenizer").exists()
    # the evaluation stage runs once, with the seed list, after every seed's model exists
    prof["stages"]["evaluation"] = {}
    STAGE_INPUTS_BEFORE = dict(STAGE_INPUTS)
    try:
        STAGE_INPUTS["evaluation"] = [("tokenizer/metrics.json", "tokenizer", "checkpoint")]
        rec = run_pipeline(prof, stages="evaluation", runs_dir=runs, nbs_dir=d, verbose=False)
        assert load_json(root / "evaluation" / "metrics.json") == {"seeds": [0, 1, 2], "got": [0, 1, 2]}
        # a missing seed's output is reported before anything runs
        problems = missing_inputs("evaluation", {}, root, [], root, ["tokenizer"], [root / "seed0", root / "seed7"])
        assert problems and "tokenizer/metrics.json" in problems[0]
    finally:
        STAGE_INPUTS.clear(); STAGE_INPUTS.update(STAGE_INPUTS_BEFORE)
    assert seed_list("0, 1,2") == [0, 1, 2] and seed_list(None) is None
    with pytest.raises(ProfileError, match="repeats"):
        seed_list([1, 1])


def test_without_seeds_the_layout_and_record_are_unchanged(toy_nbs, tmp_path):
    rec = run_pipeline(toy_profile(), runs_dir=tmp_path / "runs", nbs_dir=toy_nbs, verbose=False)
    assert not {"seeds", "val_subjects", "test_subjects"} & set(rec)
    assert not any(p.name.startswith("seed") for p in (tmp_path / "runs" / "toy").iterdir())


def test_named_subjects_reach_the_datasets_build_options(tmp_path, monkeypatch):
    import neurolm_nb.datasets as datasets
    monkeypatch.setattr(datasets, "get_spec", lambda name, **opts: None)  # the spec fields land in 03_datasets
    d, runs = _seeded_nbs(tmp_path), tmp_path / "runs"
    prof = tmp_path / "named.yaml"
    prof.write_text("description: named subjects\nparams: {seed: 0, test_subjects: [Subject02, Subject03]}\n"
                    "stages:\n  datasets: {build_options: {workload: {window_s: 4}}}\n")
    from neurolm_nb.pipeline import main
    assert main(["--profile", str(prof), "--nbs-dir", str(d), "--runs-dir", str(runs),
                 "--val-subjects", "Subject07,Subject08"]) == 0
    rec = load_json(runs / "named" / "pipeline.json")
    options = {"workload": {"window_s": 4, "val_subjects": ["Subject07", "Subject08"], "test_subjects": ["Subject02", "Subject03"]}}
    assert rec["stages"]["datasets"]["parameters"]["build_options"] == options
    assert load_json(runs / "named" / "datasets" / "options.json") == options   # what the notebook received
    assert rec["val_subjects"] == ["Subject07", "Subject08"] and rec["test_subjects"] == ["Subject02", "Subject03"]
    two = {"name": "two", "params": {"val_subjects": ["A"]}, "stages": {"datasets": {"datasets": ["workload", "tuab"]}}}
    with pytest.raises(ProfileError, match="name the dataset"):
        run_pipeline(two, runs_dir=runs, nbs_dir=d, verbose=False)


def test_workload_profile_is_valid(profiles_dir):
    from neurolm_nb.pipeline import plan_stages, seed_list
    prof = load_profile("workload")
    assert seed_list(prof["params"]["seeds"]) == [0, 1, 2]
    val, test = prof["params"]["val_subjects"]["workload"], prof["params"]["test_subjects"]["workload"]
    assert val and test and not set(val) & set(test)
    # the self-supervised stages read whole recordings of the training subjects only (the leakage guard)
    datasets = prof["stages"]["datasets"]
    assert datasets["datasets"] == ["workload", "pretrain"]
    assert datasets["build_options"]["pretrain"]["exclude_from"] == ["workload"]
    assert list(prof["stages"]) == ["datasets", "tokenizer", "labram", "pretrain", "instruct", "evaluation"]
    for stage in prof["stages"]:   # every key is a parameter its notebook declares, of the declared type
        resolve_parameters(NBS / STAGES[stage], prof, stage=stage, out_dir="/tmp/x", run_root="/tmp")


def test_a_stage_rerun_with_other_parameters_starts_afresh_and_so_does_every_later_stage(toy_nbs, tmp_path):
    "A checkpoint written with other parameters (or before an upstream stage ran again) is never resumed."
    first, second = list(STAGES)[:2]
    runs = tmp_path / "runs"
    run_pipeline(toy_profile(**{first: {"steps": 2}, second: {"steps": 2}}), runs_dir=runs, nbs_dir=toy_nbs, verbose=False)
    for stage in (first, second):   # what a stage's own resume logic would pick up
        (runs / "toy" / stage / "checkpoint_from_the_old_run").write_text("old")
    rec = run_pipeline(toy_profile(**{first: {"steps": 3}, second: {"steps": 3}}), runs_dir=runs, nbs_dir=toy_nbs,
                       verbose=False)
    assert rec["skipped"] == []
    for stage in (first, second):
        assert not (runs / "toy" / stage / "checkpoint_from_the_old_run").exists(), stage
        assert load_json(runs / "toy" / stage / "metrics.json")["steps"] == 3


def test_command_line_subjects_go_to_the_dataset_the_profile_names(tmp_path):
    "The workload profile's case: it builds workload and pretrain and names subjects per dataset; a plain list on the"
    " command line goes to workload, 'workload=...' names it, and a plain list with nothing named stops with a clear error."
    from neurolm_nb.pipeline import main
    d, runs = _seeded_nbs(tmp_path), tmp_path / "runs"
    prof = tmp_path / "wl.yaml"
    prof.write_text("params: {seed: 0, val_subjects: {workload: [Subject08]}, test_subjects: {workload: [Subject04]}}\n"
                    "stages:\n  datasets: {datasets: [workload, pretrain], build_options: {pretrain: {exclude_from: [workload]}}}\n")
    cli = ["--profile", str(prof), "--nbs-dir", str(d), "--runs-dir", str(runs)]
    assert main(cli + ["--test-subjects", "Subject02,Subject03", "--val-subjects", "Subject07"]) == 0
    assert load_json(runs / "wl" / "datasets" / "options.json") == {
        "pretrain": {"exclude_from": ["workload"]},
        "workload": {"val_subjects": ["Subject07"], "test_subjects": ["Subject02", "Subject03"]}}
    assert load_json(runs / "wl" / "pipeline.json")["test_subjects"] == {"workload": ["Subject02", "Subject03"]}
    assert main(cli + ["--test-subjects", "workload=Subject05", "--val-subjects", "workload=Subject06"]) == 0
    assert load_json(runs / "wl" / "datasets" / "options.json")["workload"] == {"val_subjects": ["Subject06"],
                                                                              "test_subjects": ["Subject05"]}
    plain = tmp_path / "plain.yaml"   # two datasets, none named: a plain list is truly ambiguous
    plain.write_text("stages:\n  datasets: {datasets: [workload, pretrain]}\n")
    with pytest.raises(ProfileError, match="name the dataset"):
        run_pipeline(str(plain), runs_dir=runs, nbs_dir=d, verbose=False, test_subjects=["Subject02"])
    assert main(["--profile", str(plain), "--nbs-dir", str(d), "--runs-dir", str(runs), "--test-subjects", "workload="]) == 2


TOY_EVALUATION = (  # writes what 32_evaluation writes for cv_summary: per-seed test and val answers, metrics.json
    "import json, numpy as np\nfrom pathlib import Path\n"
    "opts = json.loads((Path(run_root) / 'datasets' / 'options.json').read_text())['workload']\n"
    "def answers(subjects, k):\n"
    "    r = np.random.default_rng(k + 10 * len(subjects))\n"
    "    labels = np.tile([0, 1], 5 * len(subjects))\n"
    "    p = 1 / (1 + np.exp(-(2.0 * (labels - 0.5) + r.normal(0, 1, len(labels)))))\n"
    "    return dict(labels=labels, probs=np.stack([1 - p, p], 1), subjects=np.repeat(subjects, 10).astype(str))\n"
    "for k in seeds:\n"
    "    for sub, subjects in (('predictions', opts['test_subjects']), ('val/predictions', opts['val_subjects'])):\n"
    "        (Path(out_dir) / f'seed{k}' / sub).mkdir(parents=True, exist_ok=True)\n"
    "        np.savez(Path(out_dir) / f'seed{k}' / sub / 'workload.npz', **answers(subjects, k))\n"
    "(Path(out_dir) / 'metrics.json').write_text(json.dumps({'seeds': seeds, 'split': 'test', 'val_split': 'val'}))"
)


def test_folds_split_the_real_subjects_and_each_fold_is_a_run(tmp_path, eegmat_dir):
    "Leave-subjects-out CV: subjects discovered in a real EEGMAT folder, K deterministic folds, one full run per fold"
    " whose datasets stage gets that fold's subjects, then the CV summary over every (fold, seed)."
    from sklearn.metrics import balanced_accuracy_score
    from neurolm_nb.pipeline import cv_folds, cv_subjects, fold_list
    every = sorted({f.stem.split("_")[0] for f in eegmat_dir.glob("Subject*_*.edf")})
    workload = load_profile("workload")
    assert cv_subjects({**workload, "stages": {"datasets": {"eegmat_dir": str(eegmat_dir)}}}, "workload") == every
    if every == [f"Subject{i:02d}" for i in range(2, 22)]:   # the shared copy: the lead's hand-made folds
        assert [(f["test"][0], f["test"][-1], f["val"][0], f["val"][-1]) for f in cv_folds(every, 4)] == [
            ("Subject02", "Subject06", "Subject07", "Subject09"), ("Subject07", "Subject11", "Subject12", "Subject14"),
            ("Subject12", "Subject16", "Subject17", "Subject19"), ("Subject17", "Subject21", "Subject02", "Subject04")]
    for k in (2, 3, 4, 5):
        folds = cv_folds(every, k)
        assert sorted(s for f in folds for s in f["test"]) == every                   # each subject tested once
        assert all(not set(f["test"]) & set(f["val"]) for f in folds) and cv_folds(every[::-1], k) == folds
    raw = tmp_path / "raw"
    raw.mkdir()
    for f in sorted(eegmat_dir.glob("Subject*_*.edf"))[:12]:                          # 6 subjects
        os.symlink(f, raw / f.name)
    six = every[:6]
    d, runs = _seeded_nbs(tmp_path), tmp_path / "runs"
    write_notebook(d / STAGES["datasets"], [PARAMS + "\ndatasets = ['workload']\nbuild_options = {}\neegmat_dir = 'auto'",
                                            WRITE_OUTPUTS + "\n(Path(out_dir) / 'options.json').write_text(json.dumps(build_options))"])
    write_notebook(d / STAGES["evaluation"], [PARAMS + "\nseeds = None\ncheckpoint = None", TOY_EVALUATION])
    prof = {"name": "cvtoy", "params": {"seed": 0, "seeds": [0, 1], "folds": {"k": 2, "n_val": 1}},
            "stages": {"datasets": {"datasets": ["workload"], "eegmat_dir": str(raw)}, "evaluation": {"checkpoint": "given"}}}
    assert fold_list(prof["params"]["folds"], load_profile(prof), "workload") == cv_folds(six, 2, 1)
    with pytest.raises(ProfileError, match="not both"):
        run_pipeline(prof, runs_dir=runs, nbs_dir=d, verbose=False, test_subjects=["Subject02"])
    rec = run_pipeline(prof, runs_dir=runs, nbs_dir=d, verbose=False)
    root = runs / "cvtoy"
    assert rec["folds"] == cv_folds(six, 2, 1) and load_json(root / "cv.json")["folds"] == rec["folds"]
    for k, fold in enumerate(rec["folds"]):
        assert load_json(root / f"fold{k}" / "datasets" / "options.json") == {
            "workload": {"val_subjects": fold["val"], "test_subjects": fold["test"]}}
        assert load_json(root / f"fold{k}" / "pipeline.json")["fold"]["index"] == k
    summary = load_json(root / "cv_metrics.json")["models"]["NeuroLM (option scores)"]
    assert (summary["n_runs"], summary["n_folds"], summary["n_subjects"]) == (4, 2, 6)
    by_hand = []
    for k in (0, 1):
        for seed in (0, 1):
            with np.load(root / f"fold{k}" / "evaluation" / f"seed{seed}" / "predictions" / "workload.npz") as f:
                by_hand.append(balanced_accuracy_score(f["labels"], f["probs"].argmax(1)))
    assert summary["mean"]["balanced_accuracy"] == pytest.approx(np.mean(by_hand))
    assert summary["sd"]["balanced_accuracy"] == pytest.approx(np.std(by_hand, ddof=1))
    assert "NeuroLM (option scores)" in (root / "cv_results.md").read_text() and (root / "figures" / "cv_summary.png").exists()


def test_papermill_does_not_call_declared_annotated_parameters_unknown(tmp_path, caplog):
    "papermill's reader skips `workers: int | None = None`; the runner keeps its false warning off the terminal."
    import logging
    nb = tmp_path / "annotated.ipynb"
    write_notebook(nb, ["#parameters\nout_dir = None\nworkers: int | None = None",
                        "from pathlib import Path\nPath(out_dir, 'w.txt').write_text(str(workers))"])
    (tmp_path / "out").mkdir()
    with caplog.at_level(logging.WARNING, logger="papermill"):
        run_notebook(nb, tmp_path / "out" / "annotated.ipynb", {"out_dir": str(tmp_path / "out"), "workers": 2,
                                                                "wrokers": 3})
    assert (tmp_path / "out" / "w.txt").read_text() == "2"              # injected and used
    said = [r.getMessage() for r in caplog.records]
    assert "Passed unknown parameter: workers" not in said
    assert "Passed unknown parameter: wrokers" in said                   # an undeclared name is still reported
    assert logging.getLogger("papermill").filters == []
