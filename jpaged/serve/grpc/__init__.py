"""The gRPC API (``jpaged.v1.Generation``, see ``generation.proto``) served by
a ``grpc.aio`` server on the same `AsyncLLM` as the HTTP API: `stubs` builds
the message classes from the proto, `servicer` implements the service, and
`server` adds authentication, health, reflection and draining
(`start_grpc_server`)."""
