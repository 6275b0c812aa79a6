//! The CUDA implementation of [`Compute`], as an engine on cudarc writes it: its own context and
//! stream, bf16 buffers it owns (`CudaSlice`), the GEMMs on cuBLAS (bf16 in and out, f32
//! accumulation), its own kernels (`kernels.cu`, compiled at run time by NVRTC, [`crate::nvrtc`]),
//! everything on one stream so that the whole step can be captured in one
//! CUDA graph. o_proj and down_proj write their partial sums straight into the TP group's
//! symmetric memory ([`symmcomm::Tensor::cuda_view`] hands it to cuBLAS), where the all-reduce
//! runs in place on the same stream.

use std::collections::BTreeSet;
use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, sys as cublas_sys};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg,
};
use half::bf16;
use symmcomm::norm::AddRmsNorm;
use symmcomm::{Collective, Group, Impl, ReduceOp, Tensor};

use crate::compute::{Compute, unfused_all_reduce_add_norm};
use crate::model::{Act, Linear, Norm, Shard};
use crate::variant::Variant;
use crate::weights::{self, Param};

/// cuBLAS's workspace: 32 MiB, NVIDIA's recommendation for Hopper. Given explicitly so that
/// cuBLAS never allocates one while a graph is being captured.
const CUBLAS_WORKSPACE: usize = 32 << 20;
/// Threads of the row kernels (RMSNorm, RoPE) and the elementwise ones.
const BLOCK: u32 = 256;
/// Threads of the attention kernel (8 warps, each taking 32 / (head_dim / 8) tokens at a time).
const ATTENTION_BLOCK: u32 = 256;

/// Whether cuBLAS can be loaded (cudarc loads it lazily and would panic at the first call),
/// or an error naming the file that is missing or does not load.
pub fn check_cublas() -> Result<()> {
    crate::nvrtc::check_library(
        "cublas",
        "add the folder of libcublas.so.13 and libcublasLt.so.13 to LD_LIBRARY_PATH (e.g. \
         /usr/local/cuda-13.0/targets/x86_64-linux/lib, or a Python environment's \
         site-packages/nvidia/cublas/lib or nvidia/cu13/lib)",
    )
}

/// The kernels of `kernels.cu`, loaded on one context.
#[derive(Debug)]
pub struct Kernels {
    fill: CudaFunction,
    rmsnorm: CudaFunction,
    rope_append: CudaFunction,
    attention: CudaFunction,
    swiglu: CudaFunction,
    add: CudaFunction,
}

impl Kernels {
    /// Compile `kernels.cu` for `ctx`'s GPU and load it.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Kernels> {
        let (major, minor) = ctx.compute_capability()?;
        let module = ctx.load_module(crate::nvrtc::compile(major, minor)?)?;
        let f = |name: &str| {
            module
                .load_function(name)
                .with_context(|| format!("kernel {name}"))
        };
        Ok(Kernels {
            fill: f("tp_fill")?,
            rmsnorm: f("tp_rmsnorm")?,
            rope_append: f("tp_rope_append")?,
            attention: f("tp_attention")?,
            swiglu: f("tp_swiglu")?,
            add: f("tp_add")?,
        })
    }
}

/// The buffers of one decoder layer.
#[derive(Debug)]
struct Layer {
    qkv: CudaSlice<bf16>,
    o: CudaSlice<bf16>,
    gate_up: CudaSlice<bf16>,
    down: CudaSlice<bf16>,
    attn_norm: CudaSlice<bf16>,
    mlp_norm: CudaSlice<bf16>,
    kcache: CudaSlice<bf16>,
    vcache: CudaSlice<bf16>,
}

