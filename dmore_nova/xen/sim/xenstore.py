"""The simulated xenstore: the tree, permissions, transactions, watches and quotas of Xen's C
``xenstored`` (``tools/xenstore/xenstored_*.c`` in Xen 4.17), with no I/O at all.

Why a faithful copy and not a dict: the RM VM's backends must pass on real Xen after passing on
the sim, and the xenbus handshake leans on exactly the corners a toy store gets wrong -- parents
created implicitly with inherited permissions, ``EACCES`` vs ``ENOENT`` depending on what the
parent lets you see, watches firing once on registration and again for children and removed
subtrees, ``EAGAIN`` on transaction conflicts, quota errors for unprivileged domains, and who is
told about ``@releaseDomain``.  Each rule below names the C function it mirrors.

Shape (sans-IO, the h11 way): a :class:`Xenstore` holds the nodes and the domain table; every
client is a :class:`Connection` (a unix-socket client of ``xenstored``, or a domain's xenbus
ring).  Bytes never appear here except as :class:`~dmore_nova.xen.io.xs_wire.Message`:
:meth:`Connection.handle` takes one request and appends the reply -- and the watch events it
causes on *any* connection -- to the connections' :attr:`Connection.outbox`, calling their
``notify`` hook; the transport (``xenstored.py``) turns that into socket writes.  The same
operations are offered as plain methods (``conn.write(path, value)``) for in-process users such
as the sim supervisor; they raise :class:`XsError`.

Deliberate differences from C xenstored (all of them stricter or simpler, none visible to a
correct client):

* numbers in requests (domids, ports, offsets, permission ids) must be plain decimal; C uses
  ``atoi``/``strtol`` and silently reads garbage as 0;
* permission entries naming a domain that does not exist are dropped instead of being kept with
  ``XS_PERM_IGNORE`` (``domain_alloc_permrefs``); when a domain is released, entries naming it
  are dropped from every node (C ignores them lazily by comparing generation counts);
* the per-domain *memory* quota, the outstanding-request quota, the write rate limit and the
  20 s watch-event timeout are not modelled; node counts, node size, watches, transactions,
  transaction nodes, permissions per node and path length are (:class:`Quotas`).
* where C's quota checks are off by one (``count > max`` before adding one more watch or
  transaction), the sim allows exactly ``max``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from dmore_nova.xen.api import XenError
from dmore_nova.xen.io.xs_wire import (
    ACK,
    DOMID_SELF,
    XENSTORE_ABS_PATH_MAX,
    XENSTORE_PAYLOAD_MAX,
    XENSTORE_REL_PATH_MAX,
    XSD_ERROR_NAMES,
    Message,
    XsdSockmsgType,
    errno_of,
    pack_error,
    pack_watch_event,
    unpack_strings,
    unpack_write,
)

__all__ = [
    "DOMID_FIRST_RESERVED",
    "NO_GENERATION",
    "SPECIAL_INTRODUCE",
    "SPECIAL_RELEASE",
    "XS_PERM_NONE",
    "XS_PERM_OWNER",
    "XS_PERM_READ",
    "XS_PERM_WRITE",
    "Connection",
    "Node",
    "Perm",
    "Quotas",
    "XsError",
    "Xenstore",
    "get_parent",
]

LOG = logging.getLogger(__name__)

T = XsdSockmsgType

# enum xs_perm_type (xenstore_lib.h); OWNER is internal (never on the wire).
XS_PERM_NONE = 0
XS_PERM_READ = 1
XS_PERM_WRITE = 2
XS_PERM_OWNER = 8
_PERM_ALL = XS_PERM_READ | XS_PERM_WRITE | XS_PERM_OWNER
_PERM_LETTER = {XS_PERM_NONE: "n", XS_PERM_READ: "r", XS_PERM_WRITE: "w",
                XS_PERM_READ | XS_PERM_WRITE: "b"}
_LETTER_PERM = {v: k for k, v in _PERM_LETTER.items()}

#: ``DOMID_FIRST_RESERVED`` (xen.h): domids at or above are not domains.
DOMID_FIRST_RESERVED = 0x7FF0
#: The generation of a node that does not exist (C: ``NO_GENERATION``, ``~0ULL``).
NO_GENERATION = -1

SPECIAL_INTRODUCE = "@introduceDomain"
SPECIAL_RELEASE = "@releaseDomain"

#: Size terms of a node as the C daemon accounts it against the node-size quota: the database
#: record header (``struct xs_tdb_record_hdr``: u64 generation + three u32, padded to 24) and
#: one ``struct xs_permissions`` (perm + id) per permission entry.
NODE_RECORD_HEADER_SIZE = 24
XS_PERMISSIONS_SIZE = 8

_VALID_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-/_@")
_U32_MAX = 0xFFFFFFFF


class XsError(XenError):
    """A xenstore operation failed with one of the wire's error names (``xsd_errors``)."""

    def __init__(self, name: str, detail: str = "") -> None:
        if name not in XSD_ERROR_NAMES:
            raise ValueError(f"{name} is not an xsd_errors name")
        super().__init__(errno_of(name), f"{name}: {detail}" if detail else name)
        self.name = name


@dataclass(frozen=True)
class Quotas:
    """Per-domain limits of C xenstored (``hard_quotas[]`` in ``xenstored_domain.c``, the
    ``-E/-S/-W/-t/-A/-M/-Q`` options).  They bind unprivileged domains only, as in C; the
    errors are C's."""

    #: ``nodes``: nodes owned by one domain (``-E``).  ENOSPC.
    max_nodes_per_domain: int = 1000
    #: ``node-size``: record size of one node (header + perms + value + child names).  ENOSPC.
    #: C's default is 2048; the longest value a domU can write is therefore a bit under 2 KiB.
    max_node_size: int = 2048
    #: ``watches`` per domain (``-W``).  E2BIG.
    max_watches_per_domain: int = 128
    #: ``transactions`` open at once per domain (``-t``).  ENOSPC.
    max_transactions_per_domain: int = 10
    #: ``transaction-nodes``: distinct nodes one transaction may touch.  ENOSPC.
    max_transaction_nodes: int = 1024
    #: ``node-permissions`` entries per node (``-A``).  ENOSPC.
    max_perms_per_node: int = 5
    #: ``path-max``: path length below ``/local/domain/<domid>/`` (``-M``).  EINVAL.
    max_path_length: int = XENSTORE_REL_PATH_MAX
    #: Largest request payload the transport accepts; a longer one breaks the connection's
    #: framing and the connection is dropped (C: ``handle_input``).  The protocol's limit is
    #: ``XENSTORE_PAYLOAD_MAX``; lowering it makes correct clients fail, so only for tests.
    max_request_size: int = XENSTORE_PAYLOAD_MAX
    #: Messages a connection may have queued and not yet taken by its transport; beyond that
    #: the connection is closed (C bounds this with its memory quota).  All connections.
    max_queued_messages: int = 65536


