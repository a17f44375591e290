"""Tests of `neurolm_nb.instruction_tuning` (nbs/31_instruction_tuning.ipynb): the starting model and its tokenizer, the stage-3
loss (answer tokens reach back to every real EEG token and to nothing padded), the launch file, a short run in this
process from a stage-2 checkpoint, and `python -m neurolm_nb.instruction_tuning` under torchrun (2 gloo processes) giving the
weights of one process on the same global batch."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from neurolm_nb.core import load_checkpoint
from neurolm_nb.shards import build_dataset, samples_dir_for
from neurolm_nb.instruction_tuning import (PRETRAINED, InstructLoss, InstructModel, InstructSetup, checkpoint_text_tokenizer,
                                 resolve_start_model, run_instruct, spread_indices, tiny_neurolm)
from neurolm_nb.core import read_launch_config, write_launch_config
from neurolm_nb.instructions import (InstructionDataset, MixedInstructions, collate_instructions, find_task_datasets,
                                     load_text_tokenizer, longest_text)
from neurolm_nb.neurolm import IGNORE_INDEX, load_neurolm, save_neurolm
from neurolm_nb.training import TrainConfig, launch_torchrun, read_metrics


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest on a shared CI machine


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    "A run root with built workload + tusl datasets (samples) and a stage-2 checkpoint of a tiny NeuroLM."
    root = tmp_path_factory.mktemp("run")
    for name in ("workload", "tusl"):
        build_dataset(name, samples_dir_for(name), root / "datasets" / name, seed=0)
    save_neurolm(tiny_neurolm(3), root / PRETRAINED, step=7, setup={"gpt": "tiny", "text_tokenizer": None})
    return root


def cfg(out_dir, **kw):
    base = dict(lr=1e-3, min_lr=1e-4, max_steps=3, warmup_steps=1, weight_decay=0.1, betas=(0.9, 0.95), grad_clip=1.0,
                batch_size=4, out_dir=str(out_dir), progress=False, eval_every=0, resume=False)
    return TrainConfig(**{**base, **kw})


def test_start_model_and_its_tokenizer(run_root, tmp_path):
    lm, spec, source = resolve_start_model(None, run_root)
    assert spec == "tiny" and source == str(run_root / PRETRAINED)
    reference = tiny_neurolm(3).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in lm.state_dict().items())
    _, spec, source = resolve_start_model(None, None)  # standalone, no stage 2: a tiny random model, and it says so
    assert spec == "tiny" and "random" in source
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        resolve_start_model(tmp_path / "nope.pt")
    assert checkpoint_text_tokenizer({"text_tokenizer": "/models/gpt2", "setup": {"gpt": "tiny"}}) == "/models/gpt2"
    assert checkpoint_text_tokenizer({"setup": {"gpt": "random:gpt2-medium"}}) == "gpt2-medium"
    assert spread_indices(5, None).tolist() == [0, 1, 2, 3, 4] and spread_indices(9, 3).tolist() == [0, 4, 8]


def test_a_hub_folder_is_accepted_as_the_start_model(run_root, tmp_path):
    "A save_pretrained NeuroLM starts stage 3 as its checkpoint does: weights, frozen parameters, mode, tokenizer, logits."
    from neurolm_nb.hub import ModelCard, PretrainedFolderError, save_pretrained
    by_file, file_spec, _ = resolve_start_model(None, run_root)
    folder = save_pretrained(tiny_neurolm(3), tmp_path / "hub", card=ModelCard(usage={"text_tokenizer": "tiny"}))
    by_folder, spec, source = resolve_start_model(str(folder), tmp_path / "run_without_stage2")
    assert (spec, source) == (file_spec, str(folder)) and by_folder.training == by_file.training
    assert list(by_folder.state_dict()) == list(by_file.state_dict())
    assert all(torch.equal(v, by_file.state_dict()[k]) for k, v in by_folder.state_dict().items())
    frozen = lambda m: [n for n, p in m.named_parameters() if not p.requires_grad]
    assert frozen(by_folder) == frozen(by_file) and all(n.startswith("encoder.") for n in frozen(by_folder))
    tok = load_text_tokenizer(spec)
    ds = InstructionDataset(run_root / "datasets" / "workload", "train", tok, sep_id=by_file.config.vocab.sep_id)
    batch = collate_instructions([ds[i] for i in range(3)])
    args = (batch["X"], batch["input_chans"], batch["input_time"], batch["input_mask"])
    with torch.no_grad():
        assert torch.equal(by_folder.eval().eeg_features(*args), by_file.eval().eeg_features(*args))
        assert torch.equal(by_folder(*args, text=batch["text"], all_logits=True).logits,
                           by_file(*args, text=batch["text"], all_logits=True).logits)
    # a card without usage: the tokenizer the vocabulary implies (512 text tokens: the tiny one)
    assert resolve_start_model(str(save_pretrained(tiny_neurolm(3), tmp_path / "bare")))[1] == "tiny"
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedFolderError, match=r"config\.json is missing"):
        resolve_start_model(str(tmp_path / "empty"))


def test_a_pipeline_run_without_stage2_stops_naming_the_file_and_the_stage(tmp_path):
    "With a run root, a missing stage-2 model is an error, never a tiny random NeuroLM."
    with pytest.raises(FileNotFoundError) as info:
        resolve_start_model(None, tmp_path / "run")
    message = str(info.value)
    assert str(tmp_path / "run" / PRETRAINED) in message
    assert "run the 'pretrain' stage first, or name a checkpoint in the 'checkpoint' parameter" in message


def test_stage3_outputs_load_without_unpickling_code(run_root, tmp_path):
    "neurolm.pt (with its setup, text tokenizer and tasks) and the training checkpoints load with weights_only=True."
    setup = InstructSetup(run_root=str(run_root), tasks=["workload"], text_max_len=None, text_batch=1, text_block=16,
                          val_samples=4)
    run_instruct(setup, cfg(tmp_path, max_steps=2, ckpt_every=1))
    for path in [tmp_path / "neurolm.pt", *sorted((tmp_path / "checkpoints").glob("step_*.pt"))]:
        saved = torch.load(path, weights_only=True)
        assert "model" in saved, path
    assert load_neurolm(tmp_path / "neurolm.pt") is not None


def test_answer_loss_reaches_every_real_eeg_token_and_no_padding(run_root):
    lm = tiny_neurolm(0)
    tok = load_text_tokenizer("tiny")
    roots = find_task_datasets(run_root / "datasets")
    fit = longest_text(list(roots), tok)
    data = MixedInstructions([InstructionDataset(r, "train", tok, sep_id=lm.config.vocab.sep_id, text_max_len=fit)
                              for r in roots.values()])
    batch = collate_instructions([data[0], data[len(data) - 1]])  # a workload and a tusl window
    embeds = lm.embed_eeg(batch["X"], batch["input_chans"], batch["input_time"], batch["input_mask"]).detach()
    embeds.requires_grad_(True)
    out = lm(eeg_embeds=embeds, input_chans=batch["input_chans"], input_time=batch["input_time"],
             input_mask=batch["input_mask"], text=batch["text"], text_targets=batch["text_targets"], supervised_only=True)
    out.loss.backward()
    touched = embeds.grad.abs().sum(-1) > 0
    assert torch.equal(touched, batch["input_mask"])  # the stair/text mask: all real EEG, nothing padded
    # the stage loss: instruction + web text, one forward pass
    loss, terms = InstructLoss(None)(InstructModel(lm), batch)
    assert torch.allclose(loss, out.loss) and set(terms) == {"instruct_loss", "instruct_accuracy"}
    assert int((batch["text_targets"] != IGNORE_INDEX).sum()) == 5 + 4  # " Yes/No"-style 5 tokens, "B) eot"-style 4


def test_launch_config_round_trip(tmp_path):
    setup = InstructSetup(run_root="/r", tasks=["workload", "tusl"], text_max_len=None, balanced_sampling=True)
    config = cfg(tmp_path, no_decay=("*.bias",))
    path = write_launch_config(tmp_path / "launch.json", setup=setup, train=config)
    assert read_launch_config(path, setup=InstructSetup, train=TrainConfig) == (setup, config)
    data = json.loads(path.read_text())
    data["setup"]["text_max_lenn"] = 3
    path.write_text(json.dumps(data))
    with pytest.raises(KeyError, match="text_max_lenn"):
        read_launch_config(path, setup=InstructSetup, train=TrainConfig)


def test_short_run_from_a_stage2_checkpoint(run_root, tmp_path):
    setup = InstructSetup(run_root=str(run_root), text_max_len=None, text_batch=1, text_block=16, val_samples=4,
                          export_pretrained=str(tmp_path / "hub"))
    result = run_instruct(setup, cfg(tmp_path, eval_every=3))
    assert result.step == 3
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert {"instruct_loss", "text_loss", "eval_workload_balanced_accuracy", "eval_tusl_answer_nll"} <= set(rows[-1])
    ckpt = load_checkpoint(tmp_path / "neurolm.pt")
    assert ckpt["text_tokenizer"] == "tiny" and sorted(ckpt["tasks"]) == ["tusl", "workload"] and ckpt["step"] == 3
    tuned = load_neurolm(ckpt).state_dict()
    start = tiny_neurolm(3).state_dict()  # the stage-2 weights it started from
    assert not torch.equal(tuned["gpt.lm_head.weight"], start["gpt.lm_head.weight"])
    assert torch.equal(tuned["encoder.patch_embed.conv1.weight"], start["encoder.patch_embed.conv1.weight"])  # frozen
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["start"] == str(run_root / PRETRAINED) and info["tasks"]["workload"]["train"] == 58
    # export_pretrained: the same weights in hub format; its card names the stage, tasks, tokenizer and metrics
    from neurolm_nb.hub import CARD_NAME, read_card
    exported, spec, _ = resolve_start_model(str(tmp_path / "hub"))
    assert spec == "tiny" and all(torch.equal(v, tuned[k]) for k, v in exported.state_dict().items())
    facts = read_card(tmp_path / "hub")
    assert "pipeline stage `instruct`" in (tmp_path / "hub" / CARD_NAME).read_text()
    assert facts.usage == {"text_tokenizer": "tiny", "tasks": ", ".join(ckpt["tasks"])}
    assert "workload [train: 58 windows" in facts.data and "tusl [train:" in facts.data and "val:" in facts.data
    assert facts.metrics["updates"] == 3 and "validation.workload_balanced_accuracy" in facts.metrics
    assert facts.options["balanced_sampling"].startswith("False")


def test_torchrun_two_processes_match_one(run_root, tmp_path):
    "Workload only (every sample has 5 answer tokens), so the mean of per-process means is the global mean."
    base = dict(run_root=str(run_root), tasks=["workload"], text_max_len=None, text_block=16, val_samples=4)
    one, two = tmp_path / "one", tmp_path / "two"
    run_instruct(InstructSetup(**base, text_batch=2), cfg(one, batch_size=4))
    launch = write_launch_config(tmp_path / "two.json", setup=InstructSetup(**base, text_batch=1), train=cfg(two, batch_size=2))
    proc = launch_torchrun(2, ["neurolm_nb.instruction_tuning", "--config", str(launch)], timeout_s=240)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["world_size"] == 2
    a, b = (load_checkpoint(p / "neurolm.pt")["model"] for p in (one, two))
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    ra, rb = (read_metrics(p / "metrics.jsonl")[-1] for p in (one, two))
    assert abs(ra["loss"] - rb["loss"]) < 1e-5


def test_prepare_steps_read_the_setup_and_stop_with_clear_errors(run_root):
    from neurolm_nb.instruction_tuning import instruct_data, instruct_text, prepare_instruct
    with pytest.raises(ValueError, match="InstructSetup needs datasets_root or run_root"):
        prepare_instruct(InstructSetup(), cfg(run_root / "unused"))
    lm, spec, _ = resolve_start_model(None, run_root)
    tok = load_text_tokenizer(spec)
    roots = find_task_datasets(run_root / "datasets")
    train_sets, mixed, val_sets, text_len = instruct_data(InstructSetup(text_max_len=None, max_train_windows=3), roots,
                                                          tok, lm.config.vocab)
    assert [d.task.name for d in train_sets] == list(roots) and all(len(d) <= 3 for d in train_sets)
    assert len(mixed) == sum(len(d) for d in train_sets) and text_len == longest_text(list(roots), tok)
    assert all(len(d) > 0 and not d.train for d in val_sets)
    assert instruct_text(InstructSetup(text_batch=0), lm, spec) == (None, {})
    stream, info = instruct_text(InstructSetup(text_batch=2, text_block=16), lm, spec)
    assert stream.batch(0)[0].shape == (2, 16) and info["text_train_tokens"] > 0
    with pytest.raises(ValueError, match="exceeds the GPT"):
        instruct_text(InstructSetup(text_block=lm.config.gpt.block_size + 1), lm, spec)


def test_select_metric_keeps_the_best_validated_weights(run_root, tmp_path):
    "select_metric: neurolm.pt holds the weights of the validated update with the best mean metric over the tasks"
    " (read back from that update's own checkpoint); AUROC is reported for the two-option task; no validation, no selection."
    setup = InstructSetup(run_root=str(run_root), text_max_len=None, text_batch=0, val_samples=8, select_metric="answer_nll")
    run_instruct(setup, cfg(tmp_path, max_steps=5, eval_every=1, ckpt_every=1, keep_last=10, lr=3e-3))
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval_workload_answer_nll" in r]
    assert len(rows) == 5 and all(0 <= r["eval_workload_roc_auc"] <= 1 for r in rows)
    assert not any("eval_tusl_roc_auc" in r for r in rows)                     # three options: no AUROC
    mean_nll = [(r["eval_workload_answer_nll"] + r["eval_tusl_answer_nll"]) / 2 for r in rows]
    best = rows[int(np.argmin(mean_nll))]["step"]
    ckpt = load_checkpoint(tmp_path / "neurolm.pt")
    assert ckpt["selected"]["step"] == best and ckpt["selected"]["value"] == pytest.approx(min(mean_nll))
    at_best = load_checkpoint(tmp_path / "checkpoints" / f"step_{best:08d}.pt")["model"]
    assert all(torch.equal(v, at_best["lm." + k]) for k, v in load_neurolm(ckpt).state_dict().items())
    assert json.loads((tmp_path / "run_info.json").read_text())["selected"]["step"] == best
    with pytest.raises(ValueError, match="needs validation"):
        run_instruct(setup, cfg(tmp_path / "noval", max_steps=2, eval_every=0))
