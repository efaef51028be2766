/* A small supplicant on libqcomtee, for tests/bridge/test_bridge.py: it loads the TA image
 * given (tests.park, tests/bridge_tas.py), parks a callback object of its own there, says
 * "PARKED" and serves that object from its supplicant thread until killed:
 *
 *   op 0  (IB, OB)  writes "echo:" + the input into the output buffer
 *   op 1  ()        says "IN CALLBACK" and never returns (the test kills the process)
 *
 *   cb_supplicant IMAGE
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <qcomtee_object.h>
#include <qcomtee_object_types.h>

struct echo {
	struct qcomtee_object object;
};

/* An output buffer of a callback comes with its size only (the kernel's RECV gives no
 * address): the callee points it at memory of its own that holds the answer. */
static char answer[256];

static qcomtee_result_t echo_dispatch(struct qcomtee_object *object, qcomtee_op_t op,
				      struct qcomtee_param *params, int num)
{
	static const char prefix[] = "echo:";
	size_t n;

	(void)object;
	if (op == 0 && num == 2) {
		n = params[0].ubuf.size;
		if (sizeof(prefix) - 1 + n > params[1].ubuf.size || n > sizeof(answer) - 8)
			return 10;
		memcpy(answer, prefix, sizeof(prefix) - 1);
		memcpy(answer + sizeof(prefix) - 1, params[0].ubuf.addr, n);
		params[1].ubuf.addr = answer;
		params[1].ubuf.size = sizeof(prefix) - 1 + n;
		return QCOMTEE_OK;
	}
	if (op == 1) {
		printf("IN CALLBACK\n");
		fflush(stdout);
		for (;;)
			pause();
	}
	return 11;
}

static void echo_release(struct qcomtee_object *object)
{
	(void)object;
}

static struct qcomtee_object_ops echo_ops = {
	.release = echo_release,
	.dispatch = echo_dispatch,
};

static void *serve(void *arg)
{
	struct qcomtee_object *root = arg;

	while (!qcomtee_object_process_one(root))
		;
	return NULL;
}

static struct qcomtee_object *call_out(struct qcomtee_object *obj, qcomtee_op_t op,
				       struct qcomtee_param *params, int num, const char *what)
{
	qcomtee_result_t result = 0;

	if (qcomtee_object_invoke(obj, op, params, num, &result) || result) {
		fprintf(stderr, "%s failed (result %u)\n", what, (unsigned)result);
		exit(1);
	}
	return params[num - 1].object;
}

int main(int argc, char **argv)
{
	static char image[1 << 16];
	struct qcomtee_param p[2];
	struct qcomtee_object *root, *creds, *env, *loader, *ctrl, *app;
	static struct echo echo;
	uint32_t uid = 3;
	pthread_t thread;
	FILE *f;
	size_t size;

	if (argc != 2 || !(f = fopen(argv[1], "rb"))) {
		fprintf(stderr, "usage: cb_supplicant IMAGE\n");
		return 2;
	}
	size = fread(image, 1, sizeof(image), f);
	fclose(f);
	root = qcomtee_object_root_init("/dev/tee0", ioctl, NULL, NULL);
	if (root == QCOMTEE_OBJECT_NULL) {
		fprintf(stderr, "no root: %s\n", strerror(errno));
		return 1;
	}
	pthread_create(&thread, NULL, serve, root);
	if (qcomtee_object_credentials_init(root, &creds))
		return 1;
	p[0].attr = QCOMTEE_OBJREF_INPUT;
	p[0].object = creds;
	p[1].attr = QCOMTEE_OBJREF_OUTPUT;
	env = call_out(root, 2, p, 2, "register");
	p[0].attr = QCOMTEE_UBUF_INPUT;
	p[0].ubuf.addr = &uid;
	p[0].ubuf.size = sizeof(uid);
	p[1].attr = QCOMTEE_OBJREF_OUTPUT;
	loader = call_out(env, 0, p, 2, "open the app loader");
	p[0].attr = QCOMTEE_UBUF_INPUT;
	p[0].ubuf.addr = image;
	p[0].ubuf.size = size;
	p[1].attr = QCOMTEE_OBJREF_OUTPUT;
	ctrl = call_out(loader, 0, p, 2, "loadFromBuffer");
	p[0].attr = QCOMTEE_OBJREF_OUTPUT;
	app = call_out(ctrl, 2, p, 1, "getAppObject");
	if (qcomtee_object_cb_init(&echo.object, &echo_ops, root))
		return 1;
	p[0].attr = QCOMTEE_OBJREF_INPUT;
	p[0].object = &echo.object;
	p[1].attr = QCOMTEE_UBUF_OUTPUT; /* unused: park takes one object */
	{
		qcomtee_result_t result = 0;

		if (qcomtee_object_invoke(app, 0, p, 1, &result) || result) {
			fprintf(stderr, "park failed (result %u)\n", (unsigned)result);
			return 1;
		}
	}
	printf("PARKED\n");
	fflush(stdout);
	for (;;)
		pause();
}