@dataclass(frozen=True, slots=True)
class Perm:
    """One ``struct xs_permissions``: ``domid`` gets ``perms`` (``XS_PERM_*``).  In a node's
    list the first entry names the owner, and its ``perms`` are what everybody not listed
    gets."""

    domid: int
    perms: int

    def __str__(self) -> str:
        return f"{_PERM_LETTER[self.perms & (XS_PERM_READ | XS_PERM_WRITE)]}{self.domid}"

    @classmethod
    def parse(cls, text: str | bytes) -> Perm:
        """``"r5"``/``"w5"``/``"b5"``/``"n5"`` (``xenstore_strings_to_perms``); EINVAL else."""
        if isinstance(text, bytes):
            try:
                text = text.decode("ascii")
            except UnicodeDecodeError:
                raise XsError("EINVAL", "permission is not ASCII") from None
        if len(text) < 2 or text[0] not in _LETTER_PERM or not text[1:].isdigit() \
                or not text[1:].isascii() or len(text) > 11:
            raise XsError("EINVAL", f"bad permission {text!r}")
        domid = int(text[1:])
        if domid > _U32_MAX:
            raise XsError("EINVAL", f"bad permission {text!r}")
        return cls(domid, _LETTER_PERM[text[0]])


@dataclass(frozen=True, slots=True)
class Node:
    """A node as stored: immutable, so transactions can share unmodified ones."""

    value: bytes
    perms: tuple[Perm, ...]
    children: tuple[str, ...] = ()
    generation: int = 0

    @property
    def owner(self) -> int:
        return self.perms[0].domid

    @property
    def size(self) -> int:
        """What the node-size quota measures (see :data:`NODE_RECORD_HEADER_SIZE`)."""
        return (NODE_RECORD_HEADER_SIZE + XS_PERMISSIONS_SIZE * len(self.perms) + len(self.value)
                + sum(len(c) + 1 for c in self.children))


def get_parent(name: str) -> str:
    """``get_parent``: everything before the last slash; ``/`` for top-level and special
    (``@...``) names."""
    slash = name.rfind("/", 1)
    return name[:slash] if slash > 0 else "/"


def _basename(name: str) -> str:
    return name[name.rfind("/") + 1:]


def _child_name(parent: str, child: str) -> str:
    return f"/{child}" if parent == "/" else f"{parent}/{child}"


def _is_child(child: str, parent: str) -> bool:
    """``is_child`` (watch.c): ``child`` is ``parent`` or below it; everything is below ``/``
    (including special names: a C quirk kept on purpose)."""
    if parent == "/":
        return True
    return child.startswith(parent) and (len(child) == len(parent) or child[len(parent)] == "/")


def _domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def _parse_uint(raw: bytes, what: str, limit: int = _U32_MAX) -> int:
    if not raw or len(raw) > 10 or not raw.isdigit():
        raise XsError("EINVAL", f"{what} {raw!r} is not a decimal number")
    value = int(raw)
    if value > limit:
        raise XsError("EINVAL", f"{what} {value} out of range")
    return value


def _onearg(payload: bytes) -> bytes:
    """``onearg``: the payload must be exactly one nul-terminated string."""
    if not payload or payload.find(b"\x00") != len(payload) - 1:
        raise XsError("EINVAL", "expected exactly one nul-terminated argument")
    return payload[:-1]


@dataclass(eq=False)
class Watch:
    node: str           #: canonical (absolute or special) path
    token: bytes
    prefix_len: int     #: chars to strip from event paths (relative watches), as C

    def event_path(self, name: str) -> str:
        return name[self.prefix_len:]


@dataclass(eq=False)
class Transaction:
    """C's generation-count transactions (``xenstored_transaction.c``).

    Reads of nodes not yet touched go to the live tree and record the generation seen; writes
    go to a private overlay.  At commit every touched node must still have the recorded
    generation in the live tree, otherwise the commit fails with ``EAGAIN`` and nothing is
    applied.  So a committed transaction behaves as if it ran alone at its commit point."""

    id: int
    conn: Connection
    generation: int
    overlay: dict[str, Node | None] = field(default_factory=dict)
    #: first-access generation of every touched node (insertion order = C's accessed list)
    accessed: dict[str, int] = field(default_factory=dict)
    first_perms: dict[str, tuple[Perm, ...]] = field(default_factory=dict)
    #: path -> exact flag of the watch to fire at commit (``queue_watches``)
    watches: dict[str, bool] = field(default_factory=dict)
    node_delta: collections.Counter[int] = field(default_factory=collections.Counter)
    node_created: bool = False
    fail: bool = False


@dataclass(eq=False)
class _Domain:
    domid: int
    introduced: bool = True
    shutdown: bool = False
    target: int | None = None


