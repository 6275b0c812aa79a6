//! The collective + residual add + RMSNorm (`Group::all_reduce_add_rmsnorm`,
//! `Group::reduce_scatter_add_rmsnorm`) against the f64 reference of `symmcomm_lab::reference`,
//! on every backend present: every implementation (the fused kernels, unfused, NCCL's path,
//! auto), bf16 and f16, hidden sizes from 24 to the largest the kernels take, 1 to 64 tokens,
//! 1 to 8 ranks, the residual in place and not, fresh random inputs and outputs poisoned (NaN)
//! first. The fused kernels give the same bits whatever their algorithm (and the host backend
//! the same bits for every implementation); the reduce-scatter form followed by the all-gather
//! gives the all-reduce form's rows. Graph replays with fresh inputs each replay stay right
//! across hundreds of replays with no reset; bad arguments are refused before anything runs.

mod common;

use common::{TestBackend, all_ok};
use symmcomm::dispatch::{DispatchTable, Mode, NormBest, NormRow};
use symmcomm::lab::fill::splitmix64;
use symmcomm::norm::{AddRmsNorm, NormForm, NormImpl, max_hidden};
use symmcomm::{
    Algo, Arg, BackendKind, DType, Error, Group, TableSource, Tensor, run_rank_threads,
};
use symmcomm_lab::reference::{self, Accumulation};

/// A small deterministic generator (every rank builds the same problem from the seed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix64(self.0)
    }

    /// `n` values uniform on [lo, hi), rounded to `dtype` (so exact in it).
    fn values(&mut self, dtype: DType, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n)
            .map(|_| {
                let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
                let mut b = [0u8; 2];
                dtype.write_f64(&mut b, 0, lo + (hi - lo) * u);
                dtype.read_f64(&b, 0)
            })
            .collect()
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

const LL: NormImpl = NormImpl::Fused(Some(Algo::LowLatency));
const ONE_SHOT: NormImpl = NormImpl::Fused(Some(Algo::OneShot));
const TWO_SHOT: NormImpl = NormImpl::Fused(Some(Algo::TwoShot));

/// Every implementation of `form`.
fn impls(form: NormForm) -> Vec<NormImpl> {
    let mut v = vec![NormImpl::Auto, NormImpl::Fused(None), LL, ONE_SHOT];
    if form == NormForm::AllReduce {
        v.push(TWO_SHOT);
    }
    v.extend([NormImpl::Unfused, NormImpl::Nccl]);
    v
}

/// How the collective of what ran accumulates (NCCL's regular kernels round every partial sum).
fn accumulation(ran: NormImpl) -> Accumulation {
    match ran {
        NormImpl::Fused(_) => Accumulation::F32,
        _ => Accumulation::ElementType,
    }
}

/// One problem: every rank's input `[T, H]`, the residual of every row (`[T, H]`; a rank of the
/// reduce-scatter form takes its slice), the weight.
struct Problem {
    dtype: DType,
    tokens: usize,
    hidden: usize,
    inputs: Vec<Vec<f64>>,
    residual: Vec<f64>,
    weight: Vec<f64>,
    eps: f64,
}

impl Problem {
    fn random(rng: &mut Rng, dtype: DType, world: usize, tokens: usize, hidden: usize) -> Self {
        let n = tokens * hidden;
        Problem {
            dtype,
            tokens,
            hidden,
            inputs: (0..world)
                .map(|_| rng.values(dtype, n, -1.0, 1.0))
                .collect(),
            residual: rng.values(dtype, n, -2.0, 2.0),
            weight: rng.values(dtype, hidden, 0.25, 1.75),
            eps: 1e-6,
        }
    }

    /// Rows of rank `rank` in `form`: (first row, rows).
    fn rows(&self, form: NormForm, rank: usize, world: usize) -> (usize, usize) {
        match form {
            NormForm::AllReduce => (0, self.tokens),
            NormForm::ReduceScatter => (rank * self.tokens / world, self.tokens / world),
        }
    }
}

/// A rank's buffers for one problem: windows or plain memory.
struct Buffers {
    input: Tensor,
    residual: Tensor,
    weight: Tensor,
    normed: Tensor,
    residual_out: Tensor,
}

