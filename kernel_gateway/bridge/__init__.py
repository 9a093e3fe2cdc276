"""The websocket <-> ZMQ bridge: wire formats and per-kernel channel fan-out."""

from .channels import BridgeLimits, KernelBridge
from .session import ChannelSession, ChannelSink
from .frames import V1_SUBPROTOCOL, FrameError, KernelMessage, client_message_to_parts, to_legacy_frame, to_v1_frame

__all__ = [
    "BridgeLimits",
    "ChannelSession",
    "ChannelSink",
    "FrameError",
    "KernelBridge",
    "KernelMessage",
    "V1_SUBPROTOCOL",
    "client_message_to_parts",
    "to_legacy_frame",
    "to_v1_frame",
]