class Connection:
    """One xenstore client: a unix-socket client (``domain_conn=False``; C's socket
    connections) or a domain's xenbus ring (``domain_conn=True``).  ``domid`` decides
    permissions and quotas; a socket connection of domid 0 is the toolstack.

    Output: replies and watch events are appended to :attr:`outbox` and ``notify()`` is called;
    whoever owns the connection drains the outbox.  ``on_close(reason)`` is called once if the
    store closes the connection (domain released, output overflow).
    """

    def __init__(self, store: Xenstore, domid: int, *, privileged: bool, domain_conn: bool,
                 notify: Callable[[], None] | None,
                 on_close: Callable[[str], None] | None, label: str, seq: int) -> None:
        self.store = store
        self.seq = seq
        self.domid = domid
        self.privileged = privileged
        self.domain_conn = domain_conn
        self.notify = notify
        self.on_close = on_close
        self.label = label
        self.watches: list[Watch] = []
        self.transactions: dict[int, Transaction] = {}
        self.outbox: collections.deque[Message] = collections.deque()
        self.closed = False
        self.close_reason: str | None = None
        self._next_tx_id = 1

    def __repr__(self) -> str:
        return f"<xenstore Connection {self.label} dom{self.domid}>"

    @property
    def unprivileged(self) -> bool:
        """``domain_is_unprivileged``: everyone but dom0 and explicitly privileged clients."""
        return not self.privileged

    @property
    def implicit_path(self) -> str:
        """``get_implicit_path``: where relative paths are rooted."""
        return _domain_path(self.domid)

    # -- output --------------------------------------------------------------------------

    def _enqueue(self, msg: Message) -> None:
        if self.closed:
            return
        if len(self.outbox) >= self.store.quotas.max_queued_messages:
            self.store._close_connection(self, "output queue overflow (client not reading)")
            return
        self.outbox.append(msg)
        if self.notify is not None:
            self.notify()

    def _send_event(self, path: str, token: bytes) -> None:
        payload = pack_watch_event(path, token)
        # send_event: "Don't try to send over-long events."
        if len(payload) <= XENSTORE_PAYLOAD_MAX:
            self._enqueue(Message(T.XS_WATCH_EVENT, 0, 0, payload))

    def take_events(self) -> list[tuple[str, bytes]]:
        """Pop the queued watch events (for in-process users, whose outbox holds only
        events): ``(path, token)`` pairs in order."""
        events: list[tuple[str, bytes]] = []
        keep: collections.deque[Message] = collections.deque()
        while self.outbox:
            msg = self.outbox.popleft()
            if msg.type == T.XS_WATCH_EVENT:
                path, token = msg.payload[:-1].split(b"\x00", 1)
                events.append((path.decode("ascii"), token))
            else:
                keep.append(msg)
        self.outbox = keep
        return events

    # -- the wire ------------------------------------------------------------------------

    def handle(self, msg: Message) -> None:
        """Process one request (``process_message``); never raises."""
        if self.closed:
            return
        entry = _WIRE.get(msg.type)
        if entry is None:
            LOG.debug("%r: unknown operation %d", self, msg.type)
            self._enqueue(msg.reply(T.XS_ERROR, pack_error("ENOSYS")))
            return
        func, flags = entry
        try:
            if flags & _PRIV and self.unprivileged:
                raise XsError("EACCES", "privileged operation")
            tx = None if flags & _NOTID else self._lookup_tx(msg.tx_id)
            reply = func(self, tx, msg)
        except XsError as e:
            self._enqueue(msg.reply(T.XS_ERROR, pack_error(e.name)))
            return
        except Exception:  # a bug here must not take the daemon down with it
            LOG.exception("%r: internal error handling %s", self, msg.type_name)
            self._enqueue(msg.reply(T.XS_ERROR, pack_error("EIO")))
            return
        if reply is None:
            return
        if len(reply.payload) > XENSTORE_PAYLOAD_MAX:
            reply = msg.reply(T.XS_ERROR, pack_error("E2BIG"))
        self._enqueue(reply)

    def _lookup_tx(self, tx_id: int) -> Transaction | None:
        """``transaction_lookup``: 0 is "no transaction", an unknown id is ENOENT."""
        if tx_id == 0:
            return None
        tx = self.transactions.get(tx_id)
        if tx is None:
            raise XsError("ENOENT", f"no transaction {tx_id}")
        return tx

    # -- in-process API (raises XsError) -------------------------------------------------------

    def read(self, path: str | bytes, tx_id: int = 0) -> bytes:
        return self.store._read_op(self, self._lookup_tx(tx_id), path)

    def write(self, path: str | bytes, value: bytes | str, tx_id: int = 0) -> None:
        if isinstance(value, str):
            value = value.encode()
        self.store._write_op(self, self._lookup_tx(tx_id), path, bytes(value))

    def mkdir(self, path: str | bytes, tx_id: int = 0) -> None:
        self.store._mkdir_op(self, self._lookup_tx(tx_id), path)

    def rm(self, path: str | bytes, tx_id: int = 0) -> None:
        self.store._rm_op(self, self._lookup_tx(tx_id), path)

    def directory(self, path: str | bytes, tx_id: int = 0) -> list[str]:
        return list(self.store._directory_op(self, self._lookup_tx(tx_id), path))

    def get_perms(self, path: str | bytes, tx_id: int = 0) -> list[str]:
        return [str(p) for p in self.store._get_perms_op(self, self._lookup_tx(tx_id), path)]

    def set_perms(self, path: str | bytes, perms: Sequence[str | bytes], tx_id: int = 0) -> None:
        self.store._set_perms_op(self, self._lookup_tx(tx_id), path, list(perms))

    def watch(self, path: str | bytes, token: str | bytes) -> None:
        """Add a watch; its registration event is queued right away (as after the ack)."""
        watch = self.store._watch_op(self, path, _token(token))
        self._send_event(watch.event_path(watch.node), watch.token)

    def unwatch(self, path: str | bytes, token: str | bytes) -> None:
        self.store._unwatch_op(self, path, _token(token))

    def reset_watches(self) -> None:
        self.store._reset_watches(self)

    def transaction_start(self) -> int:
        return self.store._transaction_start(self, None)

    def transaction_end(self, tx_id: int, commit: bool = True) -> None:
        """End a transaction; ``XsError('EAGAIN')`` if a commit lost a race (the
        transaction is gone either way, as in C)."""
        tx = self._lookup_tx(tx_id)
        if tx is None:
            raise XsError("ENOENT", "no transaction")
        self.store._transaction_end(self, tx, commit)

    def get_domain_path(self, domid: int) -> str:
        return _domain_path(domid)

    def close(self, reason: str = "closed by owner") -> None:
        """Disconnect: watches and transactions go away (``destroy_conn``)."""
        self.store.disconnect(self, reason)


def _token(token: str | bytes) -> bytes:
    b = token.encode() if isinstance(token, str) else bytes(token)
    if b"\x00" in b:
        raise XsError("EINVAL", "nul in watch token")
    return b


