"""Counter-based random numbers for seeded requests.

A seeded request draws the uniform for output position t from a hash of (seed,
stream, t), not from a sequential generator. So how many numbers a step consumes
(which depends on draft lengths, which depend on the load) never shifts later draws:
a seeded request gives the same tokens alone or in any batch, with or without
speculation by a deterministic drafter (see `verifier.verify`).
"""

from __future__ import annotations

import hashlib
import struct

#: streams: the uniform that picks the token emitted at each output position, and the
#: one of the acceptance test against a draft model's q there
TOKEN = 0
ACCEPT = 1


def position_uniforms(seed: int, stream: int, start: int, n: int) -> list[float]:
    """Uniforms in [0, 1) for positions start..start+n-1 of a request's `stream`."""
    key = struct.pack("<QQ", seed & 0xFFFFFFFFFFFFFFFF, stream)
    out = []
    for pos in range(start, start + n):
        digest = hashlib.blake2b(struct.pack("<Q", pos), key=key, digest_size=8).digest()
        out.append((int.from_bytes(digest, "little") >> 11) * 2.0**-53)
    return out
