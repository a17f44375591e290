"""Tests of `neurolm_nb.training` (nbs/06_training.ipynb): schedule, parameter groups, sharding,
accumulation, atomic checkpoints, and — with real processes — DDP under torchrun (gloo, CPU) and an
exact resume after SIGKILL."""
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from neurolm_nb.core import latest_checkpoint, load_checkpoint
from neurolm_nb.training import (DEFAULT_DIST_TIMEOUT_S, DEFAULT_HANG_TIMEOUT_S, DIST_TIMEOUT_ENV, DemoDataset, DemoMLP,
                                 ShardedBatchSampler, TrainConfig, build_optimizer, dist_timeout, hang_timeout,
                                 check_param_groups, checkpoint_path, demo_loss, demo_task, describe_samples, epoch_order,
                                 launch_torchrun, lr_at, read_metrics, resolve_schedule, run_demo, save_train_checkpoint,
                                 train, wd_at, weight_decay_groups)

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def small_cfg(**kw) -> TrainConfig:
    base = dict(lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=8, batch_size=16, weight_decay=0.01, grad_clip=1.0,
                device="cpu", progress=False)
    return TrainConfig(**{**base, **kw})


def weights_after(cfg: TrainConfig, dropout: float = 0.0, **train_kw) -> dict:
    model, data, loss_fn = demo_task(n=256, dropout=dropout, seed=cfg.seed)
    train(model, data, loss_fn, cfg, **train_kw)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict, b: dict, atol: float = 0.0):
    assert sorted(a) == sorted(b)
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max().item()}"
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


# --- schedule, groups, sharding ---------------------------------------------------------------

def test_lr_schedule_endpoints_and_shape():
    args = dict(lr=6e-4, min_lr=6e-5, warmup_steps=20, max_steps=220)
    assert lr_at(0, **args) == pytest.approx(6e-4 / 20)
    assert lr_at(19, **args) == pytest.approx(6e-4)          # warm-up ends at the peak
    assert lr_at(20, **args) == pytest.approx(6e-4)          # cosine starts at the peak
    assert lr_at(120, **args) == pytest.approx(3.3e-4)       # half-way: mean of peak and floor
    assert lr_at(220, **args) == pytest.approx(6e-5)         # ends at the floor
    assert lr_at(10_000, **args) == pytest.approx(6e-5)
    warm = [lr_at(s, **args) for s in range(20)]
    assert np.allclose(np.diff(warm), 6e-4 / 20)             # linear
    decay = [lr_at(s, **args) for s in range(20, 221)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))     # monotone
    assert lr_at(0, 1.0, 0.1, 0, 10) == pytest.approx(1.0)   # no warm-up
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, **args)


def test_resolve_schedule_from_epochs():
    s = resolve_schedule(TrainConfig(batch_size=4, accum_steps=2, epochs=5, warmup_epochs=0.5), 130, world_size=2)
    assert (s.global_batch, s.steps_per_epoch, s.max_steps, s.warmup_steps) == (16, 8, 40, 4)
    with pytest.raises(ValueError, match="10 samples"):
        resolve_schedule(TrainConfig(batch_size=8), 10, world_size=2)


def test_warmup_truncates_like_the_original():
    # instruction tuning: int(warmup_ratio · steps_per_epoch · epochs) = int(0.1 · 55 · 5) = 27, not round(27.5) = 28
    cfg = TrainConfig(batch_size=1, epochs=1, warmup_epochs=0.5, lr=1e-3, min_lr=1e-4, device="cpu", progress=False)
    assert resolve_schedule(cfg, 55).warmup_steps == 27
    assert resolve_schedule(TrainConfig(batch_size=1, warmup_epochs=0.5, warmup_rounding="round"), 55).warmup_steps == 28
    assert resolve_schedule(TrainConfig(batch_size=1, warmup_epochs=2), 55).warmup_steps == 110  # whole epochs: exact
    assert resolve_schedule(TrainConfig(batch_size=1, warmup_epochs=0.29), 100).warmup_steps == 29  # 28.999…: no loss
    with pytest.raises(ValueError, match="warmup_rounding"):
        TrainConfig(warmup_rounding="ceil")
    # a real run of 55 updates: warm-up over updates 0..26, the cosine starts at update 27
    model, _, loss_fn = demo_task(n=55, dropout=0.0)
    rows = train(model, DemoDataset(55), loss_fn, cfg).history
    lrs = [r["lr"] for r in rows]
    assert len(lrs) == 55
    assert lrs[:27] == pytest.approx([1e-3 * (k + 1) / 27 for k in range(27)])
    assert lrs[26] == pytest.approx(1e-3) and lrs[27] == pytest.approx(1e-3) and lrs[28] < 1e-3
    assert lrs[28] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + np.cos(np.pi * 1 / 28)))


