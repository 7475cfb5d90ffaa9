"""The versioned wire contract (``kvstore.v1``) and its mapping to kvstore's errors.

``v1/kvstore.proto`` is the source of truth; ``v1/*_pb2*.py`` are generated from it by
``python -m kvstore.proto.generate`` and never edited by hand.
"""

MAX_MESSAGE_BYTES = 64 << 20
"""Largest single gRPC message either side accepts (a header of 65536 128-byte keys fits)."""

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
