/* Plain double-precision reference of the compression code (see
 * reference_compress.h). */
#include "reference_compress.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void ref_gram(size_t n, size_t n_cols, const float *const *mats, double *g)
{
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < n; j++) {
            double s = 0.0;
            for (size_t k = 0; k < n_cols; k++)
                s += (double)mats[i][k] * (double)mats[j][k];
            g[i * n + j] = s;
        }
}

void ref_eigen(size_t n, const double *a_in, size_t lda, double *w,
               double *v)
{
    double *a = malloc(n * n * sizeof *a);
    double *q = malloc(n * n * sizeof *q);
    if (!a || !q)
        abort();
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < n; j++) {
            /* lower triangle, mirrored (as the library reads it) */
            a[i * n + j] = i >= j ? a_in[i * lda + j] : a_in[j * lda + i];
            q[i * n + j] = i == j;
        }
    /* cyclic Jacobi rotations until the off-diagonal part vanishes */
    for (int sweep = 0; sweep < 100; sweep++) {
        double off = 0.0, diag = 0.0;
        for (size_t i = 0; i < n; i++)
            for (size_t j = 0; j < n; j++)
                if (i != j)
                    off += a[i * n + j] * a[i * n + j];
                else
                    diag += a[i * n + j] * a[i * n + j];
        if (off <= 1e-30 * diag || off == 0.0)
            break;
        for (size_t p = 0; p < n; p++)
            for (size_t r = p + 1; r < n; r++) {
                double apr = a[p * n + r];
                if (apr == 0.0)
                    continue;
                double theta = (a[r * n + r] - a[p * n + p]) / (2.0 * apr);
                double t = (theta >= 0 ? 1.0 : -1.0) /
                           (fabs(theta) + sqrt(theta * theta + 1.0));
                double c = 1.0 / sqrt(t * t + 1.0), s = t * c;
                for (size_t k = 0; k < n; k++) {
                    double akp = a[k * n + p], akr = a[k * n + r];
                    a[k * n + p] = c * akp - s * akr;
                    a[k * n + r] = s * akp + c * akr;
                }
                for (size_t k = 0; k < n; k++) {
                    double apk = a[p * n + k], ark = a[r * n + k];
                    a[p * n + k] = c * apk - s * ark;
                    a[r * n + k] = s * apk + c * ark;
                }
                for (size_t k = 0; k < n; k++) {
                    double qkp = q[k * n + p], qkr = q[k * n + r];
                    q[k * n + p] = c * qkp - s * qkr;
                    q[k * n + r] = s * qkp + c * qkr;
                }
            }
    }
    /* selection sort, descending */
    size_t *order = malloc(n * sizeof *order);
    if (!order)
        abort();
    for (size_t i = 0; i < n; i++)
        order[i] = i;
    for (size_t i = 0; i < n; i++)
        for (size_t j = i + 1; j < n; j++)
            if (a[order[j] * n + order[j]] > a[order[i] * n + order[i]]) {
                size_t t = order[i];
                order[i] = order[j];
                order[j] = t;
            }
    for (size_t s = 0; s < n; s++) {
        size_t col = order[s];
        w[s] = a[col * n + col];
        size_t big = 0;
        for (size_t l = 1; l < n; l++)
            if (fabs(q[l * n + col]) > fabs(q[big * n + col]))
                big = l;
        double sign = q[big * n + col] < 0 ? -1.0 : 1.0;
        for (size_t l = 0; l < n; l++)
            v[l * n + s] = sign * q[l * n + col];
    }
    free(order);
    free(a);
    free(q);
}

int ref_cholesky(size_t n, const double *c, double *r)
{
    memset(r, 0, n * n * sizeof *r);
    for (size_t j = 0; j < n; j++) {
        double d = c[j * n + j];
        for (size_t k = 0; k < j; k++)
            d -= r[j * n + k] * r[j * n + k];
        if (!(d > 0.0))
            return -1;
        r[j * n + j] = sqrt(d);
        for (size_t i = j + 1; i < n; i++) {
            double s = c[i * n + j];
            for (size_t k = 0; k < j; k++)
                s -= r[i * n + k] * r[j * n + k];
            r[i * n + j] = s / r[j * n + j];
        }
    }
    return 0;
}

void ref_xtx(size_t rows, size_t dim, const float *x, double *c)
{
    memset(c, 0, dim * dim * sizeof *c);
    for (size_t r = 0; r < rows; r++)
        for (size_t i = 0; i < dim; i++) {
            double xi = x[r * dim + i];
            for (size_t j = 0; j < dim; j++)
                c[i * dim + j] += xi * (double)x[r * dim + j];
        }
}
