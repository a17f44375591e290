"""Held-out subjects (`DatasetSpec.val_subjects` / `test_subjects`) and the pretraining corpus's leakage guard
(`PretrainSpec.exclude_from` / `allow_downstream_test`), on real EEGMAT files and on the TUH-style samples.
Issue #12."""
import json
import shutil
from pathlib import Path

import h5py
import pytest

from neurolm_nb.datasets import SPLITS, WorkloadSpec, get_spec
from neurolm_nb.shards import (MANIFEST_FILE, REPORT_FILE, WindowDataset, build_dataset, list_shards, load_manifest,
                               plan_build, read_heldout, samples_dir_for)

from test_datasets import SAMPLES, eegmat_dir  # the same real-EEG and sample-layout locations


def samples(name: str) -> Path:
    if not (SAMPLES / "eeg").is_dir():
        pytest.skip("data_samples/eeg is missing: run `python -m neurolm_nb.shards make-samples data_samples`")
    return samples_dir_for(name, SAMPLES)


def _eegmat_copy(dest: Path, subjects=(2, 3, 4, 5)) -> Path:
    dest.mkdir(parents=True)
    for s in subjects:
        for k in (1, 2):
            shutil.copy(eegmat_dir() / f"Subject{s:02d}_{k}.edf", dest)
    return dest


def _where(root: Path) -> dict:
    m = load_manifest(root)
    return {rec: s for s in SPLITS for rec in m["splits"][s]["recordings"]}


def _corpus_recordings(root: Path) -> set:
    return set(_where(root))


# ---------------------------------------------------------------- held-out subjects

def test_named_subjects_are_the_val_and_test_splits_on_eegmat(tmp_path):
    raw = _eegmat_copy(tmp_path / "raw")
    r = build_dataset("workload", raw, tmp_path / "out", seed=0, test_subjects="Subject03", val_subjects=["Subject05"])
    m = load_manifest(tmp_path / "out")
    assert {s: m["splits"][s]["subjects"] for s in SPLITS} == {
        "train": ["Subject02", "Subject04"], "val": ["Subject05"], "test": ["Subject03"]}
    assert sorted(m["splits"]["test"]["recordings"]) == ["Subject03_1.edf", "Subject03_2.edf"]
    assert sorted(m["splits"]["val"]["recordings"]) == ["Subject05_1.edf", "Subject05_2.edf"]
    assert m["held_out_subjects"] == {"val": ["Subject05"], "test": ["Subject03"]}
    assert "named subjects: val = ['Subject05'], test = ['Subject03']" in m["rule"]
    assert r.windows == {"train": 4 * 29, "val": 2 * 29, "test": 2 * 29}
    for shard in list_shards(tmp_path / "out"):  # the windows themselves sit in the named split
        with h5py.File(shard["file"]) as f:
            subjects = set(f["subject"].asstr()[:])
        assert subjects <= {"test": {"Subject03"}, "val": {"Subject05"}, "train": {"Subject02", "Subject04"}}[shard["split"]]
    assert set(WindowDataset(tmp_path / "out", "test").subjects) == {"Subject03"}
    # the default (no names) is the seeded split, with a manifest that has no held-out entry
    plain = load_manifest(Path(build_dataset("workload", raw, tmp_path / "plain", seed=0).out_dir))
    assert "held_out_subjects" not in plain and "named subjects" not in plain["rule"]
    # ... and an index whose spec record is the same as before the fields existed (set fields are recorded)
    assert not {"val_subjects", "test_subjects"} & set(json.loads((tmp_path / "plain" / "index.json").read_text())["spec"])
    assert json.loads((tmp_path / "out" / "index.json").read_text())["spec"]["test_subjects"] == ["Subject03"]


def test_only_test_subjects_named_the_rest_splits_train_val_by_fraction():
    entries, _ = get_spec("workload").discover(samples("workload"))
    spec = get_spec("workload", test_subjects=("Subject01",), fractions=(1, 1, 1))
    where = spec.assign(entries, 0)
    assert {e.subject for e in entries if where[e.relpath] == "test"} == {"Subject01"}
    # the other two subjects: fractions (1, 1, 0) -> one train, one val
    assert sorted(where[f"Subject0{s}_1.edf"] for s in (0, 2)) == ["train", "val"]
    # empty names are exactly the old split, for every seed
    for seed in range(5):
        assert get_spec("workload", val_subjects=(), test_subjects="").assign(entries, seed) == get_spec("workload").assign(entries, seed)


