"""Checkpoints and single-file model artifacts: written atomically, hash-checked, loaded with weights_only=True.

Modelled on edm2's CheckpointIO: one place that writes and reads every torch artifact of a run, through `storage`
(fsspec), so a `file://` root, a plain path and an `s3://` root behave alike. Pure torch + pydantic (no prefect, no
mlflow).

Training checkpoints (a directory per stage)::

    <ckpt_dir>/ckpt-0000040.pt   torch.save(state), written all-or-nothing (storage.atomic_write_bytes)
    <ckpt_dir>/latest.json       {"step", "file", "sha256", "bytes"}, written after the checkpoint it names

`save` keeps the newest `keep` checkpoints and sweeps the `*.tmp-xxxxxxxx` files a writer killed mid-write left.
`latest` trusts latest.json only when it validates (`LatestPointer`); `load` checks the sha256 recorded there when
the pointer names the file being loaded.

Single-file artifacts (AutoGuidance's guide.pt, the digit-classifier cache) use `save_file` / `load_file`: the
payload is a plain torch file (so `load` reads it too) and its hash lives in a sidecar `<url>.sha256` written after
it, in `sha256sum` format (`<hex>  <name>`; `sha256sum -c guide.pt.sha256` checks it by hand). `load_file` requires
the sidecar; `load` checks it when present. A crash between the two writes leaves a payload that does not match its
sidecar: refused, never trusted.

Every load is `torch.load(..., map_location="cpu", weights_only=True)`: tensors, state dicts and plain containers of
ints / floats / str / bool / None only. A file holding any other pickled object (a callable, a class instance) is
refused with CheckpointError before that object is built; there is no fallback to weights_only=False. `save` and
`save_file` check the state first (`check_state`), so nothing unloadable is ever written.
"""
from __future__ import annotations

import collections
import contextlib
import io
import pickle
import re

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import storage

__all__ = ["CheckpointError", "LatestPointer", "save", "latest", "latest_info", "load", "load_latest", "rng_state",
           "set_rng_state", "save_file", "load_file", "check_state", "POINTER", "SIDECAR_SUFFIX"]

