"""90_paper_figures: figures and tables regenerate from run directories, byte for byte, and a stage that has not
run is reported in index.md instead of crashing.

The run directories here are real: datasets built by `03b_shards` code from data_samples/, a tiny tokenizer
trained for a few updates by stage 1's code, and evaluation / LaBraM result files written in the shapes their
stages write (data, not mocks).
"""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neurolm_nb.core import save_json
from neurolm_nb.figures import (FIGURES, LABRAM_PAPER_COLUMN, LABRAM_RUN_COLUMN, PAPER_COLUMN, PAPER_NEUROLM,
                                RUN_COLUMN, RUN_ORIGINAL_COLUMN, example_evaluation_metrics, make_figures)

TOKENIZER_FIGURES = ("codebook_usage_over_training", "codebook_usage_histogram", "reconstructions", "alignment_maps")


def evaluation_file(root: Path) -> dict:
    "A tiny evaluation/metrics.json in 32_evaluation's contract, with numbers easy to find in the table."
    metrics = {"tasks": {
        "tuab": {"n": 40, "classes": ["normal", "abnormal"],
                 "corrected": {"balanced_accuracy": 0.6123, "roc_auc": 0.6456},
                 "original": {"balanced_accuracy": 0.6789, "roc_auc": 0.5999},
                 "unparseable_rate": 0.025, "confusion": [[15, 5], [10, 10]],
                 "baseline": {"name": "majority class", "balanced_accuracy": 0.5}},
        "tuev": {"n": 12, "classes": ["spsw", "gped", "pled", "eyem", "artf", "bckg"],
                 "corrected": {"balanced_accuracy": 0.3111, "cohen_kappa": 0.2222, "f1_weighted": 0.3333},
                 "original": {"balanced_accuracy": 0.3444, "cohen_kappa": 0.2555, "f1_weighted": 0.3666},
                 "unparseable_rate": 0.0, "confusion": [[2, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0], [0, 0, 2, 0, 0, 0],
                                                        [1, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 2]],
                 "baseline": {"name": "majority class", "balanced_accuracy": 0.1667}}},
        "paper": PAPER_NEUROLM}
    save_json(metrics, root / "evaluation" / "metrics.json")
    return metrics


def labram_file(root: Path) -> None:
    "labram/metrics.json as 16_labram_training writes it (its results_row)."
    save_json({"results_row": {"model": "LaBraM-tiny", "task": "workload", "split": "test", "balanced_accuracy": 0.5432,
                               "roc_auc": 0.5876, "pr_auc": 0.55, "accuracy": 0.54, "n": 174}},
              root / "labram" / "metrics.json")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    "A run root with a Workload dataset, a tiny stage-1 tokenizer (6 updates) and its code-usage log."
    from neurolm_nb.tokenizer_stage import TokenizerRun, build_sample_datasets, train_tokenizer
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("figruns") / "smoke"
    roots = build_sample_datasets(root / "datasets", ["workload"], seed=0)
    train_tokenizer(TokenizerRun(out_dir=str(root / "tokenizer"), dataset_roots=[str(r) for r in roots], max_samples=32,
                                 max_tokens=128, model="tiny", text_model="tiny", text_batch=2, text_block=32,
                                 usage_every=2, seed=0,
                                 train=dict(max_steps=6, warmup_steps=2, lr=2e-3, min_lr=2e-4, batch_size=8,
                                            progress=False, keep_last=1)))
    return root


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_figures_regenerate_byte_identically(trained_run, tmp_path):
    evaluation_file(trained_run)
    labram_file(trained_run)
    settings = dict(probe_samples=4, map_points=60, strict=True)
    first = make_figures(trained_run, tmp_path / "a", **settings)
    second = make_figures(trained_run, tmp_path / "b", **settings)
    assert not first.failed and not first.missing, (first.failed, first.missing)
    assert set(first.made) == set(FIGURES)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert sorted(a) == sorted(b)
    for name in TOKENIZER_FIGURES + ("results", "confusion_matrices", "stair_mask", "training_curves"):
        assert f"{name}.png" in a and f"{name}.svg" in a
    differ = [name for name in a if a[name] != b[name]]
    assert not differ, f"these files differ between two runs on the same run directory: {differ}"
    # the tokenizer figures really read the tokenizer and the datasets
    assert "tokenizer/tokenizer.pt" in first.made["reconstructions"].inputs
    assert "datasets/workload" in first.made["reconstructions"].inputs


