#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for the `slurm` tests (and for trying the
# cluster workflow on a laptop): munged + mariadbd + slurmdbd + slurmctld + slurmd from Debian's
# packages, started by hand (no systemd). Partitions `cpu` (default) and `gpu` on the same node;
# the node advertises 2 fake GPUs (gres backed by /dev/null-like char devices) so that
# --gpus-per-node is accepted -- jobs still run on the CPU (device_target=CPU).
# slurmdbd + MariaDB are needed: submitit reads job states from sacct.
# Idempotent; needs root. Env: SLURM_LAB (state/log dir, default /tmp/xray-slurm),
# SLURM_CPUS (CPUs the node advertises, default 8: more than the machine has, so that sweep
# members run side by side; Slurm accepts it thanks to config_overrides).
set -euo pipefail
LAB=${SLURM_LAB:-/tmp/xray-slurm}
HOST=$(hostname -s)
CPUS=${SLURM_CPUS:-8}
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))

wait_for() {  # wait_for <seconds> <cmd...>
  local n=$(( $1 * 5 )); shift
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "slurm-up: timed out waiting for: $*" >&2; return 1
}

[ "$(id -u)" = 0 ] || { echo "slurm-up: run as root (it installs packages and starts daemons)" >&2; exit 1; }

# 1. packages (this image's policy-rc.d keeps apt from starting the services; we start them)
PKGS="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
# shellcheck disable=SC2086
if ! dpkg -s $PKGS >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $PKGS >/dev/null
fi

# a fresh state every time: job ids restart at 1 (tests use fresh submitit folders)
"$(dirname "$0")/slurm-down.sh" >/dev/null 2>&1 || true
mkdir -p "$LAB"/{run,log}
rm -rf "$LAB/state"; mkdir -p "$LAB/state/ctld" "$LAB/state/d"

# 2. munge
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key
install -d -o munge -g munge -m 755 /run/munge
if ! (munge -n | unmunge) >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  wait_for 10 bash -c 'munge -n | unmunge'
fi

# 3. MariaDB + slurmdbd (accounting: sacct, which submitit polls for job states)
install -d -o mysql -g mysql /run/mysqld
if ! mariadb-admin ping >/dev/null 2>&1; then
  nohup /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 \
    --pid-file=/run/mysqld/mysqld.pid >"$LAB/log/mariadb.log" 2>&1 &
  wait_for 60 mariadb-admin ping
fi
# a fresh accounting DB too, so that restarted job ids never meet old rows
mariadb -e "DROP DATABASE IF EXISTS slurm_acct_db; CREATE DATABASE slurm_acct_db;
  CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
cat > /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$LAB/log/slurmdbd.log
PidFile=$LAB/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
CONF
chmod 600 /etc/slurm/slurmdbd.conf   # slurmdbd refuses a readable one
slurmdbd
wait_for 30 bash -c 'exec 3<>/dev/tcp/127.0.0.1/6819'

# 4. fake GPUs: gres needs File= pointing at character devices
mkdir -p "$LAB/fakedev"
for i in 0 1; do
  [ -e "$LAB/fakedev/nvidia$i" ] || mknod "$LAB/fakedev/nvidia$i" c 1 3
done
echo "NodeName=$HOST Name=gpu File=$LAB/fakedev/nvidia[0-1]" > /etc/slurm/gres.conf

# 5. slurm.conf: short credential expiry and scheduler intervals make requeues quick (~15 s)
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$LAB/state/ctld
SlurmdSpoolDir=$LAB/state/d
SlurmctldPidFile=$LAB/run/slurmctld.pid
SlurmdPidFile=$LAB/run/slurmd.pid
SlurmctldLogFile=$LAB/log/slurmctld.log
SlurmdLogFile=$LAB/log/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:2 State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST MaxTime=INFINITE State=UP
CONF

# 6. controller + node daemon
slurmctld
wait_for 30 scontrol ping
slurmd
wait_for 60 bash -c "sinfo -h -n $HOST -o %t | grep -qx idle"
# the controller registers with slurmdbd a moment after it starts; a job that ends before that
# is recorded without its partition
wait_for 30 bash -c "sacctmgr -n -P list cluster format=cluster | grep -qx local"
sinfo
