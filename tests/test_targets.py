"""Reconstruction targets (neurolm_nb.targets): parity with the official code and properties."""
import math

import numpy as np
import pytest
import torch

from conftest import load_official  # tests/ is on sys.path under pytest

from neurolm_nb.patching import collate_neurolm
from neurolm_nb.testing import check_parity
from neurolm_nb.targets import (
    amplitude_spectrum, labram_targets, neurolm_targets, wrap_phase_difference, zscore_per_sample,
)

HMC = ["F4", "C4", "O2", "C3"]
WORKLOAD = ["FP1", "FP2", "F3", "F4", "F7", "F8", "T3", "T4", "C3", "C4",
            "T5", "T6", "P3", "P4", "O1", "O2", "FZ", "CZ", "PZ"]




def demo_batch(max_tokens, seed=0):
    rng = np.random.default_rng(seed)
    samples = [(rng.normal(0, 20, (19, 800)), WORKLOAD), (rng.normal(0, 5, (4, 6000)) + 3.0, HMC)]
    return collate_neurolm(samples, max_tokens=max_tokens)


def assert_phase_close(mine, ref, x):
    "Phase targets agree to README §5's atol 2e-4; at bins 0 and 100 modulo 2*pi/std (angle 0/pi vs -pi, quirk L5)."
    diff = mine - ref
    inner = torch.ones(200, dtype=torch.bool)
    inner[[0, 100]] = False
    check_parity(diff[..., inner], torch.zeros_like(diff[..., inner]), "phase", "phase, inner bins")
    std = torch.fft.fft(x.float(), dim=-1).angle().double().flatten(1).std(1).float()
    period = (2 * math.pi / std).reshape(-1, 1, 1, 1).to(diff.device)
    wrapped = wrap_phase_difference(diff[..., ~inner], period)
    check_parity(wrapped, torch.zeros_like(wrapped), "phase", "phase, bins 0 and 100")


# ---------------------------------------------------------------- parity with the official code
@pytest.mark.parametrize("threads", [1, 2])   # the FFT's rounding may depend on the thread count too
def test_neurolm_targets_match_fixture(fixtures_dir, threads):
    ref = load_official(fixtures_dir, "neurolm_vq_tiny.safetensors")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = neurolm_targets(ref["input.X"], ref["input.input_mask"])
    finally:
        torch.set_num_threads(before)
    # fixtures README §5: the float32 FFT rounds differently on different CPUs (atol/rtol 1e-5); Y_raw has no FFT
    check_parity(t["Y_freq"], ref["input.Y_freq"], "fft", "Y_freq")
    check_parity(t["Y_raw"], ref["input.Y_raw"], "data", "Y_raw")
    assert t["Y_freq"].dtype == t["Y_raw"].dtype == torch.float32


@pytest.mark.parametrize("threads", [1, 2])
def test_labram_targets_match_fixture(fixtures_dir, threads):
    ref = load_official(fixtures_dir, "labram_vqnsp.safetensors")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = labram_targets(ref["input.x"])
    finally:
        torch.set_num_threads(before)
    check_parity(t["amplitude"], ref["output.amplitude_target"], "fft", "amplitude")  # fixtures README §5
    assert_phase_close(t["phase"], ref["output.phase_target"], ref["input.x"])