impl Buffers {
    fn new(g: &Group, p: &Problem, rows: usize, windows: bool) -> symmcomm::Result<Self> {
        let alloc = |shape: &[usize]| {
            if windows {
                g.alloc_symmetric(p.dtype, shape)
            } else {
                g.alloc_plain(p.dtype, shape)
            }
        };
        Ok(Buffers {
            input: alloc(&[p.tokens, p.hidden])?,
            residual: alloc(&[rows, p.hidden])?,
            weight: alloc(&[p.hidden])?,
            normed: alloc(&[rows, p.hidden])?,
            residual_out: alloc(&[rows, p.hidden])?,
        })
    }

    fn args(&self, eps: f64, in_place: bool) -> AddRmsNorm<'_> {
        AddRmsNorm {
            input: &self.input,
            residual: &self.residual,
            weight: &self.weight,
            eps: eps as f32,
            normed_out: &self.normed,
            residual_out: if in_place {
                &self.residual
            } else {
                &self.residual_out
            },
        }
    }
}

/// What one run gave: both outputs' bytes and what ran.
struct Ran {
    residual_out: Vec<u8>,
    normed: Vec<u8>,
    name: String,
    reason: String,
}

/// Run `imp` on `p` in `form` on this rank (inputs uploaded, outputs poisoned) and compare both
/// outputs with the f64 reference. `None` when `imp` cannot run the shape here (said on stderr).
fn run_checked(
    g: &Group,
    p: &Problem,
    form: NormForm,
    imp: NormImpl,
    in_place: bool,
) -> symmcomm::Result<Option<Ran>> {
    let (world, rank) = (g.size(), g.rank());
    let (first, rows) = p.rows(form, rank, world);
    let b = Buffers::new(g, p, rows, !in_place)?;
    let residual = &p.residual[first * p.hidden..(first + rows) * p.hidden];
    let args = b.args(p.eps, in_place);
    if let Err(e) = g.add_rmsnorm_plan(form, &args, imp) {
        assert!(matches!(e, Error::ImplUnavailable { .. }), "{e}");
        eprintln!(
            "skip {imp} {} T={} H={}: {e}",
            form.name(),
            p.tokens,
            p.hidden
        );
        return Ok(None);
    }
    g.upload_bytes(&b.input, &to_bytes(p.dtype, &p.inputs[rank]))?;
    g.upload_bytes(&b.residual, &to_bytes(p.dtype, residual))?;
    g.upload_bytes(&b.weight, &to_bytes(p.dtype, &p.weight))?;
    g.poison(&b.normed)?;
    if !in_place {
        g.poison(&b.residual_out)?;
    }
    let ran = match form {
        NormForm::AllReduce => g.all_reduce_add_rmsnorm(&args, imp)?,
        NormForm::ReduceScatter => g.reduce_scatter_add_rmsnorm(&args, imp)?,
    };
    let got_res = g.download_bytes(args.residual_out)?;
    let got_norm = g.download_bytes(&b.normed)?;
    let want = reference::add_rmsnorm(
        p.dtype,
        &p.inputs,
        residual,
        &p.weight,
        p.eps,
        first,
        accumulation(ran.imp),
    );
    let what = format!(
        "{} {} {} world {world} rank {rank} T={} H={} in_place {in_place} ({})",
        ran.name(),
        form.name(),
        p.dtype,
        p.tokens,
        p.hidden,
        ran.reason()
    );
    if let Err(m) = reference::compare(p.dtype, &got_res, &want.residual_out, |k| {
        want.residual_tol[k]
    }) {
        panic!("{what}: residual_out: {m:?}");
    }
    if let Err(m) = reference::compare(p.dtype, &got_norm, &want.normed, |k| want.normed_tol[k]) {
        panic!("{what}: normed: {m:?}");
    }
    Ok(Some(Ran {
        residual_out: got_res,
        normed: got_norm,
        name: ran.name(),
        reason: ran.reason().to_string(),
    }))
}

/// The fused kernels of a call agree to the bit (they share the row step and reduce in rank
/// order in f32); on the host every implementation does.
fn check_same_bits(runs: &[Ran], backend: BackendKind, what: &str) {
    let fused: Vec<&Ran> = runs
        .iter()
        .filter(|r| backend == BackendKind::Host || r.name.starts_with("fused"))
        .collect();
    for pair in fused.windows(2) {
        assert!(
            pair[0].normed == pair[1].normed && pair[0].residual_out == pair[1].residual_out,
            "{what}: {} and {} differ",
            pair[0].name,
            pair[1].name
        );
    }
}

