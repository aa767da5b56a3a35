/* Status strings and the per-thread message behind masa_last_error(). */
#include <stdarg.h>
#include <stdio.h>

#include "common/internal.h"

static _Thread_local char last_message[512];

masa_status masa__fail(masa_status status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_message, sizeof last_message, fmt, ap);
    va_end(ap);
    return status;
}

void masa__clear_error(void)
{
    last_message[0] = '\0';
}

MASA_API const char *masa_last_error(void)
{
    return last_message;
}

MASA_API const char *masa_status_string(masa_status status)
{
    switch (status) {
    case MASA_OK: return "ok";
    case MASA_ERROR_NULL_ARGUMENT: return "null argument";
    case MASA_ERROR_INVALID_ARGUMENT: return "invalid argument";
    case MASA_ERROR_BAD_SHAPE: return "bad shape";
    case MASA_ERROR_OUT_OF_RANGE: return "index out of range";
    case MASA_ERROR_BUFFER_TOO_SMALL: return "buffer too small";
    case MASA_ERROR_OVERFLOW: return "size overflow";
    case MASA_ERROR_OUT_OF_MEMORY: return "out of memory";
    case MASA_ERROR_BAD_STRUCT_SIZE: return "bad options struct size";
    case MASA_ERROR_NOT_READY: return "layer not ready";
    case MASA_ERROR_THREAD: return "thread creation failed";
    case MASA_ERROR_INTERNAL: return "internal error";
    case MASA_ERROR_IO: return "input/output error";
    case MASA_ERROR_BAD_FORMAT: return "malformed file";
    case MASA_ERROR_NOT_FOUND: return "not found";
    }
    return "unknown status";
}
