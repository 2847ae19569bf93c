"""A gRPC client for the tests, compiled from the shipped ``generation.proto``
by grpcio-tools at test time (as a user would), once per session."""

from __future__ import annotations

import atexit
import importlib
import shutil
import sys
import tempfile

_MODULES: list = []


def client_modules():
    """(``generation_pb2``, ``generation_pb2_grpc``) compiled from the proto."""
    if not _MODULES:
        from importlib.resources import files

        from grpc_tools import protoc

        proto = files("jpaged.serve.grpc") / "generation.proto"
        out = tempfile.mkdtemp(prefix="jpaged-grpc-client-")
        atexit.register(shutil.rmtree, out, True)
        assert protoc.main(["protoc", f"-I{proto.parent}", f"--python_out={out}",
                            f"--grpc_python_out={out}", "generation.proto"]) == 0
        sys.path.insert(0, out)
        try:
            _MODULES[:] = [importlib.import_module("generation_pb2"),
                           importlib.import_module("generation_pb2_grpc")]
        finally:
            sys.path.remove(out)
    return tuple(_MODULES)
