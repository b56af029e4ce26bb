/* The token counts of a buffered response, read in C: apirouter/validation.py's usage_counts
 * for the common case.
 *
 * Every buffered response the router forwards is searched for its usage block, from the end
 * (the block comes last, and a long completion costs ~1 µs a KB to parse in full). In Python
 * the search, the match of the usual block, the check that no later count follows and the two
 * conversions ran ~60 bytecodes and six C calls a request; this is one call.
 *
 * usage_pair(body) is exactly validation._usage_pair_py(body): (prompt, completion) when the
 * last "prompt_tokens": starts the usual block, matched by
 *   "prompt_tokens": *([0-9]{1,10}) *, *"completion_tokens": *([0-9]{1,10})[,} \n\r]
 * with no "completion_tokens": after the match and both counts at most MAX_REPORTED_TOKENS;
 * else None, and usage_counts goes the Python way. tests/apirouter/test_usagecore.py holds the
 * two equal on generated input.
 */

#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE /* memmem, memrchr */
#include <Python.h>
#include <string.h>

#define MAX_REPORTED_TOKENS 1000000000ULL /* apirouter.limits.MAX_REPORTED_TOKENS */

static const char PROMPT_KEY[] = "\"prompt_tokens\":";
static const char COMPLETION_KEY[] = "\"completion_tokens\":";
#define PROMPT_KEY_LEN ((Py_ssize_t)(sizeof(PROMPT_KEY) - 1))
#define COMPLETION_KEY_LEN ((Py_ssize_t)(sizeof(COMPLETION_KEY) - 1))

/* The offset of the last occurrence of key[0:kn] in s[0:n] (bytes.rfind), or -1. */
static Py_ssize_t rfind(const char *s, Py_ssize_t n, const char *key, Py_ssize_t kn)
{
    Py_ssize_t end = n - kn + 1; /* the candidate starts: [0, end) */
    while (end > 0) {
        const char *q = memrchr(s, key[0], (size_t)end);
        if (q == NULL)
            return -1;
        if (memcmp(q, key, (size_t)kn) == 0)
            return q - s;
        end = q - s;
    }
    return -1;
}

/* ' '* at *p (the pattern's " *": spaces only). */
static const char *spaces(const char *p, const char *end)
{
    while (p < end && *p == ' ')
        p++;
    return p;
}

/* [0-9]{1,10} at *p, followed by no digit (the pattern then needs a byte no digit is: a run
 * of eleven fails whatever the engine backtracks), its value in *value; NULL if none. */
static const char *digits(const char *p, const char *end, unsigned long long *value)
{
    const char *start = p;
    unsigned long long v = 0;
    while (p < end && *p >= '0' && *p <= '9') {
        if (p - start == 10)
            return NULL;
        v = v * 10 + (unsigned long long)(*p - '0');
        p++;
    }
    if (p == start)
        return NULL;
    *value = v;
    return p;
}

static PyObject *usage_pair(PyObject *self, PyObject *arg)
{
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const char *s = (const char *)view.buf, *end = s + view.len;
    unsigned long long prompt = 0, completion = 0;
    Py_ssize_t at = rfind(s, view.len, PROMPT_KEY, PROMPT_KEY_LEN);
    const char *p = at < 0 ? NULL : s + at + PROMPT_KEY_LEN;
    if (p != NULL) {
        p = digits(spaces(p, end), end, &prompt);
    }
    if (p != NULL) {
        p = spaces(p, end);
        p = (p < end && *p == ',') ? spaces(p + 1, end) : NULL;
    }
    if (p != NULL) {
        p = (end - p >= COMPLETION_KEY_LEN &&
             memcmp(p, COMPLETION_KEY, (size_t)COMPLETION_KEY_LEN) == 0)
                ? digits(spaces(p + COMPLETION_KEY_LEN, end), end, &completion) : NULL;
    }
    if (p != NULL) {
        p = (p < end && (*p == ',' || *p == '}' || *p == ' ' || *p == '\n' || *p == '\r'))
                ? p + 1 : NULL;
    }
    /* the last count of each is the one: none may follow the match */
    if (p != NULL && memmem(p, (size_t)(end - p), COMPLETION_KEY, (size_t)COMPLETION_KEY_LEN))
        p = NULL;
    PyBuffer_Release(&view);
    if (p == NULL || prompt > MAX_REPORTED_TOKENS || completion > MAX_REPORTED_TOKENS)
        Py_RETURN_NONE;
    PyObject *a = PyLong_FromUnsignedLongLong(prompt);
    PyObject *b = a == NULL ? NULL : PyLong_FromUnsignedLongLong(completion);
    if (b == NULL) {
        Py_XDECREF(a);
        return NULL;
    }
    PyObject *pair = PyTuple_Pack(2, a, b);
    Py_DECREF(a);
    Py_DECREF(b);
    return pair;
}

static PyMethodDef methods[] = {
    {"usage_pair", usage_pair, METH_O,
     "usage_pair(body) -> (prompt_tokens, completion_tokens) when the last \"prompt_tokens\": "
     "starts the usual usage block (see apirouter/validation.py: _usage_pair_py), else None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "apirouter._usagecore",
    "A buffered response's token counts read in C (see apirouter/validation.py: usage_counts).",
    -1,
    methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__usagecore(void)
{
    return PyModule_Create(&module);
}
