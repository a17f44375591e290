"""Tests of `neurolm_nb.instructions` (nbs/30_instructions.ipynb): templates, the stub / BPE tokenizers, sequence
assembly and answer-only targets (parity with the official `neurolm_sequences` and `neurolm_lm_tiny` fixtures for all
six tasks), the original answer parse, option scoring, and instruction datasets."""
import json
import re

import numpy as np
import pytest
import torch

from neurolm_nb.datasets import HMC_CHANNELS, SEED_CHANNELS, TUH_CHANNELS, WORKLOAD_CHANNELS, get_spec
from neurolm_nb.shards import build_dataset, samples_dir_for
from neurolm_nb.instructions import (EEG_MAX_LEN, INSTRUCTION_TASKS, TASK_NAMES, TEXT_MAX_LEN, InstructionDataset,
                                     MixedInstructions, TextTokenizer, build_instruction_text,
                                     collate_instructions, decode_answers, find_task_datasets, get_task,
                                     greedy_answers, instruction_sample, load_text_tokenizer, longest_text,
                                     option_continuations, parse_answer, score_options)
from neurolm_nb.neurolm import IGNORE_INDEX, NeuroLM, stair_mask
from neurolm_nb.testing import StubTokenizer, check_parity

CHANNELS = {"TUAB": TUH_CHANNELS, "TUEV": TUH_CHANNELS, "SEED": SEED_CHANNELS, "HMC": HMC_CHANNELS,
            "Workload": WORKLOAD_CHANNELS, "TUSL": TUH_CHANNELS}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest on a shared CI machine


@pytest.fixture(scope="module")
def seq(fixtures_dir):
    from safetensors.torch import load_file
    return (load_file(fixtures_dir / "neurolm_sequences.safetensors"),
            json.loads((fixtures_dir / "neurolm_sequences.json").read_text()))


@pytest.fixture(scope="module")
def tiny():
    from neurolm_nb.instruction_tuning import tiny_neurolm
    return tiny_neurolm(0).eval(), load_text_tokenizer("tiny")


def train_label(info: dict) -> int:
    value = info["train_label"]
    return value if isinstance(value, int) else int(re.search(r"->\s*(\d+)", value).group(1))


def test_templates_and_result_positions():
    assert [INSTRUCTION_TASKS[n].result_idx for n in TASK_NAMES] == [7, 34, 11, 22, 9, 17]
    assert [get_task(n).title for n in TASK_NAMES] == ["TUAB", "TUEV", "SEED", "HMC", "Workload", "TUSL"]
    for name, task in INSTRUCTION_TASKS.items():
        assert sorted(task.label_map(get_spec(name).classes).tolist()) == list(range(task.n_classes))
        words = task.text(task.n_classes - 1).split(" ")
        assert words[task.result_idx].startswith(task.answers[-1])
    assert get_task("seed").label_map(["negative", "neutral", "positive"]).tolist() == [2, 1, 0]
    with pytest.raises(ValueError, match="SEED"):
        get_task("seed").label_map(["rest", "arithmetic"])
    with pytest.raises(KeyError, match="zuco"):
        get_task("zuco")


def test_stub_tokenizer_reproduces_the_fixture_ids(seq):
    _, meta = seq
    stub = StubTokenizer()
    for title, info in meta["instruction"].items():
        for label, text in info["template_strings_by_label"].items():
            ids = stub.encode(text)
            assert [50257] + ids == info["template_ids_by_label"][label], (title, label)
            assert stub.decode(ids) == text
        assert [50257] + stub.encode(info["prompt_string"]) == info["prompt_ids"]
    assert stub.pieces == {int(k): v for k, v in meta["stub_tokenizer"]["id_to_piece"].items()}
    assert stub.decode([37240, 999]) == "Question\ufffd"  # an id it never produced


