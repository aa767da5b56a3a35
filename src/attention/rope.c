/* Rotary position embedding in the "rotate half" layout (see masa.h). The
 * backward pass applies the inverse rotation to the gradients. */
#include <math.h>

#include "common/internal.h"

void masa__rope(float *x, size_t batch, size_t seq, size_t row_stride,
                size_t n_heads, size_t head_dim, size_t pos_offset,
                float theta, int direction)
{
    size_t half = head_dim / 2;
    for (size_t t = 0; t < seq; t++) {
        double pos = (double)pos_offset + (double)t;
        for (size_t i = 0; i < half; i++) {
            /* Angles in double: positions reach 1e5 and more, where float
             * angles lose the low frequencies' phase. */
            double freq = pow((double)theta, -2.0 * (double)i /
                                                 (double)head_dim);
            double angle = pos * freq;
            float c = (float)cos(angle);
            float s = (float)(direction * sin(angle));
            for (size_t b = 0; b < batch; b++) {
                float *row = x + (b * seq + t) * row_stride;
                for (size_t h = 0; h < n_heads; h++) {
                    float *v = row + h * head_dim;
                    float lo = v[i], hi = v[i + half];
                    v[i] = lo * c - hi * s;
                    v[i + half] = hi * c + lo * s;
                }
            }
        }
    }
}