class Xenstore:
    """The store and its domain table.  ``domain_exists(domid)`` answers what the hypervisor
    would (``xc_domain_getinfo``) when a permission names a domain; the sim supervisor passes
    its own, the default accepts any domid below ``DOMID_FIRST_RESERVED``.  ``keep_orphans``
    is C's ``-K``: on domain release, move the domain's nodes to dom0 instead of deleting them.
    """

    def __init__(self, quotas: Quotas | None = None, *,
                 domain_exists: Callable[[int], bool] | None = None,
                 keep_orphans: bool = False) -> None:
        self.quotas = quotas or Quotas()
        self.keep_orphans = keep_orphans
        self._domain_exists = domain_exists or (lambda d: 0 <= d < DOMID_FIRST_RESERVED)
        self._nodes: dict[str, Node] = {}
        self._node_count: collections.Counter[int] = collections.Counter()
        self._generation = 0
        self._connections: dict[int, Connection] = {}
        self._conn_seq = 0
        self._domains: dict[int, _Domain] = {0: _Domain(0)}
        self._dom0: Connection | None = None
        #: Called with the domid after a domain was released (by ``XS_RELEASE`` or the API),
        #: e.g. so the daemon can stop listening on the domain's socket.
        self.release_hooks: list[Callable[[int], None]] = []
        # setup_structure(): the initial tree and the special nodes, owned by dom0, "n0".
        none0 = (Perm(0, XS_PERM_NONE),)
        for name, children in (("/", ("tool",)), ("/tool", ("xenstored",)),
                               ("/tool/xenstored", ()), (SPECIAL_RELEASE, ()),
                               (SPECIAL_INTRODUCE, ())):
            self._store_global(name, Node(b"", none0, children, self._next_gen()))

    # -- connections ---------------------------------------------------------------------------

    def connect(self, domid: int = 0, *, privileged: bool | None = None,
                domain_conn: bool = False, notify: Callable[[], None] | None = None,
                on_close: Callable[[str], None] | None = None, label: str = "") -> Connection:
        """A new client acting as ``domid``.  ``privileged`` defaults to ``domid == 0``
        (``priv_domid``); a domain connection (``domain_conn=True``, a guest's xenbus ring)
        needs the domain to be introduced, as xenstored only talks to introduced domains."""
        if not 0 <= domid < DOMID_FIRST_RESERVED:
            raise ValueError(f"domid {domid} is not a domain")
        if domain_conn and not self.is_domain_introduced(domid):
            raise XsError("ENOENT", f"domain {domid} is not introduced")
        self._conn_seq += 1
        if privileged is None:
            privileged = domid == 0
        conn = Connection(self, domid, privileged=privileged, domain_conn=domain_conn,
                          notify=notify, on_close=on_close,
                          label=label or f"#{self._conn_seq}", seq=self._conn_seq)
        self._connections[conn.seq] = conn
        return conn

    def disconnect(self, conn: Connection, reason: str = "disconnected") -> None:
        """The client went away: drop its watches and transactions (``destroy_conn``)."""
        if conn.closed:
            return
        conn.closed = True
        conn.close_reason = reason
        conn.watches.clear()
        conn.transactions.clear()
        self._connections.pop(conn.seq, None)

    def _close_connection(self, conn: Connection, reason: str) -> None:
        if conn.closed:
            return
        LOG.warning("xenstore: closing %r: %s", conn, reason)
        self.disconnect(conn, reason)
        conn.outbox.clear()
        if conn.on_close is not None:
            conn.on_close(reason)

    @property
    def connections(self) -> list[Connection]:
        return list(self._connections.values())

    @property
    def dom0(self) -> Connection:
        """An in-process toolstack connection (dom0, privileged) for direct store access."""
        if self._dom0 is None or self._dom0.closed:
            self._dom0 = self.connect(0, label="in-process dom0")
        return self._dom0

    # -- node primitives -------------------------------------------------------------------

    def _next_gen(self) -> int:
        self._generation += 1
        return self._generation

    def _store_global(self, name: str, node: Node) -> None:
        old = self._nodes.get(name)
        if old is not None:
            self._node_count[old.owner] -= 1
        self._nodes[name] = node
        self._node_count[node.owner] += 1

    def _delete_global(self, name: str) -> None:
        old = self._nodes.pop(name, None)
        if old is not None:
            self._node_count[old.owner] -= 1

    def _touch(self, conn: Connection | None, tx: Transaction, name: str) -> None:
        """``access_node``: remember the first generation seen of ``name`` in ``tx``."""
        if name in tx.accessed:
            return
        if conn is not None and conn.unprivileged \
                and len(tx.accessed) + 1 > self.quotas.max_transaction_nodes:
            tx.fail = True
            raise XsError("ENOSPC", "too many nodes in one transaction")
        node = self._nodes.get(name)
        tx.accessed[name] = node.generation if node is not None else NO_GENERATION
        if node is not None:
            tx.first_perms[name] = node.perms

    def _get(self, conn: Connection | None, tx: Transaction | None, name: str) -> Node | None:
        """``read_node``: the node as ``tx`` sees it (recording the access), or ``None``."""
        if tx is None:
            return self._nodes.get(name)
        if name in tx.overlay:
            return tx.overlay[name]
        self._touch(conn, tx, name)
        return self._nodes.get(name)

    def _put(self, conn: Connection | None, tx: Transaction | None, name: str, node: Node) -> None:
        """``write_node``: store ``node`` with a fresh generation (in ``tx`` if given)."""
        node = dataclasses.replace(node, generation=self._next_gen())
        if tx is None:
            self._store_global(name, node)
            return
        old = self._get(conn, tx, name)
        if old is not None:
            tx.node_delta[old.owner] -= 1
        tx.node_delta[node.owner] += 1
        tx.overlay[name] = node

    def _remove(self, conn: Connection | None, tx: Transaction | None, name: str) -> None:
        if tx is None:
            self._generation += 1
            self._delete_global(name)
            return
        old = self._get(conn, tx, name)
        if old is not None:
            tx.node_delta[old.owner] -= 1
        tx.overlay[name] = None

    # -- permissions ---------------------------------------------------------------------------

    def _perm_for(self, conn: Connection, perms: tuple[Perm, ...]) -> int:
        """``perm_for_conn``: owners, privileged clients and domains targeting the owner get
        everything; else the first entry naming the domain (or its target); else the
        owner entry's perms, which are the default for everybody."""
        dom = self._domains.get(conn.domid)
        target = dom.target if dom is not None else None
        if conn.privileged or perms[0].domid == conn.domid \
                or (target is not None and perms[0].domid == target):
            return _PERM_ALL
        for p in perms[1:]:
            if p.domid == conn.domid or (target is not None and p.domid == target):
                return p.perms
        return perms[0].perms

    def _canonicalize(self, conn: Connection, raw: str | bytes | None,
                      allow_special: bool = False) -> str:
        """``canonicalize``: validate and make absolute.  EINVAL for bad characters, a
        special name where none is allowed, a trailing or double slash, or a path too long
        (``XENSTORE_ABS_PATH_MAX`` overall; ``path-max`` below ``/local/domain/<id>/`` for
        unprivileged clients)."""
        if raw is None:
            raise XsError("EINVAL", "missing path")
        if isinstance(raw, str):
            try:
                raw = raw.encode("ascii")
            except UnicodeEncodeError:
                raise XsError("EINVAL", "path is not ASCII") from None
        if not _VALID_CHARS.issuperset(raw):
            raise XsError("EINVAL", f"invalid character in path {raw[:64]!r}")
        if len(raw) > XENSTORE_ABS_PATH_MAX:
            raise XsError("EINVAL", "path too long")
        path = raw.decode("ascii")
        if path.startswith("@"):
            if not allow_special:
                raise XsError("EINVAL", "special path not allowed here")
            name = path
        elif path.startswith("/"):
            name = path
        else:
            name = f"{conn.implicit_path}/{path}"
        if (name.endswith("/") and name != "/") or "//" in name:
            raise XsError("EINVAL", f"malformed path {name[:64]!r}")
        if len(name) > XENSTORE_ABS_PATH_MAX:
            raise XsError("EINVAL", "path too long")
        if conn.unprivileged:
            local_off = 0
            if name.startswith("/local/domain/"):
                rest = name[len("/local/domain/"):]
                slash = rest.find("/")
                if 0 < slash <= 5 and rest[:slash].isdigit():
                    local_off = len("/local/domain/") + slash + 1
            if len(name) - local_off > self.quotas.max_path_length:
                raise XsError("EINVAL", "path too long")
        return name

    def _lookup(self, conn: Connection, tx: Transaction | None, raw: str | bytes | None,
                perm: int, allow_special: bool = False) -> tuple[str, Node | None]:
        """``get_node`` + ``errno_from_parents``: the canonical name and the node if ``conn``
        has ``perm`` on it; ``(name, None)`` when the proper answer is ENOENT; EACCES when the
        node is there but forbidden, or when the nearest existing ancestor does not grant
        ``perm`` (so that absence of a node leaks nothing)."""
        name = self._canonicalize(conn, raw, allow_special)
        node = self._get(conn, tx, name)
        if node is not None and self._perm_for(conn, node.perms) & perm == perm:
            return name, node
        if self._ask_parents(conn, tx, name) & perm:
            if node is not None:
                raise XsError("EACCES", name)
            return name, None
        raise XsError("EACCES", name)

    def _ask_parents(self, conn: Connection, tx: Transaction | None, name: str) -> int:
        while True:
            name = get_parent(name)
            node = self._get(conn, tx, name)
            if node is not None:
                return self._perm_for(conn, node.perms)
            if name == "/":
                return XS_PERM_NONE

    def _check_size(self, conn: Connection | None, node: Node) -> None:
        if conn is not None and conn.unprivileged and node.size > self.quotas.max_node_size:
            raise XsError("ENOSPC", f"node of {node.size} bytes exceeds the node-size quota")

    def _nodes_of(self, conn: Connection, tx: Transaction | None) -> int:
        return self._node_count[conn.domid] + (tx.node_delta[conn.domid] if tx else 0)

    # -- watches -------------------------------------------------------------------------------

    def _watch_permitted(self, watcher: Connection, name: str, node: Node | None,
                         old_perms: tuple[Perm, ...] | None) -> bool:
        """``watch_permitted``: the watcher must be able to read the node (with its old or
        new permissions) or its parent."""
        if old_perms is not None and self._perm_for(watcher, old_perms) & XS_PERM_READ:
            return True
        if node is None:
            node = self._nodes.get(name)
            if node is None:
                return False
        if self._perm_for(watcher, node.perms) & XS_PERM_READ:
            return True
        parent = self._nodes.get(get_parent(name))
        return parent is not None and bool(self._perm_for(watcher, parent.perms) & XS_PERM_READ)

    def _fire(self, conn: Connection | None, tx: Transaction | None, name: str,
              node: Node | None, exact: bool, old_perms: tuple[Perm, ...] | None = None) -> None:
        """``fire_watches``: queue an event on every matching watch whose owner may see the
        change; inside a transaction, remember it for the commit (``queue_watches``: a
        non-exact event supersedes an exact one)."""
        if tx is not None:
            if name not in tx.watches or not exact:
                tx.watches[name] = exact
            return
        for watcher in list(self._connections.values()):
            if not watcher.watches or not self._watch_permitted(watcher, name, node, old_perms):
                continue
            for watch in list(watcher.watches):
                if (name == watch.node) if exact else _is_child(name, watch.node):
                    watcher._send_event(watch.event_path(name), watch.token)

    def _fire_special(self, name: str) -> None:
        node = self._nodes.get(name)
        if node is None:
            LOG.error("special node %s not found", name)
            return
        self._fire(None, None, name, node, exact=True)

    # -- operations ----------------------------------------------------------------------------

    def _read_op(self, conn: Connection, tx: Transaction | None, raw: str | bytes | None) -> bytes:
        name, node = self._lookup(conn, tx, raw, XS_PERM_READ)
        if node is None:
            raise XsError("ENOENT", name)
        return node.value

    def _directory_op(self, conn: Connection, tx: Transaction | None,
                      raw: str | bytes | None) -> tuple[str, ...]:
        name, node = self._lookup(conn, tx, raw, XS_PERM_READ)
        if node is None:
            raise XsError("ENOENT", name)
        return node.children

    def _directory_part(self, conn: Connection, tx: Transaction | None, raw: bytes,
                        offset: int) -> bytes:
        """``send_directory_part``: ``generation\\0`` then as many child names from byte
        ``offset`` of the child list as fit, and a final empty string once the list ends."""
        name, node = self._lookup(conn, tx, raw, XS_PERM_READ)
        if node is None:
            raise XsError("ENOENT", name)
        gen = f"{node.generation}".encode() + b"\x00"
        children = b"".join(c.encode() + b"\x00" for c in node.children)
        if offset >= len(children):
            return gen + b"\x00"
        maxlen = XENSTORE_PAYLOAD_MAX - len(gen) - 1
        length = 0
        while True:
            end = children.index(b"\x00", offset + length)
            child_len = end - (offset + length)
            if length + child_len >= maxlen:
                break
            length += child_len + 1
            if offset + length == len(children):
                break
        data = gen + children[offset:offset + length]
        if offset + length == len(children):
            data += b"\x00"
        return data

    def _get_perms_op(self, conn: Connection, tx: Transaction | None,
                      raw: str | bytes | None) -> tuple[Perm, ...]:
        name, node = self._lookup(conn, tx, raw, XS_PERM_READ, allow_special=True)
        if node is None:
            raise XsError("ENOENT", name)
        return node.perms

    def _create(self, conn: Connection, tx: Transaction | None, name: str,
                value: bytes) -> Node:
        """``construct_node`` + ``create_node``: make ``name`` and every missing ancestor,
        each inheriting its parent's permissions (an unprivileged creator becomes the owner).
        All checks (node quota, node size) happen before anything is stored, so a failure
        leaves the tree unchanged."""
        missing = [name]
        parent_name = get_parent(name)
        parent = self._get(conn, tx, parent_name)
        while parent is None:
            if parent_name == "/":
                raise XsError("EIO", "root node missing")
            missing.append(parent_name)
            parent_name = get_parent(parent_name)
            parent = self._get(conn, tx, parent_name)
        perms = parent.perms
        if conn.unprivileged:
            perms = (Perm(conn.domid, perms[0].perms),) + perms[1:]
        missing.reverse()  # top-down
        if conn.unprivileged and \
                self._nodes_of(conn, tx) + len(missing) > self.quotas.max_nodes_per_domain:
            raise XsError("ENOSPC", "node quota exceeded")
        new_parent = dataclasses.replace(
            parent, children=parent.children + (_basename(missing[0]),))
        self._check_size(conn, new_parent)
        planned: list[tuple[str, Node]] = [(parent_name, new_parent)]
        for i, n in enumerate(missing):
            kids = (_basename(missing[i + 1]),) if i + 1 < len(missing) else ()
            node = Node(value if n == name else b"", perms, kids)
            self._check_size(conn, node)
            planned.append((n, node))
        if tx is not None:
            tx.node_created = True
        for n, node in planned:
            self._put(conn, tx, n, node)
        return self._get(conn, tx, name)  # type: ignore[return-value]

    def _write_op(self, conn: Connection, tx: Transaction | None, raw: str | bytes | None,
                  value: bytes) -> None:
        name, node = self._lookup(conn, tx, raw, XS_PERM_WRITE)
        if node is None:
            node = self._create(conn, tx, name, value)
        else:
            node = dataclasses.replace(node, value=value)
            self._check_size(conn, node)
            self._put(conn, tx, name, node)
        self._fire(conn, tx, name, node, exact=False)

    def _mkdir_op(self, conn: Connection, tx: Transaction | None, raw: str | bytes | None) -> None:
        name, node = self._lookup(conn, tx, raw, XS_PERM_WRITE)
        if node is None:
            node = self._create(conn, tx, name, b"")
            self._fire(conn, tx, name, node, exact=False)

    def _rm_op(self, conn: Connection, tx: Transaction | None, raw: str | bytes | None) -> None:
        name, node = self._lookup(conn, tx, raw, XS_PERM_WRITE)
        if node is None:
            # "Didn't exist already?  Fine, if parent exists."
            if self._get(conn, tx, get_parent(name)) is not None:
                return
            raise XsError("ENOENT", name)
        if name == "/":
            raise XsError("EINVAL", "cannot remove the root")
        self._rm_node(conn, tx, name)

    def _rm_node(self, conn: Connection | None, tx: Transaction | None, name: str) -> None:
        """``rm_node``: delete the subtree bottom-up, firing exact watches for every removed
        descendant and a normal (parent-inclusive) watch for ``name`` itself, then unlink
        ``name`` from its parent."""
        parent_name = get_parent(name)
        parent = self._get(conn, tx, parent_name)
        if parent is None:
            raise XsError("EINVAL", f"parent of {name} missing")
        for path, node in self._postorder(conn, tx, name):
            self._fire(conn, tx, path, node, exact=(path != name))
            self._remove(conn, tx, path)
        base = _basename(name)
        parent = self._get(conn, tx, parent_name)
        assert parent is not None
        self._put(conn, tx, parent_name, dataclasses.replace(
            parent, children=tuple(c for c in parent.children if c != base)))

    def _postorder(self, conn: Connection | None, tx: Transaction | None,
                   root: str) -> list[tuple[str, Node]]:
        out: list[tuple[str, Node]] = []
        stack: list[tuple[str, bool]] = [(root, False)]
        while stack:
            path, expanded = stack.pop()
            node = self._get(conn, tx, path)
            if node is None:
                continue
            if expanded:
                out.append((path, node))
                continue
            stack.append((path, True))
            for child in reversed(node.children):
                stack.append((_child_name(path, child), False))
        return out

    def _set_perms_op(self, conn: Connection, tx: Transaction | None, raw: str | bytes | None,
                      perm_strings: list[str | bytes]) -> None:
        if not perm_strings:
            raise XsError("EINVAL", "no permissions given")
        if conn.unprivileged and len(perm_strings) > self.quotas.max_perms_per_node:
            raise XsError("ENOSPC", "too many permissions")
        parsed = [Perm.parse(p) for p in perm_strings]
        # domain_alloc_permrefs: entries naming a domain that does not exist are dropped (C
        # marks them ignored); the owner must exist.
        if not self._domain_exists(parsed[0].domid):
            raise XsError("ENOENT", f"owner domain {parsed[0].domid} does not exist")
        perms = (parsed[0],) + tuple(p for p in parsed[1:] if self._domain_exists(p.domid))
        name, node = self._lookup(conn, tx, raw, XS_PERM_WRITE | XS_PERM_OWNER,
                                  allow_special=True)
        if node is None:
            raise XsError("ENOENT", name)
        if conn.unprivileged and perms[0].domid != node.owner:
            raise XsError("EPERM", "unprivileged domains may not change the owner")
        new = dataclasses.replace(node, perms=perms)
        self._check_size(conn, new)
        self._put(conn, tx, name, new)
        self._fire(conn, tx, name, new, exact=False, old_perms=node.perms)

    def _watch_op(self, conn: Connection, raw: str | bytes | None, token: bytes) -> Watch:
        """``do_watch`` (without the initial event, which goes out after the ack)."""
        if isinstance(raw, str):
            relative = not raw.startswith(("/", "@"))
        else:
            relative = raw is not None and not raw.startswith((b"/", b"@"))
        name = self._canonicalize(conn, raw, allow_special=True)
        for w in conn.watches:
            if w.node == name and w.token == token:
                raise XsError("EEXIST", "duplicate watch")
        if conn.unprivileged and \
                self._domain_watches(conn.domid) >= self.quotas.max_watches_per_domain:
            raise XsError("E2BIG", "watch quota exceeded")
        watch = Watch(name, token, len(conn.implicit_path) + 1 if relative else 0)
        conn.watches.append(watch)
        return watch

    def _unwatch_op(self, conn: Connection, raw: str | bytes | None, token: bytes) -> None:
        name = self._canonicalize(conn, raw, allow_special=True)
        for w in conn.watches:
            if w.node == name and w.token == token:
                conn.watches.remove(w)
                return
        raise XsError("ENOENT", "no such watch")

    def _reset_watches(self, conn: Connection) -> None:
        conn.watches.clear()
        conn.transactions.clear()

    def _domain_watches(self, domid: int) -> int:
        return sum(len(c.watches) for c in self._connections.values() if c.domid == domid)

    def _domain_transactions(self, domid: int) -> int:
        return sum(len(c.transactions) for c in self._connections.values() if c.domid == domid)

    def _transaction_start(self, conn: Connection, tx: Transaction | None) -> int:
        if tx is not None:
            raise XsError("EBUSY", "nested transactions are not supported")
        if conn.unprivileged and \
                self._domain_transactions(conn.domid) >= self.quotas.max_transactions_per_domain:
            raise XsError("ENOSPC", "transaction quota exceeded")
        while True:  # pick an unused, non-zero u32 id
            tx_id = conn._next_tx_id
            conn._next_tx_id = (conn._next_tx_id + 1) & _U32_MAX
            if tx_id != 0 and tx_id not in conn.transactions:
                break
        conn.transactions[tx_id] = Transaction(tx_id, conn, self._next_gen())
        return tx_id

    def _transaction_end(self, conn: Connection, tx: Transaction, commit: bool) -> None:
        """``do_transaction_end`` + ``finalize_transaction``."""
        del conn.transactions[tx.id]
        if not commit:
            return
        if tx.fail:
            raise XsError("ENOMEM", "transaction failed internally")
        if tx.node_created and conn.unprivileged:
            for domid, delta in tx.node_delta.items():
                if delta > 0 and self._node_count[domid] + delta > self.quotas.max_nodes_per_domain:
                    raise XsError("ENOSPC", "node quota exceeded at commit")
        for name, gen in tx.accessed.items():
            live = self._nodes.get(name)
            if (live.generation if live is not None else NO_GENERATION) != gen:
                raise XsError("EAGAIN", f"{name} changed during the transaction")
        for name, node in tx.overlay.items():
            if node is None:
                self._generation += 1
                self._delete_global(name)
            else:
                self._store_global(name, dataclasses.replace(node, generation=self._next_gen()))
        for name, exact in tx.watches.items():
            self._fire(conn, None, name, None, exact, tx.first_perms.get(name))

    # -- domains -------------------------------------------------------------------------------

    def is_domain_introduced(self, domid: int) -> bool:
        dom = self._domains.get(domid)
        return dom is not None and dom.introduced

    def domain_conns(self, domid: int) -> list[Connection]:
        """The connections that *are* ``domid``'s xenbus ring (domain sockets)."""
        return [c for c in self._connections.values() if c.domain_conn and c.domid == domid]

    def introduce_domain(self, domid: int) -> bool:
        """``XS_INTRODUCE``: start talking to ``domid``.  First time: fires
        ``@introduceDomain``.  Again: the domain's ring connection is reset (its watches and
        transactions dropped, ``domain_conn_reset``) and nothing fires.  Returns whether the
        domain was new."""
        if not 0 <= domid < DOMID_FIRST_RESERVED:
            raise XsError("EINVAL", f"domid {domid} out of range")
        new = not self.is_domain_introduced(domid)
        if new:
            self._domains[domid] = _Domain(domid)
            if domid != 0:
                self._fire_special(SPECIAL_INTRODUCE)
        for conn in self.domain_conns(domid):
            self._reset_watches(conn)
        return new

    def _introduced(self, domid: int) -> _Domain:
        """``onearg_domain``/``find_connected_domain`` checks: dom0 is EINVAL, an unknown
        domain ENOENT."""
        if domid == 0:
            raise XsError("EINVAL", "not for dom0")
        dom = self._domains.get(domid)
        if dom is None or not dom.introduced:
            raise XsError("ENOENT", f"domain {domid} not introduced")
        return dom

    def release_domain(self, domid: int) -> None:
        """``XS_RELEASE`` / domain death (``destroy_domain``): the domain's connections are
        closed, the nodes it owns are deleted (or given to dom0 with ``keep_orphans``), other
        nodes forget its permission entries, and ``@releaseDomain`` fires.  Removing
        ``/local/domain/<domid>`` is the toolstack's job, as on real Xen."""
        self._introduced(domid)
        for conn in self.domain_conns(domid):
            conn.watches.clear()  # "Avoid triggering watch events when ... nodes are deleted"
            self._close_connection(conn, f"domain {domid} released")
        del self._domains[domid]
        for dom in self._domains.values():
            if dom.target == domid:
                dom.target = None
        self._domain_tree_remove(domid)
        self._fire_special(SPECIAL_RELEASE)
        for hook in list(self.release_hooks):
            hook(domid)

    def _domain_tree_remove(self, domid: int) -> None:
        stack = ["/"]
        while stack:
            path = stack.pop()
            node = self._nodes.get(path)
            if node is None:
                continue
            if node.owner == domid and path != "/":
                if self.keep_orphans:
                    self._store_global(path, dataclasses.replace(
                        node, perms=(Perm(0, node.perms[0].perms),) + node.perms[1:]))
                else:
                    self._rm_node(None, None, path)
                    continue
            stack.extend(_child_name(path, c) for c in reversed(node.children))
        for name, node in list(self._nodes.items()):
            kept = tuple(p for i, p in enumerate(node.perms) if i == 0 or p.domid != domid)
            if node.owner == domid:  # special nodes owned by the domain go back to dom0
                kept = (Perm(0, node.perms[0].perms),) + kept[1:]
            if kept != node.perms:
                self._store_global(name, dataclasses.replace(node, perms=kept))

    def shutdown_domain(self, domid: int) -> None:
        """The hypervisor reported ``domid`` shut down (``check_domains``): fire
        ``@releaseDomain`` once until the domain is resumed or released."""
        dom = self._introduced(domid)
        if not dom.shutdown:
            dom.shutdown = True
            self._fire_special(SPECIAL_RELEASE)

    def resume_domain(self, domid: int) -> None:
        """``XS_RESUME``: clear the shutdown flag so a later shutdown fires again."""
        self._introduced(domid).shutdown = False

    def set_target(self, domid: int, target: int) -> None:
        """``XS_SET_TARGET``: ``domid`` (a stub/device-model domain) gets ``target``'s
        privileges on ``target``'s nodes.  Both must be introduced."""
        for d in (domid, target):
            dom = self._domains.get(d)
            if dom is None or not dom.introduced:
                raise XsError("ENOENT", f"domain {d} not introduced")
        self._domains[domid].target = target

    def target_of(self, domid: int) -> int | None:
        dom = self._domains.get(domid)
        return dom.target if dom is not None else None

    # -- inspection (tests, supervisor) --------------------------------------------------------

    def node(self, name: str) -> Node | None:
        """The live node (no permission checks)."""
        return self._nodes.get(name)

    def node_count(self, domid: int) -> int:
        return self._node_count[domid]

    def walk(self, root: str = "/") -> Iterator[tuple[str, Node]]:
        """Live nodes below ``root`` (inclusive), parents before children, children in
        directory order."""
        stack = [root]
        while stack:
            path = stack.pop()
            node = self._nodes.get(path)
            if node is None:
                continue
            yield path, node
            stack.extend(_child_name(path, c) for c in reversed(node.children))

    def control(self, conn: Connection, args: list[bytes]) -> bytes:
        """``XS_CONTROL`` (``do_control``), minimal: ``check``, ``print <text>``, ``help``,
        ``quota [<domid>]``."""
        if not args:
            raise XsError("EINVAL", "no control command")
        cmd = args[0]
        if cmd == b"check":
            return ACK
        if cmd == b"print":
            LOG.info("xenstore control print: %s", b" ".join(args[1:]).decode("ascii", "replace"))
            return ACK
        if cmd == b"help":
            return b"check\nprint <string>\nquota [<domid>]\nhelp\n\x00"
        if cmd == b"quota":
            q = self.quotas
            if len(args) > 1:
                domid = _parse_uint(args[1], "domid", DOMID_FIRST_RESERVED - 1)
                if not self.is_domain_introduced(domid):
                    raise XsError("ENOENT", f"domain {domid}")
                text = (f"Domain {domid}:\n"
                        f"nodes            : {self._node_count[domid]:8d} "
                        f"(max {q.max_nodes_per_domain:8d})\n"
                        f"watches          : {self._domain_watches(domid):8d} "
                        f"(max {q.max_watches_per_domain:8d})\n"
                        f"transactions     : {self._domain_transactions(domid):8d} "
                        f"(max {q.max_transactions_per_domain:8d})\n")
            else:
                text = "".join(f"{f.name:30s}: {getattr(q, f.name)}\n"
                               for f in dataclasses.fields(q))
            return text.encode() + b"\x00"
        raise XsError("EINVAL", f"unknown control command {cmd[:32]!r}")


