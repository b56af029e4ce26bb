/* The token-bucket arithmetic of apirouter/shared_buckets.py on the bucket segment, in C, and
 * the segment's stripe locks.
 *
 * Admission and settlement of token buckets run for every request of the in-process limiter;
 * in Python they cost ~10 µs a request (slot lookup, level, write-back, locking), most of it
 * interpreter overhead. This module does the same work on the same memory under the same
 * locks: ``BucketTable._take_py`` and ``_settle_py`` in shared_buckets.py are the reference,
 * and tests/apirouter/test_shared_buckets.py holds both, and this module, to the pure model
 * of apirouter/limits.py (same floating-point operations in the same order, so the same
 * doubles). Budget ledgers stay in Python: they are rarer and their rules richer.
 *
 * Layout (see shared_buckets.py): a 32-byte header, then slots of five 8-byte words
 * (key u64, expires f64, tokens f64, at f64, unused) grouped by stripe, ``ways`` slots a
 * stripe, then (64-byte aligned) one lock per stripe, each in a 64-byte cell: a process-shared,
 * robust, error-checking pthread mutex. Uncontended, taking and releasing one is two atomic
 * instructions in user space; the POSIX record locks (fcntl) they replace were two system
 * calls each (~0.8 µs a request's pair, measured). Robust: when a holder dies (SIGKILL
 * included) the kernel hands the mutex to the next taker with EOWNERDEAD, which marks it
 * consistent and goes on, as the kernel dropped a dead holder's record lock (robust futexes:
 * Linux >= 5.5 closes the exit race of that hand-over). A mutex records its owner by thread
 * id, so every process using one segment must be in one PID namespace (one pod, one host):
 * two namespaces' thread ids can collide. Python's paths lock through ``Core.lock``/``unlock``,
 * so every user of a segment takes the same locks, in ascending stripe order (no deadlock). A lock is first tried without blocking; only when it
 * is held elsewhere does the call wait, with the GIL released.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define HEADER_SIZE 32
#define SLOT_WORDS 5
#define SLOT_SIZE (SLOT_WORDS * 8)
#define MAX_RECORDS 64 /* buckets of one request (the Python path takes more) */
#define LOCK_CELL 64 /* bytes a stripe's mutex takes: one cache line, so stripes share none */
_Static_assert(sizeof(pthread_mutex_t) <= LOCK_CELL, "a stripe's mutex must fit its cell");

typedef struct {
    PyObject_HEAD
    PyObject *buf; /* the segment's memory: a buffer is taken from it per call, not held, so
                      its owner can release and unmap it whenever it closes */
    int shared; /* 0: private memory, nothing to lock */
    Py_ssize_t stripes;
    Py_ssize_t ways;
} Core;

/* The stripes one call locks: sorted, unique. Locals of each call (the GIL is let go while
 * a lock is awaited: nothing of a call may live in the shared object). */
typedef struct {
    Py_ssize_t *v;
    Py_ssize_t n;
} Stripes;

typedef struct {
    uint64_t key;
    Py_ssize_t stripe;
    double cap;
    double rate;
    double amount; /* cost (take) or delta (settle) */
    Py_ssize_t off;
    int live;
} Rec;

/* -- locks ------------------------------------------------------------------------------- */

/* Where the stripe locks start: after the slots, on a cache line. */
static Py_ssize_t locks_at(Py_ssize_t stripes, Py_ssize_t ways)
{
    Py_ssize_t end = HEADER_SIZE + stripes * ways * SLOT_SIZE;
    return (end + LOCK_CELL - 1) / LOCK_CELL * LOCK_CELL;
}

static inline pthread_mutex_t *mutex_of(const Core *self, char *base, Py_ssize_t stripe)
{
    return (pthread_mutex_t *)(base + locks_at(self->stripes, self->ways) + stripe * LOCK_CELL);
}

