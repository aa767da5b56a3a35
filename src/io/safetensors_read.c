/* safetensors reader: maps the file, checks the header completely, then
 * hands out pointers into the mapping. */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/io_internal.h"

#define OPEN_FN "masa_safetensors_open"

static void free_contents(masa_safetensors *st)
{
    masa_context *ctx = st->ctx;
    for (size_t i = 0; i < st->n_tensors; i++) {
        masa__free(ctx, st->tensors[i].name);
        masa__free(ctx, st->tensors[i].shape);
        if (st->converted)
            masa__free(ctx, st->converted[i]);
    }
    for (size_t i = 0; i < st->n_meta; i++) {
        masa__free(ctx, st->meta[i].key);
        masa__free(ctx, st->meta[i].value);
    }
    masa__free(ctx, st->tensors);
    masa__free(ctx, st->by_name);
    masa__free(ctx, st->meta);
    masa__free(ctx, st->converted);
    masa__free(ctx, st->file);
}

/* A non-negative JSON integer that fits size_t. */
static bool json_size(const json_t *v, size_t *out)
{
    if (!json_is_integer(v))
        return false;
    json_int_t i = json_integer_value(v);
    if (i < 0 || (unsigned long long)i > SIZE_MAX)
        return false;
    *out = (size_t)i;
    return true;
}

/* Parses one tensor entry into t (name already set). */
static masa_status parse_tensor(masa_safetensors *st, const char *name,
                                const json_t *entry, masa__st_tensor *t)
{
    const char *file = st->file;
    if (!json_is_object(entry))
        return masa__fail(MASA_ERROR_BAD_FORMAT,
                          OPEN_FN ": %s: tensor \"%s\": entry is not a JSON object",
                          file, name);
    const json_t *dtype = json_object_get(entry, "dtype");
    const json_t *shape = json_object_get(entry, "shape");
    const json_t *offsets = json_object_get(entry, "data_offsets");
    if (!json_is_string(dtype))
        return masa__fail(MASA_ERROR_BAD_FORMAT,
                          OPEN_FN ": %s: tensor \"%s\": \"dtype\" missing or not a string",
                          file, name);
    if (!masa__dtype_from_name(json_string_value(dtype), &t->dtype))
        return masa__fail(MASA_ERROR_BAD_FORMAT,
                          OPEN_FN ": %s: tensor \"%s\": unknown dtype \"%s\"",
                          file, name, json_string_value(dtype));
    if (!json_is_array(shape))
        return masa__fail(MASA_ERROR_BAD_FORMAT,
                          OPEN_FN ": %s: tensor \"%s\": \"shape\" missing or not an array",
                          file, name);
    if (!json_is_array(offsets) || json_array_size(offsets) != 2 ||
        !json_size(json_array_get(offsets, 0), &t->begin) ||
        !json_size(json_array_get(offsets, 1), &t->end))
        return masa__fail(MASA_ERROR_BAD_FORMAT,
                          OPEN_FN ": %s: tensor \"%s\": \"data_offsets\" is not two non-negative integers",
                          file, name);
    if (t->end < t->begin)
        return masa__fail(MASA_ERROR_BAD_FORMAT,
                          OPEN_FN ": %s: tensor \"%s\": data_offsets [%zu, %zu] end before they begin",
                          file, name, t->begin, t->end);
    t->ndim = json_array_size(shape);
    t->shape = masa__calloc(st->ctx, t->ndim ? t->ndim : 1, sizeof(size_t));
    if (!t->shape)
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY, OPEN_FN ": out of memory");
    size_t count = 1;
    bool overflow = false;
    for (size_t d = 0; d < t->ndim; d++) {
        if (!json_size(json_array_get(shape, d), &t->shape[d]))
            return masa__fail(MASA_ERROR_BAD_FORMAT,
                              OPEN_FN ": %s: tensor \"%s\": shape[%zu] is not a non-negative integer",
                              file, name, d);
        overflow |= !masa__mul(count, t->shape[d], &count);
    }
    size_t bytes;
    if (overflow || !masa__mul(count, masa_dtype_size(t->dtype), &bytes))
        return masa__fail(MASA_ERROR_BAD_FORMAT,
                          OPEN_FN ": %s: tensor \"%s\": byte size of its shape overflows",
                          file, name);
    if (bytes != t->end - t->begin)
        return masa__fail(MASA_ERROR_BAD_FORMAT,
                          OPEN_FN ": %s: tensor \"%s\": %zu elements of %s are %zu bytes but data_offsets [%zu, %zu] span %zu",
                          file, name, count, masa_dtype_name(t->dtype), bytes,
                          t->begin, t->end, t->end - t->begin);
    t->count = count;
    return MASA_OK;
}

