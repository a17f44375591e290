"Tests of neurolm_nb.gpt: Hugging Face parity, masks, positions, attention paths, official fixture."
import json
from dataclasses import replace

import pytest
import torch

from neurolm_nb.core import shared_dir
from neurolm_nb.convert import load_neurolm_gpt_weights
from neurolm_nb.gpt import (GPT, GPTConfig, GPT2_PRESETS, attention, enlarge_embeddings, flex_block_mask, lm_loss,
                            make_block_mask, normalize_attn_mask, token_accuracy)

torch.set_num_threads(1)


def _fixture_dir():
    root = shared_dir()
    if root is None or not (root / "fixtures" / "official").is_dir():
        pytest.skip("official fixtures missing: shared_dir() found no shared/fixtures/official")
    return root / "fixtures" / "official"


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    "A small random Hugging Face GPT-2 (all weights randomised) saved with save_pretrained."
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=97, n_positions=40,
                                  bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(folder)
    return hf, folder


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits


def test_logits_equal_hugging_face(hf_checkpoint):
    hf, folder = hf_checkpoint
    ours = GPT.from_pretrained(folder, activation="checkpoint").eval()
    assert ours.config.activation == "gelu_tanh" and ours.config.tie_weights
    assert ours.lm_head.weight is ours.transformer.wte.weight
    ids = torch.randint(0, 97, (3, 25), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours(ids), _hf_logits(hf, ids), atol=1e-5, rtol=1e-5)


def test_default_activation_is_exact_gelu(hf_checkpoint):
    hf, folder = hf_checkpoint
    ours = GPT.from_pretrained(folder).eval()  # faithful to nanoGPT / official NeuroLM
    assert ours.config.activation == "gelu"
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        diff = (ours(ids) - _hf_logits(hf, ids)).abs().max().item()
    assert 1e-6 < diff < 1e-2  # same weights, only the GELU approximation differs


def test_from_pretrained_bin_and_unprefixed_keys(hf_checkpoint, tmp_path):
    "pytorch_model.bin with GPT2Model-style keys (no 'transformer.' prefix, old attn.bias buffers)."
    hf, folder = hf_checkpoint
    sd = {k[len("transformer."):]: v.clone() for k, v in hf.state_dict().items() if k.startswith("transformer.")}
    sd["h.0.attn.bias"] = torch.ones(1, 1, 40, 40).tril()  # as old transformers versions saved it
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    ours = GPT.from_pretrained(tmp_path, activation="checkpoint").eval()
    ids = torch.randint(0, 97, (2, 17))
    with torch.no_grad():
        assert torch.allclose(ours(ids), _hf_logits(hf, ids), atol=1e-5, rtol=1e-5)


def test_from_pretrained_untied_head(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16,
                                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path, activation="checkpoint").eval()
    assert not ours.config.tie_weights and ours.lm_head.weight is not ours.transformer.wte.weight
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.allclose(ours(ids), _hf_logits(hf, ids), atol=1e-5, rtol=1e-5)


def test_from_pretrained_downloads_nothing_by_default(tmp_path):
    with pytest.raises(FileNotFoundError, match="allow_download"):
        GPT.from_pretrained(tmp_path / "missing_folder")
    # a hub name that is not in the (empty, private) cache: refused without touching the network
    with pytest.raises(FileNotFoundError, match="allow_download"):
        GPT.from_pretrained("openai-community/gpt2", cache_dir=tmp_path / "empty_cache")


def test_from_pretrained_reads_local_hub_cache(hf_checkpoint, tmp_path):
    "A hub name already in the local Hugging Face cache loads offline."
    hf, folder = hf_checkpoint
    commit = "0" * 40
    repo = tmp_path / "models--someone--tiny-gpt2"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ("config.json", "model.safetensors"):
        (snap / name).write_bytes((folder / name).read_bytes())
    ours = GPT.from_pretrained("someone/tiny-gpt2", cache_dir=tmp_path, activation="checkpoint").eval()
    ids = torch.randint(0, 97, (1, 11))
    with torch.no_grad():
        assert torch.allclose(ours(ids), _hf_logits(hf, ids), atol=1e-5, rtol=1e-5)


