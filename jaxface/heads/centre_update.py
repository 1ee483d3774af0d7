"""The dense head's SGD step without its [C, E] gradient ever being written.

With every class scored (sample_rate 1) autodiff writes the centres' gradient, a float32
[C, E] matrix (1.27 GB at 617,970 classes), which the optimizer then reads once to update
the centres and their momentum. Here the step differentiates with respect to the cosines
instead (`dcos`, [B, C]) and the update rebuilds each block of the gradient where it is
used, from three small inputs, in one kernel that reads W and m and writes them in place.

The centres' gradient, for cos_bj = (e_b . W_j) / |W_j| with e_b the normalised embedding
(`partial_fc.loss_on_device`; |W_j| clamped at 1e-12 as torch's normalize):

    G_j = u * (sum_b s_bj e_b + c_j W_j),   s_bj = dcos_bj / |W_j|,
    c_j = -sum_b s_bj cos_bj / |W_j|       (0 where the clamp holds)

where s is the matrix autodiff forms anyway for the embeddings' gradient (s W), so it is
written once for both, and u is 1 / the fp16 loss scale (1 otherwise). The update is
`jaxface.fused_sgd`'s, in its order (torch.optim.SGD's):

    d = G + wd * W;  m <- d + mu * m;  W <- W + step_size * m   (step_size = -lr)

A skipped fp16 step (`apply` 0) writes W and m back unchanged.

On NVIDIA GPUs the update is a Pallas (Triton) kernel over [64-row, 128-column] blocks of
W: the block's gradient is a [64, B] x [B, 128] product accumulated in float32 (TF32 inputs
under the default precision, full float32 under `HIGHEST`, as XLA's dot). Elsewhere, and
for shapes the kernel does not tile (E not a multiple of 128, a batch not a multiple of 32),
`reference` computes the same formula with XLA (which writes G).
`--config.fused_head_update=false` differentiates the centres themselves instead (the step
of before), and the trainer falls back to it by itself if the kernel does not compile.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BLOCK_ROWS = 64
BLOCK_COLS = 128
# Samples of s and e per step of the kernel's product: shared memory bounds it. 32 keeps a
# step's tiles (8 KB of s, 16 KB of e, two stages in flight) well inside the ~100 KB of the
# smallest NVIDIA GPUs' shared memory per block.
BATCH_CHUNK = 32
NORM_CLAMP = 1e-24  # torch.nn.functional.normalize's eps (1e-12), squared


def row_terms(dcos, cos, inv_norm, sum_sq, dtype=jnp.float32):
    """(s, c, finite) of the module docstring (u = 1) for one device's rows. dcos, cos:
    [B, R] float32 (the loss's gradient with respect to the cosines, the cosines before
    clipping); inv_norm, sum_sq: [R]. s is rounded to `dtype` (`Policy.cosine_grad_dtype`)
    as `partial_fc.loss_on_device` rounds the same cotangent, and c is formed from the
    rounded s, so that G_j stays orthogonal to W_j. `finite`: s is (an overflow or a NaN in
    s makes a column sum of s * cos non-finite; taken there, the check reads nothing more)."""
    # s as autodiff forms the cotangent of `x * inv_norm`, so that XLA forms it once. c is
    # read from s as stored: formed beside a rounded s in one kernel, XLA wrote the float32
    # dcos first (0.32 GB for r50 on one GPU); from memory it costs reads the write saves.
    s = (dcos * inv_norm).astype(dtype)
    stored = jax.lax.optimization_barrier(s)
    column = jnp.sum(stored.astype(jnp.float32) * cos, axis=0)
    c = jnp.where(sum_sq > NORM_CLAMP, -inv_norm * column, 0.0)
    return s, c, jnp.all(jnp.isfinite(column))


def hyper_vector(step_size, momentum, weight_decay, apply, unscale):
    """The kernel's scalars as one float32 [8] vector (Triton blocks are powers of two)."""
    values = [step_size, momentum, weight_decay, apply, unscale, 0.0, 0.0, 0.0]
    return jnp.stack([jnp.asarray(v, jnp.float32) for v in values])