/// One rank's shard on a GPU.
#[derive(Debug)]
pub struct CudaCompute {
    shard: Shard,
    max_batch: usize,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    _workspace: CudaSlice<u8>,
    kernels: Arc<Kernels>,
    /// The engine's buffers the fused all-reduce + add + RMSNorm takes, as the TP group's
    /// tensors (made once, outside any capture); `None` when unsharded. Declared before the
    /// buffers, so dropped before them.
    fused: Option<FusedViews>,
    layers: Vec<Layer>,
    input: CudaSlice<bf16>,
    final_norm: CudaSlice<bf16>,
    /// The activations other than [`Act::Reduce`], in [`Act::ALL`]'s order.
    acts: Vec<CudaSlice<bf16>>,
    /// [`Act::Reduce`]: `[max batch, hidden]` bf16, in the TP group's symmetric memory (or
    /// plain memory when unsharded).
    reduce: Tensor,
    /// The TP group (bound to `stream`) and how its all-reduces run.
    tp: Option<(Group, Variant)>,
    /// What the all-reduces ran (`ll`, `nccl`, `fused_ll`, ...), since the last
    /// [`CudaCompute::set_variant`].
    ran: BTreeSet<String>,
}

/// Where `act` is in `acts` (every activation but the all-reduce buffer).
fn slot(act: Act) -> Result<usize> {
    match act {
        Act::Hidden => Ok(0),
        Act::Normed => Ok(1),
        Act::Qkv => Ok(2),
        Act::Attn => Ok(3),
        Act::GateUp => Ok(4),
        Act::Mlp => Ok(5),
        Act::Out => Ok(6),
        Act::Reduce => bail!("Act::Reduce lives in the TP group's memory, not in acts"),
    }
}

/// The weight of RMSNorm `w`.
fn norm_weight<'a>(
    layers: &'a [Layer],
    final_norm: &'a CudaSlice<bf16>,
    w: Norm,
) -> &'a CudaSlice<bf16> {
    match w {
        Norm::Attn(l) => &layers[l].attn_norm,
        Norm::Mlp(l) => &layers[l].mlp_norm,
        Norm::Final => final_norm,
    }
}

/// `acts[read]` to read and `acts[write]` to write, at once.
fn read_write(
    acts: &mut [CudaSlice<bf16>],
    read: Act,
    write: Act,
) -> Result<(&CudaSlice<bf16>, &mut CudaSlice<bf16>)> {
    let (r, w) = (slot(read)?, slot(write)?);
    ensure!(r != w, "{read:?} is read and written by one operation");
    if r < w {
        let (a, b) = acts.split_at_mut(w);
        Ok((&a[r], &mut b[0]))
    } else {
        let (a, b) = acts.split_at_mut(r);
        Ok((&b[0], &mut a[w]))
    }
}

/// Blocks of `BLOCK` threads covering `n` elements with a grid-stride loop.
fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(BLOCK as usize).clamp(1, 65_535) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `y[batch, n] = x[batch, k] · w[n, k]ᵀ`, bf16 in and out, f32 accumulation. In cuBLAS's
/// column-major terms `yᵀ = op(W)·xᵀ` with W transposed ("TN").
fn gemm(
    blas: &CudaBlas,
    x: &impl DevicePtr<bf16>,
    w: &CudaSlice<bf16>,
    y: &mut impl DevicePtrMut<bf16>,
    (batch, n, k): (usize, usize, usize),
) -> Result<()> {
    ensure!(
        x.len() >= batch * k && w.len() == n * k && y.len() >= batch * n,
        "gemm of [{batch}, {k}] x [{n}, {k}]^T on buffers of {}, {} and {} elements",
        x.len(),
        w.len(),
        y.len()
    );
    let cfg = GemmConfig {
        transa: cublas_sys::cublasOperation_t::CUBLAS_OP_T,
        transb: cublas_sys::cublasOperation_t::CUBLAS_OP_N,
        m: i32::try_from(n)?,
        n: i32::try_from(batch)?,
        k: i32::try_from(k)?,
        alpha: bf16::ONE,
        lda: i32::try_from(k)?,
        ldb: i32::try_from(k)?,
        beta: bf16::ZERO,
        ldc: i32::try_from(n)?,
    };
    // SAFETY: checked above: W holds n x k elements (lda = k), x at least batch x k (ldb = k)
    // and y at least batch x n (ldc = n), all on the handle's device; the handle's stream
    // orders the call after the writes of x.
    unsafe { blas.gemm(cfg, w, x, y) }?;
    Ok(())
}

