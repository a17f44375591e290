"""Text alignment (neurolm_nb.alignment): gradient reversal and its schedule, the domain terms, the offline
text samples, the text-embedding source (offline and Hugging Face folders), corpora and text windows."""
import math
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neurolm_nb.alignment import (
    EOT, AlignmentLoss, CodeUsageMonitor, TextAlignedVQ, TextWindows, attach_text_embedding, domain_adversarial_loss,
    domain_classifier, gpt_to_hf_state_dict, gradient_reversal, load_corpus_ids, load_text_source, make_text_samples,
    read_corpus_documents, reversal_alpha, sample_corpus, text_samples_dir, tiny_gpt2,
)
from neurolm_nb.gpt import hf_to_gpt_state_dict
from neurolm_nb.io import synth_eeg
from neurolm_nb.patching import collate_neurolm
from neurolm_nb.training import TrainConfig, train
from neurolm_nb.vq import VQConfig, VQTokenizer

torch.set_num_threads(1)
SHIPPED = text_samples_dir()


@pytest.fixture
def no_network(monkeypatch):
    "Any attempt to open a network connection fails the test (and the hub is told to stay offline)."
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------- gradient reversal and α
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 2.5])
def test_reversal_gradient_is_minus_alpha_times_the_gradient(alpha):
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64)
    loss = (torch.tanh(gradient_reversal(x, alpha)) * w).sum()
    (grad,) = torch.autograd.grad(loss, x)
    (plain,) = torch.autograd.grad((torch.tanh(x) * w).sum(), x)
    torch.testing.assert_close(grad, -alpha * plain)
    torch.testing.assert_close(gradient_reversal(x, alpha), x)  # forward: the identity


def test_gradcheck_accepts_the_reversal_only_where_it_is_the_true_gradient():
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: gradient_reversal(t, -1.0), (x,))
    assert not torch.autograd.gradcheck(lambda t: gradient_reversal(t, 1.0), (x,), raise_exception=False)


def test_alpha_schedule_values():
    expected = {0.0: 0.0, 0.1: 0.46211715726, 0.25: 0.84828363995, 0.5: 0.98661429815, 1.0: 0.99990920426}
    for p, a in expected.items():
        assert reversal_alpha(p) == pytest.approx(a, abs=1e-10)
        assert reversal_alpha(p) == pytest.approx(2 / (1 + math.exp(-10 * p)) - 1, abs=1e-15)
    values = [reversal_alpha(p) for p in np.linspace(0, 1, 101)]
    assert all(b > a for a, b in zip(values, values[1:])) and values[-1] < 1.0


# ---------------------------------------------------------------- the domain terms
def test_domain_terms_match_the_tokenizer_and_ignore_padding():
    torch.manual_seed(0)
    vq = VQTokenizer(VQConfig.tiny()).eval()
    montages = [["FP1", "FP2", "C3", "C4"], ["O1", "O2"]]
    batch = collate_neurolm([(synth_eeg(montages[i], 3 + i, seed=i), montages[i]) for i in range(2)])
    ids = torch.randint(0, vq.config.text_vocab_size, (2, 5))
    with torch.no_grad():
        out = vq(batch["X"], batch["input_chans"], batch["input_time"], batch["input_mask"], alpha=0.4)
        _, text_loss = vq.text_domain(ids)
        terms = domain_adversarial_loss(vq.domain_classifier, out.features, vq.text_embedding(ids), 0.4,
                                        batch["input_mask"])
        torch.testing.assert_close(terms["domain_eeg"], out.losses["domain_eeg"])
        torch.testing.assert_close(terms["domain_text"], text_loss)
        changed = out.features.clone()
        changed[~batch["input_mask"]] = 100.0  # padded features must not matter
        again = domain_adversarial_loss(vq.domain_classifier, changed, vq.text_embedding(ids), 0.4, batch["input_mask"])
    assert (~batch["input_mask"]).any()
    torch.testing.assert_close(again["domain_eeg"], terms["domain_eeg"])


