/* Compressed-model reader: checks "masa.model" and every tensor it names,
 * then wraps the file's memory in dictionaries and tables. */
#include <jansson.h>
#include <stdio.h>
#include <string.h>

#include "io/io_internal.h"


#define OPEN_FN "masa_model_open"

MASA_API void masa_model_close(masa_model *m)
{
    if (!m)
        return;
    for (int p = 0; p < MASA_NUM_PROJECTIONS; p++) {
        masa__model_proj *mp = &m->proj[p];
        for (size_t g = 0; g < mp->n_groups; g++) {
            masa_dictionary_destroy(mp->groups[g].dict);
            masa_coefficients_destroy(mp->groups[g].coef);
        }
        masa__free(m->ctx, mp->groups);
        masa__free(m->ctx, mp->ranks);
        masa__free(m->ctx, mp->a);
        masa__free(m->ctx, mp->b);
        masa__free(m->ctx, mp->weight);
        masa__free(m->ctx, m->group_of[p]);
    }
    for (size_t i = 0; i < m->n_calib; i++)
        masa__free(m->ctx, m->calib[i]);
    masa__free(m->ctx, m->calib);
    masa_safetensors_close(m->st);
    masa__free(m->ctx, m);
}

static bool json_size(const json_t *v, size_t *out)
{
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return false;
    *out = (size_t)json_integer_value(v);
    return true;
}

/* The float32 data of tensor masa.{p}.{what}, checked to be F32 of the
 * given shape. The mapping is private and writable (see
 * masa_safetensors_open), so handing out float * is sound. */
static masa_status tensor(masa_model *m, int p, const char *what, size_t ndim,
                          const size_t *shape, float **out)
{
    char name[96];
    snprintf(name, sizeof name, "masa.%s.%s", masa__proj_letter[p], what);
    size_t idx, nd;
    masa_dtype dt;
    const size_t *sh;
    if (masa_safetensors_find(m->st, name, &idx) != MASA_OK)
        return masa__fail(MASA_ERROR_BAD_FORMAT,
                          OPEN_FN ": %s: tensor \"%s\" is missing", m->st->file,
                          name);
    masa_safetensors_tensor(m->st, idx, NULL, &dt, &nd, &sh, NULL, NULL);
    bool same = dt == MASA_DTYPE_F32 && nd == ndim;
    for (size_t d = 0; same && d < ndim; d++)
        same = sh[d] == shape[d];
    if (!same)
        return masa__fail(MASA_ERROR_BAD_FORMAT,
                          OPEN_FN ": %s: tensor \"%s\" is not F32 of the shape \"masa.model\" gives (%zu dims, first %zu)",
                          m->st->file, name, ndim, ndim ? shape[0] : 0);
    const float *f;
    size_t count;
    masa_status s = masa_safetensors_f32(m->st, idx, &f, &count);
    if (s != MASA_OK)
        return s;
    *out = (float *)f;
    return MASA_OK;
}

static masa_status bad(const masa_model *m, const char *what)
{
    return masa__fail(MASA_ERROR_BAD_FORMAT, OPEN_FN ": %s: \"masa.model\": %s",
                      m->st->file, what);
}