/// (dtype, tokens, hidden) of the all-reduce cases: LL sizes, beyond LL (64 × 7168 bf16), the
/// largest hidden, tiny rows, token counts that do not split over the ranks.
const AR_CASES: [(DType, usize, usize); 7] = [
    (DType::BF16, 1, 2048),
    (DType::BF16, 7, 7168),
    (DType::F16, 37, 4096),
    (DType::BF16, 64, 7168),
    (DType::F16, 3, 8192),
    (DType::BF16, 2, 16384),
    (DType::BF16, 5, 24),
];

const WORLDS: [usize; 5] = [1, 2, 3, 4, 8];

/// Whether a case of `elements` per rank runs on `world` ranks of `b`: everywhere on GPUs; on
/// the host backend, whose debug-build arithmetic on many thread ranks is slow, the cases of
/// more than 64 Ki elements only on up to 3 ranks.
fn large_case_runs(b: TestBackend, world: usize, elements: usize) -> bool {
    b == TestBackend::Cuda || elements <= 1 << 16 || world <= 3
}

/// Every implementation of the all-reduce form against the f64 reference.
fn all_reduce_form_matches_the_reference(b: TestBackend) {
    let seed = common::seed();
    for world in WORLDS {
        if !b.can_run(world) {
            continue;
        }
        let runs = all_ok(run_rank_threads(world, &b.config(), |comm| {
            let g = comm.world();
            let (mut cases, mut count) = (0, 0);
            for (case, &(dtype, tokens, hidden)) in AR_CASES.iter().enumerate() {
                if !large_case_runs(b, world, tokens * hidden) {
                    continue;
                }
                let mut rng = Rng(seed ^ (world as u64) << 40 ^ case as u64);
                let p = Problem::random(&mut rng, dtype, world, tokens, hidden);
                let mut runs = Vec::new();
                for (i, imp) in impls(NormForm::AllReduce).into_iter().enumerate() {
                    let in_place = (i + case) % 2 == 0;
                    runs.extend(run_checked(g, &p, NormForm::AllReduce, imp, in_place)?);
                }
                let what = format!("world {world} {dtype} T={tokens} H={hidden}");
                check_same_bits(&runs, comm.backend(), &what);
                count += runs.len();
                cases += 1;
            }
            g.barrier()?;
            Ok((cases, count))
        }));
        // Every case runs at least auto, unfused and nccl; the fused kernels where they can.
        assert!(runs.iter().all(|&(c, n)| c > 0 && n >= 3 * c), "{runs:?}");
    }
}

/// The reduce-scatter form against the reference, and followed by the all-gather of the
/// normalised rows it equals the all-reduce form (every rank's residual a slice of one).
fn reduce_scatter_form_and_the_gather_that_follows(b: TestBackend) {
    let seed = common::seed();
    for world in WORLDS.into_iter().skip(1) {
        if !b.can_run(world) {
            continue;
        }
        all_ok(run_rank_threads(world, &b.config(), |comm| {
            let g = comm.world();
            let rank = g.rank();
            for (case, (dtype, per_rank, hidden)) in [
                (DType::BF16, 1, 7168),
                (DType::F16, 3, 4096),
                (DType::BF16, 8, 2048),
            ]
            .into_iter()
            .enumerate()
            {
                let mut rng = Rng(seed ^ 0x5c ^ (world as u64) << 40 ^ case as u64);
                let p = Problem::random(&mut rng, dtype, world, per_rank * world, hidden);
                let mut runs = Vec::new();
                for (i, imp) in impls(NormForm::ReduceScatter).into_iter().enumerate() {
                    let in_place = (i + case) % 2 == 1;
                    runs.extend(run_checked(g, &p, NormForm::ReduceScatter, imp, in_place)?);
                }
                let what = format!("rs world {world} {dtype} T={} H={hidden}", p.tokens);
                check_same_bits(&runs, comm.backend(), &what);
                // The gather of a fused run's rows is the fused all-reduce form's output.
                let fused =
                    |r: &&Ran| r.name.starts_with("fused") || r.name.starts_with("host_fused");
                let Some(rs) = runs.iter().find(fused) else {
                    continue;
                };
                let slice = g.alloc_symmetric(dtype, &[per_rank, hidden])?;
                g.upload_bytes(&slice, &rs.normed)?;
                let all = g.alloc_symmetric(dtype, &[p.tokens, hidden])?;
                g.poison(&all)?;
                g.all_gather(&slice, &all)?;
                let gathered = g.download_bytes(&all)?;
                let mut ar = run_checked(g, &p, NormForm::AllReduce, ONE_SHOT, false)?;
                if ar.is_none() {
                    ar = run_checked(g, &p, NormForm::AllReduce, NormImpl::Fused(None), false)?;
                }
                if let Some(ar) = ar {
                    assert!(
                        gathered == ar.normed,
                        "{what} rank {rank}: gather != all-reduce form"
                    );
                }
            }
            g.barrier()
        }));
    }
}

