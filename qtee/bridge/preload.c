/* The qtee bridge's libc hooks (LD_PRELOAD): opens of the TEE device nodes, and ioctl,
 * close, dup and read/write on the fds the bridge handed out, go to the model (embed.c);
 * everything else goes to libc untouched.
 *
 * The fds handed to C are real: a device fd is an eventfd (semaphore mode, non-blocking)
 * that the model signals when a SUPPL_RECV would find work; a shm fd is the memfd behind
 * the shm.  So mmap, close, poll and fork behave natively.
 *
 * SUPPL_RECV waits here, in C: the model's RECV never blocks (EAGAIN when nothing is
 * queued), and the thread polls a private dup of the device's eventfd between tries.  A
 * C thread is never blocked inside Python, and every call into Python runs with
 * cancellation disabled: libqcomtee cancels its supplicant thread (asynchronously) while
 * it waits in SUPPL_RECV, and a thread cancelled here holds nothing but its dup, which a
 * cleanup handler closes.
 *
 * This file must not include Python.h: its large-file macros rename open to open64.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/types.h>
#include <unistd.h>

#include "bridge.h"

static _Atomic unsigned char kinds[QB_MAX_FD];
/* The process whose model the tracked fds belong to: a child forked without exec has
 * none of its own (its fds answer ENODEV, and opens of the device fail ENODEV). */
static _Atomic pid_t owner;

static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_openat64)(int, const char *, int, ...);
static int (*real___open_2)(const char *, int);
static int (*real___open64_2)(const char *, int);
static int (*real___openat_2)(int, const char *, int);
static int (*real___openat64_2)(int, const char *, int);
static int (*real_ioctl)(int, unsigned long, ...);
static int (*real_close)(int);
static int (*real_dup)(int);
static int (*real_dup2)(int, int);
static int (*real_dup3)(int, int, int);
static int (*real_fcntl)(int, int, ...);
static int (*real_fcntl64)(int, int, ...);
static ssize_t (*real_read)(int, void *, size_t);
static ssize_t (*real_write)(int, const void *, size_t);

static pthread_once_t resolved = PTHREAD_ONCE_INIT;

#define RESOLVE(name) (*(void **)(&real_##name) = dlsym(RTLD_NEXT, #name))

static void resolve(void)
{
	RESOLVE(open);
	RESOLVE(open64);
	RESOLVE(openat);
	RESOLVE(openat64);
	RESOLVE(__open_2);
	RESOLVE(__open64_2);
	RESOLVE(__openat_2);
	RESOLVE(__openat64_2);
	RESOLVE(ioctl);
	RESOLVE(close);
	RESOLVE(dup);
	RESOLVE(dup2);
	RESOLVE(dup3);
	RESOLVE(fcntl);
	RESOLVE(fcntl64);
	RESOLVE(read);
	RESOLVE(write);
}

static inline void init_real(void)
{
	pthread_once(&resolved, resolve);
}

static inline enum qb_kind kind_of(int fd)
{
	if (fd < 0 || fd >= QB_MAX_FD)
		return QB_NONE;
	return (enum qb_kind)atomic_load_explicit(&kinds[fd], memory_order_acquire);
}

void qb_set_kind(int fd, enum qb_kind kind)
{
	if (fd >= 0 && fd < QB_MAX_FD)
		atomic_store_explicit(&kinds[fd], (unsigned char)kind, memory_order_release);
}

int qb_real_close(int fd)
{
	init_real();
	return real_close(fd);
}

static inline int forked(void)
{
	return atomic_load(&owner) != getpid();
}

static int fail(int code)
{
	errno = code;
	return -1;
}

/* ------------------------------------------------------------------ device nodes */

/* The nodes the bridge serves: QTEE_BRIDGE_NODES (colon-separated paths), else every
 * /dev/teeN and /dev/teeprivN. */
static int is_node(const char *path)
{
	const char *list = getenv("QTEE_BRIDGE_NODES");
	const char *p;
	size_t n;

	if (!path)
		return 0;
	if (list && *list) {
		n = strlen(path);
		for (p = list; *p;) {
			const char *end = strchr(p, ':');
			size_t len = end ? (size_t)(end - p) : strlen(p);

			if (len == n && strncmp(p, path, n) == 0)
				return 1;
			if (!end)
				break;
			p = end + 1;
		}
		return 0;
	}
	if (strncmp(path, "/dev/teepriv", 12) == 0)
		p = path + 12;
	else if (strncmp(path, "/dev/tee", 8) == 0)
		p = path + 8;
	else
		return 0;
	if (!*p)
		return 0;
	for (; *p; p++)
		if (*p < '0' || *p > '9')
			return 0;
	return 1;
}

