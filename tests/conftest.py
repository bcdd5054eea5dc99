import pytest  # noqa: F401


def pytest_configure(config):
    config.addinivalue_line("markers", "s3: needs a local moto S3 server on 127.0.0.1 (tests/test_pairs_s3.py)")


def pytest_sessionstart(session):
    # The models under test are tiny: one intra-op thread is faster than two fighting for a 2-core CI machine
    # (measured: a 300-step MLP run took 6.8 s with 1 thread, 45 s with 2 under load).
    import torch
    torch.set_num_threads(1)
