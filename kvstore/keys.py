"""Block identity: namespaces and chained block keys.

A block is ``block_size`` tokens of one sequence for one model layout. Its key chains the key of
the block before it, so a key names the whole prefix up to and including its block::

    key_i = BLAKE2b-256(key_{i-1} || namespace digest || token ids of block i as u32 LE || extra)

with ``key_{-1}`` 32 zero bytes. The hash is a standard, seedless digest: the same tokens and
namespace give the same keys in every process, on every host, in every Python version.

Engines that already hash their blocks (vLLM, SGLang, Dynamo) may pass their own hashes as opaque
keys instead; the daemon only requires keys to be non-empty byte strings of bounded length.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvstore.errors import InvalidArgumentError

KEY_BYTES = 32
"""Length of the keys :func:`block_keys` produces."""

MAX_KEY_BYTES = 128
"""Upper bound on any key the daemon accepts (opaque engine hashes included)."""

_ROOT = bytes(KEY_BYTES)
_NAMESPACE_VERSION = b"kvstore.namespace.v1"


def _digest(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    for part in parts:
        h.update(part)
    return h.digest()


@dataclass(frozen=True, kw_only=True, slots=True)
class Namespace:
    """Everything that makes KV bytes of the same tokens incompatible.

    Two workers share cached blocks only when every field here is equal. ``salt`` separates
    tenants (or invalidates a whole cache when changed).
    """

    model_id: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    tp_rank: int = 0
    tp_size: int = 1
    salt: str = ""
    digest: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "tp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidArgumentError(f"Namespace.{name} must be a positive int, got {value!r}")
        if not isinstance(self.tp_rank, int) or not 0 <= self.tp_rank < self.tp_size:
            raise InvalidArgumentError(
                f"Namespace.tp_rank must be in [0, tp_size={self.tp_size}), got {self.tp_rank!r}"
            )
        if not self.model_id:
            raise InvalidArgumentError("Namespace.model_id must not be empty")
        if not self.dtype:
            raise InvalidArgumentError("Namespace.dtype must not be empty")
        # Length-prefixed fields make the encoding unambiguous ("ab"+"c" != "a"+"bc").
        encoded = bytearray(_NAMESPACE_VERSION)
        for value in (
            self.model_id, self.dtype, self.num_layers, self.num_kv_heads, self.head_dim,
            self.block_size, self.tp_rank, self.tp_size, self.salt,
        ):
            raw = str(value).encode()
            encoded += len(raw).to_bytes(4, "little") + raw
        object.__setattr__(self, "digest", _digest(bytes(encoded)))


def block_keys(
    token_ids: Any,
    *,
    block_size: int,
    namespace: Namespace | bytes,
    extra: bytes = b"",
    parent: bytes | None = None,
) -> BlockKeys:
    """Chained keys of every full block of a token sequence.

    Args:
        token_ids: the sequence (list of ints, numpy array, CPU torch tensor); values must fit u32.
        block_size: tokens per block. Must match ``namespace.block_size`` for a :class:`Namespace`.
        namespace: a :class:`Namespace`, or raw bytes that stand for one.
        extra: bytes mixed into every block's key (a LoRA id, a multimodal input hash).
        parent: key of the block just before ``token_ids[0]``, to continue a chain.

    Returns:
        One 32-byte key per full block, as a :class:`BlockKeys` list; a trailing partial block has
        no key.
    """
    if not isinstance(block_size, int) or block_size <= 0:
        raise InvalidArgumentError(f"block_size must be a positive int, got {block_size!r}")
    if isinstance(namespace, Namespace):
        if namespace.block_size != block_size:
            raise InvalidArgumentError(
                f"block_size={block_size} differs from namespace.block_size={namespace.block_size}"
            )
        ns = namespace.digest
    elif isinstance(namespace, (bytes, bytearray)) and namespace:
        ns = _digest(b"kvstore.raw-namespace.v1", bytes(namespace))
    else:
        raise InvalidArgumentError("namespace must be a Namespace or non-empty bytes")
    if not isinstance(extra, (bytes, bytearray)):
        raise InvalidArgumentError(f"extra must be bytes, got {type(extra).__name__}")
    if parent is not None and len(parent) != KEY_BYTES:
        raise InvalidArgumentError(f"parent must be a {KEY_BYTES}-byte key, got {len(parent)} bytes")

    tokens = np.asarray(token_ids)
    if tokens.ndim != 1:
        raise InvalidArgumentError(f"token_ids must be one-dimensional, got shape {tokens.shape}")
    if tokens.size and (tokens.dtype.kind not in "iu" or tokens.min() < 0 or tokens.max() >= 2**32):
        raise InvalidArgumentError("token_ids must be integers in [0, 2**32)")
    n_blocks = tokens.size // block_size
    raw = tokens[: n_blocks * block_size].astype("<u4", copy=False).tobytes()
    stride = block_size * 4

    keys: list[bytes] = []
    prev = _ROOT if parent is None else bytes(parent)
    for i in range(n_blocks):
        prev = _digest(prev, ns, raw[i * stride : (i + 1) * stride], extra)
        keys.append(prev)
    return BlockKeys._laid_out(keys, b"".join(keys))


class BlockKeys(list):
    """What :func:`block_keys` returns: a list of 32-byte keys that also keeps them laid end to
    end (:attr:`packed`), so a lookup sends 8,192 of them without measuring and joining each
    again. A contiguous slice is a ``BlockKeys`` too; any change to the list forgets the packed
    form (a lookup then packs the keys as it does for any list)."""

    __slots__ = ("_packed",)

    def __init__(self, keys: Sequence[bytes] = ()) -> None:
        super().__init__(keys)
        packed = b"".join(self)
        self._packed = packed if len(packed) == KEY_BYTES * len(self) and all(len(k) == KEY_BYTES for k in self) else None

    @classmethod
    def _laid_out(cls, keys: list[bytes], packed: bytes) -> BlockKeys:
        """``keys`` whose concatenation is known to be ``packed``, without checking again."""
        made = cls.__new__(cls)
        list.__init__(made, keys)
        made._packed = packed
        return made

    @property
    def packed(self) -> bytes | None:
        """The keys laid end to end, or None once the list was changed."""
        return self._packed

    def __getitem__(self, index):
        part = super().__getitem__(index)
        if isinstance(index, slice) and self._packed is not None and index.step in (None, 1):
            start, stop, _ = index.indices(len(self))
            return BlockKeys._laid_out(part, self._packed[start * KEY_BYTES : max(start, stop) * KEY_BYTES])
        return part

    def __reduce__(self):   # pickles and copies as its keys (checked again when unpickled)
        return BlockKeys, (list(self),)


def _forgetting(name: str):
    method = getattr(list, name)

    def changed(self, *args, **kwargs):
        self._packed = None
        return method(self, *args, **kwargs)

    changed.__name__ = changed.__qualname__ = name
    return changed


for _name in ("__setitem__", "__delitem__", "__iadd__", "__imul__", "append", "extend", "insert", "pop",
              "remove", "clear", "sort", "reverse"):
    setattr(BlockKeys, _name, _forgetting(_name))


def check_keys(keys: Sequence[bytes], *, max_keys: int, max_key_bytes: int = MAX_KEY_BYTES) -> None:
    """Raise :class:`InvalidArgumentError` naming the first bad key of a request batch."""
    _check_batch(len(keys), list(map(len, keys)), max_keys, max_key_bytes)


def check_packed_keys(nbytes: int, key_bytes: int, *, max_keys: int, max_key_bytes: int = MAX_KEY_BYTES) -> int:
    """:func:`check_keys` for ``nbytes`` of keys of ``key_bytes`` each laid end to end; their count."""
    if key_bytes == 0:
        raise InvalidArgumentError("key 0 is empty" if nbytes else "the request has no keys")
    n, rest = divmod(nbytes, key_bytes)
    if rest:
        raise InvalidArgumentError(f"packed_keys is {nbytes} bytes, not a whole number of {key_bytes}-byte keys")
    _check_batch(n, [key_bytes], max_keys, max_key_bytes)
    return n


def _check_batch(count: int, lengths: list[int], max_keys: int, max_key_bytes: int) -> None:
    """The checks of a batch of ``count`` keys of ``lengths`` (all of them, or the one length)."""
    if not count:
        raise InvalidArgumentError("the request has no keys")
    if count > max_keys:
        raise InvalidArgumentError(f"the request has {count} keys; at most {max_keys} are allowed")
    if min(lengths) == 0:
        raise InvalidArgumentError(f"key {lengths.index(0)} is empty")
    longest = max(lengths)
    if longest > max_key_bytes:
        raise InvalidArgumentError(
            f"key {lengths.index(longest)} is {longest} bytes; keys are at most {max_key_bytes} bytes"
        )


MAX_NAMESPACE_BYTES = 64
NAMESPACE_TAG_BYTES = 8


def scoped(keys: Sequence[bytes], namespace: bytes) -> list[bytes]:
    """Index keys of ``keys`` within ``namespace``: a fixed-length tag of the namespace, then the key.

    Every namespace is tagged, the empty one included, so no key of one namespace can be made to
    look like a key of another.
    """
    tag = namespace_tag(namespace)
    return [tag + key for key in keys]


def namespace_tag(namespace: bytes) -> bytes:
    """The tag :func:`scoped` puts before every key of ``namespace``."""
    if len(namespace) > MAX_NAMESPACE_BYTES:
        raise InvalidArgumentError(f"the namespace is {len(namespace)} bytes; at most {MAX_NAMESPACE_BYTES} are allowed")
    return _namespace_tag(namespace)


@functools.lru_cache(maxsize=1024)
def _namespace_tag(namespace: bytes) -> bytes:
    return hashlib.blake2b(b"kvstore.namespace-tag\0" + namespace, digest_size=NAMESPACE_TAG_BYTES).digest()


def key_label(index_key: bytes) -> str:
    """How logs name a block: the start of its block key (not of the namespace tag before it)."""
    return index_key[NAMESPACE_TAG_BYTES : NAMESPACE_TAG_BYTES + 8].hex()


def unscoped(index_key: bytes) -> bytes:
    """The block key inside an index key made by :func:`scoped`."""
    return index_key[NAMESPACE_TAG_BYTES:]