def test_from_pretrained_rejects_other_models(hf_checkpoint, tmp_path):
    _, folder = hf_checkpoint
    cfg = json.loads((folder / "config.json").read_text())
    cfg["n_inner"] = 7
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="n_inner"):
        GPT.from_pretrained(tmp_path)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig.tiny(vocab_size=61, block_size=32, n_head=4)).eval()


def test_arbitrary_bool_mask_sdpa_equals_naive(tiny_model):
    ids = torch.randint(0, 61, (3, 12))
    g = torch.Generator().manual_seed(2)
    for shape in [(3, 1, 12, 12), (1, 4, 12, 12), (3, 4, 12, 12), (12, 12)]:
        mask = torch.rand(shape, generator=g) > 0.6
        with torch.no_grad():
            sdpa = tiny_model.set_attn_impl("sdpa")(ids, attn_mask=mask)
            naive = tiny_model.set_attn_impl("naive")(ids, attn_mask=mask)
        assert torch.isfinite(sdpa).all()
        assert torch.allclose(sdpa, naive, atol=1e-5, rtol=1e-5), shape
    # the mask is really used: a different mask gives different logits
    with torch.no_grad():
        a = tiny_model.set_attn_impl("sdpa")(ids, attn_mask=torch.ones(12, 12, dtype=torch.bool))
        b = tiny_model(ids)
    assert not torch.allclose(a, b, atol=1e-3)


def test_float_mask_sdpa_equals_naive(tiny_model):
    ids = torch.randint(0, 61, (2, 10))
    additive = torch.randn(2, 1, 10, 10)  # e.g. NeuroLM's 0/1 float mask during generation (quirk N13)
    with torch.no_grad():
        sdpa = tiny_model.set_attn_impl("sdpa")(ids, attn_mask=additive)
        naive = tiny_model.set_attn_impl("naive")(ids, attn_mask=additive)
    assert torch.allclose(sdpa, naive, atol=1e-5, rtol=1e-5)


def test_explicit_causal_mask_equals_is_causal(tiny_model):
    ids = torch.randint(0, 61, (2, 15))
    causal = torch.ones(15, 15, dtype=torch.bool).tril()
    for impl in ("sdpa", "naive"):
        with torch.no_grad():
            explicit = tiny_model.set_attn_impl(impl)(ids, attn_mask=causal[None, None].expand(2, 1, 15, 15))
            default = tiny_model.set_attn_impl("sdpa")(ids)
        assert torch.allclose(explicit, default, atol=1e-5, rtol=1e-5), impl
    # and it is causal: a later token does not change earlier logits
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % 61
    with torch.no_grad():
        assert torch.allclose(tiny_model(ids)[:, :-1], tiny_model(ids2)[:, :-1], atol=1e-6)


def test_position_ids(tiny_model):
    ids = torch.randint(0, 61, (2, 8))
    wte, wpe = tiny_model.transformer.wte.weight, tiny_model.transformer.wpe.weight
    with torch.no_grad():
        default = tiny_model(ids)
        assert torch.allclose(tiny_model(ids, position_ids=torch.arange(8)), default, atol=1e-6)
        # NeuroLM-style: several tokens share a position (the second), per-row positions allowed
        pos = torch.tensor([[0, 0, 0, 1, 1, 1, 5, 6], [3, 3, 4, 4, 9, 9, 9, 31]])
        logits, hidden = tiny_model(ids, position_ids=pos, return_hidden=True)
        assert torch.allclose(hidden[0], wte[ids] + wpe[pos], atol=1e-6)
        assert not torch.allclose(logits, default, atol=1e-4)
        # inputs_embeds replaces wte(idx); wpe is still added
        assert torch.allclose(tiny_model(inputs_embeds=wte[ids], position_ids=pos), logits, atol=1e-6)
        assert torch.allclose(tiny_model(ids, position_ids=pos, last_only=True), logits[:, -1:], atol=1e-6)
    assert len(hidden) == tiny_model.config.n_layer + 2
    with pytest.raises(ValueError, match="block_size"):
        tiny_model(ids, position_ids=torch.full((8,), 32))
    with pytest.raises(ValueError, match="position_ids"):
        tiny_model(ids, position_ids=torch.arange(7))


