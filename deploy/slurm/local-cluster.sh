#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to try deploy/slurm/workers.sbatch without a cluster (CI starts one
# this way for tests/test_slurm.py). Needs root and Debian's slurmctld, slurmd, slurm-client and munge packages
# (installed here when missing).
#
#   deploy/slurm/local-cluster.sh start DIR [SLOTS]   # config, state and logs in DIR; prints the SLURM_CONF to export
#   deploy/slurm/local-cluster.sh stop DIR
#
# SLOTS (default 4): how many one-CPU tasks the node runs at once. It may exceed the cores (the node is declared
# with SLOTS CPUs), so that an array of 4 workers runs side by side on a 2-core machine, as on 4 nodes.
set -euo pipefail

usage() { echo "usage: $0 start DIR [SLOTS] | stop DIR" >&2; exit 2; }
[ $# -ge 2 ] || usage
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
slots=${3:-4}
node=$(hostname -s)

stop() {
    for daemon in slurmd slurmctld; do
        if [ -f "$dir/$daemon.pid" ]; then
            kill "$(cat "$dir/$daemon.pid")" 2>/dev/null || true
            rm -f "$dir/$daemon.pid"
        fi
    done
}

case $action in
stop) stop; exit 0 ;;
start) ;;
*) usage ;;
esac

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
fi

# munge authenticates the daemons to each other; the package made its key
if ! munge -n >/dev/null 2>&1; then
    mkdir -p /run/munge && chown munge /run/munge
    runuser -u munge -- munged
fi

mkdir -p "$dir/state" "$dir/spool"
cat > "$dir/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
SlurmctldPort=16817
SlurmdPort=16818
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdParameters=config_overrides
NodeName=$node NodeAddr=127.0.0.1 CPUs=$slots RealMemory=4000 State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=60 State=UP
EOF

export SLURM_CONF=$dir/slurm.conf
stop
slurmctld -c
slurmd
for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
        echo "export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.5
done
echo "the local SLURM node did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
exit 1
