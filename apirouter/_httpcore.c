/* The lean server's per-request HTTP work in C (workers/fast_server.py): a whole request in
 * the common form parsed into what the server queues, and a response head built, each in one
 * call.
 *
 * take_request(data, start, view, routes, max_body, signing, tracing) reads the request that
 * begins at data[start]. Its Python reference is workers.fast_server._take_request (gunicorn_h1c's
 * picohttpparser and a few header lookups). It answers:
 *   - a tuple (stop, endpoint, view, request id, body, keep-alive, HTTP/1.1, Authorization,
 *     X-API-Key, None, traceparent): exactly what the reference returns for that request;
 *   - False: the reference returns None too (the request is not taken: httptools parses it);
 *   - None: the request is not in the strict form read here (a bare LF, a byte outside
 *     printable ASCII, a repeated Host/Content-Type/Content-Length/Connection, an incomplete
 *     head, a signed request while some key signs, ...): the reference decides.
 * The form read here is a subset of what picohttpparser accepts (one SP between the request
 * line's parts, CRLF line ends, tchar names, values of printable ASCII, SP and HTAB), so for it
 * both find the same method, target, version and header values (leading and trailing SP/HTAB
 * of a value are not part of it), and the checks after the parse are the reference's.
 * tests/workers/test_httpcore.py holds the two equal on generated requests.
 *
 * response_head(status_lines, status, date, content_type, framing, headers, keep_alive, body)
 * is workers.fast_server._head_py: the same bytes, or the same exception type.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_HEADER_BYTES (32 * 1024) /* workers.fast_server.MAX_HEADER_BYTES */
#define MAX_HEADERS 100              /* workers.fast_server.MAX_HEADERS */
/* gunicorn_h1c refuses a request line or a field over 8190 bytes: longer ones are left to the
 * reference, with a margin (the two may count their line ends differently). */
#define PICO_LIMIT 8000

static PyObject *GET, *POST; /* the method bytes, shared by every request's route key */

static unsigned char tchar[256];

static void init_tables(void)
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

/* Whether the n bytes at p are, lowercased, the lowercase name. */
static int name_is(const char *p, Py_ssize_t n, const char *name)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        char c = p[i];
        if (c >= 'A' && c <= 'Z')
            c += 32;
        if (c != name[i])
            return 0;
    }
    return 1;
}

enum { H_OTHER, H_HOST, H_CTYPE, H_LENGTH, H_CONN, H_RID, H_AUTH, H_KEY, H_TRACE, H_SIG,
       H_REFUSE };

/* Which header the name is (by its length first: one compare for most names). */
static int header_kind(const char *p, Py_ssize_t n)
{
    switch (n) {
    case 4:
        return name_is(p, 4, "host") ? H_HOST : H_OTHER;
    case 6:
        return name_is(p, 6, "expect") ? H_REFUSE : H_OTHER;
    case 7:
        return name_is(p, 7, "upgrade") ? H_REFUSE : H_OTHER;
    case 9:
        return name_is(p, 9, "x-api-key") ? H_KEY : H_OTHER;
    case 10:
        return name_is(p, 10, "connection") ? H_CONN : H_OTHER;
    case 11:
        return name_is(p, 11, "traceparent") ? H_TRACE
             : name_is(p, 11, "x-signature") ? H_SIG : H_OTHER;
    case 12:
        return name_is(p, 12, "content-type") ? H_CTYPE
             : name_is(p, 12, "x-request-id") ? H_RID : H_OTHER;
    case 13:
        return name_is(p, 13, "authorization") ? H_AUTH : H_OTHER;
    case 14:
        return name_is(p, 14, "content-length") ? H_LENGTH : H_OTHER;
    case 16:
        return name_is(p, 16, "proxy-connection") ? H_REFUSE : H_OTHER;
    case 17:
        return name_is(p, 17, "transfer-encoding") ? H_REFUSE
             : name_is(p, 17, "x-signature-nonce") ? H_SIG : H_OTHER;
    case 21:
        return name_is(p, 21, "x-signature-timestamp") ? H_SIG : H_OTHER;
    default:
        return H_OTHER;
    }
}

typedef struct {
    const char *p;
    Py_ssize_t n;
} span;

#define DEFER() do { Py_RETURN_NONE; } while (0)
#define REFUSE() do { Py_RETURN_FALSE; } while (0)

static PyObject *value_or_none(span s)
{
    if (s.p == NULL)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize(s.p, s.n);
}