/// That there is a TP group exactly when the shard is split, and that the all-reduce buffer is
/// `[max_batch, hidden]`.
fn check_shapes(
    shard: &Shard,
    max_batch: usize,
    reduce: &Tensor,
    tp: Option<&Group>,
) -> Result<()> {
    ensure!(
        tp.is_none() == (shard.world == 1),
        "a shard of {} ranks with no TP group, or the reverse",
        shard.world
    );
    ensure!(
        reduce.shape() == [max_batch, shard.dims.hidden],
        "the all-reduce buffer is {:?}, not [{max_batch}, {}]",
        reduce.shape(),
        shard.dims.hidden
    );
    Ok(())
}

/// A cuBLAS handle on `stream` and the workspace it was given ([`CUBLAS_WORKSPACE`] bytes), so
/// that it never allocates one during a capture. The caller keeps the workspace alive for the
/// handle's whole life ([`CudaCompute`] holds both, `blas` first, so the handle drops first).
fn cublas_with_workspace(stream: &Arc<CudaStream>) -> Result<(CudaBlas, CudaSlice<u8>)> {
    let blas = CudaBlas::new(stream.clone())?;
    let mut workspace = stream.alloc_zeros::<u8>(CUBLAS_WORKSPACE)?;
    {
        let (ptr, _sync) = workspace.device_ptr_mut(stream);
        // SAFETY: the workspace is CUBLAS_WORKSPACE bytes of this device's memory, returned
        // with the handle, and the caller keeps it alive for the handle's whole life
        // (`CudaCompute` holds both; `blas` is declared first, so dropped first).
        unsafe {
            cublas_sys::cublasSetWorkspace_v2(
                *blas.handle(),
                ptr as *mut std::ffi::c_void,
                CUBLAS_WORKSPACE,
            )
        }
        .result()?;
    }
    Ok((blas, workspace))
}

/// The activations other than [`Act::Reduce`], `max_batch` rows each, zeroed, in [`Act::ALL`]'s
/// order.
fn alloc_acts(
    stream: &Arc<CudaStream>,
    shard: &Shard,
    max_batch: usize,
) -> Result<Vec<CudaSlice<bf16>>> {
    let mut acts = Vec::new();
    for act in Act::ALL.into_iter().filter(|&a| a != Act::Reduce) {
        acts.push(stream.alloc_zeros::<bf16>(max_batch * shard.cols(act))?);
    }
    Ok(acts)
}

/// What generating a shard's buffers on the GPU reads: `tp_fill` launched on `stream` for every
/// [`weights::Piece`] of a parameter.
struct ParamGen<'a> {
    stream: &'a Arc<CudaStream>,
    kernels: &'a Kernels,
    shard: &'a Shard,
    max_batch: usize,
    seed: u64,
}

impl ParamGen<'_> {
    /// The buffers of decoder layer `l`, generated in [`Param::PER_LAYER`]'s order.
    fn layer(&self, l: usize) -> Result<Layer> {
        Ok(Layer {
            qkv: self.param(Param::Qkv, l)?,
            o: self.param(Param::O, l)?,
            gate_up: self.param(Param::GateUp, l)?,
            down: self.param(Param::Down, l)?,
            attn_norm: self.param(Param::AttnNorm, l)?,
            mlp_norm: self.param(Param::MlpNorm, l)?,
            kcache: self.param(Param::KCache, l)?,
            vcache: self.param(Param::VCache, l)?,
        })
    }

    /// `param` of layer `layer`: a zeroed buffer, then one `tp_fill` per piece.
    fn param(&self, param: Param, layer: usize) -> Result<CudaSlice<bf16>> {
        let (stream, kernels) = (self.stream, self.kernels);
        let pieces = weights::pieces(self.shard, param, layer, self.max_batch, self.seed);
        let mut buf = stream.alloc_zeros::<bf16>(weights::len(&pieces))?;
        for p in &pieces {
            let n = (p.rows * p.cols) as usize;
            let mut dst = buf.slice_mut(p.dst_offset..p.dst_offset + n);
            let mut launch = stream.launch_builder(&kernels.fill);
            launch
                .arg(&mut dst)
                .arg(&p.key)
                .arg(&p.full_cols)
                .arg(&p.row0)
                .arg(&p.col0)
                .arg(&p.rows)
                .arg(&p.cols)
                .arg(&p.offset)
                .arg(&p.scale);
            // SAFETY: tp_fill(bf16*, u64 x 6, float, float) writes rows x cols = n
            // elements from dst, a view of exactly n elements.
            unsafe { launch.launch(elementwise(n)) }?;
        }
        Ok(buf)
    }
}