def test_weight_decay_follows_a_cosine_to_weight_decay_end():
    seen = []
    record = lambda s: seen.append([g["weight_decay"] for g in s.optimizer.param_groups])
    model, data, loss_fn = demo_task(n=256, dropout=0.0)
    result = train(model, data, loss_fn, small_cfg(max_steps=10, weight_decay=0.1, weight_decay_end=0.01),
                   callbacks=[record])
    by_hand = [0.01 + 0.5 * (0.1 - 0.01) * (1 + np.cos(np.pi * k / 10)) for k in range(10)]  # LaBraM's cosine_scheduler
    assert np.allclose([wd for wd, _ in seen], by_hand, rtol=0, atol=1e-15)
    assert [nd for _, nd in seen] == [0.0] * 10                  # groups without decay stay without
    assert np.allclose([r["weight_decay"] for r in result.history], by_hand)
    assert wd_at(10, 0.1, 0.01, 10) == 0.01 and wd_at(3, 0.1, None, 10) == 0.1
    constant = []
    model2, _, _ = demo_task(n=256, dropout=0.0)
    rows = train(model2, data, loss_fn, small_cfg(max_steps=10, weight_decay=0.1),
                 callbacks=[lambda s: constant.append(s.optimizer.param_groups[0]["weight_decay"])]).history
    assert constant == [0.1] * 10 and "weight_decay" not in rows[0]  # unset: constant, as the original
    assert not torch.equal(model.net[0].weight, model2.net[0].weight)  # the schedule reached AdamW


def nan_at(k):
    "demo_loss, but update k's loss is NaN (a real NaN: the gradients are NaN too)."
    def loss_fn(model, batch, state):
        loss, terms = demo_loss(model, batch)
        return (loss * float("nan") if state.step == k else loss), terms
    return loss_fn


class RecordedDemo(DemoDataset):
    "The toy data with the provenance a WindowDataset records (recording, start second)."
    def __init__(self, n=256):
        super().__init__(n)
        self.recordings, self.start_s = [f"sub{i // 8:02d}.edf" for i in range(n)], [2.0 * (i % 8) for i in range(n)]


def test_nonfinite_loss_stops_naming_step_batch_and_checkpoint(tmp_path):
    out = tmp_path / "run"
    model = demo_task(n=256, dropout=0.0)[0]
    cfg = small_cfg(max_steps=10, ckpt_every=2, out_dir=str(out), seed=3)
    with pytest.raises(FloatingPointError) as err:
        train(model, RecordedDemo(), nan_at(5), cfg)
    msg = str(err.value)
    bad = ShardedBatchSampler(256, 16, seed=3).micro_batch(epoch_order(256, 0, 3), 5, 0).tolist()
    names = describe_samples(RecordedDemo(), bad)
    assert "loss is nan at step 6" in msg and "epoch 0, update 5 of the epoch" in msg
    assert f"dataset indices {bad[:12]}"[:-1] in msg and str(names[:12])[:-1] in msg and names[0].startswith("sub")
    assert f"Last good checkpoint: {out / 'checkpoints' / 'step_00000004.pt'}" in msg
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    # no recordings known: the indices still name the batch; before any checkpoint, it says so
    with pytest.raises(FloatingPointError, match=r"(?s)step 1 .*dataset indices \[.*No checkpoint was written yet"):
        train(demo_task(n=256)[0], DemoDataset(256), nan_at(0), small_cfg(max_steps=3))