static PyObject *take_request(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "take_request takes 7 arguments");
        return NULL;
    }
    PyObject *data = args[0], *view = args[2], *routes = args[3];
    if (!PyBytes_CheckExact(data) || !PyDict_CheckExact(routes))
        DEFER();
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    /* Any int the config takes (10**19 passes it): past the C range it is clamped, which
     * compares the same with a Content-Length of at most 15 digits. */
    int overflow;
    long long max_body_ll = PyLong_AsLongLongAndOverflow(args[4], &overflow);
    if (max_body_ll == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t max_body = overflow > 0 ? PY_SSIZE_T_MAX : overflow < 0 ? -1
                        : (Py_ssize_t)max_body_ll;
    int signing = PyObject_IsTrue(args[5]);
    int tracing = PyObject_IsTrue(args[6]);
    if (signing < 0 || tracing < 0)
        return NULL;
    const char *buf = PyBytes_AS_STRING(data);
    Py_ssize_t end = PyBytes_GET_SIZE(data);
    if (start < 0 || start > end) {
        PyErr_SetString(PyExc_ValueError, "start is outside the data");
        return NULL;
    }
    const char *p = buf + start, *e = buf + end;

    /* The request line: METHOD SP /target SP HTTP/1.x CRLF */
    const char *method = p;
    while (p < e && *p >= 'A' && *p <= 'Z')
        p++;
    Py_ssize_t method_len = p - method;
    if (p >= e || *p != ' ' || method_len < 3 || method_len > 20)
        DEFER();
    const char *target = ++p;
    if (p >= e || *p != '/')
        DEFER();
    const char *query = NULL;
    while (p < e && (unsigned char)*p > 0x20 && (unsigned char)*p < 0x7f) {
        if (*p == '?' && query == NULL)
            query = p;
        p++;
    }
    Py_ssize_t target_len = p - target;
    if (e - p < 10 || memcmp(p, " HTTP/1.", 8) != 0 || (p[8] != '0' && p[8] != '1') ||
        p[9] != '\r' || e - p < 11 || p[10] != '\n')
        DEFER();
    int http11 = p[8] == '1';
    p += 11;
    if (p - (buf + start) > PICO_LIMIT)
        DEFER();

    /* The headers: name ":" OWS value OWS CRLF, until an empty line */
    span rid = {NULL, 0}, auth = {NULL, 0}, key = {NULL, 0}, trace = {NULL, 0};
    int count = 0, host = 0, ctype = 0, has_length = 0, conn = -1, sig = 0, refuse = 0;
    Py_ssize_t length = -1;
    for (;;) {
        if (p >= e)
            DEFER();
        if (*p == '\r') {
            if (e - p < 2 || p[1] != '\n')
                DEFER();
            p += 2;
            break;
        }
        const char *name = p;
        while (p < e && tchar[(unsigned char)*p])
            p++;
        Py_ssize_t name_len = p - name;
        if (p >= e || *p != ':' || name_len == 0)
            DEFER();
        p++;
        while (p < e && (*p == ' ' || *p == '\t'))
            p++;
        const char *value = p;
        while (p < e && (((unsigned char)*p >= 0x20 && (unsigned char)*p < 0x7f) || *p == '\t'))
            p++;
        if (e - p < 2 || p[0] != '\r' || p[1] != '\n')
            DEFER();
        const char *value_end = p;
        while (value_end > value && (value_end[-1] == ' ' || value_end[-1] == '\t'))
            value_end--;
        Py_ssize_t value_len = value_end - value;
        p += 2;
        if (name_len + 2 + value_len + 2 > PICO_LIMIT || ++count > MAX_HEADERS)
            DEFER();
        switch (header_kind(name, name_len)) {
        case H_HOST:
            if (host++)
                DEFER();
            break;
        case H_CTYPE:
            if (ctype++)
                DEFER();
            break;
        case H_LENGTH:
            if (has_length++ || value_len == 0 || value_len > 15)
                DEFER();
            length = 0;
            for (Py_ssize_t i = 0; i < value_len; i++) {
                if (value[i] < '0' || value[i] > '9')
                    DEFER();
                length = length * 10 + (value[i] - '0');
            }
            break;
        case H_CONN:
            if (conn != -1)
                DEFER();
            if (value_len == 5 && name_is(value, 5, "close"))
                conn = 0;
            else if (value_len == 10 && name_is(value, 10, "keep-alive"))
                conn = 1;
            else
                refuse = 1; /* (not DEFER: the reference refuses any other value) */
            break;
        case H_RID:
            if (rid.p == NULL)
                rid = (span){value, value_len};
            break;
        case H_AUTH:
            if (auth.p == NULL)
                auth = (span){value, value_len};
            break;
        case H_KEY:
            if (key.p == NULL)
                key = (span){value, value_len};
            break;
        case H_TRACE:
            if (trace.p == NULL)
                trace = (span){value, value_len};
            break;
        case H_SIG:
            sig = 1;
            break;
        case H_REFUSE:
            refuse = 1;
            break;
        default:
            break;
        }
    }
    Py_ssize_t head = p - (buf + start);
    if (signing && sig)
        DEFER(); /* the reference builds the request's Signed */
    if (refuse || head > MAX_HEADER_BYTES)
        REFUSE();

    /* The route: (method, path without the query) */
    PyObject *method_bytes;
    if (method_len == 4 && memcmp(method, "POST", 4) == 0)
        method_bytes = Py_NewRef(POST);
    else if (method_len == 3 && memcmp(method, "GET", 3) == 0)
        method_bytes = Py_NewRef(GET);
    else if ((method_bytes = PyBytes_FromStringAndSize(method, method_len)) == NULL)
        return NULL;
    PyObject *path = PyBytes_FromStringAndSize(target, (query ? query : target + target_len)
                                                       - target);
    if (path == NULL) {
        Py_DECREF(method_bytes);
        return NULL;
    }
    PyObject *route = PyTuple_Pack(2, method_bytes, path);
    Py_DECREF(method_bytes);
    Py_DECREF(path);
    if (route == NULL)
        return NULL;
    PyObject *endpoint = PyDict_GetItemWithError(routes, route); /* borrowed */
    Py_DECREF(route);
    if (endpoint == NULL) {
        if (PyErr_Occurred())
            return NULL;
        REFUSE();
    }
    Py_INCREF(endpoint); /* (before an allocation could run a collection) */

    /* The body: all of it in this read, within the limit, and only a POST's */
    Py_ssize_t stop = start + head;
    PyObject *body;
    if (length > 0) {
        if (method_bytes != POST || length > max_body || length > end - stop) {
            Py_DECREF(endpoint);
            REFUSE();
        }
        body = PyBytes_FromStringAndSize(buf + stop, length);
        stop += length;
    } else {
        body = PyBytes_FromStringAndSize(NULL, 0);
    }
    if (body == NULL) {
        Py_DECREF(endpoint);
        return NULL;
    }
    PyObject *out = PyTuple_New(11);
    if (out == NULL) {
        Py_DECREF(body);
        Py_DECREF(endpoint);
        return NULL;
    }
    PyObject *stop_obj = PyLong_FromSsize_t(stop);
    PyObject *rid_obj = value_or_none(rid);
    PyObject *auth_obj = value_or_none(auth);
    PyObject *key_obj = value_or_none(key);
    PyObject *trace_obj = tracing ? value_or_none(trace) : Py_NewRef(Py_None);
    int keep_alive = conn == -1 ? http11 : conn;
    PyTuple_SET_ITEM(out, 0, stop_obj);
    PyTuple_SET_ITEM(out, 1, endpoint);
    PyTuple_SET_ITEM(out, 2, Py_NewRef(view));
    PyTuple_SET_ITEM(out, 3, rid_obj);
    PyTuple_SET_ITEM(out, 4, body);
    PyTuple_SET_ITEM(out, 5, PyBool_FromLong(keep_alive));
    PyTuple_SET_ITEM(out, 6, PyBool_FromLong(http11));
    PyTuple_SET_ITEM(out, 7, auth_obj);
    PyTuple_SET_ITEM(out, 8, key_obj);
    PyTuple_SET_ITEM(out, 9, Py_NewRef(Py_None));
    PyTuple_SET_ITEM(out, 10, trace_obj);
    if (!stop_obj || !rid_obj || !auth_obj || !key_obj || !trace_obj) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/* -- the response head ------------------------------------------------------------------ */

/* A str's latin-1 bytes: its own when it is stored one byte a character (any str whose
 * characters all fit latin-1), else encoded (which raises UnicodeEncodeError, as the
 * reference's encode does); ``keep`` holds the encoded bytes until the head is built. */
static int latin1(PyObject *s, PyObject *keep, const char **p, Py_ssize_t *n)
{
    if (!PyUnicode_Check(s)) {
        PyErr_Format(PyExc_TypeError, "expected str instance, %.80s found",
                     Py_TYPE(s)->tp_name);
        return -1;
    }
    if (PyUnicode_KIND(s) == PyUnicode_1BYTE_KIND) {
        *p = (const char *)PyUnicode_1BYTE_DATA(s);
        *n = PyUnicode_GET_LENGTH(s);
        return 0;
    }
    PyObject *b = PyUnicode_AsLatin1String(s);
    if (b == NULL)
        return -1;
    int r = PyList_Append(keep, b);
    Py_DECREF(b);
    if (r < 0)
        return -1;
    *p = PyBytes_AS_STRING(b);
    *n = PyBytes_GET_SIZE(b);
    return 0;
}

typedef struct {
    PyObject *s; /* a str to encode into p, n (borrowed: held by headers or keep) */
    const char *p;
    Py_ssize_t n;
} piece;

#define HEAD_PIECES 64 /* pieces kept on the stack; more go to the heap */

static PyObject *response_head(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "response_head takes 8 arguments");
        return NULL;
    }
    PyObject *status_lines = args[0], *status = args[1], *date = args[2];
    PyObject *content_type = args[3], *headers = args[5], *body = args[7];
    long framing = PyLong_AsLong(args[4]);
    if (framing == -1 && PyErr_Occurred())
        return NULL;
    int keep_alive = PyObject_IsTrue(args[6]);
    if (keep_alive < 0)
        return NULL;
    if (!PyDict_Check(status_lines)) {
        PyErr_SetString(PyExc_TypeError, "status_lines must be a dict");
        return NULL;
    }
    PyObject *keep = PyList_New(0); /* what the pieces point into, held until the copy */
    if (keep == NULL)
        return NULL;
    PyObject *result = NULL, *fast = NULL, *ct = NULL;
    piece stack[HEAD_PIECES], *pieces = stack;
    Py_buffer date_view = {0}, body_view = {0};
    int date_held = 0, body_held = 0;

    /* The status line: _STATUS.get(status) or f"HTTP/1.1 {status} Unknown\r\n".encode() */
    const char *line;
    Py_ssize_t line_len;
    PyObject *known = PyDict_GetItemWithError(status_lines, status);
    if (known == NULL && PyErr_Occurred())
        goto done;
    if (known != NULL && PyBytes_Check(known) && PyBytes_GET_SIZE(known) > 0) {
        /* held until the copy: a join or a format below runs Python code, which could drop
         * the dict's reference */
        if (PyList_Append(keep, known) < 0)
            goto done;
        line = PyBytes_AS_STRING(known);
        line_len = PyBytes_GET_SIZE(known);
    } else {
        PyObject *text = PyUnicode_FromFormat("HTTP/1.1 %S Unknown\r\n", status);
        if (text == NULL)
            goto done;
        PyObject *b = PyUnicode_AsUTF8String(text);
        Py_DECREF(text);
        if (b == NULL || PyList_Append(keep, b) < 0) {
            Py_XDECREF(b);
            goto done;
        }
        Py_DECREF(b);
        line = PyBytes_AS_STRING(b);
        line_len = PyBytes_GET_SIZE(b);
    }

    /* The header lines: "\r\n".join(map(": ".join, headers)); encoded after (as the
     * reference: a TypeError of the join before a UnicodeEncodeError of the encode) */
    /* (a tuple: a snapshot the pieces can borrow from, whatever a join or a format runs) */
    fast = PySequence_Tuple(headers);
    if (fast == NULL)
        goto done;
    Py_ssize_t nh = PySequence_Fast_GET_SIZE(fast);
    if (nh * 4 > HEAD_PIECES) { /* a field: up to 3 pieces, and the line end after it */
        pieces = PyMem_Malloc(sizeof(piece) * (size_t)(nh * 4));
        if (pieces == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    Py_ssize_t np = 0;
    for (Py_ssize_t i = 0; i < nh; i++) {
        PyObject *h = PySequence_Fast_GET_ITEM(fast, i);
        if (PyTuple_CheckExact(h) && PyTuple_GET_SIZE(h) == 2 &&
                PyUnicode_CheckExact(PyTuple_GET_ITEM(h, 0)) &&
                PyUnicode_CheckExact(PyTuple_GET_ITEM(h, 1))) {
            pieces[np++] = (piece){PyTuple_GET_ITEM(h, 0), NULL, 0};
            pieces[np++] = (piece){NULL, ": ", 2};
            pieces[np++] = (piece){PyTuple_GET_ITEM(h, 1), NULL, 0};
        } else { /* any other iterable of str: ": ".join(h), as the reference */
            PyObject *sep = PyUnicode_FromString(": ");
            if (sep == NULL)
                goto done;
            PyObject *joined = PyUnicode_Join(sep, h);
            Py_DECREF(sep);
            if (joined == NULL)
                goto done;
            int r = PyList_Append(keep, joined);
            Py_DECREF(joined);
            if (r < 0)
                goto done;
            pieces[np++] = (piece){joined, NULL, 0};
        }
        if (i + 1 < nh)
            pieces[np++] = (piece){NULL, "\r\n", 2};
    }
    ct = PyObject_Format(content_type, NULL);
    if (ct == NULL)
        goto done;
    Py_ssize_t fields = 0;
    for (Py_ssize_t i = 0; i < np; i++) {
        if (pieces[i].s != NULL && latin1(pieces[i].s, keep, &pieces[i].p, &pieces[i].n) < 0)
            goto done;
        fields += pieces[i].n;
    }
    const char *ct_p;
    Py_ssize_t ct_n;
    if (latin1(ct, keep, &ct_p, &ct_n) < 0)
        goto done;
    if (PyObject_GetBuffer(date, &date_view, PyBUF_SIMPLE) < 0)
        goto done;
    date_held = 1;
    if (PyObject_GetBuffer(body, &body_view, PyBUF_SIMPLE) < 0)
        goto done;
    body_held = 1;

    char framing_buf[64];
    Py_ssize_t framing_n;
    if (framing == 0)
        framing_n = snprintf(framing_buf, sizeof framing_buf, "Content-Length: %zd\r\n",
                             body_view.len);
    else if (framing == 1)
        framing_n = (Py_ssize_t)strlen(strcpy(framing_buf, "Transfer-Encoding: chunked\r\n"));
    else
        framing_n = 0;

    static const char server[] = "Server: apirouter\r\nDate: ";
    static const char ctype[] = "\r\nContent-Type: ";
    static const char close[] = "Connection: close\r\n";
    Py_ssize_t total = line_len + (Py_ssize_t)sizeof server - 1 + date_view.len +
                       (Py_ssize_t)sizeof ctype - 1 + ct_n + 2 + framing_n + fields +
                       (fields ? 2 : 0) + (keep_alive ? 0 : (Py_ssize_t)sizeof close - 1) + 2 +
                       body_view.len;
    result = PyBytes_FromStringAndSize(NULL, total);
    if (result == NULL)
        goto done;
    char *o = PyBytes_AS_STRING(result);
#define PUT(src, len) do { memcpy(o, (src), (size_t)(len)); o += (len); } while (0)
    PUT(line, line_len);
    PUT(server, sizeof server - 1);
    PUT(date_view.buf, date_view.len);
    PUT(ctype, sizeof ctype - 1);
    PUT(ct_p, ct_n);
    PUT("\r\n", 2);
    PUT(framing_buf, framing_n);
    for (Py_ssize_t i = 0; i < np; i++)
        PUT(pieces[i].p, pieces[i].n);
    if (fields)
        PUT("\r\n", 2);
    if (!keep_alive)
        PUT(close, sizeof close - 1);
    PUT("\r\n", 2);
    PUT(body_view.buf, body_view.len);
#undef PUT
done:
    if (pieces != stack)
        PyMem_Free(pieces);
    if (date_held)
        PyBuffer_Release(&date_view);
    if (body_held)
        PyBuffer_Release(&body_view);
    Py_XDECREF(ct);
    Py_XDECREF(fast);
    Py_DECREF(keep);
    return result;
}

static PyMethodDef methods[] = {
    {"take_request", (PyCFunction)(void (*)(void))take_request, METH_FASTCALL,
     "take_request(data, start, view, routes, max_body, signing, tracing) -> the request at "
     "data[start] as workers.fast_server._take_request answers it, False when that answers "
     "None, or None when the request is not in the strict form read here (ask it)"},
    {"response_head", (PyCFunction)(void (*)(void))response_head, METH_FASTCALL,
     "response_head(status_lines, status, date, content_type, framing, headers, keep_alive, "
     "body) -> workers.fast_server._head_py's bytes"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "apirouter._httpcore",
    "The lean server's request parse and response head in C (see workers/fast_server.py).",
    -1,
    methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__httpcore(void)
{
    init_tables();
    GET = PyBytes_FromString("GET");
    POST = PyBytes_FromString("POST");
    if (GET == NULL || POST == NULL)
        return NULL;
    return PyModule_Create(&module);
}
