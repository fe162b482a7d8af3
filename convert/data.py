"""The converter's data pipeline: load documents, render chats, pack fixed-length token rows.

1. ``load_text_dataset`` turns a dataset spec into a list of documents (strings) with Hugging Face
   ``datasets``. A spec is local data or a Hub dataset id:

   * local: a file, a directory (searched recursively) or a list of files, all in one format:
     ``.json`` / ``.jsonl`` (JSON, JSON lines), ``.parquet``, or ``.txt`` (each file is one
     document, read as is);
   * anything else that looks like a Hub id (``name`` or ``owner/name``) goes to
     ``datasets.load_dataset(spec, split=split)``; without network access (and no local cache) that
     raises one ``ValueError`` saying the Hub is unreachable and to pass local files.

   Each record supplies a document either in its text field (``text_field``, default ``"text"``) or
   as a chat in ``messages`` (a list of ``{"role", "content"}``), rendered with the tokenizer's chat
   template; one file may mix both kinds, as ``convert/assets/tiny_corpus.jsonl`` does. Documents
   that are empty or only whitespace are dropped.
2. ``pack_sequences`` tokenizes the documents, shuffles them with a seed, joins them with an eos
   token after each, and cuts the stream into rows of ``seq_len`` tokens, dropping the remainder.
   Documents are not truncated: a long one continues on the next row.
3. ``split_holdout`` keeps the last rows of the packed tensor apart for evaluation; packing already
   shuffled the documents, so the last rows are a seeded random sample. A document may straddle the
   boundary row, which a held-out loss on a small slice does not notice.

Every problem with the data (a missing or unreadable file, an empty dataset, records without a text
or messages field, too few tokens for one row) raises a ``ValueError`` that says what to change,
before any training starts.
"""

from __future__ import annotations

import itertools
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import PreTrainedTokenizerBase

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TINY_CORPUS = ASSETS_DIR / "tiny_corpus.jsonl"  # built by `python -m convert.synthetic`
TINY_TOKENIZER = ASSETS_DIR / "tokenizer"  # built by `python -m convert.tokenizer`

# File suffix -> the `datasets` packaged builder that reads it.
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
MESSAGES_FIELD = "messages"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

DatasetSpec = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def _local_files(spec: DatasetSpec) -> tuple[str, list[str]] | None:
    """The builder name and files of local data, or None when ``spec`` is a Hub dataset id."""
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS)
            if not files:
                raise ValueError(f"directory {path} holds no {'/'.join(BUILDERS)} files")
        elif path.is_file():
            files = [path]
        elif path.suffix.lower() in BUILDERS or not _HUB_ID.fullmatch(str(spec)):
            raise ValueError(f"dataset file {path} does not exist")
        else:
            return None
    else:
        files = [Path(item) for item in spec]
        if not files:
            raise ValueError("the list of dataset files is empty")
        missing = [str(file) for file in files if not file.is_file()]
        if missing:
            raise ValueError(f"dataset files do not exist: {missing}")

    unsupported = [str(file) for file in files if file.suffix.lower() not in BUILDERS]
    if unsupported:
        raise ValueError(f"unsupported dataset file type {unsupported}; use {'/'.join(BUILDERS)} files")
    builders = {BUILDERS[file.suffix.lower()] for file in files}
    if len(builders) > 1:
        raise ValueError(f"dataset files mix formats ({sorted(builders)}); pass files of one format")
    return builders.pop(), [str(file) for file in files]


def _load_dataset(
    spec: DatasetSpec, split: str, cache_dir: str | os.PathLike[str] | None
) -> datasets.Dataset:
    local = _local_files(spec)
    if local is None:
        try:
            return datasets.load_dataset(str(spec), split=split, cache_dir=cache_dir)
        except ConnectionError as error:
            raise ValueError(
                f"{str(spec)!r} is not a local file or directory, and the Hugging Face Hub cannot be "
                f"reached to load it as a dataset ({error}); pass local .json/.jsonl/.parquet/.txt files "
                "or a directory of them"
            ) from error
    builder, files = local
    # A .txt file is one document: lines are too short to be documents, and the builder's paragraph
    # mode leaves stray newlines at the edges of paragraphs.
    options = {"sample_by": "document"} if builder == "text" else {}
    try:
        return datasets.load_dataset(
            builder, data_files={split: files}, split=split, cache_dir=cache_dir, **options
        )
    except Exception as error:  # datasets/pyarrow raise many types for one cause: a file it cannot parse
        if all(_holds_no_records(Path(file), builder) for file in files):
            raise ValueError(f"dataset {files} is empty: the files hold no records") from error
        cause = _root_cause(error)
        message = f"cannot read {builder} data from {files}: {type(cause).__name__}: {cause}"
        raise ValueError(message) from error


def _holds_no_records(path: Path, builder: str) -> bool:
    """Whether a file that `datasets` failed to load is merely empty (it cannot load zero records)."""
    if builder == "parquet":
        try:
            return pq.ParquetFile(path).metadata.num_rows == 0
        except (OSError, pa.ArrowException):
            return False
    # JSON and text: nothing but whitespace, read in blocks up to the first other byte.
    with open(path, "rb") as file:
        return all(not block.strip() for block in iter(lambda: file.read(1 << 16), b""))