/// Graphs of (fresh inputs, add-RMSNorm, bump) replayed with no reset: every checked replay
/// equals the reference of the inputs it used, after hundreds of unchecked replays too; one
/// graph mixes the three fused kernels (LL, barrier, two barriers) on one group.
fn graph_replays_with_fresh_inputs(b: TestBackend) {
    let world = 2;
    if !b.can_run(world) {
        return;
    }
    let seed = common::seed();
    // Hundreds of replays matter on GPUs, where the kernels' epochs and parities advance; the
    // host backend replays closures, and a few dozen show that.
    let unchecked = if b == TestBackend::Host { 20 } else { 300 };
    all_ok(run_rank_threads(world, &b.config(), |comm| {
        let g = comm.world();
        g.prepare(4096)?;
        // 64 tokens of 7168 are beyond the LL protocol: the barrier kernels run. The host
        // backend computes every algorithm the same way; its debug build is slow at that size.
        let tokens: &[usize] = if b == TestBackend::Host {
            &[1, 8]
        } else {
            &[1, 8, 64]
        };
        for (case, &tokens) in tokens.iter().enumerate() {
            let mut rng = Rng(seed ^ 0x9a ^ case as u64);
            let p = Problem::random(&mut rng, DType::BF16, world, tokens, 7168);
            let calls: Vec<Vec<NormImpl>> = impls(NormForm::AllReduce)
                .into_iter()
                .map(|i| vec![i])
                .chain([vec![LL, ONE_SHOT, TWO_SHOT]])
                .collect();
            for chain in calls {
                replay_chain(comm, g, &p, &chain, seed ^ case as u64, unchecked)?;
            }
        }
        Ok(())
    }));
}

