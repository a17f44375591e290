"Tests of neurolm_nb.neurolm: stair mask, next-second targets, positions, the NeuroLM model, generation, official parity."
import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import layout, tiny_neurolm  # tests/ is on sys.path under pytest
from neurolm_nb.gpt import GPT, GPTConfig
from neurolm_nb.convert import load_official_neurolm_lm, to_official_neurolm_lm
from neurolm_nb.neurolm import (IGNORE_INDEX, NEUROLM_VOCAB, NeuroLM, NeuroLMConfig, VocabLayout, encoder_blocks,
                              encoder_input, grow_mask_like_original, load_neurolm, next_second_targets,
                              pretraining_targets, sample_next_token, sampling_generator, save_neurolm, stair_mask,
                              text_position_ids)
from neurolm_nb.testing import lm_fixture_state_dict
from neurolm_nb.vq import VQTokenizer

torch.set_num_threads(1)


def official_recipe(C, A, L, n_text=0):
    "The original's construction: tril, fill each second's block, zero padded EEG columns."
    S = L + n_text
    m = torch.ones(S, S, dtype=torch.bool).tril()
    for s in range(A):
        m[s * C:(s + 1) * C, s * C:(s + 1) * C] = True
    m[:, C * A:L] = False
    return m


def random_shapes(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield tuple(int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 24), (1, 9), (0, 7), (0, 6)))


# ---------------------------------------------------------------- vocabulary, masks, targets, positions

def test_vocab_layout():
    v = NEUROLM_VOCAB
    assert (v.eot_id, v.sep_id, v.input_size, v.eeg_offset, v.output_size) == (50256, 50257, 50304, 50304, 58496)
    assert v.code_of(v.eeg_class(torch.arange(8192))).tolist() == list(range(8192))
    assert v.code_of(torch.tensor([0, 50257, 50303])).tolist() == [-1, -1, -1]
    small = VocabLayout(text_vocab_size=512, n_codes=256)
    assert (small.sep_id, small.input_size, small.output_size) == (512, 576, 832)


def test_stair_mask_equals_official_recipe_on_random_shapes():
    for C, A, pad, T in random_shapes(60):
        time, real = layout(C, A, C * A + pad)
        assert torch.equal(stair_mask(time, real, n_channels=C, n_text=T)[0], official_recipe(C, A, C * A + pad, T))


