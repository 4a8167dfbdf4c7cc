# Environment for multi-node PyTorch / NCCL training jobs. Sourced by slurm/train.sbatch on every
# node, inside the task (so node-specific values are right on each node); usable by hand too:
#   source slurm/env.sh
# Every line keeps a value the user already exported (`${VAR:-default}`), so a setting can be changed
# per job with `export VAR=...; sbatch ...` (sbatch passes the submitting environment on).
# Everything here is harmless on CPU-only nodes: the variables are only read by CUDA/NCCL/Triton.
# shellcheck shell=bash

_hp_node=${SLURMD_NODENAME:-$(hostname -s 2>/dev/null || echo localhost)}
_hp_job=${SLURM_JOB_ID:-nojob}
_hp_tmp=${HP_LOCAL_TMP:-${TMPDIR:-/tmp}}   # node-local scratch (not the shared file system)

# --- PyTorch memory ------------------------------------------------------------------------------
# Expandable segments let the caching allocator grow a segment instead of allocating new
# fixed-size blocks: far less fragmentation when shapes vary (MoE token counts, packed
# documents, pipeline micro-batches), so fewer OOMs at the same batch size.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

# --- CPU threads ---------------------------------------------------------------------------------
# One process per GPU: give each an equal share of the node's CPUs (torchrun otherwise forces 1 and
# warns; unset, every process would start one OpenMP thread per core and oversubscribe the node).
if [[ -z ${OMP_NUM_THREADS:-} ]]; then
    _hp_cpus=${SLURM_CPUS_ON_NODE:-$(nproc 2>/dev/null || echo 1)}
    _hp_procs=${HP_NPROC_PER_NODE:-1}
    OMP_NUM_THREADS=$((_hp_cpus / (_hp_procs > 0 ? _hp_procs : 1)))
    ((OMP_NUM_THREADS >= 1)) || OMP_NUM_THREADS=1
    export OMP_NUM_THREADS
fi
# Hugging Face tokenizers' own thread pool deadlocks in forked data-loader workers; we tokenize
# offline (data.prepare), so it is not needed during training.
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

# --- compiled-kernel caches ----------------------------------------------------------------------
# Triton and TorchInductor write compiled kernels to a cache directory (default ~/.triton,
# /tmp/torchinductor_$USER). On a shared home directory, ranks of many nodes and jobs would write
# and read the same files at once (races, stale locks, slow NFS metadata). Use a directory per job
# and node on local disk instead; it costs one compilation per node and job.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$_hp_tmp/triton-cache-$_hp_job-$_hp_node}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$_hp_tmp/inductor-cache-$_hp_job-$_hp_node}

# --- NCCL and c10d -------------------------------------------------------------------------------
# A failed or timed-out collective raises (and tears the process down) instead of hanging the job
# until its time limit, so Slurm sees the failure. The first name is for torch >= 2.2, the second
# is the older name, still read by some versions.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
# On a collective timeout, dump NCCL's flight recorder (the last collectives of every rank) so a
# hang can be traced to the rank and op that diverged; the files go to node-local scratch.
export TORCH_FR_BUFFER_SIZE=${TORCH_FR_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$_hp_tmp/nccl-trace-$_hp_job-$_hp_node-rank}
# NVLink SHARP (NVLS, multicast) needs the fabric manager / IMEX set up on the host and fails
# at communicator init where it is not; it also reserves extra GPU memory. Off unless asked for.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# Warnings only by default (INFO prints topology for every rank; set NCCL_DEBUG=INFO to debug).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# megatron-core's tensor/sequence-parallel overlap relies on kernels being issued to the GPU in
# program order, which holds only with a single hardware work queue per device.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# Interfaces are cluster specific: set NCCL_SOCKET_IFNAME / NCCL_IB_HCA (and GLOO_SOCKET_IFNAME
# for the CPU groups) in your environment when NCCL picks the wrong network.

# --- launcher and logs ---------------------------------------------------------------------------
# Unbuffered Python output: the Slurm log (tail -f) shows progress lines as they are printed, and
# nothing is lost when a process is killed.
export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}
# When one worker exits (e.g. after saving on a signal), torchrun gives the others this long to
# exit by themselves before SIGKILL: long enough to finish writing their checkpoint shards.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}

unset _hp_node _hp_job _hp_tmp _hp_cpus _hp_procs
