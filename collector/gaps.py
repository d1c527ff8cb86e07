"""Nothing lost: notice what the collector missed and replay it from the trainers' spool files.

A trainer appends every message to `<run>/spool/rank<N>.msgpack` before sending it, and the
message carries its byte offset in that file (`spool_offset`), which works as a sequence
number that survives trainer restarts (a resumed run appends to the same file; `seq` restarts
at 0). For every spool file the collector keeps a cursor: the end of the prefix it has
ingested. Then:

- a message that starts at the cursor is the next one: the cursor moves past it;
- a message that starts past the cursor shows a gap (the publisher dropped messages while the
  collector was down, frozen or slow, or this collector process has not seen the start): the
  file is replayed from the cursor to its end, which includes the message itself. At most once
  a second per file; meanwhile messages are handled as they come and the cursor waits;
- a message that starts before the cursor was already ingested by such a replay: skipped, if
  the spool holds the same bytes there (else it came from elsewhere and is handled).

A message the collector rejects never moves a cursor, so the next gap replay reads it again
and counts its rejection a second time.

No later message reveals a lost tail (the trainer exited while the collector was away), so a
periodic scan of `<runs dir>/*/spool/` also replays the unread part of every spool file that has
stopped growing. Cursors are saved in `<run>/spool/cursor.json` once the rows before them are
committed, so a restarted collector reads only what is new. Replays go through
`Collector.handle()` into idempotent upserts: a step is stored once however often it is read.

This relies on the collector and the trainers sharing the runs folder (`prismatic up`, docker
compose). A trainer on another machine has its spool there; a gap in its messages is logged,
and its folder can be copied over and ingested with `prismatic collect --replay RUN_DIR`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collector.replay import SPOOL_DIR, replay_file, spool_files, spool_path, warn_if_torn
from prismatic import db

if TYPE_CHECKING:
    from collector.service import Collector

log = logging.getLogger(__name__)
CURSOR_NAME = "cursor.json"
SCAN_INTERVAL_S = 10.0  # how often the runs folder is scanned for unread spool tails
QUIET_S = 5.0  # a spool file unchanged this long is no longer being written to
SAVE_INTERVAL_S = 5.0  # how often a run's cursors are saved at most
REPLAY_COOLDOWN_S = 1.0  # how often a gap in one spool file triggers a replay at most


@dataclass
class _Cursor:
    offset: int = 0  # end of the ingested prefix of the file
    warned_missing: bool = False  # warned once that the spool is not here to replay from
    next_replay: float = 0.0  # monotonic time before which a gap does not trigger a replay


class SpoolWatch:
    """The collector's spool cursors: gap detection, tail scans, saved cursors."""

    def __init__(
        self,
        collector: Collector,
        *,
        scan_interval_s: float = SCAN_INTERVAL_S,
        quiet_s: float = QUIET_S,
        save_interval_s: float = SAVE_INTERVAL_S,
    ) -> None:
        self.c = collector
        self.scan_interval_s = scan_interval_s
        self.quiet_s = quiet_s
        self.save_interval_s = save_interval_s
        self.gaps = 0  # gaps seen in live messages
        self.replays = 0  # replays that found something to read
        self.replayed = 0  # messages read back from spool files
        self._cursors: dict[Path, _Cursor] = {}
        self._loaded: set[Path] = set()  # run folders whose cursor.json was read
        self._dirty: set[Path] = set()  # run folders with cursors moved since their last save
        self._last_save: dict[Path, float] = {}  # run folder -> when (monotonic)
        # Runs whose buffered rows were dropped (a flush failed too often): their cursors stay
        # where they were saved, behind the dropped rows, so a restart or --replay reads them.
        self._held_back: set[str] = set()
        self._last_scan = -float("inf")

    # --- live messages -------------------------------------------------------------------------

    def observe(self, message: dict[str, Any], data: bytes) -> bool:
        """Account for one message from the socket; False if it is already ingested."""
        offset = message.get("spool_offset")
        if offset is None:
            return True  # a sender without a spool: nothing to compare or replay
        path = spool_path(self.c.runs_dir / message["run"], message["rank"])
        cursor = self._cursor(path)
        end = offset + len(data)
        if offset == cursor.offset:
            self._advance(path, cursor, end)
            return True
        if offset < cursor.offset:
            if _size(path) >= cursor.offset:
                return not _in_spool(path, offset, data)  # read already, unless it is not ours
            cursor.offset = 0  # the file shrank: a new run folder; read it afresh

        # A gap. Reading the spool from the cursor normally takes in this message too. At most
        # once a second per file: until then the cursor waits at the gap.
        now = time.monotonic()
        if now < cursor.next_replay:
            return True
        cursor.next_replay = now + REPLAY_COOLDOWN_S
        self.gaps += 1
        self._replay(path, cursor, f"gap: message at byte {offset}, expected {cursor.offset}")
        if cursor.offset >= end and _in_spool(path, offset, data):
            return False
        self._warn_missing(path, cursor, offset)
        if not path.exists():
            self._advance(path, cursor, end)  # no spool here to wait at: follow the sender
        return True

    def _advance(self, path: Path, cursor: _Cursor, offset: int) -> None:
        cursor.offset = offset
        self._dirty.add(path.parent.parent)

    def _warn_missing(self, path: Path, cursor: _Cursor, offset: int) -> None:
        if cursor.warned_missing:
            return
        cursor.warned_missing = True
        log.warning(
            "gaps: %s lacks bytes %d..%d that its trainer published (a trainer on another "
            "machine?); copy its run folder here and run prismatic collect --replay RUN_DIR",
            path,
            cursor.offset,
            offset,
        )

    # --- replay --------------------------------------------------------------------------------

    def _replay(self, path: Path, cursor: _Cursor, why: str) -> None:
        if not path.is_file():
            return
        start = cursor.offset
        done = replay_file(self.c, path, start)
        if done.end <= start:
            return
        self.replays += 1
        self.replayed += done.messages
        self._advance(path, cursor, done.end)
        log.info(
            "gaps: replayed %d messages (bytes %d..%d) of %s (%s)",
            done.messages,
            start,
            done.end,
            path,
            why,
        )

    def replay_unread(self, run_dir: Path) -> int:
        """Replay what this runs folder has not ingested yet of every spool file in `run_dir`:
        from its saved cursor when the run's database backs it, else from the start. Returns
        the messages read."""
        before = self.replayed
        for path in spool_files(run_dir):
            cursor = self._cursor(path)
            self._replay(path, cursor, "--replay")
            warn_if_torn(path, cursor.offset)
        return self.replayed - before

    def scan(self) -> None:
        """Replay the unread tail of every spool file in the runs folder that stopped growing."""
        now = time.time()
        for path in sorted(self.c.runs_dir.glob(f"*/{SPOOL_DIR}/rank*.msgpack")):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            cursor = self._cursor(path)
            if st.st_size > cursor.offset and now - st.st_mtime >= self.quiet_s:
                self._replay(path, cursor, "unread tail of a spool file no longer written")

    # --- periodic work -------------------------------------------------------------------------

    def run_due(self) -> None:
        """The collector's chores call this on every turn of its loop."""
        now = time.monotonic()
        if now - self._last_scan >= self.scan_interval_s:
            self._last_scan = now
            self.scan()
        if self._dirty:
            self.save_committed(now)

    def save_committed(self, now: float | None = None, force: bool = False) -> None:
        """Save the cursors of runs whose rows up to the cursor are all in the database."""
        now = time.monotonic() if now is None else now
        for run_dir in list(self._dirty):
            last_save = self._last_save.get(run_dir, -float("inf"))
            if not force and now - last_save < self.save_interval_s:
                continue
            if not self._committed(run_dir.name):
                continue
            self._save(run_dir)
            self._last_save[run_dir] = now
            self._dirty.discard(run_dir)

    def _committed(self, run_hash: str) -> bool:
        if run_hash in self._held_back:
            return False
        return not self.c.has_unwritten(run_hash) and not self.c._pending.has_run(run_hash)

    def hold_back(self, run_hash: str) -> None:
        """Rows of this run were dropped unwritten: never save its cursors again (in this
        collector's life), so the saved ones still point before the dropped rows."""
        if run_hash not in self._held_back:
            self._held_back.add(run_hash)
            log.error(
                "gaps: %s's spool cursors are no longer saved: a restarted collector, or "
                "--replay, reads its spool from the last saved point, dropped rows included",
                run_hash,
            )

    def _own(self, run_dir: Path) -> bool:
        """Whether `run_dir` is in this collector's runs folder. A cursor says what one runs
        folder's database holds: --replay of a run folder into another runs folder neither
        trusts nor writes the folder's cursor.json, and reads its spool from the start."""
        try:
            return run_dir.parent.resolve() == self.c.runs_dir.resolve()
        except OSError:
            return False

    # --- cursors -------------------------------------------------------------------------------

    def _cursor(self, path: Path) -> _Cursor:
        cursor = self._cursors.get(path)
        if cursor is None:
            run_dir = path.parent.parent
            if run_dir not in self._loaded:
                self._loaded.add(run_dir)
                self._load(run_dir)
            cursor = self._cursors.setdefault(path, _Cursor())
        return cursor

    def _load(self, run_dir: Path) -> None:
        file = run_dir / SPOOL_DIR / CURSOR_NAME
        # The database this collector writes the run to (for --replay of a folder elsewhere,
        # not the folder's own): without it, the rows a saved cursor vouches for are not
        # there, and the spool is read again from the start.
        if not self._own(run_dir) or not (run_dir / db.DB_NAME).is_file():
            return
        try:
            saved = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("gaps: ignoring unreadable %s (%s); its spool is read again", file, exc)
            return
        if not isinstance(saved, dict):
            return
        for name, offset in saved.items():
            path = run_dir / SPOOL_DIR / str(name)
            if not isinstance(offset, int) or offset < 0 or path.parent != file.parent:
                continue
            if _size(path) >= offset:  # a smaller file is a new one: read it from the start
                self._cursors[path] = _Cursor(offset=offset)

    def _save(self, run_dir: Path) -> None:
        folder = run_dir / SPOOL_DIR
        if not folder.is_dir() or not self._own(run_dir):
            return  # no spool here (a remote trainer), or another runs folder's: see _own
        offsets = {p.name: c.offset for p, c in self._cursors.items() if p.parent == folder}
        file = folder / CURSOR_NAME
        tmp = folder / f".{CURSOR_NAME}.tmp"
        try:
            tmp.write_text(json.dumps(dict(sorted(offsets.items()))), encoding="utf-8")
            os.replace(tmp, file)
        except OSError as exc:
            log.warning("gaps: could not save %s: %s", file, exc)


def _in_spool(path: Path, offset: int, data: bytes) -> bool:
    """Whether `data` is what the spool holds at `offset` (not a message from elsewhere)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(len(data)) == data
    except OSError:
        return False


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
