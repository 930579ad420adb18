"""The C++ CPU kernels against the torch reference (kernels/reference.py), on seeded ragged batches."""
import os
import random
import subprocess
import sys

import pytest
import torch

from splitfuse.compiled.models.layers import Linear, Projections
from splitfuse.kernels import cpu, ops, reference
from splitfuse.kernels.reference import BRGEMM_CHUNK

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


LAYERS, LAYER = 3, 1  # the kernels read the middle layer of a cache of three


def ragged_batch(seed: int, *, hq: int, hkv: int, dim: int, block_size: int, dtype: torch.dtype,
                 num_seqs: int | None = None):
    """Decodes and prompt chunks of random lengths over a shuffled block pool, plus padding: a padded
    sequence (query length 0) and padded rows past the last sequence."""
    rng = random.Random(seed)
    q_lens = [rng.choice([1, 1, 1, rng.randint(2, 70)]) for _ in range(num_seqs or rng.randint(1, 7))] + [0]
    ctx_lens = [q + rng.choice([0, rng.randint(1, 150)]) for q in q_lens]
    return paged_batch(seed, q_lens, ctx_lens, hq=hq, hkv=hkv, dim=dim, block_size=block_size, dtype=dtype)


def paged_batch(seed: int, q_lens: list[int], ctx_lens: list[int], *, hq: int, hkv: int, dim: int, block_size: int,
                dtype: torch.dtype):
    """Sequences of these new tokens and lengths, over a shuffled block pool, and 3 padded rows."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(1, max(-(-c // block_size) for c in ctx_lens))
    num_blocks = len(q_lens) * max_blocks + 2
    kv_cache = torch.randn(LAYERS, 2, num_blocks, block_size, hkv, dim, generator=g).to(dtype)
    tables = torch.randperm(num_blocks, generator=g)[:len(q_lens) * max_blocks].view(len(q_lens), max_blocks).int()
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(starts[-1]) + 3, hq, dim, generator=g).to(dtype)
    return q, kv_cache, tables, torch.tensor(ctx_lens, dtype=torch.int32), starts


def reference_attention(q, kv_cache, *rest):
    return reference.paged_attention(q, *kv_cache[LAYER], *rest)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("window", [0, 1, 9, 64])
def test_attention_matches_reference(seed, window, dtype):
    shapes = [dict(hq=9, hkv=3, dim=64, block_size=16), dict(hq=4, hkv=4, dim=80, block_size=32),
              dict(hq=8, hkv=1, dim=16, block_size=128)][seed % 3]
    batch = ragged_batch(seed, dtype=dtype, **shapes)
    assert cpu.supports(*batch[:2])
    expected = reference_attention(*batch, 0.3, window)
    got = torch.ops.splitfuse_cpu.paged_attention(*batch[:2], LAYER, *batch[2:], 0.3, window)
    torch.testing.assert_close(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 9])
@pytest.mark.parametrize("hq,hkv", [(9, 3), (6, 6)])
def test_attention_of_many_sequences_matches_reference(window, dtype, hq, hkv):
    """Enough sequences for the kernel to take each decode as one item over all its KV heads (six: more than
    the bf16 kernel takes together)."""
    batch = ragged_batch(7, dtype=dtype, hq=hq, hkv=hkv, dim=64, block_size=16,
                         num_seqs=2 * torch.get_num_threads() + 9)
    expected = reference_attention(*batch, 0.3, window)
    got = torch.ops.splitfuse_cpu.paged_attention(*batch[:2], LAYER, *batch[2:], 0.3, window)
    torch.testing.assert_close(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("window", [0, 300])
def test_attention_of_long_prompt_chunks_matches_reference(window):
    """Chunks of many items a KV head over several of the bf16 kernel's spans of 256 keys, which a thread packs
    once for all its items of a head: a whole prompt, a chunk after an earlier one, and a decode."""
    batch = paged_batch(3, [700, 300, 1], [700, 900, 650], hq=9, hkv=3, dim=64, block_size=16, dtype=torch.bfloat16)
    expected = reference_attention(*batch, 0.3, window)
    got = torch.ops.splitfuse_cpu.paged_attention(*batch[:2], LAYER, *batch[2:], 0.3, window)
    torch.testing.assert_close(got.float(), expected.float(), atol=TOL[torch.bfloat16], rtol=TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,dim", [(1, 576), (300, 576), (7, 13)])
def test_add_rms_norm_matches_reference(rows, dim, dtype):
    """The residual stream's sum exactly (one rounding), its norm within a rounding of the reference's."""
    g = torch.Generator().manual_seed(rows)
    x, residual = (torch.randn(rows, dim, generator=g).to(dtype) * 3 for _ in range(2))
    weight = torch.randn(dim, generator=g).to(dtype)
    total, normed = torch.ops.splitfuse_cpu.add_rms_norm(x, residual, weight, 1e-5)
    expected_total, expected = reference.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(total, expected_total)
    torch.testing.assert_close(normed.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,dim", [(1, 64), (70, 64), (5, 40), (3, 8)])
def test_rotary_matches_reference_bit_for_bit_and_fp64(tokens, dim, dtype):
    """q and k as the model passes them, column slices of one projection's rows, turned at scattered positions:
    the kernel's bits are the reference's (fp32, one rounding), and both are within a rounding of fp64."""
    g = torch.Generator().manual_seed(tokens + dim)
    hq, hk = 9, 3
    qkv = (torch.randn(tokens, (hq + 2 * hk) * dim, generator=g) * 4).to(dtype)
    q, k = qkv[:, :hq * dim].view(tokens, hq, dim), qkv[:, hq * dim:(hq + hk) * dim].view(tokens, hk, dim)
    angles = torch.outer(torch.arange(1000, dtype=torch.float64), torch.rand(dim // 2, generator=g, dtype=torch.float64))
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().float(), angles.sin().float()
    positions = torch.randint(0, 1000, (tokens,), generator=g, dtype=torch.int32)
    got = torch.ops.splitfuse_cpu.rotary(q, k, positions, cos, sin)
    expected = reference.rotary(q, k, positions, cos, sin)
    for x, out, ref in zip((q, k), got, expected):
        assert out.is_contiguous() and out.shape == x.shape and torch.equal(out, ref)
        h, half = x.double(), dim // 2
        c, s = cos.double()[positions.long()].unsqueeze(1), sin.double()[positions.long()].unsqueeze(1)
        exact = h * c + torch.cat([-h[..., half:], h[..., :half]], dim=-1) * s
        torch.testing.assert_close(out.double(), exact, atol=TOL[dtype] * 4, rtol=TOL[dtype])
    with pytest.raises(RuntimeError, match="a position outside the tables"):
        torch.ops.splitfuse_cpu.rotary(q, k, torch.full_like(positions, 1000), cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slices", [False, True])
def test_store_matches_reference(dtype, slices):
    """Keys and values whole, or as the model passes them: column slices of one projection's rows."""
    g = torch.Generator().manual_seed(0)
    if slices:
        key, value = torch.randn(40, 7 * 64, generator=g).to(dtype)[:, 64:].view(40, 2, 3, 64).unbind(1)
    else:
        key, value = (torch.randn(40, 3, 64, generator=g).to(dtype) for _ in range(2))
    slots = torch.randperm(8 * 16, generator=g)[:40]
    slots[[3, 17, 39]] = -1  # padded tokens
    before = torch.randn(LAYERS, 2, 8, 16, 3, 64, generator=g).to(dtype)
    expected, got = before.clone(), before.clone()
    reference.store_kv(key, value, *expected[LAYER], slots)
    torch.ops.splitfuse_cpu.store_kv(key, value, got, LAYER, slots)
    assert torch.equal(got, expected) and not torch.equal(got, before)


