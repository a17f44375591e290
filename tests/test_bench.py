"""Tests of `neurolm_nb.bench` (nbs/52_bench.ipynb): the FLOP count, a tiny measurement and the command line.
No timing is asserted: only that a tiny run gives sane numbers under the documented keys, quickly."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from neurolm_nb.bench import (BenchConfig, bench_batch, bench_model, default_configs, format_table, measure,
                              model_flops, peak_tflops_for, run_benchmarks)

TINY = dict(layers=1, width=64, heads=2, encoder_layers=1, encoder_width=64, encoder_heads=2, seq=64, channels=16,
            batch=1, n_codes=256, text_vocab=500, steps=2, warmup=1)
KEYS = {"name", "config", "device_name", "step_s", "tokens_per_s", "peak_mem_mb", "mem_kind", "flops_per_step",
        "flops_by_part", "achieved_tflops", "peak_tflops", "mfu", "trainable_params", "frozen_params", "loss"}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
