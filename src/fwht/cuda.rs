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

use super::gpu_plan::{launches, Buffer, Element, Limits};
use super::Scaling;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fwht.ptx"));

/// Dynamic shared memory a kernel may use without opting in.
const DEFAULT_SHARED_BYTES: usize = 48 * 1024;

/// An element type of the kernels.
trait KernelElement: DeviceRepr + CudaDType {
    const ELEMENT: Element;
}

impl KernelElement for f32 {
    const ELEMENT: Element = Element::F32;
}
impl KernelElement for f64 {
    const ELEMENT: Element = Element::F64;
}
impl KernelElement for f16 {
    const ELEMENT: Element = Element::F16;
}
impl KernelElement for bf16 {
    const ELEMENT: Element = Element::Bf16;
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

/// The FWHT of the contiguous rows of `storage` (the forward of [`super::Fwht`] on CUDA).
pub(super) fn fwht(
    storage: &CudaStorage,
    layout: &Layout,
    normalization: Scaling,
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
        CudaStorageSlice::F16(x) => {
            wrap(dev, transform(dev, &x.slice(start..end), rows, d, scale)?)
        }
        CudaStorageSlice::BF16(x) => {
            wrap(dev, transform(dev, &x.slice(start..end), rows, d, scale)?)
        }
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

/// Runs the launches of [`launches`] for `rows` rows of `d` elements of `x`.
fn transform<T: KernelElement>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    rows: usize,
    d: usize,
    scale: f64,
) -> Result<CudaSlice<T>> {
    let plan = launches(
        T::ELEMENT,
        rows,
        d.trailing_zeros(),
        scale,
        Limits::cuda(T::ELEMENT),
    );
    // SAFETY: every element of the output (and of the workspace, when the plan uses one) is
    // written by a launch before any launch reads it.
    let y = unsafe { dev.alloc::<T>(rows * d)? };
    let workspace = if plan.iter().any(|l| l.y == Buffer::Workspace) {
        Some(unsafe { dev.alloc::<f32>(rows * d)? })
    } else {
        None
    };
    for step in &plan {
        let function = function(dev, &step.kernel, step.shared_bytes)?;
        if step.grid > i32::MAX as usize {
            candle_core::bail!(
                "fwht on CUDA: {rows} rows of {d} need more blocks than one launch takes"
            );
        }
        let config = LaunchConfig {
            grid_dim: (step.grid as u32, 1, 1),
            block_dim: (step.block as u32, 1, 1),
            shared_mem_bytes: step.shared_bytes as u32,
        };
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&function);
        for buffer in [step.x, step.y] {
            match (buffer, &workspace) {
                (Buffer::Input, _) => launch.arg(x),
                (Buffer::Output, _) => launch.arg(&y),
                (Buffer::Workspace, Some(workspace)) => launch.arg(workspace),
                (Buffer::Workspace, None) => {
                    candle_core::bail!("fwht on CUDA: a launch reads a workspace the plan lacks")
                }
            };
        }
        let (rows_arg, log_d, fourth) = (step.rows as u64, step.log_d as i32, step.fourth as i32);
        launch.arg(&rows_arg).arg(&log_d).arg(&fourth);
        let (scale_f32, scale_f64) = (step.scale as f32, step.scale);
        if T::ELEMENT.accumulator_bytes() == 8 {
            launch.arg(&scale_f64);
        } else {
            launch.arg(&scale_f32);
        }
        // SAFETY: the argument list matches the kernel's signature in fwht.cu
        // (x, y, rows, log_d, rows_per_block or low_bit, scale in the accumulator type), and
        // the plan's grid covers exactly the rows << log_d elements of x and y.
        unsafe { launch.launch(config) }.w()?;
    }
    Ok(y)
}
