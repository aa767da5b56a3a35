/* Compressed-model writer: the naming scheme of io.h on top of the
 * safetensors writer, and the "masa.model" description. */
#include <jansson.h>
#include <stdio.h>
#include <string.h>

#include "io/io_internal.h"


const char *const masa__proj_letter[MASA_NUM_PROJECTIONS] = {"q", "k", "v", "o"};

MASA_API void masa_model_writer_destroy(masa_model_writer *w)
{
    if (!w)
        return;
    masa_safetensors_writer_destroy(w->st);
    for (int p = 0; p < MASA_NUM_PROJECTIONS; p++) {
        masa__free(w->ctx, w->proj[p].groups);
        masa__free(w->ctx, w->proj[p].dense);
        masa__free(w->ctx, w->proj[p].ranks);
    }
    for (size_t i = 0; i < w->n_calib; i++)
        masa__free(w->ctx, w->calib[i]);
    masa__free(w->ctx, w->calib);
    masa__free(w->ctx, w);
}

MASA_API masa_status masa_model_writer_create(masa_context *ctx,
                                              const char *path,
                                              size_t n_layers,
                                              masa_model_writer **out)
{
    static const char fn[] = "masa_model_writer_create";
    masa__clear_error();
    if (out)
        *out = NULL;
    if (!ctx || !path || !out)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "%s: ctx, path and out must not be NULL", fn);
    if (n_layers == 0)
        return masa__fail(MASA_ERROR_BAD_SHAPE, "%s: n_layers is 0", fn);
    masa_model_writer *w = masa__calloc(ctx, 1, sizeof *w);
    if (!w)
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY, "%s: out of memory", fn);
    w->ctx = ctx;
    w->n_layers = n_layers;
    for (int p = 0; p < MASA_NUM_PROJECTIONS; p++) {
        w->proj[p].dense = masa__calloc(ctx, n_layers, sizeof(bool));
        w->proj[p].ranks = masa__calloc(ctx, n_layers, sizeof(size_t));
        w->proj[p].groups = masa__calloc(ctx, n_layers, sizeof(masa__group_entry));
        if (!w->proj[p].dense || !w->proj[p].ranks || !w->proj[p].groups) {
            masa_model_writer_destroy(w);
            return masa__fail(MASA_ERROR_OUT_OF_MEMORY, "%s: out of memory", fn);
        }
    }
    masa_status s = masa_safetensors_writer_create(ctx, path, &w->st);
    if (s != MASA_OK) {
        masa_model_writer_destroy(w);
        return s; /* its message */
    }
    *out = w;
    return MASA_OK;
}

static bool any_dense(const masa__proj_entries *pe, size_t n_layers)
{
    for (size_t l = 0; l < n_layers; l++)
        if (pe->dense[l])
            return true;
    return false;
}

/* Common checks of an entry for projection `which`, shape d_in x d_out,
 * layers [first, first + count). */
static masa_status check_entry(const char *fn, masa_model_writer *w,
                               int which, size_t first, size_t count,
                               size_t d_in, size_t d_out)
{
    if (w->done)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: the writer has finished", fn);
    if (which < 0 || which >= MASA_NUM_PROJECTIONS)
        return masa__fail(MASA_ERROR_OUT_OF_RANGE, "%s: projection %d", fn,
                          which);
    if (first >= w->n_layers || count > w->n_layers - first)
        return masa__fail(MASA_ERROR_OUT_OF_RANGE,
                          "%s: layers [%zu, %zu) past the model's %zu", fn,
                          first, first + count, w->n_layers);
    masa__proj_entries *pe = &w->proj[which];
    if (d_in == 0 || d_out == 0)
        return masa__fail(MASA_ERROR_BAD_SHAPE, "%s: zero size", fn);
    if (pe->d_in && (pe->d_in != d_in || pe->d_out != d_out))
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: projection %s is %zu x %zu, this entry %zu x %zu",
                          fn, masa__proj_letter[which], pe->d_in, pe->d_out,
                          d_in, d_out);
    return MASA_OK;
}

