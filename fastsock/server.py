"""The socketserver-compatible server framework.

Every class here behaves as its namesake in CPython 3.12/3.13's ``socketserver``: same
hooks, attributes, defaults and call order, so existing servers and handlers run
unchanged.  Where fastsock does better it breaks nobody: ``shutdown()`` wakes the serving
loop at once instead of at the next ``poll_interval`` tick, ``accept()`` failing for lack
of file descriptors pauses accepting instead of spinning, and a few opt-in switches cover
what the stdlib needs subclassing for (see ``TCPServer``, ``UDPServer`` and
``ThreadingMixIn``).
"""

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import queue
import selectors
import socket
import stat
import sys
import threading
import traceback
from io import BufferedIOBase, BytesIO
from time import monotonic

from . import constants
from ._ratelimit import RateLimitedLogger
from .errors import DatagramTruncatedError
from .stats import ReceiveStats

__all__ = [
    "BaseServer",
    "TCPServer",
    "UDPServer",
    "ThreadingUDPServer",
    "ThreadingTCPServer",
    "BaseRequestHandler",
    "StreamRequestHandler",
    "DatagramRequestHandler",
    "ThreadingMixIn",
]
if hasattr(os, "fork"):
    __all__ += ["ForkingUDPServer", "ForkingTCPServer", "ForkingMixIn"]
if hasattr(socket, "AF_UNIX"):
    __all__ += [
        "UnixStreamServer",
        "UnixDatagramServer",
        "ThreadingUnixStreamServer",
        "ThreadingUnixDatagramServer",
    ]
    # fastsock defines these two on every version, but lists them where the stdlib does.
    if hasattr(os, "fork") and sys.version_info >= (3, 12):
        __all__ += ["ForkingUnixStreamServer", "ForkingUnixDatagramServer"]

_log = RateLimitedLogger(logging.getLogger("fastsock"), constants.ERROR_LOG_INTERVAL)

# poll() has no FD_SETSIZE limit on the descriptors it watches.
if hasattr(selectors, "PollSelector"):
    _ServerSelector = selectors.PollSelector
else:
    _ServerSelector = selectors.SelectSelector

