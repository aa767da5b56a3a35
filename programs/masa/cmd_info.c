/* masa info FILE: what a safetensors file holds. */
#include <stdio.h>
#include <string.h>

#include "tool.h"

static const char *const kind_names[] = {"absent", "masa", "dense", "lowrank"};
static const char proj_letters[] = "qkvo";

static void print_shape(size_t ndim, const size_t *shape)
{
    putchar('[');
    for (size_t d = 0; d < ndim; d++)
        printf("%s%zu", d ? ", " : "", shape[d]);
    putchar(']');
}

/* The compressed-model view, when the file is one. */
static void print_model(masa_model *m)
{
    size_t n_layers;
    masa_model_layers(m, &n_layers);
    printf("\ncompressed model: %zu layers\n", n_layers);
    for (int p = 0; p < MASA_NUM_PROJECTIONS; p++) {
        masa_model_kind kind;
        size_t d_in, d_out, n_groups;
        masa_model_projection(m, (masa_projection)p, &kind, &d_in, &d_out,
                              &n_groups);
        if (kind == MASA_MODEL_ABSENT)
            continue;
        printf("  %c: %s, %zu x %zu", proj_letters[p], kind_names[kind], d_in,
               d_out);
        for (size_t g = 0; g < n_groups; g++) {
            size_t first, count, atoms, unused;
            masa_dictionary *dict;
            masa_model_group(m, (masa_projection)p, g, &first, &count, &dict, NULL);
            masa_dictionary_shape(dict, &atoms, &unused, &unused);
            printf("%s layers %zu-%zu: %zu atoms", g ? "," : ";", first,
                   first + count - 1, atoms);
        }
        printf("; ranks");
        for (size_t l = 0; l < n_layers; l++) {
            size_t rank;
            masa_model_lowrank(m, (masa_projection)p, l, &rank, NULL, NULL);
            printf("%s%zu", l ? "," : " ", rank);
        }
        putchar('\n');
    }
    size_t nc = masa_model_calib_count(m);
    if (nc)
        printf("  calibration statistics: %zu entries\n", nc);
}

static void usage(FILE *f)
{
    fprintf(f, "usage: masa info FILE\n"
               "Lists the tensors (name, dtype, shape, bytes) and metadata of a\n"
               "safetensors file; for a compressed model also its projections,\n"
               "groups and ranks.\n");
}

int cmd_info(int argc, char **argv)
{
    if (argc == 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
        usage(stdout);
        return TOOL_OK;
    }
    if (argc != 2 || argv[1][0] == '-')
        return tool_error(TOOL_USAGE, "info", "needs one FILE (masa info --help)");
    const char *path = argv[1];
    masa_context *ctx;
    masa_context_options o;
    masa_context_options_init(&o);
    o.n_threads = 1;
    masa_status s = masa_context_create(&o, &ctx);
    if (s != MASA_OK)
        return tool_lib_error("info", s);
    masa_safetensors *st;
    s = masa_safetensors_open(ctx, path, &st);
    if (s != MASA_OK) {
        int rc = tool_lib_error("info", s);
        masa_context_destroy(ctx);
        return rc;
    }
    size_t n = masa_safetensors_tensor_count(st), total = 0;
    printf("%s: %zu tensors\n", path, n);
    for (size_t i = 0; i < n; i++) {
        const char *name;
        masa_dtype dt;
        size_t ndim, bytes;
        const size_t *shape;
        masa_safetensors_tensor(st, i, &name, &dt, &ndim, &shape, NULL, &bytes);
        printf("  %-8s ", masa_dtype_name(dt));
        print_shape(ndim, shape);
        printf(" %zu bytes  %s\n", bytes, name);
        total += bytes;
    }
    printf("data: %zu bytes\n", total);
    size_t nm = masa_safetensors_metadata_count(st);
    if (nm)
        printf("metadata:\n");
    for (size_t i = 0; i < nm; i++) {
        const char *k, *v;
        masa_safetensors_metadata_entry(st, i, &k, &v);
        printf("  %s: %s\n", k, v);
    }
    masa_safetensors_close(st);
    masa_model *m;
    int rc = TOOL_OK;
    s = masa_model_open(ctx, path, &m);
    if (s == MASA_OK) {
        print_model(m);
        masa_model_close(m);
    } else if (strstr(masa_last_error(), "not a compressed model") == NULL) {
        /* it claims to be one and is broken */
        rc = tool_lib_error("info", s);
    }
    masa_context_destroy(ctx);
    return rc;
}
