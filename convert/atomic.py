"""Directories written whole or not at all: the converter's output, the Ouro checkpoints it writes, tokenizers.

`staged_directory(out)` is the one place that swaps a finished directory into place; a crash, a full disk or an
interrupt at any point leaves `out` as it was (or absent, if it was) and no staging directory behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def staging_dir(out: Path) -> Path:
    """The hidden sibling of `out` that `staged_directory` fills (named in error messages)."""
    return out.with_name(f".{out.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """Yield an empty sibling directory of `out` to write into; when the block ends without an error it takes
    `out`'s place.

    An existing `out` is renamed aside first and removed only once the new directory is in place, and renamed
    back if the swap fails; the staging directory is always removed.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(out)
    previous = out.with_name(f".{out.name}.{os.getpid()}.old")
    for leftover in (staging, previous):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        staging.mkdir()
        yield staging
        if out.exists():
            os.rename(out, previous)
        os.rename(staging, out)
    except BaseException:
        if previous.exists() and not out.exists():
            os.rename(previous, out)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if out.exists():
            shutil.rmtree(previous, ignore_errors=True)
