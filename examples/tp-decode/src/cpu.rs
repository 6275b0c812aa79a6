//! The CPU implementation of [`Compute`]: f32 arithmetic over f32 buffers, the reference a
//! machine without GPUs runs (symmcomm's host backend carries the all-reduces, ranks are
//! threads). With [`Storage::Bf16`] every stored activation is rounded to bf16 at the points
//! where the CUDA implementation stores bf16, which is how the GPU check's tolerance was
//! chosen (see `check.rs`).

use std::collections::BTreeSet;

use anyhow::{Context, Result, bail};
use half::bf16;
use symmcomm::norm::{AddRmsNorm, NormImpl};
use symmcomm::{Collective, DType, Group, Impl, ReduceOp, Tensor};

use crate::compute::{Compute, unfused_all_reduce_add_norm};
use crate::model::{Act, Linear, Norm, Shard};
use crate::variant::Variant;
use crate::weights::{self, Param};

/// How activations are stored between operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// As computed.
    F32,
    /// Rounded to bf16 (to nearest even), as the GPU stores them.
    Bf16,
}

impl Storage {
    fn store(self, x: f32) -> f32 {
        match self {
            Storage::F32 => x,
            Storage::Bf16 => bf16::from_f32(x).to_f32(),
        }
    }
}

/// The tensor-parallel group an implementation all-reduces over: symmcomm's host backend, one
/// f32 tensor of `[max batch, hidden]` that [`Act::Reduce`] is copied through, and the bf16
/// tensors the fused all-reduce + add + RMSNorm runs on (it takes bf16 or f16 only).
#[derive(Debug)]
pub struct CpuTp {
    /// The TP group.
    pub group: Group,
    /// Where the all-reduce runs (in place).
    pub buffer: Tensor,
    /// The fused operation's tensors.
    fused: FusedTensors,
    /// How the all-reduces run.
    pub variant: Variant,
}

/// The bf16 tensors of [`Variant::Fused`] on the CPU: the partial sums (in the group's
/// symmetric memory), the residual stream, an RMSNorm weight and the normalised output.
#[derive(Debug)]
struct FusedTensors {
    input: Tensor,
    residual: Tensor,
    weight: Tensor,
    normed: Tensor,
}

impl CpuTp {
    /// The buffers of `group` for `max_batch` rows of `hidden` (collective: every rank calls it),
    /// all-reducing with `auto` until [`CpuCompute::set_variant`].
    pub fn new(group: Group, max_batch: usize, hidden: usize) -> symmcomm::Result<CpuTp> {
        let rows = [max_batch, hidden];
        let fused = FusedTensors {
            input: group.alloc_symmetric(DType::BF16, &rows)?,
            residual: group.alloc_plain(DType::BF16, &rows)?,
            weight: group.alloc_plain(DType::BF16, &[hidden])?,
            normed: group.alloc_plain(DType::BF16, &rows)?,
        };
        Ok(CpuTp {
            buffer: group.alloc_symmetric(DType::F32, &rows)?,
            fused,
            group,
            variant: Variant::Collective(Impl::Auto),
        })
    }
}

/// What one fused call on the CPU returns.
struct FusedOut {
    /// The implementation that ran (`host_fused_ll`, ...).
    ran: String,
    /// The new residual stream, `[batch, hidden]`.
    residual: Vec<bf16>,
    /// The normalised rows, `[batch, hidden]`.
    normed: Vec<bf16>,
}

/// `v` rounded to bf16.
fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

/// One rank's shard on the CPU.
#[derive(Debug)]
pub struct CpuCompute {
    shard: Shard,
    storage: Storage,
    /// Per layer, the buffers of [`Param::PER_LAYER`] in that order.
    layers: Vec<Vec<Vec<f32>>>,
    input: Vec<f32>,
    final_norm: Vec<f32>,
    /// One buffer per [`Act`], `[max batch, cols]`.
    acts: Vec<Vec<f32>>,
    tp: Option<CpuTp>,
    /// What the all-reduces ran since the last [`CpuCompute::set_variant`].
    ran: BTreeSet<String>,
}

/// The dot product in f32 with eight running sums (so that it vectorises).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

