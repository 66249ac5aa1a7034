"""Image and text towers. Each returns a pooled feature and can expose its token sequence (the
fusion model attends over the image tokens and text tokens)."""
from __future__ import annotations

import torch
from torch import nn

from mcad.models.layers import Attention, Block, ConvBNAct


class ConvImageTower(nn.Module):
    """Small conv net (plain or depthwise-separable stages), stride 2 per stage."""

    def __init__(self, image_size: int = 64, widths=(32, 64, 128, 256), depths=(1, 1, 1, 1),
                 separable: bool = False, pool: str = "avg", heads: int = 4):
        super().__init__()
        self.image_size = image_size
        layers: list[nn.Module] = [ConvBNAct(3, widths[0], stride=2)]
        cin = widths[0]
        for i, (w, d) in enumerate(zip(widths, depths)):
            for j in range(d):
                stride = 2 if (j == 0 and i > 0) else 1
                if separable:
                    layers += [ConvBNAct(cin, cin, stride=stride, groups=cin),
                               nn.Sequential(nn.Conv2d(cin, w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))]
                else:
                    layers.append(ConvBNAct(cin, w, stride=stride))
                cin = w
        self.body = nn.Sequential(*layers)
        self.width = cin
        self.grid = image_size // (2 ** len(widths))
        self.n_tokens = self.grid * self.grid
        self.pool = pool
        if pool == "attn":
            # Position-aware attention pooling (as CLIP's AttentionPool2d): lets the pooled feature
            # keep where things are, which average pooling throws away.
            self.pos = nn.Parameter(torch.randn(1, self.n_tokens + 1, cin) * 0.02)
            self.pool_attn = Attention(cin, heads)
            self.pool_ln = nn.LayerNorm(cin)
        elif pool != "avg":
            raise ValueError(f"unknown pool {pool!r} (avg, attn)")

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x)
        return f.flatten(2).transpose(1, 2)  # [B, h*w, C]

    def pool_tokens(self, t: torch.Tensor) -> torch.Tensor:
        if self.pool == "avg":
            return t.mean(dim=1)
        q = t.mean(dim=1, keepdim=True)
        seq = torch.cat([q, t], dim=1) + self.pos
        seq = self.pool_ln(seq)
        return self.pool_attn(seq[:, :1], kv=seq)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool_tokens(self.forward_tokens(x))


class ViTImageTower(nn.Module):
    def __init__(self, image_size: int = 64, patch_size: int = 8, width: int = 128, layers: int = 4,
                 heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size = image_size
        self.patch = nn.Conv2d(3, width, patch_size, patch_size)
        self.n_tokens = (image_size // patch_size) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, self.n_tokens + 1, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.width = width

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens, [CLS] first."""
        p = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(p.shape[0], -1, -1), p], dim=1) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.ln(x)

    def pool_tokens(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool_tokens(self.forward_tokens(x))


class TextTower(nn.Module):
    """Causal transformer; the sentence feature is the output at the single <eot> position.

    Pooling multiplies by (ids == eot_id) and sums, which exports everywhere; the causal mask is a
    constant, so padding after <eot> never reaches the pooled feature and no padding mask is needed.
    For the same reason ids cut to any length that still holds the <eot> give the same feature as
    the full context: a query program may be traced at the length its queries need.
    """

    def __init__(self, vocab_size: int = 512, context_length: int = 24, width: int = 128,
                 layers: int = 3, heads: int = 4, mlp_ratio: float = 4.0, eot_id: int = 2, pad_id: int = 0):
        super().__init__()
        self.vocab_size, self.context_length = vocab_size, context_length
        self.eot_id, self.pad_id = eot_id, pad_id
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(1, context_length, width) * 0.01)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.width = width
        causal = torch.full((context_length, context_length), -1e4).triu(1)
        self.register_buffer("causal_bias", causal.view(1, 1, context_length, context_length), persistent=False)

    def forward_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]  # the full context, or a prefix of it (static under export: a traced length)
        pos, bias = self.pos, self.causal_bias
        if n != self.context_length:  # the full context's graph stays what it was (no slice ops)
            pos, bias = pos[:, :n], bias[:, :, :n, :n]
            if not (torch.compiler.is_exporting() or torch.compiler.is_compiling()) \
                    and not bool((ids == self.eot_id).any(dim=1).all()):
                # cut before its <eot>, a row would pool to nothing: a caller's bug, not a zero vector
                raise ValueError(f"text ids cut to {n} of {self.context_length} positions lose a row's <eot>: "
                                 f"cut at the longest query's length or more")
        x = self.tok(ids) + pos
        for b in self.blocks:
            x = b(x, bias=bias)
        return self.ln(x)

    def pool_tokens(self, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        eot = (ids == self.eot_id).to(t.dtype).unsqueeze(-1)
        return (t * eot).sum(dim=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.pool_tokens(self.forward_tokens(ids), ids)


def build_image_tower(cfg: dict) -> nn.Module:
    cfg = dict(cfg)
    kind = cfg.pop("type", "conv")
    if kind == "conv":
        return ConvImageTower(**cfg)
    if kind == "vit":
        return ViTImageTower(**cfg)
    raise ValueError(f"unknown image tower type {kind!r} (conv, vit)")


def build_text_tower(cfg: dict) -> nn.Module:
    cfg = dict(cfg)
    kind = cfg.pop("type", "transformer")
    if kind != "transformer":
        raise ValueError(f"unknown text tower type {kind!r} (transformer)")
    return TextTower(**cfg)
