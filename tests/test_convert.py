"""Official checkpoints (neurolm_nb.convert): every manifest key mapped with its shape, strict errors that
name the key, bit-exact round trips through files in the official formats, and the reference fixtures;
for the VQ tokenizers (NeuroLM, LaBraM) and for the NeuroLM-B/L/XL language models of stages 2 and 3."""
import argparse
import warnings

import pytest
import torch

from neurolm_nb.convert import (
    ORIG_MOD_PREFIX, CheckpointMismatchError, load_official_labram_vqnsp, load_official_neurolm,
    load_official_neurolm_tokenizer, neurolm_encoder_from_vq, official_key_table, official_neurolm_key_table,
    read_checkpoint, to_official_labram_vqnsp, to_official_neurolm, to_official_neurolm_tokenizer,
)
from neurolm_nb.core import load_json, save_checkpoint
from neurolm_nb.gpt import GPTConfig
from neurolm_nb.neurolm import NeuroLM, NeuroLMConfig, load_neurolm, save_neurolm
from neurolm_nb.testing import compare_with_fixture, fixture_state_dict, lm_fixture_state_dict, load_fixture, neurolm_lm_fixture_outputs
from neurolm_nb.vq import VQConfig, VQTokenizer, load_tokenizer, save_tokenizer

torch.set_num_threads(1)


def manifest(fixtures_dir, name):
    return load_json(fixtures_dir / "manifests" / f"{name}.json")


def meta_state_dict(info):
    return {k["key"]: torch.empty(k["shape"], device="meta") for k in info["keys"]}


@pytest.mark.parametrize("name", ["neurolm_VQ_Align", "labram_vqnsp_base", "labram_vqnsp_large"])
def test_every_manifest_key_maps_with_its_shape(fixtures_dir, name):
    info = manifest(fixtures_dir, name)
    sd = meta_state_dict(info)
    assert len(sd) == info["n_keys"]
    load = load_official_neurolm_tokenizer if name.startswith("neurolm") else load_official_labram_vqnsp
    write = to_official_neurolm_tokenizer if name.startswith("neurolm") else to_official_labram_vqnsp
    model = load(sd)  # strict: any unmapped or misshaped key would raise
    back = write(model)
    assert {k: list(v.shape) for k, v in back.items()} == {k["key"]: k["shape"] for k in info["keys"]}
    assert sum(v.numel() for v in model.state_dict().values()) == info["total_numel_state_dict"]


def test_full_size_neurolm_values_land_on_the_right_keys(fixtures_dir):
    "A full-size VQ_Align state dict whose every tensor holds its own number: loading and writing back keeps each."
    info = manifest(fixtures_dir, "neurolm_VQ_Align")
    # stride-0 views of one scalar per key: full shapes, 172 numbers of memory
    sd = {k["key"]: torch.tensor(float(i)).expand(k["shape"]) for i, k in enumerate(info["keys"])}
    model = load_official_neurolm_tokenizer(sd)
    assert model.config.encoder_depth == 12 and model.config.decoder_depth == 4
    assert model.config.text_vocab_size == 50257 and model.config.n_codes == 8192
    ours = model.state_dict()
    assert ours["encoder.blocks.7.attn.qkv.weight"][0, 0] == sd["VQ.encoder.blocks.7.attn.c_attn.weight"][0, 0]
    assert ours["quantizer.codebook"][0, 0] == sd["VQ.quantize.embedding.weight"][0, 0]
    back = to_official_neurolm_tokenizer(model)
    for key, value in sd.items():
        assert back[key].shape == value.shape and back[key].reshape(-1)[0] == value.reshape(-1)[0], key


