"""The dashboard's history: SQLite (WAL), bounded, surviving restarts.

What is stored, per variant and series (keys of `catalogue`):
- counters as their *increase* over each collection interval (histogram buckets per bucket),
  computed by `Deltas` from consecutive readings of each replica: a counter that went down, a
  series that vanished or a later process start means the replica restarted, and its increase is
  then its new value (never negative, no spike); a replica that stopped answering is no reset of
  the variant's sum (each replica keeps its own baseline, saved with every interval so a
  restarted dashboard carries on where it stopped);
- the charted gauges as values;
- `("_tick",)`: the seconds each interval covers, so rates are increase / time covered, and
  gaps (the dashboard was down) are gaps, not zeros.

Two resolutions: `fine` (one row per collection interval, default 5 s) kept 24 h, and `coarse`
(1 minute: counters summed, gauges averaged) kept 30 days. Complete minutes move from fine to
coarse as they end; rows past their retention are deleted; past `max_bytes` the oldest minutes
go first. A range total is coarse for its whole minutes plus fine for the edges.

A `History` is the one writer (a lock file keeps a second dashboard off the same file); `Reader`s
(the API, `zai-proxy usage`) open their own connections. Every connection belongs to one thread:
the service calls them through `DbThread`, so the event loop never waits on SQLite.
"""

from __future__ import annotations

import asyncio
import fcntl
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from extproc.dashboard.catalogue import Key, Reading

FINE_KEEP = 24 * 3600
COARSE_KEEP = 30 * 24 * 3600
COARSE_STEP = 60
# A replica's saved baseline is used after a dashboard restart only if it is this recent: older,
# its counters may have been reset and grown past it meanwhile, so it starts afresh.
BASELINE_MAX_AGE = 15 * 60
TICK: Key = ("_tick",)
SLOW_HOUSEKEEPING = 3600  # seconds between prunes of the minutes, replicas and series
SIZE_CHECK = 600  # seconds between checks of the size limit
SCHEMA = 1

COUNTER, GAUGE = "c", "g"
_LABELS = 3  # label columns a, b, c of the series table

T = TypeVar("T")


class HistoryLocked(RuntimeError):
    """Another dashboard already writes this history file."""


# --------------------------------------------------------------------------- increases

@dataclass
class ReplicaState:
    variant: str
    counters: dict[Key, float]
    started: float | None
    seen: float  # time of its last reading


@dataclass
class Increase:
    """What one replica's reading added since the one before."""

    values: dict[Key, float]  # increases (cumulative histogram buckets still cumulative)
    covered: float  # seconds since the replica's previous reading (0: first sight)
    restarted: bool = False
    first: bool = False  # no baseline yet: nothing counted, the reading is the baseline


def _dropped(new: float, old: float) -> bool:
    # Counters summed in another order can differ in the last bits: not a reset.
    return new < old - max(1e-9, abs(old) * 1e-9)


class Deltas:
    """Each replica's last reading, and the increases of the next one.

    A replica seen for the first time is a baseline: what it counted before is not known to be
    new (the dashboard may start long after it) -- unless its process started while the
    dashboard was watching (`watching_since`, from the exposition's `_created` times): then
    everything it counted is new, and counted.
    """

    def __init__(self, max_age: float = BASELINE_MAX_AGE, watching_since: float | None = None) -> None:
        self.max_age = max_age
        self.watching_since = watching_since
        self.replicas: dict[str, ReplicaState] = {}

    def update(self, replica: str, variant: str, reading: Reading, now: float) -> Increase:
        prev = self.replicas.get(replica)
        new = reading.counters
        self.replicas[replica] = ReplicaState(variant, dict(new), reading.started, now)
        if prev is None or prev.variant != variant or now - prev.seen > self.max_age:
            if (reading.started is not None and self.watching_since is not None
                    and self.watching_since <= reading.started <= now):
                return Increase({k: v for k, v in new.items() if v > 0}, now - reading.started,
                                restarted=True, first=True)
            return Increase({}, 0.0, first=True)
        covered = max(0.0, now - prev.seen)
        old = prev.counters
        restarted = (
            (reading.started is not None and prev.started is not None
             and reading.started > prev.started + 1e-3)
            or any(_dropped(value, old.get(key, 0.0)) for key, value in new.items())
            or any(key not in new for key, value in old.items() if value > 0))
        if restarted:
            return Increase({k: v for k, v in new.items() if v > 0}, covered, restarted=True)
        values = {}
        for key, value in new.items():
            grown = value - old.get(key, 0.0)
            if grown > 0:
                values[key] = grown
        return Increase(values, covered)

    def forget_older_than(self, cutoff: float) -> list[str]:
        gone = [r for r, state in self.replicas.items() if state.seen < cutoff]
        for replica in gone:
            del self.replicas[replica]
        return gone