def reference(s, emb, w, m, c, hyper, precision=None):
    """(new W, new m) with XLA ops; `hyper` from `hyper_vector`."""
    step_size, momentum, wd, apply, unscale = (hyper[k] for k in range(5))
    g = unscale * (jnp.dot(s.T.astype(jnp.float32), emb, precision=precision) + c[:, None] * w)
    m_next = (g + wd * w) + momentum * m
    w_next = w + step_size * m_next
    keep = apply == 0
    return jnp.where(keep, w, w_next), jnp.where(keep, m, m_next)


def _chunk(batch: int) -> int:
    return min(batch, BATCH_CHUNK)


def kernel_fits(s_shape, emb_shape) -> bool:
    """True if the Pallas kernel tiles these shapes (Triton tiles are powers of two)."""
    batch, rows = s_shape
    dim = emb_shape[1]
    chunk = _chunk(batch)
    return (
        chunk >= 16
        and chunk & (chunk - 1) == 0
        and batch % chunk == 0
        and rows % BLOCK_ROWS == 0
        and dim % BLOCK_COLS == 0
    )


def _kernel(s_ref, emb_ref, w_ref, m_ref, c_ref, hyper_ref, w_out, m_out, *, precision):
    # [B, 64]^T x [B, 128]: this block's part of sum_b s_bj e_b, float32 accumulation, taken
    # BATCH_CHUNK samples at a time (the whole global batch at once overflows shared memory).
    chunk = _chunk(s_ref.shape[0])

    def add_chunk(k, acc):
        part = pl.ds(k * chunk, chunk)
        return acc + jax.lax.dot_general(
            s_ref[part, :].astype(jnp.float32),
            emb_ref[part, :],
            (((0,), (0,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )

    zeros = jnp.zeros((BLOCK_ROWS, BLOCK_COLS), jnp.float32)
    prod = jax.lax.fori_loop(0, s_ref.shape[0] // chunk, add_chunk, zeros)
    step_size, momentum, wd, apply, unscale = (hyper_ref[k] for k in range(5))
    w = w_ref[...]
    m = m_ref[...]
    g = unscale * (prod + c_ref[...][:, None] * w)
    m_next = (g + wd * w) + momentum * m
    w_next = w + step_size * m_next
    keep = apply == 0
    m_out[...] = jnp.where(keep, m, m_next)
    w_out[...] = jnp.where(keep, w, w_next)


def pallas_update(s, emb, w, m, c, hyper, precision=None, interpret=False):
    """`reference` as one kernel writing W and m in place (inputs 2 and 3 aliased)."""
    rows, dim = w.shape
    batch = s.shape[0]
    row = pl.BlockSpec((BLOCK_ROWS,), lambda i, j: (i,))
    block = pl.BlockSpec((BLOCK_ROWS, BLOCK_COLS), lambda i, j: (i, j))
    return pl.pallas_call(
        partial(_kernel, precision=precision),
        out_shape=(jax.ShapeDtypeStruct(w.shape, w.dtype), jax.ShapeDtypeStruct(m.shape, m.dtype)),
        grid=(rows // BLOCK_ROWS, dim // BLOCK_COLS),
        in_specs=[
            pl.BlockSpec((batch, BLOCK_ROWS), lambda i, j: (0, i)),
            pl.BlockSpec((batch, BLOCK_COLS), lambda i, j: (0, j)),
            block,
            block,
            row,
            pl.BlockSpec((8,), lambda i, j: (0,)),
        ],
        out_specs=(block, block),
        input_output_aliases={2: 0, 3: 1},
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="centre_sgd_update",
    )(s, emb, w, m, c, hyper)


def update(s, emb, w, m, c, hyper, *, precision=None, kernel: bool):
    """One device's centres and momentum after the step: the kernel if `kernel` and the
    shapes tile, else `reference`."""
    if kernel and kernel_fits(s.shape, emb.shape):
        return pallas_update(s, emb, w, m, c, hyper, precision)
    return reference(s, emb, w, m, c, hyper, precision)
