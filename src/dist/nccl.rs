//! Sums of CUDA tensors over the ranks through NCCL (the `nccl` feature): one communicator per
//! job, its unique id made by rank 0 and broadcast over the group's MPI engine, the sums queued
//! on candle's stream of each rank's GPU (so they run in order with its kernels).

use std::ffi::c_char;
use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr};
use candle_core::cuda_backend::cudarc::nccl::result::NcclError;
use candle_core::cuda_backend::cudarc::nccl::sys::ncclResult_t;
use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, NcclType, ReduceOp};
use candle_core::cuda_backend::CudaDType;
use candle_core::{
    backend::BackendStorage, bail, CpuStorage, CudaDevice, CudaStorage, CustomOp1, DType, Device,
    Layout, Shape, Tensor,
};

use super::{DeviceCollective, Group};
use crate::{device::device_name, Error, Result};

/// The NCCL communicator of a group's ranks, each on its own GPU.
pub(super) struct Nccl {
    communicator: Arc<Communicator>,
    device: Device,
}

/// NCCL calls on one communicator must not overlap: the lock orders them.
struct Communicator {
    comm: Mutex<Comm>,
}

impl Drop for Communicator {
    fn drop(&mut self) {
        // cudarc's `Comm` aborts the communicator when dropped: let the queued sums end first.
        let comm = self.comm.get_mut().unwrap_or_else(|p| p.into_inner());
        let _ = comm.stream().synchronize();
    }
}

// SAFETY: the communicator handle is only used under the mutex; NCCL allows calls on it from
// any thread as long as they do not overlap.
unsafe impl Send for Communicator {}
// SAFETY: as above.
unsafe impl Sync for Communicator {}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nccl({})", device_name(&self.device))
    }
}

impl Nccl {
    /// Sets up the communicator of `group`'s ranks, this one on `gpu`. Every rank must call it.
    pub(super) fn new(group: &Group, gpu: &CudaDevice) -> Result<Self> {
        let device = Device::Cuda(gpu.clone());
        let failed = |what: &str, e: NcclError| {
            // Two ranks on one GPU is the usual cause of an invalid use at set-up.
            let hint = match e.0 {
                ncclResult_t::ncclInvalidUsage => {
                    ". Every rank needs a GPU of its own: `--device cuda` gives each rank the GPU \
                     of its place on its machine, so start at most as many ranks per machine as \
                     it has GPUs"
                }
                _ => "",
            };
            Error::invalid(format!(
                "NCCL could not {what} on rank {} of {} ({}): {:?}{hint}",
                group.rank(),
                group.size(),
                device_name(&device),
                e.0
            ))
        };
        let mut id = [0u8; 128];
        if group.is_leader() {
            let fresh = Id::new().map_err(|e| failed("create the job's unique id", e))?;
            for (byte, &c) in id.iter_mut().zip(fresh.internal()) {
                *byte = c as u8;
            }
        }
        group.collective.broadcast_bytes(&mut id);
        let id = Id::uninit(id.map(|b| b as c_char));
        // NCCL joins the GPU current on the calling thread: make it this rank's.
        gpu.cuda_stream().context().bind_to_thread().map_err(|e| {
            Error::invalid(format!("cannot make {} current: {e}", device_name(&device)))
        })?;
        let comm = Comm::from_rank(gpu.cuda_stream(), group.rank(), group.size(), id)
            .map_err(|e| failed("set up the ranks' communicator", e))?;
        Ok(Nccl {
            communicator: Arc::new(Communicator {
                comm: Mutex::new(comm),
            }),
            device,
        })
    }
}

impl DeviceCollective for Nccl {
    fn device(&self) -> &Device {
        &self.device
    }

    fn sum(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        t.contiguous()?
            .apply_op1(NcclSum(self.communicator.clone()))
    }
}

/// The sum over the ranks as a candle op, so that autograd carries it: its gradient is the
/// sum of the ranks' gradients, another all-reduce.
struct NcclSum(Arc<Communicator>);

impl NcclSum {
    fn all_reduce<T: NcclType + DeviceRepr + CudaDType>(
        &self,
        storage: &CudaStorage,
        (start, end): (usize, usize),
    ) -> candle_core::Result<CudaStorage> {
        let gpu = storage.device();
        let input = storage.as_cuda_slice::<T>()?.slice(start..end);
        // SAFETY: the all-reduce, queued next on the same stream, writes every element before
        // anything can read the buffer.
        let mut output: CudaSlice<T> = unsafe { gpu.alloc(end - start)? };
        let comm = self
            .0
            .comm
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        comm.all_reduce(&input, &mut output, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce failed: {:?}", e.0)))?;
        Ok(CudaStorage::wrap_cuda_slice(output, gpu.clone()))
    }
}

impl CustomOp1 for NcclSum {
    fn name(&self) -> &'static str {
        "nccl-sum-over-ranks"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        bail!("NCCL sums tensors on CUDA GPUs; this one is in host memory")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some(range) = layout.contiguous_offsets() else {
            bail!("an NCCL sum takes a contiguous tensor");
        };
        let summed = match storage.dtype() {
            DType::F32 => self.all_reduce::<f32>(storage, range)?,
            DType::F64 => self.all_reduce::<f64>(storage, range)?,
            other => bail!("an NCCL sum over ranks takes f32 or f64 values, not {other:?}"),
        };
        Ok((summed, layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let summed = grad_res.contiguous()?.apply_op1(NcclSum(self.0.clone()))?;
        Ok(Some(summed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs one CUDA GPU (`cargo test --features nccl --lib nccl`): a job of one rank sets up
    /// its communicator and sums a strided slice, forward and backward, through NCCL.
    #[test]
    fn a_one_rank_nccl_sum_is_the_tensor_and_carries_its_gradient() {
        let device = Device::new_cuda(0).expect("this test needs a CUDA GPU");
        let Device::Cuda(gpu) = &device else {
            unreachable!("new_cuda opens a CUDA device")
        };
        let nccl = Nccl::new(&Group::solo(), gpu).unwrap();
        let x = candle_core::Var::new(&[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &device).unwrap();
        // A column: not contiguous, with an offset.
        let column = x.as_tensor().narrow(1, 1, 1).unwrap();
        let summed = nccl.sum(&column).unwrap();
        assert_eq!(summed.to_vec2::<f32>().unwrap(), [[2.0], [5.0]]);
        let weights = Tensor::new(&[[10f32], [20.0]], &device).unwrap();
        let grads = (summed * weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grad = grads.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(grad, [[0.0, 10.0, 0.0], [0.0, 20.0, 0.0]]);
        let doubles = Tensor::new(&[0.5f64, -1.5], &device).unwrap();
        assert_eq!(
            nccl.sum(&doubles).unwrap().to_vec1::<f64>().unwrap(),
            [0.5, -1.5]
        );
    }
}
