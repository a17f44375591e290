"""Tests of `neurolm_nb.evaluation` (nbs/32_evaluation.ipynb): metrics both ways (AUROC from scores vs hard labels,
unparseable answers), the metrics.json entry, the paper's numbers, the band-power baseline on real EEGMAT recordings
split by subject, and distributed evaluation: predictions gathered from 2 gloo processes under torchrun give the
single-process predictions and metrics."""
import json
import os

import numpy as np
import pytest
import torch

from neurolm_nb.core import write_launch_config
from neurolm_nb.shards import WindowDataset, build_dataset, samples_dir_for
from neurolm_nb.evaluation import (BANDPOWER_C, BINARY_METRICS, FLOORS, MULTICLASS_METRICS, PAPER_RESULTS, EvalSetup,
                                   balanced_threshold, band_power_features, bandpower_baseline,
                                   fit_floor, run_statistics, statistics_table, subject_bootstrap, fast_bacc, confusion, corrected_metrics, greedy_metrics, load_predictions,
                                   original_metrics, results_table, run_evaluation, task_metric_names, task_metrics)
from neurolm_nb.instruction_tuning import tiny_neurolm
from neurolm_nb.instructions import TASK_NAMES
from neurolm_nb.neurolm import save_neurolm
from neurolm_nb.training import launch_torchrun


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest on a shared CI machine


def test_auroc_from_scores_differs_from_hard_labels():
    "The model ranks perfectly but says 'Yes' to everything: AUROC 1 from its probabilities, 0.5 from hard labels."
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.45, 0.55], [0.40, 0.60], [0.35, 0.65], [0.10, 0.90]])
    corrected = corrected_metrics(labels, probs)
    original = original_metrics(labels, probs.argmax(1), 2)
    assert corrected["roc_auc"] == 1.0 and corrected["pr_auc"] == 1.0
    assert original["roc_auc"] == 0.5 and original["pr_auc"] == 0.5
    assert corrected["balanced_accuracy"] == original["balanced_accuracy"] == 0.5


def test_unparseable_answers_the_original_way_and_the_honest_way():
    labels = np.array([2, 2, 2, 0, 1, 1])
    parsed = np.array([-1, -1, 2, 0, 1, -1])
    assert original_metrics(labels, parsed, 3)["balanced_accuracy"] == pytest.approx((1 + 1 / 2 + 1) / 3)  # -1 -> class 2
    assert greedy_metrics(labels, parsed, 3)["balanced_accuracy"] == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)
    assert greedy_metrics(labels, parsed, 3)["accuracy"] == pytest.approx(3 / 6)
    binary = original_metrics(np.array([1, 0, 1]), np.array([-1, -1, 1]), 2)
    assert binary["balanced_accuracy"] == 0.75  # -1 thresholds to "No", as the original's metric code does
    assert confusion(labels, parsed, 3, unparseable_column=True) == [[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 1, 2]]
    assert corrected_metrics([1, 1, 1], [[0.4, 0.6]] * 3)["roc_auc"] is None  # undefined, not a crash


def test_task_entry_follows_the_contract():
    pred = {"labels": np.array([0, 1, 2, 3, 4, 0]), "probs": np.eye(5)[[0, 1, 2, 3, 3, 0]] * 0.9 + 0.02,
            "greedy_pred": np.array([0, -1, 2, 3, 4, -1])}
    entry = task_metrics(pred, "hmc")
    assert entry["n"] == 6 and entry["classes"] == ["W", "N1", "N2", "N3", "R"]
    assert set(MULTICLASS_METRICS) <= set(entry["corrected"]) and set(MULTICLASS_METRICS) <= set(entry["original"])
    assert entry["unparseable_rate"] == pytest.approx(2 / 6)
    assert entry["confusion"][4] == [0, 0, 0, 1, 0] and np.sum(entry["confusion"]) == 6
    assert entry["confusion_original"][1] == [0, 0, 0, 0, 1]  # unparseable -> the last class
    assert entry["paper"] == PAPER_RESULTS["NeuroLM"]["hmc"]
    table = results_table({"tasks": {"hmc": entry}})
    assert "| HMC | 6 | balanced_accuracy |" in table and "33.3%" in table
    json.dumps(entry)  # plain JSON types


def test_paper_results_are_complete():
    assert set(PAPER_RESULTS["NeuroLM"]) == set(TASK_NAMES)
    assert PAPER_RESULTS["NeuroLM"]["tuab"]["balanced_accuracy"] == 0.7826
    assert PAPER_RESULTS["NeuroLM"]["workload"]["roc_auc"] == 0.6253
    for name, row in PAPER_RESULTS["NeuroLM"].items():
        assert set(row) <= set(task_metric_names(name))
    assert task_metric_names("tuab") == BINARY_METRICS