# -- wire dispatch (wire_funcs[]) --------------------------------------------------------------

_NOTID = 1  # XS_FLAG_NOTID: ignore the transaction id
_PRIV = 2   # XS_FLAG_PRIV: privileged clients only

_Handler = Callable[[Connection, "Transaction | None", Message], "Message | None"]


def _ok(msg: Message) -> Message:
    return msg.reply(msg.type, ACK)


def _w_read(c: Connection, tx: Transaction | None, m: Message) -> Message:
    return m.reply(m.type, c.store._read_op(c, tx, _onearg(m.payload)))


def _w_directory(c: Connection, tx: Transaction | None, m: Message) -> Message:
    kids = c.store._directory_op(c, tx, _onearg(m.payload))
    return m.reply(m.type, b"".join(k.encode() + b"\x00" for k in kids))


def _w_directory_part(c: Connection, tx: Transaction | None, m: Message) -> Message:
    args = unpack_strings(m.payload)
    if len(args) != 2:
        raise XsError("EINVAL", "DIRECTORY_PART takes a path and an offset")
    offset = _parse_uint(args[1], "offset")
    return m.reply(m.type, c.store._directory_part(c, tx, args[0], offset))


def _w_get_perms(c: Connection, tx: Transaction | None, m: Message) -> Message:
    perms = c.store._get_perms_op(c, tx, _onearg(m.payload))
    return m.reply(m.type, b"".join(str(p).encode() + b"\x00" for p in perms))