_FD_EXHAUSTION_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class BaseServer:
    """Base class for server classes.

    Methods for the caller: ``__init__(server_address, RequestHandlerClass)``,
    ``serve_forever(poll_interval=0.5)``, ``shutdown()``, ``handle_request()``,
    ``fileno()``.  Methods that may be overridden: ``server_bind``, ``server_activate``,
    ``get_request``, ``handle_timeout``, ``verify_request``, ``server_close``,
    ``process_request``, ``shutdown_request``, ``close_request``, ``service_actions``,
    ``handle_error``.  Method for derived classes: ``finish_request``.  Class variables
    that may be overridden by derived classes or instances: ``timeout``,
    ``address_family``, ``socket_type``, ``allow_reuse_address``, ``allow_reuse_port``.
    """

    timeout = None

    # fastsock: the compiled receive path of a fastsock.receiver handler (StreamPath or
    # DatagramPath, fastsock/receiver.py), made by the constructor; None for other handlers.
    receive_path = None

    def __init__(self, server_address, RequestHandlerClass):
        """Constructor.  May be extended, do not override."""
        self.server_address = server_address
        self.RequestHandlerClass = RequestHandlerClass
        self.__is_shut_down = threading.Event()
        self.__shutdown_request = False
        self.__serving_thread = None
        self.__wakeup_lock = threading.RLock()
        self.__wakeup_sender = None
        self.__interrupt_compiled_loop = None
        self.__accept_paused_until = 0.0
        self.__accept_backoff = 0.0
        make_receive_path = getattr(RequestHandlerClass, "fastsock_receive_path", None)
        if make_receive_path is not None:
            self.receive_path = make_receive_path(self)

    def server_activate(self):
        """Called by constructor to activate the server.  May be overridden."""

    def serve_forever(self, poll_interval=0.5):
        """Handle one request at a time until shutdown.

        ``service_actions()`` runs at least every ``poll_interval`` seconds.  Unlike the
        stdlib, ``shutdown()`` wakes this loop at once instead of at the next tick.
        Ignores ``self.timeout``.
        """
        self.__is_shut_down.clear()
        self.__serving_thread = threading.get_ident()
        try:
            path = self.receive_path
            if path is not None and path.serves_itself:
                # Nothing polls there: shutdown() interrupts the path at once.
                path.serve(self._interruptible_by_shutdown)
            else:
                self.__serve_selected(poll_interval)
        finally:
            self.__serving_thread = None
            self.__shutdown_request = False
            self.__is_shut_down.set()

    def __serve_selected(self, poll_interval):
        wakeup_receiver, wakeup_sender = socket.socketpair()
        wakeup_receiver.setblocking(False)
        wakeup_sender.setblocking(False)
        with self.__wakeup_lock:
            self.__wakeup_sender = wakeup_sender
        try:
            with _ServerSelector() as selector:
                selector.register(wakeup_receiver, selectors.EVENT_READ)
                accepting = False
                while not self.__shutdown_request:
                    pause_left = self.__accept_paused_until - monotonic()
                    if accepting != (pause_left <= 0):
                        accepting = not accepting
                        if accepting:
                            selector.register(self, selectors.EVENT_READ)
                        else:
                            selector.unregister(self)
                    timeout = poll_interval if accepting else min(poll_interval, pause_left)
                    ready = selector.select(timeout)
                    # bpo-35017: shutdown() called during select(), exit immediately.
                    if self.__shutdown_request:
                        break
                    for key, _ in ready:
                        if key.fileobj is self:
                            self._handle_request_noblock()
                        else:
                            _drain(wakeup_receiver)
                    self.service_actions()
        finally:
            with self.__wakeup_lock:
                self.__wakeup_sender = None
                wakeup_sender.close()
                wakeup_receiver.close()

    def shutdown(self):
        """Stop the serve_forever loop and wait until it has stopped.

        Called from the thread that runs ``serve_forever`` (a request handler of a
        synchronous server, ``service_actions``, a signal handler), it only asks the loop
        to stop, since waiting there could never end.
        """
        self._request_shutdown()
        if self.__serving_thread == threading.get_ident():
            return
        self.__is_shut_down.wait()

    def request_stop(self):
        """fastsock: ask serve_forever() to return and the compiled receive path to stop
        gracefully, without waiting: safe in a signal handler, and before serve_forever()
        starts (it then returns at once).  server_close() still waits for the drains."""
        path = self.receive_path
        if path is not None:
            path.stop()
        self._request_shutdown()

    def _request_shutdown(self):
        # Without waiting: serve_forever() returns at once, even if it starts only later.
        self.__shutdown_request = True
        self._wake_serve_loop()

    def _wake_serve_loop(self):
        # Reentrant lock: a signal handler may call shutdown() while this same thread is
        # closing the wake-up pair in serve_forever's finally block.
        with self.__wakeup_lock:
            if self.__interrupt_compiled_loop is not None:
                self.__interrupt_compiled_loop()
            if self.__wakeup_sender is not None:
                try:
                    self.__wakeup_sender.send(b"\0")
                except (BlockingIOError, InterruptedError):
                    pass

    def _shutdown_requested(self):
        return self.__shutdown_request

    @contextlib.contextmanager
    def _interruptible_by_shutdown(self, interrupt):
        """While the block runs, shutdown() calls interrupt() to end a compiled loop."""
        with self.__wakeup_lock:
            self.__interrupt_compiled_loop = interrupt
            if self.__shutdown_request:
                interrupt()
        try:
            yield
        finally:
            with self.__wakeup_lock:
                self.__interrupt_compiled_loop = None

    def service_actions(self):
        """Called by the serve_forever() loop.

        May be overridden by a subclass / Mixin to implement any code that needs to be
        run during the loop.
        """

    def handle_request(self):
        """Handle one request, possibly blocking.  Respects self.timeout."""
        timeout = self.socket.gettimeout()
        if timeout is None:
            timeout = self.timeout
        elif self.timeout is not None:
            timeout = min(timeout, self.timeout)
        if timeout is not None:
            deadline = monotonic() + timeout

        with _ServerSelector() as selector:
            selector.register(self, selectors.EVENT_READ)
            while True:
                if selector.select(timeout):
                    return self._handle_request_noblock()
                if timeout is not None:
                    timeout = deadline - monotonic()
                    if timeout < 0:
                        return self.handle_timeout()

    def _handle_request_noblock(self):
        """Handle one request, without blocking: the socket was just reported readable."""
        try:
            request, client_address = self.get_request()
        except OSError as exc:
            self._note_get_request_failure(exc)
            return
        self.__accept_backoff = 0.0
        if self.verify_request(request, client_address):
            try:
                self.process_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
                self.shutdown_request(request)
            except BaseException:
                self.shutdown_request(request)
                raise
        else:
            self.shutdown_request(request)

    def _note_get_request_failure(self, exc):
        if exc.errno not in _FD_EXHAUSTION_ERRNOS:
            return
        self.__accept_backoff = min(
            max(self.__accept_backoff * 2, constants.ACCEPT_BACKOFF_INITIAL),
            constants.ACCEPT_BACKOFF_MAX,
        )
        self.__accept_paused_until = monotonic() + self.__accept_backoff
        _log.warning(
            "accept-exhausted",
            "%s: accepting paused for %.3f s: %s",
            type(self).__name__,
            self.__accept_backoff,
            exc,
        )

    def handle_timeout(self):
        """Called if no new request arrives within self.timeout.

        Overridden by ForkingMixIn.
        """

    def verify_request(self, request, client_address):
        """Return True if we should proceed with this request.  May be overridden."""
        return True

    def process_request(self, request, client_address):
        """Call finish_request.  Overridden by ForkingMixIn and ThreadingMixIn."""
        self.finish_request(request, client_address)
        self.shutdown_request(request)

    def server_close(self):
        """Called to clean-up the server.  May be overridden."""

    def finish_request(self, request, client_address):
        """Finish one request by instantiating RequestHandlerClass."""
        self.RequestHandlerClass(request, client_address, self)

    def shutdown_request(self, request):
        """Called to shutdown and close an individual request."""
        self.close_request(request)

    def close_request(self, request):
        """Called to clean up an individual request."""

    def handle_error(self, request, client_address):
        """Handle an error gracefully.  May be overridden.

        The default is to print a traceback and continue.
        """
        print("-" * 40, file=sys.stderr)
        print(
            "Exception occurred during processing of request from",
            client_address,
            file=sys.stderr,
        )
        traceback.print_exc()
        print("-" * 40, file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *args):
        self.server_close()

    def stats(self):
        """fastsock: the counters of this server's compiled receive loops.

        All zero until a ``fastsock.receiver`` handler has served a connection.
        """
        path = self.receive_path
        return ReceiveStats.zero() if path is None else path.stats()

    def connection_address(self, connection_id):
        """fastsock: the client address behind a message's ``source_id``.

        Known while the connection is open and for a while after it closed
        (``constants.RECENT_PEERS`` connections); None otherwise.
        """
        path = self.receive_path
        return None if path is None else path.peer(connection_id)