POINTER = "latest.json"
SIDECAR_SUFFIX = ".sha256"
_CKPT_RE = re.compile(r"ckpt-(\d+)\.pt$")
_TMP_RE = re.compile(r"\.tmp-[0-9a-f]{8}$")  # storage.write_atomic's temp files
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted (missing, truncated, wrong hash, unsafe content); the message names the
    file and the way out."""


class LatestPointer(BaseModel):
    """latest.json: the newest complete checkpoint of a directory."""

    model_config = ConfigDict(extra="ignore")  # all four fields required; a later writer may add more

    step: int = Field(ge=0)
    file: str = Field(pattern=r"^[^/\\]+$", description="a file name inside the checkpoint directory")
    sha256: str = Field(pattern=_HEX64.pattern)
    bytes: int = Field(ge=0)


# --- what may be stored --------------------------------------------------------------------------------------------

# exact types: a subclass (IntEnum, StrEnum, namedtuple, defaultdict) pickles as a global that weights_only refuses
_LEAVES = frozenset({type(None), bool, int, float, complex, str, bytes, torch.Tensor, torch.nn.Parameter, torch.Size,
                     torch.dtype, torch.device})
_MAPPINGS = frozenset({dict, collections.OrderedDict})
_KEYS = frozenset({str, int, float, bool, type(None)})


def check_state(obj, where: str = "state") -> None:
    """Raise TypeError naming the offending key unless `obj` is loadable with weights_only=True: tensors, state
    dicts, dict / OrderedDict / list / tuple of ints, floats, str, bool, None (convert a pydantic model with
    model_dump(mode="json"), an enum to its value, a numpy array to a tensor)."""
    t = type(obj)
    if t in _LEAVES:
        return
    if t in _MAPPINGS:
        for k, v in obj.items():
            if type(k) not in _KEYS and type(k) is not tuple:
                raise TypeError(f"{where}: key {k!r} of type {type(k).__qualname__} is not loadable with weights_only")
            if type(k) is tuple:
                check_state(k, f"{where} key {k!r}")
            check_state(v, f"{where}[{k!r}]")
        return
    if t in (list, tuple):
        for i, v in enumerate(obj):
            check_state(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {t.__module__}.{t.__qualname__}, which torch.load(weights_only=True) refuses; "
                    f"store tensors, state dicts and plain ints/floats/str/lists/dicts (e.g. a pydantic model's "
                    f"model_dump(mode='json'), an enum's .value, torch.as_tensor(array))")


def _serialise(state: dict) -> bytes:
    if not isinstance(state, dict):
        raise TypeError(f"a checkpoint is a dict, got {type(state).__name__}")
    check_state(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _deserialise(url: str, data: bytes, fix: str) -> dict:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refused a global (a callable, a class instance): the object was never built. torch's own
        # message suggests weights_only=False / add_safe_globals; only the refused global is quoted here.
        m = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", str(e))
        why = m.group(1)[:300] if m else f"{type(e).__name__}"
        raise CheckpointError(f"{url} holds objects other than tensors and plain containers, refused by "
                              f"torch.load(weights_only=True) ({why}); it was not written by reflow_core.checkpoint "
                              f"or was tampered with; do not load it with weights_only=False: {fix}") from None
    except Exception as e:
        raise CheckpointError(f"{url} cannot be read, truncated or corrupt ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:300] if str(e) else ''}); {fix}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{url} holds a {type(state).__name__}, not a checkpoint dict; {fix}")
    return state


def _read(url: str, fix: str) -> bytes:
    try:
        return storage.read_bytes(url)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {url} does not exist; {fix}") from None


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _name(url: str) -> str:
    return url.rsplit("/", 1)[-1]


# --- training checkpoints ------------------------------------------------------------------------------------------

def save(ckpt_dir: str, state: dict, keep: int = 2) -> str:
    """Write ckpt-<step:07d>.pt all-or-nothing, then point latest.json at it (with its sha256 and size); prune all
    but the newest `keep` checkpoints and any temp file a killed writer left. Returns the checkpoint's URL."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"a checkpoint state needs an int 'step' >= 0, got {step!r}")
    data = _serialise(state)
    name = f"ckpt-{step:07d}.pt"
    url = storage.join(ckpt_dir, name)
    ptr_url = storage.join(ckpt_dir, POINTER)
    with _write_errors(ckpt_dir, f"{name} was not marked done: {ptr_url} still names the previous checkpoint"):
        storage.atomic_write_bytes(url, data)
        ptr = LatestPointer(step=step, file=name, sha256=storage.sha256(data), bytes=len(data))
        storage.write_json(ptr_url, ptr.model_dump())
    with _write_errors(ckpt_dir, f"{name} is complete and {ptr_url} names it; only pruning of older files failed"):
        _prune(ckpt_dir, name, keep)
    return url


@contextlib.contextmanager
def _write_errors(where: str, state: str):
    """Turn a storage failure inside the block into a CheckpointError naming `where`, the cause and what is (not)
    trusted afterwards, so a stage ends with one clear message instead of an fsspec / botocore traceback."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - filtered by storage.is_storage_error
        if not storage.is_storage_error(e):
            raise
        cause = e.__cause__ if isinstance(e, storage.StorageWriteError) and e.__cause__ is not None else e
        detail = str(cause).replace("\n", " ")[:300]
        raise CheckpointError(f"cannot write to {where} ({type(cause).__name__}: {detail}); {state}. Make {where} "
                              f"writable (permissions, free space, object-store policy / credentials) and rerun: "
                              f"the stage resumes from its last complete checkpoint") from e


def _prune(ckpt_dir: str, current: str, keep: int) -> None:
    fs, path = storage.fs_and_path(ckpt_dir)
    names = fs.ls(path, detail=False)
    ckpts = sorted((int(m.group(1)), p) for p in names if (m := _CKPT_RE.search(p)) and _name(p) != current)
    old = [p for _, p in ckpts[: max(0, len(ckpts) - (keep - 1))]]
    old += [p for p in names if _TMP_RE.search(p)]  # left by a writer killed mid-write
    for p in old:
        try:
            fs.rm(p)
        except FileNotFoundError:  # another process pruned it first
            pass


def latest_info(ckpt_dir: str) -> LatestPointer | None:
    """ckpt_dir's validated latest.json (step, file, sha256, bytes), or None when there is no checkpoint yet."""
    ptr = storage.join(ckpt_dir, POINTER)
    if not storage.exists(ptr):
        return None
    try:
        return LatestPointer.model_validate_json(storage.read_bytes(ptr))
    except (ValidationError, ValueError, OSError) as e:  # a torn pointer is never trusted
        detail = str(e).replace("\n", " ")[:300]
        raise CheckpointError(f"{ptr} is unreadable or invalid ({type(e).__name__}: {detail}); delete {ckpt_dir} "
                              f"(or rerun with --redo-stage <stage>) to retrain this stage") from None