def test_stair_mask_property_sees_exactly_earlier_seconds():
    for C, A, pad, T in random_shapes(40, seed=1):
        L = C * A + pad
        time, real = layout(C, A, L)
        m = stair_mask(time, real, n_text=T)[0]
        for q in range(C * A):  # real token (t, c) sees exactly the real tokens of seconds <= t, nothing else
            assert m[q].nonzero().flatten().tolist() == list(range((q // C + 1) * C))
        for q in range(L, L + T):  # text: all real EEG, then causal text
            assert m[q].nonzero().flatten().tolist() == list(range(C * A)) + list(range(L, q + 1))
        assert not m[:, C * A:L].any()  # padded EEG is hidden from every row


def test_stair_mask_batch_with_different_channel_counts():
    (t1, r1), (t2, r2) = layout(3, 4, 16), layout(5, 2, 16)
    m = stair_mask(torch.stack([t1, t2]), torch.stack([r1, r2]), n_channels=torch.tensor([3, 5]), n_text=2)
    assert m.shape == (2, 1, 18, 18) and m.dtype == torch.bool
    assert torch.equal(m[0, 0], official_recipe(3, 4, 16, 2)) and torch.equal(m[1, 0], official_recipe(5, 2, 16, 2))
    with pytest.raises(ValueError, match="not time-major with 4 channels"):
        stair_mask(torch.stack([t1, t2]), torch.stack([r1, r2]), n_channels=4)


def test_next_second_targets_shift_by_one_second():
    for C, A, pad, _ in random_shapes(30, seed=2):
        L = C * A + pad
        time, real = layout(C, A, L)
        codes = torch.randint(0, 8192, (L,))
        t = next_second_targets(codes, time, real)
        for j in range(L):
            second, channel = j // C, j % C
            if j < C * A and second < A - 1:
                assert t[j] == codes[(second + 1) * C + channel] + 50304
            else:
                assert t[j] == IGNORE_INDEX


def test_next_second_targets_refuse_wrong_layout():
    time, real = layout(2, 3, 8)
    with pytest.raises(ValueError, match="not time-major"):
        next_second_targets(torch.zeros(8, dtype=torch.long), time.flip(0), real)
    with pytest.raises(ValueError, match="padding is not at the end"):
        next_second_targets(torch.zeros(8, dtype=torch.long), time, real.flip(0))


def test_text_positions_batch_and_sample():
    times = torch.stack([layout(19, 4, 128)[0], layout(4, 30, 128)[0]])
    assert text_position_ids(times, 2).tolist() == [[30, 31], [30, 31]]  # N8: max over the whole batch
    assert text_position_ids(times, 2, "sample").tolist() == [[4, 5], [30, 31]]
    assert text_position_ids(None, 3).tolist() == [[0, 1, 2]]
    with pytest.raises(ValueError, match="not one of"):
        text_position_ids(times, 2, "token")


# ---------------------------------------------------------------- the model (tiny, random)

@pytest.fixture(scope="module")
def tiny():
    return tiny_neurolm()


def test_from_parts_enlarges_and_unties(tiny):
    tokenizer, model, _ = tiny
    g = model.gpt
    assert (g.transformer.wte.weight.shape[0], g.lm_head.weight.shape[0]) == (576, 832)
    assert g.lm_head.weight is not g.transformer.wte.weight
    assert isinstance(model.projection, torch.nn.Sequential)  # width 48 != encoder width 64
    assert torch.equal(model.encoder.time_embed.weight, tokenizer.encoder.time_embed.weight)
    assert model.encoder is not tokenizer.encoder
    with pytest.raises(ValueError, match="input rows"):
        NeuroLM(model.config, gpt=GPT(GPTConfig.tiny(n_embd=48)))


def test_forward_shapes_loss_and_frozen_encoder(tiny):
    tokenizer, model, batch = tiny
    targets = pretraining_targets(tokenizer, **batch, vocab=model.config.vocab)
    assert int((targets >= 0).sum()) == 5 * 2 + 3 * 5
    out = model(**batch, eeg_targets=targets)
    assert out.logits.shape == (2, 24, 832) and out.loss.ndim == 0
    out.loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.channel_embed.weight.grad is not None and model.projection[0].weight.grad is not None
    model.zero_grad()
    assert model(**batch).logits.shape == (2, 1, 832)  # no targets: last position only (N9)
    model.train()
    assert model.training and not model.encoder.training
    model.eval()


def test_supervised_only_gives_the_same_loss(tiny):
    _, model, batch = tiny
    text = torch.randint(0, 512, (2, 6))
    text_targets = torch.full_like(text, -1)
    text_targets[:, 2:4] = text[:, 3:5]
    with torch.no_grad():
        full = model(**batch, text=text, text_targets=text_targets)
        sparse = model(**batch, text=text, text_targets=text_targets, supervised_only=True)
    assert sparse.logits.shape == (4, 832)
    assert torch.allclose(full.loss, sparse.loss, atol=1e-6) and torch.equal(full.accuracy, sparse.accuracy)


def test_eeg_positions_are_seconds_and_the_mask_is_respected(tiny):
    _, model, batch = tiny
    nudge = torch.randn(48)
    with torch.no_grad():
        before = model(**batch, all_logits=True).logits
        model.gpt.transformer.wpe.weight[1] += nudge
        after = model(**batch, all_logits=True).logits
        model.gpt.transformer.wpe.weight[1] -= nudge
    moved = (before - after).abs().amax(-1) > 1e-6
    assert not moved[0, :5].any() and moved[0, 5:15].all()   # sample 0: 5 channels per second
    assert not moved[1, :3].any() and moved[1, 3:18].all()   # sample 1: 3 channels per second


def test_causal_encoder_removes_the_leak(tiny):
    _, model, batch = tiny
    changed = {k: v.clone() for k, v in batch.items()}
    changed["X"][0, 10:15] = torch.randn(5, 200)  # the last second of sample 0
    leak = {}
    for name, overrides in [("faithful", {}), ("causal", {"causal_encoder": True})]:
        probe = NeuroLM(replace(model.config, **overrides), model.encoder, model.gpt)
        a, b = probe.eeg_features(**batch), probe.eeg_features(**changed)
        leak[name] = (a - b)[0, :10].abs().max().item()
        assert torch.equal(a[1], b[1])  # the other sample is untouched either way
    assert leak["faithful"] > 1e-3 and leak["causal"] == 0.0
    with torch.no_grad():  # the building blocks with full-sample statistics = the encoder itself
        X, chans, time, real = batch.values()
        full = torch.full_like(time, X.shape[1] - 1)
        rebuilt = encoder_blocks(model.encoder, encoder_input(model.encoder, X, chans, time, full), real[:, None, None, :])
        assert torch.allclose(rebuilt, model.encoder(X, chans, time, real), atol=1e-5)


def test_generate_is_greedy_over_text_classes(tiny):
    _, model, batch = tiny
    prompt = torch.tensor([[512, 3, 4], [512, 9, 10]])
    ids, steps = model.generate(**batch, text=prompt, max_new_tokens=3, return_step_logits=True)
    assert ids.shape == (2, 6) and steps.shape == (2, 3, 512)
    assert torch.equal(ids[:, 3:], steps.argmax(-1)) and bool((ids[:, 3:] < 512).all())
    with torch.no_grad():
        assert torch.equal(model(**batch, text=ids[:, :-1]).logits[:, -1, :512].argmax(-1), ids[:, -1])


def official_sampling_loop(model, batch, prompt, n, temperature, top_k, generator):
    "The original's generate loop written out (full forward each step, /temperature, top-k, softmax, multinomial)."
    ids = prompt
    for _ in range(n):
        logits = model(**batch, text=ids).logits[:, -1, :512] / temperature
        if top_k is not None:
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
            logits[logits < v[:, [-1]]] = -float("Inf")
        ids = torch.cat([ids, torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)], 1)
    return ids


def test_generate_defaults_to_the_originals_ten_greedy_tokens(tiny):
    _, model, batch = tiny
    prompt = torch.tensor([[512, 3, 4], [512, 9, 10]])
    ids = model.generate(**batch, text=prompt)
    assert ids.shape == (2, 3 + 10)
    assert torch.equal(ids, model.generate(**batch, text=prompt, max_new_tokens=10, temperature=1.0, top_k=1))
    state = torch.get_rng_state()
    model.generate(**batch, text=prompt, max_new_tokens=2)
    assert torch.equal(torch.get_rng_state(), state)  # greedy draws no random number


def test_seeded_sampling_is_reproducible_and_follows_the_original_recipe(tiny):
    _, model, batch = tiny
    prompt = torch.tensor([[512, 3, 4], [512, 9, 10]])
    for temperature, top_k in [(1.0, None), (0.8, 20), (1.5, 3)]:
        a = model.generate(**batch, text=prompt, max_new_tokens=6, temperature=temperature, top_k=top_k, seed=11)
        b = model.generate(**batch, text=prompt, max_new_tokens=6, temperature=temperature, top_k=top_k,
                           generator=torch.Generator().manual_seed(11))
        assert torch.equal(a, b)
        with torch.no_grad():
            ref = official_sampling_loop(model, batch, prompt, 6, temperature, top_k, torch.Generator().manual_seed(11))
        assert torch.equal(a, ref), (temperature, top_k)
    draws = {tuple(model.generate(**batch, text=prompt, max_new_tokens=6, top_k=None, seed=s).flatten().tolist())
             for s in range(4)}
    assert len(draws) == 4  # different seeds, different samples
    with pytest.raises(ValueError, match="generator or seed"):
        model.generate(**batch, text=prompt, seed=1, generator=torch.Generator())


def test_top_k_one_and_tiny_temperature_are_greedy(tiny):
    _, model, batch = tiny
    prompt = torch.tensor([[512, 3, 4], [512, 9, 10]])
    greedy, steps = model.generate(**batch, text=prompt, max_new_tokens=5, return_step_logits=True)
    for temperature in (0.3, 1.0, 4.0):  # top_k = 1: the original's one-hot draw is the argmax at any temperature
        assert torch.equal(model.generate(**batch, text=prompt, max_new_tokens=5, temperature=temperature, seed=0),
                           greedy)
        with torch.no_grad():
            ref = official_sampling_loop(model, batch, prompt, 5, temperature, 1, torch.Generator().manual_seed(0))
        assert torch.equal(ref, greedy)
    top2 = steps.topk(2, -1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-4  # gaps large enough for a temperature of 1e-6 to be one-hot
    assert torch.equal(model.generate(**batch, text=prompt, max_new_tokens=5, temperature=1e-6, top_k=None, seed=3),
                       greedy)
    assert torch.equal(model.generate(**batch, text=prompt, max_new_tokens=5, temperature=0.0, top_k=None), greedy)


def test_sample_next_token_rules():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 2.9, 1.0]])
    assert sample_next_token(logits).flatten().tolist() == [0, 1]
    g = sampling_generator(seed=0)
    drawn = torch.cat([sample_next_token(logits, 1.0, 2, g) for _ in range(300)], 1)
    assert set(drawn[0].tolist()) == {0, 1} and set(drawn[1].tolist()) == {1, 2}
    p = torch.softmax(torch.tensor([2.0, 1.0]), 0)[0].item()  # the kept pair's probability of the best
    assert abs((drawn[0] == 0).float().mean().item() - p) < 0.1
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(logits, -0.5)
    with pytest.raises(ValueError, match="top_k"):
        sample_next_token(logits, 1.0, 0)


