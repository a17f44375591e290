"""Hub-format weights (neurolm_nb.hub): every model family round-trips bit for bit through model.safetensors +
config.json, tied tensors stay tied, broken folders fail naming the file, and a Hub id needs allow_download."""
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from neurolm_nb.gpt import GPT, GPTConfig
from neurolm_nb.hub import (CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, DownloadNotAllowedError, ModelCard,
                            PretrainedFolderError, assert_same_weights, describe_datasets, flat_metrics,
                            from_pretrained, read_card, save_pretrained, shared_tensors)
from neurolm_nb.labram import LaBraMClassifier, LaBraMConfig, LaBraMForMEM, LaBraMStudent
from neurolm_nb.neurolm import NeuroLM, NeuroLMConfig
from neurolm_nb.vq import VQConfig, VQTokenizer


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


B, L = 2, 6
_VQ = dict(X=torch.randn(B, L, 200, generator=torch.Generator().manual_seed(1)),
           input_chans=torch.tensor([[3, 7, 3, 7, 3, 7]] * B), input_time=torch.tensor([[0, 0, 1, 1, 2, 2]] * B),
           input_mask=torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]]).bool())
_X4 = torch.randn(2, 3, 2, 200, generator=torch.Generator().manual_seed(2))
_CHANS = torch.tensor([0, 4, 18, 40])
_TEXT = torch.randint(0, 512, (B, 4), generator=torch.Generator().manual_seed(3))
_IDS = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(4))
_MASK = torch.arange(6).remainder(2).bool().expand(2, 6)

# name -> (model factory, forward giving the tensor to compare)
FAMILIES = {
    "vq_tiny": (lambda: VQTokenizer(VQConfig.tiny()),
                lambda m: torch.cat([m(**_VQ).reconstructions["raw"].flatten(), m(**_VQ).features.flatten()])),
    "vq_labram_shaped": (lambda: VQTokenizer(VQConfig.labram(encoder_depth=2, decoder_depth=1, n_codes=512)),
                         lambda m: m(**_VQ).reconstructions["amplitude"]),
    "neurolm_tiny": (lambda: NeuroLM(NeuroLMConfig.tiny()),
                     lambda m: m(**_VQ, text=_TEXT, all_logits=True).logits),
    "labram_student": (lambda: LaBraMStudent(LaBraMConfig.tiny()), lambda m: m(_X4, _CHANS)),
    "labram_mem": (lambda: LaBraMForMEM(LaBraMConfig.tiny()), lambda m: m(_X4, _CHANS, _MASK).logits_sym),
    "labram_classifier_mean": (lambda: LaBraMClassifier(LaBraMConfig.tiny(), n_classes=1), lambda m: m(_X4, _CHANS)),
    "labram_classifier_cls": (lambda: LaBraMClassifier(LaBraMConfig.tiny(), n_classes=5, use_cls=True),
                              lambda m: m(_X4, _CHANS)),
    "gpt_tied": (lambda: GPT(GPTConfig.tiny(vocab_size=100, block_size=32)), lambda m: m(_IDS)),
}


def _frozen(model):
    return [n for n, p in model.named_parameters() if not p.requires_grad]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_round_trip_is_exact(name, tmp_path):
    make, run = FAMILIES[name]
    torch.manual_seed(0)
    model = make().eval()
    folder = save_pretrained(model, tmp_path / name, card={"data": "synthetic", "metrics": {"loss": 1.25}})
    assert sorted(p.name for p in folder.iterdir()) == [CARD_NAME, CONFIG_NAME, WEIGHTS_NAME]
    back = from_pretrained(folder)
    assert type(back) is type(model) and not back.training
    assert back.config == model.config
    assert_same_weights(model, back)
    with torch.no_grad():
        assert torch.equal(run(model), run(back)), "outputs differ after the round trip"
    assert _frozen(back) == _frozen(model)
    assert not any(t.is_meta for t in back.state_dict().values())
    with open(folder / WEIGHTS_NAME, "rb") as f:  # a safetensors file: 8-byte header length, then a JSON header
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    assert header["__metadata__"]["neurolm_nb.class"] == type(model).__name__
    assert json.loads((folder / CONFIG_NAME).read_text())["card"]["metrics"] == {"loss": 1.25}


