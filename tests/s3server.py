"""The S3-compatible server the tests run against (moto's server mode on loopback)."""

from __future__ import annotations

import os

from kvstore.bench.baselines import MotoServer

__all__ = ["MotoServer", "use_test_credentials"]


def use_test_credentials() -> None:
    """moto accepts any credentials; the AWS chain needs some to sign requests."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "kvstore-test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "kvstore-test")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
