"""A TCP proxy for tests: forwards a local port to another one, and can be cut off (every
connection closed, the port refusing new ones) and restored, as a network outage would, or
stalled (new connections taken and never answered), as a hung server would."""

from __future__ import annotations

import socket
import threading


class TcpProxy:
    """Forward ``127.0.0.1:port`` to ``127.0.0.1:target`` on threads; :meth:`stop` cuts it off,
    :meth:`start` brings it back on the same port; while :attr:`stalled`, a new connection is
    accepted and held without a byte forwarded either way."""

    def __init__(self, port: int, target: int):
        self.port, self.target = port, target
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self.stalled = False
        self._lock = threading.Lock()

    def start(self) -> "TcpProxy":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Close the listening port and every forwarded connection."""
        listener, self._listener = self._listener, None
        if listener is not None:
            try:  # wakes the accept() blocked in its thread (close alone leaves the port listening)
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        with self._lock:
            sockets, self._open = self._open, set()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # stopped
                return
            if self.stalled:  # taken, never answered: the client waits on its own timeout
                with self._lock:
                    self._open.add(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # stopped meanwhile
                    client.close(), upstream.close()
                    return
                self._open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            with self._lock:
                self._open -= {src, dst}
