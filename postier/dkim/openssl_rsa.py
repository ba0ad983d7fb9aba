"""dkimpy's RSA done by OpenSSL (`cryptography`): the signature and its check, nothing else.

Why: dkimpy computes RSA in pure Python (`pow` on Python integers, byte-by-byte conversions):
7 ms of CPU per RSA-2048 signature (every message we relay) and 0.27 ms per verification
(every signed message the mx takes in); OpenSSL takes 0.7 ms and 0.03 ms
(`python3 bench/mailauth_cost.py --primitives`).

The seam: dkimpy has no crypto back-end hook, but its `DKIM` class calls two module-level
names, `dkim.RSASSA_PKCS1_v1_5_sign(hash, key)` and `dkim.RSASSA_PKCS1_v1_5_verify(hash,
signature, key)`. `install()`, run once when this module is first imported, rebinds those two
names to `sign` and `verify` below. They take the OpenSSL path only for `cryptography` key
objects, which only postier hands to dkimpy (`private_key`, `public_key` here); a key in
dkimpy's own form (a dict of integers) goes to dkimpy's own functions, so any other use of
dkimpy in the process (the tests' reference signatures, `dkim.sign` with a PEM) is unchanged.
dkimpy keeps everything else: canonicalisation, tags, key records, the minimum key size, the
folding of the field.

Same results: RSASSA-PKCS1-v1_5 is deterministic, so OpenSSL's signature is dkimpy's byte for
byte; a key too small for the digest raises dkimpy's `DigestTooLargeError` as dkimpy does; a
signature shorter than the modulus (leading zero octets left out) is accepted, as dkimpy does.
One difference, on purpose: a signature whose integer is not below the modulus is invalid
(RFC 8017 §5.2.2, and OpenSSL, hence OpenDKIM and rspamd), where dkimpy reduces it modulo n.
"""

from __future__ import annotations

from typing import Any

import dkim
import dkim.crypto
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

__all__ = ["install", "private_key", "public_key", "sign", "verify"]

# dkimpy's pure-Python functions, kept for keys in dkimpy's own form.
_dkimpy_sign = dkim.crypto.RSASSA_PKCS1_v1_5_sign
_dkimpy_verify = dkim.crypto.RSASSA_PKCS1_v1_5_verify

_HASHES: dict[str, hashes.HashAlgorithm] = {"sha256": hashes.SHA256(), "sha1": hashes.SHA1()}
_PADDING = padding.PKCS1v15()
# Below this many octets of modulus a DigestInfo (at most 83 octets for SHA-512) plus the
# 11 octets of padding may not fit: only then is dkimpy's own size check worth running.
_ROOMY_OCTETS = 128


def private_key(pem: bytes) -> rsa.RSAPrivateKey:
    """An RSA private key (PEM, PKCS#8 or PKCS#1) for `dkim.DKIM.gen_header`, signing with
    OpenSSL. Raises ValueError for anything that is not an unencrypted RSA key."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"not an RSA key: {type(key).__name__}")
    return key


def public_key(parsed: dict[str, int]) -> rsa.RSAPublicKey | dict[str, int]:
    """The OpenSSL form of a public key that dkimpy parsed (`dkim.evaluate_pk`'s dict).

    dkimpy keeps parsing the record, so the records it accepts stay exactly the same; a key
    whose numbers OpenSSL refuses (an even or tiny exponent) is returned as it came, and
    dkimpy's own code judges its signatures as before."""
    try:
        return rsa.RSAPublicNumbers(parsed["publicExponent"], parsed["modulus"]).public_key()
    except ValueError:
        return parsed


def _algorithm(hash: Any, octets: int) -> hashes.HashAlgorithm:
    """The hash algorithm of dkimpy's hash object; DigestTooLargeError as dkimpy raises it."""
    if octets < _ROOMY_OCTETS:
        dkim.crypto.EMSA_PKCS1_v1_5_encode(hash, octets)
    return _HASHES[hash.name.lower()]


def sign(hash: Any, key: Any) -> bytes | bytearray:
    """`RSASSA_PKCS1_v1_5_sign` for dkimpy: `hash` is its hash object of the header fields."""
    if not isinstance(key, rsa.RSAPrivateKey):
        return _dkimpy_sign(hash, key)
    algorithm = _algorithm(hash, (key.key_size + 7) // 8)
    return key.sign(hash.digest(), _PADDING, utils.Prehashed(algorithm))


def verify(hash: Any, signature: bytes, key: Any) -> bool:
    """`RSASSA_PKCS1_v1_5_verify` for dkimpy: True when `signature` signs `hash` under `key`."""
    if not isinstance(key, rsa.RSAPublicKey):
        return _dkimpy_verify(hash, signature, key)
    octets = (key.key_size + 7) // 8
    algorithm = _algorithm(hash, octets)
    if len(signature) != octets:  # dkimpy reads the octets as one integer, whatever their count
        value = int.from_bytes(signature, "big")
        if value.bit_length() > octets * 8:
            return False  # above the modulus: invalid (RFC 8017 §5.2.2)
        signature = value.to_bytes(octets, "big")
    try:
        key.verify(signature, hash.digest(), _PADDING, utils.Prehashed(algorithm))
    except InvalidSignature:
        return False
    return True


def install() -> None:
    """Point dkimpy's DKIM class at `sign` and `verify` (idempotent)."""
    dkim.RSASSA_PKCS1_v1_5_sign = sign
    dkim.RSASSA_PKCS1_v1_5_verify = verify


install()
