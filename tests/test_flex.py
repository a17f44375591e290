"""NeuroLM's stair mask as a FlexAttention block mask (neurolm_nb.neurolm.stair_mask_mod / stair_block_mask):
the rule equals `stair_mask` exactly, and FlexAttention with it equals SDPA with the dense mask — attention
alone, the NeuroLM model, generation and the official fixture batches. On a CPU FlexAttention is eager and
forward-only (torch 2.13); forward + backward of the compiled kernel are compared on CUDA (`-m gpu`)."""
import contextlib

import pytest
import torch

from conftest import layout, load_official, tiny_neurolm
from neurolm_nb.gpt import GPT, GPTConfig, attention, lm_loss
from neurolm_nb.convert import load_official_neurolm_lm
from neurolm_nb.neurolm import NeuroLM, NeuroLMConfig, stair_block_mask, stair_mask, stair_mask_mod
from neurolm_nb.testing import lm_fixture_state_dict
from neurolm_nb.vq import VQTokenizer

flex = pytest.importorskip("torch.nn.attention.flex_attention", reason="FlexAttention needs torch >= 2.5")
TOL = dict(atol=1e-5, rtol=1e-5)  # the fixtures' float tolerance (README §5)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: compiled FlexAttention not run")


def random_batch(g, B=3, max_channels=7, max_seconds=6, max_pad=9):
    "A padded batch of samples with different channel counts and lengths, and a text length."
    shapes = [(int(torch.randint(1, max_channels, (1,), generator=g)), int(torch.randint(1, max_seconds, (1,), generator=g)))
              for _ in range(B)]
    L = max(c * a for c, a in shapes) + int(torch.randint(0, max_pad, (1,), generator=g))
    time, real = zip(*(layout(c, a, L) for c, a in shapes))
    return torch.stack(time), torch.stack(real), int(torch.randint(0, 6, (1,), generator=g))


@contextlib.contextmanager
def no_tf32():
    "Full float32 matmuls on a GPU (README §5: TF32 alone gives errors around 1e-3)."
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---------------------------------------------------------------- the rule itself

def test_mask_mod_equals_stair_mask_exactly():
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        time, real, n_text = random_batch(g)
        B, L = time.shape
        S = L + n_text
        built = flex.create_mask(stair_mask_mod(time, real), B, 1, S, S, device="cpu")
        assert torch.equal(built, stair_mask(time, real, n_text=n_text)), (L, n_text)
    # unbatched indices, a sample without padding, a sample that is all padding
    t, r = layout(4, 3, 12)
    assert torch.equal(flex.create_mask(stair_mask_mod(t, r), 1, 1, 15, 15, device="cpu")[0], stair_mask(t, r, n_text=3))
    empty = torch.zeros(1, 6, dtype=torch.bool)
    assert torch.equal(flex.create_mask(stair_mask_mod(torch.zeros(1, 6, dtype=torch.long), empty), 1, 1, 8, 8,
                                        device="cpu"), stair_mask(torch.zeros(1, 6, dtype=torch.long), empty, n_text=2))


def test_block_mask_has_one_mask_per_sample_and_skips_tiles():
    time, real = (torch.stack(x) for x in zip(layout(16, 16, 300), layout(4, 8, 300)))
    bm = stair_block_mask(time, real, n_text=20)
    assert bm.shape == (2, 1, 320, 320)
    dense = bm.to_dense()  # [B, H, query blocks, key blocks]: 1 where a tile is computed
    assert dense.shape[-2:] == (3, 3)
    assert dense[1, 0, 0, 2] == 0 and dense[1, 0, 0, 1] == 0  # sample 2 has 32 real tokens: later key tiles skipped


# ---------------------------------------------------------------- flex == sdpa on a CPU (forward)

def test_flex_attention_with_stair_block_mask_equals_sdpa_on_random_padded_batches():
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for _ in range(12):
        time, real, n_text = random_batch(g)
        B, L = time.shape
        S = L + n_text
        q, k, v = (torch.randn(B, 2, S, 16, generator=g) for _ in range(3))
        out = attention(q, k, v, impl="flex", block_mask=stair_block_mask(time, real, n_text))
        ref = attention(q, k, v, stair_mask(time, real, n_text=n_text), impl="sdpa")
        torch.testing.assert_close(out, ref, **TOL)
        worst = max(worst, (out - ref).abs().max().item())
    assert worst < 1e-5


def test_cpu_flex_backward_where_supported():
    time, real = layout(3, 4, 16)
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    try:
        out = attention(q, k, v, impl="flex", block_mask=stair_block_mask(time, real))
        out.square().sum().backward()
    except NotImplementedError as e:
        if "CPU" not in str(e):
            raise
        pytest.skip(f"torch {torch.__version__} has no FlexAttention backward on CPU ({e}); "
                    "gradients are compared on CUDA (test_compiled_flex_forward_and_backward_on_cuda)")
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    attention(q, k, v, stair_mask(time, real), impl="sdpa").square().sum().backward()
    for a, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(a, t.grad, **TOL)


@pytest.fixture(scope="module")
def tiny():
    return tiny_neurolm()[1:]


def run_with(model, impl, fn):
    model.gpt.set_attn_impl(impl)
    try:
        return fn()
    finally:
        model.gpt.set_attn_impl("sdpa")


