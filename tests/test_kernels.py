"""The native kernels: the GEMV, GEMM and packed-weight row kernels against exact products,
and the native backend of a decode batch (decode.cpp's one-call forward over the paged KV
cache) against the eager backend (the model's own forward over a CacheView), for every
family, dtype and quantized format.

Where the CPU lacks AVX-512 the kernels cannot be built: the `ext` fixture then checks that
they are reported unavailable and that decoding falls back to the eager backend with the same
output, and the native side of every parity test is that fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import emergence
from conftest import in_threads, kernel_setting
from emergence.decode import DecodeBatch, end_ids, make_backend, new_row
from emergence.quant.linear import GGML_KERNEL_FORMATS, has_ggml_kernel
from emergence.errors import InvalidArgument
from emergence.kernels import _cpu_flags, _cpu_supports, gemv_extension
from emergence.kv_cache import PagedKVCache
from emergence.sampling import SamplingParams

EXT = gemv_extension()
NATIVE = "native" if EXT is not None else "eager"  # the backend under test: the fallback where no kernels


@pytest.fixture
def ext():
    """The extension; where the CPU cannot run it, the fallback is checked instead (and None returned)."""
    if EXT is None:
        assert not _cpu_supports(), "this CPU has AVX-512 but the kernels did not build"
        lm = emergence.load(device="cpu")
        cache = PagedKVCache(lm.config, 4)
        assert make_backend(lm.model, cache, "auto").name == "eager"
        with pytest.raises(InvalidArgument, match="native kernels are not available"):
            make_backend(lm.model, cache, "native")
        assert lm.generate("Once", temperature=0, max_new_tokens=8) == emergence.load(
            device="cpu", backend="eager").generate("Once", temperature=0, max_new_tokens=8)
    return EXT


@pytest.fixture(params=[False, True], ids=["rows-side-by-side", "one-row-at-a-time"])
def walk(request):
    """Both ways a GEMV walks its rows (g_one_row_streams: the CPU picks one at load), each tested
    on every CPU."""
    with kernel_setting("one_row_streams", request.param) as value:
        yield value


def test_kernels_build_on_this_machine(ext):
    # Machines with an AVX-512 CPU (this project's) must get the kernels, or the speed figures
    # in the README do not describe what users get.
    assert (ext is not None) == _cpu_supports()


@pytest.mark.parametrize("shape", [(1, 1), (7, 16), (173, 77), (960, 576), (576, 1536), (4099, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp32_gemv_matches_linear(shape, with_bias, ext):
    if ext is None:  # the fixture checked the fallback
        return
    torch.manual_seed(sum(shape))
    n, k = shape
    w, x = torch.randn(n, k), torch.randn(1, k)
    b = torch.randn(n) if with_bias else None
    expected = F.linear(x.double(), w.double(), None if b is None else b.double())[0]
    got = ext.gemv(x, w, b)
    assert got.dtype == torch.float32
    # fp32 accumulation in a different order than MKL: error bounded by k * eps * sum|w x|.
    bound = k * 2**-23 * (w.double().abs() @ x[0].double().abs() + (0 if b is None else b.double().abs()))
    assert ((got.double() - expected).abs() <= bound + 1e-12).all()


@pytest.mark.parametrize("shape", [(5, 3), (173, 77), (3072, 576), (49152, 64)])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])  # dot-product path, widening path
def test_bf16_gemv_is_the_fp32_product_rounded_once(shape, x_dtype, ext, walk):
    if ext is None:  # the fixture checked the fallback
        return
    torch.manual_seed(shape[0])
    n, k = shape
    w, x = torch.randn(n, k).bfloat16(), torch.randn(1, k).bfloat16()
    exact = (w.double() @ x[0].double())
    got = ext.gemv(x.to(x_dtype), w, None)
    assert got.dtype == torch.bfloat16
    # One rounding to bf16 (relative 2^-8) plus fp32 accumulation error.
    bound = exact.abs() * 2**-8 + k * 2**-23 * (w.double().abs() @ x[0].double().abs())
    assert ((got.double() - exact).abs() <= bound + 1e-12).all()
    # and it is at least as close to the exact product as torch's own bf16 linear
    torch_err = (F.linear(x, w)[0].double() - exact).abs().max()
    assert (got.double() - exact).abs().max() <= torch_err * 1.01 + 1e-12


@pytest.mark.parametrize("rows", [2, 3, 4, 5, 9, 16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 16), (173, 77), (768, 256), (4099, 64)])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_batched_gemm_matches_the_exact_product(rows, shape, w_dtype, ext):
    if ext is None:  # the fixture checked the fallback
        return
    # The batched step's product: tiles of 4 weight rows x 4 rows of x, with every remainder
    # (N not a multiple of 4, rows not a multiple of 4, K not a multiple of 16) exercised.
    torch.manual_seed(rows * 1000 + shape[0])
    n, k = shape
    w, x = torch.randn(n, k).to(w_dtype), torch.randn(rows, k)
    exact = x.double() @ w.double().T
    got = ext.gemm(x, w)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    bound = k * 2**-23 * (x.double().abs() @ w.double().abs().T)  # fp32 accumulation, any order
    assert ((got.double() - exact).abs() <= bound + 1e-12).all()
    if w_dtype == torch.bfloat16 and "avx512_bf16" in _cpu_flags():
        # a bf16 model's rows are bf16 too: VDPBF16PS multiplies the pairs exactly (8-bit
        # significands) and sums them in fp32, so the same bound holds for the bf16 rows' exact product
        xb = x.bfloat16()
        exact = xb.double() @ w.double().T
        got = ext.gemm(xb, w)
        bound = k * 2**-23 * (xb.double().abs() @ w.double().abs().T)
        assert got.dtype == torch.float32 and ((got.double() - exact).abs() <= bound + 1e-12).all()


def test_default_model_is_unchanged_by_the_native_backend():
    fast = emergence.load(device="cpu")
    plain = emergence.load(device="cpu", backend="eager")
    a = fast.complete("", temperature=0, max_new_tokens=120, logprobs=0)
    b = plain.complete("", temperature=0, max_new_tokens=120, logprobs=0)
    assert a.token_ids == b.token_ids
    diffs = [abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)]
    assert max(diffs) < 1e-4


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    # A build killed midway leaves torch's lock file; torch would wait on it forever.
    import os
    import time

    from emergence.kernels import STALE_LOCK_SECONDS, _build_directory

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = _build_directory("emergence_kernels_test")
    lock = folder / "lock"
    lock.write_text("")
    assert _build_directory("emergence_kernels_test") == folder and lock.exists()  # a build may be running: wait for it
    old = time.time() - STALE_LOCK_SECONDS - 1
    os.utime(lock, (old, old))
    _build_directory("emergence_kernels_test")
    assert not lock.exists()


# ------------------------------------------------- the native backend against the eager one
class Sequences:
    """Sequences of one paged KV cache extended through one backend, as a decode batch does."""

    def __init__(self, model, backend: str, n: int, capacity: int, block_size: int = 16) -> None:
        per = -(-capacity // block_size)
        self.cache = PagedKVCache(model.config, n * per, block_size=block_size, dtype=model.tok_embeddings.weight.dtype)
        self.backend = make_backend(model, self.cache, backend)
        self.tables: list[list[int]] = [[] for _ in range(n)]
        self.lengths = [0] * n

    def extend(self, rows: list[int], chunks) -> torch.Tensor:
        """Sequence rows[j] grows by chunks[j]; returns the (J, V) float32 logits of their last tokens."""
        chunks = [[int(t) for t in c] for c in chunks]
        for r, c in zip(rows, chunks):
            self.cache.grow(self.tables[r], self.lengths[r], len(c))
        out = self.backend.forward(chunks, [self.lengths[r] for r in rows], [self.tables[r] for r in rows])
        for r, c in zip(rows, chunks):
            self.lengths[r] += len(c)
        return out

    def kv(self, r: int) -> torch.Tensor:
        """Sequence r's cached keys and values, (2, n_layer, n_kv_head, length, head_dim) float32."""
        blocks = torch.tensor(self.tables[r])
        k, v = (t[:, blocks].transpose(1, 2).flatten(2, 3)[:, :, :self.lengths[r]] for t in (self.cache.k, self.cache.v))
        return torch.stack([k, v]).float()


