"""Vision Transformers (vit_t ... vit_h) in Flax, as arcface_torch's backbones/vit.py.

Module names mirror arcface_torch's state-dict keys (`blocks.3.attn.qkv` is
`blocks_3/attn/qkv`, `feature.1` is `feature_1`), so conversion is a table
(jaxface.families).

What changes numbers, all as arcface_torch: 9x9 patches, stride 9, on 112x112 (12x12 = 144
patches, the last 4 pixel rows/columns unused); a learned position embedding; pre-norm blocks
with LayerNorm (eps 1e-5), attention with 8 heads, no qkv bias, scale head_dim**-0.5; an MLP
of ratio 4 with ReLU6 (not GELU); a final LayerNorm; the feature head flattens all 144 tokens,
Linear (no bias) -> BatchNorm1d (eps 2e-5) -> Linear (no bias) -> BatchNorm1d (eps 2e-5).
Training only: random masking of `mask_ratio` of the patches (kept ones go through the blocks,
the others come back as the learned mask token after the final norm) and stochastic depth
with rates rising linearly from 0 to `drop_path_rate` over the blocks. Both draw from the
"dropout" rng stream, the key the train step passes, so they are reproducible and change
from step to step.

Precision: the residual stream, patch embedding, LayerNorms and feature head are float32
(arcface_torch keeps them outside autocast); qkv, proj and the MLP run in the policy's
compute dtype. The attention core is float32 under the fp32 policy, written out with the
policy's matmul precision (see `attention`); under bf16/fp16 it goes through
jax.nn.dot_product_attention, which picks cuDNN's fused kernel on a GPU.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxface.models.layers import BatchNorm
from jaxface.models.names import IMAGE_SIZE, VIT_PATCH, VITS
from jaxface.precision import Policy

# arcface_torch: trunc_normal_(std=.02) on linears, pos_embed, normal(std=.02) on the mask
# token. timm truncates at +-2 absolute, i.e. 100 std: a plain normal is the same law.
_normal02 = nn.initializers.normal(stddev=0.02)
# PyTorch's Conv2d default (patch embedding): U(+-1/sqrt(fan_in)) for weight and bias.
_torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default (Flax's is 1e-6)
FEATURE_BN_EPS = 2e-5


def _torch_default_bias(fan_in: int):
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """torch.linspace(0, rate, depth) in float32, element for element (its two-sided rule)."""
    if depth == 1:
        return [0.0]
    start, end = np.float32(0.0), np.float32(rate)
    step = (end - start) / np.float32(depth - 1)
    out = []
    for i in range(depth):
        value = start + step * np.float32(i) if i < depth // 2 else end - step * (depth - i - 1)
        out.append(float(np.float32(value)))
    return out


def attention(q, k, v, scale: float, policy: Policy) -> jnp.ndarray:
    """Softmax attention over (B, N, heads, head_dim) tensors; output in q's layout.

    jax.nn.dot_product_attention takes no precision argument: for float32 inputs its XLA
    path uses the default precision (TF32 on Ampere and later), so under the fp32 policy the
    same maths is written out here with the policy's precision, in arcface_torch's order:
    (q @ k^T) * scale, softmax, @ v.
    """
    if q.dtype == jnp.float32:
        precision = policy.matmul_precision
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision) * scale
        weights = jax.nn.softmax(logits, axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=precision)
    return jax.nn.dot_product_attention(q, k, v, scale=scale)


def _dense(features: int, dtype, policy: Policy, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=policy.param_dtype,
        kernel_init=_normal02,
        bias_init=nn.initializers.zeros,
        precision=policy.matmul_precision,
        name=name,
    )


def _layer_norm(name: str, dtype=jnp.float32) -> nn.LayerNorm:
    # use_fast_variance=False: mean((x - mean)^2), as PyTorch, not E[x^2] - E[x]^2.
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, use_fast_variance=False, name=name)


def drop_path(module: nn.Module, x: jnp.ndarray, rate: float, train: bool) -> jnp.ndarray:
    """Stochastic depth (timm's DropPath): drop whole samples, scale survivors by 1/keep."""
    if not train or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(
        module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1)
    )
    return x * (mask.astype(x.dtype) / jnp.asarray(keep, x.dtype))


class Attention(nn.Module):
    num_heads: int
    policy: Policy

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        dtype = self.policy.compute_dtype
        qkv = _dense(3 * dim, dtype, self.policy, "qkv", use_bias=False)(x)
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
        out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], head_dim**-0.5, self.policy)
        out = out.reshape(batch, tokens, dim)
        return _dense(dim, dtype, self.policy, "proj")(out)


