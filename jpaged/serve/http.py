"""uvicorn for the server: h11 (whose request head size is bounded), no
lifespan, a concurrency cap, a keep-alive timeout, and a deadline for request
heads.

uvicorn has no timeout for a request head that arrives slowly (its keep-alive
timer is cancelled by any byte received), so a client could hold a socket
forever by sending one header byte at a time, before authentication ever
runs. `_HeadDeadlineH11` closes a connection whose head has not fully
arrived within ``head_timeout`` of the connection opening or of its previous
response ending; a byte now and then does not extend it.
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class _HeadDeadlineH11(H11Protocol):
    head_timeout = 10.0
    _head_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_deadline()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:
            self._cancel_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_head_deadline()

    def connection_lost(self, exc) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_overdue)

    def _cancel_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app, host: str = "127.0.0.1", port: int = 8000,
                   max_header_bytes: int = 64 << 10, log_level: str = "warning",
                   limit_concurrency: int | None = 1024, timeout_keep_alive: float = 5.0,
                   head_timeout: float = 10.0):
    """The ``uvicorn.Config`` for ``app`` (see the module docstring)."""
    import uvicorn

    protocol = type("HeadDeadlineH11", (_HeadDeadlineH11,), {"head_timeout": head_timeout})
    return uvicorn.Config(app, host=host, port=port, http=protocol, lifespan="off",
                          h11_max_incomplete_event_size=max_header_bytes, server_header=False,
                          timeout_graceful_shutdown=5, log_level=log_level,
                          limit_concurrency=limit_concurrency,
                          timeout_keep_alive=timeout_keep_alive)
