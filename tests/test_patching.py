"""Token layouts (neurolm_nb.patching): parity with the official loaders, errors, round trips."""
import pickle

import numpy as np
import pytest
import torch

from conftest import load_official  # tests/ is on sys.path under pytest

from neurolm_nb.channels import NEUROLM_CHANNELS, PAD_INDEX, channel_indices, labram_channel_indices
from neurolm_nb.core import load_json
from neurolm_nb.testing import check_parity
from neurolm_nb.patching import (
    NeuroLMCollate, PatchingError, channel_major_to_time_major, collate_labram, collate_neurolm,
    labram_patches, labram_to_neurolm, max_seconds_for, neurolm_sample, neurolm_to_labram, neurolm_tokens,
    pad_tokens, split_patches, time_major_order, time_major_to_channel_major,
)

WORKLOAD = ["FP1", "FP2", "F3", "F4", "F7", "F8", "T3", "T4", "C3", "C4",
            "T5", "T6", "P3", "P4", "O1", "O2", "FZ", "CZ", "PZ"]
HMC = ["F4", "C4", "O2", "C3"]




def window(n_channels, seconds, seed=0):
    return np.random.default_rng(seed).normal(0, 20, (n_channels, seconds * 200))


# ---------------------------------------------------------------- parity with the official code
def test_neurolm_vq_tiny_inputs_reproduced(fixtures_dir):
    ref = load_official(fixtures_dir, "neurolm_vq_tiny.safetensors")
    batch = collate_neurolm([(ref["input.raw_uV_A"], WORKLOAD), (ref["input.raw_uV_B"], HMC)], max_tokens=128)
    check_parity(batch["X"], ref["input.X"], "data", "X")  # fixtures README §5: no FFT, atol 1e-6
    for key in ("input_chans", "input_time", "input_mask"):
        assert torch.equal(batch[key], ref["input." + key].to(batch[key].dtype)), key
    assert batch["input_chans"].dtype == batch["input_time"].dtype == torch.int64
    assert batch["input_mask"].dtype == torch.bool


def test_neurolm_vq_tiny_from_float64_recording(fixtures_dir):
    # preprocessed recordings are float64 µV: the result must be the same float32 tokens
    ref = load_official(fixtures_dir, "neurolm_vq_tiny.safetensors")
    s = neurolm_sample(ref["input.raw_uV_B"].double().numpy(), HMC, 128)
    check_parity(s["X"], ref["input.X"][1], "data", "X from float64")


def test_labram_vqnsp_inputs_reproduced(fixtures_dir):
    ref = load_official(fixtures_dir, "labram_vqnsp.safetensors")
    batch = collate_labram([(w, WORKLOAD) for w in ref["input.raw_uV"]])
    check_parity(batch["x"], ref["input.x"], "data", "x")
    assert batch["input_chans"].tolist() == ref["input.input_chans"].tolist()
    assert batch["input_chans"].tolist() == labram_channel_indices(WORKLOAD).tolist()


def test_stair_case_streams_reproduced(fixtures_dir):
    ref = load_official(fixtures_dir, "neurolm_sequences.safetensors")
    cases = load_json(fixtures_dir / "neurolm_sequences.json")["stair_cases"]
    assert len(cases) == 5
    for case in cases:
        s = neurolm_sample(np.zeros((case["C"], case["seconds"] * 200)), case["channels"], case["L"])
        for key in ("input_chans", "input_time", "input_mask"):
            assert s[key].tolist() == ref[f"stair.case{case['case']}.{key}"].tolist(), (case["case"], key)


# ---------------------------------------------------------------- layout
def test_time_major_token_order():
    w = window(3, 2)
    tok = neurolm_tokens(w, ["F4", "C4", "O2"])
    rows = channel_indices(["F4", "C4", "O2"])
    for j in range(6):
        second, c = divmod(j, 3)
        np.testing.assert_allclose(tok["X"][j].numpy(), w[c, second * 200:(second + 1) * 200] / 100, rtol=1e-6)
        assert tok["input_chans"][j] == rows[c] and tok["input_time"][j] == second


def test_explicit_indices_equal_names():
    w = window(4, 3)
    a = neurolm_tokens(w, HMC)
    b = neurolm_tokens(w, channel_indices(HMC))
    c = neurolm_tokens(torch.as_tensor(w), torch.as_tensor(channel_indices(HMC)))
    for key in a:
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key])


def test_padding_values():
    s = neurolm_sample(window(4, 3), HMC, max_tokens=20)
    assert s["X"][12:].abs().sum() == 0
    assert s["input_chans"][12:].eq(PAD_INDEX).all() and s["input_time"][12:].eq(0).all()
    assert s["input_mask"].tolist() == [True] * 12 + [False] * 8
    assert NEUROLM_CHANNELS[PAD_INDEX] == "pad"


def test_round_trip_between_layouts():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, 200, generator=g)
    chans = torch.as_tensor(labram_channel_indices(["FP1", "CZ", "O2", "T3", "PZ"]))
    nb = labram_to_neurolm(x, chans, max_tokens=40)
    assert nb["X"].shape == (3, 40, 200) and nb["input_mask"].sum(1).tolist() == [35] * 3
    back = neurolm_to_labram(nb)
    assert torch.equal(back["x"], x) and torch.equal(back["input_chans"], chans)
    # the permutation agrees with the reshapes
    assert torch.equal(channel_major_to_time_major(x), x.flatten(1, 2)[:, time_major_order(5, 7)])
    assert torch.equal(time_major_to_channel_major(channel_major_to_time_major(x), 5), x)