def test_wrap_phase_difference():
    period = torch.tensor([[2.0], [3.0]])
    diff = torch.tensor([[2.0 + 1e-4, -4.0, 0.5], [3.0, -3.0 - 2e-4, 1.4]])
    wrapped = wrap_phase_difference(diff, period)
    torch.testing.assert_close(wrapped, torch.tensor([[1e-4, 0.0, 0.5], [0.0, -2e-4, 1.4]]), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- properties
def test_zscore_matches_per_sample_loop():
    batch = demo_batch(160)
    X, mask = batch["X"], batch["input_mask"]
    z = zscore_per_sample(X, mask)
    for b in range(2):
        v = X[b][mask[b]]
        torch.testing.assert_close(z[b][mask[b]], (v - v.mean()) / v.std(), atol=1e-6, rtol=1e-6)
    biased = zscore_per_sample(X, mask, unbiased=False)
    v = X[0][mask[0]]
    torch.testing.assert_close(biased[0][mask[0]], (v - v.mean()) / v.std(unbiased=False), atol=1e-6, rtol=1e-6)


def test_targets_ignore_padding():
    short, long = demo_batch(128), demo_batch(300)
    long["X"][~long["input_mask"]] = torch.randn(int((~long["input_mask"]).sum()), 200) * 1e4   # garbage padding
    ts, tl = neurolm_targets(short["X"], short["input_mask"]), neurolm_targets(long["X"], long["input_mask"])
    for key in ("Y_freq", "Y_raw"):
        torch.testing.assert_close(tl[key][:, :128][short["input_mask"]], ts[key][short["input_mask"]], atol=1e-6, rtol=0)
        assert tl[key][~long["input_mask"]].abs().sum() == 0
        assert ts[key][~short["input_mask"]].abs().sum() == 0


def test_statistics_over_all_200_bins():
    batch = demo_batch(128)
    X, mask = batch["X"], batch["input_mask"]
    t = neurolm_targets(X, mask)
    amp = amplitude_spectrum(X)
    for b in range(2):
        a = amp[b][mask[b]]
        expected = ((a - a.mean()) / a.std())[:, :100]     # stats over 200 bins, then cut
        torch.testing.assert_close(t["Y_freq"][b][mask[b]], expected, atol=1e-5, rtol=1e-5)
        cut = a[:, :100]
        wrong = (cut - cut.mean()) / cut.std()             # stats over the kept bins only: different
        assert (t["Y_freq"][b][mask[b]] - wrong).abs().max() > 1e-3
        y = t["Y_raw"][b][mask[b]]
        assert abs(y.mean().item()) < 1e-5 and abs(y.std().item() - 1) < 1e-5


def test_gain_invariance():
    batch = demo_batch(128)
    t1 = neurolm_targets(batch["X"], batch["input_mask"])
    t2 = neurolm_targets(batch["X"] * 10, batch["input_mask"])
    for key in t1:
        torch.testing.assert_close(t1[key], t2[key], atol=1e-5, rtol=1e-5)


def test_degenerate_samples_give_zeros_not_nan():
    X = torch.zeros(3, 6, 200)
    X[1, :4] = 5.0                                   # flat: std 0
    X[2, :2] = torch.randn(2, 200)
    mask = torch.tensor([[False] * 6, [True] * 4 + [False] * 2, [True] * 2 + [False] * 4])
    t = neurolm_targets(X, mask)
    for key in t:
        assert torch.isfinite(t[key]).all()
        assert t[key][0].abs().sum() == 0
    assert t["Y_raw"][1].abs().sum() == 0
    assert t["Y_raw"][2, :2].abs().sum() > 0


def test_dtypes_and_shape_errors():
    batch = demo_batch(128)
    t = neurolm_targets(batch["X"].to(torch.bfloat16), batch["input_mask"])
    assert t["Y_freq"].dtype == torch.float32 and t["Y_freq"].shape == (2, 128, 100)
    lt = labram_targets(torch.randn(2, 3, 4, 200, dtype=torch.float64))
    assert lt["amplitude"].dtype == torch.float32
    with pytest.raises(ValueError, match="token_mask"):
        zscore_per_sample(batch["X"], batch["input_mask"][:, :5])
    with pytest.raises(ValueError, match=r"\[B, C, A, patch\]"):
        labram_targets(torch.randn(2, 76, 200))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    batch = demo_batch(128)
    cpu = neurolm_targets(batch["X"], batch["input_mask"])
    gpu = neurolm_targets(batch["X"].cuda(), batch["input_mask"].cuda())
    for key in cpu:
        assert gpu[key].device.type == "cuda"
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], atol=1e-5, rtol=1e-5)
    x = torch.randn(2, 19, 4, 200)
    lc, lg = labram_targets(x), labram_targets(x.cuda())
    torch.testing.assert_close(lg["amplitude"].cpu(), lc["amplitude"], atol=1e-5, rtol=1e-5)
    assert_phase_close(lg["phase"].cpu(), lc["phase"], x)
