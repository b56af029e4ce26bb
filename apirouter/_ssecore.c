/* The content bytes of a streamed read, counted in C: apirouter/sse.py's _content_bytes for
 * the common case.
 *
 * Every read a stream relays is searched for the text it adds (content, text, tool call
 * arguments, refusal, reasoning), so that a stream whose backend reports no usage can be
 * estimated. The pattern search (sse._CONTENT.findall) walks the bytes one at a time in the
 * regular expression engine: ~24 µs for a read of 18 mock events (4.3 KB) on the 2-core VM,
 * half of all the Python a relayed read runs. This does the same walk with memchr from quote
 * to quote (~1 µs).
 *
 * raw_content_bytes(data) is exactly sum(map(len, sse._CONTENT.findall(data))) when no string
 * it finds holds a backslash, and -1 when one does: an escape must be decoded to count its
 * UTF-8 bytes, which sse.py's Python path does. tests/apirouter/test_sse.py holds the two
 * equal on generated input.
 *
 * The pattern, and how findall walks it:
 *   "(?:content|text|arguments|refusal|reasoning_content)":[ \t\n\r]*"([^"\\\n]*(?:\\.?[^"\\\n]*)*)
 * A match starts at a quote; the string after the key runs to the first quote that is not
 * escaped, a line feed, or the end (a backslash takes the byte after it along, unless that is
 * a line feed). The next search starts where the match ended: at that closing quote.
 */

#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE /* memmem, memrchr */
#include <Python.h>
#include <structmember.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* Whether ``key`` (its closing quote and colon included) starts at p. */
static int is_key(const char *p, const char *end, const char *key, Py_ssize_t n)
{
    return end - p >= n && memcmp(p, key, (size_t)n) == 0;
}

/* The length of the key (and its closing quote and colon) at p, or 0 if none starts there.
 * Most quotes open other keys and values: told apart by their first byte, without a compare
 * against each key (~360 quotes a read of 18 mock events). */
static Py_ssize_t key_at(const char *p, const char *end)
{
    if (p >= end)
        return 0;
    switch (*p) {
    case 'c':
        return is_key(p, end, "content\":", 9) ? 9 : 0;
    case 't':
        return is_key(p, end, "text\":", 6) ? 6 : 0;
    case 'a':
        return is_key(p, end, "arguments\":", 11) ? 11 : 0;
    case 'r':
        return is_key(p, end, "refusal\":", 9) ? 9
             : is_key(p, end, "reasoning_content\":", 19) ? 19 : 0;
    default:
        return 0;
    }
}

/* The content bytes in [data, end), or -1 when a string holds an escape. */
static Py_ssize_t count_content(const char *data, const char *end)
{
    const char *p = data;
    Py_ssize_t total = 0;
    while (p < end) {
        const char *quote = memchr(p, '"', (size_t)(end - p));
        if (quote == NULL)
            break;
        const char *q = quote + 1;
        Py_ssize_t key = key_at(q, end);
        if (key == 0) {
            p = quote + 1;
            continue;
        }
        q += key;
        while (q < end && (*q == ' ' || *q == '\t' || *q == '\n' || *q == '\r'))
            q++;
        if (q >= end || *q != '"') {
            p = quote + 1;
            continue;
        }
        const char *s = ++q;
        while (q < end && *q != '"' && *q != '\n') {
            if (*q == '\\')
                return -1; /* an escape: the Python path decodes it */
            q++;
        }
        total += q - s;
        p = q; /* the next search starts at the end of this match */
    }
    return total;
}

static PyObject *raw_content_bytes(PyObject *self, PyObject *arg)
{
    (void)self;
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "raw_content_bytes() takes bytes");
        return NULL;
    }
    const char *data = PyBytes_AS_STRING(arg);
    return PyLong_FromSsize_t(count_content(data, data + PyBytes_GET_SIZE(arg)));
}

/* One pass over a block for what plain_block looks for after its line checks: any [DONE], any
 * "usage": key not followed by null, and the content count_content finds (the same walk:
 * from quote to quote, a content string skipped to its end). Every occurrence of [DONE] starts
 * at a '[' and of "usage": at a quote, so looking at each '[' and quote finds them all; the
 * content walk looks at the quotes from where it may resume (a string's closing quote on).
 *
 * Separate searches (memmem for [DONE], memmem per "usage": key, memchr per quote for the
 * content) took 2.3 µs a read of 6 mock events (1.4 KB), on the quotes mostly: ~30 an event,
 * a call each. The quotes and brackets of 16 bytes at a time are found with two SSE2 compares
 * (a plain loop where SSE2 is not there), and a quote is passed over on the byte after it
 * unless that is the first letter of usage or a content key: 1.1 µs, the call included. */