def _w_write(c: Connection, tx: Transaction | None, m: Message) -> Message:
    parts = unpack_write(m.payload)
    if parts is None:
        raise XsError("EINVAL", "WRITE without a path")
    c.store._write_op(c, tx, parts[0], parts[1])
    return _ok(m)


def _w_mkdir(c: Connection, tx: Transaction | None, m: Message) -> Message:
    c.store._mkdir_op(c, tx, _onearg(m.payload))
    return _ok(m)


def _w_rm(c: Connection, tx: Transaction | None, m: Message) -> Message:
    c.store._rm_op(c, tx, _onearg(m.payload))
    return _ok(m)


def _w_set_perms(c: Connection, tx: Transaction | None, m: Message) -> Message:
    args = unpack_strings(m.payload)
    if len(args) < 2:
        raise XsError("EINVAL", "SET_PERMS takes a path and permissions")
    c.store._set_perms_op(c, tx, args[0], list(args[1:]))
    return _ok(m)


def _w_watch(c: Connection, tx: Transaction | None, m: Message) -> None:
    args = unpack_strings(m.payload)
    if len(args) != 2:
        raise XsError("EINVAL", "WATCH takes a path and a token")
    watch = c.store._watch_op(c, args[0], args[1])
    c._enqueue(_ok(m))
    # "We fire once up front: simplifies clients and restart."
    c._send_event(watch.event_path(watch.node), watch.token)
    return None