def test_bad_mask_shape_is_named():
    with pytest.raises(ValueError, match=r"\[2 or 1, 4 or 1, 6, 6\]"):
        normalize_attn_mask(torch.ones(2, 3, 6, 6, dtype=torch.bool), B=2, H=4, T=6)
    with pytest.raises(TypeError, match="bool"):
        normalize_attn_mask(torch.ones(6, 6, dtype=torch.long), B=1, H=1, T=6)


def _flex_available():
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif(not _flex_available(), reason="torch.nn.attention.flex_attention missing (torch < 2.5)")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_flex_matches_sdpa(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: compiled FlexAttention not tested")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator().manual_seed(3)
    B, H, T, d = 2, 2, 24, 16
    q, k, v = (torch.randn(B, H, T, d, generator=g).to(device) for _ in range(3))
    mask = (torch.rand(B, 1, T, T, generator=g) > 0.5).to(device)
    mask[0, 0, 5] = False  # a query that sees nothing: zeros everywhere
    for m in (None, mask, torch.randn(1, H, T, T, generator=g).to(device)):
        ref = attention(q, k, v, m, impl="sdpa")
        out = attention(q, k, v, m, impl="flex")
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    # a mask_mod never materialised: a window of 4 keys
    bm = make_block_mask(lambda b, h, qi, ki: (qi >= ki) & (qi - ki < 4), None, None, T, T, device)
    window = torch.ones(T, T, dtype=torch.bool, device=device).tril() & ~torch.ones(
        T, T, dtype=torch.bool, device=device).tril(-4)
    assert torch.allclose(attention(q, k, v, block_mask=bm, impl="flex"),
                          attention(q, k, v, window[None, None]), atol=1e-5, rtol=1e-5)
    # whole model; gradients too where flex has a backward (CUDA; torch 2.13 has none on CPU)
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(vocab_size=40, block_size=T)).to(device)
    ids = torch.randint(0, 40, (B, T), device=device)
    results = {}
    for impl in ("sdpa", "flex"):
        model.zero_grad()
        with torch.set_grad_enabled(device == "cuda"):
            logits = model.set_attn_impl(impl)(ids, attn_mask=mask)
        grad = None
        if device == "cuda":
            lm_loss(logits, ids).backward()
            grad = model.transformer.h[0].attn.c_attn.weight.grad.clone()
        results[impl] = (logits.detach(), grad)
    assert torch.allclose(results["flex"][0], results["sdpa"][0], atol=1e-5, rtol=1e-5)
    if device == "cuda":
        assert torch.allclose(results["flex"][1], results["sdpa"][1], atol=1e-5, rtol=1e-4)
    assert flex_block_mask(torch.randn(1, 1, T, T), T) is None  # float masks go through score_mod


def test_flex_refuses_dropout():
    if not _flex_available():
        pytest.skip("torch.nn.attention.flex_attention missing")
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="dropout"):
        attention(q, q, q, impl="flex", dropout_p=0.1)


def test_dropout_trains_and_eval_is_deterministic():
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(vocab_size=20, block_size=16, dropout=0.2))
    ids = torch.randint(0, 20, (2, 10))
    model.train()
    assert not torch.allclose(model(ids), model(ids))
    model.eval()
    assert torch.equal(model(ids), model(ids))


def test_param_counts_on_meta():
    expect = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}
    for name in GPT2_PRESETS:
        with torch.device("meta"):
            m = GPT(GPTConfig.preset(name))
        assert m.num_params(exclude_wpe=False) == expect[name]
        assert m.num_params() == expect[name] - 1024 * m.config.n_embd


