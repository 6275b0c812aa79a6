//! DCP against independent references, on every backend present: the combine of partial
//! attentions over a KV cache split across the ranks must equal a brute-force softmax attention
//! over the whole cache (f64), for both LSE bases, with empty shards (`seq_len < N`, NaN, +inf
//! and −inf LSEs over NaN outputs) and padding rows; across graph replays with fresh inputs it
//! must equal the f64 merge of the inputs each replay used; the q gather must put every rank's
//! heads in rank order with views, not copies; bad arguments are refused.

mod common;

use common::{TestBackend, all_ok};
use half::bf16;
use symmcomm::dcp::{
    CombineImpl, CombineSpec, DcpCombine, DcpQGather, KvSharding, LseBase, QGatherSpec,
    merge_reference,
};
use symmcomm::lab::fill::splitmix64;
use symmcomm::{Algo, DType, Error, Group, Impl, Tensor, run_rank_threads};

/// A small deterministic generator (every rank builds the same problem from the seed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix64(self.0)
    }

    /// Uniform on [lo, hi).
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One decode step: `batch` requests, each with its own KV cache of `seq[b]` tokens (latent
/// keys of `dk` values shared by the heads, values of `dim`), and a query per head.
struct Problem {
    batch: usize,
    heads: usize,
    dim: usize,
    dk: usize,
    seq: Vec<usize>,
    q: Vec<f64>,
    k: Vec<Vec<f64>>,
    v: Vec<Vec<f64>>,
}

impl Problem {
    /// Includes a padding row (no tokens), rows shorter than the world (empty shards), and
    /// rows long enough for every shard.
    fn random(rng: &mut Rng, batch: usize, heads: usize, dim: usize, world: usize) -> Self {
        let dk = 8;
        let seq: Vec<usize> = (0..batch)
            .map(|b| match b {
                0 => 0,
                1 => 1,
                2 => world.saturating_sub(1).max(1),
                _ => 3 * world + rng.below(40),
            })
            .collect();
        let q = (0..batch * heads * dk)
            .map(|_| rng.range(-1.5, 1.5))
            .collect();
        let k = seq
            .iter()
            .map(|&l| (0..l * dk).map(|_| rng.range(-1.5, 1.5)).collect())
            .collect();
        let v = seq
            .iter()
            .map(|&l| (0..l * dim).map(|_| rng.range(-1.0, 1.0)).collect())
            .collect();
        Problem {
            batch,
            heads,
            dim,
            dk,
            seq,
            q,
            k,
            v,
        }
    }

    fn logit(&self, b: usize, h: usize, p: usize) -> f64 {
        let q = &self.q[(b * self.heads + h) * self.dk..][..self.dk];
        let k = &self.k[b][p * self.dk..][..self.dk];
        q.iter().zip(k).map(|(x, y)| x * y).sum::<f64>() * 1.3
    }

    /// Softmax attention of (b, h) over the positions `keep` selects: (output, LSE in `base`),
    /// or `None` when it selects none.
    fn attend(
        &self,
        b: usize,
        h: usize,
        base: LseBase,
        keep: impl Fn(usize) -> bool,
    ) -> Option<(Vec<f64>, f64)> {
        let ps: Vec<usize> = (0..self.seq[b]).filter(|&p| keep(p)).collect();
        if ps.is_empty() {
            return None;
        }
        let z: Vec<f64> = ps.iter().map(|&p| self.logit(b, h, p)).collect();
        let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = z.iter().map(|x| (x - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        let mut o = vec![0.0; self.dim];
        for (i, &p) in ps.iter().enumerate() {
            for (d, od) in o.iter_mut().enumerate() {
                *od += e[i] / sum * self.v[b][p * self.dim + d];
            }
        }
        let lse_e = m + sum.ln();
        let lse = match base {
            LseBase::E => lse_e,
            LseBase::Two => lse_e * std::f64::consts::LOG2_E,
        };
        Some((o, lse))
    }

    /// Rank `rank`'s partial attention over its shard: `[B, H, D]` and `[B, H]`. Empty shards
    /// get NaN outputs and one of NaN, +inf, −inf as LSE (as the kernels of the field write).
    fn partial(&self, s: &KvSharding, rank: usize, base: LseBase) -> (Vec<f64>, Vec<f64>) {
        let mut o = vec![0.0; self.batch * self.heads * self.dim];
        let mut lse = vec![0.0; self.batch * self.heads];
        for b in 0..self.batch {
            for h in 0..self.heads {
                let i = b * self.heads + h;
                match self.attend(b, h, base, |p| s.owner(p) == rank) {
                    Some((ob, l)) => {
                        o[i * self.dim..(i + 1) * self.dim].copy_from_slice(&ob);
                        lse[i] = l;
                    }
                    None => {
                        o[i * self.dim..(i + 1) * self.dim].fill(f64::NAN);
                        lse[i] = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY][(b + h) % 3];
                    }
                }
            }
        }
        (o, lse)
    }
}

fn round_to(dtype: DType, x: f64) -> f64 {
    match dtype {
        DType::BF16 => bf16::from_f64(x).to_f64(),
        _ => x as f32 as f64,
    }
}

fn to_bytes(dtype: DType, xs: &[f64]) -> Vec<u8> {
    let mut b = vec![0u8; xs.len() * dtype.size()];
    for (i, &x) in xs.iter().enumerate() {
        dtype.write_f64(&mut b, i, x);
    }
    b
}

fn from_bytes(dtype: DType, b: &[u8]) -> Vec<f64> {
    (0..b.len() / dtype.size())
        .map(|i| dtype.read_f64(b, i))
        .collect()
}

/// Compare `got` with `want` element by element: equal infinities, |got − want| ≤ tol
/// otherwise, never NaN. Returns a description of the first mismatch.
fn first_mismatch(got: &[f64], want: &[f64], tol: f64) -> Option<String> {
    assert_eq!(got.len(), want.len());
    let bad = got.iter().zip(want).position(|(&g, &w)| {
        if w.is_infinite() {
            g != w
        } else {
            g.is_nan() || (g - w).abs() > tol * w.abs().max(1.0)
        }
    })?;
    let wrong = got
        .iter()
        .zip(want)
        .filter(|(g, w)| {
            if w.is_infinite() {
                g != w
            } else {
                g.is_nan() || (*g - *w).abs() > tol * w.abs().max(1.0)
            }
        })
        .count();
    Some(format!(
        "{wrong} of {} wrong, first at {bad}: got {}, want {}",
        got.len(),
        got[bad],
        want[bad]
    ))
}

/// Absolute tolerance of a merged output against the exact result: the partials' rounding,
/// the output's rounding, and f32 arithmetic (the sequence adds one rounding of each rank's
/// corrected share before its reduce-scatter).
fn out_tolerance(partial: DType, out: DType, world: usize) -> f64 {
    let eps = |d: DType| match d {
        DType::BF16 => 2f64.powi(-8),
        _ => 2e-6,
    };
    eps(partial) + (world as f64 + 1.0) * eps(out) + 1e-5
}

/// The implementations a test runs, with whether their buffers are plain memory.
fn combine_impls() -> Vec<(CombineImpl, bool)> {
    vec![
        (CombineImpl::Sequence(Impl::Regular), true),
        (CombineImpl::Sequence(Impl::Symmetric), false),
        (CombineImpl::Sequence(Impl::Kernel(Algo::OneShot)), false),
        (CombineImpl::Fused, false),
    ]
}

/// World sizes the combine tests run; on GPUs each runs where enough GPUs are present
/// (`can_run` skips the others).
const WORLDS: [usize; 4] = [2, 3, 4, 8];

/// The merged heads of every rank against a brute-force attention over the whole cache.
fn combine_equals_full_attention(b: TestBackend) {
    full_attention_on_hosts(b, 1, &WORLDS, 18);
}

/// The same on ranks split over two hosts: the sequence runs on NCCL's paths; our kernels'
/// sequence and the fused combine are refused, each saying why.
fn combine_across_hosts(b: TestBackend) {
    full_attention_on_hosts(b, 2, &[2, 4], 12);
}

fn full_attention_on_hosts(b: TestBackend, hosts: usize, worlds: &[usize], min_runs: usize) {
    let seed = common::seed();
    for &world in worlds {
        if !b.can_run(world) {
            continue;
        }
        let cfg = b.config();
        let runs = all_ok(common::run_on_hosts(world, hosts, &cfg, |comm| {
            let g = comm.world();
            let rank = g.rank();
            let mut runs = 0;
            for (case, base) in [LseBase::Two, LseBase::E].into_iter().enumerate() {
                let mut rng = Rng(seed ^ (world as u64) << 32 ^ case as u64);
                let interleave = 1 + rng.below(3);
                let sharding = KvSharding::new(world, interleave).expect("nonzero");
                let (batch, heads, dim) = (6, 2 * world, 16);
                let p = Problem::random(&mut rng, batch, heads, dim, world);
                let (o, lse) = p.partial(&sharding, rank, base);
                // The exact answer for this rank's heads.
                let hl = heads / world;
                let mut want = vec![0.0; hl * batch * dim];
                let mut want_lse = vec![f64::NEG_INFINITY; batch * hl];
                for bb in 0..batch {
                    for l in 0..hl {
                        if let Some((ob, s)) = p.attend(bb, rank * hl + l, base, |_| true) {
                            want[(l * batch + bb) * dim..][..dim].copy_from_slice(&ob);
                            want_lse[bb * hl + l] = s;
                        }
                    }
                }
                for (pd, od) in [
                    (DType::BF16, DType::BF16),
                    (DType::F32, DType::F32),
                    (DType::BF16, DType::F32),
                ] {
                    // The f64 reference of the merge, from the partials as uploaded, also
                    // equals the brute force (it is what the GPU tests compare against).
                    let all: Vec<(Vec<f64>, Vec<f64>)> = (0..world)
                        .map(|r| {
                            let (o, l) = p.partial(&sharding, r, base);
                            (
                                o.iter().map(|&x| round_to(pd, x)).collect(),
                                l.iter().map(|&x| x as f32 as f64).collect(),
                            )
                        })
                        .collect();
                    let (os, ls): (Vec<_>, Vec<_>) = all.into_iter().unzip();
                    let r = merge_reference(&os, &ls, batch, heads, dim, rank, base);
                    let tol = out_tolerance(pd, DType::F32, 1);
                    if let Some(m) = first_mismatch(&r.out, &want, tol) {
                        panic!("reference vs brute force, world {world} base {base:?} {pd}: {m}");
                    }
                    if let Some(m) = first_mismatch(&r.lse, &want_lse, 1e-5) {
                        panic!("reference LSE vs brute force, world {world}: {m}");
                    }
                    for (imp, plain) in combine_impls() {
                        let spec = CombineSpec {
                            merged_lse: true,
                            out_dtype: od,
                            ..CombineSpec::new(batch + 2, heads, dim, pd, base)
                        };
                        let c = DcpCombine::new(g, spec, plain)?;
                        if let Some(why) = c.unavailable(imp) {
                            let ours = matches!(
                                imp,
                                CombineImpl::Fused | CombineImpl::Sequence(Impl::Kernel(_))
                            );
                            if hosts > 1 && ours {
                                assert!(why.contains("one NVLink domain"), "{why}");
                            }
                            eprintln!("skip {}: {why}", imp.name(comm.backend()));
                            continue;
                        }
                        assert!(
                            hosts == 1 || !matches!(imp, CombineImpl::Fused),
                            "the fused combine is available across hosts"
                        );
                        g.upload_bytes(&c.partial_out(batch)?, &to_bytes(pd, &o))?;
                        g.upload_bytes(&c.partial_lse(batch)?, &to_bytes(DType::F32, &lse))?;
                        let out = c.output(batch)?;
                        let merged = c.merged_lse(batch)?.expect("asked for");
                        g.poison(&out)?;
                        g.poison(&merged)?;
                        c.run(batch, imp)?;
                        let got = from_bytes(od, &g.download_bytes(&out)?);
                        let got_lse = from_bytes(DType::F32, &g.download_bytes(&merged)?);
                        let what = format!(
                            "world {world} rank {rank} I={interleave} base {base:?} {pd}->{od} {}",
                            imp.name(comm.backend())
                        );
                        if let Some(m) = first_mismatch(&got, &want, out_tolerance(pd, od, world)) {
                            panic!("{what}: output: {m}");
                        }
                        if let Some(m) = first_mismatch(&got_lse, &want_lse, 1e-5) {
                            panic!("{what}: merged LSE: {m}");
                        }
                        // The padding row (b = 0) is exactly zero with LSE -inf.
                        for l in 0..hl {
                            assert!(got[l * batch * dim..][..dim].iter().all(|&x| x == 0.0));
                            assert_eq!(got_lse[l], f64::NEG_INFINITY);
                        }
                        runs += 1;
                    }
                }
            }
            g.barrier()?;
            Ok(runs)
        }));
        assert!(
            runs.iter().all(|&n| n >= min_runs),
            "too few runs: {runs:?}"
        );
    }
}

/// Every rank's partial outputs and LSEs, as f64.
type RankInputs = (Vec<Vec<f64>>, Vec<Vec<f64>>);

/// Every rank's `[B, H, D]` partial output and `[B, H]` LSE as f64, gathered on every rank.
fn gather_inputs(
    g: &Group,
    partial: &Tensor,
    lse: &Tensor,
    tag: &str,
) -> symmcomm::Result<RankInputs> {
    let os = g.control().all_gather(tag, &g.download_bytes(partial)?)?;
    let ls = g
        .control()
        .all_gather(&format!("{tag} lse"), &g.download_bytes(lse)?)?;
    Ok((
        os.iter().map(|b| from_bytes(partial.dtype(), b)).collect(),
        ls.iter().map(|b| from_bytes(DType::F32, b)).collect(),
    ))
}

/// Graphs of (fresh inputs, combine, bump) replayed: each replay's output equals the merge of
/// the inputs that replay used, for every implementation, DeepSeek-V3's shapes.
fn combine_across_graph_replays(b: TestBackend) {
    let world = 2;
    if !b.can_run(world) {
        return;
    }
    let seed = common::seed();
    let cfg = b.config();
    all_ok(run_rank_threads(world, &cfg, |comm| {
        let g = comm.world();
        // 3 tokens: a few rows per block of the fused kernel (each item weighs its own row);
        // 12 tokens: 12 rows per block (weights per row in shared memory).
        for (case, (imp, plain)) in combine_impls().into_iter().enumerate() {
            for (base, batch) in [(LseBase::Two, 3), (LseBase::E, 3), (LseBase::Two, 12)] {
                let spec = CombineSpec {
                    merged_lse: true,
                    ..CombineSpec::new(batch, 128, 512, DType::BF16, base)
                };
                let c = DcpCombine::new(g, spec, plain)?;
                if let Some(why) = c.unavailable(imp) {
                    eprintln!("skip {}: {why}", imp.name(comm.backend()));
                    continue;
                }
                let (partial, lse) = (c.partial_out(batch)?, c.partial_lse(batch)?);
                let (out, merged) = (c.output(batch)?, c.merged_lse(batch)?.expect("asked"));
                let counter = g.epoch_counter()?;
                // Connect everything once outside the capture.
                c.run(batch, imp)?;
                comm.begin_capture()?;
                let captured = (|| -> symmcomm::Result<()> {
                    g.fill_random(&partial, seed ^ case as u64, Some(&counter))?;
                    g.fill_random(&lse, !seed ^ case as u64, Some(&counter))?;
                    c.run(batch, imp)?;
                    g.bump(&counter)
                })();
                let graph = comm.end_capture();
                captured?;
                let graph = graph?;
                let mut previous: Option<Vec<f64>> = None;
                for replay in 0..3 {
                    g.poison(&out)?;
                    g.poison(&merged)?;
                    graph.replay()?;
                    let tag = format!("inputs {case} {base:?} {batch} {replay}");
                    let (os, ls) = gather_inputs(g, &partial, &lse, &tag)?;
                    let want = merge_reference(&os, &ls, batch, 128, 512, g.rank(), base);
                    let got = from_bytes(DType::BF16, &g.download_bytes(&out)?);
                    let got_lse = from_bytes(DType::F32, &g.download_bytes(&merged)?);
                    let what = format!(
                        "{} base {base:?} B={batch} replay {replay} rank {}",
                        imp.name(comm.backend()),
                        g.rank()
                    );
                    if let Some(m) = first_mismatch(
                        &got,
                        &want.out,
                        out_tolerance(DType::F32, DType::BF16, world),
                    ) {
                        panic!("{what}: {m}");
                    }
                    if let Some(m) = first_mismatch(&got_lse, &want.lse, 1e-5) {
                        panic!("{what}: merged LSE: {m}");
                    }
                    // The replay really drew new inputs.
                    let mine = os[g.rank()].clone();
                    assert_ne!(previous.as_ref(), Some(&mine), "{what}: inputs unchanged");
                    previous = Some(mine);
                }
                g.barrier()?;
            }
        }
        Ok(())
    }));
}

/// The q gather: every rank's heads in rank order, `q_pe` and `q_nope` as views into it.
fn q_gather_puts_heads_in_rank_order(b: TestBackend) {
    for world in WORLDS.into_iter().take(2) {
        if !b.can_run(world) {
            continue;
        }
        let cfg = b.config();
        all_ok(run_rank_threads(world, &cfg, |comm| {
            let g = comm.world();
            let spec = QGatherSpec {
                batch_max: 5,
                heads_local: 3,
                rope_dim: 8,
                nope_dim: 24,
                dtype: DType::BF16,
            };
            let (batch, w) = (4, spec.width());
            // Exact in bf16: small integers.
            let value =
                |r: usize, h: usize, t: usize, i: usize| ((r * 7 + h * 5 + t * 3 + i) % 200) as f64;
            for (imp, plain) in [
                (Impl::Regular, true),
                (Impl::Symmetric, false),
                (Impl::Auto, false),
            ] {
                let q = DcpQGather::new(g, spec, plain)?;
                let (pe, nope) = q.send_parts(batch)?;
                assert_eq!(pe.shape(), &[3, batch, 8]);
                assert_eq!(nope.shape(), &[3, batch, 24]);
                let send = q.send(batch)?;
                let mut x = vec![0.0; 3 * batch * w];
                for h in 0..3 {
                    for t in 0..batch {
                        for i in 0..w {
                            x[(h * batch + t) * w + i] = value(g.rank(), h, t, i);
                        }
                    }
                }
                g.upload_bytes(&send, &to_bytes(DType::BF16, &x))?;
                let got = q.gather(batch, imp)?;
                let heads = 3 * world;
                assert_eq!(got.q.shape(), &[heads, batch, w]);
                assert_eq!(got.q_pe.shape(), &[heads, batch, 8]);
                assert_eq!(got.q_nope.shape(), &[heads, batch, 24]);
                assert_eq!(got.q_pe.layout().strides(), &[batch * w, w, 1]);
                assert_eq!(got.q_nope.layout().strides(), &[batch * w, w, 1]);
                // Views into the gathered buffer, not copies.
                assert_eq!(got.q_pe.addr(), got.q.addr());
                assert_eq!(got.q_nope.addr(), got.q.addr() + 8 * 2);
                let all = from_bytes(DType::BF16, &g.download_bytes(&got.q)?);
                for r in 0..world {
                    for h in 0..3 {
                        for t in 0..batch {
                            for i in 0..w {
                                let at = ((r * 3 + h) * batch + t) * w + i;
                                assert_eq!(
                                    all[at],
                                    value(r, h, t, i),
                                    "{} r{r} h{h} t{t} i{i}",
                                    got.dispatched.name()
                                );
                            }
                        }
                    }
                }
            }
            Ok(())
        }));
    }
}

backend_tests!(
    combine_equals_full_attention,
    combine_across_hosts,
    combine_across_graph_replays,
    q_gather_puts_heads_in_rank_order,
);

#[test]
fn bad_arguments_are_refused_before_anything_runs() {
    let cfg = TestBackend::Host.config();
    all_ok(run_rank_threads(2, &cfg, |comm| {
        let g = comm.world();
        let base = CombineSpec::new(4, 8, 16, DType::BF16, LseBase::Two);
        let err = |spec: CombineSpec| DcpCombine::new(g, spec, false).unwrap_err();
        assert!(matches!(
            err(CombineSpec { heads: 7, ..base }),
            Error::NotDivisible { .. }
        ));
        let e = err(CombineSpec { dim: 12, ..base });
        assert!(e.to_string().contains("multiple of 8"), "{e}");
        let e = err(CombineSpec {
            partial_dtype: DType::F16,
            ..base
        });
        assert!(e.to_string().contains("bf16 or f32"), "{e}");
        assert!(
            err(CombineSpec {
                batch_max: 0,
                ..base
            })
            .to_string()
            .contains("batch_max")
        );
        let c = DcpCombine::new(g, base, false)?;
        let e = c.run(5, CombineImpl::Fused).unwrap_err();
        assert!(e.to_string().contains("exceeds"), "{e}");
        assert!(c.partial_out(5).is_err());
        // The symmetric sequence needs windows.
        let plain = DcpCombine::new(g, base, true)?;
        assert!(
            plain
                .unavailable(CombineImpl::Sequence(Impl::Symmetric))
                .is_some()
        );
        assert!(
            plain
                .run(2, CombineImpl::Sequence(Impl::Symmetric))
                .is_err()
        );
        // Names parse back.
        for imp in ["nccl", "nccl_symm", "fused", "host_fused", "oneshot"] {
            assert!(imp.parse::<CombineImpl>().is_ok(), "{imp}");
        }
        assert_eq!(
            CombineImpl::Fused.name(symmcomm::BackendKind::Host),
            "host_fused"
        );
        g.barrier()
    }));
}
