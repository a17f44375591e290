"""Tests of `neurolm_nb.bench` (nbs/52_bench.ipynb): the FLOP counts, tiny measurements of the stage-2 (LLM) and
stage-1 (tokenizer) steps and the command line. No timing is asserted: only that a tiny run gives sane numbers
under the documented keys, quickly."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from neurolm_nb.bench import (BenchConfig, TokenizerBenchConfig, bench_batch, bench_kind, bench_model,
                              default_configs, format_loss_check, format_table, loss_check, main, measure,
                              measure_tokenizer, model_flops, peak_tflops_for, reference_config, run_benchmarks,
                              run_loss_check, tokenizer_bench_batch, tokenizer_bench_model, tokenizer_configs,
                              tokenizer_flops, tokenizer_step_loss)

TINY = dict(layers=1, width=64, heads=2, encoder_layers=1, encoder_width=64, encoder_heads=2, seq=64, channels=16,
            batch=1, n_codes=256, text_vocab=500, steps=2, warmup=1)
TINY_TOKENIZER = dict(encoder_layers=1, decoder_layers=1, encoder_width=32, encoder_heads=2, code_dim=8, n_codes=64,
                      seq=64, channels=16, batch=2, text_vocab=100, text_batch=2, text_block=16, steps=2, warmup=1)
KEYS = {"name", "config", "device_name", "step_s", "tokens_per_s", "peak_mem_mb", "mem_kind", "flops_per_step",
        "flops_by_part", "achieved_tflops", "peak_tflops", "mfu", "trainable_params", "frozen_params", "loss"}


ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest on a shared CI machine


def test_flop_count_matches_pytorchs_counter():
    cfg = BenchConfig(**{**TINY, "attn_impl": "naive", "seq": 128})
    model = bench_model(cfg)
    with FlopCounterMode(display=False) as counter:
        model(**bench_batch(cfg, model.config.vocab), supervised_only=True).loss.backward()
    ours = model_flops(cfg)
    encoder_attention = 4 * cfg.encoder_layers * cfg.seq * cfg.encoder_width * cfg.seq * cfg.batch  # fused SDPA: uncounted
    assert abs((ours["total"] - encoder_attention) / counter.get_total_flops() - 1) < 0.01
    assert ours["total"] == pytest.approx(sum(v for k, v in ours.items() if k != "total"))


def test_tiny_measurement_has_sane_numbers():
    cfg = BenchConfig(**TINY)
    r = measure(cfg, peak_tflops=2.0)
    assert KEYS <= set(r)
    assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and len(r["step_s_all"]) == cfg.steps
    assert r["tokens_per_s"] == pytest.approx(cfg.batch * cfg.seq / r["step_s"])
    assert r["peak_mem_mb"] > 10 and torch.isfinite(torch.tensor(r["loss"]))
    assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 2.0) and 0 < r["mfu"] < 1
    assert r["frozen_params"] > 0 and r["trainable_params"] > 0
    first_step = dataclasses.replace(cfg, steps=1, warmup=0)  # the loss before any update
    naive, sdpa = measure(dataclasses.replace(first_step, attn_impl="naive")), measure(first_step)
    assert naive["mfu"] is None                                  # no known peak for a CPU
    assert naive["loss"] == pytest.approx(sdpa["loss"], rel=1e-5)  # the same model, batch and loss either way


def test_configs_peaks_and_table():
    assert [c.name for c in default_configs("cpu")] == ["naive/float32", "sdpa/float32"]
    gpu = default_configs("cuda")
    assert [c.name for c in gpu] == ["sdpa/bf16", "flex/bf16"] and gpu[0].batch == 8
    assert peak_tflops_for("NVIDIA H100 80GB HBM3", "bf16") == peak_tflops_for("NVIDIA H200", "bf16") == 989.0
    assert peak_tflops_for("NVIDIA H100", "float32") is None
    with pytest.raises(ValueError, match="seconds"):
        BenchConfig(seq=100)
    failed = run_benchmarks([BenchConfig(**{**TINY, "device": "cuda:99"})], isolate=False)  # recorded, not raised
    if not torch.cuda.is_available():
        assert "error" in failed[0] and "CUDA" in failed[0]["error"]
    table = format_table(failed)
    assert table.splitlines()[0].startswith("name") and len(table.splitlines()) == 3


def test_command_line_runs_each_configuration_in_its_own_process(tmp_path):
    out = tmp_path / "bench.json"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k not in ("n_codes", "text_vocab")]
    proc = subprocess.run([sys.executable, "-m", "neurolm_nb.bench", "--device", "cpu", "--threads", "1",
                           "--json", str(out), *flags], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["name", "device", "batch×seq"] and "naive/float32" in lines[2]
    report = json.loads(lines[-1])
    assert report == json.loads(out.read_text())
    names = [r["name"] for r in report["results"]]
    assert names == ["naive/float32", "sdpa/float32"]
    for r in report["results"]:
        assert KEYS <= set(r) and r["tokens_per_s"] > 0 and r["config"]["layers"] == 1 and r["config"]["seq"] == 64


TOKENIZER_KEYS = KEYS | {"model", "patches_per_s", "losses", "text_tokens_per_step", "step_s_all", "threads"}
STAGE1_TERMS = {"commitment", "rec_freq", "rec_raw"}


def test_tokenizer_flop_count_matches_pytorchs_counter():
    for text in (True, False):
        cfg = TokenizerBenchConfig(**{**TINY_TOKENIZER, "text": text})
        model = tokenizer_bench_model(cfg).train()
        with FlopCounterMode(display=False) as counter:
            tokenizer_step_loss(model, tokenizer_bench_batch(cfg)).loss.backward()
        ours = tokenizer_flops(cfg)
        # the fused attention is invisible to the counter on a CPU: compare the rest
        assert abs((ours["total"] - ours["attention"]) / counter.get_total_flops() - 1) < 0.01, text
        assert ours["total"] == pytest.approx(sum(v for k, v in ours.items() if k != "total"))
        assert (ours["domain_classifier"] > 0) == text
    full = tokenizer_flops(TokenizerBenchConfig())  # NeuroLM's full width: about 1.07 GFLOP per patch
    assert 1.0e9 < full["total"] / 1024 < 1.15e9


def test_tiny_tokenizer_step_runs_and_reports_sane_keys():
    cfg = TokenizerBenchConfig(**TINY_TOKENIZER)
    assert cfg.name == "vq+text/float32" and bench_kind(cfg) == "tokenizer"
    r = measure_tokenizer(cfg, peak_tflops=2.0)
    assert TOKENIZER_KEYS <= set(r) and r["model"] == "tokenizer"
    assert r["patches_per_s"] > 0 and r["patches_per_s"] == r["tokens_per_s"] == pytest.approx(
        cfg.batch * cfg.seq / r["step_s"])
    assert len(r["step_s_all"]) == cfg.steps and r["peak_mem_mb"] > 10
    assert set(r["losses"]) == STAGE1_TERMS | {"domain_eeg", "domain_text"}
    assert r["loss"] == pytest.approx(sum(r["losses"].values()), rel=1e-5) and all(
        torch.isfinite(torch.tensor(v)) for v in r["losses"].values())
    assert r["text_tokens_per_step"] == 2 * 16 and r["frozen_params"] == 100 * 32  # only the text table is frozen
    assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 2.0) and 0 < r["mfu"] < 1
    assert r["config"]["encoder_width"] == 32 and r["flops_per_step"] == tokenizer_flops(cfg)["total"]
    plain = measure_tokenizer(dataclasses.replace(cfg, text=False, steps=1, warmup=0))
    assert plain["name"] == "vq/float32" and set(plain["losses"]) == STAGE1_TERMS
    assert plain["frozen_params"] == 0 and plain["text_tokens_per_step"] == 0
    assert plain["trainable_params"] < r["trainable_params"]  # no domain classifier


def test_tokenizer_configs_and_validation():
    cpu = tokenizer_configs("cpu")
    assert [c.name for c in cpu] == ["vq+text/float32"]
    full = cpu[0].vq_config()
    assert (full.dim, full.encoder_depth, full.decoder_depth, full.n_codes, full.code_dim) == (768, 12, 4, 8192, 128)
    assert not full.kmeans_init and full.text_vocab_size == 50257
    gpu = tokenizer_configs("cuda", text=False)
    assert [c.name for c in gpu] == ["vq/bf16"] and gpu[0].batch == 8
    with pytest.raises(ValueError, match="seconds"):
        TokenizerBenchConfig(seq=1000)
    with pytest.raises(ValueError, match="64"):
        TokenizerBenchConfig(seq=16 * 65)
    with pytest.raises(ValueError, match="n_heads"):
        TokenizerBenchConfig(encoder_width=100)
    with pytest.raises(ValueError, match="dtype"):
        TokenizerBenchConfig(dtype="float8")
    failed = run_benchmarks([TokenizerBenchConfig(**{**TINY_TOKENIZER, "device": "cuda:99"})], isolate=False)
    if not torch.cuda.is_available():
        assert "error" in failed[0] and failed[0]["model"] == "tokenizer"
        assert "dec 2×1" in format_table(failed).splitlines()[-1]


def test_command_line_flags_belong_to_their_model(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", "tokenizer", "--layers", "2"])
    assert e.value.code == 2 and "--layers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "lm", "--decoder-layers", "1"])
    assert "--decoder-layers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "lm", "--no-text"])
    assert "--no-text" in capsys.readouterr().err


def test_command_line_model_all_in_process(capsys):
    code = main(["--model", "all", "--device", "cpu", "--no-isolate", "--impls", "sdpa", "--layers", "1",
                 "--width", "32", "--heads", "2", "--encoder-layers", "1", "--encoder-width", "32",
                 "--encoder-heads", "2", "--decoder-layers", "1", "--seq", "32", "--batch", "1", "--steps", "1",
                 "--warmup", "0", "--text-batch", "1", "--text-block", "8"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["name"] for r in report["results"]] == ["sdpa/float32", "vq+text/float32"]
    lm_row, tokenizer_row = report["results"]
    assert lm_row["model"] == "lm" and tokenizer_row["model"] == "tokenizer"
    assert tokenizer_row["config"]["seq"] == 32 and tokenizer_row["config"]["decoder_layers"] == 1
    assert tokenizer_row["text_tokens_per_step"] == 8 and tokenizer_row["patches_per_s"] > 0


def test_command_line_tokenizer_in_its_own_process(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "neurolm_nb.bench", "--model", "tokenizer", "--device", "cpu",
                           "--threads", "1", "--json", str(out), "--batch", "2", "--seq", "32", "--encoder-layers",
                           "1", "--encoder-width", "32", "--encoder-heads", "2", "--decoder-layers", "1",
                           "--no-text", "--steps", "2", "--warmup", "1"],
                          capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert "vq/float32" in lines[2] and "2×32" in lines[2]
    report = json.loads(lines[-1])
    assert report == json.loads(out.read_text())
    (r,) = report["results"]
    assert TOKENIZER_KEYS <= set(r) and r["threads"] == 1 and r["mem_kind"] == "cpu peak rss (process)"
    assert r["config"]["text"] is False and set(r["losses"]) == STAGE1_TERMS and r["peak_mem_mb"] > 10


# ---------------------------------------------------------------- the loss check and tools/gpu_check.sh

def test_loss_check_against_the_float32_reference():
    cfgs = [BenchConfig(**{**TINY, "attn_impl": impl, "dtype": "bf16", "steps": 1, "warmup": 1})
            for impl in ("naive", "sdpa")]
    refs = {reference_config(c).name for c in cfgs}
    assert refs == {"sdpa/float32"} and reference_config(cfgs[0]).steps == 1  # same steps: same updates
    results = run_benchmarks(cfgs, isolate=False)
    rows = run_loss_check(cfgs, results, rtol=1e-2, isolate=False)
    assert [r["name"] for r in rows] == ["naive/bf16", "sdpa/bf16"] and all(r["ok"] for r in rows), rows
    assert all(0 < r["rel_diff_first"] < 1e-2 for r in rows)  # bf16 differs a little, and within the tolerance
    assert all(r["first_loss"] != r["loss"] for r in results)  # the last step comes after an update
    strict = loss_check(results, [results[1], results[1]], rtol=0.0)
    assert [r["ok"] for r in strict] == [False, True]
    nan = loss_check([{**results[0], "loss": float("nan")}], [results[0]])
    assert nan[0]["ok"] is False and "FAILED" in format_loss_check(nan)
    tok = TokenizerBenchConfig(**{**TINY_TOKENIZER, "dtype": "bf16"})
    assert reference_config(tok).dtype == "float32" and reference_config(tok).text == tok.text


def test_peak_table_prefers_the_specific_name():
    assert peak_tflops_for("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops_for("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_tflops_for("NVIDIA L40S", "bf16") == 362.0 and peak_tflops_for("NVIDIA L4", "bf16") == 121.0
    assert peak_tflops_for("Some Future GPU", "bf16") is None  # fallback: --peak-tflops / NEUROLM_PEAK_TFLOPS


GPU_CHECK = ROOT / "tools" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="tools/gpu_check.sh needs bash")
def test_gpu_check_dry_run_runs_every_stage_on_the_cpu(tmp_path):
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(GPU_CHECK), "--dry-run"], capture_output=True, text=True, timeout=900, env=env)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "DRY RUN" in out and "pytest -m gpu" in out
    for stage in ("1 gpu tests: ok", "2 stage-2 step (bf16): ok", "3 tokenizer step (bf16): ok"):
        assert stage in out, stage
    assert out.count("rtol 1e-02: ok") == 3  # sdpa and naive (the CPU's stand-in for flex), and the tokenizer
    assert '{"results"' not in out            # the JSON goes to files, not the log
    lm = json.loads((tmp_path / "lm.json").read_text())
    assert [r["name"] for r in lm["results"]] == ["sdpa/bf16", "naive/bf16"]
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0 and "mfu" in r for r in lm["results"])
    assert all(c["ok"] for c in lm["loss_check"])
    tok = json.loads((tmp_path / "tokenizer.json").read_text())
    assert tok["results"][0]["name"] == "vq+text/bf16" and tok["loss_check"][0]["ok"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="tools/gpu_check.sh needs bash")
def test_gpu_check_fails_clearly_without_cuda(tmp_path):
    if shutil.which("nvidia-smi") and torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU")
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1
    assert "FAILED" in proc.stderr and ("nvidia-smi" in proc.stderr or "torch.cuda.is_available()" in proc.stderr)
    assert "--dry-run" in proc.stderr or "torch.cuda.is_available()" in proc.stderr
    assert "===" not in proc.stdout  # no stage started


# a 1-layer, 32-wide stage-2 model on the command line, timed in this process for one step
TINY_CLI = ["--device", "cpu", "--no-isolate", "--layers", "1", "--width", "32", "--heads", "2", "--encoder-layers", "1",
            "--encoder-width", "32", "--encoder-heads", "2", "--seq", "32", "--steps", "1", "--warmup", "0"]

def test_optimizer_impl_reaches_the_step_and_the_ratio_is_reported(capsys):
    from neurolm_nb.bench import format_optimizers, measure_optimizers
    with pytest.raises(ValueError, match="optimizer_impl"):
        BenchConfig(**TINY, optimizer_impl="apex")
    plain = measure(BenchConfig(**TINY, optimizer_impl="plain"))
    fused = measure(BenchConfig(**TINY))  # the default: 'auto', fused on a CPU with torch >= 2.4
    assert (plain["optimizer"], fused["optimizer"]) == ("plain", "fused")
    assert plain["name"].endswith("+plainAdamW") and fused["name"] == "sdpa/float32"
    assert plain["first_loss"] == pytest.approx(fused["first_loss"], rel=1e-6)  # same model and batch
    cmp = measure_optimizers(BenchConfig(**TINY), ("plain", "auto"))
    assert cmp["kernel"] == {"plain": "plain", "auto": "fused"} and cmp["ratio"]["auto"] > 0
    assert all(len(v) == TINY["steps"] for v in cmp["step_s_all"].values())
    assert all(cmp["optimizer_s"][i] < cmp["step_s"][i] for i in cmp["step_s"])
    assert "step time, plain AdamW / auto (fused) AdamW" in format_optimizers(cmp)
    flags = TINY_CLI
    assert main(flags + ["--optimizers", "plain", "auto"]) == 0
    out = capsys.readouterr().out
    assert "step time, plain AdamW / auto (fused) AdamW" in out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["optimizers"]["kernel"] == {"plain": "plain", "auto": "fused"} and report["results"] == []


def test_stage2_against_the_official_step_same_loss_less_work():
    from neurolm_nb.bench import STAGE2_PARTS, format_stage2, measure_stage2, official_loss, our_loss, stage2_setup
    cfg = BenchConfig(**TINY)
    tokenizer, model, batch = stage2_setup(cfg, text_windows=2)
    assert batch["text"].shape == (2, cfg.seq) and model.lm.encoder is not tokenizer.encoder
    # a padded sample: the last second is padding (pad channel row, time 0), as the collate writes it
    C = cfg.channels
    batch["input_mask"][:, -C:] = False
    batch["input_chans"][:, -C:] = 136
    batch["input_time"][:, -C:] = 0
    calls = []
    with torch.no_grad():
        official = official_loss(tokenizer, model, batch, calls.append)
        ours = our_loss(tokenizer, model, batch, calls.append)
        whole = model(batch)["loss"]
    assert calls == ["targets", "encoder", "forward", "encoder", "forward"]
    assert ours.item() == pytest.approx(official.item(), rel=1e-5)  # the fixtures' loss tolerance
    assert ours.item() == pytest.approx(whole.item(), rel=1e-6)     # our_loss is PretrainModel.forward
    res = measure_stage2(cfg, text_windows=1)
    assert res["loss_ok"] and res["kernel"] == {"official": "plain", "ours": "fused"}
    assert all(len(v) == cfg.steps for v in res["step_s_all"].values()) and res["ratio"] > 0 < res["ratio_cpu"]
    # two timed steps: each median is a mean, so the step's median is the sum of the parts' medians
    assert all(res["step_cpu_s"][k] == pytest.approx(sum(res["parts_cpu_s"][k].values()), rel=1e-9) for k in res["step_s"])
    assert list(res["parts_s"]["ours"]) == list(STAGE2_PARTS) and res["parts_s"]["ours"]["targets"] == 0.0
    assert res["parts_s"]["official"]["targets"] > 0
    assert "official / ours" in format_stage2(res) and "(relative difference" in format_stage2(res)


def test_command_line_vs_official(capsys):
    flags = TINY_CLI
    assert main(flags + ["--vs-official", "--text-windows", "1"]) == 0
    out = capsys.readouterr().out
    assert "stage-2 step time, official / ours" in out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["stage2"]["text_windows"] == 1 and report["stage2"]["loss_ok"] and report["results"] == []
    for bad, named in ((["--text-windows", "2"], "--text-windows applies to --vs-official"),
                       (["--model", "tokenizer", "--vs-official"], "--vs-official apply to --model lm")):
        with pytest.raises(SystemExit) as e:
            main(["--device", "cpu"] + bad)
        assert e.value.code == 2 and named in capsys.readouterr().err