impl CpuCompute {
    /// The shard's weights, KV cache and input from `seed`, activations for `max_batch` rows;
    /// `tp` is the group to all-reduce over (`None`: unsharded).
    pub fn new(
        shard: Shard,
        max_batch: usize,
        seed: u64,
        storage: Storage,
        tp: Option<CpuTp>,
    ) -> Result<CpuCompute> {
        if tp.is_none() != (shard.world == 1) {
            bail!(
                "a shard of {} ranks with no TP group, or the reverse",
                shard.world
            );
        }
        if let Some(tp) = &tp
            && tp.buffer.shape() != [max_batch, shard.dims.hidden]
        {
            bail!(
                "the all-reduce buffer is {:?}, not [{max_batch}, {}]",
                tp.buffer.shape(),
                shard.dims.hidden
            );
        }
        let make = |param, layer| {
            let p = weights::pieces(&shard, param, layer, max_batch, seed);
            let mut v = vec![f32::NAN; weights::len(&p)];
            weights::fill_cpu(&p, &mut v);
            v
        };
        let layers = (0..shard.dims.layers)
            .map(|l| Param::PER_LAYER.iter().map(|&p| make(p, l)).collect())
            .collect();
        let acts = Act::ALL
            .iter()
            .map(|&a| vec![f32::NAN; max_batch * shard.cols(a)])
            .collect();
        Ok(CpuCompute {
            input: make(Param::Input, 0),
            final_norm: make(Param::FinalNorm, 0),
            layers,
            acts,
            shard,
            storage,
            tp,
            ran: BTreeSet::new(),
        })
    }

    /// The first `batch` rows of [`Act::Out`].
    pub fn output(&self, batch: usize) -> Vec<f32> {
        self.acts[Act::Out as usize][..batch * self.shard.dims.hidden].to_vec()
    }

    /// Set [`Act::Out`] to NaN, so that an unwritten element fails the check.
    pub fn poison_output(&mut self) {
        self.acts[Act::Out as usize].fill(f32::NAN);
    }

    /// How the all-reduces run from now on.
    pub fn set_variant(&mut self, variant: Variant) {
        if let Some(tp) = &mut self.tp {
            tp.variant = variant;
        }
        self.ran.clear();
    }

    /// What the all-reduces ran since the last [`CpuCompute::set_variant`].
    pub fn ran(&self) -> Vec<String> {
        self.ran.iter().cloned().collect()
    }

    /// The weight of RMSNorm `w`.
    fn norm_weight(&self, w: Norm) -> &[f32] {
        match w {
            Norm::Attn(l) => self.param(l, Param::AttnNorm),
            Norm::Mlp(l) => self.param(l, Param::MlpNorm),
            Norm::Final => &self.final_norm,
        }
    }

    /// The fused all-reduce + add + RMSNorm of `batch` rows on the host backend: what ran, the
    /// new residual and the normalised rows (bf16).
    fn fused_add_norm(&self, w: Norm, batch: usize, imp: NormImpl) -> Result<FusedOut> {
        let tp = self
            .tp
            .as_ref()
            .context("a fused all-reduce without a TP group")?;
        let n = batch * self.shard.dims.hidden;
        let t = &tp.fused;
        let narrow = |x: &Tensor| {
            x.narrow(0, 0, batch)
                .context("the fused buffers have fewer rows than the batch")
        };
        let (input, residual, normed) =
            (narrow(&t.input)?, narrow(&t.residual)?, narrow(&t.normed)?);
        let g = &tp.group;
        g.upload(&input, &to_bf16(&self.act(Act::Reduce)[..n]))?;
        g.upload(&residual, &to_bf16(&self.act(Act::Hidden)[..n]))?;
        g.upload(&t.weight, &to_bf16(self.norm_weight(w)))?;
        let ran = g.all_reduce_add_rmsnorm(
            &AddRmsNorm::in_place(&input, &residual, &t.weight, self.shard.dims.eps, &normed),
            imp,
        )?;
        Ok(FusedOut {
            ran: ran.name(),
            residual: g.download::<bf16>(&residual)?,
            normed: g.download::<bf16>(&normed)?,
        })
    }

    fn param(&self, layer: usize, param: Param) -> &[f32] {
        &self.layers[layer][param as usize]
    }

    /// Take `act`'s buffer out to write it while reading others (put back by `put`); an
    /// operation never reads the buffer it writes (checked by `distinct`).
    fn take(&mut self, act: Act) -> Vec<f32> {
        std::mem::take(&mut self.acts[act as usize])
    }

    fn put(&mut self, act: Act, v: Vec<f32>) {
        self.acts[act as usize] = v;
    }

    fn act(&self, act: Act) -> &[f32] {
        &self.acts[act as usize]
    }
}

