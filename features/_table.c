/* features._table.Table: a compact str -> bytes table for state held per transaction.

   The index and `pending` hold an entry for every transaction waiting weeks for its label. In a
   dict each entry costs a str key object, a slot, and a value object with its header; here an
   entry is one allocation holding its key's UTF-8 bytes and its value's bytes, and the table a
   power-of-two array of pointers (linear probing, backward-shift deletion: no tombstones, so a
   table whose entries come and go for months does not fill up with them).

   The entries live apart from the C heap, in blocks of 16-byte size classes carved from 2 MiB
   chunks mapped for them (`alloc_entry`; a freed block is the next one its class hands out, and
   a block carries no allocator header), and the chunks, like slot arrays of 2 MiB or more, ask
   the kernel for transparent huge pages (madvise MADV_HUGEPAGE; granted where
   /sys/kernel/mm/transparent_hugepage/enabled says "madvise" or "always"), so that reaching one
   of millions of entries at random (a label finds its transaction days later) costs no
   page-table walk. Without malloc's header and rounding, the index's and `pending`'s tables
   take ~7 % less memory (`python -m benchmarks.index_memory --tables-only`). The chunks stay
   with the process (their blocks are reused), as the C heap's pages would.

   Values that are bytes (up to 32 KiB) are stored inline; any other value is stored as a
   reference (for rare values such as a label waiting for its row). Keys are up to 64 KiB. The table does not take part in the garbage
   collector: a value stored by reference must not refer back to the table.

   Python's dict semantics for what the shards use: t[k], t[k] = v, del t[k], k in t, len(t),
   get, pop, keys, values, items (lists: a copy), copy, == with a dict or a Table. Keys are str
   only. Not thread-safe beyond the GIL: each shard's table is used by its own worker, and the
   blocks' size classes are shared by every table of the process, under the GIL.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

#define OBJ_FLAG 0x8000u /* vlen's top bit: the value is a PyObject * stored by reference */
#define MAX_INLINE 0x7fffu /* longer bytes values are stored by reference */
#define MAX_KEY 0xffffu
#define MIN_CAP 16

typedef struct {
    uint32_t hash;
    uint16_t klen;
    uint16_t vlen; /* bytes of the value, or OBJ_FLAG | sizeof(PyObject *) */
    char data[];   /* the key's UTF-8 bytes, then the value's bytes (or the pointer) */
} Entry;          /* 8 bytes of header before the key and value */

typedef struct {
    PyObject_HEAD
    Entry **slots;
    size_t cap; /* a power of two, or 0 */
    size_t len;
    size_t bytes; /* bytes allocated for entries (their requested sizes) */
} Table;

static PyTypeObject TableType;

/* -- where entries and large slot arrays live -- */

#define CHUNK_BYTES ((size_t)2 << 20) /* one huge page */
#define RUN_BYTES ((size_t)64 << 10)  /* a size class takes a chunk's space a run at a time */
#define GRAIN 16                      /* size classes: 16, 32, ... SLAB_MAX bytes */
#define SLAB_MAX 1024                 /* larger entries come from the C heap */

typedef struct Block {
    struct Block *next;
} Block;

typedef struct {
    Block *free;      /* freed blocks, the last freed first */
    char *next, *end; /* the rest of the class's current run */
} SizeClass;

static SizeClass size_classes[SLAB_MAX / GRAIN + 1];
static char *chunk_next, *chunk_end; /* the rest of the current chunk */
static size_t chunks_mapped;          /* bytes of chunks mapped for entries */

/* `size` (a multiple of CHUNK_BYTES) bytes of zeroes, aligned to a huge page and asking for huge
   pages; NULL (no error set) if the system has none to give. */
static void *map_huge(size_t size) {
#if defined(__linux__) && defined(MAP_ANONYMOUS)
    size_t span = size + CHUNK_BYTES;
    char *p = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    char *a = (char *)(((uintptr_t)p + CHUNK_BYTES - 1) & ~(uintptr_t)(CHUNK_BYTES - 1));
    if (a > p) munmap(p, (size_t)(a - p));
    if (p + span > a + size) munmap(a + size, (size_t)(p + span - (a + size)));
#ifdef MADV_HUGEPAGE
    madvise(a, size, MADV_HUGEPAGE); /* a hint: where it is refused, 4 KiB pages serve */
#endif
    return a;
#else
    return PyMem_RawCalloc(1, size);
#endif
}

