/*
 * MP-PCA window solver: the Marchenko-Pastur cut-off and the signal eigenvectors of a batch of small
 * symmetric (Gram) matrices, without a full eigendecomposition.
 *
 * For each n x n matrix G (all in float64):
 *   0. G is summed from parts (the Gram matrices of a window's z-planes, shared between windows),
 *      less the outer product of the window mean where the caller asks for demeaning;
 *   1. Householder reduction to tridiagonal form T = Q' G Q, eight matrices at a time interleaved
 *      (every inner loop is one 8-wide vector operation, whatever n is), each step's rank-2 update
 *      sharing one sweep with the next step's matrix-vector product;
 *   2. eigenvalues of T by Sturm-sequence bisection finished by safeguarded Newton steps, only those
 *      the cut-off needs: the smallest, then from the largest down until the Marchenko-Pastur noise
 *      condition holds. The cumulative sums of the noise eigenvalues come from the trace
 *      (trace(T) = trace(G)), so the bulk of the noise spectrum is never resolved;
 *   3. the eigenvectors of the signal eigenvalues only, by inverse iteration on T (Gram-Schmidt
 *      within clusters of close eigenvalues), mapped back through the Householder reflectors.
 * The cut-off rule is the one of bids_denoise.methods.mppca.marchenko_pastur_cutoff (MRtrix3 3.0
 * dwidenoise): scanning p = r-1, r-2, ... the first p at which sigsq2 < sigsq1 gives the noise count.
 *
 * Called through ctypes, which releases the GIL for the call; each call allocates its own buffers,
 * so calls from several threads run in parallel. No Python API is used: the module init at the end
 * only lets setuptools build the file as an extension.
 */
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define LANES 8

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTIVERSION
#endif

/* Eight lanes as one vector (GCC/Clang vector extension: one AVX-512 register, or two AVX2, or
 * four SSE2 ones, as the target allows). Lane buffers are allocated 64-byte aligned. */
typedef double vec8 __attribute__((vector_size(LANES * sizeof(double))));

/* The reflector of step k from column k (rows k+1..n-1, up to date): v_k into row k of H
 * (v_k[k+1] = 1), its factor tau[k], the sub-diagonal e[k] and the diagonal d[k]. */
MULTIVERSION
static void reflector(int n, int k, const double *restrict A, double *restrict d, double *restrict e,
                      double *restrict tau, double *restrict H)
{
    const int m0 = k + 1;
    const vec8 *Av = (const vec8 *)A;
    vec8 *v = (vec8 *)H + (size_t)k * n;
    vec8 norm2 = {0};
    for (int i = m0 + 1; i < n; ++i) {
        const vec8 a = Av[(size_t)i * n + k];
        norm2 += a * a;
    }
    double scale[LANES] __attribute__((aligned(64)));
    for (int l = 0; l < LANES; ++l) {
        const double alpha = A[((size_t)m0 * n + k) * LANES + l];
        d[k * LANES + l] = A[((size_t)k * n + k) * LANES + l];
        if (norm2[l] == 0.0) { /* already tridiagonal in this column: H = I */
            tau[k * LANES + l] = 0.0;
            scale[l] = 0.0;
            e[k * LANES + l] = alpha;
        } else {
            const double norm = sqrt(alpha * alpha + norm2[l]);
            const double beta = alpha >= 0.0 ? -norm : norm;
            tau[k * LANES + l] = (beta - alpha) / beta;
            scale[l] = 1.0 / (alpha - beta);
            e[k * LANES + l] = beta;
        }
    }
    const vec8 factor = *(const vec8 *)scale;
    const vec8 one = {1, 1, 1, 1, 1, 1, 1, 1};
    v[m0] = one;
    for (int i = m0 + 1; i < n; ++i) v[i] = Av[(size_t)i * n + k] * factor;
}

/* Reduce LANES interleaved symmetric matrices A[(i*n + j)*LANES + l] (lower triangle read and
 * updated) to tridiagonal form: diagonal d, sub-diagonal e (n*LANES each), reflectors in H (row k
 * holds v_k with v_k[k+1] = 1) and their factors tau. p, w: n*LANES scratch each.
 * Step k's rank-2 update and step k+1's product with the trailing matrix share one sweep over it
 * (the next reflector is formed first, from the updated column k+1 alone). */