def test_nonfinite_loss_can_be_skipped(tmp_path):
    snaps = []
    model = demo_task(n=256, dropout=0.0)[0]
    cfg = small_cfg(max_steps=10, on_nonfinite="skip", out_dir=str(tmp_path / "run"))
    result = train(model, RecordedDemo(), nan_at(5), cfg,
                   callbacks=[lambda s: snaps.append({k: v.clone() for k, v in model.state_dict().items()})])
    assert result.step == 10
    assert [r["nonfinite_skipped"] for r in result.history] == [0] * 5 + [1] * 5
    assert all(torch.equal(snaps[5][k], snaps[4][k]) for k in snaps[4])      # the NaN update changed nothing
    assert not all(torch.equal(snaps[6][k], snaps[5][k]) for k in snaps[5])  # the next one trains
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    opt_state = load_checkpoint(result.checkpoint)["optimizer"]["state"]
    assert {int(s["step"]) for s in opt_state.values()} == {9}  # AdamW stepped 9 times in 10 updates
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["nonfinite_skipped"] == 1


def test_param_groups_cover_every_parameter_exactly_once():
    model = DemoMLP()
    model.net[0].bias.requires_grad_(False)  # frozen parameters need no group
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    in_groups = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(in_groups) == trainable
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    # name patterns move matrices to the no-decay group too
    groups = weight_decay_groups(model, 0.1, no_decay=["net.4.*"])
    assert any(p is model.net[4].weight for p in groups[1]["params"])
    # a forgotten or duplicated parameter is an error that names it
    groups = weight_decay_groups(model, 0.1)
    with pytest.raises(ValueError, match=r"net\.1\.weight"):
        check_param_groups(model, [groups[0]])
    with pytest.raises(ValueError, match=r"net\.0\.weight"):
        check_param_groups(model, groups + [{"params": [model.net[0].weight]}])
    with pytest.raises(ValueError, match="not a parameter"):
        check_param_groups(model, groups + [{"params": [torch.nn.Parameter(torch.zeros(2))]}])


def test_lr_scale_groups_follow_the_schedule():
    model, data, loss_fn = demo_task(n=64, dropout=0.0)
    head = list(model.net[4].parameters())
    groups = [{"params": head, "lr_scale": 0.25},
              {"params": [p for p in model.parameters() if all(p is not h for h in head)]}]
    seen = []
    cfg = small_cfg(max_steps=3, batch_size=16, warmup_steps=2)
    train(model, data, loss_fn, cfg, param_groups=groups,
          callbacks=[lambda s: seen.append([g["lr"] for g in s.optimizer.param_groups])])
    expected = [lr_at(k, cfg.lr, cfg.min_lr, 2, 3) for k in range(3)]
    assert np.allclose(seen, [[0.25 * e, e] for e in expected])


