"""The TEE core (the kernel's ``drivers/tee/tee_core.c`` and ``tee_shm.c``): what every
TEE driver's open fd shares -- the ioctl switch, the argument-block layout, the fd's
lifetime, and shm allocation with its device-wide id table."""