MULTIVERSION
static void tridiagonalize(int n, double *restrict A, double *restrict d, double *restrict e,
                           double *restrict tau, double *restrict H, double *restrict p, double *restrict w)
{
    vec8 *Av = (vec8 *)A, *P = (vec8 *)p, *W = (vec8 *)w;
    const vec8 *T = (const vec8 *)tau;
    const vec8 zero = {0};
    if (n > 2) {
        /* step 0's product p = tau A22 v from the lower triangle */
        reflector(n, 0, A, d, e, tau, H);
        const vec8 *v = (const vec8 *)H;
        for (int i = 1; i < n; ++i) P[i] = zero;
        for (int i = 1; i < n; ++i) {
            const vec8 *row = Av + (size_t)i * n;
            const vec8 vi = v[i];
            vec8 acc = row[i] * vi;
            for (int j = 1; j < i; ++j) {
                const vec8 a = row[j];
                acc += a * v[j];
                P[j] += a * vi;
            }
            P[i] += acc;
        }
        for (int i = 1; i < n; ++i) P[i] *= T[0];
    }
    for (int k = 0; k < n - 2; ++k) {
        const int m0 = k + 1;
        const vec8 *v = (const vec8 *)H + (size_t)k * n;
        /* w = p - (tau/2)(p.v) v */
        vec8 c = zero;
        for (int i = m0; i < n; ++i) c += P[i] * v[i];
        c *= 0.5 * T[k];
        for (int i = m0; i < n; ++i) W[i] = P[i] - c * v[i];
        /* column m0 first (rows m0..n-1): the next reflector needs it */
        for (int i = m0; i < n; ++i) Av[(size_t)i * n + m0] -= v[i] * W[m0] + W[i] * v[m0];
        if (k + 1 < n - 2) {
            reflector(n, k + 1, A, d, e, tau, H);
            const vec8 *u = (const vec8 *)H + (size_t)(k + 1) * n;
            for (int i = m0 + 1; i < n; ++i) P[i] = zero;
            /* rows m0+1..: update (step k) and product with u (step k+1) in one pass */
            for (int i = m0 + 1; i < n; ++i) {
                vec8 *row = Av + (size_t)i * n;
                const vec8 vi = v[i], wi = W[i], ui = u[i];
                vec8 acc = zero;
                for (int j = m0 + 1; j < i; ++j) {
                    const vec8 a = row[j] - (vi * W[j] + wi * v[j]);
                    row[j] = a;
                    P[j] += a * ui;
                    acc += a * u[j];
                }
                const vec8 a = row[i] - 2.0 * vi * wi;
                row[i] = a;
                P[i] += acc + a * ui;
            }
            for (int i = m0 + 1; i < n; ++i) P[i] *= T[k + 1];
        } else {
            for (int i = m0 + 1; i < n; ++i) {
                vec8 *row = Av + (size_t)i * n;
                const vec8 vi = v[i], wi = W[i];
                for (int j = m0 + 1; j <= i; ++j) row[j] -= vi * W[j] + wi * v[j];
            }
        }
    }
    for (int l = 0; l < LANES; ++l) {
        if (n >= 2) {
            d[(n - 2) * LANES + l] = A[((size_t)(n - 2) * n + n - 2) * LANES + l];
            e[(n - 2) * LANES + l] = A[((size_t)(n - 1) * n + n - 2) * LANES + l];
        }
        d[(n - 1) * LANES + l] = A[((size_t)(n - 1) * n + n - 1) * LANES + l];
        e[(n - 1) * LANES + l] = 0.0;
    }
}

/* Sturm count, and Newton's correction for a root of det(T - x I), at x (per lane) for one lane
 * group: q_i = d_i - x - e_{i-1}^2 / q_{i-1} (tiny pivots replaced by -pivmin); the count of
 * negative q_i is the number of eigenvalues below x; det = prod q_i, so det'/det = sum q_i' / q_i
 * with q_i' = -1 + e_{i-1}^2 q_{i-1}' / q_{i-1}^2. Two independent points per sweep (x and y) hide
 * the latency of the division. */
