"""Doctor's certificate check against a real postier server on loopback, with a private CA.

Good, wrong name, expiring within 14 days, and signed by a CA nobody trusts. Each
world is its own server with its own certificate, and the zone is the correct one for it, so
the certificate problem is the only one.
"""

from __future__ import annotations

import trustme

from tests.doctorenv import HOST, doctor_world


def test_good_certificate_no_problem() -> None:
    with doctor_world() as world:
        code, problems, out = world.check()
    assert (code, problems) == (0, []), out


def test_certificate_for_another_name() -> None:
    with doctor_world(cert_names=("other.example.test",)) as world:
        code, problems, out = world.check()
        port = world.server.mx_port
    assert code == 1
    assert len(problems) == 1, out
    assert problems[0].startswith(f"PROBLEM certificate {HOST}:{port}: "), out
    assert f"not valid for the name {HOST}" in problems[0]
    assert f"certbot certonly -d {HOST}" in problems[0]


def test_certificate_expiring_in_seven_days() -> None:
    with doctor_world(valid_days=7) as world:
        code, problems, out = world.check()
    assert code == 1
    assert len(problems) == 1, out
    assert problems[0].startswith(f"PROBLEM certificate {HOST}:"), out
    assert "expires on" in problems[0] and "in 6 days" in problems[0]


def test_certificate_from_an_unknown_ca() -> None:
    with doctor_world() as world:
        stranger = world.root / "stranger-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(stranger))
        code, problems, out = world.check(None, "--tls-ca-file", str(stranger))  # the last wins
    assert code == 1
    assert len(problems) == 1, out
    assert problems[0].startswith(f"PROBLEM certificate {HOST}:"), out
    assert "does not verify" in problems[0]
