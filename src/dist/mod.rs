//! Data-parallel training across processes: a [`Group`] of ranks that sum values with an
//! all-reduce, and the [`Shard`] of a global batch that one rank computes.
//!
//! N ranks compute the same update as one process on the whole batch, to floating-point
//! reordering: every rank builds the same global batch (same data, shuffling and augmentation
//! generators) and keeps its own rows; per-example noise is drawn for the whole batch and
//! narrowed the same way, so the generators stay in step; batch normalisation sums its
//! statistics over all ranks (synchronised, in the forward and the backward pass); each rank
//! weights its share of the mean NLL by its rows and the KL term by `1 / N`, and the gradients
//! are summed before every optimiser step. In training, only rank 0 writes files.
//!
//! The engine is MPI (the `mpi` cargo feature; `mpirun -n N whvi train ...`). Without it, or
//! outside a launcher, a run is a group of one and nothing here costs anything. Tensors on a
//! CUDA GPU are summed by NCCL when the group was given the device ([`Group::on_device`], the
//! `nccl` feature), its unique id broadcast over MPI; without NCCL they go through host memory
//! and MPI.

#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, Var};

use crate::cpu::slice;
use crate::{Error, Result};

/// The collective operations a group of ranks needs. Every rank must make the same calls in the
/// same order (each one blocks until all ranks have made it).
pub trait Collective: Send + Sync + std::fmt::Debug {
    /// This process's rank, from 0.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Replaces `values` by their element-wise sum over all ranks.
    fn sum_f64(&self, values: &mut [f64]);
    /// Replaces `values` by their element-wise sum over all ranks.
    fn sum_f32(&self, values: &mut [f32]);
    /// Replaces `bytes` on every rank by rank 0's.
    fn broadcast_bytes(&self, bytes: &mut [u8]);
    /// Ends every rank of the job with exit status `code`.
    fn abort(&self, code: i32) -> !;
}

/// A group of one process: sums are the values themselves.
#[derive(Debug, Clone, Copy)]
struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn sum_f64(&self, _: &mut [f64]) {}
    fn sum_f32(&self, _: &mut [f32]) {}
    fn broadcast_bytes(&self, _: &mut [u8]) {}
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// An engine that sums tensors on the device they live on (NCCL on CUDA GPUs), in the
/// collective order of the group it was built for.
trait DeviceCollective: Send + Sync + std::fmt::Debug {
    /// The device whose tensors it sums.
    fn device(&self) -> &Device;
    /// The element-wise sum of `t` over all ranks, with the gradient of a sum: the sum of the
    /// ranks' gradients.
    fn sum(&self, t: &Tensor) -> candle_core::Result<Tensor>;
}

/// Gradients are summed in buckets of this many values: one all-reduce per bucket, not per
/// tensor (a VGG has dozens of small ones), and no copy of the whole model at once.
const GRADIENT_BUCKET: usize = 1 << 22;

/// The ranks of a training job, shared by everything that takes part in a step.
#[derive(Debug, Clone)]
pub struct Group {
    collective: Arc<dyn Collective>,
    /// Nanoseconds this rank spent in collective calls (waiting for the others included).
    collective_nanos: Arc<AtomicU64>,
    /// Sums tensors where they live, for the device given to [`Group::on_device`].
    device_collective: Option<Arc<dyn DeviceCollective>>,
}

impl Group {
    /// A group of one process.
    pub fn solo() -> Self {
        Group::new(Arc::new(Solo))
    }

    /// A group over a collective engine.
    pub fn new(collective: Arc<dyn Collective>) -> Self {
        Group {
            collective,
            collective_nanos: Arc::new(AtomicU64::new(0)),
            device_collective: None,
        }
    }

    /// The group for work on `device`: on a CUDA GPU (with the `nccl` feature) it sums tensors
    /// there through NCCL, each rank on its own GPU; elsewhere, or without the feature, through
    /// host memory over the group's engine. Every rank must call it, with its own device.
    pub fn on_device(&self, device: &Device) -> Result<Self> {
        if self.size() == 1 {
            return Ok(self.clone());
        }
        let mut on_gpu = [f64::from(u8::from(device.is_cuda()))];
        self.sum_f64(&mut on_gpu);
        if on_gpu[0] != 0.0 && on_gpu[0] != self.size() as f64 {
            return Err(Error::invalid(format!(
                "{} of the {} ranks run on a CUDA GPU and the others on another device: give \
                 every rank the same --device",
                on_gpu[0],
                self.size()
            )));
        }
        #[cfg(feature = "nccl")]
        if let Device::Cuda(gpu) = device {
            let engine = nccl::Nccl::new(self, gpu)?;
            return Ok(Group {
                device_collective: Some(Arc::new(engine)),
                ..self.clone()
            });
        }
        Ok(self.clone())
    }

