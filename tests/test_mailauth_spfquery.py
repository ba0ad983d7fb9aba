"""Cross-check: libspf2's spfquery and our pyspf-based check agree on the same zone.

spfquery only asks port 53 of the resolv.conf nameserver, so both run in a network and mount
namespace made for the test (`unshare --net --mount`), with the responder on 127.0.0.1:53.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mailauth_dns import txt_zone

pytestmark = pytest.mark.skipif(
    shutil.which("spfquery") is None or shutil.which("unshare") is None or os.geteuid() != 0,
    reason="needs spfquery, unshare and root (for a private network namespace)",
)

ZONE = txt_zone(
    {
        "pass.test": "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 -all",
        "fail.test": "v=spf1 -all",
        "soft.test": "v=spf1 ~all",
        "neutral.test": "v=spf1 ?all",
        "macro.test": "v=spf1 exists:%{i}._ip.macro.test -all",
        "syntax.test": "v=spf1 ip4:192.0.2.300 -all",
        "helo.test": "v=spf1 ip4:192.0.2.9 -all",
        "inc.test": "v=spf1 include:pass.test -all",
    }
)
ZONE["192.0.2.7._ip.macro.test"] = {"A": ["127.0.0.2"]}
ZONE["none.test"] = {"A": ["192.0.2.1"]}

CASES = [
    ("192.0.2.5", "a@pass.test", "client.test"),
    ("198.51.100.1", "a@pass.test", "client.test"),
    ("2001:db8::1", "a@pass.test", "client.test"),
    ("192.0.2.5", "a@fail.test", "client.test"),
    ("192.0.2.5", "a@soft.test", "client.test"),
    ("192.0.2.5", "a@neutral.test", "client.test"),
    ("192.0.2.5", "a@none.test", "client.test"),
    ("192.0.2.7", "a@macro.test", "client.test"),
    ("192.0.2.8", "a@macro.test", "client.test"),
    ("192.0.2.5", "a@syntax.test", "client.test"),
    ("192.0.2.5", "a@inc.test", "client.test"),
    ("192.0.2.9", "", "helo.test"),
    ("192.0.2.10", "", "helo.test"),
]


def test_spfquery_agrees():
    inside = Path(__file__).with_name("spfquery_inside.py")
    proc = subprocess.run(
        ["unshare", "--net", "--mount", "--fork", sys.executable, str(inside)],
        input=json.dumps({"zone": ZONE, "cases": CASES}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    pairs = json.loads(proc.stdout)
    assert len(pairs) == len(CASES)
    for case, (theirs, ours) in zip(CASES, pairs, strict=True):
        assert theirs == ours, (case, theirs, ours)
