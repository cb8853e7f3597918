/* River's `StandardScaler` (running mean and variance) and the feature dict it is fed, compiled:
 * the optional fast path of `models.online`.
 *
 * `scaler_learn(counts, means, vars, x)` and `scaler_transform(means, vars, x)` do what River
 * 0.26's `StandardScaler.learn_one(x)` and `.transform_one(x)` do (with_std, no window) on the
 * scaler's own `counts`, `means` and `vars` dicts: the same floating-point operations in the same
 * order (Welford's update; `(x - mean) / var ** 0.5`, the power by libm's `pow` as CPython's float
 * power), so the same doubles, and the same keys inserted in the same order. The scaler stays a
 * River object; only the interpreter's loop over its features is gone. Each returns None without
 * changing anything when its inputs are not what this code handles (a value that is not a float,
 * a count that is not a small int, a negative or non-finite variance): the caller then runs
 * River's own method.
 *
 * `lr_dot(weights, x)` and `lr_step(weights, x, loss_gradient, lr)`: the dot product and the SGD
 * step of River's `LogisticRegression` over its weights dict, the same doubles in the same order.
 *
 * `x_dict(cls, names, values)`: an instance of `cls` (a dict subclass) mapping each name to its
 * value, leaving out the values that are not finite; None when a value is not a float.
 *
 * Compiled without floating-point contraction (`-ffp-contract=off`, setup.py): a fused
 * multiply-add would round differently from the interpreter.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

#define EXACT_LIMIT 9007199254740992LL /* 2**53 */

/* The float value stored under `key` in `d`, 0.0 when absent; -1 when present but not a float. */
static int get_float(PyObject *d, PyObject *key, double *out) {
    PyObject *v = PyDict_GetItemWithError(d, key);
    if (v == NULL) {
        if (PyErr_Occurred()) return -2;
        *out = 0.0;
        return 0;
    }
    if (!PyFloat_CheckExact(v)) return -1;
    *out = PyFloat_AS_DOUBLE(v);
    return 1;
}

static int set_float(PyObject *d, PyObject *key, double value) {
    PyObject *v = PyFloat_FromDouble(value);
    if (v == NULL) return -1;
    int rc = PyDict_SetItem(d, key, v);
    Py_DECREF(v);
    return rc;
}

static int all_dicts(PyObject *const *args, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        if (!PyDict_Check(args[i])) return 0;
    return 1;
}

static PyObject *scaler_learn(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "scaler_learn(counts, means, vars, x)");
        return NULL;
    }
    PyObject *counts = args[0], *means = args[1], *vars = args[2], *x = args[3];
    if (!all_dicts(args, 4)) Py_RETURN_NONE;
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    double unused;
    /* First pass: decline before changing anything. */
    while (PyDict_Next(x, &pos, &key, &value)) {
        if (!PyFloat_CheckExact(value)) Py_RETURN_NONE;
        PyObject *c = PyDict_GetItemWithError(counts, key);
        if (c == NULL && PyErr_Occurred()) return NULL;
        if (c != NULL) {
            if (!PyLong_CheckExact(c)) Py_RETURN_NONE;
            long long n = PyLong_AsLongLong(c);
            if (n == -1 && PyErr_Occurred()) {
                PyErr_Clear();
                Py_RETURN_NONE;
            }
            if (n < 0 || n >= EXACT_LIMIT) Py_RETURN_NONE;
        }
        int rc = get_float(means, key, &unused);
        if (rc == -2) return NULL;
        if (rc == -1) Py_RETURN_NONE;
        rc = get_float(vars, key, &unused);
        if (rc == -2) return NULL;
        if (rc == -1) Py_RETURN_NONE;
    }
    pos = 0;
    while (PyDict_Next(x, &pos, &key, &value)) {
        double xi = PyFloat_AS_DOUBLE(value);
        PyObject *c = PyDict_GetItemWithError(counts, key);
        long long n = c == NULL ? 1 : PyLong_AsLongLong(c) + 1;
        PyObject *nc = PyLong_FromLongLong(n);
        if (nc == NULL) return NULL;
        int rc = PyDict_SetItem(counts, key, nc);
        Py_DECREF(nc);
        if (rc < 0) return NULL;
        double count = (double)n, old_mean, var;
        if (get_float(means, key, &old_mean) < 0) return NULL;
        double mean = old_mean + (xi - old_mean) / count;
        if (set_float(means, key, mean) < 0) return NULL;
        if (get_float(vars, key, &var) < 0) return NULL;
        var = var + ((xi - old_mean) * (xi - mean) - var) / count;
        if (set_float(vars, key, var) < 0) return NULL;
    }
    Py_RETURN_TRUE;
}

