/* Calibration statistics in compressed-model files:
 * masa.calib.{name}.matrix (F64 [dim, dim]) and masa.calib.{name}.rows
 * (U64 []). */
#include <stdio.h>
#include <string.h>

#include "io/io_internal.h"

MASA_API masa_status masa_model_writer_add_calib(masa_model_writer *w,
                                                 const char *name,
                                                 const masa_calib *calib)
{
    static const char fn[] = "masa_model_writer_add_calib";
    masa__clear_error();
    if (!w || !name || !calib)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "%s: w, name and calib must not be NULL", fn);
    masa_safetensors_writer *st = w->st;
    if (w->done)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: the writer has finished or failed", fn);
    if (!name[0])
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT, "%s: empty name", fn);
    size_t dim, bytes;
    uint64_t rows;
    masa_calib_shape(calib, &dim, &rows);
    if (!masa__mul3(dim, dim, sizeof(double), &bytes))
        return masa__fail(MASA_ERROR_OVERFLOW, "%s: size overflows", fn);
    size_t len = strlen(name) + 32;
    char *tname = masa__alloc(w->ctx, len);
    if (!tname)
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY, "%s: out of memory", fn);
    size_t shape[2] = {dim, dim};
    snprintf(tname, len, "masa.calib.%s.matrix", name);
    masa_status s = masa_safetensors_writer_add(st, tname, MASA_DTYPE_F64, 2,
                                                shape, masa_calib_data(calib),
                                                bytes);
    if (s == MASA_OK) {
        snprintf(tname, len, "masa.calib.%s.rows", name);
        s = masa_safetensors_writer_add(st, tname, MASA_DTYPE_U64, 0, NULL,
                                        &rows, sizeof rows);
        if (s != MASA_OK) /* the matrix is in the spool without its count */
            w->done = true;
    }
    masa__free(w->ctx, tname);
    if (s == MASA_OK && masa__model_writer_add_calib_name(w, name) != MASA_OK) {
        w->done = true;
        s = masa__fail(MASA_ERROR_OUT_OF_MEMORY, "%s: out of memory", fn);
    }
    if (s != MASA_OK && strstr(masa_last_error(), "added twice"))
        s = masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                       "%s: calibration \"%s\" added twice", fn, name);
    return s;
}

MASA_API size_t masa_model_calib_count(const masa_model *m)
{
    return m ? m->n_calib : 0;
}

MASA_API masa_status masa_model_calib_name(const masa_model *m, size_t index,
                                           const char **name)
{
    masa__clear_error();
    if (!m || !name)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_model_calib_name: model and name must not be NULL");
    size_t n = m->n_calib;
    if (index >= n)
        return masa__fail(MASA_ERROR_OUT_OF_RANGE,
                          "masa_model_calib_name: entry %zu, the model has %zu",
                          index, n);
    *name = m->calib[index];
    return MASA_OK;
}

/* Finds masa.calib.{name}.{what}: dtype and shape checked. */
masa_status masa__calib_tensor(masa_safetensors *st, const char *name,
                               const char *what, masa_dtype dtype,
                               size_t ndim, const void **data,
                               const size_t **shape)
{
    char tname[512];
    snprintf(tname, sizeof tname, "masa.calib.%s.%s", name, what);
    size_t idx, nd;
    masa_dtype dt;
    if (masa_safetensors_find(st, tname, &idx) != MASA_OK)
        return masa__fail(MASA_ERROR_BAD_FORMAT,
                          "masa_model_open: %s: tensor \"%s\" is missing",
                          st->file, tname);
    masa_safetensors_tensor(st, idx, NULL, &dt, &nd, shape, data, NULL);
    if (dt != dtype || nd != ndim || (nd == 2 && (*shape)[0] != (*shape)[1]))
        return masa__fail(MASA_ERROR_BAD_FORMAT,
                          "masa_model_open: %s: tensor \"%s\" is not %s %s",
                          st->file, tname, masa_dtype_name(dtype),
                          ndim ? "[dim, dim]" : "[] (a scalar)");
    return MASA_OK;
}

MASA_API masa_status masa_model_calib(const masa_model *m, const char *name,
                                      masa_calib **out)
{
    static const char fn[] = "masa_model_calib";
    masa__clear_error();
    if (out)
        *out = NULL;
    if (!m || !name || !out)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "%s: model, name and out must not be NULL", fn);
    size_t n = m->n_calib, i = 0;
    while (i < n && strcmp(m->calib[i], name) != 0)
        i++;
    masa_safetensors *st = m->st;
    if (i == n)
        return masa__fail(MASA_ERROR_NOT_FOUND, "%s: %s: no calibration \"%s\"",
                          fn, st->file, name);
    const void *matrix, *rows;
    const size_t *shape, *unused;
    /* checked at open; the lookups cannot fail now */
    masa__calib_tensor(st, name, "matrix", MASA_DTYPE_F64, 2, &matrix, &shape);
    masa__calib_tensor(st, name, "rows", MASA_DTYPE_U64, 0, &rows, &unused);
    uint64_t n_rows;
    memcpy(&n_rows, rows, sizeof n_rows);
    size_t dim = shape[0];
    masa_context *ctx = m->ctx;
    if (((uintptr_t)matrix % _Alignof(double)) == 0)
        return masa_calib_create_from_data(ctx, dim, matrix, n_rows, out);
    /* a file written elsewhere may leave it unaligned */
    double *copy = masa__calloc(ctx, dim * dim, sizeof(double));
    if (!copy)
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY, "%s: out of memory", fn);
    memcpy(copy, matrix, dim * dim * sizeof(double));
    masa_status s = masa_calib_create_from_data(ctx, dim, copy, n_rows, out);
    masa__free(ctx, copy);
    return s;
}
