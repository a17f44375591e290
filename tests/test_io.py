"""EEG input/output (neurolm_nb.io): official Workload parity, EDF round trips, bad-input errors. Real files only."""
import warnings

import mne
import numpy as np
import pytest

from neurolm_nb.io import (
    MAX_ABS_UV, ImplausibleRecordingError, Recording, RecordingError, check_amplitude, edf_range_problems,
    find_flat_channels, load_recording, preprocess, preprocessing_throughput, read_recording, sliding_windows,
    synth_eeg, validate_recording, write_edf,
)

WORKLOAD = ["FP1", "FP2", "F3", "F4", "F7", "F8", "T3", "T4", "C3", "C4",
            "T5", "T6", "P3", "P4", "O1", "O2", "FZ", "CZ", "PZ"]
EEGMAT_LABELS = ["EEG Fp1", "EEG Fp2", "EEG F3", "EEG F4", "EEG F7", "EEG F8", "EEG T3", "EEG T4", "EEG C3",
                 "EEG C4", "EEG T5", "EEG T6", "EEG P3", "EEG P4", "EEG O1", "EEG O2", "EEG Fz", "EEG Cz",
                 "EEG Pz", "EEG A2-A1", "ECG ECG"]


@pytest.fixture(scope="module")
def eegmat_like(tmp_path_factory):
    "A synthetic 500 Hz EDF laid out like an EEGMAT file (19 EEG + A2-A1 + ECG), 30 s."
    data = synth_eeg(WORKLOAD, 30.0, sfreq=500.0, seed=3, line_noise_uV=4.0)
    extra = np.stack([0.1 * data[0], 400 * np.sin(2 * np.pi * 1.1 * np.arange(data.shape[1]) / 500)])
    all_data = np.vstack([data, extra])
    path = write_edf(tmp_path_factory.mktemp("edf") / "Subject99_1.edf", all_data, EEGMAT_LABELS, 500.0,
                     annotations=[(0.5, 1.0, "eyes open"), (12.0, 0.0, "marker")])
    return path, all_data


# ---------------------------------------------------------------- official parity (most important)

@pytest.mark.parametrize("stem", ["Subject02_1", "Subject02_2"])
def test_workload_windows_match_official(stem, eegmat_dir, fixtures_dir):
    from safetensors.numpy import load_file
    official = load_file(str(fixtures_dir / "workload_windows.safetensors"))[f"{stem.lower()}.windows_uV"]
    rec = load_recording(eegmat_dir / f"{stem}.edf", channels=WORKLOAD, notch=50.0)
    assert rec.ch_names == WORKLOAD and rec.sfreq == 200.0
    windows = sliding_windows(rec.data[:, -60 * 200:], 800, 400).astype(np.float32)
    assert windows.shape == official.shape == (29, 19, 800)
    np.testing.assert_allclose(windows, official, rtol=0, atol=1e-4)  # fixtures README §5: atol 1e-4 µV, same MNE
    # Recording.last is the same crop
    np.testing.assert_array_equal(rec.last(60.0).data, rec.data[:, -12000:])


def test_channels_none_drops_non_eeg_on_real_file(eegmat_dir):
    raw = read_recording(eegmat_dir / "Subject02_2.edf")
    assert "ECG ECG" in raw.ch_names
    rec = preprocess(raw)
    assert rec.ch_names == WORKLOAD
    assert "ECG ECG" in raw.ch_names  # copy=True leaves the caller's Raw alone


# ---------------------------------------------------------------- EDF writing

def test_edf_round_trip_within_quantisation(eegmat_like):
    path, data = eegmat_like
    raw = read_recording(path)
    assert raw.ch_names == EEGMAT_LABELS and raw.info["sfreq"] == 500.0
    back = raw.get_data(units="uV")
    step = ((np.ceil(data.max(1)) + 1) - (np.floor(data.min(1)) - 1)) / 65535  # physical range / digital steps
    err = np.abs(back - data).max(1)
    assert np.all(err <= step), (err, step)
    assert [(a["onset"], a["description"]) for a in raw.annotations] == [(0.5, "eyes open"), (12.0, "marker")]
    assert raw.annotations.duration[0] == 1.0


def test_edf_bytes_are_deterministic(tmp_path):
    data = synth_eeg(["FP1", "CZ", "O2"], 4.0, seed=5)
    kw = dict(ch_names=["EEG FP1-REF", "EEG CZ-REF", "EEG O2-REF"], sfreq=200.0, annotations=[(1.0, 0.5, "x")])
    a = write_edf(tmp_path / "a.edf", data, **kw).read_bytes()
    b = write_edf(tmp_path / "b.edf", data, **kw).read_bytes()
    assert a == b
    assert a[168:176] == b"01.01.00"  # fixed start date (EDF header field)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic: no leftovers


