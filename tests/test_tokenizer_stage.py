"""Stage 1 (neurolm_nb.tokenizer_stage): smoke training of the text-aligned tokenizer on the data samples,
its outputs, resume, data selection, and two real processes under torchrun."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from neurolm_nb.core import write_launch_config
from neurolm_nb.tokenizer_stage import (
    CropToTokens, TokenizerRun, build_sample_datasets, build_vq, eeg_training_set, find_datasets, load_run_text,
    read_code_usage, train_tokenizer,
)
from neurolm_nb.training import launch_torchrun, read_metrics
from neurolm_nb.vq import load_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sample_roots(tmp_path_factory):
    "Workload and pretraining datasets built from the synthetic data_samples/ recordings."
    return build_sample_datasets(tmp_path_factory.mktemp("datasets"), ("workload", "pretrain"), seed=0)


def tiny_run(out_dir, roots, steps=40, **train_overrides):
    return TokenizerRun(out_dir=str(out_dir), dataset_roots=[str(r) for r in roots], model="tiny", max_tokens=256,
                        max_samples=128, text_batch=2, text_block=32, usage_every=10, seed=0,
                        train=dict(max_steps=steps, warmup_steps=4, lr=2e-3, min_lr=2e-4, weight_decay=1e-4,
                                   batch_size=8, progress=False, device="cpu", **train_overrides))


@pytest.fixture(scope="module")
def smoke(sample_roots, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    run = tiny_run(out, sample_roots)
    run.export_pretrained = str(tmp_path_factory.mktemp("stage1_hub") / "tokenizer")  # the stage's hub-format export
    return run, train_tokenizer(run)


def test_smoke_training_lowers_reconstruction_and_uses_many_codes(smoke):
    run, result = smoke
    rows = result.history
    assert len(rows) == 40 and all(np.isfinite(r["loss"]) for r in rows)
    rec = [r["rec_freq"] + r["rec_raw"] for r in rows]
    assert np.mean(rec[-5:]) < np.mean(rec[:5]) - 0.1, rec
    assert result.code_usage[-1]["used_codes"] > 1
    assert [u["step"] for u in result.code_usage] == [10, 20, 30, 40]
    # the saved tokenizer is the trained one and codes with more than one code
    vq = load_tokenizer(result.tokenizer_path).eval()
    data = eeg_training_set(run.dataset_roots, run.splits, run.max_tokens, 16, 0)
    from neurolm_nb.patching import NeuroLMCollate
    batch = NeuroLMCollate(run.max_tokens)([data[i] for i in range(8)])
    codes = vq.get_codes(batch["X"], batch["input_chans"], batch["input_time"], batch["input_mask"])
    assert codes[batch["input_mask"]].unique().numel() > 1
    trained = result.model.vq
    for k, v in trained.state_dict().items():
        assert torch.equal(vq.state_dict()[k], v), k


def test_smoke_outputs_and_alignment_terms(smoke):
    run, result = smoke
    out = result.tokenizer_path.parent
    assert read_metrics(out / "train" / "metrics.jsonl") == json.loads(json.dumps(result.history))
    assert read_code_usage(out / "code_usage.jsonl") == result.code_usage
    saved = torch.load(result.tokenizer_path, weights_only=True)  # plain data: no code runs when it is read
    for step_file in sorted((out / "train" / "checkpoints").glob("step_*.pt")):  # resumable, and as safe
        assert torch.load(step_file, weights_only=True)["step"] == 40
    assert saved["step"] == 40 and saved["text_source"] == "tiny" and saved["run"] == run.to_dict()
    first, last = result.history[0], result.history[-1]
    assert first["alpha"] == 0.0 and last["alpha"] > 0.99
    assert {"domain_eeg", "domain_text", "domain_acc", "domain_acc_eeg", "domain_acc_text"} <= set(last)
    # the text table is the source's, untouched by training
    source, _ = load_run_text(run)
    assert torch.equal(result.model.vq.text_embedding.weight.cpu(), source.embedding)


def test_build_vq_is_reproducible_from_the_seed(smoke):
    run, _ = smoke
    source, _ = load_run_text(run)
    torch.manual_seed(123)  # global state must not matter
    a = build_vq(run, source)
    torch.manual_seed(456)
    b = build_vq(run, source)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.config.text_vocab_size == source.vocab_size == 512


def test_a_finished_run_resumes_without_training_again(sample_roots, tmp_path):
    run = tiny_run(tmp_path, sample_roots, steps=6)
    first = train_tokenizer(run)
    again = train_tokenizer(run)
    assert [r["step"] for r in again.history] == list(range(1, 7))
    assert again.code_usage == first.code_usage
    a, b = load_tokenizer(first.tokenizer_path), load_tokenizer(again.tokenizer_path)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_data_selection_and_cropping(sample_roots, tmp_path):
    data = eeg_training_set(sample_roots, ["train"], max_tokens=64, max_samples=20, seed=1)
    assert len(data) == 20
    for i in range(len(data)):
        c, t = data[i]["x"].shape
        assert c * (t // 200) <= 64 and t % 200 == 0 and t >= 200
    again = eeg_training_set(sample_roots, ["train"], max_tokens=64, max_samples=20, seed=1)
    assert all(torch.equal(data[i]["x"], again[i]["x"]) for i in range(20))
    with pytest.raises(ValueError, match="max_tokens=2"):
        CropToTokens(eeg_training_set(sample_roots[:1], ["train"], 256), 2)[0]
    (tmp_path / "datasets").mkdir()
    with pytest.raises(FileNotFoundError, match="datasets"):
        find_datasets(tmp_path)
    (tmp_path / "datasets" / "workload").symlink_to(sample_roots[0], target_is_directory=True)
    assert [p.name for p in find_datasets(tmp_path)] == ["workload"]
    with pytest.raises(FileNotFoundError, match="tuab"):
        find_datasets(tmp_path, ["workload", "tuab"])


def test_run_settings_are_checked():
    with pytest.raises(ValueError, match="lrr"):
        TokenizerRun(out_dir="x", train={"lrr": 1e-3})
    with pytest.raises(ValueError, match="model"):
        TokenizerRun(out_dir="x", model="huge")
    run = TokenizerRun(out_dir="x", model="neurolm")
    assert run.vq_config().dim == 768 and TokenizerRun.from_dict(run.to_dict()) == run


def test_two_processes_under_torchrun(sample_roots, tmp_path):
    run = tiny_run(tmp_path / "out", sample_roots, steps=4)
    run.usage_every = 2
    launch = write_launch_config(tmp_path / "launch.json", run=run)
    done = launch_torchrun(2, ["neurolm_nb.tokenizer_stage", "--config", launch], timeout_s=300)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["step"] == 4
    rows = read_metrics(tmp_path / "out" / "train" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    usage = read_code_usage(tmp_path / "out" / "code_usage.jsonl")
    assert [u["step"] for u in usage] == [2, 4]
    # the interval's counts are summed over both ranks: every real token of both ranks' batches of updates 1-2
    from neurolm_nb.training import ShardedBatchSampler
    data = eeg_training_set(run.dataset_roots, run.splits, run.max_tokens, run.max_samples, run.seed)
    expected = 0
    for rank in (0, 1):
        sampler = ShardedBatchSampler(len(data), 8, world_size=2, rank=rank, seed=run.seed)
        sampler.set_epoch(0)
        for batch_indices, _ in zip(sampler, range(2)):
            expected += sum(data[i]["x"].shape[0] * (data[i]["x"].shape[1] // 200) for i in batch_indices)
    assert usage[0]["tokens"] == expected
    vq = load_tokenizer(tmp_path / "out" / "tokenizer.pt")
    assert vq.quantizer.initted.item() == 1.0


def test_export_is_a_hub_folder_that_stage2_accepts(smoke, tmp_path):
    "export_pretrained: the trained tokenizer as safetensors + card; pretrain's resolver reads it, features as from tokenizer.pt."
    from neurolm_nb.shards import load_manifest
    from neurolm_nb.hub import CARD_NAME, assert_same_weights, from_pretrained, read_card
    from neurolm_nb.patching import NeuroLMCollate
    from neurolm_nb.pretrain import resolve_tokenizer
    from neurolm_nb.vq import VQTokenizer
    run, result = smoke
    folder = Path(run.export_pretrained)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert_same_weights(load_tokenizer(result.tokenizer_path), from_pretrained(folder, expect=VQTokenizer))
    card, facts = (folder / CARD_NAME).read_text(), read_card(folder)
    assert "pipeline stage `tokenizer`" in card and facts.usage == {"text_source": "tiny"}
    for root in run.dataset_roots:  # every dataset, with its train subjects from the split manifest
        manifest = load_manifest(root)
        assert f"{manifest['dataset']} [train: {manifest['splits']['train']['n_windows']} windows" in facts.data
        assert manifest["splits"]["train"]["subjects"][0] in facts.data
    assert facts.metrics["last_update.step"] == 40 and abs(facts.metrics["last_update.loss"] - result.history[-1]["loss"]) < 1e-3
    assert facts.options["reversal"].startswith("True")
    # stage 2 takes the folder where it takes tokenizer.pt, even in a run root without stage 1
    by_folder, source = resolve_tokenizer(str(folder), tmp_path / "run_without_stage1")
    by_file, _ = resolve_tokenizer(result.tokenizer_path)
    assert source == str(folder) and not by_folder.training
    data = eeg_training_set(run.dataset_roots, run.splits, run.max_tokens, 8, 0)
    batch = NeuroLMCollate(run.max_tokens)([data[i] for i in range(8)])
    args = (batch["X"], batch["input_chans"], batch["input_time"], batch["input_mask"])
    with torch.no_grad():
        assert torch.equal(by_folder.encode(*args), by_file.encode(*args))
        assert torch.equal(by_folder.get_codes(*args), by_file.get_codes(*args))


def test_a_collapsed_codebook_stops_the_run_naming_the_update_or_is_restarted(sample_roots, tmp_path):
    "min_used_codes above the codebook size makes every interval a collapse: the stop and restart paths, for real."
    from neurolm_nb.alignment import CodebookCollapse
    run = tiny_run(tmp_path / "stop", sample_roots, steps=12)
    run.usage_every, run.min_used_codes = 4, 10**6
    with pytest.raises(CodebookCollapse, match=r"codebook collapse at update 4: \d+ of \d+ codes used"):
        train_tokenizer(run)
    assert (tmp_path / "stop" / "figures" / "code_usage_collapse.png").stat().st_size > 0
    assert not (tmp_path / "stop" / "tokenizer.pt").exists()  # nothing is published from a collapsed run
    run = tiny_run(tmp_path / "restart", sample_roots, steps=12)
    run.usage_every, run.min_used_codes, run.on_collapse = 4, 10**6, "restart"
    result = train_tokenizer(run)
    assert [u["step"] for u in result.code_usage] == [4, 8, 12]
    assert all(u["restarted_codes"] == u["dead_codes"] > 0 for u in result.code_usage)
    assert result.tokenizer_path.exists()
    with pytest.raises(ValueError, match="on_collapse"):
        TokenizerRun(out_dir="x", on_collapse="ignore")


def test_reconstruction_vs_mean_scores_a_perfect_and_a_mean_predictor():
    from types import SimpleNamespace
    from neurolm_nb.tokenizer_stage import reconstruction_vs_mean
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    targets = {"Y_freq": torch.randn(2, 3, 100, generator=g), "Y_raw": torch.randn(2, 3, 200, generator=g)}
    batch = {"input_mask": mask, "targets": targets}
    perfect = SimpleNamespace(reconstructions={"freq": targets["Y_freq"].clone(), "raw": targets["Y_raw"].clone()})
    got = reconstruction_vs_mean(perfect, batch, batch)
    for key in ("freq", "raw"):
        real = targets[f"Y_{key}"][mask]
        assert got[key]["tokenizer"] == 0.0
        # the mean of the same real tokens: its MSE is their (biased) variance; padding never enters
        assert abs(got[key]["mean target"] - real.var(0, unbiased=False).mean().item()) < 1e-6


def test_linear_probe_scores_validation_subjects_of_labelled_datasets(smoke, sample_roots, tmp_path):
    "The probe uses every labelled dataset (not the unlabelled pretraining corpus), fits on train, scores on val."
    from neurolm_nb.shards import WindowDataset
    from neurolm_nb.tokenizer_stage import labelled_datasets, linear_probe, probe_candidates
    workload = next(r for r in sample_roots if r.name == "workload")
    assert labelled_datasets(sample_roots) == [workload]
    assert probe_candidates(None, ["pretrain"], sample_roots) == []       # named, but it has no classes
    run_root = tmp_path / "run"
    (run_root / "datasets").mkdir(parents=True)
    for r in sample_roots:
        (run_root / "datasets" / r.name).symlink_to(r, target_is_directory=True)
    assert [p.name for p in probe_candidates(run_root, None, [])] == ["workload"]  # every labelled one of the run
    run, result = smoke
    untrained = build_vq(run, load_run_text(run)[0])
    probes = {who: linear_probe(vq, workload, run.max_tokens, seed=0) for who, vq in
              (("trained", load_tokenizer(result.tokenizer_path)), ("untrained", untrained))}
    n_val = len(WindowDataset(workload, "val"))
    for p in probes.values():
        assert p["scored_on"] == "val" and p["n"] == n_val and p["train_windows"] == len(WindowDataset(workload, "train"))
        assert 0 <= p["balanced_accuracy"] <= 1 and p["roc_auc"] is not None
    assert probes["trained"] != probes["untrained"]  # two different encoders
    capped = linear_probe(untrained, workload, run.max_tokens, seed=0, max_windows=20)
    assert capped["n"] == 20 and capped["train_windows"] == 20
