/* include/masa/compress.h alone (it includes masa.h itself) must compile
 * cleanly as C99 and C11, and its result structs' size rule must agree with
 * the library that is linked. */
#include <masa/compress.h>

int main(void)
{
    masa_pca_result pr;
    masa_group_plan_result gr;
    masa_residual_result rr;
    masa_pca_result_init(&pr);
    masa_group_plan_result_init(&gr);
    masa_residual_result_init(&rr);
    return (pr.size == sizeof pr && gr.size == sizeof gr &&
            rr.size == sizeof rr && masa_calib_data(NULL) == NULL) ? 0 : 1;
}