/* Adds one F32 tensor named masa.{p}.{what} of the given shape. */
static masa_status add_f32(masa_model_writer *w, int which, const char *what,
                           size_t ndim, const size_t *shape, const float *data)
{
    char name[96];
    snprintf(name, sizeof name, "masa.%s.%s", masa__proj_letter[which], what);
    size_t count = 1, bytes;
    for (size_t d = 0; d < ndim; d++)
        if (!masa__mul(count, shape[d], &count))
            return masa__fail(MASA_ERROR_OVERFLOW, "%s: size overflows", name);
    if (!masa__mul(count, sizeof(float), &bytes))
        return masa__fail(MASA_ERROR_OVERFLOW, "%s: size overflows", name);
    return masa_safetensors_writer_add(w->st, name, MASA_DTYPE_F32, ndim, shape,
                                       data, bytes);
}

MASA_API masa_status masa_model_writer_add_group(masa_model_writer *w,
                                                 masa_projection which,
                                                 size_t first_layer,
                                                 const masa_dictionary *dict,
                                                 const masa_coefficients *coef)
{
    static const char fn[] = "masa_model_writer_add_group";
    masa__clear_error();
    if (!w || !dict || !coef)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "%s: w, dict and coef must not be NULL", fn);
    masa_status s = check_entry(fn, w, (int)which, first_layer, coef->n_layers,
                                dict->rows, dict->cols);
    if (s != MASA_OK)
        return s;
    masa__proj_entries *pe = &w->proj[which];
    if (dict->n_atoms != coef->n_atoms)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: dictionary has %zu atoms, table %zu", fn,
                          dict->n_atoms, coef->n_atoms);
    if (any_dense(pe, w->n_layers))
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: projection %s already has dense weights", fn,
                          masa__proj_letter[which]);
    size_t expected = pe->n_groups
                          ? pe->groups[pe->n_groups - 1].first +
                                pe->groups[pe->n_groups - 1].count
                          : 0;
    if (first_layer != expected)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: projection %s: groups go in layer order; the next starts at layer %zu, not %zu",
                          fn, masa__proj_letter[which], expected, first_layer);
    char what[64];
    size_t g = pe->n_groups;
    size_t ashape[3] = {dict->n_atoms, dict->rows, dict->cols};
    size_t cshape[2] = {coef->n_layers, coef->n_atoms};
    snprintf(what, sizeof what, "group%zu.atoms", g);
    s = add_f32(w, (int)which, what, 3, ashape, dict->atoms);
    if (s == MASA_OK) {
        snprintf(what, sizeof what, "group%zu.coefficients", g);
        s = add_f32(w, (int)which, what, 2, cshape, coef->data);
    }
    if (s != MASA_OK) {
        w->done = true; /* the atoms may be in the file without the table */
        return s;
    }
    pe->groups[g] = (masa__group_entry){first_layer, coef->n_layers, dict->n_atoms};
    pe->n_groups++;
    pe->d_in = dict->rows;
    pe->d_out = dict->cols;
    return MASA_OK;
}

MASA_API masa_status masa_model_writer_add_dense(masa_model_writer *w,
                                                 masa_projection which,
                                                 size_t layer, size_t d_in,
                                                 size_t d_out,
                                                 const float *weight)
{
    static const char fn[] = "masa_model_writer_add_dense";
    masa__clear_error();
    if (!w || !weight)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "%s: w and weight must not be NULL", fn);
    masa_status s = check_entry(fn, w, (int)which, layer, 1, d_in, d_out);
    if (s != MASA_OK)
        return s;
    masa__proj_entries *pe = &w->proj[which];
    if (pe->n_groups)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: projection %s already has MASA groups", fn,
                          masa__proj_letter[which]);
    if (pe->dense[layer])
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: projection %s layer %zu given twice", fn,
                          masa__proj_letter[which], layer);
    char what[64];
    size_t shape[2] = {d_in, d_out};
    snprintf(what, sizeof what, "layer%zu.weight", layer);
    s = add_f32(w, (int)which, what, 2, shape, weight);
    if (s != MASA_OK)
        return s;
    pe->dense[layer] = true;
    pe->d_in = d_in;
    pe->d_out = d_out;
    return MASA_OK;
}

