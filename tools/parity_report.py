"""Largest difference from the official reference tensors, fixture by fixture, on this machine and torch.

Developer tool (not part of the package): `python tools/parity_report.py [--threads 1 2]` prints one JSON
line per thread count: torch version, CPU, and for each fixture the largest |ours - official| over its float
outputs (indices and ids are compared exactly and reported as mismatches). Tolerances: chapter 45.
"""
import argparse
import json
import platform

import numpy as np
import torch


def _worst(report: dict) -> dict:
    floats = {k: r["max_abs_diff"] for k, r in report.items() if r.get("max_abs_diff") is not None}
    bad = sorted(k for k, r in report.items() if not r.get("ok", True))
    name = max(floats, key=floats.get) if floats else None
    return {"max_abs_diff": floats.get(name), "where": name, "outside_tolerance": bad}


def measure() -> dict:
    from neurolm_nb.convert import (load_official_labram_classifier, load_official_labram_mem,
                                    load_official_labram_vqnsp, load_official_neurolm_lm,
                                    load_official_neurolm_tokenizer)
    from neurolm_nb.targets import labram_targets, neurolm_targets
    from neurolm_nb.testing import (compare_labram_base, compare_with_fixture, fixture_state_dict,
                                    labram_base_fixture_checkpoint, labram_base_fixture_outputs, labram_fixture_outputs,
                                    lm_fixture_state_dict, load_fixture, max_abs_diff, neurolm_fixture_outputs,
                                    neurolm_lm_fixture_outputs)
    out = {}
    vq = load_fixture("neurolm_vq_tiny")
    t = neurolm_targets(vq["input.X"], vq["input.input_mask"])
    out["targets (neurolm_vq_tiny Y_freq / Y_raw)"] = {k: max_abs_diff(t[k], vq["input." + k]) for k in ("Y_freq", "Y_raw")}
    model = load_official_neurolm_tokenizer(fixture_state_dict("neurolm_vq_tiny", vq), original_padding=True).eval()
    out["neurolm_vq_tiny"] = _worst(compare_with_fixture(neurolm_fixture_outputs(model, vq), vq))
    ns = load_fixture("labram_vqnsp")
    out["labram_vqnsp amplitude target"] = max_abs_diff(labram_targets(ns["input.x"])["amplitude"],
                                                         ns["output.amplitude_target"])
    model = load_official_labram_vqnsp(fixture_state_dict("labram_vqnsp", ns)).eval()
    out["labram_vqnsp"] = _worst(compare_with_fixture(labram_fixture_outputs(model, ns), ns))
    lm = load_fixture("neurolm_lm_tiny")
    model = load_official_neurolm_lm(lm_fixture_state_dict(lm, vq), n_head=2).eval()
    out["neurolm_lm_tiny"] = _worst(compare_with_fixture(neurolm_lm_fixture_outputs(model, lm), lm))
    base = load_fixture("labram_base")
    mem = load_official_labram_mem(labram_base_fixture_checkpoint(base)).eval()
    clf = load_official_labram_classifier(labram_base_fixture_checkpoint(base), n_classes=1)
    clf.load_state_dict({k[len("weights.finetune_extra."):]: v.float() for k, v in base.items()
                         if k.startswith("weights.finetune_extra.")}, strict=False)
    out["labram_base"] = _worst(compare_labram_base(labram_base_fixture_outputs(mem, clf.eval(), base), base))
    from neurolm_nb.core import shared_dir
    from neurolm_nb.datasets import WORKLOAD_CHANNELS
    from neurolm_nb.io import load_recording, sliding_windows
    ww, eegmat = load_fixture("workload_windows"), shared_dir() / "data" / "eegmat"
    out["workload_windows (µV)"] = max(
        max_abs_diff(sliding_windows(load_recording(eegmat / f"{s}.edf", channels=WORKLOAD_CHANNELS, notch=50.0)
                                     .last(60.0).data, 800, 400).astype(np.float32), ww[f"{s.lower()}.windows_uV"])
        for s in ("Subject02_1", "Subject02_2"))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    for n in args.threads:
        torch.set_num_threads(n)
        print(json.dumps({"torch": torch.__version__, "numpy": np.__version__, "threads": n,
                          "cpu": platform.processor() or platform.machine(), "fixtures": measure()}, default=str))


if __name__ == "__main__":
    main()
