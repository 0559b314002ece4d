"""TLS for the stream receive paths: one ``TlsSession`` per connection drives the stdlib's
``ssl`` over memory BIOs (``SSLContext.wrap_bio``), so TLS uses the OpenSSL that Python's
``_ssl`` links and fastsock builds with no TLS library of its own.

The event engines (the compiled one and the reference) read the ciphertext from the socket
themselves, hand it to ``receive()``, advance the handshake, and take the plaintext with
``read_into()`` straight into their framer's buffer.  Handshake output goes to the socket
at once with ``os.write``: a receive-only server sends only the handshake, session tickets
and alerts, which the socket's send buffer always has room for.
"""

import os
import ssl

__all__ = ["TLS_CLOSED", "TlsBroken", "TlsSession", "HandshakeFailed", "subject_text"]

TLS_CLOSED = -1
"""What ``read_into()`` returns once the peer ended the TLS stream (close_notify)."""


class HandshakeFailed(Exception):
    """The handshake failed; ``reason`` says why, as OpenSSL named it (e.g.
    "WRONG_VERSION_NUMBER", "PEER_DID_NOT_RETURN_A_CERTIFICATE")."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class TlsBroken(Exception):
    """The TLS stream broke after the handshake (a bad record, or the connection ended
    inside a record without close_notify); ``reason`` as for HandshakeFailed."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class TlsSession:
    """One server-side TLS connection over memory BIOs; ``fd`` is its socket, to which
    ``receive()``, ``advance_handshake()`` and ``read_into()`` write what TLS has to send."""

    __slots__ = ("fd", "incoming", "outgoing", "tls", "subject", "received")

    def __init__(self, context, fd):
        self.fd = fd
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.subject = None
        self.received = 0

    def receive(self, ciphertext):
        """Bytes the peer sent (any bytes-like object), or its end when empty."""
        if ciphertext:
            self.received += self.incoming.write(ciphertext)
        else:
            self.incoming.write_eof()

    def advance_handshake(self):
        """Go as far as the ciphertext received allows: True once the handshake is done
        (``subject`` is then the client certificate's, if it sent one), False while it waits
        for more; raises HandshakeFailed."""
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush_handshake()
            return False
        except (ssl.SSLError, ValueError) as exc:
            # The alert that says why, if the peer is still there to read it.
            self._flush(quietly=True)
            raise HandshakeFailed(failure_reason(exc)) from None
        self._flush_handshake()
        certificate = self.tls.getpeercert()
        if certificate:
            self.subject = subject_text(certificate.get("subject", ()))
        return True

    def read_into(self, buffer):
        """Plaintext into ``buffer`` (a writable memoryview), as much as the ciphertext
        received holds and the buffer takes: the byte count (0: more ciphertext is needed),
        or TLS_CLOSED after the peer's close_notify; raises TlsBroken."""
        room = len(buffer)
        taken = 0
        try:
            while taken < room:
                count = self.tls.read(room - taken, buffer[taken:])
                if count == 0:
                    # ssl's read() returns 0, not SSLWantReadError, after close_notify.
                    if taken:
                        return taken
                    self._close_notify()
                    return TLS_CLOSED
                taken += count
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            if taken:
                return taken
            self._close_notify()
            return TLS_CLOSED
        except ssl.SSLEOFError:
            # The peer's end without close_notify, as most clients end (Python's closes its
            # socket without one): an ordinary end, as ssl's suppress_ragged_eofs has it.
            return taken or TLS_CLOSED
        except ssl.SSLError as exc:
            if taken:
                # What came before the break is delivered; the next call raises again.
                return taken
            raise TlsBroken(failure_reason(exc)) from None
        # A TLS 1.3 key update or a ticket may want an answer.
        self._flush(quietly=True)
        return taken

    def _close_notify(self):
        try:
            self.tls.unwrap()
        except (ssl.SSLError, ValueError):
            pass
        self._flush(quietly=True)

    def _flush_handshake(self):
        try:
            self._flush(quietly=False)
        except OSError as exc:
            raise HandshakeFailed(f"cannot send the handshake: {os.strerror(exc.errno)}") from None

    def _flush(self, *, quietly):
        pending = self.outgoing.read()
        try:
            while pending:
                written = os.write(self.fd, pending)
                pending = pending[written:]
        except OSError:
            if not quietly:
                raise


def failure_reason(exc):
    """A short, printable reason for an ssl error: OpenSSL's name for it when it has one."""
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason)
    if isinstance(exc, ssl.SSLEOFError):
        return "UNEXPECTED_EOF"
    return type(exc).__name__ + (f": {exc}" if str(exc) else "")


def subject_text(subject):
    """A certificate subject as ``ssl.getpeercert()`` gives it, as one string in RFC 4514's
    order (most specific first): "CN=client,O=Example"."""
    return ",".join(
        "+".join(f"{_SHORT_NAMES.get(key, key)}={value}" for key, value in relative_name)
        for relative_name in reversed(subject)
    )


_SHORT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "domainComponent": "DC",
    "userId": "UID",
    "emailAddress": "emailAddress",
}
