#!/usr/bin/env bash
# Stop the daemons jobs/slurm-up.sh started, each by its pid file.
LAB=${SLURM_LAB:-/tmp/xray-slurm}
stop() {  # stop <name> <pidfile>
  [ -s "$2" ] || return 0
  local pid; pid=$(cat "$2")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    echo "stopped $1 ($pid)"
  fi
}
stop slurmd    "$LAB/run/slurmd.pid"
stop slurmctld "$LAB/run/slurmctld.pid"
stop slurmdbd  "$LAB/run/slurmdbd.pid"
stop mariadbd  /run/mysqld/mysqld.pid
stop munged    /run/munge/munged.pid
exit 0