def _root_cause(error: BaseException) -> BaseException:
    """The innermost chained exception: `datasets` wraps parse errors in a generic one."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def load_text_dataset(
    spec: DatasetSpec,
    tokenizer: PreTrainedTokenizerBase | None = None,
    split: str = "train",
    text_field: str = "text",
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Documents of a local or Hub dataset, chats rendered with ``tokenizer``'s chat template.

    Args:
        spec: a local file, directory or list of files (.json/.jsonl/.parquet/.txt), or a Hub id.
        tokenizer: renders ``messages`` records; needed only if the data holds chats.
        split: the Hub split to load; local files are all loaded, under this split name.
        text_field: the field holding a record's text (``.txt`` files always use ``"text"``).
        cache_dir: where ``datasets`` keeps its Arrow cache (default: its own cache directory).

    Returns:
        The documents, in file order.
    """
    dataset = _load_dataset(spec, split, cache_dir)
    named = str(spec) if isinstance(spec, (str, os.PathLike)) else [str(item) for item in spec]
    source = f"dataset {named!r}"
    if len(dataset) == 0:  # a Hub split can be empty; local files with no records fail to load above
        raise ValueError(f"{source} is empty: it has no records")
    columns = dataset.column_names
    if text_field not in columns and MESSAGES_FIELD not in columns:
        raise ValueError(
            f"{source} has neither a {text_field!r} nor a {MESSAGES_FIELD!r} field; its fields are "
            f"{columns}. Pass text_field= to name the field that holds the text"
        )
    texts = dataset[text_field] if text_field in columns else itertools.repeat(None)
    chats = dataset[MESSAGES_FIELD] if MESSAGES_FIELD in columns else itertools.repeat(None)

    documents = []
    for index, (text, chat) in enumerate(zip(texts, chats)):
        if text is not None:
            if not isinstance(text, str):
                kind = type(text).__name__
                raise ValueError(f"record {index} of {source}: {text_field!r} is of type {kind}, not a string")
            documents.append(text)
        elif chat is not None:
            if not isinstance(chat, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in chat
            ):
                raise ValueError(
                    f"record {index} of {source}: {MESSAGES_FIELD!r} must be a list of {{'role': str, 'content': str}} "
                    f"objects, got {_preview(chat)}"
                )
            if tokenizer is None or tokenizer.chat_template is None:
                raise ValueError(
                    f"{source} holds chat records ({MESSAGES_FIELD!r}); pass a tokenizer with a chat template"
                )
            documents.append(tokenizer.apply_chat_template(chat, tokenize=False))
        else:
            raise ValueError(f"record {index} of {source} has neither {text_field!r} nor {MESSAGES_FIELD!r}")
    documents = [document for document in documents if document.strip()]
    if not documents:
        raise ValueError(f"{source} is empty: its {len(dataset)} records hold no text")
    return documents


def _preview(value, limit: int = 60) -> str:
    """A short description of a bad value for an error message: its type and the start of its repr."""
    text = repr(value)
    return f"{type(value).__name__} {text[:limit]}{'...' if len(text) > limit else ''}"


def pack_sequences(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, seq_len: int, seed: int
) -> torch.Tensor:
    """Pack documents into fixed-length rows of token ids.

    Documents are tokenized without special tokens, shuffled with ``seed``, each followed by the eos
    token, concatenated, and cut into rows of ``seq_len``; the incomplete last row is dropped.

    Returns:
        LongTensor ``[num_seqs, seq_len]``.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not texts:
        raise ValueError("no documents to pack")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token to separate documents; set tokenizer.eos_token")
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    num_tokens = sum(len(ids) + 1 for ids in encoded)
    num_seqs = num_tokens // seq_len
    if num_seqs == 0:
        raise ValueError(
            f"the {len(texts)} documents hold {num_tokens} tokens (one eos after each included), fewer "
            f"than the {seq_len} needed for one sequence of seq_len={seq_len}; add data or lower seq_len"
        )
    order = list(range(len(encoded)))
    random.Random(seed).shuffle(order)
    stream = itertools.chain.from_iterable(itertools.chain(encoded[index], (eos,)) for index in order)
    rows = np.fromiter(stream, dtype=np.int64, count=num_tokens)[: num_seqs * seq_len]
    return torch.from_numpy(rows).view(num_seqs, seq_len)  # [num_seqs, seq_len]


def split_holdout(sequences: torch.Tensor, holdout: int | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split packed rows ``[N, L]`` into (train ``[N - k, L]``, held-out ``[k, L]``): the last k rows.

    Args:
        sequences: rows from ``pack_sequences``.
        holdout: a fraction in (0, 1) of the rows (rounded, at least one), or a row count >= 1.
    """
    num_rows = sequences.shape[0]
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)):
        raise ValueError(f"holdout must be a fraction in (0, 1) or a row count, got {holdout!r}")
    if isinstance(holdout, float):
        if not 0.0 < holdout < 1.0:
            raise ValueError(f"a holdout fraction must be in (0, 1), got {holdout}")
        count = max(1, round(holdout * num_rows))
    else:
        if holdout < 1:
            raise ValueError(f"a holdout row count must be >= 1, got {holdout}")
        count = holdout
    if count >= num_rows:
        raise ValueError(f"holding out {count} of {num_rows} rows leaves none to train on; hold out fewer")
    return sequences[:-count], sequences[-count:]