@pytest.mark.parametrize("title", list(CHANNELS))
def test_instruction_samples_match_the_official_loaders(seq, title):
    tensors, meta = seq
    info, task, stub = meta["instruction"][title], get_task(title), StubTokenizer()
    f = lambda key: tensors[f"instruct.{title}.{key}"]
    official = info["dataset_info (train_instruction.get_instruct_datasets)"]
    assert (task.result_idx, task.label_dic) == (official["result_idx"], official["label_dic"])
    assert task.prompt == info["prompt_string"]
    train = instruction_sample(f("train.raw_uV"), CHANNELS[title], task, train_label(info), stub)
    check_parity(train["X"], f("train.X_eeg"), "data", f"{title} train X")  # fixtures README §5
    for ours, theirs in [("input_chans", "input_chans"), ("input_time", "input_time"), ("input_mask", "eeg_mask"),
                         ("text", "text"), ("text_targets", "Y_text")]:
        assert torch.equal(train[ours].long(), f(f"train.{theirs}").long()), ours
    assert [i for i, y in enumerate(train["text_targets"].tolist()) if y != IGNORE_INDEX] == \
        info["supervised_positions_in_Y_text"]
    assert torch.equal(stair_mask(train["input_time"], train["input_mask"], n_text=TEXT_MAX_LEN), f("train.gpt_mask"))
    raw = f("eval.raw_uV") if f"instruct.{title}.eval.raw_uV" in tensors else f("train.raw_uV")
    ev = instruction_sample(raw, CHANNELS[title], task, int(f("eval.label")), stub, train=False)
    assert ev["text"].tolist() == f("eval.text").tolist() and "text_targets" not in ev
    if f"instruct.{title}.eval.X_eeg" in tensors:
        check_parity(ev["X"], f("eval.X_eeg"), "data", f"{title} eval X")
    assert torch.equal(stair_mask(ev["input_time"], ev["input_mask"], n_text=len(ev["text"])), f("eval.gpt_mask"))
    # the official parse demo: prompt (no [SEP]) + the 5 ids a perfect answer generates
    demo = info["parse_demo"]
    p = len(ev["text"])
    decoded = decode_answers(torch.cat([ev["text"], train["text"][p:p + 5]])[None], StubTokenizer.from_fixture(meta))[0]
    assert decoded == demo["decoded_prompt_plus_5_answer_ids"]
    assert parse_answer(decoded, task) == demo["get_pred"] == demo["expected_label"]


def test_supervised_positions_and_the_paren_quirk():
    stub = StubTokenizer()
    assert build_instruction_text("tuev", stub, 2).loss_start == 56                       # " (" supervised too
    assert build_instruction_text("tuev", stub, 2, supervise_paren=False).loss_start == 57
    assert build_instruction_text("tusl", stub, 0).loss_start == 31                       # the original: not for TUSL
    assert build_instruction_text("tusl", stub, 0, supervise_paren=True).loss_start == 30
    assert build_instruction_text("tuab", stub, 1, supervise_paren=True).loss_start == 10  # yes/no: nothing to add
    text = build_instruction_text("workload", stub, 0, text_max_len=None)
    assert len(text.ids) == text.valid_len == 16 and text.ids[-1] == stub.eot_id
    with pytest.raises(ValueError, match="text_max_len"):
        build_instruction_text("tuev", stub, 0, text_max_len=40)
    with pytest.raises(ValueError, match="outside"):
        get_task("hmc").text(5)


def test_a_tokenizer_that_merges_across_the_prompt_boundary_is_refused():
    class Merging(TextTokenizer):
        "Encodes whole words; ' (' glued to the letter when one follows."
        name, eot_id, vocab_size = "merging", 0, 1000
        pieces: dict = {}

        def encode_plain(self, text):
            return [self.pieces.setdefault(p, len(self.pieces) + 1) for p in re.findall(r" \(\w|\S+| ", text)]

    with pytest.raises(ValueError, match="prefix"):
        build_instruction_text("tusl", Merging(), 1)
    with pytest.raises(ValueError, match="prefix"):
        option_continuations("tusl", Merging())