static masa_status parse_projection(masa_model *m, int p, const json_t *o)
{
    masa__model_proj *mp = &m->proj[p];
    size_t L = m->n_layers;
    const json_t *kind = json_object_get(o, "kind");
    const char *k = json_is_string(kind) ? json_string_value(kind) : "";
    mp->kind = !strcmp(k, "masa")      ? MASA_MODEL_MASA
               : !strcmp(k, "dense")   ? MASA_MODEL_DENSE
               : !strcmp(k, "lowrank") ? MASA_MODEL_LOWRANK
                                       : MASA_MODEL_ABSENT;
    if (mp->kind == MASA_MODEL_ABSENT)
        return bad(m, "a projection's \"kind\" is not masa, dense or lowrank");
    if (!json_is_object(o) || !json_size(json_object_get(o, "d_in"), &mp->d_in) ||
        !json_size(json_object_get(o, "d_out"), &mp->d_out) || !mp->d_in ||
        !mp->d_out)
        return bad(m, "a projection's d_in or d_out is not a positive integer");
    const json_t *ranks = json_object_get(o, "ranks");
    if (!json_is_array(ranks) || json_array_size(ranks) != L)
        return bad(m, "a projection's \"ranks\" is not an array of n_layers entries");
    mp->ranks = masa__calloc(m->ctx, L, sizeof(size_t));
    mp->a = masa__calloc(m->ctx, L, sizeof(float *));
    mp->b = masa__calloc(m->ctx, L, sizeof(float *));
    mp->weight = masa__calloc(m->ctx, L, sizeof(float *));
    if (!mp->ranks || !mp->a || !mp->b || !mp->weight)
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY, OPEN_FN ": out of memory");
    size_t max_rank = mp->d_in < mp->d_out ? mp->d_in : mp->d_out;
    for (size_t l = 0; l < L; l++) {
        if (!json_size(json_array_get(ranks, l), &mp->ranks[l]) ||
            mp->ranks[l] > max_rank)
            return bad(m, "a rank is not an integer in 0..min(d_in, d_out)");
        if (mp->kind == MASA_MODEL_LOWRANK && mp->ranks[l] == 0)
            return bad(m, "a \"lowrank\" projection has a layer of rank 0");
    }
    if (mp->kind == MASA_MODEL_MASA) {
        const json_t *groups = json_object_get(o, "groups");
        size_t n = json_is_array(groups) ? json_array_size(groups) : 0;
        if (n == 0 || n > L)
            return bad(m, "a \"masa\" projection's \"groups\" is not 1..n_layers entries");
        mp->groups = masa__calloc(m->ctx, n, sizeof *mp->groups);
        m->group_of[p] = masa__calloc(m->ctx, L, sizeof(size_t));
        if (!mp->groups || !m->group_of[p])
            return masa__fail(MASA_ERROR_OUT_OF_MEMORY, OPEN_FN ": out of memory");
        size_t next = 0;
        for (size_t g = 0; g < n; g++) {
            const json_t *e = json_array_get(groups, g);
            masa__model_group *mg = &mp->groups[g];
            if (!json_is_array(e) || json_array_size(e) != 3 ||
                !json_size(json_array_get(e, 0), &mg->first) ||
                !json_size(json_array_get(e, 1), &mg->count) ||
                !json_size(json_array_get(e, 2), &mg->atoms))
                return bad(m, "a group is not [first, layers, atoms]");
            if (mg->first != next || mg->count == 0 || mg->count > L - next ||
                mg->atoms == 0)
                return bad(m, "the groups do not tile the layers in order");
            for (size_t l = next; l < next + mg->count; l++)
                m->group_of[p][l] = g;
            next += mg->count;
        }
        if (next != L)
            return bad(m, "the groups do not cover every layer");
        mp->n_groups = n;
    }
    return MASA_OK;
}

