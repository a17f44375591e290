"""Tests for neurolm_nb.bids (nbs/44_bids.ipynb): a BIDS copy of real EEGMAT written with mne_bids.write_raw_bids,
built as a pretraining corpus and as a labelled dataset; the windows equal the loose-file builders' bit for bit,
subjects are the participant IDs, splits keep each participant in one split, filters select what they say, and bad
input fails with a message naming what is wrong."""
import warnings
from pathlib import Path

import h5py
import mne
import numpy as np
import pytest

from mne_bids import BIDSPath, write_raw_bids

from neurolm_nb.bids import BIDSEventsSpec, BIDSPretrainSpec, find_bids_recordings
from neurolm_nb.datasets import DatasetError, get_spec
from neurolm_nb.shards import build_dataset, list_shards, load_manifest, plan_build

SUBJECTS = ("02", "03", "04")
TASKS = ((1, "rest"), (2, "arithmetic"))
PARTICIPANTS = [f"sub-{s}" for s in SUBJECTS]
WORKLOAD = {"rest": 0, "arithmetic": 1}


def write_bids(src: Path, root: Path, subjects=SUBJECTS, events=True, entities=None):
    "EEGMAT SubjectNN_k.edf -> sub-NN_task-<rest|arithmetic>, with an event over the last 60 s (trial_type = task)."
    for s in subjects:
        for k, task in TASKS:
            raw = mne.io.read_raw_edf(src / f"Subject{s}_{k}.edf", verbose="ERROR")
            raw.set_channel_types({"ECG ECG": "ecg"})
            if events:
                raw.set_annotations(mne.Annotations([raw.n_times / raw.info["sfreq"] - 60.0], [60.0], [task],
                                                    orig_time=raw.annotations.orig_time))
            for ent in entities or [{}]:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    write_raw_bids(raw, BIDSPath(subject=s, task=task, datatype="eeg", root=root, **ent),
                                   overwrite=True, verbose="ERROR")


def loose_name(relpath: str) -> str:
    "sub-02/eeg/sub-02_task-rest_eeg.edf -> Subject02_1.edf"
    stem = Path(relpath).name
    sub, task = stem.split("_")[0][4:], stem.split("_")[1][5:]
    return f"Subject{sub}_{dict((t, k) for k, t in TASKS)[task]}.edf"


def windows_by_recording(root: Path) -> dict:
    "recording -> dict(x, label, start_s, subject, split, ch_names) read back from a build's shards."
    out = {}
    for s in list_shards(root):
        with h5py.File(s["file"], "r") as f:
            recs = f["recording"].asstr()[:]
            subj = f["subject"].asstr()[:]
            for r in sorted(set(recs)):
                m = recs == r
                out[r] = {"x": f["x"][m], "label": f["label"][m], "start_s": f["start_s"][m],
                          "subject": sorted(set(subj[m])), "split": s["split"], "ch_names": list(s["ch_names"])}
    return out


@pytest.fixture(scope="module")
def builds(tmp_path_factory, eegmat_dir):
    tmp = tmp_path_factory.mktemp("bids")
    root = tmp / "bids"
    write_bids(eegmat_dir, root)
    loose = [f"Subject{s}" for s in SUBJECTS]
    out = {"root": root, "tmp": tmp}
    for name, args in {
        "bids-pretrain": ("bids-pretrain", root, {}),
        "pretrain": ("pretrain", eegmat_dir, {"subjects": loose}),
        "bids-events": ("bids-events", root, {"label_map": WORKLOAD, "window_s": 4.0, "stride_s": 2.0,
                                               "fractions": (1, 1, 1)}),
        "bids-task": ("bids-events", root, {"label_map": WORKLOAD, "label_from": "task", "last_s": 60.0,
                                             "window_s": 4.0, "stride_s": 2.0, "fractions": (1, 1, 1)}),
        "workload": ("workload", eegmat_dir, {"subjects": loose}),
    }.items():
        spec, raw_dir, kw = args
        out[name + "_report"] = build_dataset(spec, raw_dir, tmp / name, seed=0, workers=1, progress=False, **kw)
        out[name] = tmp / name
    return out


