// The public header alone must compile cleanly as C++17 and link from C++.
#include <masa/masa.h>

int main()
{
    masa_layer_options lo;
    masa_layer_options_init(&lo);
    masa_projection p = MASA_PROJ_O;
    return (lo.size == sizeof lo && p == 3 &&
            masa_version_number() == MASA_VERSION_NUMBER) ? 0 : 1;
}
