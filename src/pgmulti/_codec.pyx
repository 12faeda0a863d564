# cython: language_level=3
"""Framing codec: the hot path between one socket and its peer.

A Relay owns the read buffer of one connection (uvloop BufferedProtocol: get_buffer /
buffer_updated), finds PostgreSQL message boundaries in it, forwards runs of pass-through
messages to the linked peer with one write, reads ReadyForQuery inline, and hands only the
messages the proxy must act on to Python. It never imports asyncio and never raises through a
uvloop callback: failures are reported to Python as error codes. Clients are accepted by the
codec into transports of its own (Acceptor, SocketTransport), read and written without uvloop;
a busy connection uvloop made (a server) is read and written by the codec itself (DirectIO),
without uvloop's per-read callbacks; a busy TLS connection too, with the TLS object uvloop
made (records are decrypted straight into the relay's buffer and encrypted from it).
"""

cimport cython
from cpython.bytearray cimport (PyByteArray_AS_STRING, PyByteArray_FromStringAndSize,
                                PyByteArray_Resize)
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.long cimport PyLong_CheckExact
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from cpython.buffer cimport (PyBUF_READ, PyBUF_SIMPLE, PyBUF_WRITABLE, PyBUF_WRITE,
                             PyBuffer_Release, PyObject_GetBuffer)
from libc.stdint cimport uint32_t
from libc.string cimport memcmp, memcpy, memmove, memset
from libc.errno cimport EAGAIN, ECONNABORTED, EINTR, errno
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec
from posix.resource cimport RLIMIT_NOFILE, getrlimit, rlimit
from posix.unistd cimport close, dup

cdef extern from *:
    """
    #ifndef PGMULTI_DEBUG
    #define PGMULTI_DEBUG 0
    #endif
    """
    int PGMULTI_DEBUG

cdef extern from *:
    """
    /* list.pop(i) that keeps the list's array: a pool's idle list swings between empty
       and a few servers every transaction, and list.pop would free or shrink the array
       that the next append allocates again. The caller checks 0 <= i < len. */
    static PyObject* pgmulti_list_take(PyObject* list, Py_ssize_t i) {
        Py_ssize_t size = PyList_GET_SIZE(list);
        PyObject** items = ((PyListObject*)list)->ob_item;
        PyObject* item = items[i];  /* the list's reference passes to the caller */
        memmove(items + i, items + i + 1, (size_t)(size - i - 1) * sizeof(PyObject*));
        Py_SET_SIZE(list, size - 1);
        return item;
    }
    """
    object _list_take "pgmulti_list_take" (list items, Py_ssize_t index)

cdef extern from "Python.h":
    PyObject* PyMemoryView_GET_BASE(object view)  # the object it views: a borrowed reference

cdef extern from *:
    """
    #include <sys/socket.h>
    #include <sys/syscall.h>
    #include <unistd.h>
    /* recv() and send() as plain system calls. glibc's wrappers are thread cancellation
       points: in a process with threads (libuv's pool) each call switches asynchronous
       cancellation on and off around the system call, two atomic updates per call, four
       calls per transaction. Nothing here uses pthread cancellation. */
    static inline ssize_t pgmulti_recv(int fd, void* buf, size_t n, int flags) {
        return syscall(SYS_recvfrom, fd, buf, n, flags, NULL, NULL);
    }
    static inline ssize_t pgmulti_send(int fd, const void* buf, size_t n, int flags) {
        return syscall(SYS_sendto, fd, buf, n, flags, NULL, 0);
    }
    """
    ssize_t recv "pgmulti_recv" (int fd, void* buf, size_t n, int flags) nogil
    ssize_t send "pgmulti_send" (int fd, const void* buf, size_t n, int flags) nogil
    int MSG_NOSIGNAL

cdef extern from "<sys/epoll.h>" nogil:
    union epoll_data_t "epoll_data":
        void* ptr
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)
    int EPOLL_CLOEXEC, EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD
    uint32_t EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        unsigned short sa_family
    int accept4(int fd, sockaddr* addr, socklen_t* addrlen, int flags)
    int SOCK_NONBLOCK, SOCK_CLOEXEC, AF_INET, AF_INET6

cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        pass
    struct in6_addr:
        pass
    struct sockaddr_in:
        unsigned short sin_family
        unsigned short sin_port
        in_addr sin_addr
    struct sockaddr_in6:
        unsigned short sin6_family
        unsigned short sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id
    unsigned short ntohs(unsigned short)
    uint32_t ntohl(uint32_t)

cdef extern from "<arpa/inet.h>" nogil:
    const char* inet_ntop(int af, const void* src, char* dst, socklen_t size)

# What the relay does with a message, chosen per message type.
cdef enum:
    ACT_PASS = 0      # forward to the peer unchanged (streamed if large)
    ACT_INSPECT = 1   # deliver whole to Python: on_message(type, view)
    ACT_REJECT = 2    # not allowed in this state: on_protocol_error(ERR_TYPE, type)
    # Prepared-statement mapping (pgmulti.prepared): forwarded here when it names no
    # statement, so needs no rewriting (only the bookkeeping below); otherwise INSPECT.
    ACT_STATEMENT_REQUEST = 3   # client side: Parse, Bind, Describe, Close, Sync
    ACT_STATEMENT_REPLY = 4     # server side: ParseComplete, CloseComplete
    ACT_DISCONNECT = 5  # client side, Terminate: the connection closes (close_connection)

PASS = ACT_PASS
INSPECT = ACT_INSPECT
REJECT = ACT_REJECT
STATEMENT_REQUEST = ACT_STATEMENT_REQUEST
STATEMENT_REPLY = ACT_STATEMENT_REPLY
DISCONNECT = ACT_DISCONNECT

# Entries of a server's expected-replies queue (prepared.ServerStatements.expected) that the
# codec adds and removes itself, compared by identity: see set_statement_entries(). A Sync's
# entry is an int (the number of the ReadyForQuery that answers it): no tuple per Sync.
cdef object _FORWARD_PARSE = None
cdef object _FORWARD_CLOSE = None


def set_statement_entries(forward_parse not None, forward_close not None):
    """The queue entries for "forward the reply to an unnamed Parse / a Close", as
    pgmulti.prepared makes them."""
    global _FORWARD_PARSE, _FORWARD_CLOSE
    _FORWARD_PARSE, _FORWARD_CLOSE = forward_parse, forward_close

# Codes given to on_protocol_error(code, msg_type).
ERR_LENGTH = 1      # length field smaller than the header or negative
ERR_TOO_LONG = 2    # longer than max_packet, or than max_inspect for a message Python must see
ERR_TYPE = 3        # message type rejected by the action table

# PostgreSQL's own limit for untyped startup packets (MAX_STARTUP_PACKET_LENGTH).
cdef enum:
    _STARTUP_MAX = 10000
STARTUP_MAX = _STARTUP_MAX
# First byte of a TLS handshake record: a ClientHello sent without SSLRequest (direct TLS,
# PostgreSQL 17+). No startup packet starts with it: its length would exceed STARTUP_MAX.
DEF TLS_HANDSHAKE_RECORD = 0x16
# SSLRequest and GSSENCRequest: 8-byte packets asking for an encrypted connection.
DEF SSL_REQUEST_CODE = 80877103
DEF GSSENC_REQUEST_CODE = 80877104
cdef Py_ssize_t DEFAULT_BUFFER = 16384   # a relay's read buffer (buffer_size)
# Empty read buffers of the default size that connections gave back (idle after login, or
# closed), kept for the next reads: a pgbench -C connection would otherwise allocate two.
DEF SPARE_BUFFERS_MAX = 32
cdef list _spare_buffers = []   # memoryviews of the bytearrays
# Reads smaller than this would waste a syscall; reclaim buffer space below it.
cdef Py_ssize_t MIN_READ = 2048
# Runs up to this size are written as a bytes copy: one small allocation is cheaper than a
# memoryview slice (which uvloop casts again) and the buffer is not lent. Larger runs are
# written as views into the buffer, without copying.
cdef Py_ssize_t COPY_WRITE_MAX = 2048

# Upper bounds (microseconds, inclusive) of the transaction and query time histograms; one
# more bucket after the last counts everything slower (+Inf).
TIMING_BUCKETS_US = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000,
                     500000, 1000000, 2500000, 5000000, 10000000)
DEF N_BUCKETS = 17
cdef long long _bucket_bounds[N_BUCKETS]
for _i, _bound in enumerate(TIMING_BUCKETS_US):
    _bucket_bounds[_i] = _bound
assert len(TIMING_BUCKETS_US) == N_BUCKETS

# ReadyForQuery status 'I'; a C constant, so comparing with it makes no int object.
cdef enum:
    _READY_IDLE = 73
READY_IDLE = _READY_IDLE

# CommandComplete tags after which a server has no prepared statements left.
cdef bytes _DEALLOCATE_ALL_TAG = b"DEALLOCATE ALL\0"
cdef bytes _DISCARD_ALL_TAG = b"DISCARD ALL\0"


# One clock reading serves a whole batch of direct reads (DirectIO._poll), as PgBouncer
# reads its clock once per loop iteration: the hand-offs and request timings of a batch
# share it, instead of reading the clock several times per transaction.
cdef long long _batch_us = 0        # CLOCK_MONOTONIC microseconds of this batch; 0: none
cdef double _batch_wall = 0         # CLOCK_REALTIME of this batch, read when first needed