/// [`Act::Hidden`], [`Act::Normed`] and [`Act::Out`] (`[max batch, hidden]`) and every RMSNorm
/// weight (`[hidden]`) as tensors of the TP group, wrapping the engine's memory in place.
#[derive(Debug)]
struct FusedViews {
    acts: Vec<(Act, Tensor)>,
    attn: Vec<Tensor>,
    mlp: Vec<Tensor>,
    final_norm: Tensor,
}

impl FusedViews {
    /// The views on `group` of the buffers that live in `c` (asks the driver about each
    /// allocation once, here, rather than inside a capture).
    fn new(group: &Group, c: &CudaCompute) -> Result<FusedViews> {
        let hidden = c.shard.dims.hidden;
        let view = |slice: &CudaSlice<bf16>, shape: &[usize]| -> Result<Tensor> {
            let (ptr, _sync) = slice.device_ptr(&c.stream);
            // SAFETY: `slice` holds at least shape's elements (checked by wrap_raw against
            // the allocation too) and lives in `c`, which owns these views and drops them
            // first; every graph captured with them is replayed only while `c` lives.
            Ok(unsafe { group.wrap_raw(ptr, symmcomm::DType::BF16, shape)? })
        };
        let mut acts = Vec::new();
        for act in [Act::Hidden, Act::Normed, Act::Out] {
            acts.push((act, view(&c.acts[slot(act)?], &[c.max_batch, hidden])?));
        }
        let weights = |f: fn(&Layer) -> &CudaSlice<bf16>| -> Result<Vec<Tensor>> {
            c.layers.iter().map(|l| view(f(l), &[hidden])).collect()
        };
        Ok(FusedViews {
            acts,
            attn: weights(|l| &l.attn_norm)?,
            mlp: weights(|l| &l.mlp_norm)?,
            final_norm: view(&c.final_norm, &[hidden])?,
        })
    }

    /// The first `batch` rows of `act`'s view.
    fn rows(&self, act: Act, batch: usize) -> Result<Tensor> {
        let (_, t) = self
            .acts
            .iter()
            .find(|(a, _)| *a == act)
            .with_context(|| format!("no fused view of {act:?}"))?;
        t.narrow(0, 0, batch)
            .context("the fused views have fewer rows than the batch")
    }

    /// The weight of RMSNorm `w`.
    fn weight(&self, w: Norm) -> &Tensor {
        match w {
            Norm::Attn(l) => &self.attn[l],
            Norm::Mlp(l) => &self.mlp[l],
            Norm::Final => &self.final_norm,
        }
    }
}