def test_edf_writer_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        write_edf(tmp_path / "n.edf", np.full((1, 200), np.nan), ["FP1"], 200.0)
    with pytest.raises(ValueError, match="16 characters"):
        write_edf(tmp_path / "l.edf", np.zeros((1, 200)), ["EEG FP1-REF-VERY-LONG"], 200.0)
    with pytest.raises(ValueError, match="shape"):
        write_edf(tmp_path / "s.edf", np.zeros((2, 200)), ["FP1"], 200.0)
    assert not (tmp_path / "n.edf").exists()


# ---------------------------------------------------------------- bad input

def test_truncated_edf_is_refused_naming_the_file(eegmat_like, tmp_path):
    path, _ = eegmat_like
    blob = path.read_bytes()
    cut = tmp_path / "cut_short.edf"
    cut.write_bytes(blob[: int(len(blob) * 0.6)])
    with pytest.raises(RecordingError, match=r"cut_short\.edf: file is truncated"):
        read_recording(cut)
    cut.write_bytes(blob[:100])
    with pytest.raises(RecordingError, match="cut_short.edf"):
        load_recording(cut)


def test_unreadable_missing_and_unknown_files(tmp_path):
    (tmp_path / "junk.edf").write_bytes(b"\x00garbage" * 64)
    with pytest.raises(RecordingError, match="junk.edf"):
        read_recording(tmp_path / "junk.edf")
    with pytest.raises(RecordingError, match="nope.edf: file does not exist"):
        read_recording(tmp_path / "nope.edf")
    (tmp_path / "x.csv").write_text("1,2,3")
    with pytest.raises(RecordingError, match=r"x\.csv: unsupported file extension '\.csv'"):
        read_recording(tmp_path / "x.csv")


def test_other_formats_via_mne(tmp_path):
    data = synth_eeg(["FP1", "CZ", "O2"], 5.0, sfreq=250.0, seed=2)
    raw = mne.io.RawArray(data * 1e-6, mne.create_info(["Fp1", "Cz", "O2"], 250.0, "eeg"), verbose="ERROR")
    raw.save(tmp_path / "x_raw.fif", verbose="ERROR")
    raw.save(tmp_path / "x_raw.fif.gz", verbose="ERROR")
    for name in ["x_raw.fif", "x_raw.fif.gz"]:
        rec = load_recording(tmp_path / name, notch=50.0)
        assert rec.ch_names == ["FP1", "CZ", "O2"] and rec.data.shape == (3, 1000), name


def test_nan_stretch_names_channel_and_time(tmp_path):
    data = synth_eeg(["FP1", "CZ", "O2"], 10.0, sfreq=250.0, seed=1)
    data[2, 750:900] = np.nan  # O2 from 3.0 s
    data[1, 1000:1010] = np.inf  # CZ later
    raw = mne.io.RawArray(data * 1e-6, mne.create_info(["EEG Fp1", "EEG Cz", "EEG O2"], 250.0, "eeg"),
                          verbose="ERROR")
    fif = tmp_path / "with_nan_raw.fif"
    raw.save(fif, verbose="ERROR")
    with pytest.raises(RecordingError, match=r"with_nan_raw\.fif: non-finite .* 3\.000 s in channel\(s\) \['O2'\]"):
        load_recording(fif)
    with pytest.raises(RecordingError, match="'CZ': 10"):
        validate_recording(data, 250.0, ["FP1", "CZ", "O2"], source="arr")


def test_too_short_for_a_window(tmp_path):
    path = write_edf(tmp_path / "short3s.edf", synth_eeg(["FP1", "FP2"], 3.0), ["EEG Fp1", "EEG Fp2"], 200.0)
    with pytest.raises(RecordingError, match=r"short3s\.edf: recording is 3\.000 s long.*4 s"):
        load_recording(path, min_seconds=4)
    rec = load_recording(path)
    with pytest.raises(RecordingError, match="shorter than one window"):
        sliding_windows(rec.data, 800, 400)
    with pytest.raises(RecordingError, match="short3s.edf"):
        rec.last(60.0)


def test_sampling_rate_too_low_for_band(tmp_path):
    path = write_edf(tmp_path / "rate100.edf", synth_eeg(["FP1", "CZ"], 6.0, sfreq=100.0), ["FP1", "CZ"], 100.0)
    with pytest.raises(RecordingError, match=r"rate100\.edf: sampling rate 100 Hz .* 150 Hz"):
        load_recording(path)
    with pytest.warns(UserWarning, match=r"rate100\.edf.*lowering h_freq to 40"):
        rec = load_recording(path, allow_lower_h_freq=True)
    assert rec.sfreq == 200.0 and rec.n_samples == 1200