    /// This process's rank among the ranks on its machine, as the launcher tells it (0 when
    /// it does not): the GPU `--device cuda` picks for it.
    pub fn local_rank(&self) -> usize {
        if self.size() == 1 {
            return 0;
        }
        [
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "MPI_LOCALRANKID",
            "SLURM_LOCALID",
        ]
        .iter()
        .find_map(|name| std::env::var(name).ok()?.parse().ok())
        .unwrap_or(0)
    }

    /// The group this process was started in: the MPI world under `mpirun` / `srun` (with the
    /// `mpi` feature), else a group of one. Started by a launcher in a build without the
    /// feature is an error that says how to rebuild.
    pub fn from_environment() -> Result<Self> {
        let Some(size) = launcher_size() else {
            return Ok(Group::solo());
        };
        #[cfg(feature = "mpi")]
        {
            let world = mpi::MpiGroup::init()?;
            if world.size() != size {
                return Err(Error::invalid(format!(
                    "the launcher started {size} ranks but MPI sees {} here: whvi is linked \
                     against another MPI than the launcher's, or srun runs without PMI (use \
                     `srun --mpi=pmix`, or the mpirun of the MPI whvi was built with)",
                    world.size()
                )));
            }
            if size > 1 {
                abort_the_job_on_panic(world.rank(), size);
            }
            Ok(Group::new(Arc::new(world)))
        }
        #[cfg(not(feature = "mpi"))]
        match size {
            1 => Ok(Group::solo()),
            n => Err(Error::invalid(format!(
                "started as one of {n} ranks by an MPI launcher, but this whvi was built without \
                 MPI; rebuild with `cargo build --release --features mpi` (needs Open MPI: \
                 `apt-get install openmpi-bin libopenmpi-dev libclang-dev`)"
            ))),
        }
    }

    /// This process's rank, from 0.
    pub fn rank(&self) -> usize {
        self.collective.rank()
    }

    /// The number of ranks.
    pub fn size(&self) -> usize {
        self.collective.size()
    }

    /// Whether this rank writes the run's files and reports progress.
    pub fn is_leader(&self) -> bool {
        self.rank() == 0
    }

    /// Element-wise sums over all ranks.
    pub fn sum_f64(&self, values: &mut [f64]) {
        self.timed(|c| c.sum_f64(values))
    }

    /// Seconds this rank has spent in the group's collective calls so far, waiting for the
    /// other ranks included: the all-reduce's share of a step is its growth over the step.
    /// NCCL's sums run on the GPU's stream without the host waiting: of those, it counts the
    /// time to queue them.
    pub fn collective_seconds(&self) -> f64 {
        self.collective_nanos.load(Ordering::Relaxed) as f64 * 1e-9
    }

    fn timed(&self, call: impl FnOnce(&dyn Collective)) {
        if self.size() == 1 {
            return;
        }
        self.timed_result(|| call(self.collective.as_ref()))
    }

    /// Whether `flag` is set on any rank.
    pub fn any(&self, flag: bool) -> bool {
        if self.size() == 1 {
            return flag;
        }
        let mut v = [f64::from(u8::from(flag))];
        self.sum_f64(&mut v);
        v[0] > 0.0
    }

