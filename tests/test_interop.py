"""braindecode interop (neurolm_nb.interop): the state-dict mappings are inverses (no braindecode needed), and with
the real braindecode package (optional extra 'interop') our LaBraM and braindecode's Labram give equal outputs.

`make test-interop` runs this file in .venv-interop (torch 2.9.1 + torchaudio + braindecode) with
NEUROLM_REQUIRE_BRAINDECODE=1, which turns the "braindecode is not usable" skip into a failure; at the end of the
module it prints one `interop max |diff|` line per comparison (the largest output difference measured)."""
import os

import pytest
import torch

from neurolm_nb.channels import LABRAM_CHANNELS, labram_channel_indices, normalize_channel_names
from neurolm_nb.interop import (braindecode_rows, braindecode_unavailable, from_braindecode,
                                from_braindecode_state_dict, to_braindecode, to_braindecode_state_dict)
from neurolm_nb.labram import LaBraMClassifier, LaBraMConfig, LaBraMForMEM, LaBraMStudent

OUR_ORDER = [n.upper() for n in LABRAM_CHANNELS[:128]]
NAMES = ["EEG Fp1-REF", "EEG C3-REF", "EEG Cz-REF", "EEG O2-REF", "T3"]
CANON = normalize_channel_names(NAMES)
CHANS = torch.as_tensor(labram_channel_indices(NAMES))
X = torch.randn(2, len(NAMES), 4, 200, generator=torch.Generator().manual_seed(0))
FLAT = X.reshape(2, len(NAMES), -1)
TOL = 1e-5
REQUIRE = os.environ.get("NEUROLM_REQUIRE_BRAINDECODE", "") not in ("", "0")
MEASURED: dict[str, float] = {}  # comparison -> largest |difference| measured (printed at the end of the module)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module", autouse=True)
def _report_differences():
    yield
    if MEASURED:
        import braindecode
        print(f"\ninterop max |diff| (torch {torch.__version__}, braindecode {braindecode.__version__}):")
        for what, d in MEASURED.items():
            print(f"  interop max |diff| {what}: {d:.2e}")


@pytest.fixture(scope="module")
def bd_order():
    "braindecode's canonical channel order; skips (naming the reason) when braindecode cannot be imported."
    reason = braindecode_unavailable()
    if reason is not None:
        if REQUIRE:  # make test-interop: a missing braindecode is a failure, not a skip
            pytest.fail(f"NEUROLM_REQUIRE_BRAINDECODE is set but braindecode is not usable: {reason}")
        pytest.skip(f"braindecode is not usable here: {reason}")
    from braindecode.models.labram import LABRAM_CHANNEL_ORDER
    return list(LABRAM_CHANNEL_ORDER)


def _diff(a, b, what=None):
    "max |a - b|; `what` names the comparison in the end-of-module report (the largest value per name is kept)."
    d = (a.detach() - b.detach()).abs().max().item()
    if what is not None:
        MEASURED[what] = max(d, MEASURED.get(what, 0.0))
    return d


# ---------------------------------------------------------------- the mappings (no braindecode needed)
def test_rows_map_names_and_refuse_strangers():
    assert torch.equal(braindecode_rows(OUR_ORDER), torch.arange(129))
    swapped = OUR_ORDER.copy()
    swapped[0], swapped[5] = swapped[5], swapped[0]
    rows = braindecode_rows([n.lower() for n in swapped])  # matched case-insensitively
    assert rows[1].item() == 6 and rows[6].item() == 1
    with pytest.raises(ValueError, match="XYZ"):
        braindecode_rows(["XYZ"] + OUR_ORDER[1:])
    with pytest.raises(ValueError, match="once"):
        braindecode_rows(OUR_ORDER[:-1])


@pytest.mark.parametrize("make", [lambda: LaBraMClassifier(LaBraMConfig.tiny(), n_classes=3),
                                  lambda: LaBraMClassifier(LaBraMConfig.tiny(), n_classes=2, use_cls=True)],
                         ids=["mean", "cls"])
def test_state_dict_mapping_round_trips_exactly(make):
    model = make()
    swapped = OUR_ORDER.copy()
    swapped[2], swapped[40] = swapped[40], swapped[2]
    rows = braindecode_rows(swapped)
    theirs = to_braindecode_state_dict(model, n_seconds=15, rows=rows)  # 16 time rows: the whole table
    assert "final_layer.weight" in theirs and "mask_token" not in theirs
    assert torch.equal(theirs["position_embedding"][0, 3], model.pos_embed[0, 41])  # braindecode's row 3 is our 41
    back = from_braindecode_state_dict(theirs, rows)
    assert sorted(back) == sorted(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v), k


def test_time_table_follows_the_window():
    model = LaBraMStudent(LaBraMConfig.tiny())
    rows = braindecode_rows(OUR_ORDER)
    theirs = to_braindecode_state_dict(model, n_seconds=4, rows=rows)
    assert theirs["temporal_embedding"].shape == (1, 5, 100)
    assert theirs["final_layer.weight"].shape == (64, 100)  # the student's lm_head
    back = from_braindecode_state_dict(theirs, rows, head="lm_head", n_time_embeddings=16)
    assert torch.equal(back["time_embed"][:, :5], model.time_embed[:, :5])
    assert not back["time_embed"][:, 5:].any()
    with pytest.raises(ValueError, match="n_seconds=17"):
        to_braindecode_state_dict(model, n_seconds=17, rows=rows)