static masa_status parse_metadata(masa_safetensors *st, const json_t *meta)
{
    if (json_is_null(meta))
        return MASA_OK; /* the Python package reads null as no metadata */
    if (!json_is_object(meta))
        return masa__fail(MASA_ERROR_BAD_FORMAT,
                          OPEN_FN ": %s: \"__metadata__\" is not a JSON object",
                          st->file);
    st->meta = masa__calloc(st->ctx, json_object_size(meta) + 1,
                            sizeof *st->meta);
    if (!st->meta)
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY, OPEN_FN ": out of memory");
    const char *key;
    const json_t *value;
    json_object_foreach((json_t *)meta, key, value) {
        if (!json_is_string(value))
            return masa__fail(MASA_ERROR_BAD_FORMAT,
                              OPEN_FN ": %s: \"__metadata__\" value of \"%s\" is not a string",
                              st->file, key);
        masa__st_meta *m = &st->meta[st->n_meta];
        m->key = masa__io_strdup(st->ctx, key);
        m->value = masa__io_strdup(st->ctx, json_string_value(value));
        st->n_meta++;
        if (!m->key || !m->value)
            return masa__fail(MASA_ERROR_OUT_OF_MEMORY, OPEN_FN ": out of memory");
    }
    return MASA_OK;
}

static int by_offsets(const void *a, const void *b)
{
    const masa__st_tensor *x = a, *y = b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return 0;
}

static int by_name(const void *a, const void *b)
{
    const masa__st_tensor *const *x = a, *const *y = b;
    return strcmp((*x)->name, (*y)->name);
}

