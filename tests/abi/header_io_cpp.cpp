// include/masa/io.h alone must compile cleanly as C++17 and link.
#include <masa/io.h>

int main()
{
    return (masa_dtype_size(MASA_DTYPE_F64) == 8 &&
            masa_model_file(nullptr) == nullptr) ? 0 : 1;
}
