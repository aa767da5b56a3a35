/*
 * masa compress: a model's attention weights (safetensors) -> a compressed
 * model (io.h's naming scheme) and a report.
 *
 * One projection type at a time: its L weights are read in place from the
 * file's mapping when they are float32 and aligned (converted into buffers
 * otherwise), the L x L Gram and the plan come first, then each group's
 * Matrix PCA, whose atoms and table go to the output's spool at once, then
 * each layer's residual factors. Anonymous memory therefore stays near one
 * projection type's weights (only when they must be converted) plus one
 * group's atoms and two d_in x d_out scratch matrices.
 */
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tool.h"

#define CMD "compress"

typedef struct options {
    const char *in, *out, *pattern, *calib, *report;
    const char *projections;
    bool in_out;          /* tensors stored [d_in, d_out] (else nn.Linear's) */
    size_t n_layers;      /* 0: count them */
    size_t atoms, groups; /* fixed plan: atoms per group, equal groups */
    double remove;        /* budget plan: fraction removed (< 0: unset) */
    size_t rank;          /* residual rank per layer (0: none) */
    size_t threads;
} options;

static const char default_pattern[] = "model.layers.{l}.self_attn.{p}_proj.weight";

static void usage(FILE *f)
{
    fprintf(f,
"usage: masa compress [OPTIONS] IN.safetensors OUT.safetensors\n"
"\n"
"Compresses the attention projections of the model in IN into MASA form\n"
"(DESIGN.md, Matrix PCA): per projection type, consecutive layer groups\n"
"sharing S atoms, plus an optional per-layer low-rank residual (whitened by\n"
"calibration statistics when given). Writes OUT (a compressed model, see\n"
"include/masa/io.h; `masa info OUT` shows it) and a report.\n"
"\n"
"What to compress:\n"
"  --pattern P       tensor names, {l} = layer, {p} = q, k, v or o\n"
"                    (default %s)\n"
"  --layout L        out-in: stored [d_out, d_in] as nn.Linear (default);\n"
"                    in-out: stored [d_in, d_out]\n"
"  --projections S   which of q, k, v, o (default qkvo)\n"
"  --layers N        number of layers (default: counted from the names)\n"
"How much (one of):\n"
"  --atoms S         S atoms per group, with --groups G equal consecutive\n"
"                    groups (default 1)\n"
"  --remove F        remove the fraction F (0 < F < 1) of each projection's\n"
"                    parameters; groups and atoms chosen by the exact planner\n"
"Residual:\n"
"  --rank R          rank-R low-rank correction of every layer's residual\n"
"                    (counted in the --remove budget); default 0, none\n"
"  --calib FILE      calibration statistics (a file of masa_model_writer_add_calib\n"
"                    entries layer{l}.qkv for Q, K, V and layer{l}.o for O):\n"
"                    whitened residual; without it, plain truncated SVD\n"
"Other:\n"
"  --report FILE     report path (default OUT.report.md; - for stdout)\n"
"  --threads N       threads (default: all CPUs)\n"
"  --quiet           no progress on stderr\n"
"  --help            this text\n"
"\n"
"Exit codes: 0 success, 1 the work failed (one line on stderr; OUT is not\n"
"written), 2 bad command line.\n", default_pattern);
}

/* pattern with {l} -> layer and {p} -> projection letter. */
static bool tensor_name(const char *pattern, size_t layer, char p, char *buf,
                        size_t size)
{
    size_t n = 0;
    for (const char *c = pattern; *c; c++) {
        char piece[32];
        const char *add = piece;
        if (!strncmp(c, "{l}", 3)) {
            snprintf(piece, sizeof piece, "%zu", layer);
            c += 2;
        } else if (!strncmp(c, "{p}", 3)) {
            piece[0] = p;
            piece[1] = '\0';
            c += 2;
        } else {
            piece[0] = *c;
            piece[1] = '\0';
        }
        size_t len = strlen(add);
        if (n + len >= size)
            return false;
        memcpy(buf + n, add, len);
        n += len;
    }
    buf[n] = '\0';
    return true;
}

static int proj_index(char p)
{
    const char *letters = "qkvo";
    const char *hit = strchr(letters, p);
    return hit && p ? (int)(hit - letters) : -1;
}

/* Everything kept about one projection type for the report. */
typedef struct group_report {
    size_t first, count, atoms;
    double energy, captured, pca_error;  /* sum ||W||^2, kept, dropped */
    double res_before, res_after;        /* residual error, summed */
    size_t params;                       /* atoms + table + low-rank */
} group_report;

