/* A C program that probes the device nodes as a user of the kernel's TEE uAPI would, for
 * tests/bridge/test_bridge.py: each step prints "name ret errno" (errno 0 when ret >= 0).
 *
 *   bridge_probe basic    VERSION, SHM_ALLOC + mmap, the fd calls the bridge hooks
 *   bridge_probe fork     a child forked without exec uses the inherited fd
 *   bridge_probe kill     leaves a shm, waits for a snapshot, dies of SIGKILL
 *   bridge_probe open     only opens /dev/tee0
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define TEE_IOC_VERSION 0x800ca400UL
#define TEE_IOC_SHM_ALLOC 0xc010a401UL

struct version {
	uint32_t impl_id, impl_caps, gen_caps;
};

struct shm_alloc {
	uint64_t size;
	uint32_t flags;
	int32_t id;
};

static void step(const char *name, long ret)
{
	printf("%s %ld %d\n", name, ret, ret < 0 ? errno : 0);
	fflush(stdout);
}

static int basic(void)
{
	struct version v = { 0 };
	struct shm_alloc a = { .size = 8192 };
	char byte;
	char *p;
	int fd, sfd, d, d2, d3;

	fd = open("/dev/tee0", O_RDWR | O_CLOEXEC);
	step("open", fd);
	if (fd < 0)
		return 1;
	step("version", ioctl(fd, TEE_IOC_VERSION, &v));
	printf("impl %u %u %#x\n", v.impl_id, v.impl_caps, v.gen_caps);
	sfd = ioctl(fd, TEE_IOC_SHM_ALLOC, &a);
	step("shm_alloc_is_fd", sfd > 2 ? 0 : -1);
	printf("shm %d %lu\n", a.id, (unsigned long)a.size);
	p = mmap(NULL, a.size, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
	step("mmap", p == MAP_FAILED ? -1 : 0);
	memcpy(p, "hello", 6);
	step("read_device", read(fd, &byte, 1));
	step("write_device", write(fd, "x", 1));
	step("unknown_ioctl", ioctl(fd, 0x1234, NULL));
	step("version_efault", ioctl(fd, TEE_IOC_VERSION, (void *)8));
	/* A read-only struct: the driver's copy_to_user faults (EFAULT). */
	step("version_readonly", ioctl(fd, TEE_IOC_VERSION, (void *)"a read-only string"));
	step("shm_ioctl", ioctl(sfd, TEE_IOC_VERSION, &v));
	d = dup(fd);
	d2 = fcntl(fd, F_DUPFD_CLOEXEC, 100);
	step("dup_ge_100", d2 >= 100 ? 0 : -1);
	d3 = dup2(fd, 90);
	step("dup2", d3 == 90 ? 0 : -1);
	step("close_original", close(fd));
	step("version_on_dup", ioctl(d, TEE_IOC_VERSION, &v));
	step("close_dup", close(d));
	step("close_dup2", close(d3));
	step("version_on_last", ioctl(d2, TEE_IOC_VERSION, &v));
	step("close_shm", close(sfd));
	step("shm_still_mapped", strcmp(p, "hello") == 0 ? 0 : -1);
	munmap(p, a.size);
	step("close_last", close(d2));
	step("version_closed", ioctl(d2, TEE_IOC_VERSION, &v));
	d = openat(AT_FDCWD, "/dev/tee0", O_RDWR);
	step("openat", d >= 0 && ioctl(d, TEE_IOC_VERSION, &v) == 0 ? 0 : -1);
	close(d);
	step("open_tee1", open("/dev/tee1", O_RDWR));
	step("open_teepriv0", open("/dev/teepriv0", O_RDWR));
	return 0;
}

static int forked(void)
{
	struct version v = { 0 };
	int status = 0;
	int fd = open("/dev/tee0", O_RDWR);
	pid_t child;

	step("open", fd);
	child = fork();
	if (child == 0) {
		step("child_version", ioctl(fd, TEE_IOC_VERSION, &v));
		step("child_open", open("/dev/tee0", O_RDWR));
		step("child_close", close(fd));
		_exit(0);
	}
	waitpid(child, &status, 0);
	step("parent_version", ioctl(fd, TEE_IOC_VERSION, &v));
	step("close", close(fd));
	return status;
}

static int killed(void)
{
	struct shm_alloc a = { .size = 4096 };
	int fd = open("/dev/tee0", O_RDWR);

	step("open", fd);
	step("shm_alloc_is_fd", ioctl(fd, TEE_IOC_SHM_ALLOC, &a) > 2 ? 0 : -1);
	usleep(600 * 1000); /* the bridge snapshots its tables every 0.2 s */
	raise(SIGKILL);
	return 0;
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "basic";

	if (strcmp(mode, "basic") == 0)
		return basic();
	if (strcmp(mode, "fork") == 0)
		return forked();
	if (strcmp(mode, "kill") == 0)
		return killed();
	if (strcmp(mode, "open") == 0) {
		step("open", open("/dev/tee0", O_RDWR));
		return 0;
	}
	fprintf(stderr, "usage: bridge_probe basic|fork|kill|open\n");
	return 2;
}