static PyObject *scaler_transform(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "scaler_transform(means, vars, x)");
        return NULL;
    }
    PyObject *means = args[0], *vars = args[1], *x = args[2];
    if (!all_dicts(args, 3)) Py_RETURN_NONE;
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(x, &pos, &key, &value)) {
        double v, m;
        if (!PyFloat_CheckExact(value)) Py_RETURN_NONE;
        int rc = get_float(vars, key, &v);
        if (rc == -2) return NULL;
        if (rc == -1 || !(v >= 0.0) || isinf(v)) Py_RETURN_NONE;
        rc = get_float(means, key, &m);
        if (rc == -2) return NULL;
        if (rc == -1) Py_RETURN_NONE;
    }
    PyObject *out = PyDict_New();
    if (out == NULL) return NULL;
    pos = 0;
    while (PyDict_Next(x, &pos, &key, &value)) {
        double xi = PyFloat_AS_DOUBLE(value), v = 0.0, m = 0.0, r = 0.0;
        int present = get_float(vars, key, &v);
        /* River reads `vars_[i]` first: a defaultdict inserts 0.0 for a key it has not seen. */
        if (present == 0 && set_float(vars, key, 0.0) < 0) goto fail;
        if (v != 0.0) {
            if (get_float(means, key, &m) == 0 && set_float(means, key, 0.0) < 0) goto fail;
            r = (xi - m) / pow(v, 0.5);
        }
        if (set_float(out, key, r) < 0) goto fail;
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static PyObject *x_dict(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "x_dict(cls, names, values)");
        return NULL;
    }
    PyObject *names = args[1], *values = args[2];
    if (!PyList_CheckExact(names) && !PyTuple_CheckExact(names)) Py_RETURN_NONE;
    if (!PyList_CheckExact(values) && !PyTuple_CheckExact(values)) Py_RETURN_NONE;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(names);
    if (PySequence_Fast_GET_SIZE(values) != n) Py_RETURN_NONE;
    PyObject **ks = PySequence_Fast_ITEMS(names), **vs = PySequence_Fast_ITEMS(values);
    for (Py_ssize_t i = 0; i < n; i++)
        if (!PyFloat_CheckExact(vs[i])) Py_RETURN_NONE;
    PyObject *out = PyObject_CallNoArgs(args[0]);
    if (out == NULL) return NULL;
    if (!PyDict_Check(out)) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_TypeError, "x_dict: cls must make a dict");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!isfinite(PyFloat_AS_DOUBLE(vs[i]))) continue;
        if (PyDict_SetItem(out, ks[i], vs[i]) < 0) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}

/* One feature of a row, with what the scaler holds of it, read once. */
typedef struct {
    PyObject *key;
    double x, mean, var;
    long long count;
    int has_count, has_mean, has_var;
} Feat;

#define SMALL_ROW 64

/* Reads a row for `learn_row` and `predict_row` before anything changes: names and values two
 * lists (or tuples) of the same length, the values floats, and what the scaler holds of each name
 * with a finite value a small int count, a float mean and a non-negative float variance. Fills
 * `f` (the finite values only) and `*m`. 1: take it; 0: decline; -1: error. */