/* A waiter re-checks its stripe this often. A wake-up can be lost: the holder's unlock wakes
 * one sleeper, and if that one is killed before it takes the mutex, the word is left free
 * with nobody told, and the other sleepers would wait for the next contention on the stripe
 * (seconds, or for ever on a quiet one; a worker's whole event loop waits with it). The
 * kernel's record locks had no such gap. A slice also lets signal handlers run while waiting. */
#define WAIT_SLICE_NS 2000000L

/* 0, or -1 with the exception set (OSError, or what a signal handler raised). */
static int lock_one(pthread_mutex_t *m)
{
    int rc = pthread_mutex_trylock(m);
    while (rc == EBUSY || rc == ETIMEDOUT) { /* held elsewhere: wait without the GIL */
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_nsec += WAIT_SLICE_NS;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec += 1;
            until.tv_nsec -= 1000000000L;
        }
        Py_BEGIN_ALLOW_THREADS
        rc = pthread_mutex_clocklock(m, CLOCK_MONOTONIC, &until);
        Py_END_ALLOW_THREADS
        if (rc == ETIMEDOUT && PyErr_CheckSignals() < 0)
            return -1;
    }
    if (rc == EOWNERDEAD) /* its holder died holding it: what it guarded is whole slots */
        rc = pthread_mutex_consistent(m);
    if (rc != 0) {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static void add_stripe(Stripes *st, Py_ssize_t stripe)
{
    Py_ssize_t i = st->n;
    while (i > 0 && st->v[i - 1] > stripe)
        i--;
    if (i > 0 && st->v[i - 1] == stripe)
        return;
    memmove(st->v + i + 1, st->v + i, sizeof(Py_ssize_t) * (size_t)(st->n - i));
    st->v[i] = stripe;
    st->n++;
}

static void unlock_stripes(const Core *self, char *base, const Stripes *st, Py_ssize_t count)
{
    if (!self->shared)
        return;
    for (Py_ssize_t i = count - 1; i >= 0; i--)
        pthread_mutex_unlock(mutex_of(self, base, st->v[i]));
}

/* Lock every stripe, ascending (no deadlock between processes); on failure unlock what was
 * taken and set the exception. */
static int lock_stripes(const Core *self, char *base, const Stripes *st)
{
    if (!self->shared)
        return 0;
    for (Py_ssize_t i = 0; i < st->n; i++) {
        if (lock_one(mutex_of(self, base, st->v[i])) < 0) {
            unlock_stripes(self, base, st, i);
            return -1;
        }
    }
    return 0;
}

/* -- slots -------------------------------------------------------------------------------- */

static inline uint64_t load_u64(const char *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline double load_f64(const char *p) { double v; memcpy(&v, p, 8); return v; }

/* The slot of ``key`` in its stripe (live: its record has not expired), else one to put it
 * in that no other record of this operation took: a never-used or expired slot, else the
 * live record full again soonest (evicted). As BucketTable._slot. */
static Py_ssize_t find_slot(const Core *self, const char *base, uint64_t key,
                            Py_ssize_t stripe, double now, const Py_ssize_t *taken, int ntaken,
                            int *live, int *evicted)
{
    Py_ssize_t first = HEADER_SIZE + stripe * self->ways * SLOT_SIZE;
    Py_ssize_t free_off = -1, victim = -1;
    double soonest = INFINITY;
    for (Py_ssize_t way = 0; way < self->ways; way++) {
        Py_ssize_t off = first + way * SLOT_SIZE;
        int skip = 0;
        for (int t = 0; t < ntaken; t++)
            if (taken[t] == off) { skip = 1; break; }
        if (skip)
            continue;
        uint64_t k = load_u64(base + off);
        double expires = load_f64(base + off + 8);
        if (k == key) {
            *live = expires > now;
            return off;
        }
        if (free_off < 0 && (k == 0 || expires <= now))
            free_off = off;
        else if (victim < 0 || expires < soonest) { /* (a bucket that never refills: inf) */
            soonest = expires;
            victim = off;
        }
    }
    *live = 0;
    if (free_off < 0 && victim >= 0) {
        *evicted += 1;
        free_off = victim;
    }
    return free_off; /* -1: every way is taken by this operation's other records */
}

/* limits.level on a slot: what it holds, refilled since it was written, capped; a dead slot
 * is a full bucket. Python's min(cap, x) is x only when x < cap; max(0.0, d) is d only when
 * d > 0.0. */
static inline double level_of(const char *base, const Rec *r, double now)
{
    if (!r->live)
        return r->cap;
    const char *p = base + r->off;
    double tokens = load_f64(p + 16), at = load_f64(p + 24);
    double since = now - at;
    double x = tokens + (since > 0.0 ? since : 0.0) * r->rate;
    return x < r->cap ? x : r->cap;
}

/* A bucket's slot, written whole: its level as of now and when it is full again. */
static inline void put(char *base, const Rec *r, double left, double now)
{
    double words[SLOT_WORDS];
    uint64_t key = r->key;
    memcpy(&words[0], &key, 8);
    words[1] = r->rate > 0 ? now + (r->cap - left) / r->rate : INFINITY;
    words[2] = left;
    words[3] = now;
    words[4] = 0.0;
    memcpy(base + r->off, words, SLOT_SIZE);
}

/* Fill ``r`` from a record (key, scope, capacity, per_minute, cost): ``key`` the 64 bits of
 * the bucket's name, ``scope`` those of its scope (its stripe: scope % stripes), as
 * BucketTable.record makes them; ``cost`` None for the call's ``tokens`` (a plan's
 * token-bucket), and read only when ``tokens`` is given. 1: filled; 2: a cost beyond 2**53
 * (the caller takes the Python path); -1: error. */
static int read_rec(const Core *self, PyObject *rec, PyObject *tokens, Rec *r)
{
    if (!PyTuple_Check(rec) || PyTuple_GET_SIZE(rec) != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "records are (key, scope, capacity, per_minute, cost) tuples");
        return -1;
    }
    r->key = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(rec, 0));
    uint64_t scope = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(rec, 1));
    if (PyErr_Occurred())
        return -1;
    r->stripe = (Py_ssize_t)(scope % (uint64_t)self->stripes);
    r->cap = PyLong_AsDouble(PyTuple_GET_ITEM(rec, 2));
    r->rate = PyLong_AsDouble(PyTuple_GET_ITEM(rec, 3)) / 60000.0;
    if (tokens != NULL) {
        PyObject *cost = PyTuple_GET_ITEM(rec, 4);
        r->amount = PyLong_AsDouble(cost == Py_None ? tokens : cost);
        /* Python compares a float with an int exactly; a double holds every int up to 2**53
         * (costs are bounded far below: max_tokens and the body size are) */
        if (!PyErr_Occurred() && fabs(r->amount) > 9007199254740992.0)
            return 2;
    }
    return PyErr_Occurred() ? -1 : 1;
}

