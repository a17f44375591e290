"""LaBraM training (neurolm_nb.labram_training): metrics gathered over two real processes, the VQ-NSP codebook watch
(stop / restart on a collapse), MEM pretraining, fine-tuning with the best validation epoch and ModelEMA, the stage's
predictions and model card."""
import math
import socket

import numpy as np
import pytest
import torch

from neurolm_nb.core import latest_checkpoint, load_checkpoint
from neurolm_nb.io import synth_eeg
from neurolm_nb import labram_training
from neurolm_nb.labram import LaBraMClassifier, LaBraMConfig, LaBraMForMEM
from neurolm_nb.labram_training import (
    MEM_DEFAULTS, FinetuneConfig, ModelEMA, finetune, finetune_loss, labram_card, predict,
    pretrain_mem,
)
from neurolm_nb.metrics import logit_metrics
from neurolm_nb.patching import collate_labram
from neurolm_nb.training import TrainConfig, train
from neurolm_nb.vq import VQConfig, VQTokenizer

torch.set_num_threads(1)


def test_finetuned_classifier_card(tmp_path):
    "export_pretrained's card: the stage, the Workload splits with their subjects, the metrics and the options."
    from neurolm_nb.shards import build_dataset, load_manifest, samples_dir_for
    from neurolm_nb.hub import CARD_NAME, from_pretrained, read_card, save_pretrained
    build_dataset("workload", samples_dir_for("workload"), tmp_path / "workload", seed=0)
    card = labram_card(tmp_path / "workload", {"test": {"roc_auc": 0.61234, "n": 58}, "best_epoch": 2},
                       {"select_metric": "roc_auc (the original: accuracy)"})
    folder = save_pretrained(LaBraMClassifier(LaBraMConfig.tiny(), n_classes=1), tmp_path / "hub", card=card)
    text, facts = (folder / CARD_NAME).read_text(), read_card(folder)
    assert "pipeline stage `labram`" in text and "| test.roc_auc | 0.6123 |" in text and "select_metric" in text
    for split, d in load_manifest(tmp_path / "workload")["splits"].items():
        assert f"{split}: {d['n_windows']} windows of {len(d['subjects'])} subjects ({d['subjects'][0]}" in facts.data
    assert facts.metrics == {"test.roc_auc": 0.6123, "test.n": 58, "best_epoch": 2}
    assert isinstance(from_pretrained(folder), LaBraMClassifier)


def _ema_run(out_dir=None, callbacks=(), decay=0.9, steps=6, ckpt_every=0):
    torch.manual_seed(0)
    model = LaBraMClassifier(LaBraMConfig.tiny(drop_path=0.1), n_classes=1)
    ema = ModelEMA(model, decay=decay)
    cfg = TrainConfig(lr=3e-3, max_steps=steps, warmup_steps=1, batch_size=4, device="cpu", dtype="float32",
                      progress=False, out_dir=out_dir, ckpt_every=ckpt_every)
    result = train(model, toy_windows(16), lambda m, b: finetune_loss(m, b), cfg, collate_fn=collate_labram,
                   callbacks=[ema, *callbacks])
    return model, ema, result


def test_model_ema_equals_a_hand_computed_average():
    torch.manual_seed(0)  # the same initial weights as _ema_run's model
    start = {k: v.clone() for k, v in LaBraMClassifier(LaBraMConfig.tiny(drop_path=0.1), n_classes=1).state_dict().items()}
    after = []
    model, ema, _ = _ema_run(callbacks=[lambda s: after.append({k: v.clone() for k, v in s.model.state_dict().items()})])
    assert len(after) == 6
    for k, v in start.items():
        by_hand = v
        for weights in after:  # after each optimizer step: ema = 0.9 · ema + 0.1 · weights
            by_hand = 0.9 * by_hand + 0.1 * weights[k]
        torch.testing.assert_close(ema.module.state_dict()[k], by_hand, atol=1e-7, rtol=0)
    assert (ema.module.head.weight - model.head.weight).abs().max() > 1e-5  # it lags the trained weights
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(model, decay=1.5)