def _w_unwatch(c: Connection, tx: Transaction | None, m: Message) -> Message:
    args = unpack_strings(m.payload)
    if len(args) != 2:
        raise XsError("EINVAL", "UNWATCH takes a path and a token")
    c.store._unwatch_op(c, args[0], args[1])
    return _ok(m)


def _w_transaction_start(c: Connection, tx: Transaction | None, m: Message) -> Message:
    tx_id = c.store._transaction_start(c, tx)
    return m.reply(m.type, f"{tx_id}".encode() + b"\x00")


def _w_transaction_end(c: Connection, tx: Transaction | None, m: Message) -> Message:
    arg = _onearg(m.payload) if m.payload else None
    if arg not in (b"T", b"F"):
        raise XsError("EINVAL", "TRANSACTION_END takes T or F")
    if tx is None:
        raise XsError("ENOENT", "not in a transaction")
    c.store._transaction_end(c, tx, arg == b"T")
    return _ok(m)


def _w_introduce(c: Connection, tx: Transaction | None, m: Message) -> Message:
    args = unpack_strings(m.payload)
    if len(args) < 3:
        raise XsError("EINVAL", "INTRODUCE takes domid, gfn and event channel")
    domid = _parse_uint(args[0], "domid", DOMID_FIRST_RESERVED - 1)
    port = _parse_uint(args[2], "event channel")
    if port <= 0:
        raise XsError("EINVAL", "event channel must be positive")
    c.store.introduce_domain(domid)
    return _ok(m)