def test_classifier_gradient_is_not_reversed():
    torch.manual_seed(0)
    clf = domain_classifier(8, 16, 2)
    feats, text = torch.randn(10, 8, requires_grad=True), torch.randn(6, 8)
    grads = []
    for alpha in (0.0, 0.9):
        clf.zero_grad()
        t = domain_adversarial_loss(clf, feats, text, alpha)
        (t["domain_eeg"] + t["domain_text"]).backward()
        grads.append(clf[2].weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    logits = clf(feats)
    (direct,) = torch.autograd.grad(F.cross_entropy(logits, torch.zeros(10, dtype=torch.long)), feats)
    feats.grad = None
    domain_adversarial_loss(clf, feats, text, 0.9)["domain_eeg"].backward()
    torch.testing.assert_close(feats.grad, -0.9 * direct)


# ---------------------------------------------------------------- offline text samples
def test_shipped_text_samples_are_what_the_cli_writes(tmp_path):
    if not (SHIPPED / "corpus.txt").exists():
        pytest.skip(f"{SHIPPED} is missing")
    done = subprocess.run([sys.executable, "-m", "neurolm_nb.alignment", "make-text-samples", str(tmp_path / "text")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    made = sorted(p.relative_to(tmp_path / "text") for p in (tmp_path / "text").rglob("*") if p.is_file())
    shipped = sorted(p.relative_to(SHIPPED) for p in SHIPPED.rglob("*") if p.is_file())
    assert made == shipped
    total = sum((SHIPPED / p).stat().st_size for p in shipped)
    assert total < 2_000_000, f"text samples are {total} bytes"
    from safetensors.torch import load_file
    for rel in made:
        if rel.suffix == ".safetensors":  # compare tensors (the container format may change between versions)
            a, b = load_file(SHIPPED / rel), load_file(tmp_path / "text" / rel)
            assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert (SHIPPED / rel).read_bytes() == (tmp_path / "text" / rel).read_bytes(), rel


def test_sample_corpus_is_deterministic_plain_text():
    docs = sample_corpus(20, seed=3)
    assert docs == sample_corpus(20, seed=3) and docs != sample_corpus(20, seed=4)
    assert all(d.isascii() and d.strip() and EOT not in d for d in docs)


def test_hf_state_dict_round_trip():
    model = tiny_gpt2(64, 16, n_layer=1, n_head=2, block_size=32, seed=1)
    hf = gpt_to_hf_state_dict(model.state_dict())
    assert hf["h.0.mlp.c_fc.weight"].shape == (16, 64)  # Conv1D [in, out]
    back = hf_to_gpt_state_dict(hf)
    for k, v in model.state_dict().items():
        if k != "lm_head.weight":
            assert torch.equal(back[k], v), k


# ---------------------------------------------------------------- text-embedding source
def test_offline_text_source_needs_no_network(no_network):
    src = load_text_source("tiny", dim=64)
    assert (src.vocab_size, src.dim, src.eos_id) == (512, 64, 511)
    assert src.decode(src.encode("Theta power rose over Fz.")) == "Theta power rose over Fz."
    wide = load_text_source("tiny", dim=768, seed=5)  # NeuroLM width offline: seeded stand-in rows
    assert (wide.vocab_size, wide.dim) == (512, 768) and "stand-in" in wide.note
    assert torch.equal(wide.embedding, load_text_source("tiny", dim=768, seed=5).embedding)
    auto = load_text_source("auto", dim=64)
    assert auto.name == "tiny" and torch.equal(auto.embedding, src.embedding)
    auto768 = load_text_source("auto", dim=768)
    assert auto768.dim == 768  # GPT-2 from the local cache if present, else the stand-in; never the network
    ids = load_corpus_ids(src)
    assert len(ids) > 10_000 and int(ids.max()) < 512


def test_text_source_reads_a_folder_written_by_transformers(tmp_path, no_network):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=2,
                                                                 n_positions=64))
    model.save_pretrained(tmp_path / "hf")
    transformers.AutoTokenizer.from_pretrained(SHIPPED / "gpt2-tiny").save_pretrained(tmp_path / "hf")
    src = load_text_source(tmp_path / "hf", dim=32)
    assert torch.equal(src.embedding, model.transformer.wte.weight.detach())
    tiny = load_text_source("tiny")
    text = "Alpha waves rise when the eyes close."
    assert src.encode(text) == tiny.encode(text) and src.eos_id == 511
    with pytest.raises(ValueError, match="32-d"):
        load_text_source(tmp_path / "hf", dim=768)
    # GPT-2's classic vocab.json + merges.txt layout, without tokenizer.json
    classic = tmp_path / "classic"
    classic.mkdir()
    for name in ("config.json", "model.safetensors"):
        (classic / name).write_bytes((tmp_path / "hf" / name).read_bytes())
    tiny.tokenizer.model.save(str(classic))
    assert load_text_source(classic).encode(text) == tiny.encode(text)


def test_shipped_tiny_gpt2_loads_in_transformers_with_the_same_outputs():
    transformers = pytest.importorskip("transformers")
    from neurolm_nb.gpt import GPT
    folder = SHIPPED / "gpt2-tiny"
    ours = GPT.from_pretrained(folder, activation="checkpoint").eval()
    theirs = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    ids = torch.tensor([load_text_source("tiny").encode("Delta waves dominate deep sleep.")])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)


