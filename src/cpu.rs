//! Access to the CPU data behind tensors, for the fused kernels (convolution, batch
//! normalisation, pooling, the WHVI product) that read their inputs in place.

use candle_core::{bail, CpuStorage, Layout, Result, Storage, Tensor, WithDType};

/// The elements a contiguous layout addresses in `storage`, or an error naming `op`.
pub(crate) fn slice<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [T]> {
    let data = T::cpu_storage_as_slice(storage)?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: inputs must be contiguous"),
    }
}

/// Calls `f` with the data of `tensors` (CPU, element type `T`, contiguous) in place: copying
/// them out would cost as much as the kernels that read them.
pub(crate) fn with_slices<T: WithDType, R>(
    op: &str,
    tensors: &[&Tensor],
    f: impl FnOnce(&[&[T]]) -> R,
) -> Result<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            bail!("{op}: this kernel runs on the CPU only");
        };
        slices.push(slice::<T>(cpu, layout, op)?);
    }
    Ok(f(&slices))
}