/* FD, an fd the model just made, as this process's fd of KIND; one past the kind table
 * is closed again, in the model and here: EMFILE. */
static int model_fd(int fd, enum qb_kind kind)
{
	if (fd >= QB_MAX_FD) {
		qb_close(fd);
		qb_real_close(fd);
		return fail(EMFILE);
	}
	qb_set_kind(fd, kind);
	return fd;
}

static int open_node(const char *path, int flags)
{
	int fd;

	if (atomic_load(&owner) == 0)
		atomic_store(&owner, getpid());
	else if (forked())
		return fail(ENODEV);
	fd = qb_open(path, flags);
	if (fd < 0)
		return fail(-fd);
	return model_fd(fd, QB_DEVICE);
}

static mode_t mode_arg(int flags, va_list ap)
{
	return (flags & (O_CREAT | O_TMPFILE)) ? (mode_t)va_arg(ap, int) : 0;
}

/* The open family, one body: a node's path goes to the model, anything else to libc's
 * own function, called with the hook's arguments (the ones after PARAMS).  The mode
 * argument is there only with O_CREAT or O_TMPFILE (READ_MODE, the PROLOGUE of the
 * variadic forms); the fortified forms (_FORTIFY_SOURCE) take none. */
#define READ_MODE                               \
	va_list ap;                             \
	mode_t mode;                            \
                                                \
	va_start(ap, flags);                    \
	mode = mode_arg(flags, ap);             \
	va_end(ap);

#define PATH_HOOK(name, params, prologue, ...)  \
	int name params                         \
	{                                       \
		prologue                        \
		init_real();                    \
		if (is_node(path))              \
			return open_node(path, flags); \
		return real_##name(__VA_ARGS__); \
	}

PATH_HOOK(open, (const char *path, int flags, ...), READ_MODE, path, flags, mode)
PATH_HOOK(open64, (const char *path, int flags, ...), READ_MODE, path, flags, mode)
PATH_HOOK(openat, (int dirfd, const char *path, int flags, ...), READ_MODE, dirfd, path, flags, mode)
PATH_HOOK(openat64, (int dirfd, const char *path, int flags, ...), READ_MODE, dirfd, path, flags, mode)
PATH_HOOK(__open_2, (const char *path, int flags), , path, flags)
PATH_HOOK(__open64_2, (const char *path, int flags), , path, flags)
PATH_HOOK(__openat_2, (int dirfd, const char *path, int flags), , dirfd, path, flags)
PATH_HOOK(__openat64_2, (int dirfd, const char *path, int flags), , dirfd, path, flags)

/* ------------------------------------------------------------------ ioctl */

static void close_wake(void *arg)
{
	int fd = *(int *)arg;

	if (fd >= 0)
		real_close(fd);
}

/* SUPPL_RECV: try the model's non-blocking RECV; while it finds nothing, wait in C for
 * the device's eventfd (a token per queued request, a flood of them at close). */
static int supp_recv(int fd, unsigned long request, void *arg)
{
	int wake = real_fcntl(fd, F_DUPFD_CLOEXEC, 0);
	int ret = 0;

	if (wake < 0)
		return -errno;
	pthread_cleanup_push(close_wake, &wake);
	for (;;) {
		struct pollfd p = { .fd = wake, .events = POLLIN };
		uint64_t token;

		ret = qb_ioctl(fd, request, arg, 1);
		if (ret != -EAGAIN)
			break;
		if (poll(&p, 1, -1) < 0 && errno != EINTR) {
			ret = -errno;
			break;
		}
		if (p.revents & POLLIN)
			(void)!real_read(wake, &token, sizeof(token));
	}
	pthread_cleanup_pop(1);
	return ret;
}