/* Parses and checks the whole file at st->base (st->size bytes). */
static masa_status parse(masa_safetensors *st)
{
    const char *file = st->file;
    if (st->size < 8)
        return masa__fail(MASA_ERROR_BAD_FORMAT,
                          OPEN_FN ": %s: %zu bytes, shorter than the 8-byte header length",
                          file, st->size);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = n << 8 | st->base[i];
    if (n > MASA_ST_MAX_HEADER)
        return masa__fail(MASA_ERROR_BAD_FORMAT,
                          OPEN_FN ": %s: header length %llu exceeds the limit of %u bytes",
                          file, (unsigned long long)n, MASA_ST_MAX_HEADER);
    if (n > st->size - 8)
        return masa__fail(MASA_ERROR_BAD_FORMAT,
                          OPEN_FN ": %s: header length %llu runs past the end of the file (%zu bytes)",
                          file, (unsigned long long)n, st->size);
    const char *header = (const char *)st->base + 8;
    if (n == 0 || header[0] != '{')
        return masa__fail(MASA_ERROR_BAD_FORMAT,
                          OPEN_FN ": %s: header does not begin with '{'", file);
    st->data = st->base + 8 + n;
    st->data_bytes = st->size - 8 - (size_t)n;

    json_error_t jerr;
    json_t *root = json_loadb(header, (size_t)n, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return masa__fail(MASA_ERROR_BAD_FORMAT,
                          OPEN_FN ": %s: header is not valid JSON: %s (line %d, column %d)",
                          file, jerr.text, jerr.line, jerr.column);
    masa_status s = MASA_OK;
    if (!json_is_object(root)) {
        s = masa__fail(MASA_ERROR_BAD_FORMAT,
                       OPEN_FN ": %s: header is not a JSON object", file);
        goto done;
    }
    size_t entries = json_object_size(root);
    st->tensors = masa__calloc(st->ctx, entries + 1, sizeof *st->tensors);
    if (!st->tensors) {
        s = masa__fail(MASA_ERROR_OUT_OF_MEMORY, OPEN_FN ": out of memory");
        goto done;
    }
    const char *key;
    json_t *value;
    json_object_foreach(root, key, value) {
        if (strcmp(key, "__metadata__") == 0) {
            s = parse_metadata(st, value);
        } else {
            masa__st_tensor *t = &st->tensors[st->n_tensors++];
            t->name = masa__io_strdup(st->ctx, key);
            s = t->name ? parse_tensor(st, key, value, t)
                        : masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                                     OPEN_FN ": out of memory");
        }
        if (s != MASA_OK)
            goto done;
    }

    qsort(st->tensors, st->n_tensors, sizeof *st->tensors, by_offsets);
    size_t expected = 0;
    for (size_t i = 0; i < st->n_tensors; i++) {
        const masa__st_tensor *t = &st->tensors[i];
        if (t->begin != expected) {
            s = masa__fail(MASA_ERROR_BAD_FORMAT,
                           OPEN_FN ": %s: tensor \"%s\": data_offsets [%zu, %zu] %s the previous tensor's end %zu",
                           file, t->name, t->begin, t->end,
                           t->begin < expected ? "overlap" : "leave a hole after",
                           expected);
            goto done;
        }
        expected = t->end;
    }
    if (expected != st->data_bytes) {
        s = masa__fail(MASA_ERROR_BAD_FORMAT,
                       OPEN_FN ": %s: the tensors cover %zu bytes but the data section has %zu",
                       file, expected, st->data_bytes);
        goto done;
    }

    st->by_name = masa__calloc(st->ctx, st->n_tensors + 1, sizeof *st->by_name);
    if (!st->by_name) {
        s = masa__fail(MASA_ERROR_OUT_OF_MEMORY, OPEN_FN ": out of memory");
        goto done;
    }
    for (size_t i = 0; i < st->n_tensors; i++)
        st->by_name[i] = &st->tensors[i];
    qsort(st->by_name, st->n_tensors, sizeof *st->by_name, by_name);
done:
    json_decref(root);
    return s;
}

static masa_status open_common(masa_context *ctx, const char *file,
                               const void *base, size_t size, bool mapped,
                               masa_safetensors **out)
{
    masa_safetensors *st = masa__calloc(ctx, 1, sizeof *st);
    if (!st)
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY, OPEN_FN ": out of memory");
    st->ctx = ctx;
    st->base = base;
    st->size = size;
    st->mapped = mapped;
    st->file = masa__io_strdup(ctx, file);
    masa_status s = st->file ? parse(st)
                             : masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                                          OPEN_FN ": out of memory");
    if (s != MASA_OK) {
        st->mapped = false; /* the caller unmaps */
        masa_safetensors_close(st);
        return s;
    }
    *out = st;
    return MASA_OK;
}