typedef struct proj_report {
    char letter;
    size_t d_in, d_out, n_groups;
    group_report *groups;
    bool whitened;
} proj_report;

typedef struct job {
    const options *o;
    masa_context *ctx;
    masa_safetensors *st;
    masa_model *calib;        /* NULL: no calibration */
    masa_model_writer *w;
    size_t n_layers;
} job;

/* The layer weights of projection p as stored (rows x cols), pointers into
 * the mapping or converted buffers (owned[l] then non-NULL). */
static int load_weights(job *j, char p, const float **mats, float **owned,
                        size_t *rows, size_t *cols)
{
    char name[1024];
    for (size_t l = 0; l < j->n_layers; l++) {
        size_t idx, ndim, bytes;
        const size_t *shape;
        masa_dtype dt;
        const void *data;
        if (!tensor_name(j->o->pattern, l, p, name, sizeof name))
            return tool_error(TOOL_FAILED, CMD, "tensor name too long");
        masa_status s = masa_safetensors_find(j->st, name, &idx);
        if (s != MASA_OK)
            return tool_lib_error(CMD, s);
        masa_safetensors_tensor(j->st, idx, NULL, &dt, &ndim, &shape, &data,
                                &bytes);
        if (ndim != 2)
            return tool_error(TOOL_FAILED, CMD, "%s: %s has %zu dimensions, not 2",
                              j->o->in, name, ndim);
        if (l == 0) {
            *rows = shape[0];
            *cols = shape[1];
        } else if (shape[0] != *rows || shape[1] != *cols) {
            return tool_error(TOOL_FAILED, CMD,
                              "%s: %s is [%zu, %zu] but layer 0's is [%zu, %zu]",
                              j->o->in, name, shape[0], shape[1], *rows, *cols);
        }
        if (dt == MASA_DTYPE_F32 && (uintptr_t)data % sizeof(float) == 0) {
            mats[l] = data;
            continue;
        }
        owned[l] = malloc(bytes / masa_dtype_size(dt) * sizeof(float));
        if (!owned[l])
            return tool_error(TOOL_FAILED, CMD, "out of memory converting %s", name);
        s = masa_safetensors_read_f32(j->st, idx, owned[l], shape[0] * shape[1]);
        if (s != MASA_OK)
            return tool_lib_error(CMD, s);
        mats[l] = owned[l];
    }
    return TOOL_OK;
}

/* dst (cols x rows) = src (rows x cols)^T */
static void transpose(const float *src, size_t rows, size_t cols, float *dst)
{
    const size_t blk = 32;
    for (size_t i0 = 0; i0 < rows; i0 += blk)
        for (size_t j0 = 0; j0 < cols; j0 += blk)
            for (size_t i = i0; i < i0 + blk && i < rows; i++)
                for (size_t k = j0; k < j0 + blk && k < cols; k++)
                    dst[k * rows + i] = src[i * cols + k];
}

/* Group starts and atoms: the planner under the budget, or the fixed plan. */
static int plan(job *j, char p, const double *gram, size_t rows, size_t cols,
                size_t *starts, size_t *atoms, size_t *n_groups)
{
    const options *o = j->o;
    size_t L = j->n_layers, d_in = o->in_out ? rows : cols,
           d_out = o->in_out ? cols : rows;
    if (o->remove < 0) {
        size_t G = o->groups;
        if (G == 0 || G > L)
            return tool_error(TOOL_FAILED, CMD, "--groups %zu: must be 1..%zu layers",
                              G, L);
        for (size_t g = 0, first = 0; g < G; g++) {
            size_t count = L / G + (g < L % G);
            if (o->atoms > count)
                return tool_error(TOOL_FAILED, CMD,
                                  "--atoms %zu exceeds group %zu's %zu layers",
                                  o->atoms, g, count);
            starts[g] = first;
            atoms[g] = o->atoms;
            first += count;
        }
        *n_groups = G;
        return TOOL_OK;
    }
    double dense = (double)L * (double)d_in * (double)d_out;
    double keep = floor((1.0 - o->remove) * dense);
    double residual = (double)o->rank * (double)(d_in + d_out) * (double)L;
    if (keep - residual < (double)(d_in * d_out + L))
        return tool_error(TOOL_FAILED, CMD,
                          "%c: --remove %g keeps %.0f parameters; the rank-%zu residual "
                          "needs %.0f and one atom %zu more: the budget cannot be met",
                          p, o->remove, keep, o->rank, residual, d_in * d_out + L);
    masa_group_plan_result res;
    masa_group_plan_result_init(&res);
    masa_status s = masa_group_plan(j->ctx, L, gram, rows, cols,
                                    (size_t)(keep - residual), starts, atoms,
                                    L, &res);
    if (s != MASA_OK)
        return tool_lib_error(CMD, s);
    *n_groups = res.n_groups;
    return TOOL_OK;
}