/// One graph of: fresh inputs, then each of `chain` on its own outputs, then a bump; replayed
/// with checks at replays 0, 1, 2 and after `unchecked` more.
fn replay_chain(
    comm: &symmcomm::Communicator,
    g: &Group,
    p: &Problem,
    chain: &[NormImpl],
    seed: u64,
    unchecked: usize,
) -> symmcomm::Result<()> {
    let bufs: Vec<Buffers> = chain
        .iter()
        .map(|_| Buffers::new(g, p, p.tokens, true))
        .collect::<symmcomm::Result<_>>()?;
    for (imp, b) in chain.iter().zip(&bufs) {
        if g.add_rmsnorm_plan(NormForm::AllReduce, &b.args(p.eps, false), *imp)
            .is_err()
        {
            eprintln!("skip graph of {imp} at T={}", p.tokens);
            return Ok(());
        }
        g.upload_bytes(&b.residual, &to_bytes(p.dtype, &p.residual))?;
        g.upload_bytes(&b.weight, &to_bytes(p.dtype, &p.weight))?;
    }
    // Connect everything once outside the capture.
    for (imp, b) in chain.iter().zip(&bufs) {
        g.fill_random(&b.input, seed, None)?;
        g.all_reduce_add_rmsnorm(&b.args(p.eps, false), *imp)?;
    }
    let counter = g.epoch_counter()?;
    let (graph, ran) = comm.capture(|| {
        let mut ran = Vec::new();
        for (imp, b) in chain.iter().zip(&bufs) {
            g.fill_random(&b.input, seed, Some(&counter))?;
            ran.push(g.all_reduce_add_rmsnorm(&b.args(p.eps, false), *imp)?.imp);
        }
        g.bump(&counter)?;
        Ok(ran)
    })?;
    for replay in 0..4 {
        for b in &bufs {
            g.poison(&b.normed)?;
            g.poison(&b.residual_out)?;
        }
        let runs = if replay == 3 { 1 + unchecked } else { 1 };
        for _ in 0..runs {
            graph.replay()?;
        }
        for ((imp, b), ran) in chain.iter().zip(&bufs).zip(&ran) {
            let tag = format!("inputs {imp} {} {replay}", p.tokens);
            let inputs: Vec<Vec<f64>> = g
                .control()
                .all_gather(&tag, &g.download_bytes(&b.input)?)?
                .iter()
                .map(|x| from_bytes(p.dtype, x))
                .collect();
            let want = reference::add_rmsnorm(
                p.dtype,
                &inputs,
                &p.residual,
                &p.weight,
                p.eps,
                0,
                accumulation(*ran),
            );
            let what = format!("graph of {chain:?}: {imp} T={} replay {replay}", p.tokens);
            let res = g.download_bytes(&b.residual_out)?;
            if let Err(m) =
                reference::compare(p.dtype, &res, &want.residual_out, |k| want.residual_tol[k])
            {
                panic!("{what}: residual_out {m:?}");
            }
            let normed = g.download_bytes(&b.normed)?;
            if let Err(m) =
                reference::compare(p.dtype, &normed, &want.normed, |k| want.normed_tol[k])
            {
                panic!("{what}: normed {m:?}");
            }
        }
    }
    g.barrier()
}

