/* Internal declarations of src/io (safetensors files). */
#ifndef MASA_IO_INTERNAL_H
#define MASA_IO_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "common/internal.h"

/* safetensors data is little-endian and is used in place. */
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
               "libmasa's safetensors code assumes a little-endian CPU");

/* The Python package's cap on the JSON header (bytes). */
#define MASA_ST_MAX_HEADER 100000000u

/* One tensor of an open file. */
typedef struct masa__st_tensor {
    char *name;
    masa_dtype dtype;
    size_t ndim;
    size_t *shape;        /* ndim entries (an allocation of at least one) */
    size_t count;         /* elements */
    size_t begin, end;    /* byte offsets in the data section */
} masa__st_tensor;

typedef struct masa__st_meta {
    char *key, *value;
} masa__st_meta;

struct masa_safetensors {
    masa_context *ctx;
    char *file;                  /* for messages; "<memory>" */
    const unsigned char *base;   /* the whole file */
    size_t size;
    bool mapped;                 /* base is our mapping (munmap at close) */
    const unsigned char *data;   /* the data section */
    size_t data_bytes;
    masa__st_tensor *tensors;    /* ascending offsets */
    size_t n_tensors;
    masa__st_tensor **by_name;   /* sorted by name (strcmp) */
    masa__st_meta *meta;         /* header order */
    size_t n_meta;
    float **converted;           /* per tensor: float32 copy or NULL */
};

/* "q", "k", "v", "o": the projections' names in compressed-model files. */
extern const char *const masa__proj_letter[MASA_NUM_PROJECTIONS];

/* ---- compressed-model writer (model_write.c) ---- */

typedef struct masa__group_entry {
    size_t first, count, atoms;
} masa__group_entry;

typedef struct masa__proj_entries {
    size_t d_in, d_out;       /* 0 until the first entry */
    masa__group_entry *groups;      /* in layer order, tiling from layer 0 */
    size_t n_groups;
    bool *dense;              /* per layer: weight added */
    size_t *ranks;            /* per layer: 0 = no low-rank term */
} masa__proj_entries;

struct masa_model_writer {
    masa_context *ctx;
    masa_safetensors_writer *st;
    size_t n_layers;
    masa__proj_entries proj[MASA_NUM_PROJECTIONS];
    char **calib;             /* names of calibration entries */
    size_t n_calib, calib_cap;
    bool done;
};

/* Records a calibration name for "masa.model" (model_calib.c). */
masa_status masa__model_writer_add_calib_name(masa_model_writer *w,
                                              const char *name);

/* ---- compressed-model reader (model_read.c) ---- */

typedef struct masa__model_group {
    size_t first, count, atoms;
    masa_dictionary *dict;
    masa_coefficients *coef;
} masa__model_group;

typedef struct masa__model_proj {
    masa_model_kind kind;
    size_t d_in, d_out;
    masa__model_group *groups;
    size_t n_groups;
    size_t *ranks;            /* per layer */
    float **a, **b, **weight; /* per layer, into the file */
} masa__model_proj;

struct masa_model {
    masa_context *ctx;
    masa_safetensors *st;
    size_t n_layers;
    masa__model_proj proj[MASA_NUM_PROJECTIONS];
    size_t *group_of[MASA_NUM_PROJECTIONS]; /* per layer, "masa" only */
    char **calib;                           /* calibration names */
    size_t n_calib;
};

/* masa.calib.{name}.{what} of st, checked to be dtype with ndim dims
 * (square when 2); BAD_FORMAT naming it otherwise (model_calib.c). */
masa_status masa__calib_tensor(masa_safetensors *st, const char *name,
                               const char *what, masa_dtype dtype,
                               size_t ndim, const void **data,
                               const size_t **shape);

/* A copy of s through the context's allocator (NULL when out of memory). */
static inline char *masa__io_strdup(masa_context *ctx, const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = masa__alloc(ctx, n);
    if (d)
        memcpy(d, s, n);
    return d;
}

/* The dtype called `name` in a header; false when unknown. */
bool masa__dtype_from_name(const char *name, masa_dtype *out);

/* Rank of a dtype in the safetensors package's own dtype order (ascending
 * alignment); its writer orders tensors by descending rank, then name. */
int masa__dtype_format_rank(masa_dtype dtype);

/* Element conversions to float32 of n elements at src (any alignment). */
void masa__convert_to_f32(masa_dtype dtype, const void *src, size_t n,
                          float *dst);

/* True for the dtypes masa__convert_to_f32 accepts. */
bool masa__dtype_is_float(masa_dtype dtype);

#endif
