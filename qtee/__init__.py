"""qtee -- Qualcomm's TEE as the Linux qcomtee driver sees it, in Python."""

__version__ = "0.1.0"
