/* safetensors writer: tensors are spooled to an unlinked file as they come,
 * the file itself is written in one go at finish (temporary file, fsync,
 * rename, fsync of the directory). */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/io_internal.h"

typedef struct entry {
    char *name;
    masa_dtype dtype;
    size_t ndim;
    size_t *shape;
    size_t spool_offset, bytes;
} entry;

struct masa_safetensors_writer {
    masa_context *ctx;
    char *path;
    int spool;                 /* unlinked file in path's directory */
    size_t spool_bytes;
    entry *entries;
    size_t n, cap;
    masa__st_meta *meta;
    size_t n_meta, meta_cap;
    bool done;                 /* finished, or failed in finish */
};

/* Well-formed UTF-8 (no overlong forms, surrogates or values past
 * U+10FFFF), as JSON strings must be. */
static bool valid_utf8(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        unsigned c = *p;
        size_t len;
        unsigned min;
        if (c < 0x80) {
            p++;
            continue;
        } else if ((c & 0xe0) == 0xc0) {
            len = 2, min = 0x80, c &= 0x1f;
        } else if ((c & 0xf0) == 0xe0) {
            len = 3, min = 0x800, c &= 0x0f;
        } else if ((c & 0xf8) == 0xf0) {
            len = 4, min = 0x10000, c &= 0x07;
        } else {
            return false;
        }
        for (size_t i = 1; i < len; i++) {
            if ((p[i] & 0xc0) != 0x80)
                return false;
            c = c << 6 | (p[i] & 0x3f);
        }
        if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff))
            return false;
        p += len;
    }
    return true;
}

/* Opens a new file next to `path` (O_EXCL, a name no one else uses). */
static int open_sibling(const char *path, const char *tag, int flags,
                        char *name, size_t name_size)
{
    static atomic_uint counter;
    for (int attempt = 0; attempt < 100; attempt++) {
        unsigned k = atomic_fetch_add(&counter, 1);
        snprintf(name, name_size, "%s.%s-%ld-%u", path, tag, (long)getpid(), k);
        int fd = open(name, flags | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd >= 0 || errno != EEXIST)
            return fd;
    }
    errno = EEXIST;
    return -1;
}

static bool write_all(int fd, const void *buf, size_t n)
{
    const char *p = buf;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return false;
        }
        p += w;
        n -= (size_t)w;
    }
    return true;
}

MASA_API masa_status masa_safetensors_writer_create(
    masa_context *ctx, const char *path, masa_safetensors_writer **out)
{
    static const char fn[] = "masa_safetensors_writer_create";
    masa__clear_error();
    if (out)
        *out = NULL;
    if (!ctx || !path || !out)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "%s: ctx, path and out must not be NULL", fn);
    if (!path[0])
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT, "%s: empty path", fn);
    masa_safetensors_writer *w = masa__calloc(ctx, 1, sizeof *w);
    if (!w)
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY, "%s: out of memory", fn);
    w->ctx = ctx;
    w->spool = -1;
    w->path = masa__io_strdup(ctx, path);
    size_t name_size = strlen(path) + 64;
    char *name = masa__alloc(ctx, name_size);
    if (!w->path || !name) {
        masa__free(ctx, name);
        masa_safetensors_writer_destroy(w);
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY, "%s: out of memory", fn);
    }
    w->spool = open_sibling(path, "spool", O_RDWR, name, name_size);
    if (w->spool < 0) {
        int e = errno;
        masa__free(ctx, name);
        masa_safetensors_writer_destroy(w);
        return masa__fail(MASA_ERROR_IO, "%s: %s: cannot create a file next to it: %s",
                          fn, path, strerror(e));
    }
    unlink(name); /* lives as long as the descriptor */
    masa__free(ctx, name);
    *out = w;
    return MASA_OK;
}

