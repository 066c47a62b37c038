"""Attention modules of an MLGKA layer, on the native ops.

Variants (``attention_type``):
- ``standard`` / ``mha``: H query, key and value heads of width d_model / H.
- ``gqa``: H query heads sharing Hkv key/value heads (H % Hkv == 0), never repeated in memory.
- ``mla``: DeepSeek-V2 multi-head latent attention (DeepSeek-AI 2024, section 2.1): keys and
  values come from a shared latent c_kv = W_dkv x of rank r_kv (k_nope = W_uk c_kv,
  v = W_uv c_kv), queries optionally from a latent of rank r_q; a decoupled RoPE key of
  ``rope_head_dim`` features (one per token, shared by all heads) is concatenated with each head's
  content key, so the attention op runs with Dqk = head_dim + rope_head_dim != Dv.
- ``kernel``: linear attention with a feature map (``kernel_type``), O(S) in sequence length.
- ``mlgka``: latent KV (rank r_kv) + grouped heads (Hkv), softmax attention, or linear
  attention when ``kernel_type`` is given.

Layout: x [B, S, d_model]; heads are computed as [B, S, H, D] and viewed as [B, H, S, D] (the
ops read strided views). Rotated features come first in a head ([rope | content]) because the
rope op rotates the leading ``rotary_dim`` features.

``reference=True`` runs the same weights through plain PyTorch (SDPA with repeated K/V, explicit
RoPE, explicit linear attention): the oracle the tests compare with.

Incremental decoding: :meth:`Attention.forward_cached` takes a :class:`KVCache` holding the keys
(after RoPE, before any feature map) and values of the positions already seen, [B, Hkv, T, D];
new positions are rotated at offset T, appended, and attend to all T + S keys (bottom-right
causal alignment). A first call on an empty cache is exactly :meth:`Attention.forward`; later
calls compute the few new query rows in plain PyTorch, since the native attention op needs as
many queries as keys.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from stackwise import ops
from stackwise.exceptions import ModelError
from stackwise.model.feature_maps import make_feature_map
from stackwise.ops import reference

ATTENTION_TYPES = ("standard", "mha", "gqa", "mla", "kernel", "mlgka")
ATTENTION_MODES = ("causal", "bidirectional")


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight on the native op (fp32 statistics)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.reference = False

    def forward(self, x: Tensor) -> Tensor:
        if self.reference:
            return reference.rms_norm_reference(x, self.weight, self.eps).to(x.dtype)
        return ops.rms_norm(x, self.weight, self.eps)


class KVCache:
    """Keys and values of the positions one attention layer has already processed.

    ``k`` [B, Hkv, T, Dqk] (rotated, no feature map) and ``v`` [B, Hkv, T, Dv]; empty at first.
    """

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else int(self.k.shape[2])

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add the new positions; returns all keys and values so far."""
        k, v = k.detach().contiguous(), v.detach().contiguous()
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
        return self.k, self.v


