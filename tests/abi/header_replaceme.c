/* include/masa/replaceme.h alone (it includes masa.h itself) must compile
 * cleanly as C99 and C11, and its options struct's size rule must agree with
 * the library that is linked. */
#include <masa/replaceme.h>

int main(void)
{
    masa_cosine_options o;
    masa_cosine_options_init(&o);
    masa_linear_estimator_destroy(NULL);
    masa_cosine_estimator_destroy(NULL);
    return (o.size == sizeof o && o.epochs == 10 &&
            MASA_MERGE_NN_LINEAR == 1) ? 0 : 1;
}
