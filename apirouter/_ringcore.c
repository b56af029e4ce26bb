/* The per-record loops of the usage rings (apirouter/usage_ring.py), in C: the producer's
 * put, and the consumer's scan of the frames it copied out; and the builder of the records a
 * worker puts (apirouter/usage.py's encode_record, below).
 *
 * A worker hands every request's usage record to its ring: in Python, ``RingProducer.put``
 * ran ~88 bytecodes, a struct pack, a bytes concatenation and a slice store a record. This is
 * the same work on the same memory in one call: ``RingProducer.put_py`` in usage_ring.py is
 * the reference, and tests/apirouter/test_usage_ring.py holds both to the same ring bytes and
 * indices (wrap-around and a full ring included). The frame format is the module's: u32
 * length, u32 CRC-32 of the payload, the payload; a WRAP length where a frame does not fit
 * before the end of the data area. The checksum is computed by the callable the ring passes
 * in (usage_ring._fast_crc32, ISA-L's: ~65 ns for a 500-byte record where zlib's takes ~320),
 * so both ends use one function by construction.
 *
 * The supervisor drains every worker's records through RingConsumer.peek, whose frame loop
 * (length check, checksum, a bytes object a record) cost ~0.83 µs a record in Python;
 * ``scan`` runs that loop here (~0.19), ``usage_ring._scan_py`` its reference.
 *
 * The indices are read and written as whole 8-byte words (as the Python end's cast memoryview
 * does: one load, one store each), and the head is stored only after the frame is copied, so
 * the consumer in another process never sees a torn frame.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define SLOT_META 128 /* head u64 at 0, tail u64 at 64, then the data area */
#define TAIL_OFFSET 64
#define FRAME_HEADER 8 /* u32 length, u32 crc32 */
#define WRAP 0xFFFFFFFFu

typedef struct {
    PyObject_HEAD
    Py_buffer slot; /* the slot's indices and data area; held until release() */
    int held;
    uint64_t capacity;
    PyObject *crc32;
} Producer;

/* One 8-byte load or store (memcpy of a word compiles to one mov, aligned or not, as the
 * memoryview's 'Q' element access does); the compiler barriers keep the frame's copy before
 * the head's store. */
static inline uint64_t load_word(const char *p)
{
    uint64_t v;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    memcpy(&v, p, 8);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    return v;
}

