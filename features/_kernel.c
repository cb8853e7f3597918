/* The window reads of `features.plan.EntityPlan`, compiled: its optional fast path.
 *
 * `window_features(buffer, n, idx, rel, program, prefix[, labels])` computes, for the event at
 * position `idx` of an integer key buffer holding `n` events (layout in `features/buffer.py`), the
 * values of the plan's counts, sums, means, maxima, minima, distinct counts, time since last,
 * standard deviations, ratios and z-scores against the window's mean, is_new flags, delayed
 * counts and label counts and rates, exactly as the Python code does (same integers, same
 * operations in the same order, the same libm calls, Python's own float `sum`, hence the same
 * floats). `labels` is the key's `EntityState.labels` (None, or its transaction times and label
 * times, two int64 arrays); label ops need it. Any other aggregation gets its window's first
 * index instead, for Python to compute. The reads only read the buffer; `Appender` (below) is the
 * in-order append that inserts, evicts and keeps the block sums around them. Without this module
 * the same plan runs in Python (`features.codegen` falls back on its own), and the tests run both.
 *
 * `program` (built by `features.codegen.kernel_program`) is a bytes object of int64 words:
 *   itemsize (4 or 8), block (events per block sum), bias (added to the time origin, ms), W, W
 *   window lengths (ms), K, then K records: op, column, window index (-1: none), scale, extra
 *   (lookback for op 6; for the label-delayed ops 12-14, `scale` is the window and `extra` the
 *   label delay, both in ms; for the geo ops 15-16, `column` is the latitude's column, `window
 *   index` the longitude's, `scale` both coordinates' and `extra` the lookback).
 *
 * Compiled without floating-point contraction (`-ffp-contract=off`, setup.py): a fused
 * multiply-add would round differently from the interpreter.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The `kernel_op` of the entries of `features.aggregations.AGGREGATIONS`. OP_PYTHON (7, that
 * module's KERNEL_PYTHON) leaves a feature to Python; a new op goes at the end. */
enum {
    OP_COUNT, OP_SUM, OP_MEAN, OP_MAX, OP_MIN, OP_DISTINCT, OP_SINCE_LAST, OP_PYTHON,
    OP_RATIO_TO_MEAN, OP_ZSCORE, OP_STD, OP_IS_NEW, OP_DELAYED_COUNT, OP_LABEL_COUNT, OP_LABEL_RATE,
    OP_DISTANCE, OP_SPEED, OP_END
};

#define MAX_WINDOWS 64
#define EXACT_LIMIT 9007199254740992LL /* 2**53: integers up to here convert to double exactly */
#define MISSING (-2147483648LL)          /* an absent value in a numeric column (features.buffer) */
#define MINUTE_MS 60000LL
#define HOUR_MS 3600000LL

/* The exponent of `(v - mean) ** 2`, read at run time: a constant 2.0 lets the compiler turn
 * `pow` into a multiplication, which may round differently from libm's pow, which CPython calls. */
static volatile double TWO = 2.0;

typedef struct {
    const char *base;
    int wide; /* 8-byte items */
} Items;

static inline int64_t load(const Items *a, Py_ssize_t i)
{
    return a->wide ? ((const int64_t *)a->base)[i] : (int64_t)((const int32_t *)a->base)[i];
}

static int64_t sum_range(const Items *a, Py_ssize_t lo, Py_ssize_t hi)
{
    int64_t r = 0;
    if (a->wide) {
        const int64_t *p = (const int64_t *)a->base;
        for (Py_ssize_t i = lo; i < hi; i++) r += p[i];
    } else {
        const int32_t *p = (const int32_t *)a->base;
        for (Py_ssize_t i = lo; i < hi; i++) r += p[i];
    }
    return r;
}

static int cmp_i64(const void *x, const void *y)
{
    int64_t a = *(const int64_t *)x, b = *(const int64_t *)y;
    return (a > b) - (a < b);
}

/* Distinct non-zero values among positions [lo, hi); -1 on a memory error. */
static Py_ssize_t distinct(const Items *a, Py_ssize_t lo, Py_ssize_t hi)
{
    int64_t small[256];
    int64_t *v = small;
    Py_ssize_t k = 0;
    if (hi - lo > 256) {
        v = PyMem_Malloc((size_t)(hi - lo) * sizeof(int64_t));
        if (v == NULL) return -1;
    }
    for (Py_ssize_t i = lo; i < hi; i++) {
        int64_t x = load(a, i);
        if (x != 0) v[k++] = x;
    }
    qsort(v, (size_t)k, sizeof(int64_t), cmp_i64);
    Py_ssize_t count = 0;
    for (Py_ssize_t i = 0; i < k; i++) count += i == 0 || v[i] != v[i - 1];
    if (v != small) PyMem_Free(v);
    return count;
}

/* integer / scale as Python's true division rounds it. */
static PyObject *ratio(int64_t r, int64_t scale)
{
    if (r > -EXACT_LIMIT && r < EXACT_LIMIT) return PyFloat_FromDouble((double)r / (double)scale);
    PyObject *num = PyLong_FromLongLong(r), *den = PyLong_FromLongLong(scale), *out = NULL;
    if (num && den) out = PyNumber_TrueDivide(num, den);
    Py_XDECREF(num);
    Py_XDECREF(den);
    return out;
}

/* integer / scale as a C double, as Python's true division rounds it; -1 on error. */
static int to_double(int64_t c, int64_t scale, double *out)
{
    if (c > -EXACT_LIMIT && c < EXACT_LIMIT) {
        *out = (double)c / (double)scale;
        return 0;
    }
    PyObject *v = ratio(c, scale);
    if (v == NULL) return -1;
    *out = PyFloat_AsDouble(v);
    Py_DECREF(v);
    return 0;
}