def test_tiny_bpe_tokenizer():
    tok = load_text_tokenizer("tiny")
    assert (tok.eot_id, tok.vocab_size) == (511, 512)
    for task in INSTRUCTION_TASKS.values():
        assert tok.decode(tok.encode(task.text(0))) == task.text(0)
    assert longest_text(TASK_NAMES, tok) == 155  # TUEV's question in the tiny BPE's pieces
    assert longest_text(TASK_NAMES, StubTokenizer()) == 62
    assert option_continuations("hmc", tok)[2] == tok.encode("C) <|endoftext|>")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_text_tokenizer("/nowhere/gpt2")


def test_parse_answer_rules():
    tusl = get_task("tusl").prompt
    assert parse_answer(tusl + "C) <|endoftext|>", "tusl") == 2
    assert parse_answer(tusl + "C).", "tusl") == 2
    assert parse_answer(tusl + "Z) ", "tusl") == -1
    assert parse_answer(tusl + "Z) ", "tusl", original_unparseable=True) == 2   # the original's last class
    assert parse_answer("Question: Is this EEG segment abnormal? Answer: No", "tuab") == 0
    assert parse_answer("Question: Is this EEG segment abnormal? Answer: no", "tuab", original_unparseable=True) == -1


def test_official_instruction_batch_loss_and_generation(fixtures_dir):
    from safetensors.torch import load_file
    from neurolm_nb.convert import load_official_neurolm_lm
    from neurolm_nb.testing import lm_fixture_state_dict
    lm_fx = load_file(fixtures_dir / "neurolm_lm_tiny.safetensors")
    vq_fx = load_file(fixtures_dir / "neurolm_vq_tiny.safetensors")
    stub = StubTokenizer()
    parts = [("workload", vq_fx["input.raw_uV_A"], WORKLOAD_CHANNELS, 1), ("hmc", vq_fx["input.raw_uV_B"], HMC_CHANNELS, 2)]
    batch = collate_instructions([instruction_sample(r, c, n, y, stub) for n, r, c, y in parts])
    inp = lambda key: lm_fx[f"input.instruct.{key}"]
    check_parity(batch["X"], inp("X_eeg"), "data", "instruct X")  # fixtures README §5
    for ours, theirs in [("text", "X_text"), ("text_targets", "Y_text"), ("input_chans", "input_chans"),
                         ("input_time", "input_time"), ("input_mask", "input_mask")]:
        assert torch.equal(batch[ours].long(), inp(theirs).long()), ours
    official = load_official_neurolm_lm(lm_fixture_state_dict(lm_fx, vq_fx), n_head=2).eval()
    with torch.no_grad():
        out = official(**{k: batch[k] for k in ("X", "input_chans", "input_time", "input_mask", "text")},
                       text_targets=batch["text_targets"], supervised_only=True)
    check_parity(out.loss.item(), lm_fx["output.instruct.loss"].item(), "loss", "instruct loss")
    for name, raw, ch, label in parts:
        one = collate_instructions([instruction_sample(raw, ch, name, label, stub, train=False)])
        ids = official.generate(one["X"], one["input_chans"], one["input_time"], one["input_mask"], one["text"],
                                max_new_tokens=5, original_mask_quirk=True)  # the fixture generated 5 ids
        assert ids.flatten().tolist() == lm_fx[f"output.generate.{name}.output_ids"].flatten().tolist()
        texts, parsed = greedy_answers(official, one, name, StubTokenizer(), original_mask_quirk=True)
        assert parsed.tolist() == [-1]  # a random model's answer is not an answer
        assert texts[0].startswith(get_task(name).prompt)


