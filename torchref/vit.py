"""Vision Transformers (vit_t ... vit_h), module for module arcface_torch's backbones/vit.py.

State-dict keys, their order and shapes are arcface_torch's, so its released weights load
with strict=True; timm is not needed (DropPath and the truncated normal are written here).

Autocast: arcface_torch's ViT ignores cfg.fp16 and always autocasts qkv, proj and the MLP
on CUDA (attention core, norms, patch embedding and feature head stay float32). torchref
autocasts the same regions only when `fp16` is set, so fp32 runs stay float32 throughout.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from jaxface.models.names import IMAGE_SIZE, VIT_PATCH, VITS


def _trunc_normal_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    # timm's trunc_normal_ cuts at +-2 absolute: 100 std at std 0.02.
    return nn.init.trunc_normal_(tensor, std=std, a=-2.0, b=2.0)


class DropPath(nn.Module):
    """Stochastic depth per sample, survivors scaled by 1/keep (timm's DropPath)."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, autocast: dict):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.autocast = autocast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        with torch.autocast(x.device.type, **self.autocast):
            qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
            qkv = qkv.permute(2, 0, 3, 1, 4)  # [3, B, heads, N, head_dim]
        q, k, v = qkv[0].float(), qkv[1].float(), qkv[2].float()
        weights = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(batch, tokens, dim)
        with torch.autocast(x.device.type, **self.autocast):
            return self.proj(out)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, drop_path: float, autocast: dict):
        super().__init__()
        # Registration order = arcface_torch's state-dict order: norm1, norm2, attn, mlp.
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, autocast)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * 4.0))
        self.autocast = autocast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        with torch.autocast(x.device.type, **self.autocast):
            return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.num_patches = (IMAGE_SIZE // VIT_PATCH) ** 2
        self.proj = nn.Conv2d(3, dim, VIT_PATCH, stride=VIT_PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"expected (N, 3, 112, 112) images, got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, 144, dim], row-major patches


class VisionTransformer(nn.Module):
    """Input: normalised float images (N, 3, 112, 112). Output: (N, num_features)."""

    def __init__(
        self,
        embed_dim: int = 256,
        depth: int = 12,
        num_heads: int = 8,
        drop_path_rate: float = 0.1,
        mask_ratio: float = 0.1,
        num_features: int = 512,
        using_checkpoint: bool = False,
        fp16: bool = False,
        autocast_dtype: torch.dtype = torch.float16,
    ):
        super().__init__()
        autocast = {"dtype": autocast_dtype, "enabled": fp16}
        self.embed_dim = embed_dim
        self.mask_ratio = mask_ratio
        self.using_checkpoint = using_checkpoint
        self.patch_embed = PatchEmbed(embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        rates = [r.item() for r in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, r, autocast) for r in rates])
        self.norm = nn.LayerNorm(embed_dim)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=2e-5),
            nn.Linear(embed_dim, num_features, bias=False),
            nn.BatchNorm1d(num_features, eps=2e-5),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        _trunc_normal_(self.pos_embed)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                _trunc_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _random_masking(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a random int(L * (1 - mask_ratio)) tokens per sample; also the unshuffle."""
        batch, length, dim = x.shape
        keep = int(length * (1 - self.mask_ratio))
        ids_shuffle = torch.argsort(torch.rand(batch, length, device=x.device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, dim))
        return kept, ids_restore

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        x = self.patch_embed(x) + self.pos_embed
        masked = self.training and self.mask_ratio > 0
        if masked:
            x, ids_restore = self._random_masking(x)
        for block in self.blocks:
            if self.using_checkpoint and self.training:
                # Non-reentrant: works under DDP without arcface_torch's _set_static_graph().
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.norm(x.float())
        if masked:
            tokens = self.mask_token.repeat(batch, ids_restore.shape[1] - x.shape[1], 1)
            x = torch.cat([x, tokens], dim=1)
            x = torch.gather(x, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[2]))
        return self.feature(x.reshape(batch, self.num_patches * self.embed_dim))


def get_vit(
    name: str,
    *,
    num_features: int = 512,
    fp16: bool = False,
    autocast_dtype: torch.dtype = torch.float16,
    **overrides,
) -> VisionTransformer:
    """The ViT `name` with arcface_torch's arguments (vit_b and larger checkpoint their
    blocks, as there); `overrides` (mask_ratio, drop_path_rate, ...) replace them."""
    spec = VITS[name]._asdict() | {"using_checkpoint": VITS[name].depth >= 24} | overrides
    return VisionTransformer(
        **spec, num_features=num_features, fp16=fp16, autocast_dtype=autocast_dtype
    )
