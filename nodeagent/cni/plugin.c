/* nodeagent-cni: the chained CNI plugin that hands each new pod to the node agent.
 *
 * It runs on the host, after the primary plugin, and replaces Istio's istio-init container: ADD
 * returns only once the agent has answered that the pod's traffic capture is in place (or that the
 * pod is not in the mesh), so no app starts outside the mesh. If the agent cannot be reached or
 * fails, ADD fails (fail closed) and the runtime retries. DEL informs the agent and never fails.
 *
 * Why C: the runtime execs this program for every pod and waits for it. The primary plugin
 * (bridge, Go) starts in about 2 ms; the earlier Python bundle took about 40 ms only to start,
 * most of a pod's network set-up (issue #14). The agent does all the work; this program parses
 * the CNI input, forwards the pod over the agent's UNIX socket (the protocol of
 * nodeagent/cni/wire.py: one JSON object on one line each way) and prints the CNI result. It
 * uses libc only and is linked statically (scripts/build-cni.sh): nothing from the host is needed.
 *
 * CNI spec 1.1 (github.com/containernetworking/cni SPEC.md): the command and the container come
 * in CNI_* variables, the network configuration (with prevResult) on stdin; stdout carries only
 * the result or an error object {cniVersion, code, msg, details}, exit status 1 on error. Logs go
 * to a file (one JSON object per line), never to stdout. Input is bounded (size, nesting) and
 * every malformed input gets a CNI error naming what was wrong.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <fcntl.h>
#include <math.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_SOCKET "/run/nodeagent/cni.sock"
#define DEFAULT_LOG_FILE "/var/log/nodeagent-cni.log"
#define DEFAULT_TIMEOUT 30.0 /* seconds an ADD waits for the agent; kubelet retries after a failure */
#define DEL_TIMEOUT 5.0
#define MAX_INPUT (8 << 20)   /* stdin: a GC lists every attachment of the node */
#define MAX_ANSWER (1 << 20)  /* wire.MAX_MESSAGE, each way */
#define MAX_DEPTH 64          /* JSON nesting */
#define MAX_MSG 1024          /* bytes of an error's msg and details: values are quoted, not copied */
/* What the runtime hands over, bounded (CNI spec, Kubernetes): longer is refused, field named. */
#define MAX_CNI_ARGS 16384    /* kubelet's CNI_ARGS are a few hundred bytes */
#define MAX_ID 256            /* CNI_CONTAINERID, K8S_POD_UID, network name: 64 hex digits, UUIDs */
#define MAX_IFNAME 15         /* IFNAMSIZ - 1 */
#define MAX_NAMESPACE 63      /* a DNS-1123 label */
#define MAX_POD_NAME 253      /* a DNS-1123 subdomain */
#define MAX_PATH 4095         /* PATH_MAX - 1 */
static const char *const SUPPORTED[] = {"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"};
#define N_SUPPORTED (sizeof SUPPORTED / sizeof *SUPPORTED)

/* CNI spec error codes. */
enum {
    INCOMPATIBLE_VERSION = 1, CONTAINER_UNKNOWN = 3, INVALID_ENV = 4, IO_FAILURE = 5,
    DECODE_FAILURE = 6, INVALID_CONFIG = 7, TRY_AGAIN_LATER = 11,
    PLUGIN_NOT_AVAILABLE = 50, /* STATUS (CNI 1.1) */
    CAPTURE_FAILED = 100,      /* plugin-specific: the agent could not capture the pod */
};

/* ---- growable text buffer ------------------------------------------------------------------ */

struct buf { char *p; size_t len, cap; };

static void *grow(void *p, size_t n) {
    p = realloc(p, n ? n : 1);
    if (!p) {
        fputs("{\"cniVersion\":\"1.0.0\",\"code\":5,\"msg\":\"nodeagent-cni: out of memory\","
              "\"details\":\"\"}", stdout);
        exit(1);
    }
    return p;
}

/* The N bytes at S as a NUL-terminated string. */
static char *copy(const char *s, size_t n) {
    char *d = grow(NULL, n + 1);
    memcpy(d, s, n);
    d[n] = 0;
    return d;
}

