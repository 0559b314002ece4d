"""TLS for the stream receive paths: one ``TlsSession`` per connection drives the stdlib's
``ssl`` over memory BIOs (``SSLContext.wrap_bio``), so TLS uses the OpenSSL that Python's
``_ssl`` links and fastsock builds with no TLS library of its own.

The event engines (the compiled one and the reference) read the ciphertext from the socket
themselves, hand it to ``receive()``, advance the handshake, and take the plaintext with
``read_into()`` straight into their framer's buffer.  Handshake output goes to the socket
at once with ``os.write``: a receive-only server sends only the handshake, session tickets
and alerts, which the socket's send buffer always has room for.

A session follows the record boundaries of the ciphertext (``RecordBoundaries``), so that
``read_into()`` asks ssl for plaintext only while a whole record waits: the read that finds
none raises SSLWantReadError, which costs more than decrypting a 16 KiB record (ssl builds
the exception and its message), once per socket read.
"""

import os
import ssl

__all__ = [
    "TLS_CLOSED",
    "RecordBoundaries",
    "TlsBroken",
    "TlsSession",
    "HandshakeFailed",
    "subject_text",
]

TLS_CLOSED = -1
"""What ``read_into()`` returns once the peer ended the TLS stream (close_notify)."""
RECORD_HEADER_BYTES = 5
"""A TLS record's header: content type, protocol version (2 bytes), length (2 bytes)."""
RECORD_MAX_BODY = 2**14 + 2048
"""The longest record body TLS allows (RFC 5246's TLSCiphertext; TLS 1.3's is shorter)."""
RECORD_TYPES = range(20, 25)
"""change_cipher_spec, alert, handshake, application_data, heartbeat."""
UNKNOWN = -1
"""``RecordBoundaries.unfinished`` once the stream is not made of TLS records."""


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

    __slots__ = (
        "fd",
        "incoming",
        "outgoing",
        "tls",
        "subject",
        "received",
        "ended",
        "records",
        "unfinished",
        "drained",
        "held_back",
    )

    def __init__(self, context, fd):
        self.fd = fd
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.subject = None
        self.received = 0
        self.ended = False
        self.records = RecordBoundaries()
        self.unfinished = 0
        self.drained = False
        self.held_back = False

    def receive(self, ciphertext, unfinished=None):
        """Bytes the peer sent (any bytes-like object), or its end when empty.
        ``unfinished``: what ``RecordBoundaries.follow()`` says of all the ciphertext so
        far, from a caller that follows the records itself (the compiled engine)."""
        if ciphertext:
            self.received += self.incoming.write(ciphertext)
            self.unfinished = self.records.follow(ciphertext) if unfinished is None else unfinished
        else:
            self.incoming.write_eof()
            self.ended = True

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
        or TLS_CLOSED after the peer's close_notify; raises TlsBroken.  ``drained`` then
        says whether it took all there was: a next call before more ciphertext would
        return 0."""
        room = len(buffer)
        taken = 0
        self.drained = False
        try:
            while taken < room:
                if not self._whole_record_waits():
                    self.drained = True
                    return taken
                count = self.tls.read(room - taken, buffer[taken:])
                if count == 0:
                    # ssl's read() returns 0, not SSLWantReadError, after close_notify.
                    if taken:
                        self.held_back = True
                        return taken
                    self._close_notify()
                    return TLS_CLOSED
                taken += count
        except ssl.SSLWantReadError:
            # A record without plaintext (a ticket, a key update) and then a partial one.
            self.drained = True
        except ssl.SSLZeroReturnError:
            if taken:
                self.held_back = True
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
                self.held_back = True
                return taken
            raise TlsBroken(failure_reason(exc)) from None
        # A TLS 1.3 key update or a ticket may want an answer.
        if self.outgoing.pending:
            self._flush(quietly=True)
        return taken

    def _whole_record_waits(self):
        # The ciphertext ssl has not taken holds a whole record (``unfinished``: the bytes
        # of an incomplete record at the end, some of which ssl may hold already; UNKNOWN,
        # below any count, always reads), or ssl holds plaintext of a record that a full
        # buffer cut short, or the peer's end is still to be read, or an end or a break
        # found after plaintext is still to be reported.
        return (
            self.incoming.pending > self.unfinished
            or self.ended
            or self.held_back
            or self.tls.pending() > 0
        )

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


class RecordBoundaries:
    """Follows the TLS records of a ciphertext stream, header by header: ``follow()``
    says how many bytes at the end belong to a record not yet complete, or UNKNOWN once
    a header is not a TLS record's (the stream is garbage, or an SSLv2-style hello: ssl
    says which).  The compiled engine has the same in C (tls_records_follow)."""

    __slots__ = ("header", "body_left", "unfinished")

    def __init__(self):
        self.header = bytearray()
        self.body_left = 0
        self.unfinished = 0

    def follow(self, ciphertext):
        """The bytes of an incomplete record at the end of all ciphertext so far."""
        data = memoryview(ciphertext).cast("B")
        size = len(data)
        at = 0
        while at < size and self.unfinished != UNKNOWN:
            if len(self.header) < RECORD_HEADER_BYTES:
                take = min(RECORD_HEADER_BYTES - len(self.header), size - at)
                self.header += data[at : at + take]
                self.unfinished += take
                at += take
                if len(self.header) < RECORD_HEADER_BYTES:
                    break
                body = int.from_bytes(self.header[3:5], "big")
                if (
                    self.header[0] not in RECORD_TYPES
                    or self.header[1] != 3
                    or body > RECORD_MAX_BODY
                ):
                    self.unfinished = UNKNOWN
                    break
                self.body_left = body
            take = min(self.body_left, size - at)
            self.body_left -= take
            self.unfinished += take
            at += take
            if self.body_left == 0:
                self.header.clear()
                self.unfinished = 0
        return self.unfinished


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