int ioctl(int fd, unsigned long request, ...)
{
	va_list ap;
	void *arg;
	int ret;

	va_start(ap, request);
	arg = va_arg(ap, void *);
	va_end(ap);
	init_real();
	if (kind_of(fd) == QB_NONE)
		return real_ioctl(fd, request, arg);
	if (forked())
		return fail(ENODEV);
	if (kind_of(fd) == QB_SHM) /* a dma-buf fd: no TEE ioctls */
		return fail(ENOTTY);
	if (request == QB_IOC_SUPPL_RECV)
		ret = supp_recv(fd, request, arg);
	else
		ret = qb_ioctl(fd, request, arg, 0);
	if (ret < 0)
		return fail(-ret);
	if (request == QB_IOC_SHM_ALLOC || request == QB_IOC_SHM_REGISTER)
		return model_fd(ret, QB_SHM);
	return ret;
}

/* ------------------------------------------------------------------ close, dup */

int close(int fd)
{
	init_real();
	if (kind_of(fd) != QB_NONE) {
		if (!forked())
			qb_close(fd);
		qb_set_kind(fd, QB_NONE);
	}
	return real_close(fd);
}

/* A new number for a tracked fd: the same open file (context or shm). */
static int track_dup(int oldfd, int newfd)
{
	enum qb_kind kind = kind_of(oldfd);

	if (newfd < 0 || kind == QB_NONE || forked())
		return newfd;
	if (newfd >= QB_MAX_FD) {
		real_close(newfd);
		return fail(EMFILE);
	}
	qb_dup(oldfd, newfd);
	qb_set_kind(newfd, kind);
	return newfd;
}

/* dup2/dup3 onto a tracked number closes that file first, as the kernel does (only
 * when the duplication can succeed: a bad oldfd leaves newfd alone). */
static void replaced(int newfd, int oldfd)
{
	if (newfd != oldfd && kind_of(newfd) != QB_NONE && real_fcntl(oldfd, F_GETFD) >= 0) {
		if (!forked())
			qb_close(newfd);
		qb_set_kind(newfd, QB_NONE);
	}
}

int dup(int oldfd)
{
	init_real();
	return track_dup(oldfd, real_dup(oldfd));
}

int dup2(int oldfd, int newfd)
{
	int ret;

	init_real();
	replaced(newfd, oldfd);
	ret = real_dup2(oldfd, newfd);
	return ret == oldfd ? ret : track_dup(oldfd, ret);
}

int dup3(int oldfd, int newfd, int flags)
{
	init_real();
	replaced(newfd, oldfd);
	return track_dup(oldfd, real_dup3(oldfd, newfd, flags));
}

static int fcntl_common(int (*real)(int, int, ...), int fd, int cmd, va_list ap)
{
	switch (cmd) {
	case F_DUPFD:
	case F_DUPFD_CLOEXEC:
		return track_dup(fd, real(fd, cmd, va_arg(ap, int)));
	case F_GETFD:
	case F_GETFL:
	case F_GETOWN:
	case F_GETSIG:
	case F_GETLEASE:
	case F_GETPIPE_SZ:
	case F_GET_SEALS:
		return real(fd, cmd);
	default:
		/* Every other command takes one argument: an int or a pointer. */
		return real(fd, cmd, va_arg(ap, void *));
	}
}

int fcntl(int fd, int cmd, ...)
{
	va_list ap;
	int ret;

	init_real();
	va_start(ap, cmd);
	ret = fcntl_common(real_fcntl, fd, cmd, ap);
	va_end(ap);
	return ret;
}

int fcntl64(int fd, int cmd, ...)
{
	va_list ap;
	int ret;

	init_real();
	va_start(ap, cmd);
	ret = fcntl_common(real_fcntl64 ? real_fcntl64 : real_fcntl, fd, cmd, ap);
	va_end(ap);
	return ret;
}

/* ------------------------------------------------------------------ read, write */

/* The TEE device has no read or write file operation: the VFS answers EINVAL. */
ssize_t read(int fd, void *buf, size_t count)
{
	init_real();
	if (kind_of(fd) == QB_DEVICE)
		return fail(EINVAL);
	return real_read(fd, buf, count);
}

ssize_t write(int fd, const void *buf, size_t count)
{
	init_real();
	if (kind_of(fd) == QB_DEVICE)
		return fail(EINVAL);
	return real_write(fd, buf, count);
}

/* ------------------------------------------------------------------ exit */

__attribute__((destructor)) static void at_exit(void)
{
	if (atomic_load(&owner) != 0 && !forked())
		qb_report();
}
