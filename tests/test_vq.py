"""The VQ tokenizer (neurolm_nb.vq): parity with the official NeuroLM / LaBraM code, the quantizer's
rules (EMA, k-means, padding, straight-through), two-process distributed updates, sizes and checkpoints."""
import functools
import os
import socket
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from neurolm_nb.convert import load_official_labram_vqnsp, load_official_neurolm_tokenizer
from neurolm_nb.testing import compare_with_fixture, fixture_state_dict, labram_fixture_outputs, neurolm_fixture_outputs
from neurolm_nb.core import load_json
from neurolm_nb.vq import (
    CodebookStats, EMAQuantizer, TemporalConv, TransformerBlock, VQConfig, VQTokenizer, channel_major_tokens,
    count_parameters, cosine_kmeans, gradient_reversal, load_tokenizer, reconstruction_loss, reversal_alpha,
    save_tokenizer,
)

torch.set_num_threads(1)


@functools.lru_cache(maxsize=None)
def _load(path):
    from safetensors.torch import load_file
    return load_file(path)


def fixture(fixtures_dir, name):
    path = fixtures_dir / f"{name}.safetensors"
    if not path.exists():
        pytest.skip(f"official fixture {path} not found")
    return _load(str(path))


# ---------------------------------------------------------------- parity with the official code
def test_neurolm_tokenizer_reproduces_official_outputs(fixtures_dir):
    t = fixture(fixtures_dir, "neurolm_vq_tiny")
    model = load_official_neurolm_tokenizer(fixture_state_dict("neurolm_vq_tiny", t), original_padding=True).eval()
    report = compare_with_fixture(neurolm_fixture_outputs(model, t), t)
    expected = {k[len("output."):] for k in t if k.startswith("output.")}
    assert set(report) == expected, expected ^ set(report)  # every stored output is compared
    bad = {k: r for k, r in report.items() if not r["ok"]}
    assert not bad, bad
    assert report["code_indices"]["max_abs_diff"] == 0


def test_labram_vqnsp_reproduces_official_outputs(fixtures_dir):
    t = fixture(fixtures_dir, "labram_vqnsp")
    model = load_official_labram_vqnsp(fixture_state_dict("labram_vqnsp", t)).eval()
    assert model.config.to_dict() == VQConfig.labram().to_dict()
    report = compare_with_fixture(labram_fixture_outputs(model, t), t)
    targets = {"output.amplitude_target", "output.phase_target"}  # inputs of ours, checked in test_targets
    expected = {k[len("output."):] for k in t if k.startswith("output.") and k not in targets}
    assert set(report) == expected
    bad = {k: r for k, r in report.items() if not r["ok"]}
    assert not bad, bad


def test_default_padding_rule_changes_only_what_it_should(fixtures_dir):
    "Our default leaves padding out of the commitment/MSE: features and codes are the same, losses differ."
    t = fixture(fixtures_dir, "neurolm_vq_tiny")
    sd = fixture_state_dict("neurolm_vq_tiny", t)
    faithful = load_official_neurolm_tokenizer(sd, original_padding=True).eval()
    ours = load_official_neurolm_tokenizer(sd).eval()
    args = (t["input.X"], t["input.input_chans"], t["input.input_time"], t["input.input_mask"])
    targets = {"Y_freq": t["input.Y_freq"], "Y_raw": t["input.Y_raw"]}  # the `Y_` names of 05_targets work too
    with torch.no_grad():
        a, b = faithful(*args, targets=targets), ours(*args, targets=targets)
    assert torch.equal(a.features, b.features) and torch.equal(a.codes, b.codes)
    mask = t["input.input_mask"]
    pred, y = b.reconstructions["raw"], t["input.Y_raw"]
    torch.testing.assert_close(b.losses["rec_raw"], F.mse_loss(pred[mask], y[mask]))
    fraction = mask.float().mean()
    torch.testing.assert_close(a.losses["rec_raw"], b.losses["rec_raw"] * fraction, rtol=1e-5, atol=0)
    assert abs(a.losses["commitment"] - b.losses["commitment"]) > 1e-6
    assert a.losses["domain_eeg"] == b.losses["domain_eeg"]  # real tokens only in both modes