static void unmap_huge(void *p, size_t size) {
#if defined(__linux__) && defined(MAP_ANONYMOUS)
    munmap(p, size);
#else
    (void)size;
    PyMem_RawFree(p);
#endif
}

/* The bytes an entry of `n` requested bytes holds: its size class's. */
static inline size_t block_size(size_t n) { return n > SLAB_MAX ? n : (n + GRAIN - 1) / GRAIN * GRAIN; }

static void *alloc_entry(size_t n) {
    if (n > SLAB_MAX) return PyMem_RawMalloc(n);
    size_t size = block_size(n);
    SizeClass *c = &size_classes[size / GRAIN];
    Block *b = c->free;
    if (b != NULL) {
        c->free = b->next;
        return b;
    }
    if ((size_t)(c->end - c->next) < size) {
        if (chunk_next == chunk_end) {
            char *chunk = map_huge(CHUNK_BYTES);
            if (chunk == NULL) return NULL;
            chunks_mapped += CHUNK_BYTES;
            chunk_next = chunk;
            chunk_end = chunk + CHUNK_BYTES;
        }
        c->next = chunk_next;
        c->end = chunk_next + RUN_BYTES;
        chunk_next += RUN_BYTES;
    }
    void *p = c->next;
    c->next += size;
    return p;
}

static void free_block(void *p, size_t n) {
    if (n > SLAB_MAX) {
        PyMem_RawFree(p);
        return;
    }
    SizeClass *c = &size_classes[block_size(n) / GRAIN];
    Block *b = p;
    b->next = c->free;
    c->free = b;
}

static Entry **alloc_slots(size_t cap) {
    size_t size = cap * sizeof(Entry *);
    return size >= CHUNK_BYTES ? map_huge(size) : PyMem_RawCalloc(cap, sizeof(Entry *));
}

static void free_slots(Entry **slots, size_t cap) {
    size_t size = cap * sizeof(Entry *);
    if (size >= CHUNK_BYTES) {
        unmap_huge(slots, size);
    } else {
        PyMem_RawFree(slots);
    }
}

/* FNV-1a, then a 64-bit finaliser; its low 32 bits (the low bits pick the slot). */
static uint32_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ULL;
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return (uint32_t)h;
}

static inline int is_obj(const Entry *e) { return (e->vlen & OBJ_FLAG) != 0; }

static inline PyObject *entry_obj(const Entry *e) {
    PyObject *o;
    memcpy(&o, e->data + e->klen, sizeof o);
    return o;
}

static inline size_t entry_size(const Entry *e) {
    return sizeof(Entry) + e->klen + (is_obj(e) ? sizeof(PyObject *) : e->vlen);
}

static void free_entry(Table *t, Entry *e) {
    size_t n = entry_size(e);
    t->bytes -= block_size(n);
    if (is_obj(e)) {
        PyObject *o = entry_obj(e);
        free_block(e, n);
        Py_DECREF(o); /* last: it may run code that uses tables */
        return;
    }
    free_block(e, n);
}

static PyObject *entry_value(const Entry *e) {
    if (is_obj(e)) {
        PyObject *o = entry_obj(e);
        Py_INCREF(o);
        return o;
    }
    return PyBytes_FromStringAndSize(e->data + e->klen, (Py_ssize_t)e->vlen);
}

static PyObject *entry_key(const Entry *e) { return PyUnicode_DecodeUTF8(e->data, (Py_ssize_t)e->klen, NULL); }

static const char *key_bytes(PyObject *key, Py_ssize_t *n) {
    if (!PyUnicode_Check(key)) {
        PyErr_Format(PyExc_TypeError, "Table keys are str, not %.100s", Py_TYPE(key)->tp_name);
        return NULL;
    }
    const char *s = PyUnicode_AsUTF8AndSize(key, n);
    if (s != NULL && (size_t)*n > MAX_KEY) {
        PyErr_SetString(PyExc_ValueError, "Table key too long");
        return NULL;
    }
    return s;
}