impl CudaCompute {
    /// The shard's weights, KV cache and input generated from `seed` on the GPU, activations
    /// for `max_batch` rows; `reduce` is [`Act::Reduce`] (`[max batch, hidden]` bf16) and `tp`
    /// the group it is all-reduced over (`None`: unsharded), bound to `stream`.
    pub fn new(
        stream: Arc<CudaStream>,
        kernels: Arc<Kernels>,
        shard: Shard,
        max_batch: usize,
        seed: u64,
        reduce: Tensor,
        tp: Option<Group>,
    ) -> Result<CudaCompute> {
        check_shapes(&shard, max_batch, &reduce, tp.as_ref())?;
        let (blas, workspace) = cublas_with_workspace(&stream)?;
        let gen_param = ParamGen {
            stream: &stream,
            kernels: &kernels,
            shard: &shard,
            max_batch,
            seed,
        };
        let layers = (0..shard.dims.layers)
            .map(|l| gen_param.layer(l))
            .collect::<Result<Vec<_>>>()?;
        let input = gen_param.param(Param::Input, 0)?;
        let final_norm = gen_param.param(Param::FinalNorm, 0)?;
        let acts = alloc_acts(&stream, &shard, max_batch)?;
        CudaCompute {
            shard,
            max_batch,
            stream,
            blas,
            _workspace: workspace,
            kernels,
            layers,
            input,
            final_norm,
            acts,
            reduce,
            tp: None,
            fused: None,
            ran: BTreeSet::new(),
        }
        .with_group(tp)
    }

    /// `self` all-reducing over `tp` (auto until [`CudaCompute::set_variant`]), with the views
    /// the fused variant takes.
    fn with_group(mut self, tp: Option<Group>) -> Result<CudaCompute> {
        if let Some(g) = tp {
            self.fused = Some(FusedViews::new(&g, &self)?);
            self.tp = Some((g, Variant::Collective(Impl::Auto)));
        }
        Ok(self)
    }

    /// How the all-reduces run from now on (captured into the next graph).
    pub fn set_variant(&mut self, variant: Variant) {
        if let Some((_, v)) = &mut self.tp {
            *v = variant;
        }
        self.ran.clear();
    }

    /// What the all-reduces ran since the last [`CudaCompute::set_variant`].
    pub fn ran(&self) -> Vec<String> {
        self.ran.iter().cloned().collect()
    }

    /// Set [`Act::Out`] to NaN (bf16 0xFFFF), so that an unwritten element fails the check.
    pub fn poison_output(&mut self) -> Result<()> {
        let out = &mut self.acts[slot(Act::Out)?];
        let nan = vec![bf16::from_bits(0xFFFF); out.len()];
        self.stream.memcpy_htod(&nan, out)?;
        Ok(())
    }

    /// The first `batch` rows of [`Act::Out`], as f32 (waits for the stream).
    pub fn output(&self, batch: usize) -> Result<Vec<f32>> {
        let n = batch * self.shard.dims.hidden;
        let out = self.acts[slot(Act::Out)?].slice(0..n);
        let host = self.stream.clone_dtoh(&out)?;
        Ok(host.into_iter().map(f32::from).collect())
    }

    fn check_batch(&self, batch: usize) -> Result<()> {
        ensure!(
            (1..=self.max_batch).contains(&batch),
            "batch {batch} outside 1..={}",
            self.max_batch
        );
        Ok(())
    }

    /// The first `batch` rows of [`Act::Reduce`].
    fn reduce_rows(&self, batch: usize) -> Result<Tensor> {
        self.reduce
            .narrow(0, 0, batch)
            .context("the all-reduce buffer has fewer rows than the batch")
    }
}

impl Compute for CudaCompute {
    fn load_input(&mut self, batch: usize) -> Result<()> {
        self.check_batch(batch)?;
        let n = batch * self.shard.dims.hidden;
        let src = self.input.slice(0..n);
        let mut dst = self.acts[slot(Act::Hidden)?].slice_mut(0..n);
        self.stream.memcpy_dtod(&src, &mut dst)?;
        Ok(())
    }

