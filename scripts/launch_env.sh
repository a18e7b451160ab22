# Sourced by every training launcher (run from the repository root): what all of them share.
# A launcher ends with `launch ARGS...`, where ARGS are `accelerate launch`'s; `launch` adds the
# accelerate config and the process layout below.
#
# Processes: NUM_GPUS per machine, on NUM_MACHINES machines (default 1: nothing else is needed).
# On several machines, run the same launcher on each with its MACHINE_RANK (0 on the head),
# the head's MAIN_PROCESS_IP and a MAIN_PROCESS_PORT open between them; RDZV_BACKEND=c10d where
# ranks are not known in advance. scripts/slurm/ sets all of these from a SLURM allocation.
# ACCELERATE_CONFIG defaults to the DDP config whenever the job has more than one process in all.
: "${NUM_GPUS:=1}"
: "${NUM_MACHINES:=1}"
: "${MACHINE_RANK:=0}"
: "${MAIN_PROCESS_PORT:=29500}"
for _var in NUM_GPUS NUM_MACHINES MACHINE_RANK MAIN_PROCESS_PORT; do
    case "${!_var}" in
        ''|*[!0-9]*) echo "error: $_var=${!_var}: expected a whole number" >&2; exit 2 ;;
    esac
done
if [ "$NUM_GPUS" -lt 1 ] || [ "$NUM_MACHINES" -lt 1 ] || [ "$MACHINE_RANK" -ge "$NUM_MACHINES" ]; then
    echo "error: NUM_GPUS=$NUM_GPUS NUM_MACHINES=$NUM_MACHINES MACHINE_RANK=$MACHINE_RANK: need NUM_GPUS >= 1," \
         "NUM_MACHINES >= 1 and 0 <= MACHINE_RANK < NUM_MACHINES" >&2
    exit 2
fi
NUM_PROCESSES=$((NUM_GPUS * NUM_MACHINES))
: "${ACCELERATE_CONFIG:=scripts/accelerate/$([ "$NUM_PROCESSES" -gt 1 ] && echo ddp || echo single).yaml}"
PROCESS_FLAGS=(--config_file "$ACCELERATE_CONFIG" --num_processes "$NUM_PROCESSES")
if [ "$NUM_MACHINES" -gt 1 ]; then
    if [ -z "${MAIN_PROCESS_IP:-}" ]; then
        echo "error: NUM_MACHINES=$NUM_MACHINES needs MAIN_PROCESS_IP, the address of the machine with" \
             "MACHINE_RANK=0 (scripts/slurm/ sets it from the allocation)" >&2
        exit 2
    fi
    PROCESS_FLAGS+=(--num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK"
                    --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT")
    [ -n "${RDZV_BACKEND:-}" ] && PROCESS_FLAGS+=(--rdzv_backend "$RDZV_BACKEND")
fi

# The project's .venv when no environment with accelerate is active.
if ! command -v accelerate >/dev/null 2>&1; then
    if [ -x .venv/bin/accelerate ]; then
        export PATH="$PWD/.venv/bin:$PATH" VIRTUAL_ENV="$PWD/.venv"
    else
        echo "error: accelerate is not installed here: run 'bash scripts/quickstart.sh' (it creates .venv)," \
             "or activate the environment that has the requirements ('source .venv/bin/activate')" >&2
        exit 1
    fi
fi

# Preemption (SLURM's --signal, spot instances, Ctrl-C) without a kill timer.
# `accelerate launch` SIGKILLs its trainer 5 s after a signal reaches it (one process), torch's
# launcher after TORCH_ELASTIC_SHUTDOWN_TIMEOUT (several), and then exits 128 + the signal. A
# checkpoint of a real model can take longer. So `launch` runs accelerate in a process group of
# its own, which a signal to the launcher's group (SLURM, a terminal) does not reach, and relays
# each stop signal to the trainer processes alone. They finish their step, write a resume
# checkpoint and exit 0; so does the launcher. Its exit status after a clean preemption is 0,
# as after a finished run: `final_model/` exists only when the run finished, and running the
# launcher again resumes (`--resume_from_checkpoint latest`).
# For `accelerate launch` run by hand: torch's launcher then relays these, and waits this long.
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"

launch() {
    local agent status sig
    set -m  # background jobs in their own process group
    accelerate launch "${PROCESS_FLAGS[@]}" "$@" &
    agent=$!
    set +m
    for sig in TERM INT HUP QUIT USR1; do
        # The trainers are the launcher's children (one per process); their DataLoader workers
        # ignore stop signals.
        # shellcheck disable=SC2064  # $agent and $sig are meant to expand now
        trap "echo 'launcher: SIG$sig relayed to the trainers' >&2; pkill -$sig -P $agent" "$sig"
    done
    while :; do
        status=0
        wait "$agent" || status=$?  # (the launchers run under set -e)
        # A trapped signal interrupts `wait`; waiting again returns the launcher's own status.
        kill -0 "$agent" 2>/dev/null || break
    done
    exit "$status"
}
