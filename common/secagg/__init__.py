"""Secure aggregation's shared math (Bonawitz et al. 2017; Bell et al. 2020, SecAgg+).

`shamir` (t-of-n secret sharing over a prime field), `ring` (fixed-point encoding into Z_2^64),
`prg` (masks expanded from seeds with ChaCha20), `channel` (X25519 + HKDF + ChaCha20-Poly1305
between two clients), `graph` (who masks with whom). The client and server roles that use them
are in `client/secagg.py` and `server/secagg.py`.
"""