def test_frozen_encoder_and_other_extras_survive(tmp_path):
    model = NeuroLM(NeuroLMConfig.tiny())
    assert _frozen(model) and all(n.startswith("encoder.") for n in _frozen(model))
    back = from_pretrained(save_pretrained(model, tmp_path / "lm"))
    assert _frozen(back) == _frozen(model)
    student = LaBraMStudent(LaBraMConfig.tiny(), cls_position="cls_row")
    assert from_pretrained(save_pretrained(student, tmp_path / "s")).cls_position == "cls_row"
    mem = LaBraMForMEM(LaBraMConfig.tiny())
    mem.student.cls_position = "cls_row"
    assert from_pretrained(save_pretrained(mem, tmp_path / "m")).student.cls_position == "cls_row"


def test_tied_tensors_round_trip(tmp_path):
    gpt = GPT(GPTConfig.tiny(vocab_size=100, block_size=32))
    assert shared_tensors(gpt.state_dict()) == {"lm_head.weight": "transformer.wte.weight"}
    folder = save_pretrained(gpt, tmp_path / "gpt")
    from safetensors import safe_open
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        assert "lm_head.weight" not in f.keys() and "transformer.wte.weight" in f.keys()
    back = from_pretrained(folder)
    assert back.lm_head.weight is back.transformer.wte.weight
    # a hand-made tie inside NeuroLM (LLM channel table = encoder channel table) survives as well
    lm = NeuroLM(NeuroLMConfig.tiny(gpt=GPTConfig.tiny(n_embd=64, n_head=2, block_size=256)))
    lm.channel_embed.weight = lm.encoder.channel_embed.weight
    back = from_pretrained(save_pretrained(lm, tmp_path / "lm"))
    assert back.channel_embed.weight is back.encoder.channel_embed.weight
    assert_same_weights(lm, back)


def test_dtype_is_kept(tmp_path):
    model = LaBraMClassifier(LaBraMConfig.tiny(), n_classes=2).to(torch.bfloat16)
    back = from_pretrained(save_pretrained(model, tmp_path / "bf16"))
    assert back.head.weight.dtype == torch.bfloat16
    assert_same_weights(model, back)


def test_card_names_data_metrics_and_deviations(tmp_path):
    model = LaBraMStudent(LaBraMConfig.tiny())
    folder = save_pretrained(model, tmp_path / "s", card=ModelCard(
        data="TUAB train split", metrics={"val_mlm_acc": 0.42}, options={"select_metric": "auroc"}, license="mit"))
    card = (folder / CARD_NAME).read_text()
    for expected in ("TUAB train split", "val_mlm_acc", "0.42", "select_metric", "cls_position (L6)",
                     "'first_channel'", "license: mit", "LaBraM masked EEG modelling"):
        assert expected in card, expected
    assert "original_padding (N3)" in (save_pretrained(VQTokenizer(VQConfig.tiny()), tmp_path / "v") / CARD_NAME).read_text()


def test_card_usage_is_shown_and_read_back(tmp_path):
    "What a later stage needs (a NeuroLM's text tokenizer) is in the card and in config.json; unknown card keys are ignored."
    folder = save_pretrained(NeuroLM(NeuroLMConfig.tiny()), tmp_path / "lm", card=ModelCard(
        stage="pipeline stage `pretrain`", usage={"text_tokenizer": "gpt2-medium"}, metrics={"steps": 3}))
    card = (folder / CARD_NAME).read_text()
    assert "## Using it" in card and "| text_tokenizer | gpt2-medium |" in card and "pipeline stage `pretrain`." in card
    assert read_card(folder) == ModelCard(stage="pipeline stage `pretrain`", usage={"text_tokenizer": "gpt2-medium"},
                                          metrics={"steps": 3})
    record = json.loads((folder / CONFIG_NAME).read_text())
    record["card"]["written_by_a_later_version"] = 1  # the card is outside the fingerprint: the folder still loads
    (folder / CONFIG_NAME).write_text(json.dumps(record))
    assert read_card(folder).usage == {"text_tokenizer": "gpt2-medium"}
    assert from_pretrained(folder) is not None
    assert "## Using it" not in (save_pretrained(GPT(GPTConfig.tiny()), tmp_path / "gpt") / CARD_NAME).read_text()


def test_flat_metrics_and_describe_datasets(tmp_path):
    assert flat_metrics({"steps": 4, "val": {"acc": 0.123456, "nll": float("nan")}, "ok": True, "name": "x"}) == \
        {"steps": 4, "val.acc": 0.1235}
    root = tmp_path / "tuab"
    root.mkdir()
    (root / "split_manifest.json").write_text(json.dumps({"dataset": "tuab", "splits": {
        "train": {"subjects": [f"s{i}" for i in range(10)], "n_windows": 100},
        "val": {"subjects": ["s10"], "n_windows": 7}, "test": {"subjects": [], "n_windows": 0}}}))
    line = describe_datasets([root, tmp_path / "nothing"], ("train", "val"), max_subjects=3)
    assert line == ("tuab [train: 100 windows of 10 subjects (s0, s1, s2, ...); val: 7 windows of 1 subjects (s10)]; "
                    "nothing (no readable split_manifest.json)")
    assert describe_datasets([root], ("test",)) == "tuab [none of test]" and describe_datasets([]) == "not recorded"


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    return save_pretrained(LaBraMClassifier(LaBraMConfig.tiny(), n_classes=2), tmp_path / "clf")


