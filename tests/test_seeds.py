"""The one seed-mixing helper."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from mosaic_flwr.core.seeds import mix_seed


def test_mix_seed_is_a_documented_stable_hash_of_typed_parts():
    # The first 31 bits of BLAKE2b-64 over the parts, each tagged with its type.
    digest = hashlib.blake2b(b"i42\x1fssample\x1fi3\x1fi0", digest_size=8).digest()
    assert mix_seed(42, "sample", 3, 0) == int.from_bytes(digest, "big") >> 33 == 319056952
    assert mix_seed(42, "client", 1, 0) == 1970304548
    assert mix_seed(-1, "x") == 1113204689  # negative run seeds are fine


def test_mix_seed_is_the_same_in_another_process():
    code = "from mosaic_flwr.core.seeds import mix_seed; print(mix_seed(7, 'distill', 5))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert int(out.stdout) == mix_seed(7, "distill", 5)


def test_mix_seed_separates_what_sums_of_products_confuse():
    seeds = {mix_seed(s, "sample", r, a) for s in range(5) for r in range(20) for a in range(3)}
    assert len(seeds) == 5 * 20 * 3
    assert all(0 <= s < 2**31 for s in seeds)
    assert mix_seed(1, 2) != mix_seed(2, 1)             # order matters
    assert mix_seed(1, "2") != mix_seed(1, 2)           # so does the type
    assert mix_seed(12, 3) != mix_seed(1, 23)           # parts do not run together


@pytest.mark.parametrize("parts", [(), (1.5,), (True,), (None,), (1, [2])])
def test_mix_seed_refuses_anything_but_ints_and_strings(parts):
    with pytest.raises((TypeError, ValueError), match="mix_seed"):
        mix_seed(*parts)