# bf16: both backends round to bf16 after the same operations, with fp32 sums in another order,
# so neither is "the" answer. What is derived instead: each one's error against the same
# computation in fp32 (the same bf16 weights, fp32 activations), and the native backend must
# be about as accurate as the eager one: within this factor of the eager error (measured over
# every family and format here: at most 1.42).
BF16_ERROR_RATIO = 2.0


def fp32_twin(model):
    """The same weights (bf16 values, packed formats unchanged) computing in fp32."""
    import copy

    return copy.deepcopy(model).float()


def assert_native_close(native, eager, reference=None, *, fp32_tol: float = 1e-5) -> None:
    """native, eager: the same logits or caches from both backends; reference: a callable giving
    them in fp32 (bf16 models only)."""
    if reference is None:  # fp32: the same operations, fp32 sums in another order
        assert (native - eager).abs().max().item() <= fp32_tol * max(eager.abs().max().item(), 1)
        return
    ref = reference()
    native_err, eager_err = (native - ref).abs().max().item(), (eager - ref).abs().max().item()
    assert native_err <= BF16_ERROR_RATIO * eager_err + 1e-6, (native_err, eager_err)


def _steps(model, backend: str, ids: list[int], prefill: int, block_size: int = 16):
    """Prefill ids[:prefill], then one token at a time: the logits after each (float32)."""
    seqs = Sequences(model, backend, 1, len(ids), block_size)
    out = [seqs.extend([0], [ids[:prefill]])[0]] + [seqs.extend([0], [[t]])[0] for t in ids[prefill:]]
    return torch.stack(out), seqs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_step_equals_the_eager_forward(hf_model, dtype):
    # Every family's layout: GPT-2 (LayerNorm, biases, learned positions, GELU), LLaMA (GQA,
    # Llama-3 rope scaling), Mistral (a sliding window of 8, shorter than the 40 tokens), Qwen2
    # (q/k/v bias, tied head); 40 tokens span three blocks of 16.
    family, _, folder = hf_model
    lm = emergence.load(folder, device="cpu", dtype=dtype)
    torch.manual_seed(5)
    ids = torch.randint(3, 96, (40,)).tolist()
    native, native_seqs = _steps(lm.model, NATIVE, ids, 5)
    eager, eager_seqs = _steps(lm.model, "eager", ids, 5)
    bf16 = dtype == torch.bfloat16
    assert native_seqs.lengths == eager_seqs.lengths == [40]
    assert_native_close(native, eager, (lambda: _steps(fp32_twin(lm.model), "eager", ids, 5)[0]) if bf16 else None)
    assert_native_close(native_seqs.kv(0), eager_seqs.kv(0),
                        (lambda: _steps(fp32_twin(lm.model), "eager", ids, 5)[1].kv(0)) if bf16 else None,
                        fp32_tol=2e-5)