/* Python's `sum` of a list of floats (start 0): plain accumulation before 3.12, Neumaier's
 * compensated summation from 3.12 on, as CPython's builtin does. */
static double py_sum(const double *v, Py_ssize_t k)
{
    double f = 0.0;
#if PY_VERSION_HEX >= 0x030C0000
    double c = 0.0;
    for (Py_ssize_t i = 0; i < k; i++) {
        double x = v[i], t = f + x;
        if (fabs(f) >= fabs(x))
            c += (f - t) + x;
        else
            c += (x - t) + f;
        f = t;
    }
    if (c != 0.0 && isfinite(c)) f += c;
#else
    for (Py_ssize_t i = 0; i < k; i++) f += v[i];
#endif
    return f;
}

/* The present values of numeric column positions [lo, hi) as floats (`features.buffer.numbers`
 * without its NaNs) into `vals` (k of them), and the last position's value (NaN if absent) into
 * `current`. Returns k, or -1 on error. */
static Py_ssize_t present(const Items *a, Py_ssize_t lo, Py_ssize_t hi, int64_t scale, double *vals,
                          double *current)
{
    Py_ssize_t k = 0;
    *current = NAN;
    for (Py_ssize_t i = lo; i < hi; i++) {
        int64_t c = load(a, i);
        if (c == MISSING) continue; /* absent: not in the window's values (the current stays NaN) */
        if (to_double(c, scale, &vals[k]) < 0) return -1;
        if (i == hi - 1) *current = vals[k];
        k++;
    }
    return k;
}

/* The window's mean and population standard deviation as `features.aggregations` computes them
 * (`sum(vals) / len(vals)`, `sqrt(sum((v - mean) ** 2 ...) / len(vals))`); k > 0. */
static void mean_std(double *vals, Py_ssize_t k, double *mean, double *std)
{
    *mean = py_sum(vals, k) / (double)k;
    if (std == NULL) return;
    for (Py_ssize_t i = 0; i < k; i++) vals[i] = pow(fabs(vals[i] - *mean), TWO); /* CPython: |x| ** 2 */
    *std = sqrt(py_sum(vals, k) / (double)k);
}

/* bisect_right over positions [lo, hi) of int64s or buffer items. */
static Py_ssize_t bisect_items(const Items *a, int64_t x, Py_ssize_t lo, Py_ssize_t hi)
{
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (x < load(a, mid))
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

/* Column `col`'s sum over events [start, end), from the key's block sums when it has them
 * (`features.buffer.window_sum`). Returns 0 and sets an error on failure. */
static int window_sum(const Items *a, Py_ssize_t o, Py_ssize_t start, Py_ssize_t end, PyObject *sums,
                      int64_t shift, int64_t block, int64_t col, int64_t *out)
{
    if (sums != NULL) {
        int64_t b1 = (start + shift + block - 1) / block, b2 = (end + shift) / block;
        if (b2 > b1) {
            PyObject *key = PyLong_FromLongLong(col);
            if (key == NULL) return 0;
            PyObject *p = PyDict_GetItemWithError(sums, key); /* borrowed */
            Py_DECREF(key);
            if (p == NULL) {
                if (!PyErr_Occurred()) PyErr_SetString(PyExc_KeyError, "no block sums for a summed column");
                return 0;
            }
            Py_buffer pv;
            if (PyObject_GetBuffer(p, &pv, PyBUF_SIMPLE) < 0) return 0;
            const int64_t *ps = (const int64_t *)pv.buf;
            Py_ssize_t blocks = pv.len / (Py_ssize_t)sizeof(int64_t);
            if (pv.len % (Py_ssize_t)sizeof(int64_t) != 0 || b2 >= blocks) {
                PyBuffer_Release(&pv);
                PyErr_SetString(PyExc_ValueError, "block sums shorter than the key's events");
                return 0;
            }
            int64_t r = ps[b2] - ps[b1];
            PyBuffer_Release(&pv);
            r += sum_range(a, o + start, o + b1 * block - shift);
            r += sum_range(a, o + b2 * block - shift, o + end);
            *out = r;
            return 1;
        }
    }
    *out = sum_range(a, o + start, o + end);
    return 1;
}

/* `features.aggregations.haversine_km`, the same libm calls in the same order (`math.radians` is
 * a multiplication by pi / 180, `** 2` libm's pow). */
static double haversine_km(double lat1, double lon1, double lat2, double lon2)
{
    const double deg = 3.14159265358979323846 / 180.0;
    double p1 = lat1 * deg, p2 = lat2 * deg;
    double dp = p2 - p1, dl = (lon2 - lon1) * deg;
    double a = pow(sin(dp / 2), TWO) + cos(p1) * cos(p2) * pow(sin(dl / 2), TWO);
    double r = sqrt(a);
    return 2 * 6371.0088 * asin(r < 1.0 ? r : 1.0); /* Python's min(1.0, r): 1.0 unless r is less */
}

/* `features.aggregations._distance_km` / `_speed_kmh` on an integer buffer: the distance (km) to
 * the newest earlier located event within the lookback, or the speed (km/h) that implies, NaN
 * when this event or every such one has no location. -1 on error. */
static int geo(const Items *a, Py_ssize_t n, Py_ssize_t idx, int64_t rel, const int64_t *op, double *out)
{
    Py_ssize_t o_lat = 1 + (op[1] + 1) * n, o_lon = 1 + (op[2] + 1) * n;
    double lat, lon, la, lo;
    *out = NAN;
    int64_t c = load(a, o_lat + idx);
    if (c == MISSING) return 0;
    if (to_double(c, op[3], &lat) < 0 || to_double(load(a, o_lon + idx), op[3], &lon) < 0) return -1;
    int64_t oldest = rel - op[4];
    for (Py_ssize_t i = idx - 1; i >= 0; i--) {
        int64_t ti = load(a, 1 + i);
        if (ti <= oldest) break;
        int64_t ci = load(a, o_lat + i);
        if (ci == MISSING) continue;
        if (to_double(ci, op[3], &la) < 0 || to_double(load(a, o_lon + i), op[3], &lo) < 0) return -1;
        double km = haversine_km(la, lo, lat, lon);
        if (op[0] == OP_DISTANCE) {
            *out = km;
        } else {
            double hours = (double)(rel - ti) / (double)HOUR_MS, least = 1.0 / 60.0; /* MINUTE_H */
            *out = km / (least > hours ? least : hours); /* Python's max(hours, MINUTE_H) */
        }
        return 0;
    }
    return 0;
}

static PyObject *features_of(PyObject *buffer, Py_ssize_t n, Py_ssize_t idx, long long rel, PyObject *program,
                             PyObject *prefix, PyObject *labels, int has_labels);

static PyObject *window_features(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 6 && nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "window_features(buffer, n, idx, rel, program, prefix[, labels])");
        return NULL;
    }
    Py_ssize_t n = PyLong_AsSsize_t(args[1]), idx = PyLong_AsSsize_t(args[2]);
    long long rel = PyLong_AsLongLong(args[3]);
    if (PyErr_Occurred()) return NULL;
    return features_of(args[0], n, idx, rel, args[4], args[5], nargs == 7 ? args[6] : Py_None, nargs == 7);
}