    /// Fails unless every rank passed the same `checksum` of `what` (e.g. the weights after an
    /// epoch): ranks that drift apart (other data or settings on one node) would otherwise go
    /// on silently, and rank 0 saves only its own copy. Two ranks with different checksums pass
    /// once in 65,536 checks; exact in f64 for up to 1,000 ranks.
    pub fn check_same(&self, what: &str, checksum: u32) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        let h = f64::from(checksum & 0xffff);
        let mut sums = [h, h * h];
        self.sum_f64(&mut sums);
        // Σh² · N = (Σh)² exactly when every h is the same (Cauchy-Schwarz).
        if sums[1] * self.size() as f64 == sums[0] * sums[0] {
            return Ok(());
        }
        Err(Error::invalid(format!(
            "the ranks hold different {what}: give every rank the same data, settings and \
             checkpoint (the same files on a file system they all see)"
        )))
    }

    /// Ends every rank of the job with exit status `code` (after this rank printed why).
    pub fn abort(&self, code: i32) -> ! {
        self.collective.abort(code)
    }

    /// This rank's part of a global batch of `total` examples.
    pub fn shard(&self, total: usize) -> Result<Shard> {
        let size = self.size();
        if total < size {
            return Err(Error::invalid(format!(
                "a global batch of {total} cannot be split over {size} ranks; use a batch of at \
                 least {size}"
            )));
        }
        let rank = self.rank();
        Ok(Shard {
            group: self.clone(),
            rows: rank * total / size..(rank + 1) * total / size,
            total,
        })
    }

    /// Replaces the gradient of each of `vars` in `grads` by its sum over all ranks. Every rank
    /// must hold gradients for the same variables (the same network gives that).
    pub fn sum_gradients(&self, grads: &mut GradStore, vars: &[Var]) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        let present: Vec<&Var> = vars.iter().filter(|v| grads.get(v).is_some()).collect();
        let mut start = 0;
        while start < present.len() {
            let mut end = start;
            let mut count = 0;
            while end < present.len() && (end == start || count < GRADIENT_BUCKET) {
                count += present[end].elem_count();
                end += 1;
            }
            self.sum_bucket(grads, &present[start..end])?;
            start = end;
        }
        Ok(())
    }

    fn sum_bucket(&self, grads: &mut GradStore, vars: &[&Var]) -> Result<()> {
        let flat = vars
            .iter()
            .map(|var| {
                let grad = grads.get(var).expect("filtered on presence");
                grad.flatten_all()?.to_dtype(DType::F32)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let summed = self.sum_tensor(&Tensor::cat(&flat, 0)?)?;
        let mut offset = 0;
        for var in vars {
            let n = var.elem_count();
            let grad = summed
                .narrow(0, offset, n)?
                .reshape(var.shape())?
                .to_dtype(var.dtype())?;
            grads.insert(var.as_tensor(), grad);
            offset += n;
        }
        Ok(())
    }

    /// The element-wise sum of `t` over all ranks, on `t`'s device. It is differentiable: the
    /// gradient that reaches `t` is the sum of the ranks' gradients of the result (so that a
    /// statistic of the global batch, such as batch normalisation's, back-propagates into
    /// every shard). Every rank must make the same calls in the same order.
    pub fn sum_tensor(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        if self.size() == 1 {
            return Ok(t.clone());
        }
        if let Some(engine) = &self.device_collective {
            if engine.device().same_device(t.device()) {
                return self.timed_result(|| engine.sum(t));
            }
        }
        let host = t.to_device(&Device::Cpu)?.contiguous()?;
        host.apply_op1(HostSum {
            group: self.clone(),
        })?
        .to_device(t.device())
    }

    fn timed_result<R>(&self, call: impl FnOnce() -> R) -> R {
        let start = Instant::now();
        let result = call();
        let nanos = start.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.collective_nanos.fetch_add(nanos, Ordering::Relaxed);
        result
    }
}

/// [`Group::sum_tensor`] on the CPU: the values go through the group's engine.
#[derive(Debug)]
struct HostSum {
    group: Group,
}

impl CustomOp1 for HostSum {
    fn name(&self) -> &'static str {
        "sum-over-ranks"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let summed = match storage {
            CpuStorage::F32(_) => {
                let mut values = slice::<f32>(storage, layout, self.name())?.to_vec();
                self.group.timed(|c| c.sum_f32(&mut values));
                CpuStorage::F32(values)
            }
            CpuStorage::F64(_) => {
                let mut values = slice::<f64>(storage, layout, self.name())?.to_vec();
                self.group.timed(|c| c.sum_f64(&mut values));
                CpuStorage::F64(values)
            }
            other => candle_core::bail!(
                "a sum over ranks takes f32 or f64 values, not {:?}",
                other.dtype()
            ),
        };
        Ok((summed, layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.group.sum_tensor(grad_res)?))
    }
}

/// One rank's rows of a global batch.
#[derive(Debug, Clone)]
pub struct Shard {
    group: Group,
    rows: Range<usize>,
    total: usize,
}