/// `x` and `y` are different buffers (an operation reads one and writes the other).
fn distinct(x: Act, y: Act) -> Result<()> {
    if x == y {
        bail!("{x:?} is read and written by one operation");
    }
    Ok(())
}

impl Compute for CpuCompute {
    fn load_input(&mut self, batch: usize) -> Result<()> {
        let n = batch * self.shard.dims.hidden;
        self.acts[Act::Hidden as usize][..n].copy_from_slice(&self.input[..n]);
        Ok(())
    }

    fn rms_norm(&mut self, x: Act, w: Norm, y: Act, batch: usize) -> Result<()> {
        distinct(x, y)?;
        let (h, eps) = (self.shard.dims.hidden, self.shard.dims.eps);
        let mut out = self.take(y);
        let weight = self.norm_weight(w);
        for (xr, yr) in self
            .act(x)
            .chunks_exact(h)
            .zip(out.chunks_exact_mut(h))
            .take(batch)
        {
            let r = 1.0 / (dot(xr, xr) / h as f32 + eps).sqrt();
            for ((y, &x), &w) in yr.iter_mut().zip(xr).zip(weight) {
                *y = self.storage.store(x * r * w);
            }
        }
        self.put(y, out);
        Ok(())
    }

    fn linear(&mut self, x: Act, w: Linear, y: Act, batch: usize) -> Result<()> {
        distinct(x, y)?;
        let (k, n) = (self.shard.cols(x), self.shard.cols(y));
        let (layer, param) = match w {
            Linear::Qkv(l) => (l, Param::Qkv),
            Linear::O(l) => (l, Param::O),
            Linear::GateUp(l) => (l, Param::GateUp),
            Linear::Down(l) => (l, Param::Down),
        };
        let mut out = self.take(y);
        let weight = self.param(layer, param);
        if weight.len() != n * k {
            bail!("{w:?}: {} weights for [{n}, {k}]", weight.len());
        }
        for (xr, yr) in self
            .act(x)
            .chunks_exact(k)
            .zip(out.chunks_exact_mut(n))
            .take(batch)
        {
            for (y, wr) in yr.iter_mut().zip(weight.chunks_exact(k)) {
                *y = self.storage.store(dot(xr, wr));
            }
        }
        self.put(y, out);
        Ok(())
    }

    fn rope_append_kv(&mut self, layer: usize, batch: usize) -> Result<()> {
        let s = &self.shard;
        let (hd, slots, pos) = (s.dims.head_dim, s.cache_slots(), s.dims.context);
        let (hq, hkv, half) = (s.q_heads(), s.kv_heads(), hd / 2);
        let log2_theta = s.dims.rope_theta.log2();
        let storage = self.storage;
        let mut qkv = self.take(Act::Qkv);
        let mut kcache = std::mem::take(&mut self.layers[layer][Param::KCache as usize]);
        let vcache = &mut self.layers[layer][Param::VCache as usize];
        for (b, row) in qkv
            .chunks_exact_mut(self.shard.cols(Act::Qkv))
            .take(batch)
            .enumerate()
        {
            let slot = |g: usize| ((b * hkv + g) * slots + pos) * hd;
            for head in 0..hq + hkv {
                let x = &mut row[head * hd..(head + 1) * hd];
                for i in 0..half {
                    let inv_freq = (-(2.0 * i as f32 / hd as f32) * log2_theta).exp2();
                    let (sin, cos) = (pos as f32 * inv_freq).sin_cos();
                    let (x0, x1) = (x[i], x[i + half]);
                    let (y0, y1) = (x0 * cos - x1 * sin, x1 * cos + x0 * sin);
                    if head < hq {
                        x[i] = storage.store(y0);
                        x[i + half] = storage.store(y1);
                    } else {
                        let at = slot(head - hq);
                        kcache[at + i] = storage.store(y0);
                        kcache[at + i + half] = storage.store(y1);
                    }
                }
            }
            let v = &row[(hq + hkv) * hd..];
            for g in 0..hkv {
                vcache[slot(g)..slot(g) + hd].copy_from_slice(&v[g * hd..(g + 1) * hd]);
            }
        }
        self.layers[layer][Param::KCache as usize] = kcache;
        self.put(Act::Qkv, qkv);
        Ok(())
    }