static void put(struct buf *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        b->cap = (b->len + n + 1) * 2;
        b->p = grow(b->p, b->cap);
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

static void puts_(struct buf *b, const char *s) { put(b, s, strlen(s)); }

static void printf_(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void printf_(struct buf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    char *tmp = grow(NULL, (size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(tmp, (size_t)n + 1, fmt, ap);
    va_end(ap);
    put(b, tmp, (size_t)n);
    free(tmp);
}

/* The length of the well-formed UTF-8 character at S (N > 0 bytes left; no overlong forms, no
 * surrogates), or 0 when there is none. */
static size_t utf8_char(const unsigned char *s, size_t n) {
    unsigned c = s[0], need, cp, min;
    if (c < 0x80) return 1;
    if ((c & 0xE0) == 0xC0) { need = 1; cp = c & 0x1F; min = 0x80; }
    else if ((c & 0xF0) == 0xE0) { need = 2; cp = c & 0x0F; min = 0x800; }
    else if ((c & 0xF8) == 0xF0) { need = 3; cp = c & 0x07; min = 0x10000; }
    else return 0;
    if (n <= need) return 0;
    for (unsigned k = 1; k <= need; k++) {
        if ((s[k] & 0xC0) != 0x80) return 0;
        cp = cp << 6 | (s[k] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return need + 1;
}

/* A JSON string literal of S (UTF-8 passes through; quotes, backslashes, controls escaped). A
 * byte that is not UTF-8 (an environment variable's, quoted in an error) becomes U+FFFD: what
 * this program prints or sends is always JSON text. */
static void json_str(struct buf *b, const char *s) {
    size_t n = strlen(s);
    put(b, "\"", 1);
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        size_t k = utf8_char((const unsigned char *)s + i, n - i);
        if (!k) { puts_(b, "\\ufffd"); i++; continue; }
        if (c == '"' || c == '\\') { put(b, "\\", 1); put(b, s + i, 1); }
        else if (c == '\n') puts_(b, "\\n");
        else if (c == '\t') puts_(b, "\\t");
        else if (c < 0x20) printf_(b, "\\u%04x", c);
        else put(b, s + i, k);
        i += k;
    }
    put(b, "\"", 1);
}

/* ---- JSON values and a strict RFC 8259 parser ----------------------------------------------- */

enum jtype { J_NULL, J_FALSE, J_TRUE, J_NUM, J_STR, J_ARR, J_OBJ };
struct jval {
    enum jtype type;
    const char *raw; size_t rawlen; /* the value's own text: passed through, quoted in errors */
    char *str;                      /* J_STR: decoded, NUL-terminated (\u0000 is refused) */
    double num;                     /* J_NUM */
    size_t n, cap;                  /* J_ARR, J_OBJ: members, and room for them */
    struct jval **items;
    char **keys;                    /* J_OBJ */
};

struct parser { const char *s; size_t len, pos; const char *err; };

static struct jval *parse_value(struct parser *p, int depth);

static void skip_ws(struct parser *p) {
    while (p->pos < p->len && p->s[p->pos] && strchr(" \t\n\r", p->s[p->pos])) p->pos++;
}

static int fail_parse(struct parser *p, const char *why) {
    if (!p->err) p->err = why;
    return -1;
}

static int hex4(struct parser *p, unsigned *out) {
    if (p->len - p->pos < 4) return fail_parse(p, "truncated \\u escape");
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p->s[p->pos++];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return fail_parse(p, "invalid \\u escape");
    }
    *out = v;
    return 0;
}

static void put_utf8(struct buf *b, unsigned cp) {
    char u[4];
    size_t n;
    if (cp < 0x80) { u[0] = (char)cp; n = 1; }
    else if (cp < 0x800) { u[0] = (char)(0xC0 | cp >> 6); u[1] = (char)(0x80 | (cp & 0x3F)); n = 2; }
    else if (cp < 0x10000) {
        u[0] = (char)(0xE0 | cp >> 12); u[1] = (char)(0x80 | (cp >> 6 & 0x3F));
        u[2] = (char)(0x80 | (cp & 0x3F)); n = 3;
    } else {
        u[0] = (char)(0xF0 | cp >> 18); u[1] = (char)(0x80 | (cp >> 12 & 0x3F));
        u[2] = (char)(0x80 | (cp >> 6 & 0x3F)); u[3] = (char)(0x80 | (cp & 0x3F)); n = 4;
    }
    put(b, u, n);
}

/* A string literal at p->pos (the opening quote), decoded into *out. */
static int parse_string(struct parser *p, char **out) {
    struct buf b = {0};
    put(&b, "", 0);
    p->pos++;
    for (;;) {
        if (p->pos >= p->len) return fail_parse(p, "unterminated string");
        unsigned char c = (unsigned char)p->s[p->pos++];
        if (c == '"') break;
        if (c < 0x20) return fail_parse(p, "control character in string");
        if (c != '\\') { put(&b, (const char *)&c, 1); continue; }
        if (p->pos >= p->len) return fail_parse(p, "unterminated string");
        char e = p->s[p->pos++];
        const char *plain = strchr("\"\\/bfnrt", e);
        if (plain && e) { put(&b, &"\"\\/\b\f\n\r\t"[plain - "\"\\/bfnrt"], 1); continue; }
        if (e != 'u') return fail_parse(p, "invalid escape in string");
        unsigned cp, lo;
        if (hex4(p, &cp)) return -1;
        if (cp >= 0xD800 && cp < 0xDC00) { /* a high surrogate needs its low half */
            if (p->len - p->pos < 2 || p->s[p->pos] != '\\' || p->s[p->pos + 1] != 'u')
                return fail_parse(p, "unpaired surrogate in string");
            p->pos += 2;
            if (hex4(p, &lo)) return -1;
            if (lo < 0xDC00 || lo > 0xDFFF) return fail_parse(p, "unpaired surrogate in string");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            return fail_parse(p, "unpaired surrogate in string");
        }
        if (cp == 0) return fail_parse(p, "\\u0000 in string");
        put_utf8(&b, cp);
    }
    *out = b.p;
    return 0;
}

static int digits(struct parser *p) {
    size_t start = p->pos;
    while (p->pos < p->len && p->s[p->pos] >= '0' && p->s[p->pos] <= '9') p->pos++;
    return p->pos > start ? 0 : fail_parse(p, "invalid number");
}

static int parse_number(struct parser *p, struct jval *v) {
    size_t start = p->pos;
    if (p->s[p->pos] == '-') p->pos++;
    if (p->pos < p->len && p->s[p->pos] == '0') p->pos++;
    else if (digits(p)) return -1;
    if (p->pos < p->len && p->s[p->pos] == '.') { p->pos++; if (digits(p)) return -1; }
    if (p->pos < p->len && (p->s[p->pos] == 'e' || p->s[p->pos] == 'E')) {
        p->pos++;
        if (p->pos < p->len && (p->s[p->pos] == '+' || p->s[p->pos] == '-')) p->pos++;
        if (digits(p)) return -1;
    }
    char *text = copy(p->s + start, p->pos - start);
    v->type = J_NUM;
    v->num = strtod(text, NULL);
    free(text);
    return 0;
}

static int literal(struct parser *p, const char *word, enum jtype type, struct jval *v) {
    size_t n = strlen(word);
    if (p->len - p->pos < n || memcmp(p->s + p->pos, word, n)) return fail_parse(p, "invalid value");
    p->pos += n;
    v->type = type;
    return 0;
}

/* The members of an array or object: items separated by commas up to CLOSE. */
static int parse_members(struct parser *p, struct jval *v, char close, int depth) {
    p->pos++;
    skip_ws(p);
    if (p->pos < p->len && p->s[p->pos] == close) { p->pos++; return 0; }
    for (;;) {
        char *key = NULL;
        if (close == '}') {
            skip_ws(p);
            if (p->pos >= p->len || p->s[p->pos] != '"')
                return fail_parse(p, "expected a property name in double quotes");
            if (parse_string(p, &key)) return -1;
            skip_ws(p);
            if (p->pos >= p->len || p->s[p->pos] != ':') return fail_parse(p, "expected ':'");
            p->pos++;
        }
        struct jval *item = parse_value(p, depth + 1);
        if (!item) return -1;
        if (v->n == v->cap) { /* doubling: a list of 100k addresses is not copied 100k times */
            v->cap = v->cap ? 2 * v->cap : 4;
            v->items = grow(v->items, v->cap * sizeof *v->items);
            v->keys = grow(v->keys, v->cap * sizeof *v->keys);
        }
        v->items[v->n] = item;
        v->keys[v->n++] = key;
        skip_ws(p);
        if (p->pos < p->len && p->s[p->pos] == ',') { p->pos++; continue; }
        if (p->pos < p->len && p->s[p->pos] == close) { p->pos++; return 0; }
        return fail_parse(p, close == '}' ? "expected ',' or '}'" : "expected ',' or ']'");
    }
}

static struct jval *parse_value(struct parser *p, int depth) {
    if (depth > MAX_DEPTH) { fail_parse(p, "nested too deeply"); return NULL; }
    skip_ws(p);
    if (p->pos >= p->len) { fail_parse(p, "expected a value"); return NULL; }
    struct jval *v = grow(NULL, sizeof *v);
    memset(v, 0, sizeof *v);
    v->raw = p->s + p->pos;
    size_t start = p->pos;
    int rc;
    switch (p->s[p->pos]) {
    case '{': v->type = J_OBJ; rc = parse_members(p, v, '}', depth); break;
    case '[': v->type = J_ARR; rc = parse_members(p, v, ']', depth); break;
    case '"': v->type = J_STR; rc = parse_string(p, &v->str); break;
    case 't': rc = literal(p, "true", J_TRUE, v); break;
    case 'f': rc = literal(p, "false", J_FALSE, v); break;
    case 'n': rc = literal(p, "null", J_NULL, v); break;
    default:
        rc = (p->s[p->pos] == '-' || (p->s[p->pos] >= '0' && p->s[p->pos] <= '9'))
                 ? parse_number(p, v) : fail_parse(p, "expected a value");
    }
    if (rc) return NULL;
    v->rawlen = p->pos - start;
    return v;
}

/* Only well-formed UTF-8 (no overlong forms, no surrogates) reaches the agent: the length of
 * the valid prefix of S (N when all of it is valid). */
static size_t valid_utf8(const unsigned char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        size_t k = utf8_char(s + i, n - i);
        if (!k) return i;
        i += k;
    }
    return n;
}

/* Parses TEXT as one JSON value; NULL with *why (and *at, a byte offset) when it is not. */
static struct jval *parse_json(const char *text, size_t len, const char **why, size_t *at) {
    struct parser p = {text, len, 0, NULL};
    size_t valid = valid_utf8((const unsigned char *)text, len);
    if (valid < len) { *why = "not UTF-8"; *at = valid; return NULL; }
    struct jval *v = parse_value(&p, 0);
    if (v) {
        skip_ws(&p);
        if (p.pos < len) { v = NULL; p.err = "extra data after the value"; }
    }
    *why = p.err;
    *at = p.pos;
    return v;
}

/* The member KEY of object O (the last one if repeated, as Python's json), or NULL. */
static struct jval *get(const struct jval *o, const char *key) {
    if (!o || o->type != J_OBJ) return NULL;
    for (size_t i = o->n; i-- > 0;)
        if (!strcmp(o->keys[i], key)) return o->items[i];
    return NULL;
}

static const char *get_str(const struct jval *o, const char *key) {
    const struct jval *v = get(o, key);
    return v && v->type == J_STR ? v->str : NULL;
}

/* Python's truthiness, which the agent's answers were written against. */
static int truthy(const struct jval *v) {
    if (!v) return 0;
    switch (v->type) {
    case J_NULL: case J_FALSE: return 0;
    case J_NUM: return v->num != 0;
    case J_STR: return v->str[0] != 0;
    case J_ARR: case J_OBJ: return v->n > 0;
    default: return 1;
    }
}

/* A value as error messages quote it ('text', None, true, raw JSON), at most 200 bytes. */
static void describe(struct buf *b, const struct jval *v) {
    if (!v || v->type == J_NULL) { puts_(b, "None"); return; }
    if (v->type == J_STR) {
        put(b, "'", 1);
        /* Cut only before a character's first byte: messages stay valid UTF-8. */
        for (const char *s = v->str; *s && (s - v->str < 200 || (*s & 0xC0) == 0x80); s++) {
            if (*s == '\'' || *s == '\\') put(b, "\\", 1);
            put(b, s, 1);
        }
        put(b, "'", 1);
        return;
    }
    put(b, v->raw, v->rawlen < 200 ? v->rawlen : 200);
    if (v->rawlen > 200) puts_(b, "...");
}

/* A value's text, as str() would give it in a message (strings unquoted). */
static const char *text_of(const struct jval *v, const char *absent) {
    if (!v) return absent;
    if (v->type == J_STR) return v->str;
    return copy(v->raw, v->rawlen);
}

/* ---- log file and CNI errors ---------------------------------------------------------------- */

static const char *log_path = DEFAULT_LOG_FILE;
static const char *cni_version = "1.0.0"; /* the configuration's, once it is known */
static const char *command = "";

/* Appends {"time", "level", "msg", FIELDS...} as one line (FIELDS: ",\"k\":v..." or ""). */
static void log_event(const char *level, const char *msg, const char *fields) {
    char stamp[64];
    time_t now = time(NULL);
    struct tm tm;
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S%z", localtime_r(&now, &tm));
    struct buf line = {0};
    puts_(&line, "{\"time\":");
    json_str(&line, stamp);
    puts_(&line, ",\"level\":");
    json_str(&line, level);
    puts_(&line, ",\"msg\":");
    json_str(&line, msg);
    puts_(&line, fields ? fields : "");
    puts_(&line, "}\n");
    int fd = open(log_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    /* One write per line: concurrent plugins never interleave within a line. */
    if (fd < 0 || write(fd, line.p, line.len) != (ssize_t)line.len) {
        if (write(2, line.p, line.len) < 0) { /* nowhere left to say it */ }
    }
    if (fd >= 0) close(fd);
    free(line.p);
}

/* S, or its first MAX_MSG bytes (cut before a character) and "...". */
static const char *bounded(const char *s) {
    size_t n = strlen(s);
    if (n <= MAX_MSG) return s;
    n = MAX_MSG;
    while (n > 0 && (s[n] & 0xC0) == 0x80) n--;
    struct buf b = {0};
    put(&b, s, n);
    puts_(&b, "...");
    return b.p;
}

/* Prints the CNI error object, logs it, and exits 1. */
static void __attribute__((noreturn)) cni_fail(int code, const char *msg, const char *details) {
    msg = bounded(msg); /* a path or an agent's reason of a megabyte is quoted, not copied */
    details = bounded(details);
    struct buf f = {0};
    puts_(&f, ",\"command\":");
    json_str(&f, command);
    printf_(&f, ",\"code\":%d,\"details\":", code);
    json_str(&f, details);
    log_event("error", msg, f.p);
    struct buf out = {0};
    puts_(&out, "{\"cniVersion\":");
    json_str(&out, cni_version);
    printf_(&out, ",\"code\":%d,\"msg\":", code);
    json_str(&out, msg);
    puts_(&out, ",\"details\":");
    json_str(&out, details);
    puts_(&out, "}");
    fwrite(out.p, 1, out.len, stdout);
    exit(1);
}

/* ---- configuration -------------------------------------------------------------------------- */

static const char *env_or(const char *name, const char *fallback) {
    const char *v = getenv(name);
    return v ? v : fallback;
}

/* The CNI variables NAMES (NULL-terminated) must be set and non-empty. */
static void require_env(const char *const *names) {
    struct buf missing = {0};
    for (; *names; names++)
        if (!*env_or(*names, "")) printf_(&missing, "%s%s", missing.len ? ", " : "", *names);
    if (missing.len) {
        struct buf msg = {0};
        printf_(&msg, "missing environment variables: %s", missing.p);
        cni_fail(INVALID_ENV, msg.p, "");
    }
}

/* The values NAMES (NULL-terminated) name pods by reach the agent exactly: UTF-8 only (JSON text
 * has no other bytes; replacing them would name another container). */
static void require_utf8_env(const char *const *names) {
    for (; *names; names++) {
        const char *v = env_or(*names, "");
        size_t n = strlen(v), valid = valid_utf8((const unsigned char *)v, n);
        if (valid < n) {
            struct buf msg = {0};
            printf_(&msg, "%s is not UTF-8 (byte %zu)", *names, valid);
            cni_fail(INVALID_ENV, msg.p, "");
        }
    }
}

/* One key of CNI_ARGS ("K=V;K=V", e.g. K8S_POD_NAMESPACE), stripped; "" when absent. */
static const char *cni_arg(const char *key) {
    const char *raw = env_or("CNI_ARGS", ""), *found = "";
    static const char ws[] = " \t\n\r\v\f";
    while (*raw) {
        size_t n = strcspn(raw, ";");
        const char *eq = memchr(raw, '=', n);
        if (eq && eq > raw) {
            const char *k = raw, *ke = eq, *v = eq + 1, *ve = raw + n;
            while (k < ke && strchr(ws, *k)) k++;
            while (ke > k && strchr(ws, ke[-1])) ke--;
            while (v < ve && strchr(ws, *v)) v++;
            while (ve > v && strchr(ws, ve[-1])) ve--;
            if ((size_t)(ke - k) == strlen(key) && !memcmp(k, key, (size_t)(ke - k)))
                found = copy(v, (size_t)(ve - v));
        }
        raw += n + (raw[n] == ';');
    }
    return found ? found : "";
}

/* A setting that must be a non-empty string when present. */
static const char *text_setting(const struct jval *conf, const char *key, const char *fallback) {
    const struct jval *v = get(conf, key);
    if (!v) return fallback;
    if (v->type != J_STR || !v->str[0]) {
        struct buf msg = {0};
        printf_(&msg, "field '%s' must be a non-empty string, got ", key);
        describe(&msg, v);
        cni_fail(INVALID_CONFIG, msg.p, "");
    }
    return v->str;
}

/* A setting that must be a positive (finite) number when present. */
static double seconds_setting(const struct jval *conf, const char *key, double fallback) {
    const struct jval *v = get(conf, key);
    if (!v) return fallback;
    if (v->type != J_NUM || !(v->num > 0) || !isfinite(v->num)) {
        struct buf msg = {0};
        printf_(&msg, "field '%s' must be a positive number, got ", key);
        describe(&msg, v);
        cni_fail(INVALID_CONFIG, msg.p, "");
    }
    return v->num;
}

/* ---- what the runtime hands over: sizes and the netns path ------------------------------- */

/* "FIELD is N bytes long, more than MAX" into MSG when VALUE is longer than MAX; 0 if it is not. */
static int too_long(struct buf *msg, const char *field, const char *value, size_t max) {
    size_t n = strlen(value);
    if (n <= max) return 0;
    printf_(msg, "%s is %zu bytes long, more than %zu", field, n, max);
    return 1;
}

/* The CNI error code of the first oversized input of this call, described in MSG; 0 if none. */
static int oversized_input(struct buf *msg, const struct jval *conf) {
    if (too_long(msg, "CNI_ARGS", env_or("CNI_ARGS", ""), MAX_CNI_ARGS) ||
        too_long(msg, "CNI_CONTAINERID", env_or("CNI_CONTAINERID", ""), MAX_ID) ||
        too_long(msg, "CNI_IFNAME", env_or("CNI_IFNAME", ""), MAX_IFNAME) ||
        too_long(msg, "CNI_NETNS", env_or("CNI_NETNS", ""), MAX_PATH) ||
        too_long(msg, "K8S_POD_NAMESPACE in CNI_ARGS", cni_arg("K8S_POD_NAMESPACE"), MAX_NAMESPACE) ||
        too_long(msg, "K8S_POD_NAME in CNI_ARGS", cni_arg("K8S_POD_NAME"), MAX_POD_NAME) ||
        too_long(msg, "K8S_POD_UID in CNI_ARGS", cni_arg("K8S_POD_UID"), MAX_ID))
        return INVALID_ENV;
    if (too_long(msg, "field 'name'", text_of(get(conf, "name"), ""), MAX_ID)) return INVALID_CONFIG;
    return 0;
}

/* The kernel's own link to a process's network namespace: /proc/<pid>[/task/<tid>]/ns/net. */
static int is_proc_netns(const char *p) {
    static const char digits[] = "0123456789";
    if (strncmp(p, "/proc/", 6)) return 0;
    p += 6;
    size_t n = strspn(p, digits);
    if (!n) return 0;
    p += n;
    if (!strncmp(p, "/task/", 6)) {
        n = strspn(p + 6, digits);
        if (!n) return 0;
        p += 6 + n;
    }
    return !strcmp(p, "/ns/net");
}

/* CNI_NETNS as a runtime gives it: an absolute, canonical path to the namespace's own file (a
 * bind mount such as /var/run/netns/cni-..., or /proc/<pid>/ns/net), never through a symbolic
 * link, which could point at another pod's namespace or the node's. The one alias followed is
 * /var/run itself (a link to /run on FHS systems, where containerd's paths go). Exits with a CNI
 * error naming CNI_NETNS when it is not; a path that does not exist is CONTAINER_UNKNOWN. */
static void check_netns(const char *path) {
    struct buf msg = {0};
    size_t n = strlen(path);
    if (path[0] != '/') {
        printf_(&msg, "CNI_NETNS %s is not an absolute path", path);
        cni_fail(INVALID_ENV, msg.p, "the runtime passes the network namespace's full path");
    }
    if (strstr(path, "//") || strstr(path, "/./") || strstr(path, "/../") || path[n - 1] == '/' ||
        (n >= 2 && !strcmp(path + n - 2, "/.")) || (n >= 3 && !strcmp(path + n - 3, "/.."))) {
        printf_(&msg, "CNI_NETNS %s is not a canonical path ('.', '..' or empty components)", path);
        cni_fail(INVALID_ENV, msg.p, "");
    }
    if (is_proc_netns(path)) return;
    struct stat st;
    if (lstat(path, &st) < 0) {
        printf_(&msg, "network namespace %s does not exist", path);
        cni_fail(CONTAINER_UNKNOWN, msg.p, "");
    }
    if (S_ISLNK(st.st_mode)) {
        char target[MAX_PATH + 1];
        ssize_t len = readlink(path, target, sizeof target - 1);
        target[len < 0 ? 0 : len] = 0;
        printf_(&msg, "CNI_NETNS %s is a symbolic link (to %s): refusing it", path, target);
        cni_fail(INVALID_ENV, msg.p, "the runtime passes the network namespace's own file");
    }
    char *real = realpath(path, NULL), *var_run = realpath("/var/run", NULL);
    struct buf alias = {0};
    if (var_run && !strncmp(path, "/var/run/", 9)) printf_(&alias, "%s%s", var_run, path + 8);
    if (real && strcmp(real, path) && !(alias.p && !strcmp(real, alias.p))) {
        printf_(&msg, "CNI_NETNS %s goes through a symbolic link (it is %s): refusing it", path, real);
        cni_fail(INVALID_ENV, msg.p, "the runtime passes the network namespace's own file");
    }
}

/* stdin, whole; NULL with *too_big when it exceeds MAX_INPUT. */
static char *read_stdin(size_t *len, int *too_big) {
    struct buf b = {0};
    char chunk[65536];
    ssize_t n;
    put(&b, "", 0);
    *too_big = 0;
    while ((n = read(0, chunk, sizeof chunk)) != 0) {
        if (n < 0) {
            if (errno == EINTR) continue;
            break;
        }
        if (b.len + (size_t)n > MAX_INPUT) { *too_big = 1; break; }
        put(&b, chunk, (size_t)n);
    }
    *len = b.len;
    return b.p;
}

static struct jval *load_config(const char *text, size_t len, int too_big) {
    const char *why;
    size_t at;
    struct buf details = {0};
    if (too_big) {
        printf_(&details, "more than %d bytes on stdin", MAX_INPUT);
        cni_fail(DECODE_FAILURE, "failed to decode network configuration", details.p);
    }
    struct jval *conf = parse_json(text, len, &why, &at);
    if (!conf) {
        printf_(&details, "%s at byte %zu", why, at);
        cni_fail(DECODE_FAILURE, "failed to decode network configuration", details.p);
    }
    if (conf->type != J_OBJ) cni_fail(DECODE_FAILURE, "network configuration is not a JSON object", "");
    const char *version = get_str(conf, "cniVersion");
    for (size_t i = 0; version && i < N_SUPPORTED; i++)
        if (!strcmp(version, SUPPORTED[i])) { cni_version = version; return conf; }
    struct buf msg = {0}, supported = {0};
    puts_(&msg, "incompatible CNI version ");
    describe(&msg, get(conf, "cniVersion"));
    puts_(&supported, "nodeagent-cni supports ");
    for (size_t i = 0; i < N_SUPPORTED; i++) printf_(&supported, "%s%s", i ? ", " : "", SUPPORTED[i]);
    cni_fail(INCOMPATIBLE_VERSION, msg.p, supported.p);
}

/* ---- the agent's socket (nodeagent/cni/wire.py) -------------------------------------------- */

enum { SENT, UNREACHABLE, BROKEN };

/* Sends REQUEST (one JSON line) to the agent at PATH and reads its one-line answer, waiting at
 * most TIMEOUT seconds per step. BROKEN/UNREACHABLE leave the reason in *err. */
static int agent_request(const char *path, const struct buf *request, double timeout,
                         struct jval **answer, struct buf *err) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (request->len > MAX_ANSWER) { /* the agent reads no more: it would answer a broken pipe */
        printf_(err, "the request (%zu bytes) exceeds the agent's limit of %d bytes", request->len,
                MAX_ANSWER);
        return BROKEN;
    }
    if (strlen(path) >= sizeof addr.sun_path) {
        printf_(err, "nodeagent is unreachable at %s: AF_UNIX path too long", path);
        return UNREACHABLE;
    }
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) { printf_(err, "socket: %s", strerror(errno)); return BROKEN; }
    if (timeout > 86400) timeout = 86400;
    struct timeval tv = {(time_t)timeout, (long)((timeout - (double)(time_t)timeout) * 1e6)};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv); /* also bounds connect */
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        printf_(err, "nodeagent is unreachable at %s: %s", path, strerror(errno));
        close(fd);
        return UNREACHABLE;
    }
    for (size_t off = 0; off < request->len;) {
        ssize_t n = send(fd, request->p + off, request->len - off, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            printf_(err, "%s", errno == EAGAIN ? "timed out" : strerror(errno));
            close(fd);
            return BROKEN;
        }
        off += (size_t)n;
    }
    struct buf in = {0};
    char chunk[65536];
    while (!in.len || in.p[in.len - 1] != '\n') {
        ssize_t n = recv(fd, chunk, sizeof chunk, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            if (n == 0) printf_(err, "nodeagent at %s closed the connection without answering", path);
            else printf_(err, "%s", errno == EAGAIN ? "timed out" : strerror(errno));
            close(fd);
            return BROKEN;
        }
        put(&in, chunk, (size_t)n);
        if (in.len > MAX_ANSWER) {
            printf_(err, "answer from %s exceeds %d bytes", path, MAX_ANSWER);
            close(fd);
            return BROKEN;
        }
    }
    close(fd);
    const char *why;
    size_t at;
    *answer = parse_json(in.p, in.len, &why, &at);
    if (!*answer) { printf_(err, "not JSON: %s at byte %zu", why, at); return BROKEN; }
    if ((*answer)->type != J_OBJ) { puts_(err, "not a JSON object"); return BROKEN; }
    return SENT;
}