MULTIVERSION
static void sturm2(int n, const double *restrict d, const double *restrict e2, const double *restrict pivmin,
                   const double *restrict x, const double *restrict y, double *restrict count_x,
                   double *restrict count_y, double *restrict step_x, double *restrict step_y)
{
    double rx[LANES], ry[LANES], dx[LANES], dy[LANES], sx[LANES], sy[LANES];
    for (int l = 0; l < LANES; ++l) {
        double a = d[l] - x[l], b = d[l] - y[l];
        a = fabs(a) < pivmin[l] ? -pivmin[l] : a;
        b = fabs(b) < pivmin[l] ? -pivmin[l] : b;
        rx[l] = 1.0 / a;
        ry[l] = 1.0 / b;
        dx[l] = dy[l] = -1.0;
        sx[l] = -rx[l];
        sy[l] = -ry[l];
        count_x[l] = a < 0.0 ? 1.0 : 0.0;
        count_y[l] = b < 0.0 ? 1.0 : 0.0;
    }
    for (int i = 1; i < n; ++i)
        for (int l = 0; l < LANES; ++l) {
            const double off = e2[(i - 1) * LANES + l];
            double a = d[i * LANES + l] - x[l] - off * rx[l];
            double b = d[i * LANES + l] - y[l] - off * ry[l];
            a = fabs(a) < pivmin[l] ? -pivmin[l] : a;
            b = fabs(b) < pivmin[l] ? -pivmin[l] : b;
            dx[l] = -1.0 + off * dx[l] * rx[l] * rx[l];
            dy[l] = -1.0 + off * dy[l] * ry[l] * ry[l];
            rx[l] = 1.0 / a;
            ry[l] = 1.0 / b;
            sx[l] += dx[l] * rx[l];
            sy[l] += dy[l] * ry[l];
            count_x[l] += a < 0.0 ? 1.0 : 0.0;
            count_y[l] += b < 0.0 ? 1.0 : 0.0;
        }
    for (int l = 0; l < LANES; ++l) {
        step_x[l] = -1.0 / sx[l]; /* Newton: x - det / det' */
        step_y[l] = -1.0 / sy[l];
    }
}

/* Search state of one eigenvalue per lane: the index (0-based, ascending; < 0: no search), a
 * bracket [lo, hi] with the Sturm counts at its ends where known (-1: unknown), the next point. */
struct search {
    int index[LANES];
    double lo[LANES], hi[LANES], count_lo[LANES], count_hi[LANES], x[LANES], value[LANES];
    double dx[LANES], dx_old[LANES]; /* the last two moves */
    int done[LANES];
};

static void search_start(struct search *s, int l, int index, double lo, double hi)
{
    s->index[l] = index;
    s->lo[l] = lo;
    s->hi[l] = hi;
    s->count_lo[l] = -1.0;
    s->count_hi[l] = -1.0;
    s->x[l] = 0.5 * (lo + hi);
    s->dx[l] = s->dx_old[l] = hi - lo;
    s->done[l] = index < 0;
    s->value[l] = 0.0;
}

/* One evaluation's outcome: shrink the bracket by the count; next point by Newton where the bracket
 * holds this eigenvalue alone, the step stays inside and it is under half the move before last (fast
 * convergence), by bisection otherwise. Converged when the bracket or the Newton step is below tol. */
static void search_update(struct search *s, int l, double count, double step, double tol)
{
    if (s->done[l]) return;
    const double x = s->x[l];
    if (count > s->index[l] + 0.5) {
        s->hi[l] = x;
        s->count_hi[l] = count;
    } else {
        s->lo[l] = x;
        s->count_lo[l] = count;
    }
    const double target = s->index[l];
    const int alone = s->count_lo[l] == target && s->count_hi[l] == target + 1.0;
    const double newton = x + step;
    if (s->hi[l] - s->lo[l] <= tol) {
        s->done[l] = 1;
        s->value[l] = 0.5 * (s->lo[l] + s->hi[l]);
    } else if (alone && fabs(step) <= tol && newton >= s->lo[l] && newton <= s->hi[l]) {
        /* converged (x + step may round to x itself) */
        s->done[l] = 1;
        s->value[l] = newton;
    } else if (alone && newton > s->lo[l] && newton < s->hi[l] && fabs(step) < 0.5 * s->dx_old[l]) {
        s->dx_old[l] = s->dx[l];
        s->dx[l] = fabs(step);
        s->x[l] = newton;
    } else {
        s->x[l] = 0.5 * (s->lo[l] + s->hi[l]);
        s->dx_old[l] = s->dx[l];
        s->dx[l] = 0.5 * (s->hi[l] - s->lo[l]);
    }
}