cdef inline double _read_clock(int clock) noexcept nogil:
    """Seconds as a float: CLOCK_MONOTONIC is time.monotonic(), CLOCK_REALTIME time.time()."""
    cdef timespec ts
    clock_gettime(clock, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef inline long long _read_us() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000000 + ts.tv_nsec // 1000


cdef inline long long _now_us() noexcept nogil:
    """Monotonic microseconds: the batch's, or the clock's outside a batch."""
    return _batch_us if _batch_us else _read_us()


cdef inline double _monotonic() noexcept nogil:
    """time.monotonic(), or the batch's."""
    return _batch_us * 1e-6 if _batch_us else _read_clock(CLOCK_MONOTONIC)


cdef inline double _wall() noexcept nogil:
    """time.time(), or the batch's."""
    global _batch_wall
    if not _batch_us:
        return _read_clock(CLOCK_REALTIME)
    if _batch_wall == 0:
        _batch_wall = _read_clock(CLOCK_REALTIME)
    return _batch_wall


cdef inline int _bucket(long long elapsed_us) noexcept nogil:
    """Index of the first bucket whose upper bound is >= elapsed_us (N_BUCKETS: +Inf)."""
    cdef int i = 0
    while i < N_BUCKETS and elapsed_us > _bucket_bounds[i]:
        i += 1
    return i


cdef inline bint _has_tag(const unsigned char* p, Py_ssize_t n, bytes tag) noexcept:
    return n == len(tag) and memcmp(p, <const char*>tag, n) == 0


cdef inline uint32_t _be32(const unsigned char* p) noexcept nogil:
    return ((<uint32_t>p[0]) << 24) | ((<uint32_t>p[1]) << 16) | ((<uint32_t>p[2]) << 8) | p[3]


cdef inline void _put32(unsigned char* p, uint32_t value) noexcept nogil:
    p[0] = value >> 24
    p[1] = (value >> 16) & 0xFF
    p[2] = (value >> 8) & 0xFF
    p[3] = value & 0xFF


cdef class PoolCore
cdef class DirectIO
cdef class DirectTls
cdef class Relay
cdef class SocketTransport
cdef class Acceptor
cdef class ClientRelay
cdef class KnownLogins

# Action tables are shared, not copied: a relay points at the bytes of its current one.
cdef bytes _ALL_PASS = bytes(256)  # ACT_PASS is 0


cdef inline int _check_actions(bytes table) except -1:
    if len(table) != 256:
        raise ValueError("action table must have 256 entries")
    return 0


cdef inline void _use_actions(Relay relay, bytes table) noexcept:
    """Point relay at a table _check_actions() has accepted."""
    relay._actions_table = table
    relay._actions = <const unsigned char*>table

# Ready sockets DirectIO takes from the kernel per call (more wait for the next call).
cdef enum:
    DIRECT_EVENTS = 64
    # Encrypted bytes read per direct TLS read: four full TLS records.
    TLS_READ_MAX = 65536

from ssl import SSLError, SSLWantReadError


@cython.final
cdef class DirectTls:
    """The parts of a TLS connection the codec runs while it is direct: uvloop's TLS object
    and its memory BIOs (shared with uvloop's SSLProtocol, which runs them whenever the codec
    does not) and the TCP transport under TLS. Methods are bound once: each is called once
    or twice per transaction."""

    cdef object read            # the SSL object's read(n, buffer): decrypt into buffer
    cdef object write           # its write(buffer): encrypt into outgoing
    cdef object pending         # its pending(): decrypted bytes not yet read
    cdef object incoming        # MemoryBIO: encrypted bytes read, not yet decrypted
    cdef object incoming_write
    cdef object outgoing        # MemoryBIO: encrypted bytes to send
    cdef object outgoing_read
    cdef object raw             # the TCP transport under the TLS transport
    cdef object raw_buffered    # its get_write_buffer_size
    cdef object tls_buffered    # the TLS transport's get_write_buffer_size

    cdef bint writable(self) except -1:
        """No bytes wait in uvloop's TLS transport or under it: records sent now come next."""
        return self.tls_buffered() == 0 and self.raw_buffered() == 0

    cdef bint at_rest(self) except -1:
        """Nothing waits in uvloop's TLS layer: no bytes to decrypt or send, none queued."""
        return self.incoming.pending == 0 and self.pending() == 0 and self.writable()


def action_table(default=ACT_PASS, **by_type):
    """Build a 256-byte action table: `action_table(REJECT, Q=PASS, X=INSPECT)`."""
    table = bytearray([default]) * 256
    for name, action in by_type.items():
        table[ord(name)] = action
    return bytes(table)


cdef class Relay:
    """Frames the bytes of one connection and relays them to a linked peer.

    Python subclasses (together with asyncio.BufferedProtocol) implement:
      on_message(msg_type, view)   an INSPECT message, whole; view valid during the call only
      on_unlinked(msg_type)        a PASS message arrived while no writer is linked: link,
                                   hold(), or return to drop the message
      on_ready(status)             after a read that contained ReadyForQuery
      on_protocol_error(code, msg_type)
      on_backlog()                 held with more than buffer_size bytes waiting: stop reading
      on_statements_discarded()    watch_discard set: a passed CommandComplete says
                                   DEALLOCATE ALL or DISCARD ALL (after the read's messages
                                   are forwarded, before on_ready)
      on_direct_tls()              startup phase, a TLS handshake record instead of a packet:
                                   called held, the record still buffered (take_buffered)
      on_tls_error(exc)            direct TLS: a record could not be decrypted or encrypted (the
                                   codec has given the socket back; the connection must close)

    The relay implements asyncio's flow control itself (pause_writing/resume_writing: the
    peer filling a full transport is not read until it drains) and, once enabled, reads and
    writes its socket directly (DirectIO); subclasses call stop_direct_io() before closing
    and resume_paused_peer() when the connection is lost.
    """

    cdef bytearray _buf
    cdef object _view
    cdef unsigned char* _data
    cdef Py_ssize_t _cap
    cdef Py_ssize_t _start          # first unread byte
    cdef Py_ssize_t _end            # end of bytes read
    cdef Py_ssize_t _need           # size a whole message needs to fit (INSPECT, startup)
    cdef Py_ssize_t _remain         # body bytes of a streamed message still to come
    cdef bint _skipping             # the streamed message is dropped, not forwarded
    cdef bint _processing
    cdef bint _release_after        # release_buffer() was called while processing
    cdef const unsigned char* _actions  # what to do per message type: _actions_table's bytes
    cdef bytes _actions_table           # 256 entries (action_table()), kept alive here
    cdef object _out                # peer transport the writer belongs to
    cdef object _lent_to            # transport that may still hold views of _buf
    cdef bint _lent_to_several      # views went to more than one transport: never reuse

    cdef public object transport    # this connection's own transport
    cdef object _own_write          # transport.write, bound once
    cdef public object writer       # peer transport.write, or None when unlinked
    cdef public bint startup_phase  # expect untyped startup packets (no type byte)
    # Client side, no TLS to offer: answer SSLRequest/GSSENCRequest 'N' here, without Python.
    cdef public bint refuse_encryption
    cdef readonly bint held
    cdef public Py_ssize_t buffer_size
    cdef public Py_ssize_t max_inspect
    cdef public long long max_packet
    cdef int _pending               # requests sent to this server not yet answered by 'Z'
    cdef public int ready_status    # last ReadyForQuery status byte
    cdef public Relay request_sink  # client side: the linked server's relay (counts requests)
    cdef object _expected           # server side: prepared.ServerStatements.expected, or None
    cdef object _expect             # its append, bound once
    cdef object _expected_done      # its popleft, bound once
    cdef public unsigned long long rx_bytes
    cdef public unsigned long long tx_bytes
    cdef public unsigned long long ready_count
    cdef public unsigned long long idle_ready_count
    cdef public bint notify_ready   # call on_ready() after reads with ReadyForQuery
    cdef public bint watch_discard  # server side: report DEALLOCATE ALL / DISCARD ALL
    # Client side: what one read forwards (pass runs and what Python rewrote, in order) goes
    # out as one writelines() at the end of processing instead of one write per piece.
    cdef public bint batch_output
    cdef bint _batching             # a read is being processed with batch_output
    cdef object _batch_first        # its first piece of output (most reads have one)
    cdef list _batch                # all its pieces, once there is a second
    # Server side: timing of transactions and queries (0 start = none running).
    cdef long long _xact_start_us
    cdef long long _query_start_us
    cdef readonly long long xact_time_us    # running totals of finished ones
    cdef readonly long long query_time_us
    cdef readonly unsigned long long xact_count
    cdef readonly unsigned long long query_count
    cdef unsigned long long _xact_buckets[N_BUCKETS + 1]
    cdef unsigned long long _query_buckets[N_BUCKETS + 1]
    # Connection state the pool hand-off reads and writes (see PoolCore); kept here so the
    # per-transaction path touches C fields, not instance dictionaries.
    cdef public object state        # pool state of a server / session state of a client
    cdef public object client       # server side: the linked client
    cdef public object server       # client side: the linked server
    cdef public bint closed
    cdef public double created      # time.monotonic() at creation
    cdef public double last_used    # server: last released (monotonic)
    cdef public double last_active  # client: last released or seen active (monotonic)
    cdef public double link_time    # client: last linked (monotonic)
    cdef public double request_time # client: last asked for a server (time.time())
    cdef public double wait_start   # client: started queueing for a server (monotonic)
    cdef public bint _reading_paused  # client: reading stopped while queued (backlog)
    cdef public long generation     # server: pool's reconnect generation at login
    cdef public object param_sig    # interned tracked-parameter values; None = unknown
    cdef public PoolCore pool_core  # the pool whose fast hand-off applies to this connection

    # Direct I/O (see DirectIO): the codec reads and writes the socket itself.
    cdef DirectIO direct_io         # set while allowed (plain TCP/Unix, logged in)
    cdef int _direct_after          # reads through the transport left before switching
    cdef int _fd                    # our dup of the socket while direct, else -1
    cdef bint _direct_paused        # direct, but reading stopped (flow control, backlog)
    cdef bint _send_blocked         # the transport holds unsent bytes: write through it
    cdef Relay _peer                # the linked peer's relay (link_pair), or None
    cdef Relay _paused_peer         # the peer whose reading our full transport stopped
    cdef Py_ssize_t _run_a          # a batch's first piece while it is still only
    cdef Py_ssize_t _run_b          #   bytes [_run_a, _run_b) of the buffer (0, 0: none)
    cdef DirectTls _tls             # TLS the codec may run while direct (use_direct_tls)
    cdef SocketTransport _socket    # our transport when it is the codec's own (a client's)
    # Client side: logins of startup packets seen before, run by the codec (KnownLogins).
    cdef public KnownLogins known_logins

    def __cinit__(self, *args, **kwargs):
        self.buffer_size = DEFAULT_BUFFER
        self.max_inspect = 1024 * 1024
        self.max_packet = 0x7FFFFFFF
        self.ready_status = ord("I")
        self.notify_ready = True
        self._fd = -1
        _use_actions(self, _ALL_PASS)

    # -- requests, answers and their timing ------------------------------------------------

    @property
    def pending(self):
        """Requests (Query, Sync, FunctionCall) sent to this server not yet answered."""
        return self._pending

    @pending.setter
    def pending(self, int value):
        # Python counts the requests it forwards itself (prepared-statement Sync) this way.
        while self._pending < value:
            self._request_sent()
        self._pending = value

    def expect_replies_in(self, expected):
        """Server side: the deque of replies expected to Parse/Close/Sync (prepared
        statements), which the codec keeps for messages it forwards itself."""
        self._expected = expected
        self._expect = expected.append
        self._expected_done = expected.popleft

    cdef bint _request_passes(self, unsigned char t, const unsigned char* body,
                              Py_ssize_t size) except -1:
        """Client side, prepared-statement mapping: does this Parse/Bind/Describe/Close/Sync
        name no statement, so it goes to the server as it is? Then note what its reply will
        be, as pgmulti.prepared.ClientStatements would. False: Python rewrites it."""
        cdef Relay server = self.request_sink
        cdef Py_ssize_t i = 0
        if server is None or server._expect is None or self.pool_core is None:
            return False
        if t == 80:  # 'P' Parse of the unnamed statement: the client wants its ParseComplete
            if size < 1 or body[0] != 0:
                return False
            server._expect(_FORWARD_PARSE)
            return True
        if t == 66:  # 'B' Bind: a portal name, then the statement's, which must be empty
            while i < size and body[i] != 0:
                i += 1
            if i + 1 >= size or body[i + 1] != 0:
                return False
            self.pool_core.bind_count += 1
            return True
        if t == 68 or t == 67:  # 'D' Describe, 'C' Close: of a portal or the unnamed statement
            if size < 2 or not (body[0] == 80 or (body[0] == 83 and body[1] == 0)):
                return False
            if t == 67:
                server._expect(_FORWARD_CLOSE)
            return True
        if t == 83:  # 'S' Sync: answered by the next ReadyForQuery, which ends the cycle
            server._request_sent()
            server._expect(server.ready_count + server._pending)
            return True
        return False

    cdef bint _reply_passes(self) except -1:
        """Server side: is this ParseComplete/CloseComplete one the client wants (as
        prepared.ServerStatements.next_action decides)? False: Python decides."""
        expected = self._expected
        if expected is None or self.client is None:
            return False
        while expected and PyLong_CheckExact(expected[0]):
            self._expected_done()  # Syncs of cycles this reply comes after
        if not expected:
            return True
        head = expected[0]
        if head is _FORWARD_PARSE or head is _FORWARD_CLOSE:
            self._expected_done()
            return True
        return False

    cdef inline void _request_sent(self) noexcept:
        """A request goes to this server: the clocks start if it was at rest."""
        cdef long long now
        if self._pending == 0:
            now = _now_us()
            self._query_start_us = now
            if self.ready_status == _READY_IDLE and self._xact_start_us == 0:
                self._xact_start_us = now
        self._pending += 1

    cdef inline void _ready_seen(self, unsigned char status) noexcept:
        """ReadyForQuery from this server: answer counted, clocks stopped where due."""
        cdef long long now = 0
        cdef long long elapsed
        self.ready_status = status
        self.ready_count += 1
        if self._pending > 0:
            self._pending -= 1
            if self._pending == 0 and self._query_start_us:
                now = _now_us()
                elapsed = now - self._query_start_us
                self._query_start_us = 0
                self.query_time_us += elapsed
                self.query_count += 1
                self._query_buckets[_bucket(elapsed)] += 1
        if status == _READY_IDLE:
            self.idle_ready_count += 1
            if self._xact_start_us:
                if now == 0:
                    now = _now_us()
                elapsed = now - self._xact_start_us
                self._xact_start_us = 0
                self.xact_time_us += elapsed
                self.xact_count += 1
                self._xact_buckets[_bucket(elapsed)] += 1

    def ready_seen(self, int status):
        """Account a ReadyForQuery that Python read itself (statement pooling inspects 'Z')."""
        self._ready_seen(<unsigned char>status)

    def stop_timing(self):
        """Forget running clocks (the client left): an unfinished transaction is not counted."""
        self._xact_start_us = 0
        self._query_start_us = 0

    def timing_histograms(self):
        """(transaction, query) counts per bucket of TIMING_BUCKETS_US, +Inf last; not cumulative."""
        return (tuple([self._xact_buckets[i] for i in range(N_BUCKETS + 1)]),
                tuple([self._query_buckets[i] for i in range(N_BUCKETS + 1)]))

    # -- configuration -------------------------------------------------------------------

    def set_actions(self, bytes table not None):
        """Install a 256-entry action table (see action_table())."""
        _check_actions(table)
        _use_actions(self, table)

    def attach_transport(self, transport):
        """Called from connection_made: remember our transport and its bound write."""
        self._attach(transport)

    cdef int _attach(self, transport) except -1:
        self.transport = transport
        self._own_write = transport.write
        self._socket = transport if type(transport) is SocketTransport else None
        return 0

    def link_output(self, transport):
        """Forward pass-through messages to `transport` from now on."""
        self._out = transport
        self.writer = transport.write
        self._peer = None

    def unlink_output(self):
        self._out = None
        self.writer = None
        self._peer = None
        self.request_sink = None

    def hold(self):
        """Stop processing after the current message; the rest stays buffered."""
        self.held = True

    def close_connection(self):
        """Close from our side: stop processing, give the socket back to the transport and
        close it once what it holds is sent (connection_lost follows)."""
        self._close_connection()

    cdef int _close_connection(self) except -1:
        self.closed = True
        self.held = True
        self._stop_direct_io()
        if self._socket is not None:
            self._socket._close()
        elif self.transport is not None:
            self.transport.close()
        return 0

    def resume(self):
        """Continue processing buffered bytes (after hold())."""
        self.held = False
        if not self._processing:
            self._process()

    @property
    def buffered(self):
        """Bytes read but not yet processed."""
        return self._end - self._start

    def peek_buffered(self):
        """A copy of the unprocessed bytes, left in place."""
        return bytes(self._view[self._start:self._end]) if self._buf is not None else b""

    def take_buffered(self):
        """Remove and return the unprocessed bytes (used when a connection changes hands)."""
        data = self.peek_buffered()
        self._start = self._end
        return data

    def release_buffer(self):
        """Drop an empty buffer so an idle connection holds no read memory (when the read
        being processed is done, if called from one of its callbacks)."""
        self._release_buffer()

    cdef int _release_buffer(self) except -1:
        if self._processing:
            self._release_after = True
        elif self._buf is not None and self._start == self._end:
            if (self._cap == DEFAULT_BUFFER and self._lent_to is None
                    and len(_spare_buffers) < SPARE_BUFFERS_MAX):
                _spare_buffers.append(self._view)  # no transport holds a view of it
            self._buf = None
            self._view = None
            self._data = NULL
            self._cap = self._start = self._end = 0
            self._lent_to = None
            self._lent_to_several = False
        return 0

    # -- direct I/O ----------------------------------------------------------------------

    def __dealloc__(self):
        if self._fd >= 0:
            close(self._fd)  # never reached after connection_lost; a leak guard only

    def use_direct_tls(self, raw_transport not None, ssl_object not None):
        """This connection's transport is uvloop's TLS transport on raw_transport, and
        ssl_object (tls.DirectSSLObject) knows its BIOs: direct I/O may run the TLS itself."""
        cdef DirectTls tls = DirectTls.__new__(DirectTls)
        c_object = ssl_object._sslobj
        tls.read = c_object.read
        tls.write = c_object.write
        tls.pending = c_object.pending
        tls.incoming = ssl_object.incoming
        tls.incoming_write = tls.incoming.write
        tls.outgoing = ssl_object.outgoing
        tls.outgoing_read = tls.outgoing.read
        tls.raw = raw_transport
        tls.raw_buffered = raw_transport.get_write_buffer_size
        tls.tls_buffered = self.transport.get_write_buffer_size
        self._tls = tls

    def enable_direct_io(self, DirectIO io not None, int after_reads):
        """Let the codec read and write this connection's socket itself once `after_reads`
        more reads have come through the transport (plain TCP or Unix sockets, or TLS after
        use_direct_tls). A SocketTransport is the codec's already: nothing to switch."""
        if self._fd < 0 and self._socket is None:
            self.direct_io = io
            self._direct_after = after_reads

    def rest_direct_io(self, int after_reads):
        """An idle connection gives its socket back to the transport, so idle clients hold
        no second descriptor; it goes direct again after `after_reads` reads."""
        cdef DirectIO io = self.direct_io
        if self._fd < 0 or io is None:
            return
        self._leave_direct(True)
        self.direct_io = io
        self._direct_after = after_reads

    def stop_direct_io(self):
        """Hand the socket back to the transport for good, reading as before (closing: before
        it closes, so it keeps reading until then as it always did: a socket closed with
        unread bytes sends RST, and the client could lose the error it was just sent)."""
        self._stop_direct_io()

    cdef int _stop_direct_io(self) except -1:
        self._leave_direct(True)
        self.direct_io = None
        return 0

    cdef int _go_direct(self) except -1:
        cdef DirectIO io = self.direct_io
        cdef int fd
        transport = self.transport
        self.direct_io = None  # one attempt
        if self.closed or transport is None or transport.is_closing():
            return 0
        if self._tls is not None:
            if not transport.is_reading() or not self._tls.at_rest():
                self.direct_io = io  # try again after the next read
                self._direct_after = 1
                return 0
            sock = self._tls.raw.get_extra_info("socket")
        elif transport.get_extra_info("sslcontext") is not None:
            return 0  # TLS whose parts the codec was not given (use_direct_tls)
        else:
            sock = transport.get_extra_info("socket")
        if sock is None:
            return 0
        # A dup of our own: the transport may close its descriptor before connection_lost,
        # and this number must not be reused for another connection while we still use it.
        fd = dup(sock.fileno())
        if fd < 0:
            return 0
        if fd >= io._fd_budget:
            close(fd)  # past half the descriptor limit: keep the rest for accepting clients
            return 0
        self._fd = fd
        self._direct_paused = not transport.is_reading()
        if not self._direct_paused:
            try:
                io._watch(self)
            except OSError:
                self._fd = -1
                close(fd)
                return 0
            (self._tls.raw if self._tls is not None else transport).pause_reading()
        self.direct_io = io
        if self._tls is not None:
            return 0  # TLS: each send asks whether uvloop holds bytes (DirectTls.writable)
        # Direct writes must never overtake bytes the transport holds: have it call
        # pause_writing (_send_blocked) as soon as it holds any.
        if transport.get_write_buffer_size():
            self._send_blocked = True
        transport.set_write_buffer_limits(0)
        return 0

    cdef int _leave_direct(self, bint resume_transport) except -1:
        """Back to the transport: on EOF or a read error (it reads again and reports them
        itself), when closing, when idle; resume_transport is False only for an abort."""
        cdef int fd = self._fd
        if fd < 0:
            return 0
        if not self._direct_paused:
            self.direct_io._unwatch(fd)
        self._fd = -1
        close(fd)
        self.direct_io = None
        if not resume_transport or self.transport.is_closing():
            return 0
        if self._tls is not None:
            # uvloop reads the socket again; reading paused here becomes its TLS transport's
            # pause (its own resume_reading never restarts the socket we stopped).
            if self._direct_paused:
                self.transport.pause_reading()
            self._tls.raw.resume_reading()
        elif not self._direct_paused:
            self.transport.resume_reading()
        return 0

    cdef int _read_direct(self) except -1:
        cdef ssize_t n
        if self._fd < 0 or self._direct_paused:
            return 0
        if self._tls is not None:
            return self._read_direct_tls()
        self._prepare_read()
        n = recv(self._fd, self._data + self._end, self._cap - self._end, 0)
        self.direct_io.reads += 1
        if n > 0:
            self._received(n)
        elif n == 0 or (errno != EAGAIN and errno != EINTR):  # EWOULDBLOCK is EAGAIN on Linux
            self._leave_direct(True)
        return 0

    # -- direct TLS: uvloop's TLS object, run by the codec ---------------------------------

    cdef int _read_direct_tls(self) except -1:
        cdef DirectIO io = self.direct_io
        cdef ssize_t n = recv(self._fd, io._tls_scratch, TLS_READ_MAX, 0)
        io.reads += 1
        if n > 0:
            self._tls.incoming_write(PyMemoryView_FromMemory(io._tls_scratch, n, PyBUF_READ))
            self._decrypt()
            if self._tls.outgoing.pending:  # the TLS layer answers something (a key update)
                self._send_records(False)
        elif n == 0 or (errno != EAGAIN and errno != EINTR):
            self._leave_direct(True)
        return 0

    cdef int _decrypt(self) except -1:
        """Decrypt every whole record read into this relay's buffer and process it. All of it,
        also while held or paused: what is left in the BIO would wait for the next read
        (bounded: one read's worth on top of what held relays buffer anyway). Reading on after
        a pause relies on the buffer never reusing bytes lent to a transport (_rewind_if_empty,
        _reclaim)."""
        cdef DirectTls tls = self._tls
        cdef Py_ssize_t room, got
        while self._fd >= 0 and (tls.incoming.pending or tls.pending()):
            self._prepare_read()
            room = self._cap - self._end
            try:
                got = tls.read(room, PyMemoryView_FromMemory(<char*>self._data + self._end,
                                                             room, PyBUF_WRITE))
            except SSLWantReadError:
                break  # the rest of a record is still to come
            except SSLError as exc:
                self._leave_direct(False)
                self.on_tls_error(exc)
                break
            if got == 0:
                # close_notify: the transport reads again and meets the end itself.
                self._leave_direct(True)
                break
            self._received(got)
        return 0

    cdef int _send_encrypted(self, data) except -1:
        """A direct TLS relay's peer forwards data (any buffer) to it: encrypt, send the
        records. A failure is this session's (the sending relay goes on)."""
        try:
            self._tls.write(data)  # a memory BIO takes it all
        except SSLError as exc:
            self._leave_direct(False)
            self.on_tls_error(exc)
            return 0
        self._send_records(True)
        return 0

    cdef int _send_records(self, bint writable) except -1:
        """Send what the TLS layer has encrypted; behind uvloop's bytes if it holds any, and
        what the socket does not take goes to the transport under TLS, in order."""
        cdef DirectTls tls = self._tls
        cdef bytes records = tls.outgoing_read()
        cdef Py_ssize_t n = len(records)
        cdef ssize_t sent
        if n == 0:
            return 0
        if self._fd < 0 or (not writable and tls.raw_buffered()):
            if not tls.raw.is_closing():
                tls.raw.write(records)
            return 0
        sent = send(self._fd, <const char*>records, n, MSG_NOSIGNAL)
        self.direct_io.sends += 1
        if sent < n:
            self.direct_io.handed_back += 1
            tls.raw.write(records[sent:] if sent > 0 else records)
        return 0

    def pause_reading(self):
        """Stop reading this connection (flow control, backlog), direct or not."""
        if self._fd >= 0:
            if not self._direct_paused:
                self._direct_paused = True
                self.direct_io._unwatch(self._fd)
        elif self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self):
        if self._fd >= 0:
            if self._direct_paused:
                self.direct_io._watch(self)
                self._direct_paused = False
        elif self.transport is not None:
            self.transport.resume_reading()

    def pause_writing(self):
        """asyncio flow control: our transport holds unsent bytes. Direct sends to us wait
        behind them, and the peer filling it is no longer read."""
        self._send_blocked = True
        if self._peer is not None and self._paused_peer is None:
            self._paused_peer = self._peer
            self._peer.pause_reading()

    def resume_writing(self):
        self._send_blocked = False
        self._resume_paused_peer()

    def resume_paused_peer(self):
        """Read the peer pause_writing stopped again (on drain, or when this connection is
        lost), even if the link has ended since: left paused, it would hang its next
        partner. Not a client that paused itself with a buffer's worth queued: it resumes
        when it is linked."""
        self._resume_paused_peer()

    cdef int _resume_paused_peer(self) except -1:
        cdef Relay peer = self._paused_peer
        self._paused_peer = None
        if peer is not None and not peer.closed and not peer._reading_paused:
            peer.resume_reading()
        return 0

    # -- BufferedProtocol ----------------------------------------------------------------

    def get_buffer(self, Py_ssize_t sizehint):
        self._prepare_read()
        if self._end == 0:
            return self._view  # the whole buffer: no new view per read in the common case
        return self._view[self._end:self._cap]

    def buffer_updated(self, Py_ssize_t nbytes):
        self._buffer_updated(nbytes)

    cdef int _buffer_updated(self, Py_ssize_t nbytes) except -1:
        self._received(nbytes)
        if self.direct_io is not None and self._fd < 0:
            self._direct_after -= 1
            if self._direct_after <= 0:
                self._go_direct()
        return 0

    cdef int _prepare_read(self) except -1:
        """Room for a read at _end: at least MIN_READ bytes, or what _need asks for."""
        cdef Py_ssize_t want
        if self._buf is None:
            self._allocate(max(self.buffer_size, self._need), 0)
        elif (self._start == self._end and self._cap > 4 * self.buffer_size
              and self._need <= self.buffer_size):
            self._allocate(self.buffer_size, 0)  # a big message has passed: shrink back
        else:
            want = max(self._need, MIN_READ + self._end - self._start)
            if self._cap - self._start < want or self._cap - self._end < MIN_READ:
                self._reclaim(want)
        return 0

    cdef int _received(self, Py_ssize_t nbytes) except -1:
        self._end += nbytes
        self.rx_bytes += nbytes
        if self.held:
            # Nothing is processed while held; past one buffer's worth, ask for a pause.
            if self._end - self._start > self.buffer_size:
                self.on_backlog()
            return 0
        self._process()
        return 0

    # -- buffer management ---------------------------------------------------------------

    cdef _allocate(self, Py_ssize_t size, Py_ssize_t keep):
        """New buffer of `size` bytes holding the `keep` unread bytes of the old one. Not
        zeroed: only bytes read into it are ever looked at."""
        cdef bytearray buf
        cdef unsigned char* data
        if size == DEFAULT_BUFFER and _spare_buffers:
            view = _spare_buffers.pop()
            buf = <bytearray><object>PyMemoryView_GET_BASE(view)
        else:
            buf = PyByteArray_FromStringAndSize(NULL, size)
            view = memoryview(buf)
        data = <unsigned char*>PyByteArray_AS_STRING(buf)
        if keep:
            memcpy(data, self._data + self._start, keep)
        self._buf = buf
        self._view = view
        self._data = data
        self._cap = size
        self._start = 0
        self._end = keep
        self._lent_to = None
        self._lent_to_several = False

    cdef inline void _rewind_if_empty(self):
        """After a read is processed and its output written (a batch lends its run only
        then): with every byte consumed the next read starts at the buffer's beginning,
        unless views of this buffer went to a transport."""
        if self._start == self._end and not self._remain and self._lent_to is None:
            self._start = self._end = 0

    cdef _reclaim(self, Py_ssize_t want):
        """Make room at the end: compact in place, or start a new buffer if views are lent."""
        cdef Py_ssize_t keep = self._end - self._start
        cdef Py_ssize_t size = max(self._cap, want, self.buffer_size)
        lent = self._lent_to_several or (
            self._lent_to is not None and self._lent_to.get_write_buffer_size() > 0)
        if lent or size > self._cap:
            self._allocate(size, keep)
            return
        if keep:
            memmove(self._data, self._data + self._start, keep)
        self._start = 0
        self._end = keep
        self._lent_to = None

    cdef int _flush(self, Py_ssize_t a, Py_ssize_t b) except -1:
        if b <= a or self.writer is None:
            return 0
        self.tx_bytes += <unsigned long long>(b - a)
        if not self._batching:
            self._send_run(a, b)
        elif self._batch_first is None and self._run_b == 0:
            # Most reads forward one run: keep it in the buffer until the read is done.
            self._run_a = a
            self._run_b = b
        else:
            self._add_to_batch(self._piece(a, b))
        return 0

    cdef object _piece(self, Py_ssize_t a, Py_ssize_t b):
        """Bytes [a, b) of the buffer for the peer's transport: a copy when small, else a view
        (the buffer is then lent to that transport until it has written it)."""
        if b - a <= COPY_WRITE_MAX:
            return PyBytes_FromStringAndSize(<char*>self._data + a, b - a)
        if self._lent_to is None:
            self._lent_to = self._out
        elif self._lent_to is not self._out:
            self._lent_to_several = True
        return self._view[a:b]

    def forward(self, data):
        """Send bytes Python built (a rewritten message) to the linked peer, in order with the
        pass-through messages around it: batched while a read is processed."""
        self.tx_bytes += <unsigned long long>len(data)
        if self._batching:
            self._add_to_batch(data)
        else:
            self._send_object(data)

    cdef inline int _add_to_batch(self, piece) except -1:
        if self._run_b:
            self._batch_first = self._piece(self._run_a, self._run_b)
            self._run_a = self._run_b = 0
        if self._batch is not None:
            self._batch.append(piece)
        elif self._batch_first is None:
            self._batch_first = piece
        else:
            self._batch = [self._batch_first, piece]
        return 0

    cdef int _write_batch(self) except -1:
        cdef list batch = self._batch
        cdef Py_ssize_t a = self._run_a, b = self._run_b
        first = self._batch_first
        self._batching = False
        self._batch = None
        self._batch_first = None
        self._run_a = self._run_b = 0
        if self._out is None:
            return 0
        if b:
            self._send_run(a, b)
        elif batch is not None:
            if self._direct_peer() is not None or self._socket_peer() is not None:
                self._send_object(b"".join(batch))
            else:
                self._out.writelines(batch)
        elif first is not None:
            self._send_object(first)
        return 0

    # -- writing to the peer: straight to its socket when it is direct --------------------

    cdef inline Relay _direct_peer(self):
        """The linked peer when bytes may go straight to its socket: it is direct and its
        transport holds nothing unsent (so nothing can be overtaken)."""
        cdef Relay peer = self._peer
        if peer is not None and peer._fd >= 0 and not peer._send_blocked:
            if peer._tls is not None and not peer._tls.writable():
                return None
            return peer
        return None

    cdef inline SocketTransport _socket_peer(self):
        """The linked peer's SocketTransport: written with C calls, in order with whatever it
        holds unsent."""
        cdef Relay peer = self._peer
        return peer._socket if peer is not None else None

    cdef int _send_run(self, Py_ssize_t a, Py_ssize_t b) except -1:
        cdef SocketTransport socket = self._socket_peer()
        if socket is not None:
            return socket._write_bytes(<const char*>self._data + a, b - a)
        cdef Relay peer = self._direct_peer()
        cdef ssize_t sent
        if peer is None:
            self.writer(self._piece(a, b))  # the peer's transport.write, bound once
            return 0
        if peer._tls is not None:
            return peer._send_encrypted(PyMemoryView_FromMemory(<char*>self._data + a, b - a,
                                                                PyBUF_READ))
        sent = send(peer._fd, self._data + a, b - a, MSG_NOSIGNAL)
        peer.direct_io.sends += 1
        if sent < b - a:
            a += sent if sent > 0 else 0
            # The rest is a copy: the buffer is reused as soon as this read is done.
            self._send_rest(peer, PyBytes_FromStringAndSize(<char*>self._data + a, b - a))
        return 0

    cdef int _send_object(self, data) except -1:
        cdef SocketTransport socket = self._socket_peer()
        if socket is not None and type(data) is bytes:
            return socket._write_bytes(<const char*>(<bytes>data), len(<bytes>data))
        cdef Relay peer = self._direct_peer()
        cdef ssize_t sent
        cdef Py_ssize_t n
        if peer is None or type(data) is not bytes:
            self.writer(data)
            return 0
        if peer._tls is not None:
            return peer._send_encrypted(data)
        n = len(<bytes>data)
        sent = send(peer._fd, <const char*>(<bytes>data), n, MSG_NOSIGNAL)
        peer.direct_io.sends += 1
        if sent < n:
            self._send_rest(peer, data[sent:] if sent > 0 else data)
        return 0

    cdef int _send_rest(self, Relay peer, bytes rest) except -1:
        """The socket took less than all (full, or failing): its transport writes the rest,
        or meets the error and closes, as it does for its own writes."""
        peer.direct_io.handed_back += 1
        self.writer(rest)
        if peer.transport.is_closing():
            peer._send_blocked = True  # no resume_writing will come: stay on the transport
        return 0

    cdef int _answer_no(self) except -1:
        """'N' to a request for encryption: the client goes on in plain text."""
        if self._socket is not None:
            return self._socket._write_bytes("N", 1)
        self._own_write(b"N")
        return 0

    cdef int _fail(self, int code, int msg_type) except -1:
        self.held = True
        self.on_protocol_error(code, msg_type)
        return 0

    # -- framing -------------------------------------------------------------------------

    cdef int _process(self) except -1:
        if self._buf is None or self._processing:
            return 0
        self._processing = True
        self._batching = self.batch_output
        try:
            self._scan()
        finally:
            self._processing = False
            if self._batching:
                self._write_batch()
            self._rewind_if_empty()
            if self._release_after:
                self._release_after = False
                self._release_buffer()
        return 0

    cdef int _scan(self) except -1:
        cdef unsigned char* d = self._data
        cdef Py_ssize_t start = self._start
        cdef Py_ssize_t end = self._end
        cdef Py_ssize_t run_start = start
        cdef Py_ssize_t avail, total, n
        cdef uint32_t length
        cdef unsigned char t, act
        cdef bint saw_ready = False
        cdef bint saw_discard = False

        self._need = 0
        while not self.held:
            avail = end - start
            if self._remain:
                n = self._remain if self._remain < avail else avail
                if n == 0:
                    break
                start += n
                self._remain -= n
                if self._skipping:
                    run_start = start
                    if not self._remain:
                        self._skipping = False
                continue

            if self.startup_phase:
                if avail and d[start] == TLS_HANDSHAKE_RECORD:
                    self._flush(run_start, start)
                    self._start = start
                    self.held = True
                    self.on_direct_tls()
                    start = run_start = self._start
                    break
                if avail < 4:
                    break
                length = _be32(d + start)
                if length < 8 or length > _STARTUP_MAX:
                    self._start = start
                    self._fail(ERR_LENGTH if length < 8 or length > 0x7FFFFFFF else ERR_TOO_LONG, 0)
                    break
                if avail < <Py_ssize_t>length:
                    self._need = length
                    break
                self._flush(run_start, start)
                self._start = start + length
                if length == 8 and self.refuse_encryption and avail == 8 and (
                        _be32(d + start + 4) == SSL_REQUEST_CODE
                        or _be32(d + start + 4) == GSSENC_REQUEST_CODE):
                    # What the client's Python would answer; a request with bytes after it
                    # goes to Python, which refuses those (CVE-2021-23222).
                    self._answer_no()
                elif self.known_logins is None or not self.known_logins._login(
                        <ClientRelay>self, d + start, length):
                    self.on_message(0, self._view[start:start + length])
                start = run_start = self._start
                continue

            if avail < 5:
                break
            t = d[start]
            length = _be32(d + start + 1)
            if length < 4 or length > 0x7FFFFFFF:
                self._flush(run_start, start)
                run_start = start
                self._start = start
                self._fail(ERR_LENGTH, t)
                break
            if <long long>length > self.max_packet:
                self._flush(run_start, start)
                run_start = start
                self._start = start
                self._fail(ERR_TOO_LONG, t)
                break
            total = <Py_ssize_t>length + 1
            act = self._actions[t]

            if act == ACT_PASS:
                if self.writer is None:
                    self._flush(run_start, start)
                    self._start = start
                    if self.pool_core is None or not self.pool_core._link_idle(self):
                        self.on_unlinked(t)
                    if self.held or self._start != start:
                        # Held, or the callback took the bytes itself (take_buffered).
                        start = run_start = self._start
                        if self.held:
                            break
                        continue
                    if self.writer is None:
                        # Python chose to drop it: skip the whole message.
                        if avail >= total:
                            start += total
                        else:
                            self._remain = total - avail
                            self._skipping = True
                            start = end
                        run_start = start
                    continue
                if t == 90:  # 'Z' ReadyForQuery: status read inline
                    if length != 5:
                        self._flush(run_start, start)
                        run_start = start
                        self._start = start
                        self._fail(ERR_LENGTH, t)
                        break
                    if avail < 6:
                        break
                    self._ready_seen(d[start + 5])
                    saw_ready = True
                elif t == 67 and self.watch_discard and (
                        length == len(_DEALLOCATE_ALL_TAG) + 4 or length == len(_DISCARD_ALL_TAG) + 4):
                    # CommandComplete of a length that may be one of the tags: read it whole.
                    if avail < total:
                        self._need = total
                        break
                    if _has_tag(d + start + 5, length - 4, _DEALLOCATE_ALL_TAG) or _has_tag(
                            d + start + 5, length - 4, _DISCARD_ALL_TAG):
                        saw_discard = True
                elif self.request_sink is not None and (t == 81 or t == 83 or t == 70):
                    # Query, Sync, FunctionCall: each is answered by one ReadyForQuery.
                    self.request_sink._request_sent()
                if avail >= total:
                    start += total
                else:
                    self._remain = total - avail
                    start = end
                continue

            if act == ACT_STATEMENT_REQUEST or act == ACT_STATEMENT_REPLY:
                if avail < total and total <= self.max_inspect:
                    self._need = total
                    break
                if avail >= total and self.writer is not None and (
                        self._request_passes(t, d + start + 5, total - 5)
                        if act == ACT_STATEMENT_REQUEST else self._reply_passes()):
                    start += total
                    continue
                act = ACT_INSPECT

            if act == ACT_INSPECT or act == ACT_DISCONNECT:
                if total > self.max_inspect:
                    self._flush(run_start, start)
                    run_start = start
                    self._start = start
                    self._fail(ERR_TOO_LONG, t)
                    break
                if avail < total:
                    self._need = total
                    break
                self._flush(run_start, start)
                self._start = start + total
                if act == ACT_DISCONNECT:
                    self._close_connection()
                else:
                    self.on_message(t, self._view[start:start + total])
                start = run_start = self._start
                continue

            self._flush(run_start, start)
            run_start = start
            self._start = start
            self._fail(ERR_TYPE, t)
            break

        self._flush(run_start, start)
        self._start = start
        if saw_discard:
            self.on_statements_discarded()
        if saw_ready and self.notify_ready:
            if (self.pool_core is None or self._pending or self.ready_status != _READY_IDLE
                    or not self.pool_core._release_idle(self)):
                self.on_ready(self.ready_status)
        return 0

    # Default callbacks: subclasses override.
    def on_message(self, msg_type, view):
        pass

    def on_unlinked(self, msg_type):
        pass

    def on_ready(self, status):
        pass

    def on_protocol_error(self, code, msg_type):
        pass

    def on_backlog(self):
        pass

    def on_statements_discarded(self):
        pass

    def on_direct_tls(self):
        pass

    def on_tls_error(self, exc):
        pass


