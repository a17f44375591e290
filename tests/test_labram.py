"""LaBraM models (neurolm_nb.labram): parity with the official MEM and fine-tuning models, sizes, layer-wise lr decay,
official checkpoint loading and the project's classifier checkpoint. Training: tests/test_labram_training.py."""
import argparse
import functools
import math

import pytest
import torch

from neurolm_nb.convert import (CheckpointMismatchError, labram_start_classifier, labram_tokenizer,
                                load_official_labram_classifier, load_official_labram_mem, load_official_labram_student,
                                to_official_labram)
from neurolm_nb.core import load_json
from neurolm_nb.labram import (
    LaBraMClassifier, LaBraMConfig, LaBraMForMEM, LaBraMStudent, count_encoder_parameters, labram_sizes,
    layer_decay_groups, layer_index, load_labram_classifier, mem_loss, random_mask, save_labram_classifier,
)
from neurolm_nb.testing import compare_labram_base, labram_base_fixture_checkpoint, labram_base_fixture_outputs
from neurolm_nb.training import check_param_groups
from neurolm_nb.vq import VQConfig, VQTokenizer

torch.set_num_threads(1)
SIZES = ("base", "large", "huge")


@functools.lru_cache(maxsize=None)
def _load(path):
    from safetensors.torch import load_file
    return load_file(path)


def fixture(fixtures_dir):
    path = fixtures_dir / "labram_base.safetensors"
    if not path.exists():
        pytest.skip(f"official fixture {path} not found")
    return _load(str(path))


def official_models(t):
    "The fixture's MEM model, and the classifier made from it through the --finetune path with the fixture's fresh head."
    mem = load_official_labram_mem(labram_base_fixture_checkpoint(t)).eval()
    clf = load_official_labram_classifier(labram_base_fixture_checkpoint(t), n_classes=1)
    extra = {k[len("weights.finetune_extra."):]: v.float() for k, v in t.items() if k.startswith("weights.finetune_extra.")}
    assert sorted(extra) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    clf.load_state_dict(extra, strict=False)
    return mem, clf.eval()


def manifest_state_dict(fixtures_dir, name):
    info = load_json(fixtures_dir / "manifests" / f"{name}.json")
    return {k["key"]: torch.empty(k["shape"], device="meta") for k in info["keys"]}


# ---------------------------------------------------------------- parity with the official code
def test_labram_base_reproduces_every_official_output(fixtures_dir):
    t = fixture(fixtures_dir)
    mem, clf = official_models(t)
    assert mem.config == LaBraMConfig.base()
    ours = labram_base_fixture_outputs(mem, clf, t)
    report = compare_labram_base(ours, t)
    assert set(report) == {k[len("output."):] for k in t if k.startswith("output.")}  # every stored output
    bad = {k: r for k, r in report.items() if not r["ok"]}
    assert not bad, bad
    for name in ("mem.argmax", "mem_sym.argmax", "mem.labels", "mem_sym.labels"):
        assert torch.equal(ours[name], t[f"output.{name}"])
    torch.testing.assert_close(ours["finetune.logits"], t["output.finetune.logits"], atol=1e-7, rtol=0)  # fixtures README §5 (testing.TOLERANCES)
    torch.testing.assert_close(ours["finetune.pooled_features"], t["output.finetune.pooled_features"], atol=1e-5, rtol=1e-5)  # fixtures README §5 (testing.TOLERANCES)
    for name in ("mem.loss_rec", "mem.loss_rec_sym", "mem.loss", "mem.mlm_acc", "mem.mlm_acc_sym"):
        assert abs(ours[name].item() - t[f"output.{name}"].item()) <= 1e-5 * abs(t[f"output.{name}"].item())  # fixtures README §5 (testing.TOLERANCES)


def test_random_mask_reproduces_the_official_draws(fixtures_dir):
    t = fixture(fixtures_dir)
    torch.manual_seed(7)
    mask = random_mask(2, 76)
    assert torch.equal(mask, t["input.bool_masked_pos"])
    assert mask.sum(1).tolist() == [38, 38]