static int compress_projection(job *j, char p, proj_report *rep)
{
    const options *o = j->o;
    size_t L = j->n_layers, rows = 0, cols = 0;
    int which = proj_index(p);
    const float **mats = calloc(L, sizeof *mats);
    float **owned = calloc(L, sizeof *owned);
    double *gram = calloc(L * L, sizeof *gram);
    size_t *starts = calloc(L, sizeof *starts), *atoms = calloc(L, sizeof *atoms);
    float *atom_buf = NULL, *tmp = NULL, *w_in_out = NULL, *w_hat = NULL,
          *a = NULL, *b = NULL, *coefs = malloc(L * L * sizeof(float));
    masa_calib *calib = NULL;
    int rc = TOOL_OK;
    masa_status s;
    rep->letter = p;
    if (!mats || !owned || !gram || !starts || !atoms || !coefs) {
        rc = tool_error(TOOL_FAILED, CMD, "out of memory");
        goto out;
    }
    rc = load_weights(j, p, mats, owned, &rows, &cols);
    if (rc != TOOL_OK)
        goto out;
    size_t d_in = o->in_out ? rows : cols, d_out = o->in_out ? cols : rows;
    rep->d_in = d_in;
    rep->d_out = d_out;
    rep->whitened = j->calib != NULL;
    tool_progress("%c: %zu layers of %zu x %zu: Gram", p, L, d_in, d_out);
    s = masa_gram(j->ctx, L, rows, cols, mats, gram, L * L);
    if (s != MASA_OK) {
        rc = tool_lib_error(CMD, s);
        goto out;
    }
    size_t G = 0;
    rc = plan(j, p, gram, rows, cols, starts, atoms, &G);
    if (rc != TOOL_OK)
        goto out;
    rep->n_groups = G;
    rep->groups = calloc(G, sizeof *rep->groups);
    size_t max_atoms = 0;
    for (size_t g = 0; g < G; g++)
        max_atoms = atoms[g] > max_atoms ? atoms[g] : max_atoms;
    size_t mat = rows * cols;
    atom_buf = malloc(max_atoms * mat * sizeof(float));
    tmp = malloc(mat * sizeof(float));
    w_hat = malloc(mat * sizeof(float));
    w_in_out = o->in_out ? NULL : malloc(mat * sizeof(float));
    if (o->rank) {
        a = malloc(d_in * o->rank * sizeof(float));
        b = malloc(o->rank * d_out * sizeof(float));
    }
    if (!rep->groups || !atom_buf || !tmp || !w_hat || (!o->in_out && !w_in_out) ||
        (o->rank && (!a || !b))) {
        rc = tool_error(TOOL_FAILED, CMD, "out of memory");
        goto out;
    }
    for (size_t g = 0; g < G; g++) {
        group_report *gr = &rep->groups[g];
        size_t first = starts[g], count = (g + 1 < G ? starts[g + 1] : L) - first;
        size_t S = atoms[g];
        masa_pca_result pr;
        masa_pca_result_init(&pr);
        s = masa_matrix_pca(j->ctx, count, rows, cols, mats + first,
                            gram + first * L + first, L, S, atom_buf, S * mat,
                            coefs, count * S, NULL, &pr);
        if (s != MASA_OK) {
            rc = tool_lib_error(CMD, s);
            goto out;
        }
        *gr = (group_report){first, count, S, pr.total_energy,
                             pr.captured_energy, pr.residual_energy, 0, 0,
                             S * (d_in * d_out + count)};
        tool_progress("%c: group %zu/%zu, layers %zu-%zu: %zu atoms capture %.2f%% of the energy",
                      p, g + 1, G, first, first + count - 1, S,
                      pr.total_energy > 0 ? 100.0 * pr.captured_energy / pr.total_energy : 0.0);
        if (!o->in_out) /* atoms into the library's d_in x d_out layout */
            for (size_t k = 0; k < S; k++) {
                memcpy(tmp, atom_buf + k * mat, mat * sizeof(float));
                transpose(tmp, rows, cols, atom_buf + k * mat);
            }
        masa_dictionary *dict;
        masa_coefficients *coef;
        s = masa_dictionary_wrap(j->ctx, S, d_in, d_out, atom_buf, &dict);
        if (s == MASA_OK) {
            s = masa_coefficients_wrap(j->ctx, count, S, coefs, &coef);
            if (s != MASA_OK)
                masa_dictionary_destroy(dict);
        }
        if (s == MASA_OK) {
            s = masa_model_writer_add_group(j->w, (masa_projection)which, first,
                                            dict, coef);
            for (size_t l = first; s == MASA_OK && o->rank && l < first + count; l++) {
                const float *w = mats[l];
                if (!o->in_out) {
                    transpose(mats[l], rows, cols, w_in_out);
                    w = w_in_out;
                }
                s = masa_compose(dict, coef, l - first, w_hat, mat);
                const double *cdata = NULL;
                if (s == MASA_OK && j->calib) {
                    char cname[64];
                    snprintf(cname, sizeof cname, "layer%zu.%s", l,
                             p == 'o' ? "o" : "qkv");
                    masa_calib_destroy(calib);
                    calib = NULL;
                    s = masa_model_calib(j->calib, cname, &calib);
                    size_t dim = 0;
                    if (s == MASA_OK)
                        masa_calib_shape(calib, &dim, NULL);
                    if (s == MASA_OK && dim != d_in) {
                        masa_dictionary_destroy(dict);
                        masa_coefficients_destroy(coef);
                        rc = tool_error(TOOL_FAILED, CMD,
                                        "%s: calibration %s is %zu x %zu, projection %c's input has %zu features",
                                        o->calib, cname, dim, dim, p, d_in);
                        goto out;
                    }
                    cdata = masa_calib_data(calib);
                }
                masa_residual_result rr;
                masa_residual_result_init(&rr);
                if (s == MASA_OK)
                    s = masa_residual_lowrank(j->ctx, d_in, d_out, w, w_hat, cdata,
                                              o->rank, a, d_in * o->rank, b,
                                              o->rank * d_out, &rr);
                if (s == MASA_OK)
                    s = masa_model_writer_add_lowrank(j->w, (masa_projection)which,
                                                      l, d_in, d_out, o->rank, a, b);
                if (s == MASA_OK) {
                    gr->res_before += rr.error_before;
                    gr->res_after += rr.error_after;
                    gr->params += o->rank * (d_in + d_out);
                    tool_progress("%c: layer %zu: rank %zu residual, error %.4g -> %.4g%s",
                                  p, l, o->rank, rr.error_before, rr.error_after,
                                  j->calib ? " (whitened)" : "");
                }
            }
            masa_dictionary_destroy(dict);
            masa_coefficients_destroy(coef);
        }
        if (s != MASA_OK) {
            rc = tool_lib_error(CMD, s);
            goto out;
        }
    }
out:
    masa_calib_destroy(calib);
    for (size_t l = 0; owned && l < L; l++)
        free(owned[l]);
    free(owned);
    free(mats);
    free(gram);
    free(starts);
    free(atoms);
    free(atom_buf);
    free(tmp);
    free(w_in_out);
    free(w_hat);
    free(a);
    free(b);
    free(coefs);
    return rc;
}