def test_text_source_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing-model"):
        load_text_source(tmp_path / "missing-model")
    with pytest.raises(FileNotFoundError, match="text samples are missing"):
        load_text_source("tiny", samples_root=tmp_path)
    vq = VQTokenizer(VQConfig.tiny(text_vocab_size=100))
    with pytest.raises(ValueError, match="text_vocab_size=512"):
        attach_text_embedding(vq, load_text_source("tiny", dim=64))


# ---------------------------------------------------------------- corpora and windows
def test_text_windows_have_the_right_shape_and_come_from_the_corpus():
    src = load_text_source("tiny", dim=64)
    ids = load_corpus_ids(src)
    windows = TextWindows(ids, batch_size=3, block_size=40, seed=7)
    batch = windows.batch(5)
    assert batch.shape == (3, 40) and batch.dtype == torch.int64
    for row, start in zip(batch, windows.starts(5)):
        assert np.array_equal(row.numpy(), np.asarray(ids[start:start + 40], dtype=np.int64))
    corpus = EOT.join(read_corpus_documents())
    for row in batch:
        assert src.decode(row) in corpus
    assert torch.equal(windows.batch(5), batch)
    assert not torch.equal(windows.batch(6), batch) and not torch.equal(windows.batch(5, rank=1), batch)
    assert not torch.equal(windows.batch(5, micro=1), batch)
    with pytest.raises(ValueError, match="fewer than one window"):
        TextWindows(ids[:10], 2, 40)


def test_corpus_forms(tmp_path):
    src = load_text_source("tiny", dim=64)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("Spindles appear in light sleep.")
    (tmp_path / "docs" / "a.txt").write_text("Blinks show on Fp1 and Fp2.")
    ids = load_corpus_ids(src, tmp_path / "docs")
    assert src.decode(ids) == f"Blinks show on Fp1 and Fp2.{EOT}Spindles appear in light sleep.{EOT}"
    (tmp_path / "one.txt").write_text(f"First document.\n{EOT}\nSecond one.")
    assert read_corpus_documents(tmp_path / "one.txt") == ["First document.", "Second one."]
    np.asarray(ids, dtype=np.uint16).tofile(tmp_path / "train.bin")
    assert np.array_equal(np.asarray(load_corpus_ids(src, tmp_path / "train.bin")), ids)
    np.array([600, 1, 2], dtype=np.uint16).tofile(tmp_path / "foreign.bin")
    with pytest.raises(ValueError, match="another tokenizer"):
        load_corpus_ids(src, tmp_path / "foreign.bin")
    with pytest.raises(FileNotFoundError, match="allow_download"):
        load_corpus_ids(src, "openwebtext")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        load_corpus_ids(src, tmp_path / "empty")


# ---------------------------------------------------------------- the stage-1 loss in the training loop
def test_alignment_loss_in_the_training_loop():
    src = load_text_source("tiny", dim=64)
    torch.manual_seed(0)
    vq = attach_text_embedding(VQTokenizer(VQConfig.tiny(text_vocab_size=src.vocab_size)), src)
    montages = [["FP1", "FP2", "C3", "C4"], ["O1", "O2", "PZ"]]
    data = [(synth_eeg(montages[i % 2], 3 + i % 2, seed=i), montages[i % 2]) for i in range(16)]
    monitor = CodeUsageMonitor(vq.config.n_codes, every=3)
    windows = TextWindows(load_corpus_ids(src), 2, 16, seed=0)
    seen = []
    loss_fn = AlignmentLoss(windows, monitor)
    original = windows.batch
    windows.batch = lambda *a: seen.append(a) or original(*a)
    result = train(TextAlignedVQ(vq), data, loss_fn, TrainConfig(lr=2e-3, max_steps=6, batch_size=4, accum_steps=2,
                                                                   progress=False), collate_fn=collate_neurolm,
                   callbacks=[monitor])
    rows = result.history
    assert [r["alpha"] for r in rows] == pytest.approx([reversal_alpha(s / 6) for s in range(6)], abs=1e-6)
    assert seen == [(s, 0, m) for s in range(6) for m in range(2)]  # one text batch per micro-step
    assert all({"rec_freq", "rec_raw", "commitment", "domain_eeg", "domain_text", "domain_acc"} <= set(r) for r in rows)
    assert [h["step"] for h in monitor.history] == [3, 6] and monitor.total.total > 0
    assert torch.equal(vq.text_embedding.weight, src.embedding)  # frozen
    no_rev = AlignmentLoss(None, reversal=False)
    vq2 = VQTokenizer(VQConfig.tiny())
    rows2 = train(TextAlignedVQ(vq2), data, no_rev, TrainConfig(max_steps=2, batch_size=4, progress=False),
                  collate_fn=collate_neurolm).history
    assert all(r["alpha"] == 0.0 and "domain_text" not in r for r in rows2)