def test_sharding_union_of_ranks_is_the_single_process_batch():
    n, seed = 203, 7
    one = ShardedBatchSampler(n, batch_size=12, seed=seed)
    two = [ShardedBatchSampler(n, batch_size=3, world_size=2, rank=r, accum_steps=2, seed=seed) for r in range(2)]
    for epoch in range(3):
        for s in [one, *two]:
            s.set_epoch(epoch)
        single = list(one)
        per_rank = [list(s) for s in two]
        assert len(single) == n // 12 and all(len(p) == 2 * (n // 12) for p in per_rank)
        for k, batch in enumerate(single):
            union = sorted(per_rank[0][2 * k] + per_rank[0][2 * k + 1] + per_rank[1][2 * k] + per_rank[1][2 * k + 1])
            assert union == sorted(batch)
        used = [i for b in single for i in b]
        assert len(set(used)) == len(used) == 12 * (n // 12)
    # resume position: starting at update 5 yields exactly the tail of the full epoch
    one.set_epoch(2)
    full = list(one)
    one.set_epoch(2, start_step=5)
    assert list(one) == full[5:]
    assert not np.array_equal(epoch_order(n, 0, seed), epoch_order(n, 1, seed))
    assert np.array_equal(epoch_order(n, 1, seed, shuffle=False), np.arange(n))


# --- the loop, in process ----------------------------------------------------------------------

def test_gradient_accumulation_equals_one_bigger_batch():
    big = weights_after(small_cfg(batch_size=16))
    accumulated = weights_after(small_cfg(batch_size=8, accum_steps=2))
    start = demo_task(n=256, dropout=0.0)[0].state_dict()
    assert_same(big, accumulated, atol=1e-6)
    assert max((big[k] - start[k]).abs().max().item() for k in big) > 1e-3  # training moved the weights


def test_metrics_state_and_eval_do_not_disturb_training(tmp_path):
    progress = []

    def loss_with_state(model, batch, state):
        progress.append(state.progress)
        return demo_loss(model, batch)

    def noisy_eval(model):  # draws random numbers: must not change what training draws
        return {"noise": torch.rand(3).sum()}

    cfg = small_cfg(max_steps=4, out_dir=str(tmp_path / "a"), eval_every=2, log_every=1)
    model, data, _ = demo_task(n=256, dropout=0.3)
    result = train(model, data, loss_with_state, cfg, eval_fn=noisy_eval)
    assert progress == [0.0, 0.25, 0.5, 0.75]
    rows = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"step", "epoch", "lr", "loss", "acc", "grad_norm", "samples_per_s", "time"} <= set(rows[0])
    assert "eval_noise" in rows[1] and "eval_noise" not in rows[0]
    assert rows == result.history
    plain = weights_after(small_cfg(max_steps=4), dropout=0.3)
    assert_same({k: v for k, v in model.state_dict().items()}, plain)


def test_failed_checkpoint_write_leaves_the_previous_one(tmp_path):
    out = tmp_path / "run"
    cfg = small_cfg(max_steps=4, ckpt_every=2, keep_last=1, out_dir=str(out))
    weights_after(cfg, dropout=0.1)
    ckpt_dir = out / "checkpoints"
    good = checkpoint_path(ckpt_dir, 4)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [good.name]
    before = good.read_bytes()

    class FailsInsideWriter:  # pickled after the big tensor: the temporary file is half written
        def __reduce__(self):
            raise OSError("disk full (simulated)")

    for step in (6, 4):  # a new step, and overwriting the existing one
        with pytest.raises(OSError, match="disk full"):
            save_train_checkpoint({"model": torch.zeros(100_000), "x": FailsInsideWriter()}, ckpt_dir, step, keep_last=1)
        assert sorted(p.name for p in ckpt_dir.iterdir()) == [good.name]  # no temp file, nothing pruned
        assert good.read_bytes() == before
    # a temp file left by a process killed mid-write is ignored and cleaned up on resume
    (ckpt_dir / ".step_00000006.pt.abc123.tmp").write_bytes(b"partial")
    assert latest_checkpoint(ckpt_dir) == good
    model, data, loss_fn = demo_task(n=256, dropout=0.1)
    result = train(model, data, loss_fn, small_cfg(max_steps=6, ckpt_every=2, keep_last=1, out_dir=str(out)))
    assert result.resumed_from == good and result.step == 6
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [checkpoint_path(ckpt_dir, 6).name]
    assert load_checkpoint(good.with_name("step_00000006.pt"))["step"] == 6


# --- real processes ---------------------------------------------------------------------------

