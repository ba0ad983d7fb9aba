"""What making one message durable costs the kernel, by layout, without any SMTP around it.

Issue 17 asked whether the spool copy is needed when the only recipient is a Maildir on the
same filesystem: writing the message straight into the Maildir's tmp/ and renaming it into
new/ saves a hard link and an unlink per message. This measures both sequences as postier's
thread pool runs them (several threads at once, 2 KiB messages, fsync of the file and of
new/), in one process, interleaved, each run in a fresh directory, and reports messages/s
and the CPU of the process per message (user and system: the file system's work is system
time in the calling thread):

- ``spool-link``: create in the spool directory, write, fsync, close; link into new/; fsync
  new/; unlink the spool name (postier's Maildir delivery);
- ``tmp-rename``: create in the Maildir's tmp/, write, fsync, close; rename into new/;
  fsync new/ (the Maildir specification's own sequence, as the aiosmtpd baseline does it);
- ``no-fsync``: tmp-rename without either fsync, the floor.

Nothing is deleted until the end: on these machines' journal-less ext4 a freed inode makes
the creations of the next seconds to minutes slower (see bench/README.md), which would tax
the next run.

    python3 bench/storage_cost.py --threads 8 --messages 3000 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python3 bench/storage_cost.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# postier's own durability steps, as the Maildir and the queue call them
from postier.delivery.fsutil import fsync_dir, write_all

MESSAGE = b"x" * 2300  # a 2 KiB body with our trace header lines


def _write(path: str, *, sync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_all(fd, MESSAGE)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def spool_link(base: str, i: int) -> None:
    spool = f"{base}/spool/{i}.spool"
    _write(spool, sync=True)
    os.link(spool, f"{base}/md/new/{i}")
    fsync_dir(f"{base}/md/new")
    os.unlink(spool)


def tmp_rename(base: str, i: int) -> None:
    tmp = f"{base}/md/tmp/{i}"
    _write(tmp, sync=True)
    os.rename(tmp, f"{base}/md/new/{i}")
    fsync_dir(f"{base}/md/new")


def no_fsync(base: str, i: int) -> None:
    tmp = f"{base}/md/tmp/{i}"
    _write(tmp, sync=False)
    os.rename(tmp, f"{base}/md/new/{i}")


MODES: dict[str, Callable[[str, int], None]] = {
    "spool-link": spool_link,
    "tmp-rename": tmp_rename,
    "no-fsync": no_fsync,
}


def one_run(mode: str, base: Path, threads: int, messages: int) -> tuple[float, float]:
    """(messages/s, CPU ms per message) of one run in a fresh directory under `base`."""
    work = Path(tempfile.mkdtemp(prefix=f"{mode}-", dir=base))
    for sub in ("spool", "md/tmp", "md/new", "md/cur"):
        (work / sub).mkdir(parents=True)
    step = MODES[mode]
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: step(str(work), i), range(messages)))
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return messages / (t1 - t0), cpu / messages * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="spool-link,tmp-rename,no-fsync")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("-n", "--messages", type=int, default=3000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tmpdir", help="a directory on the disk to measure (not tmpfs)")
    opts = p.parse_args(argv)
    modes = opts.modes.split(",")
    base = Path(tempfile.mkdtemp(prefix="postier-storage-", dir=opts.tmpdir))
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    try:
        for i in range(opts.repeat):
            for mode in modes:
                rate, cpu = one_run(mode, base, opts.threads, opts.messages)
                results[mode].append((rate, cpu))
                print(f"# run {i + 1} {mode}: {rate:.0f} msgs/s, {cpu:.3f} ms CPU/msg", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\n{opts.messages} messages x {len(MESSAGE)} B, {opts.threads} threads, median of "
          f"{opts.repeat}; load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"{'layout':<12} {'msgs/s':>8} {'CPU ms/msg':>11}")
    for mode in modes:
        rates, cpus = zip(*results[mode], strict=True)
        print(f"{mode:<12} {statistics.median(rates):>8.0f} {statistics.median(cpus):>11.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