    fn rms_norm(&mut self, x: Act, w: Norm, y: Act, batch: usize) -> Result<()> {
        self.check_batch(batch)?;
        let weight = norm_weight(&self.layers, &self.final_norm, w);
        let (cols, eps) = (self.shard.dims.hidden as i32, self.shard.dims.eps);
        let (xin, out) = read_write(&mut self.acts, x, y)?;
        let mut launch = self.stream.launch_builder(&self.kernels.rmsnorm);
        launch.arg(xin).arg(weight).arg(out).arg(&cols).arg(&eps);
        // SAFETY: tp_rmsnorm(const bf16* x, const bf16* w, bf16* y, int cols, float eps), one
        // block per row: batch rows of `cols` of x and y (both hidden wide, max batch rows) and
        // `cols` weights.
        unsafe {
            launch.launch(LaunchConfig {
                grid_dim: (batch as u32, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            })
        }?;
        Ok(())
    }

    fn linear(&mut self, x: Act, w: Linear, y: Act, batch: usize) -> Result<()> {
        self.check_batch(batch)?;
        let dims = (batch, self.shard.cols(y), self.shard.cols(x));
        let weight = match w {
            Linear::Qkv(l) => &self.layers[l].qkv,
            Linear::O(l) => &self.layers[l].o,
            Linear::GateUp(l) => &self.layers[l].gate_up,
            Linear::Down(l) => &self.layers[l].down,
        };
        if y == Act::Reduce {
            // The partial sums go straight into the group's window: cuBLAS writes it through
            // symmcomm's view, then the all-reduce runs in place.
            let rows = self
                .reduce
                .narrow(0, 0, batch)
                .context("the all-reduce buffer has fewer rows than the batch")?;
            let mut out = rows.cuda_view::<bf16>(&self.stream)?;
            gemm(&self.blas, &self.acts[slot(x)?], weight, &mut out, dims)
        } else {
            let (xin, out) = read_write(&mut self.acts, x, y)?;
            gemm(&self.blas, xin, weight, out, dims)
        }
    }

    fn rope_append_kv(&mut self, layer: usize, batch: usize) -> Result<()> {
        self.check_batch(batch)?;
        let s = &self.shard;
        let (q_heads, kv_heads) = (s.q_heads() as i32, s.kv_heads() as i32);
        let (head_dim, slots) = (s.dims.head_dim as i32, s.cache_slots() as i32);
        let (pos, log2_theta) = (s.dims.context as i32, s.dims.rope_theta.log2());
        let l = &mut self.layers[layer];
        let qkv = &mut self.acts[slot(Act::Qkv)?];
        let mut launch = self.stream.launch_builder(&self.kernels.rope_append);
        launch
            .arg(qkv)
            .arg(&mut l.kcache)
            .arg(&mut l.vcache)
            .arg(&q_heads)
            .arg(&kv_heads)
            .arg(&head_dim)
            .arg(&slots)
            .arg(&pos)
            .arg(&log2_theta);
        // SAFETY: tp_rope_append(bf16* qkv, bf16* kcache, bf16* vcache, int x 5, float), one
        // block per batch row: row b of qkv ((q + 2 kv) heads of head_dim) and slot `pos` <
        // slots of row b's kv heads in the caches ([max batch, kv heads, slots, head_dim]).
        unsafe {
            launch.launch(LaunchConfig {
                grid_dim: (batch as u32, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            })
        }?;
        Ok(())
    }

    fn attention(&mut self, layer: usize, batch: usize) -> Result<()> {
        self.check_batch(batch)?;
        let s = &self.shard;
        let (q_heads, kv_heads) = (s.q_heads() as i32, s.kv_heads() as i32);
        let (head_dim, slots) = (s.dims.head_dim as i32, s.cache_slots() as i32);
        let scale = 1.0 / (s.dims.head_dim as f32).sqrt();
        let warps = (ATTENTION_BLOCK / 32) as usize;
        let shared = ((s.cache_slots() + warps * s.dims.head_dim) * 4) as u32;
        let l = &self.layers[layer];
        let (qkv, out) = read_write(&mut self.acts, Act::Qkv, Act::Attn)?;
        let mut launch = self.stream.launch_builder(&self.kernels.attention);
        launch
            .arg(qkv)
            .arg(&l.kcache)
            .arg(&l.vcache)
            .arg(out)
            .arg(&q_heads)
            .arg(&kv_heads)
            .arg(&head_dim)
            .arg(&slots)
            .arg(&scale);
        // SAFETY: tp_attention(const bf16* qkv, const bf16* kcache, const bf16* vcache, bf16*
        // out, int x 4, float), one block per (query head, batch row) of whole warps: reads q
        // of row b and `slots` tokens of its KV head in 16-byte loads (head_dim a power of two
        // from 8 to 256 by Dims::validate, so every row starts 16-byte aligned in buffers
        // cudarc allocated), writes head h of row b of out; the dynamic shared memory holds
        // slots + 8 x head_dim floats (at most 40.0 KB by Dims::validate, under the default
        // 48 KB).
        unsafe {
            launch.launch(LaunchConfig {
                grid_dim: (q_heads as u32, batch as u32, 1),
                block_dim: (ATTENTION_BLOCK, 1, 1),
                shared_mem_bytes: shared,
            })
        }?;
        Ok(())
    }

    fn swiglu(&mut self, batch: usize) -> Result<()> {
        self.check_batch(batch)?;
        let inter = self.shard.intermediate();
        let (n, inter_i) = (i32::try_from(batch * inter)?, inter as i32);
        let (gate_up, out) = read_write(&mut self.acts, Act::GateUp, Act::Mlp)?;
        let mut launch = self.stream.launch_builder(&self.kernels.swiglu);
        launch.arg(gate_up).arg(out).arg(&n).arg(&inter_i);
        // SAFETY: tp_swiglu(const bf16* gate_up, bf16* out, int n, int inter) reads batch rows
        // of 2 x inter and writes n = batch x inter elements, within both buffers.
        unsafe { launch.launch(elementwise(batch * inter)) }?;
        Ok(())
    }

    fn add_residual(&mut self, batch: usize) -> Result<()> {
        self.check_batch(batch)?;
        let n_elems = batch * self.shard.dims.hidden;
        let n = i32::try_from(n_elems)?;
        let rows = self.reduce_rows(batch)?;
        let reduced = rows.cuda_view::<bf16>(&self.stream)?;
        let hidden = &mut self.acts[slot(Act::Hidden)?];
        let mut launch = self.stream.launch_builder(&self.kernels.add);
        launch.arg(hidden).arg(&reduced).arg(&n);
        // SAFETY: tp_add(bf16* h, const bf16* r, int n) over n = batch x hidden elements,
        // within the residual stream and the first `batch` rows of the all-reduce buffer.
        unsafe { launch.launch(elementwise(n_elems)) }?;
        Ok(())
    }

    fn all_reduce(&mut self, batch: usize) -> Result<()> {
        self.check_batch(batch)?;
        let Some((group, variant)) = &self.tp else {
            return Ok(());
        };
        let imp = variant.collective();
        let rows = self.reduce_rows(batch)?;
        let ran = group.collective(
            Collective::AllReduce(ReduceOp::Sum),
            &rows,
            &rows,
            None,
            imp,
        )?;
        self.ran.insert(ran.name());
        Ok(())
    }

    /// With [`Variant::Fused`], one call of symmcomm's: the partial sums in the group's window
    /// are all-reduced, added to the residual stream in place and normalised into `y`, the
    /// engine's own buffers borrowed for the call. Otherwise the three operations.
    fn all_reduce_add_norm(&mut self, w: Norm, y: Act, batch: usize) -> Result<()> {
        self.check_batch(batch)?;
        let (Some((group, Variant::Fused(imp))), Some(views)) = (&self.tp, &self.fused) else {
            return unfused_all_reduce_add_norm(self, w, y, batch);
        };
        let rows = self.reduce_rows(batch)?;
        let residual = views.rows(Act::Hidden, batch)?;
        let normed = views.rows(y, batch)?;
        let eps = self.shard.dims.eps;
        let ran = group.all_reduce_add_rmsnorm(
            &AddRmsNorm::in_place(&rows, &residual, views.weight(w), eps, &normed),
            *imp,
        )?;
        self.ran.insert(ran.name());
        Ok(())
    }
}
