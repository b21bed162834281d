"""A minimal appliance for the spool tests: a Spool and a SpoolWriter draining into InfluxDB.

Run as ``python tests/spool_app.py SPOOL URL DATABASE N_PUT [--exit-when-empty]``: opens the
spool, puts ``N_PUT`` scores (window starts T0 + i s, machine ``pump-07``), prints ``PUT n`` and
then the writer drains. With ``--exit-when-empty`` it stops cleanly once the spool is empty
(exit 0), otherwise it runs until it is killed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pdm_edge.config import SpoolConfig  # noqa: E402
from pdm_edge.store.influx import InfluxStore  # noqa: E402
from pdm_edge.store.spool import Spool, SpoolWriter  # noqa: E402
from pdm_edge.types import Score  # noqa: E402

T0 = 1_795_000_000 * 1_000_000_000


def main(argv: list[str]) -> int:
    spool_path, url, db, n_put = argv[0], argv[1], argv[2], int(argv[3])
    exit_when_empty = "--exit-when-empty" in argv
    spool = Spool(spool_path, max_records=1_000_000)
    writer = SpoolWriter(spool, InfluxStore(url, db, timeout_s=2),
                         SpoolConfig(batch_size=200, backoff_min_s=0.05, backoff_max_s=0.5))
    for i in range(0, n_put, 100):
        spool.put("score", [Score("plant1", "pump-07", "de", T0 + j * 1_000_000_000, float(j), 3.0, j > 3.0, "v1")
                            for j in range(i, min(i + 100, n_put))])
    print(f"PUT {n_put} depth {spool.depth()}", flush=True)
    writer.start()
    while True:
        if exit_when_empty and spool.depth() == 0:
            ok = writer.stop(10)
            print(f"DRAINED {writer.stats().drained}", flush=True)
            return 0 if ok else 1
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