# -- the worker's wait: the codec's epoll set, with libuv's inside it --------------------
#
# Under uvloop the codec's epoll set is one reader in libuv's: each wake-up is libuv's
# dispatch, a GIL hand-over, a Python call and a second epoll_wait. A worker instead lets
# the codec wait (DirectIO.drive_loop): a libuv prepare callback, which libuv runs just
# before it would block, blocks on the codec's set, which holds libuv's own epoll descriptor,
# and returns to libuv only when libuv has work: its descriptors are ready, or
# uv_backend_timeout (libuv's answer for loops embedded this way) says a timer is due,
# callbacks are queued or descriptor changes wait to be applied, or uvloop has transport
# writes queued for its check phase, which libuv's answer leaves out. libuv is reached
# through the functions uvloop's extension exports; uvloop's check handle is found among
# the loop's handles (uv_walk). Where any of this is missing, the codec's set stays a reader
# of libuv's, as before.

cdef extern from "<dlfcn.h>" nogil:
    void* dlopen(const char* path, int flags)
    void* dlsym(void* handle, const char* name)
    int RTLD_NOW, RTLD_NOLOAD

cdef extern from "Python.h":
    void* PyCapsule_GetPointer(object capsule, const char* name) except? NULL
    void* PyMem_RawCalloc(size_t count, size_t size) nogil
    void PyMem_RawFree(void* p) nogil