/* A sequence's items without a copy: a tuple's or a list's (the caller keeps it alive and
 * unchanged: no Python code runs in between). NULL with TypeError otherwise. */
static PyObject *no_items[1];

static PyObject **items_of(PyObject *seq, Py_ssize_t *n, const char *what)
{
    if (PyTuple_Check(seq)) {
        *n = PyTuple_GET_SIZE(seq);
        return &PyTuple_GET_ITEM(seq, 0);
    }
    if (PyList_Check(seq)) {
        *n = PyList_GET_SIZE(seq);
        return PyList_GET_SIZE(seq) ? &PyList_GET_ITEM(seq, 0) : no_items;
    }
    PyErr_Format(PyExc_TypeError, "%s: a tuple or list", what);
    return NULL;
}

/* int(x) of a double as Python makes it (truncated), max(0, that): a bucket's remaining. */
static PyObject *remaining_of(double level)
{
    return level >= 1.0 ? PyLong_FromDouble(level) : PyLong_FromLong(0);
}

/* math.ceil(x) of a double, as Python makes it. */
static PyObject *ceil_of(double x)
{
    return PyLong_FromDouble(ceil(x));
}

static PyObject *segment_error; /* apirouter.shm.SegmentError */

static PyObject *no_way(const Core *self)
{
    PyErr_Format(segment_error, "one request has more records in a stripe than its %zd ways",
                 self->ways);
    return NULL;
}