def test_pretraining_cls_takes_the_first_channel_row(fixtures_dir):
    "Quirk L6: with CLS at row 0 the pretraining student no longer matches the official output."
    t = fixture(fixtures_dir)
    mem, _ = official_models(t)
    x, chans, mask = t["input.x"], t["input.input_chans"], t["input.bool_masked_pos"]
    with torch.no_grad():
        assert torch.allclose(mem(x, chans, mask).tokens, t["output.mem.student_tokens_masked"], atol=1e-5)
        mem.student.cls_position = "cls_row"
        assert (mem(x, chans, mask).tokens - t["output.mem.student_tokens_masked"]).abs().max() > 0.1


# ---------------------------------------------------------------- sizes and checkpoints
def test_encoder_parameter_counts():
    sizes = {name: labram_sizes(LaBraMConfig.preset(name)) for name in SIZES}
    assert sizes["base"]["encoder"] == 5_819_936          # = fine-tuning model 5,820,137 − head 201
    assert sizes["base"]["student"] == 7_466_728          # the value count of the released labram-base.pth
    assert sizes["large"]["encoder"] == 46_258_720 and round(sizes["large"]["encoder"] / 1e6, 1) == 46.3
    assert sizes["huge"]["encoder"] == 369_235_712 and round(sizes["huge"]["encoder"] / 1e6, 1) == 369.2
    with torch.device("meta"):
        mem = LaBraMForMEM(LaBraMConfig.base())
    assert count_encoder_parameters(mem) == count_encoder_parameters(mem.student) == 5_819_936


@pytest.mark.parametrize("size", SIZES)
def test_official_manifests_load_key_for_key(fixtures_dir, size):
    want = LaBraMConfig.preset(size)
    sd = manifest_state_dict(fixtures_dir, f"labram_{size}_pretrain_MEM")
    info = load_json(fixtures_dir / "manifests" / f"labram_{size}_pretrain_MEM.json")
    assert labram_sizes(want)["mem"] == info["total_numel_state_dict"]
    mem = load_official_labram_mem(sd)
    assert mem.config == want
    assert {k: tuple(v.shape) for k, v in mem.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}
    student_only = {k: v for k, v in sd.items() if k.startswith("student.")}  # the labram-base.pth layout
    student = load_official_labram_student(student_only)
    assert {f"student.{k}": tuple(v.shape) for k, v in student.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in student_only.items()}
    ft = manifest_state_dict(fixtures_dir, f"labram_{size}_finetune_cls1")
    clf = load_official_labram_classifier(ft)
    assert {k: tuple(v.shape) for k, v in clf.state_dict().items()} == {k: tuple(v.shape) for k, v in ft.items()}
    if size == "base":  # the --finetune path from the student-only file, on real tensors
        real = {k: torch.zeros(v.shape) for k, v in student_only.items()}
        clf = load_official_labram_classifier(real, n_classes=1)
        assert set(clf.state_dict()) == set(ft)