def test_model_ema_is_checkpointed_and_restored_on_resume(tmp_path):
    class Crash(Exception):
        pass

    def crash_at_5(state):  # after the checkpoint of update 4
        if state.step == 5:
            raise Crash()

    _, straight, done = _ema_run(out_dir=str(tmp_path / "straight"), ckpt_every=2)
    saved = load_checkpoint(done.checkpoint)
    assert sorted(saved["model_ema"]) == sorted(straight.module.state_dict())  # under the original's key
    assert all(torch.equal(saved["model_ema"][k], v) for k, v in straight.module.state_dict().items())
    with pytest.raises(Crash):
        _ema_run(out_dir=str(tmp_path / "crashed"), ckpt_every=2, callbacks=[crash_at_5])
    assert latest_checkpoint(tmp_path / "crashed" / "checkpoints").name == "step_00000004.pt"
    _, resumed, again = _ema_run(out_dir=str(tmp_path / "crashed"), ckpt_every=2)
    assert again.resumed_from.name == "step_00000004.pt"
    for k, v in straight.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[k], v), k  # the EMA continued from the checkpoint


def test_finetune_weight_decay_end_and_ema_options(tmp_path):
    torch.manual_seed(0)
    model = LaBraMClassifier(LaBraMConfig.tiny(drop_path=0.1), n_classes=1)
    cfg = FinetuneConfig(lr=3e-3, epochs=2, warmup_epochs=0, batch_size=4, device="cpu", dtype="float32",
                         weight_decay=0.05, weight_decay_end=0.2, model_ema=True, model_ema_decay=0.5,
                         model_ema_eval=True, out_dir=str(tmp_path / "ft"))
    assert cfg.train_config().weight_decay_end == 0.2
    val = toy_windows(8, seed=50)
    ft = finetune(model, toy_windows(16), val, cfg)
    wds = [r["weight_decay"] for r in ft.history]
    assert np.allclose(wds, [0.2 + 0.5 * (0.05 - 0.2) * (1 + np.cos(np.pi * k / 8)) for k in range(8)])
    assert isinstance(ft.ema, ModelEMA) and ft.ema.decay == 0.5
    assert "model_ema" in load_checkpoint(ft.train_result.checkpoint)
    scores, labels = predict(ft.model, val)  # the returned weights are the judged ones: the EMA's
    assert logit_metrics(labels, scores)[ft.select_metric] == ft.best_value
    if ft.best_epoch == 2:
        assert all(torch.equal(v, ft.ema.module.state_dict()[k]) for k, v in ft.model.state_dict().items())
    assert FinetuneConfig().weight_decay_end is None and FinetuneConfig().model_ema is False
    assert FinetuneConfig().model_ema_decay == 0.9999
    with pytest.raises(ValueError, match="model_ema"):
        finetune(model, toy_windows(8), val, FinetuneConfig(model_ema_eval=True, device="cpu"))


# ---------------------------------------------------------------- metrics, gathering, drivers
def test_stage_metrics_are_the_shared_ones():
    "The stage scores logits with metrics.logit_metrics: the shared names, None where undefined."
    labels = np.array([0, 0, 0, 0, 1, 1])
    r = logit_metrics(labels, np.array([[-2.0], [-1.0], [0.5], [-0.5], [1.0], [2.0]]))
    assert math.isclose(r["balanced_accuracy"], 0.875) and r["roc_auc"] == 1.0 and math.isclose(r["accuracy"], 5 / 6)
    assert not hasattr(labram_training, "classification_metrics")  # one set of metric functions (issue #11)
    assert logit_metrics(np.array([1, 1]), np.array([[0.3], [0.2]]))["roc_auc"] is None


