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

#ifdef __cplusplus
}
#endif

#endif /* MASA_IO_H */