# ---------------------------------------------------------------- building blocks
def test_temporal_conv_shapes_order_and_groupnorm_over_padding():
    torch.manual_seed(0)
    tc = TemporalConv(conv_channels=8, out_dim=None)
    x = torch.randn(2, 5, 200)
    out = tc(x)
    assert out.shape == (2, 5, 200)
    with torch.no_grad():
        h = x.unsqueeze(1)
        for conv, norm in [(tc.conv1, tc.norm1), (tc.conv2, tc.norm2), (tc.conv3, tc.norm3)]:
            h = F.gelu(norm(conv(h)))
    torch.testing.assert_close(out, h.permute(0, 2, 3, 1).reshape(2, 5, 200))  # feature = t*C + c
    padded = tc(torch.cat([x, torch.zeros(2, 3, 200)], 1))[:, :5]
    assert (padded - out).abs().max() > 1e-3  # quirk N2: GroupNorm sees the zero patches
    assert TemporalConv(16, 768)(x).shape == (2, 5, 768)


def test_attention_ignores_padded_keys():
    torch.manual_seed(0)
    blk = TransformerBlock(24, 3, bias=True)
    x = torch.randn(2, 6, 24)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    y = x.clone()
    y[1, 3:] = 5 * torch.randn(3, 24)
    torch.testing.assert_close(blk(x, mask)[1, :3], blk(y, mask)[1, :3])
    assert not torch.allclose(blk(x)[1, :3], blk(y)[1, :3])  # without the mask they would matter


def test_config_presets_and_validation():
    assert VQConfig.labram().dim == 25 * VQConfig.labram().conv_channels
    assert VQConfig.from_dict(VQConfig.tiny().to_dict()) == VQConfig.tiny()
    with pytest.raises(ValueError, match="n_heads"):
        VQConfig(dim=100, n_heads=12)
    with pytest.raises(ValueError, match="conv_channels"):
        VQConfig.labram(conv_channels=4)
    with pytest.raises(KeyError, match="colour"):
        VQConfig.from_dict({**VQConfig.tiny().to_dict(), "colour": 1})


def test_full_sizes_match_the_official_manifests(fixtures_dir):
    with torch.device("meta"):
        neurolm, labram = VQTokenizer(VQConfig.neurolm()), VQTokenizer(VQConfig.labram())
    for model, name in [(neurolm, "neurolm_VQ_Align"), (labram, "labram_vqnsp_base")]:
        info = load_json(fixtures_dir / "manifests" / f"{name}.json")
        counts = count_parameters(model)
        assert counts["state_dict_values"] == info["total_numel_state_dict"]
        assert counts["state_dict_keys"] == info["n_keys"]
        assert counts["trainable"] == info["n_trainable_parameters"]
    encoder = load_json(fixtures_dir / "manifests" / "neurolm_VQ_encoder_prefix.json")
    assert sum(p.numel() for p in neurolm.encoder.parameters()) == encoder["total_numel"]
    without_wte = count_parameters(neurolm)["state_dict_values"] - neurolm.text_embedding.weight.numel()
    assert 147e6 < without_wte < 147.5e6  # the paper's "about 147 M"


def test_initialisation_rescales_output_projections():
    torch.manual_seed(0)
    model = VQTokenizer(VQConfig.tiny(dim=128, encoder_depth=6))
    for layer, block in enumerate(model.encoder.blocks, start=1):
        expected = 0.02 / (2 * layer) ** 0.5
        assert abs(block.mlp.fc2.weight.std().item() - expected) < 0.1 * expected
    assert abs(model.encoder.channel_embed.weight.std().item() - 1.0) < 0.05  # NeuroLM: nn.Embedding's N(0, 1)
    labram = VQTokenizer(VQConfig.labram(encoder_depth=1, decoder_depth=1, n_codes=64))
    assert abs(labram.encoder.channel_embed.weight.std().item() - 0.02) < 0.002