/// Bad arguments are refused, naming the argument, before anything is written.
fn bad_arguments_are_refused(b: TestBackend) {
    if !b.can_run(2) {
        return;
    }
    all_ok(run_rank_threads(2, &b.config(), |comm| {
        let g = comm.world();
        let t = |dtype: DType, shape: &[usize]| g.alloc_symmetric(dtype, shape);
        let bf = DType::BF16;
        let (x, res, w, out) = (
            t(bf, &[4, 64])?,
            t(bf, &[4, 64])?,
            t(bf, &[64])?,
            t(bf, &[4, 64])?,
        );
        let ok = AddRmsNorm::in_place(&x, &res, &w, 1e-6, &out);
        g.poison(&out)?;
        let ar = |a: &AddRmsNorm<'_>, imp| g.all_reduce_add_rmsnorm(a, imp).unwrap_err();
        let auto = NormImpl::Auto;
        // Element types.
        let res16 = t(DType::F16, &[4, 64])?;
        let e = ar(
            &AddRmsNorm {
                residual: &res16,
                residual_out: &res16,
                ..ok
            },
            auto,
        );
        assert!(
            matches!(
                e,
                Error::ArgDTypeMismatch {
                    arg: Arg::Residual,
                    ..
                }
            ),
            "{e}"
        );
        let (x32, r32, w32, o32) = (
            t(DType::F32, &[4, 64])?,
            t(DType::F32, &[4, 64])?,
            t(DType::F32, &[64])?,
            t(DType::F32, &[4, 64])?,
        );
        let e = ar(&AddRmsNorm::in_place(&x32, &r32, &w32, 1e-6, &o32), auto);
        assert!(e.to_string().contains("bf16 or f16"), "{e}");
        // Shapes.
        let wide = t(bf, &[4, 72])?;
        let e = ar(
            &AddRmsNorm {
                residual: &wide,
                residual_out: &wide,
                ..ok
            },
            auto,
        );
        assert!(
            matches!(
                e,
                Error::ArgShapeMismatch {
                    arg: Arg::Residual,
                    ..
                }
            ),
            "{e}"
        );
        let short = t(bf, &[56])?;
        let e = ar(
            &AddRmsNorm {
                weight: &short,
                ..ok
            },
            auto,
        );
        assert!(
            matches!(
                e,
                Error::ArgShapeMismatch {
                    arg: Arg::Weight,
                    ..
                }
            ),
            "{e}"
        );
        let e = ar(
            &AddRmsNorm {
                normed_out: &wide,
                ..ok
            },
            auto,
        );
        assert!(
            matches!(
                e,
                Error::ArgShapeMismatch {
                    arg: Arg::NormedOut,
                    ..
                }
            ),
            "{e}"
        );
        let flat = t(bf, &[256])?;
        let e = ar(&AddRmsNorm { input: &flat, ..ok }, auto);
        assert!(e.to_string().contains("[tokens, hidden]"), "{e}");
        // Hidden sizes the kernels cannot take: too large, not whole 16-byte units.
        let h = max_hidden(bf) + 8;
        let (xb, rb, wb, ob) = (
            t(bf, &[1, h])?,
            t(bf, &[1, h])?,
            t(bf, &[h])?,
            t(bf, &[1, h])?,
        );
        let e = ar(&AddRmsNorm::in_place(&xb, &rb, &wb, 1e-6, &ob), auto);
        assert!(e.to_string().contains("too large"), "{e}");
        let (xo, ro, wo, oo) = (
            t(bf, &[1, 12])?,
            t(bf, &[1, 12])?,
            t(bf, &[12])?,
            t(bf, &[1, 12])?,
        );
        let e = ar(&AddRmsNorm::in_place(&xo, &ro, &wo, 1e-6, &oo), auto);
        assert!(e.to_string().contains("multiple of 8"), "{e}");
        // Not contiguous: a transposed view.
        let tall = t(bf, &[64, 4])?;
        let xt = tall.transpose(0, 1).expect("2-d");
        let e = ar(&AddRmsNorm { input: &xt, ..ok }, auto);
        assert!(
            matches!(
                e,
                Error::NotContiguous {
                    arg: Arg::Input,
                    ..
                }
            ),
            "{e}"
        );
        // Not 16-byte aligned: a view one element in.
        let long = t(bf, &[4 * 64 + 8])?;
        let shifted = long
            .narrow(0, 1, 4 * 64)
            .and_then(|v| v.reshape(&[4, 64]))
            .expect("a contiguous view");
        let e = ar(
            &AddRmsNorm {
                input: &shifted,
                ..ok
            },
            auto,
        );
        assert!(e.to_string().contains("16-byte aligned"), "{e}");
        // Overlap: the normalised rows over the input.
        let e = ar(
            &AddRmsNorm {
                normed_out: &x,
                ..ok
            },
            auto,
        );
        assert!(matches!(e, Error::Overlap { .. }), "{e}");
        let e = ar(&AddRmsNorm { eps: -1.0, ..ok }, auto);
        assert!(e.to_string().contains("eps"), "{e}");
        // Reduce-scatter: tokens must split over the ranks.
        let (x3, r3, o3) = (t(bf, &[3, 64])?, t(bf, &[1, 64])?, t(bf, &[1, 64])?);
        let e = g
            .reduce_scatter_add_rmsnorm(&AddRmsNorm::in_place(&x3, &r3, &w, 1e-6, &o3), auto)
            .unwrap_err();
        assert!(matches!(e, Error::NotDivisible { .. }), "{e}");
        // Algorithms that do not exist for the call.
        let e = ar(&ok, NormImpl::Fused(Some(Algo::CopyEngine)));
        assert!(matches!(e, Error::ImplUnavailable { .. }), "{e}");
        let (xs, rs, os) = (t(bf, &[4, 64])?, t(bf, &[2, 64])?, t(bf, &[2, 64])?);
        let e = g
            .reduce_scatter_add_rmsnorm(&AddRmsNorm::in_place(&xs, &rs, &w, 1e-6, &os), TWO_SHOT)
            .unwrap_err();
        assert!(matches!(e, Error::ImplUnavailable { .. }), "{e}");
        let big = |s: &[usize]| t(bf, s);
        let (xl, rl, wl, ol) = (
            big(&[64, 7168])?,
            big(&[64, 7168])?,
            big(&[7168])?,
            big(&[64, 7168])?,
        );
        let e = ar(&AddRmsNorm::in_place(&xl, &rl, &wl, 1e-6, &ol), LL);
        assert!(e.to_string().contains("low-latency"), "{e}");
        // Nothing was written.
        assert!(g.download_bytes(&out)?.iter().all(|&b| b == 0xFF));
        // Names parse back.
        for name in [
            "auto",
            "fused",
            "fused_ll",
            "fused_oneshot",
            "fused_twoshot",
            "unfused",
            "nccl",
        ] {
            let imp: NormImpl = name.parse().expect("a name of an implementation");
            assert_eq!(imp.name(BackendKind::Cuda), name);
        }
        assert_eq!(NormImpl::Nccl.name(BackendKind::Host), "host");
        assert_eq!("host_fused_ll".parse::<NormImpl>(), Ok(LL));
        assert!("fused_ce2".parse::<NormImpl>().is_err());
        g.barrier()
    }));
}