class Attention(nn.Module):
    """Self-attention of one block; see the module docstring for the variants.

    Args:
        d_model, n_heads, n_kv_heads: widths (n_kv_heads defaults to n_heads).
        attention_type, attention_mode: as in :data:`ATTENTION_TYPES` / :data:`ATTENTION_MODES`.
        use_rope, rope_theta, max_seq_len: rotary embedding of q/k (MLA always rotates its
            decoupled dims).
        q_rank, kv_rank, rope_head_dim, v_head_dim: MLA / MLGKA latent sizes.
        kernel_type, kernel_dim, kernel_seed: feature map of kernel attention.
        dropout: on the output projection.
        head_dim: width of one head (standard / mha / gqa only); None means d_model / n_heads.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        attention_type: str = "standard",
        attention_mode: str = "causal",
        use_rope: bool = False,
        rope_theta: float = 10000.0,
        max_seq_len: int = 2048,
        q_rank: int = 0,
        kv_rank: int = 256,
        rope_head_dim: int = 32,
        v_head_dim: int | None = None,
        kernel_type: str | None = None,
        kernel_dim: int = 64,
        kernel_seed: int = 0,
        dropout: float = 0.0,
        norm_eps: float = 1e-6,
        head_dim: int | None = None,
    ) -> None:
        super().__init__()
        if attention_type not in ATTENTION_TYPES:
            raise ModelError(f"attention_type {attention_type!r} is not one of {ATTENTION_TYPES}")
        if attention_mode not in ATTENTION_MODES:
            raise ModelError(f"attention_mode {attention_mode!r} is not one of {ATTENTION_MODES}")
        n_kv_heads = n_kv_heads or n_heads
        if head_dim is not None and attention_type not in ("standard", "mha", "gqa"):
            raise ModelError(
                f"an explicit head_dim needs attention_type standard, mha or gqa, "
                f"not {attention_type!r}"
            )
        if head_dim is not None and head_dim <= 0:
            raise ModelError(f"head_dim must be positive, got {head_dim}")
        if head_dim is None and d_model % n_heads:
            raise ModelError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        if n_heads % n_kv_heads:
            raise ModelError(f"n_heads {n_heads} is not divisible by n_kv_heads {n_kv_heads}")
        if attention_type in ("standard", "mha", "mla", "kernel"):
            n_kv_heads = n_heads if attention_type != "kernel" else n_kv_heads
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = head_dim if head_dim is not None else d_model // n_heads
        self.attention_type = attention_type
        self.causal = attention_mode == "causal"
        self.use_rope = use_rope or attention_type == "mla"
        self.rope_theta, self.max_seq_len = rope_theta, max_seq_len
        self.reference = False
        hd, h, hkv = self.head_dim, n_heads, n_kv_heads
        self.latent = attention_type in ("mla", "mlgka")
        if attention_type == "kernel" and kernel_type is None:
            kernel_type = "elu"
        self.kernel_type = kernel_type if attention_type in ("kernel", "mlgka") else None
        if self.use_rope and hd % 2:
            raise ModelError(f"RoPE needs an even head dim, got {hd}")

        if attention_type == "mla":
            if rope_head_dim <= 0 or rope_head_dim % 2:
                raise ModelError(f"mla rope_head_dim must be even and > 0, got {rope_head_dim}")
            self.rope_dim = rope_head_dim
            self.v_dim = v_head_dim or hd
            qk = hd + rope_head_dim
            if q_rank > 0:
                self.q_down = nn.Linear(d_model, q_rank, bias=False)
                self.q_norm = RMSNorm(q_rank, norm_eps)
                self.q_up = nn.Linear(q_rank, h * qk, bias=False)
            else:
                self.q_proj = nn.Linear(d_model, h * qk, bias=False)
            self.kv_down = nn.Linear(d_model, kv_rank, bias=False)
            self.kv_norm = RMSNorm(kv_rank, norm_eps)
            self.k_up = nn.Linear(kv_rank, h * hd, bias=False)
            self.v_up = nn.Linear(kv_rank, h * self.v_dim, bias=False)
            self.k_rope = nn.Linear(d_model, rope_head_dim, bias=False)
            self.o_proj = nn.Linear(h * self.v_dim, d_model, bias=False)
        else:
            self.rope_dim = hd if self.use_rope else 0
            self.v_dim = hd
            self.q_proj = nn.Linear(d_model, h * hd, bias=False)
            if attention_type == "mlgka":
                self.kv_down = nn.Linear(d_model, kv_rank, bias=False)
                self.kv_norm = RMSNorm(kv_rank, norm_eps)
                self.k_up = nn.Linear(kv_rank, hkv * hd, bias=False)
                self.v_up = nn.Linear(kv_rank, hkv * hd, bias=False)
            else:
                self.k_proj = nn.Linear(d_model, hkv * hd, bias=False)
                self.v_proj = nn.Linear(d_model, hkv * hd, bias=False)
            self.o_proj = nn.Linear(h * hd, d_model, bias=False)
        if self.kernel_type is not None:
            self.feature_map = make_feature_map(self.kernel_type, hd, kernel_dim, kernel_seed)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    # -- pieces -----------------------------------------------------------------------------------

    def set_reference(self, flag: bool) -> None:
        """Run through plain PyTorch (True) or the native ops (False)."""
        self.reference = flag
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.reference = flag

    def _tables(self, device: torch.device, needed: int) -> tuple[Tensor, Tensor]:
        return ops.rope_tables(
            max(self.max_seq_len, needed), self.rope_dim, self.rope_theta, device=device
        )

    def _rope(self, q: Tensor, k: Tensor, offset: int) -> tuple[Tensor, Tensor]:
        cos, sin = self._tables(q.device, offset + q.shape[2])
        if self.reference:
            qr, kr = reference.rope_reference(q, k, cos, sin, self.rope_dim, offset)
            return qr.to(q.dtype), kr.to(k.dtype)
        return ops.rope(q, k, cos, sin, rotary_dim=self.rope_dim, position_offset=offset)

    def _heads(self, t: Tensor, n: int) -> Tensor:
        b, s, _ = t.shape
        return t.view(b, s, n, -1).transpose(1, 2)  # [B, n, S, D] view

    def _qkv(self, x: Tensor, offset: int) -> tuple[Tensor, Tensor, Tensor]:
        b, s, _ = x.shape
        h, hkv = self.n_heads, self.n_kv_heads
        if self.attention_type == "mla":
            if hasattr(self, "q_proj"):
                cq = self.q_proj(x)
            else:
                cq = self.q_up(self.q_norm(self.q_down(x)))
            q = self._heads(cq, h)  # [B, H, S, rope + hd]
            ckv = self.kv_norm(self.kv_down(x))
            k_nope = self._heads(self.k_up(ckv), h)
            v = self._heads(self.v_up(ckv), h)
            k_r = self.k_rope(x).view(b, 1, s, self.rope_dim)
            q_r, q_nope = q[..., : self.rope_dim], q[..., self.rope_dim :]
            q_r, k_r = self._rope(q_r, k_r, offset)
            q = torch.cat([q_r, q_nope], dim=-1)
            k = torch.cat([k_r.expand(b, h, s, self.rope_dim), k_nope], dim=-1)
            return q, k, v
        q = self._heads(self.q_proj(x), h)
        if self.attention_type == "mlgka":
            ckv = self.kv_norm(self.kv_down(x))
            k = self._heads(self.k_up(ckv), hkv)
            v = self._heads(self.v_up(ckv), hkv)
        else:
            k = self._heads(self.k_proj(x), hkv)
            v = self._heads(self.v_proj(x), hkv)
        if self.use_rope:
            q, k = self._rope(q, k, offset)
        return q, k, v

    def _softmax_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        scale = 1.0 / math.sqrt(q.shape[-1])
        if not self.reference:
            return ops.attention(q, k, v, causal=self.causal, key_padding_mask=mask, scale=scale)
        group = q.shape[1] // k.shape[1]
        kr, vr = k.repeat_interleave(group, 1).float(), v.repeat_interleave(group, 1).float()
        s = q.shape[2]
        allowed = torch.ones(s, s, dtype=torch.bool, device=q.device)
        if self.causal:
            allowed = allowed.tril()
        allowed = allowed[None, None]
        if mask is not None:
            allowed = allowed & mask[:, None, None, :]
        scores = (q.float() @ kr.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, -1).nan_to_num(0.0)  # fully masked rows -> 0
        return (probs @ vr).to(q.dtype)

    def _kernel_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        phi_q, phi_k = self.feature_map(q), self.feature_map(k)
        if mask is not None:  # padded keys contribute nothing
            phi_k = phi_k * mask[:, None, :, None].to(phi_k.dtype)
        group = q.shape[1] // k.shape[1]
        if group > 1:  # linear attention keeps per-head state; share it by expanding the view
            b, hkv, s, m = phi_k.shape
            phi_k = phi_k[:, :, None].expand(b, hkv, group, s, m).reshape(b, hkv * group, s, m)
            dv = v.shape[-1]
            v = v[:, :, None].expand(b, hkv, group, s, dv).reshape(b, hkv * group, s, dv)
        if self.reference:
            return reference.linear_attention_reference(phi_q, phi_k, v, causal=self.causal).to(
                v.dtype
            )
        return ops.linear_attention(phi_q, phi_k, v, causal=self.causal)

    def forward_cached(self, x: Tensor, cache: KVCache) -> Tensor:
        """x [B, S, d_model]: the S positions after the ``cache.length`` already seen ->
        [B, S, d_model]; appends their keys and values to ``cache`` (no padding mask)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ModelError(
                f"attention input must be [B, S, {self.d_model}], got {tuple(x.shape)}"
            )
        offset = cache.length
        q, k, v = self._qkv(x, offset)
        keys, values = cache.append(k, v)
        if offset == 0:  # prefill: exactly the uncached path
            if self.kernel_type is not None:
                out = self._kernel_attention(q, k, v, None)
            else:
                out = self._softmax_attention(q, k, v, None)
        else:
            out = self._attend_cached(q, keys, values, offset)
        b, _, s, _ = out.shape
        out = out.transpose(1, 2).reshape(b, s, -1)
        return self.dropout(self.o_proj(out))

    def _attend_cached(self, q: Tensor, k: Tensor, v: Tensor, offset: int) -> Tensor:
        """New queries [B, H, S, D] at positions offset.. against all keys [B, Hkv, T, D]."""
        group = q.shape[1] // k.shape[1]
        if group > 1:
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        s, t = q.shape[2], k.shape[2]
        allowed = torch.ones(s, t, dtype=torch.bool, device=q.device)
        if self.causal:  # query i sits at position offset + i
            allowed = allowed.tril(diagonal=offset)
        if self.kernel_type is not None:
            phi_q, phi_k = self.feature_map(q).float(), self.feature_map(k).float()
            scores = (phi_q @ phi_k.transpose(-1, -2)) * allowed
            out = (scores @ v.float()) / (scores.sum(-1, keepdim=True) + 1e-6)
            return out.to(v.dtype)
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        return (torch.softmax(scores, -1) @ v.float()).to(v.dtype)

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | None = None, position_offset: int = 0
    ) -> Tensor:
        """x [B, S, d_model] (key_padding_mask [B, S] bool, True = attend) -> [B, S, d_model]."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ModelError(
                f"attention input must be [B, S, {self.d_model}], got {tuple(x.shape)}"
            )
        if key_padding_mask is not None and key_padding_mask.shape != x.shape[:2]:
            raise ModelError(
                f"key_padding_mask must be [B, S] = {tuple(x.shape[:2])}, got "
                f"{tuple(key_padding_mask.shape)}"
            )
        q, k, v = self._qkv(x, position_offset)
        if self.kernel_type is not None:
            out = self._kernel_attention(q, k, v, key_padding_mask)
        else:
            out = self._softmax_attention(q, k, v, key_padding_mask)
        b, _, s, _ = out.shape
        out = out.transpose(1, 2).reshape(b, s, -1)
        return self.dropout(self.o_proj(out))