def test_registered_names():
    assert isinstance(get_spec("bids-pretrain"), BIDSPretrainSpec)
    spec = get_spec("bids-events", label_map=WORKLOAD, window_s=4.0)
    assert isinstance(spec, BIDSEventsSpec) and spec.classes == ("rest", "arithmetic")


@pytest.mark.parametrize("name", ["bids-pretrain", "bids-events", "bids-task"])
def test_subjects_are_participant_ids_and_splits_are_subject_level(builds, name):
    manifest = load_manifest(builds[name])
    found = sorted(s for d in manifest["splits"].values() for s in d["subjects"])
    assert found == PARTICIPANTS
    assert manifest["subjects_in_several_splits"] == []
    windows = windows_by_recording(builds[name])
    assert len(windows) == 2 * len(SUBJECTS)
    split_of = {}
    for rel, w in windows.items():
        subject = rel.split("/")[0]
        assert w["subject"] == [subject]             # the participant ID of the folder the file lies in
        split_of.setdefault(subject, set()).add(w["split"])
    assert all(len(v) == 1 for v in split_of.values()), split_of
    if name != "bids-pretrain":                      # fractions (1, 1, 1): one participant per split
        assert sorted(s for v in split_of.values() for s in v) == ["test", "train", "val"]


def compare(bids_build: Path, loose_build: Path) -> float:
    "Assert same recordings, channels, start times and labels; return the largest |difference| of the windows."
    a, b = windows_by_recording(bids_build), windows_by_recording(loose_build)
    assert sorted(loose_name(r) for r in a) == sorted(b)
    worst = 0.0
    for rel, w in a.items():
        v = b[loose_name(rel)]
        assert w["ch_names"] == v["ch_names"]
        assert w["x"].shape == v["x"].shape and w["x"].dtype == v["x"].dtype == np.float32
        np.testing.assert_array_equal(w["start_s"], v["start_s"])
        np.testing.assert_array_equal(w["label"], v["label"])
        worst = max(worst, float(np.abs(w["x"].astype(np.float64) - v["x"]).max()))
    return worst


def test_pretrain_windows_equal_the_loose_file_corpus(builds):
    assert compare(builds["bids-pretrain"], builds["pretrain"]) == 0.0   # measured: bit for bit
    w = windows_by_recording(builds["bids-pretrain"])
    assert w["sub-02/eeg/sub-02_task-rest_eeg.edf"]["x"].shape == (3, 19, 53 * 200)  # 1024 // 19 = 53 s windows


@pytest.mark.parametrize("name", ["bids-events", "bids-task"])
def test_labelled_windows_equal_workload(builds, name):
    assert compare(builds[name], builds["workload"]) == 0.0   # measured: bit for bit
    report = builds[name + "_report"]
    assert sum(report.windows.values()) == 29 * 2 * len(SUBJECTS)
    assert report.class_counts["train"] == {"rest": 29, "arithmetic": 29}


def test_filters_select_what_they_say(builds, tmp_path, eegmat_dir):
    root = builds["root"]
    names = lambda paths: [p.basename for p in paths]
    assert names(find_bids_recordings(root, subjects=["03"])) == names(find_bids_recordings(root, subjects=["sub-03"])) \
        == ["sub-03_task-arithmetic_eeg.edf", "sub-03_task-rest_eeg.edf"]
    assert names(find_bids_recordings(root, tasks="rest")) == [f"sub-{s}_task-rest_eeg.edf" for s in SUBJECTS]
    entries, _ = BIDSPretrainSpec(subjects=("02", "04"), tasks=("arithmetic",)).discover(root)
    assert [e.subject for e in entries] == ["sub-02", "sub-04"]
    assert [e.relpath for e in entries] == [f"sub-{s}/eeg/sub-{s}_task-arithmetic_eeg.edf" for s in ("02", "04")]
    # build_dataset's own `subjects` filter takes participant IDs; spec fields are overrides like any other
    plan = plan_build("bids-pretrain", root, tmp_path / "plan", subjects=["sub-03"], tasks=("rest",))
    assert [e.relpath for e in plan.entries] == ["sub-03/eeg/sub-03_task-rest_eeg.edf"]
    # sessions and runs: one more small copy, sub-02 in sessions a and b, runs 1 and 2 in each
    multi = tmp_path / "multi"
    write_bids(eegmat_dir, multi, subjects=("02",), events=False,
               entities=[{"session": ses, "run": run} for ses in ("a", "b") for run in (1, 2)])
    rel = lambda entries: [e.relpath for e in entries]
    got = rel(BIDSPretrainSpec(sessions=("b",), runs=(2,), tasks=("rest",)).discover(multi)[0])
    assert got == ["sub-02/ses-b/eeg/sub-02_ses-b_task-rest_run-2_eeg.edf"]  # BIDS keeps the run as written
    assert len(find_bids_recordings(multi, sessions=["ses-a"])) == 4
    assert len(find_bids_recordings(multi, runs=["01"])) == 4   # run 01 finds run-1
    assert len(find_bids_recordings(multi)) == 8


