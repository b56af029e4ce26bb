/* The per-record loops of the usage rings (apirouter/usage_ring.py), in C: the producer's
 * put, and the consumer's scan of the frames it copied out.
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

static PyMethodDef module_methods[] = {
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL,
     "scan(span, at, stop, limit, crc32, out) -> (at, why): check and collect the frames "
     "of a copy of unread ring bytes (why: 0 stop reached, 1 WRAP, 2 bad frame)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "apirouter._ringcore",
    .m_doc = "The usage ring's producer and the consumer's frame scan in C "
             "(apirouter/usage_ring.py holds the references).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__ringcore(void)
{
    if (PyType_Ready(&ProducerType) < 0)
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