/* The segment's memory for one call, checked against the layout. */
static int get_view(Core *self, Py_buffer *view)
{
    if (PyObject_GetBuffer(self->buf, view, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0)
        return -1;
    if (view->len < locks_at(self->stripes, self->ways) + self->stripes * LOCK_CELL) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "the buffer is smaller than the layout");
        return -1;
    }
    return 0;
}

/* take(records, tokens, now_ms) -> (index, remaining, reset_ms, retry_ms, evicted)
 *                                  | NotImplemented
 *
 * Charge every bucket of ``records`` (read_rec) its cost, or none. index -1: admitted, the
 * rest about the first bucket: ``remaining`` max(0, int(what is left)), ``reset_ms`` until
 * it is full again, ``retry_ms`` 0; else the index of the first bucket that refused, and
 * the same about it, ``retry_ms`` until it holds the cost. The integers are those
 * BucketTable._take_py makes (math.ceil and int of the same doubles). NotImplemented: a
 * cost beyond 2**53 (nothing was locked or charged). */
static PyObject *Core_take(Core *self, PyObject *const *args, Py_ssize_t nargs)
{
    /* (fastcall, its arguments read without a format string: once a request) */
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "take(records, tokens, now_ms)");
        return NULL;
    }
    PyObject *records = args[0], *tokens = args[1];
    if (!PyLong_Check(tokens)) {
        PyErr_SetString(PyExc_TypeError, "take: tokens must be an int");
        return NULL;
    }
    double now = PyFloat_AsDouble(args[2]);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    Py_ssize_t n;
    PyObject **items = items_of(records, &n, "take");
    if (items == NULL)
        return NULL;
    if (n == 0 || n > MAX_RECORDS) {
        PyErr_SetString(PyExc_ValueError, "take: 1 to 64 buckets");
        return NULL;
    }
    Rec recs[MAX_RECORDS];
    Py_ssize_t stripe_v[MAX_RECORDS];
    Stripes st = {stripe_v, 0};
    for (Py_ssize_t i = 0; i < n; i++) {
        int rc = read_rec(self, items[i], tokens, &recs[i]);
        if (rc != 1) {
            if (rc < 0)
                return NULL;
            return Py_NewRef(Py_NotImplemented);
        }
        add_stripe(&st, recs[i].stripe);
    }
    Py_buffer view;
    if (get_view(self, &view) < 0)
        return NULL;
    char *base = (char *)view.buf;
    if (lock_stripes(self, base, &st) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    Py_ssize_t taken[MAX_RECORDS];
    int evicted = 0;
    Py_ssize_t refused = -1;
    double level = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Rec *r = &recs[i];
        r->off = find_slot(self, base, r->key, r->stripe, now, taken, (int)i, &r->live,
                           &evicted);
        if (r->off < 0) {
            unlock_stripes(self, base, &st, st.n);
            PyBuffer_Release(&view);
            return no_way(self);
        }
        taken[i] = r->off;
        level = level_of(base, r, now);
        if (level < r->amount) {
            refused = i;
            break;
        }
        r->amount = level - r->amount; /* from here on: what is left */
    }
    if (refused < 0) {
        for (Py_ssize_t i = 0; i < n; i++)
            put(base, &recs[i], recs[i].amount, now);
        level = recs[0].amount;
    }
    unlock_stripes(self, base, &st, st.n);
    PyBuffer_Release(&view);
    const Rec *r = &recs[refused < 0 ? 0 : refused];
    PyObject *remaining = remaining_of(level);
    PyObject *reset = r->rate > 0 ? ceil_of((r->cap - level) / r->rate) : PyLong_FromLong(0);
    PyObject *retry = refused < 0 ? PyLong_FromLong(0)
                      : r->rate > 0 ? ceil_of((r->amount - level) / r->rate)
                      : PyLong_FromLong(60000);
    if (remaining == NULL || reset == NULL || retry == NULL) {
        Py_XDECREF(remaining);
        Py_XDECREF(reset);
        Py_XDECREF(retry);
        return NULL;
    }
    PyObject *index = PyLong_FromSsize_t(refused), *evictions = PyLong_FromLong(evicted);
    if (index == NULL || evictions == NULL) {
        Py_XDECREF(index);
        Py_XDECREF(evictions);
        Py_DECREF(remaining);
        Py_DECREF(reset);
        Py_DECREF(retry);
        return NULL;
    }
    PyObject *got = PyTuple_New(5);
    if (got == NULL) {
        Py_DECREF(index);
        Py_DECREF(evictions);
        Py_DECREF(remaining);
        Py_DECREF(reset);
        Py_DECREF(retry);
        return NULL;
    }
    PyTuple_SET_ITEM(got, 0, index);
    PyTuple_SET_ITEM(got, 1, remaining);
    PyTuple_SET_ITEM(got, 2, reset);
    PyTuple_SET_ITEM(got, 3, retry);
    PyTuple_SET_ITEM(got, 4, evictions);
    return got;
}

