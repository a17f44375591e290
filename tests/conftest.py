"""Shared pytest fixtures: where the repository, its notebooks and the data beside it live.

Fixtures that need `../shared` (real EEGMAT recordings, official reference tensors) skip the test with
a reason naming what is missing, so the suite still runs in a checkout without it.
"""
import functools
import os
from pathlib import Path

import pytest

# Headless and quiet everywhere: notebooks and tests plot with Agg, and nbdev's IN_TEST switch
# (which turns nbdev_export into a no-op) must never leak into the subprocesses the tests start.
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.pop("IN_TEST", None)

# NEUROLM_TEST_THREADS=N runs the whole suite with N torch threads (to show that parity holds with 1 and 2).
if os.environ.get("NEUROLM_TEST_THREADS"):
    import torch
    torch.set_num_threads(int(os.environ["NEUROLM_TEST_THREADS"]))

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    "The repository root (the folder holding settings.ini)."
    return ROOT


@pytest.fixture(scope="session")
def nbs_dir(repo_root) -> Path:
    "The notebooks, source of truth of the package."
    return repo_root / "nbs"


@pytest.fixture(scope="session")
def profiles_dir(repo_root) -> Path:
    return repo_root / "profiles"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    "`../shared` beside the checkout (or $NEUROLM_SHARED); skips the test when absent."
    from neurolm_nb.core import shared_dir as find_shared
    found = find_shared()
    if found is None:
        pytest.skip("no shared/ folder beside the checkout (and NEUROLM_SHARED is not set): "
                    "real EEGMAT data and official fixtures are unavailable")
    return found


@pytest.fixture(scope="session")
def eegmat_dir(shared_dir) -> Path:
    "The real PhysioNet EEGMAT recordings (subjects 02-21); skips the test when absent."
    d = shared_dir / "data" / "eegmat"
    if not d.is_dir() or not any(d.glob("Subject*_*.edf")):
        pytest.skip(f"EEGMAT recordings not found in {d}")
    return d


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir) -> Path:
    "Reference tensors from the official NeuroLM / LaBraM code; skips the test when absent."
    d = shared_dir / "fixtures" / "official"
    if not d.is_dir() or not any(d.glob("*.safetensors")):
        pytest.skip(f"official fixtures not found in {d}")
    return d


@pytest.fixture(scope="module")
def one_thread():
    "Run a module's tests with one torch thread (tiny tensors; the CI machine's 2 cores are shared)."
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def _official_tensors(path: str) -> dict:
    from safetensors.torch import load_file
    return load_file(path)


def load_official(fixtures_dir: Path, name: str) -> dict:
    "Tensors of an official fixture file, loaded once per session (do not modify them); skips if absent."
    path = fixtures_dir / name
    if not path.exists():
        pytest.skip(f"official fixture {path} not found")
    return _official_tensors(str(path))


# ---------------------------------------------------------------- a tiny random NeuroLM shared by the model tests
def layout(n_channels, n_seconds, length):
    "input_time / input_mask of one time-major sample of C·A real tokens padded to `length`."
    import torch
    n = n_channels * n_seconds
    time = torch.zeros(length, dtype=torch.long)
    time[:n] = torch.arange(n) // n_channels
    return time, torch.arange(length) < n


def tiny_neurolm():
    "(tokenizer, model, batch): a seeded tiny NeuroLM in eval mode and a padded two-sample batch (5×3 and 3×6 tokens)."
    import torch
    from neurolm_nb.gpt import GPT, GPTConfig
    from neurolm_nb.neurolm import NeuroLM, NeuroLMConfig
    from neurolm_nb.vq import VQTokenizer
    torch.manual_seed(0)
    tokenizer = VQTokenizer(NeuroLMConfig.tiny().tokenizer).eval()
    model = NeuroLM.from_parts(tokenizer, GPT(GPTConfig.tiny(n_embd=48, n_head=2, vocab_size=512, block_size=256)),
                               seed=0).eval()
    (t1, r1), (t2, r2) = layout(5, 3, 24), layout(3, 6, 24)
    time, real = torch.stack([t1, t2]), torch.stack([r1, r2])
    chans = torch.where(real, torch.arange(24) % 7, torch.full_like(time, 136))
    batch = {"X": torch.randn(2, 24, 200) * real[..., None], "input_chans": chans, "input_time": time, "input_mask": real}
    return tokenizer, model, batch