def test_band_power_features():
    t = np.arange(800) / 200
    x = np.stack([np.sin(2 * np.pi * f * t)[None] for f in (2.0, 6.0, 10.0, 20.0, 40.0)]) * 10
    assert band_power_features(x).argmax(1).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="gamma"):
        band_power_features(x, sfreq=50.0)


def test_bandpower_baseline_on_real_eegmat(eegmat_dir, tmp_path):
    "Real recordings of 8 subjects, split by subject; the baseline is fitted on train and scored on test."
    raw = tmp_path / "raw"
    raw.mkdir()
    for f in sorted(eegmat_dir.glob("Subject*_*.edf"))[:16]:
        os.symlink(f, raw / f.name)
    build_dataset("workload", raw, tmp_path / "workload", seed=0)
    subjects = {s: set(WindowDataset(tmp_path / "workload", s).subjects) for s in ("train", "val", "test")}
    assert not (subjects["train"] & subjects["test"]) and subjects["test"]
    result = bandpower_baseline(tmp_path / "workload", "workload")
    assert result["C"] == BANDPOWER_C == 0.1 and result["n_train"] == 29 * 2 * len(subjects["train"])
    assert 0 <= result["balanced_accuracy"] <= 1 and 0 <= result["roc_auc"] <= 1
    assert np.sum(result["confusion"]) == 29 * 2 * len(subjects["test"])
    assert bandpower_baseline(tmp_path / "workload", "workload") == result  # one fixed recipe: deterministic
    # the Riemannian floor on the same windows and splits, with the subjects the bootstrap resamples
    riemann = fit_floor(tmp_path / "workload", "workload", "riemann")
    assert riemann["model"] == FLOORS["riemann"] and riemann["n_train"] == result["n_train"]
    for split in ("val", "test"):
        pred = riemann["predictions"][split]
        assert set(pred["subjects"]) == subjects[split] and pred["probs"].shape == (len(pred["labels"]), 2)
        assert np.allclose(pred["probs"].sum(1), 1)
    stats = run_statistics([riemann["predictions"]["test"]], [riemann["predictions"]["val"]], n_boot=200)
    assert stats["n_subjects"] == len(subjects["test"]) and stats["threshold_source"] == "val"


def test_distributed_predictions_equal_single_process(tmp_path):
    root = tmp_path / "datasets"
    for name in ("workload", "hmc"):
        build_dataset(name, samples_dir_for(name), root / name, seed=0)
    save_neurolm(tiny_neurolm(1), tmp_path / "model.pt", text_tokenizer="tiny")
    base = dict(datasets_root=str(root), checkpoint=str(tmp_path / "model.pt"), batch_size=1, max_samples=9)
    single = run_evaluation(EvalSetup(out_dir=str(tmp_path / "one"), **base))
    launch = write_launch_config(tmp_path / "eval.json", setup=EvalSetup(out_dir=str(tmp_path / "two"), **base))
    proc = launch_torchrun(2, ["neurolm_nb.evaluation", "--config", str(launch)], timeout_s=240)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["world_size"] == 2
    for name in ("workload", "hmc"):
        one = load_predictions(tmp_path / "one" / "predictions" / f"{name}.npz")
        two = load_predictions(tmp_path / "two" / "predictions" / f"{name}.npz")
        assert len(one["labels"]) == min(9, len(WindowDataset(root / name, "test")))
        for key in ("index", "labels", "greedy_pred", "answers"):
            assert np.array_equal(one[key], two[key]), (name, key)
        assert np.allclose(one["probs"], two["probs"], atol=1e-6) and np.allclose(one["probs"].sum(1), 1, atol=1e-5)
        assert np.array_equal(one["probs"], single[name]["probs"])
        assert task_metrics(one, name) == task_metrics(two, name)
    info = json.loads((tmp_path / "two" / "eval_info.json").read_text())
    assert info["world_size"] == 2 and info["text_tokenizer"] == "tiny"
    with pytest.raises(FileNotFoundError, match="instruct stage"):
        run_evaluation(EvalSetup(datasets_root=str(root)))