ctypedef void (*uv_cb)(void* handle) noexcept nogil
ctypedef int (*uv_loop_int)(void* loop) noexcept nogil
ctypedef void (*uv_loop_void)(void* loop) noexcept nogil
ctypedef int (*uv_init_fn)(void* loop, void* handle) noexcept nogil
ctypedef int (*uv_start_fn)(void* handle, uv_cb callback) noexcept nogil
ctypedef int (*uv_handle_int)(const void* handle) noexcept nogil
ctypedef size_t (*uv_size_fn)(int handle_type) noexcept nogil
ctypedef void (*uv_close_fn)(void* handle, uv_cb close_cb) noexcept nogil
ctypedef void (*uv_walk_cb)(void* handle, void* arg) noexcept nogil
ctypedef void (*uv_walk_fn)(void* loop, uv_walk_cb callback, void* arg) noexcept nogil

cdef struct LibUv:
    uv_loop_int backend_fd
    uv_loop_int backend_timeout
    uv_loop_void update_time
    uv_size_fn handle_size
    uv_init_fn prepare_init
    uv_start_fn prepare_start
    uv_handle_int prepare_stop
    uv_init_fn idle_init
    uv_start_fn idle_start
    uv_handle_int idle_stop
    uv_handle_int is_active
    uv_handle_int unref
    uv_close_fn close
    uv_walk_fn walk

cdef LibUv _uv
cdef int _uv_found = 0      # 1: _uv is filled in; -1: uvloop's libuv is not reachable

cdef enum:
    UV_CHECK = 2                # uv_handle_type values (stable in libuv 1.x)
    UV_IDLE = 6
    UV_PREPARE = 9
    UV_HANDLE_TYPE = 16         # uv_handle_t.type (after data and loop: the public part)
    HANDLE_PREFIX = 16          # our handles: the DirectIO's pointer, then libuv's handle


cdef int _find_libuv() except -1:
    """Fill in _uv from uvloop's extension, which exports libuv's functions."""
    global _uv_found
    if _uv_found:
        return _uv_found
    _uv_found = -1
    try:
        import uvloop.loop as uvloop_extension
    except ImportError:
        return -1
    cdef void* lib = dlopen(_os_module.fsencode(uvloop_extension.__file__),
                            RTLD_NOW | RTLD_NOLOAD)
    if lib == NULL:
        return -1
    cdef void* found[14]
    names = (b"uv_backend_fd", b"uv_backend_timeout", b"uv_update_time", b"uv_handle_size",
             b"uv_prepare_init", b"uv_prepare_start", b"uv_prepare_stop", b"uv_idle_init",
             b"uv_idle_start", b"uv_idle_stop", b"uv_is_active", b"uv_unref", b"uv_close",
             b"uv_walk")
    for i, name in enumerate(names):
        found[i] = dlsym(lib, <bytes>name)
        if found[i] == NULL:
            return -1
    _uv.backend_fd = <uv_loop_int>found[0]
    _uv.backend_timeout = <uv_loop_int>found[1]
    _uv.update_time = <uv_loop_void>found[2]
    _uv.handle_size = <uv_size_fn>found[3]
    _uv.prepare_init = <uv_init_fn>found[4]
    _uv.prepare_start = <uv_start_fn>found[5]
    _uv.prepare_stop = <uv_handle_int>found[6]
    _uv.idle_init = <uv_init_fn>found[7]
    _uv.idle_start = <uv_start_fn>found[8]
    _uv.idle_stop = <uv_handle_int>found[9]
    _uv.is_active = <uv_handle_int>found[10]
    _uv.unref = <uv_handle_int>found[11]
    _uv.close = <uv_close_fn>found[12]
    _uv.walk = <uv_walk_fn>found[13]
    _uv_found = 1
    return 1


cdef struct CheckSearch:
    int checks                  # check handles seen
    void* found                 # the last one
    void* data                  # its data: the uvloop object that owns it


cdef void _count_check(void* handle, void* arg) noexcept nogil:
    cdef CheckSearch* search = <CheckSearch*>arg
    if (<int*>(<char*>handle + UV_HANDLE_TYPE))[0] == UV_CHECK:
        search.checks += 1
        search.found = handle
        search.data = (<void**>handle)[0]


cdef void* _uvloop_write_check(object loop, void* uv_loop):
    """libuv's handle of uvloop's check that runs queued transport writes: the loop's one
    check handle, owned by the one UVCheck object the loop refers to. Else NULL."""
    import gc
    owners = [obj for obj in gc.get_referents(loop) if type(obj).__name__ == "UVCheck"]
    cdef CheckSearch search
    search.checks = 0
    _uv.walk(uv_loop, _count_check, &search)
    if len(owners) != 1 or search.checks != 1 or search.data != <void*>owners[0]:
        return NULL
    return search.found


cdef void* _new_handle(DirectIO owner, int kind) except? NULL:
    cdef char* block = <char*>PyMem_RawCalloc(1, HANDLE_PREFIX + _uv.handle_size(kind))
    if block == NULL:
        raise MemoryError()
    (<void**>block)[0] = <void*>owner
    return block + HANDLE_PREFIX


cdef void _free_handle(void* handle) noexcept nogil:
    PyMem_RawFree(<char*>handle - HANDLE_PREFIX)


cdef void _on_prepare(void* handle) noexcept nogil:
    cdef PyObject* io = <PyObject*>(<void**>(<char*>handle - HANDLE_PREFIX))[0]
    with gil:
        Py_INCREF(<object>io)   # release_loop() during the wait drops the handle's reference
        (<DirectIO>io)._wait()
        Py_DECREF(<object>io)


def _raise(exc):
    raise exc


cdef void _on_kick(void* handle) noexcept nogil:
    _uv.idle_stop(handle)


