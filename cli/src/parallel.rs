//! The data-parallel job this process is a rank of. Built with the `mpi` feature and started
//! by `mpirun`, `lathe sft`, `lathe reward-train` and `lathe ppo` run as one rank of
//! `MPI_COMM_WORLD`; otherwise (and in every other command) the process is alone ([`Solo`]).
//!
//! MPI is initialised and finalised on the main thread ([`Job::start`], dropping the
//! [`Job`]); the commands call it from lathe's CPU pool in between, which MPI's serialized
//! threading allows.

use std::sync::{Arc, Mutex};

use anyhow::{bail, Result};
use lathe_core::{Collective, Solo};

/// The job's collective while it runs; taken out (and MPI finalised) when the [`Job`] ends.
static COLLECTIVE: Mutex<Option<Arc<dyn Collective>>> = Mutex::new(None);

/// The job of this process, for its lifetime: ends MPI when dropped.
pub struct Job {
    ranks: usize,
}

impl Job {
    /// Joins the MPI job when built with `mpi` and started by `mpirun`; alone otherwise.
    pub fn start() -> Result<Job> {
        #[cfg(feature = "mpi")]
        if lathe_train::mpi::launched_by_mpirun() {
            let mpi: Arc<dyn Collective> = Arc::new(lathe_train::mpi::Mpi::init()?);
            let ranks = mpi.size();
            *COLLECTIVE.lock().unwrap_or_else(|e| e.into_inner()) = Some(mpi);
            install_abort_on_panic();
            return Ok(Job { ranks });
        }
        if launched_by_mpirun_without_mpi() {
            bail!(
                "started by mpirun, but this lathe was built without MPI: build it with \
                 `cargo build --release -p lathe-cli --features mpi`"
            );
        }
        Ok(Job { ranks: 1 })
    }

    /// The number of ranks.
    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// Ends every rank of the job after `message` (a failed rank must not leave the others
    /// waiting in a collective); a process alone just returns.
    pub fn abort_others(&self, message: &str) {
        if self.ranks > 1 {
            collective().abort(message, 1);
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        // The last reference: MPI_Finalize, on the main thread that initialised it.
        drop(COLLECTIVE.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
}

/// The processes this one trains with ([`Solo`] outside an MPI job).
pub fn collective() -> Arc<dyn Collective> {
    COLLECTIVE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_else(|| Arc::new(Solo))
}

/// Whether this process is rank 0 (or alone): the one that prints progress and summaries.
pub fn is_writer() -> bool {
    collective().is_writer()
}

/// This process's rank among the job's ranks on its node (Open MPI's
/// `OMPI_COMM_WORLD_LOCAL_RANK`, MPICH's `MPI_LOCALRANKID`, Slurm's `SLURM_LOCALID`), in a
/// job of several ranks: which of the node's GPUs it takes.
pub fn local_rank() -> Option<usize> {
    if collective().size() < 2 {
        return None;
    }
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
}

/// Refuses `command` in a job of several ranks: only sft, reward-train and ppo are data
/// parallel, and N copies of another command would each write the same outputs.
pub fn refuse_ranks(command: &str) -> Result<()> {
    let ranks = collective().size();
    if ranks > 1 {
        bail!(
            "lathe {command} does not run data parallel (started as one of {ranks} MPI ranks); \
             run it as one process (sft, reward-train and ppo run under mpirun)"
        );
    }
    Ok(())
}

/// `mpirun`'s variables without the `mpi` feature to use them.
fn launched_by_mpirun_without_mpi() -> bool {
    cfg!(not(feature = "mpi"))
        && ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
            .iter()
            .any(|v| std::env::var(v).is_ok_and(|n| n.parse::<usize>().is_ok_and(|n| n > 1)))
}

/// A panic on one rank ends the job (MPI_Abort) instead of leaving the others waiting.
#[cfg(feature = "mpi")]
fn install_abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        if let Some(c) = COLLECTIVE.lock().ok().and_then(|c| c.clone()) {
            if c.size() > 1 {
                c.abort("a panic ended this rank", 101);
            }
        }
    }));
}
