"""The protocol's messages as Flower ConfigRecords, packed and unpacked in one place."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord

from fedtune.common.secagg.protocol import Cohort, Reveal


class RecordError(ValueError):
    """A secure-aggregation record that is missing entries or has the wrong types."""


def cohort_to_record(cohort: Cohort) -> dict:
    return {"names": cohort.names, "c-public": cohort.c_public, "s-public": cohort.s_public,
            "neighbours": cohort.neighbours, "threshold": cohort.threshold,
            "graph-seed": cohort.graph_seed, "sig-public": cohort.sig_public,
            "key-signatures": cohort.key_signatures}


BYTE_COLUMNS = ("c-public", "s-public", "sig-public", "key-signatures")


def cohort_to_json(cohort: Cohort) -> dict:
    """The cohort record with its keys in hex: how a client keeps it between messages."""
    return {key: [b.hex() for b in value] if key in BYTE_COLUMNS else value
            for key, value in cohort_to_record(cohort).items()}


def cohort_from_json(stored: Mapping[str, Any]) -> Cohort:
    return cohort_from_record({key: [bytes.fromhex(b) for b in value]
                               if key in BYTE_COLUMNS else value
                               for key, value in stored.items()})


def cohort_from_record(record: Mapping[str, Any]) -> Cohort:
    try:
        cohort = Cohort(list(record["names"]), list(record["c-public"]),
                        list(record["s-public"]), int(record["neighbours"]),
                        int(record["threshold"]), int(record["graph-seed"]),
                        list(record["sig-public"]), list(record["key-signatures"]))
    except KeyError as error:
        raise RecordError(f"cohort record lacks {error}") from None
    columns = (cohort.c_public, cohort.s_public, cohort.sig_public, cohort.key_signatures)
    if any(len(c) != len(cohort.names) for c in columns):
        raise RecordError("cohort record columns differ in length")
    return cohort


KEY_FIELDS = ("c-public", "s-public", "sig-public", "key-signature")


def keys_to_record(signed_keys: tuple[bytes, bytes, bytes, bytes]) -> ConfigRecord:
    """Step 1's reply: the two round keys, the signing key and its signature over them."""
    return ConfigRecord(dict(zip(KEY_FIELDS, signed_keys, strict=True)))


def keys_from_record(record: ConfigRecord) -> tuple[bytes, bytes, bytes, bytes]:
    c, s, sig, signature = (_bytes(record, key) for key in KEY_FIELDS)
    return c, s, sig, signature


def routing_to_record(routing: list[tuple[str, str]]) -> dict:
    return {"route-from": [a for a, _ in routing], "route-to": [b for _, b in routing]}


def routing_from_record(record: ConfigRecord) -> list[tuple[str, str]]:
    senders, recipients = record.get("route-from", []), record.get("route-to", [])
    if len(senders) != len(recipients) or not all(
            isinstance(x, str) for x in [*senders, *recipients]):
        raise RecordError("the delivery of shares is malformed")
    return list(zip(senders, recipients, strict=True))


def survivors_to_record(survivors: list[str]) -> dict:
    """The survivor set the server announces (consistency and unmask steps)."""
    return {"survivors": list(survivors)}


def survivors_from_record(record: ConfigRecord) -> list[str]:
    survivors = record.get("survivors", [])
    if not isinstance(survivors, list) or not all(isinstance(s, str) for s in survivors):
        raise RecordError("the survivor set is malformed")
    return list(survivors)


def signature_to_record(signature: bytes) -> dict:
    """A survivor's consistency signature over the announced set."""
    return {"signature": signature}


def signature_from_record(record: ConfigRecord) -> bytes:
    """A survivor's consistency signature."""
    return _bytes(record, "signature")


def signatures_to_record(signatures: dict[str, bytes]) -> dict:
    return {"signers": list(signatures), "signatures": list(signatures.values())}


def signatures_from_record(record: ConfigRecord) -> dict[str, bytes]:
    names, signatures = record.get("signers", []), record.get("signatures", [])
    if len(names) != len(signatures) or not all(isinstance(s, bytes) for s in signatures):
        raise RecordError("consistency signatures do not match their signers")
    return dict(zip(names, signatures, strict=True))


def complaint_to_record(accused: list[str], signature: bytes) -> dict:
    """A step-3 reply's complaint: the neighbours whose shares did not open, signed."""
    return {"accused": sorted(accused), "complaint": signature}


def complaint_from_record(record: ConfigRecord) -> tuple[list[str], bytes] | None:
    """(accused, signature) of a complaint, None when the record holds none."""
    if "accused" not in record and "complaint" not in record:
        return None
    accused = record.get("accused", [])
    if not isinstance(accused, list) or not all(isinstance(a, str) for a in accused) \
            or len(set(accused)) != len(accused):
        raise RecordError("a complaint must name distinct clients")
    return list(accused), _bytes(record, "complaint")


def sealed_to_record(sealed: dict[str, bytes], prefix: str) -> dict:
    """{name: ciphertext} as two aligned lists under `<prefix>-names` and `<prefix>-sealed`."""
    return {f"{prefix}-names": list(sealed), f"{prefix}-sealed": list(sealed.values())}


def sealed_from_record(record: ConfigRecord, prefix: str) -> dict[str, bytes]:
    names, sealed = record.get(f"{prefix}-names", []), record.get(f"{prefix}-sealed", [])
    if len(names) != len(sealed) or not all(isinstance(s, bytes) for s in sealed):
        raise RecordError(f"'{prefix}' ciphertexts do not match their names")
    return dict(zip(names, sealed, strict=True))


def reveals_to_record(reveals: list[Reveal]) -> ConfigRecord:
    return ConfigRecord({"owners": [r.owner for r in reveals], "kinds": [r.kind for r in reveals],
                         "xs": [r.x for r in reveals], "shares": [r.share for r in reveals]})


def reveals_from_record(record: ConfigRecord) -> list[Reveal]:
    columns = [list(record.get(key, [])) for key in ("owners", "kinds", "xs", "shares")]
    if len({len(c) for c in columns}) != 1:
        raise RecordError("reveal record columns differ in length")
    if not all(isinstance(s, bytes) for s in columns[3]):
        raise RecordError("reveal shares must be bytes")  # bytes(10**10) would be 10 GB
    return [Reveal(str(o), str(k), int(x), bytes(s)) for o, k, x, s in zip(*columns, strict=True)]


def _bytes(record: ConfigRecord, key: str) -> bytes:
    value = record.get(key)
    if not isinstance(value, bytes):
        raise RecordError(f"'{key}' must be bytes")
    return value
