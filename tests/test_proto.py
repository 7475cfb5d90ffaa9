"""The committed bindings are exactly what the documented command generates from the .proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import kvstore.proto.v1 as v1


def test_generated_bindings_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) regenerates the bindings")
    # protoc in a process of its own, as the documented command runs it: its bundled native
    # libraries crash a process that has loaded NIXL's (the peer tests load it in this one).
    done = subprocess.run([sys.executable, "-m", "kvstore.proto.generate", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    written = [Path(line) for line in done.stdout.split()]
    assert {p.name for p in written} == {"kvstore_pb2.py", "kvstore_pb2.pyi", "kvstore_pb2_grpc.py"}
    committed = Path(v1.__file__).parent
    for path in written:
        assert path.read_text() == (committed / path.name).read_text(), (
            f"{path.name} is stale: run `python -m kvstore.proto.generate`"
        )


def test_wire_tier_values_match_the_core_enum():
    from kvstore import TierKind
    from kvstore.proto.v1 import kvstore_pb2 as pb

    for kind in TierKind:
        assert pb.Tier.Value(f"TIER_{kind.name}") == kind.value
