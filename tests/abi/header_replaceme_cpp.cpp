// include/masa/replaceme.h alone must compile cleanly as C++17 and link.
#include <masa/replaceme.h>

int main()
{
    masa_cosine_options o;
    masa_cosine_options_init(&o);
    masa_linear_estimator_destroy(nullptr);
    return o.size == sizeof o ? 0 : 1;
}