@cython.final
cdef class DirectIO:
    """Reads the sockets of direct relays without a Python call per read.

    uvloop calls a protocol twice per read (get_buffer, buffer_updated) and a transport
    write is a Python call too; with small transactions that is most of a relay's cost. A
    direct relay's socket is instead watched by this epoll set, which the loop watches as
    one reader, or in which the loop waits (drive_loop): the codec takes every ready socket,
    reads each into the relay's buffer and writes to linked direct peers with send().
    Anything unusual (EOF, a read error, a full socket) goes back to the transport, which
    handles it as before.

    The sockets of accepted clients (SocketTransport) are watched here too, for their whole
    life: they have no uvloop transport at all. So are the listening sockets (Acceptor):
    a connection's accept and the reads of others share a wake-up of the loop.
    """

    cdef int _epfd
    cdef dict _relays               # fd -> Relay watched for reading (each event points at one)
    cdef dict _transports           # fd -> open SocketTransport (events point at them too)
    cdef dict _acceptors            # fd -> accepting Acceptor (and these)
    cdef list _retired              # relays unwatched during a batch, kept alive until its end
    cdef list _lost                 # SocketTransports closed during a batch: connection_lost due
    cdef bint _polling
    cdef object _loop
    cdef int _fd_budget             # descriptors from this number on are not used for dups
    cdef epoll_event _events[DIRECT_EVENTS]
    cdef char _tls_scratch[TLS_READ_MAX]  # encrypted bytes of one direct TLS read
    cdef readonly unsigned long long reads      # socket reads made here
    cdef readonly unsigned long long sends      # writes that went straight to a socket
    cdef readonly unsigned long long handed_back  # sends the socket took only part of
    # Driving the loop (drive_loop): libuv's loop, uvloop's write check, our prepare and
    # idle handles; _uv_loop is NULL when not driving.
    cdef void* _uv_loop
    cdef void* _uv_writes
    cdef void* _prepare
    cdef void* _kick
    cdef bint _uv_due               # libuv's epoll set was ready in this batch
    cdef bint _is_reader            # uvloop watches this set as a reader (not driving)
    cdef readonly unsigned long long waits       # blocking waits in this set (drive_loop)
    cdef readonly unsigned long long loop_turns  # times libuv was given a turn from them

    def __cinit__(self, loop):
        self._epfd = epoll_create1(EPOLL_CLOEXEC)
        if self._epfd < 0:
            raise OSError(errno, "epoll_create1 failed")
        self._relays = {}
        self._transports = {}
        self._retired = []
        self._lost = []
        self._acceptors = {}
        self._loop = loop
        cdef rlimit limit
        self._fd_budget = 0x3FFFFFFF
        if getrlimit(RLIMIT_NOFILE, &limit) == 0 and limit.rlim_cur < 0x7FFFFFFE:
            self._fd_budget = <int>(limit.rlim_cur // 2)
        loop.add_reader(self._epfd, self._poll)
        self._is_reader = True

    def __dealloc__(self):
        if self._epfd >= 0:
            close(self._epfd)

    def drive_loop(self):
        """Wait in this epoll set instead of uvloop's (see above); True if it does now.

        Called in the running loop, once; release_loop() (or close()) must come before the
        loop closes.
        """
        if self._uv_loop != NULL or self._epfd < 0 or _find_libuv() < 0:
            return False
        import uvloop.loop
        if not isinstance(self._loop, uvloop.loop.Loop):
            return False
        cdef void* uv_loop = PyCapsule_GetPointer(
            uvloop.loop.libuv_get_loop_t_ptr(self._loop), NULL)
        cdef int uv_fd = _uv.backend_fd(uv_loop)
        if uv_fd < 0:
            return False
        cdef void* writes = _uvloop_write_check(self._loop, uv_loop)
        if writes == NULL:
            return False
        cdef void* prepare = _new_handle(self, UV_PREPARE)
        cdef void* kick = _new_handle(self, UV_IDLE)
        cdef epoll_event event
        event.events = EPOLLIN
        event.data.ptr = NULL       # the batch tells libuv's set by this
        self._loop.remove_reader(self._epfd)
        if epoll_ctl(self._epfd, EPOLL_CTL_ADD, uv_fd, &event) < 0:
            self._loop.add_reader(self._epfd, self._poll)
            _free_handle(prepare)
            _free_handle(kick)
            return False
        self._is_reader = False
        self._prepare = prepare
        self._kick = kick
        _uv.prepare_init(uv_loop, self._prepare)
        _uv.idle_init(uv_loop, self._kick)
        # Neither keeps the loop alive: a loop closing without release_loop() runs until its
        # handles are closed, and our next prepare call closes ours (see _wait).
        _uv.unref(self._prepare)
        _uv.unref(self._kick)
        self._uv_loop = uv_loop
        self._uv_writes = writes
        Py_INCREF(self)             # the prepare handle points at us until release_loop()
        _uv.prepare_start(self._prepare, _on_prepare)
        return True

    def release_loop(self):
        """Back to waiting as uvloop's reader; our libuv handles close."""
        self._release_loop(True)

    cdef int _release_loop(self, bint back_to_reader) except -1:
        if self._uv_loop == NULL:
            return 0
        _uv.prepare_stop(self._prepare)
        _uv.idle_stop(self._kick)
        _uv.close(self._prepare, _free_handle)
        _uv.close(self._kick, _free_handle)
        self._prepare = self._kick = NULL
        cdef epoll_event event
        if self._epfd >= 0:
            epoll_ctl(self._epfd, EPOLL_CTL_DEL, _uv.backend_fd(self._uv_loop), &event)
            if back_to_reader:
                self._loop.add_reader(self._epfd, self._poll)
                self._is_reader = True
        self._uv_loop = self._uv_writes = NULL
        Py_DECREF(self)
        return 0

    cdef int _libuv_timeout(self) noexcept:
        """How long libuv would block now (ms, -1: no limit); 0 when it has work."""
        if _uv.is_active(self._uv_writes):
            return 0    # uvloop's check phase has writes to make (libuv's answer omits it)
        return _uv.backend_timeout(self._uv_loop)

    cdef void _wait(self) noexcept:
        """libuv's prepare phase: wait and run batches until libuv has something to do."""
        cdef int timeout, n
        try:
            if self._loop.is_closed():
                # Closed without release_loop(): libuv runs once more to close its handles.
                self._release_loop(False)
                return
            timeout = self._libuv_timeout()
            while True:
                if timeout == 0:
                    n = epoll_wait(self._epfd, self._events, DIRECT_EVENTS, 0)
                else:
                    with nogil:
                        n = epoll_wait(self._epfd, self._events, DIRECT_EVENTS, timeout)
                    _uv.update_time(self._uv_loop)
                    self.waits += 1
                self._uv_due = False
                if n > 0:
                    self._batch(n)
                if timeout == 0 or n < 0 or self._uv_due or self._uv_loop == NULL:
                    break
                # What a batch gave libuv to do (callbacks, writes) runs before the next
                # batch, as when libuv did the waiting.
                timeout = self._libuv_timeout()
                if timeout == 0:
                    break
        except Exception as exc:
            self._loop.call_exception_handler({
                "message": "Exception in the codec's wait", "exception": exc})
        except BaseException as exc:
            # As uvloop does with its callbacks: KeyboardInterrupt, SystemExit stop the loop.
            self._loop.call_soon(_raise, exc)
        self.loop_turns += 1
        if self._kick != NULL:
            # libuv polls its own set next: without blocking, so the codec's set is not
            # left unwatched if what was ready there is gone.
            _uv.idle_start(self._kick, _on_kick)

    def close(self):
        """Give every socket back to its transport, close client sockets (after one last try
        to send what they hold) and stop watching."""
        if self._epfd < 0:
            return
        self._release_loop(False)
        for relay in list(self._relays.values()):
            (<Relay>relay)._leave_direct(True)
        for transport in list(self._transports.values()):
            (<SocketTransport>transport)._close_now()
        for acceptor in list(self._acceptors.values()):
            acceptor.stop()
        if self._is_reader:
            self._loop.remove_reader(self._epfd)
            self._is_reader = False
        close(self._epfd)
        self._epfd = -1

    def counters(self):
        """Dup'd sockets watched now, what was read and sent here instead of by a uvloop
        transport, sends the socket took only part of, open client SocketTransports, and
        (drive_loop) the waits made here and the turns libuv was given."""
        return {"sockets": len(self._relays), "reads": self.reads, "sends": self.sends,
                "handed_back": self.handed_back, "clients": len(self._transports),
                "waits": self.waits, "loop_turns": self.loop_turns}

    cdef int _watch(self, Relay relay) except -1:
        cdef epoll_event event
        event.events = EPOLLIN
        event.data.ptr = <void*>relay
        if epoll_ctl(self._epfd, EPOLL_CTL_ADD, relay._fd, &event) < 0:
            raise OSError(errno, "epoll_ctl(ADD) failed")
        self._relays[relay._fd] = relay
        return 0

    cdef int _unwatch(self, int fd) except -1:
        cdef epoll_event event
        epoll_ctl(self._epfd, EPOLL_CTL_DEL, fd, &event)
        relay = self._relays.pop(fd, None)
        if self._polling and relay is not None:
            # Events of this batch may still point at it: it must outlive the batch.
            self._retired.append(relay)
        return 0

    cdef int _forget(self, int fd) except -1:
        """A SocketTransport closes its descriptor (which takes it out of the epoll set)."""
        transport = self._transports.pop(fd, None)
        if self._polling and transport is not None:
            self._retired.append(transport)
        return 0

    def _poll(self):
        """uvloop's reader of this epoll set (when not driving the loop)."""
        cdef int n = epoll_wait(self._epfd, self._events, DIRECT_EVENTS, 0)
        if n > 0:
            self._batch(n)

    cdef int _batch(self, int n) except -1:
        global _batch_us, _batch_wall
        cdef int i
        cdef Relay relay
        cdef object watched
        self._polling = True
        _batch_us = _read_us()
        _batch_wall = 0
        try:
            for i in range(n):
                # Alive: watched, or retired until the batch ends. An unwatched relay's
                # _read_direct does nothing, nor does a closed transport's _ready.
                if self._events[i].data.ptr == NULL:
                    self._uv_due = True     # libuv's epoll set (drive_loop)
                    continue
                watched = <object>self._events[i].data.ptr
                if type(watched) is SocketTransport:
                    (<SocketTransport>watched)._ready(self._events[i].events)
                    continue
                if type(watched) is Acceptor:
                    (<Acceptor>watched)._accept_batch()
                    continue
                relay = <Relay>watched
                try:
                    relay._read_direct()
                except Exception as exc:
                    self._failed(relay, exc)
        finally:
            if self._lost:
                self._tell_lost()
            _batch_us = 0
            self._polling = False
            if self._retired:
                self._retired = []
        return 0

    cdef int _tell_lost(self) except -1:
        """connection_lost of the sockets the batch closed, in the order they closed (also
        those closed by these calls)."""
        cdef Py_ssize_t i = 0
        cdef SocketTransport transport
        lost = self._lost
        while i < len(lost):
            transport = <SocketTransport>lost[i]
            i += 1
            try:
                transport._tell_lost(transport._lost_exc)
            except Exception as exc:
                self._loop.call_exception_handler({
                    "message": "Exception in connection_lost", "exception": exc,
                    "transport": transport})
        self._lost = []
        return 0

    cdef _failed(self, Relay relay, exc):
        # What uvloop does when buffer_updated raises: report it and drop the connection.
        relay._leave_direct(False)
        self._loop.call_exception_handler({
            "message": "Fatal error: protocol.buffer_updated() call failed.",
            "exception": exc, "transport": relay.transport, "protocol": relay})
        if relay.transport is not None:
            relay.transport.abort()


# -- client sockets: accepted and run by the codec, without uvloop transports ------------

# asyncio's default write buffer limit (high water; low water is a quarter of it).
cdef Py_ssize_t WRITE_HIGH_DEFAULT = 64 * 1024
# Connections taken from the kernel per readiness of a listening socket (the rest wait for
# the next loop iteration, so a connection storm cannot starve the sessions).
cdef int ACCEPT_BATCH = 64

import socket as _socket_module
from os import strerror as _strerror


cdef object _os_error(int code):
    return OSError(code, _strerror(code))


@cython.final
cdef class SocketTransport:
    """An accepted client socket as an asyncio transport, read and written by the codec.

    A uvloop transport costs a login about as much CPU as PgBouncer spends on the whole
    connection (its handle, a weak registry, two scheduled callbacks, two Python calls per
    read); this one is a small object in DirectIO's epoll set. A Relay protocol is read into
    with C calls; any other BufferedProtocol (the TLS layer, after set_protocol) through
    get_buffer/buffer_updated. write() sends at once; what the socket does not take is copied
    and sent when it is writable, with asyncio's flow control (pause_writing above the high
    water mark, resume_writing at the low one). close() sends what is left, then closes;
    connection_lost is always called from the loop, never from inside close() or write().
    """

    cdef int _fd
    cdef int _family
    cdef DirectIO _io
    cdef object _loop
    cdef object _protocol
    cdef Relay _relay               # the protocol when it is a Relay: read with C calls
    cdef bint _reading              # reading wanted (pause_reading/resume_reading)
    cdef bint _closing
    cdef bint _writing_paused       # the protocol was told pause_writing
    cdef uint32_t _events           # what the epoll set watches now (0: not in it)
    cdef bytearray _unsent          # what the socket did not take yet, or None
    cdef Py_ssize_t _unsent_start
    cdef Py_ssize_t _high
    cdef Py_ssize_t _low
    cdef object _sock               # a socket object on our descriptor, made when asked for
    cdef sockaddr_in6 _peer         # the client's address from accept (an IPv4 one fits)
    cdef object _lost_exc           # closed during a DirectIO batch: connection_lost's argument

    def __cinit__(self):
        self._fd = -1

    def __dealloc__(self):
        if self._fd >= 0:  # never started (the protocol could not be made)
            close(self._fd)

    cdef int _start(self, protocol) except -1:
        """Give the socket to its protocol and start reading (and read at once: with
        tcp_defer_accept the startup packet is usually there already)."""
        self._io._transports[self._fd] = self
        self._set_protocol(protocol)
        self._reading = True
        if isinstance(protocol, ClientRelay):
            (<ClientRelay>protocol)._connection_made(self)
        else:
            protocol.connection_made(self)
        self._update_events()
        if self._reading and not self._closing and self._fd >= 0:
            self._read()
        return 0

    cdef inline void _set_protocol(self, protocol):
        self._protocol = protocol
        self._relay = protocol if isinstance(protocol, Relay) else None

    # -- events ----------------------------------------------------------------------

    cdef int _update_events(self) except -1:
        """Watch for what we want now: input while reading, output while bytes wait."""
        cdef uint32_t want = 0
        cdef epoll_event event
        cdef int op
        if self._fd < 0:
            return 0
        if self._reading and not self._closing:
            want = EPOLLIN
        if self._unsent is not None:
            want |= EPOLLOUT
        if want == self._events:
            return 0
        if want == 0:
            op = EPOLL_CTL_DEL  # not a 0 mask: hang-ups would still be reported
        elif self._events == 0:
            op = EPOLL_CTL_ADD
        else:
            op = EPOLL_CTL_MOD
        event.events = want
        event.data.ptr = <void*>self
        if epoll_ctl(self._io._epfd, op, self._fd, &event) < 0:
            raise _os_error(errno)
        self._events = want
        return 0

    cdef int _ready(self, uint32_t events) except -1:
        """DirectIO: our socket is ready. Failures of the protocol close this connection
        only (as uvloop does when a protocol callback raises)."""
        try:
            if self._unsent is not None and events & (EPOLLOUT | EPOLLERR | EPOLLHUP):
                self._send_unsent()
            if (self._reading and not self._closing and self._fd >= 0
                    and events & (EPOLLIN | EPOLLERR | EPOLLHUP)):
                self._read()
        except Exception as exc:
            self._loop.call_exception_handler({
                "message": "Fatal error: protocol callback failed.",
                "exception": exc, "transport": self, "protocol": self._protocol})
            self._abort(exc)
        return 0

    cdef int _read(self) except -1:
        cdef Relay relay = self._relay
        cdef ssize_t n
        cdef int failure
        cdef Py_buffer view
        if relay is not None:
            relay._prepare_read()
            n = recv(self._fd, relay._data + relay._end, relay._cap - relay._end, 0)
            failure = errno
            self._io.reads += 1
            if n > 0:
                relay._buffer_updated(n)
                return 0
        else:
            buffer = self._protocol.get_buffer(65536)  # a size hint, as uvloop gives one
            PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE)
            n = recv(self._fd, view.buf, view.len, 0)
            failure = errno
            PyBuffer_Release(&view)
            self._io.reads += 1
            if n > 0:
                self._protocol.buffer_updated(n)
                return 0
        if n == 0:
            # End of input: the protocol may keep writing (eof_received true), else close.
            self._reading = False
            self._update_events()
            if not self._protocol.eof_received():
                self.close()
        elif failure != EAGAIN and failure != EINTR:
            self._abort(_os_error(failure))
        return 0

    # -- writing ---------------------------------------------------------------------

    def write(self, data):
        cdef Py_buffer view
        if self._fd < 0:
            return  # the connection is gone: asyncio drops such writes too
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self._write_bytes(<const char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef int _write_bytes(self, const char* data, Py_ssize_t size) except -1:
        """write() for the codec: send now, or queue a copy behind what waits (the caller may
        reuse its buffer, a relay's read buffer, at once)."""
        cdef ssize_t sent
        cdef int failure
        cdef Py_ssize_t queued
        if self._fd < 0 or size == 0:
            return 0
        if self._unsent is not None:
            queued = len(self._unsent)
            PyByteArray_Resize(self._unsent, queued + size)
            memcpy(PyByteArray_AS_STRING(self._unsent) + queued, data, size)
            self._maybe_pause_protocol()
            return 0
        sent = send(self._fd, data, size, MSG_NOSIGNAL)
        failure = errno
        self._io.sends += 1
        if sent == size:
            return 0
        if sent < 0:
            if failure != EAGAIN and failure != EINTR:
                self._abort(_os_error(failure))
                return 0
            sent = 0
        self._io.handed_back += 1
        self._unsent = PyByteArray_FromStringAndSize(data + sent, size - sent)
        self._unsent_start = 0
        self._update_events()
        self._maybe_pause_protocol()
        return 0

    def writelines(self, list_of_data):
        self.write(b"".join(list_of_data))

    cdef int _send_unsent(self) except -1:
        cdef bytearray unsent = self._unsent
        cdef Py_ssize_t size = len(unsent)
        cdef ssize_t sent = send(self._fd, PyByteArray_AS_STRING(unsent) + self._unsent_start,
                                 size - self._unsent_start, MSG_NOSIGNAL)
        cdef int failure = errno
        if sent < 0:
            if failure != EAGAIN and failure != EINTR:
                self._abort(_os_error(failure))
            return 0
        self._unsent_start += sent
        if self._unsent_start < size:
            if self._unsent_start >= size // 2:
                del unsent[:self._unsent_start]  # keep appends from growing it forever
                self._unsent_start = 0
            self._maybe_resume_protocol()
            return 0
        self._unsent = None
        self._unsent_start = 0
        self._maybe_resume_protocol()  # also when closing, as asyncio's transports do
        if self._closing:
            self._finish(None)
            return 0
        self._update_events()
        return 0

    cdef int _maybe_pause_protocol(self) except -1:
        if not self._writing_paused and self.get_write_buffer_size() > self._high:
            self._writing_paused = True
            self._protocol.pause_writing()
        return 0

    cdef int _maybe_resume_protocol(self) except -1:
        if self._writing_paused and self.get_write_buffer_size() <= self._low:
            self._writing_paused = False
            if self._protocol is not None:
                self._protocol.resume_writing()
        return 0

    def get_write_buffer_size(self):
        return 0 if self._unsent is None else len(self._unsent) - self._unsent_start

    def set_write_buffer_limits(self, high=None, low=None):
        if high is None:
            high = WRITE_HIGH_DEFAULT if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high = high
        self._low = low
        self._maybe_pause_protocol()

    def get_write_buffer_limits(self):
        return (self._low, self._high)

    # -- reading ---------------------------------------------------------------------

    def pause_reading(self):
        if self._reading and not self._closing:
            self._reading = False
            self._update_events()

    def resume_reading(self):
        if not self._reading and not self._closing:
            self._reading = True
            self._update_events()

    def is_reading(self):
        return self._reading and not self._closing

    # -- closing ---------------------------------------------------------------------

    def is_closing(self):
        return self._closing

    def close(self):
        """Stop reading; close once what waits is sent."""
        self._close()

    cdef int _close(self) except -1:
        if self._closing:
            return 0
        self._closing = True
        if self._unsent is None:
            self._finish(None)
        else:
            self._update_events()
        return 0

    def abort(self):
        self._abort(None)

    def _force_close(self, exc):
        """What uvloop's TLS layer calls on its transport when the connection fails."""
        self._abort(exc)

    cdef int _abort(self, exc) except -1:
        self._closing = True
        self._unsent = None
        self._finish(exc)
        return 0

    cdef int _close_now(self) except -1:
        """The worker is stopping: one last try to send what waits, then close."""
        if self._unsent is not None and self._fd >= 0:
            self._send_unsent()
        self._abort(None)
        return 0

    cdef int _finish(self, exc) except -1:
        cdef int fd = self._fd
        cdef epoll_event event
        if fd < 0:
            return 0
        if self._events and self._sock is not None:
            # Closing the descriptor takes it out of the epoll set, unless a dup of it lives
            # on: whoever asked for the socket object may have made one (direct TLS does).
            epoll_ctl(self._io._epfd, EPOLL_CTL_DEL, fd, &event)
        self._events = 0
        self._io._forget(fd)
        if self._sock is not None:
            self._sock.detach()  # the number is ours to close; the object shows fileno -1
        self._fd = -1
        close(fd)
        if self._io._polling:
            # Closed while DirectIO reads: connection_lost comes at the end of its batch,
            # after this call returns as with call_soon, without a loop callback each.
            self._lost_exc = exc
            self._io._lost.append(self)
        else:
            self._loop.call_soon(self._connection_lost, exc)
        return 0

    def _connection_lost(self, exc):
        self._tell_lost(exc)

    cdef int _tell_lost(self, exc) except -1:
        protocol = self._protocol
        self._protocol = None  # the protocol keeps the transport, not the other way round
        self._relay = None
        self._lost_exc = None
        if isinstance(protocol, ClientRelay):
            (<ClientRelay>protocol)._connection_lost(exc)
        elif protocol is not None:
            protocol.connection_lost(exc)
        return 0

    # -- the rest of asyncio's transport API -------------------------------------------

    def set_protocol(self, protocol):
        self._set_protocol(protocol)

    def get_protocol(self):
        return self._protocol

    def get_extra_info(self, name, default=None):
        if name == "peername":
            return self._peername()
        if name == "socket":
            return self._socket()
        if name == "sockname":
            sock = self._socket()
            return sock.getsockname() if sock is not None and self._fd >= 0 else default
        return default

    cdef object _socket(self):
        """A socket object on our descriptor (peer credentials, getsockname, a dup for
        direct I/O): made when first asked for, detached when we close."""
        if self._sock is None and self._fd >= 0:
            self._sock = _socket_module.socket(self._family, _socket_module.SOCK_STREAM, 0,
                                               self._fd)
        return self._sock

    cdef object _peername(self):
        """As socket.getpeername(): (host, port) for IPv4, (host, port, flowinfo, scope_id)
        for IPv6, "" for a Unix socket client."""
        cdef char text[64]
        cdef sockaddr_in* v4
        if self._family == AF_INET:
            v4 = <sockaddr_in*>&self._peer
            inet_ntop(AF_INET, &v4.sin_addr, text, sizeof(text))
            return (text.decode("ascii"), ntohs(v4.sin_port))
        if self._family == AF_INET6:
            inet_ntop(AF_INET6, &self._peer.sin6_addr, text, sizeof(text))
            return (text.decode("ascii"), ntohs(self._peer.sin6_port),
                    ntohl(self._peer.sin6_flowinfo), self._peer.sin6_scope_id)
        return ""

    def __repr__(self):
        return f"<SocketTransport fd={self._fd}{' closing' if self._closing else ''}>"


@cython.final
cdef class Acceptor:
    """Accepts the connections of one listening socket into SocketTransports, each given to
    a protocol from `factory` (what loop.create_server does, without its transports).
    `on_error(exc)` hears of accept failures other than "nothing to accept" (descriptors
    exhausted: the caller may stop() for a while)."""

    cdef int _fd
    cdef int _family
    cdef readonly object socket
    cdef object _factory
    cdef DirectIO _io
    cdef object _on_error
    cdef readonly bint accepting

    def __cinit__(self, sock, factory, DirectIO io not None, on_error):
        self.socket = sock
        self._fd = sock.fileno()
        self._family = sock.family
        self._factory = factory
        self._io = io
        self._on_error = on_error

    def start(self):
        cdef epoll_event event
        if not self.accepting:
            event.events = EPOLLIN
            event.data.ptr = <void*>self
            if epoll_ctl(self._io._epfd, EPOLL_CTL_ADD, self._fd, &event) < 0:
                raise _os_error(errno)
            self._io._acceptors[self._fd] = self  # events point at it: keep it alive
            self.accepting = True

    def stop(self):
        cdef epoll_event event
        if self.accepting:
            if self._io._epfd >= 0:
                epoll_ctl(self._io._epfd, EPOLL_CTL_DEL, self._fd, &event)
            self._io._acceptors.pop(self._fd, None)
            if self._io._polling:
                self._io._retired.append(self)  # events of this batch may point at it
            self.accepting = False

    def close(self):
        self.stop()
        self.socket.close()

    cdef int _accept_batch(self) except -1:
        cdef int i, fd, failure
        cdef socklen_t size
        cdef SocketTransport transport
        if not self.accepting:
            return 0  # stopped earlier in this batch
        for i in range(ACCEPT_BATCH):
            transport = SocketTransport.__new__(SocketTransport)
            size = sizeof(transport._peer)
            fd = accept4(self._fd, <sockaddr*>&transport._peer, &size,
                         SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                failure = errno
                if failure == EINTR or failure == ECONNABORTED:
                    continue
                if failure != EAGAIN:
                    self._on_error(_os_error(failure))
                return 0
            transport._fd = fd
            transport._family = self._family
            transport._io = self._io
            transport._loop = self._io._loop
            transport._high = WRITE_HIGH_DEFAULT
            transport._low = WRITE_HIGH_DEFAULT // 4
            try:
                protocol = self._factory()
            except Exception as exc:
                self._io._loop.call_exception_handler({
                    "message": "Error creating a protocol for an accepted connection",
                    "exception": exc})
                continue  # the transport closes its descriptor when freed
            try:
                transport._start(protocol)
            except Exception as exc:
                self._io._loop.call_exception_handler({
                    "message": "Error starting an accepted connection",
                    "exception": exc, "transport": transport, "protocol": protocol})
                transport._abort(exc)
        return 0


# -- pairing: the per-transaction hand-off in transaction pooling -----------------------

cdef inline void _link(Relay client, Relay server, bytes server_actions, bint notify_ready):
    server._out = client.transport
    server.writer = client._own_write
    server._peer = client
    client._peer = server
    _use_actions(server, server_actions)
    server.notify_ready = notify_ready
    client._out = server.transport
    client.writer = server._own_write
    client.request_sink = server


cdef inline void _unlink(Relay client, Relay server, bytes server_actions):
    client._out = None
    client.writer = None
    client._peer = None
    client.request_sink = None
    server._out = None
    server.writer = None
    server._peer = None
    server._xact_start_us = 0
    server._query_start_us = 0
    _use_actions(server, server_actions)


def link_pair(Relay client not None, Relay server not None, bytes server_actions not None,
              bint notify_ready):
    """Make client and server forward to each other's transport (O(1), no allocation)."""
    _check_actions(server_actions)
    _link(client, server, server_actions, notify_ready)


def unlink_pair(Relay client not None, Relay server not None, bytes server_actions not None):
    """Undo link_pair; the server gets the action table for an idle connection."""
    _check_actions(server_actions)
    _unlink(client, server, server_actions)


@cython.final
cdef class WorkerFlags:
    """Switches of the whole worker that every hand-off checks (App.paused and
    App.shutting_down live here), so the check is a C field read."""

    cdef public bint paused          # PAUSE of every database
    cdef public bint shutting_down


cdef str _ACTIVE = "active"
cdef str _IDLE = "idle"
cdef str _WAITING = "waiting"


@cython.final
cdef class PoolCore:
    """The common per-transaction hand-off of one pool, without Python frames.

    An idle server is taken from the top of `idle` and linked when a client's first message
    of a transaction arrives. When its ReadyForQuery 'I' answers everything the client sent,
    it goes straight to the first client in `waiting` (clients outnumber servers), or back
    to `idle` when nobody waits. Anything out of the ordinary (no idle server, PAUSE,
    server_check_query due, lifetime over, RECONNECT, parameters to sync, reset queries, a
    queued client the core cannot serve) declines, and the relay calls Python (on_unlinked /
    on_ready) as it would without the core. `idle`, `active` and `waiting` are the pool's own
    collections.
    """

    cdef readonly list idle         # servers ready for a client, most recently used last
    cdef readonly set active        # servers linked to a client
    cdef readonly set used          # the pool's other server collections, for its size
    cdef readonly set tested
    cdef readonly set login
    cdef readonly object waiting    # the pool's FIFO of clients waiting for a server
    cdef readonly set clients       # the pool's logged-in clients
    cdef WorkerFlags flags          # the App's: PAUSE of every database, shutdown
    # The pool's counters that move with transactions (PoolStats reads them):
    cdef public unsigned long long assignments  # clients linked to a server
    cdef public unsigned long long bind_count   # Bind messages (prepared statements)
    # Bytes closed clients sent, and of those the bytes the codec passed on to servers.
    cdef readonly unsigned long long closed_received
    cdef readonly unsigned long long closed_client_relayed
    cdef readonly long long wait_us             # clients' time queued for a server
    cdef unsigned long long _wait_buckets[N_BUCKETS + 1]  # only clients that really queued
    cdef public bint enabled        # transaction pooling without reset queries
    cdef public bint paused
    cdef public bint disabled       # DISABLE: no new requests are taken
    cdef public int pool_size       # clients queue in C only when the pool cannot grow
    cdef public bint round_robin    # server_round_robin: take the longest idle, not the newest
    cdef public bint check_enabled
    cdef public double check_delay
    cdef public double lifetime     # server_lifetime, seconds (0: none)
    cdef public long generation     # RECONNECT generation
    cdef bytes _relay_actions       # server actions while linked
    cdef bytes _idle_actions        # server actions while idle
    cdef bytes _client_linked_actions  # prepared statements: client actions while linked
    cdef bytes _client_idle_actions    # and while not; None when clients keep theirs
    cdef readonly unsigned long long fast_links
    cdef readonly unsigned long long fast_releases
    cdef readonly unsigned long long fast_handoffs  # released servers given to a waiting client
    cdef readonly unsigned long long fast_queued    # clients queued without a server to take

    def __cinit__(self, waiting, WorkerFlags flags not None):
        self.idle = []
        self.active = set()
        self.used = set()
        self.tested = set()
        self.login = set()
        self.clients = set()
        self.waiting = waiting
        self.flags = flags

    def forget_client(self, Relay client not None):
        """A client of this pool has closed: it leaves the pool (and the queue, if waiting)
        and its byte counts stay in the pool's totals."""
        self._forget_client(client)

    cdef int _forget_client(self, Relay client) except -1:
        self.clients.discard(client)
        if client.state == _WAITING:
            try:
                self.waiting.remove(client)
            except ValueError:
                pass
        self.closed_received += client.rx_bytes
        self.closed_client_relayed += client.tx_bytes
        return 0

    def set_actions(self, bytes relay_actions not None, bytes idle_actions not None,
                    bytes client_linked_actions=None, bytes client_idle_actions=None):
        """Server action tables for linked and idle connections (see link_pair), and the
        client's, when linking changes them (prepared statements)."""
        for table in (relay_actions, idle_actions, client_linked_actions, client_idle_actions):
            if table is not None:
                _check_actions(table)
        if (client_linked_actions is None) != (client_idle_actions is None):
            raise ValueError("client action tables come in pairs")
        self._relay_actions = relay_actions
        self._idle_actions = idle_actions
        self._client_linked_actions = client_linked_actions
        self._client_idle_actions = client_idle_actions

    cdef inline bint _open(self):
        """Transaction pooling the core handles, and no PAUSE."""
        return self.enabled and not self.paused and not self.flags.paused

    cdef inline bint _quiet(self):
        """Nothing that needs Python: no PAUSE and no client queued."""
        return len(self.waiting) == 0 and self._open()

    cdef inline void _record_wait(self, double seconds) noexcept:
        # Not below 0: Python may have queued the client during this batch, after the
        # batch's clock reading.
        cdef long long waited_us = <long long>(seconds * 1e6) if seconds > 0 else 0
        self.wait_us += waited_us
        self._wait_buckets[_bucket(waited_us)] += 1

    def record_wait(self, double seconds):
        """A client queued for `seconds` before it got a server (the hand-off in Python)."""
        self._record_wait(seconds)

    def wait_histogram(self):
        """Clients that queued, per bucket of TIMING_BUCKETS_US, +Inf last; not cumulative."""
        return tuple([self._wait_buckets[i] for i in range(N_BUCKETS + 1)])

    def counters(self):
        """How often each hand-off ran here instead of in Python."""
        return {"links": self.fast_links, "releases": self.fast_releases,
                "handoffs": self.fast_handoffs, "queued": self.fast_queued}

    cdef inline Py_ssize_t _server_count(self):
        return (len(self.idle) + len(self.active) + len(self.used) + len(self.tested)
                + len(self.login))

    cdef bint _link_idle(self, Relay client) except -1:
        """Link client to the most recently used idle server (the longest idle one with
        round_robin), or queue it when there is none and the pool is full; False to let
        Python decide."""
        cdef Relay server
        cdef double now
        cdef Py_ssize_t pick
        if not self.idle:
            return self._enqueue(client)
        if not self._quiet():
            return False
        pick = 0 if self.round_robin else len(self.idle) - 1
        server = <Relay>self.idle[pick]
        if server.closed:
            return False
        if client.param_sig is None or client.param_sig is not server.param_sig:
            return False  # parameters to sync, or not compared yet
        now = _monotonic()
        if self.check_enabled and now - server.last_used > self.check_delay:
            return False  # server_check_query is due
        _list_take(self.idle, pick)
        server.state = _ACTIVE
        self.active.add(server)
        self._attach(client, server, now)
        client.request_time = _wall()
        self.fast_links += 1
        return True

    cdef inline int _attach(self, Relay client, Relay server, double now) except -1:
        """Link the pair for a transaction and count the assignment (Pool._link and
        ClientConnection.attached in Python)."""
        client.server = server
        server.client = client
        _link(client, server, self._relay_actions, True)
        if self._client_linked_actions is not None:
            _use_actions(client, self._client_linked_actions)
        self.assignments += 1
        client.link_time = now
        return 0

    cdef bint _enqueue(self, Relay client) except -1:
        """Queue the client for the next released server, holding its bytes (Pool.request
        when the pool is full: no launch, no error to report); False to let Python decide."""
        if (client.closed or client.state != _ACTIVE or self.disabled or not self._open()
                or self.pool_size <= 0 or self._server_count() < self.pool_size
                or self.flags.shutting_down):
            return False
        client.request_time = _wall()
        self.waiting.append(client)
        client.state = _WAITING
        client.wait_start = _monotonic()
        client.held = True
        self.fast_queued += 1
        return True

    cdef bint _release_idle(self, Relay server) except -1:
        """Server answered everything with 'I': hand it to the first waiting client, or park
        it idle; False to let Python decide."""
        cdef double now
        if (server.client is None or server.state != _ACTIVE or server.closed
                or server._end != server._start or server._remain or not self._open()):
            return False
        now = _monotonic()
        if self.lifetime > 0 and now - server.created > self.lifetime:
            return False
        if server.generation != self.generation:
            return False
        if len(self.waiting) != 0:
            return self._hand_over(server, now)
        self._unlink_client(server, now)
        self.active.discard(server)
        server.state = _IDLE
        self.idle.append(server)
        self.fast_releases += 1
        return True

    cdef inline void _unlink_client(self, Relay server, double now):
        """The transaction is over: the server's client lets go of it."""
        cdef Relay client = <Relay>server.client
        client.last_active = now
        server.last_used = now
        client.server = None
        server.client = None
        _unlink(client, server, self._idle_actions)
        if self._client_idle_actions is not None:
            _use_actions(client, self._client_idle_actions)

    cdef bint _hand_over(self, Relay server, double now) except -1:
        """Give the released server to the first waiting client (what Pool.server_ready,
        Pool._link and ClientConnection.attached do), then let that client's held bytes
        flow; False, with nothing changed, when the client needs Python. The server stays
        in `active`. server_check_query is never due: the server was used just now."""
        cdef Relay client
        candidate = self.waiting[0]
        if not isinstance(candidate, Relay):
            return False
        client = <Relay>candidate
        if (client.closed or client.state != _WAITING or client.pool_core is not self
                or client._reading_paused):
            return False
        if client.param_sig is None or client.param_sig is not server.param_sig:
            return False  # parameters to sync, or not compared yet
        self.waiting.popleft()
        self._unlink_client(server, now)
        self._attach(client, server, now)
        self._record_wait(now - client.wait_start)
        client.state = _ACTIVE
        self.fast_handoffs += 1
        if client.held:
            # As resume(): we are inside the server relay's processing, not the client's,
            # so the client's queued transaction goes to the server now.
            client.held = False
            client._process()
        return True


# -- logins ----------------------------------------------------------------------------

cdef extern from "<sys/random.h>" nogil:
    ssize_t getrandom(void* buf, size_t n, unsigned int flags)

# Random bytes are drawn from the kernel a page at a time: a login needs a few (its cancel
# key), and a getrandom() call each would cost more than the rest of the login.
DEF RANDOM_DRAW = 4096
cdef unsigned char _random_pool[RANDOM_DRAW]
cdef Py_ssize_t _random_left = 0


def _forget_random():
    # A forked worker must not hand out the same bytes as its parent or its siblings.
    global _random_left
    _random_left = 0

import os as _os_module
_os_module.register_at_fork(after_in_child=_forget_random)


cdef int _draw_random(unsigned char* out, Py_ssize_t count) except -1:
    global _random_left
    cdef ssize_t got
    cdef Py_ssize_t filled = 0
    if count > RANDOM_DRAW:
        raise ValueError("at most %d random bytes at a time" % RANDOM_DRAW)
    if count > _random_left:
        while filled < RANDOM_DRAW:
            got = getrandom(_random_pool + filled, RANDOM_DRAW - filled, 0)
            if got < 0:
                if errno == EINTR:
                    continue
                raise _os_error(errno)
            filled += got
        _random_left = RANDOM_DRAW
    _random_left -= count
    memcpy(out, _random_pool + _random_left, count)
    # Bytes handed out are not kept.
    memset(_random_pool + _random_left, 0, count)
    return 0


def random_bytes(Py_ssize_t count):
    """Cryptographically random bytes (cancel keys, salts)."""
    cdef bytes drawn = PyBytes_FromStringAndSize(NULL, count)
    _draw_random(<unsigned char*><char*>drawn, count)
    return drawn


# A cancel key's process id carries its worker's number in the top bits, so any worker
# receiving a CancelRequest knows whose client it is.
DEF _WORKER_SHIFT = 24
WORKER_SHIFT = _WORKER_SHIFT
DEF PROTOCOL_3_0 = 3 << 16
DEF PROTOCOL_3_2 = (3 << 16) | 2
# Cancel key length for protocol 3.2 clients (3.2 allows up to 256 bytes; PostgreSQL 18
# sends 32). Protocol 3.0 keys are 4 bytes.
DEF LONG_CANCEL_KEY_BYTES = 32
# Startup packets remembered per worker: an application sends few distinct ones.
DEF KNOWN_LOGINS_MAX = 256


def new_cancel_key(int worker_index, int key_length):
    """A client's cancel key: a "process id" (random below the worker's number) and
    `key_length` random bytes."""
    cdef uint32_t pid
    key = _new_cancel_key(worker_index, key_length, &pid)
    return pid, key


cdef bytes _new_cancel_key(int worker_index, int key_length, uint32_t* pid):
    cdef unsigned char drawn[4 + 256]
    if not 4 <= key_length <= 256:
        raise ValueError("cancel keys are 4 to 256 bytes")
    _draw_random(drawn, 4 + key_length)
    pid[0] = ((<uint32_t>worker_index) << _WORKER_SHIFT) | (
        (_be32(drawn) & ((1u << _WORKER_SHIFT) - 1)) or 1)
    return PyBytes_FromStringAndSize(<char*>drawn + 4, key_length)


cdef str _LOGIN = "login"
cdef str _AFTER_LOGIN = "active"


# -- connection log lines ------------------------------------------------------------
# With log_connections and log_disconnections on, PgBouncer's defaults, every client
# writes two lines. Through Python's logging they cost more than the rest of a short
# connection, so the codec writes them itself, in PgBouncer's text format, to the
# descriptors pgmulti.logs.configure() hands it (the log file, stderr); with none (JSON,
# syslog, another handler) they go through logging like any line.

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct tm:
        pass
    tm* localtime_r(const time_t* t, tm* result)
    size_t strftime(char* s, size_t size, const char* fmt, const tm* t)

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec* iov, int count)

cdef extern from "<stdio.h>" nogil:
    int snprintf(char* s, size_t size, const char* fmt, ...)

cdef extern from "<unistd.h>" nogil:
    int getpid()
    ssize_t c_write "write" (int fd, const void* buf, size_t n)

DEF LOG_DESTINATIONS_MAX = 4
cdef int _log_fds[LOG_DESTINATIONS_MAX]
cdef int _log_fd_count = 0
cdef time_t _log_second = -1
cdef char _log_second_text[64]  # "2025-01-31 12:00:00" of _log_second
cdef char _log_zone[32]
import logging as _logging_module
_connection_log = _logging_module.getLogger("pgmulti.client")  # when there are none


def set_log_descriptors(fds):
    """Where the codec writes its connection lines: the descriptors of logging's text
    streams (pgmulti.logs.configure), or none to send them through logging."""
    global _log_fd_count
    fds = tuple(fds)
    _log_fd_count = 0
    if len(fds) > LOG_DESTINATIONS_MAX:
        return
    for i, fd in enumerate(fds):
        _log_fds[i] = fd
    _log_fd_count = len(fds)


cdef Py_ssize_t _log_header(char* out, Py_ssize_t size) noexcept:
    """``2025-01-31 12:00:00.123 UTC [4242] LOG `` (pgmulti.logs.PgBouncerFormatter's)."""
    global _log_second
    cdef timespec now
    cdef tm local
    cdef time_t second
    clock_gettime(CLOCK_REALTIME, &now)
    second = now.tv_sec
    if second != _log_second:  # strftime once a second
        localtime_r(&second, &local)
        strftime(_log_second_text, sizeof(_log_second_text), "%Y-%m-%d %H:%M:%S", &local)
        strftime(_log_zone, sizeof(_log_zone), "%Z", &local)
        _log_second = second
    return snprintf(out, size, "%s.%03d %s [%d] LOG ", _log_second_text,
                    <int>(now.tv_nsec // 1000000), _log_zone, getpid())


cdef int _log_line(str message) except -1:
    """One INFO line: written to the descriptors when there are some, else logged."""
    cdef char header[128]
    cdef Py_ssize_t header_size
    cdef iovec parts[3]
    cdef ssize_t written
    if _log_fd_count == 0:
        _connection_log.info("%s", message)
        return 0
    body = message.encode("utf-8", "backslashreplace")
    header_size = _log_header(header, sizeof(header))
    if header_size >= <Py_ssize_t>sizeof(header):
        header_size = sizeof(header) - 1
    parts[0].iov_base = header
    parts[0].iov_len = header_size
    parts[1].iov_base = <char*>body
    parts[1].iov_len = len(body)
    parts[2].iov_base = <char*>"\n"
    parts[2].iov_len = 1
    for i in range(_log_fd_count):
        written = writev(_log_fds[i], parts, 3)
        if written < 0 and errno == EINTR:
            written = 0
        if 0 <= written < header_size + len(body) + 1:  # a pipe took part, or a signal
            _write_rest(_log_fds[i], header[:header_size] + body + b"\n", written)
    return 0


cdef void _write_rest(int fd, bytes line, ssize_t done) noexcept:
    cdef ssize_t written
    while done < len(line):
        written = c_write(fd, <char*>line + done, len(line) - done)
        if written < 0 and errno == EINTR:
            continue
        if written <= 0:
            return  # as PgBouncer: a log that cannot be written is not an error to serve
        done += written


cdef unsigned long long _client_serial = 0  # clients this process has accepted


cdef class ClientRelay(Relay):
    """A client connection's relay, with what every client has from accept on and what a
    login sets, in C fields: accepting a client and logging it in (KnownLogins) run no
    Python frame. pgmulti.client.ClientConnection adds the login steps and the session,
    and what the codec calls when it must:
      tls_missing()     TLS is required and this client logs in without it
      session_lost()    the connection closed holding a server or a login
    The log_connections and log_disconnections lines are written here (_log_line).
    """

    cdef readonly object app
    cdef readonly unsigned long long id
    cdef readonly str listener_kind     # "tcp" or "unix"
    cdef public double connect_time     # time.time() at accept
    cdef public str user
    cdef public str database
    cdef public object pool             # pgmulti.pool.Pool once logged in to one
    cdef public dict params             # tracked parameters as the client sees them
    cdef public dict startup_params     # as the startup packet gave them
    cdef public int protocol_version
    cdef public long long cancel_pid    # cancel key: made at login, the key as long as the
    cdef public bytes cancel_key        # protocol version allows
    cdef public bint maps_statements    # statement names are mapped (max_prepared_statements)
    cdef object _cancel_entry           # its key in App.cancel_keys, (cancel_pid, cancel_key)
    cdef str _addr_text                 # addr_text, once the transport has told it

    def __init__(self, app, str listener_kind not None):
        global _client_serial
        cdef KnownLogins logins = app.known_logins  # with the settings of the configuration
        _client_serial += 1
        self.app = app
        # Unique across worker processes: SHOW CLIENTS merges them and KILL_CLIENT takes one.
        self.id = _client_serial * logins._worker_count + logins._worker_index
        self.listener_kind = listener_kind
        self.state = _LOGIN
        self.user = self.database = ""
        self.params = {}
        self.startup_params = {}
        self.protocol_version = PROTOCOL_3_0
        self.cancel_key = b""
        self.connect_time = self.request_time = _wall()
        self.created = self.last_active = _monotonic()
        self.max_packet = logins._max_packet
        self.buffer_size = logins._buffer_size
        self.startup_phase = True
        self.batch_output = True
        # No TLS to offer: the codec answers SSLRequest 'N' itself. A startup packet it
        # knows is logged in without calling on_message (KnownLogins).
        self.refuse_encryption = listener_kind == "unix" or not logins._tls_offered
        self.known_logins = logins

    def __repr__(self):
        return self._log_name()

    cdef str _log_name(self):
        """How log lines name the client, as PgBouncer does: ``C-0x1a: db/user@addr``."""
        return (f"C-0x{self.id:x}: {self.database or '(nodb)'}/{self.user or '(nouser)'}"
                f"@{self._get_addr_text()}")

    @property
    def addr_text(self):
        """The client's address in log lines and SHOW CLIENTS."""
        return self._get_addr_text()

    cdef str _get_addr_text(self):
        if self._addr_text is not None:
            return self._addr_text
        if self.listener_kind == "unix":
            text = "unix(%d):%s" % (getpid(), self.app.config.pgbouncer.listen_port)
        else:
            addr = (<object>self).addr
            text = f"{addr[0]}:{addr[1]}"
        if self.transport is not None:
            self._addr_text = text
        return text

    cdef int _log_login(self) except -1:
        _log_line(f"{self._log_name()} login attempt: db={self.database} user={self.user} "
                  f"tls={getattr(self, 'tls', '') or 'no'}")
        return 0

    cdef int _log_closing(self) except -1:
        reason = getattr(self, "_close_reason", "") or "client close request"
        _log_line(f"{self._log_name()} closing because: {reason} "
                  f"(age={<long long>(_monotonic() - self.created)}s)")
        return 0

    # A SocketTransport calls _connection_made/_connection_lost directly: subclasses hook
    # into session_lost() rather than overriding these.
    def connection_made(self, transport):
        self._connection_made(transport)

    cdef int _connection_made(self, transport) except -1:
        self._attach(transport)
        self.known_logins._clients.add(self)
        self.known_logins._login_clients.add(self)
        return 0

    def connection_lost(self, exc):
        self._connection_lost(exc)

    cdef int _connection_lost(self, exc) except -1:
        """The socket has closed: leave the pool and App's registry. The common end (a
        logged-in client with no server) runs no Python; a server to give back or a login
        to stop goes through the subclass's session_lost() first."""
        cdef KnownLogins registry = self.known_logins
        self._stop_direct_io()
        self._resume_paused_peer()
        self.closed = True
        self._release_buffer()
        app = self.app
        if self.server is not None or self.state != _AFTER_LOGIN:
            (<object>self).session_lost()
        if registry._log_disconnections and self.state != _LOGIN:
            self._log_closing()
        pool = self.pool
        if pool is not None:
            (<PoolCore?>pool.core)._forget_client(self)
        registry._clients.discard(self)
        registry._login_clients.discard(self)
        if self._cancel_entry is not None:
            registry._cancel_keys.pop(self._cancel_entry, None)
        if registry._flags.shutting_down:
            app.janitor.check_shutdown()
        return 0


@cython.final
cdef class KnownLogin:
    """What a client logged in to: its pool (None on the admin console), the greeting it got
    and the parameters it sent. The end of every login (KnownLogins.enter) works from it; a
    login that needed no step that waits is remembered by its startup packet, for the next
    client that sends the same bytes."""

    cdef readonly object pool
    # The pool's parts a login uses, taken when it is made: a configuration change, which
    # may change them, forgets every remembered login (KnownLogins.configure).
    cdef PoolCore _core
    cdef set _pool_clients
    cdef bytes _relay_actions
    cdef bint _maps_statements
    cdef readonly str user
    cdef readonly str database
    cdef readonly dict startup_params     # shared by its clients: never changed after login
    cdef readonly int protocol_version
    cdef readonly dict tracked            # the greeting's parameters: each client a copy
    cdef readonly bytes greeting          # AuthenticationOk and ParameterStatus messages
    cdef readonly object signature        # interned tracked values (param_sig), or None
    # max_db_client_connections or max_user_client_connections apply (counted in Python).
    cdef readonly bint has_client_limits

    def __init__(self, pool, str user not None, str database not None,
                 dict startup_params not None, int protocol_version, dict tracked not None,
                 bytes greeting not None, signature=None):
        self.pool = pool
        if pool is not None:
            self._core = pool.core
            self._pool_clients = pool.clients
            self._relay_actions = pool.client_relay_actions
            _check_actions(self._relay_actions)
            self._maps_statements = pool.prepared_limit > 0
            self.has_client_limits = (pool.settings.max_db_client_connections > 0
                                      or pool.settings.max_user_client_connections > 0)
        self.user = user
        self.database = database
        self.startup_params = startup_params
        self.protocol_version = protocol_version
        self.tracked = tracked
        self.greeting = greeting
        self.signature = signature


@cython.final
cdef class KnownLogins:
    """The end of a client's login, and the startup packets that logged in at once (trust or
    any, the pool's greeting known): the next client sending the same bytes (every pgbench
    -C connection, an application's pool filling up) logs in here, in the codec's reading
    of its startup packet, with no Python frame. The checks that can change from one
    connection to the next are made again; when one fails, or the packet is new, the client
    takes Python's path (ClientConnection._startup_packet).

    It keeps App's client registry (clients, login_clients, cancel_keys) for the clients'
    accept, login and close (ClientRelay), and reads App's settings by their names. App
    forgets every packet when the configuration or the auth_file changes."""

    cdef object _app
    # App's client registry and the sets logins check: made with App, never replaced.
    cdef set _clients
    cdef set _login_clients
    cdef dict _cancel_keys          # (pid, key) -> client
    cdef set _disabled_databases
    cdef WorkerFlags _flags
    cdef dict _by_packet
    cdef bytes _last_packet         # the packet of the last login taken from _by_packet,
    cdef KnownLogin _last_login     # and that login: compared before a lookup
    cdef object _direct_io
    cdef int _direct_after_reads
    # Settings of the current configuration and worker (configure()).
    cdef readonly Py_ssize_t client_limit      # max_client_conn, this worker's share
    cdef long long _max_packet                 # a client's max_packet_size
    cdef Py_ssize_t _buffer_size               # a client's read buffer
    cdef int _worker_index
    cdef int _worker_count
    cdef bint _tls_offered
    cdef bint _tls_required
    cdef bint _log_connections
    cdef bint _log_disconnections
    cdef readonly unsigned long long used   # logins that took a remembered packet's path

    def __cinit__(self, app, direct_io, int direct_after_reads):
        self._app = app
        self._clients = app.clients
        self._login_clients = app.login_clients
        self._cancel_keys = app.cancel_keys
        self._disabled_databases = app.disabled_databases
        self._flags = app.flags
        self._by_packet = {}
        self._direct_io = direct_io
        self._direct_after_reads = direct_after_reads

    def __len__(self):
        return len(self._by_packet)

    def remember(self, bytes packet not None, KnownLogin login not None):
        if len(self._by_packet) >= KNOWN_LOGINS_MAX:
            self._forget()
        self._by_packet[packet] = login
        self._last_packet = self._last_login = None  # it may have been this packet's

    def forget_all(self):
        self._forget()

    cdef void _forget(self) noexcept:
        self._by_packet.clear()
        self._last_packet = None
        self._last_login = None

    def configure(self, app, Py_ssize_t client_limit, long long max_packet,
                  Py_ssize_t buffer_size):
        """Take up App's current configuration and worker number (start, RELOAD, SET,
        becoming a worker) with the client settings worked out from it (this worker's share
        of max_client_conn, max_packet_size, the read buffer size): the remembered logins
        were made under the old one and are forgotten."""
        self._forget()
        self.client_limit = client_limit
        self._max_packet = max_packet
        self._buffer_size = buffer_size
        self._worker_index = app.worker_index
        self._worker_count = app.worker_count
        self._tls_offered = app.tls.client is not None
        self._tls_required = app.tls.client_tls_required
        self._log_connections = app.config.pgbouncer.log_connections
        self._log_disconnections = app.config.pgbouncer.log_disconnections

    def enter(self, ClientRelay client not None, KnownLogin login not None):
        """Greet the client (AuthenticationOk, ParameterStatus, BackendKeyData,
        ReadyForQuery), register its cancel key and, for a pool, start relaying: the end of
        every login. The admin console then sets its own actions and resumes."""
        self._enter(client, login)

    cdef int _enter(self, ClientRelay client, KnownLogin login) except -1:
        cdef bytes key
        cdef uint32_t pid
        cdef int key_length = LONG_CANCEL_KEY_BYTES if login.protocol_version >= PROTOCOL_3_2 else 4
        cdef bytes out
        cdef unsigned char* p
        cdef Py_ssize_t greeting_size
        pool = login.pool
        client.pool = pool
        client.params = login.tracked.copy()
        key = _new_cancel_key(self._worker_index, key_length, &pid)
        client.cancel_pid = pid
        client.cancel_key = key
        # The greeting, BackendKeyData and ReadyForQuery 'I': one write, one send().
        greeting_size = len(login.greeting)
        out = PyBytes_FromStringAndSize(NULL, greeting_size + 9 + key_length + 6)
        p = <unsigned char*><char*>out
        memcpy(p, <char*>login.greeting, greeting_size)
        p += greeting_size
        p[0] = ord("K")
        _put32(p + 1, 4 + 4 + key_length)
        _put32(p + 5, pid)
        memcpy(p + 9, <char*>key, key_length)
        memcpy(p + 9 + key_length, b"Z\0\0\0\x05I", 6)
        if client._socket is not None:
            client._socket._write_bytes(<char*>out, len(out))
        else:
            client._own_write(out)
        # Until its first query the client needs no read buffer (most idle clients never
        # send one for long): the next read allocates it again.
        client._release_buffer()
        client.state = _AFTER_LOGIN
        client.last_active = _monotonic()
        self._login_clients.discard(client)
        client._cancel_entry = (client.cancel_pid, key)
        self._cancel_keys[client._cancel_entry] = client
        if self._log_connections:
            client._log_login()
        if pool is None:
            return 0
        if login._maps_statements:
            client.maps_statements = True
            # Parse/Bind are rewritten whole, so they may be as large as any message.
            client.max_inspect = client.max_packet
        # Parameters known in C let the codec link the first transaction too (Pool._link).
        client.param_sig = login.signature
        client.pool_core = login._core
        login._pool_clients.add(client)
        _use_actions(client, login._relay_actions)
        if client._socket is None:  # a SocketTransport's socket is the codec's already
            client.enable_direct_io(self._direct_io, self._direct_after_reads)
        client.held = False
        if not client._processing:
            client._process()
        return 0

    cdef bint _login(self, ClientRelay client, const unsigned char* packet,
                     Py_ssize_t size) except -1:
        """Log the client in as an earlier client with the same startup packet was, after
        the checks ClientConnection makes on every login; False leaves it to Python."""
        cdef KnownLogin login = self._last_login
        cdef bytes last = self._last_packet
        if (login is None or len(last) != size
                or memcmp(<const char*>last, packet, size) != 0):
            # Not the packet of the last known login (a pool filling up and pgbench -C send
            # the same one again and again): look it up.
            last = PyBytes_FromStringAndSize(<char*>packet, size)
            found = self._by_packet.get(last)
            if found is None:
                return False
            login = <KnownLogin>found
            self._last_packet = last
            self._last_login = login
        app = self._app
        pool = login.pool
        # The checks of ClientConnection's own path, each asked of Python only when it may
        # refuse: a shutdown or too many clients, client limits, TLS required.
        if (login.database in self._disabled_databases
                or ((self._flags.shutting_down or len(self._clients) > self.client_limit)
                    and app.admission_error(client) is not None)
                or (login.has_client_limits and app.client_limit_error(pool) is not None)
                or (self._tls_required and (<object>client).tls_missing())):
            return False
        self.used += 1
        client.startup_phase = False
        client.protocol_version = login.protocol_version
        client.startup_params = login.startup_params
        client.user = login.user
        client.database = login.database
        self._enter(client, login)
        return True


# -- message builders (the messages the proxy itself sends) ----------------------------

cdef inline bytes _int32(long long value):
    return (value & 0xFFFFFFFF).to_bytes(4, "big")


cpdef bytes message(unsigned char msg_type, bytes body):
    """A typed message: type byte, length, body."""
    return bytes((msg_type,)) + _int32(len(body) + 4) + body


cdef bytes _cstr(value):
    if isinstance(value, str):
        value = (<str>value).encode()
    return value + b"\0"


def error_response(str severity, str sqlstate, str text, detail=None, hint=None, *, bint notice=False):
    """ErrorResponse ('E') or NoticeResponse ('N') with PostgreSQL's standard fields."""
    parts = [b"S", _cstr(severity), b"V", _cstr(severity), b"C", _cstr(sqlstate), b"M", _cstr(text)]
    if detail:
        parts += [b"D", _cstr(detail)]
    if hint:
        parts += [b"H", _cstr(hint)]
    parts.append(b"\0")
    return message(78 if notice else 69, b"".join(parts))


def authentication(int code, bytes data=b""):
    """Authentication* ('R'): 0 ok, 3 cleartext, 5 md5 (data = salt), 10/11/12 SASL."""
    return message(82, _int32(code) + data)


def auth_sasl(mechanisms):
    return authentication(10, b"".join(_cstr(m) for m in mechanisms) + b"\0")


def parameter_status(name, value):
    return message(83, _cstr(name) + _cstr(value))


def ready_for_query(status):
    if isinstance(status, str):
        status = ord(status)
    return message(90, bytes((status,)))


def row_description(columns):
    """RowDescription for text-format columns: [(name, type_oid), ...]."""
    parts = [len(columns).to_bytes(2, "big")]
    for name, type_oid in columns:
        parts.append(_cstr(name))
        parts.append(b"\0\0\0\0\0\0" + _int32(type_oid) + b"\xff\xff\xff\xff\xff\xff\0\0")
    return message(84, b"".join(parts))


def data_row(values):
    """DataRow in text format; None is NULL."""
    parts = [len(values).to_bytes(2, "big")]
    for value in values:
        if value is None:
            parts.append(b"\xff\xff\xff\xff")
            continue
        if not isinstance(value, bytes):
            value = str(value).encode()
        parts.append(_int32(len(value)))
        parts.append(value)
    return message(68, b"".join(parts))


def command_complete(tag):
    return message(67, _cstr(tag))


def empty_query_response():
    return message(73, b"")


def query(sql):
    return message(81, _cstr(sql))


def terminate():
    return message(88, b"")


def password_message(bytes data):
    return message(112, data)


def sasl_initial_response(mechanism, bytes data):
    return message(112, _cstr(mechanism) + _int32(len(data)) + data)


def startup_message(dict params, int version=196608):
    body = _int32(version) + b"".join(_cstr(k) + _cstr(v) for k, v in params.items()) + b"\0"
    return _int32(len(body) + 4) + body

