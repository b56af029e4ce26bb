/* A backend's whole buffered response, taken in one call: workers/upstream.py's fast path.
 *
 * Most backends (the mock among them) answer a buffered request with a Content-Length
 * response that arrives in one read. httptools takes it in five callbacks into Python
 * (on_header per header, on_headers_complete, on_body, on_message_complete) behind the feed:
 * ~160 bytecodes and six Python calls a request. whole_response(read) takes it here when the
 * read is exactly one response in the plainest form, and answers None for anything else, which
 * the connection then feeds to httptools as before: so the form taken must be one httptools
 * takes the same way, and it is deliberately narrow:
 *
 *   "HTTP/1.1 " status " " reason CRLF, status 200-599 but 204 and 304 (no 1xx, no bodiless
 *   status), the reason bytes 0x20-0x7E;
 *   header lines: name ":" spaces value CRLF, the name token characters, the value empty or
 *   bytes 0x20-0x7E beginning and ending with one other than a space;
 *   no Transfer-Encoding, Connection, Proxy-Connection or Upgrade header (they decide framing
 *   or keep-alive: httptools' business); Content-Length exactly once, decimal digits without a
 *   leading zero (bar "0"), at most 15 of them, at most max_body;
 *   then CRLF, and the body: exactly Content-Length bytes, the read's end (nothing after it).
 *
 * Such a response is complete and keeps the connection alive (HTTP/1.1, no Connection header).
 * The answer: cls(status, [(name, value), ...] as sent, body, content type), the content type
 * the value of the first Content-Type header (any case); or None. The instance of ``cls``
 * (workers.upstream.UpstreamResponse, a dataclass of slots) is made with its four attributes set
 * here, not by calling its __init__ (a Python frame of four stores). workers.upstream's
 * _whole_response_py is the Python reference; tests/workers/test_whole_response.py holds the
 * two equal, and the connection's answers equal to httptools' alone, on any read split anywhere.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* RFC 9110 token characters. */
static unsigned char tchar[256];

static void init_tchar(void)
{
    const char *extra = "!#$%&'*+-.^_`|~";
    for (int c = '0'; c <= '9'; c++)
        tchar[c] = 1;
    for (int c = 'a'; c <= 'z'; c++)
        tchar[c] = 1;
    for (int c = 'A'; c <= 'Z'; c++)
        tchar[c] = 1;
    for (const char *p = extra; *p; p++)
        tchar[(unsigned char)*p] = 1;
}

/* Whether the n bytes at p are ``lower`` (lowercase letters and '-') in any case. */
static int name_is(const char *p, Py_ssize_t n, const char *lower, Py_ssize_t m)
{
    if (n != m)
        return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c >= 'A' && c <= 'Z')
            c = (unsigned char)(c + 32);
        if (c != (unsigned char)lower[i])
            return 0;
    }
    return 1;
}

#define NAME_IS(p, n, lit) name_is((p), (n), lit, (Py_ssize_t)sizeof(lit) - 1)

static PyObject *str_status, *str_headers, *str_body, *str_content_type;

