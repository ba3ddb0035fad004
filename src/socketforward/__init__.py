"""Forward UNIX domain sockets into virtual machines over vsock."""

__version__ = "0.1.0"
