"""The lexical kernel: the token embedding table and the LM head that reads it back.

    manager = LexicalKernelManager(family="gpt2", embedding_option="embed_tokens",
                                   freeze_embeddings=True, target_model_dim=768)
    embeddings, lm_head = manager.get_embeddings(), manager.get_lm_head()

``embed_tokens`` loads a pretrained table from a local safetensors file or Hugging Face-format
folder (``model.safetensors``, or the shards listed in ``model.safetensors.index.json``), reading
only the tensor the family stores its table under; nothing is downloaded. ``learned`` starts a
trainable table from N(0, 0.02). When the table's width differs from ``target_model_dim``, a
trainable projection (or a small MLP with ``adapter_hidden_dim``) maps it to the model. A tied
head computes logits with the same table (through the projection), sharing its storage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stackwise.exceptions import ModelError

# Where each family's checkpoints keep the token embedding table, most specific first.
EMBEDDING_KEYS = {
    "gpt2": ("transformer.wte.weight", "wte.weight"),
    "bert": ("bert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight"),
    "llama": ("model.embed_tokens.weight", "embed_tokens.weight"),
    "custom": (
        "embed_tokens.weight",
        "model.embed_tokens.weight",
        "wte.weight",
        "embeddings.word_embeddings.weight",
        "weight",
    ),
}
# Vocabulary of each family's tokenizer (used for "learned" tables when no size is given).
DEFAULT_VOCAB = {"gpt2": 50257, "bert": 30522, "llama": 32000}
PATH_HINT = "model.tokenizer_embedding.path (or the STACKWISE_EMBEDDINGS_PATH environment variable)"


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ModelError(f"pretrained embeddings not found: {path} does not exist; set {PATH_HINT}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path} holds no *.safetensors file; set {PATH_HINT}")
    return files


def load_embedding_table(path: str | os.PathLike[str], family: str) -> Tensor:
    """Read the token embedding table [vocab, dim] of ``family`` from a local checkpoint."""
    from safetensors import safe_open

    if family not in EMBEDDING_KEYS:
        raise ModelError(f"unknown family {family!r}; expected one of {sorted(EMBEDDING_KEYS)}")
    files = _safetensors_files(Path(path))
    for key in EMBEDDING_KEYS[family]:
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as st:
                    if key in st.keys():
                        table = st.get_tensor(key)
                        if table.dim() != 2:
                            raise ModelError(f"{f}:{key} has shape {tuple(table.shape)}, not 2-D")
                        return table.float()
            except ModelError:
                raise
            except Exception as exc:  # safetensors raises its own error types
                raise ModelError(f"{f} is not a readable safetensors file: {exc}") from exc
    raise ModelError(
        f"no {family} embedding table in {path}: looked for {list(EMBEDDING_KEYS[family])}"
    )


class TokenEmbedding(nn.Module):
    """ids [...] -> [..., model_dim]: table lookup, then the projection if any."""

    def __init__(self, table: nn.Embedding, projection: nn.Module | None) -> None:
        super().__init__()
        self.table = table
        self.projection = projection

    def forward(self, ids: Tensor) -> Tensor:
        h = self.table(ids)
        return self.projection(h) if self.projection is not None else h


class TiedLMHead(nn.Module):
    """hidden [..., model_dim] -> logits [..., vocab] with the embedding table's own storage.

    With a linear projection P (table -> model), the head is h · P · Eᵀ, the transpose of the
    embedding path; an MLP adapter has no transpose, so tying through it is refused.
    """

    def __init__(self, embedding: TokenEmbedding) -> None:
        super().__init__()
        # Held outside the module tree: the owner registers the embedding once, so state_dict
        # and safetensors see each tensor once.
        object.__setattr__(self, "_embedding", embedding)

    @property
    def weight(self) -> Tensor:
        """The embedding table itself (same storage)."""
        return self._embedding.table.weight

    def inputs(self, hidden: Tensor) -> tuple[Tensor, Tensor, None]:
        """``(h, weight, None)`` with logits = ``h @ weight.T``: the hidden state through the
        projection's transpose, and the table itself (cast to ``h``'s dtype, still in the
        autograd graph, so a loss computed from them sends its gradient to the table)."""
        proj = self._embedding.projection
        if proj is not None:
            hidden = hidden @ proj.weight.to(hidden.dtype)
        return hidden, self.weight.to(hidden.dtype), None

    def forward(self, hidden: Tensor) -> Tensor:
        h, weight, _ = self.inputs(hidden)
        return F.linear(h, weight)


class LexicalKernelManager(nn.Module):
    """Owns the token embedding table and the LM head.

    Args:
        family: "gpt2", "bert", "llama" or "custom" (which keys a checkpoint is read with).
        embedding_option: "embed_tokens" (pretrained, local) or "learned".
        freeze_embeddings: no gradient to the table (a projection still trains).
        target_model_dim: the model width; a projection is added when the table differs.
        vocab_size: rows of a learned table (default: the family's vocabulary); a pretrained
            table with fewer rows gets extra rows (e.g. for added mask/pad tokens) initialised
            to the mean embedding.
        path: local safetensors file or folder (default: $STACKWISE_EMBEDDINGS_PATH).
        tie_embeddings: the head reuses the table.
        adapter_hidden_dim: use a 2-layer MLP instead of a linear projection (untied heads only).
        seed: initialisation seed of learned parts.
    """

    def __init__(
        self,
        family: str = "gpt2",
        embedding_option: str = "embed_tokens",
        freeze_embeddings: bool = True,
        target_model_dim: int = 768,
        vocab_size: int | None = None,
        path: str | os.PathLike[str] | None = None,
        tie_embeddings: bool = True,
        adapter_hidden_dim: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if family not in EMBEDDING_KEYS:
            raise ModelError(f"unknown family {family!r}; expected one of {sorted(EMBEDDING_KEYS)}")
        if embedding_option not in ("embed_tokens", "learned"):
            raise ModelError(
                f"unknown embedding_option {embedding_option!r}; use 'embed_tokens' or 'learned'"
            )
        gen = torch.Generator().manual_seed(seed)
        self.family = family
        self.embedding_option = embedding_option
        self.freeze_embeddings = bool(freeze_embeddings)
        self.tie_embeddings = tie_embeddings
        if embedding_option == "embed_tokens":
            path = path or os.environ.get("STACKWISE_EMBEDDINGS_PATH")
            if not path:
                raise ModelError(
                    f"embedding_option 'embed_tokens' needs a local path: set {PATH_HINT}"
                )
            table = load_embedding_table(path, family)
            if vocab_size is not None and vocab_size > table.shape[0]:
                extra = table.mean(0, keepdim=True).expand(vocab_size - table.shape[0], -1)
                table = torch.cat([table, extra])
            elif vocab_size is not None and vocab_size < table.shape[0]:
                raise ModelError(
                    f"vocab_size {vocab_size} is smaller than the pretrained table's "
                    f"{table.shape[0]} rows"
                )
            emb = nn.Embedding(table.shape[0], table.shape[1])
            with torch.no_grad():
                emb.weight.copy_(table)
        else:
            rows = vocab_size or DEFAULT_VOCAB.get(family)
            if not rows:
                raise ModelError("a 'custom' learned table needs vocab_size")
            emb = nn.Embedding(rows, target_model_dim)
            with torch.no_grad():
                emb.weight.copy_(torch.randn(rows, target_model_dim, generator=gen) * 0.02)
        emb.weight.requires_grad_(not freeze_embeddings)
        projection: nn.Module | None = None
        table_dim = emb.weight.shape[1]
        if table_dim != target_model_dim:
            if adapter_hidden_dim:
                if tie_embeddings:
                    raise ModelError(
                        "a tied head cannot go back through an MLP adapter; use a "
                        "linear projection (adapter_hidden_dim: null) or untie"
                    )
                projection = nn.Sequential(
                    nn.Linear(table_dim, adapter_hidden_dim),
                    nn.GELU(),
                    nn.Linear(adapter_hidden_dim, target_model_dim),
                )
            else:
                projection = nn.Linear(table_dim, target_model_dim, bias=False)
                with torch.no_grad():
                    bound = table_dim**-0.5
                    projection.weight.copy_(
                        (torch.rand(target_model_dim, table_dim, generator=gen) * 2 - 1) * bound
                    )
        self.embeddings = TokenEmbedding(emb, projection)
        if tie_embeddings:
            self.lm_head: nn.Module = TiedLMHead(self.embeddings)
        else:
            head = nn.Linear(target_model_dim, emb.weight.shape[0], bias=False)
            with torch.no_grad():
                head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.02)
            self.lm_head = head

    @property
    def vocab_size(self) -> int:
        return self.embeddings.table.weight.shape[0]

    def get_embeddings(self) -> TokenEmbedding:
        return self.embeddings

    def get_lm_head(self) -> nn.Module:
        return self.lm_head

    def head_inputs(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(h, weight [V, d], bias [V] | None)`` such that the head's logits are
        ``h @ weight.T + bias``, in ``hidden``'s dtype: what a fused head-and-loss op takes
        instead of logits."""
        head = self.lm_head
        if isinstance(head, TiedLMHead):
            return head.inputs(hidden)
        if not isinstance(head, nn.Linear):
            raise ModelError(f"the LM head is a {type(head).__name__}, not a linear map")
        bias = None if head.bias is None else head.bias.to(hidden.dtype)
        return hidden, head.weight.to(hidden.dtype), bias