@pytest.mark.parametrize("variant,preset", [("B", "gpt2"), ("L", "gpt2-medium"), ("XL", "gpt2-xl")])
def test_state_dict_matches_official_manifest(variant, preset):
    "Our key names and shapes equal the GPT2.* part of the full-size official NeuroLM checkpoints."
    manifest = json.loads((_fixture_dir() / "manifests" / f"neurolm_NeuroLM-{variant}.json").read_text())
    official = {e["key"][len("GPT2."):]: tuple(e["shape"]) for e in manifest["keys"] if e["key"].startswith("GPT2.")}
    args = manifest["model_args_saved_in_checkpoint"]
    with torch.device("meta"):
        m = GPT(GPTConfig.preset(preset, vocab_size=args["vocab_size"], out_vocab_size=args["vocab_size"] + 8192,
                                 tie_weights=False))
    assert (m.config.n_layer, m.config.n_head, m.config.n_embd) == (args["n_layer"], args["n_head"], args["n_embd"])
    ours = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert ours == official


def test_enlarge_embeddings_keeps_old_rows():
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(vocab_size=50, block_size=16)).eval()
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        before = model(ids)
    enlarge_embeddings(model, 64, 64 + 10, seed=1)
    assert model.config.vocab_size == 64 and model.config.n_out == 74 and not model.config.tie_weights
    assert model.lm_head.weight is not model.transformer.wte.weight
    with torch.no_grad():
        after = model(ids)
    assert after.shape == (2, 6, 74)
    assert torch.allclose(after[..., :50], before, atol=1e-6)  # old vocabulary untouched
    new_rows = model.transformer.wte.weight[50:]
    assert 0.5 < new_rows.std().item() < 1.5  # N(0, 1) like nn.Embedding's default
    assert model.lm_head.weight[50:].abs().max().item() <= 1 / 64 ** 0.5
    with pytest.raises(ValueError, match="only grow"):
        enlarge_embeddings(model, 10)


def test_official_text_batch_parity():
    "neurolm_lm_tiny: the official GPT (1 layer, 2 heads, width 64) on a text-only batch."
    from safetensors.torch import load_file
    fx = load_file(_fixture_dir() / "neurolm_lm_tiny.safetensors")
    weights = {k[len("weights."):]: v for k, v in fx.items() if k.startswith("weights.")}
    model = load_neurolm_gpt_weights(weights, n_head=2).eval()
    assert (model.config.vocab_size, model.config.n_out, model.config.tie_weights) == (50304, 58496, False)
    assert model.config.activation == "gelu" and model.config.n_layer == 1
    compiled_keys = load_neurolm_gpt_weights({"_orig_mod." + k: v for k, v in weights.items()}, n_head=2)
    assert all(torch.equal(a, b) for a, b in zip(compiled_keys.state_dict().values(), model.state_dict().values()))
    x, y = fx["input.text.x_text"], fx["input.text.y_text"]
    with torch.no_grad():
        logits, hidden = model(x, return_hidden=True)
    out = lambda name: fx[f"output.text.{name}"]
    pairs = {"gpt_input": hidden[0], "gpt_final_hidden": hidden[-1], "logits_text_0_64": logits[..., :64],
             "logits_eeg_50304_50368": logits[..., 50304:50368], "logsumexp": logits.logsumexp(-1)}
    for name, mine in pairs.items():
        assert torch.allclose(mine, out(name), atol=1e-5, rtol=1e-5), name  # fixtures README §5 (testing.TOLERANCES)
    assert torch.equal(logits.argmax(-1), out("argmax"))
    logprob = torch.log_softmax(logits.double(), -1).gather(-1, y[..., None])[..., 0]
    assert torch.allclose(logprob.float(), out("logprob_at_target"), atol=1e-5, rtol=1e-5)  # fixtures README §5 (testing.TOLERANCES)
    assert torch.allclose(lm_loss(logits, y), out("loss"), rtol=1e-5, atol=0)  # fixtures README §5 (testing.TOLERANCES)
    assert token_accuracy(logits, y).item() == out("accuracy").item()
    # the same batch through an explicit causal mask and through the naive path
    causal = torch.ones(24, 24, dtype=torch.bool).tril()
    with torch.no_grad():
        assert torch.allclose(model.set_attn_impl("naive")(x, attn_mask=causal)[..., :64],
                              out("logits_text_0_64"), atol=1e-5, rtol=1e-5)  # fixtures README §5 (testing.TOLERANCES)