# ---------------------------------------------------------------- quantizer
def naive_step(z, codebook, decay):
    "The quantizer written with one-hot matrices (the original's formulation)."
    z = F.normalize(z, dim=-1)
    d = z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * z @ codebook.T
    codes = d.argmin(1)
    onehot = F.one_hot(codes, len(codebook)).float()
    n = onehot.sum(0)
    means = F.normalize((onehot.T @ z) / n.clamp(min=1)[:, None], dim=-1)
    new = F.normalize(decay * codebook + (1 - decay) * means, dim=-1)
    return codes, F.mse_loss(codebook[codes], z), torch.where(n[:, None] > 0, new, codebook), n


def test_quantizer_matches_the_naive_formulation():
    torch.manual_seed(0)
    q = EMAQuantizer(64, 16, decay=0.9, kmeans_init=False).train()
    start = q.codebook.clone()
    z = torch.randn(300, 16)
    codes, loss, book, counts = naive_step(z, start, 0.9)
    out = q(z)
    assert torch.equal(out.codes, codes)
    torch.testing.assert_close(out.loss, loss)
    torch.testing.assert_close(q.codebook, book)
    torch.testing.assert_close(q.cluster_size, 0.1 * counts)
    assert torch.equal(q.codebook[counts == 0], start[counts == 0])  # unused codes untouched


def test_straight_through_and_no_codebook_gradient():
    torch.manual_seed(0)
    q = EMAQuantizer(32, 8, kmeans_init=False).eval()
    z = torch.randn(10, 8, requires_grad=True)
    out = q(z)
    torch.testing.assert_close(out.quantized, q.codebook[out.codes])
    (out.quantized * torch.arange(8.0)).sum().backward()
    expected, = torch.autograd.grad((F.normalize(z, dim=-1) * torch.arange(8.0)).sum(), z)
    torch.testing.assert_close(z.grad, expected)
    assert not any(p.requires_grad for p in q.parameters())


def test_padding_is_excluded_unless_asked_for():
    torch.manual_seed(0)
    real, junk = torch.randn(40, 8), torch.randn(20, 8)
    mask = torch.cat([torch.ones(40), torch.zeros(20)]).bool()
    a, b, c = (EMAQuantizer(16, 8) for _ in range(3))
    b.load_state_dict(a.state_dict()); c.load_state_dict(a.state_dict())
    torch.manual_seed(1); oa = a.train()(torch.cat([real, junk]), mask)   # k-means + EMA on real tokens only
    torch.manual_seed(1); ob = b.train()(real)
    torch.manual_seed(1); c.train()(torch.cat([real, junk]))              # the original: padding included
    torch.testing.assert_close(a.codebook, b.codebook)
    torch.testing.assert_close(oa.loss, ob.loss)
    assert a.kmeans_counts.sum() == 40 and c.kmeans_counts.sum() == 60
    assert not torch.allclose(a.codebook, c.codebook)


def test_eval_mode_changes_nothing_and_kmeans_runs_once():
    torch.manual_seed(0)
    q = EMAQuantizer(8, 4, kmeans_init=True)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.eval()(torch.randn(30, 4))
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())  # N16 side effect fixed
    q.train()(torch.randn(30, 4))
    assert q.initted.item() == 1 and q.kmeans_counts.sum() == 30
    counts = q.kmeans_counts.clone()
    q(torch.randn(30, 4))
    assert torch.equal(q.kmeans_counts, counts)  # no second k-means


def test_cosine_kmeans_finds_clusters():
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(5, 16), dim=-1)
    data = F.normalize(centres.repeat_interleave(50, 0) + 0.02 * torch.randn(250, 16), dim=-1)
    means, counts = cosine_kmeans(data, 12, iters=10)
    assert counts.sum() == 250
    assert (means @ centres.T).max(0).values.min() > 0.99