def _batched(model, backend: str, prompts: list[list[int]], steps: torch.Tensor, block_size: int):
    """Prefill `prompts` together (native for the short ones, eager for the long), then feed
    steps[:, t] to every sequence at once; returns the logits after each step (B, steps, V)."""
    B = len(prompts)
    seqs = Sequences(model, backend, B, max(map(len, prompts)) + steps.shape[1], block_size)
    seqs.extend(list(range(B)), prompts)
    out = [seqs.extend(list(range(B)), steps[:, t:t + 1].tolist()) for t in range(steps.shape[1])]
    return torch.stack(out, dim=1), seqs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_native_batched_step_equals_the_eager_forward(hf_model, dtype, block_size):
    # Five sequences of 1 to 30 tokens decoded together over blocks of 1, 5 and 16 slots: each
    # row attends over its own blocks (a run of slots split wherever a block ends), at its own
    # position; Mistral's window of 8 applies.
    family, _, folder = hf_model
    lm = emergence.load(folder, device="cpu", dtype=dtype)
    torch.manual_seed(6)
    prompts = [torch.randint(3, 96, (n,)).tolist() for n in (30, 1, 17, 4, 30)]
    steps = torch.randint(3, 96, (5, 24))
    native, native_seqs = _batched(lm.model, NATIVE, prompts, steps, block_size)
    eager, eager_seqs = _batched(lm.model, "eager", prompts, steps, block_size)
    assert native_seqs.lengths == eager_seqs.lengths == [len(p) + 24 for p in prompts]
    bf16 = dtype == torch.bfloat16
    twin = fp32_twin(lm.model) if bf16 else None
    assert_native_close(native, eager, (lambda: _batched(twin, "eager", prompts, steps, block_size)[0]) if bf16 else None)
    ref_seqs = _batched(twin, "eager", prompts, steps, block_size)[1] if bf16 else None
    for b in range(5):
        assert_native_close(native_seqs.kv(b), eager_seqs.kv(b), (lambda: ref_seqs.kv(b)) if bf16 else None,
                            fp32_tol=2e-5)
    # and each row equals that row decoded alone (one row: the GEMV path)
    for b, prompt in enumerate(prompts):
        alone, _ = _steps(lm.model, NATIVE, prompt + steps[b].tolist(), len(prompt), block_size)
        assert_native_close(native[b], alone[1:], (lambda: native[b]) if bf16 else None, fp32_tol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_prefill_equals_the_eager_forward(hf_model, dtype, onednn, monkeypatch):
    # Chunks of 2 to max_prefill tokens (64, or 16 in bf16; with oneDNN's products 1,024, or 256
    # in bf16 with AVX512-BF16, here 96 within these models' context of 256) run natively (their
    # tokens as the GEMM's rows, causal attention among them), also as a later chunk after cached
    # tokens; a chunk of max_prefill + 1 goes to the eager forward; Mistral's window of 8 applies.
    from emergence.kernels import _cpu_flags, fused_decode

    monkeypatch.setattr(fused_decode, "MAX_NATIVE_PREFILL_ONEDNN", 96)
    monkeypatch.setattr(fused_decode, "MAX_NATIVE_PREFILL_BF16_ONEDNN", 96)
    family, _, folder = hf_model
    lm = emergence.load(folder, device="cpu", dtype=dtype)
    torch.manual_seed(7)
    on_onednn = onednn and EXT is not None
    if dtype == torch.bfloat16:
        limit = fused_decode.MAX_NATIVE_PREFILL_BF16_ONEDNN if on_onednn and "avx512_bf16" in _cpu_flags() \
            else fused_decode.MAX_NATIVE_PREFILL_BF16
    else:
        limit = fused_decode.MAX_NATIVE_PREFILL_ONEDNN if on_onednn else fused_decode.MAX_NATIVE_PREFILL
    chunks = [torch.randint(3, 96, (n,)).tolist() for n in (2, 7, limit, limit + 1)]

    def run(model, backend):
        seqs = Sequences(model, backend, 1, 10 + 2 * limit)
        calls = []
        for c in chunks:
            before = getattr(seqs.backend, "native_calls", 0)
            calls.append((seqs.extend([0], [c])[0], getattr(seqs.backend, "native_calls", 0) - before))
        return torch.stack([logits for logits, _ in calls]), [n for _, n in calls], seqs

    native, native_calls, native_seqs = run(lm.model, NATIVE)
    eager, _, eager_seqs = run(lm.model, "eager")
    if EXT is not None:
        assert native_seqs.backend.max_prefill == limit
        assert native_calls == [1, 1, 1, 0]  # limit + 1: the eager forward
    bf16 = dtype == torch.bfloat16
    assert_native_close(native, eager, (lambda: run(fp32_twin(lm.model), "eager")[0]) if bf16 else None)
    assert_native_close(native_seqs.kv(0), eager_seqs.kv(0),
                        (lambda: run(fp32_twin(lm.model), "eager")[2].kv(0)) if bf16 else None, fp32_tol=2e-5)
    assert native_seqs.lengths == eager_seqs.lengths == [10 + 2 * limit]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompts_prefilled_together_equal_each_alone(hf_model, dtype):
    # A decode batch prefills the prompts that join together in one call, each in its own
    # sequence: logits and keys/values equal each prompt's own prefill (in bf16 as close to the
    # fp32 twin's: the 25 rows together may multiply on oneDNN's bf16 product, from 16 rows on
    # where the fp32 products are oneDNN's, and a 12-token prompt alone on gemm_rows).
    family, _, folder = hf_model
    lm = emergence.load(folder, device="cpu", dtype=dtype)
    torch.manual_seed(9)
    prompts = [torch.randint(3, 96, (n,)).tolist() for n in (5, 1, 12, 7)]
    together = Sequences(lm.model, NATIVE, 4, 12)
    logits = together.extend([0, 1, 2, 3], prompts)
    bf16 = dtype == torch.bfloat16
    twin = fp32_twin(lm.model) if bf16 else None
    for j, p in enumerate(prompts):
        alone = Sequences(lm.model, NATIVE, 1, 12)
        first = alone.extend([0], [p])[0]
        if bf16:
            ref = Sequences(twin, "eager", 1, 12)
            ref_first = ref.extend([0], [p])[0]
        assert_native_close(logits[j], first, (lambda: ref_first) if bf16 else None)
        assert_native_close(together.kv(j), alone.kv(0), (lambda: ref.kv(0)) if bf16 else None)


def test_each_decode_batch_plans_over_the_weights_it_starts_with(hf_model):
    # The native plan belongs to one decode batch: weights replaced between two generations are
    # the ones the next generation uses.
    family, _, folder = hf_model
    lm = emergence.load(folder, device="cpu")
    eager = emergence.load(folder, device="cpu", backend="eager")
    before = lm.complete("t5 t6 t7", temperature=0, max_new_tokens=8, ignore_eos=True, logprobs=0)
    torch.manual_seed(9)
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in lm.model.state_dict().items()}
    for model in (lm.model, eager.model):
        model.load_state_dict(state, assign=True)  # new tensors: a plan must not use the old ones
        if lm.config.tie_embeddings:
            model.lm_head.weight = model.tok_embeddings.weight
    after = lm.complete("t5 t6 t7", temperature=0, max_new_tokens=8, ignore_eos=True, logprobs=0)
    expected = eager.complete("t5 t6 t7", temperature=0, max_new_tokens=8, ignore_eos=True, logprobs=0)
    assert after.token_ids == expected.token_ids
    assert max(abs(a.logprob - e.logprob) for a, e in zip(after.logprobs, expected.logprobs)) <= 1e-5
    assert max(abs(a.logprob - b.logprob) for a, b in zip(after.logprobs, before.logprobs)) > 1e-3


def test_the_native_backend_refuses_modules_it_does_not_know(hf_model):
    family, _, folder = hf_model
    lm = emergence.load(folder, device="cpu")

    class Halved(torch.nn.Module):  # e.g. an adapter layer swapped in after loading
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) / 2

    lm.model.layers[0].mlp.down_proj = Halved(lm.model.layers[0].mlp.down_proj)
    cache = PagedKVCache(lm.config, 8)
    assert make_backend(lm.model, cache, "auto").name == "eager"
    with pytest.raises(InvalidArgument, match="layers.0.mlp.down_proj is a Halved, a module the native step does not"):
        make_backend(lm.model, cache, "native")
    ids = [int(t) for t in torch.randint(3, 96, (10,))]
    expected, _ = _steps(lm.model, "eager", ids, 3)
    got = torch.stack([lm.model(torch.tensor([ids[:n]]))[0, -1] for n in range(3, 11)]).detach()
    assert (expected - got).abs().max().item() <= 1e-5  # the eager backend runs the module