/* `window_features` with its arguments read (`has_labels`: the 7th was given). */
static PyObject *features_of(PyObject *buffer, Py_ssize_t n, Py_ssize_t idx, long long rel, PyObject *program,
                             PyObject *prefix, PyObject *labels, int has_labels)
{
    if (!PyBytes_Check(program)) {
        PyErr_SetString(PyExc_TypeError, "program must be bytes");
        return NULL;
    }
    const int64_t *prog = (const int64_t *)PyBytes_AS_STRING(program);
    Py_ssize_t words = PyBytes_GET_SIZE(program) / (Py_ssize_t)sizeof(int64_t);
    if (words < 5 || prog[3] < 0 || prog[3] > MAX_WINDOWS || words < 5 + prog[3] || prog[4 + prog[3]] < 0 ||
        prog[4 + prog[3]] > words || words != 5 + prog[3] + 5 * prog[4 + prog[3]] ||
        (prog[0] != 4 && prog[0] != 8) || prog[1] < 1 || prog[2] < 0 || prog[2] > EXACT_LIMIT) {
        PyErr_SetString(PyExc_ValueError, "malformed kernel program");
        return NULL;
    }
    int64_t itemsize = prog[0], block = prog[1], bias = prog[2], nw = prog[3];
    const int64_t *win = prog + 4;
    int64_t nops = prog[4 + nw];
    const int64_t *ops = prog + 5 + nw;
    Py_buffer lab[2];
    int nlab = 0; /* label buffers held */
    Py_ssize_t nlabels = 0;

    PyObject *shift_obj = NULL, *sums = NULL;
    int64_t shift = 0;
    if (prefix != Py_None) {
        shift_obj = PyObject_GetAttrString(prefix, "shift");
        if (shift_obj == NULL) return NULL;
        shift = PyLong_AsLongLong(shift_obj);
        Py_DECREF(shift_obj);
        if (PyErr_Occurred()) return NULL;
        if (shift < 0 || shift >= block) {
            PyErr_SetString(PyExc_ValueError, "prefix.shift outside [0, block)");
            return NULL;
        }
        sums = PyObject_GetAttrString(prefix, "sums");
        if (sums == NULL) return NULL;
        if (!PyDict_Check(sums)) {
            Py_DECREF(sums);
            PyErr_SetString(PyExc_TypeError, "prefix.sums must be a dict");
            return NULL;
        }
    }

    Py_buffer view;
    if (PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE) < 0) {
        Py_XDECREF(sums);
        return NULL;
    }
    Items a = {(const char *)view.buf, itemsize == 8};
    Py_ssize_t items = view.len / (Py_ssize_t)itemsize;
    PyObject *out = NULL;
    double *vals = NULL;
    if (view.itemsize != itemsize || view.len % itemsize != 0 || n < 1 || idx < 0 || idx >= n || 1 + n > items) {
        PyErr_SetString(PyExc_ValueError, "buffer does not match the kernel program");
        goto done;
    }
    int stats = 0, reads_labels = 0;
    for (int64_t k = 0; k < nops; k++) {
        int64_t col = ops[5 * k + 1], w = ops[5 * k + 2];
        int64_t op = ops[5 * k];
        int delayed = op == OP_DELAYED_COUNT || op == OP_LABEL_COUNT || op == OP_LABEL_RATE;
        if (op == OP_DISTANCE || op == OP_SPEED) { /* two columns, no window */
            if (col < 0 || w < 0 || col + 2 > (items - 1) / n || w + 2 > (items - 1) / n || ops[5 * k + 3] < 1) {
                PyErr_SetString(PyExc_ValueError, "buffer does not match the kernel program");
                goto done;
            }
            continue;
        }
        int needs_column = op != OP_PYTHON && op != OP_COUNT && op != OP_SINCE_LAST && !delayed;
        /* column col spans positions [1 + (col + 1) * n, 1 + (col + 2) * n), without overflow */
        int scaled = op == OP_SUM || op == OP_MEAN || op == OP_MAX || op == OP_MIN || op == OP_RATIO_TO_MEAN ||
                     op == OP_ZSCORE || op == OP_STD;
        if (w >= nw || (col >= 0 && col + 2 > (items - 1) / n) || (needs_column && (col < 0 || w < 0)) ||
            (scaled && ops[5 * k + 3] < 1) ||
            (delayed && (ops[5 * k + 3] < 0 || ops[5 * k + 3] > EXACT_LIMIT || ops[5 * k + 4] < 0 ||
                         ops[5 * k + 4] > EXACT_LIMIT))) {
            PyErr_SetString(PyExc_ValueError, "buffer does not match the kernel program");
            goto done;
        }
        stats |= op == OP_RATIO_TO_MEAN || op == OP_ZSCORE || op == OP_STD;
        reads_labels |= op == OP_LABEL_COUNT || op == OP_LABEL_RATE;
    }
    if (reads_labels && !has_labels) {
        PyErr_SetString(PyExc_TypeError, "label features need the key's labels (window_features' 7th argument)");
        goto done;
    }
    if (reads_labels && labels != Py_None) {
        if (!PyTuple_Check(labels) || PyTuple_GET_SIZE(labels) != 2) {
            PyErr_SetString(PyExc_TypeError, "labels must be None or (transaction times, label times)");
            goto done;
        }
        for (; nlab < 2; nlab++)
            if (PyObject_GetBuffer(PyTuple_GET_ITEM(labels, nlab), &lab[nlab], PyBUF_FORMAT) < 0) goto done;
        nlabels = lab[0].len / 8;
        for (int i = 0; i < 2; i++)
            if (lab[i].itemsize != 8 || lab[i].format == NULL || strcmp(lab[i].format, "q") != 0 ||
                lab[i].len != nlabels * 8) {
                PyErr_SetString(PyExc_ValueError, "labels must be two int64 arrays of the same length");
                goto done;
            }
    }
    if (stats) {
        vals = PyMem_Malloc((size_t)(idx + 1) * sizeof(double));
        if (vals == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    /* The epoch ms the buffer's time offsets count from (`features.buffer.origin`). */
    int64_t base = load(&a, 0) * MINUTE_MS + bias;
    Items times = {(const char *)(nlab ? lab[0].buf : NULL), 1}, known = {(const char *)(nlab ? lab[1].buf : NULL), 1};

    /* Each window's first event: bisect_right over the times of events [0, idx), as in Python. */
    Py_ssize_t end = idx + 1, st[MAX_WINDOWS];
    for (int64_t w = 0; w < nw; w++) {
        int64_t x = rel - win[w];
        Py_ssize_t lo = 1, hi = end;
        while (lo < hi) {
            Py_ssize_t mid = lo + (hi - lo) / 2;
            if (x < load(&a, mid))
                hi = mid;
            else
                lo = mid + 1;
        }
        st[w] = lo - 1;
    }

    out = PyList_New((Py_ssize_t)nops);
    if (out == NULL) goto done;
    for (int64_t k = 0; k < nops; k++) {
        const int64_t *op = ops + 5 * k;
        int64_t col = op[1], scale = op[3];
        int two_columns = op[0] == OP_DISTANCE || op[0] == OP_SPEED; /* op[2]: a column, not a window */
        Py_ssize_t start = op[2] >= 0 && !two_columns ? st[op[2]] : 0;
        Py_ssize_t o = 1 + (col + 1) * n;
        PyObject *v = NULL;
        switch (op[0]) {
        case OP_COUNT:
            v = PyFloat_FromDouble((double)(end - start));
            break;
        case OP_SUM:
        case OP_MEAN: {
            int64_t r;
            if (!window_sum(&a, o, start, end, sums, shift, block, col, &r)) break;
            v = ratio(r, scale);
            if (v != NULL && op[0] == OP_MEAN) {
                double mean = PyFloat_AS_DOUBLE(v) / (double)(end - start);
                Py_DECREF(v);
                v = PyFloat_FromDouble(mean);
            }
            break;
        }
        case OP_MAX:
        case OP_MIN: {
            int64_t best = load(&a, o + start);
            for (Py_ssize_t i = o + start + 1; i < o + end; i++) {
                int64_t x = load(&a, i);
                if (op[0] == OP_MAX ? x > best : x < best) best = x;
            }
            v = ratio(best, scale);
            break;
        }
        case OP_DISTINCT: {
            Py_ssize_t c = distinct(&a, o + start, o + end);
            v = c < 0 ? PyErr_NoMemory() : PyFloat_FromDouble((double)c);
            break;
        }
        case OP_SINCE_LAST: {
            double r = NAN;
            if (idx > 0) {
                int64_t prev = load(&a, idx);
                if (prev > rel - op[4]) r = (double)(rel - prev) / 1000.0;
            }
            v = PyFloat_FromDouble(r);
            break;
        }
        case OP_PYTHON:
            v = PyFloat_FromDouble((double)start);
            break;
        case OP_RATIO_TO_MEAN:
        case OP_ZSCORE:
        case OP_STD: {
            double current, mean, std, r = NAN;
            Py_ssize_t m = present(&a, o + start, o + end, scale, vals, &current);
            if (m < 0) break;
            if (m > 0) {
                mean_std(vals, m, &mean, op[0] == OP_RATIO_TO_MEAN ? NULL : &std);
                if (op[0] == OP_RATIO_TO_MEAN)
                    r = mean > 0 ? current / mean : NAN;
                else if (op[0] == OP_ZSCORE)
                    r = std > 0 ? (current - mean) / std : NAN;
                else
                    r = std;
            }
            v = PyFloat_FromDouble(r);
            break;
        }
        case OP_IS_NEW: {
            int64_t c = load(&a, o + idx);
            double r = NAN;
            if (c != 0) {
                r = 1.0;
                for (Py_ssize_t i = o + start; i < o + idx; i++)
                    if (load(&a, i) == c) {
                        r = 0.0;
                        break;
                    }
            }
            v = PyFloat_FromDouble(r);
            break;
        }
        case OP_DISTANCE:
        case OP_SPEED: {
            double r;
            if (geo(&a, n, idx, rel, op, &r) == 0) v = PyFloat_FromDouble(r);
            break;
        }
        case OP_DELAYED_COUNT:
        case OP_LABEL_COUNT:
        case OP_LABEL_RATE: {
            /* (t - delay - window, t - delay], t this event's epoch ms (`features.aggregations`) */
            int64_t t = base + rel, hi = t - op[4], lo = hi - op[3];
            Py_ssize_t count = 0, frauds = 0;
            if (op[0] != OP_LABEL_COUNT)
                count = bisect_items(&a, hi - base, 1, 1 + n) - bisect_items(&a, lo - base, 1, 1 + n);
            if (op[0] != OP_DELAYED_COUNT && nlab)
                for (Py_ssize_t i = bisect_items(&times, lo, 0, nlabels), e = bisect_items(&times, hi, 0, nlabels);
                     i < e; i++)
                    frauds += load(&known, i) <= t;
            if (op[0] == OP_DELAYED_COUNT)
                v = PyFloat_FromDouble((double)count);
            else if (op[0] == OP_LABEL_COUNT)
                v = PyFloat_FromDouble((double)frauds);
            else
                v = PyFloat_FromDouble(count ? (double)frauds / (double)count : NAN);
            break;
        }
        default:
            PyErr_SetString(PyExc_ValueError, "unknown kernel op");
        }
        if (v == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)k, v);
    }
done:
    PyMem_Free(vals);
    for (int i = 0; i < nlab; i++) PyBuffer_Release(&lab[i]);
    PyBuffer_Release(&view);
    Py_XDECREF(sums);
    return out;
}