static PyObject *whole_response(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 3 || !PyBytes_Check(args[0]) || !PyType_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "whole_response(read: bytes, max_body: int, cls: type)");
        return NULL;
    }
    long long max_body = PyLong_AsLongLong(args[1]);
    if (max_body == -1 && PyErr_Occurred())
        return NULL;
    const char *data = PyBytes_AS_STRING(args[0]);
    const char *end = data + PyBytes_GET_SIZE(args[0]);
    const char *p = data;

    /* The status line. */
    if (end - p < 13 || memcmp(p, "HTTP/1.1 ", 9) != 0)
        Py_RETURN_NONE;
    p += 9;
    if (p[0] < '2' || p[0] > '5' || p[1] < '0' || p[1] > '9' || p[2] < '0' || p[2] > '9'
        || p[3] != ' ')
        Py_RETURN_NONE;
    int status = (p[0] - '0') * 100 + (p[1] - '0') * 10 + (p[2] - '0');
    if (status == 204 || status == 304)
        Py_RETURN_NONE;
    p += 4;
    while (p < end && (unsigned char)*p >= 0x20 && (unsigned char)*p <= 0x7E)
        p++;
    if (end - p < 2 || p[0] != '\r' || p[1] != '\n')
        Py_RETURN_NONE;
    p += 2;

    /* The header lines: checked first, the list made only for a response taken. */
    const char *lines = p;
    long long length = -1;
    const char *ctype = NULL;
    Py_ssize_t ctype_n = 0, count = 0;
    for (;;) {
        if (p >= end)
            Py_RETURN_NONE;
        if (*p == '\r')
            break;
        const char *name = p;
        while (p < end && tchar[(unsigned char)*p])
            p++;
        if (p == name || p >= end || *p != ':')
            Py_RETURN_NONE;
        Py_ssize_t name_n = p - name;
        p++;
        while (p < end && *p == ' ')
            p++;
        const char *value = p;
        while (p < end && (unsigned char)*p >= 0x20 && (unsigned char)*p <= 0x7E)
            p++;
        Py_ssize_t value_n = p - value;
        if (end - p < 2 || p[0] != '\r' || p[1] != '\n')
            Py_RETURN_NONE;
        if (value_n && value[value_n - 1] == ' ')
            Py_RETURN_NONE;
        p += 2;
        count++;
        switch (name_n) {
        case 7:
            if (NAME_IS(name, name_n, "upgrade"))
                Py_RETURN_NONE;
            break;
        case 10:
            if (NAME_IS(name, name_n, "connection"))
                Py_RETURN_NONE;
            break;
        case 12:
            if (ctype == NULL && NAME_IS(name, name_n, "content-type")) {
                ctype = value;
                ctype_n = value_n;
            }
            break;
        case 14:
            if (NAME_IS(name, name_n, "content-length")) {
                if (length >= 0 || value_n == 0 || value_n > 15
                    || (value[0] == '0' && value_n > 1))
                    Py_RETURN_NONE;
                long long n = 0;
                for (Py_ssize_t i = 0; i < value_n; i++) {
                    if (value[i] < '0' || value[i] > '9')
                        Py_RETURN_NONE;
                    n = n * 10 + (value[i] - '0');
                }
                length = n;
            }
            break;
        case 16:
            if (NAME_IS(name, name_n, "proxy-connection"))
                Py_RETURN_NONE;
            break;
        case 17:
            if (NAME_IS(name, name_n, "transfer-encoding"))
                Py_RETURN_NONE;
            break;
        default:
            break;
        }
    }
    if (end - p < 2 || p[1] != '\n' || length < 0 || length > max_body
        || end - (p + 2) != length)
        Py_RETURN_NONE;
    const char *body = p + 2;

    PyObject *headers = PyList_New(count);
    if (headers == NULL)
        return NULL;
    p = lines;
    for (Py_ssize_t i = 0; i < count; i++) {
        const char *name = p;
        while (*p != ':')
            p++;
        Py_ssize_t name_n = p - name;
        p++;
        while (*p == ' ')
            p++;
        const char *value = p;
        while (*p != '\r')
            p++;
        PyObject *pair = Py_BuildValue("(y#y#)", name, name_n, value, (Py_ssize_t)(p - value));
        if (pair == NULL) {
            Py_DECREF(headers);
            return NULL;
        }
        PyList_SET_ITEM(headers, i, pair);
        p += 2;
    }
    PyObject *ct;
    if (ctype == NULL) {
        ct = Py_None;
        Py_INCREF(ct);
    } else {
        ct = PyBytes_FromStringAndSize(ctype, ctype_n);
    }
    PyObject *b = PyBytes_FromStringAndSize(body, (Py_ssize_t)length);
    if (ct == NULL || b == NULL) {
        Py_XDECREF(ct);
        Py_XDECREF(b);
        Py_DECREF(headers);
        return NULL;
    }
    PyTypeObject *cls = (PyTypeObject *)args[2];
    PyObject *out = cls->tp_alloc(cls, 0);
    PyObject *st = PyLong_FromLong(status);
    if (out == NULL || st == NULL || PyObject_SetAttr(out, str_status, st) < 0
        || PyObject_SetAttr(out, str_headers, headers) < 0
        || PyObject_SetAttr(out, str_body, b) < 0
        || PyObject_SetAttr(out, str_content_type, ct) < 0)
        Py_CLEAR(out);
    Py_XDECREF(st);
    Py_DECREF(ct);
    Py_DECREF(b);
    Py_DECREF(headers);
    return out;
}

static PyMethodDef methods[] = {
    {"whole_response", (PyCFunction)(void (*)(void))whole_response, METH_FASTCALL,
     "whole_response(read, max_body, cls) -> cls(status, headers, body, content type) when "
     "read is exactly one plain Content-Length response of HTTP/1.1 kept alive, its body at "
     "most max_body bytes; else None (see the module's comment)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "apirouter._wholecore",
    "A backend's whole buffered response taken in one call (see workers/upstream.py).",
    -1,
    methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__wholecore(void)
{
    init_tchar();
    str_status = PyUnicode_InternFromString("status");
    str_headers = PyUnicode_InternFromString("headers");
    str_body = PyUnicode_InternFromString("body");
    str_content_type = PyUnicode_InternFromString("content_type");
    if (!str_status || !str_headers || !str_body || !str_content_type)
        return NULL;
    return PyModule_Create(&module);
}
