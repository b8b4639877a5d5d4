//! The FWHT on Apple GPUs: the kernels of `kernels/fwht.metal`, compiled at run time on
//! candle's Metal device (as candle-nn's own Metal ops are) and encoded on its command queue.
//!
//! Written against candle-core 0.11.1's Metal backend; it cannot be built on the Linux machines
//! this project is developed on, and has not yet run on Apple hardware (see the README). The
//! kernel source itself runs in the tests, on the CPU, through the emulation in
//! `gpu_emulation.rs`, with the launches this file encodes (`gpu_plan::launches`).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::metal_backend::DeviceId;
use candle_core::{DType, Layout, MetalDevice, MetalError, MetalStorage, Result, Shape};
use candle_metal_kernels::metal::{Buffer, ComputeCommandEncoder, ComputePipeline};
use objc2_metal::MTLSize;

use super::gpu_plan::{self, launches, Element, Limits};
use super::Scaling;

const SOURCE: &str = include_str!("kernels/fwht.metal");

fn poisoned<T>(_: T) -> candle_core::Error {
    candle_core::Error::Msg("fwht: the Metal pipeline cache is poisoned".into())
}

/// The compute pipeline of kernel `name` on `device`, compiled once per device and name.
fn pipeline(device: &MetalDevice, name: &str) -> Result<ComputePipeline> {
    type Cache = HashMap<(DeviceId, String), ComputePipeline>;
    static PIPELINES: OnceLock<Mutex<Cache>> = OnceLock::new();
    static LIBRARIES: OnceLock<Mutex<HashMap<DeviceId, candle_metal_kernels::metal::Library>>> =
        OnceLock::new();
    let key = (device.id(), name.to_string());
    if let Some(pipeline) = PIPELINES
        .get_or_init(Default::default)
        .lock()
        .map_err(poisoned)?
        .get(&key)
    {
        return Ok(pipeline.clone());
    }
    let library = {
        let mut libraries = LIBRARIES
            .get_or_init(Default::default)
            .lock()
            .map_err(poisoned)?;
        match libraries.get(&device.id()) {
            Some(library) => library.clone(),
            None => {
                let library = device
                    .metal_device()
                    .new_library_with_source(SOURCE, None)
                    .map_err(MetalError::from)?;
                libraries.insert(device.id(), library.clone());
                library
            }
        }
    };
    let function = library.get_function(name, None).map_err(MetalError::from)?;
    let pipeline = device
        .metal_device()
        .new_compute_pipeline_state_with_function(&function)
        .map_err(MetalError::from)?;
    PIPELINES
        .get_or_init(Default::default)
        .lock()
        .map_err(poisoned)?
        .insert(key, pipeline.clone());
    Ok(pipeline)
}

fn element(dtype: DType) -> Result<Element> {
    Ok(match dtype {
        DType::F32 => Element::F32,
        DType::F16 => Element::F16,
        DType::BF16 => Element::Bf16,
        other => candle_core::bail!(
            "fwht on Metal: unsupported dtype {other:?} (use f32, f16 or bf16; Metal has no f64)"
        ),
    })
}

/// The FWHT of the contiguous rows of `storage` (the forward of [`super::Fwht`] on Metal).
pub(super) fn fwht(
    storage: &MetalStorage,
    layout: &Layout,
    normalization: Scaling,
) -> Result<(MetalStorage, Shape)> {
    let shape = layout.shape().clone();
    let dtype = storage.dtype();
    let element = element(dtype)?;
    let d = *shape.dims().last().unwrap_or(&1);
    let rows = shape.elem_count() / d.max(1);
    if layout.contiguous_offsets().is_none() {
        candle_core::bail!(
            "fwht on Metal: the input is not contiguous; call .contiguous() first \
             (whvi::fwht::fwht does this for you)"
        );
    }
    let device = storage.device().clone();
    let output = device.new_buffer(shape.elem_count(), dtype, "whvi-fwht")?;
    let plan = launches(
        element,
        rows,
        d.trailing_zeros(),
        normalization.scale(d),
        Limits::metal(),
    );
    let workspace = if plan.iter().any(|l| l.y == gpu_plan::Buffer::Workspace) {
        Some(device.new_buffer(shape.elem_count(), DType::F32, "whvi-fwht-f32")?)
    } else {
        None
    };
    let input = (
        storage.buffer(),
        layout.start_offset() * dtype.size_in_bytes(),
    );
    let bound = |operand| bind(operand, input, &output, workspace.as_ref());
    {
        let encoder = device.command_encoder()?;
        let encoder: &ComputeCommandEncoder = encoder.as_ref();
        for step in &plan {
            if step.grid * step.block > u32::MAX as usize {
                candle_core::bail!(
                    "fwht on Metal: {rows} rows of {d} need more threads than one dispatch takes"
                );
            }
            let (x, x_offset) = bound(step.x)?;
            let (y, y_offset) = bound(step.y)?;
            encoder.set_compute_pipeline_state(&pipeline(&device, &step.kernel)?);
            encoder.set_input_buffer(0, Some(x), x_offset);
            encoder.set_output_buffer(1, Some(y), y_offset);
            encoder.set_bytes(2, &(step.rows as u64));
            encoder.set_bytes(3, &step.log_d);
            encoder.set_bytes(4, &step.fourth);
            encoder.set_bytes(5, &(step.scale as f32));
            if step.shared_bytes > 0 {
                encoder.set_threadgroup_memory_length(0, step.shared_bytes);
            }
            let size = |width| MTLSize {
                width,
                height: 1,
                depth: 1,
            };
            encoder.dispatch_thread_groups(size(step.grid), size(step.block));
        }
    }
    let count = shape.elem_count();
    Ok((MetalStorage::new(output, device, count, dtype), shape))
}

/// The Metal buffer and byte offset of a launch's operand.
fn bind<'a>(
    operand: gpu_plan::Buffer,
    input: (&'a Buffer, usize),
    output: &'a Buffer,
    workspace: Option<&'a Buffer>,
) -> Result<(&'a Buffer, usize)> {
    Ok(match (operand, workspace) {
        (gpu_plan::Buffer::Input, _) => input,
        (gpu_plan::Buffer::Output, _) => (output, 0),
        (gpu_plan::Buffer::Workspace, Some(workspace)) => (workspace, 0),
        (gpu_plan::Buffer::Workspace, None) => {
            candle_core::bail!("fwht on Metal: a dispatch reads a workspace the plan lacks")
        }
    })
}