/* ---- The in-order append: `Appender` -------------------------------------------------------
 *
 * `Appender(header, names, program, presize, build_prefix, extend_prefix, shrink_prefix,
 * evict_labels, summed, fallback)` is the generated `observe(s, txn)` of a plan
 * (`features.codegen.compile_plan`), compiled: called with a key's buffer and a transaction, it
 * does what that Python function does on its fast path (encode the event's values, insert them at
 * the end of each segment, keep the block sums, read the windows with `features_of`, evict what
 * expired) and returns `(values, False)`. Anything else (a new, widened or re-based key, an event
 * out of order, a value that is not exactly storable, an attribute of another type) it hands,
 * before changing anything, to `fallback`, the generated Python function, which runs it from the
 * start. The rare steps (presizing, building, growing and shrinking block sums, label eviction)
 * call the same Python helpers the generated code calls.
 *
 * `header` is a bytes object of int64 words: itemsize (4 or 8), width (segments: times, then one
 * per column), bias, checks (1: a time offset must stay below `limit`), limit (the bound of a
 * stored value, and of a time offset when checked), retention (ms), lazy shift, lazy min, the
 * event count to presize at, the count to build block sums at, block, C (columns), then C records:
 * kind (0: a number, 1: a string, hashed), scale, nullable. `names` holds the attribute names:
 * "ts_ms", then the columns'. `summed` is the tuple of summed columns.
 */

