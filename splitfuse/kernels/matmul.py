"""A batch-invariant linear layer for deterministic engines on GPU (EngineConfig.deterministic):
out = x @ weight^T + bias with one tile shape for every row count, each output tile computed by one
program that walks K in order (no split-K, no autotuning). A row's result then does not depend on how
many rows share the call, which cuBLAS does not promise: it picks its kernel, split-K included, from the
shape. The method is the batch-invariant matmuls' of vLLM's batch-invariant mode and SGLang's
deterministic inference; this kernel is the plain, non-persistent form of it."""
import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _linear_kernel(x, w, bias, out, M, N, K,
                   stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        a = tl.load(x + rm[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0).to(DOT_DTYPE)
        b = tl.load(w + rn[None, :] * stride_wn + k[:, None] * stride_wk,
                    mask=(rn[None, :] < N) & (k[:, None] < K), other=0.0).to(DOT_DTYPE)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(out.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  fp32_out: bool = False) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T (+ bias [N]), fp32 accumulation, in x's dtype (fp32 with fp32_out)."""
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or (bias is not None and bias.shape != weight.shape[:1]):
        raise ValueError(f"expected x [..., K], weight [N, K] and bias [N]; got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, {None if bias is None else tuple(bias.shape)}")
    rows = x.reshape(-1, x.shape[-1])
    (M, K), N = rows.shape, weight.shape[0]
    out = torch.empty(M, N, dtype=torch.float32 if fp32_out else x.dtype, device=x.device)
    if M == 0:
        return out.view(*x.shape[:-1], N)
    # As in attention.py: Triton's CPU interpreter multiplies bf16 operands' bits as integers, so there
    # they are widened to fp32 first.
    dot_dtype = tl.float32 if x.device.type == "cpu" else _TL_DTYPES[x.dtype]
    _linear_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))](
        rows, weight, bias if bias is not None else out, out, M, N, K,
        *rows.stride(), *weight.stride(), *out.stride(),
        HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        DOT_DTYPE=dot_dtype, DOT_PRECISION="ieee" if dot_dtype == tl.float32 else "tf32", num_warps=4)
    return out.view(*x.shape[:-1], N)