def test_collate_matches_labram_layout():
    ws = [window(19, 4, seed=i) for i in range(2)]
    nb = collate_neurolm([(w, WORKLOAD) for w in ws], max_tokens=100)
    lab = collate_labram([(w, WORKLOAD) for w in ws])
    conv = neurolm_to_labram(nb)
    assert torch.equal(conv["x"], lab["x"]) and torch.equal(conv["input_chans"], lab["input_chans"])


def test_collate_labels_and_dynamic_length():
    batch = collate_neurolm([{"window": window(4, 2), "ch_names": HMC, "label": 3},
                             {"window": window(2, 5), "ch_names": ["CZ", "PZ"], "label": 1}])
    assert batch["X"].shape == (2, 10, 200)            # max_tokens=None: the longest sample
    assert batch["labels"].tolist() == [3, 1]
    assert batch["input_mask"].sum(1).tolist() == [8, 10]


def test_collate_window_dataset_items():
    # the item layout of datasets.WindowDataset: µV `x` float32, NeuroLM rows `channel_index`, extra metadata
    w = window(4, 3)
    items = [{"x": torch.as_tensor(w, dtype=torch.float32), "channel_index": torch.as_tensor(channel_indices(HMC)),
              "ch_names": HMC, "label": torch.tensor(k), "subject": "s01", "recording": "r.edf", "start_s": 2.0 * k}
             for k in range(2)]
    batch = collate_neurolm(items, max_tokens=16)
    assert set(batch) == {"X", "input_chans", "input_time", "input_mask", "labels"}
    assert batch["labels"].tolist() == [0, 1] and batch["labels"].dtype == torch.int64
    torch.testing.assert_close(batch["X"][0], neurolm_sample(w, HMC, 16)["X"], atol=1e-6, rtol=0)
    assert torch.equal(batch["input_chans"][0], neurolm_sample(w, HMC, 16)["input_chans"])
    lab = collate_labram(items)
    assert lab["x"].shape == (2, 4, 3, 200) and lab["labels"].tolist() == [0, 1]


def test_collate_in_dataloader_worker():
    # the collate object must survive pickling into a worker process
    samples = [(window(4, 2, seed=i), HMC, i % 2) for i in range(4)]
    collate = pickle.loads(pickle.dumps(NeuroLMCollate(max_tokens=16)))
    loader = torch.utils.data.DataLoader(samples, batch_size=2, collate_fn=collate, num_workers=1)
    batches = list(loader)
    assert len(batches) == 2 and batches[0]["X"].shape == (2, 16, 200)
    assert torch.equal(batches[1]["X"], collate_neurolm(samples[2:], 16)["X"])


def test_max_seconds_for():
    assert max_seconds_for(19, 1024) == 53
    assert max_seconds_for(1, 1024) == 64
    assert max_seconds_for(62, 276) == 4


# ---------------------------------------------------------------- errors
def test_error_over_64_seconds():
    with pytest.raises(PatchingError, match="65 s.*max_seconds=64"):
        neurolm_tokens(np.zeros((1, 65 * 200)), ["CZ"])


def test_error_over_token_budget():
    with pytest.raises(PatchingError, match="76 tokens.*max_tokens=64"):
        neurolm_sample(window(19, 4), WORKLOAD, max_tokens=64)
    with pytest.raises(PatchingError, match="sample 1 of the batch"):
        collate_neurolm([(window(4, 2), HMC), (window(19, 4), WORKLOAD)], max_tokens=64)


def test_error_not_whole_seconds():
    with pytest.raises(PatchingError, match="799 samples.*patch_size=200"):
        split_patches(np.zeros((19, 799)))


def test_error_non_finite_values():
    w = window(3, 1)
    w[1, 17] = np.nan
    with pytest.raises(PatchingError, match=r"NaN/inf.*\[1\]"):
        neurolm_tokens(w, ["CZ", "PZ", "FZ"])


def test_error_channel_count_mismatch():
    with pytest.raises(PatchingError, match="19 channel rows but 4 channels"):
        neurolm_tokens(window(19, 1), HMC)


def test_error_unknown_and_pad_channels():
    with pytest.raises(ValueError, match="XYZ"):
        neurolm_tokens(window(1, 1), ["XYZ"])
    with pytest.raises(PatchingError, match="136"):
        neurolm_tokens(window(1, 1), [PAD_INDEX])


def test_labram_errors():
    with pytest.raises(PatchingError, match="17 s.*max_seconds=16"):
        labram_patches(np.zeros((1, 17 * 200)), ["CZ"])
    beyond = NEUROLM_CHANNELS[128]          # row 129 of LaBraM's 129-row table
    with pytest.raises(PatchingError, match=beyond):
        labram_patches(np.zeros((1, 200)), [beyond])
    with pytest.raises(PatchingError, match="one montage"):
        collate_labram([(window(4, 2), HMC), (window(4, 2), ["FP1", "FP2", "F3", "F4"])])


def test_neurolm_to_labram_refuses_mixed_batches():
    batch = collate_neurolm([(window(4, 2), HMC), (window(4, 3), HMC)], max_tokens=12)
    with pytest.raises(PatchingError, match="different token counts"):
        neurolm_to_labram(batch)


def test_pad_tokens_error_names_budget():
    tok = neurolm_tokens(window(2, 3), ["CZ", "PZ"])
    with pytest.raises(PatchingError, match="max_tokens=5"):
        pad_tokens(tok, 5)