def test_full_size_labram_round_trip_with_random_values(fixtures_dir):
    info = manifest(fixtures_dir, "labram_vqnsp_base")
    g = torch.Generator().manual_seed(0)
    sd = {k["key"]: torch.randn(k["shape"], generator=g) for k in info["keys"]}
    model = load_official_labram_vqnsp({"model": sd, "epoch": 9, "args": argparse.Namespace(code_dim=64)})
    assert model.config.to_dict() == VQConfig.labram().to_dict()
    back = to_official_labram_vqnsp(model)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], v) for k, v in sd.items())


def test_project_format_to_official_file_and_back_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    mine = VQTokenizer(VQConfig.tiny()).eval()
    save_tokenizer(mine, tmp_path / "mine.pt")
    official = to_official_neurolm_tokenizer(load_tokenizer(tmp_path / "mine.pt"), as_checkpoint=True)
    assert set(official) == {"model", "encoder_args", "decoder_args", "iter_num", "epoch"}
    assert official["encoder_args"]["n_layer"] == 2 and official["decoder_args"]["in_chans"] == 16
    # the official scripts save a torch.compile'd model: keys carry `_orig_mod.` (N15)
    official["model"] = {"_orig_mod." + k: v for k, v in official["model"].items()}
    save_checkpoint(official, tmp_path / "VQ.pt")
    back = load_official_neurolm_tokenizer(tmp_path / "VQ.pt").eval()
    assert back.config == mine.config
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in mine.state_dict().items())
    g = torch.Generator().manual_seed(1)
    X, chans = torch.randn(2, 12, 200, generator=g), torch.randint(0, 136, (2, 12), generator=g)
    times, mask = torch.arange(12).repeat(2, 1) // 3, torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    with torch.no_grad():
        a, b = mine(X, chans, times, mask), back(X, chans, times, mask)
    assert torch.equal(a.features, b.features) and torch.equal(a.codes, b.codes)
    assert all(torch.equal(a.reconstructions[k], b.reconstructions[k]) for k in a.reconstructions)


def test_labram_checkpoint_with_namespace_and_dropped_keys(tmp_path):
    torch.manual_seed(0)
    model = VQTokenizer(VQConfig.labram(encoder_depth=2, decoder_depth=1, n_codes=128)).eval()
    sd = to_official_labram_vqnsp(model)
    sd["loss_fn.scale"] = torch.ones(1)        # LaBraM's tokenizer loader drops loss*/teacher*/scaling* keys
    sd["teacher.w"] = torch.ones(2)
    torch.save({"model": sd, "args": argparse.Namespace(codebook_emd_dim=64, lr=5e-5), "epoch": 3}, tmp_path / "vqnsp.pth")
    back = load_official_labram_vqnsp(tmp_path / "vqnsp.pth")  # weights_only=True + argparse.Namespace
    assert back.config.encoder_depth == 2 and back.config.n_codes == 128
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


class _Opaque:  # a class no safe loader allows
    pass


def test_untrusted_pickles_are_refused_unless_trusted(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"model": {}, "extra": _Opaque()}, path)
    with pytest.raises(RuntimeError, match=r"odd.pth .*_Opaque.*trusted=True"):
        read_checkpoint(path)
    assert isinstance(read_checkpoint(path, trusted=True)["extra"], _Opaque)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        read_checkpoint(tmp_path / "absent.pth")


@pytest.fixture
def small_official():
    torch.manual_seed(0)
    model = VQTokenizer(VQConfig.tiny(encoder_depth=1))
    return model, to_official_neurolm_tokenizer(model)


def test_missing_key_is_named_with_its_shape(small_official):
    model, sd = small_official
    del sd["VQ.decoder_raw.blocks.0.mlp.c_fc.weight"]
    with pytest.raises(CheckpointMismatchError,
                       match=r"missing key 'VQ.decoder_raw.blocks.0.mlp.c_fc.weight' \(expected shape \[256, 64\]\)"):
        load_official_neurolm_tokenizer(sd, model=VQTokenizer(model.config))


