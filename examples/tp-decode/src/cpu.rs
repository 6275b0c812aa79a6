//! The CPU implementation of [`Compute`]: f32 arithmetic over f32 buffers, the reference a
//! machine without GPUs runs (symmcomm's host backend carries the all-reduces, ranks are
//! threads). With [`Storage::Bf16`] every stored activation is rounded to bf16 at the points
//! where the CUDA implementation stores bf16, which is how the GPU check's tolerance was
//! chosen (see `check.rs`).

use std::collections::BTreeSet;

use anyhow::{Context, Result, bail};
use half::bf16;
use symmcomm::{Collective, Group, Impl, ReduceOp, Tensor};

use crate::compute::Compute;
use crate::model::{Act, Linear, Norm, Shard};
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
/// f32 tensor of `[max batch, hidden]` that [`Act::Reduce`] is copied through.
#[derive(Debug)]
pub struct CpuTp {
    /// The TP group.
    pub group: Group,
    /// Where the all-reduce runs (in place).
    pub buffer: Tensor,
    /// The implementation asked for.
    pub imp: Impl,
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
    /// What the all-reduces ran since the last [`CpuCompute::set_impl`].
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

    /// The implementation the all-reduces use from now on.
    pub fn set_impl(&mut self, imp: Impl) {
        if let Some(tp) = &mut self.tp {
            tp.imp = imp;
        }
        self.ran.clear();
    }

    /// What the all-reduces ran since the last [`CpuCompute::set_impl`].
    pub fn ran(&self) -> Vec<String> {
        self.ran.iter().cloned().collect()
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
        let weight = match w {
            Norm::Attn(l) => self.param(l, Param::AttnNorm),
            Norm::Mlp(l) => self.param(l, Param::MlpNorm),
            Norm::Final => &self.final_norm,
        };
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
        let ran = tp.group.collective(
            Collective::AllReduce(ReduceOp::Sum),
            &rows,
            &rows,
            None,
            tp.imp,
        )?;
        self.ran.insert(ran.name());
        let summed = tp.group.download::<f32>(&rows)?;
        for (r, s) in self.acts[Act::Reduce as usize][..n].iter_mut().zip(summed) {
            *r = self.storage.store(s);
        }
        Ok(())
    }
}