MASA_API masa_status masa_safetensors_open(masa_context *ctx, const char *path,
                                           masa_safetensors **out)
{
    masa__clear_error();
    if (out)
        *out = NULL;
    if (!ctx || !path || !out)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          OPEN_FN ": ctx, path and out must not be NULL");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return masa__fail(MASA_ERROR_IO, OPEN_FN ": %s: %s", path,
                          strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int e = errno;
        close(fd);
        return masa__fail(MASA_ERROR_IO, OPEN_FN ": %s: %s", path, strerror(e));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return masa__fail(MASA_ERROR_IO, OPEN_FN ": %s: not a regular file",
                          path);
    }
    if ((unsigned long long)sb.st_size > SIZE_MAX) {
        close(fd);
        return masa__fail(MASA_ERROR_IO, OPEN_FN ": %s: too large to map",
                          path);
    }
    size_t size = (size_t)sb.st_size;
    void *base = NULL;
    if (size >= 8) {
        /* Private and writable: a host that wraps tensors as parameters may
         * write them; the writes stay in this process. */
        base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
        if (base == MAP_FAILED) {
            int e = errno;
            close(fd);
            return masa__fail(MASA_ERROR_IO, OPEN_FN ": %s: mmap: %s", path,
                              strerror(e));
        }
    }
    close(fd);
    static const unsigned char empty[1];
    masa_status s = open_common(ctx, path, base ? base : empty, size,
                                base != NULL, out);
    if (s != MASA_OK && base)
        munmap(base, size);
    return s;
}

MASA_API masa_status masa_safetensors_open_memory(masa_context *ctx,
                                                  const void *data,
                                                  size_t bytes,
                                                  masa_safetensors **out)
{
    masa__clear_error();
    if (out)
        *out = NULL;
    if (!ctx || !out || (!data && bytes))
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_safetensors_open_memory: ctx, data and out must not be NULL");
    static const unsigned char empty[1];
    return open_common(ctx, "<memory>", data ? data : empty, bytes, false,
                       out);
}

MASA_API void masa_safetensors_close(masa_safetensors *st)
{
    if (!st)
        return;
    if (st->mapped)
        munmap((void *)st->base, st->size);
    free_contents(st);
    masa__free(st->ctx, st);
}

MASA_API size_t masa_safetensors_tensor_count(const masa_safetensors *st)
{
    return st ? st->n_tensors : 0;
}

static int find_cmp(const void *key, const void *elem)
{
    const masa__st_tensor *const *t = elem;
    return strcmp(key, (*t)->name);
}

MASA_API masa_status masa_safetensors_find(const masa_safetensors *st,
                                           const char *name, size_t *index)
{
    masa__clear_error();
    if (!st || !name || !index)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_safetensors_find: st, name and index must not be NULL");
    masa__st_tensor *const *hit =
        bsearch(name, st->by_name, st->n_tensors, sizeof *st->by_name,
                find_cmp);
    if (!hit)
        return masa__fail(MASA_ERROR_NOT_FOUND,
                          "masa_safetensors_find: %s: no tensor \"%s\"",
                          st->file, name);
    *index = (size_t)(*hit - st->tensors);
    return MASA_OK;
}

static masa_status check_index(const char *fn, const masa_safetensors *st,
                               size_t index)
{
    if (!st)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: st is NULL", fn);
    if (index >= st->n_tensors)
        return masa__fail(MASA_ERROR_OUT_OF_RANGE,
                          "%s: %s: tensor index %zu, the file has %zu", fn,
                          st->file, index, st->n_tensors);
    return MASA_OK;
}

MASA_API masa_status masa_safetensors_tensor(const masa_safetensors *st,
                                             size_t index, const char **name,
                                             masa_dtype *dtype, size_t *ndim,
                                             const size_t **shape,
                                             const void **data, size_t *bytes)
{
    masa__clear_error();
    masa_status s = check_index("masa_safetensors_tensor", st, index);
    if (s != MASA_OK)
        return s;
    const masa__st_tensor *t = &st->tensors[index];
    if (name)
        *name = t->name;
    if (dtype)
        *dtype = t->dtype;
    if (ndim)
        *ndim = t->ndim;
    if (shape)
        *shape = t->shape;
    if (data)
        *data = st->data + t->begin;
    if (bytes)
        *bytes = t->end - t->begin;
    return MASA_OK;
}