def test_event_windows_offset_and_edges():
    spec = BIDSEventsSpec(label_map={"x": 0, "z": 1}, window_s=2.0, stride_s=1.0, offset_s=-1.0)
    events = [(5.0, 0.0, "x"), (10.0, 3.0, "z"), (0.5, 0.0, "x"), (1.0, 1.0, "y"), (19.5, 0.0, "x")]
    starts, labels = spec._event_starts(events, total=20 * 200)
    assert starts.tolist() == [800, 1800, 2000, 2200]   # 4 s; 9, 10, 11 s; windows leaving the recording dropped
    assert labels.tolist() == [0, 1, 1, 1]


def test_participants_tsv_labels(builds):
    spec = BIDSEventsSpec(label_from="participants:age", label_map={"17": 0, "19": 1})
    entries, bad = spec.discover(builds["root"])
    assert bad == [] and spec.classes == ("17", "19")
    assert {e.subject: e.label for e in entries} == {"sub-02": 1, "sub-03": 0, "sub-04": 0}   # ages 19, 17, 17


def test_bad_input_is_named(builds, tmp_path, eegmat_dir):
    root = builds["root"]
    with pytest.raises(DatasetError, match="not a BIDS root.*dataset_description.json"):
        find_bids_recordings(eegmat_dir)
    with pytest.raises(DatasetError, match=r"subject\(s\) \['99'\] \(parameter `subjects`\).*'02'"):
        BIDSPretrainSpec(subjects=("99",)).discover(root)
    with pytest.raises(DatasetError, match=r"task\(s\) \['walk'\]"):
        find_bids_recordings(root, tasks=["walk"])
    with pytest.raises(DatasetError, match=r"\['arithmetc'\] occur in no selected recording"):
        BIDSEventsSpec(label_map={"rest": 0, "arithmetc": 1}).discover(root)
    with pytest.raises(DatasetError, match="label_map is empty"):
        get_spec("bids-events").discover(root)
    with pytest.raises(ValueError, match="label_from"):
        BIDSEventsSpec(label_from="trial", label_map=WORKLOAD)
    with pytest.raises(ValueError, match="0..K-1"):
        BIDSEventsSpec(label_map={"rest": 1, "arithmetic": 2})
    with pytest.raises(DatasetError, match="no column 'handedness'"):
        BIDSEventsSpec(label_from="participants:handedness", label_map={"R": 0}).discover(root)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "dataset_description.json").write_text('{"Name": "empty", "BIDSVersion": "1.9.0"}')
    with pytest.raises(DatasetError, match="no eeg recordings"):
        BIDSPretrainSpec().discover(empty)
    # recordings with no mapped event are listed, with the file, the subject and the labels they do have
    spec = BIDSEventsSpec(label_map={"arithmetic": 0}, subjects=("02",))  # the spec's filter: in discovery
    report = build_dataset(spec, root, tmp_path / "arith", workers=1, progress=False)
    assert report.n_built == 1 and [s["file"] for s in report.skipped] == ["sub-02/eeg/sub-02_task-rest_eeg.edf"]
    assert "['rest']" in report.skipped[0]["reason"] and report.skipped[0]["subject"] == "sub-02"
