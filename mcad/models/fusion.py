"""Single-stream fusion model (ALBEF/BLIP-style): text tokens attend to image tokens through
cross-attention layers; the fused [CLS] feature h and an image-text matching logit m come out.

Its encoders are a dual-stream model's towers (the fusion layers sit on the final dual teacher,
which is what made the fusion model beat the dual one in the feasibility run)."""
from __future__ import annotations

import torch
from torch import nn

from mcad.models.dual import DualEncoder
from mcad.models.layers import Block


@torch.no_grad()
def score_pairs(fuse, img_tok: torch.Tensor, txt_tok: torch.Tensor, ids: torch.Tensor,
                img_idx: torch.Tensor, txt_idx: torch.Tensor, batch_size: int = 1024):
    """h and m of any single-stream model's `fuse` for arbitrary (image, text) index pairs over
    precomputed token sequences, in chunks."""
    hs, ms = [], []
    for s in range(0, len(img_idx), batch_size):
        i, t = img_idx[s:s + batch_size], txt_idx[s:s + batch_size]
        h, m = fuse(img_tok[i], txt_tok[t], ids[t])
        hs.append(h)
        ms.append(m)
    return torch.cat(hs), torch.cat(ms)


class FusionModel(nn.Module):
    kind = "fusion"

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.dual = DualEncoder(config["dual"])
        f = config["fusion"]
        width, heads = int(f["width"]), int(f["heads"])
        self.width = width
        self.img_in = nn.Linear(self.dual.visual.width, width)
        self.img_ln = nn.LayerNorm(width)
        # where each image token sits: the relation words ("left of") need it, and a conv grid's
        # tokens do not carry it (a ViT's already do, the added term is learned either way)
        visual = self.dual.visual
        self.img_pos = nn.Parameter(torch.zeros(1, visual.n_tokens + int(hasattr(visual, "cls")), width))
        self.txt_in = nn.Linear(self.dual.text.width, width)
        self.cls = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, f.get("mlp_ratio", 4.0), cross_dim=width)
                                    for _ in range(int(f["layers"])))
        self.ln = nn.LayerNorm(width)
        self.itm = nn.Linear(width, 1)
        self.pad_id = self.dual.text.pad_id
        self.freeze_towers = bool(config.get("freeze_towers", True))
        if self.freeze_towers:
            self.dual.requires_grad_(False)

    # what it sees of an image is what its towers see (mcad.preprocess.model_input)
    @property
    def image_size(self) -> int:
        return self.dual.image_size

    @property
    def image_mean(self) -> tuple:
        return self.dual.image_mean

    @property
    def image_std(self) -> tuple:
        return self.dual.image_std

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_towers:
            self.dual.eval()  # frozen towers keep their BatchNorm statistics
        return self

    # -- token sequences (computed once per image / caption, reused for every pair) -------------
    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.dual.visual.forward_tokens(pixels)

    def text_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dual.text.forward_tokens(ids)

    def fuse(self, img_tok: torch.Tensor, txt_tok: torch.Tensor, ids: torch.Tensor):
        """Paired rows: returns (h [B, width], m [B])."""
        # trailing padding is masked out of every attention: dropping the all-padding columns
        # gives the same h and m at a fraction of the cost (captions are far shorter than the context)
        keep = (ids != self.pad_id).any(0).nonzero()
        n = int(keep.max()) + 1 if len(keep) else 1
        if n < ids.shape[1]:
            ids, txt_tok = ids[:, :n], txt_tok[:, :n]
        ctx = self.img_ln(self.img_in(img_tok) + self.img_pos)
        x = torch.cat([self.cls.expand(txt_tok.shape[0], -1, -1), self.txt_in(txt_tok)], dim=1)
        pad = torch.cat([torch.zeros_like(ids[:, :1], dtype=torch.bool), ids == self.pad_id], dim=1)
        bias = (pad.to(x.dtype) * -1e4)[:, None, None, :]
        for b in self.blocks:
            x = b(x, bias=bias, context=ctx)
        h = self.ln(x[:, 0])
        return h, self.itm(h).squeeze(-1)

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor):
        return self.fuse(self.image_tokens(pixels), self.text_tokens(ids), ids)

    def score_pairs(self, img_tok, txt_tok, ids, img_idx, txt_idx, batch_size: int = 1024):
        return score_pairs(self.fuse, img_tok, txt_tok, ids, img_idx, txt_idx, batch_size)

    # the fusion model can also produce candidates through its own dual encoders
    def encode_image(self, pixels, normalize: bool = True):
        return self.dual.encode_image(pixels, normalize)

    def encode_text(self, ids, normalize: bool = True):
        return self.dual.encode_text(ids, normalize)
