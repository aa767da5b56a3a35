// include/masa/compress.h alone must compile cleanly as C++17 and link.
#include <masa/compress.h>

int main()
{
    masa_residual_result r;
    masa_residual_result_init(&r);
    return (r.size == sizeof r && masa_calib_data(nullptr) == nullptr) ? 0
                                                                       : 1;
}
