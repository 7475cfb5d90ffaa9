"""Block keys: deterministic, chained, namespaced, stable across processes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from kvstore import InvalidArgumentError, Namespace, block_keys
from kvstore.keys import KEY_BYTES, check_keys

from conftest import NS


def test_one_key_per_full_block_and_partial_block_has_none():
    keys = block_keys(list(range(16 * 3 + 5)), block_size=16, namespace=NS)
    assert len(keys) == 3
    assert all(len(k) == KEY_BYTES for k in keys)
    assert len(set(keys)) == 3


def test_keys_chain_the_prefix():
    a = block_keys(list(range(64)), block_size=16, namespace=NS)
    b = block_keys([999] + list(range(1, 64)), block_size=16, namespace=NS)
    # A change in block 0 changes every later key even where the later tokens are equal.
    assert all(x != y for x, y in zip(a, b))
    # A shared prefix gives shared keys, and continuing from a parent gives the same chain.
    c = block_keys(list(range(32)) + [7] * 32, block_size=16, namespace=NS)
    assert c[:2] == a[:2] and c[2:] != a[2:]
    assert block_keys(list(range(32, 64)), block_size=16, namespace=NS, parent=a[1]) == a[2:]


def test_inputs_of_any_integer_container_agree():
    tokens = list(range(100, 164))
    expected = block_keys(tokens, block_size=16, namespace=NS)
    assert block_keys(np.array(tokens, dtype=np.int64), block_size=16, namespace=NS) == expected
    assert block_keys(np.array(tokens, dtype=np.uint32), block_size=16, namespace=NS) == expected


@pytest.mark.parametrize(
    "change",
    [
        {"model_id": "other"}, {"dtype": "bfloat16"}, {"num_layers": 3}, {"num_kv_heads": 4},
        {"head_dim": 128}, {"tp_rank": 1, "tp_size": 2}, {"tp_size": 2}, {"salt": "tenant-b"},
    ],
)
def test_every_namespace_field_separates_keys(change):
    fields = dict(model_id="test/tiny", dtype="float16", num_layers=2, num_kv_heads=2, head_dim=64, block_size=16)
    fields.update(change)
    other = Namespace(**fields)
    tokens = list(range(32))
    assert block_keys(tokens, block_size=16, namespace=other) != block_keys(tokens, block_size=16, namespace=NS)


def test_extra_and_raw_namespace():
    tokens = list(range(32))
    assert block_keys(tokens, block_size=16, namespace=NS, extra=b"lora-1") != block_keys(
        tokens, block_size=16, namespace=NS
    )
    raw = block_keys(tokens, block_size=16, namespace=b"engine-ns")
    assert raw == block_keys(tokens, block_size=16, namespace=b"engine-ns")
    assert raw != block_keys(tokens, block_size=16, namespace=b"engine-ns2")


def test_keys_are_stable_across_processes_and_hash_seeds():
    script = (
        "from kvstore import Namespace, block_keys;"
        "ns = Namespace(model_id='test/tiny', dtype='float16', num_layers=2, num_kv_heads=2, head_dim=64, block_size=16);"
        "print(','.join(k.hex() for k in block_keys(list(range(80)), block_size=16, namespace=ns)))"
    )
    outputs = set()
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        outputs.add(out.stdout.strip())
    here = ",".join(k.hex() for k in block_keys(list(range(80)), block_size=16, namespace=NS))
    assert outputs == {here}


@pytest.mark.parametrize(
    "tokens, kwargs, message",
    [
        ([1, 2, 3], {"block_size": 0}, "block_size"),
        ([1, 2, 3], {"block_size": 8}, "differs from namespace.block_size"),
        ([-1] * 16, {"block_size": 16}, r"2\*\*32"),
        ([2**32] * 16, {"block_size": 16}, r"2\*\*32"),
        ([[1] * 16], {"block_size": 16}, "one-dimensional"),
        ([0.5] * 16, {"block_size": 16}, "integers"),
    ],
)
def test_bad_token_input_is_rejected_clearly(tokens, kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message):
        block_keys(tokens, namespace=NS, **kwargs)


def test_bad_namespace_is_rejected_clearly():
    with pytest.raises(InvalidArgumentError, match="num_layers"):
        Namespace(model_id="m", dtype="f16", num_layers=0, num_kv_heads=1, head_dim=1, block_size=1)
    with pytest.raises(InvalidArgumentError, match="tp_rank"):
        Namespace(model_id="m", dtype="f16", num_layers=1, num_kv_heads=1, head_dim=1, block_size=1, tp_rank=2, tp_size=2)
    with pytest.raises(InvalidArgumentError, match="namespace"):
        block_keys([1] * 16, block_size=16, namespace=b"")


def test_check_keys_names_the_bad_key():
    check_keys([b"a", b"b" * 128], max_keys=4)
    with pytest.raises(InvalidArgumentError, match="no keys"):
        check_keys([], max_keys=4)
    with pytest.raises(InvalidArgumentError, match="key 1 is empty"):
        check_keys([b"a", b""], max_keys=4)
    with pytest.raises(InvalidArgumentError, match="key 2 is 129 bytes"):
        check_keys([b"a", b"b", b"c" * 129], max_keys=4)
    with pytest.raises(InvalidArgumentError, match="at most 4"):
        check_keys([b"a"] * 5, max_keys=4)


def test_logs_name_a_block_by_its_key_not_its_namespace_tag():
    from kvstore.keys import key_label, scoped

    key = bytes(range(32))
    assert key_label(scoped([key], b"tenant-a")[0]) == key[:8].hex() == key_label(scoped([key], b"")[0])


def test_block_keys_keep_their_packed_form_until_the_list_changes():
    import copy
    import pickle

    from kvstore.keys import BlockKeys

    keys = block_keys(list(range(16 * 6)), block_size=16, namespace=NS)
    assert isinstance(keys, list) and isinstance(keys, BlockKeys)
    assert keys.packed == b"".join(keys)
    assert keys[1:4].packed == b"".join(keys[1:4]) and keys[4:2].packed == b""
    assert type(keys[::2]) is list                     # a strided slice is a plain list
    assert copy.copy(keys).packed == keys.packed == pickle.loads(pickle.dumps(keys)).packed
    for change in (lambda k: k.append(b"x" * 5), lambda k: k.__setitem__(0, b"y"), lambda k: k.pop(),
                   lambda k: k.sort(), lambda k: k.extend([b"z"]), lambda k: k.__delitem__(slice(0, 1))):
        changed = copy.copy(keys)
        change(changed)
        assert changed.packed is None
    assert BlockKeys([b"short", b"x" * KEY_BYTES]).packed is None   # built by hand: checked
    assert BlockKeys([b"a" * KEY_BYTES] * 2).packed == b"a" * (2 * KEY_BYTES)


async def test_lookups_of_block_keys_and_of_changed_ones_agree(kv):
    keys = block_keys(list(range(16 * 8)), block_size=16, namespace=NS)
    await kv.put(keys[:5], [os.urandom(100)] * 5)
    assert (await kv.lookup(keys)).count == 5          # sent packed as block_keys made them
    changed = keys[:]
    changed.insert(2, b"not-a-block-key")               # packed form dropped: keys of two lengths
    assert changed.packed is None
    assert (await kv.lookup(changed)).count == 2
    del changed[2]                                      # one length again, but no packed form
    assert changed == keys and changed.packed is None
    assert (await kv.lookup(changed)).count == 5