MASA_API masa_status masa_safetensors_writer_add(masa_safetensors_writer *w,
                                                 const char *name,
                                                 masa_dtype dtype, size_t ndim,
                                                 const size_t *shape,
                                                 const void *data,
                                                 size_t bytes)
{
    static const char fn[] = "masa_safetensors_writer_add";
    masa__clear_error();
    if (!w || !name || (ndim && !shape) || (bytes && !data))
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "%s: w, name, shape (ndim > 0) and data (bytes > 0) must not be NULL",
                          fn);
    if (w->done)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: %s: the writer has finished", fn, w->path);
    if (!name[0] || strcmp(name, "__metadata__") == 0 || !valid_utf8(name))
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: %s: invalid tensor name \"%s\" (empty, \"__metadata__\" or not UTF-8)",
                          fn, w->path, name);
    if (masa_dtype_size(dtype) == 0)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: %s: tensor \"%s\": unknown dtype %d", fn,
                          w->path, name, (int)dtype);
    for (size_t i = 0; i < w->n; i++)
        if (strcmp(w->entries[i].name, name) == 0)
            return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                              "%s: %s: tensor \"%s\" added twice", fn, w->path,
                              name);
    size_t count = 1, expected, end = w->spool_bytes;
    for (size_t d = 0; d < ndim; d++)
        if (shape[d] > INT64_MAX || !masa__mul(count, shape[d], &count))
            return masa__fail(MASA_ERROR_OVERFLOW,
                              "%s: %s: tensor \"%s\": element count overflows",
                              fn, w->path, name);
    if (!masa__mul(count, masa_dtype_size(dtype), &expected) ||
        !masa__add(&end, expected) || end > INT64_MAX)
        return masa__fail(MASA_ERROR_OVERFLOW,
                          "%s: %s: tensor \"%s\": byte size overflows", fn,
                          w->path, name);
    if (expected != bytes)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: %s: tensor \"%s\": %zu elements of %s are %zu bytes, %zu given",
                          fn, w->path, name, count, masa_dtype_name(dtype),
                          expected, bytes);
    if (w->n == w->cap) {
        size_t cap = w->cap ? 2 * w->cap : 16;
        entry *grown = masa__calloc(w->ctx, cap, sizeof *grown);
        if (!grown)
            return masa__fail(MASA_ERROR_OUT_OF_MEMORY, "%s: out of memory", fn);
        if (w->n)
            memcpy(grown, w->entries, w->n * sizeof *grown);
        masa__free(w->ctx, w->entries);
        w->entries = grown;
        w->cap = cap;
    }
    entry e = {.dtype = dtype, .ndim = ndim, .spool_offset = w->spool_bytes,
               .bytes = bytes};
    e.name = masa__io_strdup(w->ctx, name);
    e.shape = masa__calloc(w->ctx, ndim ? ndim : 1, sizeof(size_t));
    if (!e.name || !e.shape) {
        masa__free(w->ctx, e.name);
        masa__free(w->ctx, e.shape);
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY, "%s: out of memory", fn);
    }
    if (ndim)
        memcpy(e.shape, shape, ndim * sizeof(size_t));
    if (lseek(w->spool, (off_t)w->spool_bytes, SEEK_SET) < 0 ||
        !write_all(w->spool, data, bytes)) {
        int err = errno;
        masa__free(w->ctx, e.name);
        masa__free(w->ctx, e.shape);
        return masa__fail(MASA_ERROR_IO, "%s: %s: spooling tensor \"%s\": %s",
                          fn, w->path, name, strerror(err));
    }
    w->spool_bytes += bytes;
    w->entries[w->n++] = e;
    return MASA_OK;
}

MASA_API masa_status masa_safetensors_writer_set_metadata(
    masa_safetensors_writer *w, const char *key, const char *value)
{
    static const char fn[] = "masa_safetensors_writer_set_metadata";
    masa__clear_error();
    if (!w || !key || !value)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "%s: w, key and value must not be NULL", fn);
    if (w->done)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: %s: the writer has finished", fn, w->path);
    if (!valid_utf8(key) || !valid_utf8(value))
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: %s: metadata \"%s\": key or value is not UTF-8",
                          fn, w->path, key);
    char *v = masa__io_strdup(w->ctx, value);
    if (!v)
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY, "%s: out of memory", fn);
    for (size_t i = 0; i < w->n_meta; i++) {
        if (strcmp(w->meta[i].key, key) == 0) {
            masa__free(w->ctx, w->meta[i].value);
            w->meta[i].value = v;
            return MASA_OK;
        }
    }
    if (w->n_meta == w->meta_cap) {
        size_t cap = w->meta_cap ? 2 * w->meta_cap : 8;
        masa__st_meta *grown = masa__calloc(w->ctx, cap, sizeof *grown);
        if (!grown) {
            masa__free(w->ctx, v);
            return masa__fail(MASA_ERROR_OUT_OF_MEMORY, "%s: out of memory", fn);
        }
        if (w->n_meta)
            memcpy(grown, w->meta, w->n_meta * sizeof *grown);
        masa__free(w->ctx, w->meta);
        w->meta = grown;
        w->meta_cap = cap;
    }
    char *k = masa__io_strdup(w->ctx, key);
    if (!k) {
        masa__free(w->ctx, v);
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY, "%s: out of memory", fn);
    }
    w->meta[w->n_meta].key = k;
    w->meta[w->n_meta].value = v;
    w->n_meta++;
    return MASA_OK;
}