# The umask is process-wide: binds that change it take turns.
_umask_lock = threading.Lock()


def _bind_unix(sock, path, mode, backlog):
    """Bind a Unix socket, replacing a stale socket file but never a live one or another
    kind of file, and with the file created at ``mode`` from the start.  A stream socket on
    a file path is also listening on return."""
    if not (isinstance(path, str) and path and not path.startswith("\0")):
        with _created_with_mode(mode):
            sock.bind(path)
        return
    # Probe (is a server live there?), unlink (no: the file is stale), bind and listen are
    # four steps that the kernel does not make conditional on one another: two starters
    # interleaving them could both find the same stale file, and the second unlink the
    # first one's new socket, which then served a path no client could reach.  So starters
    # take turns, through a lock held across all four.  Listening is inside: until a stream
    # socket listens, a connection to it is refused as to a stale file, and the next
    # starter would unlink it.  (Binding to a temporary name and renaming it over the path
    # would need the same turns between two renamers, since rename replaces a live file.)
    try:
        lock = _SocketPathLock(path, mode)
    except OSError:
        # Without the lock the file is not replaced; but a live server or another kind of
        # file there is still reported as such, so that in a directory the user cannot
        # write to the start fails as it did before the lock.
        _is_stale_socket_file(path, sock.type)
        raise
    with lock:
        if _is_stale_socket_file(path, sock.type):
            os.unlink(path)
        with _created_with_mode(mode):
            sock.bind(path)
        if sock.type != socket.SOCK_DGRAM:
            sock.listen(backlog)