static int read_row(PyObject *names, PyObject *values, PyObject *counts, PyObject *means, PyObject *vars, Feat **f,
                    Feat *small, Py_ssize_t *m)
{
    if (!PyList_CheckExact(names) && !PyTuple_CheckExact(names)) return 0;
    if (!PyList_CheckExact(values) && !PyTuple_CheckExact(values)) return 0;
    if (!PyDict_Check(counts) || !PyDict_Check(means) || !PyDict_Check(vars)) return 0;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(names);
    if (PySequence_Fast_GET_SIZE(values) != n) return 0;
    PyObject **ks = PySequence_Fast_ITEMS(names), **vs = PySequence_Fast_ITEMS(values);
    *f = small;
    if (n > SMALL_ROW) {
        *f = PyMem_Malloc((size_t)n * sizeof(Feat));
        if (*f == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyFloat_CheckExact(vs[i])) return 0;
        double x = PyFloat_AS_DOUBLE(vs[i]);
        if (!isfinite(x)) continue; /* `x_dict` leaves it out */
        Feat *e = &(*f)[k++];
        e->key = ks[i];
        e->x = x;
        e->count = 0;
        PyObject *c = PyDict_GetItemWithError(counts, ks[i]);
        if (c == NULL && PyErr_Occurred()) return -1;
        e->has_count = c != NULL;
        if (c != NULL) {
            if (!PyLong_CheckExact(c)) return 0;
            e->count = PyLong_AsLongLong(c);
            if (e->count == -1 && PyErr_Occurred()) {
                PyErr_Clear();
                return 0;
            }
            if (e->count < 0 || e->count >= EXACT_LIMIT) return 0;
        }
        int rc = get_float(means, ks[i], &e->mean);
        if (rc == -2) return -1;
        if (rc == -1) return 0;
        e->has_mean = rc;
        rc = get_float(vars, ks[i], &e->var);
        if (rc == -2) return -1;
        if (rc == -1 || (rc == 1 && !(e->var >= 0.0))) return 0;
        e->has_var = rc;
    }
    *m = k;
    return 1;
}

/* `(x - mean) / var ** 0.5 if var else 0.0`, as River's `transform_one` computes it. */
static double scaled(double x, double mean, double var) { return var != 0.0 ? (x - mean) / pow(var, 0.5) : 0.0; }

static PyObject *new_dict(Py_ssize_t n) { return _PyDict_NewPresized(n); }

static PyObject *learn_row(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "learn_row(names, values, counts, means, vars)");
        return NULL;
    }
    PyObject *counts = args[2], *means = args[3], *vars = args[4], *out = NULL;
    Feat small[SMALL_ROW], *f = NULL;
    Py_ssize_t m = 0;
    int ok = read_row(args[0], args[1], counts, means, vars, &f, small, &m);
    if (ok <= 0) {
        if (ok == 0) out = Py_NewRef(Py_None);
        goto done;
    }
    out = new_dict(m);
    if (out == NULL) goto done;
    for (Py_ssize_t i = 0; i < m; i++) {
        Feat *e = &f[i];
        /* Welford's update (`StandardScaler.learn_one`), then this feature's `transform_one`: each
         * feature's scaled value depends on its own statistics only, so feature by feature gives
         * River's learn-all-then-transform-all floats, and the keys enter the dicts in River's order. */
        long long k = e->count + 1;
        PyObject *nc = PyLong_FromLongLong(k);
        if (nc == NULL) goto fail;
        int rc = PyDict_SetItem(counts, e->key, nc);
        Py_DECREF(nc);
        if (rc < 0) goto fail;
        double count = (double)k, old_mean = e->mean;
        double mean = old_mean + (e->x - old_mean) / count;
        if (set_float(means, e->key, mean) < 0) goto fail;
        double var = e->var + ((e->x - old_mean) * (e->x - mean) - e->var) / count;
        if (set_float(vars, e->key, var) < 0) goto fail;
        if (var < 0.0) { /* cannot happen from a non-negative variance; River would scale by a complex */
            PyErr_SetString(PyExc_ArithmeticError, "negative running variance");
            goto fail;
        }
        if (set_float(out, e->key, scaled(e->x, mean, var)) < 0) goto fail;
    }
    goto done;
fail:
    Py_CLEAR(out);
done:
    if (f != small) PyMem_Free(f);
    return out;
}

static PyObject *predict_row(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "predict_row(names, values, counts, means, vars)");
        return NULL;
    }
    PyObject *out = NULL;
    Feat small[SMALL_ROW], *f = NULL;
    Py_ssize_t m = 0;
    int ok = read_row(args[0], args[1], args[2], args[3], args[4], &f, small, &m);
    if (ok <= 0) {
        if (ok == 0) out = Py_NewRef(Py_None);
        goto done;
    }
    /* A name the scaler has counted must have its statistics, or River's lookups would insert. */
    for (Py_ssize_t i = 0; i < m; i++)
        if (f[i].has_count && !(f[i].has_mean && f[i].has_var)) {
            out = Py_NewRef(Py_None);
            goto done;
        }
    out = new_dict(m);
    if (out == NULL) goto done;
    for (Py_ssize_t i = 0; i < m; i++) {
        Feat *e = &f[i];
        if (!e->has_count) continue; /* never seen: left out (`OnlineModel.predict_proba_one`) */
        if (set_float(out, e->key, scaled(e->x, e->mean, e->var)) < 0) {
            Py_CLEAR(out);
            goto done;
        }
    }