/* The slot holding the key, or the empty slot where it would go. cap must be > 0. */
static size_t find(const Table *t, uint32_t h, const char *k, size_t n) {
    size_t mask = t->cap - 1, i = (size_t)h & mask;
    for (;;) {
        Entry *e = t->slots[i];
        if (e == NULL || (e->hash == h && e->klen == n && memcmp(e->data, k, n) == 0)) return i;
        i = (i + 1) & mask;
    }
}

static int resize(Table *t, size_t cap) {
    Entry **slots = alloc_slots(cap);
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    size_t mask = cap - 1;
    for (size_t j = 0; j < t->cap; j++) {
        Entry *e = t->slots[j];
        if (e == NULL) continue;
        size_t i = (size_t)e->hash & mask;
        while (slots[i] != NULL) i = (i + 1) & mask;
        slots[i] = e;
    }
    free_slots(t->slots, t->cap);
    t->slots = slots;
    t->cap = cap;
    return 0;
}

/* Remove the entry in slot i, shifting back the ones after it that probed past it. */
static void remove_at(Table *t, size_t i) {
    size_t mask = t->cap - 1, j = i;
    free_entry(t, t->slots[i]);
    for (;;) {
        j = (j + 1) & mask;
        Entry *e = t->slots[j];
        if (e == NULL) break;
        size_t home = (size_t)e->hash & mask;
        /* e may move to i if its home is not in the cyclic range (i, j]. */
        int stays = (i <= j) ? (i < home && home <= j) : (i < home || home <= j);
        if (!stays) {
            t->slots[i] = e;
            i = j;
        }
    }
    t->slots[i] = NULL;
    t->len--;
    if (t->cap > MIN_CAP && t->len * 8 < t->cap) resize(t, t->cap / 2); /* on failure it stays big */
}

static int table_set(Table *t, PyObject *key, PyObject *value) {
    Py_ssize_t n;
    const char *k = key_bytes(key, &n);
    if (k == NULL) return -1;
    int obj = !PyBytes_CheckExact(value) || (size_t)PyBytes_GET_SIZE(value) > MAX_INLINE;
    size_t vlen = obj ? sizeof(PyObject *) : (size_t)PyBytes_GET_SIZE(value);
    uint32_t h = hash_bytes(k, (size_t)n);
    if (t->cap == 0 || (t->len + 1) * 4 > t->cap * 3) {
        if (resize(t, t->cap ? t->cap * 2 : MIN_CAP) < 0) return -1;
    }
    size_t i = find(t, h, k, (size_t)n);
    Entry *e = alloc_entry(sizeof(Entry) + (size_t)n + vlen);
    if (e == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    e->hash = h;
    e->klen = (uint16_t)n;
    e->vlen = (uint16_t)(vlen | (obj ? OBJ_FLAG : 0));
    memcpy(e->data, k, (size_t)n);
    if (obj) {
        Py_INCREF(value);
        memcpy(e->data + n, &value, sizeof value);
    } else {
        memcpy(e->data + n, PyBytes_AS_STRING(value), vlen);
    }
    t->bytes += block_size(entry_size(e));
    if (t->slots[i] != NULL) {
        free_entry(t, t->slots[i]);
    } else {
        t->len++;
    }
    t->slots[i] = e;
    return 0;
}

/* The slot of key, or -1 (with no error set) if absent, or -2 with an error set. */
static Py_ssize_t lookup(const Table *t, PyObject *key) {
    Py_ssize_t n;
    const char *k = key_bytes(key, &n);
    if (k == NULL) return -2;
    if (t->len == 0) return -1;
    size_t i = find(t, hash_bytes(k, (size_t)n), k, (size_t)n);
    return t->slots[i] == NULL ? -1 : (Py_ssize_t)i;
}

static PyObject *Table_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    if ((args != NULL && PyTuple_GET_SIZE(args) > 0) || (kwds != NULL && PyDict_GET_SIZE(kwds) > 0)) {
        PyErr_SetString(PyExc_TypeError, "Table() takes no arguments");
        return NULL;
    }
    Table *t = (Table *)type->tp_alloc(type, 0);
    if (t == NULL) return NULL;
    t->slots = NULL;
    t->cap = t->len = t->bytes = 0;
    return (PyObject *)t;
}