struct walk {
    const char *stop;     /* the end of the block */
    const char *resume;   /* quotes from here on may open a content key */
    Py_ssize_t total;     /* content bytes so far */
    int counting;         /* 0 once a content string held an escape (the count is then -1) */
    const char *found;    /* where the walk stopped: the [DONE] or "usage": key found */
};

/* Look at the '[' or quote at ``at``: 1 when the block must be read event by event. */
static inline int walk_mark(struct walk *w, const char *at)
{
    const char *stop = w->stop;
    if (*at == '[')
        return stop - at >= 6 && memcmp(at, "[DONE]", 6) == 0;
    if (stop - at < 2)
        return 0;
    switch (at[1]) { /* most quotes open other keys and values: told apart by one byte */
    case 'u':
        return stop - at >= 8 && memcmp(at, "\"usage\":", 8) == 0
            && (stop - at < 12 || memcmp(at + 8, "null", 4) != 0);
    case 'c': case 't': case 'a': case 'r':
        break;
    default:
        return 0;
    }
    if (!w->counting || at < w->resume)
        return 0;
    const char *q = at + 1;
    Py_ssize_t key = key_at(q, stop);
    if (key == 0)
        return 0;
    q += key;
    while (q < stop && (*q == ' ' || *q == '\t' || *q == '\n' || *q == '\r'))
        q++;
    if (q >= stop || *q != '"')
        return 0;
    const char *s = ++q;
    while (q < stop && *q != '"' && *q != '\n') {
        if (*q == '\\') {
            w->counting = 0; /* an escape: the Python path decodes it */
            return 0;
        }
        q++;
    }
    w->total += q - s;
    w->resume = q; /* as count_content: the next key may start at this closing quote */
    return 0;
}

static int walk_block(struct walk *w, const char *p)
{
    const char *stop = w->stop;
#if defined(__SSE2__)
    const __m128i quote = _mm_set1_epi8('"'), bracket = _mm_set1_epi8('[');
    for (; stop - p >= 16; p += 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)p);
        unsigned mask = (unsigned)_mm_movemask_epi8(
            _mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, bracket)));
        while (mask) {
            const char *at = p + __builtin_ctz(mask);
            if (walk_mark(w, at)) {
                w->found = at;
                return 1;
            }
            mask &= mask - 1;
        }
    }
#endif
    for (; p < stop; p++)
        if ((*p == '"' || *p == '[') && walk_mark(w, p)) {
            w->found = p;
            return 1;
        }
    return 0;
}

/* plain_block(buf): sse.py's _plain_block_py in one call (it says what is answered).
 *
 * A relayed read was searched eight times by the Python that found its whole events, checked
 * that each is one data line, looked for [DONE] and usage objects and counted the content: a
 * pass of bytes.startswith, in, rfind, count (three), replace and find each, ~18 µs a read
 * of 14 mock events on the 2-core VM. Here: memchr for CR, memrchr for the last blank line,
 * memchr line to line, and one walk (walk_block) for [DONE], usage keys and the content.
 *
 * A read with [DONE] or a usage object in it (a stream's last, which may hold many events when
 * the client reads slowly) is answered too, up to the event that holds it ("special": True):
 * only the events from there on are read one by one (they went one by one from the first
 * event of the read on, ~5% of the worker's samples under bench.stream_overhead --profile). */
