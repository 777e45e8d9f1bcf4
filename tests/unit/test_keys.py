import hashlib
import os

import pytest
from hypothesis import given, strategies as st

from extproc.proxy.keys import (KeyUnavailable, UpstreamKey, WatchedFile, WorkerKeys, fingerprint,
                          parse_key_file, parse_worker_keys)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write(path, text):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a new inode, as a secret mount's symlink swap gives


def test_key_file_is_reread_when_it_changes(tmp_path):
    clock = FakeClock()
    path = tmp_path / "key"
    write(path, "first-key-value\n")
    key = UpstreamKey(path=str(path), clock=clock)
    assert key.current() == "first-key-value"
    write(path, "second-key-value")
    assert key.current() == "first-key-value"  # not re-checked within the interval
    clock.now += 1.0
    assert key.current() == "second-key-value"


def test_key_file_kept_when_briefly_missing_or_bad(tmp_path):
    clock = FakeClock()
    path = tmp_path / "key"
    write(path, "good-key-value")
    key = UpstreamKey(path=str(path), clock=clock)
    assert key.current() == "good-key-value"
    path.unlink()
    clock.now += 5
    assert key.current() == "good-key-value"
    write(path, "two words")
    clock.now += 5
    assert key.current() == "good-key-value"


def test_missing_key_file_raises_unavailable(tmp_path):
    key = UpstreamKey(path=str(tmp_path / "absent"), clock=FakeClock())
    with pytest.raises(KeyUnavailable):
        key.current()


def test_parse_key_file_rejects_empty_and_multiple():
    assert parse_key_file("  abc\n") == "abc"
    for bad in ("", "  \n", "a b"):
        with pytest.raises(ValueError):
            parse_key_file(bad)


def test_worker_keys_named_and_bare():
    table = parse_worker_keys("# team keys\nalice  k-alice-1\n\nk-bare-2  # no name\n")
    assert table.name_for("k-alice-1") == "alice"
    assert table.name_for("k-bare-2") == f"key-{fingerprint('k-bare-2')}"
    assert table.name_for("k-unknown") is None


def test_worker_keys_reject_duplicates_and_junk():
    with pytest.raises(ValueError, match="already used"):
        parse_worker_keys("a k1\nb k1\n")
    with pytest.raises(ValueError, match="line 1"):
        parse_worker_keys("a b c\n")
    with pytest.raises(ValueError, match="no keys"):
        parse_worker_keys("# nothing\n")


def test_without_table_any_token_is_accepted_and_hashed():
    keys = WorkerKeys()
    assert not keys.enforced
    assert keys.identify("proxy-handles-auth") == f"key-{fingerprint('proxy-handles-auth')}"
    assert keys.identify(None) == "anonymous"


def test_with_table_unknown_token_is_rejected(tmp_path):
    path = tmp_path / "workers"
    write(path, "bob k-bob\n")
    keys = WorkerKeys(str(path), clock=FakeClock())
    assert keys.identify("k-bob") == "bob"
    assert keys.identify("k-eve") is None
    assert keys.identify(None) is None


@given(st.text(min_size=1, max_size=64))
def test_fingerprint_never_contains_the_secret(secret):
    fp = fingerprint(secret)
    assert len(fp) == 12 and fp == hashlib.sha256(secret.encode()).hexdigest()[:12]
    if len(secret) >= 4:
        assert secret not in fp


def test_watched_file_parses_once_per_change(tmp_path):
    clock = FakeClock()
    path = tmp_path / "f"
    write(path, "1")
    calls = []
    watched = WatchedFile(str(path), lambda t: calls.append(t) or t, clock)
    for _ in range(5):
        watched.value()
        clock.now += 2
    assert calls == ["1"]