# ---------------------------------------------------------------- with the real braindecode
@pytest.mark.parametrize("use_cls", [False, True], ids=["mean", "cls"])
def test_classifier_outputs_agree_both_ways(bd_order, use_cls):
    torch.manual_seed(0)
    model = LaBraMClassifier(LaBraMConfig.tiny(), n_classes=3, init_scale=1.0, use_cls=use_cls).eval()
    bd = to_braindecode(model, 4, NAMES)
    assert not bd.training and [c["ch_name"] for c in bd.chs_info] == CANON
    theirs = bd(FLAT, ch_names=CANON)
    assert theirs.shape == (2, 3) and theirs.abs().max() > 1e-2  # outputs that could differ visibly
    assert _diff(model(X, CHANS), theirs, f"tiny classifier ({'cls' if use_cls else 'mean'}): ours vs braindecode") < TOL
    back = from_braindecode(bd, n_time_embeddings=16)
    assert type(back) is LaBraMClassifier and back.use_cls == use_cls
    for k, v in model.state_dict().items():
        if k == "time_embed":
            assert torch.equal(back.time_embed[:, :5], v[:, :5])
        else:
            assert torch.equal(back.state_dict()[k], v), k
    assert _diff(back(X, CHANS), theirs, f"tiny classifier ({'cls' if use_cls else 'mean'}): back from braindecode vs braindecode") < TOL


def test_braindecode_initialised_model_comes_over(bd_order):
    from braindecode.models import Labram
    torch.manual_seed(1)
    native = Labram(n_times=800, n_outputs=4, n_chans=len(NAMES), num_layers=2, num_heads=4, conv_out_channels=4,
                    use_mean_pooling=True, init_scale=1.0).eval()
    ours = from_braindecode(native)
    assert ours.config.dim == 100 and ours.config.depth == 2 and ours.n_classes == 4
    assert _diff(ours(X, CHANS), native(FLAT, ch_names=CANON), "braindecode-initialised Labram: ours vs braindecode") < TOL
    again = to_braindecode(ours, 4, NAMES)
    for k, v in native.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_student_and_the_cls_quirk(bd_order):
    student = LaBraMStudent(LaBraMConfig.tiny()).eval()  # cls_position='first_channel', as the original (L6)
    logits = student.lm_head(student(X, CHANS))
    plain = to_braindecode(student, 4, NAMES)(FLAT, ch_names=CANON, return_all_tokens=True)
    quirk = to_braindecode(student, 4, NAMES, mem_cls_quirk=True)(FLAT, ch_names=CANON, return_all_tokens=True)
    assert _diff(logits, plain) > 1e-3  # braindecode adds row 0 to CLS ...
    assert _diff(logits, quirk, "MEM student (mem_cls_quirk): ours vs braindecode") < TOL  # ... unless the first channel's row is written there
    student.cls_position = "cls_row"
    assert _diff(student.lm_head(student(X, CHANS)), plain, "MEM student (cls_row): ours vs braindecode") < TOL
    with pytest.raises(ValueError, match="needs ch_names"):
        to_braindecode(student, 4, mem_cls_quirk=True)
    back = from_braindecode(to_braindecode(student, 4, NAMES), kind="student")
    assert back.cls_position == "cls_row" and torch.equal(back.lm_head.weight, student.lm_head.weight)


def test_mem_model_uses_its_mem_head(bd_order):
    mem = LaBraMForMEM(LaBraMConfig.tiny()).eval()
    mem.student.cls_position = "cls_row"
    bd = to_braindecode(mem, 4, NAMES)
    assert torch.equal(bd.final_layer.weight, mem.lm_head.weight)
    assert _diff(mem.lm_head(mem.student(X, CHANS)), bd(FLAT, ch_names=CANON, return_all_tokens=True),
                 "LaBraMForMEM: ours vs braindecode") < TOL


def test_what_braindecode_cannot_express_is_refused(bd_order):
    with pytest.raises(ValueError, match="eps"):
        to_braindecode(LaBraMClassifier(LaBraMConfig.tiny(norm_eps=1e-5)), 4, NAMES)
    from braindecode.models import Labram
    learned = Labram(n_times=800, n_outputs=2, n_chans=5, num_layers=1, num_heads=4, conv_out_channels=4,
                     learned_patcher=True)
    with pytest.raises(ValueError, match="learned patcher"):
        from_braindecode(learned)
    with pytest.raises(ValueError, match="classifier only"):
        from_braindecode(to_braindecode(LaBraMClassifier(LaBraMConfig.tiny()), 4, NAMES), kind="student")


def test_labram_base_matches_the_official_outputs(bd_order, fixtures_dir):
    from conftest import load_official
    from neurolm_nb.convert import load_official_labram_classifier
    from neurolm_nb.testing import labram_base_fixture_checkpoint
    t = load_official(fixtures_dir, "labram_base.safetensors")
    clf = load_official_labram_classifier(labram_base_fixture_checkpoint(t), n_classes=1)
    clf.load_state_dict({k[len("weights.finetune_extra."):]: v.float() for k, v in t.items()
                         if k.startswith("weights.finetune_extra.")}, strict=False)
    names = [LABRAM_CHANNELS[i - 1] for i in t["input.input_chans"][1:].tolist()]
    bd = to_braindecode(clf.eval(), 4, names)
    pooled = {}
    bd.final_layer.register_forward_hook(lambda module, inputs, output: pooled.update(x=inputs[0]))
    with torch.no_grad():
        logits = bd(t["input.x"].reshape(2, len(names), -1), ch_names=names)
    assert _diff(pooled["x"], t["output.finetune.pooled_features"], "LaBraM-Base pooled features: braindecode vs official") < TOL
    assert _diff(logits, t["output.finetune.logits"], "LaBraM-Base logits: braindecode vs official") < 1e-7