static masa_status check_f32(const char *fn, const masa_safetensors *st,
                             size_t index)
{
    masa_status s = check_index(fn, st, index);
    if (s != MASA_OK)
        return s;
    const masa__st_tensor *t = &st->tensors[index];
    if (!masa__dtype_is_float(t->dtype))
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: %s: tensor \"%s\" is %s, not a float type", fn,
                          st->file, t->name, masa_dtype_name(t->dtype));
    return MASA_OK;
}

MASA_API masa_status masa_safetensors_read_f32(const masa_safetensors *st,
                                               size_t index, float *dst,
                                               size_t count)
{
    static const char fn[] = "masa_safetensors_read_f32";
    masa__clear_error();
    masa_status s = check_f32(fn, st, index);
    if (s != MASA_OK)
        return s;
    const masa__st_tensor *t = &st->tensors[index];
    if (!dst && t->count)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: dst is NULL", fn);
    if (count != t->count)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: %s: tensor \"%s\" has %zu elements, count is %zu",
                          fn, st->file, t->name, t->count, count);
    if (t->count)
        masa__convert_to_f32(t->dtype, st->data + t->begin, t->count, dst);
    return MASA_OK;
}

MASA_API masa_status masa_safetensors_f32(masa_safetensors *st, size_t index,
                                          const float **data, size_t *count)
{
    static const char fn[] = "masa_safetensors_f32";
    masa__clear_error();
    masa_status s = check_f32(fn, st, index);
    if (s != MASA_OK)
        return s;
    if (!data || !count)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "%s: data and count must not be NULL", fn);
    const masa__st_tensor *t = &st->tensors[index];
    const unsigned char *src = st->data + t->begin;
    if (t->dtype == MASA_DTYPE_F32 && masa__float_aligned(src)) {
        *data = (const float *)(const void *)src;
        *count = t->count;
        return MASA_OK;
    }
    if (!st->converted) {
        st->converted = masa__calloc(st->ctx, st->n_tensors, sizeof(float *));
        if (!st->converted)
            return masa__fail(MASA_ERROR_OUT_OF_MEMORY, "%s: out of memory", fn);
    }
    if (!st->converted[index]) {
        float *buf = masa__calloc(st->ctx, t->count ? t->count : 1,
                                  sizeof(float));
        if (!buf)
            return masa__fail(MASA_ERROR_OUT_OF_MEMORY,
                              "%s: out of memory converting \"%s\" (%zu elements)",
                              fn, t->name, t->count);
        masa__convert_to_f32(t->dtype, src, t->count, buf);
        st->converted[index] = buf;
    }
    *data = st->converted[index];
    *count = t->count;
    return MASA_OK;
}

MASA_API size_t masa_safetensors_metadata_count(const masa_safetensors *st)
{
    return st ? st->n_meta : 0;
}

MASA_API masa_status masa_safetensors_metadata_entry(
    const masa_safetensors *st, size_t index, const char **key,
    const char **value)
{
    masa__clear_error();
    if (!st)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_safetensors_metadata_entry: st is NULL");
    if (index >= st->n_meta)
        return masa__fail(MASA_ERROR_OUT_OF_RANGE,
                          "masa_safetensors_metadata_entry: %s: entry %zu, the file has %zu",
                          st->file, index, st->n_meta);
    if (key)
        *key = st->meta[index].key;
    if (value)
        *value = st->meta[index].value;
    return MASA_OK;
}

MASA_API masa_status masa_safetensors_metadata_get(const masa_safetensors *st,
                                                   const char *key,
                                                   const char **value)
{
    masa__clear_error();
    if (!st || !key || !value)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_safetensors_metadata_get: st, key and value must not be NULL");
    for (size_t i = 0; i < st->n_meta; i++) {
        if (strcmp(st->meta[i].key, key) == 0) {
            *value = st->meta[i].value;
            return MASA_OK;
        }
    }
    return masa__fail(MASA_ERROR_NOT_FOUND,
                      "masa_safetensors_metadata_get: %s: no metadata \"%s\"",
                      st->file, key);
}