/* The Python package's order: dtype rank descending, then name. */
static int file_order(const void *a, const void *b)
{
    const entry *const *x = a, *const *y = b;
    int rx = masa__dtype_format_rank((*x)->dtype);
    int ry = masa__dtype_format_rank((*y)->dtype);
    if (rx != ry)
        return rx > ry ? -1 : 1;
    return strcmp((*x)->name, (*y)->name);
}

/* The JSON header for the entries in `order` (NULL when out of memory). */
static char *build_header(const masa_safetensors_writer *w, entry **order)
{
    json_t *root = json_object();
    bool ok = root != NULL;
    if (ok && w->n_meta) {
        json_t *meta = json_object();
        ok = meta && json_object_set_new(root, "__metadata__", meta) == 0;
        for (size_t i = 0; ok && i < w->n_meta; i++)
            ok = json_object_set_new(meta, w->meta[i].key,
                                     json_string(w->meta[i].value)) == 0;
    }
    size_t offset = 0;
    for (size_t i = 0; ok && i < w->n; i++) {
        const entry *e = order[i];
        json_t *t = json_object(), *shape = json_array(),
               *offs = json_array();
        ok = t && shape && offs &&
             json_object_set_new(t, "dtype",
                                 json_string(masa_dtype_name(e->dtype))) == 0 &&
             json_object_set(t, "shape", shape) == 0 &&
             json_object_set(t, "data_offsets", offs) == 0;
        for (size_t d = 0; ok && d < e->ndim; d++)
            ok = json_array_append_new(shape,
                                       json_integer((json_int_t)e->shape[d])) == 0;
        ok = ok &&
             json_array_append_new(offs, json_integer((json_int_t)offset)) == 0 &&
             json_array_append_new(offs, json_integer((json_int_t)(offset + e->bytes))) == 0 &&
             json_object_set(root, e->name, t) == 0;
        json_decref(shape);
        json_decref(offs);
        json_decref(t);
        offset += e->bytes;
    }
    char *text = ok ? json_dumps(root, JSON_COMPACT) : NULL;
    json_decref(root);
    return text;
}

/* Copies n bytes at offset `from` of the spool to the end of fd. */
static bool copy_from_spool(int spool, size_t from, int fd, size_t n,
                            char *buf, size_t buf_size)
{
    off_t in = (off_t)from;
    while (n) {
        ssize_t c = copy_file_range(spool, &in, fd, NULL, n, 0);
        if (c > 0) {
            n -= (size_t)c;
            continue;
        }
        if (c < 0 && errno == EINTR)
            continue;
        if (c == 0 || (errno != EXDEV && errno != EINVAL && errno != ENOSYS &&
                       errno != EOPNOTSUPP)) {
            if (c == 0)
                errno = EIO;
            return false;
        }
        break; /* not supported here: plain reads and writes */
    }
    while (n) {
        size_t chunk = n < buf_size ? n : buf_size;
        ssize_t r = pread(spool, buf, chunk, in);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            if (r == 0)
                errno = EIO;
            return false;
        }
        if (!write_all(fd, buf, (size_t)r))
            return false;
        in += r;
        n -= (size_t)r;
    }
    return true;
}

/* fsync of the directory holding path (best effort: some file systems
 * refuse it, and the rename has happened by then). */
static void sync_directory(const char *path)
{
    const char *slash = strrchr(path, '/');
    char dir[4096];
    if (!slash)
        snprintf(dir, sizeof dir, ".");
    else if (slash == path)
        snprintf(dir, sizeof dir, "/");
    else if ((size_t)(slash - path) < sizeof dir)
        snprintf(dir, sizeof dir, "%.*s", (int)(slash - path), path);
    else
        return;
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        (void)fsync(fd);
        close(fd);
    }
}

