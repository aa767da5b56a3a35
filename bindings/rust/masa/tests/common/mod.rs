//! A plain-Rust (f64, loops only) reference of one attention layer, as
//! specified in `masa.h`:
//!
//!   Q = x Wq + bq, K = x Wk + bk, V = x Wv + bv   (RoPE applied to Q and K)
//!   head h uses key/value head h / (n_heads / n_kv_heads)
//!   A_h = softmax(scale * Q_h K_g^T [+ causal mask]) V_g
//!   y = concat_h(A_h) Wo + bo
//!
//! RoPE ("rotate half"): for pairs (i, i + hd/2), i < hd/2, at position
//! p = pos_offset + t, with f_i = theta^(-2i/hd):
//!   x'_i = x_i cos(p f_i) - x_{i+hd/2} sin(p f_i)
//!   x'_{i+hd/2} = x_{i+hd/2} cos(p f_i) + x_i sin(p f_i)

#![allow(dead_code)]
#![allow(clippy::needless_range_loop)] // index loops read like the formulas

/// Deterministic values in [-1, 1).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }

    pub fn next(&mut self) -> f32 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Max |got - want| must be <= tol * max |want| + 1e-6, the C suites' rule
/// (tests/test_util.h). The absolute term is for references that are exactly
/// zero, e.g. dQ with one visible key, where float rounding leaves ~1e-8.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let max_want = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    // Dividing by this scale turns the rule into "error / scale <= tol".
    let scale = max_want + 1e-6 / tol;
    let (mut worst, mut at) = (0.0f64, 0usize);
    for i in 0..got.len() {
        assert!(got[i].is_finite(), "{what}[{i}] = {} is not finite", got[i]);
        let e = (got[i] as f64 - want[i]).abs() / scale;
        if e > worst {
            worst = e;
            at = i;
        }
    }
    assert!(
        worst <= tol,
        "{what}: max error {worst:.3e} (relative to max |want| + 1e-6/tol = {scale:.3e}) at [{at}]: got {} want {}",
        got[at],
        want[at]
    );
}

#[derive(Clone)]
pub struct RefLayer {
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv: usize,
    pub hd: usize,
    pub causal: bool,
    pub rope: bool,
    pub theta: f64,
    pub scale: f64,
    /// Weights d_in x d_out, row-major, in the order Q, K, V, O.
    pub w: [Vec<f64>; 4],
    pub b: [Option<Vec<f64>>; 4],
}

pub struct RefGrads {
    pub dx: Vec<f64>,
    pub dw: [Vec<f64>; 4],
    pub db: [Vec<f64>; 4],
}

impl RefLayer {
    pub fn dims(&self, p: usize) -> (usize, usize) {
        let dq = self.n_heads * self.hd;
        let dkv = self.n_kv * self.hd;
        match p {
            0 => (self.d_model, dq),
            1 | 2 => (self.d_model, dkv),
            _ => (dq, self.d_model),
        }
    }

    fn lin(&self, p: usize, x: &[f64], n: usize) -> Vec<f64> {
        let (di, dout) = self.dims(p);
        let w = &self.w[p];
        let mut y = vec![0.0; n * dout];
        for t in 0..n {
            for j in 0..dout {
                let mut s = self.b[p].as_ref().map_or(0.0, |b| b[j]);
                for i in 0..di {
                    s += x[t * di + i] * w[i * dout + j];
                }
                y[t * dout + j] = s;
            }
        }
        y
    }

    /// Rotates every head of v (n tokens x heads*hd) in place; `sign` -1
    /// applies the inverse (transposed) rotation.
    fn rope(&self, v: &mut [f64], n: usize, heads: usize, pos: usize, sign: f64) {
        if !self.rope {
            return;
        }
        let hd = self.hd;
        let half = hd / 2;
        for t in 0..n {
            let p = (pos + t) as f64;
            for h in 0..heads {
                let base = t * heads * hd + h * hd;
                for i in 0..half {
                    let f = self.theta.powf(-2.0 * i as f64 / hd as f64);
                    let (s, c) = (p * f).sin_cos();
                    let s = sign * s;
                    let a = v[base + i];
                    let b = v[base + i + half];
                    v[base + i] = a * c - b * s;
                    v[base + i + half] = b * c + a * s;
                }
            }
        }
    }

    fn allowed(&self, t: usize, u: usize) -> bool {
        !self.causal || u <= t
    }

