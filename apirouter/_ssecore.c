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
static PyObject *plain_block(PyObject *self, PyObject *arg)
{
    (void)self;
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "plain_block() takes bytes");
        return NULL;
    }
    const char *buf = PyBytes_AS_STRING(arg);
    Py_ssize_t size = PyBytes_GET_SIZE(arg);
    if (size < 5 || memcmp(buf, "data:", 5) != 0 || memchr(buf, '\r', (size_t)size) != NULL)
        Py_RETURN_NONE;
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
    if (end == 0)
        return Py_BuildValue("(nnnO)", (Py_ssize_t)0, (Py_ssize_t)0, (Py_ssize_t)0, Py_False);
    /* Every event one data line and its blank line: "data:" X "\n\n", X without a line feed. */
    const char *stop = buf + end;
    const char *p = buf;
    Py_ssize_t n = 0;
    while (p < stop) {
        if (stop - p < 7 || memcmp(p, "data:", 5) != 0)
            Py_RETURN_NONE;
        const char *nl = memchr(p + 5, '\n', (size_t)(stop - p - 5));
        if (nl == NULL || nl + 1 >= stop || nl[1] != '\n')
            Py_RETURN_NONE;
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
    return Py_BuildValue("(nnnO)", end, n, w.counting ? w.total : (Py_ssize_t)-1,
                         special ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
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
    "The content bytes of a streamed read, counted in C (see apirouter/sse.py).",
    -1,
    methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ssecore(void)
{
    return PyModule_Create(&module);
}