/* settle(items, now_ms) -> evicted
 *
 * ``items``: [(records, delta)] (read_rec; their costs are not read): correct each bucket
 * of each item by ``delta`` tokens (refill, subtract, cap at capacity, write), all under one
 * round of stripe locks. */
static PyObject *Core_settle(Core *self, PyObject *args)
{
    PyObject *items_obj;
    double now;
    if (!PyArg_ParseTuple(args, "O!d", &PyList_Type, &items_obj, &now))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(items_obj), total = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyList_GET_ITEM(items_obj, i);
        Py_ssize_t k = 0;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 ||
                items_of(PyTuple_GET_ITEM(item, 0), &k, "settle: records") == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "settle: items are (records, delta)");
            return NULL;
        }
        if (k > MAX_RECORDS) {
            PyErr_SetString(PyExc_ValueError, "settle: at most 64 buckets an item");
            return NULL;
        }
        /* An exact int or float: converting it runs no code of the caller's, which could
         * change the lists counted here before they are read. */
        PyObject *delta = PyTuple_GET_ITEM(item, 1);
        if (!PyLong_CheckExact(delta) && !PyFloat_CheckExact(delta)) {
            PyErr_SetString(PyExc_TypeError, "settle: a delta is an int or a float");
            return NULL;
        }
        total += k;
    }
    if (total == 0)
        return PyLong_FromLong(0);
    Rec *recs = PyMem_Malloc(sizeof(Rec) * (size_t)total);
    Py_ssize_t *stripe_v = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)total);
    /* each item's bucket count as read when its records were: the locking below may let go
     * of the GIL, and the lists are not read again after it */
    Py_ssize_t *ks = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)count);
    PyObject *result = NULL;
    Py_buffer view;
    int have_view = 0;
    if (recs == NULL || stripe_v == NULL || ks == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Stripes st = {stripe_v, 0};
    Py_ssize_t at = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyList_GET_ITEM(items_obj, i);
        Py_ssize_t k = 0;
        PyObject **records = items_of(PyTuple_GET_ITEM(item, 0), &k, "settle");
        if (records == NULL)
            goto done;
        if (k > MAX_RECORDS || at + k > total) { /* changed since counted (read_rec's ints) */
            PyErr_SetString(PyExc_RuntimeError, "settle: the items changed during the call");
            goto done;
        }
        ks[i] = k;
        double delta = PyFloat_AsDouble(PyTuple_GET_ITEM(item, 1));
        if (delta == -1.0 && PyErr_Occurred())
            goto done;
        for (Py_ssize_t j = 0; j < k; j++, at++) {
            if (read_rec(self, records[j], NULL, &recs[at]) != 1)
                goto done;
            recs[at].amount = delta;
            add_stripe(&st, recs[at].stripe);
        }
    }
    if (get_view(self, &view) < 0)
        goto done;
    have_view = 1;
    char *base = (char *)view.buf;
    if (lock_stripes(self, base, &st) < 0)
        goto done;
    int evicted = 0;
    at = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t k = ks[i];
        Py_ssize_t taken[MAX_RECORDS];
        for (Py_ssize_t j = 0; j < k; j++, at++) {
            Rec *r = &recs[at];
            r->off = find_slot(self, base, r->key, r->stripe, now, taken, (int)j, &r->live,
                               &evicted);
            if (r->off < 0) { /* what earlier items wrote stays: each item is whole */
                unlock_stripes(self, base, &st, st.n);
                no_way(self);
                goto done;
            }
            taken[j] = r->off;
            double left = level_of(base, r, now) - r->amount;
            put(base, r, left < r->cap ? left : r->cap, now);
        }
    }
    unlock_stripes(self, base, &st, st.n);
    result = PyLong_FromLong(evicted);
