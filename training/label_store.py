"""The flywheel's label store: human yes/no/skip judgements of remover candidates, in SQLite.

RORem (arXiv 2501.00740, sec. 3.2) grows its data with people who look at (source, mask, result) and say
whether the removal is good; those labels train the discriminator, which then labels the next round. This
module keeps those labels. One file, ``DIR/labels.sqlite`` next to the candidates of
:mod:`cleanplate.training.flywheel`, stdlib ``sqlite3`` in WAL mode, a connection per call (safe from the
label server's worker threads and from several processes).

Schema (``PRAGMA user_version`` = 1)::

    items(id TEXT PRIMARY KEY, ord INTEGER, source TEXT, mask TEXT, result TEXT, gt TEXT NULL,
          seed INTEGER, bundle TEXT, round INTEGER, added_at TEXT)
    labels(id INTEGER PRIMARY KEY AUTOINCREMENT, item_id TEXT -> items.id, label TEXT in (yes, no, skip),
           labeler TEXT, round INTEGER, created_at TEXT)

``items`` mirrors ``candidates.jsonl`` (paths relative to DIR; :meth:`LabelStore.sync` adds new lines).
``labels`` is the history: who said what about which item, and when (UTC, ISO 8601 with ms); ``round`` is
the flywheel round of the item. Several labelers may label the same item; a labeler may change their mind
(a new row). :meth:`LabelStore.undo` deletes the labeler's most recent row: an undo is a slip corrected,
not an opinion.

Export policy (:meth:`LabelStore.decisions`): per item, each labeler's *latest* label counts; a latest
"skip" is an abstention. Then

* ``majority`` (default): yes when the labelers' yes votes outnumber their no votes, no when the reverse,
  a tie leaves the item out;
* ``latest``: the most recent of those yes/no votes, whoever gave it.

Items with fewer than ``min_votes`` yes/no votes are left out. The decision becomes RORem's
discriminator label: ``score`` 1 (yes: a good removal) or 0 (no), ``GT`` = the candidate judged, as
``cleanplate data disc-labels`` writes it, so ``cleanplate train discriminator`` takes the export as is.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from cleanplate.errors import ErrorCode, InputError
from cleanplate.imaging import write_atomic

DB_NAME = "labels.sqlite"
SCHEMA_VERSION = 1
LABELS = ("yes", "no", "skip")
Policy = Literal["majority", "latest"]
POLICIES: tuple[str, ...] = ("majority", "latest")
MAX_LABELER_LEN = 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    ord INTEGER NOT NULL,
    source TEXT NOT NULL,
    mask TEXT NOT NULL,
    result TEXT NOT NULL,
    gt TEXT,
    seed INTEGER,
    bundle TEXT,
    round INTEGER NOT NULL DEFAULT 1,
    added_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id TEXT NOT NULL REFERENCES items(id),
    label TEXT NOT NULL CHECK (label IN ('yes', 'no', 'skip')),
    labeler TEXT NOT NULL,
    round INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS labels_item ON labels(item_id);
CREATE INDEX IF NOT EXISTS labels_labeler ON labels(labeler, item_id);
"""


def utc_now() -> str:
    """Now in UTC, ISO 8601 with milliseconds (``2026-01-02T03:04:05.678+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def check_labeler(name: str | None) -> str:
    """A labeler name, stripped: 1..64 printable characters. Raises InputError ("bad_labeler")."""
    name = (name or "").strip()
    if not name or len(name) > MAX_LABELER_LEN or not name.isprintable():
        raise InputError(f"labeler name must be 1..{MAX_LABELER_LEN} printable characters, got {name!r}",
                         code=ErrorCode.BAD_LABELER)
    return name


@dataclass(frozen=True)
class Item:
    """One candidate to judge; paths relative to the flywheel directory."""

    id: str
    ord: int
    source: str
    mask: str
    result: str
    gt: str | None
    seed: int | None
    bundle: str | None
    round: int


@dataclass(frozen=True)
class Label:
    id: int
    item_id: str
    label: str
    labeler: str
    round: int
    created_at: str


@dataclass(frozen=True)
class Decision:
    """An item's exported label under a policy: ``score`` 1 (yes) or 0 (no)."""

    item: Item
    score: int
    yes: int
    no: int
    labelers: tuple[str, ...]
    labeled_at: str  # the newest vote that counted


