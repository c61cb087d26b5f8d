"""The reading tracker's shortcuts (no-op calls skipped, the key codec cached) against the
tracker they replaced, over random sequences of SET, SET LOCAL, RESET ALL, BEGIN, COMMIT,
ROLLBACK, savepoints, code (set_config() in a SELECT), ParameterStatus reports and
ReadyForQuery confirmations.

`_Uncached` is the tracker as it was before the shortcuts: every call goes through
`_Values`, and the codec is recomputed from the predicted and reported values each time.
After every call both trackers must agree on what the next message is read under, what the
current request began under, what is unsure, and on the codec; and the cached codec must
equal the one recomputed from scratch (a stale cache reads keys in the wrong encoding:
wrong subjects in an audit event).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.session.reading import ReadingTracker, _Values, python_codec
from rules.settings import CLIENT_ENCODING, CODE, CONFORMING, DEFAULT, SettingOp, canonical

_PARAMETERS = (CLIENT_ENCODING, CONFORMING)


class _Uncached(ReadingTracker):
    """The tracker before the shortcuts (fb826e8): nothing skipped, nothing cached."""

    def _apply(self, ops: tuple[SettingOp, ...]) -> None:
        for op in ops:
            kind = op[0]
            if kind == "code":
                self.unsure.update(_PARAMETERS)
                continue
            if kind == "set" or kind == "local":
                self.unsure.discard(op[1])
            elif kind == "reset_all":
                self.unsure.clear()
            self._values.apply(op)
            self._now = None

    def execute(self, ops: tuple[SettingOp, ...] | None) -> None:
        if ops is None:
            self.unsure.update(_PARAMETERS)
        elif ops:
            self._apply(ops)

    def _request_ends(self) -> None:
        if not self._values.block and self._values.end(commit=True):
            self._now = None
        self._values.touched.clear()
        self._base = self.now()
        self.base_exact = False
        self.unsure.clear()

    def reported(self, name: str, value: str) -> None:
        if name in self.truth:
            self.truth[name] = canonical(name, value)
            self._server = None

    def codec(self) -> str:
        now = self.now().client_encoding
        return python_codec(now) if now == self.server.client_encoding else ""

    def confirm(self, tx_status: int) -> None:
        if self._values.confirm(self.truth, tx_status != ord("I")):
            self._now = None
        self._base = self.server
        self.base_exact = True


def _values_state(v: _Values) -> tuple[object, ...]:
    return (v.now, v.session, v.start, v.marks, v.block, v.touched)


_encodings = st.sampled_from(["UTF8", "LATIN1", "SQL_ASCII", "WIN1252", DEFAULT, ""])
_booleans = st.sampled_from(["on", "off", DEFAULT, ""])
_savepoints = st.sampled_from(["a", "b"])
_op = st.one_of(
    st.tuples(st.sampled_from(["set", "local"]), st.just(CLIENT_ENCODING), _encodings),
    st.tuples(st.sampled_from(["set", "local"]), st.just(CONFORMING), _booleans),
    st.sampled_from(
        [("reset_all", "", ""), ("begin", "", ""), ("commit", "", ""), ("rollback", "", ""), CODE]
    ),
    st.tuples(st.sampled_from(["savepoint", "release", "rollback_to"]), _savepoints, st.just("")),
)
_ops = st.one_of(st.none(), st.lists(_op, max_size=4).map(tuple), st.just((CODE,)))
_reported = st.one_of(
    st.tuples(st.just(CLIENT_ENCODING), st.sampled_from(["UTF8", "LATIN1", "SQL_ASCII", "BIG5"])),
    st.tuples(st.just(CONFORMING), st.sampled_from(["on", "off"])),
    st.tuples(st.just("TimeZone"), st.just("UTC")),
)
_call = st.one_of(
    st.tuples(st.sampled_from(["query", "bind", "execute"]), _ops),
    st.tuples(st.sampled_from(["sync", "function_call"]), st.none()),
    st.tuples(st.just("reported"), _reported),
    st.tuples(st.just("confirm"), st.sampled_from([ord("I"), ord("T"), ord("E")])),
    st.tuples(st.just("codec"), st.none()),  # a read between calls (fills the cache)
)


def _do(t: ReadingTracker, call: tuple[str, object]) -> None:
    name, arg = call
    if name in ("query", "bind", "execute"):
        getattr(t, name)(arg)
    elif name in ("sync", "function_call"):
        getattr(t, name)()
    elif name == "reported":
        assert isinstance(arg, tuple)
        t.reported(*arg)
    elif name == "confirm":
        assert isinstance(arg, int)
        t.confirm(arg)
    else:
        t.codec()


_LOGINS = [
    {CLIENT_ENCODING: "UTF8", CONFORMING: "on", "server_encoding": "UTF8"},
    {CLIENT_ENCODING: "LATIN1", CONFORMING: "off", "server_encoding": "UTF8"},
    {"server_encoding": "UTF8"},
]


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(login=st.sampled_from(_LOGINS), calls=st.lists(_call, max_size=30))
def test_tracker_shortcuts_and_codec_cache_agree_with_recomputing(
    login: dict[str, str], calls: list[tuple[str, object]]
) -> None:
    fast = ReadingTracker(dict(login))
    slow = _Uncached(dict(login))
    for call in calls:
        _do(fast, call)
        _do(slow, call)
        assert _values_state(fast._values) == _values_state(slow._values), call
        assert fast.truth == slow.truth
        assert fast.now() == slow.now() == fast._reading(fast._values.now)
        assert fast.server == slow.server == fast._reading(fast.truth)
        assert (fast.base, fast.base_exact) == (slow.base, slow.base_exact)
        assert fast.unsure == slow.unsure
        recomputed = fast.now().client_encoding
        expected = python_codec(recomputed) if recomputed == fast.truth[CLIENT_ENCODING] else ""
        assert fast.codec() == slow.codec() == expected, call


def test_codec_follows_a_report_after_it_was_read() -> None:
    """The cache filled under UTF8, then the server reports LATIN1 (set_config() in a
    SELECT): keys read as nothing until the prediction agrees, then as LATIN1."""
    t = ReadingTracker({CLIENT_ENCODING: "UTF8", CONFORMING: "on", "server_encoding": "UTF8"})
    assert t.codec() == "utf-8"
    t.query((CODE,))
    assert t.codec() == "utf-8"
    t.reported(CLIENT_ENCODING, "LATIN1")
    assert t.codec() == ""
    t.confirm(ord("I"))  # the next request began under what the server reported
    assert t.codec() == python_codec("LATIN1") != ""
    t.query(((("set", CLIENT_ENCODING, DEFAULT)),))
    assert t.codec() == ""  # predicted UTF8, the server still says LATIN1
    t.reported(CLIENT_ENCODING, "UTF8")
    assert t.codec() == "utf-8"


def test_codec_follows_a_rollback_of_set_in_a_block() -> None:
    t = ReadingTracker({CLIENT_ENCODING: "UTF8", CONFORMING: "on", "server_encoding": "UTF8"})
    t.query((("begin", "", ""), ("set", CLIENT_ENCODING, "LATIN1")))
    t.reported(CLIENT_ENCODING, "LATIN1")
    assert t.codec() == python_codec("LATIN1")
    t.query((("rollback", "", ""),))
    assert t.codec() == ""  # predicted UTF8 again; the report is still to come
    t.reported(CLIENT_ENCODING, "UTF8")
    assert t.codec() == "utf-8"