@pytest.mark.parametrize("backend", ["native", "eager"])
def test_no_backend_runs_past_the_context_window(hf_model, backend):
    _, _, folder = hf_model
    lm = emergence.load(folder, device="cpu")
    block = lm.config.block_size
    seqs = Sequences(lm.model, backend if EXT is not None else "eager", 1, block + 16)
    seqs.extend([0], [[5] * 16])
    seqs.lengths[0] = block  # as if the sequence had filled the window
    seqs.cache.grow(seqs.tables[0], 16, block - 16)
    with pytest.raises(InvalidArgument, match="context window"):
        seqs.extend([0], [[5]])


def test_two_threads_decoding_at_once_get_their_own_results(hf_model):
    # Each decode batch owns its native plan and its scratch memory: two threads generating
    # with the same model at once get what each gets alone.
    family, _, folder = hf_model
    lm = emergence.load(folder, device="cpu")
    prompts = ["t5 t9 t11", "t40 t41", "t7", "t80 t81 t82 t83"]
    expected = {p: lm.complete(p, temperature=0, max_new_tokens=40, ignore_eos=True).token_ids for p in prompts}
    got: dict[str, list] = {}

    def work(k: int) -> None:
        for round_ in range(6):
            p = prompts[(k + round_) % len(prompts)]
            got.setdefault(p, []).append(lm.complete(p, temperature=0, max_new_tokens=40, ignore_eos=True).token_ids)

    in_threads(work, 2)
    assert sum(len(v) for v in got.values()) == 12
    for p, results in got.items():
        assert all(r == expected[p] for r in results), p


# ------------------------------------------------------------------ quantized weights
QUANTIZED = [("q8_0", {}), ("q4_0", {}), ("int8", {}), ("int4", {"group_size": 32}), ("int4", {"group_size": 128}),
             ("ternary", {}), ("ternary", {"act_bits": 8}), ("nf4", {}),
             # ggml's other formats, whose only kernels need AVX512-VNNI (on a CPU without it they
             # decode eagerly, as the formats table test checks: the extension does not offer them)
             *[(fmt, {}) for fmt in ("q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k") if has_ggml_kernel(fmt)]]
K_QUANTS = ("q4_k", "q5_k", "q6_k")  # rows of 256-blocks: their models are 256 wide


def _quantized_model(fmt: str | None, options: dict, dtype: torch.dtype, **changes):
    """A tiny random model (Config `changes` applied), every linear layer, the output head
    included, quantized to `fmt` (None: left in `dtype`)."""
    from emergence import Config
    from emergence.model import Transformer
    from emergence.quant.linear import quantize_model

    wide = dict(n_embd=256, intermediate_size=512) if fmt in K_QUANTS else {}
    config = Config(**{**dict(name="q", vocab_size=512, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
                              n_embd=128, intermediate_size=256), **wide, **changes})
    torch.manual_seed(3)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model = model.to(dtype).eval()
    if fmt is not None:
        quantize_model(model, fmt, skip=(), **options)
    return model


def _assert_quantized_close(fmt: str, native, eager, reference=None) -> None:
    if reference is None and fmt in GGML_KERNEL_FORMATS:
        # Both backends quantize the activations to 8 bits per block of 32 (256 for the
        # K-quants), as llama.cpp does; a last-bit difference in an activation (fp32 summation
        # order) can move it across a rounding boundary, one quantization step (max|x| / 127 over
        # the block: coarser over 256 values), so agreement is to a percent or two.
        bound = 4e-2 if fmt in K_QUANTS else 2e-2
        assert (native - eager).abs().max().item() <= bound * eager.abs().max().item()
        assert (native.argmax(-1) == eager.argmax(-1)).float().mean().item() >= 0.9
        return
    # The eager path multiplies by the dequantized weight; the kernels widen the packed codes in
    # registers: the same products, summed in another order (bf16: as accurate as eager).
    assert_native_close(native, eager, reference)


@pytest.mark.parametrize("fmt, options", QUANTIZED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_step_with_quantized_weights_equals_the_eager_forward(fmt, options, dtype, fp32_products):
    model = _quantized_model(fmt, options, dtype)
    assert make_backend(model, PagedKVCache(model.config, 2, dtype=dtype), "auto").name == NATIVE
    ids = torch.randint(3, 512, (24,)).tolist()
    native, _ = _steps(model, NATIVE, ids, 4)
    eager, _ = _steps(model, "eager", ids, 4)
    _assert_quantized_close(fmt, native, eager,
                            (lambda: _steps(fp32_twin(model), "eager", ids, 4)[0]) if dtype == torch.bfloat16 else None)


@pytest.mark.parametrize("fmt, options", QUANTIZED)
def test_native_batched_step_with_quantized_weights_equals_the_eager_forward(fmt, options, fp32_products):
    model = _quantized_model(fmt, options, torch.float32)
    torch.manual_seed(4)
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (9, 2, 6)]
    steps = torch.randint(3, 512, (3, 12))
    native, _ = _batched(model, NATIVE, prompts, steps, 16)
    eager, _ = _batched(model, "eager", prompts, steps, 16)
    _assert_quantized_close(fmt, native, eager)
    assert (native.argmax(-1) == eager.argmax(-1)).float().mean().item() >= 0.9


@pytest.mark.parametrize("fmt, options", QUANTIZED)
def test_native_prefill_with_quantized_weights_equals_the_eager_forward(fmt, options, fp32_products):
    model = _quantized_model(fmt, options, torch.float32)
    torch.manual_seed(8)
    chunks = [torch.randint(3, 512, (n,)).tolist() for n in (4, 3, 5)]  # 5 > MAX_NATIVE_PREFILL_PACKED: eager

    def run(backend):
        seqs = Sequences(model, backend, 1, 12)
        return torch.stack([seqs.extend([0], [c])[0] for c in chunks])

    native, eager = run(NATIVE), run("eager")
    _assert_quantized_close(fmt, native, eager)
    assert (native.argmax(-1) == eager.argmax(-1)).all()


