"""``MLGKALayer``: one pre-norm transformer block of stackwise,
x = x + attn(norm(x)); x = x + ffn(norm(x)), with RMSNorm (or LayerNorm), the attention
variants of :mod:`stackwise.model.attention` and a SwiGLU feed-forward.

    layer = MLGKALayer(d_model=768, n_heads=12, n_kv_heads=4, d_ff=3072,
                       attention_type="gqa", attention_mode="bidirectional")
    output = layer(input_tensor)            # [B, S, 768] -> [B, S, 768]
"""

from __future__ import annotations

from torch import Tensor, nn

from stackwise.exceptions import ModelError
from stackwise.model.attention import Attention, KVCache, RMSNorm
from stackwise.model.ffn import SwiGLUFFN


class MLGKALayer(nn.Module):
    """Multi-Latent Grouped Kernel Attention block. Attention arguments as :class:`Attention`;
    ``d_ff`` (default 4·d_model) and ``freeze_up_proj`` configure the SwiGLU FFN; ``norm`` is
    "rmsnorm" or "layernorm"."""

    def __init__(
        self,
        d_model: int = 768,
        n_heads: int = 12,
        n_kv_heads: int | None = None,
        d_ff: int | None = None,
        attention_type: str = "standard",
        attention_mode: str = "causal",
        norm: str = "rmsnorm",
        norm_eps: float = 1e-6,
        freeze_up_proj: bool = False,
        dropout: float = 0.0,
        seed: int = 0,
        **attention_kwargs,
    ) -> None:
        super().__init__()
        if norm not in ("rmsnorm", "layernorm"):
            raise ModelError(f"norm {norm!r} is not 'rmsnorm' or 'layernorm'")
        make_norm = (
            (lambda: RMSNorm(d_model, norm_eps))
            if norm == "rmsnorm"
            else (lambda: nn.LayerNorm(d_model, eps=norm_eps))
        )
        self.attn_norm = make_norm()
        self.attn = Attention(
            d_model,
            n_heads,
            n_kv_heads,
            attention_type,
            attention_mode,
            dropout=dropout,
            norm_eps=norm_eps,
            **attention_kwargs,
        )
        self.ffn_norm = make_norm()
        self.ffn = SwiGLUFFN(
            d_model, d_ff or 4 * d_model, freeze_up_proj=freeze_up_proj, dropout=dropout, seed=seed
        )
        self.d_model = d_model

    @property
    def attention_mode(self) -> str:
        return "causal" if self.attn.causal else "bidirectional"

    def set_attention_mode(self, mode: str) -> None:
        if mode not in ("causal", "bidirectional"):
            raise ModelError(f"attention mode {mode!r} is not 'causal' or 'bidirectional'")
        self.attn.causal = mode == "causal"

    def set_reference(self, flag: bool) -> None:
        """Use plain PyTorch instead of the native ops (the tests' oracle)."""
        self.attn.set_reference(flag)
        for m in (self.attn_norm, self.ffn_norm):
            if isinstance(m, RMSNorm):
                m.reference = flag
        self.ffn.reference = flag

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | None = None, position_offset: int = 0
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), key_padding_mask, position_offset)
        return x + self.ffn(self.ffn_norm(x))

    def forward_cached(self, x: Tensor, cache: KVCache) -> Tensor:
        """The block on the positions after those in ``cache`` (incremental decoding); see
        :meth:`Attention.forward_cached`."""
        x = x + self.attn.forward_cached(self.attn_norm(x), cache)
        return x + self.ffn(self.ffn_norm(x))