done:
    if (have_view)
        PyBuffer_Release(&view);
    PyMem_Free(recs);
    PyMem_Free(stripe_v);
    PyMem_Free(ks);
    return result;
}

static int Core_init(Core *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buf", "shared", "stripes", "ways", NULL};
    PyObject *buf;
    int shared;
    Py_ssize_t stripes, ways;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Opnn", kwlist, &buf, &shared, &stripes,
                                     &ways))
        return -1;
    if (stripes <= 0 || ways <= 0) {
        PyErr_SetString(PyExc_ValueError, "stripes and ways must be positive");
        return -1;
    }
    Py_XSETREF(self->buf, Py_NewRef(buf));
    self->shared = shared;
    self->stripes = stripes;
    self->ways = ways;
    Py_buffer view; /* checked once here; again at each call (the owner may have closed it) */
    if (get_view(self, &view) < 0)
        return -1;
    PyBuffer_Release(&view);
    return 0;
}

/* lock(stripes) / unlock(stripes): the stripe locks for the Python paths (ledgers, the
 * reference implementation, reads). ``stripes`` ascending and unique, as every user takes
 * them. 0, or -1 with the exception set; ``st->v`` is the caller's to PyMem_Free. */
static int stripes_arg(const Core *self, PyObject *list, Stripes *st)
{
    st->v = NULL;
    st->n = 0;
    if (!PyList_Check(list)) {
        PyErr_SetString(PyExc_TypeError, "a list of stripes");
        return -1;
    }
    Py_ssize_t n = PyList_GET_SIZE(list);
    st->v = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(n > 0 ? n : 1));
    if (st->v == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t s = PyLong_AsSsize_t(PyList_GET_ITEM(list, i));
        if (s == -1 && PyErr_Occurred())
            return -1;
        if (s < 0 || s >= self->stripes || (i > 0 && s <= st->v[i - 1])) {
            PyErr_SetString(PyExc_ValueError, "stripes: ascending, unique, in range");
            return -1;
        }
        st->v[st->n++] = s;
    }
    return 0;
}

static PyObject *Core_lock(Core *self, PyObject *list)
{
    Stripes st;
    Py_buffer view;
    PyObject *result = NULL;
    if (stripes_arg(self, list, &st) == 0 && get_view(self, &view) == 0) {
        if (lock_stripes(self, (char *)view.buf, &st) == 0) {
            /* A signal that came while waiting has its handler run here, not right after
             * this call returns, before the caller's ``try``: a handler that raises there
             * would leave the stripes locked by a live thread for good. */
            if (PyErr_CheckSignals() < 0)
                unlock_stripes(self, (char *)view.buf, &st, st.n);
            else
                result = Py_NewRef(Py_None);
        }
        PyBuffer_Release(&view);
    }
    PyMem_Free(st.v);
    return result;
}