class LabelStore:
    """``DIR/labels.sqlite``; created on first use. All methods open their own connection."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise InputError(f"no such flywheel directory: {self.dir}", code=ErrorCode.BAD_OPTION)
        self.path = self.dir / DB_NAME
        with self._db() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise InputError(f"{self.path}: schema version {version} is newer than this cleanplate",
                                 code=ErrorCode.BAD_OPTION)
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._synced: tuple[int, int] | None = None

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)  # autocommit; BEGIN where needed
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA foreign_keys = ON")
            db.row_factory = sqlite3.Row
            yield db
        finally:
            db.close()

    # -- items -------------------------------------------------------------------------------------
    def add_items(self, items: Iterable[dict[str, Any]]) -> int:
        """Insert candidates (dicts with id, source, mask, result, and optional gt, seed, bundle, round);
        ids already present are left as they are. Returns how many were new."""
        rows = list(items)
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            start = db.execute("SELECT COALESCE(MAX(ord), -1) + 1 FROM items").fetchone()[0]
            before = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            now = utc_now()
            for k, r in enumerate(rows):
                db.execute("INSERT OR IGNORE INTO items VALUES (?,?,?,?,?,?,?,?,?,?)",
                           (r["id"], start + k, r["source"], r["mask"], r["result"], r.get("gt"), r.get("seed"),
                            r.get("bundle"), int(r.get("round", 1)), now))
            after = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            db.execute("COMMIT")
        return after - before

    def sync(self, candidates_file: str | os.PathLike | None = None) -> int:
        """Add the candidates of ``candidates.jsonl`` (default ``DIR/candidates.jsonl``) not yet in the store.
        Cheap when the file has not changed since the last call. Returns how many were added."""
        from .flywheel import read_candidates

        path = Path(candidates_file) if candidates_file else self.dir / "candidates.jsonl"
        try:
            st = path.stat()
        except FileNotFoundError:
            return 0
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._synced:
            return 0
        added = self.add_items(c.as_record() for c in read_candidates(self.dir))
        self._synced = stamp
        return added

    def items(self, rounds: Sequence[int] | None = None) -> list[Item]:
        query, args = "SELECT * FROM items", []
        if rounds:
            query += f" WHERE round IN ({','.join('?' * len(rounds))})"
            args = [int(r) for r in rounds]
        with self._db() as db:
            return [_item(row) for row in db.execute(query + " ORDER BY ord", args)]

    def item(self, item_id: str) -> Item | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
        return None if row is None else _item(row)

    # -- labels ------------------------------------------------------------------------------------
    def add_label(self, item_id: str, label: str, labeler: str) -> Label:
        """Record ``labeler``'s ``label`` ("yes" | "no" | "skip") for an item, stamped now (UTC).

        Raises:
            InputError: "bad_label" for another label, "bad_labeler" for an empty or overlong name,
                "unknown_item" for an id not in the store.
        """
        if label not in LABELS:
            raise InputError(f"label must be one of {', '.join(LABELS)}, got {label!r}", code=ErrorCode.BAD_LABEL)
        labeler = check_labeler(labeler)
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT round FROM items WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                db.execute("ROLLBACK")
                raise InputError(f"no item {item_id!r} in {self.path}", code=ErrorCode.UNKNOWN_ITEM)
            now = utc_now()
            cur = db.execute("INSERT INTO labels (item_id, label, labeler, round, created_at) VALUES (?,?,?,?,?)",
                             (item_id, label, labeler, row["round"], now))
            db.execute("COMMIT")
            return Label(int(cur.lastrowid), item_id, label, labeler, int(row["round"]), now)

    def undo(self, labeler: str) -> Label | None:
        """Delete ``labeler``'s most recent label and return it (None when they have none)."""
        labeler = check_labeler(labeler)
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT * FROM labels WHERE labeler = ? ORDER BY id DESC LIMIT 1", (labeler,)).fetchone()
            if row is not None:
                db.execute("DELETE FROM labels WHERE id = ?", (row["id"],))
            db.execute("COMMIT")
        return None if row is None else _label(row)

    def labels(self, item_id: str | None = None, labeler: str | None = None) -> list[Label]:
        """Label history in the order given, optionally for one item and/or one labeler."""
        query, args = "SELECT * FROM labels WHERE 1=1", []
        if item_id is not None:
            query, args = query + " AND item_id = ?", [*args, item_id]
        if labeler is not None:
            query, args = query + " AND labeler = ?", [*args, labeler]
        with self._db() as db:
            return [_label(row) for row in db.execute(query + " ORDER BY id", args)]

    def next_item(self, labeler: str, rounds: Sequence[int] | None = None) -> Item | None:
        """The first item (in candidate order) that ``labeler`` has not labeled yet (a skip counts as
        labeled for this), None when none is left."""
        labeler = check_labeler(labeler)
        query = ("SELECT * FROM items WHERE id NOT IN (SELECT item_id FROM labels WHERE labeler = ?)")
        args: list[Any] = [labeler]
        if rounds:
            query += f" AND round IN ({','.join('?' * len(rounds))})"
            args += [int(r) for r in rounds]
        with self._db() as db:
            row = db.execute(query + " ORDER BY ord LIMIT 1", args).fetchone()
        return None if row is None else _item(row)

    def progress(self, labeler: str | None = None, rounds: Sequence[int] | None = None) -> dict[str, int]:
        """Counts: ``total`` items; for ``labeler`` (if given) ``done`` (items they labeled) and their latest
        ``yes``/``no``/``skip`` counts and ``remaining``; ``labeled`` items with a yes/no from anyone."""
        where, args = "", []
        if rounds:
            where = f" WHERE round IN ({','.join('?' * len(rounds))})"
            args = [int(r) for r in rounds]
        with self._db() as db:
            total = db.execute("SELECT COUNT(*) FROM items" + where, args).fetchone()[0]
            labeled = db.execute(
                "SELECT COUNT(DISTINCT item_id) FROM labels WHERE label != 'skip' AND item_id IN "
                f"(SELECT id FROM items{where})", args).fetchone()[0]
            out = {"total": total, "labeled": labeled}
            if labeler:
                counts = dict.fromkeys(LABELS, 0)
                for row in db.execute(
                        "SELECT l.label FROM labels l JOIN (SELECT item_id, MAX(id) AS id FROM labels WHERE labeler = ? "
                        f"GROUP BY item_id) m ON l.id = m.id WHERE l.item_id IN (SELECT id FROM items{where})",
                        [labeler, *args]):
                    counts[row["label"]] += 1
                done = sum(counts.values())
                out.update(done=done, remaining=total - done, **counts)
        return out

    # -- export ------------------------------------------------------------------------------------
    def decisions(self, policy: Policy = "majority", *, min_votes: int = 1, rounds: Sequence[int] | None = None,
                  labelers: Sequence[str] | None = None) -> tuple[list[Decision], dict[str, int]]:
        """Each item's label under ``policy`` (see the module docstring) and counts of what was left out.

        Args:
            policy: "majority" or "latest".
            min_votes: yes/no votes (latest per labeler) an item needs, >= 1.
            rounds: only items of these rounds; labelers: only these labelers' votes (None: all).
        Returns:
            (decisions in candidate order, {"items", "decided", "yes", "no", "ties", "too_few_votes",
            "unlabeled"}).
        Raises:
            InputError: "bad_option" for an unknown policy or min_votes < 1.
        """
        if policy not in POLICIES:
            raise InputError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}", code=ErrorCode.BAD_OPTION)
        if min_votes < 1:
            raise InputError(f"min_votes must be >= 1, got {min_votes}", code=ErrorCode.BAD_OPTION)
        latest: dict[tuple[str, str], Label] = {}
        for lab in self.labels():
            if labelers is None or lab.labeler in labelers:
                latest[(lab.item_id, lab.labeler)] = lab  # history is in id order: the last one wins
        votes: dict[str, list[Label]] = {}
        for (item_id, _), lab in latest.items():
            if lab.label != "skip":
                votes.setdefault(item_id, []).append(lab)
        out: list[Decision] = []
        counts = {"items": 0, "decided": 0, "yes": 0, "no": 0, "ties": 0, "too_few_votes": 0, "unlabeled": 0}
        for item in self.items(rounds):
            counts["items"] += 1
            v = sorted(votes.get(item.id, []), key=lambda lab: lab.id)
            if not v:
                counts["unlabeled"] += 1
                continue
            if len(v) < min_votes:
                counts["too_few_votes"] += 1
                continue
            yes = sum(lab.label == "yes" for lab in v)
            no = len(v) - yes
            if policy == "latest":
                score = int(v[-1].label == "yes")
            elif yes == no:
                counts["ties"] += 1
                continue
            else:
                score = int(yes > no)
            counts["decided"] += 1
            counts["yes" if score else "no"] += 1
            out.append(Decision(item, score, yes, no, tuple(sorted({lab.labeler for lab in v})), v[-1].created_at))
        return out, counts

    def export_entries(self, meta_dir: str | os.PathLike, policy: Policy = "majority", *, min_votes: int = 1,
                       rounds: Sequence[int] | None = None, labelers: Sequence[str] | None = None,
                       ) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """The decisions as RORem discriminator ``meta.json`` entries with paths relative to ``meta_dir``:
        ``{"source", "mask", "GT" (the candidate), "score" (1/0), "label_kind": "remover", "labeled_by":
        "human", "item", "round", "votes": {"yes", "no"}, "labelers", "labeled_at"}``."""
        decisions, counts = self.decisions(policy, min_votes=min_votes, rounds=rounds, labelers=labelers)
        base = Path(meta_dir).resolve()

        def rel(p: str) -> str:
            return Path(os.path.relpath((self.dir / p).resolve(), base)).as_posix()

        entries = [{"source": rel(d.item.source), "mask": rel(d.item.mask), "GT": rel(d.item.result),
                    "score": d.score, "label_kind": "remover", "labeled_by": "human", "item": d.item.id,
                    "round": d.item.round, "votes": {"yes": d.yes, "no": d.no}, "labelers": list(d.labelers),
                    "labeled_at": d.labeled_at} for d in decisions]
        return entries, counts

    def export(self, out: str | os.PathLike, policy: Policy = "majority", *, min_votes: int = 1,
               rounds: Sequence[int] | None = None, labelers: Sequence[str] | None = None) -> dict[str, int]:
        """Write the export to ``out`` (a meta.json, atomically; paths relative to its folder); returns the
        counts of :meth:`decisions`. Raises InputError ("no_labels") when no item has a decision."""
        self.sync()
        out = Path(out)
        entries, counts = self.export_entries(out.parent, policy, min_votes=min_votes, rounds=rounds,
                                              labelers=labelers)
        if not entries:
            raise InputError(f"no labelled item to export from {self.path} ({_describe(counts)})",
                             code=ErrorCode.NO_LABELS)
        write_atomic(out, (json.dumps(entries, indent=1) + "\n").encode())
        return counts


def _describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items())


def _item(row: sqlite3.Row) -> Item:
    return Item(row["id"], row["ord"], row["source"], row["mask"], row["result"], row["gt"], row["seed"],
                row["bundle"], row["round"])


def _label(row: sqlite3.Row) -> Label:
    return Label(row["id"], row["item_id"], row["label"], row["labeler"], row["round"], row["created_at"])


def label_dict(label: Label) -> dict[str, Any]:
    return asdict(label)