def _onearg_domid(m: Message) -> int:
    return _parse_uint(_onearg(m.payload), "domid")


def _w_release(c: Connection, tx: Transaction | None, m: Message) -> Message:
    c.store.release_domain(_onearg_domid(m))
    return _ok(m)


def _w_get_domain_path(c: Connection, tx: Transaction | None, m: Message) -> Message:
    return m.reply(m.type, _domain_path(_onearg_domid(m)).encode() + b"\x00")


def _w_is_domain_introduced(c: Connection, tx: Transaction | None, m: Message) -> Message:
    domid = _onearg_domid(m)
    yes = domid == DOMID_SELF or c.store.is_domain_introduced(domid)
    return m.reply(m.type, b"T\x00" if yes else b"F\x00")


def _w_resume(c: Connection, tx: Transaction | None, m: Message) -> Message:
    c.store.resume_domain(_onearg_domid(m))
    return _ok(m)


def _w_set_target(c: Connection, tx: Transaction | None, m: Message) -> Message:
    args = unpack_strings(m.payload)
    if len(args) < 2:
        raise XsError("EINVAL", "SET_TARGET takes domid and target")
    c.store.set_target(_parse_uint(args[0], "domid"), _parse_uint(args[1], "target"))
    return _ok(m)


def _w_reset_watches(c: Connection, tx: Transaction | None, m: Message) -> Message:
    c.store._reset_watches(c)
    return _ok(m)


def _w_control(c: Connection, tx: Transaction | None, m: Message) -> Message:
    return m.reply(m.type, c.store.control(c, unpack_strings(m.payload)))


_WIRE: dict[int, tuple[_Handler, int]] = {
    T.XS_CONTROL: (_w_control, _PRIV),
    T.XS_DIRECTORY: (_w_directory, 0),
    T.XS_READ: (_w_read, 0),
    T.XS_GET_PERMS: (_w_get_perms, 0),
    T.XS_WATCH: (_w_watch, _NOTID),
    T.XS_UNWATCH: (_w_unwatch, _NOTID),
    T.XS_TRANSACTION_START: (_w_transaction_start, 0),
    T.XS_TRANSACTION_END: (_w_transaction_end, 0),
    T.XS_INTRODUCE: (_w_introduce, _PRIV),
    T.XS_RELEASE: (_w_release, _PRIV),
    T.XS_GET_DOMAIN_PATH: (_w_get_domain_path, 0),
    T.XS_WRITE: (_w_write, 0),
    T.XS_MKDIR: (_w_mkdir, 0),
    T.XS_RM: (_w_rm, 0),
    T.XS_SET_PERMS: (_w_set_perms, 0),
    T.XS_IS_DOMAIN_INTRODUCED: (_w_is_domain_introduced, _PRIV),
    T.XS_RESUME: (_w_resume, _PRIV),
    T.XS_SET_TARGET: (_w_set_target, _PRIV),
    T.XS_RESET_WATCHES: (_w_reset_watches, 0),
    T.XS_DIRECTORY_PART: (_w_directory_part, 0),
}

