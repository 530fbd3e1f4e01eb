"""The Diffusion Transformer (DiT, Peebles & Xie 2023): a ViT over image patches conditioned by
adaptive LayerNorm with a zero-initialised gate (adaLN-Zero), a drop-in for the UNet of the
denoising families (``model/net=dit``).

Plain ``nn.Module``: no Lightning, no diffusion math. The call is the UNet's,
``net(x, t, y=None, context=None, context_mask=None)``: x (B, C, H, W) with H = W = image_size,
t (B,) integer or float timesteps on the UNet's scale, y (B,) labels in [0, num_classes) where
label ``num_classes`` (or ``y=None``) is the learned "no class" token used for condition dropout
and classifier-free guidance. Output (B, out_channels or C, H, W).

The pieces (Sec. 3.1-3.2 of the paper):

- patchify: a Conv2d with kernel = stride = patch_size, (B, C, H, W) -> (B, T, hidden) with
  T = (H / p)^2 tokens, plus a 2-D sin-cos (fixed, as DiT/MAE) or learned position embedding;
- conditioning c = MLP(sinusoidal(t)) + Embedding(y), (B, hidden);
- ``depth`` DiT blocks: LayerNorm without affine, then shift/scale from c, multi-head
  self-attention (``F.scaled_dot_product_attention``), a gate from c; the same around the MLP
  (GELU, tanh approximation). The six modulation vectors come from SiLU -> Linear(hidden,
  6 * hidden), zero-initialised, so each block is the identity at initialisation (adaLN-Zero);
- optional cross-attention to a text context (``context_dim``): after self-attention,
  LayerNorm -> attention with queries from the tokens and keys/values from context (B, L,
  context_dim), masked by context_mask (B, L) (True = keep), with a zero-initialised output
  projection so it too is the identity at initialisation (the sub-layer of PixArt-alpha,
  Chen et al. 2023, Sec. 2.3); no context (or every token masked) contributes nothing;
- final layer: adaLN (shift, scale) and Linear(hidden, p^2 * out_channels), both
  zero-initialised (the net outputs zeros at initialisation), then unpatchify.

Initialisation follows the paper's code: xavier_uniform for every Linear (biases zero), the
patch embedding like a Linear (xavier_uniform on its weight flattened to (hidden, C p^2)), the
timestep MLP's weights normal(0, 0.02), the label embedding normal(0, 0.02), a learned position
embedding normal(0, 0.02); then the zeros above.

Sizes (Table 1): DiT-S hidden 384 / depth 12 / 6 heads, DiT-B 768 / 12 / 12, DiT-L 1024 / 24 /
16, DiT-XL 1152 / 28 / 16; "/2" is patch_size 2. Gflops grow with the token count T, i.e. as
1 / p^2 (Sec. 3.3, Fig. 6).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genlab.nets.unet import check_context, timestep_embedding

__all__ = ["DiT", "DiTBlock", "sincos_pos_embed_2d"]


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """The fixed 2-D sin-cos position embedding of MAE/DiT: (grid * grid, dim), row-major
    tokens; half the channels encode the row, half the column (sin then cos of each)."""
    if dim % 4:
        raise ValueError(f"DiT: pos_embed=fixed needs hidden divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def embed(p: torch.Tensor) -> torch.Tensor:  # (T,) -> (T, dim / 2)
        args = p.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    return torch.cat([embed(rows), embed(cols)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, T, D) scaled and shifted per sample by (B, D) vectors (adaLN, Sec. 3.2)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, D) -> (B, heads, T, D / heads)."""
    b, t, d = x.shape
    return x.reshape(b, t, num_heads, d // num_heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, d) -> (B, T, heads * d)."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the tokens: (B, T, D) -> (B, T, D)."""

    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_heads(z, self.num_heads) for z in self.qkv(x).chunk(3, dim=-1))
        return self.proj(_merge(F.scaled_dot_product_attention(q, k, v)))