/* plain_block's answer for buf[:size]: 0 for None, else 1 and the four values. */
static int scan_plain(const char *buf, Py_ssize_t size, Py_ssize_t *end_out, Py_ssize_t *n_out,
                      Py_ssize_t *content_out, int *special_out)
{
    if (size < 5 || memcmp(buf, "data:", 5) != 0 || memchr(buf, '\r', (size_t)size) != NULL)
        return 0;
    /* The end of the last blank line ("\n\n"): where the buffered events' bytes end. */
    Py_ssize_t end = 0;
    Py_ssize_t left = size;
    while (left > 1) {
        const char *nl = memrchr(buf, '\n', (size_t)left);
        if (nl == NULL)
            break;
        if (nl > buf && nl[-1] == '\n') {
            end = nl - buf + 1;
            break;
        }
        left = nl - buf;
    }
    *end_out = *n_out = *content_out = 0;
    *special_out = 0;
    if (end == 0)
        return 1;
    /* Every event one data line and its blank line: "data:" X "\n\n", X without a line feed. */
    const char *stop = buf + end;
    const char *p = buf;
    Py_ssize_t n = 0;
    while (p < stop) {
        if (stop - p < 7 || memcmp(p, "data:", 5) != 0)
            return 0;
        const char *nl = memchr(p + 5, '\n', (size_t)(stop - p - 5));
        if (nl == NULL || nl + 1 >= stop || nl[1] != '\n')
            return 0;
        n++;
        p = nl + 2;
    }
    /* Up to the first event that must be read event by event ([DONE], a "usage": key not
     * null), if any; and the content, in the same pass. */
    struct walk w = {stop, buf, 0, 1, NULL};
    int special = walk_block(&w, buf);
    if (special) {
        /* The event it is in begins after the line feed before it (a data line has none). */
        const char *start = memrchr(buf, '\n', (size_t)(w.found - buf));
        stop = start == NULL ? buf : start + 1;
        end = stop - buf;
        n = 0;
        for (const char *p = buf; p < stop; n++)
            p = (const char *)memchr(p, '\n', (size_t)(stop - p)) + 2;
        struct walk head = {stop, buf, 0, 1, NULL};
        walk_block(&head, buf); /* the content of the events before it */
        w = head;
    }
    *end_out = end;
    *n_out = n;
    *content_out = w.counting ? w.total : (Py_ssize_t)-1;
    *special_out = special;
    return 1;
}

static PyObject *plain_block(PyObject *self, PyObject *arg)
{
    (void)self;
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "plain_block() takes bytes");
        return NULL;
    }
    Py_ssize_t end, n, content;
    int special;
    if (!scan_plain(PyBytes_AS_STRING(arg), PyBytes_GET_SIZE(arg), &end, &n, &content,
                    &special))
        Py_RETURN_NONE;
    return Py_BuildValue("(nnnO)", end, n, content, special ? Py_True : Py_False);
}

/* plain_events(buf, max_bytes): sse.py's _plain_events_py - plain_block's answer when it
 * leaves nothing to do but count: buf is whole events, every one a plain data line, none
 * [DONE] or with a usage object, the content counted, and no more than max_bytes. The
 * usual read of a stream; SSERelay.feed takes it in one call and two additions (the checks
 * of plain_block's answer in Python were 64 bytecodes a read). */