def test_two_processes_match_one_process_with_the_global_batch(tmp_path):
    flags = ["--steps", "6", "--warmup-steps", "2", "--lr", "3e-3", "--min-lr", "3e-4", "--weight-decay", "0.01",
             "--grad-clip", "1.0", "--dropout", "0", "--seed", "3", "--n-samples", "256", "--device", "cpu"]
    # 2 ranks × batch 2 × 2 accumulation steps = global batch 8
    proc = launch_torchrun(2, ["neurolm_nb.training", "--demo", "--no-progress", "--out-dir", tmp_path / "ddp",
                               "--batch-size", "2", "--accum-steps", "2", *flags], env={"OMP_NUM_THREADS": "1"})
    assert '"world_size": 2' in proc.stdout
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "ddp" / "checkpoints"))
    assert ckpt["step"] == 6 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not any(k.startswith("module.") for k in ckpt["model"])
    cfg = small_cfg(max_steps=6, warmup_steps=2, batch_size=8, seed=3, out_dir=str(tmp_path / "one"))
    model, data, loss_fn = demo_task(n=256, dropout=0.0, seed=3)
    train(model, data, loss_fn, cfg)
    assert_same(ckpt["model"], model.state_dict(), atol=1e-6)
    start = demo_task(n=256, dropout=0.0, seed=3)[0].state_dict()
    assert max((ckpt["model"][k] - start[k]).abs().max().item() for k in start) > 1e-3
    # the logged loss of the two ranks is the mean over the global batch, as in one process
    ddp_rows, one_rows = read_metrics(tmp_path / "ddp" / "metrics.jsonl"), read_metrics(tmp_path / "one" / "metrics.jsonl")
    assert np.allclose([r["loss"] for r in ddp_rows], [r["loss"] for r in one_rows], atol=1e-6)
    assert np.allclose([r["grad_norm"] for r in ddp_rows], [r["grad_norm"] for r in one_rows], rtol=1e-5)


