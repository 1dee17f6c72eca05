"""flynnp2p: a peer-to-peer platform-as-a-service."""

__version__ = "0.1.0"