def test_text_only_generation_equals_the_gpts_own_argmax(tiny):
    _, model, _ = tiny
    prompt = torch.tensor([[5, 17, 300, 2], [44, 0, 511, 9]])
    ids, steps = model.generate(text=prompt, max_new_tokens=6, return_step_logits=True)
    expected = prompt
    with torch.no_grad():
        for i in range(6):  # causal, positions 0..T-1: the GPT alone
            logits = model.gpt(expected)[:, -1, :512]
            torch.testing.assert_close(steps[:, i], logits, atol=1e-5, rtol=1e-5)
            expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(ids, expected)
    quirky = model.generate(text=prompt, max_new_tokens=6, original_mask_quirk=True)  # no mask to grow: the same
    assert torch.equal(quirky, ids)
    sampled = model.generate(text=prompt, max_new_tokens=6, top_k=None, seed=2)
    with torch.no_grad():
        assert torch.equal(sampled, official_sampling_loop(model, {}, prompt, 6, 1.0, None,
                                                           torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="pass X"):
        model.generate(input_time=torch.zeros(2, 3, dtype=torch.long), text=prompt)
    with pytest.raises(ValueError, match="prompt"):
        model.generate()


def test_grow_mask_like_original_is_additive_float():
    m = stair_mask(*layout(2, 2, 5), n_text=2)[None]
    grown = grow_mask_like_original(m)
    assert grown.dtype == torch.float32 and grown.shape == (1, 1, 8, 8)
    assert torch.equal(grown[..., :7, :7], m.float()) and grown[..., :7, 7].eq(0).all() and grown[..., 7, :].eq(1).all()


def test_save_load_and_official_round_trip(tiny, tmp_path):
    _, model, batch = tiny
    with torch.no_grad():
        ref = model(**batch, all_logits=True).logits
        again = load_neurolm(save_neurolm(model, tmp_path / "m.pt")).eval()
        assert torch.equal(again(**batch, all_logits=True).logits, ref)
        official = {"_orig_mod." + k: v for k, v in to_official_neurolm_lm(model).items()}  # torch.compile'd (N15)
        assert "_orig_mod.pos_embed.weight" in official and "_orig_mod.encode_transform_layer.0.weight" in official
        ckpt = {"model": official, "model_args": {"n_head": 2}, "iter_num": 0}
        loaded = load_official_neurolm_lm(ckpt, text_vocab_size=512, encoder_heads=4).eval()
        assert loaded.config.gpt.n_head == 2 and loaded.config.vocab == model.config.vocab  # heads: from model_args
        assert loaded.config.tokenizer.n_heads == 4  # not a shape: the official LM checkpoint does not record it
        assert torch.equal(loaded(**batch, all_logits=True).logits, ref)
    broken = dict(official)
    broken.pop("_orig_mod.pos_embed.weight")
    with pytest.raises(ValueError, match="pos_embed.weight"):
        load_official_neurolm_lm({"model": broken}, n_head=2, text_vocab_size=512)
    with pytest.raises(ValueError, match="load_official_neurolm_lm"):
        load_neurolm({"model": {}})


# ---------------------------------------------------------------- official fixtures

@pytest.fixture(scope="module")
def seqs(fixtures_dir):
    from safetensors.torch import load_file
    return load_file(fixtures_dir / "neurolm_sequences.safetensors")


def test_official_stair_masks_and_targets(seqs):
    for case in range(5):
        p = f"stair.case{case}."
        assert torch.equal(stair_mask(seqs[p + "input_time"], seqs[p + "input_mask"]), seqs[p + "gpt_mask"])
        targets = next_second_targets(seqs[p + "synthetic_codes"], seqs[p + "input_time"][None], seqs[p + "input_mask"][None])
        assert torch.equal(targets, seqs[p + "targets"])
        assert torch.equal(targets - 50304, seqs[p + "Y_eeg"])


def test_official_instruction_masks(seqs):
    for task in ["TUAB", "TUEV", "SEED", "HMC", "Workload", "TUSL"]:
        p = f"instruct.{task}."
        time, real = seqs[p + "train.input_time"], seqs[p + "train.eeg_mask"]
        assert torch.equal(stair_mask(time, real, n_text=80), seqs[p + "train.gpt_mask"]), task
        n_prompt = len(seqs[p + "eval.text"])
        assert torch.equal(stair_mask(time, real, n_text=n_prompt), seqs[p + "eval.gpt_mask"]), task


def test_manifest_keys_and_shapes(fixtures_dir):
    for name in ("NeuroLM-B", "NeuroLM-L", "NeuroLM-XL"):
        manifest = json.loads((fixtures_dir / "manifests" / f"neurolm_{name}.json").read_text())
        with torch.device("meta"):
            model = NeuroLM(NeuroLMConfig.preset(name))
        ours = {k: list(v.shape) for k, v in to_official_neurolm_lm(model).items()}
        assert ours == {e["key"]: e["shape"] for e in manifest["keys"]}, name
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == manifest["n_trainable_parameters"]


@pytest.fixture(scope="module")
def official(fixtures_dir):
    from safetensors.torch import load_file
    from neurolm_nb.convert import load_official_neurolm_tokenizer
    from neurolm_nb.testing import fixture_state_dict
    lm = load_file(fixtures_dir / "neurolm_lm_tiny.safetensors")
    vq = load_file(fixtures_dir / "neurolm_vq_tiny.safetensors")
    model = load_official_neurolm_lm(lm_fixture_state_dict(lm, vq), n_head=2).eval()
    model2 = load_official_neurolm_lm(lm_fixture_state_dict(lm, vq, two_layer=True), n_head=2).eval()
    tokenizer = load_official_neurolm_tokenizer(fixture_state_dict("neurolm_vq_tiny", vq)).eval()
    info = json.loads((fixtures_dir / "neurolm_lm_tiny.json").read_text())
    return lm, model, model2, tokenizer, info


def close(a, b, what):
    assert torch.allclose(a.detach().float(), b.float(), atol=1e-5, rtol=1e-5), (what, (a.detach().float() - b).abs().max())  # fixtures README §5 (testing.TOLERANCES)


def eeg(lm, batch, rows=slice(None)):
    return {"X": lm[f"input.{batch}.X_eeg"][rows], **{k: lm[f"input.{batch}.{k}"][rows]
                                                    for k in ("input_chans", "input_time", "input_mask")}}


def check(lm, name, out):
    o = lambda k: lm[f"output.{name}.{k}"]
    assert abs(out.loss.item() - o("loss").item()) <= 1e-5 * abs(o("loss").item())  # fixtures README §5 (testing.TOLERANCES)
    assert out.accuracy.item() == o("accuracy").item()
    assert torch.equal(out.logits.argmax(-1), o("argmax"))
    lp = torch.log_softmax(out.logits.double(), -1)
    t = out.targets
    at = torch.where(t >= 0, lp.gather(-1, t.clamp(min=0)[..., None])[..., 0], torch.zeros_like(lp[..., 0]))
    close(at, o("logprob_at_target"), "logprob_at_target")
    close(out.logits.logsumexp(-1), o("logsumexp"), "logsumexp")
    close(out.logits[..., :64], o("logits_text_0_64"), "logits_text")
    close(out.logits[..., 50304:50368], o("logits_eeg_50304_50368"), "logits_eeg")
    close(out.hidden["gpt_input"], o("gpt_input"), "gpt_input")
    close(out.hidden["gpt_final_hidden"], o("gpt_final_hidden"), "gpt_final_hidden")
    if f"output.{name}.eeg_projected" in lm:  # the official tap holds projection + channel embedding (in-place add)
        close(out.hidden["eeg_embedded"], o("eeg_projected"), "eeg_projected")


def test_official_pretrain_batch(official):
    lm, model, _, tokenizer, _ = official
    batch = eeg(lm, "pretrain")
    assert torch.equal(stair_mask(batch["input_time"], batch["input_mask"]), lm["input.pretrain.gpt_mask"])
    targets = pretraining_targets(tokenizer, **batch)
    assert torch.equal(targets, lm["output.pretrain.targets"])
    assert torch.equal(targets - 50304, lm["output.pretrain.Y_eeg"])
    with torch.no_grad():
        check(lm, "pretrain", model(**batch, eeg_targets=targets, return_hidden=True))


def test_official_text_batch(official):
    lm, model, _, _, _ = official
    with torch.no_grad():
        check(lm, "text", model(text=lm["input.text.x_text"], text_targets=lm["input.text.y_text"], return_hidden=True))


def test_official_instruct_batch(official):
    lm, model, _, _, _ = official
    with torch.no_grad():
        out = model(**eeg(lm, "instruct"), text=lm["input.instruct.X_text"], text_targets=lm["input.instruct.Y_text"],
                    return_hidden=True)
    check(lm, "instruct", out)
    assert torch.equal(out.targets, lm["output.instruct.targets"])
    close(out.hidden["eeg_features"], lm["output.instruct.eeg_tokenizer_features"], "eeg_tokenizer_features")


@pytest.mark.parametrize("layers", [1, 2])
def test_official_generation(official, layers):
    lm, model1, model2, _, info = official
    model, tag = (model1, "generate") if layers == 1 else (model2, "generate_2layer")
    counterfactual = info["two_layer_generation_variant"]["counterfactual_checks (NOT official, for orientation only)"]
    for i, name in enumerate(["workload", "hmc"]):
        o = lambda k: lm[f"output.{tag}.{name}.{k}"]
        batch = eeg(lm, "instruct", slice(i, i + 1))
        prompt = lm[f"input.generate.{name}.X_text_prompt"][None]
        for given_mask in (None, lm[f"input.generate.{name}.gpt_mask"][None]):
            ids, steps = model.generate(**batch, text=prompt, max_new_tokens=5, attn_mask=given_mask,
                                        original_mask_quirk=True, return_step_logits=True)  # the fixture: 5 tokens
            assert torch.equal(ids, o("output_ids")), name
            close(steps[0, :, :64], o("step_logits_text_0_64"), "step_logits")
            close(steps[0].logsumexp(-1), o("step_logsumexp_text"), "step_logsumexp")
            close(steps[0].max(-1).values, o("step_top1_logit"), "step_top1")
        # the correct (default) mask moves the logits by what the fixture's own "proper mask" run recorded
        fixed_ids, fixed = model.generate(**batch, text=prompt, max_new_tokens=5, return_step_logits=True)
        record = counterfactual[f"{layers}layer.{name}.proper_causal_hide_padded_eeg"]
        shift = (fixed[0, :, :64] - o("step_logits_text_0_64")).abs().max().item()
        assert abs(shift - record["max_abs_diff_step_logits_0_64_vs_official"]) < 1e-5
        assert torch.equal(fixed_ids, o("output_ids")) == record["same_generated_ids"]


def _on_cpu(out):
    "A NeuroLMOutput with every tensor moved to the CPU (to compare with the fixture)."
    return replace(out, logits=out.logits.cpu(), loss=out.loss.cpu(), accuracy=out.accuracy.cpu(),
                   targets=out.targets.cpu(), hidden={k: v.cpu() for k, v in (out.hidden or {}).items()})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("impl", ["sdpa", "flex"])
def test_official_batches_and_generation_on_cuda(official, impl):
    import copy
    lm, model, _, tokenizer, _ = official
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # README §5
    try:
        gpu = copy.deepcopy(model).cuda().eval()
        gpu.gpt.set_attn_impl(impl)
        cuda = lambda d: {k: v.cuda() for k, v in d.items()}
        with torch.no_grad():
            pre = eeg(lm, "pretrain")
            targets = pretraining_targets(copy.deepcopy(tokenizer).cuda(), **cuda(pre))
            assert torch.equal(targets.cpu(), lm["output.pretrain.targets"])
            check(lm, "pretrain", _on_cpu(gpu(**cuda(pre), eeg_targets=targets, return_hidden=True)))
            check(lm, "instruct", _on_cpu(gpu(**cuda(eeg(lm, "instruct")), text=lm["input.instruct.X_text"].cuda(),
                                              text_targets=lm["input.instruct.Y_text"].cuda(), return_hidden=True)))
        for i, name in enumerate(["workload", "hmc"] if impl == "sdpa" else []):  # flex: a compile per length
            batch = cuda(eeg(lm, "instruct", slice(i, i + 1)))
            prompt = lm[f"input.generate.{name}.X_text_prompt"][None].cuda()
            ids = gpu.generate(**batch, text=prompt, max_new_tokens=5, original_mask_quirk=True)
            assert torch.equal(ids.cpu(), lm[f"output.generate.{name}.output_ids"]), name
            a = gpu.generate(**batch, text=prompt, max_new_tokens=5, top_k=50, temperature=0.9, seed=3)
            assert torch.equal(a, gpu.generate(**batch, text=prompt, max_new_tokens=5, top_k=50, temperature=0.9,
                                               generator=torch.Generator("cuda").manual_seed(3)))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
