//! The FWHT on Apple GPUs: the kernels of `kernels/fwht.metal`, compiled at run time on
//! candle's Metal device (as candle-nn's own Metal ops are) and encoded on its command queue.
//!
//! Written against candle-core 0.11.1's Metal backend; it cannot be built on the Linux machines
//! this project is developed on, and has not yet run on Apple hardware (see the README). CI
//! checks the kernel source with `clang++ -fsyntax-only` and a shim of Metal's headers.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::metal_backend::DeviceId;
use candle_core::{DType, Layout, MetalDevice, MetalError, MetalStorage, Result, Shape};
use candle_metal_kernels::metal::{Buffer, ComputeCommandEncoder, ComputePipeline};
use objc2_metal::MTLSize;

use super::gpu_plan::{strided_passes, RowPlan};
use super::Normalization;

const SOURCE: &str = include_str!("kernels/fwht.metal");

/// The longest row (log2) of one dispatch: 2^13 f32 fill the 32 KiB of threadgroup memory.
const MAX_ROW_LOG2: u32 = 13;
/// Threads per threadgroup of the strided passes.
const PASS_GROUP_THREADS: usize = 256;

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

fn type_name(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => candle_core::bail!(
            "fwht on Metal: unsupported dtype {other:?} (use f32, f16 or bf16; Metal has no f64)"
        ),
    })
}

/// The FWHT of the contiguous rows of `storage` (the forward of [`super::Fwht`] on Metal).
pub(super) fn fwht(
    storage: &MetalStorage,
    layout: &Layout,
    normalization: Normalization,
) -> Result<(MetalStorage, Shape)> {
    let shape = layout.shape().clone();
    let dtype = storage.dtype();
    let name = type_name(dtype)?;
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
    if rows == 0 {
        return Ok((MetalStorage::new(output, device, 0, dtype), shape));
    }
    let input = Operand {
        buffer: storage.buffer(),
        offset: layout.start_offset() * dtype.size_in_bytes(),
        name,
    };
    let scale = normalization.scale(d) as f32;
    let log_d = d.trailing_zeros();
    {
        let encoder = device.command_encoder()?;
        let encoder: &ComputeCommandEncoder = encoder.as_ref();
        let out = Operand {
            buffer: &output,
            offset: 0,
            name,
        };
        if log_d <= MAX_ROW_LOG2 {
            encode_rows(&device, encoder, &input, &out, rows, log_d, scale)?;
        } else {
            let blocks = rows << (log_d - MAX_ROW_LOG2);
            if dtype == DType::F32 {
                encode_rows(&device, encoder, &input, &out, blocks, MAX_ROW_LOG2, 1.0)?;
                encode_passes(&device, encoder, &out, &out, rows, log_d, scale)?;
            } else {
                // Half precision goes through an f32 workspace, rounded once by the last pass.
                let workspace =
                    device.new_buffer(shape.elem_count(), DType::F32, "whvi-fwht-f32")?;
                let workspace = Operand {
                    buffer: &workspace,
                    offset: 0,
                    name: "f32",
                };
                encode_rows(
                    &device,
                    encoder,
                    &input,
                    &workspace,
                    blocks,
                    MAX_ROW_LOG2,
                    1.0,
                )?;
                encode_passes(&device, encoder, &workspace, &out, rows, log_d, scale)?;
            }
        }
    }
    let count = shape.elem_count();
    Ok((MetalStorage::new(output, device, count, dtype), shape))
}

/// A buffer, the byte offset of its first element, and its element type's kernel name.
struct Operand<'a> {
    buffer: &'a Buffer,
    offset: usize,
    name: &'static str,
}

/// One dispatch of a kernel with the argument list both kernels share: `x`, `y`, the number of
/// rows, `log_d`, a fourth integer (rows per threadgroup, or a pass's lowest bit) and the scale.
struct Dispatch<'a> {
    name: String,
    x: &'a Operand<'a>,
    y: &'a Operand<'a>,
    rows: usize,
    log_d: u32,
    fourth: u32,
    scale: f32,
    groups: usize,
    threads_per_group: usize,
}

impl Dispatch<'_> {
    fn encode(&self, device: &MetalDevice, encoder: &ComputeCommandEncoder) -> Result<()> {
        let pipeline = pipeline(device, &self.name)?;
        encoder.set_compute_pipeline_state(&pipeline);
        encoder.set_input_buffer(0, Some(self.x.buffer), self.x.offset);
        encoder.set_output_buffer(1, Some(self.y.buffer), self.y.offset);
        encoder.set_bytes(2, &(self.rows as u64));
        encoder.set_bytes(3, &self.log_d);
        encoder.set_bytes(4, &self.fourth);
        encoder.set_bytes(5, &self.scale);
        let size = |width| MTLSize {
            width,
            height: 1,
            depth: 1,
        };
        encoder.dispatch_thread_groups(size(self.groups), size(self.threads_per_group));
        Ok(())
    }
}

fn encode_rows(
    device: &MetalDevice,
    encoder: &ComputeCommandEncoder,
    x: &Operand,
    y: &Operand,
    rows: usize,
    log_d: u32,
    scale: f32,
) -> Result<()> {
    let plan = RowPlan::new(log_d);
    Dispatch {
        name: plan.kernel_name(x.name, y.name),
        x,
        y,
        rows,
        log_d,
        fourth: plan.rows_per_block as u32,
        scale,
        groups: plan.blocks(rows),
        threads_per_group: plan.block_threads(),
    }
    .encode(device, encoder)
}

/// Strided passes over bits `[MAX_ROW_LOG2, log_d)`: in place in `x` but for the last, which
/// writes `y` with the scale.
fn encode_passes(
    device: &MetalDevice,
    encoder: &ComputeCommandEncoder,
    x: &Operand,
    y: &Operand,
    rows: usize,
    log_d: u32,
    scale: f32,
) -> Result<()> {
    for pass in strided_passes(MAX_ROW_LOG2, log_d) {
        let columns = pass.columns(rows, log_d);
        if columns > u32::MAX as usize {
            candle_core::bail!("fwht on Metal: {columns} columns are more than one pass can take");
        }
        let out = if pass.last { y } else { x };
        Dispatch {
            name: pass.kernel_name(x.name, out.name),
            x,
            y: out,
            rows,
            log_d,
            fourth: pass.low_bit,
            scale: if pass.last { scale } else { 1.0 },
            groups: columns.div_ceil(PASS_GROUP_THREADS),
            threads_per_group: PASS_GROUP_THREADS,
        }
        .encode(device, encoder)?;
    }
    Ok(())
}
