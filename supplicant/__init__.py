"""supplicant -- userspace services that QTEE calls back into (see the README)."""