#define MAX_COLUMNS 64

static uint32_t crc_table[256];

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

/* zlib.crc32(data): the CRC-32 of IEEE 802.3 (reflected, initial and final xor all ones). */
static uint32_t crc32_of(const unsigned char *p, Py_ssize_t len)
{
    uint32_t c = 0xFFFFFFFFu;
    while (len-- > 0) c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *names, *program, *presize, *build_prefix, *extend_prefix, *shrink_prefix, *evict_labels, *summed,
        *fallback;
    int64_t itemsize, width, bias, checks, limit, retention, lazy_shift, lazy_min, presize_at, prefix_min, block,
        columns;
    int64_t kind[MAX_COLUMNS], scale[MAX_COLUMNS], nullable[MAX_COLUMNS];
} Appender;

static PyObject *str_append, *str_prefix, *str_labels, *str_shift, *long_zero;

static inline void store(char *base, int wide, Py_ssize_t i, int64_t v)
{
    if (wide)
        ((int64_t *)base)[i] = v;
    else
        ((int32_t *)base)[i] = (int32_t)v;
}

/* The value of column j stored for `v` in *out; 1 when the generated code would not take its fast
 * path for it (or would raise): nothing was changed then, and no exception is set. */
static int encode(const Appender *A, int64_t j, PyObject *v, int64_t *out)
{
    if (A->kind[j] == 0) {
        if (v == Py_None) {
            if (!A->nullable[j]) return 1;
            *out = MISSING;
            return 0;
        }
        if (!PyFloat_CheckExact(v)) return 1; /* an int, a bool...: Python's arithmetic decides */
        double x = PyFloat_AS_DOUBLE(v), y = x * (double)A->scale[j];
        if (!isfinite(y)) return 1;
        double r = nearbyint(y); /* round(): halves to even, the default rounding mode */
        if (!(r > -(double)A->limit && r < (double)A->limit) || r / (double)A->scale[j] != x) return 1;
        *out = (int64_t)r;
        return 0;
    }
    if (v == Py_None) {
        *out = 0;
        return 0;
    }
    if (!PyUnicode_CheckExact(v)) return 1;
    uint32_t c;
    if (PyUnicode_IS_ASCII(v)) {
        c = crc32_of((const unsigned char *)PyUnicode_DATA(v), PyUnicode_GET_LENGTH(v));
    } else { /* a temporary copy: PyUnicode_AsUTF8 would keep one in the (long-lived) string */
        PyObject *b = PyUnicode_AsUTF8String(v);
        if (b == NULL) {
            PyErr_Clear(); /* not encodable: `.encode()` raises in Python, which the fallback does */
            return 1;
        }
        c = crc32_of((const unsigned char *)PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b));
        Py_DECREF(b);
    }
    *out = (int64_t)(int32_t)(c ? c : 1); /* ((crc or 1) ^ BIAS) - BIAS */
    return 0;
}