def test_bad_held_out_names_fail_before_anything_is_read(tmp_path):
    raw = samples("workload")
    with pytest.raises(ValueError, match=r"workload: test_subjects \['Subject2'\] not among the 3 subjects found; "
                                         r"did you mean \['Subject02'\]\? known subjects: \['Subject00'"):
        plan_build("workload", raw, tmp_path / "o", test_subjects="Subject2")
    with pytest.raises(ValueError, match=r"\['Subject01'\] are in both val_subjects and test_subjects"):
        get_spec("workload", val_subjects="Subject01", test_subjects="Subject01,Subject02")
    with pytest.raises(ValueError, match="need split_by='subject'; this spec splits by 'recording'"):
        get_spec("hmc", test_subjects="SN001")
    with pytest.raises(ValueError, match="seed: val_subjects/test_subjects need split_by='subject'"):
        get_spec("seed", test_subjects="1")
    with pytest.raises(ValueError, match="original_split=True splits recordings"):
        plan_build("tusl", samples("tusl"), tmp_path / "o", original_split=True, test_subjects="aaaaaaca")
    # a release with an official test split (TUAB eval): test_subjects refused, val_subjects allowed
    with pytest.raises(ValueError, match=r"tuab: test_subjects=\['aaaaaaaa'\], but the release fixes the test split"):
        plan_build("tuab", samples("tuab"), tmp_path / "o", test_subjects="aaaaaaaa")
    with pytest.raises(ValueError, match=r"val_subjects \['aaaaaaae'\] have recordings in the release's test split"):
        plan_build("tuab", samples("tuab"), tmp_path / "o", val_subjects="aaaaaaae")
    plan = plan_build("tuab", samples("tuab"), tmp_path / "o", val_subjects="aaaaaaaa")
    assert {e.subject: plan.assignment[e.relpath] for e in plan.entries} == {
        "aaaaaaaa": "val", "aaaaaaab": "train", "aaaaaaac": "train", "aaaaaaad": "train", "aaaaaaae": "test", "aaaaaaaf": "test"}
    with pytest.raises(TypeError, match=r"WorkloadSpec.test_subjects = 3 \(int\) should be like its default"):
        get_spec("workload", test_subjects=3)
    with pytest.raises(TypeError, match="workload.val_subjects=3 must be names: a tuple, a list or a comma-separated string"):
        WorkloadSpec(val_subjects=3)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- leakage guard

def _tuh_corpus(tmp_path: Path) -> tuple[Path, Path]:
    "A TUAB downstream build, and a corpus folder: the TUAB files, a renamed copy of an eval file, the TUSL files."
    down = tmp_path / "tuab_built"
    build_dataset("tuab", samples("tuab"), down, seed=0)
    corpus = tmp_path / "corpus"
    shutil.copytree(samples("tuab"), corpus / "tuab")
    shutil.copytree(samples("tusl"), corpus / "tusl")
    (corpus / "other").mkdir()
    shutil.copy(corpus / "tuab/edf/eval/normal/01_tcp_ar/aaaaaaae_s001_t000.edf", corpus / "other/zzzzzzzz_s009_t000.edf")
    return down, corpus


