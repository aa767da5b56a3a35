/* Shared declarations of the `masa` tool's commands. */
#ifndef MASA_TOOL_H
#define MASA_TOOL_H

#include <stdbool.h>
#include <stddef.h>

#include <masa/masa.h>

/* Exit codes of every command. */
enum {
    TOOL_OK = 0,
    TOOL_FAILED = 1, /* the work failed: bad file, I/O, impossible budget */
    TOOL_USAGE = 2   /* bad command line */
};

/* One line "masa <command>: <message>" on stderr; returns code. */
int tool_error(int code, const char *command, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* The failing call's status and masa_last_error() as one line. */
int tool_lib_error(const char *command, masa_status status);

/* Progress on stderr (unless quiet), prefixed with the elapsed seconds. */
void tool_progress(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
extern bool tool_quiet;
void tool_start_clock(void);

/* Parses a non-negative integer / a number; false if it is not one. */
bool tool_parse_size(const char *s, size_t *out);
bool tool_parse_double(const char *s, double *out);

int cmd_info(int argc, char **argv);
int cmd_compress(int argc, char **argv);

#endif