@contextlib.contextmanager
def _created_with_mode(mode):
    """Files created in the block get exactly ``mode`` from the start (the umask is its
    complement meanwhile); with None, the umask applies as usual."""
    if mode is None:
        yield
        return
    with _umask_lock:
        previous = os.umask(0o777 & ~mode)
        try:
            yield
        finally:
            os.umask(previous)


class _SocketPathLock:
    """An exclusive flock() on a lock file beside a Unix socket path, taken on creation; on
    exit, the file is removed and the lock released.

    Removing the file keeps it from cluttering the directory, but opens a race: a starter
    may open the file just before its holder removes it and lock it just after, while a
    third creates and locks a new one; both would hold "the" lock.  So a starter keeps a
    lock only on the file still at the lock path, and starts over otherwise; and a holder
    removes the file before it unlocks.  A file left behind by a starter killed while
    holding it is harmless: the next starter locks and removes it.  The file is created
    with the socket's mode: whoever may use the socket may take the lock.
    """

    # Unlikely to be any other program's file: whatever is at the lock path is removed.
    SUFFIX = ".fastsock-lock"

    def __init__(self, socket_path, mode):
        self.path = socket_path + self.SUFFIX
        while True:
            try:
                with _created_with_mode(mode):
                    fd = os.open(
                        self.path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666
                    )
            except OSError as exc:
                raise OSError(
                    exc.errno, f"cannot open the lock file {self.path!r}: {exc.strerror}"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                locked = _is_linked_at(fd, self.path)
            except BaseException:
                os.close(fd)
                raise
            if locked:
                self.fd = fd
                return
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        # A lock file that cannot be removed is only left behind: it must not replace the
        # outcome of the start.
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)


def _is_linked_at(fd, path):
    try:
        return os.path.samestat(os.fstat(fd), os.lstat(path))
    except FileNotFoundError:
        return False


def _unlink_own_socket_file(path, bound):
    """Unlink the socket file at ``path`` if it is still ``bound`` (its lstat() taken while
    its server was live), under the lock that starting servers take: once its server has
    closed, the file is stale, and a server started since may have replaced it with its
    own, which must stay."""
    with _SocketPathLock(path, stat.S_IMODE(bound.st_mode)):
        try:
            unchanged = os.path.samestat(os.lstat(path), bound)
        except FileNotFoundError:
            return
        if unchanged:
            os.unlink(path)


