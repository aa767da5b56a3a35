/* The public header alone must compile cleanly as C99 and C11 (see
 * tests/abi/meson.build for the flags) and its macros must agree with the
 * library that is linked. */
#include <masa/masa.h>

int main(void)
{
    masa_context_options co;
    masa_layer_options lo;
    masa_layer_grads g;
    masa_context_options_init(&co);
    masa_layer_options_init(&lo);
    masa_layer_grads_init(&g);
    if (co.size != sizeof co || lo.size != sizeof lo || g.size != sizeof g)
        return 1;
    return masa_version_number() == MASA_VERSION_NUMBER ? 0 : 1;
}
