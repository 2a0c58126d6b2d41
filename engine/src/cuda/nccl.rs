//! NCCL for data-parallel training (`crate::train::parallel`): one communicator per rank (a device of this host;
//! ranks on other hosts join with the same unique id), the LoRA gradients summed in place across ranks after each
//! batch. Loaded at run time like the other CUDA libraries (`libnccl.so.2`, from the CUDA toolkit or
//! `pip install nvidia-nccl-cu13`); cudarc panics when it is missing, so `nccl_status` is checked first. On cuemu,
//! `libnccl.so` is its stand-in (tools/cuemu/nccl.cpp).

use super::{err, Gpu};
use crate::error::Result;
use cudarc::driver::CudaSlice;
use cudarc::nccl::{Comm, Id, ReduceOp};

/// Whether NCCL can be loaded (Err: why not, and how to get it).
pub fn nccl_status() -> std::result::Result<(), String> {
    // SAFETY: only probes for the library (dlopen); loads no symbol.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        Ok(())
    } else {
        Err("libnccl.so.2 (NCCL, for training on several GPUs) was not found: install it with the CUDA toolkit or \
             `pip install nvidia-nccl-cu13`, and put its lib directory on LD_LIBRARY_PATH"
            .into())
    }
}

/// The 128 bytes that name one data-parallel group: made once (by rank 0), handed to every rank (threads of this
/// process, or other hosts through the database).
#[derive(Clone, Copy)]
pub struct GroupId(pub [u8; 128]);

impl GroupId {
    pub fn new() -> Result<GroupId> {
        nccl_status().map_err(err)?;
        let id = Id::new().map_err(|e| err(format!("ncclGetUniqueId: {e:?}")))?;
        Ok(GroupId(id.internal().map(|c| c as u8)))
    }
}

impl std::fmt::Debug for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // An id lets whoever holds it join the group: never printed.
        f.write_str("GroupId(..)")
    }
}

/// This rank's communicator, on its device's stream.
pub struct Collective {
    comm: Comm,
}

// SAFETY: a communicator is used by the one thread that drives its rank; NCCL allows a communicator to move between
// threads as long as calls on it do not overlap, which `&mut self` on every call here guarantees.
unsafe impl Send for Collective {}

impl Collective {
    /// Joins group `id` as `rank` of `world` on `gpu`'s stream; returns once every rank joined (NCCL's
    /// initialization is collective).
    pub fn join(gpu: &Gpu, id: &GroupId, rank: usize, world: usize) -> Result<Collective> {
        nccl_status().map_err(err)?;
        let id = Id::uninit(id.0.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(gpu.stream.clone(), rank, world, id)
            .map_err(|e| err(format!("ncclCommInitRank (rank {rank} of {world}): {e:?}")))?;
        Ok(Collective { comm })
    }

    /// Sums `buf` over every rank, in place (each rank ends with the same values).
    pub fn sum_f32(&mut self, buf: &mut CudaSlice<f32>) -> Result<()> {
        self.comm.all_reduce_in_place(buf, &ReduceOp::Sum).map_err(|e| err(format!("ncclAllReduce: {e:?}")))?;
        Ok(())
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world(&self) -> usize {
        self.comm.world_size()
    }
}