def test_a_hub_folder_is_evaluated_like_its_checkpoint(tmp_path):
    "checkpoint= a save_pretrained folder: the same model and tokenizer, hence the same answers, read without unpickling."
    from neurolm_nb.evaluation import load_eval_model
    from neurolm_nb.hub import ModelCard, save_pretrained
    root = tmp_path / "datasets"
    build_dataset("workload", samples_dir_for("workload"), root / "workload", seed=0)
    save_neurolm(tiny_neurolm(2), tmp_path / "model.pt", text_tokenizer="tiny")
    folder = save_pretrained(tiny_neurolm(2), tmp_path / "hub", card=ModelCard(usage={"text_tokenizer": "tiny"}))
    base = dict(datasets_root=str(root), batch_size=2, max_samples=6)
    by_file = run_evaluation(EvalSetup(out_dir=str(tmp_path / "file"), checkpoint=str(tmp_path / "model.pt"), **base))
    by_folder = run_evaluation(EvalSetup(out_dir=str(tmp_path / "folder"), checkpoint=str(folder), **base))
    for key in ("labels", "greedy_pred", "answers", "probs", "subjects"):
        assert np.array_equal(by_file["workload"][key], by_folder["workload"][key]), key
    windows = WindowDataset(root / "workload", "test")   # every answer carries its window's subject
    assert by_file["workload"]["subjects"].tolist() == [windows.subjects[i] for i in by_file["workload"]["index"]]
    info = json.loads((tmp_path / "folder" / "eval_info.json").read_text())
    assert info["checkpoint"] == str(folder) and info["text_tokenizer"] == "tiny"
    lm, spec, _ = load_eval_model(EvalSetup(checkpoint=str(folder), text_tokenizer="stub"))
    assert spec == "stub" and not any(p.requires_grad for p in lm.encoder.parameters())  # an explicit tokenizer wins


def test_results_say_which_rows_are_real_eeg(tmp_path):
    "A dataset built from the project's synthetic samples is labelled so; one built from other recordings is real EEG."
    from neurolm_nb.shards import samples_dir_for
    from neurolm_nb.evaluation import data_source
    for name, raw in (("sample", samples_dir_for("workload")), ("real", tmp_path / "eegmat")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "build_report.json").write_text(json.dumps({"raw_dir": str(raw)}))
    assert data_source(tmp_path / "sample") == "synthetic sample"
    assert data_source(tmp_path / "real") == "real EEG"
    assert data_source(tmp_path / "not-built") == "unknown"


