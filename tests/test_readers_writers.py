"""Readers and writers together (issue 7): three dashboard readers poll one run's database
while `prismatic collect` writes 1,000 rows a second into it. Neither side may ever see
"database is locked", and the WAL file must stay bounded although readers never stop."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from collector_support import RUN_A, CollectProcess, db_path, start_python, steps_in, wait_for

from prismatic import db

RATE = 1000  # rows a second
SECONDS = 12.0


@pytest.mark.slow
def test_three_readers_polling_while_the_collector_writes_1000_rows_a_second(
    tmp_path: Path,
) -> None:
    path = db_path(tmp_path, RUN_A)
    with CollectProcess(tmp_path) as collector:
        sender = start_python(
            f"cs.rate_sender_main({collector.address!r}, {RUN_A!r}, {RATE}, {SECONDS})"
        )
        wait_for(path.is_file, what="the database to appear")
        readers = [
            start_python(f"cs.dashboard_reader_main({str(path)!r}, {SECONDS}, {keep_open})")
            for keep_open in (True, True, False)  # two stay connected, one reconnects each poll
        ]

        # Watch the WAL file the whole time the readers poll and the collector writes.
        wal = Path(f"{path}-wal")
        peak_wal = 0
        while sender.poll() is None:
            peak_wal = max(peak_wal, wal.stat().st_size if wal.exists() else 0)
            time.sleep(0.02)
        reports = [json.loads(r.communicate(timeout=120)[0]) for r in readers]
        sent = json.loads(sender.communicate(timeout=60)[0])["sent"]
        wait_for(lambda: len(steps_in(tmp_path, RUN_A)) == sent, timeout=60)
        collector.signal(signal.SIGTERM)
        code = collector.wait(60)

    written = os.path.getsize(path)
    for report in reports:
        assert report["errors"] == [], report["errors"]
        assert report["polls"] > 20 and report["max_step"] > sent // 2, report
    assert code == 0
    log = "\n".join(collector.lines)
    assert "locked" not in log and "flush_failed" not in log, log
    assert sent == int(RATE * SECONDS)
    # The collector wrote far more than the WAL limit in all; the WAL never outgrew it.
    assert written > db.JOURNAL_SIZE_LIMIT, written
    assert peak_wal <= db.JOURNAL_SIZE_LIMIT, (peak_wal, written)