static PyObject *plain_events(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 2 || !PyBytes_Check(args[0]) || !PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "plain_events() takes bytes and an int");
        return NULL;
    }
    Py_ssize_t max_bytes = PyLong_AsSsize_t(args[1]);
    if (max_bytes == -1 && PyErr_Occurred())
        return NULL;
    const char *buf = PyBytes_AS_STRING(args[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    Py_ssize_t end, n, content;
    int special;
    if (size < 7 || buf[size - 1] != '\n' || buf[size - 2] != '\n' || size > max_bytes
        || !scan_plain(buf, size, &end, &n, &content, &special) || end != size || special
        || content < 0)
        Py_RETURN_NONE;
    return Py_BuildValue("(nn)", n, content);
}

/* PlainChunks: the chunked framing of a streamed body taken off in C (workers/upstream.py's
 * _PlainChunksPy is the reference, and says what is answered; tests/workers/test_dechunk.py
 * holds the two equal, and both to httptools).
 *
 * Each read of a stream went through httptools, whose llhttp calls back into Python once per
 * chunk (on_body: a bytes object and a call for each event the backend wrote, ~5 a read under
 * bench.stream_overhead), and the pieces were joined again. This copies the chunks' data of a
 * read into one bytes object in one call. It takes only the plain framing (a size in hex
 * without leading zeros, CRLF, the data, CRLF); at the first size line that is anything else
 * (the last chunk "0", extensions, whitespace, not hex) it stops at that line's start and hands
 * the bytes from there to the HTTP parser, which then sees exactly what it would have seen
 * after the chunks before (the state after a chunk's CRLF is the state at the body's start).
 * Data not followed by CRLF is broken framing, as llhttp (strict) says too. */
#define CHUNK_LINE_MAX 18 /* 15 hex digits, CR, LF and one more: a longer line is handed over */

/* Where the framing of a body stands between reads. */
struct chunk_state {
    Py_ssize_t remaining; /* data bytes of the current chunk still to come */
    int crlf;             /* bytes of the CRLF after the chunk's data still to come */
    Py_ssize_t carried;   /* bytes of a size line begun at the end of the last read */
    char line[CHUNK_LINE_MAX];
};

typedef struct {
    PyObject_HEAD
    struct chunk_state st;
    PyObject *head;       /* after a stop: the data before it */
    PyObject *rest;       /* after a stop: the bytes from the size line on (None: broken) */
    PyObject *usage;      /* open_relay: what relay() counts its events into */
    Py_ssize_t max_event_bytes;
    int frame;            /* open_relay: relay() frames its answer as one chunk */
} PlainChunks;

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* At a size line at p: 1 and *size when it is plain, 0 when the read ends inside what may
 * still become a plain one, -1 when it is not plain. *line_end is where its data begins. */
static int size_line(const char *p, const char *end, Py_ssize_t *size, const char **line_end)
{
    Py_ssize_t n = 0;
    const char *q = p;
    if (q < end && *q == '0')
        return -1;
    for (; q < end; q++) {
        int v = hex_value(*q);
        if (v < 0)
            break;
        if (q - p >= 15)
            return -1;
        n = n * 16 + v;
    }
    if (q == end)
        return 0;
    if (q == p || *q != '\r')
        return -1;
    if (q + 1 == end)
        return 0;
    if (q[1] != '\n')
        return -1;
    *size = n;
    *line_end = q + 2;
    return 1;
}

static void PlainChunks_dealloc(PlainChunks *self)
{
    Py_XDECREF(self->head);
    Py_XDECREF(self->rest);
    Py_XDECREF(self->usage);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Stop: keep the data so far (out, its first ``got`` bytes) and what the parser gets. */
static PyObject *stop(PlainChunks *self, PyObject *out, Py_ssize_t got, const char *from,
                      const char *end)
{
    if (_PyBytes_Resize(&out, got) < 0)
        return NULL;
    Py_XSETREF(self->head, out);
    if (from == NULL) {
        Py_INCREF(Py_None);
        Py_XSETREF(self->rest, Py_None);
    } else {
        PyObject *rest = PyBytes_FromStringAndSize(from, end - from);
        if (rest == NULL)
            return NULL;
        Py_XSETREF(self->rest, rest);
    }
    Py_RETURN_NONE;
}

/* The framing taken off [p, end), from where ``st`` stands: the chunks' data is copied to o
 * (only counted when o is NULL), *got bytes of it. 1, or 0 at a stop, *stop_at then where the
 * HTTP parser takes over (NULL: the framing is broken). ``st`` is advanced either way. */
static int dechunk(struct chunk_state *st, const char *p, const char *end, char *o,
                   Py_ssize_t *got, const char **stop_at)
{
    Py_ssize_t n = 0;
    for (;;) {
        if (st->remaining) {
            Py_ssize_t take = end - p < st->remaining ? end - p : st->remaining;
            if (o != NULL)
                memcpy(o + n, p, (size_t)take);
            n += take;
            p += take;
            st->remaining -= take;
            if (st->remaining)
                break;
            st->crlf = 2;
        }
        if (st->crlf == 2) {
            if (p == end)
                break;
            if (*p++ != '\r')
                goto broken;
            st->crlf = 1;
        }
        if (st->crlf == 1) {
            if (p == end)
                break;
            if (*p++ != '\n')
                goto broken;
            st->crlf = 0;
        }
        if (p == end)
            break;
        Py_ssize_t size = 0;
        const char *data = NULL;
        int plain = size_line(p, end, &size, &data);
        if (plain < 0 || (plain == 0 && end - p >= CHUNK_LINE_MAX)) {
            /* (the second cannot happen: size_line stops at 16 digits) */
            *got = n;
            *stop_at = p;
            return 0;
        }
        if (plain == 0) {
            memcpy(st->line, p, (size_t)(end - p));
            st->carried = end - p;
            break;
        }
        st->remaining = size;
        p = data;
    }
    *got = n;
    return 1;
broken:
    *got = n;
    *stop_at = NULL;
    return 0;
}

static PyObject *chunks_feed(PlainChunks *self, const char *p, const char *end)
{
    Py_ssize_t cap = end - p; /* the data cannot be longer than the read */
    PyObject *out = PyBytes_FromStringAndSize(NULL, cap);
    if (out == NULL)
        return NULL;
    Py_ssize_t got;
    const char *stop_at;
    if (!dechunk(&self->st, p, end, PyBytes_AS_STRING(out), &got, &stop_at))
        return stop(self, out, got, stop_at, end);
    if (got != cap && _PyBytes_Resize(&out, got) < 0)
        return NULL;
    return out;
}

static PyObject *PlainChunks_feed(PlainChunks *self, PyObject *arg)
{
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "feed() takes bytes");
        return NULL;
    }
    if (self->head != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "feed() after the chunks stopped");
        return NULL;
    }
    const char *p = PyBytes_AS_STRING(arg);
    Py_ssize_t n = PyBytes_GET_SIZE(arg);
    if (!self->st.carried)
        return chunks_feed(self, p, p + n);
    /* A size line began in the last read: read on from its start (rare: a line is short). */
    PyObject *joined = PyBytes_FromStringAndSize(NULL, self->st.carried + n);
    if (joined == NULL)
        return NULL;
    memcpy(PyBytes_AS_STRING(joined), self->st.line, (size_t)self->st.carried);
    memcpy(PyBytes_AS_STRING(joined) + self->st.carried, p, (size_t)n);
    self->st.carried = 0;
    const char *j = PyBytes_AS_STRING(joined);
    PyObject *got = chunks_feed(self, j, j + PyBytes_GET_SIZE(joined));
    Py_DECREF(joined);
    return got;
}