def _distributed_worker(rank, world, port, results):
    import torch.distributed as dist
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # every rank starts from a different random codebook
        q = EMAQuantizer(16, 8, kmeans_init=True).train()
        gen = torch.Generator().manual_seed(7)
        data = [torch.randn(24, 8, generator=gen) for _ in range(world)]
        q(data[rank])  # k-means on rank 0's batch, broadcast; then an EMA step over all ranks' vectors
        after_first = q.codebook.clone()
        q(data[rank])
        results[rank] = (after_first, q.codebook.clone(), q.cluster_size.clone(), q.kmeans_counts.clone())
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_share_one_codebook():
    "Real gloo processes: k-means on rank 0 is broadcast and EMA sums are all-reduced, so ranks agree."
    import torch.multiprocessing as mp
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_distributed_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    r0, r1 = results[0], results[1]
    for a, b in zip(r0, r1):
        assert torch.equal(a, b)
    assert r0[3].sum() == 24  # k-means saw rank 0's 24 vectors only
    # the EMA step of two ranks equals one step on both batches together in one process
    gen = torch.Generator().manual_seed(7)
    data = torch.cat([torch.randn(24, 8, generator=gen) for _ in range(2)])
    single = EMAQuantizer(16, 8, kmeans_init=False).train()
    single.codebook.copy_(r0[0])
    single(data)
    torch.testing.assert_close(single.codebook, r0[1])


# ---------------------------------------------------------------- the tokenizer
def tiny_batch(seed=0, B=3, L=10):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 6:] = False
    return dict(X=torch.randn(B, L, 200, generator=g), input_chans=torch.randint(0, 136, (B, L), generator=g),
                input_time=torch.randint(0, 8, (B, L), generator=g), input_mask=mask)


def test_tokenizer_losses_gradients_and_reversal():
    torch.manual_seed(0)
    model = VQTokenizer(VQConfig.tiny())
    batch = tiny_batch()
    targets = {"freq": torch.randn(3, 10, 100), "raw": torch.randn(3, 10, 200)}
    out = model(**batch, targets=targets, alpha=0.5)
    assert set(out.losses) == {"commitment", "rec_freq", "rec_raw", "domain_eeg"}
    torch.testing.assert_close(out.loss, sum(out.losses.values()))
    # the encoder receives the domain gradient reversed and scaled by alpha
    reversed_grad, = torch.autograd.grad(out.losses["domain_eeg"], out.features, retain_graph=True)
    feats = out.features.detach().requires_grad_(True)
    logits = model.domain_classifier(feats)[batch["input_mask"]]
    plain_grad, = torch.autograd.grad(F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long)), feats)
    torch.testing.assert_close(reversed_grad, -0.5 * plain_grad)
    out.loss.backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # through the straight-through estimator
    with pytest.raises(KeyError, match="spectrum"):
        model(**batch, targets={"spectrum": targets["raw"]})
    _, text_loss = model.text_domain(torch.randint(0, 512, (2, 5)))
    text_loss.backward()
    assert model.text_embedding.weight.grad is None  # frozen


def test_gradient_reversal_and_schedule():
    x = torch.ones(4, requires_grad=True)
    gradient_reversal(x, 0.3).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((4,), -0.3))
    assert reversal_alpha(0) == 0 and abs(reversal_alpha(0.5) - (2 / (1 + torch.e ** -5) - 1)) < 1e-12


def test_reconstruction_loss_modes():
    pred, target = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    target[~mask] = 0
    torch.testing.assert_close(reconstruction_loss(pred, target, mask), F.mse_loss(pred[mask], target[mask]))
    torch.testing.assert_close(reconstruction_loss(pred, target, mask, original_padding=True),
                               ((pred * mask[..., None] - target) ** 2).mean())