class Mlp(nn.Module):
    hidden: int
    policy: Policy

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        dtype = self.policy.compute_dtype
        h = jax.nn.relu6(_dense(self.hidden, dtype, self.policy, "fc1")(x))
        return _dense(x.shape[-1], dtype, self.policy, "fc2")(h)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    num_heads: int
    drop_path_rate: float
    policy: Policy

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        dim = x.shape[-1]
        y = Attention(self.num_heads, self.policy, name="attn")(_layer_norm("norm1")(x))
        x = x + drop_path(self, y.astype(x.dtype), self.drop_path_rate, train)
        y = Mlp(int(dim * 4.0), self.policy, name="mlp")(_layer_norm("norm2")(x))
        return x + drop_path(self, y.astype(x.dtype), self.drop_path_rate, train)


class PatchEmbed(nn.Module):
    """9x9 convolution with stride 9, in float32 (outside arcface_torch's autocast)."""

    dim: int
    policy: Policy

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        fan_in = 3 * VIT_PATCH * VIT_PATCH
        return nn.Conv(
            self.dim,
            (VIT_PATCH, VIT_PATCH),
            strides=VIT_PATCH,
            padding="VALID",
            dtype=self.policy.head_dtype,
            param_dtype=self.policy.param_dtype,
            kernel_init=_torch_default_kernel,
            bias_init=_torch_default_bias(fan_in),
            precision=self.policy.matmul_precision,
            name="proj",
        )(x)


class VisionTransformer(nn.Module):
    """Input: normalised float images (N, 112, 112, 3). Output: (N, embedding_size) float32."""

    embed_dim: int = 256
    depth: int = 12
    num_heads: int = 8
    drop_path_rate: float = 0.1
    mask_ratio: float = 0.1
    embedding_size: int = 512
    policy: Policy = Policy("fp32", jnp.float32)
    bn_groups: int | str = 1
    remat: bool = False

    @property
    def num_patches(self) -> int:
        return (IMAGE_SIZE // VIT_PATCH) ** 2

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ValueError(
                f"VisionTransformer expects images of shape (N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3), "
                f"got {x.shape}"
            )
        policy, dim, batch = self.policy, self.embed_dim, x.shape[0]
        f32 = policy.head_dtype
        patches = self.num_patches
        pos_embed = self.param("pos_embed", _normal02, (1, patches, dim), policy.param_dtype)
        mask_token = self.param("mask_token", _normal02, (1, 1, dim), policy.param_dtype)

        x = PatchEmbed(dim, policy, name="patch_embed")(x.astype(f32))
        x = x.reshape(batch, patches, dim) + pos_embed  # row-major patches, as torch's flatten

        masked = train and self.mask_ratio > 0
        if masked:
            keep = int(patches * (1 - self.mask_ratio))  # arcface_torch's rounding
            noise = jax.random.uniform(self.make_rng("dropout"), (batch, patches))
            ids_shuffle = jnp.argsort(noise, axis=1)  # ascending: the smallest noise is kept
            ids_restore = jnp.argsort(ids_shuffle, axis=1)
            x = jnp.take_along_axis(x, ids_shuffle[:, :keep, None], axis=1)

        block = Block
        if self.remat:
            # Keep only each block's input and recompute the rest in the backward pass, as
            # arcface_torch's using_checkpoint (torch.utils.checkpoint per block).
            block = nn.remat(
                Block, static_argnums=(2,), policy=jax.checkpoint_policies.nothing_saveable
            )
        for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.depth)):
            x = block(self.num_heads, rate, policy, name=f"blocks_{i}")(x, train)
        x = _layer_norm("norm", f32)(x.astype(f32))

        if masked:
            tokens = jnp.broadcast_to(mask_token.astype(f32), (batch, patches - keep, dim))
            x = jnp.concatenate([x, tokens], axis=1)
            x = jnp.take_along_axis(x, ids_restore[:, :, None], axis=1)  # unshuffle

        x = x.reshape(batch, patches * dim)
        x = _dense(dim, f32, policy, "feature_0", use_bias=False)(x)
        x = BatchNorm(epsilon=FEATURE_BN_EPS, num_groups=self.bn_groups, dtype=f32,
                      name="feature_1")(x, train)  # fmt: skip
        x = _dense(self.embedding_size, f32, policy, "feature_2", use_bias=False)(x)
        return BatchNorm(epsilon=FEATURE_BN_EPS, num_groups=self.bn_groups, dtype=f32,
                         name="feature_3")(x, train)  # fmt: skip


def get_vit(
    name: str,
    *,
    embedding_size: int = 512,
    policy: Policy | None = None,
    bn_groups: int | str = 1,
    remat: bool = False,
    **overrides,
) -> VisionTransformer:
    """The ViT called `name`, with arcface_torch's arguments; `overrides` (drop_path_rate,
    mask_ratio, depth, ...) replace them, for tests."""
    spec = VITS[name]._asdict() | overrides
    return VisionTransformer(
        **spec,
        embedding_size=embedding_size,
        policy=policy or Policy("fp32", jnp.float32),
        bn_groups=bn_groups,
        remat=remat,
    )