def test_wrong_shape_is_named_with_expected_and_found(small_official):
    model, sd = small_official
    sd["VQ.encode_task_layer.2.weight"] = torch.zeros(8, 64)
    with pytest.raises(CheckpointMismatchError,
                       match=r"'VQ.encode_task_layer.2.weight': expected shape \[16, 64\], found \[8, 64\]"):
        load_official_neurolm_tokenizer(sd, model=VQTokenizer(model.config))


def test_unexpected_key_is_named_and_non_strict_loads_the_rest(small_official):
    model, sd = small_official
    sd["VQ.encoder.blocks.0.attn.bias"] = torch.zeros(4)
    with pytest.raises(CheckpointMismatchError, match="unexpected key 'VQ.encoder.blocks.0.attn.bias'"):
        load_official_neurolm_tokenizer(sd)
    del sd["wte.weight"]
    target = VQTokenizer(model.config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_official_neurolm_tokenizer(sd, model=target, strict=False)
    text = " ".join(str(w.message) for w in caught)
    assert "VQ.encoder.blocks.0.attn.bias" in text and "wte.weight" in text
    assert torch.equal(loaded.encoder.blocks[0].attn.qkv.weight, model.encoder.blocks[0].attn.qkv.weight)


def test_a_labram_checkpoint_is_not_a_neurolm_one(fixtures_dir):
    sd = meta_state_dict(manifest(fixtures_dir, "labram_vqnsp_base"))
    with pytest.raises(CheckpointMismatchError, match="VQ.encoder.fc_norm.weight"):
        load_official_neurolm_tokenizer(sd)
    with pytest.raises(KeyError, match="no official labram name"):
        official_key_table(VQTokenizer(VQConfig.tiny()), "labram")


def test_args_that_contradict_the_weights_are_refused(small_official):
    model, sd = small_official
    ckpt = to_official_neurolm_tokenizer(model, as_checkpoint=True)
    ckpt["encoder_args"]["n_layer"] = 12
    with pytest.raises(CheckpointMismatchError, match="n_layer=12"):
        load_official_neurolm_tokenizer(ckpt)
    with pytest.raises(ValueError, match="overrides"):
        load_official_neurolm_tokenizer(sd, model=VQTokenizer(model.config), original_padding=True)


def test_fixture_state_dicts_load_strictly(fixtures_dir):
    for name, load, keys in [("neurolm_vq_tiny", load_official_neurolm_tokenizer, 70),  # 1 + 1 + 1 blocks
                             ("labram_vqnsp", load_official_labram_vqnsp, 236)]:
        sd = fixture_state_dict(name)
        assert len(sd) == keys
        model = load(sd)
        assert all(v.dtype == torch.float32 for v in model.state_dict().values())
        assert not any(v.is_meta for v in model.state_dict().values())
        assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("text_embedding"))
        if model.text_embedding is not None:
            assert not model.text_embedding.weight.requires_grad  # the frozen GPT-2 copy stays frozen
    with pytest.raises(ValueError, match="labram_base"):
        fixture_state_dict("labram_base", {})


# --- NeuroLM-B/L/XL: the stage 2 and 3 checkpoints (train_pretrain.py / train_instruction.py) ---------------

LM_SIZES = ["NeuroLM-B", "NeuroLM-L", "NeuroLM-XL"]


def lm_manifest_checkpoint(info, value=None):
    "A train_pretrain.py-style checkpoint with the manifest's keys behind `_orig_mod.`: meta tensors by default."
    make = value or (lambda i, shape: torch.empty(shape, device="meta"))
    return {"model": {ORIG_MOD_PREFIX + k["key"]: make(i, k["shape"]) for i, k in enumerate(info["keys"])},
            "model_args": dict(info["model_args_saved_in_checkpoint"]), "optimizer": {}, "iter_num": 7, "epoch": 1}


