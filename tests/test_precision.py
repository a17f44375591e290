"""The precision policy (neurolm_nb.core.get_dtype / autocast_context) and mixed precision in the training loop
(neurolm_nb.training.train): auto picks per device, an impossible bf16 is refused with advice, fp16 trains with loss
scaling (unscaled before clipping, skipped steps counted, the scaler's state checkpointed and resumed exactly).
Everything runs on a CPU: PyTorch's CPU autocast supports float16 and bfloat16, and GradScaler works on the CPU."""
import math

import pytest
import torch

from neurolm_nb.core import autocast_context, bf16_supported, get_device, get_dtype, latest_checkpoint, load_checkpoint
from neurolm_nb.training import TrainConfig, demo_loss, demo_task, read_metrics, train

pytestmark = pytest.mark.usefixtures("one_thread")


def run(dtype, loss_fn=demo_loss, steps=12, callbacks=(), **kw):
    model, data, _ = demo_task(n=256, dropout=0.0, seed=0)
    cfg = TrainConfig(**{**dict(lr=3e-3, min_lr=3e-4, warmup_steps=3, max_steps=steps, batch_size=16, grad_clip=1.0,
                                device="cpu", dtype=dtype, progress=False), **kw})
    return train(model, data, loss_fn, cfg, callbacks=list(callbacks))


def overflow_at(k, factor=1e6):
    "demo_loss, but update k's loss is multiplied by `factor`: finite in float32, its fp16 gradients overflow."
    def loss_fn(model, batch, state):
        loss, terms = demo_loss(model, batch)
        return (loss * factor if state.step == k else loss), terms
    return loss_fn


def snapshots():
    snaps = []
    return snaps, lambda state: snaps.append({k: v.clone() for k, v in state.model.state_dict().items()})


def test_auto_precision_policy_on_this_machine():
    assert get_dtype("auto", "cpu") == torch.float32  # CPU: float32 (fixture parity; CPU autocast is slow)
    assert get_dtype("fp16", "cpu") == torch.float16 and get_dtype("bf16", "cpu") == torch.bfloat16
    assert get_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    if torch.cuda.is_available():  # a GPU: bf16 where native, else fp16 (with the scaler in train)
        dev = get_device("auto")
        assert get_dtype("auto", dev) == (torch.bfloat16 if bf16_supported(dev) else torch.float16)
    with pytest.raises(ValueError, match="int8"):
        get_dtype("int8")


def test_bf16_is_refused_where_unsupported_naming_device_and_alternatives():
    assert bf16_supported("cpu") and not bf16_supported("meta")
    with pytest.raises(ValueError, match=r"bfloat16 was asked for, but meta has no autocast; use dtype='fp32', 'auto'"):
        get_dtype("bf16", "meta")
    with pytest.raises(ValueError, match="meta"):
        get_dtype("fp16", "meta")
    assert get_dtype("fp32", "meta") == torch.float32
    if torch.cuda.is_available() and not bf16_supported("cuda"):  # e.g. a V100: fp16 is offered
        with pytest.raises(ValueError, match="'fp16' \\(float16 autocast with loss scaling\\)"):
            get_dtype("bf16", "cuda")


def test_cpu_autocast_runs_both_16_bit_formats():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    for dtype in (torch.float16, torch.bfloat16):
        with autocast_context("cpu", dtype):
            assert (a @ b).dtype == dtype
    with autocast_context("cpu", torch.float32):
        assert (a @ b).dtype == torch.float32


def test_fp16_and_bf16_train_and_fp16_unscales_before_clipping():
    fp32, fp16, bf16 = run("fp32", steps=32), run("fp16", steps=32), run("bf16", steps=32)
    rows = fp16.history
    assert rows[0]["loss_scale"] == 65536.0 and rows[-1]["scaler_skipped"] == 0
    # the logged (and clipped) norm is the true gradient's: the scaled one would be 65536 times larger
    for a, b in zip(rows[:3], fp32.history[:3]):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-3)
    mean = lambda rows: sum(r["loss"] for r in rows) / len(rows)
    for r in (fp32, fp16, bf16):
        assert mean(r.history[-4:]) < 0.8 * mean(r.history[:4])  # learns
        assert r.history[-1]["loss"] == pytest.approx(fp32.history[-1]["loss"], abs=0.02)
    assert "loss_scale" not in bf16.history[0] and "loss_scale" not in fp32.history[0]


def test_fp16_overflow_skips_exactly_that_step_and_counts_it(tmp_path):
    snaps, snap = snapshots()
    res = run("fp16", overflow_at(5), callbacks=[snap], out_dir=str(tmp_path / "run"))
    rows = res.history
    assert [r["scaler_skipped"] for r in rows] == [0] * 5 + [1] * 7
    assert rows[5]["loss_scale"] == rows[4]["loss_scale"] / 2 and not math.isfinite(rows[5]["grad_norm"])
    assert all(torch.equal(snaps[5][k], snaps[4][k]) for k in snaps[4])       # the overflowed step moved nothing
    assert not all(torch.equal(snaps[6][k], snaps[5][k]) for k in snaps[5])   # training goes on
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["scaler_skipped"] == 1
    ckpt = load_checkpoint(res.checkpoint)
    assert ckpt["scaler"]["scale"] == rows[-1]["loss_scale"] == 32768.0 and ckpt["counters"]["scaler_skipped"] == 1


class Crash(Exception):
    pass


def crash_at(n):
    def callback(state):
        if state.step == n:
            raise Crash(f"crash at {n}")
    return callback


def test_fp16_resume_restores_the_scaler_and_is_exact(tmp_path):
    # an overflow at update 2 halves the scale before the checkpoint at 4: a resume must continue at 32768
    kw = dict(loss_fn=overflow_at(2), steps=10, ckpt_every=4, dtype="fp16")
    straight = run(out_dir=str(tmp_path / "straight"), **kw)
    with pytest.raises(Crash):
        run(out_dir=str(tmp_path / "crashed"), callbacks=[crash_at(6)], **kw)
    assert load_checkpoint(latest_checkpoint(tmp_path / "crashed" / "checkpoints"))["scaler"]["scale"] == 32768.0
    resumed = run(out_dir=str(tmp_path / "crashed"), **kw)
    assert resumed.resumed_from.name == "step_00000004.pt"
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a["scaler"] == b["scaler"] and a["counters"] == b["counters"] == {"scaler_skipped": 1, "nonfinite_skipped": 0}
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    rows_a = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    rows_b = read_metrics(tmp_path / "crashed" / "metrics.jsonl")
    assert [(r["loss"], r["loss_scale"], r["scaler_skipped"]) for r in rows_a] == \
           [(r["loss"], r["loss_scale"], r["scaler_skipped"]) for r in rows_b]


def test_fp16_accumulation_matches_one_bigger_batch():
    def weights(**kw):
        return {k: v.clone() for k, v in run("fp16", **kw).model.state_dict().items()}
    big, accumulated = weights(batch_size=16), weights(batch_size=8, accum_steps=2)
    start = demo_task(n=256, dropout=0.0, seed=0)[0].state_dict()
    diff = max((big[k] - accumulated[k]).abs().max().item() for k in big)
    moved = max((big[k] - start[k]).abs().max().item() for k in big)
    assert diff < 1e-3 < moved, (diff, moved)
