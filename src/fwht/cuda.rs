//! The FWHT on NVIDIA GPUs: launches the kernels of `kernels/fwht.cu` (PTX built by build.rs)
//! on candle's CUDA device and stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, DeviceId, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape};
use half::{bf16, f16};

use super::gpu_plan::{strided_passes, RowPlan};
use super::Normalization;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fwht.ptx"));

/// Threads per block of the strided passes (the kernels' launch bound).
const PASS_BLOCK_THREADS: usize = 256;
/// Blocks of a strided pass; each thread loops over further columns.
const PASS_MAX_BLOCKS: usize = 1 << 16;
/// Dynamic shared memory a kernel may use without opting in.
const DEFAULT_SHARED_BYTES: usize = 48 * 1024;

/// An element type of the kernels: its name in the kernel names, and its accumulator.
trait KernelElement: DeviceRepr + CudaDType {
    const NAME: &'static str;
    /// Bytes of the accumulator type (f64 for f64, f32 otherwise).
    const ACC_BYTES: usize;
    /// The longest row (log2) transformed in one launch: the row's accumulators must fit in
    /// shared memory (128 KiB of f32 at 2^15).
    const MAX_ROW_LOG2: u32 = if Self::ACC_BYTES == 8 { 14 } else { 15 };
}

impl KernelElement for f32 {
    const NAME: &'static str = "f32";
    const ACC_BYTES: usize = 4;
}
impl KernelElement for f64 {
    const NAME: &'static str = "f64";
    const ACC_BYTES: usize = 8;
}
impl KernelElement for f16 {
    const NAME: &'static str = "f16";
    const ACC_BYTES: usize = 4;
}
impl KernelElement for bf16 {
    const NAME: &'static str = "bf16";
    const ACC_BYTES: usize = 4;
}

/// Kernel `name` on `dev`: the module is loaded once per device and each function looked up
/// once, with its dynamic shared-memory limit raised when `shared_bytes` needs it (launches
/// run every training step, so none of this is repeated per launch).
fn function(dev: &CudaDevice, name: &str, shared_bytes: usize) -> Result<CudaFunction> {
    type Functions = HashMap<(DeviceId, String), CudaFunction>;
    static MODULES: OnceLock<Mutex<HashMap<DeviceId, Arc<CudaModule>>>> = OnceLock::new();
    static FUNCTIONS: OnceLock<Mutex<Functions>> = OnceLock::new();
    let poisoned = || candle_core::Error::Msg("fwht: the CUDA kernel cache is poisoned".into());
    let key = (dev.id(), name.to_string());
    let mut functions = FUNCTIONS
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| poisoned())?;
    if let Some(function) = functions.get(&key) {
        return Ok(function.clone());
    }
    let module = {
        let mut modules = MODULES
            .get_or_init(Default::default)
            .lock()
            .map_err(|_| poisoned())?;
        match modules.get(&dev.id()) {
            Some(module) => module.clone(),
            None => {
                let module = dev
                    .cuda_stream()
                    .context()
                    .load_module(Ptx::from_src(PTX))
                    .w()?;
                modules.insert(dev.id(), module.clone());
                module
            }
        }
    };
    let function = module.load_function(name).w()?;
    // A kernel's shared memory depends only on its name (its row length), so setting the limit
    // once per function is enough.
    if shared_bytes > DEFAULT_SHARED_BYTES {
        function
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                shared_bytes as i32,
            )
            .w()?;
    }
    functions.insert(key, function.clone());
    Ok(function)
}

/// The scale argument in the kernel's accumulator type.
enum Scale {
    F32(f32),
    F64(f64),
}

impl Scale {
    fn new<T: KernelElement>(value: f64) -> Self {
        if T::ACC_BYTES == 8 {
            Scale::F64(value)
        } else {
            Scale::F32(value as f32)
        }
    }
}

/// The FWHT of the contiguous rows of `storage` (the forward of [`super::Fwht`] on CUDA).
pub(super) fn fwht(
    storage: &CudaStorage,
    layout: &Layout,
    normalization: Normalization,
) -> Result<(CudaStorage, Shape)> {
    let shape = layout.shape().clone();
    let d = *shape.dims().last().unwrap_or(&1);
    let rows = shape.elem_count() / d.max(1);
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!(
            "fwht on CUDA: the input is not contiguous; call .contiguous() first \
             (whvi::fwht::fwht does this for you)"
        )
    };
    let scale = normalization.scale(d);
    let dev = &storage.device;
    let out = match &storage.slice {
        CudaStorageSlice::F32(x) => {
            wrap(dev, transform(dev, &x.slice(start..end), rows, d, scale)?)
        }
        CudaStorageSlice::F64(x) => {
            wrap(dev, transform(dev, &x.slice(start..end), rows, d, scale)?)
        }
        CudaStorageSlice::F16(x) => wrap(
            dev,
            transform_half(dev, &x.slice(start..end), rows, d, scale)?,
        ),
        CudaStorageSlice::BF16(x) => wrap(
            dev,
            transform_half(dev, &x.slice(start..end), rows, d, scale)?,
        ),
        _ => candle_core::bail!(
            "fwht on CUDA: unsupported dtype {:?} (use f32, f64, f16 or bf16)",
            storage.dtype()
        ),
    };
    Ok((out, shape))
}

fn wrap<T: CudaDType>(dev: &CudaDevice, slice: CudaSlice<T>) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(slice, dev.clone())
}