static void clear_all(Table *t) {
    for (size_t j = 0; j < t->cap; j++) {
        if (t->slots[j] != NULL) free_entry(t, t->slots[j]);
    }
    free_slots(t->slots, t->cap);
    t->slots = NULL;
    t->cap = t->len = 0;
}

static void Table_dealloc(Table *t) {
    clear_all(t);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static Py_ssize_t Table_length(Table *t) { return (Py_ssize_t)t->len; }

static PyObject *Table_subscript(Table *t, PyObject *key) {
    Py_ssize_t i = lookup(t, key);
    if (i == -2) return NULL;
    if (i == -1) {
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    return entry_value(t->slots[i]);
}

static int Table_ass_subscript(Table *t, PyObject *key, PyObject *value) {
    if (value != NULL) return table_set(t, key, value);
    Py_ssize_t i = lookup(t, key);
    if (i == -2) return -1;
    if (i == -1) {
        PyErr_SetObject(PyExc_KeyError, key);
        return -1;
    }
    remove_at(t, (size_t)i);
    return 0;
}

static int Table_contains(Table *t, PyObject *key) {
    Py_ssize_t i = lookup(t, key);
    return i == -2 ? -1 : i >= 0;
}

static PyObject *Table_get(Table *t, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(key, default=None)");
        return NULL;
    }
    Py_ssize_t i = lookup(t, args[0]);
    if (i == -2) return NULL;
    if (i == -1) {
        PyObject *d = nargs == 2 ? args[1] : Py_None;
        Py_INCREF(d);
        return d;
    }
    return entry_value(t->slots[i]);
}

static PyObject *Table_pop(Table *t, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "pop(key[, default])");
        return NULL;
    }
    Py_ssize_t i = lookup(t, args[0]);
    if (i == -2) return NULL;
    if (i == -1) {
        if (nargs == 1) {
            PyErr_SetObject(PyExc_KeyError, args[0]);
            return NULL;
        }
        Py_INCREF(args[1]);
        return args[1];
    }
    PyObject *v = entry_value(t->slots[i]);
    if (v == NULL) return NULL;
    remove_at(t, (size_t)i);
    return v;
}

enum { KEYS, VALUES, ITEMS };

static PyObject *listing(Table *t, int what) {
    PyObject *out = PyList_New((Py_ssize_t)t->len);
    if (out == NULL) return NULL;
    Py_ssize_t n = 0;
    for (size_t j = 0; j < t->cap; j++) {
        Entry *e = t->slots[j];
        if (e == NULL) continue;
        PyObject *x;
        if (what == KEYS) {
            x = entry_key(e);
        } else if (what == VALUES) {
            x = entry_value(e);
        } else {
            PyObject *k = entry_key(e), *v = k ? entry_value(e) : NULL;
            x = v ? PyTuple_Pack(2, k, v) : NULL;
            Py_XDECREF(k);
            Py_XDECREF(v);
        }
        if (x == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, n++, x);
    }
    return out;
}

static PyObject *Table_keys(Table *t, PyObject *unused) { return listing(t, KEYS); }
static PyObject *Table_values(Table *t, PyObject *unused) { return listing(t, VALUES); }
static PyObject *Table_items(Table *t, PyObject *unused) { return listing(t, ITEMS); }

static PyObject *Table_iter(Table *t) {
    PyObject *keys = listing(t, KEYS);
    if (keys == NULL) return NULL;
    PyObject *it = PyObject_GetIter(keys);
    Py_DECREF(keys);
    return it;
}

