/* The qtee bridge's embedded model: a Python interpreter in the C program's process,
 * started on the first open of a device node, running qtee.bridge._runtime.
 *
 * Every call into Python runs with the calling thread's cancellation disabled (a
 * thread cancelled while it held the GIL would stop the model for good) and with the
 * GIL taken for that call only; no call here waits for a SUPPL_RECV request (preload.c
 * waits for those in C).  Python installs no signal handlers: the program's own stay.
 *
 * Configuration comes from the environment `qtee run` sets:
 *   QTEE_BRIDGE_PATH    the module search path (os.pathsep-separated)
 *   QTEE_BRIDGE_HOME    the interpreter's prefix
 *   QTEE_BRIDGE_CONFIG  the model's configuration (JSON, read by the runtime)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bridge.h"

static pthread_once_t started = PTHREAD_ONCE_INIT;
static int ready;
static PyObject *py_open, *py_ioctl, *py_close, *py_dup, *py_report;

static void say(const char *what)
{
	fprintf(stderr, "qtee bridge: %s\n", what);
}

/* The last Python exception as one line on stderr (then cleared). */
static void say_exception(const char *what)
{
	PyObject *type, *value, *tb, *text = NULL;
	const char *msg = NULL;

	PyErr_Fetch(&type, &value, &tb);
	PyErr_NormalizeException(&type, &value, &tb);
	if (value)
		text = PyObject_Str(value);
	if (text)
		msg = PyUnicode_AsUTF8(text);
	fprintf(stderr, "qtee bridge: %s: %s%s%s\n", what,
		type ? ((PyTypeObject *)type)->tp_name : "error", msg && *msg ? ": " : "",
		msg ? msg : "");
	Py_XDECREF(text);
	Py_XDECREF(type);
	Py_XDECREF(value);
	Py_XDECREF(tb);
	PyErr_Clear();
}

static int set_search_path(PyConfig *config)
{
	const char *path = getenv("QTEE_BRIDGE_PATH");
	char *copy, *item, *save = NULL;
	PyStatus status;
	wchar_t *wide;

	if (!path || !*path) {
		say("QTEE_BRIDGE_PATH is not set (run programs with `qtee run -- PROG`)");
		return -1;
	}
	copy = strdup(path);
	if (!copy)
		return -1;
	for (item = strtok_r(copy, ":", &save); item; item = strtok_r(NULL, ":", &save)) {
		wide = Py_DecodeLocale(item, NULL);
		if (!wide)
			continue;
		status = PyWideStringList_Append(&config->module_search_paths, wide);
		PyMem_RawFree(wide);
		if (PyStatus_Exception(status)) {
			free(copy);
			return -1;
		}
	}
	free(copy);
	config->module_search_paths_set = 1;
	return 0;
}

static PyObject *method(PyObject *obj, const char *name)
{
	PyObject *m = PyObject_GetAttrString(obj, name);

	if (!m)
		say_exception(name);
	return m;
}

static void start(void)
{
	PyConfig config;
	PyStatus status;
	PyObject *mod = NULL, *bridge = NULL;
	const char *home = getenv("QTEE_BRIDGE_HOME");

	PyConfig_InitPythonConfig(&config);
	config.install_signal_handlers = 0;
	config.parse_argv = 0;
	config.site_import = 0;
	config.user_site_directory = 0;
	config.write_bytecode = 0;
	config.safe_path = 1;
	if (home && *home) {
		status = PyConfig_SetBytesString(&config, &config.home, home);
		if (PyStatus_Exception(status))
			goto config_failed;
	}
	if (set_search_path(&config))
		goto config_failed;
	status = Py_InitializeFromConfig(&config);
	PyConfig_Clear(&config);
	if (PyStatus_Exception(status)) {
		say(status.err_msg ? status.err_msg : "the interpreter did not start");
		return;
	}
	mod = PyImport_ImportModule("qtee.bridge._runtime");
	if (mod)
		bridge = PyObject_CallMethod(mod, "start", NULL);
	if (!bridge) {
		say_exception("cannot start the model");
	} else if ((py_open = method(bridge, "open")) && (py_ioctl = method(bridge, "ioctl")) &&
		   (py_close = method(bridge, "close")) && (py_dup = method(bridge, "dup")) &&
		   (py_report = method(bridge, "report"))) {
		ready = 1;
	}
	Py_XDECREF(bridge);
	Py_XDECREF(mod);
	PyEval_SaveThread(); /* the GIL goes; each call takes it for itself */
	return;
config_failed:
	PyConfig_Clear(&config);
	say("cannot configure the interpreter");
}

/* Call fn(args...) -> int with the GIL, cancellation disabled; -errno on failure. */
static long call(PyObject *fn, const char *fmt, ...)
{
	PyGILState_STATE gil;
	PyObject *args, *result;
	long value = -EIO;
	va_list ap;
	int cancel;

	if (!ready)
		return -ENOENT;
	pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &cancel);
	gil = PyGILState_Ensure();
	va_start(ap, fmt);
	args = Py_VaBuildValue(fmt, ap);
	va_end(ap);
	result = args ? PyObject_CallObject(fn, args) : NULL;
	if (result && PyLong_Check(result))
		value = PyLong_AsLong(result);
	else if (result == Py_None)
		value = 0;
	if (PyErr_Occurred())
		say_exception("the model failed");
	Py_XDECREF(result);
	Py_XDECREF(args);
	PyGILState_Release(gil);
	pthread_setcancelstate(cancel, NULL);
	return value;
}

int qb_open(const char *path, int flags)
{
	int cancel;

	pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &cancel);
	pthread_once(&started, start);
	pthread_setcancelstate(cancel, NULL);
	if (!ready)
		return -ENOENT; /* as a missing device; start() said why */
	return (int)call(py_open, "(si)", path, flags);
}

int qb_ioctl(int fd, unsigned long request, void *arg, int nowait)
{
	return (int)call(py_ioctl, "(ikKi)", fd, request, (unsigned long long)(uintptr_t)arg,
			 nowait);
}

int qb_close(int fd)
{
	return (int)call(py_close, "(i)", fd);
}

int qb_dup(int oldfd, int newfd)
{
	return (int)call(py_dup, "(ii)", oldfd, newfd);
}

void qb_report(void)
{
	if (ready)
		call(py_report, "()");
}