@pytest.mark.parametrize("fmt, options", [("int4", {"group_size": 32}), ("nf4", {})])
@pytest.mark.parametrize("products", ["fp32", "bf16"])
def test_native_prefill_of_4bit_prompts_takes_the_eager_forwards_products(fmt, options, products):
    """Where the fp32 products are oneDNN's, int4 and NF4 prompts up to 256 tokens are prefilled
    natively (4 elsewhere), their products from 16 rows on the eager forward's (the weight widened
    a tile of rows at a time; bf16 where the CPU has AVX512-BF16, fp32 under fp32_products): the
    logits equal the eager forward's to fp32 summation with fp32 products; with bf16 ones (where
    rounding an activation computed in another order can land on the other side of a bf16 step,
    and the eager head's result is rounded to bf16 too) they are about as far from the fp32
    products' logits as the eager forward's are (BF16_ERROR_RATIO), with the same next token at
    90% of positions or more. A decoding step of 17 rows keeps each row's GEMV: every row's
    logits equal, bit for bit, its step alone."""
    import contextlib

    import emergence.kernels

    if gemv_extension() is None:  # (test_kernels_build_on_this_machine says whether that is right)
        return
    if products == "bf16" and not emergence.kernels.bf16_prompt_products():
        return  # no bf16 products here: the fp32 case covers the path
    model = _quantized_model(fmt, options, torch.float32)
    with kernel_setting("onednn_products", False):
        assert make_backend(model, PagedKVCache(model.config, 2), "auto").max_prefill == 4
    fp32 = emergence.kernels.fp32_products if products == "fp32" else contextlib.nullcontext
    torch.manual_seed(9)
    chunks = [torch.randint(3, 512, (n,)).tolist() for n in (40, 17, 3)]  # two take the widened products

    def run(backend):
        seqs = Sequences(model, backend, 3, 64)
        with fp32():
            out = seqs.extend([0, 1, 2], chunks)
        return out, seqs

    with kernel_setting("onednn_products", True):
        native, seqs = run(NATIVE)
        assert seqs.backend.max_prefill == 256 and seqs.backend.native_calls == 1
        eager, _ = run("eager")
        if products == "fp32":
            _assert_quantized_close(fmt, native, eager)
            assert (native.argmax(-1) == eager.argmax(-1)).all()
        else:
            with emergence.kernels.fp32_products():
                exact, _ = run("eager")
            assert (native - exact).abs().max() <= BF16_ERROR_RATIO * (eager - exact).abs().max()
            assert (native.argmax(-1) == eager.argmax(-1)).float().mean().item() >= 0.9
        steps = torch.randint(3, 512, (17,)).tolist()
        together = Sequences(model, NATIVE, 17, 8)
        together.extend(list(range(17)), [[t] for t in steps])
        batch = together.extend(list(range(17)), [[t] for t in steps])
        for j, t in enumerate(steps):
            alone = Sequences(model, NATIVE, 1, 8)
            alone.extend([0], [[t]])
            assert torch.equal(alone.extend([0], [[t]])[0], batch[j])


QWEN2_MOE = dict(family="qwen2_moe", n_experts=4, experts_per_token=2, moe_intermediate_size=64,
                 shared_expert_size=96)
# (name, quantized format or None, its options, model dtype, Config changes)
TEAM_CASES = [("fp32", None, {}, torch.float32, {}), ("bf16", None, {}, torch.bfloat16, {}),
              ("q8_0", "q8_0", {}, torch.float32, {}), ("q4_0", "q4_0", {}, torch.float32, {}),
              ("int4", "int4", {"group_size": 32}, torch.float32, {}),
              ("ternary-a8", "ternary", {"act_bits": 8}, torch.float32, {}),
              ("qwen2-moe", None, {}, torch.float32, QWEN2_MOE),
              ("qwen2-moe-q8_0", "q8_0", {}, torch.float32, QWEN2_MOE)]


@pytest.mark.parametrize("name, fmt, options, dtype, changes", TEAM_CASES, ids=[c[0] for c in TEAM_CASES])
def test_one_thread_team_per_call_gives_what_one_thread_gives(name, fmt, options, dtype, changes, ext):
    # decode.cpp runs each call on one OpenMP team (team.h): every product, the attention and the
    # activation split by rows across it with a barrier after each, the small shared work on the
    # first thread. A race or a missing barrier shows as logits that differ from one thread's:
    # prompts prefilled together (64 rows: fp32 products through torch's BLAS, q8_0/q4_0 on the
    # packed blocks), steps of 4 rows and of 1 row, at 1 and 2 threads. The shapes split into
    # whole row tiles, so the sums are the same ones and the logits bit-identical.
    if ext is None:  # the fixture checked the fallback (torch's own products need not be bit-identical)
        return
    model = _quantized_model(fmt, options, dtype, **changes)
    torch.manual_seed(9)
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (9, 2, 6, 47)]
    steps = torch.randint(3, 512, (4, 3))  # (row 0 then takes 3 more alone: 15 tokens, one block)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            batched, seqs = _batched(model, NATIVE, prompts, steps, 16)
            alone = torch.stack([seqs.extend([0], [[t]])[0] for t in steps[0].tolist()])
            results.append((batched, alone, seqs.kv(0)))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)
    assert results[0][0].abs().max().item() > 0.1  # real logits, not a zeroed buffer


def test_decoding_right_after_quantize_model_runs_natively():
    # quantize_model swaps layers in place; the next decode batch plans over the packed weights
    # (emergence-6m at q4_0 once decoded at 24 tok/s after quantizing in Python: the fused step
    # had been switched off).
    from emergence.quant.linear import quantize_model

    lm = emergence.load("emergence-6m", device="cpu")
    eager = emergence.load("emergence-6m", device="cpu", backend="eager")
    for model in (lm.model, eager.model):
        quantize_model(model, "q4_0")
    row = new_row(0, lm.tokenizer.encode("Once upon a time"), SamplingParams(temperature=0, max_new_tokens=24),
                  lm.config, lm.tokenizer, end_ids(lm.config, lm.tokenizer), torch.device("cpu"))
    batch = DecodeBatch.for_rows(lm.model, lm.tokenizer, [row])
    assert batch.backend.name == NATIVE
    batch.admit([row])
    while batch.rows:
        batch.step()
    # the prompt (4 tokens) and 23 steps; the 24th token is never fed back
    assert len(row.prompt) == 4 and getattr(batch.backend, "native_calls", 0) == (24 if EXT is not None else 0)
    assert row.text == eager.generate("Once upon a time", temperature=0, max_new_tokens=24)