static PyObject *Table_copy(Table *t, PyObject *unused) {
    Table *c = (Table *)Table_new(Py_TYPE(t), NULL, NULL);
    if (c == NULL) return NULL;
    if (t->cap == 0) return (PyObject *)c;
    c->slots = alloc_slots(t->cap);
    if (c->slots == NULL) {
        Py_DECREF(c);
        return PyErr_NoMemory();
    }
    c->cap = t->cap;
    for (size_t j = 0; j < t->cap; j++) {
        Entry *e = t->slots[j];
        if (e == NULL) continue;
        size_t size = entry_size(e);
        Entry *d = alloc_entry(size);
        if (d == NULL) {
            Py_DECREF(c);
            return PyErr_NoMemory();
        }
        memcpy(d, e, size);
        if (is_obj(d)) Py_INCREF(entry_obj(d));
        c->slots[j] = d;
        c->len++;
        c->bytes += block_size(size);
    }
    return (PyObject *)c;
}

static PyObject *Table_clear(Table *t, PyObject *unused) {
    clear_all(t);
    Py_RETURN_NONE;
}

static PyObject *Table_nbytes(Table *t, void *unused) {
    /* What the table holds: its slots and its entries' blocks. */
    return PyLong_FromSize_t(t->cap * sizeof(Entry *) + t->bytes);
}

static PyObject *as_dict(Table *t) {
    PyObject *d = PyDict_New();
    if (d == NULL) return NULL;
    for (size_t j = 0; j < t->cap; j++) {
        Entry *e = t->slots[j];
        if (e == NULL) continue;
        PyObject *k = entry_key(e), *v = k ? entry_value(e) : NULL;
        int bad = v == NULL || PyDict_SetItem(d, k, v) < 0;
        Py_XDECREF(k);
        Py_XDECREF(v);
        if (bad) {
            Py_DECREF(d);
            return NULL;
        }
    }
    return d;
}

/* == and != compare the entries with another Table's or a dict's, as two dicts compare. */
static PyObject *Table_richcompare(Table *t, PyObject *other, int op) {
    if ((op != Py_EQ && op != Py_NE) || !(PyDict_Check(other) || PyObject_TypeCheck(other, &TableType)))
        Py_RETURN_NOTIMPLEMENTED;
    PyObject *a = as_dict(t), *b = NULL, *r = NULL;
    if (a == NULL) return NULL;
    if (PyDict_Check(other)) {
        b = other;
        Py_INCREF(b);
    } else {
        b = as_dict((Table *)other);
    }
    if (b != NULL) r = PyObject_RichCompare(a, b, op);
    Py_DECREF(a);
    Py_XDECREF(b);
    return r;
}

