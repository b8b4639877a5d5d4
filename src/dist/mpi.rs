//! The MPI engine of a [`Group`](super::Group) (the `mpi` feature).

use std::mem::ManuallyDrop;
use std::sync::Mutex;
use std::thread::ThreadId;

use mpi::collective::SystemOperation;
use mpi::environment::{Threading, Universe};
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Root};

use super::Collective;
use crate::{Error, Result};

/// The MPI world of this job. MPI is initialised at the "serialized" threading level and every
/// collective call holds `world`'s lock, so calls may come from any thread but never two at
/// once.
pub(super) struct MpiGroup {
    world: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
    /// Finalises MPI when dropped, which MPI allows only on the thread that initialised it.
    universe: ManuallyDrop<Universe>,
    init_thread: ThreadId,
}

// SAFETY: the communicator handle is only used under the mutex, and MPI was initialised for
// calls from any thread as long as they do not overlap (MPI_THREAD_SERIALIZED).
unsafe impl Send for MpiGroup {}
// SAFETY: as above; `rank` and `size` are plain copies.
unsafe impl Sync for MpiGroup {}

impl std::fmt::Debug for MpiGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MpiGroup(rank {} of {})", self.rank, self.size)
    }
}

impl MpiGroup {
    /// Initialises MPI (once per process) and takes its world communicator.
    pub(super) fn init() -> Result<Self> {
        let Some((universe, level)) = mpi::initialize_with_threading(Threading::Serialized) else {
            return Err(Error::invalid(
                "MPI was initialised already in this process; start one training job per process",
            ));
        };
        if !matches!(level, Threading::Serialized | Threading::Multiple) {
            return Err(Error::invalid(format!(
                "this MPI library offers the threading level {level:?}; whvi needs at least \
                 Serialized (MPI_THREAD_SERIALIZED)"
            )));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(MpiGroup {
            world: Mutex::new(world),
            rank,
            size,
            universe: ManuallyDrop::new(universe),
            init_thread: std::thread::current().id(),
        })
    }

    fn world(&self) -> std::sync::MutexGuard<'_, SimpleCommunicator> {
        // A panic while holding the lock cannot leave the communicator half-used: MPI calls
        // either complete or abort the job.
        self.world
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Collective for MpiGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn sum_f64(&self, values: &mut [f64]) {
        let send = values.to_vec();
        self.world()
            .all_reduce_into(&send[..], values, SystemOperation::sum());
    }

    fn sum_f32(&self, values: &mut [f32]) {
        let send = values.to_vec();
        self.world()
            .all_reduce_into(&send[..], values, SystemOperation::sum());
    }

    fn broadcast_bytes(&self, bytes: &mut [u8]) {
        self.world().process_at_rank(0).broadcast_into(bytes);
    }

    fn abort(&self, code: i32) -> ! {
        abort_world(code)
    }
}

/// Ends every rank of the job. Not through [`MpiGroup`]'s lock: another thread may be blocked
/// in a collective call under it.
pub(super) fn abort_world(code: i32) -> ! {
    SimpleCommunicator::world().abort(code)
}

impl Drop for MpiGroup {
    fn drop(&mut self) {
        // The group is dropped on the main thread in whvi's own use (the last handle goes with
        // the run). Elsewhere MPI stays initialised, and mpirun reports the missing finalise.
        if std::thread::current().id() == self.init_thread {
            // SAFETY: dropped once, here, and never used again.
            unsafe { ManuallyDrop::drop(&mut self.universe) }
        }
    }
}
