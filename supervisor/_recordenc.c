/* The output records of a block of agent lines, in one pass over the lines.
 *
 * supervisor.logwriter's fast path, in C: the same bytes as the Python fast path and as
 * supervisor.records.encode (the schema's plain encoder), which the tests check for any input.
 * Why C: every line an agent prints passes here, and in Python the block takes some forty C
 * passes (one memchr per byte JSON escapes, the replace that makes the records, the join, the
 * %-format that numbers them); here each line is looked at once, 16 bytes at a time, and
 * copied once.  Optional: where it cannot be built, the Python fast path does the same work.
 *
 * encode(block, head, first_seq, tail) -> (records, count)
 *   block      the lines, joined by newlines (no newline after the last), valid UTF-8
 *   head       every field of a record up to and including '"seq":'
 *   first_seq  the first record's seq; the next ones count on
 *   tail       written after the last record's seq (',"off":N')
 * Each record: head, seq, [tail,] ',"line":"', the line JSON-escaped as json.dumps does with
 * ensure_ascii=False (\" \\ \b \f \r \t, other control characters \u00xx), '"}\n'.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

static const char LINE_KEY[] = ",\"line\":\"";
#define LINE_KEY_LEN (sizeof(LINE_KEY) - 1)
static const char RECORD_END[] = "\"}\n";
#define RECORD_END_LEN (sizeof(RECORD_END) - 1)

/* How many bytes each input byte takes in a JSON string: 1, 2 (\" \\ \b \f \r \t) or 6. */
static unsigned char width[256];

static void init_width(void) {
    for (int c = 0; c < 256; c++)
        width[c] = c < 0x20 ? 6 : 1;
    width['"'] = width['\\'] = width['\b'] = width['\f'] = width['\r'] = width['\t'] = 2;
}

/* The first byte at or after p that is a newline or needs escaping (end if none). */
static const unsigned char *next_special(const unsigned char *p, const unsigned char *end) {
#if defined(__SSE2__)
    const __m128i quote = _mm_set1_epi8('"'), backslash = _mm_set1_epi8('\\');
    const __m128i control = _mm_set1_epi8(0x1F);
    while (end - p >= 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)p);
        /* v <= 0x1F (unsigned): max(v, 0x1F) == 0x1F */
        __m128i hit = _mm_or_si128(
            _mm_cmpeq_epi8(_mm_max_epu8(v, control), control),
            _mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, backslash)));
        int mask = _mm_movemask_epi8(hit);
        if (mask)
            return p + __builtin_ctz((unsigned)mask);
        p += 16;
    }
#endif
    while (p < end && width[*p] == 1)
        p++;
    return p;
}

/* The seq as decimal digits, counted on in place (no number formatted per record). */
typedef struct {
    char digits[24];
    int start; /* digits[start:24] is the number */
} counter;

static void counter_set(counter *c, unsigned long long value) {
    c->start = 24;
    do {
        c->digits[--c->start] = (char)('0' + value % 10);
        value /= 10;
    } while (value);
}

static void counter_next(counter *c) {
    int i = 23;
    while (i >= c->start && c->digits[i] == '9')
        c->digits[i--] = '0';
    if (i >= c->start)
        c->digits[i]++;
    else
        c->digits[--c->start] = '1';
}

static PyObject *encode(PyObject *self, PyObject *args) {
    Py_buffer block, head, tail;
    unsigned long long first;
    if (!PyArg_ParseTuple(args, "y*y*Ky*", &block, &head, &first, &tail))
        return NULL;
    const unsigned char *in = block.buf, *end = in + block.len;
    PyObject *result = NULL;

    /* Pass 1: the lines and the bytes escaping adds, to size the records exactly. */
    Py_ssize_t lines = 1, extra = 0;
    for (const unsigned char *p = next_special(in, end); p < end; p = next_special(p + 1, end)) {
        if (*p == '\n')
            lines++;
        else
            extra += width[*p] - 1;
    }
    counter seq;
    counter_set(&seq, first + (unsigned long long)lines - 1);
    Py_ssize_t last_digits = 24 - seq.start; /* the widest seq: the last one */
    counter_set(&seq, first);
    Py_ssize_t fixed = head.len + LINE_KEY_LEN + RECORD_END_LEN;
    Py_ssize_t size = block.len - (lines - 1) + extra + lines * (fixed + last_digits) + tail.len;
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (out == NULL)
        goto done;
    char *o = PyBytes_AS_STRING(out);

    /* Pass 2: the records. */
    const unsigned char *line = in;
    for (Py_ssize_t n = 0; n < lines; n++) {
        memcpy(o, head.buf, head.len);
        o += head.len;
        memcpy(o, seq.digits + seq.start, 24 - seq.start);
        o += 24 - seq.start;
        if (n == lines - 1) {
            memcpy(o, tail.buf, tail.len);
            o += tail.len;
        }
        memcpy(o, LINE_KEY, LINE_KEY_LEN);
        o += LINE_KEY_LEN;
        for (;;) {
            const unsigned char *p = next_special(line, end);
            memcpy(o, line, p - line);
            o += p - line;
            if (p == end || *p == '\n') {
                line = p + 1;
                break;
            }
            unsigned char c = *p;
            *o++ = '\\';
            switch (c) {
            case '"': *o++ = '"'; break;
            case '\\': *o++ = '\\'; break;
            case '\b': *o++ = 'b'; break;
            case '\f': *o++ = 'f'; break;
            case '\r': *o++ = 'r'; break;
            case '\t': *o++ = 't'; break;
            default:
                *o++ = 'u';
                *o++ = '0';
                *o++ = '0';
                *o++ = "0123456789abcdef"[c >> 4];
                *o++ = "0123456789abcdef"[c & 15];
            }
            line = p + 1;
        }
        memcpy(o, RECORD_END, RECORD_END_LEN);
        o += RECORD_END_LEN;
        counter_next(&seq);
    }
    /* Seqs narrower than the last one leave room unused: give it back. */
    if (_PyBytes_Resize(&out, o - PyBytes_AS_STRING(out)) < 0)
        goto done;
    result = Py_BuildValue("(Nn)", out, lines);

done:
    PyBuffer_Release(&block);
    PyBuffer_Release(&head);
    PyBuffer_Release(&tail);
    return result;
}

static PyMethodDef methods[] = {
    {"encode", encode, METH_VARARGS,
     "encode(block, head, first_seq, tail) -> (records, count): the output records of a block "
     "of lines (see supervisor/_recordenc.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "supervisor._recordenc",
    .m_doc = "The output records of a block of agent lines, in C (supervisor.logwriter's fast path).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__recordenc(void) {
    init_width();
    return PyModule_Create(&module);
}