def test_pretraining_corpus_excludes_downstream_val_and_test_on_tuh_samples(tmp_path):
    down, corpus = _tuh_corpus(tmp_path)
    held = read_heldout(down)
    assert held["splits"]["test"]["subjects"] == ["aaaaaaae", "aaaaaaaf"] and len(held["splits"]["val"]["subjects"]) == 1
    val_subject = held["splits"]["val"]["subjects"][0]
    r = build_dataset("pretrain", corpus, tmp_path / "clean", seed=0, exclude_from=[str(down)])
    excluded = {x["file"]: x for x in r.excluded}
    expected = {f"tuab/{rel}" for s in ("val", "test") for rel in held["splits"][s]["recordings"]}
    assert set(excluded) == expected | {"other/zzzzzzzz_s009_t000.edf"}
    copy = excluded["other/zzzzzzzz_s009_t000.edf"]
    assert copy["reason"] == "same content as tuab:edf/eval/normal/01_tcp_ar/aaaaaaae_s001_t000.edf (test split)"
    assert copy["splits"] == ["tuab:test"] and len(copy["sha256"]) == 64
    assert excluded["tuab/edf/eval/abnormal/01_tcp_ar/aaaaaaaf_s001_t000.edf"]["reason"] == (
        "subject aaaaaaaf is in the tuab test split; "
        "same content as tuab:edf/eval/abnormal/01_tcp_ar/aaaaaaaf_s001_t000.edf (test split)")
    assert any(x["reason"].startswith(f"subject {val_subject} is in the tuab val split") for x in r.excluded)
    kept = _corpus_recordings(tmp_path / "clean")
    assert not kept & set(excluded) and len(kept) == 3 + 5 and r.n_built == 8 and r.n_found == 8
    m = load_manifest(tmp_path / "clean")
    assert m["downstream"]["excluded"] == r.excluded and m["downstream"]["allow_downstream_test"] is False
    assert m["downstream"]["exclude_from"] == [{"dataset": "tuab", "folder": str(down), "val_subjects": 1,
                                                "val_recordings": 1, "test_subjects": 2, "test_recordings": 2}]
    assert json.loads((tmp_path / "clean" / REPORT_FILE).read_text())["excluded"] == r.excluded
    assert "4 excluded as downstream val/test" in repr(r)
    # the original's behaviour, on purpose: everything kept, and the report says so
    with pytest.warns(UserWarning, match=r"4 recordings of downstream val/test splits stay in the corpus \(allow_downstream_test=True\)"):
        leaky = build_dataset("pretrain", corpus, tmp_path / "leaky", seed=0, exclude_from=str(down), allow_downstream_test=True)
    assert leaky.excluded == [] and leaky.deliberate_leaks == r.excluded
    assert _corpus_recordings(tmp_path / "leaky") == kept | set(excluded)
    assert load_manifest(tmp_path / "leaky")["downstream"]["deliberate_leaks"] == r.excluded


def test_exclude_from_must_be_a_built_dataset_with_its_raw_files(tmp_path):
    down, corpus = _tuh_corpus(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"exclude_from: {corpus} is not a built dataset \(no index.json"):
        plan_build("pretrain", corpus, tmp_path / "o", exclude_from=[str(corpus)])
    moved = tmp_path / "tuab_built_moved_raw"
    shutil.copytree(down, moved)
    report = json.loads((moved / REPORT_FILE).read_text())
    report["raw_dir"] = str(tmp_path / "gone")
    (moved / REPORT_FILE).write_text(json.dumps(report))
    with pytest.raises(FileNotFoundError, match=r"its (val|test) recording .* is not at .*gone.*content check needs"):
        plan_build("pretrain", corpus, tmp_path / "o", exclude_from=[str(moved)])
    only = tmp_path / "only_test"
    (only / "x").mkdir(parents=True)
    shutil.copy(corpus / "other/zzzzzzzz_s009_t000.edf", only / "x")
    with pytest.raises(FileNotFoundError, match="every one of the 1 recordings .* is in a downstream val/test split"):
        plan_build("pretrain", only, tmp_path / "o", exclude_from=[str(down)])


def test_pretraining_corpus_excludes_eegmat_held_out_subjects(tmp_path):
    raw = _eegmat_copy(tmp_path / "eegmat")
    down = tmp_path / "workload"
    build_dataset("workload", raw, down, seed=0, test_subjects="Subject03", val_subjects="Subject04")
    plan = plan_build("pretrain", raw, tmp_path / "pre", seed=0, exclude_from=[str(down)])
    excluded = {x["file"]: x["reason"] for x in plan.downstream["excluded"]}
    assert set(excluded) == {f"Subject0{s}_{k}.edf" for s in (3, 4) for k in (1, 2)}
    assert excluded["Subject03_1.edf"] == ("subject Subject03 is in the workload test split; "
                                           "same content as workload:Subject03_1.edf (test split)")
    assert excluded["Subject04_2.edf"].startswith("subject Subject04 is in the workload val split")
    assert sorted(e.relpath for e in plan.entries) == ["Subject02_1.edf", "Subject02_2.edf", "Subject05_1.edf", "Subject05_2.edf"]
    # a pretraining folder that calls the subjects otherwise (lower case): still the same subjects
    other = tmp_path / "renamed"
    other.mkdir()
    shutil.copy(raw / "Subject03_2.edf", other / "subject03_run9.edf")
    shutil.copy(raw / "Subject02_2.edf", other / "subject02_run9.edf")
    r = build_dataset("pretrain", other, tmp_path / "pre2", seed=0, exclude_from=[str(down)])
    assert [x["file"] for x in r.excluded] == ["subject03_run9.edf"]
    assert r.excluded[0]["reason"].startswith("subject Subject03 is in the workload test split")  # case-folded ids
    assert _corpus_recordings(tmp_path / "pre2") == {"subject02_run9.edf"}