impl Shard {
    /// The group the batch is split over.
    pub fn group(&self) -> &Group {
        &self.group
    }

    /// This rank's rows of the global batch.
    pub fn rows(&self) -> Range<usize> {
        self.rows.clone()
    }

    /// This rank's share of the global batch's examples.
    pub fn fraction(&self) -> f64 {
        self.rows.len() as f64 / self.total as f64
    }

    /// This rank's rows of `t`, whose first dimension is `k` entries per example of the global
    /// batch (k = 1 for images and labels).
    pub fn take(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        let dim0 = t.dim(0)?;
        if !dim0.is_multiple_of(self.total) {
            candle_core::bail!(
                "a tensor of {dim0} rows is not split evenly over a batch of {}",
                self.total
            );
        }
        let k = dim0 / self.total;
        t.narrow(0, k * self.rows.start, k * self.rows.len())
    }

    /// The first dimension of `local_rows` rows of this rank as the global batch's.
    pub fn global_rows(&self, local_rows: usize) -> candle_core::Result<usize> {
        if !local_rows.is_multiple_of(self.rows.len()) {
            candle_core::bail!(
                "a tensor of {local_rows} rows is not split evenly over this rank's {} examples",
                self.rows.len()
            );
        }
        Ok(local_rows / self.rows.len() * self.total)
    }
}

/// A panic on one rank while the others wait in a collective call would hang the job (its
/// unwinding finalises MPI, which waits for every rank): after the usual message, the job ends.
#[cfg(feature = "mpi")]
fn abort_the_job_on_panic(rank: usize, size: usize) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        eprintln!("whvi: rank {rank} of {size} panicked; ending the job");
        mpi::abort_world(101)
    }));
}

/// The number of ranks an MPI launcher (Open MPI's mpirun, MPICH's PMI, Slurm's srun) started,
/// when this process was started by one. `SLURM_STEP_NUM_TASKS` (not `SLURM_NTASKS`, which a
/// batch script's own shell has too) is set for the tasks of one `srun` step.
fn launcher_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"]
        .iter()
        .find_map(|name| std::env::var(name).ok()?.parse().ok())
}

/// Rank `rank` of a group of `size` whose ranks all hold this rank's values (so a sum
/// multiplies by `size`): for tests of code that runs on one shard.
#[cfg(test)]
pub(crate) fn mirrored_group(rank: usize, size: usize) -> Group {
    Group::new(Arc::new(Mirrored { rank, size }))
}

#[cfg(test)]
#[derive(Debug)]
struct Mirrored {
    rank: usize,
    size: usize,
}