/* relay(read): a relayed stream's usual read - whole plain events (plain_events' case), in
 * plain chunked framing - taken from the socket's bytes to what the client is sent, in one
 * call: the framing taken off, the events checked and counted into the StreamUsage given to
 * open_relay, and, for a chunked client, framed again as one chunk. Any other read is
 * answered None with nothing changed (nor counted), for feed() and the relay's Python path.
 *
 * Each read went from the connection's data_received through BodyStream.take, the relay's
 * push, SSERelay.feed, the sink's write_now and its chunk formatting: 8 Python calls and ~250
 * bytecodes a read. workers/upstream.py's _PlainChunksPy.relay is the reference. */
static PyObject *str_events, *str_content_bytes;

static int add_count(PyObject *obj, PyObject *name, Py_ssize_t n)
{
    PyObject *was = PyObject_GetAttr(obj, name);
    if (was == NULL)
        return -1;
    PyObject *add = PyLong_FromSsize_t(n);
    PyObject *sum = add == NULL ? NULL : PyNumber_Add(was, add);
    Py_DECREF(was);
    Py_XDECREF(add);
    if (sum == NULL)
        return -1;
    int r = PyObject_SetAttr(obj, name, sum);
    Py_DECREF(sum);
    return r;
}

static PyObject *PlainChunks_open_relay(PlainChunks *self, PyObject *const *args,
                                        Py_ssize_t nargs)
{
    if (nargs != 3 || !PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError,
                        "open_relay() takes a StreamUsage, an int and a bool");
        return NULL;
    }
    Py_ssize_t max_bytes = PyLong_AsSsize_t(args[1]);
    if (max_bytes == -1 && PyErr_Occurred())
        return NULL;
    int frame = PyObject_IsTrue(args[2]);
    if (frame < 0)
        return NULL;
    Py_INCREF(args[0]);
    Py_XSETREF(self->usage, args[0]);
    self->max_event_bytes = max_bytes;
    self->frame = frame;
    Py_RETURN_NONE;
}

