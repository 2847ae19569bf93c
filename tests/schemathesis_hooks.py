"""Schemathesis hooks for tests/test_openapi.py (loaded with SCHEMATHESIS_HOOKS).

A request whose ``deadline_ms`` or ``ttft_slo_ms`` passes before its first
step is refused with a documented 503 (tests/test_server_deadlines.py checks
that answer); to the fuzzer's ``not_a_server_error`` check it is a server
error all the same. The fuzzer still sends both fields, with every other
part of the body as generated, but a valid deadline is never shorter than a
minute (invalid ones, zero or negative, still go as generated and must be
400s), so that a 5xx it finds is a bug and not a deadline it asked for.
"""

import schemathesis

MIN_DEADLINE_MS = 60_000.0


@schemathesis.hook
def map_body(context, body):
    if isinstance(body, dict):
        for name in ("deadline_ms", "ttft_slo_ms"):
            v = body.get(name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < MIN_DEADLINE_MS:
                body[name] = MIN_DEADLINE_MS
    return body