def _edit_config(folder, **changes):
    record = json.loads((folder / CONFIG_NAME).read_text())
    record["config"].update(changes)
    (folder / CONFIG_NAME).write_text(json.dumps(record))


def test_missing_files_are_named(saved):
    (saved / WEIGHTS_NAME).rename(saved / "elsewhere.safetensors")
    with pytest.raises(PretrainedFolderError, match=r"model\.safetensors is missing"):
        from_pretrained(saved)
    (saved / "elsewhere.safetensors").rename(saved / WEIGHTS_NAME)
    (saved / CONFIG_NAME).unlink()
    with pytest.raises(PretrainedFolderError, match=r"config\.json is missing"):
        from_pretrained(saved)


def test_tampered_config_is_refused(saved):
    _edit_config(saved, norm_eps=1e-5)  # same shapes, another model: only the fingerprint can tell
    with pytest.raises(PretrainedFolderError, match=r"config\.json was changed after .*model\.safetensors"):
        from_pretrained(saved)
    assert from_pretrained(saved, check_config=False).blocks[0].norm1.eps == 1e-5  # on request, as edited
    _edit_config(saved, depth=3)
    with pytest.raises(PretrainedFolderError, match=r"model\.safetensors does not fit .*config\.json[\s\S]*blocks\.2"):
        from_pretrained(saved, check_config=False)
    _edit_config(saved, wings=1)
    with pytest.raises(PretrainedFolderError, match=r"config\.json does not describe a valid .*wings"):
        from_pretrained(saved, check_config=False)
    (saved / CONFIG_NAME).write_text("{ not json")
    with pytest.raises(PretrainedFolderError, match=r"config\.json is not valid JSON"):
        from_pretrained(saved)


def test_damaged_weights_are_named(saved):
    data = (saved / WEIGHTS_NAME).read_bytes()
    (saved / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(PretrainedFolderError, match=r"model\.safetensors is not a readable safetensors file"):
        from_pretrained(saved)


def test_expect_checks_the_class(saved):
    assert type(from_pretrained(saved, expect=LaBraMClassifier)) is LaBraMClassifier
    with pytest.raises(TypeError, match="not a LaBraMStudent"):
        from_pretrained(saved, expect=LaBraMStudent)


def test_a_notebooks_twin_class_saves_but_other_subclasses_do_not(tmp_path):
    "A chapter notebook defines its own LaBraMClassifier (module __main__): it saves, and loads as the package's class."
    twin = type("LaBraMClassifier", (LaBraMClassifier,), {"__module__": "__main__"})
    model = twin(LaBraMConfig.tiny(), n_classes=2)
    back = from_pretrained(save_pretrained(model, tmp_path / "twin"), expect=twin)
    assert type(back) is LaBraMClassifier
    assert_same_weights(model, back)
    for name, module in (("MyClassifier", "__main__"), ("LaBraMClassifier", "somewhere.else")):
        other = type(name, (LaBraMClassifier,), {"__module__": module})
        with pytest.raises(TypeError, match="save_pretrained writes"):
            save_pretrained(other(LaBraMConfig.tiny()), tmp_path / "other")


def test_unsupported_model_and_missing_path(tmp_path):
    with pytest.raises(TypeError, match="save_pretrained writes"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "no" / "such" / "folder")


def test_hub_id_needs_allow_download_and_touches_no_network(tmp_path):
    "In a fresh interpreter: the error says allow_download=True; no socket is opened and huggingface_hub stays unimported."
    code = textwrap.dedent("""
        import sys
        events = []
        sys.addaudithook(lambda event, args: events.append(event) if event.startswith("socket.") else None)
        from neurolm_nb.hub import DownloadNotAllowedError, from_pretrained
        try:
            from_pretrained("braindecode/labram-pretrained")
        except DownloadNotAllowedError as e:
            message = str(e)
        else:
            raise SystemExit("no error")
        assert "allow_download=True" in message, message
        assert not events, events
        assert "huggingface_hub" not in sys.modules
        print("OK", message)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("OK")
    with pytest.raises(DownloadNotAllowedError):  # and here too, as the subclass of FileNotFoundError it is
        from_pretrained("someone/some-model")