/* Finds and wraps every tensor of projection p. */
static masa_status load_projection(masa_model *m, int p)
{
    masa__model_proj *mp = &m->proj[p];
    char what[64];
    masa_status s = MASA_OK;
    for (size_t g = 0; s == MASA_OK && g < mp->n_groups; g++) {
        masa__model_group *mg = &mp->groups[g];
        size_t ashape[3] = {mg->atoms, mp->d_in, mp->d_out};
        size_t cshape[2] = {mg->count, mg->atoms};
        float *atoms, *coefs;
        snprintf(what, sizeof what, "group%zu.atoms", g);
        s = tensor(m, p, what, 3, ashape, &atoms);
        if (s == MASA_OK) {
            snprintf(what, sizeof what, "group%zu.coefficients", g);
            s = tensor(m, p, what, 2, cshape, &coefs);
        }
        if (s == MASA_OK)
            s = masa_dictionary_wrap(m->ctx, mg->atoms, mp->d_in, mp->d_out,
                                     atoms, &mg->dict);
        if (s == MASA_OK)
            s = masa_coefficients_wrap(m->ctx, mg->count, mg->atoms, coefs,
                                       &mg->coef);
    }
    for (size_t l = 0; s == MASA_OK && l < m->n_layers; l++) {
        if (mp->kind == MASA_MODEL_DENSE) {
            size_t shape[2] = {mp->d_in, mp->d_out};
            snprintf(what, sizeof what, "layer%zu.weight", l);
            s = tensor(m, p, what, 2, shape, &mp->weight[l]);
        }
        if (s == MASA_OK && mp->ranks[l]) {
            size_t ashape[2] = {mp->d_in, mp->ranks[l]};
            size_t bshape[2] = {mp->ranks[l], mp->d_out};
            snprintf(what, sizeof what, "layer%zu.lowrank_a", l);
            s = tensor(m, p, what, 2, ashape, &mp->a[l]);
            if (s == MASA_OK) {
                snprintf(what, sizeof what, "layer%zu.lowrank_b", l);
                s = tensor(m, p, what, 2, bshape, &mp->b[l]);
            }
        }
    }
    return s;
}

/* The "calibration" list: names of masa.calib.{name}.* entries. */
static masa_status parse_calib(masa_model *m, const json_t *list)
{
    if (!list)
        return MASA_OK;
    if (!json_is_array(list))
        return bad(m, "\"calibration\" is not an array");
    size_t n = json_array_size(list);
    m->calib = masa__calloc(m->ctx, n + 1, sizeof(char *));
    if (!m->calib)
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY, OPEN_FN ": out of memory");
    for (size_t i = 0; i < n; i++) {
        const json_t *e = json_array_get(list, i);
        if (!json_is_string(e) || !json_string_length(e))
            return bad(m, "a calibration name is not a non-empty string");
        const char *name = json_string_value(e);
        for (size_t k = 0; k < m->n_calib; k++)
            if (!strcmp(m->calib[k], name))
                return bad(m, "a calibration name appears twice");
        const void *data;
        const size_t *shape;
        masa_status s = masa__calib_tensor(m->st, name, "matrix", MASA_DTYPE_F64,
                                           2, &data, &shape);
        if (s == MASA_OK)
            s = masa__calib_tensor(m->st, name, "rows", MASA_DTYPE_U64, 0,
                                   &data, &shape);
        if (s != MASA_OK)
            return s;
        m->calib[m->n_calib] = masa__io_strdup(m->ctx, name);
        if (!m->calib[m->n_calib++])
            return masa__fail(MASA_ERROR_OUT_OF_MEMORY, OPEN_FN ": out of memory");
    }
    return MASA_OK;
}

