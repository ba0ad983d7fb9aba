"""`postier gen-cert`: a self-signed certificate so STARTTLS works before a real one exists.

SMTP between servers is opportunistic: senders encrypt to an MX without checking its
certificate, so a self-signed one already buys confidentiality against passive listeners. This
command exists so the quick start gets that on the first run, with nothing to edit.

Key type: ECDSA P-256 by default. Handshakes are several times cheaper for the server than
RSA 2048 (which matters for TLS sessions per second), keys and certificates are small, every
TLS 1.2+ stack supports it (we refuse anything older anyway), and it is certbot's default
too. `--key-type rsa` (2048 bits) remains for peers that can only verify RSA.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import errno
import ipaddress
import os
import sys
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from postier.errors import ConfigError
from postier.tls import CHAIN_NAME, KEY_NAME

__all__ = ["add_arguments", "ensure_self_signed", "make_self_signed", "run"]

#: Ten years: nobody validates a self-signed certificate, and a surprise expiry would make
#: strict peers fail STARTTLS on a server whose operator forgot the quick-start certificate.
DEFAULT_DAYS = 3650

_PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _normalise_hostname(hostname: str) -> str:
    """An A-label host name, or ValueError saying what is wrong with it."""
    name = hostname.strip().rstrip(".")
    if not name:
        raise ValueError("the host name is empty")
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(name))
    try:
        ascii_name = name.encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise ValueError(f"{hostname!r} is not a valid host name ({exc})") from exc
    labels = ascii_name.split(".")
    for label in labels:
        if (
            not label
            or len(label) > 63
            or label.startswith("-")
            or label.endswith("-")
            or not all(c.isalnum() or c == "-" for c in label)
        ):
            raise ValueError(f"{hostname!r} is not a valid host name")
    return ascii_name


def make_self_signed(
    hostname: str, *, days: int = DEFAULT_DAYS, key_type: str = "ecdsa"
) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) for `hostname`, also valid for localhost and loopback.

    The loopback names are there so local programs (and tests) can connect by address.
    """
    name = _normalise_hostname(hostname)
    key: _PrivateKey
    if key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif key_type == "ecdsa":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ValueError(f"unknown key type {key_type!r} (ecdsa or rsa)")
    alt: list[x509.GeneralName] = []
    for entry in (name, "localhost", "127.0.0.1", "::1"):
        try:
            general: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(entry))
        except ValueError:
            general = x509.DNSName(entry)
        if general not in alt:
            alt.append(general)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    usage = x509.KeyUsage(
        digital_signature=True,
        key_encipherment=key_type == "rsa",
        content_commitment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))  # tolerate a peer's clock skew
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        # clientAuth too: the same pair may identify postier when it relays to a peer.
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _write_atomically(path: Path, data: bytes, mode: int, *, overwrite: bool) -> None:
    """Write to a temporary name in the same directory, fsync, then link or rename into place.

    Readers (a watching daemon) never see half a file; without `overwrite`, os.link refuses
    an existing name atomically instead of trusting an earlier exists() check.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)  # before any byte of a key is written
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_pair(
    cert_path: Path,
    key_path: Path,
    hostname: str,
    *,
    days: int = DEFAULT_DAYS,
    key_type: str = "ecdsa",
    overwrite: bool = False,
) -> None:
    """Generate and write a pair; FileExistsError if a file exists and overwrite is False."""
    if not overwrite:
        for path in (cert_path, key_path):
            if path.exists() or path.is_symlink():
                raise FileExistsError(errno.EEXIST, "already exists", str(path))
    cert_pem, key_pem = make_self_signed(hostname, days=days, key_type=key_type)
    for path in (cert_path, key_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(key_path, key_pem, 0o600, overwrite=overwrite)
    _write_atomically(cert_path, cert_pem, 0o644, overwrite=overwrite)


def ensure_self_signed(
    cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str], hostname: str
) -> bool:
    """Create a self-signed pair unless both files exist; True when it wrote them.

    One file without the other is most likely a real certificate whose key went elsewhere:
    that is reported as a ConfigError, never papered over by overwriting it.
    """
    cert, key = Path(cert_path), Path(key_path)
    present = [p for p in (cert, key) if p.exists()]
    if len(present) == 2:
        return False
    if present:
        missing = key if present[0] == cert else cert
        raise ConfigError(
            f"{present[0]} exists but {missing} does not; "
            "give both files of the pair, or remove the one that is there"
        )
    try:
        write_pair(cert, key, hostname)
    except FileExistsError:  # another process created them first: theirs is as good
        return False
    except ValueError as exc:
        raise ConfigError(f"hostname: {exc}") from exc
    except OSError as exc:
        raise ConfigError(
            f"{exc.filename or cert}: cannot write the self-signed "
            f"certificate: {exc.strerror or exc}"
        ) from exc
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the gen-cert options on the subcommand's parser."""
    parser.add_argument(
        "hostname", metavar="HOSTNAME", help="the name peers connect to (the server's -H name)"
    )
    parser.add_argument(
        "-o",
        "--output-dir",
        metavar="DIR",
        default=None,
        help=f"write DIR/{CHAIN_NAME} and DIR/{KEY_NAME} (certbot's layout, "
        "so DIR can also sit in a certificate directory); default: .",
    )
    parser.add_argument(
        "--cert",
        metavar="FILE",
        default=None,
        help="certificate file to write (with --key, instead of -o)",
    )
    parser.add_argument(
        "--key",
        metavar="FILE",
        default=None,
        help="private key file to write, mode 0600 (with --cert)",
    )
    parser.add_argument(
        "--days",
        type=int,
        default=DEFAULT_DAYS,
        metavar="N",
        help=f"validity in days (default {DEFAULT_DAYS})",
    )
    parser.add_argument(
        "--key-type",
        choices=("ecdsa", "rsa"),
        default="ecdsa",
        help="ECDSA P-256 (default, fast) or RSA 2048",
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing files")


def _usage(message: str) -> int:
    print(f"postier gen-cert: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Carry out `postier gen-cert`; 0 done, 2 bad usage, 1 could not write."""
    if (args.cert is None) != (args.key is None):
        return _usage("--cert and --key go together")
    if args.cert is not None and args.output_dir is not None:
        return _usage("use either -o DIR or --cert FILE --key FILE, not both")
    if args.days < 1:
        return _usage(f"--days must be at least 1, not {args.days}")
    try:
        _normalise_hostname(args.hostname)
    except ValueError as exc:
        return _usage(str(exc))
    if args.cert is not None:
        cert_path, key_path = Path(args.cert), Path(args.key)
        if cert_path.resolve() == key_path.resolve():
            return _usage("--cert and --key must be different files")
    else:
        out = Path(args.output_dir or ".")
        cert_path, key_path = out / CHAIN_NAME, out / KEY_NAME
    try:
        write_pair(
            cert_path,
            key_path,
            args.hostname,
            days=args.days,
            key_type=args.key_type,
            overwrite=args.force,
        )
    except FileExistsError as exc:
        print(
            f"postier gen-cert: {exc.filename} already exists; use --force to replace it",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        print(
            f"postier gen-cert: {exc.filename or cert_path}: {exc.strerror or exc}", file=sys.stderr
        )
        return 1
    print(
        f"wrote certificate {cert_path} (self-signed, {args.key_type}, "
        f"{args.days} days, for {args.hostname}, localhost, 127.0.0.1, ::1)"
    )
    print(f"wrote private key {key_path} (mode 0600)")
    return 0
