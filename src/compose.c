/* Composition W_l = sum_s c[l, s] D_s: one matrix-vector product with the
 * atoms viewed as a (rows*cols) x S matrix (column s = vec(D_s)). */
#include "internal.h"

void masa__compose(const masa_dictionary *dict, const masa_coefficients *coef,
                   size_t layer, float *w, size_t n_threads)
{
    size_t n = dict->rows * dict->cols;
    masa__gemv(n, dict->n_atoms, 1.0f, dict->atoms, 1, n,
               coef->data + layer * coef->n_atoms, 0.0f, w, n_threads);
}

MASA_API masa_status masa_compose(const masa_dictionary *dict,
                                  const masa_coefficients *coef, size_t layer,
                                  float *w, size_t w_len)
{
    static const char fn[] = "masa_compose";
    if (!dict || !coef || !w)
        return masa__fail(MASA_ERROR_NULL_ARGUMENT,
                          "%s: %s is NULL", fn,
                          !dict ? "dict" : !coef ? "coef" : "w");
    if (coef->n_atoms != dict->n_atoms)
        return masa__fail(MASA_ERROR_BAD_SHAPE,
                          "%s: the table has %zu atoms per layer, the "
                          "dictionary %zu", fn, coef->n_atoms, dict->n_atoms);
    if (layer >= coef->n_layers)
        return masa__fail(MASA_ERROR_OUT_OF_RANGE,
                          "%s: layer %zu is out of range (table has %zu "
                          "layers)", fn, layer, coef->n_layers);
    size_t need = dict->rows * dict->cols;
    if (w_len < need)
        return masa__fail(MASA_ERROR_BUFFER_TOO_SMALL,
                          "%s: w holds %zu floats, W_l needs %zu", fn, w_len,
                          need);
    masa__compose(dict, coef, layer, w, 1);
    return MASA_OK;
}