def huber_by_hand(err: torch.Tensor) -> torch.Tensor:
    "Mean smooth L1 loss (beta 1) written out: 0.5 e^2 where |e| < 1, |e| - 0.5 elsewhere."
    return torch.where(err.abs() < 1, 0.5 * err ** 2, err.abs() - 0.5).mean()


def test_smooth_l1_reconstruction_loss_by_hand():
    pred, target = torch.tensor([[[0.5, 3.0, -2.0]], [[0.2, 0.0, 9.0]]]), torch.zeros(2, 1, 3)
    assert reconstruction_loss(pred[:1], target[:1], smooth_l1=True).item() == pytest.approx((0.125 + 2.5 + 1.5) / 3)
    mask = torch.tensor([[True], [False]])  # the second token is padding
    assert reconstruction_loss(pred, target, mask, smooth_l1=True).item() == pytest.approx((0.125 + 2.5 + 1.5) / 3)
    # original_padding: masked prediction against the zero target of padding, averaged over all 6 entries
    assert reconstruction_loss(pred, target, mask, original_padding=True, smooth_l1=True).item() == pytest.approx(
        (0.125 + 2.5 + 1.5) / 6)
    assert reconstruction_loss(pred, target, mask).item() == pytest.approx((0.25 + 9 + 4) / 3)  # MSE by default


@pytest.mark.parametrize("preset", ["neurolm", "labram"])
def test_smooth_l1_loss_option_in_both_tokenizers(preset):
    torch.manual_seed(0)
    if preset == "neurolm":
        cfg = VQConfig.tiny()
        batch = tiny_batch()
    else:  # LaBraM's VQ-NSP layout at a small size: CLS token, one shared decoder, amplitude + phase targets
        cfg = VQConfig.labram(conv_channels=4, dim=100, n_heads=4, encoder_depth=1, decoder_depth=1, code_dim=8,
                              n_codes=32)
        batch = channel_major_tokens(torch.randn(2, 3, 2, 200), torch.tensor([0, 4, 7, 9]))
    assert cfg.smooth_l1_loss is False  # the original's default: MSE
    B, L = batch["input_time"].shape
    targets = {name: torch.randn(B, L, size) * 2 for name, size in cfg.targets.items()}
    mse_model = VQTokenizer(cfg).eval()
    huber_model = VQTokenizer(replace(cfg, smooth_l1_loss=True)).eval()
    huber_model.load_state_dict(mse_model.state_dict())
    with torch.no_grad():
        mse, huber = mse_model(**batch, targets=targets), huber_model(**batch, targets=targets)
    real = batch.get("input_mask", torch.ones(B, L, dtype=torch.bool)).bool()
    for name in cfg.targets:
        err = (huber.reconstructions[name] - targets[name])[real]
        torch.testing.assert_close(huber.losses[f"rec_{name}"], huber_by_hand(err))
        torch.testing.assert_close(mse.losses[f"rec_{name}"], (err ** 2).mean())
        assert abs(huber.losses[f"rec_{name}"] - mse.losses[f"rec_{name}"]) > 1e-3
    torch.testing.assert_close(huber.losses["commitment"], mse.losses["commitment"])
    assert VQConfig.from_dict(replace(cfg, smooth_l1_loss=True).to_dict()).smooth_l1_loss is True


