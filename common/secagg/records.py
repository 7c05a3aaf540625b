"""The protocol's messages as Flower ConfigRecords, packed and unpacked in one place."""

from __future__ import annotations

from flwr.app import ConfigRecord

from common.secagg.protocol import Cohort, Reveal


class RecordError(ValueError):
    """A secure-aggregation record that is missing entries or has the wrong types."""


def cohort_to_record(cohort: Cohort) -> dict:
    return {"names": cohort.names, "c-public": cohort.c_public, "s-public": cohort.s_public,
            "neighbours": cohort.neighbours, "threshold": cohort.threshold,
            "graph-seed": cohort.graph_seed}


def cohort_from_record(record: ConfigRecord) -> Cohort:
    try:
        return Cohort(list(record["names"]), list(record["c-public"]),
                      list(record["s-public"]), int(record["neighbours"]),
                      int(record["threshold"]), int(record["graph-seed"]))
    except KeyError as error:
        raise RecordError(f"cohort record lacks {error}") from None


def keys_to_record(c_public: bytes, s_public: bytes) -> ConfigRecord:
    return ConfigRecord({"c-public": c_public, "s-public": s_public})


def keys_from_record(record: ConfigRecord) -> tuple[bytes, bytes]:
    return _bytes(record, "c-public"), _bytes(record, "s-public")


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
    return [Reveal(str(o), str(k), int(x), bytes(s)) for o, k, x, s in zip(*columns, strict=True)]


def _bytes(record: ConfigRecord, key: str) -> bytes:
    value = record.get(key)
    if not isinstance(value, bytes):
        raise RecordError(f"'{key}' must be bytes")
    return value