/* Whether a key's labels (`EntityState.labels`: transaction times, label times) have any to evict
 * at `horizon`: none left, or the oldest transaction at or before it; -1 on error. */
static int oldest_label_due(PyObject *labels, int64_t horizon)
{
    if (!PyTuple_Check(labels) || PyTuple_GET_SIZE(labels) != 2) {
        PyErr_SetString(PyExc_TypeError, "labels must be None or (transaction times, label times)");
        return -1;
    }
    Py_buffer b;
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(labels, 0), &b, PyBUF_FORMAT) < 0) return -1;
    int due = 1;
    if (b.itemsize != 8 || b.format == NULL || strcmp(b.format, "q") != 0) {
        PyErr_SetString(PyExc_ValueError, "labels must be two int64 arrays of the same length");
        due = -1;
    } else if (b.len >= 8) {
        due = ((const int64_t *)b.buf)[0] <= horizon;
    }
    PyBuffer_Release(&b);
    return due;
}

static PyObject *call(PyObject *fn, PyObject *const *args, size_t n)
{
    return PyObject_Vectorcall(fn, args, n, NULL);
}

/* 0: done, *result set; 1: not this path (nothing changed, no exception); -1: an exception. */
static int append_event(Appender *A, PyObject *s, PyObject *txn, PyObject **result)
{
    int64_t width = A->width, itemsize = A->itemsize;
    int wide = itemsize == 8;
    Py_ssize_t size = PySequence_Size(s);
    if (size < 0) {
        PyErr_Clear();
        return 1;
    }
    if (size < 2 || (size - 1) % width != 0) return 1;
    Py_ssize_t n = (size - 1) / width;
    int64_t a[MAX_COLUMNS], first, last;
    {
        Py_buffer view;
        if (PyObject_GetBuffer(s, &view, PyBUF_SIMPLE) < 0) {
            PyErr_Clear();
            return 1;
        }
        if (view.len != (Py_ssize_t)(size * itemsize)) {
            PyBuffer_Release(&view);
            return 1;
        }
        Items b = {(const char *)view.buf, wide};
        first = load(&b, 0);
        last = load(&b, n);
        PyBuffer_Release(&view);
    }
    PyObject *ts = PyObject_GetAttr(txn, PyTuple_GET_ITEM(A->names, 0));
    if (ts == NULL) {
        PyErr_Clear();
        return 1;
    }
    if (!PyLong_CheckExact(ts)) {
        Py_DECREF(ts);
        return 1;
    }
    int overflow = 0;
    long long ts_ms = PyLong_AsLongLongAndOverflow(ts, &overflow);
    Py_DECREF(ts);
    if (overflow || (ts_ms == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 1;
    }
    int64_t origin, rel;
    if (__builtin_mul_overflow(first, (int64_t)MINUTE_MS, &origin) || __builtin_add_overflow(origin, A->bias, &origin) ||
        __builtin_sub_overflow((int64_t)ts_ms, origin, &rel))
        return 1;
    if (rel < last || (A->checks && rel >= A->limit)) return 1;
    for (int64_t j = 0; j < A->columns; j++) {
        PyObject *v = PyObject_GetAttr(txn, PyTuple_GET_ITEM(A->names, j + 1));
        if (v == NULL) {
            PyErr_Clear();
            return 1;
        }
        int r = encode(A, j, v, &a[j]);
        Py_DECREF(v);
        if (r) return 1;
    }

    /* From here on the key changes, as the generated code changes it: one append per segment (the
     * array grows as `insert` grows it), then each segment's values move to their new place. */
    for (int64_t k = 0; k < width; k++) {
        PyObject *r = PyObject_CallMethodOneArg(s, str_append, long_zero);
        if (r == NULL) return -1;
        Py_DECREF(r);
    }
    {
        Py_buffer view;
        if (PyObject_GetBuffer(s, &view, PyBUF_WRITABLE) < 0) return -1;
        if (view.len != (Py_ssize_t)((size + width) * itemsize)) {
            PyBuffer_Release(&view);
            PyErr_SetString(PyExc_ValueError, "key buffer changed size while appending");
            return -1;
        }
        char *buf = (char *)view.buf;
        for (int64_t seg = width - 1; seg >= 1; seg--)
            memmove(buf + (1 + seg * (n + 1)) * itemsize, buf + (1 + seg * n) * itemsize, (size_t)(n * itemsize));
        store(buf, wide, 1 + n, rel);
        for (int64_t seg = 1; seg < width; seg++) store(buf, wide, 1 + seg * (n + 1) + n, a[seg - 1]);
        PyBuffer_Release(&view);
    }
    Py_ssize_t idx = n;
    n += 1;
    PyObject *n_obj = NULL, *prefix = NULL, *labels = NULL, *out = NULL;
    if (n == A->presize_at) {
        PyObject *r = call(A->presize, &s, 1);
        if (r == NULL) return -1;
        Py_DECREF(r);
    }
    if (PyTuple_GET_SIZE(A->summed)) {
        prefix = PyObject_GetAttr(s, str_prefix);
        if (prefix == NULL) return -1;
        if (prefix != Py_None) {
            PyObject *shift = PyObject_GetAttr(prefix, str_shift);
            if (shift == NULL) goto error;
            long long sh = PyLong_AsLongLong(shift);
            Py_DECREF(shift);
            if (sh == -1 && PyErr_Occurred()) goto error;
            if (((long long)n + sh) % A->block == 0) {
                if ((n_obj = PyLong_FromSsize_t(n)) == NULL) goto error;
                PyObject *args[2] = {s, n_obj}, *r = call(A->extend_prefix, args, 2);
                if (r == NULL) goto error;
                Py_DECREF(r);
            }
        } else if (n >= A->prefix_min) {
            if ((n_obj = PyLong_FromSsize_t(n)) == NULL) goto error;
            PyObject *block = PyLong_FromLongLong(A->block);
            if (block == NULL) goto error;
            PyObject *args[4] = {s, n_obj, A->summed, block}, *r = call(A->build_prefix, args, 4);
            Py_DECREF(block);
            if (r == NULL) goto error;
            Py_DECREF(r);
        }
        Py_CLEAR(prefix);
    }
    if ((prefix = PyObject_GetAttr(s, str_prefix)) == NULL || (labels = PyObject_GetAttr(s, str_labels)) == NULL)
        goto error;
    out = features_of(s, n, idx, rel, A->program, prefix, labels, 1);
    if (out == NULL) goto error;
    Py_CLEAR(prefix);
    Py_CLEAR(labels);

    /* Eviction, as the generated code does it: a short key drops each event as it expires, a long
     * one once n >> lazy_shift have. */
    int64_t horizon = rel - A->retention; /* rel < limit: no overflow */
    Py_ssize_t k = 0;
    int evict;
    {
        Py_buffer view;
        if (PyObject_GetBuffer(s, &view, PyBUF_SIMPLE) < 0) goto error;
        Items b = {(const char *)view.buf, wide};
        Py_ssize_t items = view.len / (Py_ssize_t)itemsize;
        Py_ssize_t at = 1 + (n >= A->lazy_min ? n >> A->lazy_shift : 0);
        evict = at < items && load(&b, at) <= horizon;
        if (evict) { /* bisect_right(buffer, horizon, 1, n) - 1 */
            Py_ssize_t lo = 1, hi = n;
            while (lo < hi) {
                Py_ssize_t mid = (Py_ssize_t)(((size_t)lo + (size_t)hi) / 2);
                if (horizon < load(&b, mid))
                    hi = mid;
                else
                    lo = mid + 1;
            }
            k = lo - 1;
        }
        PyBuffer_Release(&view);
        if (at >= items) {
            PyErr_SetString(PyExc_IndexError, "array index out of range");
            goto error;
        }
    }
    if (evict) {
        for (int64_t seg = width - 1; seg >= 0; seg--)
            if (PySequence_DelSlice(s, 1 + seg * n, 1 + seg * n + k) < 0) goto error;
        if ((prefix = PyObject_GetAttr(s, str_prefix)) == NULL) goto error;
        if (prefix != Py_None) {
            PyObject *m = PyLong_FromSsize_t(n - k), *kk = PyLong_FromSsize_t(k), *block = PyLong_FromLongLong(A->block);
            PyObject *r = NULL;
            if (m && kk && block) {
                PyObject *args[4] = {s, m, kk, block};
                r = call(A->shrink_prefix, args, 4);
            }
            Py_XDECREF(m);
            Py_XDECREF(kk);
            Py_XDECREF(block);
            if (r == NULL) goto error;
            Py_DECREF(r);
        }
        Py_CLEAR(prefix);
    }
    if ((labels = PyObject_GetAttr(s, str_labels)) == NULL) goto error;
    /* s[0] * MINUTE_MS + bias + rel - retention: the event's time less it. Python evicts only
     * when the oldest label is that old (most events of a labelled key have none to evict). */
    int due = 0;
    if (labels != Py_None && (due = oldest_label_due(labels, origin + horizon)) < 0) goto error;
    if (due) {
        PyObject *h = PyLong_FromLongLong(origin + horizon);
        if (h == NULL) goto error;
        PyObject *args[2] = {s, h}, *r = call(A->evict_labels, args, 2);
        Py_DECREF(h);
        if (r == NULL) goto error;
        Py_DECREF(r);
    }
    Py_CLEAR(labels);
    Py_XDECREF(n_obj);
    *result = PyTuple_Pack(2, out, Py_False);
    Py_DECREF(out);
    return *result == NULL ? -1 : 0;
error:
    Py_XDECREF(n_obj);
    Py_XDECREF(prefix);
    Py_XDECREF(labels);
    Py_XDECREF(out);
    return -1;
}

static PyObject *appender_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Appender *A = (Appender *)op;
    if (PyVectorcall_NARGS(nargsf) != 2 || (kwnames && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "observe(s, txn)");
        return NULL;
    }
    PyObject *result = NULL;
    int r = append_event(A, args[0], args[1], &result);
    if (r < 0) return NULL;
    if (r == 0) return result;
    return PyObject_Vectorcall(A->fallback, args, 2, NULL);
}