def _scores(seed, bias=0.0, n_subjects=8, per_subject=10, strength=1.5):
    r = np.random.default_rng(seed)
    subjects = np.repeat([f"S{i}" for i in range(n_subjects)], per_subject)
    labels = np.tile([0, 1], n_subjects * per_subject // 2)
    p = 1 / (1 + np.exp(-(strength * (labels - 0.5) + r.normal(0, 1, len(labels)) + bias)))
    return {"labels": labels, "probs": np.stack([1 - p, p], 1), "subjects": subjects}


def test_threshold_is_chosen_on_validation_scores_only():
    labels, scores = np.array([0, 0, 0, 1, 1, 1]), np.array([0.6, 0.7, 0.75, 0.8, 0.9, 0.95])
    assert balanced_threshold(labels, scores) == 0.8      # everything is above 0.5: the argmax would say 'yes' to all
    assert balanced_threshold(np.ones(3), scores[:3]) is None
    val, test = _scores(1, bias=2.0), _scores(2, bias=2.0)
    with_val = run_statistics([test], [val], n_boot=100)
    # the threshold depends on the validation scores, never on the test scores
    assert run_statistics([_scores(3, bias=2.0)], [val], n_boot=100)["per_seed"][0]["threshold"] == with_val["per_seed"][0]["threshold"]
    assert with_val["per_seed"][0]["threshold"] > 0.5
    assert with_val["mean"]["balanced_accuracy_val_threshold"] > with_val["mean"]["balanced_accuracy"]
    without = run_statistics([test], n_boot=100)
    assert without["threshold_source"] == "no val scores" and without["mean"]["balanced_accuracy_val_threshold"] is None
    assert "n/a (no val scores)" in statistics_table({"workload": {"m": without}})


def test_seed_statistics_and_subject_bootstrap():
    runs = [_scores(s) for s in (1, 2, 3)]
    stats = run_statistics(runs, [_scores(s + 10) for s in (1, 2, 3)], n_boot=300, seed=0)
    values = [r["balanced_accuracy"] for r in stats["per_seed"]]
    assert stats["n_seeds"] == 3 and stats["sd"]["balanced_accuracy"] == pytest.approx(np.std(values, ddof=1))
    assert stats["mean"]["balanced_accuracy"] == pytest.approx(np.mean(values))
    for m in ("balanced_accuracy", "balanced_accuracy_val_threshold", "roc_auc"):
        lo, hi = stats["ci95"][m]
        assert lo <= stats["mean"][m] <= hi
    assert run_statistics(runs, n_boot=300, seed=0)["ci95"] == run_statistics(runs, n_boot=300, seed=0)["ci95"]  # fixed seed
    table = statistics_table({"workload": {"NeuroLM": stats, "x": {"skipped": "why"}}})
    assert "± " in table and "(n=3)" in table and "| 8 (80) | 0.500 |" in table and "not run: why" in table
    one = run_statistics(runs[:1], n_boot=50)
    assert one["sd"]["balanced_accuracy"] is None and "(n=" not in statistics_table({"workload": {"m": one}})
    # resampling subjects, not windows: a subject effect widens the interval
    r = np.random.default_rng(0)
    clustered = {**runs[0], "probs": None}
    works = np.repeat(r.normal(0.5, 3, 8), 10)  # the model works for some subjects and fails (inverted) for others
    p = 1 / (1 + np.exp(-(works * (runs[0]["labels"] - 0.5) + r.normal(0, 0.5, 80))))
    clustered["probs"] = np.stack([1 - p, p], 1)
    by_subject = subject_bootstrap(fast_bacc, [clustered], 400)
    by_window = subject_bootstrap(fast_bacc, [{**clustered, "subjects": np.arange(80).astype(str)}], 400)
    assert by_subject[1] - by_subject[0] > by_window[1] - by_window[0]


def test_multiclass_chance_and_braindecode_hook(tmp_path):
    r = np.random.default_rng(0)
    run = {"labels": r.integers(0, 5, 100), "probs": r.dirichlet(np.ones(5), 100), "subjects": np.repeat(list("abcde"), 20)}
    stats = run_statistics([run], [run], n_boot=50)
    assert stats["chance"]["balanced_accuracy"] == 0.2 and stats["threshold_source"] == "multi-class"
    assert stats["mean"]["roc_auc"] is not None and "n/a (multi-class)" in statistics_table({"hmc": {"m": stats}})
    from neurolm_nb.baselines import braindecode_baseline, braindecode_unavailable
    if braindecode_unavailable():   # the evaluation stage's deep baseline says why it did not run
        build_dataset("workload", samples_dir_for("workload"), tmp_path / "workload", seed=0)
        hook = braindecode_baseline(tmp_path / "workload", "workload")
        assert "skipped" in hook and "braindecode" in hook["skipped"]


def test_greedy_agreement_and_skipped_models_noted_once():
    from neurolm_nb.evaluation import greedy_agreement
    pred = {"labels": np.array([0, 1, 1, 0]), "probs": np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]),
            "greedy_pred": np.array([0, 1, -1, 0])}
    agree = greedy_agreement(pred)
    assert (agree["all"], agree["parseable"], agree["unparseable_rate"], agree["n"]) == (0.5, pytest.approx(2 / 3), 0.25, 4)
    assert task_metrics(pred, "workload")["greedy_agreement"] == agree
    stats = run_statistics([_scores(1)], n_boot=50)
    skipped = {"skipped": "braindecode cannot be imported"}
    table = statistics_table({"workload": {"NeuroLM": stats, "ShallowFBCSPNet": skipped}, "hmc": {"ShallowFBCSPNet": skipped}})
    assert table.count("braindecode cannot be imported") == 1
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert not any("ShallowFBCSPNet" in line for line in rows)                  # no table row, a note below it
    assert table.splitlines()[-1] == "- ShallowFBCSPNet not run: braindecode cannot be imported (Workload, HMC)"


def _fold(eegmat_dir, tmp_path, name, subjects, test, val):
    "A run root whose datasets/workload is built from real EEGMAT recordings of `subjects`, test/val named."
    raw = tmp_path / f"raw_{name}"
    raw.mkdir()
    for s in subjects:
        for f in sorted(eegmat_dir.glob(f"{s}_*.edf")):
            os.symlink(f, raw / f.name)
    root = tmp_path / name
    build_dataset("workload", raw, root / "datasets" / "workload", seed=0, test_subjects=test, val_subjects=val)
    return root


