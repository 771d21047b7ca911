"""The one way this project derives a seed from the run seed and where it is used."""

from __future__ import annotations

import hashlib

SEED_BITS = 31  # below 2**31: valid for torch, numpy (legacy and Generator) and random alike


def mix_seed(*parts: int | str) -> int:
    """A reproducible seed in ``[0, 2**31)`` from ``parts``, e.g.
    ``mix_seed(cfg.seed, "sample", server_round, attempt)``.

    A stable hash (BLAKE2b) of the parts in order: the same parts give the same seed on
    every machine, Python version and process (unlike ``hash``); distinct parts give
    unrelated seeds (unlike sums of products, where e.g. seed 1, round 0 and seed 0,
    round 7919 can collide). Name the purpose in a string part so that two uses of the same
    numbers draw independent streams. Only ``int`` and ``str`` parts are accepted.
    """
    if not parts:
        raise ValueError("mix_seed: at least one part")
    for p in parts:
        if isinstance(p, bool) or not isinstance(p, (int, str)):
            raise TypeError(f"mix_seed: parts must be int or str, got {type(p).__name__} {p!r}")
    text = "\x1f".join(f"{type(p).__name__[0]}{p}" for p in parts)
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - SEED_BITS)