class CrossAttention(nn.Module):
    """Queries from the tokens (B, T, D), keys and values from a context (B, L, context_dim),
    context_mask (B, L) True = attend. Returns (B, T, D); zero for a sample with no token kept.
    The output projection is zero-initialised by ``DiT``."""

    def __init__(self, hidden: int, context_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(context_dim, 2 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None
    ) -> torch.Tensor:
        q = _heads(self.q(x), self.num_heads)
        k, v = (_heads(z, self.num_heads) for z in self.kv(context).chunk(2, dim=-1))
        if context_mask is None:
            return self.proj(_merge(F.scaled_dot_product_attention(q, k, v)))
        keep = context_mask.bool()
        some = keep.any(dim=1)  # (B,) samples with at least one token to attend to
        attn_mask = (keep | ~some[:, None])[:, None, None, :]  # (B, 1, 1, L); no all-False row
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(_merge(out)) * some[:, None, None].to(out.dtype)  # zero: nothing kept


class DiTBlock(nn.Module):
    """One adaLN-Zero block (Sec. 3.2, Fig. 3): x (B, T, D), c (B, D) -> (B, T, D)."""

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        context_dim: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden, num_heads)
        self.norm_cross = self.cross = None
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
            self.cross = CrossAttention(hidden, context_dim, num_heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        width = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, width),
            nn.GELU(approximate="tanh"),
            nn.Dropout(dropout),
            nn.Linear(width, hidden),
            nn.Dropout(dropout),
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, 1)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        if self.cross is not None and context is not None:
            x = x + self.cross(self.norm_cross(x), context, context_mask)
        return x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then Linear to the patch pixels: (B, T, D) -> (B, T, p^2 C')."""

    def __init__(self, hidden: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


def _check_patch(image_size: int, patch_size: int) -> None:
    if patch_size < 1 or image_size % patch_size:
        divisors = ", ".join(str(d) for d in range(1, image_size) if image_size % d == 0)
        raise ValueError(
            f"DiT: patch_size {patch_size} does not divide image_size {image_size} (the "
            f"{image_size}x{image_size} image would not tile into whole patches); choose "
            f"model.net.patch_size from the divisors of {image_size}: {divisors}"
        )


class DiT(nn.Module):
    """Diffusion Transformer with adaLN-Zero conditioning (Peebles & Xie 2023).

    Args:
        in_channels: image (or latent) channels C.
        image_size: input side H = W; must be a multiple of patch_size.
        patch_size: p; the net sees (image_size / p)^2 tokens.
        hidden: token width D (divisible by num_heads, and by 4 for the fixed pos-embed).
        depth: number of DiT blocks.
        num_heads: attention heads.
        mlp_ratio: MLP width / D.
        num_classes: > 0 adds a class embedding (with an extra "no class" token).
        pos_embed: ``fixed`` (2-D sin-cos, a non-persistent buffer) or ``learned``.
        out_channels: defaults to in_channels (eps/x0/v prediction).
        context_dim: width of a text context for cross-attention; None: no cross-attention.
        dropout: in every MLP.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        patch_size: int = 2,
        hidden: int = 96,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        pos_embed: str = "fixed",
        out_channels: int | None = None,
        context_dim: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        _check_patch(image_size, patch_size)
        if hidden % num_heads:
            raise ValueError(f"DiT: hidden {hidden} is not divisible by num_heads {num_heads}")
        if pos_embed not in ("fixed", "learned"):
            raise ValueError(f"DiT: pos_embed must be 'fixed' or 'learned', got {pos_embed!r}")
        self.in_channels, self.image_size, self.patch_size = in_channels, image_size, patch_size
        self.out_channels = out_channels or in_channels
        self.num_classes, self.context_dim, self.hidden = num_classes, context_dim, hidden
        self.grid = image_size // patch_size
        self.freq_dim = 256  # the sinusoidal width of DiT's TimestepEmbedder
        self.x_embedder = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        if pos_embed == "fixed":
            self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden, self.grid)[None],
                                 persistent=False)  # fmt: skip
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2, hidden))
        self.t_embedder = nn.Sequential(
            nn.Linear(self.freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.y_embedder = nn.Embedding(num_classes + 1, hidden) if num_classes > 0 else None
        self.blocks = nn.ModuleList(
            DiTBlock(hidden, num_heads, mlp_ratio, context_dim, dropout) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The paper code's initialisation, then adaLN-Zero (see the module docstring)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        zero = [b.adaLN_modulation[-1] for b in self.blocks]
        zero += [b.cross.proj for b in self.blocks if b.cross is not None]
        zero += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p^2 C') -> (B, C', H, W)."""
        b, g, p, c = x.shape[0], self.grid, self.patch_size, self.out_channels
        x = x.reshape(b, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, g * p, g * p)

    def _check_inputs(self, x, context, context_mask) -> None:
        if tuple(x.shape[1:]) != (self.in_channels, self.image_size, self.image_size):
            size = f"{self.in_channels}x{self.image_size}x{self.image_size}"
            raise ValueError(f"DiT: built for (B, {size}) inputs, got {tuple(x.shape)}")
        check_context("DiT", self.context_dim, context, context_mask)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C, H, W), t (B,) timesteps, y (B,) labels or None, context (B, L,
        context_dim) or None, context_mask (B, L) bool or None -> (B, C', H, W)."""
        self._check_inputs(x, context, context_mask)
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, T, D)
        c = self.t_embedder(timestep_embedding(t, self.freq_dim).to(h.dtype))  # (B, D)
        if self.y_embedder is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            c = c + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c, context, context_mask)
        return self.unpatchify(self.final_layer(h, c))  # (B, C', H, W)

    def extra_repr(self) -> str:
        tokens = self.grid**2
        return f"patch_size={self.patch_size}, tokens={tokens}, depth={len(self.blocks)}"