done:
    if (f != small && f != NULL) PyMem_Free(f);
    return out;
}

/* `LogisticRegression`'s weights: River 0.26 keeps them in a dict (inside its VectorDict) that
 * `lr_dot` and `lr_step` read and update in place. */

/* lr_dot(weights, x): sum of weights[k] * x[k] over the keys of x, in x's order, a key without a
 * weight contributing nothing: River's `VectorDict.dot(x)`, as `_raw_dot_one` calls it. In learn
 * mode River first inserts 0.0 for a key without a weight and adds 0.0 * x[k]; that can change
 * only the sign of a zero sum, which neither the sigmoid nor the loss's gradient can tell. */
static PyObject *lr_dot(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "lr_dot(weights, x)");
        return NULL;
    }
    PyObject *weights = args[0], *x = args[1], *key, *value;
    if (!all_dicts(args, 2)) Py_RETURN_NONE;
    double acc = 0.0, w;
    Py_ssize_t pos = 0;
    while (PyDict_Next(x, &pos, &key, &value)) {
        if (!PyFloat_CheckExact(value)) Py_RETURN_NONE;
        int got = get_float(weights, key, &w);
        if (got == -2) return NULL;
        if (got < 0) Py_RETURN_NONE;
        if (got == 1) acc = acc + w * PyFloat_AS_DOUBLE(value);
    }
    return PyFloat_FromDouble(acc);
}

/* lr_step(weights, x, loss_gradient, lr): weights[k] = weights[k] - (x[k] * loss_gradient) * lr
 * for each key of x, in x's order, a key without a weight starting at 0.0 (River's Zeros
 * initializer) and entering the dict then: the gradient `VectorDict.from_scaled(x, g)` and SGD's
 * `w.isub_scaled(gradient, lr)`, rounded as River rounds them. True, or None when declined
 * (nothing changed). */
static PyObject *lr_step(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "lr_step(weights, x, loss_gradient, lr)");
        return NULL;
    }
    PyObject *weights = args[0], *x = args[1], *key, *value;
    if (!all_dicts(args, 2) || !PyFloat_CheckExact(args[2]) || !PyFloat_CheckExact(args[3])) Py_RETURN_NONE;
    double g = PyFloat_AS_DOUBLE(args[2]), lr = PyFloat_AS_DOUBLE(args[3]), w;
    Py_ssize_t pos = 0;
    while (PyDict_Next(x, &pos, &key, &value)) { /* check everything first: decline unchanged */
        if (!PyFloat_CheckExact(value)) Py_RETURN_NONE;
        int got = get_float(weights, key, &w);
        if (got == -2) return NULL;
        if (got < 0) Py_RETURN_NONE;
    }
    pos = 0;
    while (PyDict_Next(x, &pos, &key, &value)) {
        if (get_float(weights, key, &w) == -2) return NULL;
        double step = (PyFloat_AS_DOUBLE(value) * g) * lr;
        if (set_float(weights, key, w - step) < 0) return NULL;
    }
    Py_RETURN_TRUE;
}

/* The row model: River's scaler and classifier state for a fixed list of n feature names, kept in
 * one array of 5n doubles (`array('d')`), feature i at position i of each block: counts, means,
 * variances, weights, and the scaled row of the last `rows_learn`. A count of 0 means River's dicts
 * do not hold the name (nor its weight: the scaler and the classifier learn the same keys). The
 * same floating-point operations as `learn_row` + `lr_dot` + `lr_step` on River's dicts, in the same
 * order (the names' order, which is x's order), so the same doubles; `models.online` writes them
 * back into River's objects (keys in first-seen order, kept in `order`) before anything else reads
 * those. */

