//! The [`Collective`] of a job started by `mpirun` (feature `mpi`): Open MPI, or any MPI the
//! `mpi` crate (rsmpi) builds against.
//!
//! MPI is initialised with `MPI_THREAD_SERIALIZED`: lathe's commands run on a rayon worker,
//! not the main thread, and every call goes through one lock. Reductions are gathers
//! summed in rank order by `lathe_core::collective`, never `MPI_Allreduce` (whose order is
//! the library's): N ranks get the same bits as one process.
//!
//! MPI has no timeout on a collective; a rank that dies (a crash, `kill`, Ctrl-C on
//! `mpirun`) ends the job through `mpirun`, which kills the others, and a rank that fails
//! calls [`Collective::abort`] (`MPI_Abort`), so no rank is left waiting.

use std::sync::Mutex;

use lathe_core::{Collective, Error, Result};
use mpi::datatype::PartitionMut;
use mpi::environment::{Threading, Universe};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

/// `MPI_COMM_WORLD` of a job started by `mpirun`; MPI is finalised when it is dropped.
pub struct Mpi {
    world: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
    // Dropped last: MPI_Finalize.
    _universe: Universe,
}

// SAFETY: MPI was initialised with at least MPI_THREAD_SERIALIZED (checked in `init`), which
// allows MPI calls from any thread as long as no two run at once; every call on `world`
// holds its mutex.
unsafe impl Send for Mpi {}
// SAFETY: as for Send: all access to the communicator is serialised by the mutex.
unsafe impl Sync for Mpi {}

/// Whether this process was started by an MPI launcher (`mpirun`, `srun`): the variables
/// Open MPI, PMIx and PMI set. A plain `lathe sft` does not initialise MPI at all.
pub fn launched_by_mpirun() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

impl Mpi {
    /// Initialises MPI (once per process). Fails if it was already initialised or the
    /// library cannot serialise calls from several threads.
    pub fn init() -> Result<Mpi> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| Error::Collective("MPI was already initialised".into()))?;
        if !matches!(threading, Threading::Serialized | Threading::Multiple) {
            return Err(Error::Collective(format!(
                "the MPI library gives thread level {threading:?}; lathe calls MPI from a \
                 worker thread and needs Serialized"
            )));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(Mpi {
            world: Mutex::new(world),
            rank,
            size,
            _universe: universe,
        })
    }

    fn world(&self) -> std::sync::MutexGuard<'_, SimpleCommunicator> {
        // A poisoned lock means a panic mid-call on another thread: the communicator itself
        // is still usable for the abort that follows.
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The gather of `local` (an equal count on every rank, checked) into `size` copies.
    fn gather<T: Equivalence + Copy + Default>(&self, local: &[T]) -> Result<Vec<T>> {
        let counts = self.gather_counts(local.len())?;
        if counts.iter().any(|&c| c as usize != local.len()) {
            return Err(Error::Collective(format!(
                "the ranks send different counts to an equal-count gather: {counts:?}"
            )));
        }
        let mut all = vec![T::default(); local.len() * self.size];
        self.world().all_gather_into(local, &mut all[..]);
        Ok(all)
    }

    /// Every rank's element count, in rank order.
    fn gather_counts(&self, len: usize) -> Result<Vec<i32>> {
        let count = i32::try_from(len).map_err(|_| {
            Error::Collective(format!(
                "{len} values in one gather: more than MPI's count of 2^31 - 1"
            ))
        })?;
        let mut counts = vec![0i32; self.size];
        self.world().all_gather_into(&count, &mut counts[..]);
        Ok(counts)
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<f64>> {
        self.gather(local)
    }
    fn all_gather_f32(&self, local: &[f32]) -> Result<Vec<f32>> {
        self.gather(local)
    }
    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
        let counts = self.gather_counts(local.len())?;
        let total: i64 = counts.iter().map(|&c| i64::from(c)).sum();
        let total = i32::try_from(total).map_err(|_| {
            Error::Collective(format!("{total} bytes in one gather: more than 2^31 - 1"))
        })?;
        let displs: Vec<i32> = counts
            .iter()
            .scan(0i32, |at, &c| {
                let start = *at;
                *at += c;
                Some(start)
            })
            .collect();
        let mut all = vec![0u8; total as usize];
        {
            let mut partition = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            self.world().all_gather_varcount_into(local, &mut partition);
        }
        Ok(counts
            .iter()
            .zip(&displs)
            .map(|(&c, &d)| all[d as usize..(d + c) as usize].to_vec())
            .collect())
    }
    fn abort(&self, message: &str, code: i32) -> ! {
        eprintln!("rank {} of {}: {message}", self.rank, self.size);
        self.world().abort(code)
    }
}