@contextlib.contextmanager
def one_thread():
    "Compute like the OMP_NUM_THREADS=1 subprocesses, so results can be compared bit for bit."
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    # dropout on and shuffled data crossing an epoch boundary: RNG and data position must come back
    flags = ["--demo", "--no-progress", "--steps", "24", "--ckpt-every", "4", "--batch-size", "8",
             "--n-samples", "128", "--dropout", "0.3", "--warmup-steps", "3", "--lr", "3e-3", "--seed", "5",
             "--device", "cpu"]
    victim = subprocess.Popen([sys.executable, "-m", "neurolm_nb.training", "--out-dir", str(tmp_path / "killed"),
                               "--step-delay", "0.15", *flags], env=SUBPROCESS_ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ckpt_dir = tmp_path / "killed" / "checkpoints"
        deadline = time.time() + 90
        while True:
            last = latest_checkpoint(ckpt_dir)
            if last is not None and load_step(last) >= 8:
                break
            assert victim.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint after 90 s"
            time.sleep(0.02)
        os.kill(victim.pid, signal.SIGKILL)
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.wait()
    assert victim.returncode == -signal.SIGKILL
    killed_at = load_step(latest_checkpoint(ckpt_dir))
    assert 8 <= killed_at < 24, killed_at

    with one_thread():  # the uninterrupted reference run
        straight = run_demo(["--out-dir", tmp_path / "straight", *flags])

    with one_thread():
        resumed = run_demo(["--out-dir", tmp_path / "killed", *flags])
    assert resumed.resumed_from is not None and load_step(resumed.resumed_from) == killed_at
    a = load_checkpoint(straight.checkpoint)
    b = load_checkpoint(resumed.checkpoint)
    assert a["step"] == b["step"] == 24 and (a["epoch"], a["batch_in_epoch"]) == (b["epoch"], b["batch_in_epoch"]) == (1, 8)
    assert_same(a["model"], b["model"])  # bit for bit
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    rows_a, rows_b = read_metrics(tmp_path / "straight" / "metrics.jsonl"), read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [(r["step"], r["loss"], r["lr"]) for r in rows_a] == [(r["step"], r["loss"], r["lr"]) for r in rows_b]
    assert [r["step"] for r in rows_b] == list(range(1, 25))  # rows the killed run wrote after its checkpoint are gone


def load_step(path: Path) -> int:
    return int(path.stem.split("_")[-1])


def test_launch_torchrun_failure_reports_the_output_tail():
    with pytest.raises(RuntimeError, match="(?s)exit code.*nothing to do"):
        launch_torchrun(1, ["neurolm_nb.training", "--steps", "3"])


# --- operator-grade runs: safe checkpoints, bounded waits, reruns ---------------------------------

def test_training_checkpoints_load_with_weights_only(tmp_path):
    "The loop's checkpoints (model, optimizer, every rank's RNG, config, callback state) are plain data."
    cfg = small_cfg(max_steps=4, ckpt_every=2, keep_last=None, dist_timeout_s=120.0, out_dir=str(tmp_path))
    model, data, loss_fn = demo_task(n=256, dropout=0.1)
    train(model, data, loss_fn, cfg)
    files = sorted((tmp_path / "checkpoints").glob("step_*.pt"))
    assert [f.name for f in files] == ["step_00000002.pt", "step_00000004.pt"]
    for f in files:
        saved = torch.load(f, weights_only=True)
        assert saved["config"]["dist_timeout_s"] == 120.0 and len(saved["rng"]) == 1
    resumed = train(demo_task(n=256, dropout=0.1)[0], data, loss_fn, dataclasses.replace(cfg, max_steps=6))
    assert resumed.resumed_from == files[-1] and resumed.step == 6


def test_dist_timeout_comes_from_the_config_the_environment_or_the_default(monkeypatch):
    monkeypatch.delenv(DIST_TIMEOUT_ENV, raising=False)
    assert dist_timeout() == DEFAULT_DIST_TIMEOUT_S == 600.0
    monkeypatch.setenv(DIST_TIMEOUT_ENV, "75")
    assert (dist_timeout(), dist_timeout(30)) == (75.0, 30.0)
    with pytest.raises(ValueError, match="dist_timeout_s"):
        dist_timeout(-5)
    assert hang_timeout(0) == 0.0 and DEFAULT_HANG_TIMEOUT_S < DEFAULT_DIST_TIMEOUT_S


def test_dist_timeout_flag_reaches_the_workers_and_ddp_still_runs(tmp_path):
    "--dist-timeout-s reaches each worker's TrainConfig (launch_torchrun also exports it), and a healthy run is undisturbed."
    proc = launch_torchrun(2, ["neurolm_nb.training", "--demo", "--no-progress", "--device", "cpu", "--steps", "3",
                               "--out-dir", tmp_path / "ddp", "--dist-timeout-s", "45"],
                           dist_timeout_s=45, hang_timeout_s=60, timeout_s=240)
    assert '"world_size": 2' in proc.stdout
    assert load_checkpoint(latest_checkpoint(tmp_path / "ddp" / "checkpoints"))["config"]["dist_timeout_s"] == 45.0


def test_the_training_notebook_reruns_into_the_same_out_dir(tmp_path, nbs_dir):
    "A pipeline rerun: 06_training twice into one out_dir. Its demos start from emptied scratch folders."
    import papermill as pm
    out = tmp_path / "out"
    for attempt in ("first", "second"):
        pm.execute_notebook(str(nbs_dir / "06_training.ipynb"), str(tmp_path / f"{attempt}.ipynb"),
                            parameters={"out_dir": str(out)}, kernel_name="python3", cwd=str(nbs_dir),
                            progress_bar=False, execution_timeout=600)
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["resume_exact"] is True and metrics["steps"] == 60, (attempt, metrics)


# --- AdamW implementation (TrainConfig.optimizer_impl) ---------------------------------------------------------------

def _losses_with(impl: str, steps: int = 6) -> tuple[list[float], str]:
    "Losses of `steps` AdamW updates of the demo MLP (weight decay on, two groups) with `impl`; and the impl it ran."
    from neurolm_nb.training import optimizer_impl_of
    model, data, loss_fn = demo_task(n=64, dropout=0.0, seed=0)
    opt = build_optimizer(model, small_cfg(optimizer_impl=impl, lr=1e-2))
    batch = torch.utils.data.default_collate([data[i] for i in range(32)])
    losses = []
    for _ in range(steps):
        loss = loss_fn(model, batch)
        loss = loss[0] if isinstance(loss, tuple) else loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, optimizer_impl_of(opt)


def test_default_adamw_is_fused_on_cpu_and_matches_plain_within_loss_tolerance():
    from neurolm_nb.testing import check_parity
    assert TrainConfig().optimizer_impl == "auto"
    plain, plain_impl = _losses_with("plain")
    default, default_impl = _losses_with(TrainConfig().optimizer_impl)
    assert plain_impl == "plain" and default_impl == "fused"  # torch >= 2.4 has a fused AdamW on the CPU
    assert plain[-1] < plain[0]  # it trains
    check_parity(default, plain, "loss", "losses, default AdamW vs the plain loop")
    for impl in ("fused", "foreach"):
        losses, ran = _losses_with(impl)
        assert ran == impl
        check_parity(losses, plain, "loss", f"losses, {impl} vs plain")


def test_optimizer_impl_is_checked_and_reaches_the_optimizer_defaults():
    with pytest.raises(ValueError, match="TrainConfig.optimizer_impl"):
        TrainConfig(optimizer_impl="apex")
    model = DemoMLP()
    for impl, fused, foreach in [("plain", False, False), ("foreach", False, True), ("fused", True, False),
                                 ("auto", True, False)]:
        d = build_optimizer(model, TrainConfig(optimizer_impl=impl)).defaults
        assert (bool(d["fused"]), bool(d["foreach"])) == (fused, foreach), impl


def test_train_uses_the_configured_impl_and_a_resume_switches_a_plain_checkpoint_to_it(tmp_path):
    from neurolm_nb.training import optimizer_impl_of
    seen = []

    def spy(state):  # records what the optimizer train() built runs, after each update
        seen.append(optimizer_impl_of(state.optimizer))

    plain = weights_after(small_cfg(optimizer_impl="plain"))
    fused = weights_after(small_cfg(), callbacks=[spy])
    assert seen and set(seen) == {"fused"}
    assert_same(plain, fused, atol=1e-5)
    # a checkpoint written by a plain run, resumed with the default, continues with the fused kernel
    out = tmp_path / "run"
    weights_after(small_cfg(optimizer_impl="plain", ckpt_every=4, keep_last=None, out_dir=str(out)))
    latest_checkpoint(out / "checkpoints").unlink()  # drop the final one: the resume starts at update 4
    seen.clear()
    resumed = weights_after(small_cfg(out_dir=str(out)), callbacks=[spy])
    assert len(seen) == 4 and set(seen) == {"fused"}
    assert_same(plain, resumed, atol=1e-5)


def test_stage_datasets_root_prefers_datasets_root_then_the_run_root_and_names_the_setup():
    "The built datasets of a stage: its own datasets_root, else <run_root>/datasets; neither is an error naming the setup."
    from types import SimpleNamespace
    from neurolm_nb.training import stage_datasets_root

    assert stage_datasets_root(SimpleNamespace(datasets_root="/data/built", run_root="runs/x")) == "/data/built"
    assert Path(stage_datasets_root(SimpleNamespace(datasets_root=None, run_root="runs/x"))) == Path("runs/x/datasets")

    @dataclasses.dataclass
    class SomeSetup:
        datasets_root: str | None = None
        run_root: str | None = None

    with pytest.raises(ValueError, match="SomeSetup needs datasets_root or run_root"):
        stage_datasets_root(SomeSetup())


def test_train_config_checks_name_the_field_and_lists_become_tuples():
    cfg = TrainConfig(betas=[0.9, 0.95], no_decay=["pos_embed"])
    assert cfg.betas == (0.9, 0.95) and cfg.no_decay == ("pos_embed",)
    for kw, message in ((dict(accum_steps=0), "TrainConfig.accum_steps must be >= 1"),
                        (dict(max_steps=-1), "TrainConfig.max_steps must be >= 0"),
                        (dict(grad_clip=-1.0), "TrainConfig.grad_clip"),
                        (dict(warmup_rounding="ceil"), "TrainConfig.warmup_rounding")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(**kw)