    fn attention(&mut self, layer: usize, batch: usize) -> Result<()> {
        let s = &self.shard;
        let (hd, slots) = (s.dims.head_dim, s.cache_slots());
        let (hq, hkv) = (s.q_heads(), s.kv_heads());
        let group = hq / hkv;
        let scale = 1.0 / (hd as f32).sqrt();
        let (qkv_cols, storage) = (s.cols(Act::Qkv), self.storage);
        let mut out = self.take(Act::Attn);
        let (kc, vc) = (
            self.param(layer, Param::KCache),
            self.param(layer, Param::VCache),
        );
        let qkv = self.act(Act::Qkv);
        let mut p = vec![0f32; slots];
        for b in 0..batch {
            for h in 0..hq {
                let g = h / group;
                let q: Vec<f32> = qkv[b * qkv_cols + h * hd..][..hd]
                    .iter()
                    .map(|x| x * scale)
                    .collect();
                let base = (b * hkv + g) * slots * hd;
                let (k, v) = (&kc[base..base + slots * hd], &vc[base..base + slots * hd]);
                for (pt, kt) in p.iter_mut().zip(k.chunks_exact(hd)) {
                    *pt = dot(&q, kt);
                }
                let m = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for pt in p.iter_mut() {
                    *pt = (*pt - m).exp();
                    sum += *pt;
                }
                let o = &mut out[b * hq * hd + h * hd..][..hd];
                for (d, o) in o.iter_mut().enumerate() {
                    let acc: f32 = p
                        .iter()
                        .zip(v.chunks_exact(hd))
                        .map(|(pt, vt)| pt * vt[d])
                        .sum();
                    *o = storage.store(acc / sum);
                }
            }
        }
        self.put(Act::Attn, out);
        Ok(())
    }

    fn swiglu(&mut self, batch: usize) -> Result<()> {
        let i = self.shard.intermediate();
        let mut out = self.take(Act::Mlp);
        for (gu, o) in self
            .act(Act::GateUp)
            .chunks_exact(2 * i)
            .zip(out.chunks_exact_mut(i))
            .take(batch)
        {
            let (gate, up) = gu.split_at(i);
            for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                *o = self.storage.store(g / (1.0 + (-g).exp()) * u);
            }
        }
        self.put(Act::Mlp, out);
        Ok(())
    }

    fn add_residual(&mut self, batch: usize) -> Result<()> {
        let n = batch * self.shard.dims.hidden;
        let mut h = self.take(Act::Hidden);
        for (h, &r) in h[..n].iter_mut().zip(&self.act(Act::Reduce)[..n]) {
            *h = self.storage.store(*h + r);
        }
        self.put(Act::Hidden, h);
        Ok(())
    }

    fn all_reduce(&mut self, batch: usize) -> Result<()> {
        let Some(tp) = &self.tp else {
            return Ok(());
        };
        let n = batch * self.shard.dims.hidden;
        let rows = tp
            .buffer
            .narrow(0, 0, batch)
            .context("the all-reduce buffer has fewer rows than the batch")?;
        tp.group
            .upload(&rows, &self.acts[Act::Reduce as usize][..n])?;
        let imp = tp.variant.collective();
        let ran = tp.group.collective(
            Collective::AllReduce(ReduceOp::Sum),
            &rows,
            &rows,
            None,
            imp,
        )?;
        self.ran.insert(ran.name());
        let summed = tp.group.download::<f32>(&rows)?;
        for (r, s) in self.acts[Act::Reduce as usize][..n].iter_mut().zip(summed) {
            *r = self.storage.store(s);
        }
        Ok(())
    }

    /// With [`Variant::Fused`], symmcomm's fused operation on bf16 copies: the partial sums,
    /// the residual stream and the weight rounded to bf16 and uploaded, the new residual and
    /// `y` downloaded. Otherwise the three operations.
    fn all_reduce_add_norm(&mut self, w: Norm, y: Act, batch: usize) -> Result<()> {
        let imp = match &self.tp {
            Some(CpuTp {
                variant: Variant::Fused(imp),
                ..
            }) => *imp,
            _ => return unfused_all_reduce_add_norm(self, w, y, batch),
        };
        distinct(Act::Hidden, y)?;
        let out = self.fused_add_norm(w, batch, imp)?;
        self.ran.insert(out.ran);
        let n = batch * self.shard.dims.hidden;
        let storage = self.storage;
        for (to, from) in [(Act::Hidden, out.residual), (y, out.normed)] {
            for (t, f) in self.acts[to as usize][..n].iter_mut().zip(from) {
                *t = storage.store(f.to_f32());
            }
        }
        Ok(())
    }
}
