/*
 * masa: command-line tool of libmasa.
 *
 *   masa info FILE                 tensors, dtypes, shapes, metadata (and the
 *                                  layout of a compressed model)
 *   masa compress [OPTIONS] IN OUT compress a model's attention (see
 *                                  `masa compress --help`)
 *
 * Exit codes: 0 success, 1 the work failed (the reason on stderr as one
 * line), 2 a bad command line.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tool.h"

bool tool_quiet;

int tool_error(int code, const char *command, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "masa %s: ", command);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return code;
}

int tool_lib_error(const char *command, masa_status status)
{
    const char *msg = masa_last_error();
    return tool_error(TOOL_FAILED, command, "%s (%s)",
                      msg[0] ? msg : "failed", masa_status_string(status));
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double start;

void tool_start_clock(void)
{
    start = now();
}

void tool_progress(const char *fmt, ...)
{
    if (tool_quiet)
        return;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "[%7.1fs] ", now() - start);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

bool tool_parse_size(const char *s, size_t *out)
{
    char *end;
    if (!s || !*s || *s == '-')
        return false;
    unsigned long long v = strtoull(s, &end, 10);
    if (*end || v > SIZE_MAX)
        return false;
    *out = (size_t)v;
    return true;
}

bool tool_parse_double(const char *s, double *out)
{
    char *end;
    if (!s || !*s)
        return false;
    *out = strtod(s, &end);
    return *end == '\0';
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: masa COMMAND [ARGS]\n"
            "\n"
            "Commands:\n"
            "  info FILE                  list a safetensors file: tensors, dtypes,\n"
            "                             shapes, metadata; the layout of a\n"
            "                             compressed model\n"
            "  compress [OPTIONS] IN OUT  compress the attention of the model in\n"
            "                             IN into OUT (masa compress --help)\n"
            "  --help                     this text\n"
            "  --version                  libmasa's version\n"
            "\n"
            "Exit codes: 0 success, 1 the work failed (reason on stderr), 2 bad\n"
            "command line.\n");
}

int main(int argc, char **argv)
{
    tool_start_clock();
    if (argc < 2) {
        fprintf(stderr, "masa: needs a command (masa --help lists them)\n");
        return TOOL_USAGE;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
        usage(stdout);
        return TOOL_OK;
    }
    if (!strcmp(cmd, "--version")) {
        printf("masa (libmasa) %s\n", masa_version_string());
        return TOOL_OK;
    }
    if (!strcmp(cmd, "info"))
        return cmd_info(argc - 1, argv + 1);
    if (!strcmp(cmd, "compress"))
        return cmd_compress(argc - 1, argv + 1);
    fprintf(stderr, "masa: unknown command \"%s\" (masa --help lists them)\n", cmd);
    return TOOL_USAGE;
}
