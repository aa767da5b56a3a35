/*
 * libmasa: safetensors files.
 *
 * Included by masa.h; the conventions at the top of masa.h apply (statuses,
 * masa_last_error(), row-major contiguous arrays, NULL-tolerant destroy
 * functions, *out set to NULL on failure).
 *
 * safetensors (https://github.com/huggingface/safetensors) is a flat file:
 *
 *     8 bytes      N, the header length, unsigned little-endian
 *     N bytes      a UTF-8 JSON object, padded with spaces:
 *                    {"__metadata__": {"key": "value", ...},      (optional)
 *                     "name": {"dtype": "F32", "shape": [2, 3],
 *                              "data_offsets": [begin, end]}, ...}
 *     the rest     the tensors' bytes, little-endian, row-major; offsets are
 *                  relative to the first byte after the header
 *
 * The reader maps the file (mmap) and checks everything before handing out a
 * pointer: N against the file size and a cap of 100,000,000 bytes (the
 * Python package's), the header beginning with '{' and being valid UTF-8
 * JSON without duplicate keys, every dtype known, every dimension and offset
 * a non-negative integer, element count x dtype size = byte length without
 * overflow, offsets in range and the tensors covering the data section
 * exactly (no holes, no overlaps, nothing after the last tensor), and every
 * `__metadata__` value a string. Unknown keys inside a tensor's entry are
 * ignored, as the Python package does. A malformed file gives
 * MASA_ERROR_BAD_FORMAT with the file name and what is wrong.
 *
 * The writer writes atomically: the tensors go to an unlinked spool file as
 * they are added (so the caller's buffers can be reused at once), and
 * masa_safetensors_writer_finish() writes the whole file to a temporary file
 * in the target directory, fsyncs it, renames it over the target and fsyncs
 * the directory. Until then the target path is untouched; on any failure it
 * is left as it was. The layout is the Python package's: tensors ordered by
 * dtype (widest alignment first, the package's dtype order) and then by name
 * (bytewise), `__metadata__` first in the header, the header padded with
 * spaces to a multiple of 8 bytes, so every tensor of a file with only
 * F64/F32/F16/BF16 tensors is aligned to its element size.
 *
 * The JSON parser (jansson) allocates its temporary tree with malloc, not
 * with the context's allocator hook; everything the handles keep goes
 * through the hook.
 */
#ifndef MASA_IO_H
#define MASA_IO_H

#include "masa.h"

/* masa_calib (compress.h) is named by its struct tag below, so that this
 * header does not depend on the order in which masa.h includes both. */
struct masa_calib;

