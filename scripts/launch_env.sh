# Sourced by every training launcher (run from the repository root) just before it execs
# `accelerate launch`: what all of them share.

# Preemption (SLURM's --signal, spot instances): torch's launcher relays these to the training
# processes, which finish their step, write a resume checkpoint and exit 0.
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