static PyObject *Core_unlock(Core *self, PyObject *list)
{
    Stripes st;
    Py_buffer view;
    PyObject *result = NULL;
    if (stripes_arg(self, list, &st) == 0 && get_view(self, &view) == 0) {
        unlock_stripes(self, (char *)view.buf, &st, st.n);
        PyBuffer_Release(&view);
        result = Py_NewRef(Py_None);
    }
    PyMem_Free(st.v);
    return result;
}

/* size(stripes, ways) -> bytes of a segment of that layout */
static PyObject *mod_size(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_ssize_t stripes, ways;
    if (!PyArg_ParseTuple(args, "nn", &stripes, &ways))
        return NULL;
    return PyLong_FromSsize_t(locks_at(stripes, ways) + stripes * LOCK_CELL);
}

/* init_locks(buf, stripes, ways): make every stripe's mutex (a segment just created, not yet
 * used by anyone: never one in use) */
static PyObject *mod_init_locks(PyObject *Py_UNUSED(module), PyObject *args)
{
    Core probe; /* for the layout helpers only */
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "w*nn", &view, &probe.stripes, &probe.ways))
        return NULL;
    PyObject *result = NULL;
    pthread_mutexattr_t attr;
    int rc = pthread_mutexattr_init(&attr);
    if (rc == 0)
        rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    if (rc == 0)
        rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    if (rc == 0) /* a second lock by its holder is an error, not a hang */
        rc = pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK);
    if (rc == 0 && (probe.stripes <= 0 || probe.ways <= 0 ||
                    view.len < locks_at(probe.stripes, probe.ways) + probe.stripes * LOCK_CELL))
        rc = EINVAL;
    for (Py_ssize_t i = 0; rc == 0 && i < probe.stripes; i++) {
        pthread_mutex_t *m = mutex_of(&probe, (char *)view.buf, i);
        memset(m, 0, LOCK_CELL);
        rc = pthread_mutex_init(m, &attr);
    }
    pthread_mutexattr_destroy(&attr);
    if (rc != 0) {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
    } else {
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&view);
    return result;
}

static void Core_dealloc(Core *self)
{
    Py_XDECREF(self->buf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Core_methods[] = {
    {"take", (PyCFunction)(void (*)(void))Core_take, METH_FASTCALL,
     "take(records, tokens, now_ms) -> (index, remaining, reset_ms, retry_ms, evicted)"},
    {"settle", (PyCFunction)Core_settle, METH_VARARGS,
     "settle([(records, delta)], now_ms) -> evicted"},
    {"lock", (PyCFunction)Core_lock, METH_O, "lock(stripes): take these stripes' locks"},
    {"unlock", (PyCFunction)Core_unlock, METH_O, "unlock(stripes): release them"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "apirouter._bucketcore.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Core(buf, shared, stripes, ways): token buckets on a bucket segment",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
};

static PyMethodDef module_functions[] = {
    {"size", mod_size, METH_VARARGS, "size(stripes, ways) -> bytes of a segment"},
    {"init_locks", mod_init_locks, METH_VARARGS,
     "init_locks(buf, stripes, ways): make the stripe locks of a new segment"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_methods = module_functions,
    .m_name = "apirouter._bucketcore",
    .m_doc = "Token buckets of the in-process limiter on the bucket segment (shared_buckets.py).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__bucketcore(void)
{
    if (PyType_Ready(&CoreType) < 0)
        return NULL;
    PyObject *shm = PyImport_ImportModule("apirouter.shm");
    if (shm == NULL)
        return NULL;
    segment_error = PyObject_GetAttrString(shm, "SegmentError");
    Py_DECREF(shm);
    if (segment_error == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "Core", (PyObject *)&CoreType) < 0) {
        Py_DECREF(&CoreType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