def test_missing_stages_are_reported_not_fatal(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    evaluation_file(root)  # only the evaluation has run
    report = make_figures(root, strict=True, formats=("png",))
    index = (root / "figures" / "index.md").read_text()
    assert set(report.made) == {"stair_mask", "results", "confusion_matrices"}
    for name in TOKENIZER_FIGURES + ("datasets", "training_curves"):
        assert name in report.missing
        assert f"**{name}**" in index
    assert "tokenizer/tokenizer.pt not found" in report.missing["reconstructions"]
    assert "'tokenizer' stage has not run" in index
    assert "no LaBraM result" in index  # the table is made, without LaBraM's column filled
    recorded = json.loads((root / "figures" / "metrics.json").read_text())
    assert set(recorded["missing"]) == set(report.missing) and recorded["failed"] == {}
    assert (root / "figures" / "stair_mask.png").exists() and not (root / "figures" / "stair_mask.svg").exists()


def test_results_table_has_paper_and_run_numbers(tmp_path):
    root = tmp_path / "run"
    evaluation_file(root)
    labram_file(root)
    make_figures(root, tmp_path / "out", only=["results"], strict=True, formats=("png",))
    md = (tmp_path / "out" / "results.md").read_text()
    for number in ("0.7826", "0.4285", "0.6737", "0.8140", "0.6409",  # paper: NeuroLM (TUAB, TUEV kappa, HMC), LaBraM-Base
                   "0.6123", "0.6789", "0.2222", "0.5432"):            # this run: corrected, original, kappa, LaBraM
        assert number in md, f"{number} missing from results.md"
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        rows = {(r["task"], r["metric"]): r for r in csv.DictReader(f)}
    tuab = rows[("tuab", "balanced_accuracy")]
    assert float(tuab[PAPER_COLUMN]) == 0.7826 and float(tuab[LABRAM_PAPER_COLUMN]) == 0.8140
    assert float(tuab[RUN_COLUMN]) == 0.6123 and float(tuab[RUN_ORIGINAL_COLUMN]) == 0.6789
    assert float(rows[("tuev", "cohen_kappa")][RUN_COLUMN]) == 0.2222
    workload = rows[("workload", "roc_auc")]  # LaBraM's row beside NeuroLM's paper number
    assert float(workload[PAPER_COLUMN]) == 0.6253 and float(workload[LABRAM_RUN_COLUMN]) == 0.5876
    assert workload[RUN_COLUMN] == ""  # this evaluation did not score Workload
    assert float(rows[("tuab", "unparseable_rate")][RUN_COLUMN]) == 0.025
    assert [t for t, m in rows if m == "balanced_accuracy"] == ["tuab", "tuev", "seed", "hmc", "workload", "tusl"]


def test_broken_input_is_a_failure_not_a_missing_stage(tmp_path):
    root = tmp_path / "run"
    metrics = example_evaluation_metrics(0, n=20, tasks=["tuab"])
    metrics["tasks"]["tuab"]["confusion"] = [[1, 2, 3]]
    save_json(metrics, root / "evaluation" / "metrics.json")
    report = make_figures(root, only=["confusion_matrices"], formats=("png",))
    assert "not square" in report.failed["confusion_matrices"]
    assert "## Failed (1)" in (root / "figures" / "index.md").read_text()
    with pytest.raises(ValueError, match="not square"):
        make_figures(root, only=["confusion_matrices"], strict=True, formats=("png",))


def test_training_curves_across_runs(tmp_path):
    "Two runs (say two model sizes): both drawn, and the stage one of them lacks is noted."
    for name, steps in (("paper-b", 30), ("paper-l", 20)):
        log = tmp_path / name / "pretrain" / "metrics.jsonl"
        log.parent.mkdir(parents=True)
        log.write_text("".join(json.dumps({"step": s, "eeg_loss": 6.0 / s, "text_loss": 5.0}) + "\n"
                               for s in range(1, steps + 1)))
    log = tmp_path / "paper-b" / "tokenizer" / "train" / "metrics.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text("".join(json.dumps({"step": s, "loss": 3.0 - 0.01 * s}) + "\n" for s in range(1, 11)))
    report = make_figures(tmp_path / "paper-b", tmp_path / "out", runs=[tmp_path / "paper-b", tmp_path / "paper-l"],
                          only=["training_curves"], strict=True, formats=("png",))
    made = report.made["training_curves"]
    assert made.files == ["training_curves.png"]
    assert "pretrain/metrics.jsonl" in made.inputs and str(tmp_path / "paper-l" / "pretrain" / "metrics.jsonl") in made.inputs
    assert any(n.startswith("paper-l: no log for 'stage 1: tokenizer'") for n in made.notes)


def test_command_line(tmp_path):
    root = tmp_path / "run"
    evaluation_file(root)
    done = subprocess.run([sys.executable, "-m", "neurolm_nb.figures", "--run-root", str(root), "--only", "results",
                           "stair_mask", "--formats", "png"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "## Made (2)" in done.stdout
    assert (root / "figures" / "results.md").exists() and (root / "figures" / "stair_mask.png").exists()
    bad = subprocess.run([sys.executable, "-m", "neurolm_nb.figures", "--run-root", str(tmp_path / "nowhere")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "nowhere" in bad.stderr