static masa_status parse_model(masa_model *m)
{
    const char *text;
    if (masa_safetensors_metadata_get(m->st, "masa.model", &text) != MASA_OK)
        return masa__fail(MASA_ERROR_BAD_FORMAT,
                          OPEN_FN ": %s: not a compressed model (no \"masa.model\" metadata)",
                          m->st->file);
    json_error_t jerr;
    json_t *root = json_loads(text, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return masa__fail(MASA_ERROR_BAD_FORMAT,
                          OPEN_FN ": %s: \"masa.model\" is not valid JSON: %s",
                          m->st->file, jerr.text);
    masa_status s = MASA_OK;
    size_t version = 0;
    const json_t *projs = json_object_get(root, "projections");
    if (!json_is_object(root) ||
        !json_size(json_object_get(root, "format_version"), &version)) {
        s = bad(m, "no format_version");
    } else if (version != MASA_MODEL_FORMAT_VERSION) {
        s = masa__fail(MASA_ERROR_BAD_FORMAT,
                       OPEN_FN ": %s: format_version %zu; this library reads %d",
                       m->st->file, version, MASA_MODEL_FORMAT_VERSION);
    } else if (!json_size(json_object_get(root, "n_layers"), &m->n_layers) ||
               m->n_layers == 0) {
        s = bad(m, "n_layers is not a positive integer");
    } else if (!json_is_object(projs)) {
        s = bad(m, "no \"projections\" object");
    } else {
        const char *key;
        json_t *value;
        json_object_foreach((json_t *)projs, key, value) {
            int p = -1;
            for (int i = 0; i < MASA_NUM_PROJECTIONS; i++)
                if (!strcmp(key, masa__proj_letter[i]))
                    p = i;
            s = p < 0 ? bad(m, "a projection other than q, k, v, o")
                      : parse_projection(m, p, value);
            if (s == MASA_OK)
                s = load_projection(m, p);
            if (s != MASA_OK)
                break;
        }
        if (s == MASA_OK)
            s = parse_calib(m, json_object_get(root, "calibration"));
    }
    json_decref(root);
    return s;
}

MASA_API masa_status masa_model_open(masa_context *ctx, const char *path,
                                     masa_model **out)
{
    masa__clear_error();
    if (out)
        *out = NULL;
    if (!ctx || !path || !out)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          OPEN_FN ": ctx, path and out must not be NULL");
    masa_model *m = masa__calloc(ctx, 1, sizeof *m);
    if (!m)
        return masa__fail(MASA_ERROR_OUT_OF_MEMORY, OPEN_FN ": out of memory");
    m->ctx = ctx;
    masa_status s = masa_safetensors_open(ctx, path, &m->st);
    if (s == MASA_OK)
        s = parse_model(m);
    if (s != MASA_OK) {
        masa_model_close(m);
        return s;
    }
    *out = m;
    return MASA_OK;
}

MASA_API masa_status masa_model_layers(const masa_model *m, size_t *n_layers)
{
    masa__clear_error();
    if (!m || !n_layers)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "masa_model_layers: model and n_layers must not be NULL");
    *n_layers = m->n_layers;
    return MASA_OK;
}

static masa_status check_proj(const char *fn, const masa_model *m, int which)
{
    if (!m)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: model is NULL", fn);
    if (which < 0 || which >= MASA_NUM_PROJECTIONS)
        return masa__fail(MASA_ERROR_OUT_OF_RANGE, "%s: projection %d", fn,
                          which);
    return MASA_OK;
}

MASA_API masa_status masa_model_projection(const masa_model *m,
                                           masa_projection which,
                                           masa_model_kind *kind,
                                           size_t *d_in, size_t *d_out,
                                           size_t *n_groups)
{
    masa__clear_error();
    masa_status s = check_proj("masa_model_projection", m, (int)which);
    if (s != MASA_OK)
        return s;
    const masa__model_proj *mp = &m->proj[which];
    if (kind)
        *kind = mp->kind;
    if (d_in)
        *d_in = mp->d_in;
    if (d_out)
        *d_out = mp->d_out;
    if (n_groups)
        *n_groups = mp->n_groups;
    return MASA_OK;
}

MASA_API masa_status masa_model_group(const masa_model *m,
                                      masa_projection which, size_t group,
                                      size_t *first_layer, size_t *n_layers,
                                      masa_dictionary **dict,
                                      masa_coefficients **coef)
{
    static const char fn[] = "masa_model_group";
    masa__clear_error();
    masa_status s = check_proj(fn, m, (int)which);
    if (s != MASA_OK)
        return s;
    const masa__model_proj *mp = &m->proj[which];
    if (group >= mp->n_groups)
        return masa__fail(MASA_ERROR_OUT_OF_RANGE,
                          "%s: group %zu, projection %s has %zu", fn, group,
                          masa__proj_letter[which], mp->n_groups);
    const masa__model_group *mg = &mp->groups[group];
    if (first_layer)
        *first_layer = mg->first;
    if (n_layers)
        *n_layers = mg->count;
    if (dict)
        *dict = mg->dict;
    if (coef)
        *coef = mg->coef;
    return MASA_OK;
}