def latest(ckpt_dir: str) -> str | None:
    """URL of the newest complete checkpoint in ckpt_dir (from latest.json), or None when there is none yet."""
    info = latest_info(ckpt_dir)
    return None if info is None else storage.join(ckpt_dir, info.file)


def reached(ckpt_dir: str, steps: int) -> bool:
    """Whether ckpt_dir's latest checkpoint is at step >= `steps`: a training stage trained that far is finished."""
    info = latest_info(ckpt_dir)
    return info is not None and info.step >= steps


def load(url: str, verify: bool = True) -> dict:
    """Load a checkpoint (weights_only=True, on CPU). With verify, check its sha256 first against latest.json when
    that pointer names this file, else against a `<url>.sha256` sidecar when one exists."""
    fix = "delete it and latest.json to resume from scratch, or rerun with --redo-stage <stage>"
    data = _read(url, fix)
    if verify:
        info = latest_info(_parent(url))
        if info is not None and info.file == _name(url):
            ptr = storage.join(_parent(url), POINTER)
            if len(data) != info.bytes or storage.sha256(data) != info.sha256:
                size = f": {len(data)} bytes, {info.bytes} expected" if len(data) != info.bytes else ""
                raise CheckpointError(f"checkpoint {url} does not match the sha256 in {ptr} (truncated or corrupt"
                                      f"{size}); {fix}")
        elif storage.exists(url + SIDECAR_SUFFIX):
            _check_sidecar(url, data)
    return _deserialise(url, data, fix)


def load_latest(ckpt_dir: str) -> dict | None:
    url = latest(ckpt_dir)
    return None if url is None else load(url)


# --- RNG -----------------------------------------------------------------------------------------------------------

def rng_state() -> dict:
    """torch's global RNG state: {"cpu": ByteTensor} plus {"cuda": [ByteTensor per device]} when CUDA is available."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state) -> None:
    """Restore what rng_state() returned. Tolerates a state saved without CUDA (the CUDA generators are left as
    they are), one saved on more or fewer GPUs (the devices both have are restored), and a bare CPU ByteTensor
    (checkpoints written before this module)."""
    if isinstance(state, torch.Tensor):
        state = {"cpu": state}
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# --- single-file artifacts -----------------------------------------------------------------------------------------

def save_file(url: str, state: dict) -> str:
    """Write one artifact atomically plus its sidecar `<url>.sha256` (after it). Returns url."""
    data = _serialise(state)
    with _write_errors(url, f"{_name(url)} has no matching sidecar {_name(url)}{SIDECAR_SUFFIX}, so it is not "
                            f"trusted and is rebuilt"):
        storage.atomic_write_bytes(url, data)
        storage.atomic_write_bytes(url + SIDECAR_SUFFIX, f"{storage.sha256(data)}  {_name(url)}\n".encode())
    return url


def _check_sidecar(url: str, data: bytes) -> None:
    side = url + SIDECAR_SUFFIX
    fix = f"delete {url} and {side} to rebuild it"
    try:
        text = storage.read_bytes(side).decode("ascii", errors="replace")
    except FileNotFoundError:
        raise CheckpointError(f"{url} has no hash sidecar {side}, so it cannot be verified (written by an older "
                              f"version or a writer killed mid-save); {fix}") from None
    fields = text.split()
    if not fields or not _HEX64.match(fields[0]):
        raise CheckpointError(f"{side} is unreadable (expected '<sha256>  {_name(url)}'); {fix}")
    if storage.sha256(data) != fields[0]:
        raise CheckpointError(f"{url} does not match the sha256 in {side} (truncated, corrupt or modified); {fix}")


def load_file(url: str) -> dict:
    """Load an artifact written by save_file: its sidecar must exist and match; weights_only=True."""
    fix = f"delete {url} and {url + SIDECAR_SUFFIX} to rebuild it"
    data = _read(url, fix)
    _check_sidecar(url, data)
    return _deserialise(url, data, fix)
