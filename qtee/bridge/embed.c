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
#include <sys/uio.h>
#include <unistd.h>

#include "bridge.h"

static pthread_once_t started = PTHREAD_ONCE_INIT;
static int ready;
static PyObject *py_open, *py_ioctl, *py_close, *py_dup, *py_report;

/* ------------------------------------------------------------------ _qtee_bridge
 * The program's memory for the model: process_vm_readv/writev on this very process,
 * which fault like copy_from_user/copy_to_user (EFAULT for an unmapped range, and for a
 * write to a read-only page) instead of crashing, in one syscall each. */

static PyObject *mem_error(int code, unsigned long long addr, Py_ssize_t size)
{
	PyObject *exc = Py_BuildValue("(isKn)", code, strerror(code), addr, size);

	if (exc) {
		PyErr_SetObject(PyExc_OSError, exc);
		Py_DECREF(exc);
	}
	return NULL;
}

/* SIZE bytes between BUF and ADDR of this process, one process_vm_writev (WRITE) or
 * process_vm_readv: 0, or the errno (EFAULT for a short copy). */
static int mem_copy(void *buf, unsigned long long addr, Py_ssize_t size, int write)
{
	struct iovec local = { .iov_base = buf, .iov_len = (size_t)size };
	struct iovec remote = { .iov_base = (void *)(uintptr_t)addr, .iov_len = (size_t)size };
	ssize_t n = write ? process_vm_writev(getpid(), &local, 1, &remote, 1, 0)
			  : process_vm_readv(getpid(), &local, 1, &remote, 1, 0);

	if (n == size)
		return 0;
	return n < 0 ? errno : EFAULT;
}

/* The two args of read/write (USAGE names them) and the first, ADDR: -1 with the
 * exception set if they are not that. */
static int addr_arg(PyObject *const *args, Py_ssize_t nargs, const char *usage,
		    unsigned long long *addr)
{
	if (nargs != 2) {
		PyErr_SetString(PyExc_TypeError, usage);
		return -1;
	}
	*addr = PyLong_AsUnsignedLongLong(args[0]);
	return PyErr_Occurred() ? -1 : 0;
}

static PyObject *mem_read(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
	unsigned long long addr;
	Py_ssize_t size;
	PyObject *out;
	int code;

	(void)self;
	if (addr_arg(args, nargs, "read(addr, size)", &addr))
		return NULL;
	size = PyLong_AsSsize_t(args[1]);
	if (size == -1 && PyErr_Occurred())
		return NULL;
	if (size < 0) {
		PyErr_SetString(PyExc_ValueError, "size < 0");
		return NULL;
	}
	out = PyBytes_FromStringAndSize(NULL, size);
	if (!out || size == 0)
		return out;
	code = mem_copy(PyBytes_AS_STRING(out), addr, size, 0);
	if (code) {
		Py_DECREF(out);
		return mem_error(code, addr, size);
	}
	return out;
}

static PyObject *mem_write(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
	unsigned long long addr;
	Py_buffer data;
	Py_ssize_t size;
	int code;

	(void)self;
	if (addr_arg(args, nargs, "write(addr, data)", &addr))
		return NULL;
	if (PyObject_GetBuffer(args[1], &data, PyBUF_SIMPLE))
		return NULL;
	size = data.len;
	code = size ? mem_copy(data.buf, addr, size, 1) : 0;
	PyBuffer_Release(&data);
	if (code)
		return mem_error(code, addr, size);
	Py_RETURN_NONE;
}

static PyMethodDef bridge_methods[] = {
	{ "read", (PyCFunction)(void (*)(void))mem_read, METH_FASTCALL,
	  "read(addr, size) -> bytes: this process's memory, or OSError" },
	{ "write", (PyCFunction)(void (*)(void))mem_write, METH_FASTCALL,
	  "write(addr, data): into this process's memory, or OSError" },
	{ NULL, NULL, 0, NULL },
};

static struct PyModuleDef bridge_module = {
	PyModuleDef_HEAD_INIT, "_qtee_bridge", "The preload bridge's view of this process.", -1,
	bridge_methods, NULL, NULL, NULL, NULL,
};

static PyObject *init_bridge_module(void)
{
	return PyModule_Create(&bridge_module);
}

/* ------------------------------------------------------------------ the model */

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

	if (PyImport_AppendInittab("_qtee_bridge", init_bridge_module) < 0) {
		say("cannot add the _qtee_bridge module");
		return;
	}
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
	} else if (bridge == Py_None) {
		/* start() said why, in one line */
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

/* The hot path: no format string, the arguments built directly. */
int qb_ioctl(int fd, unsigned long request, void *arg, int nowait)
{
	PyGILState_STATE gil;
	PyObject *args[4], *result;
	long value = -EIO;
	int cancel, i;

	if (!ready)
		return -ENOENT;
	pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &cancel);
	gil = PyGILState_Ensure();
	args[0] = PyLong_FromLong(fd);
	args[1] = PyLong_FromUnsignedLong(request);
	args[2] = PyLong_FromUnsignedLongLong((unsigned long long)(uintptr_t)arg);
	args[3] = PyBool_FromLong(nowait);
	result = args[0] && args[1] && args[2] ? PyObject_Vectorcall(py_ioctl, args, 4, NULL)
					       : NULL;
	for (i = 0; i < 4; i++)
		Py_XDECREF(args[i]);
	if (result && PyLong_Check(result))
		value = PyLong_AsLong(result);
	if (PyErr_Occurred())
		say_exception("the model failed");
	Py_XDECREF(result);
	PyGILState_Release(gil);
	pthread_setcancelstate(cancel, NULL);
	return (int)value;
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
