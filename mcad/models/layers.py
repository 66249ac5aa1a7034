"""Building blocks written with plain matmul/softmax/layer-norm so every exporter (ExecuTorch
XNNPACK/QNN/MediaTek, LiteRT, ONNX) lowers them without custom kernels."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    # rsqrt of a sum instead of F.normalize: F.normalize exports an Expand that breaks ONNX
    # Runtime's symbolic shape inference during quantization pre-processing.
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """bias: additive attention bias broadcastable to [B, heads, Lq, Lk] (0 or -inf-like)."""
        B, Lq, D = x.shape
        kv = x if kv is None else kv
        Lk = kv.shape[1]
        q = self.q(x).reshape(B, Lq, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(kv).reshape(B, Lk, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        if bias is not None:
            att = att + bias
        att = att.softmax(dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(B, Lq, D))


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: float = 4.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * ratio))
        self.fc2 = nn.Linear(int(dim * ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LN transformer block, optionally with cross-attention to a second sequence."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, cross_dim: int | None = None):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.cross = None
        if cross_dim is not None:
            self.ln_x = nn.LayerNorm(dim)
            self.cross = Attention(dim, heads, kv_dim=cross_dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x, bias=None, context=None, context_bias=None):
        x = x + self.attn(self.ln1(x), bias=bias)
        if self.cross is not None:
            x = x + self.cross(self.ln_x(x), kv=context, bias=context_bias)
        return x + self.mlp(self.ln2(x))


class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1, act: bool = True):
        layers = [nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)
