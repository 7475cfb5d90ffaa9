"""Regenerate the Python bindings of the wire contract: ``python -m kvstore.proto.generate``.

Runs protoc (from grpcio-tools, in the ``dev`` extra) on ``proto/v1/kvstore.proto`` with the
virtual path ``kvstore/proto/v1/kvstore.proto``, so the generated modules import each other as
``kvstore.proto.v1`` and register a descriptor name no other package uses. The generated
``*_pb2*.py`` / ``*.pyi`` files sit beside the .proto and are never edited by hand.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

V1 = Path(__file__).resolve().parent / "v1"
VIRTUAL = "kvstore/proto/v1"


def generate(out_dir: Path = V1) -> list[Path]:
    """Write the bindings into ``out_dir``; returns the files written."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"--proto_path={VIRTUAL}={V1}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"{VIRTUAL}/kvstore.proto",
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        written = []
        for src in sorted((Path(tmp) / VIRTUAL).iterdir()):
            dst = out_dir / src.name
            shutil.copyfile(src, dst)
            written.append(dst)
        return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else V1
    for path in generate(out):
        print(path)
