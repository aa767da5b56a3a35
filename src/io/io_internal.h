/* Internal declarations of src/io (safetensors files). */
#ifndef MASA_IO_INTERNAL_H
#define MASA_IO_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

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

/* For the calibration entries of a model writer (model_calib.c): records a
 * calibration name for "masa.model", and the writer's file (NULL once the
 * writer has finished or failed). */
masa_status masa__model_writer_add_calib_name(masa_model_writer *w,
                                              const char *name);
masa_safetensors_writer *masa__model_writer_file(masa_model_writer *w);

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
