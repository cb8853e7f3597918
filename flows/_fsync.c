/* fsync a list of files with the GIL released once for the whole list (`flows.shards`).

An epoch close writes a record to each changed shard's file (some 240 a process) and fsyncs them
in background threads while the worker goes on with the other shards' snapshots. In Python each
file costs its thread three trips for the GIL (open, fsync, close), and each trip takes the GIL
from the worker in the middle of its snapshots; here a thread asks for it once per list.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

/* fsync_paths(paths: tuple[bytes, ...]) -> None: open each path read-only, fsync and close it.
   A path that no longer exists is skipped (a file deleted since it was written: nothing names it);
   any other failure raises OSError naming the path, after the paths before it were synced. */
static PyObject *fsync_paths(PyObject *self, PyObject *arg) {
    (void)self;
    if (!PyTuple_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "fsync_paths takes a tuple of bytes paths");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(arg);
    const char **paths = PyMem_Malloc((size_t)(n > 0 ? n : 1) * sizeof(char *));
    if (paths == NULL) return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *p = PyTuple_GET_ITEM(arg, i);
        if (!PyBytes_Check(p)) {
            PyMem_Free(paths);
            PyErr_SetString(PyExc_TypeError, "fsync_paths takes a tuple of bytes paths");
            return NULL;
        }
        paths[i] = PyBytes_AS_STRING(p); /* the tuple keeps them alive for the call */
    }
    Py_ssize_t failed = -1;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        int fd = open(paths[i], O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            if (errno == ENOENT) continue;
            failed = i;
            err = errno;
            break;
        }
        int rc = fsync(fd);
        int fsync_errno = errno;
        close(fd);
        if (rc != 0) {
            failed = i;
            err = fsync_errno;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(paths);
    if (failed >= 0) {
        errno = err;
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, PyTuple_GET_ITEM(arg, failed));
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"fsync_paths", (PyCFunction)fsync_paths, METH_O,
     "fsync_paths(paths) -> None: fsync each file of a tuple of bytes paths, the GIL released"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "flows._fsync", "fsync a list of files with the GIL released once.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fsync(void) { return PyModule_Create(&module); }
