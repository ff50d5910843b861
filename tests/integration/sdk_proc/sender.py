"""A gate controller process for the crash test: reports entries through the SDK's outbox,
printing each event id once `entry()` returned (so the test knows what was promised).

    python -m tests.integration.sdk_proc.sender URL KEY_ID KEY_FILE OUTBOX COUNT [--flush-only]
"""

from __future__ import annotations

import sys
from pathlib import Path

from citypark_connector import ConnectorClient


def main(argv: list[str]) -> int:
    url, key_id, key_file, outbox, count = argv[:5]
    flush_only = "--flush-only" in argv
    client = ConnectorClient(
        key_id,
        Path(key_file).read_text(),
        base_url=url,
        outbox_path=outbox,
        eligibility_refresh_s=3600,
    )
    if flush_only:
        left = client.flush(timeout=60)
        print(f"left {left}", flush=True)  # noqa: T201 - the test reads it
        client.close()
        return 0 if left == 0 else 1
    for n in range(int(count)):
        result = client.entry(plate=f"苏E{n % 100000:05d}", plate_color="blue", lane="E1")
        print(f"{result.event_id} {result.status}", flush=True)  # noqa: T201
    client.flush(timeout=60)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
