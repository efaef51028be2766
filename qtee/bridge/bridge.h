/* The qtee bridge: what the libc hooks (preload.c) and the embedded model (embed.c)
 * call of each other.  Every qb_* call returns a value >= 0 on success or -errno. */
#ifndef QTEE_BRIDGE_H
#define QTEE_BRIDGE_H

#include <stdint.h>

/* Device fds and shm fds the bridge handed out are tracked below this number. */
#define QB_MAX_FD 65536

/* TEE_IOC_SUPPL_RECV: _IOR(0xa4, 6, struct tee_ioctl_buf_data) */
#define QB_IOC_SUPPL_RECV 0x8010a406UL
/* TEE_IOC_SHM_ALLOC and TEE_IOC_SHM_REGISTER return a new fd, as the kernel's. */
#define QB_IOC_SHM_ALLOC 0xc010a401UL
#define QB_IOC_SHM_REGISTER 0xc018a409UL

enum qb_kind { QB_NONE = 0, QB_DEVICE = 1, QB_SHM = 2 };

/* embed.c: the model in this process (started on the first open of a device node). */
int qb_open(const char *path, int flags);
int qb_ioctl(int fd, unsigned long request, void *arg, int nowait);
int qb_close(int fd);
int qb_dup(int oldfd, int newfd);
void qb_report(void);

/* preload.c: libc, past the hooks. */
int qb_real_close(int fd);
void qb_set_kind(int fd, enum qb_kind kind);

#endif