static PyObject *appender_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *header, *names, *program, *presize, *build_prefix, *extend_prefix, *shrink_prefix, *evict_labels,
        *summed, *fallback;
    if (kwds && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "Appender takes positional arguments only");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O!O!O!OOOOOO!O:Appender", &PyBytes_Type, &header, &PyTuple_Type, &names,
                          &PyBytes_Type, &program, &presize, &build_prefix, &extend_prefix, &shrink_prefix,
                          &evict_labels, &PyTuple_Type, &summed, &fallback))
        return NULL;
    const int64_t *h = (const int64_t *)PyBytes_AS_STRING(header);
    Py_ssize_t words = PyBytes_GET_SIZE(header) / (Py_ssize_t)sizeof(int64_t);
    int ok = PyBytes_GET_SIZE(header) % 8 == 0 && words >= 12 && h[11] >= 0 && h[11] <= MAX_COLUMNS &&
             words == 12 + 3 * h[11] && (h[0] == 4 || h[0] == 8) && h[1] == h[11] + 1 && h[4] > 0 &&
             h[4] <= ((int64_t)1 << 52) && h[5] >= 0 && h[5] <= ((int64_t)1 << 52) && h[6] >= 0 && h[6] < 63 &&
             h[10] >= 1 && PyTuple_GET_SIZE(names) == 1 + h[11];
    for (Py_ssize_t i = 0; ok && i < PyTuple_GET_SIZE(names); i++) ok = PyUnicode_Check(PyTuple_GET_ITEM(names, i));
    for (int64_t j = 0; ok && j < h[11]; j++) {
        const int64_t *c = h + 12 + 3 * j;
        ok = (c[0] == 0 || c[0] == 1) && (c[0] == 1 || (c[1] >= 1 && c[1] <= EXACT_LIMIT));
    }
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "malformed appender header");
        return NULL;
    }
    Appender *A = (Appender *)type->tp_alloc(type, 0);
    if (A == NULL) return NULL;
    A->vectorcall = appender_vectorcall;
    A->itemsize = h[0], A->width = h[1], A->bias = h[2], A->checks = h[3], A->limit = h[4];
    A->retention = h[5], A->lazy_shift = h[6], A->lazy_min = h[7], A->presize_at = h[8], A->prefix_min = h[9];
    A->block = h[10], A->columns = h[11];
    for (int64_t j = 0; j < A->columns; j++) {
        const int64_t *c = h + 12 + 3 * j;
        A->kind[j] = c[0], A->scale[j] = c[1], A->nullable[j] = c[2];
    }
    PyObject **slots[] = {&A->names, &A->program, &A->presize, &A->build_prefix, &A->extend_prefix,
                          &A->shrink_prefix, &A->evict_labels, &A->summed, &A->fallback};
    PyObject *given[] = {names, program, presize, build_prefix, extend_prefix, shrink_prefix, evict_labels, summed,
                         fallback};
    for (size_t i = 0; i < sizeof(given) / sizeof(given[0]); i++) *slots[i] = Py_NewRef(given[i]);
    return (PyObject *)A;
}