def test_checkpoint_errors_name_the_key(tmp_path):
    torch.manual_seed(0)
    model = LaBraMForMEM(LaBraMConfig.tiny()).eval()
    good = to_official_labram(model)
    broken = dict(good)
    del broken["student.blocks.1.attn.q_norm.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"missing key 'student\.blocks\.1\.attn\.q_norm\.weight' \(expected shape \[25\]\)"):
        load_official_labram_mem(broken, n_heads=4)
    broken = dict(good)
    broken["student.blocks.0.mlp.fc2.weight"] = torch.zeros(100, 300)
    with pytest.raises(CheckpointMismatchError, match=r"'student\.blocks\.0\.mlp\.fc2\.weight': expected shape \[100, 400\], found \[100, 300\]"):
        load_official_labram_mem(broken)
    broken = dict(good)
    broken["student.surprise"] = torch.zeros(2)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected key 'student\.surprise'"):
        load_official_labram_mem(broken)
    with pytest.warns(UserWarning, match="student.surprise"):
        load_official_labram_mem(broken, strict=False)
    student_only = {k: v for k, v in good.items() if k.startswith("student.")}
    with pytest.raises(CheckpointMismatchError, match="load_official_labram_student"):
        load_official_labram_mem(student_only)
    ft = to_official_labram(LaBraMClassifier.from_student(model, n_classes=3))
    with pytest.raises(CheckpointMismatchError, match="head has 3 outputs"):
        load_official_labram_classifier(ft, n_classes=2)
    with pytest.raises(CheckpointMismatchError, match="no 'student"):
        load_official_labram_mem(ft)


def test_official_checkpoint_file_round_trip(tmp_path):
    "A MEM checkpoint as the original saves it (with argparse args) loads back bit for bit, and fine-tunes."
    torch.manual_seed(0)
    model = LaBraMForMEM(LaBraMConfig.tiny()).eval()
    path = tmp_path / "checkpoint.pth"
    torch.save({**to_official_labram(model, as_checkpoint=True), "args": argparse.Namespace(lr=5e-4), "epoch": 1}, path)
    again = load_official_labram_mem(path).eval()
    x, chans, mask = torch.randn(2, 3, 2, 200), torch.tensor([0, 3, 8, 20]), random_mask(2, 6)
    with torch.no_grad():
        a, b = model(x, chans, mask), again(x, chans, mask)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.tokens_sym, b.tokens_sym)
    assert not again.student.lm_head.weight.requires_grad and again.student.mask_token.requires_grad
    clf = load_official_labram_classifier(path, n_classes=2)
    assert torch.equal(clf.pos_embed, model.student.pos_embed)
    assert clf.head.weight.abs().max() < 0.01  # fresh head, scaled by 0.001