def _is_stale_socket_file(path, socket_type):
    """True if ``path`` is a socket file that refuses connections: no server is bound to it.
    Raises for a live server's socket, and for a file that is not a socket."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(status.st_mode):
        raise FileExistsError(
            errno.EEXIST, f"{path!r} exists and is not a socket: refusing to replace it"
        )
    with socket.socket(socket.AF_UNIX, socket_type) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    raise OSError(errno.EADDRINUSE, f"a live server is bound to {path!r}")


# struct sock_filter {u16 code; u8 jt, jf; u32 k}: BPF_RET | BPF_K with k = 0, "keep no byte".
_DROP_EVERY_PACKET = (ctypes.c_ubyte * 8).from_buffer_copy(bytes([6, 0, 0, 0, 0, 0, 0, 0]))
_SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)


class _SocketFilterProgram(ctypes.Structure):
    _fields_ = [("length", ctypes.c_ushort), ("instructions", ctypes.c_void_p)]


def _refuse_new_connections(sock):
    """Make the kernel complete no new connection on a listening socket, leaving those in
    its backlog to accept(): a Unix listener shut for reading refuses connect(); a TCP one
    gets a filter that drops every packet, so no handshake completes and nothing new is
    acknowledged (shutting a TCP listener would reset its backlog, data and all)."""
    if sock.family == getattr(socket, "AF_UNIX", None):
        sock.shutdown(socket.SHUT_RD)
        return
    program = _SocketFilterProgram(1, ctypes.addressof(_DROP_EVERY_PACKET))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, bytes(program))


def _drain(sock):
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


class TCPServer(BaseServer):
    """Base class for the socket-based server classes: a synchronous TCP server.

    fastsock's keyword-only switches, each off by default so that the server behaves as
    the stdlib's: ``address_family`` overrides the class attribute (``socket.AF_INET6``
    for IPv6); ``dual_stack`` (IPv6 only) True also accepts IPv4 clients, False refuses
    them, None keeps the system default; ``backlog`` overrides ``request_queue_size``,
    the listen backlog (5 in the stdlib).
    """

    address_family = socket.AF_INET

    socket_type = socket.SOCK_STREAM

    request_queue_size = 5

    allow_reuse_address = False

    allow_reuse_port = False

    # fastsock, Unix sockets only: permission bits of the socket file, applied with no
    # moment where they are wider; None keeps the stdlib's (0777 less the umask).
    socket_mode = None

    def __init__(
        self,
        server_address,
        RequestHandlerClass,
        bind_and_activate=True,
        *,
        address_family=None,
        dual_stack=None,
        backlog=None,
        socket_mode=None,
    ):
        """Constructor.  May be extended, do not override."""
        BaseServer.__init__(self, server_address, RequestHandlerClass)
        self._apply_socket_options(address_family, dual_stack, backlog, socket_mode)
        self.socket = socket.socket(self.address_family, self.socket_type)
        if bind_and_activate:
            try:
                self.server_bind()
                self.server_activate()
            except BaseException:
                self.server_close()
                raise

    def _apply_socket_options(self, address_family, dual_stack, backlog, socket_mode):
        if address_family is not None:
            self.address_family = address_family
        elif dual_stack is not None:
            self.address_family = socket.AF_INET6
        if dual_stack is not None and self.address_family != socket.AF_INET6:
            raise ValueError("dual_stack applies only to AF_INET6 servers")
        self._dual_stack = dual_stack
        if backlog is not None:
            if self.socket_type != socket.SOCK_STREAM:
                raise ValueError("backlog applies only to stream servers")
            if not isinstance(backlog, int) or backlog < 1:
                raise ValueError(f"backlog must be a positive int, not {backlog!r}")
            self.request_queue_size = backlog
        if socket_mode is not None:
            if self.address_family != getattr(socket, "AF_UNIX", None):
                raise ValueError("socket_mode applies only to Unix socket servers")
            if not isinstance(socket_mode, int) or not 0 <= socket_mode <= 0o777:
                raise ValueError(f"socket_mode must be permission bits, not {socket_mode!r}")
            self.socket_mode = socket_mode

    def server_bind(self):
        """Called by constructor to bind the socket.  May be overridden."""
        if self.allow_reuse_address and hasattr(socket, "SO_REUSEADDR"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.allow_reuse_port and hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if getattr(self, "_dual_stack", None) is not None:
            self.socket.setsockopt(
                socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if self._dual_stack else 1
            )
        if self.address_family == getattr(socket, "AF_UNIX", None):
            _bind_unix(self.socket, self.server_address, self.socket_mode, self.request_queue_size)
        else:
            self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()

    def server_activate(self):
        """Called by constructor to activate the server.  May be overridden."""
        self.socket.listen(self.request_queue_size)

    def server_close(self):
        """Called to clean-up the server.  May be overridden.

        fastsock also stops its compiled receive loops gracefully, so that
        ``block_on_close`` does not wait for peers that never hang up.  A stream server
        with a ``fastsock.receiver`` handler first stops the kernel from completing new
        connections and serves the ones already in its backlog (their data was already
        acknowledged), which stop at once, handing over what they sent.
        """
        path = self.receive_path
        # A second call finds the socket closed and everything already done, as the stdlib's.
        if (
            path is not None
            and self.socket_type == socket.SOCK_STREAM
            and self.socket.fileno() >= 0
        ):
            with contextlib.suppress(OSError):
                _refuse_new_connections(self.socket)
            path.stop()
            # Event engines accept what the backlog holds as they stop.
            if not path.finish():
                self._serve_backlog()
        self.socket.close()
        if path is not None:
            path.stop()

    def _serve_backlog(self):
        with _ServerSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            for _ in range(max(self.request_queue_size, 1)):
                if not selector.select(0):
                    return
                self._handle_request_noblock()

    def fileno(self):
        """Return socket file number.  Interface required by selector."""
        return self.socket.fileno()

    def get_request(self):
        """Get the request and client address from the socket.  May be overridden."""
        return self.socket.accept()

    def shutdown_request(self, request):
        """Called to shutdown and close an individual request."""
        try:
            # socket.close() merely releases the socket; shutdown() sends the FIN now.
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.close_request(request)

    def close_request(self, request):
        """Called to clean up an individual request."""
        request.close()


class UDPServer(TCPServer):
    """UDP server class.

    ``report_truncation`` (fastsock; off by default like the stdlib, which silently
    cuts datagrams longer than ``max_packet_size``): when true, a datagram that did not
    fit is not handed to the handler; it is counted in ``truncated_datagrams``, logged,
    and ``get_request`` raises ``DatagramTruncatedError`` (an ``OSError``), which the
    serving loop treats as "no request".
    """

    allow_reuse_address = False

    allow_reuse_port = False

    socket_type = socket.SOCK_DGRAM

    max_packet_size = 8192

    report_truncation = False

    truncated_datagrams = 0

    def get_request(self):
        if not self.report_truncation:
            data, client_addr = self.socket.recvfrom(self.max_packet_size)
            return (data, self.socket), client_addr
        data, _, flags, client_addr = self.socket.recvmsg(self.max_packet_size)
        if flags & socket.MSG_TRUNC:
            self.truncated_datagrams += 1
            _log.warning(
                "datagram-truncated",
                "%s: dropped a datagram from %r longer than max_packet_size=%d",
                type(self).__name__,
                client_addr,
                self.max_packet_size,
            )
            raise DatagramTruncatedError(
                errno.EMSGSIZE,
                f"datagram from {client_addr!r} is longer than "
                f"max_packet_size={self.max_packet_size}",
            )
        return (data, self.socket), client_addr

    def server_activate(self):
        """Datagram sockets do not listen."""

    def shutdown_request(self, request):
        self.close_request(request)

    def close_request(self, request):
        """The datagram socket is shared by every request: nothing to close."""


if hasattr(os, "fork"):

    class ForkingMixIn:
        """Mix-in class to handle each request in a new process."""

        timeout = 300
        active_children = None
        max_children = 40
        # If true, server_close() waits until all child processes complete.
        block_on_close = True
        # fastsock: request processes that a signal ended (a crash, or kill -9).
        killed_children = 0
        # fastsock: pid -> the ledger of a request process's compiled receive loop.
        _request_ledgers = None

        def collect_children(self, *, blocking=False):
            """Internal routine to wait for children that have exited."""
            if self.active_children is None:
                return

            # waitpid(-1) reaps in one call per defunct child, but may reap children this
            # server did not spawn: used only while over max_children.
            while len(self.active_children) >= self.max_children:
                try:
                    pid, status = os.waitpid(-1, 0)
                    if pid in self.active_children:
                        self._reaped_child(pid, status)
                    self.active_children.discard(pid)
                except ChildProcessError:
                    self.active_children.clear()
                except OSError:
                    break

            flags = 0 if blocking else os.WNOHANG
            for pid in self.active_children.copy():
                try:
                    pid, status = os.waitpid(pid, flags)
                    # pid is 0 for a child still running: discard() ignores it.
                    self.active_children.discard(pid)
                    if pid:
                        self._reaped_child(pid, status)
                except ChildProcessError:
                    self.active_children.discard(pid)
                except OSError:
                    pass

        def _reaped_child(self, pid, status):
            ledger = self._request_ledgers.pop(pid, None) if self._request_ledgers else None
            if ledger is not None:
                # A killed child never closed its connection: its parent counts it closed.
                self.receive_path.settle(ledger)
            if os.WIFSIGNALED(status):
                self._note_killed_child(pid, status)

        def _note_killed_child(self, pid, status):
            self.killed_children += 1
            _log.warning(
                "child-killed",
                "%s: request process %d was killed by signal %d",
                type(self).__name__,
                pid,
                os.WTERMSIG(status),
            )

        def handle_timeout(self):
            """Wait for zombies after self.timeout seconds of inactivity.

            May be extended, do not override.
            """
            self.collect_children()

        def service_actions(self):
            """Collect the zombie child processes regularly in the ForkingMixIn."""
            self.collect_children()

        def process_request(self, request, client_address):
            """Fork a new subprocess to process the request."""
            make_ledger = getattr(self.receive_path, "ledger_for_request", None)
            ledger = make_ledger() if make_ledger is not None else None
            pid = os.fork()
            if pid:
                if self.active_children is None:
                    self.active_children = set()
                self.active_children.add(pid)
                if ledger is not None:
                    if self._request_ledgers is None:
                        self._request_ledgers = {}
                    self._request_ledgers[pid] = ledger
                self.close_request(request)
                return
            # The child must never return into the serving loop, hence os._exit().
            status = 1
            try:
                self.finish_request(request, client_address)
                status = 0
            except Exception:
                self.handle_error(request, client_address)
            finally:
                try:
                    self.shutdown_request(request)
                finally:
                    os._exit(status)

        def server_close(self):
            super().server_close()
            self.collect_children(blocking=self.block_on_close)


class _Threads(list):
    """Joinable list of all non-daemon threads."""

    def append(self, thread):
        self.reap()
        if thread.daemon:
            return
        super().append(thread)

    def pop_all(self):
        self[:], result = [], self[:]
        return result

    def join(self):
        for thread in self.pop_all():
            thread.join()

    def reap(self):
        self[:] = (thread for thread in self if thread.is_alive())


class _NoThreads:
    """Degenerate version of _Threads."""

    def append(self, thread):
        pass

    def join(self):
        pass


class _HandlerPool:
    """At most ``size`` reused handler threads; submit() waits while all are busy.

    Threads start on demand and exit after ``THREAD_POOL_IDLE_TIMEOUT`` idle seconds, so a
    burst does not leave them behind.
    """

    def __init__(self, size, daemon, name):
        self._size = size
        self._daemon = daemon
        self._name = name
        self._slots = threading.Semaphore(size)
        self._jobs = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = set()
        self._idle = 0
        self._queued = 0

    def submit(self, function, args, abandon, make_room=None):
        """Run function(*args) on a pool thread; False if abandon() became true first.

        While every thread is busy, make_room() (if given) is called every wait slice: the
        compiled path evicts a silent connection there, so silent peers cannot starve it.
        """
        while not self._slots.acquire(timeout=constants.RING_WAIT_SLICE):
            if abandon():
                return False
            if make_room is not None:
                make_room()
        with self._lock:
            self._queued += 1
            if self._idle < self._queued and len(self._threads) < self._size:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}-{len(self._threads) + 1}"
                )
                thread.daemon = self._daemon
                self._threads.add(thread)
                thread.start()
        self._jobs.put((function, args))
        return True

    def _work(self):
        while True:
            with self._lock:
                self._idle += 1
            try:
                job = self._jobs.get(timeout=constants.THREAD_POOL_IDLE_TIMEOUT)
            except queue.Empty:
                job = None
            with self._lock:
                self._idle -= 1
                if job is None:
                    if self._queued > self._idle:
                        continue
                    self._threads.discard(threading.current_thread())
                    return
                self._queued -= 1
            function, args = job
            if function is None:
                with self._lock:
                    self._threads.discard(threading.current_thread())
                return
            try:
                function(*args)
            finally:
                self._slots.release()

    def close(self, wait):
        """Let every thread finish its current request and exit; join them if wait."""
        with self._lock:
            threads = list(self._threads)
            self._queued += len(threads)
        for _ in threads:
            self._jobs.put((None, ()))
        if wait:
            for thread in threads:
                thread.join()


class ThreadingMixIn:
    """Mix-in class to handle each request in a new thread.

    ``max_threads`` (fastsock; None by default, the stdlib's one new thread per request):
    an int bounds the server to that many reused handler threads.  When all are busy the
    serving loop waits for one instead of starting another, so a burst of connections or
    datagrams waits in the kernel's queues instead of multiplying threads.  Set it on the
    class or on the instance before serving.
    """

    # Decides how threads will act upon termination of the main process.
    daemon_threads = False
    # If true, server_close() waits until all non-daemonic threads terminate.
    block_on_close = True
    max_threads = None
    # Used by server_close() to wait for all threads completion.
    _threads = _NoThreads()

    def process_request_thread(self, request, client_address):
        """Same as in BaseServer but as a thread; exception handling is done here."""
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def process_request(self, request, client_address):
        """Start a new thread, or wake a pooled one, to process the request."""
        if self.max_threads is not None:
            self._submit_to_pool(request, client_address)
            return
        if self.block_on_close:
            vars(self).setdefault("_threads", _Threads())
        t = threading.Thread(target=self.process_request_thread, args=(request, client_address))
        t.daemon = self.daemon_threads
        self._threads.append(t)
        t.start()

    def _submit_to_pool(self, request, client_address):
        pool = vars(self).get("_handler_pool")
        if pool is None:
            if not isinstance(self.max_threads, int) or self.max_threads < 1:
                raise ValueError(f"max_threads must be a positive int, not {self.max_threads!r}")
            pool = self._handler_pool = _HandlerPool(
                self.max_threads, self.daemon_threads, f"{type(self).__name__}-handler"
            )
        submitted = pool.submit(
            self.process_request_thread,
            (request, client_address),
            self._shutdown_requested,
            None if self.receive_path is None else self.receive_path.make_room,
        )
        if not submitted:
            self.shutdown_request(request)

    def server_close(self):
        super().server_close()
        self._threads.join()
        pool = vars(self).pop("_handler_pool", None)
        if pool is not None:
            pool.close(wait=self.block_on_close)


if hasattr(os, "fork"):

    class ForkingUDPServer(ForkingMixIn, UDPServer):
        pass

    class ForkingTCPServer(ForkingMixIn, TCPServer):
        pass


class ThreadingUDPServer(ThreadingMixIn, UDPServer):
    pass


class ThreadingTCPServer(ThreadingMixIn, TCPServer):
    pass


if hasattr(socket, "AF_UNIX"):

    class UnixStreamServer(TCPServer):
        address_family = socket.AF_UNIX

    class UnixDatagramServer(UDPServer):
        address_family = socket.AF_UNIX

    class ThreadingUnixStreamServer(ThreadingMixIn, UnixStreamServer):
        pass

    class ThreadingUnixDatagramServer(ThreadingMixIn, UnixDatagramServer):
        pass

    if hasattr(os, "fork"):

        class ForkingUnixStreamServer(ForkingMixIn, UnixStreamServer):
            pass

        class ForkingUnixDatagramServer(ForkingMixIn, UnixDatagramServer):
            pass


class BaseRequestHandler:
    """Base class for request handler classes.

    Instantiated for each request: the constructor sets ``request``, ``client_address``
    and ``server``, then calls ``setup()``, ``handle()`` and, even if those raise,
    ``finish()``.
    """

    def __init__(self, request, client_address, server):
        self.request = request
        self.client_address = client_address
        self.server = server
        self.setup()
        try:
            self.handle()
        finally:
            self.finish()

    def setup(self):
        pass

    def handle(self):
        pass

    def finish(self):
        pass


class StreamRequestHandler(BaseRequestHandler):
    """Define self.rfile and self.wfile for stream sockets."""

    # rfile is buffered: unbuffered reads would cost a syscall per byte for readline().
    # wfile is unbuffered so that a reply is on the wire without a flush() before the
    # handler reads again.
    rbufsize = -1
    wbufsize = 0

    # A timeout to apply to the request socket, if not None.
    timeout = None

    # Disable nagle algorithm for this socket, if True.
    # Use only when wbufsize != 0, to avoid small packets.
    disable_nagle_algorithm = False

    def setup(self):
        self.connection = self.request
        if self.timeout is not None:
            self.connection.settimeout(self.timeout)
        if self.disable_nagle_algorithm:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self.rfile = self.connection.makefile("rb", self.rbufsize)
        if self.wbufsize == 0:
            self.wfile = _SocketWriter(self.connection)
        else:
            self.wfile = self.connection.makefile("wb", self.wbufsize)

    def finish(self):
        if not self.wfile.closed:
            try:
                self.wfile.flush()
            except OSError:
                # A last error such as ECONNABORTED must not hide the handler's result.
                pass
        self.wfile.close()
        self.rfile.close()


class _SocketWriter(BufferedIOBase):
    """Writable BufferedIOBase over a socket that holds no buffer: no flush() needed."""

    def __init__(self, sock):
        self._sock = sock

    def writable(self):
        return True

    def write(self, b):
        self._sock.sendall(b)
        with memoryview(b) as view:
            return view.nbytes

    def fileno(self):
        return self._sock.fileno()


class DatagramRequestHandler(BaseRequestHandler):
    """Define self.rfile and self.wfile for datagram sockets."""

    def setup(self):
        self.packet, self.socket = self.request
        self.rfile = BytesIO(self.packet)
        self.wfile = BytesIO()

    def finish(self):
        self.socket.sendto(self.wfile.getvalue(), self.client_address)


# The public classes stand in for the stdlib's, as CPython's own accelerator modules
# report the public module they replace: introspection sees the module users import.
for _name in __all__:
    globals()[_name].__module__ = "socketserver"
del _name
