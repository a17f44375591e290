"""Tests of `neurolm_nb.pretrain` (nbs/22_pretrain.ipynb): crops, text windows, codes, the stage-2 loss, the
launch file, and — with real processes — `python -m neurolm_nb.pretrain` alone and under torchrun (2 processes,
gloo) giving the same weights as one process on the same global batch."""
import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neurolm_nb.core import latest_checkpoint, load_checkpoint, read_launch_config, write_launch_config
from neurolm_nb.shards import build_dataset, samples_dir_for
from neurolm_nb.neurolm import IGNORE_INDEX, load_neurolm
from neurolm_nb.patching import NeuroLMCollate
from neurolm_nb.pretrain import (STAGE1_TOKENIZER, CodeHead, EEGCrops, PretrainLoss, PretrainSetup, TextStream,
                                 build_gpt, build_pretrain_model, crop_seconds, evaluate_pretraining,
                                 find_eeg_datasets, random_tokenizer, resolve_tokenizer, stage1_tokenizer)
from neurolm_nb.training import TrainConfig, launch_torchrun, read_metrics
from neurolm_nb.vq import save_tokenizer

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest on a shared CI machine


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    "A `pretrain` dataset built from the HMC samples: 4 channels, 64-s windows (16 train crops of 4 x 16 s at L=64)."
    root = tmp_path_factory.mktemp("datasets")
    build_dataset("pretrain", samples_dir_for("hmc"), root / "pretrain", seed=0)
    return root


@pytest.fixture(scope="module")
def crops(datasets_root):
    return EEGCrops(find_eeg_datasets(datasets_root), "train", max_tokens=64)


@pytest.fixture(scope="module")
def tiny_parts(crops):
    torch.manual_seed(0)
    tokenizer, source = stage1_tokenizer(None, None, crops, NeuroLMCollate(64), seed=0)
    assert source == "random"
    gpt, _ = build_gpt("tiny")
    return tokenizer, gpt


def test_crops_fit_the_budget(datasets_root, crops):
    assert crop_seconds(19, 53, 256) == 13 and crop_seconds(4, 150, 1024) == 64 and crop_seconds(23, 10, 1024) == 10
    assert len(crops) == 16 and (crops.n_tokens == 64).all()
    item = crops[3]
    assert item["x"].shape == (4, 16 * 200) and item["channel_index"].shape == (4,)
    wide = EEGCrops(find_eeg_datasets(datasets_root, ["pretrain"]), "train", max_tokens=7)  # 4 channels: 1 s < 2 s
    assert len(wide) == 0 and wide.skipped and "fewer than 2" in wide.skipped[0]["reason"]
    with pytest.raises(FileNotFoundError, match="nope"):
        find_eeg_datasets(datasets_root, ["nope"])


def test_text_stream_does_not_depend_on_the_number_of_processes():
    ids = torch.arange(5000).numpy() % 300
    one, two = TextStream(ids, 4, 16, seed=1), TextStream(ids, 2, 16, seed=1)
    for step in (0, 7):
        x1, y1 = one.batch(step)
        x2 = torch.cat([two.batch(step, rank=r, world_size=2)[0] for r in range(2)])
        assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1])
    # with accumulation: micro-step m of rank r takes slots (m * W + r) * b ...
    accumulated = torch.cat([two.batch(3, micro=m)[0] for m in range(2)])
    assert torch.equal(accumulated, one.batch(3)[0])
    assert not torch.equal(one.batch(1)[0], one.batch(2)[0])


def test_code_head_gives_the_tokenizer_codes(crops, tiny_parts):
    tokenizer, _ = tiny_parts
    batch = NeuroLMCollate(64)([crops[i] for i in range(4)])
    args = (batch["X"], batch["input_chans"], batch["input_time"], batch["input_mask"])
    head = CodeHead(tokenizer)
    codes = head(tokenizer.encode(*args))
    assert torch.equal(codes, tokenizer.get_codes(*args))
    assert codes.unique().numel() > 4  # k-means spread the codebook over the data
    head.train()
    assert not head.training and not any(p.requires_grad for p in head.parameters())


def test_stage1_tokenizer_is_read_from_the_run_root(tmp_path):
    written = random_tokenizer(seed=5)
    save_tokenizer(written, tmp_path / STAGE1_TOKENIZER)
    found, source = resolve_tokenizer(None, tmp_path)
    assert source == str(tmp_path / STAGE1_TOKENIZER)
    assert all(torch.equal(v, found.state_dict()[k]) for k, v in written.state_dict().items())
    assert resolve_tokenizer(None, None)[1] == "random"  # standalone: the visible fallback


