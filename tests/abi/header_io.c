/* include/masa/io.h alone (it includes masa.h itself) must compile cleanly
 * as C99 and C11 and agree with the library that is linked. */
#include <masa/io.h>

int main(void)
{
    return (masa_dtype_size(MASA_DTYPE_BF16) == 2 &&
            masa_safetensors_tensor_count(NULL) == 0 &&
            masa_model_file(NULL) == NULL &&
            MASA_MODEL_FORMAT_VERSION == 1) ? 0 : 1;
}
