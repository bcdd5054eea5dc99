"""fsspec helpers: every artifact goes through these, so a `file://` and an `s3://` root behave alike."""
from __future__ import annotations

import hashlib
import json
import os
import uuid

import fsspec


def fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def join(*parts: str) -> str:
    head, *rest = parts
    return "/".join([head.rstrip("/")] + [p.strip("/") for p in rest])


def fs_is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local file system, False for an object store or other remote file system."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def is_local(url: str) -> bool:
    """True for a local path or file:// URL."""
    return fs_is_local(fs_and_path(url)[0])


def local_path(url: str) -> str:
    """The file system path of a local path or file:// URL."""
    return url[len("file://"):] if url.startswith("file://") else url


def resolve_storage_options(url: str, storage_options: dict | None = None) -> dict:
    """Copy of storage_options; for s3:// without an explicit endpoint, take one from FSSPEC_S3_ENDPOINT_URL,
    AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (MinIO, moto, ...)."""
    opts = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):
        ck = dict(opts.get("client_kwargs") or {})
        if "endpoint_url" not in opts and "endpoint_url" not in ck:
            env = (os.environ.get("FSSPEC_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
                   or os.environ.get("AWS_ENDPOINT_URL"))
            if env:
                ck["endpoint_url"] = env
                opts["client_kwargs"] = ck
    return opts


# --- which failures are storage failures, and which of those are worth retrying ---------------------------------------
BOTO_ERRORS = frozenset({"ClientError", "BotoCoreError", "NoCredentialsError", "EndpointConnectionError"})


def is_storage_error(err: BaseException) -> bool:
    """A storage failure (permission, disk full, read-only file system, object store access denied / unreachable):
    OSError, or botocore-style errors found by class name (no botocore import here)."""
    return isinstance(err, OSError) or bool({c.__name__ for c in type(err).__mro__} & BOTO_ERRORS)


def is_transient(err: BaseException) -> bool:
    """A storage failure a retry may cure (disk full, I/O error, connection reset, the object store's errors); not a
    missing file or directory and not missing credentials, which the same call would meet again."""
    if isinstance(err, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return False
    return is_storage_error(err) and "NoCredentialsError" not in {c.__name__ for c in type(err).__mro__}


def exists(url: str) -> bool:
    fs, path = fs_and_path(url)
    return fs.exists(path)


class StorageWriteError(OSError):
    """A write under the root failed (permission, read-only or full file system, object store access denied or
    unreachable). The message names the URL; nothing was replaced there (the write is all-or-nothing)."""


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write all-or-nothing: temp file + rename locally; a single PUT on object stores (atomic there). A failure is a
    StorageWriteError (an OSError, errno kept) naming the URL and the way out, not an fsspec / botocore traceback."""
    fs, path = fs_and_path(url)
    try:
        write_atomic(fs, path, data)
    except OSError as e:
        raise write_error(url, e) from e


def write_error(url: str, e: OSError) -> StorageWriteError:
    """The StorageWriteError for a failed write of url (errno kept), naming it and the way out."""
    detail = str(e).replace("\n", " ")[:300]
    err = StorageWriteError(f"cannot write {url} ({type(e).__name__}: {detail}); nothing was replaced there (a "
                            f"previous version, if any, is intact). Make the root writable (permissions, free "
                            f"space, object-store policy or credentials) and rerun: finished work is kept")
    err.errno = e.errno
    return err


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """atomic_write_bytes for a filesystem already in hand (e.g. one opened with storage options)."""
    if fs_is_local(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:  # disk full, read-only, interrupted: never leave a half-written temp file behind
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise
    else:
        fs.pipe_file(path, data)


def read_bytes(url: str) -> bytes:
    fs, path = fs_and_path(url)
    return fs.cat_file(path)


def write_json(url: str, obj) -> None:
    atomic_write_bytes(url, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(url: str):
    return json.loads(read_bytes(url))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
