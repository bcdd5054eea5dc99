"""The pair store's errors, and the message that names the way out of each (`--redo-stage`)."""
from __future__ import annotations

import re


class PairStoreMismatch(ValueError):
    """An existing store at the URL was made with different structure or teacher/solver settings."""


class PairStoreInvalid(PairStoreMismatch):
    """The store's metadata (the group's zarr attributes) is unreadable or invalid: torn, hand-edited or written by
    something else. Never trusted; the message names the store and `--redo-stage`."""


class PairStoreIncomplete(RuntimeError):
    """The store still has pending shards (raised by readers that need all of it)."""


class PairWriteError(RuntimeError):
    """A write to the pair store kept failing (disk full, object store unavailable) after its retries."""


class PairStoreCorrupt(RuntimeError):
    """Stored pairs whose bytes no longer match the sha256 in their shard's done marker."""


def redo_hint(url: str) -> str:
    """`--redo-stage NAME` for the store at url (pairs.zarr -> pairs, pairs-2.zarr -> pairs-2)."""
    m = re.search(r"(pairs(?:-\d+)?)\.zarr/?$", url)
    return f"--redo-stage {m.group(1) if m else '<the pairs stage that writes it>'}"


def invalid(url: str, what: str, err: BaseException | str) -> PairStoreInvalid:
    detail = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    detail = str(detail).replace("\n", " ")[:400]
    return PairStoreInvalid(f"pair store {url}: {what} is unreadable or invalid ({detail}); it is not trusted. "
                            f"Rerun with {redo_hint(url)} to simulate the pairs again")
