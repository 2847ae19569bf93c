"""Message classes of ``generation.proto``, compiled when first imported.

The proto ships with the package and is compiled by grpcio-tools' bundled
``protoc`` into a temporary directory, so the Python code always matches the
proto next to it and nothing generated is kept in the source tree. The file
is registered in protobuf's default pool as ``generation.proto``, which is
what server reflection serves and what a client compiled from the same file
registers too.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

PROTO_DIR = os.path.dirname(os.path.abspath(__file__))
PROTO_FILE = "generation.proto"
PROTO_PATH = os.path.join(PROTO_DIR, PROTO_FILE)
SERVICE = "jpaged.v1.Generation"


def _compile():
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory(prefix="jpaged-proto-") as out:
        rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={out}", PROTO_FILE])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {PROTO_PATH} (exit status {rc})")
        spec = importlib.util.spec_from_file_location(
            "jpaged.serve.grpc.generation_pb2", os.path.join(out, "generation_pb2.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


pb2 = _compile()