static PyObject *PlainChunks_relay(PlainChunks *self, PyObject *arg)
{
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "relay() takes bytes");
        return NULL;
    }
    if (self->head != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "relay() after the chunks stopped");
        return NULL;
    }
    if (self->usage == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "relay() before open_relay()");
        return NULL;
    }
    if (self->st.carried) /* a size line begun in the last read: feed() joins it (rare) */
        Py_RETURN_NONE;
    const char *p = PyBytes_AS_STRING(arg), *end = p + PyBytes_GET_SIZE(arg);
    /* Counted first (the size lines only), so that the answer is made at its size at once. */
    struct chunk_state st = self->st;
    Py_ssize_t n;
    const char *stop_at;
    if (!dechunk(&st, p, end, NULL, &n, &stop_at) || n < 7 || n > self->max_event_bytes)
        Py_RETURN_NONE;
    char size[24];
    int size_len = self->frame ? snprintf(size, sizeof size, "%zx\r\n", n) : 0;
    PyObject *out = PyBytes_FromStringAndSize(NULL, size_len + n + (self->frame ? 2 : 0));
    if (out == NULL)
        return NULL;
    char *o = PyBytes_AS_STRING(out);
    memcpy(o, size, (size_t)size_len);
    char *body = o + size_len;
    st = self->st;
    dechunk(&st, p, end, body, &n, &stop_at);
    Py_ssize_t events_end, events, content;
    int special;
    if (body[n - 1] != '\n' || body[n - 2] != '\n'
        || !scan_plain(body, n, &events_end, &events, &content, &special) || events_end != n
        || special || content < 0) {
        Py_DECREF(out);
        Py_RETURN_NONE;
    }
    if (add_count(self->usage, str_events, events) < 0
        || add_count(self->usage, str_content_bytes, content) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    if (self->frame) {
        body[n] = '\r';
        body[n + 1] = '\n';
    }
    self->st = st;
    return out;
}

static PyMethodDef PlainChunks_methods[] = {
    {"feed", (PyCFunction)PlainChunks_feed, METH_O,
     "feed(read) -> the chunks' data in it, or None once stopped (see head and rest)"},
    {"open_relay", (PyCFunction)(void (*)(void))PlainChunks_open_relay, METH_FASTCALL,
     "open_relay(usage, max_event_bytes, frame): what relay() counts into and answers"},
    {"relay", (PyCFunction)PlainChunks_relay, METH_O,
     "relay(read) -> the read's events as the client is sent them (one chunk when frame), "
     "counted, when the read is whole plain events under max_event_bytes; else None, with "
     "nothing changed"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef PlainChunks_members[] = {
    {"head", T_OBJECT, offsetof(PlainChunks, head), READONLY,
     "after a stop: the data before it (None before)"},
    {"rest", T_OBJECT, offsetof(PlainChunks, rest), READONLY,
     "after a stop: the bytes from the size line on, for the HTTP parser (None: broken)"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject PlainChunksType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "apirouter._ssecore.PlainChunks",
    .tp_basicsize = sizeof(PlainChunks),
    .tp_dealloc = (destructor)PlainChunks_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The plain chunked framing of a body from its start, taken off read by read.",
    .tp_methods = PlainChunks_methods,
    .tp_members = PlainChunks_members,
    .tp_new = PyType_GenericNew,
};

static PyMethodDef methods[] = {
    {"plain_events", (PyCFunction)(void (*)(void))plain_events, METH_FASTCALL,
     "plain_events(buf, max_bytes) -> (events, content bytes) when buf is whole plain events "
     "and nothing else, none [DONE] or with a usage object, no string with an escape, at most "
     "max_bytes; else None"},
    {"raw_content_bytes", raw_content_bytes, METH_O,
     "raw_content_bytes(data) -> the bytes of the content strings data holds, or -1 when one "
     "holds an escape"},
    {"plain_block", plain_block, METH_O,
     "plain_block(buf) -> None, or (end, events, content bytes or -1, special) of the whole "
     "events buf begins with when each is one data line, up to the first that is [DONE] or "
     "has a usage object (special: whether there is one)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "apirouter._ssecore",
    "A streamed read's C work: its content bytes counted (see apirouter/sse.py), its chunked "
    "framing taken off (see workers/upstream.py).",
    -1,
    methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ssecore(void)
{
    if (PyType_Ready(&PlainChunksType) < 0)
        return NULL;
    str_events = PyUnicode_InternFromString("events");
    str_content_bytes = PyUnicode_InternFromString("content_bytes");
    if (str_events == NULL || str_content_bytes == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&PlainChunksType);
    if (PyModule_AddObject(m, "PlainChunks", (PyObject *)&PlainChunksType) < 0) {
        Py_DECREF(&PlainChunksType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