MASA_API masa_status masa_safetensors_writer_finish(masa_safetensors_writer *w)
{
    static const char fn[] = "masa_safetensors_writer_finish";
    masa__clear_error();
    if (!w)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: w is NULL", fn);
    if (w->done)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: %s: the writer has finished", fn, w->path);
    w->done = true;
    masa_context *ctx = w->ctx;
    const size_t buf_size = (size_t)1 << 20;
    entry **order = masa__calloc(ctx, w->n + 1, sizeof *order);
    char *buf = masa__alloc(ctx, buf_size);
    size_t tmp_size = strlen(w->path) + 64;
    char *tmp = masa__alloc(ctx, tmp_size);
    char *header = NULL;
    masa_status s = MASA_OK;
    int fd = -1;
    if (!order || !buf || !tmp) {
        s = masa__fail(MASA_ERROR_OUT_OF_MEMORY, "%s: out of memory", fn);
        goto out;
    }
    tmp[0] = '\0';
    for (size_t i = 0; i < w->n; i++)
        order[i] = &w->entries[i];
    qsort(order, w->n, sizeof *order, file_order);
    header = build_header(w, order);
    if (!header) {
        s = masa__fail(MASA_ERROR_OUT_OF_MEMORY, "%s: out of memory", fn);
        goto out;
    }
    size_t len = strlen(header);
    size_t padded = (len + 7) / 8 * 8;
    if (padded > MASA_ST_MAX_HEADER) {
        s = masa__fail(MASA_ERROR_BAD_FORMAT,
                       "%s: %s: the header would be %zu bytes, over the readers' limit of %u",
                       fn, w->path, padded, MASA_ST_MAX_HEADER);
        goto out;
    }
    unsigned char prefix[8];
    for (int i = 0; i < 8; i++)
        prefix[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    fd = open_sibling(w->path, "tmp", O_WRONLY, tmp, tmp_size);
    if (fd < 0) {
        s = masa__fail(MASA_ERROR_IO, "%s: %s: cannot create a file next to it: %s",
                       fn, w->path, strerror(errno));
        tmp[0] = '\0'; /* not ours */
        goto out;
    }
    static const char spaces[8] = "        ";
    bool ok = write_all(fd, prefix, 8) && write_all(fd, header, len) &&
              write_all(fd, spaces, padded - len);
    for (size_t i = 0; ok && i < w->n; i++)
        ok = copy_from_spool(w->spool, order[i]->spool_offset, fd,
                             order[i]->bytes, buf, buf_size);
    ok = ok && fsync(fd) == 0;
    if (!ok) {
        s = masa__fail(MASA_ERROR_IO, "%s: %s: writing: %s", fn, w->path,
                       strerror(errno));
        goto out;
    }
    int c = close(fd);
    fd = -1;
    if (c != 0 || rename(tmp, w->path) != 0) {
        s = masa__fail(MASA_ERROR_IO, "%s: %s: %s", fn, w->path,
                       strerror(errno));
        goto out;
    }
    tmp[0] = '\0'; /* renamed: nothing to remove */
    sync_directory(w->path);
out:
    if (fd >= 0)
        close(fd);
    if (s != MASA_OK && tmp && tmp[0])
        unlink(tmp);
    if (header) { /* jansson's allocation */
        json_malloc_t jmalloc;
        json_free_t jfree;
        json_get_alloc_funcs(&jmalloc, &jfree);
        jfree(header);
    }
    masa__free(ctx, tmp);
    masa__free(ctx, buf);
    masa__free(ctx, order);
    return s;
}

MASA_API void masa_safetensors_writer_destroy(masa_safetensors_writer *w)
{
    if (!w)
        return;
    if (w->spool >= 0)
        close(w->spool);
    for (size_t i = 0; i < w->n; i++) {
        masa__free(w->ctx, w->entries[i].name);
        masa__free(w->ctx, w->entries[i].shape);
    }
    for (size_t i = 0; i < w->n_meta; i++) {
        masa__free(w->ctx, w->meta[i].key);
        masa__free(w->ctx, w->meta[i].value);
    }
    masa__free(w->ctx, w->entries);
    masa__free(w->ctx, w->meta);
    masa__free(w->ctx, w->path);
    masa__free(w->ctx, w);
}