def test_cv_summary_pools_real_folds(eegmat_dir, tmp_path):
    "Two folds built from real EEGMAT subjects (different test subjects): NeuroLM answers per seed (scores made here),"
    " LaBraM in one fold only, the band-power floor saved in one fold and fitted again from datasets/ in the other."
    import subprocess
    import sys
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from neurolm_nb.evaluation import answers_path, cv_summary, floor_path, save_predictions
    subjects = sorted({f.stem.split("_")[0] for f in eegmat_dir.glob("Subject*_*.edf")})[:8]
    folds = [_fold(eegmat_dir, tmp_path, "fold0", subjects[:4], subjects[:2], subjects[2:3]),
             _fold(eegmat_dir, tmp_path, "fold1", subjects[4:], subjects[4:6], subjects[6:7])]
    expected = []
    for f, root in enumerate(folds):
        ev = root / "evaluation"
        ev.mkdir()
        (ev / "metrics.json").write_text(json.dumps({"seeds": [0, 1], "split": "test", "val_split": "val"}))
        for k in (0, 1):
            for split in ("test", "val"):
                w = WindowDataset(root / "datasets" / "workload", split)
                labels = np.asarray(w.labels)
                p = 1 / (1 + np.exp(-(1.5 * (labels - 0.5) + np.random.default_rng(10 * f + k).normal(0, 1, len(labels)))))
                pred = {"labels": labels, "probs": np.stack([1 - p, p], 1), "subjects": np.asarray(w.subjects),
                        "greedy_pred": (p > 0.5).astype(int)}
                save_predictions(pred, "workload", answers_path(ev, k, "workload", None if split == "test" else split))
                if split == "test":
                    expected.append((balanced_accuracy_score(labels, p > 0.5), roc_auc_score(labels, p)))
                if f == 0 and k == 0:
                    save_predictions(pred, "workload", root / "seed0" / "labram" / "predictions" / f"{split}.npz")
    fit = fit_floor(folds[1] / "datasets" / "workload", "workload", "bandpower")
    for split, pred in fit["predictions"].items():
        save_predictions(pred, "workload", floor_path(folds[1] / "evaluation", "bandpower", split, "workload"))
        for k in (0, 1):  # a deep baseline per seed, as `python -m neurolm_nb.baselines --floors-dir` saves it (fold 1 only)
            save_predictions(pred, "workload", folds[1] / "evaluation" / "floors" / "EEGNet" / f"seed{k}" / split / "workload.npz")
    done = cv_summary(runs=folds, out_dir=tmp_path / "cv", n_boot=200)
    deep = done["models"]["EEGNet (braindecode)"]
    assert deep["n_runs"] == 2 and [r["seed"] for r in deep["runs"]] == [0, 1] and done["missing"]["EEGNet (braindecode)"] == [str(folds[0])]
    neurolm = done["models"]["NeuroLM (option scores)"]
    assert (neurolm["n_runs"], neurolm["n_folds"], neurolm["n_subjects"]) == (4, 2, 4)
    assert neurolm["mean"]["balanced_accuracy"] == pytest.approx(np.mean([e[0] for e in expected]))
    assert neurolm["mean"]["roc_auc"] == pytest.approx(np.mean([e[1] for e in expected]))
    assert neurolm["sd"]["roc_auc"] == pytest.approx(np.std([e[1] for e in expected], ddof=1))
    assert neurolm["chance"] == {"balanced_accuracy": 0.5, "roc_auc": 0.5}
    for m in ("balanced_accuracy", "balanced_accuracy_val_threshold", "roc_auc"):
        lo, hi = neurolm["ci95"][m]
        assert lo <= neurolm["pooled"][m] <= hi
    assert all(r["threshold"] is not None for r in neurolm["runs"])              # each fold's own validation subjects
    floor = done["models"][FLOORS["bandpower"]]
    assert floor["n_runs"] == 2                                                  # saved in fold1, fitted again in fold0
    for f, root in enumerate(folds):
        assert floor["runs"][f]["balanced_accuracy"] == pytest.approx(
            bandpower_baseline(root / "datasets" / "workload", "workload")["balanced_accuracy"])
    assert done["models"]["LaBraM"]["n_runs"] == 1 and done["missing"]["LaBraM"] == [str(folds[1])]
    text = (tmp_path / "cv" / "cv_results.md").read_text()
    assert "| NeuroLM (option scores) | 4 (2) | 4 (" in text and "LaBraM: no predictions in" in text
    assert (tmp_path / "cv" / "figures" / "cv_summary.png").stat().st_size > 0
    cli = subprocess.run([sys.executable, "-m", "neurolm_nb.evaluation", "cv-summary", "--runs", *map(str, folds),
                          "--out", str(tmp_path / "cli"), "--n-boot", "200"], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert json.loads((tmp_path / "cli" / "cv_metrics.json").read_text())["models"]["NeuroLM (option scores)"]["mean"] \
        == pytest.approx(neurolm["mean"])