def test_hub_folders_are_accepted_where_official_files_are(tmp_path):
    "labram_start_classifier / labram_tokenizer take save_pretrained folders: the same model as the official-file route."
    from neurolm_nb.hub import PretrainedFolderError, assert_same_weights, save_pretrained
    torch.manual_seed(0)
    mem = LaBraMForMEM(LaBraMConfig.tiny()).eval()
    path = tmp_path / "checkpoint.pth"
    torch.save(to_official_labram(mem, as_checkpoint=True), path)
    x, chans = torch.randn(2, 3, 2, 200), torch.tensor([0, 3, 8, 20])
    for model, use_cls in ((mem, False), (mem.student, True)):  # a MEM model or its student: the --finetune path
        folder = save_pretrained(model, tmp_path / f"hub_{type(model).__name__}")
        torch.manual_seed(1)
        by_folder = labram_start_classifier(str(folder), n_classes=2, use_cls=use_cls)
        torch.manual_seed(1)
        by_file = labram_start_classifier(path, n_classes=2, use_cls=use_cls)
        assert_same_weights(by_folder, by_file)  # trunk copied, fresh head drawn the same way
        with torch.no_grad():
            assert torch.equal(by_folder.eval()(x, chans), by_file.eval()(x, chans))
    tuned = LaBraMClassifier.from_student(mem, n_classes=3, drop_path=0.0).eval()
    folder = save_pretrained(tuned, tmp_path / "classifier")
    again = labram_start_classifier(folder, n_classes=3, drop_path=0.1)
    assert_same_weights(tuned, again)
    assert again.config.drop_path == 0.1 and again.blocks[1].drop_path.p == 0.1  # this run's drop-path
    with pytest.raises(CheckpointMismatchError, match="3 outputs"):
        labram_start_classifier(folder, n_classes=1)
    with pytest.raises(TypeError, match="VQTokenizer"):
        labram_start_classifier(save_pretrained(VQTokenizer(VQConfig.tiny()), tmp_path / "vq_tiny"))
    vq = VQTokenizer(VQConfig.labram(conv_channels=4, dim=100, n_heads=4, encoder_depth=1, decoder_depth=1, n_codes=64))
    assert_same_weights(vq, labram_tokenizer(save_pretrained(vq, tmp_path / "vqnsp")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedFolderError, match=r"config\.json is missing"):
        labram_start_classifier(tmp_path / "empty")


# ---------------------------------------------------------------- model rules
def test_mask_token_replaces_patch_embedding_before_embeddings():
    torch.manual_seed(0)
    student = LaBraMStudent(LaBraMConfig.tiny()).eval()
    x, chans = torch.randn(2, 3, 4, 200), torch.tensor([0, 5, 9, 12])
    everything = torch.ones(2, 12, dtype=torch.bool)
    with torch.no_grad():
        # all patches masked: the signal no longer matters, the positions still do
        torch.testing.assert_close(student(x, chans, everything), student(5 * torch.randn_like(x), chans, everything))
        assert not torch.allclose(student(x, chans, everything), student(x, torch.tensor([0, 6, 9, 12]), everything))
        mask = random_mask(2, 12)
        patches, h = student.embed(x, chans, mask, student.mask_token)
        token = 1 + 2 * 4 + 3  # channel 12, second 3
        expected = torch.where(mask[:, 2 * 4 + 3, None], student.mask_token[0], patches[:, 2 * 4 + 3])
        torch.testing.assert_close(h[:, token], expected + student.pos_embed[0, 12] + student.time_embed[0, 3])


def test_mem_loss_sums_both_passes_and_unused_parameters_stay_frozen():
    torch.manual_seed(0)
    mem = LaBraMForMEM(LaBraMConfig.tiny())
    x, chans = torch.randn(2, 3, 4, 200), torch.tensor([0, 5, 9, 12])
    mask, codes = random_mask(2, 12), torch.randint(0, 64, (2, 12))
    out = mem(x, chans, mask)
    assert out.logits.shape == (12, 64) and out.logits_sym.shape == (12, 64)
    loss, terms = mem_loss(out, codes, mask)
    expected = torch.nn.functional.cross_entropy(out.logits, codes[mask]) + \
        torch.nn.functional.cross_entropy(out.logits_sym, codes[~mask])
    torch.testing.assert_close(loss, expected)
    assert terms["mlm_acc"] == (out.logits.argmax(-1) == codes[mask]).float().mean()
    loss.backward()
    assert mem.student.mask_token.grad.abs().sum() > 0
    assert mem.student.lm_head.weight.grad is None and mem.projection_head[0].weight.grad is None


def test_classifier_from_student_discards_the_final_norm():
    torch.manual_seed(0)
    mem = LaBraMForMEM(LaBraMConfig.tiny())
    with torch.no_grad():
        mem.student.norm.weight.fill_(3.0)
    clf = LaBraMClassifier.from_student(mem, n_classes=4).eval()
    keys = set(clf.state_dict())
    assert not {"norm.weight", "mask_token", "lm_head.weight"} & keys and {"fc_norm.weight", "head.weight"} <= keys
    assert torch.equal(clf.fc_norm.weight, torch.ones(100))  # fresh, not the student's norm
    assert [round(b.drop_path.p, 6) for b in clf.blocks] == [0.0, 0.1]
    x, chans = torch.randn(2, 3, 4, 200), torch.tensor([0, 5, 9, 12])
    with torch.no_grad():
        _, h = clf.embed(x, chans)
        torch.testing.assert_close(h[:, 0], (clf.cls_token[0, 0] + clf.pos_embed[0, 0]).expand(2, -1))  # row 0 here
        pooled = clf.forward_features(x, chans)
        torch.testing.assert_close(pooled, clf.fc_norm(clf.run_blocks(h)[:, 1:].mean(1)))
        assert clf(x, chans).shape == (2, 4)


def test_cls_pooling_is_the_final_norm_of_the_cls_token(tmp_path):
    torch.manual_seed(0)
    mem = LaBraMForMEM(LaBraMConfig.tiny())
    with torch.no_grad():
        mem.student.norm.weight.add_(torch.randn(100))
        mem.student.norm.bias.add_(torch.randn(100))
    clf = LaBraMClassifier.from_student(mem, n_classes=3, use_cls=True).eval()
    assert clf.fc_norm is None and "fc_norm.weight" not in clf.state_dict()
    assert torch.equal(clf.norm.weight, mem.student.norm.weight) and torch.equal(clf.norm.bias, mem.student.norm.bias)
    x, chans = torch.randn(2, 3, 4, 200), torch.tensor([0, 5, 9, 12])
    with torch.no_grad():
        _, h = clf.embed(x, chans)
        for block in clf.blocks:
            h = block(h)
        cls = h[:, 0]  # official use_mean_pooling=False: x = self.norm(x); return x[:, 0]
        by_hand = (cls - cls.mean(-1, keepdim=True)) / torch.sqrt(cls.var(-1, unbiased=False, keepdim=True) + 1e-6)
        by_hand = by_hand * mem.student.norm.weight + mem.student.norm.bias
        torch.testing.assert_close(clf.forward_features(x, chans), by_hand, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(clf(x, chans), clf.head(by_hand), atol=1e-6, rtol=1e-5)
    assert LaBraMClassifier(LaBraMConfig.tiny()).use_cls is False  # mean pooling by default, as the original
    assert layer_index("norm.weight", 2) == 3  # the final norm trains at the top layer's rate, as in the original
    # official files: --use_cls --finetune keeps the student's norm; a CLS fine-tuning checkpoint is recognised
    ft = load_official_labram_classifier(to_official_labram(mem), n_classes=3, use_cls=True)
    assert ft.use_cls and torch.equal(ft.norm.weight, mem.student.norm.weight)
    again = load_official_labram_classifier(to_official_labram(clf)).eval()
    assert again.use_cls
    with torch.no_grad():
        torch.testing.assert_close(again(x, chans), clf(x, chans), atol=0, rtol=0)
    with pytest.raises(CheckpointMismatchError, match="CLS pooling"):
        load_official_labram_classifier(to_official_labram(clf), use_cls=False)
    broken = {k: v for k, v in to_official_labram(mem).items() if k != "student.norm.weight"}
    with pytest.raises(CheckpointMismatchError, match="'norm.weight'"):
        load_official_labram_classifier(broken, use_cls=True)


def test_layer_decay_gives_every_parameter_one_scale():
    with torch.device("meta"):
        model = LaBraMClassifier(LaBraMConfig.base(drop_path=0.1))
    groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=0.65)
    check_param_groups(model, groups)  # raises if a parameter is in no group or in two
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    L = 12
    for name, _ in model.named_parameters():
        if name.startswith("blocks."):
            i = int(name.split(".")[1]) + 1
        elif name in ("cls_token", "pos_embed", "time_embed") or name.startswith("patch_embed."):
            i = 0
        else:
            assert name.startswith(("fc_norm.", "head.")), name
            i = L + 1
        assert math.isclose(scale[name], 0.65 ** (L + 1 - i)), name
    assert math.isclose(scale["time_embed"], 0.65 ** 13) and scale["head.weight"] == 1.0
    decay = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert decay["blocks.0.attn.qkv.weight"] == 0.05 and decay["cls_token"] == decay["blocks.0.norm1.bias"] == 0.0
    original = {n: g["lr_scale"] for g in layer_decay_groups(model, original=True) for n in g["param_names"]}
    assert original["time_embed"] == 1.0  # the original forgot time_embed in its embedding list
    assert layer_index("student.mask_token", 12) == 0 and layer_index("student.blocks.3.gamma_1", 12) == 4


def test_classifier_checkpoint_round_trip(tmp_path):
    "save_labram_classifier / load_labram_classifier: config, pooling, every weight, extras; foreign files are named."
    torch.manual_seed(0)
    for use_cls, n_classes in ((False, 1), (True, 3)):
        clf = LaBraMClassifier(LaBraMConfig.tiny(drop_path=0.1), n_classes=n_classes, use_cls=use_cls).eval()
        path = save_labram_classifier(clf, tmp_path / f"clf_{use_cls}.pt", best_epoch=2, test={"auroc": 0.5})
        back = load_labram_classifier(path).eval()
        assert (back.config, back.n_classes, back.use_cls) == (clf.config, n_classes, use_cls)
        assert all(torch.equal(v, back.state_dict()[k]) for k, v in clf.state_dict().items())
        x, chans = torch.randn(2, 3, 2, 200), torch.tensor([0, 5, 9, 12])
        with torch.no_grad():
            assert torch.equal(back(x, chans), clf(x, chans))
        assert torch.load(path, weights_only=True)["best_epoch"] == 2
    torch.save(to_official_labram(clf), tmp_path / "official.pth")
    with pytest.raises(ValueError, match="neurolm_nb.convert"):
        load_labram_classifier(tmp_path / "official.pth")