def toy_windows(n, seed=0, channels=("FP1", "FP2", "C3", "C4", "O1", "O2"), seconds=2):
    return [{"x": torch.from_numpy(synth_eeg(list(channels), seconds, label=i % 2, seed=seed + i).astype(np.float32)),
             "ch_names": list(channels), "label": i % 2} for i in range(n)]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank, world, port, results):
    import os
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        clf = LaBraMClassifier(LaBraMConfig.tiny(drop_path=0.1), n_classes=1).eval()
        seen = []

        class Watched(torch.utils.data.Dataset):
            def __init__(self, items):
                self.items = items

            def __len__(self):
                return len(self.items)

            def __getitem__(self, i):
                seen.append(i)
                return self.items[i]

        scores, labels = predict(clf, Watched(toy_windows(11)), batch_size=4)
        ft = finetune(LaBraMClassifier(LaBraMConfig.tiny(drop_path=0.1), n_classes=1), toy_windows(8),
                      toy_windows(6, seed=100), FinetuneConfig(lr=1e-3, epochs=2, warmup_epochs=0, batch_size=2,
                                                               device="cpu", dtype="float32"))
        results[rank] = (scores, labels, sorted(seen), ft.epochs, ft.best_epoch)
    finally:
        dist.destroy_process_group()


def test_predictions_are_gathered_from_two_processes():
    "Real gloo processes: each scores its share, every process ends with all 11 predictions in dataset order."
    import torch.multiprocessing as mp
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_gather_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    (s0, l0, seen0, ep0, best0), (s1, l1, seen1, ep1, best1) = results[0], results[1]
    assert seen0 == list(range(0, 11, 2)) and seen1 == list(range(1, 11, 2))  # shares, no duplicates
    np.testing.assert_array_equal(s0, s1)
    np.testing.assert_array_equal(l0, np.arange(11) % 2)
    torch.manual_seed(0)
    single = LaBraMClassifier(LaBraMConfig.tiny(drop_path=0.1), n_classes=1).eval()
    s, _ = predict(single, toy_windows(11), batch_size=4)
    np.testing.assert_allclose(s0, s, atol=1e-6)
    assert ep0 == ep1 and best0 == best1 and len(ep0) == 2  # every rank chose the same epoch from the same numbers


def test_finetune_keeps_the_best_validation_epoch():
    torch.manual_seed(0)
    train_set, val_set = toy_windows(16), toy_windows(8, seed=50)
    model = LaBraMClassifier(LaBraMConfig.tiny(drop_path=0.1), n_classes=1)
    ft = finetune(model, train_set, val_set, FinetuneConfig(lr=3e-3, epochs=3, warmup_epochs=0, batch_size=4,
                                                            device="cpu", dtype="float32", select_metric="balanced_accuracy"))
    assert [r["epoch"] for r in ft.epochs] == [1, 2, 3]
    values = [r["val_balanced_accuracy"] for r in ft.epochs]
    assert ft.best_value == max(values) and ft.best_epoch == 1 + values.index(max(values))
    scores, labels = predict(ft.model, val_set)
    assert logit_metrics(labels, scores)["balanced_accuracy"] == ft.best_value  # the kept weights
    with pytest.raises(ValueError, match="cohen_kappa"):
        finetune(model, train_set, val_set, FinetuneConfig(select_metric="cohen_kappa", device="cpu"))


def test_pretrain_mem_learns_the_tokenizer_codes():
    torch.manual_seed(0)
    tokenizer = VQTokenizer(VQConfig.labram(conv_channels=4, dim=100, n_heads=4, encoder_depth=1, decoder_depth=1,
                                            n_codes=16, code_dim=8))
    model = LaBraMForMEM(LaBraMConfig.tiny(vocab_size=16))
    cfg = TrainConfig(**{**MEM_DEFAULTS, "lr": 2e-3, "epochs": 6, "warmup_epochs": 1, "batch_size": 4},
                      device="cpu", dtype="float32", progress=False)
    run = pretrain_mem(model, tokenizer, toy_windows(16), cfg)
    first, last = run.history[0], run.history[-1]
    assert {"loss_rec", "loss_rec_sym", "mlm_acc", "mlm_acc_sym"} <= set(last)
    assert last["loss"] < first["loss"]
    assert not any(p.requires_grad for p in tokenizer.parameters())  # frozen
    with pytest.raises(ValueError, match="16 codes"):
        pretrain_mem(LaBraMForMEM(LaBraMConfig.tiny()), tokenizer, toy_windows(4), cfg)