/// `auto` follows the dispatch table's norm rows where one covers the call (its graph rows
/// inside a capture), checked against the reference; its size rule where none does, or where
/// the row names a fused kernel the call cannot take.
fn auto_follows_the_tables_norm_rows(b: TestBackend) {
    let world = 2;
    if !b.can_run(world) {
        return;
    }
    let seed = common::seed();
    let (hidden, dtype) = (256, DType::BF16);
    let row_bytes = hidden * dtype.size();
    let row = |max_bytes, mode, best| NormRow {
        op: "all_reduce_add_rmsnorm".into(),
        dtype,
        world,
        max_bytes,
        mode,
        best,
        measured_us: Default::default(),
    };
    let backend = match b {
        TestBackend::Host => BackendKind::Host,
        TestBackend::Cuda => BackendKind::Cuda,
    };
    let mut config = b.config();
    config.table = TableSource::Given(DispatchTable {
        source: "test".into(),
        device: "any".into(),
        backend,
        rows: Vec::new(),
        norm_rows: vec![
            // 1 and 2 tokens: unfused; up to 4 tokens: one-shot; above: LL, which 2048 tokens
            // (1 MiB) exceed, so the rule decides there. Bf16 rows only: f16 follows the rule.
            row(2 * row_bytes, None, NormBest::Unfused),
            row(4 * row_bytes, None, NormBest::FusedOneshot),
            row(usize::MAX, None, NormBest::FusedLl),
            row(usize::MAX, Some(Mode::Graph), NormBest::Nccl),
        ],
    });
    all_ok(run_rank_threads(world, &config, |comm| {
        let g = comm.world();
        let mut rng = Rng(seed);
        for (tokens, from_table) in [
            (1, Some(NormImpl::Unfused)),
            (2, Some(NormImpl::Unfused)),
            (3, Some(ONE_SHOT)),
            (8, Some(LL)),
            (2048, None),
        ] {
            let p = Problem::random(&mut rng, dtype, world, tokens, hidden);
            let ran = run_checked(g, &p, NormForm::AllReduce, NormImpl::Auto, false)?
                .expect("auto always runs");
            let what = format!("T={tokens}: ran {} ({})", ran.name, ran.reason);
            assert_eq!(
                ran.reason.contains("table test"),
                from_table.is_some(),
                "{what}"
            );
            match from_table {
                Some(want) => assert_eq!(ran.name, want.name(backend), "{what}"),
                None => assert_ne!(ran.name, LL.name(backend), "{what}"),
            }
        }
        // Inside a capture the graph row wins: NCCL's path, then the separate kernel.
        let p = Problem::random(&mut rng, dtype, world, 8, hidden);
        let bufs = Buffers::new(g, &p, 8, true)?;
        let (graph, ran) =
            comm.capture(|| g.all_reduce_add_rmsnorm(&bufs.args(p.eps, false), NormImpl::Auto))?;
        drop(graph);
        assert_eq!(ran.name(), NormImpl::Nccl.name(backend), "{}", ran.reason());
        // f16 has no row: the size rule.
        let p = Problem::random(&mut rng, DType::F16, world, 8, hidden);
        let ran = run_checked(g, &p, NormForm::AllReduce, NormImpl::Auto, false)?
            .expect("auto always runs");
        assert!(!ran.reason.contains("table"), "{}", ran.reason);
        g.barrier()
    }));
}

backend_tests!(
    all_reduce_form_matches_the_reference,
    reduce_scatter_form_and_the_gather_that_follows,
    graph_replays_with_fresh_inputs,
    bad_arguments_are_refused,
    auto_follows_the_tables_norm_rows,
);