/* The state's blocks, or NULL (and a released view) when `state` is not n x 5 writable doubles. */
static double *state_of(PyObject *state, Py_buffer *view, Py_ssize_t n)
{
    if (PyObject_GetBuffer(state, view, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        return NULL;
    }
    if (view->itemsize != 8 || view->format == NULL || strcmp(view->format, "d") != 0 || view->len != 5 * n * 8) {
        PyBuffer_Release(view);
        return NULL;
    }
    return (double *)view->buf;
}

/* The row's values, when a list or tuple of n floats. */
static PyObject **floats_of(PyObject *values, Py_ssize_t *n)
{
    if (!PyList_CheckExact(values) && !PyTuple_CheckExact(values)) return NULL;
    *n = PySequence_Fast_GET_SIZE(values);
    PyObject **vs = PySequence_Fast_ITEMS(values);
    for (Py_ssize_t i = 0; i < *n; i++)
        if (!PyFloat_CheckExact(vs[i])) return NULL;
    return vs;
}

/* A row's values: a list or tuple of floats, or a float32 buffer (`array('f')`: the copy of a
 * vector `pending` kept for its label), read as doubles without building a float object each. */
typedef struct {
    PyObject **objs;
    const float *f32;
    Py_ssize_t n;
    Py_buffer view;
    int held;
} Row;

/* 1 with `r` filled, 0 when `values` is neither (declined; nothing held). */
static int row_of(PyObject *values, Row *r)
{
    r->objs = NULL;
    r->f32 = NULL;
    r->held = 0;
    if (PyList_CheckExact(values) || PyTuple_CheckExact(values)) {
        r->objs = floats_of(values, &r->n);
        return r->objs != NULL;
    }
    if (!PyObject_CheckBuffer(values)) return 0;
    if (PyObject_GetBuffer(values, &r->view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        return 0;
    }
    if (r->view.itemsize != 4 || r->view.format == NULL || strcmp(r->view.format, "f") != 0) {
        PyBuffer_Release(&r->view);
        return 0;
    }
    r->f32 = (const float *)r->view.buf;
    r->n = r->view.len / 4;
    r->held = 1;
    return 1;
}

static inline double row_at(const Row *r, Py_ssize_t i)
{
    return r->f32 != NULL ? (double)r->f32[i] : PyFloat_AS_DOUBLE(r->objs[i]);
}

static void row_release(Row *r)
{
    if (r->held) PyBuffer_Release(&r->view);
    r->held = 0;
}

/* rows_learn(values, state, order): the scaler learns the row's finite values (Welford), scales
 * them into the state's last block and returns the classifier's dot product with its weights
 * before this row (a name seen for the first time has no weight yet: nothing added; its index is
 * appended to `order`). None when declined (nothing changed). */
static PyObject *rows_learn(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "rows_learn(values, state, order)");
        return NULL;
    }
    Row row;
    PyObject *order = args[2];
    if (!PyList_CheckExact(order) || !row_of(args[0], &row)) Py_RETURN_NONE;
    Py_ssize_t n = row.n;
    Py_buffer view;
    double *st = state_of(args[1], &view, n);
    if (st == NULL) {
        row_release(&row);
        Py_RETURN_NONE;
    }
    double *C = st, *M = st + n, *V = st + 2 * n, *W = st + 3 * n, *S = st + 4 * n, acc = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) /* counts must stay exact */
        if (isfinite(row_at(&row, i)) && !(C[i] >= 0.0 && C[i] + 1.0 < (double)EXACT_LIMIT)) {
            PyBuffer_Release(&view);
            row_release(&row);
            Py_RETURN_NONE;
        }
    for (Py_ssize_t i = 0; i < n; i++) {
        double x = row_at(&row, i);
        if (!isfinite(x)) continue;
        int first = C[i] == 0.0;
        double count = C[i] + 1.0, old_mean = M[i];
        double mean = old_mean + (x - old_mean) / count;
        double var = V[i] + ((x - old_mean) * (x - mean) - V[i]) / count;
        C[i] = count;
        M[i] = mean;
        V[i] = var;
        S[i] = scaled(x, mean, var);
        if (first) {
            PyObject *at = PyLong_FromSsize_t(i);
            int rc = at == NULL ? -1 : PyList_Append(order, at);
            Py_XDECREF(at);
            if (rc < 0) {
                PyBuffer_Release(&view);
                row_release(&row);
                return NULL;
            }
        } else {
            acc = acc + W[i] * S[i];
        }
    }
    PyBuffer_Release(&view);
    row_release(&row);
    return PyFloat_FromDouble(acc);
}

