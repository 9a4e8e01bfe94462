"""The sim xenstore (no sockets): every operation over the wire format, the permission
rules, watches, transactions, quotas and domain lifecycle, as C xenstored behaves."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from dmore_nova.xen.io.xs_wire import (
    XENSTORE_PAYLOAD_MAX,
    Message,
    XsdSockmsgType,
    pack_strings,
    pack_write,
    unpack_error,
    unpack_strings,
)
from dmore_nova.xen.sim import xenstore
from dmore_nova.xen.sim.xenstore import (
    SPECIAL_INTRODUCE,
    SPECIAL_RELEASE,
    Perm,
    Quotas,
    Xenstore,
    XsError,
)

T = XsdSockmsgType


class Client:
    """Drives one store Connection with wire messages, like a socket client would."""

    def __init__(self, store: Xenstore, domid: int = 0, **kw) -> None:
        self.store = store
        self.conn = store.connect(domid, **kw)
        self.events: list[tuple[bytes, bytes]] = []
        self.req = 100

    def _drain(self) -> list[Message]:
        msgs = list(self.conn.outbox)
        self.conn.outbox.clear()
        for m in msgs:
            if m.type == T.XS_WATCH_EVENT:
                assert (m.req_id, m.tx_id) == (0, 0)
                path, token = unpack_strings(m.payload)
                self.events.append((path, token))
        return [m for m in msgs if m.type != T.XS_WATCH_EVENT]

    def rpc(self, t: int, *args, tx: int = 0, raw: bytes | None = None) -> Message:
        self.req += 1
        payload = raw if raw is not None else pack_strings(*args)
        self.conn.handle(Message(t, self.req, tx, payload))
        replies = self._drain()
        assert len(replies) == 1, replies
        r = replies[0]
        assert (r.req_id, r.tx_id) == (self.req, tx)  # echoed, as send_reply does
        return r

    def ok(self, t: int, *args, **kw) -> bytes:
        r = self.rpc(t, *args, **kw)
        assert r.type == t, (r, unpack_error(r.payload) if r.type == T.XS_ERROR else None)
        return r.payload

    def err(self, t: int, *args, **kw) -> str:
        r = self.rpc(t, *args, **kw)
        assert r.type == T.XS_ERROR, r
        return unpack_error(r.payload)

    # shorthands
    def write(self, path: str, value: bytes = b"", tx: int = 0) -> None:
        assert self.ok(T.XS_WRITE, raw=pack_write(path, value), tx=tx) == b"OK\x00"

    def write_err(self, path: str, value: bytes = b"", tx: int = 0) -> str:
        return self.err(T.XS_WRITE, raw=pack_write(path, value), tx=tx)

    def read(self, path: str, tx: int = 0) -> bytes:
        return self.ok(T.XS_READ, path, tx=tx)

    def ls(self, path: str, tx: int = 0) -> list[bytes]:
        return unpack_strings(self.ok(T.XS_DIRECTORY, path, tx=tx))

    def perms(self, path: str) -> list[bytes]:
        return unpack_strings(self.ok(T.XS_GET_PERMS, path))

    def chmod(self, path: str, *perms: str) -> None:
        assert self.ok(T.XS_SET_PERMS, path, *perms) == b"OK\x00"

    def watch(self, path: str, token: str) -> None:
        assert self.ok(T.XS_WATCH, path, token) == b"OK\x00"

    def take(self) -> list[tuple[bytes, bytes]]:
        self._drain()
        ev, self.events = self.events, []
        return ev

    def tx_start(self) -> int:
        return int(self.ok(T.XS_TRANSACTION_START, "")[:-1])


@pytest.fixture
def store() -> Xenstore:
    return Xenstore()


@pytest.fixture
def dom0(store) -> Client:
    return Client(store)


def domu(store: Xenstore, domid: int, **kw) -> Client:
    if not store.is_domain_introduced(domid):
        store.introduce_domain(domid)
    return Client(store, domid, domain_conn=True, **kw)


def guest_home(dom0: Client, domid: int) -> None:
    """What the toolstack does for a new domain: its home, owned by it, readable by dom0."""
    dom0.write(f"/local/domain/{domid}", b"")
    dom0.chmod(f"/local/domain/{domid}", f"n{domid}", "r0")


# ---------------------------------------------------------------------------------------------
# The tree and the basic operations


def test_initial_tree_is_c_xenstoreds(dom0):
    assert dom0.ls("/") == [b"tool"]
    assert dom0.ls("/tool") == [b"xenstored"]
    assert dom0.read("/tool/xenstored") == b""
    for name in ("/", "/tool", SPECIAL_RELEASE, SPECIAL_INTRODUCE):
        assert dom0.perms(name) == [b"n0"]
    assert dom0.ok(T.XS_IS_DOMAIN_INTRODUCED, "0") == b"T\x00"


def test_write_read_binary_values_and_overwrite(dom0):
    dom0.write("/a/b", b"\x00\x01binary\xff")
    assert dom0.read("/a/b") == b"\x00\x01binary\xff"
    dom0.write("/a/b", b"")
    assert dom0.read("/a/b") == b""
    assert dom0.err(T.XS_READ, "/a/nope") == "ENOENT"


def test_write_creates_parents_inheriting_permissions(dom0):
    dom0.write("/p", b"")
    dom0.chmod("/p", "n0", "r5", "w6")
    dom0.write("/p/q/r/s", b"leaf")
    for path in ("/p/q", "/p/q/r", "/p/q/r/s"):
        assert dom0.perms(path) == [b"n0", b"r5", b"w6"]
    assert dom0.read("/p/q") == b""          # implicit parents are empty
    assert dom0.ls("/p") == [b"q"]
    assert dom0.ls("/p/q/r") == [b"s"]


def test_unprivileged_creator_owns_what_it_creates(store, dom0):
    guest_home(dom0, 5)
    d5 = domu(store, 5)
    d5.write("/local/domain/5/device/vkbd/0/state", b"1")
    assert d5.perms("/local/domain/5/device") == [b"n5", b"r0"]
    # inherited extra entries stay, only the owner changes
    dom0.write("/shared", b"")
    dom0.chmod("/shared", "n0", "w5", "r5")
    d5.write("/shared/x", b"1")
    assert dom0.perms("/shared/x") == [b"n5", b"w5", b"r5"]


def test_mkdir_creates_and_is_idempotent_without_touching_values(dom0):
    assert dom0.ok(T.XS_MKDIR, "/m/n") == b"OK\x00"
    assert dom0.ls("/m") == [b"n"]
    dom0.write("/m/n", b"keep")
    assert dom0.ok(T.XS_MKDIR, "/m/n") == b"OK\x00"
    assert dom0.read("/m/n") == b"keep"


def test_directory_order_is_creation_order(dom0):
    for name in ("zeta", "alpha", "mid"):
        dom0.write(f"/d/{name}", b"")
    assert dom0.ls("/d") == [b"zeta", b"alpha", b"mid"]
    assert dom0.ok(T.XS_DIRECTORY, "/d/zeta") == b""  # no children: empty payload


def test_rm_subtree_and_missing_node_rules(dom0):
    dom0.write("/r/a/b/c", b"1")
    dom0.write("/r/x", b"2")
    assert dom0.ok(T.XS_RM, "/r/a") == b"OK\x00"
    assert dom0.ls("/r") == [b"x"]
    for gone in ("/r/a", "/r/a/b", "/r/a/b/c"):
        assert dom0.err(T.XS_READ, gone) == "ENOENT"
    # missing node with existing parent: fine; missing parent too: ENOENT
    assert dom0.ok(T.XS_RM, "/r/a") == b"OK\x00"
    assert dom0.err(T.XS_RM, "/r/a/b") == "ENOENT"
    assert dom0.err(T.XS_RM, "/") == "EINVAL"


def test_relative_paths_resolve_under_the_domain_home(store, dom0):
    guest_home(dom0, 7)
    d7 = domu(store, 7)
    d7.write("device/x", b"rel")
    assert dom0.read("/local/domain/7/device/x") == b"rel"
    assert d7.read("device/x") == b"rel"
    dom0.write("name", b"Domain-0")            # dom0's socket clients: /local/domain/0
    assert dom0.read("/local/domain/0/name") == b"Domain-0"


@pytest.mark.parametrize("path", ["/bad path", "/trailing/", "/dou//ble", "/é", "@special",
                                  "/a\x01", "", "/a/../b" + "*"])
def test_invalid_paths_are_einval(dom0, path):
    assert dom0.err(T.XS_READ, raw=path.encode("utf-8") + b"\x00") == "EINVAL"
    assert dom0.err(T.XS_WRITE, raw=pack_write(path.encode("utf-8"), b"v")) == "EINVAL"


def test_absolute_path_length_limit(dom0):
    ok = "/" + "a" * 3071
    dom0.write(ok, b"")
    assert dom0.write_err("/" + "a" * 3072) == "EINVAL"


def test_malformed_payloads_get_einval_not_exceptions(dom0):
    assert dom0.err(T.XS_READ, raw=b"/a") == "EINVAL"                 # no terminator
    assert dom0.err(T.XS_READ, raw=b"/a\x00/b\x00") == "EINVAL"       # two args
    assert dom0.err(T.XS_WRITE, raw=b"no-nul-at-all") == "EINVAL"
    assert dom0.err(T.XS_WATCH, raw=b"/a\x00") == "EINVAL"            # token missing
    assert dom0.err(T.XS_SET_PERMS, raw=b"/a\x00") == "EINVAL"        # no perms
    assert dom0.err(T.XS_SET_PERMS, "/", "x5") == "EINVAL"
    assert dom0.err(T.XS_SET_PERMS, "/", "r") == "EINVAL"
    assert dom0.err(T.XS_SET_PERMS, "/", "r-1") == "EINVAL"
    assert dom0.err(T.XS_GET_DOMAIN_PATH, "five") == "EINVAL"
    assert dom0.err(T.XS_TRANSACTION_END, "X") == "EINVAL"


def test_unknown_and_reply_only_types_are_enosys(dom0):
    for t in (20, 23, 128, 0xFFFF, T.XS_WATCH_EVENT, T.XS_ERROR):
        assert dom0.err(t, "/") == "ENOSYS"


def test_get_domain_path_and_is_domain_introduced(store, dom0):
    assert dom0.ok(T.XS_GET_DOMAIN_PATH, "12") == b"/local/domain/12\x00"
    assert dom0.ok(T.XS_IS_DOMAIN_INTRODUCED, "12") == b"F\x00"
    store.introduce_domain(12)
    assert dom0.ok(T.XS_IS_DOMAIN_INTRODUCED, "12") == b"T\x00"
    assert dom0.ok(T.XS_IS_DOMAIN_INTRODUCED, str(0x7FF0)) == b"T\x00"  # DOMID_SELF


def test_control_minimal(dom0, store):
    assert dom0.ok(T.XS_CONTROL, "check") == b"OK\x00"
    assert dom0.ok(T.XS_CONTROL, "print", "hello") == b"OK\x00"
    assert b"quota" in dom0.ok(T.XS_CONTROL, "help")
    assert b"max_nodes_per_domain" in dom0.ok(T.XS_CONTROL, "quota")
    assert dom0.ok(T.XS_CONTROL, "quota", "0").startswith(b"Domain 0:")
    assert dom0.err(T.XS_CONTROL, "frobnicate") == "EINVAL"
    assert dom0.err(T.XS_CONTROL, raw=b"") == "EINVAL"
    # XS_DEBUG is the same operation
    assert T.XS_DEBUG == T.XS_CONTROL


def test_privileged_operations_are_eacces_for_a_domu(store):
    d5 = domu(store, 5)
    domu(store, 6)
    for t, args in ((T.XS_INTRODUCE, ("9", "0", "1")), (T.XS_RELEASE, ("6",)),
                    (T.XS_IS_DOMAIN_INTRODUCED, ("6",)), (T.XS_RESUME, ("6",)),
                    (T.XS_SET_TARGET, ("5", "6")), (T.XS_CONTROL, ("check",))):
        assert d5.err(t, *args) == "EACCES", t
    # unprivileged but allowed
    assert d5.ok(T.XS_GET_DOMAIN_PATH, "5") == b"/local/domain/5\x00"


def test_reply_larger_than_payload_max_is_e2big_and_directory_part_pages(dom0):
    names = [f"child-with-a-fairly-long-name-{i:04d}" for i in range(200)]
    for n in names:
        dom0.write(f"/big/{n}", b"")
    assert dom0.err(T.XS_DIRECTORY, "/big") == "E2BIG"
    # DIRECTORY_PART: generation, then names, until an empty string ends the list
    got: list[bytes] = []
    offset = 0
    gens = set()
    for _ in range(50):
        payload = dom0.ok(T.XS_DIRECTORY_PART, "/big", str(offset))
        assert len(payload) <= XENSTORE_PAYLOAD_MAX
        gen, rest = payload.split(b"\x00", 1)
        gens.add(gen)
        parts = rest.split(b"\x00")
        done = rest.endswith(b"\x00\x00") or rest == b"\x00"
        chunk = [p for p in parts if p]
        got += chunk
        offset += sum(len(p) + 1 for p in chunk)
        if done:
            break
    assert [g.decode() for g in got] == names
    assert len(gens) == 1 and gens.pop().isdigit()
    assert dom0.ok(T.XS_DIRECTORY_PART, "/big", "999999").endswith(b"\x00\x00")
    assert dom0.err(T.XS_DIRECTORY_PART, "/big") == "EINVAL"


# ---------------------------------------------------------------------------------------------
# Permissions


PERM_MATRIX = [
    # node perms          domid: (can read, can write)
    (["n0"],              {5: (False, False), 6: (False, False)}),
    (["r0"],              {5: (True, False), 6: (True, False)}),
    (["w0"],              {5: (False, True), 6: (False, True)}),
    (["b0"],              {5: (True, True), 6: (True, True)}),
    (["n0", "r5"],        {5: (True, False), 6: (False, False)}),
    (["n0", "w5"],        {5: (False, True), 6: (False, False)}),
    (["n0", "b5"],        {5: (True, True), 6: (False, False)}),
    (["n5"],              {5: (True, True), 6: (False, False)}),
    (["b0", "n5"],        {5: (False, False), 6: (True, True)}),
    (["n0", "r5", "b5"],  {5: (True, False), 6: (False, False)}),   # first match wins
]


@pytest.mark.parametrize("perms,expect", PERM_MATRIX)
def test_permission_matrix(store, dom0, perms, expect):
    dom0.write("/pm", b"")
    dom0.chmod("/pm", "r0")              # the parent is readable: errors are not masked
    dom0.write("/pm/node", b"value")
    dom0.chmod("/pm/node", *perms)
    for domid, (can_read, can_write) in expect.items():
        c = domu(store, domid)
        if can_read:
            assert c.read("/pm/node") == b"value"
            assert c.perms("/pm/node") == [p.encode() for p in perms]
        else:
            assert c.err(T.XS_READ, "/pm/node") == "EACCES"
            assert c.err(T.XS_GET_PERMS, "/pm/node") == "EACCES"
            assert c.err(T.XS_DIRECTORY, "/pm/node") == "EACCES"
        if can_write:
            c.write("/pm/node", b"new")
        else:
            assert c.write_err("/pm/node", b"new") == "EACCES"
            assert c.err(T.XS_RM, "/pm/node") == "EACCES"
        dom0.write("/pm/node", b"value")
    # dom0 bypasses everything
    assert dom0.read("/pm/node") == b"value"


def test_missing_node_is_enoent_only_if_the_parent_says_so(store, dom0):
    dom0.write("/hidden", b"")                         # n0: domUs see nothing below
    dom0.write("/open", b"")
    dom0.chmod("/open", "n0", "r5")
    d5 = domu(store, 5)
    assert d5.err(T.XS_READ, "/hidden/missing") == "EACCES"
    assert d5.err(T.XS_READ, "/hidden/a/b/c") == "EACCES"
    assert d5.err(T.XS_READ, "/open/missing") == "ENOENT"
    assert d5.err(T.XS_READ, "/open/a/b/c") == "ENOENT"  # nearest existing ancestor decides
    # creating needs write permission on the nearest existing ancestor
    assert d5.write_err("/open/new") == "EACCES"
    dom0.chmod("/open", "n0", "b5")
    d5.write("/open/new/deep", b"1")
    assert dom0.perms("/open/new/deep") == [b"n5", b"b5"]


def test_set_perms_rules(store, dom0):
    guest_home(dom0, 5)
    d5 = domu(store, 5)
    d6 = domu(store, 6)
    d5.write("/local/domain/5/mine", b"")
    d5.chmod("/local/domain/5/mine", "n5", "r6")       # owner may change the rest
    assert d6.read("/local/domain/5/mine") == b""
    assert d5.err(T.XS_SET_PERMS, "/local/domain/5/mine", "n6") == "EPERM"  # not the owner
    dom0.write("/local/domain/5/theirs", b"")
    dom0.chmod("/local/domain/5/theirs", "n0", "b5")   # b5 is not ownership
    assert d5.err(T.XS_SET_PERMS, "/local/domain/5/theirs", "n0", "b5") == "EACCES"
    dom0.chmod("/local/domain/5/mine", "n6")           # dom0 can give it away
    assert dom0.perms("/local/domain/5/mine") == [b"n6"]
    assert dom0.err(T.XS_SET_PERMS, "/nope", "n0") == "ENOENT"


def test_set_perms_drops_entries_for_nonexistent_domains_and_needs_an_existing_owner():
    alive = {0, 5}
    store = Xenstore(domain_exists=lambda d: d in alive)
    dom0 = Client(store)
    dom0.write("/x", b"")
    dom0.chmod("/x", "n0", "r5", "r9")
    assert dom0.perms("/x") == [b"n0", b"r5"]
    assert dom0.err(T.XS_SET_PERMS, "/x", "n9") == "ENOENT"


def test_target_domain_gets_the_targets_privileges(store, dom0):
    guest_home(dom0, 5)
    store.introduce_domain(5)
    store.introduce_domain(6)
    dom0.write("/local/domain/5/dev", b"x")
    dom0.chmod("/local/domain/5/dev", "n5")
    dom0.write("/be", b"y")
    dom0.chmod("/be", "n0", "r5")
    d6 = domu(store, 6)
    assert d6.err(T.XS_READ, "/local/domain/5/dev") == "EACCES"
    assert d6.err(T.XS_READ, "/be") == "EACCES"
    assert dom0.ok(T.XS_SET_TARGET, "6", "5") == b"OK\x00"
    assert d6.read("/local/domain/5/dev") == b"x"       # owner == target: full rights
    d6.write("/local/domain/5/dev", b"z")
    assert d6.read("/be") == b"y"                       # entries naming the target apply
    assert d6.write_err("/be") == "EACCES"
    assert dom0.err(T.XS_SET_TARGET, "6", "99") == "ENOENT"


def test_privileged_flag_on_a_domain_connection(store, dom0):
    dom0.write("/secret", b"s")
    priv = domu(store, 5, privileged=True)
    assert priv.read("/secret") == b"s"


# ---------------------------------------------------------------------------------------------
# Watches


def test_watch_fires_once_on_registration_then_on_changes_below(dom0):
    dom0.write("/w/a", b"")
    dom0.watch("/w", "tok")
    assert dom0.take() == [(b"/w", b"tok")]
    dom0.write("/w/a", b"1")
    dom0.write("/w/a/deep/er", b"2")
    dom0.write("/w", b"3")
    dom0.write("/wx", b"sibling with common prefix")
    dom0.write("/other", b"")
    assert dom0.take() == [(b"/w/a", b"tok"), (b"/w/a/deep/er", b"tok"), (b"/w", b"tok")]


def test_watch_on_missing_node_fires_when_created(dom0):
    dom0.watch("/later/node", "t")
    assert dom0.take() == [(b"/later/node", b"t")]
    dom0.write("/later/node/child", b"1")        # creates /later/node too
    assert dom0.take() == [(b"/later/node/child", b"t")]


def test_mkdir_of_existing_node_does_not_fire(dom0):
    dom0.write("/m", b"")
    dom0.watch("/m", "t")
    dom0.take()
    dom0.ok(T.XS_MKDIR, "/m")
    assert dom0.take() == []
    dom0.ok(T.XS_MKDIR, "/m/new")
    assert dom0.take() == [(b"/m/new", b"t")]


def test_rm_fires_for_root_and_for_every_watched_descendant(store, dom0):
    dom0.write("/t/a/b/c", b"")
    dom0.write("/t/a/x", b"")
    w = Client(store)
    w.watch("/t", "parent")
    w.watch("/t/a/b", "child")
    w.watch("/t/a/b/c", "grandchild")
    w.watch("/t/a/x", "other-child")
    w.take()
    dom0.ok(T.XS_RM, "/t/a")
    ev = w.take()
    # children first (post-order), exact paths for watched descendants; the removed root
    # reaches watchers of it and of its ancestors
    assert ev == [(b"/t/a/b/c", b"grandchild"), (b"/t/a/b", b"child"),
                  (b"/t/a/x", b"other-child"), (b"/t/a", b"parent")]


def test_relative_watch_reports_relative_paths(store, dom0):
    guest_home(dom0, 5)
    d5 = domu(store, 5)
    d5.watch("device", "rel")
    assert d5.take() == [(b"device", b"rel")]
    dom0.write("/local/domain/5/device/vkbd/0/state", b"1")
    assert d5.take() == [(b"device/vkbd/0/state", b"rel")]
    assert d5.ok(T.XS_UNWATCH, "device", "rel") == b"OK\x00"
    dom0.write("/local/domain/5/device/vkbd/0/state", b"2")
    assert d5.take() == []


def test_watch_events_need_read_permission_on_node_or_parent(store, dom0):
    d5 = domu(store, 5)
    d5.watch("/", "all")
    assert d5.take() == [(b"/", b"all")]     # the registration event always comes
    dom0.write("/secret/x", b"1")              # n0 node under n0 parent: not told
    assert d5.take() == []
    dom0.write("/pub", b"")
    dom0.chmod("/pub", "n0", "r5")
    d5.take()
    dom0.write("/pub/x", b"1")                 # node readable (inherited r5)
    assert d5.take() == [(b"/pub/x", b"all")]
    dom0.write("/pub/y", b"")
    dom0.chmod("/pub/y", "n0")                 # not readable, but the parent is
    d5.take()
    dom0.write("/pub/y", b"2")
    assert d5.take() == [(b"/pub/y", b"all")]
    # losing read permission is reported with the old permissions
    dom0.write("/pub/z", b"")
    dom0.chmod("/pub", "n0")
    d5.take()
    dom0.chmod("/pub/z", "n0")
    assert d5.take() == [(b"/pub/z", b"all")]


def test_watchers_on_other_connections_and_multiple_tokens(store, dom0):
    a, b = Client(store), Client(store)
    a.watch("/s", "a1")
    a.watch("/s/x", "a2")
    b.watch("/s", "b1")
    a.take(), b.take()
    dom0.write("/s/x", b"v")
    assert a.take() == [(b"/s/x", b"a1"), (b"/s/x", b"a2")]
    assert b.take() == [(b"/s/x", b"b1")]
    assert dom0.take() == []


def test_duplicate_unknown_and_reset_watches(dom0):
    dom0.watch("/d", "t")
    assert dom0.err(T.XS_WATCH, "/d", "t") == "EEXIST"
    dom0.watch("/d", "t2")                               # same path, other token: fine
    assert dom0.err(T.XS_UNWATCH, "/d", "nope") == "ENOENT"
    assert dom0.ok(T.XS_RESET_WATCHES, raw=b"") == b"OK\x00"
    dom0.take()
    dom0.write("/d", b"x")
    assert dom0.take() == []
    assert dom0.err(T.XS_UNWATCH, "/d", "t") == "ENOENT"


def test_watch_ignores_the_transaction_id(dom0):
    # XS_FLAG_NOTID: a bogus tx id does not matter for WATCH/UNWATCH
    assert dom0.ok(T.XS_WATCH, "/n", "t", tx=999) == b"OK\x00"
    assert dom0.ok(T.XS_UNWATCH, "/n", "t", tx=999) == b"OK\x00"
    assert dom0.err(T.XS_READ, "/n", tx=999) == "ENOENT"  # others look the tx up


def test_special_watches_introduce_and_release(store, dom0):
    dom0.watch(SPECIAL_INTRODUCE, "intro")
    dom0.watch(SPECIAL_RELEASE, "rel")
    dom0.watch("/", "root")
    assert dom0.take() == [(b"@introduceDomain", b"intro"), (b"@releaseDomain", b"rel"),
                           (b"/", b"root")]
    assert dom0.ok(T.XS_INTRODUCE, "5", "1234", "3") == b"OK\x00"
    assert dom0.take() == [(b"@introduceDomain", b"intro")]   # exact only: not "/"
    assert dom0.ok(T.XS_INTRODUCE, "5", "1234", "3") == b"OK\x00"  # again: no event
    assert dom0.take() == []
    assert dom0.ok(T.XS_RELEASE, "5") == b"OK\x00"
    assert dom0.take() == [(b"@releaseDomain", b"rel")]
    assert dom0.ok(T.XS_IS_DOMAIN_INTRODUCED, "5") == b"F\x00"


def test_special_watches_need_permission_for_domus(store, dom0):
    d5 = domu(store, 5)
    d5.watch(SPECIAL_RELEASE, "r")
    assert d5.take() == [(b"@releaseDomain", b"r")]
    store.introduce_domain(6)
    store.release_domain(6)
    assert d5.take() == []                       # @releaseDomain is n0
    dom0.chmod(SPECIAL_RELEASE, "n0", "r5")
    assert d5.take() == [(b"@releaseDomain", b"r")]  # the permission change itself
    store.introduce_domain(6)
    store.release_domain(6)
    assert d5.take() == [(b"@releaseDomain", b"r")]
    assert d5.err(T.XS_SET_PERMS, SPECIAL_RELEASE, "n0") == "EACCES"


def test_shutdown_fires_release_once_until_resume(store, dom0):
    store.introduce_domain(5)
    dom0.watch(SPECIAL_RELEASE, "r")
    dom0.take()
    store.shutdown_domain(5)
    store.shutdown_domain(5)
    assert dom0.take() == [(b"@releaseDomain", b"r")]
    assert dom0.ok(T.XS_RESUME, "5") == b"OK\x00"
    store.shutdown_domain(5)
    assert dom0.take() == [(b"@releaseDomain", b"r")]
    assert dom0.err(T.XS_RESUME, "0") == "EINVAL"
    assert dom0.err(T.XS_RESUME, "77") == "ENOENT"


def test_in_process_api_and_events(store):
    d = store.dom0
    d.write("/ip/a", "text")
    assert d.read("/ip/a") == b"text"
    assert d.directory("/ip") == ["a"]
    d.set_perms("/ip/a", ["n0", "r3"])
    assert d.get_perms("/ip/a") == ["n0", "r3"]
    d.watch("/ip", "t")
    d.write("/ip/b", b"")
    assert d.take_events() == [("/ip", b"t"), ("/ip/b", b"t")]
    with pytest.raises(XsError) as ei:
        d.read("/ip/nope")
    assert ei.value.name == "ENOENT" and ei.value.errno == 2
    assert d.get_domain_path(4) == "/local/domain/4"
    d.rm("/ip")
    assert d.take_events() == [("/ip", b"t")]


# ---------------------------------------------------------------------------------------------
# Transactions


def test_transaction_isolation_and_commit(store, dom0):
    other = Client(store)
    dom0.write("/tx/a", b"old")
    tx = dom0.tx_start()
    assert tx != 0
    dom0.write("/tx/a", b"new", tx=tx)
    dom0.write("/tx/b", b"created", tx=tx)
    assert dom0.read("/tx/a", tx=tx) == b"new"
    assert dom0.ls("/tx", tx=tx) == [b"a", b"b"]
    assert other.read("/tx/a") == b"old"           # invisible outside until commit
    assert other.ls("/tx") == [b"a"]
    assert dom0.ok(T.XS_TRANSACTION_END, "T", tx=tx) == b"OK\x00"
    assert other.read("/tx/a") == b"new"
    assert other.ls("/tx") == [b"a", b"b"]
    assert dom0.err(T.XS_READ, "/tx/a", tx=tx) == "ENOENT"   # the transaction is gone


def test_transaction_abort_discards(store, dom0):
    dom0.write("/ab", b"1")
    tx = dom0.tx_start()
    dom0.write("/ab", b"2", tx=tx)
    dom0.ok(T.XS_RM, "/ab", tx=tx)
    assert dom0.err(T.XS_READ, "/ab", tx=tx) == "ENOENT"
    assert dom0.ok(T.XS_TRANSACTION_END, "F", tx=tx) == b"OK\x00"
    assert dom0.read("/ab") == b"1"


@pytest.mark.parametrize("interference", [
    "write-read-node", "rm-read-node", "create-read-missing", "sibling-created",
    "perms-changed"])
def test_transaction_conflicts_are_eagain(store, dom0, interference):
    other = Client(store)
    dom0.write("/c/a", b"1")
    tx = dom0.tx_start()
    if interference == "create-read-missing":
        assert dom0.err(T.XS_READ, "/c/missing", tx=tx) == "ENOENT"
    elif interference == "sibling-created":
        dom0.write("/c/mine", b"x", tx=tx)       # changes /c's child list in the tx
    else:
        dom0.read("/c/a", tx=tx)
    dom0.write("/c/result", b"r", tx=tx)
    {
        "write-read-node": lambda: other.write("/c/a", b"2"),
        "rm-read-node": lambda: other.ok(T.XS_RM, "/c/a"),
        "create-read-missing": lambda: other.write("/c/missing", b""),
        "sibling-created": lambda: other.write("/c/theirs", b""),
        "perms-changed": lambda: other.chmod("/c/a", "n0", "r1"),
    }[interference]()
    assert dom0.err(T.XS_TRANSACTION_END, "T", tx=tx) == "EAGAIN"
    assert dom0.err(T.XS_READ, "/c/result") == "ENOENT"      # nothing applied
    # the failed transaction is gone; a retry succeeds
    assert dom0.err(T.XS_TRANSACTION_END, "T", tx=tx) == "ENOENT"
    tx2 = dom0.tx_start()
    dom0.write("/c/result", b"r", tx=tx2)
    assert dom0.ok(T.XS_TRANSACTION_END, "T", tx=tx2) == b"OK\x00"
    assert dom0.read("/c/result") == b"r"


def test_unrelated_concurrent_change_does_not_conflict(store, dom0):
    other = Client(store)
    dom0.write("/u/a", b"1")
    other.write("/v/b", b"1")
    tx = dom0.tx_start()
    dom0.read("/u/a", tx=tx)
    dom0.write("/u/a", b"2", tx=tx)
    other.write("/v/b", b"2")
    assert dom0.ok(T.XS_TRANSACTION_END, "T", tx=tx) == b"OK\x00"


def test_two_transactions_first_committer_wins(store, dom0):
    other = Client(store)
    dom0.write("/k", b"0")
    t1 = dom0.tx_start()
    t2 = other.tx_start()
    v1 = int(dom0.read("/k", tx=t1))
    v2 = int(other.read("/k", tx=t2))
    dom0.write("/k", str(v1 + 1).encode(), tx=t1)
    other.write("/k", str(v2 + 1).encode(), tx=t2)
    assert dom0.ok(T.XS_TRANSACTION_END, "T", tx=t1) == b"OK\x00"
    assert other.err(T.XS_TRANSACTION_END, "T", tx=t2) == "EAGAIN"
    assert dom0.read("/k") == b"1"


def test_transaction_watch_events_only_at_commit(store, dom0):
    w = Client(store)
    w.watch("/we", "t")
    w.take()
    tx = dom0.tx_start()
    dom0.write("/we/a", b"1", tx=tx)
    dom0.write("/we/a", b"2", tx=tx)
    assert w.take() == []
    dom0.ok(T.XS_TRANSACTION_END, "T", tx=tx)
    # one event per changed node, however often it changed; /we, created implicitly, is
    # covered by the event for /we/a (as outside transactions)
    assert w.take() == [(b"/we/a", b"t")]
    tx = dom0.tx_start()
    dom0.write("/we/b", b"1", tx=tx)
    dom0.ok(T.XS_TRANSACTION_END, "F", tx=tx)
    assert w.take() == []


def test_transaction_id_rules(dom0):
    t1 = dom0.tx_start()
    t2 = dom0.tx_start()
    assert t1 != t2 and 0 not in (t1, t2)
    assert dom0.err(T.XS_TRANSACTION_START, "", tx=t1) == "EBUSY"       # no nesting
    assert dom0.err(T.XS_TRANSACTION_START, "", tx=12345) == "ENOENT"
    assert dom0.err(T.XS_TRANSACTION_END, "T") == "ENOENT"              # tx_id 0
    assert dom0.err(T.XS_TRANSACTION_END, raw=b"T", tx=t1) == "EINVAL"  # unterminated
    assert dom0.ok(T.XS_TRANSACTION_END, "F", tx=t1) == b"OK\x00"
    assert dom0.ok(T.XS_TRANSACTION_END, "F", tx=t2) == b"OK\x00"


def test_disconnect_drops_watches_and_transactions(store, dom0):
    c = Client(store)
    c.watch("/dd", "t")
    tx = c.tx_start()
    c.write("/dd/x", b"1", tx=tx)
    c.conn.close()
    dom0.write("/dd", b"")
    assert c.take() == [(b"/dd", b"t")]          # only the registration event, from before
    assert dom0.err(T.XS_READ, "/dd/x") == "ENOENT"
    assert c.conn.closed


# ---------------------------------------------------------------------------------------------
# Quotas (unprivileged domains only)


def test_node_quota(dom0):
    store = dom0.store
    store.quotas = Quotas(max_nodes_per_domain=4)
    guest_home(dom0, 5)                       # 1 node owned by 5
    d5 = domu(store, 5)
    d5.write("/local/domain/5/a", b"")
    d5.write("/local/domain/5/b", b"")
    assert store.node_count(5) == 3
    assert d5.write_err("/local/domain/5/c/d") == "ENOSPC"   # needs 2, 1 left: nothing made
    assert d5.err(T.XS_READ, "/local/domain/5/c") == "ENOENT"
    d5.write("/local/domain/5/c", b"")
    assert d5.write_err("/local/domain/5/e") == "ENOSPC"
    assert d5.err(T.XS_MKDIR, "/local/domain/5/e") == "ENOSPC"
    d5.write("/local/domain/5/c", b"overwrite is fine")
    # deleting frees quota
    d5.ok(T.XS_RM, "/local/domain/5/a")
    d5.write("/local/domain/5/e", b"")
    # dom0 is not limited, even creating nodes owned by 5
    for i in range(10):
        dom0.write(f"/local/domain/5/dom0-{i}", b"")


def test_node_quota_checked_at_commit(dom0):
    store = dom0.store
    store.quotas = Quotas(max_nodes_per_domain=3)
    guest_home(dom0, 5)
    d5a = domu(store, 5)
    d5b = Client(store, 5, domain_conn=True)
    tx = d5a.tx_start()
    d5a.write("/local/domain/5/t1", b"", tx=tx)
    d5a.write("/local/domain/5/t2", b"", tx=tx)   # home + t1 + t2 = 3 as the tx sees it
    assert d5a.write_err("/local/domain/5/t3", tx=tx) == "ENOSPC"  # the tx's own count
    d5b.write("/local/domain/5/x1", b"")          # another connection of the domain: 2 live
    # at commit 2 + 2 > 3; the quota is checked before conflicts (acc_fix_domains first)
    assert d5a.err(T.XS_TRANSACTION_END, "T", tx=tx) == "ENOSPC"
    assert d5a.err(T.XS_READ, "/local/domain/5/t1") == "ENOENT"


def test_node_size_quota(store, dom0):
    guest_home(dom0, 5)
    d5 = domu(store, 5)
    d5.write("/local/domain/5/ok", b"v" * 1900)
    assert d5.write_err("/local/domain/5/big", b"v" * 2048) == "ENOSPC"
    assert d5.err(T.XS_READ, "/local/domain/5/big") == "ENOENT"
    dom0.write("/local/domain/5/dom0big", b"v" * 4000)    # privileged: no limit
    assert dom0.read("/local/domain/5/dom0big") == b"v" * 4000


def test_watch_quota_is_e2big_per_domain(store):
    store.quotas = Quotas(max_watches_per_domain=3)
    a = domu(store, 5)
    b = Client(store, 5, domain_conn=True)
    a.watch("/x1", "t")
    a.watch("/x2", "t")
    b.watch("/x3", "t")
    assert a.err(T.XS_WATCH, "/x4", "t") == "E2BIG"
    assert b.err(T.XS_WATCH, "/x4", "t") == "E2BIG"
    a.ok(T.XS_UNWATCH, "/x1", "t")
    b.watch("/x4", "t")
    d0 = Client(store)
    for i in range(10):
        d0.watch(f"/y{i}", "t")


def test_transaction_quota(store, dom0):
    store.quotas = Quotas(max_transactions_per_domain=2)
    d5 = domu(store, 5)
    d5.tx_start()
    t2 = d5.tx_start()
    assert d5.err(T.XS_TRANSACTION_START, "") == "ENOSPC"
    d5.ok(T.XS_TRANSACTION_END, "F", tx=t2)
    d5.tx_start()
    for _ in range(5):
        dom0.tx_start()


def test_transaction_node_quota_fails_the_transaction(store, dom0):
    store.quotas = Quotas(max_transaction_nodes=5)
    guest_home(dom0, 5)
    d5 = domu(store, 5)
    for i in range(6):
        dom0.write(f"/local/domain/5/n{i}", b"")
    dom0.chmod("/local/domain/5", "n5", "r0")
    tx = d5.tx_start()
    errors = [d5.rpc(T.XS_READ, f"/local/domain/5/n{i}", tx=tx) for i in range(6)]
    assert unpack_error(errors[-1].payload) == "ENOSPC"
    assert d5.err(T.XS_TRANSACTION_END, "T", tx=tx) == "ENOMEM"   # C: trans->fail


def test_perms_per_node_quota(store, dom0):
    guest_home(dom0, 5)
    d5 = domu(store, 5)
    d5.write("/local/domain/5/p", b"")
    d5.chmod("/local/domain/5/p", "n5", "r1", "r2", "r3", "r4")
    assert d5.err(T.XS_SET_PERMS, "/local/domain/5/p", "n5", "r1", "r2", "r3", "r4",
                  "r6") == "ENOSPC"
    dom0.chmod("/local/domain/5/p", "n5", "r1", "r2", "r3", "r4", "r6", "r7")


def test_relative_path_length_quota_for_domus(store, dom0):
    guest_home(dom0, 5)
    d5 = domu(store, 5)
    # (many short components: one 2048-char name would break the parent's node-size quota)
    rel_2048 = "/".join(["x" * 99] * 20 + ["y" * 48])
    rel_2049 = "/".join(["x" * 99] * 20 + ["z" * 49])
    assert len(rel_2048) == 2048 and len(rel_2049) == 2049
    d5.write("/local/domain/5/" + rel_2048, b"")              # 2048 below the home: allowed
    assert d5.write_err("/local/domain/5/" + rel_2049) == "EINVAL"
    assert d5.write_err(rel_2049) == "EINVAL"                  # relative form: same rule
    dom0.write("/local/domain/5/" + rel_2049, b"")             # privileged: no path-max


def test_output_queue_overflow_closes_the_connection(store, dom0):
    store.quotas = Quotas(max_queued_messages=5)
    closed: list[str] = []
    lazy = store.connect(0, on_close=closed.append)
    lazy.watch("/flood", "t")
    for i in range(10):
        dom0.write(f"/flood/{i}", b"")
    assert lazy.closed and closed and "overflow" in closed[0]
    assert len(lazy.outbox) == 0


# ---------------------------------------------------------------------------------------------
# Domain lifecycle


def test_release_closes_domain_connections_and_deletes_owned_nodes(store, dom0):
    guest_home(dom0, 5)
    dom0.write("/local/domain/0/backend/vkbd/5/0/state", b"1")
    dom0.chmod("/local/domain/0/backend/vkbd/5/0", "n0", "r5")
    dom0.chmod("/local/domain/0/backend/vkbd/5/0/state", "n0", "r5")
    closed: list[str] = []
    d5 = domu(store, 5, on_close=closed.append)
    d5.write("device/vkbd/0/state", b"3")
    watcher = Client(store)
    watcher.watch("/local/domain/5", "home")
    watcher.watch(SPECIAL_RELEASE, "rel")
    watcher.take()
    dom0.ok(T.XS_RELEASE, "5")
    assert d5.conn.closed and closed == ["domain 5 released"]
    # C (keep_orphans off): every node owned by the domain goes, with watch events
    assert dom0.err(T.XS_READ, "/local/domain/5") == "ENOENT"
    ev = watcher.take()
    assert ev[-1] == (b"@releaseDomain", b"rel")
    assert (b"/local/domain/5", b"home") in ev
    # permission entries naming the dead domain are forgotten
    assert dom0.perms("/local/domain/0/backend/vkbd/5/0") == [b"n0"]
    assert dom0.ok(T.XS_IS_DOMAIN_INTRODUCED, "5") == b"F\x00"
    assert dom0.err(T.XS_RELEASE, "5") == "ENOENT"
    assert dom0.err(T.XS_RELEASE, "0") == "EINVAL"
    with pytest.raises(XsError):
        store.connect(5, domain_conn=True)


def test_keep_orphans_moves_nodes_to_dom0():
    store = Xenstore(keep_orphans=True)
    dom0 = Client(store)
    guest_home(dom0, 5)
    store.introduce_domain(5)
    store.release_domain(5)
    assert dom0.perms("/local/domain/5") == [b"n0", b"r0"]


def test_reintroduce_resets_the_domain_connection(store):
    d5 = domu(store, 5)
    d5.watch("/x", "t")
    tx = d5.tx_start()
    store.introduce_domain(5)       # XS_INTRODUCE again: domain_conn_reset
    assert d5.err(T.XS_TRANSACTION_END, "T", tx=tx) == "ENOENT"
    assert d5.err(T.XS_UNWATCH, "/x", "t") == "ENOENT"


def test_introduce_argument_checks(dom0):
    assert dom0.err(T.XS_INTRODUCE, "5", "0") == "EINVAL"          # too few args
    assert dom0.err(T.XS_INTRODUCE, "5", "0", "0") == "EINVAL"     # port must be > 0
    assert dom0.err(T.XS_INTRODUCE, "40000", "0", "1") == "EINVAL"  # not a domid
    assert dom0.ok(T.XS_INTRODUCE, "5", "0", "1") == b"OK\x00"


# ---------------------------------------------------------------------------------------------
# Robustness


def test_random_requests_never_raise(store, dom0):
    rnd = random.Random(99)
    guest_home(dom0, 5)
    clients = [dom0, domu(store, 5)]
    words = [b"/", b"/a", b"/a/b", b"a", b"@releaseDomain", b"T", b"F", b"5", b"r5", b"n0",
             b"", b"\xff", b"//", b"0", b"x" * 40]
    for _ in range(3000):
        c = rnd.choice(clients)
        t = rnd.choice(list(range(24)) + [0xFFFF])
        parts = [rnd.choice(words) for _ in range(rnd.randrange(0, 4))]
        payload = b"\x00".join(parts) + (b"\x00" if rnd.random() < 0.8 else b"")
        tx = rnd.choice([0, 0, 0, 1, 2])
        c.req += 1
        c.conn.handle(Message(t, c.req, tx, payload))
        for m in c._drain():
            assert m.req_id == c.req
            assert m.type in (t, T.XS_ERROR)
            if m.type == T.XS_ERROR:
                assert unpack_error(m.payload) != "EIO", (t, payload)


def test_perm_parse_and_format():
    assert Perm.parse(b"b12") == Perm(12, 3)
    assert str(Perm(7, 0)) == "n7" and str(Perm(7, 1)) == "r7" and str(Perm(7, 2)) == "w7"
    for bad in ("", "r", "q1", "r1x", "r 1", "r-1", "r99999999999"):
        with pytest.raises(XsError):
            Perm.parse(bad)


def test_perm_bits_match_xenstore_lib_h():
    header = Path("/usr/include/xenstore_lib.h")
    if not header.exists():
        pytest.skip(reason="needs libxen-dev's xenstore_lib.h")
    defs = dict(re.findall(r"#define\s+(XS_PERM_\w+)\s+(0x[0-9a-fA-F]+|\d+)", header.read_text()))
    for name in ("XS_PERM_NONE", "XS_PERM_READ", "XS_PERM_WRITE", "XS_PERM_OWNER"):
        assert int(defs[name], 0) == getattr(xenstore, name), name