    /// Q, K, V (rotated), the softmax probabilities [h][t][u] and the
    /// attention output A, for one sequence.
    #[allow(clippy::type_complexity)]
    fn attend(
        &self,
        xb: &[f64],
        n: usize,
        pos: usize,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<Vec<f64>>, Vec<f64>) {
        let (h_n, g_n, hd) = (self.n_heads, self.n_kv, self.hd);
        let mut q = self.lin(0, xb, n);
        let mut k = self.lin(1, xb, n);
        let v = self.lin(2, xb, n);
        self.rope(&mut q, n, h_n, pos, 1.0);
        self.rope(&mut k, n, g_n, pos, 1.0);
        let group = h_n / g_n;
        let (dq, dkv) = (h_n * hd, g_n * hd);
        let mut probs = vec![vec![0.0; n * n]; h_n];
        let mut a = vec![0.0; n * dq];
        for h in 0..h_n {
            let g = h / group;
            for t in 0..n {
                let mut m = f64::NEG_INFINITY;
                let mut sc = vec![0.0; n];
                for u in 0..n {
                    if self.allowed(t, u) {
                        let mut s = 0.0;
                        for c in 0..hd {
                            s += q[t * dq + h * hd + c] * k[u * dkv + g * hd + c];
                        }
                        sc[u] = self.scale * s;
                        m = m.max(sc[u]);
                    }
                }
                let mut z = 0.0;
                for u in 0..n {
                    if self.allowed(t, u) {
                        sc[u] = (sc[u] - m).exp();
                        z += sc[u];
                    }
                }
                for u in 0..n {
                    let pr = if self.allowed(t, u) { sc[u] / z } else { 0.0 };
                    probs[h][t * n + u] = pr;
                    for c in 0..hd {
                        a[t * dq + h * hd + c] += pr * v[u * dkv + g * hd + c];
                    }
                }
            }
        }
        (q, k, v, probs, a)
    }

    pub fn forward(&self, batch: usize, seq: usize, pos: usize, x: &[f64]) -> Vec<f64> {
        let d = self.d_model;
        let mut y = Vec::with_capacity(batch * seq * d);
        for b in 0..batch {
            let xb = &x[b * seq * d..(b + 1) * seq * d];
            let (_, _, _, _, a) = self.attend(xb, seq, pos);
            y.extend(self.lin(3, &a, seq));
        }
        y
    }

    pub fn backward(&self, batch: usize, seq: usize, pos: usize, x: &[f64], dy: &[f64]) -> RefGrads {
        let (d, n, hd) = (self.d_model, seq, self.hd);
        let (h_n, g_n) = (self.n_heads, self.n_kv);
        let (dq_w, dkv_w) = (h_n * hd, g_n * hd);
        let group = h_n / g_n;
        let mut dx = vec![0.0; batch * seq * d];
        let mut dw: [Vec<f64>; 4] = core::array::from_fn(|p| vec![0.0; self.w[p].len()]);
        let mut db: [Vec<f64>; 4] = core::array::from_fn(|p| vec![0.0; self.dims(p).1]);
        for b in 0..batch {
            let xb = &x[b * n * d..(b + 1) * n * d];
            let dyb = &dy[b * n * d..(b + 1) * n * d];
            let (q, k, v, probs, a) = self.attend(xb, n, pos);
            // Output projection.
            let mut da = vec![0.0; n * dq_w];
            for t in 0..n {
                for j in 0..dq_w {
                    let mut s = 0.0;
                    for m in 0..d {
                        s += dyb[t * d + m] * self.w[3][j * d + m];
                        dw[3][j * d + m] += a[t * dq_w + j] * dyb[t * d + m];
                    }
                    da[t * dq_w + j] = s;
                }
                for m in 0..d {
                    db[3][m] += dyb[t * d + m];
                }
            }
            // Attention.
            let mut dq = vec![0.0; n * dq_w];
            let mut dk = vec![0.0; n * dkv_w];
            let mut dv = vec![0.0; n * dkv_w];
            for h in 0..h_n {
                let g = h / group;
                for t in 0..n {
                    let mut dp = vec![0.0; n];
                    let mut dot = 0.0;
                    for u in 0..n {
                        if !self.allowed(t, u) {
                            continue;
                        }
                        let pr = probs[h][t * n + u];
                        for c in 0..hd {
                            dp[u] += da[t * dq_w + h * hd + c] * v[u * dkv_w + g * hd + c];
                            dv[u * dkv_w + g * hd + c] += pr * da[t * dq_w + h * hd + c];
                        }
                        dot += pr * dp[u];
                    }
                    for u in 0..n {
                        if !self.allowed(t, u) {
                            continue;
                        }
                        let ds = probs[h][t * n + u] * (dp[u] - dot) * self.scale;
                        for c in 0..hd {
                            dq[t * dq_w + h * hd + c] += ds * k[u * dkv_w + g * hd + c];
                            dk[u * dkv_w + g * hd + c] += ds * q[t * dq_w + h * hd + c];
                        }
                    }
                }
            }
            self.rope(&mut dq, n, h_n, pos, -1.0);
            self.rope(&mut dk, n, g_n, pos, -1.0);
            // Input projections.
            for (p, dp) in [(0usize, &dq), (1, &dk), (2, &dv)] {
                let (di, dout) = self.dims(p);
                for t in 0..n {
                    for j in 0..dout {
                        let g = dp[t * dout + j];
                        db[p][j] += g;
                        for i in 0..di {
                            dw[p][i * dout + j] += xb[t * di + i] * g;
                            dx[b * n * d + t * d + i] += g * self.w[p][i * dout + j];
                        }
                    }
                }
            }
        }
        RefGrads { dx, dw, db }
    }
}

/// W = sum_s c[s] D_s (f64), for atoms of `len` floats each.
pub fn compose(atoms: &[f32], row: &[f32], len: usize) -> Vec<f64> {
    let mut w = vec![0.0; len];
    for (s, &c) in row.iter().enumerate() {
        for i in 0..len {
            w[i] += c as f64 * atoms[s * len + i] as f64;
        }
    }
    w
}