def _stacked(model, float_part: bool):
    """`model` (q8_0) with layer 0's q/k/v as a StackedLinear, as a GGUF file whose q, k and v
    differ in type loads: q8_0 rows, then q4_0 rows (float32 where `float_part`)."""
    from emergence.quant.linear import GGMLLinear, StackedLinear

    qkv = model.layers[0].attn.qkv_proj
    weight, split = qkv.dequantize(), qkv.out_features // 2
    first = GGMLLinear(qkv.in_features, split, bias=False, ggml_format="q8_0")
    first.blocks = qkv.blocks[:split].clone()
    if float_part:
        second = torch.nn.Linear(qkv.in_features, qkv.out_features - split, bias=False)
        second.weight.data.copy_(weight[split:])
    else:
        second = GGMLLinear(qkv.in_features, qkv.out_features - split, bias=False, ggml_format="q4_0")
        second.quantize_(weight[split:])
    model.layers[0].attn.qkv_proj = StackedLinear([first, second], (torch.randn(qkv.out_features) * 0.1).to(model.dtype))
    return model.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_stack_of_quantized_parts_steps_natively_as_the_eager_forward(dtype, fp32_products):
    # a fused matrix whose parts differ in type (llama.cpp's Q4_K_M gives some layers a Q6_K v):
    # the native step multiplies part by part into the fused output's rows, then adds the bias
    if EXT is None:
        return
    model = _stacked(_quantized_model("q8_0", {}, dtype), float_part=False)
    assert make_backend(model, PagedKVCache(model.config, 2, dtype=dtype), "auto").name == NATIVE
    ids = torch.randint(3, 512, (24,)).tolist()
    native, _ = _steps(model, NATIVE, ids, 4)
    eager, _ = _steps(model, "eager", ids, 4)
    _assert_quantized_close("q8_0", native, eager)
    if dtype == torch.float32:  # rows of a batch too; in fp32 both paths quantize the same activations
        torch.manual_seed(4)
        prompts = [torch.randint(3, 512, (n,)).tolist() for n in (9, 2, 6)]
        steps = torch.randint(3, 512, (3, 6))
        native, eager = (_batched(model, backend, prompts, steps, 16)[0] for backend in (NATIVE, "eager"))
        assert (native - eager).abs().max().item() <= 1e-5 * eager.abs().max().item()


def test_formats_without_a_kernel_decode_eagerly():
    from emergence.kernels.fused_decode import unsupported

    model = _stacked(_quantized_model("q8_0", {}, torch.float32), float_part=True)
    assert "stacks q8_0+float32: the native step takes stacks of quantized parts only" in unsupported(model)
    cache = PagedKVCache(model.config, 2)
    assert make_backend(model, cache, "auto").name == "eager"
    ids = torch.randint(3, 512, (10,)).tolist()
    assert torch.equal(_steps(model, "auto", ids, 3)[0], _steps(model, "eager", ids, 3)[0])


def test_the_kernels_format_table_is_the_quantized_layers(ext):
    # One table of the packed formats' ids, in decode.cpp: every quantized layer that offers
    # kernel operands names a format in it, and every format in it is offered by a layer.
    if ext is None:  # the fixture checked the fallback
        return
    offered = set()
    for fmt, options in QUANTIZED:
        for module in _quantized_model(fmt, options, torch.float32).modules():
            ops = module.kernel_operands() if hasattr(module, "kernel_operands") else None
            if ops is not None:
                assert ops.format in EXT.weight_kinds
                offered.add(ops.format)
    assert offered == set(EXT.weight_kinds)
    assert len(set(EXT.weight_kinds.values())) == len(EXT.weight_kinds)


