"""CPU per message of two pieces of postier's loop-thread work, in-process, per tree.

The end-to-end bench (run.py) says what a message costs in all; these rows isolate two parts
of it that profiles of the worker's event loop point at, without sockets or disks, so that a
change to them can be measured in microseconds on a shared machine:

- `protocol`: the sans-I/O engine (`ServerConnection`) through one message's dialogue:
  greeting, EHLO, MAIL, RCPT, DATA, 2 KiB of content, QUIT, every command accepted with its
  default reply, the replies taken as bytes;
- `log-lines`: the seven INFO events a message logs (connect, helo, mail, rcpt, message,
  delivery, disconnect) through the daemon's log writer, batched per loop iteration as in a
  worker, written to /dev/null.

Each tree runs in a fresh interpreter with the tree first on its path; repeats alternate
between the trees (A, B, A, B...) and the table shows each row's median, in microseconds of
process CPU time per message.

    python3 bench/core_cost.py --trees /tmp/before,. --messages 5000 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROWS = ("protocol", "log-lines")
CONTENT = b"Subject: bench\r\n\r\n" + (b"x" * 70 + b"\r\n") * 28


def _protocol(messages: int) -> float:
    from postier.protocol import events as ev
    from postier.protocol.server import ServerConnection
    from postier.protocol.state import ServerConfig

    config = ServerConfig(hostname="bench.postier.test")
    steps = [
        b"EHLO src.example\r\n",
        b"MAIL FROM:<a@remote.example>\r\n",
        b"RCPT TO:<alice@example.org>\r\n",
        b"DATA\r\n",
        CONTENT + b".\r\n",
        b"QUIT\r\n",
    ]
    decided = (ev.Hello, ev.Mail, ev.Rcpt, ev.Data, ev.EndOfData)
    start = time.process_time()
    for _ in range(messages):
        conn = ServerConnection(config, peer_name="[127.0.0.1]")
        conn.greeting()
        for data in steps:
            conn.receive_data(data)
            while (event := conn.next_event()) is not ev.NEED_DATA:
                if isinstance(event, decided):
                    conn.decide(None)
            conn.data_to_send()
    return (time.process_time() - start) / messages * 1e6


def _log_lines(messages: int) -> float:
    import asyncio

    from postier import log
    from postier.inbound.peer import Peer

    log.setup("info", worker=0, stream=open(os.devnull, "w"))  # noqa: SIM115 - for the process

    class Queued:
        def __str__(self) -> str:
            return "250 2.0.0 OK: queued as 1K1MQF2WWGH00JQ4"

    async def run() -> float:
        log.attach_loop(asyncio.get_running_loop())
        peer = Peer(session_id="4ae402509", ip="127.0.0.1", port=53220, listener="mx")
        qid, sender, reply = "1K1MQF2WWGH00JQ4", "<a@remote.example>", Queued()
        start = time.process_time()
        for i in range(messages):
            peer.log("connect", peer=f"{peer.ip}:{peer.port}", listener="mx")
            peer.log("helo", helo="src.example", esmtp=True)
            peer.log("mail", qid=qid, sender=sender, size=None, requiretls=None)
            peer.log("rcpt", qid=qid, to="<alice@example.org>")
            peer.log("message", qid=qid, sender=sender, nrcpt=1, size=2194, result=250, reply=reply)
            log.line(
                "delivery", qid=qid, to="alice@example.org", mailbox="alice",
                status="delivered", reply="250 2.0.0 Delivered",
            )  # fmt: skip
            peer.log("disconnect", ip=peer.ip, reason="quit", transactions=1, seconds="0.010")
            if i % 20 == 19:  # twenty sessions' lines per loop iteration, as under load
                await asyncio.sleep(0)
        spent = time.process_time() - start
        log.attach_loop(None)
        return spent / messages * 1e6

    return asyncio.run(run())


def _child(tree: Path, messages: int) -> dict[str, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(messages)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=tree,
    )
    if out.returncode != 0:
        raise SystemExit(f"{tree}: the measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", default=".", help="postier checkouts, comma-separated")
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=5, help="runs per tree (median shown)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        figures = {"protocol": _protocol(args.child), "log-lines": _log_lines(args.child)}
        print(json.dumps(figures))
        return 0
    # Only here, in the parent: a child must import postier from its tree, first on its path.
    if __package__ in (None, ""):  # run as a script: python3 bench/core_cost.py
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.targets import tree_label

    trees = [Path(t).resolve() for t in args.trees.split(",") if t]
    runs: list[list[dict[str, float]]] = [[] for _ in trees]
    for _ in range(args.repeat):
        for i, tree in enumerate(trees):
            runs[i].append(_child(tree, args.messages))
    names = [f"#{i + 1} {tree_label(t)}" for i, t in enumerate(trees)]
    width = max(12, *(len(n) for n in names))
    header = f"{'us/msg':<10}" + "".join(f"  {n:>{width}}" for n in names)
    header += "  last/first" if len(trees) > 1 else ""
    print(f"{args.messages} messages per run, median of {args.repeat}, process CPU time")
    print(header)
    print("-" * len(header))
    for row in ROWS:
        medians = [statistics.median(r[row] for r in per_tree) for per_tree in runs]
        line = f"{row:<10}" + "".join(f"  {m:>{width}.1f}" for m in medians)
        if len(trees) > 1:
            line += f"  {medians[-1] / medians[0]:>9.2f}x"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