def test_training_steps_reduce_the_loss_and_fill_the_codebook():
    torch.manual_seed(0)
    model = VQTokenizer(VQConfig.tiny(n_codes=64)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    batch = tiny_batch(B=4, L=16)
    t = torch.linspace(0, 1, 200)
    batch["X"] = torch.sin(2 * torch.pi * (5 + torch.arange(16.0))[None, :, None] * t).expand(4, -1, -1).clone()
    targets = {"freq": torch.fft.fft(batch["X"]).abs()[..., :100] / 50, "raw": batch["X"]}
    losses = []
    for _ in range(25):
        out = model(**batch, targets=targets)
        opt.zero_grad(); out.loss.backward(); opt.step()
        losses.append(out.losses["rec_freq"].item() + out.losses["rec_raw"].item())
    assert losses[-1] < 0.5 * losses[0]
    stats = CodebookStats(64).update(out.codes, batch["input_mask"])
    assert stats.total == int(batch["input_mask"].sum()) and stats.summary()["used_codes"] > 1


def test_autocast_keeps_the_quantizer_in_float32():
    model = VQTokenizer(VQConfig.tiny()).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**tiny_batch())
    assert out.patch_embed.dtype == torch.bfloat16 and out.reconstructions["raw"].dtype == torch.bfloat16
    assert out.to_quantizer.dtype == torch.float32 and out.quantized.dtype == torch.float32


def test_get_codes_matches_forward_and_does_not_touch_buffers():
    torch.manual_seed(0)
    model = VQTokenizer(VQConfig.tiny()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = tiny_batch()
    with torch.no_grad():
        assert torch.equal(model.get_codes(**batch), model(**batch).codes)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_channel_major_tokens_layout():
    x = torch.arange(2 * 3 * 2 * 200, dtype=torch.float32).view(2, 3, 2, 200)
    toks = channel_major_tokens(x, torch.tensor([0, 4, 7, 9]))
    assert toks["input_chans"].tolist() == [[4, 4, 7, 7, 9, 9]] * 2
    assert toks["input_time"].tolist() == [[0, 1, 0, 1, 0, 1]] * 2
    assert torch.equal(toks["X"][1, 3], x[1, 1, 1])
    with pytest.raises(ValueError, match="CLS"):
        channel_major_tokens(x, torch.tensor([4, 7, 9]))


def test_codebook_stats():
    s = CodebookStats(6).update(torch.tensor([[0, 1, 1, 5]]), torch.tensor([[1, 1, 1, 0]], dtype=torch.bool))
    assert s.counts.tolist() == [1, 2, 0, 0, 0, 0] and s.dead_codes() == 4
    p = torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)
    assert abs(s.perplexity() - torch.exp(-(p * p.log()).sum()).item()) < 1e-9
    assert CodebookStats(3).perplexity() == 0.0


def test_save_and_load_tokenizer(tmp_path):
    torch.manual_seed(0)
    model = VQTokenizer(VQConfig.tiny()).eval()
    path = save_tokenizer(model, tmp_path / "tok.pt", step=3)
    again = load_tokenizer(path).eval()
    assert again.config == model.config
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    assert not again.text_embedding.weight.requires_grad and again.encoder.norm.weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(again(**tiny_batch()).features, model(**tiny_batch()).features, rtol=0, atol=0)
    with pytest.raises(ValueError, match="config"):
        load_tokenizer({"model": {}})
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_tokenizer(tmp_path / "nope.pt")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_official_tokenizer_outputs_on_cuda(fixtures_dir):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # README §5
    try:
        t = fixture(fixtures_dir, "neurolm_vq_tiny")
        model = load_official_neurolm_tokenizer(fixture_state_dict("neurolm_vq_tiny", t), original_padding=True)
        outs = neurolm_fixture_outputs(model.cuda().eval(), {k: v.cuda() for k, v in t.items()})
        report = compare_with_fixture({k: v.cpu() for k, v in outs.items()}, t)
        assert all(r["ok"] for r in report.values()), {k: r for k, r in report.items() if not r["ok"]}
        t = fixture(fixtures_dir, "labram_vqnsp")
        labram = load_official_labram_vqnsp(fixture_state_dict("labram_vqnsp", t)).cuda().eval()
        outs = labram_fixture_outputs(labram, {k: v.cuda() for k, v in t.items()})
        report = compare_with_fixture({k: v.cpu() for k, v in outs.items()}, t, atol=2e-5)  # 12 layers on a GPU
        assert all(r["ok"] for r in report.values()), {k: r for k, r in report.items() if not r["ok"]}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