# ------------------------------------------------------------------------------ storage

@dataclass
class VariantTick:
    """One variant's collection interval, as stored."""

    increments: dict[Key, float] = field(default_factory=dict)  # per bucket for histograms
    gauges: dict[Key, float] = field(default_factory=dict)
    covered: float = 0.0  # seconds the increments cover


@dataclass
class Total:
    value: float = 0.0
    last: int | None = None  # time of the last interval that added to it

    def add(self, value: float, last: int | None) -> None:
        self.value += value
        if last is not None and (self.last is None or last > self.last):
            self.last = last


def _columns(key: Key) -> tuple[str, str, str, str]:
    labels = tuple(key[1:]) + ("",) * (_LABELS - len(key) + 1)
    if len(labels) > _LABELS:
        raise ValueError(f"a series key has at most {_LABELS} labels: {key}")
    return (key[0], *labels)  # type: ignore[return-value]


def _key(name: str, a: str, b: str, c: str) -> Key:
    labels = [a, b, c]
    while labels and labels[-1] == "":
        labels.pop()
    return (name, *labels)


def floor_to(t: float, step: int) -> int:
    return int(t // step) * step


def ceil_to(t: float, step: int) -> int:
    return -int(-t // step) * step


def connect(path: str | Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        if not Path(path).exists():
            raise FileNotFoundError(f"no dashboard history at {path}")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA cache_size = -8192")  # 8 MiB page cache: memory stays bounded
    conn.execute("PRAGMA temp_store = MEMORY")  # small sorts; no temp files (read-only root fs)
    return conn


class Reader:
    """Queries of the history, on one connection (one thread)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._coarse_cache: dict[tuple[Any, ...], dict[tuple[str, Key], Total]] = {}

    @classmethod
    def open(cls, path: str | Path) -> "Reader":
        return cls(connect(path, readonly=True))

    def close(self) -> None:
        self.conn.close()

    # -- metadata -----------------------------------------------------------------------------

    def meta(self, key: str, default: str | None = None) -> str | None:
        try:
            row = self.conn.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        except sqlite3.OperationalError:  # an empty file: no tables yet
            return default
        return default if row is None else row[0]

    @property
    def watermark(self) -> int:
        """Every fine row before this time is in the coarse table too."""
        return int(self.meta("watermark", "0") or 0)

    @property
    def interval(self) -> int:
        return int(self.meta("interval", "5") or 5)

    @property
    def last_tick(self) -> int | None:
        value = self.meta("last_tick")
        return None if value is None else int(value)

    def variants(self) -> list[str]:
        return [r[0] for r in self.conn.execute(
            "SELECT DISTINCT variant FROM series WHERE name = ? ORDER BY variant", (TICK[0],))]

    # -- totals over a range ----------------------------------------------------------------

    def _sum(self, table: str, names: tuple[str, ...], variant: str | None, lo: int,
             hi: int | None) -> dict[tuple[str, Key], Total]:
        marks = ",".join("?" * len(names))
        sql = (f"SELECT s.variant, s.name, s.a, s.b, s.c, SUM(f.v), MAX(f.t) FROM series s "
               f"CROSS JOIN {table} f ON f.sid = s.sid AND f.t >= ?"
               + (" AND f.t < ?" if hi is not None else "")
               + f" WHERE s.name IN ({marks})" + (" AND s.variant = ?" if variant else "")
               + " GROUP BY s.sid")
        args: list[Any] = [lo] + ([hi] if hi is not None else []) + list(names)
        if variant:
            args.append(variant)
        out: dict[tuple[str, Key], Total] = {}
        for v, name, a, b, c, total, last in self.conn.execute(sql, args):
            out.setdefault((v, _key(name, a, b, c)), Total()).add(total, last)
        return out

    def sums(self, start: float, names: Iterable[str], variant: str | None = None
             ) -> dict[tuple[str, Key], Total]:
        """(variant, key) -> the counters' increase since `start` (and when it last grew): whole
        minutes from the coarse table, the edges from the fine one. Before the fine table's
        retention the range starts at a whole minute."""
        names = tuple(sorted(set(names)))
        start = math.ceil(start)
        mark = self.watermark
        first_minute = ceil_to(start, COARSE_STEP)
        if first_minute >= mark:
            return self._sum("fine", names, variant, start, None)
        out = self._sum("fine", names, variant, start, first_minute) if start < first_minute else {}
        key = (names, variant, first_minute, mark)
        coarse = self._coarse_cache.get(key)
        if coarse is None:
            if len(self._coarse_cache) > 32:
                self._coarse_cache.clear()
            coarse = self._coarse_cache[key] = self._sum("coarse", names, variant, first_minute, mark)
        for part in (coarse, self._sum("fine", names, variant, mark, None)):
            for k, total in part.items():
                out.setdefault(k, Total()).add(total.value, total.last)
        return out

    # -- points of a chart --------------------------------------------------------------------

    def grouped(self, table: str, names: Iterable[str], variants: Iterable[str] | None,
                start: int, step: int, gauge: bool = False,
                where: Mapping[str, str] | None = None) -> list[tuple[str, Key, int, float]]:
        """(variant, key, bucket start, value) for each series and `step`-long bucket since
        `start`: the sum of the bucket's rows, or their average for gauges."""
        names = tuple(names)
        marks = ",".join("?" * len(names))
        agg = "AVG(f.v)" if gauge else "SUM(f.v)"
        sql = (f"SELECT s.variant, s.name, s.a, s.b, s.c, (f.t / ?) * ? AS bucket, {agg} "
               f"FROM series s CROSS JOIN {table} f ON f.sid = s.sid AND f.t >= ? "
               f"WHERE s.name IN ({marks})")
        args: list[Any] = [step, step, start, *names]
        variants = list(variants) if variants is not None else None
        if variants is not None:
            sql += f" AND s.variant IN ({','.join('?' * len(variants))})"
            args += variants
        for column, value in (where or {}).items():
            assert column in ("a", "b", "c")
            sql += f" AND s.{column} = ?"
            args.append(value)
        sql += " GROUP BY s.sid, bucket"
        return [(v, _key(n, a, b, c), bucket, value)
                for v, n, a, b, c, bucket, value in self.conn.execute(sql, args)]

    def latest(self, name: str, a: str = "", since: float | None = None) -> dict[str, tuple[int, float]]:
        """variant -> (time, value) of the newest fine row of a series (gauges)."""
        sql = ("SELECT s.variant, f.t, f.v FROM series s CROSS JOIN fine f ON f.sid = s.sid "
               "WHERE s.name = ? AND s.a = ? AND f.t = (SELECT MAX(t) FROM fine g WHERE g.sid = s.sid)")
        out: dict[str, tuple[int, float]] = {}
        for variant, t, v in self.conn.execute(sql, (name, a)):
            if since is None or t >= since:
                out[variant] = (t, v)
        return out


class History(Reader):
    """The writer: records each interval, downsamples, prunes, keeps baselines."""

    def __init__(self, path: str | Path, interval: int = 5, *, max_bytes: int = 512 << 20,
                 fine_keep: int = FINE_KEEP, coarse_keep: int = COARSE_KEEP,
                 clock: Callable[[], float] = time.time, durable: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(f"{self.path}.lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise HistoryLocked(f"another dashboard already writes {self.path} (DASHBOARD_DB): "
                                "stop it, or give this one its own file") from None
        conn = connect(self.path)
        super().__init__(conn)
        self.resolution = interval  # seconds between collections: the fine table's step
        self.max_bytes = max_bytes
        self.fine_keep = fine_keep
        self.coarse_keep = coarse_keep
        self.clock = clock
        self._sids: dict[tuple[str, str, Key], int] = {}
        self._mark = 0
        self._last_slow = 0  # last hourly housekeeping
        self._last_size_check = 0
        self._setup()
        if not durable:  # simulations (tests, the benchmark): no fsync at checkpoints
            self.conn.execute("PRAGMA synchronous = OFF")

    @property
    def watermark(self) -> int:
        return self._mark

    def _setup(self) -> None:
        c = self.conn
        c.execute("PRAGMA auto_vacuum = INCREMENTAL")  # before the first table: lets the file shrink
        c.execute("PRAGMA journal_mode = WAL")
        c.execute("PRAGMA synchronous = NORMAL")
        c.execute("PRAGMA journal_size_limit = 33554432")
        c.executescript("""
            CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS series (
                sid INTEGER PRIMARY KEY, variant TEXT NOT NULL, kind TEXT NOT NULL,
                name TEXT NOT NULL, a TEXT NOT NULL, b TEXT NOT NULL, c TEXT NOT NULL,
                UNIQUE (variant, name, a, b, c));
            CREATE TABLE IF NOT EXISTS fine (
                sid INTEGER NOT NULL, t INTEGER NOT NULL, v REAL NOT NULL,
                PRIMARY KEY (sid, t)) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS coarse (
                sid INTEGER NOT NULL, t INTEGER NOT NULL, v REAL NOT NULL,
                PRIMARY KEY (sid, t)) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS replicas (
                replica TEXT PRIMARY KEY, variant TEXT NOT NULL, seen REAL NOT NULL, started REAL);
            CREATE TABLE IF NOT EXISTS baselines (
                replica TEXT NOT NULL, sid INTEGER NOT NULL, v REAL NOT NULL,
                PRIMARY KEY (replica, sid)) WITHOUT ROWID;
        """)
        schema = self.meta("schema")
        if schema is not None and int(schema) != SCHEMA:
            raise RuntimeError(f"{self.path} has history schema {schema}, this dashboard writes "
                               f"{SCHEMA}: move the file away (or point DASHBOARD_DB elsewhere)")
        previous = self.meta("interval")
        self._set_meta(schema=SCHEMA, interval=self.resolution)
        if previous is not None and int(previous) != self.resolution:
            # Fine rows of another interval would be misread: keep the minutes, drop the rest.
            self._downsample(floor_to(self.clock(), COARSE_STEP) + COARSE_STEP)
            self.conn.execute("DELETE FROM fine")
        self._mark = int(self.meta("watermark", "0") or 0)
        for sid, variant, kind, name, a, b, c in self.conn.execute(
                "SELECT sid, variant, kind, name, a, b, c FROM series"):
            self._sids[(variant, kind, _key(name, a, b, c))] = sid

    def _set_meta(self, **values: object) -> None:
        self.conn.executemany("INSERT INTO meta (k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                              [(k, str(v)) for k, v in values.items()])

    def close(self) -> None:
        try:
            self.conn.close()
        finally:
            self._lock.close()

    def _sid(self, variant: str, kind: str, key: Key) -> int:
        found = self._sids.get((variant, kind, key))
        if found is not None:
            return found
        columns = _columns(key)
        self.conn.execute("INSERT OR IGNORE INTO series (variant, kind, name, a, b, c) "
                          "VALUES (?, ?, ?, ?, ?, ?)", (variant, kind, *columns))
        sid = self.conn.execute("SELECT sid FROM series WHERE variant = ? AND name = ? AND a = ? "
                                "AND b = ? AND c = ?", (variant, *columns)).fetchone()[0]
        self._sids[(variant, kind, key)] = sid
        return sid

    # -- writing ------------------------------------------------------------------------------

    def record(self, t: int, variants: Mapping[str, VariantTick],
               baselines: Iterable[tuple[str, ReplicaState, bool]] = ()) -> None:
        """One collection interval ending at `t` (a multiple of the interval): each variant's
        increases and gauges, and the replicas' baselines (replica, state, replace all keys?)."""
        t = int(t)
        counters: list[tuple[int, int, float]] = []
        gauges: list[tuple[int, int, float]] = []
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            for variant, tick in variants.items():
                if tick.covered > 0:
                    counters.append((self._sid(variant, COUNTER, TICK), t, float(tick.covered)))
                for key, value in tick.increments.items():
                    if value and math.isfinite(value):
                        counters.append((self._sid(variant, COUNTER, key), t, float(value)))
                for key, value in tick.gauges.items():
                    if math.isfinite(value):
                        gauges.append((self._sid(variant, GAUGE, key), t, float(value)))
            c.executemany("INSERT INTO fine (sid, t, v) VALUES (?, ?, ?) "
                          "ON CONFLICT(sid, t) DO UPDATE SET v = v + excluded.v", counters)
            c.executemany("INSERT INTO fine (sid, t, v) VALUES (?, ?, ?) "
                          "ON CONFLICT(sid, t) DO UPDATE SET v = excluded.v", gauges)
            for replica, state, replace in baselines:
                self._save_baseline(replica, state, replace)
            if self._mark == 0:
                self._mark = floor_to(t, COARSE_STEP)
            minute = floor_to(t, COARSE_STEP)
            rolled = minute > self._mark
            if rolled:
                self._downsample(minute)
            self._set_meta(watermark=self._mark, last_tick=t)
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        if rolled:
            self.maintain(t)

    def _downsample(self, until: int) -> None:
        """Complete minutes [watermark, until) from fine into coarse."""
        if until <= self._mark:
            return
        self.conn.execute(
            "INSERT INTO coarse (sid, t, v) "
            "SELECT f.sid, (f.t / 60) * 60 AS minute, "
            "CASE s.kind WHEN 'g' THEN AVG(f.v) ELSE SUM(f.v) END "
            "FROM series s CROSS JOIN fine f ON f.sid = s.sid AND f.t >= ? AND f.t < ? "
            "WHERE true GROUP BY f.sid, minute "
            "ON CONFLICT(sid, t) DO UPDATE SET v = excluded.v", (self._mark, until))
        self._mark = until
        self._coarse_cache.clear()

    def _save_baseline(self, replica: str, state: ReplicaState, replace: bool) -> None:
        c = self.conn
        c.execute("INSERT INTO replicas (replica, variant, seen, started) VALUES (?, ?, ?, ?) "
                  "ON CONFLICT(replica) DO UPDATE SET variant = excluded.variant, "
                  "seen = excluded.seen, started = excluded.started",
                  (replica, state.variant, state.seen, state.started))
        if replace:
            c.execute("DELETE FROM baselines WHERE replica = ?", (replica,))
        c.executemany("INSERT INTO baselines (replica, sid, v) VALUES (?, ?, ?) "
                      "ON CONFLICT(replica, sid) DO UPDATE SET v = excluded.v",
                      [(replica, self._sid(state.variant, COUNTER, key), value)
                       for key, value in state.counters.items() if value])

    def baselines(self, now: float, max_age: float = BASELINE_MAX_AGE) -> dict[str, ReplicaState]:
        """The replicas' saved baselines recent enough to carry on from."""
        out: dict[str, ReplicaState] = {}
        for replica, variant, seen, started in self.conn.execute(
                "SELECT replica, variant, seen, started FROM replicas WHERE seen >= ?", (now - max_age,)):
            counters = {_key(n, a, b, c): v for n, a, b, c, v in self.conn.execute(
                "SELECT s.name, s.a, s.b, s.c, b.v FROM baselines b JOIN series s ON s.sid = b.sid "
                "WHERE b.replica = ?", (replica,))}
            out[replica] = ReplicaState(variant, counters, started, seen)
        return out

    def forget_replicas(self, replicas: Iterable[str]) -> None:
        for replica in replicas:
            self.conn.execute("DELETE FROM baselines WHERE replica = ?", (replica,))
            self.conn.execute("DELETE FROM replicas WHERE replica = ?", (replica,))

    # -- housekeeping ---------------------------------------------------------------------------

    def maintain(self, now: float) -> None:
        """Prune what has outlived its retention (fine every minute, the rest hourly), and keep the
        file under `max_bytes`."""
        c = self.conn
        c.execute("DELETE FROM fine WHERE sid IN (SELECT sid FROM series) AND t < ?",
                  (int(now) - self.fine_keep - COARSE_STEP,))
        if now - self._last_slow >= SLOW_HOUSEKEEPING:
            self._last_slow = int(now)
            c.execute("DELETE FROM coarse WHERE sid IN (SELECT sid FROM series) AND t < ?",
                      (int(now) - self.coarse_keep,))
            c.execute("DELETE FROM replicas WHERE seen < ?", (now - 24 * 3600,))
            c.execute("DELETE FROM baselines WHERE replica NOT IN (SELECT replica FROM replicas)")
            c.execute(
                "DELETE FROM series WHERE "
                "NOT EXISTS (SELECT 1 FROM fine f WHERE f.sid = series.sid) AND "
                "NOT EXISTS (SELECT 1 FROM coarse g WHERE g.sid = series.sid) AND "
                "sid NOT IN (SELECT sid FROM baselines)")
            self._sids = {(v, k, _key(n, a, b, cc)): sid for sid, v, k, n, a, b, cc in c.execute(
                "SELECT sid, variant, kind, name, a, b, c FROM series")}
            self._coarse_cache.clear()
            self._shrink()
        if now - self._last_size_check >= SIZE_CHECK:
            self._last_size_check = int(now)
            if self.used_bytes() > self.max_bytes:
                self._trim(now)

    def used_bytes(self) -> int:
        pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
        free = self.conn.execute("PRAGMA freelist_count").fetchone()[0]
        size = self.conn.execute("PRAGMA page_size").fetchone()[0]
        return (pages - free) * size

    def file_bytes(self) -> int:
        return sum(os.path.getsize(p) for p in (self.path, Path(f"{self.path}-wal"))
                   if os.path.exists(p))

    def _shrink(self, force: bool = False) -> None:
        """Give free pages back to the file system once they are a sizeable part of it."""
        pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
        free = self.conn.execute("PRAGMA freelist_count").fetchone()[0]
        if force or free > max(256, pages // 8):
            self.conn.execute("PRAGMA incremental_vacuum")
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _trim(self, now: float) -> None:
        """Over the size limit: drop the oldest minutes, a day at a time (down to a day of
        minutes), then the oldest fine rows, an hour at a time (down to an hour), until the
        history uses at most 80 % of the limit (so this does not run again at once)."""
        c = self.conn
        goal = self.max_bytes * 0.8
        for age in range(self.coarse_keep - 86400, 86400 - 1, -86400):
            c.execute("DELETE FROM coarse WHERE sid IN (SELECT sid FROM series) AND t < ?",
                      (int(now) - age,))
            if self.used_bytes() <= goal:
                break
        else:
            for age in range(self.fine_keep - 3600, 3600 - 1, -3600):
                c.execute("DELETE FROM fine WHERE sid IN (SELECT sid FROM series) AND t < ?",
                          (int(now) - age,))
                if self.used_bytes() <= goal:
                    break
        self._coarse_cache.clear()
        self._shrink(force=True)

    def row_counts(self) -> dict[str, int]:
        return {table: self.conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                for table in ("series", "fine", "coarse", "baselines")}


class DbThread:
    """One thread that owns one connection: `await db.run(fn, *args)` runs `fn` there."""

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        return self._pool.submit(fn, *args).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