MASA_API masa_status masa_model_writer_add_lowrank(masa_model_writer *w,
                                                   masa_projection which,
                                                   size_t layer, size_t d_in,
                                                   size_t d_out, size_t rank,
                                                   const float *a,
                                                   const float *b)
{
    static const char fn[] = "masa_model_writer_add_lowrank";
    masa__clear_error();
    if (!w || !a || !b)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "%s: w, a and b must not be NULL", fn);
    masa_status s = check_entry(fn, w, (int)which, layer, 1, d_in, d_out);
    if (s != MASA_OK)
        return s;
    if (rank == 0 || rank > (d_in < d_out ? d_in : d_out))
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: rank %zu outside 1..min(%zu, %zu)", fn, rank,
                          d_in, d_out);
    masa__proj_entries *pe = &w->proj[which];
    if (pe->ranks[layer])
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: projection %s layer %zu given twice", fn,
                          masa__proj_letter[which], layer);
    char what[64];
    size_t ashape[2] = {d_in, rank}, bshape[2] = {rank, d_out};
    snprintf(what, sizeof what, "layer%zu.lowrank_a", layer);
    s = add_f32(w, (int)which, what, 2, ashape, a);
    if (s == MASA_OK) {
        snprintf(what, sizeof what, "layer%zu.lowrank_b", layer);
        s = add_f32(w, (int)which, what, 2, bshape, b);
    }
    if (s != MASA_OK) {
        w->done = true; /* A may be in the file without B */
        return s;
    }
    pe->ranks[layer] = rank;
    pe->d_in = d_in;
    pe->d_out = d_out;
    return MASA_OK;
}

MASA_API masa_status masa_model_writer_add_tensor(masa_model_writer *w,
                                                  const char *name,
                                                  masa_dtype dtype,
                                                  size_t ndim,
                                                  const size_t *shape,
                                                  const void *data,
                                                  size_t bytes)
{
    masa__clear_error();
    if (!w || !name)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_model_writer_add_tensor: w and name must not be NULL");
    if (strncmp(name, "masa.", 5) == 0)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "masa_model_writer_add_tensor: \"%s\": names beginning with \"masa.\" are reserved",
                          name);
    if (w->done)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "masa_model_writer_add_tensor: the writer has finished");
    return masa_safetensors_writer_add(w->st, name, dtype, ndim, shape, data,
                                       bytes);
}

MASA_API masa_status masa_model_writer_set_metadata(masa_model_writer *w,
                                                    const char *key,
                                                    const char *value)
{
    masa__clear_error();
    if (!w || !key)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_model_writer_set_metadata: w and key must not be NULL");
    if (strncmp(key, "masa.", 5) == 0)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "masa_model_writer_set_metadata: \"%s\": keys beginning with \"masa.\" are reserved",
                          key);
    return masa_safetensors_writer_set_metadata(w->st, key, value);
}

masa_status masa__model_writer_add_calib_name(masa_model_writer *w,
                                              const char *name)
{
    if (w->n_calib == w->calib_cap) {
        size_t cap = w->calib_cap ? 2 * w->calib_cap : 8;
        char **grown = masa__calloc(w->ctx, cap, sizeof *grown);
        if (!grown)
            return MASA_ERROR_OUT_OF_MEMORY;
        if (w->n_calib)
            memcpy(grown, w->calib, w->n_calib * sizeof *grown);
        masa__free(w->ctx, w->calib);
        w->calib = grown;
        w->calib_cap = cap;
    }
    char *copy = masa__io_strdup(w->ctx, name);
    if (!copy)
        return MASA_ERROR_OUT_OF_MEMORY;
    w->calib[w->n_calib++] = copy;
    return MASA_OK;
}

/* The "masa.model" JSON text (jansson's allocation), NULL when out of
 * memory. */