#[cfg(test)]
impl Collective for Mirrored {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn sum_f64(&self, values: &mut [f64]) {
        // As a real all-reduce, it takes time (which the group counts).
        std::thread::sleep(std::time::Duration::from_micros(50));
        values.iter_mut().for_each(|v| *v *= self.size as f64);
    }
    fn sum_f32(&self, values: &mut [f32]) {
        values.iter_mut().for_each(|v| *v *= self.size as f32);
    }
    fn broadcast_bytes(&self, _: &mut [u8]) {}
    fn abort(&self, code: i32) -> ! {
        panic!("abort({code})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(rank: usize, size: usize) -> Group {
        mirrored_group(rank, size)
    }

    #[test]
    fn the_shards_of_a_batch_cover_it_once_in_rank_order() {
        for (total, size) in [(32, 2), (10, 3), (7, 7), (100, 6)] {
            let shards: Vec<Shard> = (0..size)
                .map(|r| group(r, size).shard(total).unwrap())
                .collect();
            let rows: Vec<usize> = shards.iter().flat_map(|s| s.rows()).collect();
            assert_eq!(rows, (0..total).collect::<Vec<_>>());
            let lens: Vec<usize> = shards.iter().map(|s| s.rows().len()).collect();
            assert!(
                lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1,
                "{lens:?}"
            );
            let fractions: f64 = shards.iter().map(Shard::fraction).sum();
            assert!((fractions - 1.0).abs() < 1e-12);
        }
        let err = group(0, 4).shard(3).unwrap_err().to_string();
        assert!(err.contains("a batch of at least 4"), "{err}");
    }

    #[test]
    fn a_shard_takes_its_rows_of_global_tensors_with_several_entries_per_example() {
        let shard = group(1, 2).shard(4).unwrap();
        let labels = Tensor::new(&[0u32, 1, 2, 3], &Device::Cpu).unwrap();
        assert_eq!(
            shard.take(&labels).unwrap().to_vec1::<u32>().unwrap(),
            [2, 3]
        );
        // Two entries per example (e.g. a WHVI layer on [B, 2, F] input).
        let rows = Tensor::arange(0u32, 8, &Device::Cpu).unwrap();
        assert_eq!(
            shard.take(&rows).unwrap().to_vec1::<u32>().unwrap(),
            [4, 5, 6, 7]
        );
        assert_eq!(shard.global_rows(4).unwrap(), 8);
        assert!(shard.global_rows(3).is_err());
        assert!(shard
            .take(&Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap())
            .is_err());
    }

    #[test]
    fn gradients_are_summed_per_variable_and_variables_without_one_are_left_out() {
        let device = Device::Cpu;
        let a = Var::new(&[1f32, 2.0, 3.0], &device).unwrap();
        let b = Var::new(&[[4f32, 5.0], [6.0, 7.0]], &device).unwrap();
        let unused = Var::new(&[8f32], &device).unwrap();
        let loss = ((a.as_tensor() * 2.0).unwrap().sum_all().unwrap()
            + b.as_tensor().sqr().unwrap().sum_all().unwrap())
        .unwrap();
        let mut grads = loss.backward().unwrap();
        let vars = [a.clone(), unused.clone(), b.clone()];
        group(0, 3).sum_gradients(&mut grads, &vars).unwrap();
        let ga = grads.get(&a).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(ga, [6.0, 6.0, 6.0]);
        let gb = grads.get(&b).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(gb, [[24.0, 30.0], [36.0, 42.0]]);
        assert!(grads.get(&unused).is_none());
    }

    /// Rank 0 of two whose partner holds `other`: its values are summed with the partner's.
    #[derive(Debug)]
    struct Partner {
        other: f64,
    }

    impl Collective for Partner {
        fn rank(&self) -> usize {
            0
        }
        fn size(&self) -> usize {
            2
        }
        fn sum_f64(&self, values: &mut [f64]) {
            // The partner's [h, h²].
            let theirs = [self.other, self.other * self.other];
            values.iter_mut().zip(theirs).for_each(|(v, t)| *v += t);
        }
        fn sum_f32(&self, _: &mut [f32]) {}
        fn broadcast_bytes(&self, _: &mut [u8]) {}
        fn abort(&self, code: i32) -> ! {
            panic!("abort({code})")
        }
    }

    #[test]
    fn ranks_with_different_checksums_are_an_error_that_says_what_differs() {
        let same = Group::new(Arc::new(Partner { other: 1234.0 }));
        same.check_same("weights", 1234).unwrap();
        let other = Group::new(Arc::new(Partner { other: 1235.0 }));
        let err = other.check_same("weights", 1234).unwrap_err().to_string();
        assert!(err.contains("different weights"), "{err}");
        Group::solo().check_same("weights", 7).unwrap();
    }

    #[test]
    fn ranks_that_mix_a_gpu_and_the_cpu_are_refused_and_cpu_ranks_keep_the_host_sum() {
        // The partner's flag: it is on a GPU.
        let mixed = Group::new(Arc::new(Partner { other: 1.0 }));
        let err = mixed.on_device(&Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("1 of the 2 ranks run on a CUDA GPU"), "{err}");
        let cpu = group(0, 2).on_device(&Device::Cpu).unwrap();
        assert!(cpu.device_collective.is_none());
        let x = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        // A strided column, summed over two ranks that hold the same values.
        let column = x.narrow(1, 1, 1).unwrap();
        let summed = cpu.sum_tensor(&column).unwrap();
        assert_eq!(summed.to_vec2::<f32>().unwrap(), [[4.0], [8.0]]);
    }

    #[test]
    fn time_in_collective_calls_is_counted_only_for_several_ranks() {
        let (solo, pair) = (Group::solo(), group(0, 2));
        let mut values = [1.0, 2.0];
        solo.sum_f64(&mut values);
        pair.sum_f64(&mut values);
        assert_eq!(values, [2.0, 4.0]);
        assert_eq!(solo.collective_seconds(), 0.0);
        assert!(pair.collective_seconds() > 0.0);
        assert!(pair.any(true) && !pair.any(false) && solo.any(true));
    }
}