static inline void store_word(char *p, uint64_t v)
{
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy(p, &v, 8);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

static inline void store_u32le(char *p, uint32_t v)
{
    unsigned char b[4] = {v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF, (v >> 24) & 0xFF};
    memcpy(p, b, 4);
}

static int Producer_init(Producer *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"slot", "capacity", "crc32", NULL};
    PyObject *slot, *crc32;
    unsigned long long capacity;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OKO:Producer", kwlist, &slot, &capacity,
                                     &crc32))
        return -1;
    if (self->held) {
        PyErr_SetString(PyExc_RuntimeError, "Producer already initialised");
        return -1;
    }
    if (capacity == 0 || capacity > 0xFFFFFFFFull) { /* the header holds it as a u32 */
        PyErr_SetString(PyExc_ValueError, "capacity must be from 1 to 2**32 - 1");
        return -1;
    }
    if (!PyCallable_Check(crc32)) {
        PyErr_SetString(PyExc_TypeError, "crc32 must be callable");
        return -1;
    }
    if (PyObject_GetBuffer(slot, &self->slot, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (self->slot.len < SLOT_META ||
            (unsigned long long)(self->slot.len - SLOT_META) < capacity) {
        PyBuffer_Release(&self->slot);
        PyErr_SetString(PyExc_ValueError, "the slot is smaller than its indices and data");
        return -1;
    }
    self->held = 1;
    self->capacity = capacity;
    Py_INCREF(crc32);
    self->crc32 = crc32;
    return 0;
}

static PyObject *Producer_release(Producer *self, PyObject *Py_UNUSED(ignored))
{
    if (self->held) {
        self->held = 0;
        PyBuffer_Release(&self->slot);
    }
    Py_RETURN_NONE;
}

static void Producer_dealloc(Producer *self)
{
    if (self->held) {
        self->held = 0;
        PyBuffer_Release(&self->slot);
    }
    Py_CLEAR(self->crc32);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* put(record) -> bool: copy one record in as a frame, or False if it does not fit (larger
 * than capacity // 4, or the ring too full). Mirrors RingProducer.put_py step by step. */
static PyObject *Producer_put(Producer *self, PyObject *record)
{
    if (!self->held) {
        PyErr_SetString(PyExc_ValueError, "the ring is released");
        return NULL;
    }
    Py_buffer rec;
    int own_view = 0;
    const char *payload;
    Py_ssize_t n;
    if (PyBytes_CheckExact(record)) {
        payload = PyBytes_AS_STRING(record);
        n = PyBytes_GET_SIZE(record);
    } else {
        if (PyObject_GetBuffer(record, &rec, PyBUF_C_CONTIGUOUS) < 0)
            return NULL;
        own_view = 1;
        payload = rec.buf;
        n = rec.len;
    }
    PyObject *result = Py_False;
    const uint64_t cap = self->capacity;
    char *meta = self->slot.buf;
    char *data = meta + SLOT_META;
    if ((uint64_t)n > cap / 4)
        goto done;
    uint64_t head = load_word(meta);
    uint64_t tail = load_word(meta + TAIL_OFFSET);
    uint64_t pos = head % cap;
    uint64_t room_to_end = cap - pos;
    uint64_t frame = FRAME_HEADER + (uint64_t)n;
    uint64_t skip = room_to_end < frame ? room_to_end : 0;
    /* (head - tail) + skip + frame as Python computes it, in 128 bits: inconsistent indices
     * (a corrupt or hostile segment) behave alike, however far apart */
    if ((__int128)head - (__int128)tail + (__int128)skip + (__int128)frame > (__int128)cap)
        goto done;
    if (head > UINT64_MAX - skip - frame) /* the next head would not fit its word: refused */
        goto done;
    PyObject *crc_obj = PyObject_CallOneArg(self->crc32, record);
    if (crc_obj == NULL) {
        result = NULL;
        goto done;
    }
    unsigned long crc = PyLong_AsUnsignedLong(crc_obj);
    Py_DECREF(crc_obj);
    if (crc == (unsigned long)-1 && PyErr_Occurred()) {
        result = NULL;
        goto done;
    }
    if (crc > 0xFFFFFFFFul) { /* as the reference's struct.pack("I") refuses it */
        PyErr_SetString(PyExc_OverflowError, "the checksum does not fit 32 bits");
        result = NULL;
        goto done;
    }
    if (!self->held) { /* released by the callback: nothing may be written */
        PyErr_SetString(PyExc_ValueError, "the ring is released");
        result = NULL;
        goto done;
    }
    if (skip) {
        if (room_to_end >= FRAME_HEADER)
            store_u32le(data + pos, WRAP);
        pos = 0;
    }
    store_u32le(data + pos, (uint32_t)n);
    store_u32le(data + pos + 4, (uint32_t)crc);
    memcpy(data + pos + FRAME_HEADER, payload, (size_t)n);
    store_word(meta, head + skip + frame); /* one store publishes the frame */
    result = Py_True;
done:
    if (own_view)
        PyBuffer_Release(&rec);
    Py_XINCREF(result);
    return result;
}

static PyMethodDef Producer_methods[] = {
    {"put", (PyCFunction)Producer_put, METH_O,
     "put(record) -> bool: copy a record into the ring as one frame; False if it does not "
     "fit"},
    {"release", (PyCFunction)Producer_release, METH_NOARGS,
     "Let go of the slot's memory (the segment can then be closed)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ProducerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "apirouter._ringcore.Producer",
    .tp_basicsize = sizeof(Producer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Producer(slot, capacity, crc32): the writing end of one usage ring",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Producer_init,
    .tp_dealloc = (destructor)Producer_dealloc,
    .tp_methods = Producer_methods,
};


static inline uint32_t load_u32le(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* scan(span, at, stop, limit, crc32, out) -> (at, why): the consumer's frame loop over a copy
 * of unread ring bytes (RingConsumer.peek; usage_ring._scan_py is the reference). Frames
 * starting before ``stop`` are checked (length at most ``limit``, within the span, checksum)
 * and their records appended to ``out``; it returns where it stopped and why: SCAN_STOP (at
 * or past ``stop``), SCAN_WRAP (a WRAP length at ``at``) or SCAN_BAD (a bad frame at ``at``).
 * A frame header must fit in the span wherever a frame starts (the caller's ``stop``). */
enum { SCAN_STOP = 0, SCAN_WRAP = 1, SCAN_BAD = 2 };

static PyObject *scan(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "scan(span, at, stop, limit, crc32, out)");
        return NULL;
    }
    PyObject *span = args[0], *crc32 = args[4], *out = args[5];
    if (!PyBytes_CheckExact(span) || !PyList_CheckExact(out)) {
        PyErr_SetString(PyExc_TypeError, "scan: span must be bytes and out a list");
        return NULL;
    }
    Py_ssize_t at = PyLong_AsSsize_t(args[1]);
    Py_ssize_t stop = PyLong_AsSsize_t(args[2]);
    Py_ssize_t limit = PyLong_AsSsize_t(args[3]);
    if ((at == -1 || stop == -1 || limit == -1) && PyErr_Occurred())
        return NULL;
    const unsigned char *base = (const unsigned char *)PyBytes_AS_STRING(span);
    const Py_ssize_t size = PyBytes_GET_SIZE(span);
    int why = SCAN_STOP;
    if (at < 0) {
        PyErr_SetString(PyExc_ValueError, "scan: at must be >= 0");
        return NULL;
    }
    while (at < stop) {
        if (at > size - FRAME_HEADER) {
            PyErr_SetString(PyExc_ValueError, "scan: a frame header past the span's end");
            return NULL;
        }
        uint32_t n = load_u32le(base + at);
        uint32_t crc = load_u32le(base + at + 4);
        if (n == WRAP) {
            why = SCAN_WRAP;
            break;
        }
        Py_ssize_t end = at + FRAME_HEADER + (Py_ssize_t)n;
        if ((Py_ssize_t)n > limit || end > size) {
            why = SCAN_BAD;
            break;
        }
        PyObject *record = PyBytes_FromStringAndSize((const char *)base + at + FRAME_HEADER,
                                                     (Py_ssize_t)n);
        if (record == NULL)
            return NULL;
        PyObject *got = PyObject_CallOneArg(crc32, record);
        if (got == NULL) {
            Py_DECREF(record);
            return NULL;
        }
        unsigned long sum = PyLong_AsUnsignedLongMask(got);
        Py_DECREF(got);
        if (sum == (unsigned long)-1 && PyErr_Occurred()) {
            Py_DECREF(record);
            return NULL;
        }
        if (sum != crc) {
            Py_DECREF(record);
            why = SCAN_BAD;
            break;
        }
        int failed = PyList_Append(out, record);
        Py_DECREF(record);
        if (failed)
            return NULL;
        at = end;
    }
    return Py_BuildValue("(ni)", at, why);
}

/* ---- The usage record's encoder -------------------------------------------------------------
 *
 * encode_record (apirouter/usage.py) builds every request's record: in Python, ~127 bytecodes,
 * a 23-field msgspec Struct and its encode a request. ``record_encoder(reference, write_floats)``
 * returns the same builder in C: one call that reads the source's fields where they lie and
 * writes the JSON bytes msgspec writes, for the values requests carry (ASCII strings that need
 * no escape, ints of 64 bits, float timestamps and latencies, None, bools). Anything else — an
 * escape, a non-ASCII string, an int subclass, a float elsewhere, an attribute that raises, a
 * record over 2 KB — goes to ``reference`` (usage._encode_record_py) with the same arguments, so the bytes
 * never depend on the path taken; tests/apirouter/test_usage_record.py holds the two equal.
 *
 * Floats: the two timestamps are written by msgspec's encoder itself (the ``write_floats``
 * record_encoder is given), of the pair, so their digits are msgspec's by construction; the
 * latencies are whole µs over 1000, written as the decimal they are (below 10**15 µs that
 * decimal is the shortest round trip, hence what msgspec writes). Any other float is the
 * reference's.
 *
 * Measured (timeit, a request-shaped context of slotted dataclasses): ~1.07 µs a record where
 * the reference takes ~1.5-2.0, and the worker runs ~119 fewer bytecodes a request
 * (/work/team/perf/opcount.py: 2,956 -> 2,837).
 */

#define RECORD_MAX 2048 /* larger records (long ids or names) are the reference's */

typedef struct {
    char *p;
    char *end;
    int bad; /* a value this encoder does not write: the reference writes the record */
} Writer;

static PyObject *s_t0, *s_fwd, *s_backend_id, *s_decision_type, *s_attempts, *s_backend_s,
    *s_caller, *s_key, *s_key_id, *s_org, *s_cost_micro, *s_request_id, *s_endpoint, *s_path,
    *s_view, *s_generation, *s_ttft_s, *s_events, *s_interruption, *s_usage_estimated;

static inline void w_raw(Writer *w, const char *s, size_t n)
{
    if (w->bad || (size_t)(w->end - w->p) < n) {
        w->bad = 1;
        return;
    }
    memcpy(w->p, s, n);
    w->p += n;
}

#define W_LIT(w, s) w_raw((w), (s), sizeof(s) - 1)

static void w_i64(Writer *w, long long v)
{
    char tmp[24];
    char *q = tmp + sizeof(tmp);
    unsigned long long u = v < 0 ? 0ull - (unsigned long long)v : (unsigned long long)v;
    do {
        *--q = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        *--q = '-';
    w_raw(w, q, (size_t)(tmp + sizeof(tmp) - q));
}

/* whole µs as ms: "12.5", "0.001", "3.0" (0 <= us < 10**15, else the reference's) */
static void w_ms(Writer *w, long long us)
{
    if (us < 0 || us >= 1000000000000000ll) {
        w->bad = 1;
        return;
    }
    w_i64(w, us / 1000);
    int frac = (int)(us % 1000);
    char tmp[4] = {'.', (char)('0' + frac / 100), (char)('0' + frac / 10 % 10),
                   (char)('0' + frac % 10)};
    size_t n = 4;
    while (n > 2 && tmp[n - 1] == '0')
        n--;
    w_raw(w, tmp, n);
}

/* the ASCII bytes a JSON string is not written with as they are (or that this encoder leaves
 * to msgspec): control characters, the quote, the backslash, DEL */
static unsigned char ESCAPED[128];

static void init_escaped(void)
{
    for (int c = 0; c < 0x20; c++)
        ESCAPED[c] = 1;
    ESCAPED['"'] = ESCAPED['\\'] = ESCAPED[0x7F] = 1;
}

static void w_str(Writer *w, PyObject *o)
{
    if (PyUnicode_READY(o) < 0 || !PyUnicode_IS_ASCII(o)) { /* (a legacy string's readying) */
        PyErr_Clear();
        w->bad = 1;
        return;
    }
    const unsigned char *s = PyUnicode_1BYTE_DATA(o);
    Py_ssize_t n = PyUnicode_GET_LENGTH(o);
    unsigned char unsafe = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        unsafe |= ESCAPED[s[i]];
    if (unsafe) {
        w->bad = 1;
        return;
    }
    w_raw(w, "\"", 1);
    w_raw(w, (const char *)s, (size_t)n);
    w_raw(w, "\"", 1);
}

/* a value as msgspec writes it by its type, for the types requests carry (a float in a field
 * that holds no float in a request is the reference's) */
static void w_value(Writer *w, PyObject *o)
{
    if (w->bad)
        return;
    if (o == Py_None) {
        W_LIT(w, "null");
    } else if (PyUnicode_CheckExact(o)) {
        w_str(w, o);
    } else if (PyLong_CheckExact(o)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (overflow || (v == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            w->bad = 1;
            return;
        }
        w_i64(w, v);
    } else if (o == Py_True) {
        W_LIT(w, "true");
    } else if (o == Py_False) {
        W_LIT(w, "false");
    } else {
        w->bad = 1;
    }
}

/* an attribute (a new reference), or NULL with w->bad set */
static PyObject *w_attr(Writer *w, PyObject *o, PyObject *name)
{
    if (w->bad)
        return NULL;
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == NULL) {
        PyErr_Clear();
        w->bad = 1;
    }
    return v;
}

/* whole µs of seconds, as int(seconds * 1e6) truncates (an exact float of range, else bad) */
static long long w_us(Writer *w, PyObject *seconds)
{
    if (w->bad || !PyFloat_CheckExact(seconds)) {
        w->bad = 1;
        return 0;
    }
    double us = PyFloat_AS_DOUBLE(seconds) * 1e6;
    if (!(us > -9e15 && us < 9e15)) { /* nan too; beyond 2**53 the reference decides */
        w->bad = 1;
        return 0;
    }
    return (long long)us;
}

static void w_attr_value(Writer *w, PyObject *o, PyObject *name)
{
    PyObject *v = w_attr(w, o, name);
    if (v != NULL) {
        w_value(w, v);
        Py_DECREF(v);
    }
}

/* o.outer.inner as JSON (o.endpoint.path, o.view.generation) */
static void w_attr_attr_value(Writer *w, PyObject *o, PyObject *outer, PyObject *inner)
{
    PyObject *v = w_attr(w, o, outer);
    if (v != NULL) {
        w_attr_value(w, v, inner);
        Py_DECREF(v);
    }
}

/* ,"ts_start":...,"ts_end":... as msgspec writes the two floats: write_floats (msgspec's
 * encoder) of the pair, cut at its comma. Shortest round-trip digits cost ~0.42 µs a float
 * through PyOS_double_to_string (dtoa) where msgspec's own writer takes a few tens of ns. */
static void w_timestamps(Writer *w, PyObject *write_floats, PyObject *t0, PyObject *ts_end)
{
    if (w->bad)
        return;
    PyObject *pair = PyTuple_Pack(2, t0, ts_end);
    PyObject *out = pair ? PyObject_CallOneArg(write_floats, pair) : NULL;
    Py_XDECREF(pair);
    if (out == NULL || !PyBytes_CheckExact(out)) {
        PyErr_Clear();
        Py_XDECREF(out);
        w->bad = 1;
        return;
    }
    const char *s = PyBytes_AS_STRING(out);
    Py_ssize_t n = PyBytes_GET_SIZE(out);
    const char *comma = n >= 5 ? memchr(s, ',', (size_t)n) : NULL;
    if (comma == NULL || s[0] != '[' || s[n - 1] != ']') {
        Py_DECREF(out);
        w->bad = 1;
        return;
    }
    W_LIT(w, ",\"ts_start\":");
    w_raw(w, s + 1, (size_t)(comma - s - 1));
    W_LIT(w, ",\"ts_end\":");
    w_raw(w, comma + 1, (size_t)(s + n - 1 - comma - 1));
    Py_DECREF(out);
}

/* The record, or 0 with w->bad set: args as encode_record's (kind, source, model, ts_end,
 * status, error_code, used, worker_pid, stream[, limit[, retry_after_s]]). */
static void write_record(Writer *w, PyObject *write_floats, PyObject *const *args,
                         Py_ssize_t nargs)
{
    PyObject *kind = args[0], *source = args[1], *model = args[2], *ts_end = args[3];
    PyObject *status = args[4], *error_code = args[5], *used = args[6], *pid = args[7];
    PyObject *stream = args[8];
    PyObject *limit = nargs > 9 ? args[9] : Py_None;
    PyObject *retry_after_s = nargs > 10 ? args[10] : Py_None;
    PyObject *t0 = NULL, *fwd = NULL, *backend_id = NULL, *decision_type = NULL;
    PyObject *attempts = NULL, *caller = NULL, *key = NULL, *key_id = NULL, *org = NULL;
    PyObject *v = NULL;

    t0 = w_attr(w, source, s_t0);
    if (w->bad || !PyFloat_CheckExact(t0) || !PyFloat_CheckExact(ts_end)) {
        w->bad = 1;
        goto done;
    }
    double total = (PyFloat_AS_DOUBLE(ts_end) - PyFloat_AS_DOUBLE(t0)) * 1e6;
    if (!(total > -9e15 && total < 9e15)) {
        w->bad = 1;
        goto done;
    }
    long long total_us = (long long)total, backend_us = 0;
    fwd = w_attr(w, source, s_fwd);
    if (w->bad)
        goto done;
    if (fwd != Py_None) {
        backend_id = w_attr(w, fwd, s_backend_id);
        decision_type = w_attr(w, fwd, s_decision_type);
        attempts = w_attr(w, fwd, s_attempts);
        v = w_attr(w, fwd, s_backend_s);
        if (w->bad)
            goto done;
        backend_us = w_us(w, v);
        Py_CLEAR(v);
    }
    if (total_us < backend_us)
        total_us = backend_us;
    caller = w_attr(w, source, s_caller);
    if (w->bad)
        goto done;
    if (caller != Py_None) {
        key = w_attr(w, caller, s_key);
        if (w->bad)
            goto done;
        key_id = w_attr(w, key, s_key_id);
        org = w_attr(w, key, s_org);
    }
    if (w->bad)
        goto done;

    W_LIT(w, "{\"schema_version\":1,\"kind\":");
    w_value(w, kind);
    W_LIT(w, ",\"request_id\":");
    w_attr_value(w, source, s_request_id);
    w_timestamps(w, write_floats, t0, ts_end);
    W_LIT(w, ",\"endpoint\":");
    w_attr_attr_value(w, source, s_endpoint, s_path);
    W_LIT(w, ",\"key_id\":");
    w_value(w, key_id ? key_id : Py_None);
    W_LIT(w, ",\"org\":");
    w_value(w, org ? org : Py_None);
    W_LIT(w, ",\"model\":");
    w_value(w, model);
    W_LIT(w, ",\"backend_id\":");
    w_value(w, backend_id ? backend_id : Py_None);
    W_LIT(w, ",\"decision_type\":");
    w_value(w, decision_type ? decision_type : Py_None);
    W_LIT(w, ",\"attempts\":");
    if (attempts)
        w_value(w, attempts);
    else
        W_LIT(w, "0");
    W_LIT(w, ",\"status\":");
    w_value(w, status);
    W_LIT(w, ",\"error_code\":");
    w_value(w, error_code);
    if (used == Py_None) {
        W_LIT(w, ",\"prompt_tokens\":null,\"completion_tokens\":null,\"total_tokens\":null,"
                 "\"cost_micro\":0");
    } else {
        if (!PyTuple_CheckExact(used) || PyTuple_GET_SIZE(used) != 2) {
            w->bad = 1;
            goto done;
        }
        PyObject *prompt = PyTuple_GET_ITEM(used, 0), *completion = PyTuple_GET_ITEM(used, 1);
        W_LIT(w, ",\"prompt_tokens\":");
        w_value(w, prompt);
        W_LIT(w, ",\"completion_tokens\":");
        w_value(w, completion);
        W_LIT(w, ",\"total_tokens\":");
        if (prompt == Py_None || completion == Py_None) {
            W_LIT(w, "null");
        } else {
            if (!PyLong_CheckExact(prompt) || !PyLong_CheckExact(completion)) {
                w->bad = 1;
                goto done;
            }
            long long p = PyLong_AsLongLong(prompt), c = PyLong_AsLongLong(completion);
            if (PyErr_Occurred() || p > (1ll << 62) || c > (1ll << 62) || p < -(1ll << 62) ||
                    c < -(1ll << 62)) {
                PyErr_Clear();
                w->bad = 1;
                goto done;
            }
            w_i64(w, p + c);
        }
        W_LIT(w, ",\"cost_micro\":");
        w_attr_value(w, source, s_cost_micro);
    }
    W_LIT(w, ",\"router_overhead_ms\":");
    w_ms(w, total_us - backend_us);
    W_LIT(w, ",\"backend_latency_ms\":");
    w_ms(w, backend_us);
    W_LIT(w, ",\"total_latency_ms\":");
    w_ms(w, total_us);
    W_LIT(w, ",\"table_generation\":");
    w_attr_attr_value(w, source, s_view, s_generation);
    W_LIT(w, ",\"worker_pid\":");
    w_value(w, pid);
    if (w->bad)
        goto done;
    int streamed = PyObject_IsTrue(stream);
    if (streamed < 0) {
        PyErr_Clear();
        w->bad = 1;
        goto done;
    }
    if (streamed) {
        W_LIT(w, ",\"stream\":true,\"ttft_ms\":");
        v = w_attr(w, source, s_ttft_s);
        if (w->bad)
            goto done;
        if (v == Py_None)
            W_LIT(w, "null");
        else
            w_ms(w, w_us(w, v));
        Py_CLEAR(v);
        W_LIT(w, ",\"events\":");
        w_attr_value(w, source, s_events);
        W_LIT(w, ",\"interruption\":");
        w_attr_value(w, source, s_interruption);
    }
    if (used != Py_None) {
        v = w_attr(w, source, s_usage_estimated);
        if (w->bad)
            goto done;
        int estimated = PyObject_IsTrue(v);
        Py_CLEAR(v);
        if (estimated < 0) {
            PyErr_Clear();
            w->bad = 1;
            goto done;
        }
        if (estimated)
            W_LIT(w, ",\"usage_estimated\":true");
    }
    if (limit != Py_None) {
        W_LIT(w, ",\"limit\":");
        w_value(w, limit);
    }
    if (retry_after_s != Py_None) {
        W_LIT(w, ",\"retry_after_s\":");
        w_value(w, retry_after_s);
    }
    W_LIT(w, "}");
done:
    Py_XDECREF(v);
    Py_XDECREF(t0);
    Py_XDECREF(fwd);
    Py_XDECREF(backend_id);
    Py_XDECREF(decision_type);
    Py_XDECREF(attempts);
    Py_XDECREF(caller);
    Py_XDECREF(key);
    Py_XDECREF(key_id);
    Py_XDECREF(org);
}

/* encode_record(...) as returned by record_encoder: ``self`` is (reference, write_floats) */
static PyObject *encode_record(PyObject *self, PyObject *const *args, size_t nargsf,
                               PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *reference = PyTuple_GET_ITEM(self, 0);
    if (kwnames == NULL && nargs >= 9 && nargs <= 11) {
        char buf[RECORD_MAX];
        Writer w = {buf, buf + sizeof(buf), 0};
        write_record(&w, PyTuple_GET_ITEM(self, 1), args, nargs);
        if (!w.bad)
            return PyBytes_FromStringAndSize(buf, w.p - buf);
        if (PyErr_Occurred()) /* (every failure above clears its own; never leak one) */
            PyErr_Clear();
    }
    return PyObject_Vectorcall(reference, args, nargsf, kwnames);
}

static PyMethodDef encode_record_def = {
    "encode_record", (PyCFunction)(void (*)(void))encode_record,
    METH_FASTCALL | METH_KEYWORDS,
    "encode_record(kind, source, model, ts_end, status, error_code, used, worker_pid, stream, "
    "limit=None, retry_after_s=None) -> bytes: the usage record (apirouter.usage)"};

static PyObject *record_encoder(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyCallable_Check(args[0]) || !PyCallable_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "record_encoder(reference, write_floats): two "
                                         "callables");
        return NULL;
    }
    PyObject *self = PyTuple_Pack(2, args[0], args[1]);
    if (self == NULL)
        return NULL;
    PyObject *f = PyCFunction_NewEx(&encode_record_def, self, module);
    Py_DECREF(self);
    return f;
}

static int intern_names(void)
{
    init_escaped();
#define INTERN(name)                                                                          \
    if ((s_##name = PyUnicode_InternFromString(#name)) == NULL)                               \
        return -1;
    INTERN(t0) INTERN(fwd) INTERN(backend_id) INTERN(decision_type) INTERN(attempts)
    INTERN(backend_s) INTERN(caller) INTERN(key) INTERN(key_id) INTERN(org) INTERN(cost_micro)
    INTERN(request_id) INTERN(endpoint) INTERN(path) INTERN(view) INTERN(generation)
    INTERN(ttft_s) INTERN(events) INTERN(interruption) INTERN(usage_estimated)
#undef INTERN
    return 0;
}


static PyMethodDef module_methods[] = {
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL,
     "scan(span, at, stop, limit, crc32, out) -> (at, why): check and collect the frames "
     "of a copy of unread ring bytes (why: 0 stop reached, 1 WRAP, 2 bad frame)"},
    {"record_encoder", (PyCFunction)(void (*)(void))record_encoder, METH_FASTCALL,
     "record_encoder(reference, write_floats) -> encode_record: the usage record's builder in "
     "C, which hands what it does not write to reference; write_floats is msgspec's JSON "
     "encoder (the timestamps' digits)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "apirouter._ringcore",
    .m_doc = "The usage ring's producer, the consumer's frame scan and the usage record's "
             "builder in C (apirouter/usage_ring.py and apirouter/usage.py hold the "
             "references).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__ringcore(void)
{
    if (PyType_Ready(&ProducerType) < 0 || intern_names() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ProducerType);
    if (PyModule_AddObject(m, "Producer", (PyObject *)&ProducerType) < 0) {
        Py_DECREF(&ProducerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
