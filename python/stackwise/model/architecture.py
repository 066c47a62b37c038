"""The rack: embeddings, stacks of blocks (each block an :class:`MLGKALayer`), final norm, head.

    rack = Rack.from_config(model_config)
    logits = rack(input_ids)                                 # [B, S] -> [B, S, vocab]
    logits, boundaries = rack(input_ids, return_hidden=True) # + the activation entering each
                                                             #   stack and the final hidden
    h = rack.forward_from(boundaries[1], start_stack=1)      # re-run from a cached boundary

A rack built with ``time_embedding=True`` (masked diffusion with the noise level given as input,
``training.progressive.time_interpretation: input``) adds a learned embedding of the noise level
t in [0, 1] to every token embedding: ``rack(input_ids, time=t)`` with t a float tensor [B].
The embedding is sinusoidal features of t (Vaswani et al. 2017, §3.5, as in DDPM's time
embedding, Ho et al. 2020) through a two-layer SiLU MLP whose output layer starts at zero, so a
new embedding changes nothing until it trains.

``save_rack`` / ``load_rack`` store weights as safetensors and the config as YAML, with a
manifest of SHA-256 digests checked on load (no pickled objects).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from stackwise._io import atomic_write_bytes, sha256_file, verify_manifest
from stackwise.exceptions import ModelError, RackLayoutError
from stackwise.model.attention import RMSNorm
from stackwise.model.lexical import LexicalKernelManager
from stackwise.model.mlgka import MLGKALayer
from stackwise.ops.linear_cross_entropy import linear_cross_entropy


def _layer_kwargs(cfg) -> dict:
    kv = cfg.n_kv_heads if cfg.attention_type in ("gqa", "mlgka", "kernel") else cfg.n_heads
    kwargs = dict(
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        n_kv_heads=kv,
        d_ff=cfg.d_ff,
        attention_type=cfg.attention_type,
        attention_mode=cfg.attention_mode,
        norm=cfg.norm,
        norm_eps=cfg.norm_eps,
        freeze_up_proj=cfg.freeze_up_proj,
        dropout=cfg.dropout,
        use_rope=cfg.use_rope,
        rope_theta=cfg.rope_theta,
        max_seq_len=cfg.max_seq_len,
        q_rank=cfg.mla.q_rank,
        kv_rank=cfg.mla.kv_rank,
        rope_head_dim=cfg.mla.rope_head_dim,
        v_head_dim=cfg.mla.v_head_dim,
        kernel_dim=cfg.kernel.kernel_dim,
        kernel_seed=cfg.kernel.seed,
    )
    if getattr(cfg, "head_dim", None) is not None:
        kwargs["head_dim"] = cfg.head_dim
    if cfg.attention_type == "kernel" or (
        cfg.attention_type == "mlgka"
        and cfg.attention_custom
        and cfg.attention_custom.get("kernel_features")
    ):
        kwargs["kernel_type"] = cfg.kernel.kernel_type
    return kwargs


def create_gpt2_model(config) -> list[MLGKALayer]:
    """``config.n_layers`` blocks configured from a :class:`ModelConfig`."""
    return [MLGKALayer(seed=i, **_layer_kwargs(config)) for i in range(config.n_layers)]


class Block(MLGKALayer):
    """One block of a stack (an :class:`MLGKALayer`)."""


class Stack(nn.Module):
    """A list of blocks run in order."""

    def __init__(self, blocks: list[MLGKALayer]) -> None:
        super().__init__()
        if not blocks:
            raise ModelError("a stack needs at least one block")
        self.blocks = nn.ModuleList(blocks)
        # Activation checkpointing: with gradients on, keep only the stack's input and recompute
        # the inside in the backward pass (training.progressive.trunk_checkpointing sets it).
        self.recompute = False

    def _run(self, x: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        for block in self.blocks:
            x = block(x, key_padding_mask)
        return x

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        if self.recompute and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(
                self._run, x, key_padding_mask, use_reentrant=False
            )
        return self._run(x, key_padding_mask)

    def __len__(self) -> int:
        return len(self.blocks)


class TimeEmbedding(nn.Module):
    """Noise level t [B] (floats in [0, 1]) -> [B, d_model]: ``n_features`` sinusoidal features
    of 1000·t (periods up to 10^4, the DDPM convention), then Linear -> SiLU -> Linear."""

    def __init__(self, d_model: int, n_features: int = 64, max_period: float = 10000.0) -> None:
        super().__init__()
        if n_features < 2 or n_features % 2:
            raise ModelError(f"n_features must be an even number >= 2, got {n_features}")
        half = n_features // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(
            nn.Linear(n_features, d_model), nn.SiLU(), nn.Linear(d_model, d_model)
        )
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, t: Tensor) -> Tensor:
        if t.dim() != 1:
            raise ModelError(f"time must be a [B] tensor of noise levels, got {tuple(t.shape)}")
        angles = 1000.0 * t.float().reshape(-1, 1) * self.freqs.to(t.device)
        return self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1))


class Rack(nn.Module):
    """Embeddings + stacks + final norm + LM head (+ an optional :class:`TimeEmbedding`)."""

    def __init__(
        self,
        config,
        stacks: list[Stack] | None = None,
        lexical: LexicalKernelManager | None = None,
        time_embedding: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        te = config.tokenizer_embedding
        self.lexical = lexical or LexicalKernelManager(
            family=te.family if te.embedding_option == "embed_tokens" else "custom",
            embedding_option=te.embedding_option,
            freeze_embeddings=te.freeze_embeddings,
            target_model_dim=config.d_model,
            vocab_size=config.vocab_size,
            path=te.path,
            tie_embeddings=config.tie_embeddings,
            adapter_hidden_dim=te.adapter_hidden_dim,
        )
        self.position = None
        if not config.use_rope and config.attention_type != "mla":
            self.position = nn.Embedding(config.max_seq_len, config.d_model)
            nn.init.normal_(self.position.weight, std=0.01)
        self.time_embedding = TimeEmbedding(config.d_model) if time_embedding else None
        self.stacks = nn.ModuleList(stacks or [])
        self.final_norm = (
            RMSNorm(config.d_model, config.norm_eps)
            if config.norm == "rmsnorm"
            else nn.LayerNorm(config.d_model, eps=config.norm_eps)
        )

    @classmethod
    def from_config(cls, config, n_stacks: int | None = None, time_embedding: bool = False) -> Rack:
        """A rack with ``n_stacks`` (default ``architecture.n_stacks``) stacks of
        ``architecture.blocks_per_stack`` blocks."""
        arch = config.architecture
        n = arch.n_stacks if n_stacks is None else n_stacks
        layers = create_gpt2_model(config)
        stacks = [
            Stack(layers[i * arch.blocks_per_stack : (i + 1) * arch.blocks_per_stack])
            for i in range(n)
        ]
        return cls(config, stacks, time_embedding=time_embedding)

    # -- forward ------------------------------------------------------------------------------

    def embed(self, input_ids: Tensor, time: Tensor | None = None) -> Tensor:
        """Token (+ position) embeddings [B, S, d_model]; with a time embedding, plus the
        embedding of the noise level ``time`` [B] on every position."""
        if input_ids.dim() != 2:
            raise ModelError(f"input_ids must be [B, S], got {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_seq_len:
            raise ModelError(
                f"sequence of {input_ids.shape[1]} tokens exceeds max_seq_len "
                f"{self.config.max_seq_len}"
            )
        h = self.lexical.get_embeddings()(input_ids)
        if self.position is not None:
            h = h + self.position.weight[: input_ids.shape[1]]
        if self.time_embedding is not None:
            if time is None:
                raise ModelError("this rack has a time embedding: pass time=[B] noise levels")
            if time.shape != (input_ids.shape[0],):
                raise ModelError(
                    f"time must have shape [{input_ids.shape[0]}], got {tuple(time.shape)}"
                )
            h = h + self.time_embedding(time.to(h.device)).to(h.dtype)[:, None, :]
        elif time is not None:
            raise ModelError("time given, but this rack has no time embedding")
        return h

    def logits(self, hidden: Tensor) -> Tensor:
        """Logits [..., vocab] of the last boundary activation (generation; training and
        evaluation use :meth:`token_loss`, which never forms them in full)."""
        return self.lexical.get_lm_head()(self.final_norm(hidden))

    def head_inputs(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(h, weight, bias)`` of the head for the last boundary activation ``hidden``: ``h``
        is the final-normed state (through a tied head's projection), logits would be
        ``h @ weight.T + bias``; a tied head's weight is the embedding table itself."""
        return self.lexical.head_inputs(self.final_norm(hidden))

    def token_loss(
        self, hidden: Tensor, labels: Tensor, reduction: str = "mean", ignore_index: int = -100
    ) -> Tensor:
        """Cross entropy of the head's logits for ``hidden`` [..., d_model] against ``labels``
        [...] (``ignore_index`` carries no loss), through the fused native op
        (:func:`stackwise.ops.linear_cross_entropy`): float32, the ``N x vocab`` logits never
        exist in full. ``reduction``: "mean" (0 without any label), "sum" or "none"."""
        h, weight, bias = self.head_inputs(hidden)
        return linear_cross_entropy(
            h, weight, labels, bias, ignore_index=ignore_index, reduction=reduction
        )

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        return_hidden: bool = False,
        time: Tensor | None = None,
    ):
        """Logits [B, S, vocab]; with ``return_hidden`` also the list of boundary activations
        (entering stack 0, 1, ... and after the last stack). ``time``: noise levels [B], for a
        rack with a time embedding."""
        mask = attention_mask.bool() if attention_mask is not None else None
        h = self.embed(input_ids, time)
        boundaries = [h]
        for stack in self.stacks:
            h = stack(h, mask)
            boundaries.append(h)
        out = self.logits(h)
        return (out, boundaries) if return_hidden else out

    def forward_from(
        self,
        hidden: Tensor,
        start_stack: int,
        end_stack: int | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Run stacks ``[start_stack, end_stack)`` on the boundary activation ``hidden``."""
        end = len(self.stacks) if end_stack is None else end_stack
        if not 0 <= start_stack <= end <= len(self.stacks):
            raise ModelError(f"stacks [{start_stack}, {end}) are outside 0..{len(self.stacks)}")
        mask = attention_mask.bool() if attention_mask is not None else None
        for stack in self.stacks[start_stack:end]:
            hidden = stack(hidden, mask)
        return hidden

    # -- management ---------------------------------------------------------------------------

    def set_attention_mode(self, mode: str) -> None:
        for stack in self.stacks:
            for block in stack.blocks:
                block.set_attention_mode(mode)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def validate(self) -> Rack:
        if len(self.stacks) == 0:
            raise ModelError("the rack has no stacks")
        for i, stack in enumerate(self.stacks):
            for j, block in enumerate(stack.blocks):
                if block.d_model != self.config.d_model:
                    raise ModelError(
                        f"stack {i} block {j} has d_model {block.d_model}, the rack "
                        f"{self.config.d_model}"
                    )
        if self.lexical.vocab_size < self.config.vocab_size:
            raise ModelError(
                f"the embedding table has {self.lexical.vocab_size} rows, fewer "
                f"than vocab_size {self.config.vocab_size}"
            )
        return self

    def to_config(self) -> dict:
        cfg = dataclasses.asdict(self.config)
        cfg["architecture"]["n_stacks"] = len(self.stacks)
        return cfg


def save_rack(rack: Rack, directory: str | os.PathLike[str]) -> Path:
    """Write ``model.safetensors``, ``config.yaml`` and ``manifest.json`` (SHA-256 of both)."""
    from safetensors.torch import save

    from stackwise.config._schema import yaml_dump

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in rack.state_dict().items()}
    atomic_write_bytes(out / "model.safetensors", save(state))
    atomic_write_bytes(out / "config.yaml", yaml_dump(rack.to_config()).encode())
    manifest = {name: sha256_file(out / name) for name in ("model.safetensors", "config.yaml")}
    atomic_write_bytes(out / "manifest.json", json.dumps(manifest, indent=2).encode())
    return out


def load_rack(directory: str | os.PathLike[str]) -> Rack:
    """Inverse of :func:`save_rack`. The manifest must list both files with their digests
    (:func:`~stackwise._io.verify_manifest`: a missing entry, a path leading outside the folder
    or a digest that does not match raises :class:`CacheCorruptionError` naming it). Weights
    that do not fit a plain rack of the saved config (stacks converted to int8 / nf4 / fp8 or
    carrying adapters) raise :class:`RackLayoutError`."""
    from safetensors.torch import load_file

    from stackwise.config import _schema
    from stackwise.config.base import ModelConfig

    src = Path(directory)
    if not (src / "manifest.json").is_file():
        raise ModelError(f"{src} is not a saved rack (no manifest.json)")
    verify_manifest(src, required=("model.safetensors", "config.yaml"))
    cfg = _schema.from_dict(
        ModelConfig, _schema.yaml_load((src / "config.yaml").read_text()), "model"
    )
    state = load_file(str(src / "model.safetensors"))
    rack = Rack.from_config(cfg, time_embedding=any(k.startswith("time_embedding.") for k in state))
    expected = set(rack.state_dict())
    extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
    if extra or missing:
        raise RackLayoutError(
            f"{src / 'model.safetensors'} does not fit a plain rack of its config.yaml "
            f"({len(extra)} unexpected tensors, e.g. {extra[:2]}; {len(missing)} missing, e.g. "
            f"{missing[:2]}): its stacks were converted (quantized or adapted)"
        )
    try:
        rack.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(
            f"{src / 'model.safetensors'} does not fit its config.yaml: {exc}"
        ) from exc
    return rack


__all__ = [
    "Block",
    "Rack",
    "Stack",
    "TimeEmbedding",
    "create_gpt2_model",
    "load_rack",
    "save_rack",
]