# ---------------------------------------------------------------- the VQ-NSP codebook watch, the stage's outputs
def _vqnsp_run(data, **kwargs):
    from neurolm_nb.labram_training import train_vqnsp
    torch.manual_seed(0)
    vq = VQTokenizer(VQConfig.labram(conv_channels=4, dim=100, n_heads=4, encoder_depth=1, decoder_depth=1,
                                     n_codes=64, code_dim=8))
    cfg = TrainConfig(lr=5e-4, max_steps=8, warmup_steps=1, batch_size=4, device="cpu", dtype="float32", progress=False)
    return (vq, *train_vqnsp(vq, data, cfg, usage_every=4, **kwargs))


def test_a_collapsed_vqnsp_codebook_stops_the_run_naming_the_update_or_is_restarted(tmp_path):
    "min_used_codes above the codebook size makes every interval a collapse: stop, restart and warn, in real training."
    import json
    from neurolm_nb.alignment import CodebookCollapse
    from neurolm_nb.labram_training import check_codebook, codebook_usage
    data = toy_windows(24)
    _, result, watch = _vqnsp_run(data, usage_path=tmp_path / "ok" / "code_usage.jsonl")
    assert result.step == 8 and [r["step"] for r in watch.history] == [4, 8]
    rows = [json.loads(line) for line in (tmp_path / "ok" / "code_usage.jsonl").read_text().splitlines()]
    assert [r["used_codes"] for r in rows] == [r["used_codes"] for r in watch.history]
    assert all(r["tokens"] == 4 * 4 * 12 for r in rows)  # 4 updates x 4 windows x (6 channels x 2 s)
    with pytest.raises(CodebookCollapse, match=r"codebook collapse at update 4: \d+ of 64 codes used"):
        _vqnsp_run(data, min_used_codes=65, usage_path=tmp_path / "stop" / "code_usage.jsonl")
    assert (tmp_path / "stop" / "figures" / "code_usage_collapse.png").stat().st_size > 0
    vq, result, restarted = _vqnsp_run(data, min_used_codes=65, on_collapse="restart")
    assert result.step == 8 and [r["step"] for r in restarted.history] == [4, 8]
    assert all(r["restarted_codes"] == r["dead_codes"] for r in restarted.history)
    assert any(r["restarted_codes"] > 0 for r in restarted.history)  # every dead code was moved
    with pytest.warns(RuntimeWarning, match=r"codebook collapse at update \d+: \d+ of 64"):
        _vqnsp_run(data, min_used_codes=65, on_collapse="warn")
    usage = codebook_usage(vq.eval(), data[:2])
    with pytest.raises(CodebookCollapse, match=r"codebook collapse over two windows: \d+ of 64 codes used"):
        check_codebook(usage, 65, "stop", "over two windows")
    assert check_codebook(usage, 1)["used_codes"] >= 1
    with pytest.raises(ValueError, match="on_collapse"):
        _vqnsp_run(data, on_collapse="ignore")