def test_a_hub_folder_is_accepted_as_the_stage1_tokenizer(tmp_path, crops, tiny_parts):
    "A save_pretrained folder gives the tokenizer of its checkpoint: same weights, features and codes; no k-means re-init."
    from neurolm_nb.hub import PretrainedFolderError, save_pretrained
    tokenizer, _ = tiny_parts
    save_tokenizer(tokenizer, tmp_path / "tokenizer.pt")
    folder = save_pretrained(tokenizer, tmp_path / "tokenizer_hub")
    by_file, _ = resolve_tokenizer(str(tmp_path / "tokenizer.pt"))
    by_folder, source = stage1_tokenizer(str(folder), tmp_path / "run_without_stage1", crops, NeuroLMCollate(64), seed=9)
    assert source == str(folder) and type(by_folder) is type(by_file)
    assert list(by_folder.state_dict()) == list(by_file.state_dict())
    assert all(torch.equal(v, by_file.state_dict()[k]) for k, v in by_folder.state_dict().items())
    assert [n for n, p in by_folder.named_parameters() if not p.requires_grad] == \
        [n for n, p in by_file.named_parameters() if not p.requires_grad]
    batch = NeuroLMCollate(64)([crops[i] for i in range(4)])
    args = (batch["X"], batch["input_chans"], batch["input_time"], batch["input_mask"])
    with torch.no_grad():
        assert torch.equal(by_folder.eval().encode(*args), by_file.eval().encode(*args))
        assert torch.equal(CodeHead(by_folder)(by_folder.encode(*args)), by_file.get_codes(*args))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedFolderError, match=r"config\.json is missing"):  # a folder is never unpickled
        resolve_tokenizer(str(tmp_path / "empty"))


def test_a_pipeline_run_without_stage1_stops_naming_the_file_and_the_stage(tmp_path):
    "With a run root, a missing stage-1 tokenizer is an error, never a random tokenizer."
    with pytest.raises(FileNotFoundError) as info:
        resolve_tokenizer(None, tmp_path / "run")
    message = str(info.value)
    assert str(tmp_path / "run" / STAGE1_TOKENIZER) in message
    assert "run the 'tokenizer' stage first, or name a checkpoint in the 'tokenizer' parameter" in message


def test_stage2_loss_falls_on_a_tiny_overfit(crops, tiny_parts):
    tokenizer, gpt = tiny_parts
    torch.manual_seed(0)
    model = build_pretrain_model(tokenizer, copy.deepcopy(gpt), seed=0).train()
    batch = NeuroLMCollate(64)([crops[i] for i in range(4)])
    text = TextStream(torch.arange(4000).numpy() * 7 % 500, 2, 32, seed=0)
    encoder = copy.deepcopy(model.lm.encoder.state_dict())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)

    class State:  # the same update every time: the same text windows, a fixed batch to overfit
        step, rank, world_size = 0, 0, 1

    rows = []
    for _ in range(25):
        loss, terms = PretrainLoss(text)(model, batch, State())  # a fresh loss: micro-step 0 again
        opt.zero_grad(); loss.backward(); opt.step()
        rows.append({"loss": loss.item(), **{k: v.item() for k, v in terms.items()}})
    first, last = rows[0], rows[-1]
    assert abs(first["loss"] - (first["eeg_loss"] + first["text_loss"])) < 1e-5  # equal weights of one
    assert last["eeg_loss"] < 0.6 * first["eeg_loss"] and last["text_loss"] < 0.6 * first["text_loss"]
    assert all(torch.equal(v, model.lm.encoder.state_dict()[k]) for k, v in encoder.items())  # frozen
    val = evaluate_pretraining(model.eval(), crops, NeuroLMCollate(64), text.batch(0), batch_size=4, max_batches=1)
    assert 0 <= val["eeg_accuracy"] <= 1 and val["eeg_tokens"] == 4 * 4 * 15
    assert abs(val["eeg_perplexity"] - torch.tensor(val["eeg_loss"]).exp().item()) < 1e-3


def test_launch_file_round_trip(datasets_root, tmp_path):
    setup = PretrainSetup(datasets_root=str(datasets_root), max_tokens=64, text_batch=1, text_block=32,
                          eeg_datasets=["pretrain"], causal_encoder=True, val_batches=0, export_pretrained="/tmp/hub")
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=1, max_steps=3, betas=(0.9, 0.95), grad_clip=1.0,
                      batch_size=4, out_dir="/tmp/somewhere", progress=False, keep_last=3, no_decay=("*.bias",),
                      dist_timeout_s=90.0)
    launch = write_launch_config(tmp_path / "launch.json", setup=setup, train=cfg)
    assert read_launch_config(launch, setup=PretrainSetup, train=TrainConfig) == (setup, cfg)
    data = json.loads(launch.read_text())
    data["train"]["lrr"] = 1.0
    launch.write_text(json.dumps(data))
    with pytest.raises(KeyError, match="lrr"):
        read_launch_config(launch, setup=PretrainSetup, train=TrainConfig)
    with pytest.raises(ValueError, match="attn_impl"):
        PretrainSetup(attn_impl="fast")