def test_option_scoring_gives_a_distribution_that_matches_a_forward_pass(tiny):
    lm, tok = tiny
    vocab = lm.config.vocab
    rng = np.random.default_rng(0)
    samples = [instruction_sample(rng.normal(0, 20, (4, 6000)).astype(np.float32), HMC_CHANNELS, "hmc", 0, tok,
                                  train=False, sep_id=vocab.sep_id) for _ in range(3)]
    batch = collate_instructions(samples)
    scores = score_options(lm, batch, "hmc", tok)
    assert scores.loglik.shape == scores.probs.shape == (3, 5)
    assert torch.allclose(scores.probs.sum(-1), torch.ones(3), atol=1e-6) and (scores.probs > 0).all()
    assert (scores.loglik < 0).all()
    # option (D) of sample 1, by an ordinary teacher-forced pass over the full answer text
    full = build_instruction_text("hmc", tok, 3, sep_id=vocab.sep_id, text_max_len=None)
    one = {k: batch[k][1:2] for k in ("X", "input_chans", "input_time", "input_mask")}
    with torch.no_grad():
        logits = lm(**one, text=torch.tensor([full.ids]), all_logits=True).logits[0, EEG_MAX_LEN:]
    logp = logits[:, :vocab.text_vocab_size].log_softmax(-1)
    expected = sum(logp[i, full.ids[i + 1]].item() for i in range(full.prompt_len - 1, full.valid_len - 1))
    assert abs(scores.loglik[1, 3].item() - expected) < 1e-4
    with pytest.raises(ValueError, match="ends texts"):
        score_options(lm, batch, "hmc", StubTokenizer())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("instruction_datasets")
    for name in ("workload", "hmc", "seed"):
        build_dataset(name, samples_dir_for(name), root / name, seed=0)
    return root


def test_instruction_datasets_and_mixing(built, tiny):
    lm, tok = tiny
    roots = find_task_datasets(built)
    assert list(roots) == ["seed", "hmc", "workload"]  # the original's task order
    fit = longest_text(list(roots), tok)
    sets = [InstructionDataset(r, "train", tok, sep_id=lm.config.vocab.sep_id, text_max_len=fit) for r in roots.values()]
    seed_set = sets[0]
    assert seed_set.labels.tolist() == seed_set.label_map[seed_set.windows.labels].tolist()
    item = seed_set[0]
    assert item["X"].shape == (EEG_MAX_LEN, 200) and int(item["input_mask"].sum()) == 62 * 4
    assert item["text"].shape == (fit,) and int(item["task"]) == TASK_NAMES.index("seed")
    mixed, balanced = MixedInstructions(sets), MixedInstructions(sets, balanced=True, seed=1)
    assert len(mixed) == len(balanced) == sum(len(s) for s in sets)
    assert abs(mixed.shares()["workload"] - 58 / 72) < 1e-9
    assert max(balanced.shares().values()) - min(balanced.shares().values()) < 0.05
    seen = {balanced.locate(i) for i in range(len(balanced))}
    assert {k for k, _ in seen} == {0, 1, 2} and len({j for k, j in seen if k == 1}) == len(sets[1])  # small sets cycle
    batch = collate_instructions([mixed[i] for i in range(0, 72, 9)])
    assert batch["text"].shape == (8, fit) and batch["text_targets"].shape == (8, fit)
    ev_seed = InstructionDataset(roots["seed"], "test", tok)
    ev_hmc = InstructionDataset(roots["hmc"], "test", tok)
    assert "text_targets" not in ev_seed[0]
    with pytest.raises(ValueError, match="one task"):
        collate_instructions([ev_seed[0], ev_hmc[0]])
    with pytest.raises(FileNotFoundError, match="TUAB"):
        find_task_datasets(built, ["tuab"])
    with pytest.raises(IndexError):
        ev_seed[len(ev_seed)]


def test_gpt2_style_folder_with_vocab_and_merges(tmp_path):
    "GPT-2 ships vocab.json + merges.txt with <|endoftext|> in the vocabulary; the tiny BPE written that way must agree."
    tiny = load_text_tokenizer("tiny")
    tiny.tokenizer.model.save(str(tmp_path))
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    vocab["<|endoftext|>"] = tiny.eot_id
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    gpt2_like = load_text_tokenizer(tmp_path)
    assert gpt2_like.eot_id == tiny.eot_id
    for task in INSTRUCTION_TASKS.values():
        text = task.text(1)
        assert gpt2_like.encode(text) == tiny.encode(text)
        assert gpt2_like.decode(gpt2_like.encode(text)) == text