#ifdef __cplusplus
extern "C" {
#endif

/* ======================================================================
 * Element types
 * ====================================================================== */

/* The dtypes of safetensors. The numeric values are libmasa's (stable), not
 * an order of the format. */
typedef enum masa_dtype {
    MASA_DTYPE_F32 = 0,
    MASA_DTYPE_F16 = 1,     /* IEEE binary16 */
    MASA_DTYPE_BF16 = 2,    /* bfloat16: the upper half of a float32 */
    MASA_DTYPE_F64 = 3,
    MASA_DTYPE_BOOL = 4,
    MASA_DTYPE_U8 = 5,
    MASA_DTYPE_I8 = 6,
    MASA_DTYPE_I16 = 7,
    MASA_DTYPE_U16 = 8,
    MASA_DTYPE_I32 = 9,
    MASA_DTYPE_U32 = 10,
    MASA_DTYPE_I64 = 11,
    MASA_DTYPE_U64 = 12,
    MASA_DTYPE_F8_E5M2 = 13,
    MASA_DTYPE_F8_E4M3 = 14
} masa_dtype;

/* The format's name of a dtype ("F32", "BF16", ...); static storage.
 * NULL for a value that is not a masa_dtype. */
MASA_API const char *masa_dtype_name(masa_dtype dtype);

/* Bytes per element (1, 2, 4 or 8); 0 for a value that is not a masa_dtype. */
MASA_API size_t masa_dtype_size(masa_dtype dtype);

/* ======================================================================
 * Reading
 * ====================================================================== */

typedef struct masa_safetensors masa_safetensors;

/* Opens and checks a safetensors file (see the top of this file). The file
 * is mapped read-only into memory, copy-on-write: nothing the process does
 * changes the file. The mapping lives until masa_safetensors_close(); the
 * file must not be truncated meanwhile (reading a page past a truncated end
 * raises SIGBUS, as with any mapping).
 * Errors: NULL_ARGUMENT; IO (open, fstat, mmap failed, or not a regular
 * file: the message has the file name and the system's reason);
 * BAD_FORMAT (the file name and what is wrong); OUT_OF_MEMORY. */
MASA_API masa_status masa_safetensors_open(masa_context *ctx, const char *path,
                                           masa_safetensors **out);

/* The same over `bytes` bytes of caller memory, which must stay valid and
 * unchanged until the handle is closed (tensor data points into it). Error
 * messages name the file "<memory>". */
MASA_API masa_status masa_safetensors_open_memory(masa_context *ctx,
                                                  const void *data,
                                                  size_t bytes,
                                                  masa_safetensors **out);

/* Unmaps the file and frees the handle and every buffer it returned. */
MASA_API void masa_safetensors_close(masa_safetensors *st);

/* Number of tensors (0 for NULL). Tensor indices 0 .. count-1 follow the
 * order of the data in the file (ascending offsets). */
MASA_API size_t masa_safetensors_tensor_count(const masa_safetensors *st);

/* Index of the tensor called `name`.
 * Errors: NULL_ARGUMENT; NOT_FOUND (the message names the tensor and file). */
MASA_API masa_status masa_safetensors_find(const masa_safetensors *st,
                                           const char *name, size_t *index);

/* Describes tensor `index`. Every output may be NULL (skipped).
 * name: NUL-terminated UTF-8, owned by the handle. shape: ndim sizes, owned by
 * the handle (not NULL even when ndim is 0, a scalar of one element).
 * data: the tensor's bytes inside the mapping, little-endian, row-major,
 * aligned only as the file happens to be; bytes: their length.
 * Errors: NULL_ARGUMENT (st); OUT_OF_RANGE (index). */
MASA_API masa_status masa_safetensors_tensor(const masa_safetensors *st,
                                             size_t index, const char **name,
                                             masa_dtype *dtype, size_t *ndim,
                                             const size_t **shape,
                                             const void **data, size_t *bytes);

/* Copies tensor `index` into dst as float32, converting F16, BF16 and F64
 * (F64 rounds to nearest; magnitudes beyond float's range become +-inf).
 * count must equal the tensor's element count.
 * Errors: NULL_ARGUMENT; OUT_OF_RANGE (index); INVALID_ARGUMENT (dtype not
 * one of F32, F16, BF16, F64); BAD_SHAPE (count differs). Thread-safe with
 * other readers of the same handle. */
MASA_API masa_status masa_safetensors_read_f32(const masa_safetensors *st,
                                               size_t index, float *dst,
                                               size_t count);

/* Tensor `index` as float32 without a caller buffer: *data points into the
 * mapping when the tensor is F32 and 4-byte aligned there; otherwise the
 * handle converts it once (as masa_safetensors_read_f32) into a buffer it
 * owns until close, and later calls return that buffer. *count: elements.
 * Errors: as masa_safetensors_read_f32, plus OUT_OF_MEMORY. A call that
 * converts modifies the handle: not at the same time as other calls on it. */
MASA_API masa_status masa_safetensors_f32(masa_safetensors *st, size_t index,
                                          const float **data, size_t *count);

/* Number of `__metadata__` entries (0 for NULL or none). */
MASA_API size_t masa_safetensors_metadata_count(const masa_safetensors *st);

/* Metadata entry `index` (header order); strings owned by the handle. key or
 * value may be NULL (skipped).
 * Errors: NULL_ARGUMENT (st); OUT_OF_RANGE. */
MASA_API masa_status masa_safetensors_metadata_entry(
    const masa_safetensors *st, size_t index, const char **key,
    const char **value);

/* The value of metadata `key`, owned by the handle.
 * Errors: NULL_ARGUMENT; NOT_FOUND. */
MASA_API masa_status masa_safetensors_metadata_get(const masa_safetensors *st,
                                                   const char *key,
                                                   const char **value);

/* ======================================================================
 * Writing
 * ====================================================================== */

typedef struct masa_safetensors_writer masa_safetensors_writer;

/* Starts writing the file `path` (see the top of this file: nothing appears
 * at `path` before masa_safetensors_writer_finish()). Opens the spool file in
 * path's directory at once, so an unwritable directory fails here.
 * Errors: NULL_ARGUMENT; INVALID_ARGUMENT (empty path); IO; OUT_OF_MEMORY. */
MASA_API masa_status masa_safetensors_writer_create(
    masa_context *ctx, const char *path, masa_safetensors_writer **out);

/* Adds a tensor: `bytes` bytes at `data` (little-endian row-major elements
 * of `dtype`), shape[0 .. ndim-1] (ndim 0: a scalar; dimensions may be 0).
 * The bytes are copied to the spool file before the call returns.
 * name: UTF-8 without NUL, not empty, not "__metadata__", not used before.
 * Errors: NULL_ARGUMENT (w, name, shape when ndim > 0, data when bytes > 0);
 * INVALID_ARGUMENT (the name, or an unknown dtype); BAD_SHAPE (bytes differs
 * from the element count x dtype size); OVERFLOW; IO; OUT_OF_MEMORY; on
 * error nothing is added. After a failed finish the writer refuses
 * everything (INVALID_ARGUMENT). */
MASA_API masa_status masa_safetensors_writer_add(masa_safetensors_writer *w,
                                                 const char *name,
                                                 masa_dtype dtype, size_t ndim,
                                                 const size_t *shape,
                                                 const void *data,
                                                 size_t bytes);

/* Sets `__metadata__` entry key to value (both UTF-8 without NUL; an
 * existing key gets the new value).
 * Errors: NULL_ARGUMENT; INVALID_ARGUMENT (not UTF-8); OUT_OF_MEMORY. */
MASA_API masa_status masa_safetensors_writer_set_metadata(
    masa_safetensors_writer *w, const char *key, const char *value);

/* Writes the file atomically (temporary file, fsync, rename, fsync of the
 * directory). The writer can only be destroyed afterwards.
 * Errors: NULL_ARGUMENT; INVALID_ARGUMENT (finished before, or after a
 * failure); BAD_FORMAT (the header would exceed the readers' cap); IO (the
 * message has the path and the system's reason; `path` is untouched and no
 * temporary file is left); OUT_OF_MEMORY. */
MASA_API masa_status masa_safetensors_writer_finish(masa_safetensors_writer *w);

/* Frees the writer and its spool. Without a successful finish nothing is
 * written. */
MASA_API void masa_safetensors_writer_destroy(masa_safetensors_writer *w);


/* ======================================================================
 * Compressed models: the attention of a whole model in one file
 * ======================================================================
 * A compressed model is a safetensors file holding, for each projection
 * type p in {q, k, v, o} it covers, one of three kinds:
 *   "masa"     consecutive layer groups, each with a dictionary and a
 *              coefficient table, plus optional per-layer low-rank terms
 *              (W_l = sum_s c[l - first, s] D_s + A_l B_l);
 *   "dense"    one weight per layer (kept as it was), optional low-rank
 *              terms;
 *   "lowrank"  only A_l B_l for every layer (the truncated-SVD baseline).
 * Names (l, g from 0; every tensor F32, row-major, the library's layouts):
 *   masa.{p}.group{g}.atoms         [S_g, d_in, d_out]  the dictionary
 *   masa.{p}.group{g}.coefficients  [L_g, S_g]          row i: layer first+i
 *   masa.{p}.layer{l}.weight        [d_in, d_out]       "dense"
 *   masa.{p}.layer{l}.lowrank_a     [d_in, r_l]
 *   masa.{p}.layer{l}.lowrank_b     [r_l, d_out]
 * Calibration statistics (C = X^T X of a projection's input, see
 * compress.h), under any name n (the `masa` tool uses "layer{l}.qkv" for the
 * input of Q, K and V and "layer{l}.o" for the input of O):
 *   masa.calib.{n}.matrix           F64 [dim, dim]
 *   masa.calib.{n}.rows             U64 []              rows accumulated
 * Metadata "masa.model" is a JSON object (as a string) describing it all:
 *   {"format_version": 1, "n_layers": L,
 *    "projections": {"q": {"kind": "masa", "d_in": 576, "d_out": 576,
 *                          "groups": [[first, L_g, S_g], ...],
 *                          "ranks": [r_0, ..., r_(L-1)]}, ...},
 *    "calibration": ["layer0.qkv", ...]}
 * ("groups" only for "masa"; "ranks" always, 0 = no low-rank term). The
 * groups of a "masa" projection tile the layers 0..L-1 in order. Other
 * tensors and metadata in the file are allowed and ignored (a host may keep
 * the rest of its model in the same file). A reader of another
 * format_version refuses the file (BAD_FORMAT).
 */

/* The kind of a projection in a compressed model. */
typedef enum masa_model_kind {
    MASA_MODEL_ABSENT = 0,  /* the file does not cover this projection */
    MASA_MODEL_MASA = 1,
    MASA_MODEL_DENSE = 2,
    MASA_MODEL_LOWRANK = 3
} masa_model_kind;

/* The format version this library writes and reads. */
#define MASA_MODEL_FORMAT_VERSION 1

typedef struct masa_model_writer masa_model_writer;

/* Starts a compressed-model file of n_layers layers at `path` (written
 * atomically by masa_model_writer_finish(), as masa_safetensors_writer).
 * Everything added is spooled to disk at once: the caller's buffers and
 * objects can be freed or reused after each call.
 * Errors: NULL_ARGUMENT; BAD_SHAPE (n_layers 0); INVALID_ARGUMENT (empty
 * path); IO; OUT_OF_MEMORY. */
MASA_API masa_status masa_model_writer_create(masa_context *ctx,
                                              const char *path,
                                              size_t n_layers,
                                              masa_model_writer **out);

/* Adds group layers [first_layer, first_layer + L_g) of projection `which`
 * (kind "masa"): the dictionary's atoms (S x d_in x d_out) and the
 * coefficient table (L_g x S: its row count is the group's size).
 * Errors: NULL_ARGUMENT; OUT_OF_RANGE (which; layers past n_layers);
 * INVALID_ARGUMENT (the projection already has another kind, or a group
 * overlapping one added before); BAD_SHAPE (atom count differs between
 * dictionary and table; d_in x d_out differs from the projection's earlier
 * entries); IO; OUT_OF_MEMORY. */
MASA_API masa_status masa_model_writer_add_group(masa_model_writer *w,
                                                 masa_projection which,
                                                 size_t first_layer,
                                                 const masa_dictionary *dict,
                                                 const masa_coefficients *coef);

/* Adds layer `layer`'s dense weight (d_in x d_out floats) of projection
 * `which` (kind "dense"). Errors: as add_group (INVALID_ARGUMENT also for a
 * layer given twice). */
MASA_API masa_status masa_model_writer_add_dense(masa_model_writer *w,
                                                 masa_projection which,
                                                 size_t layer, size_t d_in,
                                                 size_t d_out,
                                                 const float *weight);

/* Adds layer `layer`'s low-rank term of projection `which`: a (d_in x rank)
 * and b (rank x d_out) floats. A projection with only low-rank terms is of
 * kind "lowrank" and needs one for every layer; "masa" and "dense"
 * projections may have them for any layers.
 * Errors: as add_group; BAD_SHAPE also for rank 0 or above min(d_in, d_out);
 * INVALID_ARGUMENT for a layer given twice. */
MASA_API masa_status masa_model_writer_add_lowrank(masa_model_writer *w,
                                                   masa_projection which,
                                                   size_t layer, size_t d_in,
                                                   size_t d_out, size_t rank,
                                                   const float *a,
                                                   const float *b);

/* Adds a tensor or metadata entry of the caller's own next to the model
 * (e.g. the rest of a model's weights, or a description). Names beginning
 * with "masa." are reserved (INVALID_ARGUMENT); otherwise as
 * masa_safetensors_writer_add() and masa_safetensors_writer_set_metadata(). */
MASA_API masa_status masa_model_writer_add_tensor(masa_model_writer *w,
                                                  const char *name,
                                                  masa_dtype dtype,
                                                  size_t ndim,
                                                  const size_t *shape,
                                                  const void *data,
                                                  size_t bytes);
MASA_API masa_status masa_model_writer_set_metadata(masa_model_writer *w,
                                                    const char *key,
                                                    const char *value);

/* Adds calibration statistics under `name` (see the naming scheme above):
 * the dim x dim float64 matrix and the row count of `calib`, copied to the
 * spool now. name: UTF-8, not empty, not used before.
 * Errors: NULL_ARGUMENT; INVALID_ARGUMENT (name empty, used before, or the
 * writer has finished); IO; OUT_OF_MEMORY. */
MASA_API masa_status masa_model_writer_add_calib(masa_model_writer *w,
                                                 const char *name,
                                                 const struct masa_calib *calib);

/* Checks that the model is complete (the groups of every "masa" projection
 * tile all layers, every layer of a "dense" projection has its weight,
 * every layer of a "lowrank" one its term) and writes the file.
 * Errors: NULL_ARGUMENT; INVALID_ARGUMENT (incomplete: the message names the
 * projection and the first missing layer; or finished before); and as
 * masa_safetensors_writer_finish(). */
MASA_API masa_status masa_model_writer_finish(masa_model_writer *w);

/* Frees the writer; without a successful finish nothing is written. */
MASA_API void masa_model_writer_destroy(masa_model_writer *w);

typedef struct masa_model masa_model;

/* Opens a compressed-model file (masa_safetensors_open, then the
 * "masa.model" metadata and every tensor it implies: present, F32, of the
 * declared shape). The atoms, coefficients, weights and factors stay in
 * the file's private mapping (4-byte aligned in files written by libmasa;
 * a tensor that is not is copied): the model's dictionaries and tables
 * wrap that memory, nothing is read before it is used.
 * Errors: NULL_ARGUMENT; IO; BAD_FORMAT (not a compressed model, a
 * format_version other than MASA_MODEL_FORMAT_VERSION, a tensor missing or
 * of the wrong dtype or shape: the message says which); OUT_OF_MEMORY. */
MASA_API masa_status masa_model_open(masa_context *ctx, const char *path,
                                     masa_model **out);

/* Closes the model: its dictionaries, tables and the mapping. Every layer
 * set up from it (masa_model_apply) must be destroyed, or its projections
 * replaced, first. */
MASA_API void masa_model_close(masa_model *model);

/* Layers of the model. Errors: NULL_ARGUMENT. */
MASA_API masa_status masa_model_layers(const masa_model *model,
                                       size_t *n_layers);

/* Projection `which`: its kind, shape (d_in x d_out; 0 when absent) and
 * number of groups ("masa"; else 0). Outputs may be NULL.
 * Errors: NULL_ARGUMENT (model); OUT_OF_RANGE (which). */
MASA_API masa_status masa_model_projection(const masa_model *model,
                                           masa_projection which,
                                           masa_model_kind *kind,
                                           size_t *d_in, size_t *d_out,
                                           size_t *n_groups);

/* Group `group` of a "masa" projection: its first layer, its number of
 * layers, and its dictionary and coefficient table, owned by the model
 * (valid until masa_model_close; they wrap the file's mapping, so writes
 * through them change this process's copy only). Outputs may be NULL.
 * Errors: NULL_ARGUMENT (model); OUT_OF_RANGE (which, group). */
MASA_API masa_status masa_model_group(const masa_model *model,
                                      masa_projection which, size_t group,
                                      size_t *first_layer, size_t *n_layers,
                                      masa_dictionary **dict,
                                      masa_coefficients **coef);

/* Layer `layer`'s low-rank term of projection `which`: *rank (0 = none) and
 * pointers into the model's memory (NULL without a term). Outputs may be
 * NULL. Errors: NULL_ARGUMENT (model); OUT_OF_RANGE (which, layer). */
MASA_API masa_status masa_model_lowrank(const masa_model *model,
                                        masa_projection which, size_t layer,
                                        size_t *rank, float **a, float **b);

/* Layer `layer`'s dense weight of a "dense" projection (d_in x d_out, in
 * the model's memory). Errors: NULL_ARGUMENT; OUT_OF_RANGE;
 * INVALID_ARGUMENT (the projection is not "dense"). */
MASA_API masa_status masa_model_dense(const masa_model *model,
                                      masa_projection which, size_t layer,
                                      float **weight);

/* Sets every projection the model covers on `layer` as model layer
 * `layer_index` has it: masa_layer_set_masa() with its group's dictionary
 * and table row, or masa_layer_set_dense(), and masa_layer_set_lowrank()
 * with its term (or masa_layer_remove_lowrank() when it has none), all
 * wrapping the model's memory. Projections the model does not cover are
 * left as they are, and so is the base of a "lowrank" projection (only its
 * term is set: apply such a model to a fresh layer, whose base is unset, for
 * W = A B alone). The layer must have been created with the matching
 * shapes (masa_layer_projection_shape equal to the model's d_in x d_out).
 * Errors: NULL_ARGUMENT; OUT_OF_RANGE (layer_index); BAD_SHAPE (shapes
 * differ: the message names the projection); errors of the set functions
 * (OUT_OF_MEMORY under the cached policy). Shapes are checked before
 * anything is set. */
MASA_API masa_status masa_model_apply(const masa_model *model,
                                      size_t layer_index, masa_layer *layer);

/* Number of calibration entries in the file (0 for NULL). */
MASA_API size_t masa_model_calib_count(const masa_model *model);

/* Name of calibration entry `index` (file order), owned by the model.
 * Errors: NULL_ARGUMENT; OUT_OF_RANGE. */
MASA_API masa_status masa_model_calib_name(const masa_model *model,
                                           size_t index, const char **name);

/* A new calibration handle holding a copy of entry `name`
 * (masa_calib_create_from_data: the matrix must be symmetric and finite);
 * the caller destroys it. A file may hold only calibration statistics (a
 * model writer with no projections): that is how statistics are saved.
 * Errors: NULL_ARGUMENT; NOT_FOUND; INVALID_ARGUMENT (matrix not symmetric
 * or not finite); OUT_OF_MEMORY. */
MASA_API masa_status masa_model_calib(const masa_model *model,
                                      const char *name,
                                      struct masa_calib **out);

/* The model's safetensors file (to read other tensors or metadata of it);
 * owned by the model. NULL for NULL. */
MASA_API masa_safetensors *masa_model_file(masa_model *model);

#ifdef __cplusplus
}
#endif

#endif /* MASA_IO_H */
