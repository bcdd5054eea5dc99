import os
import signal
from pathlib import Path

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "s3: needs a local moto S3 server on 127.0.0.1 (tests/core/test_pairs_s3.py)")


def pytest_sessionstart(session):
    # The models under test are tiny: one intra-op thread is faster than two fighting for a 2-core CI machine
    # (measured: a 300-step MLP run took 6.8 s with 1 thread, 45 s with 2 under load).
    import torch
    torch.set_num_threads(1)
    # A test run started in the background (`make test &`, `nohup`) inherits SIGINT ignored, and so would every
    # process it starts: a `reflow run` that ignores Ctrl-C. The tests that stop runs with Ctrl-C need it as a
    # terminal gives it, so the session takes SIGINT back (its children then start with the default).
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect API server (SQLite) for the session's flow runs (no telemetry: offline and quiet). One
    for all modules: each start costs ~20 s on the 2-core box; tests keep their state apart by their own tmp roots."""
    from prefect.testing.utilities import prefect_test_harness

    old = os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # read by the server subprocess
    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield
    finally:
        if old is None:
            os.environ.pop("PREFECT_SERVER_ANALYTICS_ENABLED", None)
        else:
            os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = old


# --- a moto S3 API server on 127.0.0.1, endpoint and throw-away credentials in the environment -------------
S3_TEST_SECRET = "reflow-test-secret-3b9e71c2"  # distinctive, so a test can grep written objects for it
S3_TEST_KEY_ID = "reflowtestkeyid5a1f"


@pytest.fixture(scope="module")
def moto_s3():
    """{"endpoint", "client", "mp", "secret", "key_id"}: a ThreadedMotoServer on a free port of 127.0.0.1 with
    AWS_ENDPOINT_URL / credentials set in os.environ (so subprocesses inherit them) for the module's duration."""
    import socket

    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto")
    s3fs = pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import logging
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for k in ("AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(k, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", S3_TEST_KEY_ID)
        mp.setenv("AWS_SECRET_ACCESS_KEY", S3_TEST_SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        s3fs.S3FileSystem.clear_instance_cache()  # instances made for another endpoint must not be reused
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        yield {"endpoint": endpoint, "client": client, "mp": mp, "secret": S3_TEST_SECRET, "key_id": S3_TEST_KEY_ID}
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


# --- the temporary Prefect API server of `reflow run` (flows/api_server.py) ----------------------------------------
def _live_prefect_servers(home) -> list[int]:
    """Pids of live (not zombie) Prefect API server processes whose PREFECT_HOME is `home`, from /proc."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            env = (d / "environ").read_bytes().split(b"\0")
            state = (d / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if b"prefect.server.api.server:create_app" in cmd and f"PREFECT_HOME={home}".encode() in env \
                and state != "Z":
            pids.append(int(d.name))
    return pids


@pytest.fixture
def prefect_servers():
    """`prefect_servers(home)`: the pids of live Prefect API servers running on PREFECT_HOME `home`."""
    if not Path("/proc/self/environ").exists():
        pytest.skip("needs /proc (Linux)")
    return _live_prefect_servers
