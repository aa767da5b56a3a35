/* Run-time version of the library actually loaded. */
#include "common/internal.h"

MASA_API unsigned masa_version_number(void)
{
    return MASA_VERSION_NUMBER;
}

MASA_API const char *masa_version_string(void)
{
    return MASA_VERSION_STRING;
}
