/* A null invoke from C through the preload bridge, with the kernel's raw uAPI: load the
 * TA image given, get its app object, then time ROUNDS rounds of N invokes of op 0 with
 * no params; print the best round's rate ("ops/s <rate>").  For bench/bridge.py. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define TEE_IOC_OBJECT_INVOKE 0x8010a40aUL
#define UBUF_IN 8
#define OBJ_IN 11
#define OBJ_OUT 12
#define NULL_ID ((uint64_t)-1)

struct param { uint64_t attr, a, b, c; };
struct invoke { uint64_t id; uint32_t op, ret, num, pad; struct param p[2]; };
struct buf_data { uint64_t ptr, len; };

static int fd;

static int call(uint64_t id, uint32_t op, struct param *p, uint32_t n)
{
	struct invoke arg = { .id = id, .op = op, .num = n };
	struct buf_data buf = { (uint64_t)(uintptr_t)&arg, 24 + 32 * n };

	memcpy(arg.p, p, n * sizeof(*p));
	if (ioctl(fd, TEE_IOC_OBJECT_INVOKE, &buf) || arg.ret) {
		fprintf(stderr, "invoke %#lx op %u: %s, ret %u\n", (unsigned long)id, op,
			strerror(errno), arg.ret);
		exit(1);
	}
	memcpy(p, arg.p, n * sizeof(*p));
	return 0;
}

int main(int argc, char **argv)
{
	struct param p[2];
	uint32_t uid = 3;
	uint64_t env, loader, ctrl, app;
	static char image[1 << 16];
	double best = 0;
	long n = argc > 2 ? atol(argv[2]) : 20000;
	int rounds = argc > 3 ? atoi(argv[3]) : 5;
	FILE *f;
	size_t size;

	if (argc < 2 || !(f = fopen(argv[1], "rb")))
		return 2;
	size = fread(image, 1, sizeof(image), f);
	fclose(f);
	fd = open("/dev/tee0", O_RDWR);
	if (fd < 0) {
		perror("open /dev/tee0");
		return 1;
	}
	p[0] = (struct param){ OBJ_IN, NULL_ID, 0, 0 };
	p[1] = (struct param){ OBJ_OUT, 0, 0, 0 };
	call(NULL_ID, 2, p, 2); /* register, NULL credentials: the model's privileged client */
	env = p[1].a;
	p[0] = (struct param){ UBUF_IN, (uint64_t)(uintptr_t)&uid, 4, 0 };
	p[1] = (struct param){ OBJ_OUT, 0, 0, 0 };
	call(env, 0, p, 2); /* open the app loader */
	loader = p[1].a;
	p[0] = (struct param){ UBUF_IN, (uint64_t)(uintptr_t)image, size, 0 };
	p[1] = (struct param){ OBJ_OUT, 0, 0, 0 };
	call(loader, 0, p, 2); /* loadFromBuffer */
	ctrl = p[1].a;
	p[0] = (struct param){ OBJ_OUT, 0, 0, 0 };
	call(ctrl, 2, p, 1); /* getAppObject */
	app = p[0].a;
	for (int r = 0; r < rounds; r++) {
		struct timespec t0, t1;
		double rate;

		clock_gettime(CLOCK_MONOTONIC, &t0);
		for (long i = 0; i < n; i++)
			call(app, 0, p, 0);
		clock_gettime(CLOCK_MONOTONIC, &t1);
		rate = n / ((t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
		if (rate > best)
			best = rate;
	}
	printf("ops/s %.0f\n", best);
	close(fd);
	return 0;
}