static char *describe(const masa_model_writer *w)
{
    json_t *root = json_object(), *projs = json_object(), *cal = json_array();
    bool ok = root && projs && cal &&
              json_object_set_new(root, "format_version",
                                  json_integer(MASA_MODEL_FORMAT_VERSION)) == 0 &&
              json_object_set_new(root, "n_layers",
                                  json_integer((json_int_t)w->n_layers)) == 0 &&
              json_object_set(root, "projections", projs) == 0 &&
              json_object_set(root, "calibration", cal) == 0;
    for (int p = 0; ok && p < MASA_NUM_PROJECTIONS; p++) {
        const masa__proj_entries *pe = &w->proj[p];
        if (!pe->d_in)
            continue;
        const char *kind = pe->n_groups ? "masa"
                           : any_dense(pe, w->n_layers) ? "dense" : "lowrank";
        json_t *o = json_object(), *ranks = json_array();
        ok = o && ranks && json_object_set(projs, masa__proj_letter[p], o) == 0 &&
             json_object_set_new(o, "kind", json_string(kind)) == 0 &&
             json_object_set_new(o, "d_in", json_integer((json_int_t)pe->d_in)) == 0 &&
             json_object_set_new(o, "d_out", json_integer((json_int_t)pe->d_out)) == 0;
        if (ok && pe->n_groups) {
            json_t *groups = json_array();
            ok = groups && json_object_set(o, "groups", groups) == 0;
            for (size_t g = 0; ok && g < pe->n_groups; g++)
                ok = json_array_append_new(
                         groups, json_pack("[III]", (json_int_t)pe->groups[g].first,
                                           (json_int_t)pe->groups[g].count,
                                           (json_int_t)pe->groups[g].atoms)) == 0;
            json_decref(groups);
        }
        ok = ok && json_object_set(o, "ranks", ranks) == 0;
        for (size_t l = 0; ok && l < w->n_layers; l++)
            ok = json_array_append_new(ranks, json_integer((json_int_t)pe->ranks[l])) == 0;
        json_decref(ranks);
        json_decref(o);
    }
    for (size_t i = 0; ok && i < w->n_calib; i++)
        ok = json_array_append_new(cal, json_string(w->calib[i])) == 0;
    char *text = ok ? json_dumps(root, JSON_COMPACT) : NULL;
    json_decref(cal);
    json_decref(projs);
    json_decref(root);
    return text;
}

MASA_API masa_status masa_model_writer_finish(masa_model_writer *w)
{
    static const char fn[] = "masa_model_writer_finish";
    masa__clear_error();
    if (!w)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: w is NULL", fn);
    if (w->done)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: the writer has finished or failed", fn);
    for (int p = 0; p < MASA_NUM_PROJECTIONS; p++) {
        const masa__proj_entries *pe = &w->proj[p];
        if (!pe->d_in)
            continue;
        size_t covered = pe->n_groups ? pe->groups[pe->n_groups - 1].first +
                                            pe->groups[pe->n_groups - 1].count
                                      : 0;
        for (size_t l = 0; l < w->n_layers; l++) {
            const char *missing = NULL;
            if (pe->n_groups && l >= covered)
                missing = "MASA group";
            else if (!pe->n_groups && any_dense(pe, w->n_layers) && !pe->dense[l])
                missing = "dense weight";
            else if (!pe->n_groups && !any_dense(pe, w->n_layers) && !pe->ranks[l])
                missing = "low-rank term";
            if (missing)
                return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                                  "%s: projection %s: layer %zu has no %s",
                                  fn, masa__proj_letter[p], l, missing);
        }
    }
    char *text = describe(w);
    if (!text)
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY, "%s: out of memory", fn);
    masa_status s = masa_safetensors_writer_set_metadata(w->st, "masa.model", text);
    json_malloc_t jm;
    json_free_t jf;
    json_get_alloc_funcs(&jm, &jf);
    jf(text);
    w->done = true;
    if (s != MASA_OK)
        return s;
    return masa_safetensors_writer_finish(w->st);
}