/* Two eigenvalues per lane at once (searches a and b), each to an absolute tolerance tol[l]. */
static void eigenvalues2(int n, const double *d, const double *e2, const double *pivmin, const double *tol,
                         struct search *a, struct search *b)
{
    double count_a[LANES], count_b[LANES], step_a[LANES], step_b[LANES];
    for (int iteration = 0; iteration < 200; ++iteration) {
        int open = 0;
        for (int l = 0; l < LANES; ++l) open |= !a->done[l] || !b->done[l];
        if (!open) break;
        sturm2(n, d, e2, pivmin, a->x, b->x, count_a, count_b, step_a, step_b);
        for (int l = 0; l < LANES; ++l) {
            search_update(a, l, count_a[l], step_a[l], tol[l]);
            search_update(b, l, count_b[l], step_b[l], tol[l]);
        }
    }
    for (int l = 0; l < LANES; ++l) { /* (not reached in practice) */
        if (!a->done[l]) a->value[l] = 0.5 * (a->lo[l] + a->hi[l]);
        if (!b->done[l]) b->value[l] = 0.5 * (b->lo[l] + b->hi[l]);
    }
}

/* LU factors of T - shift I for one tridiagonal matrix (d, e of length n), Gaussian elimination
 * with partial pivoting; tiny pivots are replaced by +-tiny. factors: 4n doubles. */
static void tridiagonal_factor(int n, const double *d, const double *e, double shift, double tiny,
                               double *factors, int *swap)
{
    double *diag = factors, *upper = factors + n, *upper2 = factors + 2 * n, *low = factors + 3 * n;
    for (int i = 0; i < n; ++i) {
        diag[i] = d[i] - shift;
        upper[i] = i + 1 < n ? e[i] : 0.0;
        upper2[i] = 0.0;
    }
    /* LU of the tridiagonal band with row interchanges (fill-in in upper2) */
    for (int i = 0; i + 1 < n; ++i) {
        const double below = e[i];
        if (fabs(diag[i]) >= fabs(below)) {
            swap[i] = 0;
            const double pivot = diag[i] != 0.0 ? diag[i] : tiny;
            diag[i] = pivot;
            low[i] = below / pivot;
            diag[i + 1] -= low[i] * upper[i];
        } else {
            swap[i] = 1;
            low[i] = diag[i] / below;
            diag[i] = below;
            const double next_diag = diag[i + 1];
            const double next_upper = i + 2 < n ? upper[i + 1] : 0.0;
            diag[i + 1] = upper[i] - low[i] * next_diag;
            upper[i] = next_diag;
            upper2[i] = next_upper;
            if (i + 2 < n) upper[i + 1] = -low[i] * next_upper;
        }
    }
    if (diag[n - 1] == 0.0) diag[n - 1] = tiny;
    for (int i = 0; i < n; ++i)
        if (fabs(diag[i]) < tiny) diag[i] = diag[i] < 0.0 ? -tiny : tiny;
}

/* Solve (T - shift I) x = b in place from tridiagonal_factor's factors. */
static void tridiagonal_solve(int n, const double *factors, const int *swap, double *x)
{
    const double *diag = factors, *upper = factors + n, *upper2 = factors + 2 * n, *low = factors + 3 * n;
    /* forward: L y = P b */
    for (int i = 0; i + 1 < n; ++i) {
        if (swap[i]) {
            const double keep = x[i];
            x[i] = x[i + 1];
            x[i + 1] = keep - low[i] * x[i];
        } else {
            x[i + 1] -= low[i] * x[i];
        }
    }
    /* back: U x = y */
    for (int i = n - 1; i >= 0; --i) {
        double value = x[i];
        if (i + 1 < n) value -= upper[i] * x[i + 1];
        if (i + 2 < n) value -= upper2[i] * x[i + 2];
        x[i] = value / diag[i];
    }
}

static double normalise(int n, double *x)
{
    double norm = 0.0;
    for (int i = 0; i < n; ++i) norm += x[i] * x[i];
    norm = sqrt(norm);
    if (norm > 0.0)
        for (int i = 0; i < n; ++i) x[i] /= norm;
    return norm;
}

/* Eigenvector of one lane's tridiagonal matrix for eigenvalue lambda, orthogonal to the `previous`
 * vectors (rows of z, length n) of its cluster; the result is written to z[previous]. */
