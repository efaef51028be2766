"""Guests and the userspace TEE mediator (VMM side)."""