def test_duplicate_channels_after_normalisation(tmp_path):
    data = synth_eeg(["FP1", "FP2", "CZ"], 2.0)
    path = write_edf(tmp_path / "dups.edf", data, ["EEG Fp1", "EEG FP1-REF", "EEG Cz"], 200.0)
    with pytest.raises(RecordingError, match=r"dups\.edf: .*'EEG Fp1', 'EEG FP1-REF' -> 'FP1'"):
        load_recording(path)
    same = write_edf(tmp_path / "same_label.edf", data, ["EEG Cz", "EEG Cz", "EEG Fp1"], 200.0)
    with pytest.raises(RecordingError, match=r"same_label\.edf: duplicate channel labels.*'CZ'"):
        load_recording(same)


def test_flat_channel_warns_or_raises(tmp_path):
    data = synth_eeg(["FP1", "FP2", "CZ"], 4.0)
    data[1] = 0.0
    path = write_edf(tmp_path / "flat.edf", data, ["Fp1", "Fp2", "Cz"], 200.0)
    with pytest.warns(UserWarning, match=r"flat\.edf: flat channel.*\['FP2'\]"):
        load_recording(path)
    with pytest.raises(RecordingError, match=r"\['FP2'\]"):
        load_recording(path, on_flat="raise")


def set_edf_field(path, offset, width, signal, value):
    "Overwrite one signal's header field of a real EDF file (offset in units of the signal count, EDF spec)."
    b = bytearray(path.read_bytes())
    n = int(b[252:256])
    at = 256 + n * offset + signal * width
    b[at:at + width] = str(value).ljust(width).encode("ascii")
    path.write_bytes(bytes(b))


DIGITAL_MIN, DIGITAL_MAX, PHYSICAL_MIN, PHYSICAL_MAX = 120, 128, 104, 112  # field offsets (x signal count)


def test_impossible_edf_header_is_refused_naming_channel_and_field(tmp_path):
    names = ["EEG Fp1", "EEG Cz", "EEG O2", "ECG ECG"]
    path = write_edf(tmp_path / "hdr.edf", synth_eeg(["FP1", "CZ", "O2", "PZ"], 10.0), names, 200.0)
    assert edf_range_problems(path) == {}
    set_edf_field(path, DIGITAL_MAX, 8, 1, -32768)  # EEG Cz: digital max := digital min
    assert edf_range_problems(path) == {"EEG Cz": "digital minimum -32768 >= digital maximum -32768"}
    # the fault is real: MNE reads the file and scales Cz to ~10^6 µV without a word
    unchecked = preprocess(read_recording(path), notch=None)
    assert np.abs(unchecked.data[1]).max() > 1e5 and np.abs(unchecked.data[0]).max() < 500
    with pytest.raises(ImplausibleRecordingError, match=r"hdr\.edf: impossible EDF header.*CZ \('EEG Cz'\): digital minimum"):
        load_recording(path, notch=None)
    assert load_recording(path, channels=["FP1", "O2"], notch=None).ch_names == ["FP1", "O2"]  # Cz not kept: fine
    set_edf_field(path, DIGITAL_MAX, 8, 1, 32767)
    set_edf_field(path, PHYSICAL_MIN, 8, 3, 5)
    set_edf_field(path, PHYSICAL_MAX, 8, 3, 5)  # ECG ECG: physical range 5..5
    assert edf_range_problems(path) == {"ECG ECG": "physical minimum = physical maximum = 5 uV"}
    assert load_recording(path, notch=None).ch_names == ["FP1", "CZ", "O2"]  # the ECG channel is dropped anyway
    set_edf_field(path, PHYSICAL_MAX, 8, 0, "abc")
    assert "unreadable range" in edf_range_problems(path)["EEG Fp1"]
    assert issubclass(ImplausibleRecordingError, RecordingError)