@pytest.mark.parametrize("qtype_name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("shape", [(7, 32), (13, 96), (300, 576), (64, 1536)])  # blocks: 1, 3 (a pair and one), 18, 48
def test_ggml_block_gemv_is_llama_cpps_product(qtype_name, shape, ext, walk):
    if ext is None or qtype_name.lower() not in ext.weight_kinds:  # the fixture checked the fallback; no VNNI
        return
    # llama.cpp's numerics: the dequantized weight times x quantized to 8 bits per block of 32
    # (Q8_0), per block of 256 against the K-quants (Q8_K); the dequantized rows bit for bit.
    from emergence.gguf.quants import GGMLType, dequantize, quantize
    from emergence.quant.methods import quantize_activations_q8_0, quantize_activations_q8_k

    qtype = GGMLType[qtype_name]
    n, k = shape
    if qtype_name.endswith("_K"):  # super-blocks of 256: 1, 3, 2, 6
        k = {32: 256, 96: 768, 576: 512}.get(k, k)
    torch.manual_seed(shape[0])
    w, x = torch.randn(n, k), torch.randn(k)
    if k > 32:
        x[:32] *= 1e-3  # blocks of very different magnitudes
    raw = quantize(w, qtype)
    weight = dequantize(raw, qtype, (n, k)).double()
    xq = (quantize_activations_q8_k(x) if qtype_name.endswith("_K") else quantize_activations_q8_0(x)).double()
    none, data, kind = torch.empty(0), torch.from_numpy(raw.reshape(-1).copy()), ext.weight_kinds[qtype_name.lower()]
    assert torch.equal(ext.qdequantize(kind, data, none, none, 0, 0.0, n, k), weight.float())
    got = ext.qgemv(kind, x, data, none, none, 0, 0.0, n, k, None)
    bound = 2**-20 * (weight.abs() @ xq.abs())  # integer dot products, fp32 scaling and sums
    assert ((got.double() - weight @ xq).abs() <= bound + 1e-9).all()
    assert ((got.double() - weight @ x.double()).abs() > bound).any()  # x really was quantized


@pytest.mark.parametrize("fmt", ["bf16", "q8_0", "q4_0", "int4", "nf4"])
def test_the_two_row_walks_give_the_same_bits(fmt, ext):
    """Walking the rows one at a time or side by side changes only the order of memory reads:
    each row keeps its own accumulators in column order, so bf16, Q8_0, Q4_0, int4 and NF4
    results are equal bit for bit (int8's single rows sum in two chains: test_own_format_gemv
    checks both walks against the exact product). For bf16 (its output rounded to bf16) every row holds +-2^20 in its first and
    32nd-to-last columns, so its running sum carries 2^20 with coarse fp32 rounding over the
    row: two chains over alternate 32-column steps change most of the 1031 results (emulated
    below in fp32)."""
    if ext is None:  # the fixture checked the fallback
        return
    torch.manual_seed(3)
    n, k = 1031, 608  # 19 blocks of 32: a row count no walk divides evenly, prefetches past the end
    w, x = torch.randn(n, k), torch.randn(k)
    if fmt == "bf16":
        w = torch.rand(n, k) * 2 - 1
        w[:, 0], w[:, k - 32] = 2.0**20, -(2.0**20)

        def run():
            return ext.gemv(torch.ones(k, dtype=torch.bfloat16), w.bfloat16(), None)
    elif fmt in ("q8_0", "q4_0"):
        from emergence.gguf.quants import GGMLType, quantize

        blocks, none = torch.from_numpy(quantize(w, GGMLType[fmt.upper()]).reshape(-1).copy()), torch.empty(0)

        def run():
            return ext.qgemv(ext.weight_kinds[fmt], x, blocks, none, none, 0, 0.0, n, k, None)
    else:
        from emergence.quant.linear import quantize_model

        k, x = 640, torch.randn(640)  # 4-bit rows: whole 128-column steps
        layer = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False))
        quantize_model(layer, fmt, skip=(), **({"group_size": 32} if fmt == "int4" else {}))
        ops = layer[0].kernel_operands()

        def run():
            return ext.qgemv(ext.weight_kinds[ops.format], x, ops.data, ops.scales, ops.offsets, ops.group,
                             ops.tensor_scale, n, k, None)
    chosen = ext.one_row_streams()
    try:
        ext.set_one_row_streams(False)
        side_by_side = run()
        ext.set_one_row_streams(True)
        one_row = run()
    finally:
        ext.set_one_row_streams(chosen)
    assert torch.equal(side_by_side, one_row)
    assert side_by_side.abs().max() > 1  # a real product, not zeros
    if fmt == "bf16":  # the check would see a split of each row's chain
        pairs = w.bfloat16().float().view(n, k // 32, 16, 2).sum(-1)  # (rows, steps, lanes)
        chains = [torch.zeros(n, 16), torch.zeros(n, 16)]
        for step in range(k // 32):
            chains[step % 2] += pairs[:, step]
        split = (chains[0].sum(1) + chains[1].sum(1)).bfloat16()
        assert (split != one_row).sum() > n // 2


@pytest.mark.parametrize("qtype_name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("rows, shape", [(1, (7, 32)), (5, (67, 96)), (128, (300, 576)), (9, (64, 1536))])
def test_ggml_block_gemm_is_llama_cpps_product_for_every_row(qtype_name, rows, shape, ext):
    """The prefill product on the packed blocks (qgemm: tiles of 16 weight rows, 4 columns per
    VNNI instruction): each row equals the dequantized weight times that row quantized to 8
    bits per block (Q8_K's 256 for the K-quants), to within fp32 scaling and summation, whatever
    the row, column and block counts (odd ones included); minimums and offsets included."""
    if ext is None or qtype_name.lower() not in ext.weight_kinds:  # the fixture checked the fallback; no VNNI
        return
    from emergence.gguf.quants import GGMLType, dequantize, quantize
    from emergence.quant.methods import quantize_activations_q8_0, quantize_activations_q8_k

    qtype = GGMLType[qtype_name]
    torch.manual_seed(rows)
    n, k = shape
    if qtype_name.endswith("_K"):  # super-blocks of 256: 1, 3, 2, 6
        k = {32: 256, 96: 768, 576: 512}.get(k, k)
    w, x = torch.randn(n, k), torch.randn(rows, k)
    x[:, :32] *= 1e-3  # blocks of very different magnitudes
    raw = quantize(w, qtype)
    weight = dequantize(raw, qtype, (n, k)).double()
    xq = (quantize_activations_q8_k(x) if qtype_name.endswith("_K") else quantize_activations_q8_0(x)).double()
    blocks, none = torch.from_numpy(raw.reshape(-1).copy()), torch.empty(0)
    got = ext.qgemm(ext.weight_kinds[qtype_name.lower()], x, blocks, none, none, 0, 0.0, n, k, None)
    bound = 2**-20 * (xq.abs() @ weight.abs().T)
    assert got.shape == (rows, n) and ((got.double() - xq @ weight.T).abs() <= bound + 1e-9).all()
    bias = torch.randn(n)
    with_bias = ext.qgemm(ext.weight_kinds[qtype_name.lower()], x, blocks, none, none, 0, 0.0, n, k, bias)
    assert torch.equal(with_bias, got + bias)


@pytest.mark.parametrize("fmt, options, shape", [
    ("int4", {"group_size": 32}, (7, 96)),     # no whole 128-column chunk: the 32-column steps only
    ("int4", {"group_size": 32}, (9, 576)),    # 4 chunks and 64 columns after; an odd row count
    ("int4", {"group_size": 64}, (5, 192)),
    ("int4", {"group_size": 128}, (6, 1536)),  # whole chunks only
    ("nf4", {}, (3, 64)),
    ("nf4", {}, (11, 576)),
    ("nf4", {}, (4, 1536)),
    ("int8", {}, (9, 100)),                    # 4 rows at a time and one after; 4 columns past the last 16
    ("int8", {}, (8, 576)),
])
def test_own_format_gemv_is_the_dequantized_product(fmt, options, shape, ext, walk):
    """int4 and NF4 codes become values by table lookup, 128 columns a step and 32 at a time
    after the last whole step (rows_4bit); int8 rows go 4 at a time (rows_int8_4): every row
    equals x times the dequantized weight, to fp32 summation, whatever the group size, column
    count and row count, and whichever way the rows are walked."""
    if ext is None:  # the fixture checked the fallback
        return
    from emergence.quant.linear import quantize_model

    n, k = shape
    torch.manual_seed(k + n)
    layer = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False))
    layer[0].weight.data[:, : k // 2] *= 1e-2  # groups of very different magnitudes
    quantize_model(layer, fmt, skip=(), **options)
    module, ops = layer[0], layer[0].kernel_operands()
    x = torch.randn(k)
    got = ext.qgemv(ext.weight_kinds[ops.format], x, ops.data, ops.scales, ops.offsets, ops.group, ops.tensor_scale,
                    n, k, None)
    weight = module.dequantize().double()
    exact = weight @ x.double()
    bound = 2**-20 * (weight.abs() @ x.double().abs())
    assert ((got.double() - exact).abs() <= bound).all()
    # each output row's own codes: a layout error (a column read against another's x) is far
    # outside the bound
    assert ((got.double() - weight[:, torch.randperm(k)] @ x.double()).abs() > bound).any()


def test_int4_kernels_refuse_a_group_size_their_steps_cannot_hold(ext):
    # rows_4bit multiplies 128 columns a step, whole groups in each: 32, 64 or 128 columns a group
    if ext is None:  # the fixture checked the fallback
        return
    codes, scales = torch.zeros(2 * 128, dtype=torch.uint8), torch.ones(2)
    for group in (96, 256):
        with pytest.raises(RuntimeError, match="group size of 32, 64 or 128"):
            ext.qgemv(ext.weight_kinds["int4"], torch.ones(256), codes, scales, scales, group, 0.0, 2, 256, None)


@pytest.mark.parametrize("fmt, options", [("int8", {}), ("int4", {"group_size": 32}), ("int4", {"group_size": 64}),
                                          ("nf4", {}), ("ternary", {})])
@pytest.mark.parametrize("rows, shape", [(1, (5, 128)), (7, (300, 576)), (128, (130, 1536))])
def test_widened_gemm_is_the_dequantized_product_for_every_row(fmt, options, rows, shape, ext, onednn):
    """A prompt through an int8 / int4 / NF4 / ternary layer (qgemm_widened: the weight widened a
    tile of rows at a time and multiplied by the BLAS or oneDNN, never whole): every row equals
    the row times the dequantized weight, to fp32 summation, tiles and remainders of any size;
    the eager forward pass takes it without a gradient to carry, with the bias added. int4 and
    NF4 on a CPU with AVX512-BF16 multiply in bf16: then every row equals the product of x and
    the weight each rounded to bf16 as torch rounds (to nearest, ties to even), to fp32
    summation (MKL's product) or to that and the result's own rounding to bf16 (oneDNN's); a
    rounding of the operands of its own (truncating, say) would be 2^11 times the first bound."""
    if ext is None:  # the fixture checked the fallback
        return
    from emergence.kernels import BF16_FORMATS, _cpu_flags, native_qgemm
    from emergence.quant.linear import quantize_model

    n, k = shape
    torch.manual_seed(rows + n)
    layer = torch.nn.Sequential(torch.nn.Linear(k, n))
    quantize_model(layer, fmt, skip=(), **options)
    module = layer[0]
    x = torch.randn(rows, k)
    weight, operand = module.dequantize(), x
    bf16 = fmt in BF16_FORMATS and "avx512_bf16" in _cpu_flags()
    if bf16:
        assert ext.has_bf16_gemm  # torch's MKL on x86
        weight, operand = weight.bfloat16(), x.bfloat16()
    weight = weight.double()
    exact = operand.double() @ weight.T
    bound = 2**-20 * (operand.double().abs() @ weight.abs().T) + 1e-12
    if bf16 and onednn:  # the result rounded to bf16: half a unit in its last place, 2^-8 of itself
        bound = bound * (1 + 2**-8) + 2**-8 * exact.abs()
    got = native_qgemm(module, x)
    assert got.shape == (rows, n) and ((got.double() - exact).abs() <= bound).all()
    with torch.no_grad():
        assert torch.equal(module(x[None]), got[None] + module.bias)
    assert native_qgemm(module, x.requires_grad_()) is None  # training: the dequantized weight's autograd


@pytest.mark.parametrize("fmt, options", [("int4", {"group_size": 32}), ("nf4", {})])
def test_bf16_prompt_products_stay_far_below_the_4bit_weights_own_error(fmt, options, onednn):
    """The logits of a 48-token prompt through a 4-bit model, with its products in bf16 (the
    default where the CPU has AVX512-BF16: MKL's, or oneDNN's with their results rounded to
    bf16) and in fp32 (kernels.fp32_products): the two
    differ by under a tenth of what the 4-bit weights themselves change (fp32 products against
    the model before quantizing), and pick the same next token at 95% of the positions or more
    (this random model's logits have near ties), where the 4-bit weights alone keep the
    original's token at fewer than 90% of them."""
    import emergence.kernels
    from emergence.quant.linear import quantize_model

    if "avx512_bf16" not in emergence.kernels._cpu_flags() or emergence.kernels.gemv_extension() is None:
        return  # no bf16 path here: both runs would be the fp32 one (test_widened_gemm covers it)
    original = _quantized_model(None, {}, torch.float32)
    model = _quantized_model(None, {}, torch.float32)
    quantize_model(model, fmt, skip=(), **options)
    ids = torch.randint(3, 512, (1, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = original(ids)
        bf16 = model(ids)
        with emergence.kernels.fp32_products():
            fp32 = model(ids)
    rounding, quantization = (bf16 - fp32).abs().max().item(), (fp32 - reference).abs().max().item()
    assert 0 < rounding <= 0.1 * quantization
    agree = lambda a, b: (a.argmax(-1) == b.argmax(-1)).float().mean().item()  # noqa: E731
    assert agree(bf16, fp32) >= 0.95 > 0.9 > agree(fp32, reference)


def test_packed_ternary_layout_decodes_to_the_values(ext):
    if ext is None:  # the fixture checked the fallback
        return
    from emergence.quant.methods import pack_ternary_2bit as pack_ternary

    values = torch.randint(-1, 2, (3, 128), dtype=torch.int8)
    packed = pack_ternary(values)
    assert packed.shape == (3, 32)
    # byte j of each 64-column chunk: columns j, j+16, j+32, j+48 in bits 0-1, 2-3, 4-5, 6-7, as value + 1
    for chunk in range(2):
        for j in range(16):
            byte = int(packed[1, chunk * 16 + j])
            for part in range(4):
                assert ((byte >> (2 * part)) & 3) - 1 == values[1, chunk * 64 + 16 * part + j]
    x = torch.randn(128)
    none = torch.empty(0)
    got = ext.qgemv(ext.weight_kinds["ternary"], x, packed, none, none, 0, 0.5, 3, 128, None)
    assert torch.allclose(got, (values.float() * 0.5) @ x, atol=1e-5)


@pytest.mark.parametrize("fmt, options", [(f, o) for f, o in QUANTIZED if f != "ternary"])
def test_native_dequantize_equals_the_formats_own(fmt, options, ext):
    from emergence.kernels import native_dequantize

    if ext is None:  # the fixture checked the fallback
        return
    model = _quantized_model(fmt, options, torch.float32)
    for module in (model.layers[0].attn.qkv_proj, model.layers[1].mlp.down_proj, model.lm_head):
        assert torch.equal(native_dequantize(module), module.dequantize())


def test_releasing_the_thread_pool_ends_this_threads_openmp_workers():
    # A server's engine decodes in its own thread; the loading thread's OpenMP team is handed
    # back so the engine's is the only one (kernels.release_thread_pool). In a fresh process:
    # the workers of the main thread's team end, and torch computes as before afterwards.
    import subprocess
    import sys

    script = """
import os, time, torch
from emergence.kernels import release_thread_pool
a = torch.randn(512, 512)
for _ in range(3):
    expected = torch.mm(a, a)
tasks = lambda: len(os.listdir('/proc/self/task'))
before = tasks()
release_thread_pool()
time.sleep(0.1)
after = tasks()
gomp = any('/libgomp' in line for line in open('/proc/self/maps'))
print(before - after, torch.get_num_threads() - 1 if gomp else 0, torch.equal(torch.mm(a, a), expected))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ended, workers, same = out.stdout.split()
    assert int(ended) == int(workers) and same == "True"