static void inverse_iteration(int n, const double *d, const double *e, double lambda, double tnorm,
                              double *z, int cluster_start, int previous, double *scratch, int *swap)
{
    double *x = z + (size_t)previous * n;
    const double tiny = DBL_EPSILON * tnorm + DBL_MIN;
    /* a fixed, deterministic start with components in every direction */
    unsigned int state = 2654435761u * (unsigned int)(previous + 1);
    for (int i = 0; i < n; ++i) { /* a fixed pseudo-random sequence in [0.5, 1.5) */
        state = state * 1664525u + 1013904223u;
        x[i] = 0.5 + (state >> 8) * (1.0 / 16777216.0);
    }
    normalise(n, x);
    tridiagonal_factor(n, d, e, lambda, tiny, scratch, swap);
    for (int iteration = 0; iteration < 4; ++iteration) {
        tridiagonal_solve(n, scratch, swap, x);
        for (int pass = 0; pass < 2; ++pass)
            for (int other = cluster_start; other < previous; ++other) {
                const double *y = z + (size_t)other * n;
                double dot = 0.0;
                for (int i = 0; i < n; ++i) dot += x[i] * y[i];
                for (int i = 0; i < n; ++i) x[i] -= dot * y[i];
            }
        const double growth = normalise(n, x);
        if (iteration >= 1 && growth * DBL_EPSILON * tnorm > 1e-3) break; /* converged */
    }
}

/* y <- Q y for every lane, Q = H_0 H_1 ... H_{n-3}: apply H_{n-3} first. y: n*LANES interleaved. */
MULTIVERSION
static void back_transform(int n, const double *restrict H, const double *restrict tau, double *restrict y)
{
    vec8 *Y = (vec8 *)y;
    const vec8 *T = (const vec8 *)tau;
    for (int k = n - 3; k >= 0; --k) {
        const vec8 *v = (const vec8 *)H + (size_t)k * n;
        vec8 dot = {0};
        for (int i = k + 1; i < n; ++i) dot += v[i] * Y[i];
        dot *= T[k];
        for (int i = k + 1; i < n; ++i) Y[i] -= dot * v[i];
    }
}

/* Each lane's Gram matrix (lower triangle) into A: the sum of its `depth` parts (row w of
 * part_index), less s s' / count where part_sums is given (s the sum of the parts' sums: a window
 * matrix whose mean over its voxels is removed). Where a lane's parts are the previous lane's
 * shifted by one (the next window along z), its sum is the previous one plus the new part less the
 * part left behind: two parts read instead of `depth`. scratch: (2 + LANES) n doubles. */
MULTIVERSION
static void load_lanes(int n, const int *window, const double *parts, const double *part_sums,
                       const long long *part_index, int depth, double count, double *A, double *scratch)
{
    const size_t nn = (size_t)n * n;
    double *row = scratch, *sums = scratch + n; /* sums: LANES rows of n */
    const long long *index[LANES];
    int slides[LANES];
    for (int l = 0; l < LANES; ++l) {
        index[l] = part_index + (size_t)window[l] * depth;
        slides[l] = depth > 2 && l > 0 && window[l] != window[l - 1];
        for (int t = 0; slides[l] && t + 1 < depth; ++t) slides[l] = index[l][t] == index[l - 1][t + 1];
        double *s = sums + (size_t)l * n;
        if (part_sums == NULL) continue;
        for (int i = 0; i < n; ++i) s[i] = 0.0;
        for (int t = 0; t < depth; ++t)
            for (int i = 0; i < n; ++i) s[i] += part_sums[(size_t)index[l][t] * n + i];
    }
    for (int i = 0; i < n; ++i) {
        for (int l = 0; l < LANES; ++l) {
            /* row i of the lower triangle, summed over the parts with contiguous loads */
            if (slides[l]) {
                const double *enter = parts + nn * index[l][depth - 1] + (size_t)i * n;
                const double *leave = parts + nn * index[l - 1][0] + (size_t)i * n;
                for (int j = 0; j <= i; ++j) row[j] += enter[j] - leave[j];
            } else {
                const double *first = parts + nn * index[l][0] + (size_t)i * n;
                for (int j = 0; j <= i; ++j) row[j] = first[j];
                for (int t = 1; t < depth; ++t) {
                    const double *part = parts + nn * index[l][t] + (size_t)i * n;
                    for (int j = 0; j <= i; ++j) row[j] += part[j];
                }
            }
            if (part_sums != NULL) {
                const double *s = sums + (size_t)l * n;
                const double scaled = s[i] / count;
                for (int j = 0; j <= i; ++j) A[((size_t)i * n + j) * LANES + l] = row[j] - scaled * s[j];
            } else {
                for (int j = 0; j <= i; ++j) A[((size_t)i * n + j) * LANES + l] = row[j];
            }
        }
    }
}

