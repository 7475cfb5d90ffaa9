"""The one exception hierarchy of kvstore.

Every error a caller can see derives from :class:`KVStoreError`. Subclasses are grouped by what the
caller can do about them: fix the request (:class:`InvalidArgumentError` and its children), fix
the credentials (:class:`UnauthenticatedError`, :class:`PermissionDeniedError`), try again later (:class:`RetryableError` and its children), or report a bug (:class:`InternalError`).
A cache miss is a result, never an exception.

The server maps these to gRPC status codes in one place (``kvstore.proto.status``) and the client
maps the codes back to the same classes, so code on both sides of the wire catches one hierarchy.
"""

from __future__ import annotations


class KVStoreError(Exception):
    """Root of every kvstore error."""

    retryable: bool = False


class InvalidArgumentError(KVStoreError):
    """The request itself is wrong (bad key, bad size, mismatched counts); retrying cannot help."""


class BlockTooLargeError(InvalidArgumentError):
    """A block is larger than the configured maximum or than the whole tier."""


class ConfigError(InvalidArgumentError):
    """A configuration value is invalid; the message names the field."""


class StaleSessionError(KVStoreError):
    """A same-host session or lease the daemon no longer knows (it restarted, or the lease expired)."""


class UnauthenticatedError(KVStoreError):
    """The daemon does not know who is calling: a missing or unknown bearer token."""


class PermissionDeniedError(KVStoreError):
    """The caller is known but may not do this (write a namespace it may only read, a uid the
    same-host socket does not admit)."""


class IntegrityError(KVStoreError):
    """Bytes did not match their checksum (a corrupt upload or a corrupt stored block)."""


class RetryableError(KVStoreError):
    """A transient condition; the same request may succeed later."""

    retryable = True


class UnavailableError(RetryableError):
    """The daemon cannot be reached or is shutting down."""


class ResourceExhaustedError(RetryableError):
    """No space can be freed right now (everything evictable is leased or being written)."""


class RateLimitedError(ResourceExhaustedError):
    """A tenant called more often than its ``requests_per_s``."""


class LeaseExpiredError(RetryableError):
    """A same-host lease ended (it outlived ``lease_ttl_s``) before the call that needed it."""


class DeadlineExceededError(RetryableError):
    """The call did not finish within its deadline."""


class InternalError(KVStoreError):
    """A bug or an unexpected failure inside the daemon."""
