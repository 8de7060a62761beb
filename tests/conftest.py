"""Shared fixtures: tiny random-weight transformers models saved in the HF layout, and a
word-level tokenizer matching their vocabulary. Nothing is downloaded."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from emergence.tokenizer import Tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOCAB = 96


def bench_module(name: str):
    """bench/NAME.py as a module (bench/ on the path for its own imports, provenance and the like)."""
    import importlib.util
    import sys

    folder = Path(__file__).resolve().parents[1] / "bench"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shared_files(subfolder: str, pattern: str) -> list[Path]:
    """Files of the shared data set (../shared/data, beside the checkout), to parametrise a test
    over. When none is found, one path that does not exist stands in, named for what is
    missing: the test then fails, saying so, where an empty parametrisation would be skipped."""
    found = sorted((SHARED_DATA / subfolder).glob(pattern))
    return found or [SHARED_DATA / subfolder / f"MISSING-no-{pattern}-in-the-shared-data"]


def tiny_hf_configs() -> dict:
    """One tiny config per family/feature the issue names. initializer_range is raised so that
    logits are peaked and greedy decoding has clear winners (no float near-ties)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256, initializer_range=0.2,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {
        "gpt2": tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                              initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        "llama": tf.LlamaConfig(**common, num_key_value_heads=2, rope_theta=500000.0,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        "mistral": tf.MistralConfig(**common, num_key_value_heads=2, sliding_window=8),
        "qwen2": tf.Qwen2Config(**common, num_key_value_heads=1, tie_word_embeddings=True),
    }


_CACHE: dict[str, tuple] = {}


def make_hf_model(family: str, folder: Path):
    """A tiny random transformers model of `family`, saved to `folder`; returns the HF model."""
    return save_random_hf(tiny_hf_configs()[family], {"gpt2": 1, "llama": 2, "mistral": 3, "qwen2": 4}[family], folder)


def save_random_hf(config, seed: int, folder: Path):
    """A random transformers model of `config` (seeded), saved to `folder` with the word-level
    tokenizer; returns the model."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    word_level_tokenizer().save(folder)
    return model


@pytest.fixture(scope="session", params=["gpt2", "llama", "mistral", "qwen2"])
def hf_model(request, tmp_path_factory):
    """(family, transformers model, folder with its HF-layout checkpoint and a tokenizer)."""
    family = request.param
    if family not in _CACHE:
        folder = tmp_path_factory.mktemp(family)
        _CACHE[family] = (family, make_hf_model(family, folder), folder)
    return _CACHE[family]


def word_level_tokenizer() -> Tokenizer:
    """Tokens "t0".."t95", whitespace separated: ids map 1:1 to the tiny models' vocabulary."""
    vocab = {f"t{i}": i for i in range(VOCAB)}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="t3"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend, bos_token="t1", eos_token="t2", pad_token="t0")


def assert_as_exact_as_peft(ours: torch.Tensor, theirs: torch.Tensor, peft_model, ids: torch.Tensor) -> None:
    """Our fp32 logits against peft's fp32 logits `theirs` (peft_model(ids)): no farther from the
    truth, peft's own forward in float64, than twice peft's own fp32 logits are (or 1e-5). A fixed
    bound between the two fp32 results sits at fp32's rounding noise, which moves with the CPU's
    BLAS kernels: on some machines peft's own fp32 logits are farther than 1e-5 from float64's."""
    import copy

    with torch.no_grad():
        truth = copy.deepcopy(peft_model).double()(ids).logits
    theirs_error = (theirs.double() - truth).abs().max().item()
    ours_error = (ours.double() - truth).abs().max().item()
    assert ours_error <= max(2 * theirs_error, 1e-5), (ours_error, theirs_error)


def until(condition, timeout: float = 30) -> None:
    """Wait for condition() (another thread makes it true), failing after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def in_threads(work, count: int, timeout: float = 120) -> None:
    """Run work(k) for k in range(count), each in its own thread, at once; re-raise the first
    exception any of them raised (an assertion in a thread would otherwise pass unseen)."""
    import threading

    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            work(k)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), f"a thread was still running after {timeout} s"
    if errors:
        raise errors[0]


# ------------------------------------------------------------ bad-input guards
class TooSlow(BaseException):
    """Raised from a timer signal: a BaseException so that no `except Exception` hides it."""


@contextlib.contextmanager
def bounded(seconds: float = 5.0, max_new_rss_mb: int = 512):
    """Fail if the block runs longer than `seconds` or raises the process' peak RSS by more
    than `max_new_rss_mb` (a huge allocation); a hang is interrupted by SIGALRM."""

    def on_alarm(signum, frame):
        raise TooSlow(f"took more than {seconds}s: a hang or an unbounded allocation")

    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
        assert grown_mb <= max_new_rss_mb, f"peak memory grew by {grown_mb:.0f} MiB"


@pytest.fixture
def fp32_products():
    """The eager forward's int4 / NF4 products in fp32, as the native step's GEMV computes them
    (where the CPU has AVX512-BF16 they are bf16 otherwise: kernels.BF16_FORMATS, tested on its
    own in test_kernels.py's test_bf16_prompt_products_stay_far_below_the_4bit_weights_own_error)."""
    import emergence.kernels

    with emergence.kernels.fp32_products():
        yield


@pytest.fixture
def one_thread():
    """torch on one thread: small models run fastest so, and immune to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------ the command line, in-process
def cli_main(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `emergence ARGV` run in this process."""
    from emergence.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *patterns: str) -> str:
    """Bad input's contract: exit status 1, one 'emergence: error:' line matching the patterns."""
    import re

    assert "Traceback" not in err, err
    assert code == 1, f"exit status {code}, stderr {err!r}"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("emergence: error: "), err
    for pattern in patterns:
        assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"
    return lines[0]


@contextlib.contextmanager
def kernel_setting(name: str, value: bool) -> Iterator[bool]:
    """Within it, the native kernels' switch `name` (one_row_streams, onednn_products) set to
    `value` (set_NAME), the CPU's own choice restored after; nothing to switch without them."""
    from emergence.kernels import gemv_extension

    ext = gemv_extension()
    if ext is None:
        yield value
        return
    chosen = getattr(ext, name)()
    getattr(ext, f"set_{name}")(value)
    try:
        yield value
    finally:
        getattr(ext, f"set_{name}")(chosen)


@pytest.fixture(params=[False, True], ids=["blas", "onednn"])
def onednn(request):
    """Both ways the native kernels' fp32 prompt products run (kernels/blas.h: oneDNN on AMD
    CPUs, torch's BLAS elsewhere), each tested on every CPU (`parametrize("onednn", [False],
    indirect=True)` for one side)."""
    with kernel_setting("onednn_products", request.param) as value:
        yield value