/* rows_step(values, state, loss_gradient, lr): the SGD step on the row `rows_learn` scaled last
 * (its finite values): w = w - (x * g) * lr. True, or None when declined. */
static PyObject *rows_step(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "rows_step(values, state, loss_gradient, lr)");
        return NULL;
    }
    Row row;
    if (!PyFloat_CheckExact(args[2]) || !PyFloat_CheckExact(args[3]) || !row_of(args[0], &row)) Py_RETURN_NONE;
    Py_ssize_t n = row.n;
    Py_buffer view;
    double *st = state_of(args[1], &view, n);
    if (st == NULL) {
        row_release(&row);
        Py_RETURN_NONE;
    }
    double g = PyFloat_AS_DOUBLE(args[2]), lr = PyFloat_AS_DOUBLE(args[3]), *W = st + 3 * n, *S = st + 4 * n;
    for (Py_ssize_t i = 0; i < n; i++)
        if (isfinite(row_at(&row, i))) W[i] = W[i] - (S[i] * g) * lr;
    PyBuffer_Release(&view);
    row_release(&row);
    Py_RETURN_TRUE;
}

/* rows_predict(values, state): the classifier's dot product with the scaled row, the names the
 * scaler has never counted left out (`OnlineModel.predict_proba_one`). Changes nothing. */
static PyObject *rows_predict(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "rows_predict(values, state)");
        return NULL;
    }
    Py_ssize_t n;
    PyObject **vs = floats_of(args[0], &n);
    if (vs == NULL) Py_RETURN_NONE;
    Py_buffer view;
    double *st = state_of(args[1], &view, n);
    if (st == NULL) Py_RETURN_NONE;
    double *C = st, *M = st + n, *V = st + 2 * n, *W = st + 3 * n, acc = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) {
        double x = PyFloat_AS_DOUBLE(vs[i]);
        if (isfinite(x) && C[i] > 0.0) acc = acc + W[i] * scaled(x, M[i], V[i]);
    }
    PyBuffer_Release(&view);
    return PyFloat_FromDouble(acc);
}

static PyMethodDef methods[] = {
    {"scaler_learn", (PyCFunction)(void (*)(void))scaler_learn, METH_FASTCALL,
     "scaler_learn(counts, means, vars, x) -> True, or None when declined (nothing changed)"},
    {"scaler_transform", (PyCFunction)(void (*)(void))scaler_transform, METH_FASTCALL,
     "scaler_transform(means, vars, x) -> dict, or None when declined (nothing changed)"},
    {"learn_row", (PyCFunction)(void (*)(void))learn_row, METH_FASTCALL,
     "learn_row(names, values, counts, means, vars) -> the scaled features, or None when declined"},
    {"predict_row", (PyCFunction)(void (*)(void))predict_row, METH_FASTCALL,
     "predict_row(names, values, counts, means, vars) -> the scaled features, or None when declined"},
    {"lr_dot", (PyCFunction)(void (*)(void))lr_dot, METH_FASTCALL,
     "lr_dot(weights, x) -> the weights' dot product with x, or None when declined"},
    {"lr_step", (PyCFunction)(void (*)(void))lr_step, METH_FASTCALL,
     "lr_step(weights, x, loss_gradient, lr) -> True, or None when declined (nothing changed)"},
    {"rows_learn", (PyCFunction)(void (*)(void))rows_learn, METH_FASTCALL,
     "rows_learn(values, state, order) -> the dot product before the step, or None when declined"},
    {"rows_step", (PyCFunction)(void (*)(void))rows_step, METH_FASTCALL,
     "rows_step(values, state, loss_gradient, lr) -> True, or None when declined"},
    {"rows_predict", (PyCFunction)(void (*)(void))rows_predict, METH_FASTCALL,
     "rows_predict(values, state) -> the dot product, or None when declined"},
    {"x_dict", (PyCFunction)(void (*)(void))x_dict, METH_FASTCALL,
     "x_dict(cls, names, values) -> cls instance of the finite values, or None when declined"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "models._river", "Compiled StandardScaler updates for models.online.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__river(void) { return PyModule_Create(&module); }
