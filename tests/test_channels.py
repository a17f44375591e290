"""Channel vocabulary (neurolm_nb.channels): official order, name normalisation, errors, official indices."""
import warnings

import numpy as np
import pytest

from neurolm_nb.channels import (
    LABRAM_CHANNELS, NEUROLM_CHANNELS, PAD_INDEX, DuplicateChannelError, UnknownChannelError, channel_indices,
    channel_positions, labram_channel_indices, normalize_channel_name, normalize_channel_names, plot_topomap,
)

WORKLOAD = ["FP1", "FP2", "F3", "F4", "F7", "F8", "T3", "T4", "C3", "C4",
            "T5", "T6", "P3", "P4", "O1", "O2", "FZ", "CZ", "PZ"]


def test_vocabulary_layout():
    assert len(NEUROLM_CHANNELS) == 139
    assert len({n.upper() for n in NEUROLM_CHANNELS}) == 139
    spots = {"FP1": 0, "FPZ": 1, "AF9": 3, "F9": 14, "CZ": 41, "PZ": 63, "O1": 80, "CB2": 85, "T3": 88,
             "T6": 91, "A2": 95, "CFC1": 96, "CFC8": 103, "CCP1": 104, "CCP8": 111, "T1": 112,
             "FP1-F7": 120, "P4-O2": 135, "pad": 136, "I1": 137, "I2": 138}
    for name, i in spots.items():
        assert NEUROLM_CHANNELS[i] == name, (name, i)
    assert PAD_INDEX == 136 and NEUROLM_CHANNELS[PAD_INDEX] == "pad"
    assert LABRAM_CHANNELS == NEUROLM_CHANNELS[:136] and "pad" not in LABRAM_CHANNELS


@pytest.mark.parametrize("raw,expected", [
    ("EEG FP1-REF", "FP1"), ("EEG FP1-LE", "FP1"), ("EEG Fp1", "FP1"), ("Fp1", "FP1"), ("FP1-A1", "FP1"),
    ("EEG T3-REF", "T3"), ("EEG F4-M1", "F4"), ("EEG C3-M2", "C3"), ("fpz", "FPZ"), ("CB1", "CB1"),
    ("  EEG  Cz  ", "CZ"), ("Fp1.", "FP1"), ("FP1-F7", "FP1-F7"), ("EEG FP1-F7", "FP1-F7"),
    ("eeg p4-o2", "P4-O2"), ("EEG FTT9H-REF", "FTT9h"), ("TTP7h", "TTP7h"), ("EEG T1-REF", "T1"),
    ("EEG A1-REF", "A1"), ("M2", "M2"), ("Iz", "IZ"), ("O10", "O10"),
])
def test_normalize_known_names(raw, expected):
    assert normalize_channel_name(raw) == expected


@pytest.mark.parametrize("raw", ["EEG A2-A1", "ECG ECG", "EOG", "EMG chin", "F3-F7", "FZ-CZ", "EOG E1-M2", "pad", "EEG XYZ", ""])
def test_unknown_names_raise_naming_them(raw):
    with pytest.raises(UnknownChannelError) as e:
        normalize_channel_name(raw)
    assert repr(raw) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_unknown_error_lists_closest_names():
    with pytest.raises(UnknownChannelError, match="closest known: .*FP1"):
        normalize_channel_name("EEG FPP1")
    with pytest.raises(UnknownChannelError) as e:
        normalize_channel_names(["EEG Fp1", "EEG Czz", "ECG ECG"])
    msg = str(e.value)
    assert "'EEG Czz'" in msg and "'ECG ECG'" in msg and "CZ" in msg and "2 of 3" in msg


def test_normalize_names_modes():
    raw = ["EEG Fp1", "EEG Fp2", "EEG A2-A1", "ECG ECG"]
    assert normalize_channel_names(raw, on_unknown="drop") == ["FP1", "FP2"]
    assert normalize_channel_names(raw, on_unknown="keep") == ["FP1", "FP2", "EEG A2-A1", "ECG ECG"]
    with pytest.raises(UnknownChannelError):
        normalize_channel_names(raw)
    with pytest.raises(ValueError, match="on_unknown"):
        normalize_channel_names(raw, on_unknown="ignore")


def test_duplicates_after_normalisation_name_the_raw_labels():
    with pytest.raises(DuplicateChannelError) as e:
        normalize_channel_names(["EEG Fp1", "Cz", "FP1-REF"])
    assert "'EEG Fp1'" in str(e.value) and "'FP1-REF'" in str(e.value) and "'FP1'" in str(e.value)
    with pytest.raises(ValueError):  # DuplicateChannelError is a ValueError
        normalize_channel_names(["T3", "T3"])
    # old and new temporal names are different rows, not duplicates
    assert normalize_channel_names(["T3", "T7"]) == ["T3", "T7"]


def test_neurolm_indices_match_official_fixture_rows():
    # fixture neurolm_vq_tiny.json standard_1020_indices.sample_A
    assert channel_indices(WORKLOAD).tolist() == [0, 2, 17, 21, 15, 23, 88, 90, 39, 43, 89, 91, 61, 65, 80,
                                                  82, 19, 41, 63]
    assert channel_indices(["EEG F4-M1", "EEG C4-M1", "EEG O2-M1", "EEG C3-M2"]).tolist() == [21, 43, 82, 39]
    assert channel_indices(["FP1"]).dtype == np.int64


def test_labram_indices_against_fixture(fixtures_dir):
    from safetensors.numpy import load_file
    official = load_file(str(fixtures_dir / "labram_vqnsp.safetensors"))["input.input_chans"]
    ours = labram_channel_indices(WORKLOAD)
    assert ours.tolist() == [0, 1, 3, 18, 22, 16, 24, 89, 91, 40, 44, 90, 92, 62, 66, 81, 83, 20, 42, 64]
    assert np.asarray(official).reshape(-1).tolist()[:20] == ours.tolist()
    assert ours.dtype == np.int64


def test_labram_table_limit_names_the_channel():
    assert labram_channel_indices(["FP1-F7"]).tolist() == [0, 121]  # row 121 < 129
    with pytest.raises(ValueError, match="'FP1-F3'.*129"):
        labram_channel_indices(["FP1", "FP1-F3"])


def test_positions_and_topomap():
    pos = channel_positions(WORKLOAD)
    assert list(pos) == WORKLOAD and all(p.shape == (3,) for p in pos.values())
    assert pos["FP1"][1] > pos["CZ"][1] > pos["O1"][1]   # front to back
    assert pos["T4"][0] > 0 > pos["T3"][0]                # right / left
    bip = channel_positions(["FP1-F7"])["FP1-F7"]
    np.testing.assert_allclose(bip, (pos["FP1"] + pos["F7"]) / 2)
    with pytest.warns(UserWarning, match="CFC1"):
        channel_positions(["CZ", "CFC1"])
    with pytest.raises(UnknownChannelError, match="CFC1"):
        channel_positions(["CFC1"], on_missing="raise")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ax = plot_topomap(np.arange(19.0), WORKLOAD, title="t")
    assert ax.get_title() == "t"
    with pytest.raises(ValueError, match="shape"):
        plot_topomap(np.arange(3.0), WORKLOAD)
    plt.close("all")