static PyMethodDef Table_methods[] = {
    {"get", (PyCFunction)(void (*)(void))Table_get, METH_FASTCALL, "get(key, default=None)"},
    {"pop", (PyCFunction)(void (*)(void))Table_pop, METH_FASTCALL, "pop(key[, default])"},
    {"keys", (PyCFunction)Table_keys, METH_NOARGS, "the keys (a list)"},
    {"values", (PyCFunction)Table_values, METH_NOARGS, "the values (a list)"},
    {"items", (PyCFunction)Table_items, METH_NOARGS, "the (key, value) pairs (a list)"},
    {"copy", (PyCFunction)Table_copy, METH_NOARGS, "a copy (values stored by reference are shared)"},
    {"clear", (PyCFunction)Table_clear, METH_NOARGS, "remove every entry"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Table_getset[] = {
    {"nbytes", (getter)Table_nbytes, NULL, "bytes allocated: slots and entries", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMappingMethods Table_mapping = {
    (lenfunc)Table_length,
    (binaryfunc)Table_subscript,
    (objobjargproc)Table_ass_subscript,
};

static PySequenceMethods Table_sequence = {
    .sq_contains = (objobjproc)Table_contains,
};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "features._table.Table",
    .tp_basicsize = sizeof(Table),
    .tp_dealloc = (destructor)Table_dealloc,
    .tp_as_mapping = &Table_mapping,
    .tp_as_sequence = &Table_sequence,
    .tp_iter = (getiterfunc)Table_iter,
    .tp_richcompare = (richcmpfunc)Table_richcompare,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "A compact str -> bytes table (features/_table.c).",
    .tp_methods = Table_methods,
    .tp_getset = Table_getset,
    .tp_new = Table_new,
};

/* A feature vector as float32 values, packed: most features are counts, flags or missing, so
   each value takes one byte when its float32 is an integer 0..250 (not -0.0), one byte (NAN_CODE)
   when it is NaN, three (U16_CODE, then little-endian) for an integer up to 65535, and five
   (F32_CODE, then the float32's native bytes) otherwise. Unpacking gives back the same float32
   values (a NaN as the canonical quiet NaN). */
enum { NAN_CODE = 253, U16_CODE = 254, F32_CODE = 255, MAX_SMALL = 250 };

static PyObject *pack_floats(PyObject *module, PyObject *values) {
    PyObject *seq = PySequence_Fast(values, "pack_floats takes a sequence of floats");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    unsigned char *buf = PyMem_Malloc((size_t)n * 5 + 1);
    if (buf == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    size_t j = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        double d = PyFloat_CheckExact(items[i]) ? PyFloat_AS_DOUBLE(items[i]) : PyFloat_AsDouble(items[i]);
        if (d == -1.0 && PyErr_Occurred()) {
            PyMem_Free(buf);
            Py_DECREF(seq);
            return NULL;
        }
        float f = (float)d; /* as array("f") stores it */
        if (isnan(f)) {
            buf[j++] = NAN_CODE;
        } else if (f >= 0.0f && f <= 65535.0f && f == (float)(uint32_t)f && !(f == 0.0f && signbit(f))) {
            uint32_t v = (uint32_t)f;
            if (v <= MAX_SMALL) {
                buf[j++] = (unsigned char)v;
            } else {
                buf[j++] = U16_CODE;
                buf[j++] = (unsigned char)(v & 0xff);
                buf[j++] = (unsigned char)(v >> 8);
            }
        } else {
            buf[j++] = F32_CODE;
            memcpy(buf + j, &f, 4);
            j += 4;
        }
    }
    Py_DECREF(seq);
    PyObject *out = PyBytes_FromStringAndSize((const char *)buf, (Py_ssize_t)j);
    PyMem_Free(buf);
    return out;
}

static PyObject *unpack_floats(PyObject *module, PyObject *data) {
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "unpack_floats takes bytes");
        return NULL;
    }
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(data);
    size_t n = (size_t)PyBytes_GET_SIZE(data), i = 0, k = 0;
    float *out = PyMem_Malloc(n * sizeof(float) + 1); /* at most one value per byte */
    if (out == NULL) return PyErr_NoMemory();
    while (i < n) {
        unsigned char c = p[i++];
        if (c <= MAX_SMALL) {
            out[k++] = (float)c;
        } else if (c == NAN_CODE) {
            out[k++] = NAN;
        } else if (c == U16_CODE && i + 2 <= n) {
            out[k++] = (float)(p[i] | (p[i + 1] << 8));
            i += 2;
        } else if (c == F32_CODE && i + 4 <= n) {
            memcpy(&out[k++], p + i, 4);
            i += 4;
        } else {
            PyMem_Free(out);
            PyErr_Format(PyExc_ValueError, "not a packed vector: byte %zu of %zu", i - 1, n);
            return NULL;
        }
    }
    PyObject *raw = PyBytes_FromStringAndSize((const char *)out, (Py_ssize_t)(k * sizeof(float)));
    PyMem_Free(out);
    return raw;
}

static PyObject *chunk_bytes(PyObject *module, PyObject *unused) { return PyLong_FromSize_t(chunks_mapped); }

static PyMethodDef module_methods[] = {
    {"chunk_bytes", (PyCFunction)chunk_bytes, METH_NOARGS, "chunk_bytes() -> bytes this process mapped for table entries"},
    {"pack_floats", (PyCFunction)pack_floats, METH_O, "pack_floats(values) -> bytes (a packed float32 vector)"},
    {"unpack_floats", (PyCFunction)unpack_floats, METH_O, "unpack_floats(packed) -> bytes (the float32 values, native order)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "features._table", "Compact per-transaction state: a str -> bytes table, packed vectors.", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__table(void) {
    if (PyType_Ready(&TableType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&TableType);
    if (PyModule_AddObject(m, "Table", (PyObject *)&TableType) < 0) {
        Py_DECREF(&TableType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