@pytest.mark.parametrize("name", LM_SIZES)
def test_every_neurolm_lm_manifest_key_maps_both_ways_with_its_shape(fixtures_dir, name):
    info = manifest(fixtures_dir, f"neurolm_{name}")
    expected = {k["key"]: tuple(k["shape"]) for k in info["keys"]}
    assert len(expected) == info["n_keys"]
    # official -> ours (strict: an unmapped or misshaped key would raise) -> official
    model = load_official_neurolm(lm_manifest_checkpoint(info))
    assert {k: tuple(v.shape) for k, v in to_official_neurolm(model).items()} == expected
    assert sum(v.numel() for v in model.state_dict().values()) == info["total_numel_state_dict"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == info["n_trainable_parameters"]
    # ours, built independently from the preset -> official
    with torch.device("meta"):
        preset = NeuroLM(NeuroLMConfig.preset(name))
    assert {k: shape for k, (_, shape) in official_neurolm_key_table(preset).items()} == expected
    assert model.config.gpt == preset.config.gpt
    official = to_official_neurolm(preset, as_checkpoint=True, compiled=True)
    assert official["model_args"] == info["model_args_saved_in_checkpoint"]
    assert set(official["model"]) == {ORIG_MOD_PREFIX + k for k in expected}


def test_neurolm_b_values_land_on_the_right_keys(fixtures_dir):
    "Every tensor of a full-size NeuroLM-B checkpoint holds its own number: loading and writing back keeps each."
    info = manifest(fixtures_dir, "neurolm_NeuroLM-B")
    # stride-0 views of one scalar per key: full shapes, 240 numbers of memory
    ckpt = lm_manifest_checkpoint(info, lambda i, shape: torch.tensor(float(i)).expand(shape))
    model = load_official_neurolm(ckpt)
    sd = {k[len(ORIG_MOD_PREFIX):]: v for k, v in ckpt["model"].items()}
    ours = model.state_dict()
    assert ours["gpt.transformer.h.5.attn.c_attn.weight"][0, 0] == sd["GPT2.transformer.h.5.attn.c_attn.weight"][0, 0]
    assert ours["encoder.blocks.11.mlp.fc2.weight"][0, 0] == sd["tokenizer.blocks.11.mlp.c_proj.weight"][0, 0]
    assert ours["channel_embed.weight"][0, 0] == sd["pos_embed.weight"][0, 0]
    back = to_official_neurolm(model)
    for key, value in sd.items():
        assert back[key].shape == value.shape and back[key].reshape(-1)[0] == value.reshape(-1)[0], key
    assert not any(p.requires_grad for p in model.encoder.parameters())  # the tokenizer stays frozen


def test_vq_encoder_keys_become_the_tokenizer_keys_of_neurolm(fixtures_dir):
    prefix = manifest(fixtures_dir, "neurolm_VQ_encoder_prefix")
    vq = {"model": {ORIG_MOD_PREFIX + k: v for k, v in meta_state_dict(manifest(fixtures_dir, "neurolm_VQ_Align")).items()}}
    found = {k: list(v.shape) for k, v in neurolm_encoder_from_vq(vq).items()}
    assert found == {k["neurolm_key"]: k["shape"] for k in prefix["keys"]}
    in_b = {k["key"]: k["shape"] for k in manifest(fixtures_dir, "neurolm_NeuroLM-B")["keys"]
            if k["key"].startswith("tokenizer.")}
    assert found == in_b
    with pytest.raises(CheckpointMismatchError, match="VQ.encoder"):
        neurolm_encoder_from_vq({"model": {"GPT2.transformer.wte.weight": torch.zeros(2, 2)}})


@pytest.fixture
def neurolm_b_checkpoint(fixtures_dir):
    return lm_manifest_checkpoint(manifest(fixtures_dir, "neurolm_NeuroLM-B"))


def test_missing_neurolm_key_is_named(neurolm_b_checkpoint):
    ckpt = neurolm_b_checkpoint
    del ckpt["model"][ORIG_MOD_PREFIX + "GPT2.transformer.h.7.mlp.c_proj.weight"]
    with pytest.raises(CheckpointMismatchError,
                       match=r"missing key 'GPT2.transformer.h.7.mlp.c_proj.weight' \(shape \[768, 3072\]\)"):
        load_official_neurolm(ckpt)
    # a key the configuration is read from: named as well
    del ckpt["model"][ORIG_MOD_PREFIX + "GPT2.transformer.wte.weight"]
    with pytest.raises(CheckpointMismatchError, match="'GPT2.transformer.wte.weight'"):
        load_official_neurolm(ckpt)


def test_misshaped_neurolm_key_is_named_with_expected_and_found(neurolm_b_checkpoint):
    ckpt = neurolm_b_checkpoint
    ckpt["model"][ORIG_MOD_PREFIX + "tokenizer.blocks.3.attn.c_attn.weight"] = torch.empty(2304, 700, device="meta")
    with pytest.raises(CheckpointMismatchError, match=r"key 'tokenizer.blocks.3.attn.c_attn.weight': "
                                                      r"expected shape \[2304, 768\], found \[2304, 700\]"):
        load_official_neurolm(ckpt)


def test_unexpected_neurolm_key_and_contradicting_model_args_are_named(neurolm_b_checkpoint):
    ckpt = dict(neurolm_b_checkpoint, model=dict(neurolm_b_checkpoint["model"]))
    ckpt["model"]["GPT2.transformer.h.0.attn.bias"] = torch.empty(1, 1, 1024, 1024, device="meta")
    with pytest.raises(CheckpointMismatchError, match="unexpected key 'GPT2.transformer.h.0.attn.bias'"):
        load_official_neurolm(ckpt)
    ckpt = dict(neurolm_b_checkpoint, model_args={**neurolm_b_checkpoint["model_args"], "n_layer": 24})
    with pytest.raises(CheckpointMismatchError, match=r"n_layer=24 \(the loaded model has 12\)"):
        load_official_neurolm(ckpt)
    # heads are not shapes: model_args give them, and an explicit n_head= wins over model_args
    ckpt = dict(neurolm_b_checkpoint, model_args={**neurolm_b_checkpoint["model_args"], "n_head": 6})
    assert load_official_neurolm(ckpt).config.gpt.n_head == 6
    assert load_official_neurolm(ckpt, n_head=12).config.gpt.n_head == 12


def fixture_sized_neurolm() -> NeuroLM:
    "A random NeuroLM shaped like fixture neurolm_lm_tiny: 1 x 768 encoder, 1-layer 2-head 64-wide GPT, real vocab."
    config = NeuroLMConfig(gpt=GPTConfig(n_layer=1, n_head=2, n_embd=64), tokenizer=VQConfig.neurolm(encoder_depth=1))
    return NeuroLM(config).eval()


def test_neurolm_project_format_to_official_file_and_back_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    mine = fixture_sized_neurolm()
    save_neurolm(mine, tmp_path / "mine.pt")
    official = to_official_neurolm(load_neurolm(tmp_path / "mine.pt"), as_checkpoint=True, compiled=True,
                                   iter_num=120, epoch=3)
    assert set(official) == {"model", "model_args", "iter_num", "epoch"}
    assert official["model_args"] == dict(n_layer=1, n_head=2, n_embd=64, block_size=1024, bias=True,
                                          vocab_size=50304, dropout=0.0)
    assert all(k.startswith(ORIG_MOD_PREFIX) for k in official["model"])
    assert "encode_transform_layer.0.weight" in {k[len(ORIG_MOD_PREFIX):] for k in official["model"]}  # 768 -> 64
    save_checkpoint(official, tmp_path / "ckpt.pt")
    back = load_official_neurolm(tmp_path / "ckpt.pt").eval()
    assert back.config.gpt == mine.config.gpt and back.config.vocab == mine.config.vocab
    assert set(back.state_dict()) == set(mine.state_dict())
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in mine.state_dict().items())
    g = torch.Generator().manual_seed(1)
    eeg = dict(X=torch.randn(2, 12, 200, generator=g), input_chans=torch.randint(0, 136, (2, 12), generator=g),
               input_time=torch.arange(12).repeat(2, 1) // 3, input_mask=torch.ones(2, 12, dtype=torch.bool))
    eeg["input_mask"][1, 9:] = False
    text = torch.randint(0, 50257, (2, 6), generator=g)
    with torch.no_grad():
        a, b = mine(**eeg, text=text, all_logits=True), back(**eeg, text=text, all_logits=True)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(mine.generate(**eeg, text=text, max_new_tokens=3), back.generate(**eeg, text=text, max_new_tokens=3))


def test_neurolm_lm_fixture_from_an_official_checkpoint_file(fixtures_dir, tmp_path):
    lm_t, vq_t = load_fixture("neurolm_lm_tiny"), load_fixture("neurolm_vq_tiny")
    sd = lm_fixture_state_dict(lm_t, vq_t)
    save_checkpoint({"model": {ORIG_MOD_PREFIX + k: v for k, v in sd.items()}, "optimizer": {},
                     "model_args": dict(n_layer=1, n_head=2, n_embd=64, block_size=1024, bias=True, vocab_size=50304,
                                        dropout=0.0), "iter_num": 0, "epoch": 0}, tmp_path / "ckpt.pt")
    model = load_official_neurolm(tmp_path / "ckpt.pt").eval()
    assert model.config.gpt.n_head == 2  # from model_args: heads are not a shape
    report = compare_with_fixture(neurolm_lm_fixture_outputs(model, lm_t, batches=("pretrain", "text")), lm_t)
    assert {"pretrain.loss", "pretrain.logits_eeg_50304_50368", "text.gpt_final_hidden"} <= set(report)
    assert all(r["ok"] for r in report.values()), {k: r for k, r in report.items() if not r["ok"]}
    back = to_official_neurolm(model)
    assert set(back) == set(sd) and all(torch.equal(back[k], v) for k, v in sd.items())
    with pytest.raises(ValueError, match="generate"):
        neurolm_lm_fixture_outputs(model, lm_t, batches=("generate",))


# ---------------------------------------------------------------- a file that is not the expected checkpoint

LOADERS = {"neurolm_tokenizer": load_official_neurolm_tokenizer, "labram_vqnsp": load_official_labram_vqnsp,
           "neurolm_lm": load_official_neurolm, "encoder_from_vq": neurolm_encoder_from_vq,
           "read_checkpoint": read_checkpoint}


@pytest.fixture(scope="module")
def wrong_files(tmp_path_factory):
    "Real wrong files: text, empty, a real checkpoint cut short (both torch formats), pickles of a list, a folder."
    import pickle
    d = tmp_path_factory.mktemp("wrong")
    torch.manual_seed(0)
    ckpt = to_official_neurolm_tokenizer(VQTokenizer(VQConfig.tiny(encoder_depth=1)), as_checkpoint=True)
    torch.save(ckpt, d / "real.pth")
    torch.save(ckpt, d / "legacy.pth", _use_new_zipfile_serialization=False)
    (d / "notes.pth").write_text("model weights are on the shared drive\n")
    (d / "empty.pth").write_bytes(b"")
    (d / "cut.pth").write_bytes((d / "real.pth").read_bytes()[:60_000])
    (d / "cut_legacy.pth").write_bytes((d / "legacy.pth").read_bytes()[:60_000])
    (d / "list.pkl").write_bytes(pickle.dumps([1, 2, 3]))
    torch.save([torch.zeros(2)], d / "list.pth")
    (d / "folder.pth").mkdir()
    return d


WRONG = {"notes.pth": "is not a torch checkpoint: it starts with b'model weights", "empty.pth": "is empty (0 bytes)",
         "cut.pth": "is truncated or damaged", "cut_legacy.pth": "could not be read (60000 bytes; truncated",
         "list.pkl": "is a plain Python pickle, not written by torch.save", "list.pth": "holds a list, not a dict",
         "folder.pth": "is a folder"}


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("name", list(WRONG))
def test_a_wrong_file_is_refused_naming_it_and_what_was_expected(wrong_files, loader, name):
    from neurolm_nb.convert import CheckpointFileError
    path = wrong_files / name
    with pytest.raises(CheckpointFileError) as e:
        LOADERS[loader](path)
    msg = str(e.value)
    assert str(path) in msg and WRONG[name] in msg, msg
    if name not in ("cut.pth",):
        assert "expected a torch.save checkpoint" in msg, msg
    assert isinstance(e.value, CheckpointMismatchError)  # callers that catch the old error catch this one too


def test_the_real_files_behind_the_wrong_ones_load(wrong_files):
    "The cut files are cut from real checkpoints in both torch formats: whole, they load."
    a = load_official_neurolm_tokenizer(wrong_files / "real.pth")
    b = load_official_neurolm_tokenizer(wrong_files / "legacy.pth")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_a_checkpoint_of_another_model_names_the_file_and_the_keys_it_lacks(wrong_files, tmp_path):
    neurolm_vq = wrong_files / "real.pth"
    with pytest.raises(CheckpointMismatchError) as e:
        load_official_labram_vqnsp(neurolm_vq)
    msg = str(e.value)
    assert msg.startswith(f"{neurolm_vq}: not a LaBraM VQNSP tokenizer checkpoint: no 'encoder.*' keys"), msg
    assert "it looks like a NeuroLM tokenizer (VQ_Align) checkpoint (load it with load_official_neurolm_tokenizer)" in msg
    with pytest.raises(CheckpointMismatchError, match=r"real\.pth: not a NeuroLM-B/L/XL language model checkpoint: "
                                                      r"no 'GPT2\.\*' keys .*load_official_neurolm_tokenizer"):
        load_official_neurolm(neurolm_vq)
    labram = tmp_path / "vqnsp.pth"
    torch.save({"model": to_official_labram_vqnsp(VQTokenizer(VQConfig.labram(encoder_depth=1, decoder_depth=1)))}, labram)
    for load in (load_official_neurolm_tokenizer, neurolm_encoder_from_vq):
        with pytest.raises(CheckpointMismatchError, match=rf"{labram}: not a NeuroLM tokenizer .*'VQ\.encoder\.fc_norm\.weight'"
                                                          rf".*looks like a LaBraM VQNSP"):
            load(labram)
    odd = tmp_path / "odd.pth"
    torch.save({"optimizer": {"state": {}}, "epoch": 3}, odd)  # a checkpoint without a state dict
    with pytest.raises(CheckpointMismatchError, match=r"odd\.pth: no state dict found: expected one of the keys \['model'\]"):
        load_official_neurolm_tokenizer(odd)
    # a dict given directly has no file name to add, and keeps its message
    with pytest.raises(CheckpointMismatchError, match=r"^not a NeuroLM tokenizer"):
        load_official_neurolm_tokenizer({"encoder.fc_norm.weight": torch.zeros(2)})


def test_the_labram_model_loaders_share_the_clear_errors(wrong_files):
    from neurolm_nb.convert import CheckpointFileError
    from neurolm_nb.convert import load_official_labram_classifier, load_official_labram_student
    for load in (load_official_labram_student, load_official_labram_classifier):
        with pytest.raises(CheckpointFileError, match=r"empty\.pth is empty \(0 bytes\)"):
            load(wrong_files / "empty.pth")
        with pytest.raises(CheckpointFileError, match=r"list\.pth holds a list, not a dict"):
            load(wrong_files / "list.pth")