def _flags(datasets_root, tokenizer_path, out_dir, batch_size, text_batch, export=None):
    setup = PretrainSetup(datasets_root=str(datasets_root), tokenizer=str(tokenizer_path), gpt="tiny", max_tokens=64,
                          text_batch=text_batch, text_block=32, val_batches=1, val_text_windows=2,
                          export_pretrained=None if export is None else str(export))
    cfg = TrainConfig(lr=3e-3, min_lr=3e-4, warmup_steps=1, max_steps=4, weight_decay=0.1, betas=(0.9, 0.95),
                      grad_clip=1.0, batch_size=batch_size, seed=0, out_dir=str(out_dir), eval_every=4,
                      device="cpu", progress=False)
    launch = write_launch_config(Path(out_dir).parent / f"{Path(out_dir).name}_launch.json", setup=setup, train=cfg)
    return ["--config", str(launch)]


def test_two_processes_match_one_and_the_entry_point_runs(tmp_path, datasets_root, tiny_parts):
    tokenizer, _ = tiny_parts
    save_tokenizer(tokenizer, tmp_path / "tokenizer.pt")  # both runs start from the same stage-1 tokenizer
    alone, together = tmp_path / "alone", tmp_path / "ddp"
    # one process, global batch 8 EEG + 2 text windows, through the module's entry point
    proc = subprocess.run([sys.executable, "-m", "neurolm_nb.pretrain",
                           *_flags(datasets_root, tmp_path / "tokenizer.pt", alone, 8, 2, export=tmp_path / "hub")],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 4 and summary["world_size"] == 1
    # two processes (gloo), 4 EEG + 1 text window each
    out = launch_torchrun(2, ["neurolm_nb.pretrain", *_flags(datasets_root, tmp_path / "tokenizer.pt", together, 4, 1)],
                          env={"OMP_NUM_THREADS": "1"}, timeout_s=300)
    assert json.loads(out.stdout.strip().splitlines()[-1])["world_size"] == 2

    a = load_checkpoint(latest_checkpoint(alone / "checkpoints"))
    b = load_checkpoint(latest_checkpoint(together / "checkpoints"))
    assert a["step"] == b["step"] == 4 and a["global_batch"] == b["global_batch"] == 8
    assert sorted(a["model"]) == sorted(b["model"])
    worst = max((a["model"][k].float() - b["model"][k].float()).abs().max().item() for k in a["model"])
    assert worst < 1e-5, f"2 processes differ from 1 by {worst}"

    rows_a, rows_b = read_metrics(alone / "metrics.jsonl"), read_metrics(together / "metrics.jsonl")
    assert [r["step"] for r in rows_a] == [1, 2, 3, 4]
    for key in ("eeg_loss", "text_loss", "eeg_accuracy"):
        assert abs(rows_a[0][key] - rows_b[0][key]) < 1e-5  # the logged terms are means over the global batch
    assert {"eval_eeg_loss", "eval_eeg_accuracy", "eval_eeg_perplexity", "eval_text_loss"} <= set(rows_a[-1])
    model = load_neurolm(alone / "neurolm.pt")
    assert torch.load(alone / "neurolm.pt", weights_only=True)["setup"]["gpt"] == "tiny"  # plain data, no code
    sd = model.state_dict()
    assert all(torch.equal(sd[k], a["model"]["lm." + k]) for k in sd)
    info = json.loads((together / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["train_crops"] == 16
    # export_pretrained: the same weights in hub format, with a card naming the stage, its data and metrics
    from neurolm_nb.hub import CARD_NAME, from_pretrained, read_card
    from neurolm_nb.neurolm import NeuroLM
    exported = from_pretrained(tmp_path / "hub", expect=NeuroLM)
    assert all(torch.equal(v, sd[k]) for k, v in exported.state_dict().items()) and list(exported.state_dict()) == list(sd)
    facts = read_card(tmp_path / "hub")
    assert "pipeline stage `pretrain`" in (tmp_path / "hub" / CARD_NAME).read_text()
    assert facts.usage == {"text_tokenizer": "tiny"} and facts.metrics["updates"] == 4
    assert facts.metrics["validation.eeg_loss"] == pytest.approx(rows_a[-1]["eval_eeg_loss"], rel=1e-3)
    from neurolm_nb.shards import load_manifest
    train = load_manifest(datasets_root / "pretrain")["splits"]["train"]
    assert f"pretrain [train: {train['n_windows']} windows of {len(train['subjects'])} subjects" in facts.data
    assert all(subject in facts.data for subject in train["subjects"]) and "Text: " in facts.data
    assert not (together / "hub").exists() and not any(p.name == "hub" for p in together.iterdir())


def test_code_prior_baselines_count_the_same_tokens_and_the_position_guess_beats_the_unigram_one(crops, tiny_parts):
    from neurolm_nb.pretrain import code_prior_baselines
    tokenizer, gpt = tiny_parts
    model = build_pretrain_model(tokenizer, copy.deepcopy(gpt), seed=0).eval()
    priors = code_prior_baselines(model, crops, crops, NeuroLMCollate(64), batch_size=4, max_batches=2)
    val = evaluate_pretraining(model, crops, NeuroLMCollate(64), None, batch_size=4, max_batches=2)
    assert priors["tokens"] == val["eeg_tokens"] > 0
    # fitted and scored on the same crops, the per-position mode can only match or beat the global one
    assert 0 < priors["unigram_accuracy"] <= priors["position_accuracy"] <= 1
    # by hand: the most frequent target of those tokens, and how often it is the target
    from collections import Counter
    targets = []
    for b in range(2):
        batch = NeuroLMCollate(64)([crops[i] for i in range(4 * b, 4 * b + 4)])
        _, t, _ = model.eeg_inputs(batch)
        targets += t[t != IGNORE_INDEX].tolist()
    assert abs(priors["unigram_accuracy"] - Counter(targets).most_common(1)[0][1] / len(targets)) < 1e-12


def test_save_stage_model_writes_what_the_next_stage_reads(tmp_path, datasets_root, crops, tiny_parts):
    "Rank 0's end of a stage: neurolm.pt (final weights, step, setup, extra record), run_info.json, and the hub copy."
    from neurolm_nb.hub import from_pretrained, read_card
    from neurolm_nb.neurolm import NeuroLM
    from neurolm_nb.pretrain import pretrain_card, save_stage_model
    from neurolm_nb.training import Schedule, TrainResult
    tokenizer, gpt = tiny_parts
    lm = build_pretrain_model(tokenizer, copy.deepcopy(gpt), seed=0).lm
    setup = PretrainSetup(datasets_root=str(datasets_root), export_pretrained=str(tmp_path / "hub"))
    result = TrainResult(lm, 5, 2, 1, [{"step": 5, "loss": 3.0}], None, Schedule(8, 2, 5, 1), None, 2.5)
    info = {"eeg_datasets": [str(datasets_root / "pretrain")], "tokenizer": "random", "text_tokenizer_spec": "tiny"}
    path = save_stage_model(lm, setup, TrainConfig(out_dir=str(tmp_path / "out")), result, info, pretrain_card, tasks=["x"])
    assert path == tmp_path / "out" / "neurolm.pt"
    saved = load_checkpoint(path)
    assert (saved["step"], saved["tasks"], saved["setup"]) == (5, ["x"], dataclasses.asdict(setup))
    reloaded = load_neurolm(path)
    assert all(torch.equal(v, lm.state_dict()[k]) for k, v in reloaded.state_dict().items())
    run_info = json.loads((tmp_path / "out" / "run_info.json").read_text())
    assert {k: run_info[k] for k in ("steps", "world_size", "elapsed_s", "tokenizer")} == \
        {"steps": 5, "world_size": 1, "elapsed_s": 2.5, "tokenizer": "random"}
    assert run_info["schedule"] == {"global_batch": 8, "steps_per_epoch": 2, "max_steps": 5, "warmup_steps": 1}
    hub = from_pretrained(tmp_path / "hub", expect=NeuroLM)
    assert all(torch.equal(v, lm.state_dict()[k]) for k, v in hub.state_dict().items())
    assert read_card(tmp_path / "hub").usage == {"text_tokenizer": "tiny"}
    # without out_dir nothing is written
    assert save_stage_model(lm, dataclasses.replace(setup, export_pretrained=None), TrainConfig(), result, info,
                            pretrain_card) is None


def test_prepare_steps_stop_with_clear_errors(datasets_root):
    from neurolm_nb.pretrain import pretrain_eeg_data
    with pytest.raises(ValueError, match="PretrainSetup needs datasets_root or run_root"):
        pretrain_eeg_data(PretrainSetup())
    with pytest.raises(ValueError, match="no training crops of <= 2 tokens"):
        pretrain_eeg_data(PretrainSetup(datasets_root=str(datasets_root), max_tokens=2))
    roots, train, val = pretrain_eeg_data(PretrainSetup(datasets_root=str(datasets_root), max_tokens=64))
    assert roots == [datasets_root / "pretrain"] and len(train) == 16 and (val is None or len(val) > 0)