/* The number of signal components of a window with `noise` noise components: all n where no
 * noise component was found (the identity is kept), else n - noise. */
static int signal_count(int n, long long noise) { return noise == 0 ? n : n - (int)noise; }

/*
 * The Gram matrix of window w is the sum of parts[part_index[w, 0..depth-1]] (each n x n, symmetric;
 * e.g. the Gram matrices of the window's planes, so that windows sharing planes share their cost),
 * less s s' / count with s the sum of the parts' part_sums rows where part_sums is not NULL (the
 * Gram matrix of the window matrix with its mean over its `count` voxels removed). With depth 1 and
 * part_index 0..batch-1, parts are the Gram matrices themselves.
 * q = max(volumes, voxels) of the window matrix; exp1: Veraart's estimator instead of Cordero-Grande's.
 * Outputs: n_noise (batch), sigma2 (batch; 0 where no noise component), vectors (batch, n, n): the
 * signal eigenvectors as rows, largest eigenvalue first, in rows 0..k-1 with k the batch's largest
 * signal count, at least 1 (rows past a window's own count zero; the identity where a window has no noise
 * component); rows k.. are not written. Returns 0, or -1 if memory ran out.
 */
static int signal_subspace(int batch, int n, const double *parts, const double *part_sums,
                           const long long *part_index, int depth, double count, int q, int exp1,
                           const double *known_sigma2, double q_noise, double r_noise,
                           long long *n_noise, double *sigma2, double *vectors)
{
    const size_t nn = (size_t)n * n;
    /* lane buffers: whole vec8s, 64-byte aligned (sizes are multiples of 64 bytes) */
    double *A = aligned_alloc(64, sizeof(double) * nn * LANES), *H = aligned_alloc(64, sizeof(double) * nn * LANES);
    double *d = aligned_alloc(64, sizeof(double) * n * LANES), *e = aligned_alloc(64, sizeof(double) * n * LANES);
    double *e2 = aligned_alloc(64, sizeof(double) * n * LANES), *tau = aligned_alloc(64, sizeof(double) * n * LANES);
    double *p = aligned_alloc(64, sizeof(double) * n * LANES), *lambda = aligned_alloc(64, sizeof(double) * n * LANES);
    double *dl = malloc(sizeof(double) * n * LANES), *el = malloc(sizeof(double) * n * LANES);
    double *z = malloc(sizeof(double) * nn * LANES), *scratch = malloc(sizeof(double) * (4 + LANES) * n);
    int *swap = malloc(sizeof(int) * n);
    int status = 0;
    if (!A || !H || !d || !e || !e2 || !tau || !p || !lambda || !dl || !el || !z || !scratch || !swap) {
        status = -1;
        goto done;
    }
    for (int first = 0; first < batch; first += LANES) {
        int window[LANES];
        for (int l = 0; l < LANES; ++l) window[l] = first + l < batch ? first + l : first;
        load_lanes(n, window, parts, part_sums, part_index, depth, count, A, scratch);
        tridiagonalize(n, A, d, e, tau, H, p, lambda);
        memset(lambda, 0, sizeof(double) * n * LANES);

        double trace[LANES], pivmin[LANES], tnorm[LANES], glo[LANES], ghi[LANES];
        for (int l = 0; l < LANES; ++l) {
            double sum = 0.0, largest_e2 = 0.0, low = INFINITY, high = -INFINITY;
            for (int i = 0; i < n; ++i) {
                const double off = (i > 0 ? fabs(e[(i - 1) * LANES + l]) : 0.0) + fabs(e[i * LANES + l]);
                const double di = d[i * LANES + l];
                sum += di;
                e2[i * LANES + l] = e[i * LANES + l] * e[i * LANES + l];
                largest_e2 = fmax(largest_e2, e2[i * LANES + l]);
                low = fmin(low, di - off);
                high = fmax(high, di + off);
            }
            trace[l] = sum;
            tnorm[l] = fmax(fabs(low), fabs(high));
            pivmin[l] = DBL_MIN * fmax(1.0, largest_e2);
            glo[l] = low - 2.0 * DBL_EPSILON * tnorm[l] - pivmin[l];
            ghi[l] = high + 2.0 * DBL_EPSILON * tnorm[l] + pivmin[l];
        }

        /* the smallest and the largest eigenvalues, then the next largest two at a time (the second
         * of a pair is wasted where the cut-off falls on the first) down to the cut-off */
        int found[LANES];
        double tol[LANES], negligible[LANES], lam0[LANES], above[LANES];
        struct search sa, sb;
        for (int l = 0; l < LANES; ++l) {
            found[l] = trace[l] == 0.0; /* an all-zero window: nothing to find, no noise */
            tol[l] = 4.0 * DBL_EPSILON * tnorm[l] + 4.0 * pivmin[l];
            negligible[l] = n * DBL_EPSILON * tnorm[l];
            search_start(&sa, l, found[l] ? -1 : 0, glo[l], ghi[l]);
            search_start(&sb, l, found[l] ? -1 : n - 1, glo[l], ghi[l]);
            above[l] = 0.0;
            n_noise[window[l]] = 0;
            sigma2[window[l]] = 0.0;
            if (known_sigma2 != NULL) { /* the noise level is given; an all-zero window is all noise */
                sigma2[window[l]] = known_sigma2[window[l]];
                if (found[l]) n_noise[window[l]] = n;
            }
        }
        eigenvalues2(n, d, e2, pivmin, tol, &sa, &sb);
        for (int l = 0; l < LANES; ++l) {
            lambda[0 * LANES + l] = sa.value[l];
            lambda[(n - 1) * LANES + l] = sb.value[l];
            lam0[l] = sa.value[l] > negligible[l] ? sa.value[l] / q : 0.0;
        }
        for (int position = n - 1; position >= 0; --position) {
            int open = 0;
            for (int l = 0; l < LANES; ++l) open |= !found[l];
            if (!open) break;
            /* eigenvalues at position and position - 1 are found together (in pairs) when the
             * distance from the top is odd; the two ends are known */
            if (position < n - 1 && position > 0 && (n - 1 - position) % 2 == 1) {
                for (int l = 0; l < LANES; ++l) {
                    const double low = lambda[l] - tol[l];
                    const double high = lambda[(position + 1) * LANES + l] + tol[l];
                    search_start(&sa, l, found[l] ? -1 : position, low, high);
                    search_start(&sb, l, found[l] || position - 1 < 1 ? -1 : position - 1, low, high);
                }
                eigenvalues2(n, d, e2, pivmin, tol, &sa, &sb);
                for (int l = 0; l < LANES; ++l) {
                    if (sa.index[l] >= 0) lambda[position * LANES + l] = sa.value[l];
                    if (sb.index[l] >= 0) lambda[(position - 1) * LANES + l] = sb.value[l];
                }
            }
            if (known_sigma2 != NULL) {
                /* the component at `position` is noise once its eigenvalue is within the upper edge
                 * of the Marchenko-Pastur law of the noise matrix left, (q_noise - j) x (r_noise - j)
                 * with j larger components taken out */
                const double j = n - 1.0 - position;
                const double rows = q_noise - j > 0.0 ? q_noise - j : 0.0;
                const double columns = r_noise - j > 0.0 ? r_noise - j : 0.0;
                const double edge = (sqrt(rows) + sqrt(columns)) * (sqrt(rows) + sqrt(columns));
                for (int l = 0; l < LANES; ++l) {
                    if (found[l]) continue;
                    if (lambda[position * LANES + l] <= known_sigma2[window[l]] * edge) {
                        found[l] = 1;
                        n_noise[window[l]] = position + 1;
                    }
                }
                continue;
            }
            for (int l = 0; l < LANES; ++l) {
                if (found[l]) continue;
                const double eigenvalue = lambda[position * LANES + l];
                const double count = position + 1.0;
                /* values at the rounding level of the largest eigenvalue count as zero (as in the
                 * Python rule), so rank-deficient windows do not hinge on the sign of round-off */
                const double lam = eigenvalue > negligible[l] ? eigenvalue / q : 0.0;
                double cumulative = trace[l] - above[l]; /* sum of the lowest p+1 */
                cumulative = cumulative > negligible[l] ? cumulative / q : 0.0;
                const double gamma = exp1 ? count / q : count / (q - (n - count));
                const double sigsq1 = cumulative / count;
                const double sigsq2 = (lam - lam0[l]) / (4.0 * sqrt(gamma));
                if (sigsq2 < sigsq1) {
                    found[l] = 1;
                    n_noise[window[l]] = position + 1;
                    sigma2[window[l]] = sigsq1;
                }
                above[l] += eigenvalue;
            }
        }

        /* signal eigenvectors by inverse iteration (one lane at a time), mapped back to the Gram
         * matrix's basis through the reflectors (all lanes at once) */
        int rank[LANES], cluster_start[LANES], most = 0;
        for (int l = 0; l < LANES; ++l) {
            const int noise = first + l < batch ? (int)n_noise[window[l]] : n;
            rank[l] = noise == 0 ? 0 : n - noise;
            cluster_start[l] = 0;
            most = rank[l] > most ? rank[l] : most;
            if (first + l < batch && noise == 0) { /* no noise component: all kept, the identity */
                double *out = vectors + nn * window[l];
                memset(out, 0, sizeof(double) * nn);
                for (int i = 0; i < n; ++i) out[(size_t)i * n + i] = 1.0;
            }
            for (int i = 0; i < n; ++i) {
                dl[l * n + i] = d[i * LANES + l];
                el[l * n + i] = e[i * LANES + l];
            }
        }
        for (int s = 0; s < most; ++s) {
            const int position = n - 1 - s;
            for (int l = 0; l < LANES; ++l) {
                if (s >= rank[l]) {
                    for (int i = 0; i < n; ++i) p[i * LANES + l] = 0.0;
                    continue;
                }
                const double eigenvalue = lambda[position * LANES + l];
                if (s > 0 && fabs(lambda[(position + 1) * LANES + l] - eigenvalue) > 1e-3 * tnorm[l])
                    cluster_start[l] = s;
                double *zl = z + (size_t)l * nn;
                inverse_iteration(n, dl + l * n, el + l * n, eigenvalue, tnorm[l], zl, cluster_start[l], s,
                                  scratch, swap);
                for (int i = 0; i < n; ++i) p[i * LANES + l] = zl[(size_t)s * n + i];
            }
            back_transform(n, H, tau, p);
            for (int l = 0; l < LANES; ++l) {
                if (s >= rank[l]) continue;
                double *out = vectors + nn * window[l] + (size_t)s * n;
                for (int i = 0; i < n; ++i) out[i] = p[i * LANES + l];
            }
        }
    }
    /* rows rank..k-1 zero, k the batch's largest signal count (all rows of a window without noise) */
    int most = 1; /* at least one row, as the caller reads */
    for (int w = 0; w < batch; ++w) {
        const int signal = signal_count(n, n_noise[w]);
        most = signal > most ? signal : most;
    }
    for (int w = 0; w < batch; ++w) {
        const int signal = signal_count(n, n_noise[w]);
        if (signal < most) memset(vectors + nn * w + (size_t)signal * n, 0, sizeof(double) * n * (most - signal));
    }
done:
    free(A); free(H); free(d); free(e); free(e2); free(tau); free(p); free(lambda);
    free(dl); free(el); free(z); free(scratch); free(swap);
    return status;
}