def test_unsupported_shapes_go_to_the_reference():
    assert not cpu.supports(torch.zeros(2, 4, 12))             # head size not a multiple of 8
    assert not cpu.supports(torch.zeros(2, 4, 16, dtype=torch.float16))
    assert not cpu.supports(torch.zeros(2, 4, 16), torch.zeros(2, 4, 16, dtype=torch.bfloat16))


@pytest.mark.parametrize("bf16_exact", [True, False])
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 16, 40])
@pytest.mark.parametrize("features", [(576, 576), (37, 80), (1000, 24)])
def test_packed_linear_matches_an_fp64_linear(rows, features, bf16_exact):
    """Weights that are exactly bf16 pack as bf16 (half the bytes) with the same products; others as fp32.
    Output counts that are not a multiple of the panel width, and row counts across the 6-row tiles."""
    n, k = features
    g = torch.Generator().manual_seed(rows * n)
    weight = torch.randn(n, k, generator=g)
    if bf16_exact:
        weight = weight.to(torch.bfloat16).float()
    bias, x = torch.randn(n, generator=g), torch.randn(rows, k, generator=g)
    packed = reference.pack_linear_weight(weight)
    assert packed.dtype == (torch.bfloat16 if bf16_exact else torch.float32)
    expected = torch.nn.functional.linear(x.double(), weight.double(), bias.double()).float()
    torch.testing.assert_close(torch.ops.splitfuse_cpu.packed_linear(x, packed, bias, n), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reference.packed_linear(x, packed, None, n), expected - bias, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bf16_exact", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 7, 40])
@pytest.mark.parametrize("features", [(96, 64), (40, 24)])
def test_gated_linear_matches_silu_of_gate_times_up_in_fp64(rows, features, bf16_exact):
    """The gated kernel over gate and up packs interleaved panel by panel, with biases, against fp64."""
    n, k = features
    g = torch.Generator().manual_seed(rows + n)
    gate, up = torch.randn(n, k, generator=g), torch.randn(n, k, generator=g)
    if bf16_exact:
        gate, up = gate.to(torch.bfloat16).float(), up.to(torch.bfloat16).float()
    bias, x = torch.randn(2 * n, generator=g), torch.randn(rows, k, generator=g)
    packed = reference.interleave_panels(reference.pack_linear_weight(gate), reference.pack_linear_weight(up))
    xd = x.double()
    expected = (torch.nn.functional.silu(xd @ gate.double().T + bias[:n].double())
                * (xd @ up.double().T + bias[n:].double())).float()
    torch.testing.assert_close(torch.ops.splitfuse_cpu.packed_linear(x, packed, bias, n, gated=True), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reference.packed_gated_linear(x, packed, bias, n), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sizes", [(32, 16, 16), (20, 16)])
def test_projections_side_by_side_match_each_member(sizes):
    """q, k, v in one kernel call where every member but the last fills whole panels; else each on its own."""
    torch.manual_seed(len(sizes))
    members = [Linear(24, n, bias=True) for n in sizes]
    for m in members:
        m.pack_for_cpu()
    group = Projections(*members)
    group.pack_for_cpu()
    assert (group.packed is not None) == all(n % reference.PANEL == 0 for n in sizes[:-1])
    x = torch.randn(5, 24)
    for got, m in zip(group(x), members):
        torch.testing.assert_close(got, torch.nn.functional.linear(x, m.weight, m.bias), atol=1e-5, rtol=1e-5)


needs_bf16_gemm = pytest.mark.skipif(not cpu.has_bf16_gemm(), reason="needs AVX-512 BF16 or AMX")


def bf16_case(rows: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, k, generator=g).bfloat16(), (torch.randn(n, k, generator=g) / k ** 0.5).bfloat16(),
            torch.randn(2 * n, generator=g).bfloat16())


@pytest.mark.parametrize("fp32_out", [True, False])
@pytest.mark.parametrize("rows", [0, 1, 3, 5, 64, 65, 130])
@pytest.mark.parametrize("features", [(576, 576), (40, 24), (1000, 96)])
def test_brgemm_linear_matches_an_fp64_linear_of_its_bf16_operands(rows, features, fp32_out):
    """Output counts across the column chunks, row counts across the 64-row tiles; the kernel where the
    CPU has it and the torch reference everywhere, each within an fp32 rounding (or a bf16 one) of fp64."""
    n, k = features
    x, weight, bias = bf16_case(rows, n, k, rows * n)
    packed = reference.pack_brgemm_weight(weight)
    expected = torch.nn.functional.linear(x.double(), weight.double(), bias[:n].double())
    expected = expected.float() if fp32_out else expected.bfloat16()
    tol = dict(atol=1e-4, rtol=1e-4) if fp32_out else {}
    implementations = [torch.ops.splitfuse.brgemm_linear] + ([torch.ops.splitfuse_cpu.brgemm_linear]
                                                             if cpu.has_bf16_gemm() else [])
    for brgemm_linear in implementations:
        torch.testing.assert_close(brgemm_linear(x, packed, bias[:n], n, False, fp32_out), expected, **tol)


@pytest.mark.parametrize("rows", [1, 3, 7, 40])
@pytest.mark.parametrize("features", [(96, 64), (40, 24)])
def test_gated_brgemm_linear_matches_silu_of_gate_times_up_in_fp64(rows, features):
    n, k = features
    x, gate, bias = bf16_case(rows, n, k, rows + n)
    up = bf16_case(rows, n, k, rows + n + 1)[1]
    packed = torch.cat([reference.pack_brgemm_weight(gate), reference.pack_brgemm_weight(up)])
    xd = x.double()
    expected = (torch.nn.functional.silu(xd @ gate.double().T + bias[:n].double())
                * (xd @ up.double().T + bias[n:].double())).float()
    implementations = [torch.ops.splitfuse.brgemm_linear] + ([torch.ops.splitfuse_cpu.brgemm_linear]
                                                             if cpu.has_bf16_gemm() else [])
    for brgemm_linear in implementations:
        torch.testing.assert_close(brgemm_linear(x, packed, bias, n, True, True), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("kernel", ["packed_linear", "brgemm_linear"])
@pytest.mark.parametrize("used", [0, 5, 37, 40])
def test_a_linear_multiplies_only_the_rows_in_use(kernel, used, gated):
    """A step padded to its shape passes its token count: the rows before it get the bits of the whole
    product, the padding rows after it zeros (not their products, which are far from zero here)."""
    n, k, rows = 96, 64, 40
    x, gate, bias = bf16_case(rows, n, k, used)
    up = bf16_case(rows, n, k, used + 1)[1]
    if kernel == "packed_linear":
        x, bias = x.float(), bias.float()
        packs = [reference.pack_linear_weight(w) for w in (gate, up)]
        packed = reference.interleave_panels(*packs) if gated else packs[0]
        args = (gated,)
    else:
        packs = [reference.pack_brgemm_weight(w) for w in (gate, up)]
        packed = torch.cat(packs) if gated else packs[0]
        args = (gated, False)
    bias = bias if gated else bias[:n]
    in_cpp = kernel == "packed_linear" or cpu.has_bf16_gemm()
    namespaces = [torch.ops.splitfuse] + ([torch.ops.splitfuse_cpu] if in_cpp else [])
    for ns in namespaces:
        op = getattr(ns, kernel)
        whole = op(x, packed, bias, n, *args)
        assert whole.abs().amax(1).min() > 0.1  # every row far from zero
        for count in (torch.tensor([used], dtype=torch.int32), torch.tensor([used])):
            got = op(x, packed, bias, n, *args, count)
            assert torch.equal(got[:used], whole[:used])
            assert not got[used:].any()
    if in_cpp:
        with pytest.raises(RuntimeError, match="41 rows in use of 40"):
            getattr(torch.ops.splitfuse_cpu, kernel)(x, packed, bias, n, *args, torch.tensor([41]))


@needs_bf16_gemm
@pytest.mark.parametrize("sizes", [(128, 64, 20), (20, 12)])
def test_bf16_projections_side_by_side_match_each_member(sizes):
    """bf16 members pack for the brgemm kernel, side by side where all but the last fill whole chunks."""
    torch.manual_seed(len(sizes))
    members = [Linear(24, n, bias=True).bfloat16() for n in sizes]
    for m in members:
        m.pack_for_cpu()
        assert m.packed.shape == (-(-m.out_features // BRGEMM_CHUNK), 12, BRGEMM_CHUNK, 2)
    group = Projections(*members)
    group.pack_for_cpu()
    assert (group.packed is not None) == all(n % BRGEMM_CHUNK == 0 for n in sizes[:-1])
    x = torch.randn(5, 24).bfloat16()
    for got, m in zip(group(x), members):
        want = torch.nn.functional.linear(x.double(), m.weight.double(), m.bias.double()).bfloat16()
        torch.testing.assert_close(got, want)


def test_a_compiler_that_fails_leaves_one_sentence_and_the_reference(tmp_path):
    """A build that fails (a compiler without a builtin we use, say) is one line on stderr naming the
    compiler's first error, and the torch reference serves."""
    compiler = tmp_path / "cxx"
    compiler.write_text("#!/bin/sh\necho 'cpu_kernels.cpp:60:1: error: unknown builtin' >&2\nexit 1\n")
    compiler.chmod(0o755)
    code = ("import torch; from splitfuse.kernels import cpu; x = torch.zeros(1, 8)\n"
            "print(cpu.library(), cpu.supports(x))")
    env = {**os.environ, "CXX": str(compiler), "SPLITFUSE_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split() == ["None", "False"], result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("splitfuse:")]
    assert lines == ["splitfuse: the CPU kernels could not be built or loaded here (cpu_kernels.cpp:60:1: error: "
                     "unknown builtin); the slower torch reference serves instead."], result.stderr


def test_bf16_attention_and_linears_serve_where_onednn_computes_no_bf16():
    """oneDNN capped at AVX2 (ONEDNN_MAX_CPU_ISA) leaves ATen's brgemm without bf16, which it then refuses by
    throwing: inside the attention's threads that had ended the process. Here the attention takes its other
    path and matches the reference, the linears are not offered the brgemm kernel, and called anyway it says why."""
    code = """
import torch, sys
sys.path.insert(0, %r)
from test_kernels_cpu import LAYER, paged_batch, reference_attention
from splitfuse.kernels import cpu, reference
assert cpu.library()
batch = paged_batch(3, [300, 1, 1], [300, 410, 20], hq=9, hkv=3, dim=64, block_size=16, dtype=torch.bfloat16)
got = torch.ops.splitfuse_cpu.paged_attention(*batch[:2], LAYER, *batch[2:], 0.3, 0)
torch.testing.assert_close(got.float(), reference_attention(*batch, 0.3, 0).float(), atol=2e-2, rtol=2e-2)
assert not cpu.has_bf16_gemm()
w = reference.pack_brgemm_weight(torch.ones(64, 64, dtype=torch.bfloat16))
try:
    torch.ops.splitfuse_cpu.brgemm_linear(torch.ones(2, 64, dtype=torch.bfloat16), w, None, 64)
except RuntimeError as e:
    print(str(e).splitlines()[0])
""" % os.path.dirname(__file__)
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    result = subprocess.run([sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "does not multiply bf16 here" in result.stdout, result.stdout


@pytest.mark.parametrize("width", [1, 7, 31, 33, 100, 49152])
def test_argmax_rows_gives_torchs_first_maximum(width):
    g = torch.Generator().manual_seed(width)
    rows = torch.randn(12, width, generator=g)
    rows[1] = 0.5                                           # all tied: the first
    rows[2] = torch.randint(0, 3, (width,), generator=g).float()  # many ties of the maximum
    rows[3] = float("-inf")
    rows[4, width // 2] = float("nan")                      # a NaN is the maximum
    rows[5, -1] = float("nan")                              # in the tail past the vectors
    rows[6, -1] = 1e30                                      # the maximum last
    rows[7, :: max(1, width // 5)] = 7.0                    # equal maxima in several lanes and vectors
    rows[8, -1] = rows[8, width // 3] = float("inf")
    rows[9] = -1.0
    rows[9, -1], rows[9, width // 2] = 0.0, -0.0            # -0.0 and 0.0 tie
    rows[10] = float("-inf")
    rows[10, -1] = float("nan")
    rows[11, 0] = rows[11, -1] = float("nan")               # the first NaN
    expected = rows.max(dim=-1).indices
    assert torch.equal(torch.ops.splitfuse_cpu.argmax_rows(rows), expected)
    assert torch.equal(torch.ops.splitfuse_cpu.argmax_rows(rows.t().contiguous().t()), expected)  # strided
    assert torch.equal(ops.argmax_rows(rows), expected)
    assert torch.equal(ops.argmax_rows(rows.bfloat16()), rows.bfloat16().max(dim=-1).indices)  # torch's own
    assert torch.equal(ops.argmax_rows(rows[0]), rows[0].max(dim=-1).indices)