static masa_status check_layer(const char *fn, const masa_model *m, int which,
                               size_t layer)
{
    masa_status s = check_proj(fn, m, which);
    if (s == MASA_OK && layer >= m->n_layers)
        s = masa__fail(MASA_ERROR_OUT_OF_RANGE, "%s: layer %zu, the model has %zu",
                       fn, layer, m->n_layers);
    return s;
}

MASA_API masa_status masa_model_lowrank(const masa_model *m,
                                        masa_projection which, size_t layer,
                                        size_t *rank, float **a, float **b)
{
    masa__clear_error();
    masa_status s = check_layer("masa_model_lowrank", m, (int)which, layer);
    if (s != MASA_OK)
        return s;
    const masa__model_proj *mp = &m->proj[which];
    if (rank)
        *rank = mp->ranks ? mp->ranks[layer] : 0;
    if (a)
        *a = mp->a ? mp->a[layer] : NULL;
    if (b)
        *b = mp->b ? mp->b[layer] : NULL;
    return MASA_OK;
}

MASA_API masa_status masa_model_dense(const masa_model *m,
                                      masa_projection which, size_t layer,
                                      float **weight)
{
    static const char fn[] = "masa_model_dense";
    masa__clear_error();
    masa_status s = check_layer(fn, m, (int)which, layer);
    if (s != MASA_OK)
        return s;
    if (!weight)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT, "%s: weight is NULL", fn);
    if (m->proj[which].kind != MASA_MODEL_DENSE)
        return masa__fail(MASA_ERROR_INVALID_ARGUMENT,
                          "%s: projection %s is not dense", fn,
                          masa__proj_letter[which]);
    *weight = m->proj[which].weight[layer];
    return MASA_OK;
}

MASA_API masa_status masa_model_apply(const masa_model *m, size_t layer_index,
                                      masa_layer *layer)
{
    static const char fn[] = "masa_model_apply";
    masa__clear_error();
    if (!m || !layer)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "%s: model and layer must not be NULL", fn);
    if (layer_index >= m->n_layers)
        return masa__fail(MASA_ERROR_OUT_OF_RANGE,
                          "%s: layer %zu, the model has %zu", fn, layer_index,
                          m->n_layers);
    for (int p = 0; p < MASA_NUM_PROJECTIONS; p++) {
        const masa__model_proj *mp = &m->proj[p];
        size_t d_in, d_out;
        if (mp->kind == MASA_MODEL_ABSENT)
            continue;
        masa_layer_projection_shape(layer, (masa_projection)p, &d_in, &d_out);
        if (d_in != mp->d_in || d_out != mp->d_out)
            return masa__fail(MASA_ERROR_BAD_SHAPE,
                              "%s: projection %s of the layer is %zu x %zu, the model's %zu x %zu",
                              fn, masa__proj_letter[p], d_in, d_out, mp->d_in,
                              mp->d_out);
    }
    for (int p = 0; p < MASA_NUM_PROJECTIONS; p++) {
        const masa__model_proj *mp = &m->proj[p];
        masa_projection which = (masa_projection)p;
        masa_status s = MASA_OK;
        if (mp->kind == MASA_MODEL_MASA) {
            const masa__model_group *mg = &mp->groups[m->group_of[p][layer_index]];
            s = masa_layer_set_masa(layer, which, mg->dict, mg->coef,
                                    layer_index - mg->first);
        } else if (mp->kind == MASA_MODEL_DENSE) {
            s = masa_layer_set_dense(layer, which, mp->weight[layer_index]);
        }
        if (s == MASA_OK && mp->kind != MASA_MODEL_ABSENT)
            s = mp->ranks[layer_index]
                    ? masa_layer_set_lowrank(layer, which, mp->ranks[layer_index],
                                             mp->a[layer_index], mp->b[layer_index])
                    : masa_layer_remove_lowrank(layer, which);
        if (s != MASA_OK)
            return s;
    }
    return MASA_OK;
}

MASA_API masa_safetensors *masa_model_file(masa_model *m)
{
    return m ? m->st : NULL;
}
