"""One writer per run directory: a lease file `<run dir>/run.lock`, renewed by a heartbeat while a runner walks.

Two runners on one `<root>/<run>` would train into the same checkpoints and evaluate into the same metrics.json,
so the second is refused (`RunInUse`, naming the holder) until the first lets go. A lease is let go when its
runner ends (`release`), or is stale: its process is gone (a holder on this machine whose pid no longer exists),
its heartbeat is older than `ttl` seconds (a killed process elsewhere, a lost machine), or the caller's
`is_stale(holder)` says so (the flow asks the Prefect API whether the holding flow run ended).

    with lease.hold(rundir.dir, owner="flow-run-id or host:pid"):
        ...walk the plan...

On a local root the lease is created with O_EXCL; on an object store there is no create-if-absent, so a writer
reads its own lease back after writing it and gives up if another writer's replaced it (two runners starting within
that window of each other both fail cleanly rather than both proceed). Heartbeats use wall-clock time: machines
sharing a root must keep their clocks within a fraction of `ttl` of each other (NTP does).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator

from . import storage

LEASE_FILE = "run.lock"
TTL_SECONDS = 120.0


class RunInUse(RuntimeError):
    """Another runner holds the run directory's lease; the message names it and what to do."""


def local_owner() -> str:
    """An owner id for a runner with no orchestrator id of its own: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class Lease:
    url: str
    owner: str
    ttl: float = TTL_SECONDS
    info: dict = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _record(self) -> dict:
        now = time.time()
        return {**self.info, "owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                "heartbeat": now, "ttl": self.ttl}

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            holder = read(self.url)
            if holder is not None and holder.get("owner") != self.owner:
                return  # taken over (we were presumed dead): stop renewing, never overwrite the new holder
            try:
                storage.write_json(self.url, self._record())
            except OSError:
                pass  # a missed beat is fine; ttl is four beats

    def start(self) -> "Lease":
        self._thread = threading.Thread(target=self._beat, name="reflow-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = read(self.url)
        if holder is not None and holder.get("owner") == self.owner:
            fs, path = storage.fs_and_path(self.url)
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path)


def read(url: str) -> dict | None:
    """The lease record at url; None when there is none, or it is unreadable (a torn write counts as no lease)."""
    try:
        raw = json.loads(storage.read_bytes(url))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None
    return raw if isinstance(raw, dict) and isinstance(raw.get("owner"), str) else None


def _age(holder: dict) -> float:
    try:
        return time.time() - float(holder.get("heartbeat", 0.0))
    except (TypeError, ValueError):
        return float("inf")


def _process_gone(holder: dict) -> bool:
    """The holder ran on this machine and its process no longer exists (killed, crashed): stale at once."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _refuse(run_dir: str, holder: dict, ttl: float) -> RunInUse:
    who = holder.get("flow_run_name") or holder["owner"]
    return RunInUse(
        f"run directory {run_dir} is in use by {who} (owner {holder['owner']}, host {holder.get('host')}, pid "
        f"{holder.get('pid')}, last heartbeat {_age(holder):.0f} s ago); two runners on one run would write the same "
        f"checkpoints. Wait for it to end, cancel it, or use another run name. A lease left by a killed runner "
        f"expires {ttl:.0f} s after its last heartbeat ({run_dir}/{LEASE_FILE})")


def acquire(run_dir: str, owner: str, *, ttl: float = TTL_SECONDS, info: dict | None = None,
            is_stale: Callable[[dict], bool] | None = None, settle: float = 0.5) -> Lease:
    """Take the run directory's lease for `owner` and start its heartbeat; RunInUse if a live runner holds it.
    The same owner may take it again (a retried flow run). `info` is stored in the record (e.g. a flow run name)."""
    url = storage.join(run_dir, LEASE_FILE)
    lease = Lease(url, owner, ttl, dict(info or {}))
    holder = read(url)
    if holder is not None and holder["owner"] != owner:
        if (_age(holder) < float(holder.get("ttl", ttl)) and not _process_gone(holder)
                and not (is_stale is not None and is_stale(holder))):
            raise _refuse(run_dir, holder, ttl)
    fs, path = storage.fs_and_path(url)
    if storage.is_local(url) and holder is None:
        try:  # create-if-absent: of two runners starting together exactly one creates the file
            fs.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return acquire(run_dir, owner, ttl=ttl, info=info, is_stale=is_stale, settle=settle)
        except OSError as e:  # a read-only or full root: the same error as any other write under it
            raise storage.write_error(url, e) from e
        with os.fdopen(fd, "w") as f:
            json.dump(lease._record(), f)
    else:
        storage.write_json(url, lease._record())
        time.sleep(settle)  # another writer's record may land after ours: read back who holds it
        holder = read(url)
        if holder is None or holder["owner"] != owner:
            raise _refuse(run_dir, holder or {"owner": "another runner"}, ttl)
    return lease.start()


@contextlib.contextmanager
def hold(run_dir: str, owner: str, **kwargs) -> Iterator[Lease]:
    """`acquire` ... `release`, also when the body raises."""
    lease = acquire(run_dir, owner, **kwargs)
    try:
        yield lease
    finally:
        lease.release()