def test_amplitude_limit_names_channel_peak_and_time(tmp_path, eegmat_dir):
    data = synth_eeg(["FP1", "CZ", "O2"], 10.0)
    data[1] *= 1000  # one channel in mV but labelled µV
    path = write_edf(tmp_path / "mv.edf", data, ["EEG Fp1", "EEG Cz", "EEG O2"], 200.0)
    assert load_recording(path, notch=None).ch_names == ["FP1", "CZ", "O2"]  # no limit unless asked for
    with pytest.raises(ImplausibleRecordingError, match=r"mv\.edf: amplitude beyond the 10000 µV limit in CZ \(peak .* first at \d"):
        load_recording(path, notch=None, max_abs_uV=MAX_ABS_UV)
    rec = load_recording(path, notch=None)
    check_amplitude(rec, max_abs_uV=None)
    check_amplitude(rec, max_abs_uV=1e6)
    # the default limit is far above real EEG: a real EEGMAT recording peaks below a tenth of it
    real = load_recording(eegmat_dir / "Subject02_1.edf", channels=WORKLOAD)
    check_amplitude(real)
    assert np.abs(real.data).max() < MAX_ABS_UV / 10


def test_find_flat_channels():
    data = np.stack([np.zeros(400), np.full(400, 3.0), synth_eeg(["CZ"], 2.0)[0]])
    assert find_flat_channels(data, ["A", "B", "C"]) == ["A", "B"]
    assert find_flat_channels(data, ["A", "B", "C"], flat_std_uV=1e3) == ["A", "B", "C"]


def test_missing_requested_channel_lists_what_file_has(eegmat_like):
    path, _ = eegmat_like
    with pytest.raises(RecordingError) as e:
        load_recording(path, channels=["FP1", "OZ", "T7"])
    msg = str(e.value)
    assert "Subject99_1.edf" in msg and "['OZ', 'T7']" in msg and "EEG Fp1" in msg


# ---------------------------------------------------------------- preprocessing and windows

def test_preprocess_picks_orders_and_removes_line_noise(eegmat_like):
    path, data = eegmat_like
    rec = load_recording(path)
    assert isinstance(rec, Recording) and rec.ch_names == WORKLOAD and rec.sfreq == 200.0
    assert rec.data.dtype == np.float64 and rec.data.shape == (19, 6000)
    picked = load_recording(path, channels=["O2", "EEG Fz", "Cz-REF"])
    assert picked.ch_names == ["O2", "FZ", "CZ"]
    np.testing.assert_allclose(picked.data[0], rec.data[WORKLOAD.index("O2")])

    def power(x, fs, lo, hi):
        f = np.fft.rfftfreq(x.shape[-1], 1 / fs)
        return (np.abs(np.fft.rfft(x, axis=-1)) ** 2)[..., (f > lo) & (f < hi)].mean()

    assert power(rec.data, 200, 49.8, 50.2) < 1e-3 * power(data[:19], 500, 49.8, 50.2)


def test_sliding_windows():
    x = np.arange(3 * 20).reshape(3, 20)
    w = sliding_windows(x, 8, 4)
    assert w.shape == (4, 3, 8)
    for i in range(4):
        np.testing.assert_array_equal(w[i], x[:, 4 * i:4 * i + 8])
    np.testing.assert_array_equal(sliding_windows(x, 8, 4, start=2)[0], x[:, 2:10])
    assert w.flags["C_CONTIGUOUS"] and not np.shares_memory(w, x)
    assert sliding_windows(np.zeros((19, 12000)), 800, 400).shape == (29, 19, 800)
    with pytest.raises(ValueError):
        sliding_windows(x, 0, 1)


def test_synth_eeg_is_deterministic_and_label_dependent():
    names = ["FP1", "FZ", "O1", "O2", "FP1-F7"]
    a = synth_eeg(names, 30.0, label=0, seed=4)
    assert a.shape == (5, 6000) and a.dtype == np.float64
    np.testing.assert_array_equal(a, synth_eeg(names, 30.0, label=0, seed=4))
    b = synth_eeg(names, 30.0, label=1, seed=4)
    assert not np.allclose(a, b)

    def power(x, lo, hi):
        f = np.fft.rfftfreq(x.shape[-1], 1 / 200)
        return (np.abs(np.fft.rfft(x)) ** 2)[(f >= lo) & (f < hi)].mean()

    assert power(a[2], 8, 11) > 1.5 * power(b[2], 8, 11)      # less alpha at O1 under label 1
    assert power(b[1], 5, 7) > 1.5 * power(a[1], 5, 7)        # more frontal theta under label 1
    assert a[0].max() > 60                                    # blinks at FP1
    assert 5 < np.std(a[2]) < 80
    with pytest.raises(ValueError, match="label=2"):
        synth_eeg(names, 1.0, label=2, n_classes=2)


def test_throughput_reports_hours(eegmat_like):
    path, _ = eegmat_like
    out = preprocessing_throughput([path, path])
    assert out["files"] == 2 and abs(out["eeg_hours"] - 60 / 3600) < 1e-9
    assert out["eeg_hours_per_minute"] > 0