def test_neurolm_forward_uses_the_block_mask_and_matches_sdpa(tiny):
    model, batch = tiny
    text = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for inputs in (batch, {**batch, "text": text}, {"text": text}):
            ref = model(**inputs, all_logits=True).logits
            out = run_with(model, "flex", lambda: model(**inputs, all_logits=True).logits)
            torch.testing.assert_close(out, ref, **TOL)
    seen = {}
    original = model.gpt.forward
    def spy(*args, **kwargs):
        seen.update(attn_mask=kwargs.get("attn_mask"), block_mask=kwargs.get("block_mask"))
        return original(*args, **kwargs)
    model.gpt.forward = spy
    try:
        with torch.no_grad():
            run_with(model, "flex", lambda: model(**batch))
    finally:
        del model.gpt.forward
    assert seen["attn_mask"] is None and isinstance(seen["block_mask"], flex.BlockMask)  # no dense S×S mask


def test_generation_with_flex_equals_sdpa(tiny):
    model, batch = tiny
    prompt = torch.tensor([[512, 3, 4], [512, 9, 10]])
    for kwargs in ({}, {"original_mask_quirk": True}, {"top_k": None, "seed": 4}):
        ref, ref_steps = model.generate(**batch, text=prompt, max_new_tokens=4, return_step_logits=True, **kwargs)
        ids, steps = run_with(model, "flex", lambda: model.generate(**batch, text=prompt, max_new_tokens=4,
                                                                    return_step_logits=True, **kwargs))
        assert torch.equal(ids, ref), kwargs
        torch.testing.assert_close(steps, ref_steps, **TOL)


def test_official_fixture_batches_with_flex(fixtures_dir):
    lm, vq = load_official(fixtures_dir, "neurolm_lm_tiny.safetensors"), load_official(fixtures_dir, "neurolm_vq_tiny.safetensors")
    model = load_official_neurolm_lm(lm_fixture_state_dict(lm, vq), n_head=2).eval()
    model.gpt.set_attn_impl("flex")
    eeg = lambda name: {"X": lm[f"input.{name}.X_eeg"], **{k: lm[f"input.{name}.{k}"]
                                                            for k in ("input_chans", "input_time", "input_mask")}}
    with torch.no_grad():
        pre = model(**eeg("pretrain"), eeg_targets=lm["output.pretrain.targets"])
        ins = model(**eeg("instruct"), text=lm["input.instruct.X_text"], text_targets=lm["input.instruct.Y_text"])
    for name, out in (("pretrain", pre), ("instruct", ins)):
        o = lambda key: lm[f"output.{name}.{key}"]
        assert abs(out.loss.item() - o("loss").item()) <= 1e-5 * abs(o("loss").item())  # fixtures README §5 (testing.TOLERANCES)
        assert torch.equal(out.logits.argmax(-1), o("argmax"))
        torch.testing.assert_close(out.logits[..., :64], o("logits_text_0_64"), **TOL)
        torch.testing.assert_close(out.logits.logsumexp(-1), o("logsumexp"), **TOL)
    for i, name in enumerate(["workload", "hmc"]):
        one = {k: v[i:i + 1] for k, v in eeg("instruct").items()}
        ids = model.generate(**one, text=lm[f"input.generate.{name}.X_text_prompt"][None], max_new_tokens=5,
                             original_mask_quirk=True)
        assert torch.equal(ids, lm[f"output.generate.{name}.output_ids"])


# ---------------------------------------------------------------- compiled FlexAttention on CUDA (forward + backward)

@pytest.mark.gpu
@needs_cuda
def test_compiled_flex_forward_and_backward_on_cuda():
    g = torch.Generator().manual_seed(0)
    shapes = [(19, 4), (4, 30), (23, 2), (2, 3)]  # the official stair cases' channels × seconds, padded to 300
    time, real = (torch.stack(x) for x in zip(*(layout(c, a, 300) for c, a in shapes)))
    n_text = 13                                   # text after the EEG, as in instruction tuning
    B, L = time.shape
    S = L + n_text
    q, k, v = (torch.randn(B, 4, S, 64, generator=g).cuda().requires_grad_() for _ in range(3))
    weights = torch.randn(B, 4, S, 64, generator=g).cuda()
    results = {}
    with no_tf32():
        for impl in ("sdpa", "flex"):
            for t in (q, k, v):
                t.grad = None
            if impl == "flex":
                out = attention(q, k, v, impl="flex", block_mask=stair_block_mask(time.cuda(), real.cuda(), n_text))
            else:
                out = attention(q, k, v, stair_mask(time, real, n_text=n_text).cuda(), impl="sdpa")
            (out * weights).sum().backward()
            results[impl] = (out.detach(), *(t.grad.clone() for t in (q, k, v)))
    for a, b in zip(results["flex"], results["sdpa"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@needs_cuda
def test_neurolm_training_step_flex_equals_sdpa_on_cuda(tiny):
    model, batch = tiny
    model = model.cuda()
    batch = {k: v.cuda() for k, v in batch.items()}
    targets = torch.randint(576, 832, batch["input_time"].shape, generator=torch.Generator().manual_seed(5)).cuda()
    targets[~batch["input_mask"]] = -1
    grads = {}
    try:
        with no_tf32():
            for impl in ("sdpa", "flex"):
                model.zero_grad(set_to_none=True)
                loss = run_with(model, impl, lambda: model(**batch, eeg_targets=targets).loss)
                loss.backward()
                grads[impl] = (loss.detach(), model.gpt.transformer.h[0].attn.c_attn.weight.grad.clone(),
                               model.channel_embed.weight.grad.clone())
    finally:
        model.cpu()
    for a, b in zip(grads["flex"], grads["sdpa"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