/// f32 / f64: rows of up to `MAX_ROW_LOG2` bits in one launch; longer rows as blocks of that
/// length, then strided passes in place over the output.
fn transform<T: KernelElement>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    rows: usize,
    d: usize,
    scale: f64,
) -> Result<CudaSlice<T>> {
    // SAFETY: every element is written by the kernels below before it is read.
    let mut y = unsafe { dev.alloc::<T>(rows * d)? };
    if rows == 0 {
        return Ok(y);
    }
    let log_d = d.trailing_zeros();
    if log_d <= T::MAX_ROW_LOG2 {
        launch_rows::<T, T>(dev, x, &mut y, rows, log_d, Scale::new::<T>(scale))?;
        return Ok(y);
    }
    let blocks = rows << (log_d - T::MAX_ROW_LOG2);
    launch_rows::<T, T>(
        dev,
        x,
        &mut y,
        blocks,
        T::MAX_ROW_LOG2,
        Scale::new::<T>(1.0),
    )?;
    launch_passes::<T, T>(dev, &y, &y, rows, log_d, T::MAX_ROW_LOG2, scale)?;
    Ok(y)
}

/// f16 / bf16: short rows straight through (computed in f32 in registers); long rows through an
/// f32 workspace, so that rounding happens once, at the last pass.
fn transform_half<T: KernelElement>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    rows: usize,
    d: usize,
    scale: f64,
) -> Result<CudaSlice<T>> {
    let log_d = d.trailing_zeros();
    if rows == 0 || log_d <= T::MAX_ROW_LOG2 {
        return transform(dev, x, rows, d, scale);
    }
    // SAFETY: both buffers are fully written by the kernels below before they are read.
    let mut workspace = unsafe { dev.alloc::<f32>(rows * d)? };
    let y = unsafe { dev.alloc::<T>(rows * d)? };
    let blocks = rows << (log_d - T::MAX_ROW_LOG2);
    launch_rows::<T, f32>(
        dev,
        x,
        &mut workspace,
        blocks,
        T::MAX_ROW_LOG2,
        Scale::F32(1.0),
    )?;
    launch_passes::<f32, T>(dev, &workspace, &y, rows, log_d, T::MAX_ROW_LOG2, scale)?;
    Ok(y)
}

/// The row kernel: one launch for `rows` rows of `2^log_d` elements, `x` into `y`.
fn launch_rows<TI: KernelElement, TO: KernelElement>(
    dev: &CudaDevice,
    x: &CudaView<TI>,
    y: &mut CudaSlice<TO>,
    rows: usize,
    log_d: u32,
    scale: Scale,
) -> Result<()> {
    let plan = RowPlan::new(log_d);
    let grid = plan.blocks(rows);
    if grid > i32::MAX as usize {
        candle_core::bail!("fwht on CUDA: {rows} rows are more than one launch can take");
    }
    let shared_bytes = plan.shared_values() * TI::ACC_BYTES;
    let name = plan.kernel_name(TI::NAME, TO::NAME);
    let function = function(dev, &name, shared_bytes)?;
    let config = LaunchConfig {
        grid_dim: (grid as u32, 1, 1),
        block_dim: (plan.block_threads() as u32, 1, 1),
        shared_mem_bytes: shared_bytes as u32,
    };
    let stream = dev.cuda_stream();
    let mut launch = stream.launch_builder(&function);
    let (rows, log_d, rows_per_block) = (rows as u64, log_d as i32, plan.rows_per_block as i32);
    launch
        .arg(x)
        .arg(y)
        .arg(&rows)
        .arg(&log_d)
        .arg(&rows_per_block);
    match &scale {
        Scale::F32(s) => launch.arg(s),
        Scale::F64(s) => launch.arg(s),
    };
    // SAFETY: the argument list matches the kernel's signature in fwht.cu, and the grid covers
    // `rows` rows of x and y, both holding rows << log_d elements.
    unsafe { launch.launch(config) }.w()?;
    Ok(())
}

/// Strided passes over bits `[first_bit, log_d)` of rows of `2^log_d`, reading `x` and writing
/// `y` (the same buffer for an in-place pass: each thread reads all of its elements before it
/// writes them, and no two threads share one). Intermediate passes stay in `x`'s type; the
/// last applies `scale` and writes `y`.
fn launch_passes<TI: KernelElement, TO: KernelElement>(
    dev: &CudaDevice,
    x: &CudaSlice<TI>,
    y: &CudaSlice<TO>,
    rows: usize,
    log_d: u32,
    first_bit: u32,
    scale: f64,
) -> Result<()> {
    for pass in strided_passes(first_bit, log_d) {
        let grid = pass
            .columns(rows, log_d)
            .div_ceil(PASS_BLOCK_THREADS)
            .min(PASS_MAX_BLOCKS);
        let config = LaunchConfig {
            grid_dim: (grid as u32, 1, 1),
            block_dim: (PASS_BLOCK_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let last = pass.last;
        let (rows_arg, log_d_arg, low_bit_arg) = (rows as u64, log_d as i32, pass.low_bit as i32);
        let pass_scale = Scale::new::<TI>(if last { scale } else { 1.0 });
        let name = pass.kernel_name(TI::NAME, if last { TO::NAME } else { TI::NAME });
        let function = function(dev, &name, 0)?;
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&function);
        launch.arg(x);
        if last {
            launch.arg(y);
        } else {
            launch.arg(x);
        }
        launch.arg(&rows_arg).arg(&log_d_arg).arg(&low_bit_arg);
        match &pass_scale {
            Scale::F32(s) => launch.arg(s),
            Scale::F64(s) => launch.arg(s),
        };
        // SAFETY: the argument list matches the pass kernel in fwht.cu; the grid-stride loop
        // stays within the rows << log_d elements of x and y.
        unsafe { launch.launch(config) }.w()?;
    }
    Ok(())
}
