"""neurolm_nb.baselines: braindecode's ShallowFBCSPNet / EEGNet on the windows and splits of a built dataset.

In the main venv braindecode cannot be imported: the baseline says so ({"skipped": why}) and the command line lists
the runs as skipped. Where braindecode imports (`.venv-interop`), a tiny real training on real EEGMAT windows runs:
`NEUROLM_REQUIRE_BRAINDECODE=1 .venv-interop/bin/python -m pytest tests/test_baselines.py -q` turns the skip into
a failure.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from neurolm_nb.baselines import (BRAINDECODE_MODELS, braindecode_baseline, braindecode_unavailable, main, summarise,
                                  window_arrays)
from neurolm_nb.core import shared_dir
from neurolm_nb.shards import build_dataset, samples_dir_for

REQUIRE = os.environ.get("NEUROLM_REQUIRE_BRAINDECODE", "") not in ("", "0")
WHY = braindecode_unavailable()


def need_braindecode():
    if WHY is not None:
        if REQUIRE:
            pytest.fail(f"NEUROLM_REQUIRE_BRAINDECODE is set but braindecode is not usable: {WHY}")
        pytest.skip(f"braindecode is not usable here: {WHY}")


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines") / "workload"
    build_dataset("workload", samples_dir_for("workload"), root, seed=0)
    return root


def test_window_arrays_are_the_evaluation_splits(sample_root):
    x, y, subjects = window_arrays(sample_root, "test", "workload")
    assert x.shape[1:] == (19, 800) and x.dtype == np.float32 and len(x) == len(y) == len(subjects)
    train_subjects = set(window_arrays(sample_root, "train", "workload")[2].tolist())
    assert not train_subjects & set(subjects.tolist()) and set(y.tolist()) == {0, 1}


def test_without_braindecode_the_baseline_is_skipped_with_the_reason(sample_root, tmp_path):
    if WHY is None:
        pytest.skip("braindecode imports here: the skip path cannot be taken")
    r = braindecode_baseline(sample_root, "workload", "EEGNet")
    assert set(r) == {"model", "skipped"} and "braindecode cannot be imported" in r["skipped"]
    assert main(["--root", str(sample_root), "--models", *BRAINDECODE_MODELS, "--out", str(tmp_path)]) == 2
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["model"] for r in report["runs"]] == list(BRAINDECODE_MODELS)
    assert report["summary"]["EEGNet"]["skipped"] and report["summary"]["EEGNet"]["balanced_accuracy"]["mean"] is None


def test_summarise_mean_and_sd():
    runs = [{"model": "m", "seed": s, "balanced_accuracy": b, "roc_auc": None, "pr_auc": 0.5} for s, b in [(0, .6), (1, .8)]]
    s = summarise(runs)["m"]
    assert s["seeds"] == [0, 1] and np.isclose(s["balanced_accuracy"]["mean"], 0.7)
    assert np.isclose(s["balanced_accuracy"]["sd"], np.std([.6, .8], ddof=1)) and s["roc_auc"]["mean"] is None
    assert s["pr_auc"]["sd"] == 0.0


def test_a_folder_that_is_no_dataset_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a built dataset"):
        braindecode_baseline(tmp_path / "nowhere", "workload")


def test_bad_model_name_is_refused(sample_root):
    from neurolm_nb.baselines import make_braindecode_model
    with pytest.raises(ValueError, match="ResNet"):
        make_braindecode_model("ResNet", 19, 800, 2, 200.0)


@pytest.fixture(scope="module")
def eegmat_root(tmp_path_factory):
    "A few real EEGMAT recordings: 3 train, 1 validation and 1 test subject."
    raw = shared_dir() / "data" / "eegmat"
    if not (raw / "Subject02_1.edf").exists():
        pytest.skip(f"no EEGMAT recordings in {raw}")
    root = tmp_path_factory.mktemp("eegmat") / "workload"
    subjects = ["Subject02", "Subject03", "Subject04", "Subject05", "Subject06"]
    build_dataset("workload", raw, root, seed=0, subjects=subjects, test_subjects=("Subject02",),
                  val_subjects=("Subject03",))
    return root


@pytest.mark.parametrize("model", BRAINDECODE_MODELS)
def test_real_training_on_eegmat(eegmat_root, model, tmp_path):
    need_braindecode()
    r = braindecode_baseline(eegmat_root, "workload", model, seed=0, epochs=2, batch_size=32)
    y_test = window_arrays(eegmat_root, "test", "workload")[1]
    assert r["probs"].shape == (len(y_test), 2) and np.allclose(r["probs"].sum(1), 1, atol=1e-5)
    assert np.array_equal(r["labels"], y_test) and set(r["subjects"].tolist()) == {"Subject02"}
    assert r["best_epoch"] in (1, 2) and [e["epoch"] for e in r["epochs"]] == [1, 2]
    assert r["val"]["roc_auc"] == max(e["val_roc_auc"] for e in r["epochs"])  # the kept epoch is the best on val
    assert 0.0 <= r["balanced_accuracy"] <= 1.0 and r["roc_auc"] is not None and r["n"] == len(y_test)
    again = braindecode_baseline(eegmat_root, "workload", model, seed=0, epochs=2, batch_size=32)
    assert np.allclose(again["probs"], r["probs"], atol=1e-5)  # seeded: the same run twice


def test_cli_writes_metrics_and_predictions(eegmat_root, tmp_path):
    need_braindecode()
    assert main(["--root", str(eegmat_root), "--models", "EEGNet", "--seeds", "0", "1", "--epochs", "1",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["summary"]["EEGNet"]["seeds"] == [0, 1]
    for seed in (0, 1):
        with np.load(tmp_path / "predictions" / f"EEGNet_seed{seed}.npz") as z:
            assert z["probs"].shape == (len(z["labels"]), 2) and len(z["subjects"]) == len(z["labels"])


def test_cli_floors_dir_feeds_the_cv_summary(eegmat_root, tmp_path):
    "--floors-dir puts each seed's test and validation predictions where collect_run / cv-summary read them."
    need_braindecode()
    from neurolm_nb.evaluation import collect_run
    ev = tmp_path / "run" / "evaluation"
    ev.mkdir(parents=True)
    (ev / "metrics.json").write_text(json.dumps({"split": "test", "val_split": "val", "seeds": [0, 1]}))
    assert main(["--root", str(eegmat_root), "--models", "EEGNet", "--seeds", "0", "1", "--epochs", "1",
                 "--out", str(tmp_path / "out"), "--floors-dir", str(ev / "floors")]) == 0
    runs = collect_run(tmp_path / "run")["EEGNet (braindecode)"]
    assert [r["seed"] for r in runs] == [0, 1]
    y_val = window_arrays(eegmat_root, "val", "workload")[1]
    for r in runs:
        assert np.array_equal(r["val"]["labels"], y_val) and r["val"]["probs"].shape == (len(y_val), 2)
        with np.load(tmp_path / "out" / "predictions" / f"EEGNet_seed{r['seed']}.npz") as z:
            assert np.array_equal(r["test"]["probs"], z["probs"])