int mppca_signal_subspace(int batch, int n, const double *parts, const double *part_sums,
                          const long long *part_index, int depth, double count, int q, int exp1,
                          long long *n_noise, double *sigma2, double *vectors)
{
    return signal_subspace(batch, n, parts, part_sums, part_index, depth, count, q, exp1, NULL, 0.0, 0.0,
                           n_noise, sigma2, vectors);
}

/*
 * As mppca_signal_subspace, with the noise variance of each window given (known_sigma2, batch values,
 * per entry of the window matrix) instead of estimated: scanning from the largest eigenvalue, the
 * component at ascending position p is signal while its eigenvalue exceeds
 * known_sigma2 * (sqrt(q_noise - j) + sqrt(r_noise - j))^2, j = n - 1 - p (the rule of
 * bids_denoise.methods.mppca.known_sigma_cutoff); q_noise >= r_noise are the window matrix's
 * dimensions for the noise (one voxel fewer where the window is demeaned). sigma2 is set to
 * known_sigma2; an all-zero window is all noise (n_noise = n); a window whose eigenvalues all exceed
 * the edge keeps the identity (n_noise = 0), as in mppca_signal_subspace.
 */
int mppca_signal_subspace_known(int batch, int n, const double *parts, const double *part_sums,
                                const long long *part_index, int depth, double count, const double *known_sigma2,
                                double q_noise, double r_noise, long long *n_noise, double *sigma2,
                                double *vectors)
{
    return signal_subspace(batch, n, parts, part_sums, part_index, depth, count, (int)q_noise, 0, known_sigma2,
                           q_noise, r_noise, n_noise, sigma2, vectors);
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_mppca_kernel",
                                    "MP-PCA window solver (called through ctypes).", -1, NULL,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__mppca_kernel(void) { return PyModule_Create(&module); }
