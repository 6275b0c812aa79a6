//! Our kernels on one device: NVRTC-compiled CUBINs loaded as modules, their functions, and
//! launches (plain, or with programmatic dependent launch).

use std::ffi::{CString, c_void};
use std::sync::{Arc, OnceLock};

use cudarc::driver::CudaContext;
use cudarc::driver::sys;

use super::driver::check;
#[cfg(feature = "lab")]
use crate::dtype::DType;
use crate::error::{Error, OpCtx, Result};
use crate::kernels::{KernelModule, MODULES, NvrtcCompiler, arch_for};

/// The process's NVRTC compiler, made once.
fn compiler() -> std::result::Result<&'static NvrtcCompiler, String> {
    static C: OnceLock<std::result::Result<NvrtcCompiler, String>> = OnceLock::new();
    C.get_or_init(|| NvrtcCompiler::new().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(Clone::clone)
}

/// A loaded module, unloaded on drop.
#[derive(Debug)]
pub(crate) struct Module {
    raw: sys::CUmodule,
    ctx: Arc<CudaContext>,
}

// SAFETY: module handles are process-wide driver objects; every use binds the owning context.
unsafe impl Send for Module {}
// SAFETY: as above; functions are looked up and launched, never mutated.
unsafe impl Sync for Module {}

impl Drop for Module {
    fn drop(&mut self) {
        if super::ABANDONED.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: the module is live and unloaded once; its functions are dropped first
            // (they hold an Arc to it).
            let _ = unsafe { sys::cuModuleUnload(self.raw) };
        }
    }
}

/// A kernel of a loaded module.
#[derive(Debug, Clone)]
pub(crate) struct Function {
    raw: sys::CUfunction,
    name: &'static str,
    _module: Arc<Module>,
}

// SAFETY: see `Module`; a function handle stays valid while its module (held here) is loaded.
unsafe impl Send for Function {}
// SAFETY: as above.
unsafe impl Sync for Function {}

impl Module {
    /// Compile (or fetch from the cache) and load `module` for this context's device.
    pub(crate) fn load(
        ctx: &Arc<CudaContext>,
        module: &KernelModule,
        cc: (i32, i32),
        op: &OpCtx,
    ) -> Result<Arc<Self>> {
        let compiler = compiler().map_err(|reason| Error::NoGpu {
            reason: format!("cannot compile kernels: {reason}"),
        })?;
        let cubin = compiler.compile(module, &arch_for(cc.0, cc.1))?;
        ctx.bind_to_thread().map_err(|e| Error::Cuda {
            ctx: op.clone(),
            call: "cuCtxSetCurrent",
            message: e.to_string(),
        })?;
        let mut raw = std::ptr::null_mut();
        let r = {
            // SAFETY: `cubin` is a complete CUBIN image that outlives the call; `raw` is valid for
            // writing; the context is current.
            unsafe { sys::cuModuleLoadData(&mut raw, cubin.as_ptr() as *const c_void) }
        };
        check(r, "cuModuleLoadData", op)?;
        Ok(Arc::new(Module {
            raw,
            ctx: ctx.clone(),
        }))
    }

    pub(crate) fn function(self: &Arc<Self>, name: &'static str, op: &OpCtx) -> Result<Function> {
        let c = CString::new(name).expect("kernel names have no NUL");
        let mut raw = std::ptr::null_mut();
        let r = {
            // SAFETY: the module is loaded; `raw` is valid for writing.
            unsafe { sys::cuModuleGetFunction(&mut raw, self.raw, c.as_ptr()) }
        };
        check(r, "cuModuleGetFunction", op)?;
        Ok(Function {
            raw,
            name,
            _module: self.clone(),
        })
    }
}

/// The module named `name` among the embedded sources.
pub(crate) fn source(name: &str) -> &'static KernelModule {
    MODULES
        .iter()
        .find(|m| m.name == name)
        .expect("every module the backend loads is embedded")
}

impl Function {
    /// Launch on `stream`. `args` point to the kernel's parameters in order. With `pdl`, the
    /// launch may overlap the previous kernel on the stream (programmatic dependent launch):
    /// the kernel must wait on the grid dependency before reading what that kernel wrote.
    ///
    /// # Safety
    /// `args` must match the kernel's parameter list in number, order and types, and every
    /// pointer argument must be valid for the kernel's accesses until the launch completes.
    #[allow(clippy::too_many_arguments)] // a launch has this many independent parts
    pub(crate) unsafe fn launch(
        &self,
        grid: u32,
        block: u32,
        shared: u32,
        stream: sys::CUstream,
        args: &mut [*mut c_void],
        pdl: bool,
        op: &OpCtx,
    ) -> Result<()> {
        let mut attr: sys::CUlaunchAttribute = {
            // SAFETY: an all-zero attribute is a valid (ignored) value of this plain C struct.
            unsafe { std::mem::zeroed() }
        };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: grid,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: shared,
            hStream: stream,
            attrs: if pdl { &mut attr } else { std::ptr::null_mut() },
            numAttrs: u32::from(pdl),
        };
        // SAFETY: the caller guarantees the arguments; the function's module is loaded and its
        // context current; `config` and `attr` outlive the call.
        let r = unsafe {
            sys::cuLaunchKernelEx(&config, self.raw, args.as_mut_ptr(), std::ptr::null_mut())
        };
        check(r, "cuLaunchKernelEx", op).map_err(|e| match e {
            Error::Cuda { ctx, message, .. } => Error::Cuda {
                ctx,
                call: "cuLaunchKernelEx",
                message: format!("{}: {message}", self.name),
            },
            other => other,
        })
    }
}

/// The utility kernels: producers, counters, the PDL guard. Only the guard serves engines; the
/// producers, the counter and the ping-pong serve the lab (feature `lab`), and are loaded with
/// the guard from one module either way.
#[derive(Debug)]
#[cfg_attr(not(feature = "lab"), allow(dead_code))]
pub(crate) struct UtilKernels {
    fill: [Function; 5],
    slow_fill_bf16: Function,
    pub(crate) bump: Function,
    pub(crate) guard: Function,
    pub(crate) pingpong: Function,
}

impl UtilKernels {
    pub(crate) fn load(ctx: &Arc<CudaContext>, cc: (i32, i32), op: &OpCtx) -> Result<Self> {
        let m = Module::load(ctx, source("util"), cc, op)?;
        Ok(UtilKernels {
            fill: [
                m.function("symm_fill_f32", op)?,
                m.function("symm_fill_f16", op)?,
                m.function("symm_fill_bf16", op)?,
                m.function("symm_fill_i32", op)?,
                m.function("symm_fill_u8", op)?,
            ],
            slow_fill_bf16: m.function("symm_slow_fill_bf16", op)?,
            bump: m.function("symm_bump", op)?,
            guard: m.function("symm_guard", op)?,
            pingpong: m.function("symm_flag_pingpong", op)?,
        })
    }

    #[cfg(feature = "lab")]
    pub(crate) fn fill(&self, dtype: DType) -> &Function {
        &self.fill[match dtype {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
            DType::I32 => 3,
            DType::U8 => 4,
        }]
    }

    /// A bf16 producer that lets its dependents start at once and writes only after
    /// `delay_ns`: the producer that exposes consumers reading inputs early under PDL.
    #[cfg(feature = "lab")]
    pub(crate) fn slow_fill_bf16(&self) -> &Function {
        &self.slow_fill_bf16
    }
}