static int appender_traverse(PyObject *op, visitproc visit, void *arg)
{
    Appender *A = (Appender *)op;
    Py_VISIT(A->names);
    Py_VISIT(A->program);
    Py_VISIT(A->presize);
    Py_VISIT(A->build_prefix);
    Py_VISIT(A->extend_prefix);
    Py_VISIT(A->shrink_prefix);
    Py_VISIT(A->evict_labels);
    Py_VISIT(A->summed);
    Py_VISIT(A->fallback);
    return 0;
}

static int appender_clear(PyObject *op)
{
    Appender *A = (Appender *)op;
    Py_CLEAR(A->names);
    Py_CLEAR(A->program);
    Py_CLEAR(A->presize);
    Py_CLEAR(A->build_prefix);
    Py_CLEAR(A->extend_prefix);
    Py_CLEAR(A->shrink_prefix);
    Py_CLEAR(A->evict_labels);
    Py_CLEAR(A->summed);
    Py_CLEAR(A->fallback);
    return 0;
}

static void appender_dealloc(PyObject *op)
{
    PyObject_GC_UnTrack(op);
    appender_clear(op);
    Py_TYPE(op)->tp_free(op);
}

static PyMemberDef appender_members[] = {
    {"fallback", T_OBJECT, offsetof(Appender, fallback), READONLY, "the generated Python observe"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject AppenderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "features._kernel.Appender",
    .tp_basicsize = sizeof(Appender),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "A plan's in-order append, compiled (see features/_kernel.c).",
    .tp_new = appender_new,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Appender, vectorcall),
    .tp_traverse = appender_traverse,
    .tp_clear = appender_clear,
    .tp_dealloc = appender_dealloc,
    .tp_members = appender_members,
};

static PyMethodDef methods[] = {
    {"window_features", (PyCFunction)(void (*)(void))window_features, METH_FASTCALL,
     "window_features(buffer, n, idx, rel, program, prefix[, labels]) -> list of float"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "features._kernel", "Compiled window reads for features.state.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kernel(void)
{
    crc_init();
    if (PyType_Ready(&AppenderType) < 0) return NULL;
    str_append = PyUnicode_InternFromString("append");
    str_prefix = PyUnicode_InternFromString("prefix");
    str_labels = PyUnicode_InternFromString("labels");
    str_shift = PyUnicode_InternFromString("shift");
    long_zero = PyLong_FromLong(0);
    if (!str_append || !str_prefix || !str_labels || !str_shift || !long_zero) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "Appender", (PyObject *)&AppenderType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