/* The pod fields every request carries, as JSON members (no braces). */
static void pod_members(struct buf *b, const char *ns, const char *name) {
    puts_(b, "\"namespace\":");
    json_str(b, ns);
    puts_(b, ",\"name\":");
    json_str(b, name);
}

/* ---- the commands --------------------------------------------------------------------------- */

static void cmd_add(const struct jval *conf) {
    const struct jval *prev = get(conf, "prevResult");
    if (!prev || prev->type != J_OBJ)
        cni_fail(INVALID_CONFIG, "prevResult is missing: nodeagent-cni is a chained plugin",
                 "list it after the primary plugin (bridge, calico, ...) in the conflist");
    require_env((const char *const[]){"CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", NULL});
    struct buf oversized = {0};
    int code = oversized_input(&oversized, conf);
    if (code) cni_fail(code, oversized.p, "");
    require_utf8_env(
        (const char *const[]){"CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", NULL});
    const char *netns = getenv("CNI_NETNS");
    check_netns(netns);
    const char *ns = cni_arg("K8S_POD_NAMESPACE"), *name = cni_arg("K8S_POD_NAME");
    struct buf f = {0}, req = {0}, err = {0}, msg = {0};
    if (!*ns || !*name) {
        puts_(&f, ",\"container\":");
        json_str(&f, getenv("CNI_CONTAINERID"));
        log_event("info", "not a Kubernetes pod (no K8S_POD_NAMESPACE/K8S_POD_NAME): passed through",
                  f.p);
        fwrite(prev->raw, 1, prev->rawlen, stdout);
        return;
    }
    const char *socket_path = text_setting(conf, "agentSocket", DEFAULT_SOCKET);
    double timeout = seconds_setting(conf, "timeoutSeconds", DEFAULT_TIMEOUT);

    puts_(&req, "{\"command\":\"ADD\",\"pod\":{");
    pod_members(&req, ns, name);
    const char *fields[][2] = {{"uid", cni_arg("K8S_POD_UID")}, {"containerId", getenv("CNI_CONTAINERID")},
                               {"netns", netns}, {"ifname", getenv("CNI_IFNAME")}};
    for (size_t i = 0; i < sizeof fields / sizeof *fields; i++) {
        printf_(&req, ",\"%s\":", fields[i][0]);
        json_str(&req, fields[i][1]);
    }
    puts_(&req, ",\"ips\":[");
    const struct jval *ips = get(prev, "ips");
    size_t listed = 0;
    for (size_t i = 0; ips && ips->type == J_ARR && i < ips->n; i++) {
        const char *address = get_str(ips->items[i], "address");
        if (!address) continue;
        char *ip = copy(address, strcspn(address, "/")); /* without the prefix length */
        if (listed++) puts_(&req, ",");
        json_str(&req, ip);
        free(ip);
    }
    puts_(&req, "],\"network\":");
    json_str(&req, text_of(get(conf, "name"), ""));
    printf_(&req, "},\"timeout\":%.17g}\n", timeout);

    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    struct jval *answer = NULL;
    int sent = agent_request(socket_path, &req, timeout + 1, &answer, &err);
    if (sent == UNREACHABLE)
        cni_fail(TRY_AGAIN_LATER, err.p, "the node agent must run before mesh pods start");
    if (sent == BROKEN) {
        printf_(&msg, "talking to nodeagent at %s: %s", socket_path, err.p);
        cni_fail(IO_FAILURE, msg.p, "");
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (!truthy(get(answer, "ok"))) {
        const char *reason = text_of(get(answer, "reason"), "capture failed");
        puts_(&f, ",\"pod\":");
        printf_(&msg, "%s/%s", ns, name);
        json_str(&f, msg.p);
        puts_(&f, ",\"reason\":");
        json_str(&f, reason);
        log_event("error", "capture failed", f.p);
        msg.len = 0;
        printf_(&msg, "pod %s/%s: %s", ns, name, reason);
        cni_fail(CAPTURE_FAILED, msg.p, "");
    }
    const struct jval *state = get(answer, "state");
    printf_(&msg, "%s/%s", ns, name);
    puts_(&f, ",\"pod\":");
    json_str(&f, msg.p);
    puts_(&f, ",\"state\":");
    if (state) put(&f, state->raw, state->rawlen);
    else puts_(&f, "null");
    printf_(&f, ",\"seconds\":%.4f",
            (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
    log_event("info", "pod handed to agent", f.p);
    fwrite(prev->raw, 1, prev->rawlen, stdout); /* prevResult passes through unchanged */
}

static void cmd_del(const struct jval *conf) {
    struct buf pod = {0}, req = {0}, err = {0}, f = {0}, oversized = {0};
    if (oversized_input(&oversized, conf)) { /* its ADD failed on it: nothing to remove */
        puts_(&f, ",\"error\":");
        json_str(&f, oversized.p);
        log_event("warning", "DEL with an oversized input: not told to the agent", f.p);
        return;
    }
    pod_members(&pod, cni_arg("K8S_POD_NAMESPACE"), cni_arg("K8S_POD_NAME"));
    puts_(&pod, ",\"uid\":"); /* finds a pod the agent adopted without its ADD */
    json_str(&pod, cni_arg("K8S_POD_UID"));
    puts_(&pod, ",\"containerId\":");
    json_str(&pod, env_or("CNI_CONTAINERID", ""));
    puts_(&pod, ",\"netns\":");
    json_str(&pod, env_or("CNI_NETNS", ""));
    printf_(&req, "{\"command\":\"DEL\",\"pod\":{%s}}\n", pod.p);
    const char *socket_path = get_str(conf, "agentSocket");
    struct jval *answer;
    if (agent_request(socket_path ? socket_path : DEFAULT_SOCKET, &req, DEL_TIMEOUT, &answer, &err)
        != SENT) {
        /* The spec wants DEL to succeed; the agent's reconcile forgets pods whose netns is gone. */
        puts_(&f, ",\"error\":");
        json_str(&f, err.p);
        printf_(&f, ",%s", pod.p);
        log_event("warning", "could not tell the agent about DEL", f.p);
    }
}

static void cmd_check(const struct jval *conf) {
    const struct jval *prev = get(conf, "prevResult");
    if (!prev || prev->type != J_OBJ)
        cni_fail(INVALID_CONFIG, "prevResult is missing: CHECK needs the ADD result", "");
    require_env((const char *const[]){"CNI_CONTAINERID", "CNI_NETNS", NULL});
    struct buf oversized = {0};
    int code = oversized_input(&oversized, conf);
    if (code) cni_fail(code, oversized.p, "");
    require_utf8_env((const char *const[]){"CNI_CONTAINERID", "CNI_NETNS", "CNI_ARGS", NULL});
    check_netns(getenv("CNI_NETNS"));
    const char *socket_path = text_setting(conf, "agentSocket", DEFAULT_SOCKET);
    struct buf req = {0}, err = {0};
    puts_(&req, "{\"command\":\"CHECK\",\"pod\":{");
    pod_members(&req, cni_arg("K8S_POD_NAMESPACE"), cni_arg("K8S_POD_NAME"));
    puts_(&req, ",\"containerId\":");
    json_str(&req, getenv("CNI_CONTAINERID"));
    puts_(&req, ",\"netns\":");
    json_str(&req, getenv("CNI_NETNS"));
    puts_(&req, "}}\n");
    struct jval *answer;
    if (agent_request(socket_path, &req, DEFAULT_TIMEOUT, &answer, &err) != SENT)
        cni_fail(TRY_AGAIN_LATER, err.p, "");
    if (!truthy(get(answer, "ok")))
        cni_fail(CAPTURE_FAILED, text_of(get(answer, "reason"), "capture check failed"), "");
}

static void cmd_status(const struct jval *conf) {
    const char *socket_path = text_setting(conf, "agentSocket", DEFAULT_SOCKET);
    struct buf req = {0}, err = {0};
    puts_(&req, "{\"command\":\"STATUS\"}\n");
    struct jval *answer;
    if (agent_request(socket_path, &req, DEL_TIMEOUT, &answer, &err) != SENT)
        cni_fail(PLUGIN_NOT_AVAILABLE, err.p, "");
    if (!truthy(get(answer, "ok")))
        cni_fail(PLUGIN_NOT_AVAILABLE, text_of(get(answer, "reason"), "agent not ready"), "");
}

#define VALID_ATTACHMENTS "cni.dev/valid-attachments"
/* libcni also sends the spelling of an earlier spec draft (containernetworking/cni#1101). */
#define OLD_VALID_ATTACHMENTS "cni.dev/attachments"

/* CNI 1.1 GC: the agent forgets this network's pods that are not valid attachments, and only
 * those its own view of the cluster agrees are gone (see CaptureManager.gc). A list this plugin
 * cannot read fails with the field named: it must never reach the agent as "nothing is valid". */
static void cmd_gc(const struct jval *conf) {
    const char *key = get(conf, VALID_ATTACHMENTS) ? VALID_ATTACHMENTS : OLD_VALID_ATTACHMENTS;
    const struct jval *list = get(conf, key);
    struct buf msg = {0}, req = {0}, err = {0}, f = {0};
    if (!list || list->type == J_NULL)
        cni_fail(INVALID_CONFIG, "GC without field '" VALID_ATTACHMENTS "': nothing removed",
                 "the runtime must list the valid attachments: [{containerID, ifname}, ...]");
    if (list->type != J_ARR) {
        printf_(&msg, "field '%s' must be a list of attachments, got ", key);
        describe(&msg, list);
        puts_(&msg, ": nothing removed");
        cni_fail(INVALID_CONFIG, msg.p, "");
    }
    puts_(&req, "{\"command\":\"GC\",\"validContainerIds\":[");
    for (size_t i = 0; i < list->n; i++) {
        const char *id = get_str(list->items[i], "containerID");
        if (!id || !*id) {
            printf_(&msg, "field '%s'[%zu] must be an object with a non-empty string containerID, "
                          "got ", key, i);
            describe(&msg, list->items[i]);
            puts_(&msg, ": nothing removed");
            cni_fail(INVALID_CONFIG, msg.p, "");
        }
        if (i) puts_(&req, ",");
        json_str(&req, id);
    }
    puts_(&req, "],\"network\":");
    json_str(&req, text_of(get(conf, "name"), ""));
    puts_(&req, "}\n");
    const char *socket_path = get_str(conf, "agentSocket");
    struct jval *answer = NULL;
    if (agent_request(socket_path ? socket_path : DEFAULT_SOCKET, &req, DEL_TIMEOUT, &answer, &err)
        != SENT) {
        puts_(&f, ",\"error\":");
        json_str(&f, err.p);
        log_event("warning", "could not tell the agent about GC", f.p);
        return;
    }
    const struct jval *removed = get(answer, "removed"), *reason = get(answer, "reason");
    printf_(&f, ",\"valid\":%zu,\"removed\":", list->n);
    if (removed) put(&f, removed->raw, removed->rawlen); else puts_(&f, "null");
    puts_(&f, ",\"reason\":");
    if (reason) put(&f, reason->raw, reason->rawlen); else puts_(&f, "null");
    log_event("info", "GC", f.p);
}

int main(void) {
    command = env_or("CNI_COMMAND", "");
    size_t len;
    int too_big;
    char *input = read_stdin(&len, &too_big);
    if (!strcmp(command, "VERSION")) {
        const char *why;
        size_t at;
        struct jval *conf = too_big ? NULL : parse_json(input, len, &why, &at);
        const char *version = get_str(conf, "cniVersion");
        struct buf out = {0};
        puts_(&out, "{\"cniVersion\":");
        json_str(&out, version && *version ? version : "1.0.0");
        puts_(&out, ",\"supportedVersions\":[");
        for (size_t i = 0; i < N_SUPPORTED; i++) printf_(&out, "%s\"%s\"", i ? "," : "", SUPPORTED[i]);
        puts_(&out, "]}");
        fwrite(out.p, 1, out.len, stdout);
        return 0;
    }
    static const char *const known[] = {"ADD", "DEL", "CHECK", "STATUS", "GC"};
    size_t which = 0;
    while (which < 5 && strcmp(command, known[which])) which++;
    if (which == 5) {
        struct buf msg = {0};
        struct jval name = {.type = J_STR, .str = (char *)command};
        puts_(&msg, "invalid CNI_COMMAND ");
        describe(&msg, &name);
        cni_fail(INVALID_ENV, msg.p, "expected ADD, DEL, CHECK, STATUS, GC or VERSION");
    }
    struct jval *conf = load_config(input, len, too_big);
    log_path = text_setting(conf, "logFile", DEFAULT_LOG_FILE);
    switch (which) {
    case 0: cmd_add(conf); break;
    case 1: cmd_del(conf); break;
    case 2: cmd_check(conf); break;
    case 3: cmd_status(conf); break;
    default: cmd_gc(conf);
    }
    return fflush(stdout) ? 1 : 0;
}