static void write_report(FILE *f, const options *o, const proj_report *reps,
                         size_t n, size_t L)
{
    fprintf(f, "# masa compress report\n\n");
    fprintf(f, "input `%s`, output `%s`, %zu layers; ", o->in, o->out, L);
    if (o->remove >= 0)
        fprintf(f, "budget: remove %.4g of each projection's parameters", o->remove);
    else
        fprintf(f, "%zu atoms in each of %zu groups", o->atoms, o->groups);
    fprintf(f, "; residual rank %zu%s.\n\n", o->rank,
            o->rank ? (o->calib ? " (whitened by the calibration statistics)"
                                : " (plain SVD, no calibration)")
                    : "");
    fprintf(f, "Energy = sum of ||W_l||_F^2 over the group's layers; captured = "
               "the kept eigenvalues' share; PCA error = ||W - W_masa||^2 / energy; "
               "residual error = sum over layers of ||R^T (W - W_masa - A B)||_F^2 "
               "(R R^T = C; C = I without calibration), before and after the "
               "low-rank term.\n\n");
    fprintf(f, "| proj | layers | S | rank | captured | PCA error | residual error before | after | params kept | dense params | kept |\n");
    fprintf(f, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    double all_kept = 0, all_dense = 0;
    for (size_t i = 0; i < n; i++) {
        const proj_report *r = &reps[i];
        double kept = 0, dense = 0;
        for (size_t g = 0; g < r->n_groups; g++) {
            const group_report *gr = &r->groups[g];
            double d = (double)gr->count * (double)r->d_in * (double)r->d_out;
            double e = gr->energy > 0 ? gr->energy : 1;
            fprintf(f, "| %c | %zu-%zu | %zu | %zu | %.2f%% | %.4f | ", r->letter,
                    gr->first, gr->first + gr->count - 1, gr->atoms, o->rank,
                    100.0 * gr->captured / e, gr->pca_error / e);
            if (o->rank)
                fprintf(f, "%.6g | %.6g | ", gr->res_before, gr->res_after);
            else
                fprintf(f, "- | - | ");
            fprintf(f, "%zu | %.0f | %.2f%% |\n", gr->params, d,
                    100.0 * (double)gr->params / d);
            kept += (double)gr->params;
            dense += d;
        }
        fprintf(f, "| %c | all | | | | | | | %.0f | %.0f | %.2f%% |\n", r->letter,
                kept, dense, 100.0 * kept / dense);
        all_kept += kept;
        all_dense += dense;
    }
    if (all_dense > 0)
        fprintf(f, "| all | | | | | | | | %.0f | %.0f | %.2f%% |\n", all_kept,
                all_dense, 100.0 * all_kept / all_dense);
}

/* Counts layers: names for layer 0, 1, ... of the first projection. */
static size_t count_layers(const options *o, masa_safetensors *st)
{
    char name[1024];
    size_t l = 0, idx;
    while (tensor_name(o->pattern, l, o->projections[0], name, sizeof name) &&
           masa_safetensors_find(st, name, &idx) == MASA_OK)
        l++;
    return l;
}

static int parse(int argc, char **argv, options *o)
{
    static const struct option longs[] = {
        {"pattern", required_argument, NULL, 'p'},
        {"layout", required_argument, NULL, 'y'},
        {"projections", required_argument, NULL, 'j'},
        {"layers", required_argument, NULL, 'l'},
        {"atoms", required_argument, NULL, 'a'},
        {"groups", required_argument, NULL, 'g'},
        {"remove", required_argument, NULL, 'r'},
        {"rank", required_argument, NULL, 'k'},
        {"calib", required_argument, NULL, 'c'},
        {"report", required_argument, NULL, 'o'},
        {"threads", required_argument, NULL, 't'},
        {"quiet", no_argument, NULL, 'q'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    *o = (options){.pattern = default_pattern, .projections = "qkvo",
                   .groups = 1, .remove = -1};
    bool groups_given = false;
    int c;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, "hq", longs, NULL)) != -1) {
        bool ok = true;
        switch (c) {
        case 'p': o->pattern = optarg; ok = strstr(optarg, "{l}") != NULL; break;
        case 'y':
            ok = !strcmp(optarg, "out-in") || !strcmp(optarg, "in-out");
            o->in_out = !strcmp(optarg, "in-out");
            break;
        case 'j':
            o->projections = optarg;
            ok = *optarg != '\0';
            for (const char *q = optarg; *q; q++)
                ok = ok && proj_index(*q) >= 0 && strchr(q + 1, *q) == NULL;
            break;
        case 'l': ok = tool_parse_size(optarg, &o->n_layers) && o->n_layers; break;
        case 'a': ok = tool_parse_size(optarg, &o->atoms) && o->atoms; break;
        case 'g':
            ok = tool_parse_size(optarg, &o->groups) && o->groups;
            groups_given = true;
            break;
        case 'r': ok = tool_parse_double(optarg, &o->remove) && o->remove > 0 && o->remove < 1; break;
        case 'k': ok = tool_parse_size(optarg, &o->rank); break;
        case 'c': o->calib = optarg; break;
        case 'o': o->report = optarg; break;
        case 't': ok = tool_parse_size(optarg, &o->threads); break;
        case 'q': tool_quiet = true; break;
        case 'h': usage(stdout); return -1;
        default:
            return tool_error(TOOL_USAGE, CMD, "unknown option or missing value: %s "
                              "(masa compress --help)", argv[optind - 1]);
        }
        if (!ok)
            return tool_error(TOOL_USAGE, CMD, "bad value \"%s\" for %s (masa compress --help)",
                              optarg, argv[optind - 1]);
    }
    if (argc - optind != 2)
        return tool_error(TOOL_USAGE, CMD, "needs IN and OUT (masa compress --help)");
    o->in = argv[optind];
    o->out = argv[optind + 1];
    if ((o->atoms != 0) == (o->remove >= 0))
        return tool_error(TOOL_USAGE, CMD, "give exactly one of --atoms and --remove");
    if (groups_given && o->remove >= 0)
        return tool_error(TOOL_USAGE, CMD, "--groups goes with --atoms (--remove plans the groups)");
    if (o->calib && !o->rank)
        return tool_error(TOOL_USAGE, CMD, "--calib needs --rank (it whitens the residual)");
    return TOOL_OK;
}