def test_stage_predictions_are_what_the_evaluation_stage_reads(tmp_path):
    from neurolm_nb.shards import WindowDataset, build_dataset, samples_dir_for
    from neurolm_nb.evaluation import stage_predictions
    from neurolm_nb.labram_training import save_stage_predictions, scores_to_probs
    build_dataset("workload", samples_dir_for("workload"), tmp_path / "workload", seed=0)
    splits = {s: WindowDataset(tmp_path / "workload", s) for s in ("test", "val")}
    torch.manual_seed(0)
    clf = LaBraMClassifier(LaBraMConfig.tiny(), n_classes=1)
    paths = save_stage_predictions(clf, splits, tmp_path / "labram")
    assert {s: p.name for s, p in paths.items()} == {"test": "test.npz", "val": "val.npz"}
    for split, d in splits.items():
        pred = stage_predictions(tmp_path / "labram", split)
        scores, _ = predict(clf, d)
        np.testing.assert_array_equal(pred["labels"], d.labels)
        np.testing.assert_allclose(pred["probs"][:, 1], 1 / (1 + np.exp(-scores[:, 0])), atol=1e-6)
        np.testing.assert_allclose(pred["probs"].sum(1), 1.0)
        assert list(pred["subjects"]) == list(d.subjects) and len(set(pred["subjects"])) >= 1
    np.testing.assert_allclose(scores_to_probs(np.array([[0.0, 0.0, np.log(2.0)]])), [[0.25, 0.25, 0.5]])


def test_labram_stage_pretrains_on_whole_training_recordings(tmp_path, nbs_dir):
    "pretrain_datasets: VQ-NSP and MEM read the whole recordings of the training subjects, cut into 4 s pieces, while"
    " fine-tuning keeps the paper's labelled windows; a corpus that holds a validation or test subject is refused."
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError
    from test_splits_leakage import _eegmat_copy
    from neurolm_nb.core import load_json
    from neurolm_nb.shards import WindowDataset, build_dataset
    raw, run = _eegmat_copy(tmp_path / "raw"), tmp_path / "run"
    workload = run / "datasets" / "workload"
    build_dataset("workload", raw, workload, seed=0, val_subjects=["Subject03"], test_subjects=["Subject02"])
    build_dataset("pretrain", raw, run / "datasets" / "pretrain", seed=0, exclude_from=[str(workload)])
    build_dataset("pretrain", raw, run / "datasets" / "everything", seed=0)
    corpus = WindowDataset(run / "datasets" / "pretrain", "train")
    pieces = sum(int(s["n_times"]) // 800 * int(s["n"]) for s in corpus.shards)
    params = dict(run_root=str(run), pretrain_datasets=["pretrain"], vq_steps=4, usage_every=2, mem_epochs=1,
                  finetune_epochs=1, batch_size=16)
    pm.execute_notebook(str(nbs_dir / "16_labram_training.ipynb"), str(tmp_path / "ok.ipynb"),
                        parameters={**params, "out_dir": str(tmp_path / "ok")}, kernel_name="python3",
                        cwd=str(nbs_dir), progress_bar=False, execution_timeout=600)
    m = load_json(tmp_path / "ok" / "metrics.json")
    ssl = m["self_supervised_data"]
    assert ssl["datasets"] == ["pretrain"] and ssl["seconds"] == 4.0 and ssl["pieces"] == pieces
    assert ssl["subjects"] == sorted(set(corpus.subjects)) and not {"Subject02", "Subject03"} & set(ssl["subjects"])
    assert m["pretraining"]["steps"] == pieces // 16                       # one MEM epoch over the pieces (full batches),
    assert len(WindowDataset(workload, "train")) // 16 != pieces // 16     # not over the labelled windows
    assert m["windows"]["train"] == len(WindowDataset(workload, "train"))  # fine-tuning: the paper's windows
    with pytest.raises(PapermillExecutionError, match="in Workload's val or test split"):
        pm.execute_notebook(str(nbs_dir / "16_labram_training.ipynb"), str(tmp_path / "leak.ipynb"),
                            parameters={**params, "pretrain_datasets": ["everything"], "out_dir": str(tmp_path / "leak")},
                            kernel_name="python3", cwd=str(nbs_dir), progress_bar=False, execution_timeout=600)