int cmd_compress(int argc, char **argv)
{
    options o;
    int rc = parse(argc, argv, &o);
    if (rc != TOOL_OK)
        return rc < 0 ? TOOL_OK : rc;
    masa_context_options co;
    masa_context_options_init(&co);
    co.n_threads = o.threads;
    job j = {.o = &o};
    size_t np = strlen(o.projections);
    proj_report *reps = calloc(np, sizeof *reps);
    masa_status s = masa_context_create(&co, &j.ctx);
    if (s != MASA_OK)
        return tool_lib_error(CMD, s);
    if (!reps) {
        rc = tool_error(TOOL_FAILED, CMD, "out of memory");
        goto out;
    }
    s = masa_safetensors_open(j.ctx, o.in, &j.st);
    if (s == MASA_OK && o.calib)
        s = masa_model_open(j.ctx, o.calib, &j.calib);
    if (s != MASA_OK) {
        rc = tool_lib_error(CMD, s);
        goto out;
    }
    j.n_layers = o.n_layers ? o.n_layers : count_layers(&o, j.st);
    if (j.n_layers == 0) {
        char name[1024];
        tensor_name(o.pattern, 0, o.projections[0], name, sizeof name);
        rc = tool_error(TOOL_FAILED, CMD, "%s: no tensor \"%s\" (see --pattern)",
                        o.in, name);
        goto out;
    }
    tool_progress("%s: %zu layers, projections %s", o.in, j.n_layers, o.projections);
    s = masa_model_writer_create(j.ctx, o.out, j.n_layers, &j.w);
    if (s == MASA_OK)
        s = masa_model_writer_set_metadata(j.w, "source", o.in);
    if (s != MASA_OK) {
        rc = tool_lib_error(CMD, s);
        goto out;
    }
    for (size_t i = 0; i < np && rc == TOOL_OK; i++)
        rc = compress_projection(&j, o.projections[i], &reps[i]);
    if (rc != TOOL_OK)
        goto out;
    tool_progress("writing %s", o.out);
    s = masa_model_writer_finish(j.w);
    if (s != MASA_OK) {
        rc = tool_lib_error(CMD, s);
        goto out;
    }
    char report_path[4096];
    FILE *f = stdout;
    if (!o.report || strcmp(o.report, "-")) {
        snprintf(report_path, sizeof report_path, "%s",
                 o.report ? o.report : o.out);
        if (!o.report)
            strncat(report_path, ".report.md",
                    sizeof report_path - strlen(report_path) - 1);
        f = fopen(report_path, "w");
        if (!f) {
            rc = tool_error(TOOL_FAILED, CMD, "%s: cannot write the report", report_path);
            goto out;
        }
    }
    write_report(f, &o, reps, np, j.n_layers);
    if (f != stdout && fclose(f) != 0)
        rc = tool_error(TOOL_FAILED, CMD, "%s: writing the report failed", report_path);
    else
        tool_progress("done: %s%s%s", o.out, f != stdout ? ", report " : "",
                      f != stdout ? report_path : "");
out:
    for (size_t i = 0; reps && i < np; i++)
        free(reps[i].groups);
    free(reps);
    masa_model_writer_destroy(j.w);
    masa_model_close(j.calib);
    masa_safetensors_close(j.st);
    masa_context_destroy(j.ctx);
    return rc;
}
